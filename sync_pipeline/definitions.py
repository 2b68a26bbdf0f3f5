"""The one place where the Dagster definitions are assembled (``workspace.yaml`` points here)."""

from __future__ import annotations

import os
from datetime import timedelta

import dagster as dg

from sync_pipeline.config.model import SyncConfig, load_config
from sync_pipeline.defs.assets import build_assets, push_key
from sync_pipeline.defs.automation import JOB_NAME, build_sensors
from sync_pipeline.defs.checks import build_checks
from sync_pipeline.defs.mapping_checks import build_mapping_checks
from sync_pipeline.defs.partitions import build_partitions
from sync_pipeline.defs.resources import build_resources
from sync_pipeline.defs.validate import validate_job
from sync_pipeline.defs.resync import build_resync_job

FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=2), warn_window=timedelta(minutes=30))


def build_definitions(config: SyncConfig | None = None) -> dg.Definitions:
    config = config or load_config(os.environ.get("SYNC_CONFIG"))
    partitions = build_partitions(config)
    loads = {push_key(e.name) for e in config.entities} | {push_key(e.name, "dynamics") for e in config.persons}
    assets = [
        a.map_asset_specs(lambda spec: spec.replace_attributes(freshness_policy=FRESHNESS)
                          if spec.key in loads else spec)
        for a in build_assets(config, partitions)
    ]
    job = dg.define_asset_job(JOB_NAME, selection=dg.AssetSelection.assets(*assets), partitions_def=partitions,
                              description="Extract, plan and push every entity for a modified-time window.")
    automation = build_sensors(config, job, partitions)
    return dg.Definitions(
        assets=assets,
        asset_checks=build_checks(config) + build_mapping_checks(config),
        jobs=[job, build_resync_job(), validate_job],
        sensors=[s for s in automation if not isinstance(s, dg.ScheduleDefinition)],
        schedules=[s for s in automation if isinstance(s, dg.ScheduleDefinition)],
        resources=build_resources(),
        # One process per run: the Marketo rate governor is per process, and DuckDB has one writer.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
