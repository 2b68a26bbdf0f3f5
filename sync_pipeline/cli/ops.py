"""Operating commands: ``plan``, ``status``, ``errors``, ``rollback``, ``rebaseline``.

Exit codes: 0 done; 1 the operation failed (run failed, writes failed, store missing or locked,
wrong environment); 2 bad usage (click). The state store comes from ``--state`` / ``SYNC_STATE_PATH``,
the clients from the same environment variables as the Dagster definitions.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import duckdb
from rich.console import Console
from rich.table import Table

from sync_pipeline.config.model import ConfigError, SyncConfig, load_config
from sync_pipeline.connection.resources import DEFAULT_STATE_PATH, build_resources, by_kind
from sync_pipeline.engine.store import state as state_mod
from sync_pipeline.engine.store.state import one_row, utcnow

STATE_OPTION = click.option(
    "--state",
    "state_path",
    envvar="SYNC_STATE_PATH",
    default=DEFAULT_STATE_PATH,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="DuckDB state store (env SYNC_STATE_PATH).",
)
CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    envvar="SYNC_CONFIG",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="entities.yaml (env SYNC_CONFIG; default: the packaged one).",
)
WAIT_OPTION = click.option(
    "--wait",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait while a sync run holds the state store.",
)


def _console() -> Console:
    # Wide when not a terminal (pipes, logs), unless COLUMNS says otherwise: long reasons stay readable.
    return Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200, soft_wrap=False)


def _table(title: str, columns: list[str], numeric: tuple[str, ...] = ()) -> Table:
    """Ids and run ids never wrap (copy-paste into --release / rollback); long texts fold."""
    table = Table(title=title)
    for col in columns:
        if col in numeric:
            table.add_column(col, justify="right", no_wrap=True)
        elif "id" in col.split("_") or "id" in col.split(" ") or col in ("run", "last run"):
            table.add_column(col, no_wrap=True, min_width=min(36, max(len(col), 10)))
        else:
            table.add_column(col, overflow="fold")
    return table


def _config(config_path: str | None) -> SyncConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None


def _entity(config: SyncConfig, name: str | None) -> str | None:
    if name is not None and name not in config.by_name:
        raise click.BadParameter(
            f"{name!r} is not a configured entity ({', '.join(config.by_name)})", param_hint="--entity"
        )
    return name


@contextlib.contextmanager
def _store(
    path: str, read_only: bool, wait: float = state_mod.LOCK_WAIT_SECONDS
) -> Iterator[duckdb.DuckDBPyConnection]:
    if not Path(path).exists():
        raise click.ClickException(
            f"no state store at {path} (set --state or SYNC_STATE_PATH; a sync creates it)"
        )
    try:
        with state_mod.connect(path, read_only=read_only, wait=wait) as con:
            yield con
    except state_mod.StateLockedError as exc:
        raise click.ClickException(f"{exc} (a sync run is writing; try again, or raise --wait)") from None


# What build_resources() reads through dg.EnvVar: required to talk to either system.
REQUIRED_SETTINGS = (
    "DYNAMICS_URL",
    "DYNAMICS_AUTHORITY",
    "DYNAMICS_CLIENT_ID",
    "DYNAMICS_CLIENT_SECRET",
    "MARKETO_BASE_URL",
    "MARKETO_CLIENT_ID",
    "MARKETO_CLIENT_SECRET",
)


def require_settings() -> None:
    """One line naming the missing environment variables (instead of a configuration traceback)."""
    missing = [k for k in REQUIRED_SETTINGS if not os.environ.get(k)]
    if missing:
        raise click.ClickException(
            f"missing setting: environment variable {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set (export them, e.g. the lines `sync-pipeline sandbox` "
            "prints)"
        )


def _clients() -> tuple[contextlib.ExitStack, Any, Any]:
    """The Dynamics and Marketo clients configured exactly like the definitions' resources."""
    from dagster import DagsterInvalidConfigError

    from sync_pipeline import runs

    resources = by_kind(build_resources(runs.connection()))
    stack = contextlib.ExitStack()
    try:
        dynamics = stack.enter_context(resources["dynamics"].process_config_and_initialize_cm())
        marketo = stack.enter_context(resources["marketo"].process_config_and_initialize_cm())
    except DagsterInvalidConfigError as exc:
        stack.close()
        missing = sorted(set(re.findall(r'environment variable "(\w+)"', str(exc))))
        what = (
            f"environment variable {', '.join(missing)} is not set" if missing else "invalid client settings"
        )
        raise click.ClickException(f"cannot configure the API clients: {what}") from None
    return stack, dynamics, marketo


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m" if seconds < 172800 else f"{seconds // 86400}d"


# ---- plan -------------------------------------------------------------------------------------------------------


@click.command()
@click.option("--entity", default=None, help="Only this entity (default: all).")
@click.option(
    "--csv", "csv_path", default=None, type=click.Path(dir_okay=False), help="Also write every row here."
)
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(min=0),
    help="Rows shown per entity in the terminal (the CSV holds all).",
)
@click.option(
    "--all",
    "full",
    is_flag=True,
    help="A full re-evaluation of every linked record under the current "
    "mapping (after a direction or policy change); run it with `resync --entity E`.",
)
@STATE_OPTION
@CONFIG_OPTION
@WAIT_OPTION
def plan(
    entity: str | None,
    csv_path: str | None,
    limit: int,
    full: bool,
    state_path: str,
    config_path: str | None,
    wait: float,
) -> None:
    """Show what the next sync would write, per field, both directions, without writing to either system.

    Runs the extracts and the plans of the latest partition (no push) on a private copy of the state
    store, then lists the plan: entity, ids, target, op, field, before, after and the rule behind each
    write. The real store is left exactly as it was (cursors, pending changes, stored plan), so the next
    sync still delivers everything the preview showed.
    """
    import dagster as dg

    from sync_pipeline import runs
    from sync_pipeline.admin import preview
    from sync_pipeline.connection.selection import preview_selection

    config = _config(config_path)
    _entity(config, entity)
    require_settings()
    console = _console()
    try:
        with preview.snapshot(state_path, wait=wait) as copy:
            # The preview run's state resource points at the private copy (run overrides, not os.environ).
            spec = runs.connection(state_path=str(copy), entities_path=config_path)
            if full:  # a full re-evaluation (after a mapping change), on the same private copy
                from sync_pipeline.cli.resync import print_full_plan

                return print_full_plan(config, entity, limit, spec)
            with (
                console.status("extracting and planning on a copy of the state store (no push)..."),
                dg.DagsterInstance.ephemeral() as instance,
            ):
                result = runs.run_sync(
                    instance,
                    scope="latest",
                    raise_on_error=False,
                    spec=spec,
                    selection=preview_selection(spec.connection, config, entity),
                    tags={"sync/preview": "true"},
                )
            if not result.success:
                failures = [ev.message or ev.event_type_value for ev in result.all_events if ev.is_failure]
                raise click.ClickException("the preview run failed: " + "; ".join(failures[:3]))
            _print_plan(console, config, entity, str(copy), result.run_id, limit, csv_path)
    except state_mod.StateLockedError as exc:
        raise click.ClickException(f"{exc} (a sync run is writing; try again, or raise --wait)") from None


