"""A year of daily partitions backfills in a handful of runs, per Dagster's own backfill chunking."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.definitions.automation_tick_evaluation_context import (
    build_run_requests_with_backfill_policies,
)
from dagster._core.definitions.events import AssetKeyPartitionKey

from sync_pipeline import runs as sync_runs
from sync_pipeline.config.model import DEFAULT_PATH
from sync_pipeline.connection.build import sync_job_name
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
    asset_keys = [k for k in job.asset_layer.executable_asset_keys]
    policies = {graph.get(k).backfill_policy for k in asset_keys}
    assert len(policies) == 1  # one policy: every asset of a chunk runs in the same run
    policy = policies.pop()
    assert policy is not None and policy.max_partitions_per_run is not None

    with dg.DagsterInstance.ephemeral() as instance:
        requests = build_run_requests_with_backfill_policies(
            [AssetKeyPartitionKey(k, p) for k in asset_keys for p in keys], graph, instance
        )
    assert len(requests) == math.ceil(365 / policy.max_partitions_per_run) <= 5
    ranges = sorted(
        (r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
        for r in requests
    )
    # Contiguous chunks covering the year exactly once, each run carrying every asset of the pipeline.
    assert ranges[0][0] == keys[0] and ranges[-1][1] == keys[-1]
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert keys.index(start) == keys.index(end) + 1
    assert all(set(r.asset_selection) == set(asset_keys) for r in requests)
