"""``plan``: what the next sync would write, by running the extracts and the plans but no push.

The extracts and plans do update the state store (mirrors, cursors, the stored plan): that is the
same work the next sync starts with, and records stay pending until a push applies them, so a
preview never hides a change from the real run.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import dagster as dg
import duckdb

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.defs.assets import PERSON_RAW, plan_key, raw_key

PLAN_COLUMNS = ("entity", "dynamics_id", "marketo_id", "target", "op", "field", "before", "after", "rule")
# 'agree' rows only move the base (both systems already hold the value): nothing is written.
_WRITES = "op <> 'agree'"


def preview_selection(config: SyncConfig, entity: str | None = None) -> list[dg.AssetKey]:
    """Extract and plan assets (never a push) for one entity or all of them."""
    entities = [config.entity(entity)] if entity else config.entities
    keys: list[dg.AssetKey] = []
    for e in entities:
        keys.append(raw_key(e.derived_from or e.name))
        if e.is_person:
            keys.append(PERSON_RAW)
        keys.append(plan_key(e.name))
    return list(dict.fromkeys(keys))


def _where(entities: list[str], run_id: str | None) -> tuple[str, list[str]]:
    sql = f"{_WRITES} AND entity IN ({', '.join('?' for _ in entities)})"
    params = list(entities)
    if run_id:
        sql += " AND run_id = ?"
        params.append(run_id)
    return sql, params


def plan_rows(con: duckdb.DuckDBPyConnection, entities: list[str], run_id: str | None = None,
              batch: int = 10_000) -> Iterator[tuple]:
    """The stored plan rows in a stable order, streamed in batches."""
    where, params = _where(entities, run_id)
    # Before-values: a known empty value is "(blank)", a record the write creates has none ("(new record)").
    # One-way objects show the value we last wrote there; the push reads what Marketo really holds just
    # before it writes, and that is what the ledger keeps.
    cur = con.execute(f"""SELECT entity, dynamics_id, marketo_id, target, op, field,
                                 CASE WHEN old_value IS NOT NULL THEN old_value
                                      WHEN op = 'create' THEN '(new record)' ELSE '(blank)' END,
                                 new_value, rule
                          FROM plan WHERE {where} ORDER BY entity, target, op, dynamics_id, field""", params)
    while rows := cur.fetchmany(batch):
        yield from rows


def plan_counts(con: duckdb.DuckDBPyConnection, entities: list[str], run_id: str | None = None
                ) -> list[tuple[str, str, str, int, int]]:
    """(entity, target, op, records, fields) per kind of write."""
    where, params = _where(entities, run_id)
    return con.execute(f"""SELECT entity, target, op, count(DISTINCT dynamics_id), count(*) FROM plan
                           WHERE {where} GROUP BY ALL ORDER BY ALL""", params).fetchall()


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