def _print_plan(
    console: Console,
    config: SyncConfig,
    entity: str | None,
    store: str,
    run_id: str,
    limit: int,
    csv_path: str | None,
) -> None:
    from sync_pipeline.admin import preview

    entities = [entity] if entity else [e.name for e in config.entities]
    with state_mod.connect(store, read_only=True) as con:
        stack, _dynamics, marketo = _clients()
        with (
            stack
        ):  # one-way objects have no mirror: read the records the plan updates for their before-values
            before = preview.object_before_values(con, config, entities, run_id, marketo.get_client())
        counts = preview.plan_counts(con, entities, run_id)
        summary = _table(
            f"Plan of run {run_id}",
            ["entity", "target", "op", "records", "fields"],
            numeric=("records", "fields"),
        )
        for row in counts:
            summary.add_row(*(str(v) for v in row))
        console.print(summary if counts else "Nothing to write: both systems agree.")
        shown: dict[str, int] = {}
        detail = _table(
            "Field writes" + (f" (first {limit} per entity)" if limit else ""), list(preview.PLAN_COLUMNS)
        )
        for row in preview.plan_rows(con, entities, run_id, before=before):
            if shown.get(row[0], 0) < limit:
                shown[row[0]] = shown.get(row[0], 0) + 1
                detail.add_row(*(_fmt(v) for v in row))
        if shown:
            console.print(detail)
        if csv_path:
            n = preview.write_csv(preview.plan_rows(con, entities, run_id, before=before), Path(csv_path))
            console.print(f"{n} plan rows written to {csv_path}")


