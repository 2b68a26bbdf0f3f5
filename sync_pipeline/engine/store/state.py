"""The DuckDB state store: mirrors of both systems, identity map, per-field base, plans, ledger.

Table layout (``<e>`` = entity name, ``f_<x>`` = canonical value of Marketo field ``x``):

- ``d_<e>``      Dynamics mirror: id, version, modified_on, etag, deleted, sync_flag, aux columns (master_id:
                 the record a Dataverse ``Merge`` folded this one into), f_*,
                 pending_seq (set when a newer version arrives; cleared once the change is applied)
- ``m_person``   Marketo person mirror (shared by leads and contacts): id, updated_at, deleted, f_*,
                 pending_seq, merged_into (a person that lost a Marketo merge: retired, not deleted by a user;
                 ``deleted`` is true for both, as the person is gone from Marketo, ``merged_into`` tells them apart)
- ``b_<e>``      base: the last values both sides agreed on, per record and field (three-way merge)
- ``b__split``   per-system bases of person fields a rollback left different on the two systems
- ``identity``   Dynamics id <-> Marketo id per entity, with a state (active, converted, tombstoned, deleted,
                 merged: the record lost a merge in either system and no longer syncs; its id points at the winner)
- ``plan`` / ``plan_work``   the current plan per entity (field-level writes) and the records it covers
- ``ledger``     every write: run, entity, ids, target, op, field, before, after, rule
- ``failures``   per-record errors with the API's code and message, attempts, next retry, held flag
- ``conflicts``  conflicts held for review (policy ``hold``)
- ``derived_marks``  what a derived entity's plan must look at again (kind, id, seq): a customer contact whose
                 link or quarantine changed (kind ``contact``), a source record whose planned change was applied
                 (kind: the source entity); written by the ledger, dropped once every derived plan took them
- ``cursors``    delta links and paging tokens; ``environment`` the org / instance this store synced
- ``mapping_*``  the mapping the store synced with and its changes (``engine/mapping.py``)

Only the ``pending_seq`` protocol makes runs safe to interleave and to kill: a record leaves the work
set only when the plan that covered it was applied, and only if nothing newer arrived meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.store import rows_read

LOCK_WAIT_SECONDS = 120.0
# Part of the stored schema digest: bump it when a table gains a column, so existing stores are extended.
SCHEMA_VERSION = "keyed-2"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def qi(name: str) -> str:
    """Quote an identifier (names come from validated config, quoting keeps case intact)."""
    return '"' + name.replace('"', '""') + '"'


def sql_text(value: str | None) -> str:
    """A SQL string literal, for constants from the validated configuration (field names, option labels, entity
    names) inside generated expressions; values that are data travel as bound parameters."""
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def fcol(field: str) -> str:
    return qi(f"f_{field}")


def one_row(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> tuple[Any, ...]:
    """The row of a query that always returns exactly one (an aggregate without GROUP BY, a sequence)."""
    row = con.execute(sql, params or []).fetchone()
    if row is None:
        raise LookupError(f"expected one row from: {sql[:200]}")
    return row


class StateLockedError(RuntimeError):
    """The state store is open in another process (DuckDB allows one writer)."""


@contextlib.contextmanager
def connect(
    path: str | Path, read_only: bool = False, wait: float = LOCK_WAIT_SECONDS
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the state file, waiting (bounded) while another process holds the single-writer lock."""
    con = open_connection(path, read_only, wait)
    try:
        yield con
    finally:
        forget_indexes(con)
        con.close()


