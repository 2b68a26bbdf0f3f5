"""``plan``: what the next sync would write, by running the extracts and the plans but no push.

A preview has no side effects: the extracts and plans run against a private copy of the state store
(``snapshot``), so the real store's cursors (delta links, Marketo paging tokens), pending marks and stored
plan are exactly as before, and the next sync still sees every change the preview saw. Neither system is
written to (no push runs); the extracts only read (delta links and paging tokens are stateless on the
server side).
"""

from __future__ import annotations

import contextlib
import csv
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from sync_pipeline.config.model import SyncConfig

PLAN_COLUMNS = ("entity", "dynamics_id", "marketo_id", "target", "op", "field", "before", "after", "rule")
# 'agree' rows only move the base (both systems already hold the value): nothing is written.
_WRITES = "op <> 'agree'"


@contextlib.contextmanager
def snapshot(state_path: str | Path, wait: float = 30.0) -> Iterator[Path]:
    """A private copy of the state store, deleted afterwards (an empty store if none exists yet).

    The copy is taken while holding a read-only connection, so no writer can change the file (or its WAL)
    mid-copy; DuckDB replays the copied WAL when the copy is opened.
    """
    from sync_pipeline.engine.store import state as state_mod

    src = Path(state_path)
    with tempfile.TemporaryDirectory(prefix="sync-pipeline-preview-") as tmp:
        dest = Path(tmp) / "preview.duckdb"
        if src.exists():
            with state_mod.connect(src, read_only=True, wait=wait):
                shutil.copyfile(src, dest)
                wal = src.with_name(src.name + ".wal")
                if wal.exists():
                    shutil.copyfile(wal, dest.with_name(dest.name + ".wal"))
        yield dest


def _where(entities: list[str], run_id: str | None) -> tuple[str, list[str]]:
    sql = f"{_WRITES} AND entity IN ({', '.join('?' for _ in entities)})"
    params = list(entities)
    if run_id:
        sql += " AND run_id = ?"
        params.append(run_id)
    return sql, params


def object_before_values(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entities: list[str], run_id: str, marketo: Any
) -> dict[tuple[str, str, str], Any]:
    """What Marketo holds now for the plan's updates of one-way objects (companies, opportunities, sales
    persons, custom objects), read for exactly those records: (entity, dynamics id, field) -> canonical value
    (``None`` blank, ``rollback.GONE`` record gone, ``rollback.UNKNOWN`` could not be read)."""
    from sync_pipeline.admin import rollback as rb

    names = [
        e
        for e in entities
        if e in config.by_name and not config.by_name[e].is_person and not config.by_name[e].is_derived
    ]
    if not names:
        return {}
    items = [
        rb.Item(0, e, did, mid, "marketo", "update", f, None, None)
        for e, did, mid, f in con.execute(
            f"""SELECT entity, dynamics_id, marketo_id, field FROM plan WHERE run_id = ? AND target = 'marketo'
            AND op = 'update' AND entity IN ({", ".join("?" for _ in names)})""",
            [run_id, *names],
        ).fetchall()
    ]
    current = rb.read_current(config, items, None, marketo)
    out: dict[tuple[str, str, str], Any] = {}
    for it in items:
        rec = current.get((it.entity, "marketo", it.dynamics_id))
        key = (it.entity, it.dynamics_id, it.field or "")
        out[key] = rb.UNKNOWN if rec is None else rb.GONE if rec.get("__gone__") else rec.get(it.field or "")
    return out


def plan_rows(
    con: duckdb.DuckDBPyConnection,
    entities: list[str],
    run_id: str | None = None,
    batch: int = 10_000,
    before: dict[tuple[str, str, str], Any] | None = None,
) -> Iterator[tuple]:
    """The stored plan rows in a stable order, streamed in batches (``before``: read before-values)."""
    from sync_pipeline.admin.rollback import display

    where, params = _where(entities, run_id)
    # Before-values: a known empty value is "(blank)", a record the write creates has none ("(new record)").
    # One-way objects have no Marketo mirror: the stored plan has the value we last wrote there; ``before``
    # (object_before_values) has what Marketo holds now, and the push reads it again before writing.
    cur = con.execute(
        f"""SELECT entity, dynamics_id, marketo_id, target, op, field,
                                 CASE WHEN old_value IS NOT NULL OR field IS NULL THEN old_value
                                      WHEN op = 'create' THEN '(new record)'
                                      WHEN op IN ('update', 'flag', 'delete', 'hold') THEN '(blank)' END,
                                 new_value, rule
                          FROM plan WHERE {where} ORDER BY entity, target, op, dynamics_id, field""",
        params,
    )
    while rows := cur.fetchmany(batch):
        if before:
            rows = [
                r[:6] + (display(before[(r[0], r[1], r[5])]),) + r[7:] if (r[0], r[1], r[5]) in before else r
                for r in rows
            ]
        yield from rows


def plan_counts(
    con: duckdb.DuckDBPyConnection, entities: list[str], run_id: str | None = None
) -> list[tuple[str, str, str, int, int]]:
    """(entity, target, op, records, fields) per kind of write."""
    where, params = _where(entities, run_id)
    return con.execute(
        f"""SELECT entity, target, op, count(DISTINCT dynamics_id), count(*) FROM plan
                           WHERE {where} GROUP BY ALL ORDER BY ALL""",
        params,
    ).fetchall()


def write_csv(rows: Iterator[tuple], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(PLAN_COLUMNS)
        for row in rows:
            out.writerow(row)
            n += 1
    return n