# ---- status -----------------------------------------------------------------------------------------------------


@click.command()
@STATE_OPTION
@CONFIG_OPTION
@WAIT_OPTION
def status(state_path: str, config_path: str | None, wait: float) -> None:
    """Per entity: last sync, backlog, lag, errors, held and quarantined records, conflicts (reads the store only).

    Backlog counts records with a change read but not yet synced; lag is how long the oldest of them
    has waited. Errors are records failing and retried with backoff; held ones (quarantined ones included)
    need `errors --release`; "held by reason" gives the reason classes.
    """
    from sync_pipeline.admin import report

    config = _config(config_path)
    with _store(state_path, read_only=True, wait=wait) as con:
        try:
            rows = report.status(con, config)
        except LookupError as exc:
            raise click.ClickException(f"{state_path}: {exc}") from None
        started = bool(
            one_row(
                con,
                "SELECT count(*) FROM cursors WHERE name = 'marketo:leadchanges' "
                "OR name LIKE 'dynamics:delta:%'",
            )[0]
        )
    now = utcnow()
    numeric = ("backlog", "lag", "errors", "held", "quarantined", "conflicts")
    table = _table(
        f"Sync status ({state_path})",
        ["entity", "last sync", "last run", "last write", *numeric, "held by reason"],
        numeric=numeric,
    )
    for r in rows:
        table.add_row(
            r.entity,
            _fmt(r.last_sync),
            _fmt(r.last_run),
            _fmt(r.last_write),
            _fmt(r.backlog),
            _duration(r.lag_seconds(now)),
            _fmt(r.retrying),
            _fmt(r.held),
            _fmt(r.quarantined),
            _fmt(r.conflicts),
            ", ".join(f"{k} {v}" for k, v in r.held_classes.items()) or "-",
        )
    console = _console()
    console.print(table)
    if not started:
        from sync_pipeline.connection.automation import INITIAL_COPY_HOW

        console.print(
            "Initial copy not started: nothing has been written to either system and the sensors "
            f"launch nothing until it runs; {INITIAL_COPY_HOW}."
        )
    if any(r.entity.startswith("person") for r in rows):
        console.print(
            "person (Marketo): changes read from Marketo; their errors and held records count under "
            "lead and contact."
        )


# ---- errors -----------------------------------------------------------------------------------------------------


