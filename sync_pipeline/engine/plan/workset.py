"""Plan: the work set, the records with pending work (temp table ``work_set``: did, d_seq)."""

from __future__ import annotations

from datetime import datetime

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.store.state import keyed_rows, one_row, qi, sql_text

# Records per three-way join. DuckDB's working memory for a slice grows with it (~9 KB a record: a 50,000-record
# slice of leads took ~450 MB at the medium scale), so a smaller slice keeps the process flat at some scans' cost.
PLAN_SLICE = 20_000


def work_set(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, now: datetime) -> int:
    """Read through the pending marks' indexes (``pending_seq > 0``, every mark is a positive sequence value)
    and the record keys, so the cost follows the changes, not the tables."""
    e, d = entity.name, qi(f"d_{entity.name}")
    # The keys stay queries: on an initial copy they are every record, which as a Python list would cost
    # memory in proportion to the org (see state.key_list).
    ids = f"SELECT id FROM {d} WHERE pending_seq > 0"
    if entity.is_person:
        persons = "SELECT CAST(id AS VARCHAR) FROM m_person WHERE pending_seq > 0"
        keyed_rows(
            con, "pending_links", "identity", "marketo_id", persons, f"entity = {sql_text(e)}", "dynamics_id"
        )
        ids += " UNION ALL SELECT dynamics_id FROM pending_links"
    con.execute(
        "CREATE OR REPLACE TEMP TABLE due_failures AS SELECT dynamics_id FROM failures "
        "WHERE entity = ? AND NOT held AND next_attempt_at <= ?",
        [e, now],
    )
    ids += " UNION ALL SELECT dynamics_id FROM due_failures"
    keyed_rows(con, "work_set", d, "id", ids, columns="id AS did, pending_seq AS d_seq")
    return int(one_row(con, "SELECT count(*) FROM work_set")[0])
