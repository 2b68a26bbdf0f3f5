"""Plan: the work set, the records with pending work (temp table ``work_set``: did, d_seq)."""

from __future__ import annotations

from datetime import datetime

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.store.state import column, keyed_rows, qi, sql_text

PLAN_SLICE = 50_000  # records per three-way join


def work_set(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, now: datetime) -> int:
    """Read through the pending marks' indexes (``pending_seq > 0``, every mark is a positive sequence value)
    and the record keys, so the cost follows the changes, not the tables."""
    e, d = entity.name, qi(f"d_{entity.name}")
    ids = column(con, f"SELECT id FROM {d} WHERE pending_seq > 0")
    if entity.is_person:
        persons = column(con, "SELECT CAST(id AS VARCHAR) FROM m_person WHERE pending_seq > 0")
        keyed_rows(con, "pending_links", "identity", "marketo_id", persons, f"entity = {sql_text(e)}", "dynamics_id")
        ids += column(con, "SELECT dynamics_id FROM pending_links")
    ids += column(con, f"SELECT dynamics_id FROM failures WHERE entity = {sql_text(e)} AND NOT held AND next_attempt_at <= ?",
                  [now])
    keyed_rows(con, "work_set", d, "id", ids, columns="id AS did, pending_seq AS d_seq")
    return int(con.execute("SELECT count(*) FROM work_set").fetchone()[0])