@click.command()
@click.option("--entity", default=None, help="Only this entity.")
@click.option(
    "--full", is_flag=True, help="Every column and the whole reason (wraps); default: one line a record."
)
@click.option(
    "--csv",
    "csv_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write every held record, all columns and whole reasons, to this CSV file.",
)
@click.option(
    "--release",
    "release_id",
    default=None,
    metavar="ID",
    help="Retry this held record (Dynamics id, or Marketo id) at the next sync.",
)
@click.option("--release-all", is_flag=True, help="Retry every held record (of --entity, if given).")
@STATE_OPTION
@CONFIG_OPTION
@WAIT_OPTION
def errors(
    entity: str | None,
    full: bool,
    csv_path: str | None,
    release_id: str | None,
    release_all: bool,
    state_path: str,
    config_path: str | None,
    wait: float,
) -> None:
    """List held records with the reason the API gave, or release them for another attempt.

    A record is held after the configured number of failed attempts (or at once when no retry can help, e.g.
    a rejected value, or a quarantine). One line a record by default, the reason shortened to fit; `--full`
    shows every column and the whole reason, `--csv FILE` writes them all. Releasing clears the hold, makes it
    due now and marks it pending, so the next sync plans and writes it again (one attempt: if it fails again
    it is held again).
    """
    from sync_pipeline.admin import report

    if release_id and release_all:
        raise click.UsageError("use either --release ID or --release-all")
    config = _config(config_path)
    _entity(config, entity)
    console = _console()
    releasing = bool(release_id or release_all)
    with _store(state_path, read_only=not releasing, wait=wait) as con:
        held = report.held_records(con, entity, release_id)
        if releasing:
            if release_id and not held:
                raise click.ClickException(
                    f"no held record with id {release_id}" + (f" in entity {entity}" if entity else "")
                )
            n = report.release(con, config, held)
            console.print(f"released {n} held record(s); the next sync retries them")
            return
        retrying = report.retrying_count(con, entity)
    if csv_path:
        report.write_held_csv(held, Path(csv_path))
    if not held:
        console.print("No held records.")
    elif full:
        table = _table(
            f"Held records ({len(held)})",
            [
                "entity",
                "dynamics id",
                "target",
                "op",
                "marketo id",
                "code",
                "reason",
                "attempts",
                "last failed",
                "run",
            ],
            numeric=("attempts",),
        )
        for r in held:
            table.add_row(
                r.entity,
                r.dynamics_id,
                r.target,
                r.op,
                _fmt(r.marketo_id),
                _fmt(r.code),
                _fmt(r.message),
                str(r.attempts),
                _fmt(r.last_failed_at),
                _fmt(r.run_id),
            )
        console.print(table)
    else:
        console.print(
            f"Held records ({len(held)}; --full for every column and whole reasons, --csv FILE for all)",
            highlight=False,
        )
        for line in _held_lines(held, console.width):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    if csv_path:
        console.print(f"{len(held)} held record(s) written to {csv_path}")
    if retrying:
        console.print(f"{retrying} more record(s) failed and will be retried automatically (not held yet).")


def _held_lines(held: list[Any], width: int) -> list[str]:
    """One line a held record, fitted to the terminal: entity, Dynamics id (whole: copy it into --release),
    target, code, and the reason shortened (first line, the record's own id left out) with an ellipsis."""
    from sync_pipeline.admin import report

    def cut(text: str, n: int) -> str:
        return text if len(text) <= n else text[: max(0, n - 1)] + "…"

    ew = max(6, *(len(r.entity) for r in held))
    cw = min(16, max(4, *(len(r.code or "-") for r in held)))
    head = f"{'entity':<{ew}}  {'dynamics id':<36}  {'target':<8}  {'code':<{cw}}  reason"
    lines = [cut(head, width)]
    for r in held:
        reason = report.short_reason(
            (r.message or "").replace(f"{r.entity} {r.dynamics_id}: ", ""), limit=1000
        )
        start = f"{r.entity:<{ew}}  {r.dynamics_id:<36}  {r.target:<8}  {cut(r.code or '-', cw):<{cw}}  "
        lines.append(start + cut(reason, max(10, width - len(start))))
    return lines


# ---- rollback ---------------------------------------------------------------------------------------------------

ROLLBACK_COLUMNS = (
    "run",
    "entity",
    "dynamics id",
    "marketo id",
    "target",
    "field",
    "before the run",
    "the run wrote",
    "now",
    "will do",
)


