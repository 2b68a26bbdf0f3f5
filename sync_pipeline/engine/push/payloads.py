"""Push: the stored plan read back as records (chunks of field rows), and Marketo object paths."""

from __future__ import annotations

from collections.abc import Iterable

import duckdb

from sync_pipeline.config.model import Entity, FieldMap, SyncConfig
from sync_pipeline.engine.ports import marketo_object_path
from sync_pipeline.engine.store.state import one_row

CHUNK_RECORDS = 3000  # records per round trip to DuckDB; API batches are 300 inside it


def object_path(entity: Entity) -> str:
    return marketo_object_path(entity.marketo.object)


def field_maps(config: SyncConfig, entity: Entity) -> dict[str, FieldMap]:
    maps = {f.marketo: f for f in entity.all_fields}
    maps.setdefault(
        "dynamicsIsDeleted", FieldMap(marketo="dynamicsIsDeleted", dynamics="x", transform="boolean")
    )
    return maps


def planned_records(con: duckdb.DuckDBPyConnection, entity: Entity, target: str) -> int:
    """Number the records of the plan (deletes first) and lay their field rows out in that order, so that
    chunks are cheap range reads and nothing groups the whole plan in memory."""
    con.execute(
        """CREATE OR REPLACE TEMP TABLE planned_ids AS
        SELECT row_number() OVER (ORDER BY CASE op WHEN 'delete' THEN 0 ELSE 1 END, dynamics_id) AS rn, dynamics_id, op
        FROM (SELECT DISTINCT dynamics_id, op FROM plan
              WHERE entity = ? AND target = ? AND op NOT IN ('reject', 'agree', 'hold'))""",
        [entity.name, target],
    )
    con.execute(
        """CREATE OR REPLACE TEMP TABLE planned_rows AS
        SELECT r.rn, p.dynamics_id, p.op, p.marketo_id, p.etag, p.base_value, p.field, p.new_value
        FROM plan p JOIN planned_ids r ON r.dynamics_id = p.dynamics_id AND r.op = p.op
        WHERE p.entity = ? AND p.target = ? ORDER BY r.rn""",
        [entity.name, target],
    )
    return int(one_row(con, "SELECT count(*) FROM planned_ids")[0])


def chunks(con: duckdb.DuckDBPyConnection, total: int) -> Iterable[list[tuple]]:
    """Records as (dynamics_id, op, marketo_id, etag, base_value, fields, values), CHUNK_RECORDS at a time."""
    for start in range(1, total + 1, CHUNK_RECORDS):
        rows = con.execute(
            """SELECT rn, dynamics_id, op, marketo_id, etag, base_value, field, new_value FROM planned_rows
                              WHERE rn BETWEEN ? AND ? ORDER BY rn, field""",
            [start, start + CHUNK_RECORDS - 1],
        ).fetchall()
        records: list[tuple] = []
        current = None
        for rn, did, op, mid, etag, base, field_name, value in rows:
            if rn != current:
                current = rn
                records.append((did, op, mid, etag, base, [], []))
            records[-1][5].append(field_name)
            records[-1][6].append(value)
        yield records
