"""The ``resync`` job: back-fill mapped fields of one entity (Marketo's "Quick Sync"), in its own run.

Launch it from the UI (Jobs -> <connection>__resync -> Launchpad, config ``ops: <connection>__backfill: config:
{entity: contact, fields: [title], since: "2026-09-01"}``) or with ``sync-pipeline resync --entity E [--field F]
[--since DATE]``. The op is in the connection's pool like every asset, so it runs between incremental syncs, which
keep flowing before and after it. An entity that was never copied gets its initial copy instead: the
``<connection>__sync`` job over every partition for that entity's assets only (``sync-pipeline resync --entity E``).
"""

import dagster as dg
from pydantic import Field

from sync_pipeline.connection.assets import guard_environment, permanent_errors_fail_fast
from sync_pipeline.connection.keys import pool, qualified
from sync_pipeline.connection.resources import RESOURCES, bound, required_keys
from sync_pipeline.engine import resync as resync_engine
from sync_pipeline.engine.store.state import utcnow

RESYNC = "resync"
OP = "backfill"


def resync_job_name(connection: str) -> str:
    return qualified(connection, RESYNC)


def resync_op_name(connection: str) -> str:
    """The op whose config the launchpad and ``sync-pipeline resync`` fill in (``ops: {<name>: {config: ...}}``)."""
    return qualified(connection, OP)


class ResyncConfig(dg.Config):
    entity: str = Field(description="Entity to back-fill (a name from entities.yaml)")
    fields: list[str] = Field(
        default_factory=list, description="Marketo field names; empty: every synced field"
    )
    since: str | None = Field(
        default=None,
        description="Only records created or modified in Dynamics at or "
        "after this date (ISO 8601): Advanced Sync",
    )
    dry_run: bool = Field(default=False, description="Plan only: return the writes, change nothing")


def build_resync_job(conn: str, tags: dict[str, str]) -> dg.JobDefinition:
    @dg.op(
        name=resync_op_name(conn),
        pool=pool(conn),
        required_resource_keys=required_keys(conn, *RESOURCES),
        description="Re-read the fields' source columns and write the values that differ to the other side of "
        "every linked record (direction and policy of each field).",
    )
    def resync_op(context: dg.OpExecutionContext, config: ResyncConfig) -> dg.Output:
        state, dynamics, marketo = bound(context, conn)
        with permanent_errors_fail_fast(), state.connect() as con:
            if not config.dry_run:
                guard_environment(con, state, dynamics, marketo)
            stats, preview = resync_engine.resync(
                con,
                state.config,
                config.entity,
                config.fields or None,
                resync_engine.parse_since(config.since),
                dynamics.get_client(),
                marketo.get_client(),
                context.run_id,
                utcnow(),
                dry_run=config.dry_run,
            )
        context.log.info(
            f"resync {config.entity}: {stats.in_scope} linked records in scope, {stats.differing} "
            f"differing; API calls {stats.calls}"
        )
        return dg.Output([list(r) for r in preview], metadata=stats.as_metadata())

    @dg.job(
        name=resync_job_name(conn),
        description="Back-fill mapped fields of one entity for every linked record "
        "(after a field was added, or to re-evaluate every record under changed rules).",
        tags={"sync/kind": "resync", **tags},
    )
    def resync_job() -> None:
        resync_op()

    return resync_job
