"""Running the sync job in-process: the initial copy over every partition, and incremental cycles.

Used by the demo, the tests and the benchmarks. The initial copy executes the ``sync`` job over the
whole partition range in one run, which is what a single-run backfill does (the daemon-driven
backfill in the UI uses the same job with ``BackfillPolicy.multi_run``); an incremental cycle runs
the latest partition, whose extracts follow the delta links and activity tokens.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import dagster as dg

from sync_pipeline.config.model import load_config
from sync_pipeline.defs.automation import JOB_NAME
from sync_pipeline.defs.partitions import build_partitions


# Settings build_resources() reads when the definitions are built (not at run time like dg.EnvVar):
# part of the cache key, so a process that switches state stores never runs against the old one.
_EAGER_ENV = ("SYNC_STATE_PATH", "MARKETO_MUNCHKIN_ID", "SYNC_WORK_DIR", "SYNC_CA_BUNDLE", "MARKETO_CALLS_PER_20S",
              "MARKETO_MAX_CONCURRENT", "MARKETO_DAILY_QUOTA")


@lru_cache(maxsize=4)
def _definitions(config_path: str | None, _env: tuple[str | None, ...] = ()) -> dg.Definitions:
    from sync_pipeline.definitions import build_definitions

    return build_definitions(load_config(config_path))


def definitions() -> dg.Definitions:
    return _definitions(os.environ.get("SYNC_CONFIG"), tuple(os.environ.get(k) for k in _EAGER_ENV))


def partition_keys() -> list[str]:
    return build_partitions(load_config(os.environ.get("SYNC_CONFIG"))).get_partition_keys()


def run_sync(instance: dg.DagsterInstance, *, scope: str = "latest", raise_on_error: bool = True,
             tags: dict[str, str] | None = None, selection: list[dg.AssetKey] | None = None,
             log_level: str = "WARNING") -> dg.ExecuteInProcessResult:
    """``scope``: "all" (initial copy, every partition), "latest", or "<start>...<end>" partition keys."""
    keys = partition_keys()
    if scope == "all":
        start, end = keys[0], keys[-1]
    elif scope == "latest":
        start = end = keys[-1]
    else:
        start, _, end = scope.partition("...")
    run_tags = {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}
    run_tags.update(tags or {})
    job = definitions().resolve_job_def(JOB_NAME)
    # The console logger at WARNING: step events stay in the instance's event log (and the UI), not on stdout.
    return job.execute_in_process(instance=instance, tags=run_tags, raise_on_error=raise_on_error,
                                  asset_selection=selection,
                                  run_config={"loggers": {"console": {"config": {"log_level": log_level}}}})


def materialized_metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """Last materialization metadata per asset key ("a/b/c" -> {name: value})."""
    out: dict[str, dict[str, Any]] = {}
    for ev in result.get_asset_materialization_events():
        m = ev.materialization
        out["/".join(m.asset_key.path)] = {k: v.value for k, v in m.metadata.items()}
    return out
