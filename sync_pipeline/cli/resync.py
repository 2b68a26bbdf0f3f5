"""``resync``: back-fill mapped fields of one entity through Dagster (the ``resync`` job), and the
full re-evaluation preview behind ``plan --all``.

``sync-pipeline resync --entity E [--field F ...] [--since DATE] [--dry-run]``: after a field was added to
``entities.yaml`` (it is not synced until then), or to apply changed directions or policies to every
record. An entity that was never copied gets its initial copy instead (the ``sync`` job over every
partition, for that entity's assets only). With ``DAGSTER_HOME`` set the run is recorded in that
instance, so it shows in the UI's run list.
"""

from __future__ import annotations

import os
from typing import Any

import click

from sync_pipeline.cli.ops import CONFIG_OPTION, STATE_OPTION, _config, _console, _entity, _fmt, _table

PREVIEW_COLUMNS = ("entity", "dynamics_id", "marketo_id", "target", "op", "field", "before", "after", "rule")


def _instance() -> Any:
    import dagster as dg

    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


def _needs_initial_copy(state_path: str, config: Any, name: str) -> bool:
    from sync_pipeline.engine import resync as engine
    from sync_pipeline.engine.store import state

    with state.connect(state_path) as con:
        state.ensure_schema(con, config)
        return engine.needs_initial_copy(con, config.entity(name))


def run_resync(
    instance: Any, entity: str, fields: list[str], since: str | None, dry_run: bool, spec: Any = None
) -> tuple[Any, dict[str, Any], list[list[Any]]]:
    """Execute the connection's ``resync`` job in this process: (result, stats metadata, previewed writes).
    ``spec``: the connection (default: the shipped one, as its defs.yaml resolves now)."""
    from sync_pipeline import runs
    from sync_pipeline.connection.resync import resync_job_name, resync_op_name

    spec = spec or runs.connection()
    job = runs.definitions(spec).resolve_job_def(resync_job_name(spec.connection))
    op = resync_op_name(spec.connection)
    result = job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={
            "ops": {
                op: {"config": {"entity": entity, "fields": list(fields), "since": since, "dry_run": dry_run}}
            },
            "loggers": {"console": {"config": {"log_level": "WARNING"}}},
        },
    )
    meta: dict[str, Any] = {}
    rows: list[list[Any]] = []
    if result.success:
        for ev in result.all_node_events:
            if ev.event_type_value == "STEP_OUTPUT":
                meta = {k: v.value for k, v in ev.step_output_data.metadata.items()}
        rows = result.output_for_node(op)
    return result, meta, rows


def _failure(result: Any) -> str:
    failures = [ev.message or ev.event_type_value for ev in result.all_events if ev.is_failure]
    return "; ".join(failures[:3]) or "the run failed"


def print_full_plan(config: Any, entity: str | None, limit: int, spec: Any) -> None:
    """``plan --all``: what a full re-evaluation of every linked record under the current rules would write."""
    state_path = spec.store_path
    console = _console()
    names = [entity] if entity else [e.name for e in config.entities if not e.is_derived]
    with _instance() as instance:
        for name in names:
            if _needs_initial_copy(state_path, config, name):
                console.print(
                    f"{name}: not copied yet; `sync-pipeline resync --entity {name}` runs its initial copy"
                )
                continue
            with console.status(f"{name}: reading both sides and re-evaluating every linked record..."):
                result, meta, rows = run_resync(instance, name, [], None, dry_run=True, spec=spec)
            if not result.success:
                raise click.ClickException(f"{name}: the preview failed: {_failure(result)}")
            table = _table(
                f"{name}: a full re-evaluation would write {len(rows)} field value(s) "
                f"to {meta.get('records_differing', 0)} of {meta.get('records_in_scope', 0)} linked "
                f"record(s)" + (f" (first {limit})" if limit and len(rows) > limit else ""),
                list(PREVIEW_COLUMNS),
            )
            for row in rows[:limit] if limit else rows:
                table.add_row(*(_fmt(v) for v in row))
            console.print(
                table if rows else f"{name}: nothing to write; both systems agree under the current rules."
            )
    console.print("Run it with `sync-pipeline resync --entity E` (one entity at a time).")


@click.command()
@click.option("--entity", required=True, help="The entity to back-fill (a name from entities.yaml).")
@click.option(
    "--field",
    "fields",
    multiple=True,
    metavar="FIELD",
    help="A Marketo field name of the entity (repeatable); default: every synced field.",
)
@click.option(
    "--since",
    default=None,
    metavar="DATE",
    help="Only records created or modified in Dynamics at or after DATE (ISO 8601; Advanced Sync).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be written; write nothing.")
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(min=0), help="Rows shown with --dry-run."
)
@STATE_OPTION
@CONFIG_OPTION
def resync(
    entity: str,
    fields: tuple[str, ...],
    since: str | None,
    dry_run: bool,
    limit: int,
    state_path: str,
    config_path: str | None,
) -> None:
    """Back-fill mapped fields of ENTITY for every linked record, through Dagster (the `resync` job).

    Reads the fields again on both sides, then writes only the values that differ, per each field's
    direction and policy (two-way: a blank never overwrites a value; conflicts by policy; opt-outs win).
    An entity added to the mapping after the first sync gets its initial copy instead.
    """
    from sync_pipeline.engine import resync as engine

    config = _config(config_path)
    _entity(config, entity)
    try:
        engine.resolve_fields(config.entity(entity), list(fields))
        engine.parse_since(since)
    except Exception as exc:  # ConfigError: a usage problem, named
        raise click.BadParameter(str(exc)) from None
    from sync_pipeline import runs

    spec = runs.connection(state_path=state_path, entities_path=config_path)  # the run's resources use them
    console = _console()
    with _instance() as instance:
        if _needs_initial_copy(state_path, config, entity):
            if fields or since or dry_run:
                raise click.UsageError(
                    f"{entity} has not been copied yet: run `sync-pipeline resync --entity "
                    f"{entity}` (no --field/--since/--dry-run) for its initial copy"
                )
            from sync_pipeline.connection.selection import entity_selection

            with console.status(f"initial copy of {entity} (every partition, its assets only)..."):
                result = runs.run_sync(
                    instance,
                    scope="all",
                    raise_on_error=False,
                    spec=spec,
                    selection=entity_selection(spec.connection, config, entity),
                    tags={"sync/kind": f"initial-copy:{entity}"},
                )
            if not result.success:
                raise click.ClickException(f"the initial copy of {entity} failed: {_failure(result)}")
            console.print(f"initial copy of {entity} done (run {result.run_id})")
            return
        with console.status(f"back-filling {entity}..."):
            result, meta, rows = run_resync(instance, entity, list(fields), since, dry_run, spec=spec)
    if not result.success:
        raise click.ClickException(f"the resync run failed: {_failure(result)}")
    summary = _table(
        f"resync {entity} (run {result.run_id})" + (" - dry run, nothing written" if dry_run else ""),
        ["measure", "value"],
    )
    for k, v in meta.items():
        summary.add_row(k, _fmt(v))
    console.print(summary)
    if dry_run:
        table = _table(f"Field writes ({len(rows)})", list(PREVIEW_COLUMNS))
        for row in rows[:limit] if limit else rows:
            table.add_row(*(_fmt(v) for v in row))
        console.print(table if rows else "Nothing to write: both systems agree.")
    failed = sum(v for k, v in meta.items() if k.startswith("failed/"))
    if failed:
        raise click.ClickException(f"{failed} record(s) could not be written (see `sync-pipeline errors`)")
