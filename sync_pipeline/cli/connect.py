"""Connecting an org: ``sync-pipeline validate`` and ``sync-pipeline init``.

``validate`` checks both systems against the configuration (``--config`` / ``SYNC_CONFIG``, else the packaged
``entities.yaml``), one line per check: ok / warning / error with the fix. Exit code 0 when no check is an
error, 1 otherwise. It only reads.

``init`` reads the org's metadata and Marketo's describe endpoints and writes an ``entities.yaml``: the native
default mapping for the standard tables, plus custom columns and tables matched by display name. An existing
file is never overwritten silently: the command shows the diff and writes only with ``--write`` (keeping a
``.bak``), and it keeps every entity and field the file already has. ``--create-marketo-fields`` (off by
default; Marketo fields cannot be deleted through the API) creates the missing custom lead fields.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

import click

from sync_pipeline.cli.ops import CONFIG_OPTION, _clients, _config, _console

_STYLE = {"ok": "green", "warning": "yellow", "error": "bold red"}


@click.command("validate")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object per check instead of the table.")
@click.option("--errors-only", is_flag=True, help="Print warnings and errors only.")
def validate(config_path: str | None, as_json: bool, errors_only: bool) -> None:
    """Check credentials, tables, columns, option sets, Marketo fields and permissions (read only)."""
    from sync_pipeline.admin.validate import connection_checks

    config = _config(config_path)
    stack, dynamics, marketo = _clients()
    with stack:
        checks, _ = connection_checks(config, dynamics.get_client(), marketo.get_client())
    shown = [c for c in checks if not errors_only or c.status != "ok"]
    if as_json:
        for c in shown:
            click.echo(
                json.dumps(
                    {
                        "status": c.status,
                        "check": c.check,
                        "subject": c.subject,
                        "message": c.message,
                        "fix": c.fix,
                    }
                )
            )
    else:
        console = _console()
        for c in shown:
            console.print(
                f"[{_STYLE[c.status]}]{c.status:<7}[/] {c.check:<20} {c.subject}: {c.message}"
                + (f"\n{'':<8}fix: {c.fix}" if c.fix else ""),
                markup=True,
                highlight=False,
            )
    counts = {s: sum(1 for c in checks if c.status == s) for s in ("ok", "warning", "error")}
    summary = f"{counts['ok']} ok, {counts['warning']} warnings, {counts['error']} errors"
    click.echo(summary, err=as_json)
    if counts["error"]:
        sys.exit(1)


@click.command("init")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("entities.yaml"),
    show_default=True,
    help="The entities.yaml to write (an existing one is merged, never dropped).",
)
@click.option(
    "--write",
    is_flag=True,
    help="Replace an existing file (its old version is kept as .bak). Without "
    "it, a changed mapping is only shown as a diff.",
)
@click.option(
    "--create-marketo-fields",
    is_flag=True,
    help="Create the custom Marketo lead fields the mapping needs and the instance lacks (schema API; "
    "fields cannot be deleted through the API, so this is never done by default).",
)
@click.option(
    "--prefix",
    default="",
    help="Only custom columns/tables whose logical name starts with this "
    "(e.g. new_); default: every custom one.",
)
def init(out_path: Path, write: bool, create_marketo_fields: bool, prefix: str) -> None:
    """Write entities.yaml from the org's metadata and Marketo's describe endpoints."""
    from sync_pipeline.admin import discover

    stack, dynamics, marketo = _clients()
    with stack:
        dclient, mclient = dynamics.get_client(), marketo.get_client()
        result = discover.discover(dclient, mclient, prefix=prefix)
        existing = out_path.read_text(encoding="utf-8") if out_path.exists() else None
        text = (
            discover.merge_with_existing(result, existing)
            if existing is not None
            else discover.render(result)
        )
        if create_marketo_fields:
            created = discover.create_marketo_fields(mclient, result)
            for name, status in created:
                click.echo(f"marketo field {name}: {status}")
            if not created:
                click.echo("marketo fields: none missing")
            # The fields now exist: map the columns that waited for them.
            result = discover.discover(dclient, mclient, prefix=prefix)
            text = (
                discover.merge_with_existing(result, existing)
                if existing is not None
                else discover.render(result)
            )
        elif result.missing_marketo_fields:
            click.echo(
                f"{len(result.missing_marketo_fields)} custom columns have no Marketo field "
                f"({', '.join(f.name for f in result.missing_marketo_fields)}); they are commented out. "
                "Create them with --create-marketo-fields, or in Marketo Admin > Field Management."
            )
    for note in result.notes:
        click.echo(f"note: {note}")
    if existing is None:
        out_path.write_text(text, encoding="utf-8")
        click.echo(
            f"wrote {out_path}: {len(result.entities)} entities. Next: SYNC_CONFIG={out_path} "
            "sync-pipeline validate"
        )
        return
    if text == existing:
        click.echo(f"{out_path} is up to date with the org")
        return
    diff = "".join(
        difflib.unified_diff(
            existing.splitlines(keepends=True),
            text.splitlines(keepends=True),
            f"{out_path} (yours)",
            f"{out_path} (with the org's changes)",
        )
    )
    click.echo(diff)
    if not write:
        click.echo(
            f"{out_path} not changed: run again with --write to apply the diff above (your entities and "
            "fields are kept)"
        )
        return
    backup = out_path.with_name(out_path.name + ".bak")
    backup.write_text(existing, encoding="utf-8")
    out_path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {out_path} (previous version: {backup})")


@click.command("backfill")
@CONFIG_OPTION
@click.option(
    "--scope",
    default="all",
    show_default=True,
    help="all (every partition: the initial copy), latest, or START...END partition keys.",
)
def backfill(config_path: str | None, scope: str) -> None:
    """Run the sync job in this process over the partitions (the first backfill from the command line).

    The run is recorded in the Dagster instance of DAGSTER_HOME when it is set (the UI shows it), else in a
    temporary one. For a large org, prefer the UI's backfill (multi-run, 100 partitions a run)."""
    import os

    import dagster as dg

    from sync_pipeline import runs

    _config(config_path)  # a broken file fails here, naming the entity and field
    spec = runs.connection(entities_path=config_path)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    result = runs.run_sync(instance, scope=scope, raise_on_error=False, spec=spec)
    from sync_pipeline.connection.assets import RUN_TOTALS

    for key, md in sorted(runs.materialized_metadata(result).items()):
        totals = md.get(RUN_TOTALS) or md  # a run over many partitions reports its totals once
        if "rows_read" in totals:
            click.echo(
                f"{key}: {int(totals['rows_read']):,} rows read, {int(totals.get('rows_changed') or 0):,} changed"
            )
        elif "dagster/row_count" in totals:
            click.echo(f"{key}: {int(totals['dagster/row_count']):,} rows")
    if not result.success:
        failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        for e in failures:
            err = e.step_failure_data.error if e.event_specific_data else None
            click.echo(f"failed: {e.step_key}: {err.message.strip() if err else 'see the run log'}", err=True)
        raise click.ClickException(f"run {result.run_id} failed")
    click.echo(f"run {result.run_id} succeeded")
