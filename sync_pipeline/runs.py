"""Running a connection's sync job in-process: the initial copy over every partition, and incremental cycles.

Used by the demo, the CLI, the tests and the benchmarks. Nothing here reads the environment at import: a
connection is loaded from its ``defs/<name>/defs.yaml`` when asked for (its templates read the environment
then), and callers that must not touch ``os.environ`` pass overrides (state path, mapping) and ``settings``
(values for the connection's env var names) instead.

The initial copy executes the ``<connection>__sync`` job over the whole partition range in one run, which is
what a single-run backfill does: every extract partition of the range, then the (unpartitioned) plans and pushes
once over what is pending. The daemon-driven backfill in the UI uses the same job with
``BackfillPolicy.multi_run``: one such run per range of at most 100 partitions. An incremental cycle runs the latest
partition, whose extracts follow the delta links and activity tokens, then the plans and pushes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import dagster as dg

from sync_pipeline.connection.build import sync_job_name
from sync_pipeline.connection.component import SyncConnection
from sync_pipeline.connection.partitions import build_partitions

DEFAULT_CONNECTION = "sandbox"  # the connection shipped in defs/ (the demo's and the tests')


def connection(name: str = DEFAULT_CONNECTION, **overrides: Any) -> SyncConnection:
    """The connection declared in ``defs/<name>/defs.yaml``, resolved now, with ``overrides`` (e.g.
    ``state_path=``, ``entities_path=``) applied."""
    from dagster.components.core.component_tree import ComponentTree

    tree = ComponentTree.for_project(Path(__file__).parent)
    loaded = tree.load_component(name, SyncConnection).named(name)
    fields = {k: v for k, v in loaded.model_dump().items() if k in SyncConnection.model_fields}
    return SyncConnection.model_validate(fields | {k: v for k, v in overrides.items() if v is not None})


@lru_cache(maxsize=8)
def _definitions(
    spec_json: str, settings: tuple[tuple[str, str], ...] | None, build_env: tuple[str | None, ...]
) -> dg.Definitions:
    spec = SyncConnection.model_validate_json(spec_json)
    return dg.Definitions.merge(
        spec.definitions(dict(settings) if settings is not None else None),
        dg.Definitions(executor=dg.in_process_executor),
    )


def definitions(
    spec: SyncConnection | None = None, settings: Mapping[str, str] | None = None
) -> dg.Definitions:
    """The definitions of one connection (cached per resolved declaration and settings)."""
    spec = spec or connection()
    # Optional non-secret settings (CA bundle, Munchkin id) are read when the resources are built: part of the key.
    build_env = () if settings is not None else tuple(os.environ.get(n or "") for n in spec.build_time_env())
    return _definitions(
        spec.model_dump_json(), tuple(sorted(settings.items())) if settings is not None else None, build_env
    )


def partition_keys(spec: SyncConnection | None = None) -> list[str]:
    return list(build_partitions((spec or connection()).config).get_partition_keys())


def run_sync(
    instance: dg.DagsterInstance,
    *,
    scope: str = "latest",
    raise_on_error: bool = True,
    tags: dict[str, str] | None = None,
    selection: list[dg.AssetKey] | None = None,
    log_level: str = "WARNING",
    spec: SyncConnection | None = None,
    settings: Mapping[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """``scope``: "all" (initial copy, every partition), "latest", or "<start>...<end>" partition keys."""
    spec = spec or connection()
    keys = partition_keys(spec)
    if scope == "all":
        start, end = keys[0], keys[-1]
    elif scope == "latest":
        start = end = keys[-1]
    else:
        start, _, end = scope.partition("...")
    run_tags = {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}
    run_tags.update(tags or {})
    job = definitions(spec, settings).resolve_job_def(sync_job_name(spec.connection))
    # The console logger at WARNING: step events stay in the instance's event log (and the UI), not on stdout.
    return job.execute_in_process(
        instance=instance,
        tags=run_tags,
        raise_on_error=raise_on_error,
        asset_selection=selection,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )


def materialized_metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """Last materialization metadata per asset key ("a/b/c" -> {name: value})."""
    out: dict[str, dict[str, Any]] = {}
    for ev in result.get_asset_materialization_events():
        m = ev.materialization
        out["/".join(m.asset_key.path)] = {k: v.value for k, v in m.metadata.items()}
    return out
