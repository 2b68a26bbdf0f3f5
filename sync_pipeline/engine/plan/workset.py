"""Plan: the work set, the records with pending work (temp table ``work_set``: did, d_seq)."""

from __future__ import annotations

from datetime import datetime

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.store.state import qi, sql_text

PLAN_SLICE = 50_000  # records per three-way join


def work_set(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, now: datetime) -> int:
    e, d = entity.name, qi(f"d_{entity.name}")
    person_part = ""
    if entity.is_person:
        person_part = f"""UNION SELECT i.dynamics_id FROM identity i JOIN m_person m ON CAST(m.id AS VARCHAR) = i.marketo_id
                          WHERE i.entity = {sql_text(e)} AND m.pending_seq IS NOT NULL"""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE work_set AS
        SELECT ids.did, d.pending_seq AS d_seq FROM (
            SELECT id AS did FROM {d} WHERE pending_seq IS NOT NULL
            {person_part}
            UNION SELECT dynamics_id FROM failures WHERE entity = {sql_text(e)} AND NOT held AND next_attempt_at <= ?
        ) ids JOIN {d} d ON d.id = ids.did""", [now])
    return int(con.execute("SELECT count(*) FROM work_set").fetchone()[0])
