"""One asset check per entity's plan: every mapped field is synced (none waits for its back-fill).

A field added to an entity that is already synced stays out of the incremental plans until
``sync-pipeline resync`` back-filled it (engine/mapping.py); this check says so on the plan asset, with
the command to run, so the UI shows why a newly mapped field does not move yet. One step for all
entities, so a sync run pays for it once.
"""

import dagster as dg

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.connection.keys import asset_key, pool, qualified
from sync_pipeline.connection.resources import bound, required_keys
from sync_pipeline.engine import mapping

CHECK_NAME = "mapping_backfilled"


def build_mapping_checks(conn: str, config: SyncConfig) -> list[dg.AssetChecksDefinition]:
    entities = {asset_key(conn, e.name, "plan"): e.name for e in config.entities if not e.is_derived}
    if not entities:
        return []
    specs = [
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset=key,
            description=f"Every field mapped for `{name}` is synced: "
            "none waits for its back-fill (sync-pipeline resync).",
        )
        for key, name in entities.items()
    ]

    @dg.multi_asset_check(
        name=qualified(conn, CHECK_NAME),
        specs=specs,
        can_subset=True,
        pool=pool(conn),
        required_resource_keys=required_keys(conn, "state"),
        description="Fields added to the mapping and not back-filled yet, per entity.",
    )
    def check(context: dg.AssetCheckExecutionContext):
        state = bound(context, conn)[0]
        with state.connect() as con:
            for key in context.selected_asset_check_keys:
                name = entities[key.asset_key]
                pending = mapping.pending_fields(con, name)
                command = f"sync-pipeline resync --entity {name}" + "".join(f" --field {f}" for f in pending)
                yield dg.AssetCheckResult(
                    asset_key=key.asset_key,
                    check_name=CHECK_NAME,
                    passed=not pending,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={
                        "pending_fields": ", ".join(pending) or "none",
                        "launch": command if pending else "-",
                    },
                )

    return [check]
