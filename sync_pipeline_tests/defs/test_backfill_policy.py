"""A year of daily partitions backfills in a handful of runs, per Dagster's own job-backfill chunking; only the
extracts are partitioned, so each run extracts its range and then plans and pushes what is pending once."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.execution.job_backfill import _subdivide_partition_key_range

from sync_pipeline import runs as sync_runs
from sync_pipeline.config.model import DEFAULT_PATH
from sync_pipeline.connection.build import sync_job_name
from sync_pipeline.connection.keys import stage_of
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN


def year_config(tmp_path: Path) -> Path:
    raw = yaml.safe_load(DEFAULT_PATH.read_text())
    # end_offset=1 includes today's window: 364 days back gives 365 daily partitions.
    raw["sync"]["partitions"]["start_date"] = (datetime.now(UTC).date() - timedelta(days=364)).isoformat()
    path = tmp_path / "entities.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_year_of_daily_partitions_is_a_handful_of_runs(tmp_path) -> None:
    defs = sync_runs.definitions(sync_runs.connection(entities_path=str(year_config(tmp_path))))
    job = defs.resolve_job_def(sync_job_name(CONN))
    partitions = job.partitions_def
    assert isinstance(partitions, dg.TimeWindowPartitionsDefinition)
    keys = partitions.get_partition_keys()
    assert len(keys) == 365
    graph = defs.resolve_asset_graph()
    asset_keys = list(job.asset_layer.executable_asset_keys)
    partitioned = {k for k in asset_keys if graph.get(k).partitions_def is not None}
    # One meaning per partition: extracts are sliced by modified time, plans and pushes run on what is pending.
    assert {stage_of(k) for k in partitioned} == {"extract"}
    assert {stage_of(k) for k in set(asset_keys) - partitioned} == {"plan", "push"}
    assert {graph.get(k).partitions_def for k in partitioned} == {partitions}
    policy = job.backfill_policy  # what the daemon chunks a backfill of the job by (its partitioned assets')
    assert policy.max_partitions_per_run is not None

    ranges = _subdivide_partition_key_range(
        partitions, dg.PartitionKeyRange(keys[0], keys[-1]), policy.max_partitions_per_run
    )
    assert len(ranges) == math.ceil(365 / policy.max_partitions_per_run) <= 5
    # Contiguous chunks covering the year exactly once, oldest first, the latest window (delta links) last.
    assert ranges[0].start == keys[0] and ranges[-1].end == keys[-1]
    for previous, chunk in pairwise(ranges):
        assert keys.index(chunk.start) == keys.index(previous.end) + 1
