"""The ``validate`` job: the same checks as ``sync-pipeline validate``, runnable from the Dagster UI.

One op, no assets: it reads both systems and never writes. Each check is logged as a line and the whole
list is attached as markdown metadata; the run fails (without retries: nothing a retry could fix) when
any check is an error. The sync's own runs run the Dynamics checks at their start (admin/validate.py).
"""

import dagster as dg

from sync_pipeline.connection.keys import qualified
from sync_pipeline.connection.resources import RESOURCES, bound, required_keys

VALIDATE = "validate"


def validate_job_name(connection: str) -> str:
    return qualified(connection, VALIDATE)


def build_validate_job(conn: str, tags: dict[str, str]) -> dg.JobDefinition:
    @dg.op(
        name=qualified(conn, "validate_connection"),
        out=dg.Out(dg.Nothing),
        required_resource_keys=required_keys(conn, *RESOURCES),
        description="Credentials, tables, columns, option sets, Marketo fields and permissions (read only).",
    )
    def validate_connection(context: dg.OpExecutionContext) -> None:
        from sync_pipeline.admin.validate import connection_checks, errors

        state, dynamics, marketo = bound(context, conn)
        checks, _ = connection_checks(state.config, dynamics.get_client(), marketo.get_client())
        for c in checks:
            (
                context.log.error
                if c.status == "error"
                else context.log.warning
                if c.status == "warning"
                else context.log.info
            )(c.line())
        table = "\n".join(
            f"| {c.status} | {c.check} | `{c.subject}` | {c.message} | {c.fix} |" for c in checks
        )
        counts = {s: sum(1 for c in checks if c.status == s) for s in ("ok", "warning", "error")}
        context.add_output_metadata(
            {
                **{f"checks_{k}": dg.MetadataValue.int(v) for k, v in counts.items()},
                "checks": dg.MetadataValue.md(
                    "| status | check | subject | message | fix |\n|---|---|---|---|---|\n" + table
                ),
            }
        )
        bad = errors(checks)
        if bad:
            raise dg.Failure(
                description=f"{len(bad)} checks failed: " + "; ".join(c.line() for c in bad),
                allow_retries=False,
            )

    @dg.job(
        name=validate_job_name(conn),
        tags=tags,
        description="Check the connection to both systems against its entity mapping (read only): the same "
        "checks as `sync-pipeline validate`.",
    )
    def validate_job() -> None:
        validate_connection()

    return validate_job
