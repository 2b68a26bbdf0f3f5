"""Everything one connection contributes to the code location, assembled from its ``SyncConnection``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING

import dagster as dg

from sync_pipeline.connection.assets import build_assets
from sync_pipeline.connection.automation import build_sensors
from sync_pipeline.connection.keys import CONNECTION_TAG, asset_key, qualified
from sync_pipeline.connection.mapping_checks import build_mapping_checks
from sync_pipeline.connection.partitions import build_partitions
from sync_pipeline.connection.resources import build_resources
from sync_pipeline.connection.resync import build_resync_job
from sync_pipeline.connection.validate import build_validate_job

if TYPE_CHECKING:
    from sync_pipeline.connection.component import SyncConnection

FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=2), warn_window=timedelta(minutes=30))
SYNC_JOB = "sync"


def sync_job_name(connection: str) -> str:
    return qualified(connection, SYNC_JOB)


def build_connection(spec: SyncConnection, settings: Mapping[str, str] | None = None) -> dg.Definitions:
    name, config = spec.connection, spec.config
    partitions = build_partitions(config)
    loads = {asset_key(name, e.name, "push") for e in config.entities} | {
        asset_key(name, e.name, "push", "dynamics") for e in config.persons
    }
    assets = [
        a.map_asset_specs(lambda s: s.replace_attributes(freshness_policy=FRESHNESS) if s.key in loads else s)
        for a in build_assets(name, config, partitions)
    ]
    # Every run of this connection carries its name: the run queue serialises a connection's runs on this tag
    # (dagster.yaml tag_concurrency_limits), while runs of different connections go in parallel.
    tags = {CONNECTION_TAG: name}
    job = dg.define_asset_job(
        sync_job_name(name),
        selection=dg.AssetSelection.assets(*assets),
        tags=tags,
        description=f"`{name}`: extract, plan and push every entity (extracts read the "
        "selected modified-time partitions; plans and pushes what is pending).",
    )
    return dg.Definitions(
        assets=assets,
        asset_checks=build_mapping_checks(name, config),
        jobs=[job, build_resync_job(name, tags), build_validate_job(name, tags)],
        sensors=build_sensors(spec, job, partitions),
        resources=build_resources(spec, settings),
    )