def _parse_since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        since = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO time (e.g. 2026-08-01T14:00:00Z; no zone = UTC)", param_hint="--since"
        ) from None
    return since


@click.command()
@click.argument("run_id", required=False)
@click.option(
    "--since",
    "since_text",
    default=None,
    metavar="TIME",
    help="Roll back every sync run that wrote at or after TIME (ISO, UTC unless a zone is given), "
    "newest first.",
)
@click.option(
    "--yes", is_flag=True, help="Write the old values back (without it: show what would be written)."
)
@click.option(
    "--delete-created",
    is_flag=True,
    help="Also delete Marketo persons the run created, if nothing about them changed since.",
)
@click.option(
    "--csv", "csv_path", default=None, type=click.Path(dir_okay=False), help="Also write every row here."
)
@STATE_OPTION
@CONFIG_OPTION
def rollback(
    run_id: str | None,
    since_text: str | None,
    yes: bool,
    delete_created: bool,
    csv_path: str | None,
    state_path: str,
    config_path: str | None,
) -> None:
    """Put back the values RUN_ID replaced, field by field, where nobody has changed them since.

    Reads the current value of every field the run wrote from the system it wrote (a fresh read) and
    restores the before-value only where that system still holds what the run wrote; anything changed
    since is skipped and listed. Dynamics writes carry the record's etag (a change between the read and
    the write is skipped, not overwritten); Marketo records are read again just before the write.
    Creates are kept (--delete-created deletes unchanged Marketo persons the run created), deletes cannot
    be undone. The rollback is recorded in the ledger as a run of its own (it can be rolled back too).
    """
    import csv as csv_mod

    from sync_pipeline import runs as runs_mod
    from sync_pipeline.admin import rollback as rb
    from sync_pipeline.engine.guard import WrongEnvironmentError, check_systems

    since = _parse_since(since_text)
    if bool(run_id) == bool(since):
        raise click.UsageError("give either RUN_ID or --since TIME")
    config = _config(config_path)
    console = _console()
    with _store(state_path, read_only=not yes) as con:
        runs = [run_id] if run_id else rb.runs_since(con, since)  # type: ignore[arg-type]
        if not runs:
            console.print(f"No sync run wrote anything since {since_text}.")
            return
        stack, dynamics, marketo = _clients()
        with stack:
            try:
                state = by_kind(build_resources(runs_mod.connection()))["state"]
                check_systems(con, dynamics.get_client(), state.instance_id(marketo.base_url))
            except WrongEnvironmentError as exc:
                raise click.ClickException(str(exc)) from None
            dclient, mclient = dynamics.get_client(), marketo.get_client()
            plans: list[tuple[str, list[rb.Item]]] = []
            overlay: dict[tuple[str, str, str, str], Any] = {}
            done_ids: list[str] = []
            restored = deleted = 0
            failed: list[tuple[rb.Item, str]] = []
            for source in runs:
                try:
                    with console.status(f"reading the records run {source} wrote..."):
                        items = rb.plan_rollback(
                            con,
                            config,
                            source,
                            dclient,
                            mclient,
                            delete_created=delete_created,
                            ignore_runs=[*runs, *done_ids],
                            overlay=overlay,
                        )
                except rb.RollbackError as exc:
                    raise click.ClickException(str(exc)) from None
                if yes:
                    with console.status(f"rolling back run {source}..."):
                        outcome = rb.execute_rollback(con, config, items, dclient, mclient, source_run=source)
                    if outcome.restored or outcome.deleted:
                        done_ids.append(outcome.run_id)
                    restored, deleted = restored + outcome.restored, deleted + outcome.deleted
                    failed += outcome.failed
                else:  # what the older runs' rollbacks will find once the newer ones are done
                    overlay.update(
                        {
                            (it.entity, it.target, it.dynamics_id, it.field or ""): it.restore
                            for it in items
                            if it.action == rb.RESTORE
                        }
                    )
                plans.append((source, items))
    title = "Rollback of " + (
        f"run {run_id}" if run_id else f"{len(runs)} run(s) since {since_text}, newest first"
    )
    table = _table(title + ("" if yes else " (dry run: add --yes to write)"), list(ROLLBACK_COLUMNS))
    totals: dict[str, int] = {}
    for source, items in plans:
        for it in items:
            table.add_row(
                source,
                it.entity,
                it.dynamics_id,
                _fmt(it.marketo_id),
                it.target,
                _fmt(it.field),
                rb.display(it.restore),
                rb.display(it.replaced),
                rb.display(it.now),
                it.will_do,
            )
            totals[it.action] = totals.get(it.action, 0) + 1
    console.print(table)
    order = [rb.RESTORE, rb.DELETE, rb.SKIP_CHANGED, rb.SKIP_CREATED, rb.SKIP_DELETED, rb.SKIP_OTHER]
    console.print("totals: " + ", ".join(f"{k} {totals[k]}" for k in order if totals.get(k)))
    todo = totals.get(rb.RESTORE, 0)
    console.print(f"{todo} field value(s) to restore, {sum(totals.values()) - todo} skipped")
    if csv_path:
        path = Path(csv_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as fh:
            out = csv_mod.writer(fh)
            out.writerow([c.replace(" ", "_") for c in ROLLBACK_COLUMNS])
            for source, items in plans:
                for it in items:
                    out.writerow(
                        [
                            source,
                            it.entity,
                            it.dynamics_id,
                            it.marketo_id or "",
                            it.target,
                            it.field or "",
                            rb.display(it.restore),
                            rb.display(it.replaced),
                            rb.display(it.now),
                            it.will_do,
                        ]
                    )
        console.print(f"{sum(len(i) for _, i in plans)} rollback rows written to {csv_path}")
    if not yes:
        return
    console.print(
        f"restored {restored} field value(s)"
        + (f", deleted {deleted} person(s)" if deleted else "")
        + ("; ledger run id " + ", ".join(done_ids) if done_ids else "")
    )
    if failed:
        for it, reason in failed[:20]:
            console.print(f"[red]failed[/red] {it.entity} {it.dynamics_id} {it.field}: {reason}", markup=True)
        raise click.ClickException(f"{len(failed)} field value(s) could not be restored")


# ---- rebaseline -------------------------------------------------------------------------------------------------


@click.command()
@click.option(
    "--yes", is_flag=True, help="Confirm: forget the pinned environment and every per-record state."
)
@STATE_OPTION
@CONFIG_OPTION
def rebaseline(yes: bool, state_path: str, config_path: str | None) -> None:
    """Start a fresh baseline after a deliberate environment change (e.g. a refreshed sandbox).

    Forgets the pinned Dynamics organisation and Marketo instance, the mirrors, identities, bases,
    cursors, failures and conflicts; the ledger and run statistics stay. The next sync is an initial
    copy that finds the existing Marketo records again (upserts by Dynamics id, persons also by email).
    """
    from sync_pipeline.engine import guard

    if not yes:
        raise click.UsageError("rebaseline forgets all sync state of this store; add --yes to confirm")
    _config(config_path)
    with _store(state_path, read_only=False) as con:
        pinned = (
            dict(con.execute("SELECT key, value FROM environment").fetchall())
            if _has_table(con, "environment")
            else {}
        )
        counts = guard.rebaseline(con)
    table = _table("Rebaselined: rows forgotten", ["table", "rows"], numeric=("rows",))
    for name, n in sorted(counts.items()):
        table.add_row(name, str(n))
    console = _console()
    console.print(table)
    if pinned:
        console.print("previously pinned: " + ", ".join(f"{k}={v}" for k, v in sorted(pinned.items())))


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        one_row(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])[0]
    )