def open_connection(
    path: str | Path, read_only: bool = False, wait: float = LOCK_WAIT_SECONDS
) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + wait
    delay = 0.05
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # DuckDB would cache up to 80% of RAM; the sync keeps a flat, modest footprint and spills the rest.
    settings: dict[str, str | bool | int | float | list[str]] = {
        "memory_limit": os.environ.get("SYNC_DUCKDB_MEMORY_LIMIT", "512MB"),
        "threads": 2,
        "preserve_insertion_order": False,
    }
    if os.environ.get(
        "SYNC_DUCKDB_TEMP_DIR"
    ):  # where DuckDB spills beyond its memory limit (default: <state>.tmp)
        settings["temp_directory"] = os.environ["SYNC_DUCKDB_TEMP_DIR"]
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=settings)
            return rows_read.watch(con) if rows_read.active() else con
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise StateLockedError(f"state store {path} is locked by another process: {exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def release_step_memory(con: duckdb.DuckDBPyConnection) -> None:
    """Drop this connection's temp tables (a step's work sets, plan slices, outcome pages) and hand Arrow's freed
    memory back. A run keeps one connection across its steps; left in place, every step's temp tables held buffer
    memory (and spilled to disk) until the run ended: 0.9 GB of them by the end of a medium initial copy. Arrow's
    allocator keeps freed pages for reuse (~50 MB after a 25,000-row ingest)."""
    for (name,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall():
        con.execute(f"DROP TABLE IF EXISTS temp.main.{qi(name)}")
    pa.default_memory_pool().release_unused()


def latest_fields(entity: Entity) -> list[str]:
    """Two-way person fields resolved by policy ``latest`` (their change times are tracked per field)."""
    return [
        f.marketo
        for f in entity.all_fields
        if entity.is_person and entity.field_policy(f) == "latest" and entity.field_direction(f) == "two_way"
    ]


def entity_columns(entity: Entity) -> list[str]:
    return [f.marketo for f in entity.all_fields]


def ensure_schema(con: duckdb.DuckDBPyConnection, config: SyncConfig) -> None:
    """Create or extend the tables for this configuration; a no-op when the stored schema is current."""
    digest = hashlib.sha256((SCHEMA_VERSION + config.model_dump_json()).encode()).hexdigest()
    con.execute("CREATE TABLE IF NOT EXISTS schema_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    row = con.execute("SELECT value FROM schema_meta WHERE key = 'config'").fetchone()
    from sync_pipeline.engine import mapping

    if row and row[0] == digest:
        if not mapping.has_tables(con):  # a store from before mapping changes were tracked: its baseline
            mapping.record(con, config, utcnow())
        return

    _create_tables(con, config)
    # What changed in the mapping since the store last synced (fields added, removed, re-ruled, entities
    # added): recorded once, when the new configuration is first seen. Added fields wait for a back-fill.
    mapping.record(con, config, utcnow())
    con.execute("INSERT OR REPLACE INTO schema_meta VALUES ('config', ?)", [digest])
    forget_indexes(con)


def _create_tables(con: duckdb.DuckDBPyConnection, config: SyncConfig) -> None:
    con.execute("CREATE SEQUENCE IF NOT EXISTS change_seq START 1")
    con.execute("CREATE SEQUENCE IF NOT EXISTS ledger_seq START 1")
    for e in config.entities:
        cols = entity_columns(e)
        fdefs = "".join(f", {fcol(c)} VARCHAR" for c in cols)
        if not e.is_derived:
            con.execute(f"""CREATE TABLE IF NOT EXISTS {qi("d_" + e.name)} (
                id VARCHAR PRIMARY KEY, version BIGINT, modified_on VARCHAR, etag VARCHAR,
                deleted BOOLEAN DEFAULT false, sync_flag BOOLEAN, origin_lead VARCHAR, customer_contact VARCHAR,
                partition_key VARCHAR, seen_at TIMESTAMP, pending_seq BIGINT {fdefs})""")
            _add_missing_columns(con, f"d_{e.name}", cols)
            con.execute(f"ALTER TABLE {qi('d_' + e.name)} ADD COLUMN IF NOT EXISTS master_id VARCHAR")
        base_cols = cols if not e.is_derived else ["leadId", "role", "externalOpportunityId"]
        bdefs = "".join(f", {fcol(c)} VARCHAR" for c in base_cols)
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {qi('b_' + e.name)} (dynamics_id VARCHAR PRIMARY KEY, "
            f"synced_at TIMESTAMP, run_id VARCHAR {bdefs})"
        )
        _add_missing_columns(con, f"b_{e.name}", base_cols)
    person_cols = [f.marketo for f in config.person_fields()] + [
        "dynamicsId",
        "dynamicsType",
        "dynamicsIsDeleted",
    ]
    person_cols = list(dict.fromkeys(person_cols))
    pdefs = "".join(f", {fcol(c)} VARCHAR" for c in person_cols)
    con.execute(f"""CREATE TABLE IF NOT EXISTS m_person (id BIGINT PRIMARY KEY, updated_at VARCHAR,
        deleted BOOLEAN DEFAULT false, seen_at TIMESTAMP, pending_seq BIGINT {pdefs})""")
    _add_missing_columns(con, "m_person", person_cols)
    con.execute("ALTER TABLE m_person ADD COLUMN IF NOT EXISTS merged_into BIGINT")
    con.execute("""CREATE TABLE IF NOT EXISTS identity (entity VARCHAR, dynamics_id VARCHAR, marketo_id VARCHAR,
        state VARCHAR, linked_at TIMESTAMP, how VARCHAR, PRIMARY KEY (entity, dynamics_id))""")
    con.execute("""CREATE TABLE IF NOT EXISTS plan (run_id VARCHAR, entity VARCHAR, dynamics_id VARCHAR,
        marketo_id VARCHAR, target VARCHAR, op VARCHAR, field VARCHAR, old_value VARCHAR, new_value VARCHAR,
        base_value VARCHAR, rule VARCHAR, etag VARCHAR)""")
    con.execute("""CREATE TABLE IF NOT EXISTS plan_work (run_id VARCHAR, entity VARCHAR, dynamics_id VARCHAR,
        d_seq BIGINT, marketo_id VARCHAR, m_seq BIGINT)""")
    con.execute("""CREATE TABLE IF NOT EXISTS plan_meta (entity VARCHAR PRIMARY KEY, run_id VARCHAR,
        created_at TIMESTAMP, summary VARCHAR)""")
    con.execute("""CREATE TABLE IF NOT EXISTS ledger (seq BIGINT DEFAULT nextval('ledger_seq'), run_id VARCHAR,
        written_at TIMESTAMP, entity VARCHAR, dynamics_id VARCHAR, marketo_id VARCHAR, target VARCHAR, op VARCHAR,
        field VARCHAR, value_before VARCHAR, value_after VARCHAR, rule VARCHAR)""")
    con.execute("""CREATE TABLE IF NOT EXISTS failures (entity VARCHAR, dynamics_id VARCHAR, target VARCHAR,
        op VARCHAR, marketo_id VARCHAR, field VARCHAR, code VARCHAR, message VARCHAR, attempts INTEGER,
        first_failed_at TIMESTAMP, last_failed_at TIMESTAMP, next_attempt_at TIMESTAMP, held BOOLEAN,
        run_id VARCHAR, PRIMARY KEY (entity, dynamics_id, target))""")
    con.execute("""CREATE TABLE IF NOT EXISTS conflicts (entity VARCHAR, dynamics_id VARCHAR, marketo_id VARCHAR,
        field VARCHAR, dynamics_value VARCHAR, marketo_value VARCHAR, base_value VARCHAR, detected_at TIMESTAMP,
        run_id VARCHAR, PRIMARY KEY (entity, dynamics_id, field))""")
    # When a field last changed on a side ("d:<entity>" or "m"), for policy `latest`: Marketo's lead-change
    # activities carry a time per field; on Dynamics it is the modified time of the first extracted version
    # that showed the value. Only fields with policy `latest` are tracked.
    con.execute("""CREATE TABLE IF NOT EXISTS field_times (side VARCHAR, id VARCHAR, field VARCHAR,
        changed_at VARCHAR, PRIMARY KEY (side, id, field))""")
    con.execute("CREATE TABLE IF NOT EXISTS derived_marks (kind VARCHAR, id VARCHAR, seq BIGINT)")
    con.execute("""CREATE TABLE IF NOT EXISTS cursors (name VARCHAR PRIMARY KEY, value VARCHAR,
        updated_at TIMESTAMP)""")
    con.execute(
        "CREATE TABLE IF NOT EXISTS environment (key VARCHAR PRIMARY KEY, value VARCHAR, pinned_at TIMESTAMP)"
    )
    con.execute("""CREATE TABLE IF NOT EXISTS run_stats (run_id VARCHAR, entity VARCHAR, stage VARCHAR,
        recorded_at TIMESTAMP, stats VARCHAR)""")
    ensure_split_base(con)
    _create_indexes(con, config)


def _create_indexes(con: duckdb.DuckDBPyConnection, config: SyncConfig) -> None:
    """ART indexes so a run reads what changed, not whole tables: the pending marks (``pending_seq > 0`` is an
    index range scan) and identity by either id. DuckDB's INSERT OR REPLACE leaves indexed columns other than the
    key unchanged, so these tables are written with ``ON CONFLICT DO UPDATE`` (or plain UPDATE) only.

    Off unless ``sync.index_state`` is set: on DuckDB 1.4.5, keeping these indexes up to date cost more than they
    saved at every scale we measured (medium: initial copy 184 s with them, 116 s without; a 1,000-change
    incremental run 11.8 s against 8.3 s), although they cut the rows an incremental run reads to what changed."""
    if not config.sync.index_state:
        return
    for e in config.entities:
        if not e.is_derived:
            con.execute(
                f"CREATE INDEX IF NOT EXISTS {qi('d_' + e.name + '_pending')} ON {qi('d_' + e.name)} (pending_seq)"
            )
        if e.is_person and "email" in entity_columns(e):
            con.execute(
                f"CREATE INDEX IF NOT EXISTS {qi('d_' + e.name + '_email')} ON {qi('d_' + e.name)} (lower(f_email))"
            )
    con.execute("CREATE INDEX IF NOT EXISTS m_person_pending ON m_person (pending_seq)")
    con.execute("CREATE INDEX IF NOT EXISTS identity_dynamics_id ON identity (dynamics_id)")
    con.execute("CREATE INDEX IF NOT EXISTS identity_marketo_id ON identity (marketo_id)")
    # Expression indexes serve one key per lookup (``lower(x) = ?``): see rows_equal.
    con.execute("CREATE INDEX IF NOT EXISTS m_person_dynamics_id ON m_person (lower(f_dynamicsId))")
    if "f_email" in {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'm_person'"
        ).fetchall()
    }:
        con.execute("CREATE INDEX IF NOT EXISTS m_person_email ON m_person (lower(f_email))")
    if "contact" in config.by_name:
        con.execute("CREATE INDEX IF NOT EXISTS d_contact_origin_lead ON d_contact (origin_lead)")
    for source in {e.derived_from for e in config.entities if e.derived_from}:  # derived roles by contact
        d = "d_" + source
        con.execute(f"CREATE INDEX IF NOT EXISTS {qi(d + '_customer_contact')} ON {qi(d)} (customer_contact)")


# DuckDB reads a table through an ART index only for a filter on the indexed column alone against constants
# (``key IN (?, ?, ...)``, up to its index_scan_max_count of 2,048 keys); a join or ``IN (SELECT ...)`` scans
# the whole table. Work sets are therefore turned into bound key lists, in chunks.
KEYED_CHUNK = 2000
# Beyond one chunk of keys one scan of the table is cheaper: at medium, chunked lookups of up to 50,000 keys made
# the initial copy 4x and the settle run 7x slower than one scan.
KEYED_MAX = KEYED_CHUNK


# Keys are a list, or a query whose first column gives them (e.g. ``SELECT did FROM work_set``): a query's keys
# are fetched into Python only when few enough for index lookups. A whole work set as a bound list costs memory in
# proportion to the org (300,000 ids bound as one list parameter left the process ~190 MB larger).
Keys = list[Any] | str


def key_list(con: duckdb.DuckDBPyConnection, keys: Keys, most: int) -> list[Any] | str:
    """The distinct non-null keys as a list when at most ``most``; otherwise, for a query, a subquery of them."""
    if not isinstance(keys, str):
        return list(dict.fromkeys(k for k in keys if k is not None))
    src = f"(SELECT * FROM ({keys})) AS key_src(k) WHERE k IS NOT NULL"
    # The query as written, read a batch at a time: wrapped in DISTINCT ... LIMIT, DuckDB scanned the whole table
    # instead of reading a pending mark's index (m_person: 17,000 rows read for 1,000 marks).
    res = con.execute(keys)
    found: dict[Any, None] = {}
    while batch := res.fetchmany(2048):
        found.update((r[0], None) for r in batch if r[0] is not None)
        if len(found) > most:
            return f"SELECT k FROM {src}"
    return list(found)


# Per open connection (weakly held: a connection left to the garbage collector still closes and frees the file).
_INDEXED: weakref.WeakKeyDictionary[Any, frozenset[tuple[str, str]]] = weakref.WeakKeyDictionary()


def _norm(expr: str) -> str:
    return re.sub(r"[\s\"'()\[\]]", "", expr).lower()


def indexed(con: duckdb.DuckDBPyConnection, table: str, expr: str) -> bool:
    """Whether ``table`` has an ART index (or a one-column primary key) on exactly ``expr``; read once per
    connection (the store's indexes are created when it is opened, ``ensure_schema``)."""
    hit = _INDEXED.get(con)
    if hit is None:
        hit = frozenset(
            {
                (_norm(t), _norm(e))
                for t, e in con.execute(
                    """SELECT table_name, expressions FROM duckdb_indexes()
                UNION ALL SELECT table_name, constraint_column_names[1]::VARCHAR FROM duckdb_constraints()
                WHERE constraint_type = 'PRIMARY KEY' AND len(constraint_column_names) = 1"""
                ).fetchall()
            }
        )
        _INDEXED[con] = hit
    return (_norm(table), _norm(expr)) in hit


# What the index path costs: DuckDB binds and plans a constant IN list at ~20 us per key whatever the table size,
# so 1,000 keys cost ~20 ms against ~3 ms for one scan of a 10,000-row table. Without an index on the key the list
# buys nothing (the table is scanned either way): one bound list, joined, is then the cheaper statement.
# A list of at most this many keys goes through the index whatever the table size (it costs under ~1 ms).
INDEX_ALWAYS_KEYS = 50
# Beyond that, the index only where the table has this many rows per key: a scan costs ~0.2-0.3 us per row.
INDEX_ROWS_PER_KEY = 50


def use_index(con: duckdb.DuckDBPyConnection, table: str, expr: str, keys: int) -> bool:
    """Read ``keys`` rows of ``table`` by ``expr`` through its index (a bound list per chunk), rather than by one
    scan joined to the keys: when there is such an index and the table is large against the keys."""
    if keys > KEYED_MAX or not indexed(con, table, expr):
        return False
    if keys <= INDEX_ALWAYS_KEYS:
        return True
    row = con.execute(
        "SELECT estimated_size FROM duckdb_tables() WHERE table_name = ? AND NOT temporary",
        [table.strip('"')],
    ).fetchone()
    return row is None or int(row[0] or 0) >= INDEX_ROWS_PER_KEY * keys


def forget_indexes(con: duckdb.DuckDBPyConnection) -> None:
    """Drop what :func:`indexed` remembers of ``con`` (its schema changed, or it is closed)."""
    _INDEXED.pop(con, None)


def keyed_rows(
    con: duckdb.DuckDBPyConnection,
    temp: str,
    table: str,
    key: str,
    keys: Keys,
    where: str = "TRUE",
    columns: str = "*",
) -> None:
    """Temp table ``temp``: ``columns`` of the rows of ``table`` whose ``key`` is one of ``keys`` (and that pass
    ``where``), read through the key's index when the list is short enough."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {qi(temp)} AS SELECT {columns} FROM {table} WHERE false")
    keys = key_list(con, keys, KEYED_MAX)
    if isinstance(keys, str):  # many keys: one scan, the keys never leave DuckDB
        con.execute(
            f"INSERT INTO {qi(temp)} SELECT {columns} FROM {table} WHERE {key} IN ({keys}) AND ({where})"
        )
        return
    if not keys:
        return
    if not use_index(con, table, key, len(keys)):
        con.execute(
            f"""INSERT INTO {qi(temp)} SELECT {columns} FROM {table}
                        WHERE {key} IN (SELECT unnest(?)) AND ({where})""",
            [keys],
        )
        return
    for i in range(0, len(keys), KEYED_CHUNK):
        chunk = keys[i : i + KEYED_CHUNK]
        # OFFSET 0 keeps the key filter alone in its scan (an index scan takes no other filter).
        con.execute(
            f"""INSERT INTO {qi(temp)} SELECT {columns} FROM
                        (SELECT * FROM {table} WHERE {key} IN ({", ".join("?" * len(chunk))}) OFFSET 0) AS {qi(temp + "_src")}
                        WHERE {where}""",
            chunk,
        )


EQUAL_LOOKUPS_MAX = 100  # one statement per key: beyond this many one scan is cheaper


def rows_equal(
    con: duckdb.DuckDBPyConnection,
    temp: str,
    table: str,
    expr: str,
    keys: Keys,
    where: str = "TRUE",
    columns: str = "*",
) -> None:
    """Temp table ``temp``: ``columns`` of the rows of ``table`` whose ``expr`` equals one of ``keys`` (and that
    pass ``where``); one lookup per key, which an index on ``expr`` serves (DuckDB reads an expression index for
    ``=`` only)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {qi(temp)} AS SELECT {columns} FROM {table} WHERE false")
    keys = key_list(con, keys, EQUAL_LOOKUPS_MAX)
    if isinstance(keys, str):
        con.execute(
            f"INSERT INTO {qi(temp)} SELECT {columns} FROM {table} WHERE {expr} IN ({keys}) AND ({where})"
        )
        return
    if not keys:
        return
    if len(keys) > EQUAL_LOOKUPS_MAX or not use_index(con, table, expr, len(keys)):
        con.execute(
            f"INSERT INTO {qi(temp)} SELECT {columns} FROM {table} WHERE {expr} IN (SELECT unnest(?)) AND ({where})",
            [keys],
        )
        return
    for key in keys:
        con.execute(
            f"""INSERT INTO {qi(temp)} SELECT {columns} FROM
                        (SELECT * FROM {table} WHERE {expr} = ? OFFSET 0) AS {qi(temp + "_src")} WHERE {where}""",
            [key],
        )


def keyed_execute(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    keys: Keys,
    params: list[Any] | None = None,
    on: tuple[str, str] | None = None,
) -> int:
    """Run ``sql`` once per chunk of ``keys``; its ``{keys}`` placeholder becomes ``(?, ?, ...)``, bound after
    ``params`` (so it must follow every other parameter). A statement that touches only keyed rows (put
    ``<table>.<key> IN {keys}`` as that table's only filter: DuckDB then reads it through the key's index) is
    skipped when there are none. ``on``: that (table, key), so that a long list against a small table is joined
    to one scan instead (:func:`use_index`). Returns the rows changed."""
    keys = key_list(con, keys, KEYED_MAX)
    if isinstance(keys, str):  # a large batch (an initial copy): one statement, one scan
        res = con.execute(sql.replace("{keys}", f"({keys})"), params or [])
        row = res.fetchone() if res is not None else None
        return int(row[0]) if row and isinstance(row[0], int) else 0
    if not keys:
        return 0
    # Many keys, or a table small against them: one statement, one scan.
    if len(keys) > KEYED_MAX or (on is not None and not use_index(con, on[0], on[1], len(keys))):
        res = con.execute(sql.replace("{keys}", "(SELECT unnest(?))"), [*(params or []), keys])
        row = res.fetchone() if res is not None else None
        return int(row[0]) if row and isinstance(row[0], int) else 0
    changed = 0
    for i in range(0, len(keys), KEYED_CHUNK):
        chunk = keys[i : i + KEYED_CHUNK]
        res = con.execute(
            sql.replace("{keys}", "(" + ", ".join("?" * len(chunk)) + ")"), [*(params or []), *chunk]
        )
        row = res.fetchone() if res is not None else None
        changed += int(row[0]) if row and isinstance(row[0], int) else 0
    return changed


def column(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[Any]:
    """The first column of a (small) query's rows."""
    return [r[0] for r in con.execute(sql, params or []).fetchall()]


BEFORE_VALUES_FROM = "ledger_before_values_from_seq"


def mark_ledger_before_values(con: duckdb.DuckDBPyConnection) -> None:
    """Remember from which ledger row on one-way object writes carry a real before-value (older versions
    stored NULL for them): rollback treats an older NULL as unknown, never as "blank it"."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    if not one_row(con, "SELECT count(*) FROM schema_meta WHERE key = ?", [BEFORE_VALUES_FROM])[0]:
        con.execute(
            "INSERT INTO schema_meta SELECT ?, CAST(COALESCE(max(seq), 0) + 1 AS VARCHAR) FROM ledger",
            [BEFORE_VALUES_FROM],
        )


def ensure_split_base(con: duckdb.DuckDBPyConnection) -> None:
    """``b__split``: after a rollback, a person field whose two systems hold different values (as they
    did before the rolled-back run) has one agreed value per system instead of one base; the merge
    compares each side with its own. Any sync write or agreement of the field drops the row."""
    con.execute("""CREATE TABLE IF NOT EXISTS b__split (entity VARCHAR, dynamics_id VARCHAR, field VARCHAR,
        d_value VARCHAR, m_value VARCHAR, run_id VARCHAR, split_at TIMESTAMP,
        PRIMARY KEY (entity, dynamics_id, field))""")


def _add_missing_columns(con: duckdb.DuckDBPyConnection, table: str, fields: list[str]) -> None:
    """A field added to the configuration becomes a new column; existing rows keep their state."""
    have = {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ?", [table]
        ).fetchall()
    }
    for f in fields:
        if f"f_{f}" not in have:
            con.execute(f"ALTER TABLE {qi(table)} ADD COLUMN {fcol(f)} VARCHAR")


def next_seq(con: duckdb.DuckDBPyConnection) -> int:
    return int(one_row(con, "SELECT nextval('change_seq')")[0])


def get_cursor(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    row = con.execute("SELECT value FROM cursors WHERE name = ?", [name]).fetchone()
    return row[0] if row else None


def set_cursor(con: duckdb.DuckDBPyConnection, name: str, value: str | None) -> None:
    if value is None:
        con.execute("DELETE FROM cursors WHERE name = ?", [name])
        return
    # Unchanged (a $select, a token with nothing new): no write, so no commit to the WAL (~10 ms each).
    con.execute(
        """INSERT INTO cursors VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE
        SET value = excluded.value, updated_at = excluded.updated_at WHERE cursors.value IS DISTINCT FROM excluded.value""",
        [name, value, utcnow()],
    )


def record_stats(
    con: duckdb.DuckDBPyConnection, run_id: str, entity: str, stage: str, stats: dict[str, Any]
) -> None:
    con.execute(
        "INSERT INTO run_stats VALUES (?, ?, ?, ?, ?)",
        [run_id, entity, stage, utcnow(), json.dumps(stats, default=str)],
    )


SWEEP_CURSOR = "damage:runs_since_sweep:"


def sweep_due(con: duckdb.DuckDBPyConnection, config: SyncConfig, what: str) -> bool:
    """Whether this run searches the whole store for damage of kind ``what`` (an entity's links, persons lost from
    the mirror): every ``sync.damage_sweep_every`` runs."""
    every = config.sync.damage_sweep_every
    if every <= 1:
        return True
    since = int(get_cursor(con, SWEEP_CURSOR + what) or every)
    due = since >= every
    set_cursor(con, SWEEP_CURSOR + what, str(1 if due else since + 1))
    return due
