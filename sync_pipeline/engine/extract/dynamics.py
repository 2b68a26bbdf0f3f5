"""Extract from Dynamics: read Dataverse rows into the mirror ``d_<entity>``, idempotently.

Extraction by partition: a historical window reads Dataverse rows by ``modifiedon`` (``$filter``); the
latest window follows the table's delta link, which also reports deletes. The first read of a table
with change tracking is a full read that yields the first delta link (one pass, the API floor); an
expired link falls back to such a full read and marks rows that vanished meanwhile as deleted.

A page becomes an Arrow table (typed by the field map, converted in C++), then one set-based
``INSERT ... ON CONFLICT`` canonicalises and upserts it. A row only replaces a mirrored row when its
version is newer, so re-running an extract, or reading the same change through a window query and a
delta link, changes nothing; a newer version marks the record pending for the next plan.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from sync_pipeline.clients import errors
from sync_pipeline.config.model import Entity, FieldMap, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.extract.common import ExtractStats, IngestStats, iso_utc
from sync_pipeline.engine.ports import DynamicsPort
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import (
    fcol,
    get_cursor,
    latest_fields,
    next_seq,
    qi,
    set_cursor,
    sql_text,
    utcnow,
)

log = logging.getLogger(__name__)


LOOKUP_TYPE = "@Microsoft.Dynamics.CRM.lookuplogicalname"
PK = {"systemuser": "systemuserid", "team": "teamid", "teammembership": "teammembershipid"}
# Tables Dataverse's ``Merge`` action applies to; a merged (subordinate) row is deactivated with ``merged`` =
# true and ``masterid`` pointing at the row it was merged into ("Merge table rows using the Web API",
# https://learn.microsoft.com/power-apps/developer/data-platform/webapi/merge-table-rows).
MERGEABLE = ("account", "contact", "lead")
MASTER = "_masterid_value"
INGEST_ROWS = 25_000  # rows held in memory between upserts (a few 5,000-row pages)


def delta_cursor(entity: Entity) -> str:
    return f"dynamics:delta:{entity.name}"


def select_cursor(entity: Entity) -> str:
    """The $select the stored delta link was started with."""
    return f"dynamics:delta-select:{entity.name}"


def extract_dynamics(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    client: DynamicsPort,
    start: datetime,
    end: datetime,
    partition_key: str,
    latest: bool,
) -> ExtractStats:
    """Mirror the Dynamics rows of one entity for a modified-time window (and its deletes when latest)."""
    assert entity.dynamics is not None
    stats = ExtractStats(entity.name)
    stats.relabeled = relabel_options(con, entity)
    select = dynamics_select(entity)
    modified = entity.dynamics.modified_column
    delta = get_cursor(con, delta_cursor(entity))
    # A delta link is opaque and replays the query it came from, $select included ("opaque, service-generated
    # links", learn.microsoft.com/en-us/training/modules/dataverse-web-api/change-tracking): after a mapping
    # change its rows would lack the new columns, which would read as blanks. A new $select starts a new link.
    selected, wanted = get_cursor(con, select_cursor(entity)), ",".join(select)
    if latest and delta and selected is not None and selected != wanted:
        stats.mode = "full (mapping changed: new delta link)"
        # The old link stays until the new one is complete: a run killed meanwhile starts this read again.
        new_link = _full_read(con, entity, client, select, partition_key, stats, detect_deletes=True)
        set_cursor(con, delta_cursor(entity), new_link)
    elif latest and delta:
        stats.mode = "delta"
        try:
            new_link = _ingest_changes(con, entity, client, select, delta, partition_key, stats, config)
        except errors.DeltaExpired as exc:
            log.warning("%s: delta link no longer valid (%s); falling back to a full read", entity.name, exc)
            set_cursor(con, delta_cursor(entity), None)
            stats.mode = "full (delta expired)"
            new_link = _full_read(
                con, entity, client, select, partition_key, stats, detect_deletes=True, config=config
            )
        set_cursor(con, delta_cursor(entity), new_link)
    elif latest:
        stats.mode = "full (first delta link)"
        new_link = _full_read(
            con, entity, client, select, partition_key, stats, detect_deletes=False, config=config
        )
        set_cursor(con, delta_cursor(entity), new_link)
    elif modified:
        stats.mode = "window"
        flt = f"{modified} ge {iso_utc(start)} and {modified} lt {iso_utc(end)}"
        for page in client.iter_pages(entity.dynamics.entity_set, select, filter=flt, annotations=True):
            stats.pages += 1
            stats.take(ingest_dynamics_page(con, entity, page, partition_key, target_tables(config)))
    else:
        stats.mode = "skipped (no modified-time column; read on the latest window)"
    if latest:
        set_cursor(con, select_cursor(entity), wanted)
    return stats


def relabel_options(con: duckdb.DuckDBPyConnection, entity: Entity) -> int:
    """Option labels the org renamed since the last run: mirrored rows take the new label and become pending,
    so the next plan writes it (a label change does not change the Dynamics rows' versions). Labels of
    codes that were unknown before (held as invalid) are filled in too. Returns the rows changed."""
    changed = 0
    for f in entity.all_fields:
        if f.transform != "picklist" or not f.options:
            continue
        name = f"optionsets:{entity.name}:{f.marketo}"
        now = {str(k): v for k, v in sorted(f.options.items())}
        stored = get_cursor(con, name)
        if stored is not None:
            old = json.loads(stored)
            unique = Counter(old.values())
            pairs = [(old[c], now[c]) for c in old if c in now and old[c] != now[c] and unique[old[c]] == 1]
            pairs += [(normalize.INVALID + c, now[c]) for c in now if c not in old]
            if pairs:
                changed += ledger.relabel(con, entity.name, f.marketo, pairs)
        if stored != json.dumps(now):
            set_cursor(con, name, json.dumps(now))
    if changed:
        log.info("%s: %d mirrored rows took renamed option labels", entity.name, changed)
    return changed


def _changes(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    client: DynamicsPort,
    select: list[str],
    delta: str | None,
    partition_key: str,
    stats: ExtractStats,
    seen: bool = False,
    config: SyncConfig | None = None,
) -> str:
    """Follow a delta link (or start change tracking with a full read); returns the next delta link."""
    assert entity.dynamics is not None
    pk = primary_key(entity)
    schema = page_schema(entity)
    tables = target_tables(config) if config else None
    link = ""
    # A few pages per statement (fewer, larger set-based upserts), held as Arrow tables: each page's JSON rows
    # are converted as soon as they arrive, so Python holds one page of dicts, not INGEST_ROWS of them.
    buffer: list[pa.Table] = []

    def flush() -> None:
        # A page that needed the per-column fallback has its own schema: it goes in on its own.
        same = all(t.schema.equals(schema) for t in buffer)
        for table in [pa.concat_tables(buffer)] if same else buffer:
            changed = ingest_dynamics_table(con, entity, table, partition_key, tables)
            stats.take(IngestStats(rows=table.num_rows, changed=changed))
            if seen:
                ids = pa.table({"id": pc.utf8_lower(pc.fill_null(table.column(pk).cast(pa.string()), ""))})  # noqa: F841
                con.execute("INSERT INTO seen_ids SELECT id FROM ids")
        buffer.clear()

    for rows, deleted, page_link in client.iter_changes(
        entity.dynamics.entity_set, select, delta_link=delta, annotations=True
    ):
        stats.pages += 1
        live = [r for r in rows if not _is_deleted_entry(r)]
        if live:
            buffer.append(coerce_page(live, schema))
        del rows, live
        if sum(t.num_rows for t in buffer) >= INGEST_ROWS or (deleted and buffer):
            flush()  # deletes apply after the rows before them
        stats.deleted += mark_dynamics_deleted(con, entity, deleted, partition_key)
        link = page_link or link
    if buffer:
        flush()
    return link


def _ingest_changes(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    client: DynamicsPort,
    select: list[str],
    delta: str,
    partition_key: str,
    stats: ExtractStats,
    config: SyncConfig | None = None,
) -> str:
    return _changes(con, entity, client, select, delta, partition_key, stats, config=config)


def _full_read(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    client: DynamicsPort,
    select: list[str],
    partition_key: str,
    stats: ExtractStats,
    detect_deletes: bool,
    config: SyncConfig | None = None,
) -> str:
    if detect_deletes:
        con.execute("CREATE OR REPLACE TEMP TABLE seen_ids (id VARCHAR)")
    link = _changes(
        con, entity, client, select, None, partition_key, stats, seen=detect_deletes, config=config
    )
    if detect_deletes:
        gone = [
            r[0]
            for r in con.execute(
                f"SELECT id FROM {qi('d_' + entity.name)} WHERE NOT deleted "
                "AND id NOT IN (SELECT id FROM seen_ids)"
            ).fetchall()
        ]
        stats.deleted += mark_dynamics_deleted(con, entity, gone, partition_key)
    return link


def primary_key(entity: Entity) -> str:
    assert entity.dynamics is not None
    return PK.get(entity.dynamics.table, f"{entity.dynamics.table}id")


def wire_name(f: FieldMap) -> str:
    return f"_{f.dynamics}_value" if f.transform in ("lookup", "owner", "customer_account") else f.dynamics


def arrow_type(f: FieldMap) -> pa.DataType:
    return {"boolean": pa.bool_(), "integer": pa.int64(), "picklist": pa.int64(), "number": pa.float64()}.get(
        f.transform, pa.string()
    )


def dynamics_select(entity: Entity) -> list[str]:
    """The columns an extract asks Dataverse for ($select)."""
    assert entity.dynamics is not None
    cols = [primary_key(entity), "versionnumber"]
    if entity.dynamics.modified_column:
        cols.append(entity.dynamics.modified_column)
    if entity.sync_filter_column:
        cols.append(entity.sync_filter_column)
    if entity.name == "contact":
        cols.append("_originatingleadid_value")
    if entity.dynamics.table in MERGEABLE:
        cols += [MASTER, "merged"]
    cols += [wire_name(f) for f in entity.all_fields]
    return list(dict.fromkeys(cols))


def page_schema(entity: Entity) -> pa.Schema:
    assert entity.dynamics is not None
    fields: dict[str, pa.DataType] = {
        primary_key(entity): pa.string(),
        "versionnumber": pa.int64(),
        "@odata.etag": pa.string(),
    }
    if entity.dynamics.modified_column:
        fields[entity.dynamics.modified_column] = pa.string()
    if entity.sync_filter_column:
        fields[entity.sync_filter_column] = pa.bool_()
    if entity.name == "contact":
        fields["_originatingleadid_value"] = pa.string()
    if entity.dynamics.table in MERGEABLE:
        fields[MASTER], fields["merged"] = pa.string(), pa.bool_()
    for f in entity.all_fields:
        fields[wire_name(f)] = arrow_type(f)
        if f.transform in ("owner", "customer_account", "lookup"):
            fields[wire_name(f) + LOOKUP_TYPE] = pa.string()
    return pa.schema(list(fields.items()))


def coerce_page(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        # One bad value must not sink the page: convert column by column, nulling what cannot convert.
        cols = {}
        for fld in schema:
            vals = [r.get(fld.name) for r in rows]
            try:
                cols[fld.name] = pa.array(vals, type=fld.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
                cols[fld.name] = pa.array([None if v is None else str(v) for v in vals], type=pa.string())
        return pa.table(cols)


def dynamics_value_expr(entity: Entity, f: FieldMap, tables: dict[str, str] | None = None) -> str:
    col = qi(wire_name(f))
    if f.transform == "lookup":
        # A polymorphic lookup (a Customer column such as parentcustomerid points at an account *or* a
        # contact) carries the target's table in the lookuplogicalname annotation. Only the declared target
        # becomes the Marketo link: a contact's id is no company (same rule as opportunities' customer).
        typ = qi(wire_name(f) + LOOKUP_TYPE)
        target = (tables or {}).get(f.target or "", f.target or "")
        return f"CASE WHEN {typ} IS NULL OR {typ} = {sql_text(target)} THEN lower({col}) END"
    if f.transform == "owner":  # only users become Marketo sales persons (domain.md section 5, item 18)
        typ = qi(wire_name(f) + LOOKUP_TYPE)
        return f"CASE WHEN {typ} = 'systemuser' THEN lower({col}) END"
    if f.transform == "customer_account":  # a contact customer resolves to its account at plan time
        typ = qi(wire_name(f) + LOOKUP_TYPE)
        return f"CASE WHEN {typ} = 'account' THEN lower({col}) END"
    return normalize.dynamics_expr(f, col)


def target_tables(config: SyncConfig) -> dict[str, str]:
    """Entity name -> Dataverse table, for checking lookup targets."""
    return {e.name: e.dynamics.table for e in config.entities if e.dynamics is not None}


def _is_deleted_entry(row: dict[str, Any]) -> bool:
    return str(row.get("@odata.context", "")).endswith("$deletedEntity")


def ingest_dynamics_page(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    rows: list[dict[str, Any]],
    partition_key: str,
    tables: dict[str, str] | None = None,
) -> IngestStats:
    live = [r for r in rows if not _is_deleted_entry(r)]
    deleted = [r["id"] for r in rows if _is_deleted_entry(r) and "id" in r]
    stats = IngestStats(rows=len(rows))
    if live:
        stats.changed = ingest_dynamics_table(
            con, entity, coerce_page(live, page_schema(entity)), partition_key, tables
        )
    if deleted:
        stats.deleted = mark_dynamics_deleted(con, entity, deleted, partition_key)
    return stats


def ingest_dynamics_table(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    page: pa.Table,
    partition_key: str,
    tables: dict[str, str] | None = None,
) -> int:
    """Upsert rows (an Arrow table of ``page_schema``, or its per-column fallback); returns the rows changed."""
    seq = next_seq(con)
    pk, table = qi(primary_key(entity)), qi(f"d_{entity.name}")
    assert entity.dynamics is not None
    mod = qi(entity.dynamics.modified_column) if entity.dynamics.modified_column else "NULL"
    flag = qi(entity.sync_filter_column) if entity.sync_filter_column else "NULL"
    origin = 'lower("_originatingleadid_value")' if entity.name == "contact" else "NULL"
    master = (
        f"CASE WHEN merged THEN lower({qi(MASTER)}) END" if entity.dynamics.table in MERGEABLE else "NULL"
    )
    customer = "NULL"
    for f in entity.all_fields:
        if f.transform == "customer_account":
            customer = (
                f"CASE WHEN {qi(wire_name(f) + LOOKUP_TYPE)} = 'contact' THEN lower({qi(wire_name(f))}) END"
            )
    names = [fcol(f.marketo) for f in entity.all_fields]
    exprs = [dynamics_value_expr(entity, f, tables) for f in entity.all_fields]
    _record_field_times(con, entity, table, pk, mod, exprs, page)
    select = ", ".join(f"{e} AS {n}" for e, n in zip(exprs, names, strict=True))
    sets = ", ".join(f"{n} = excluded.{n}" for n in names)
    res = con.execute(
        f"""
        INSERT INTO {table} (id, version, modified_on, etag, deleted, sync_flag, origin_lead, customer_contact,
                             master_id, partition_key, seen_at, pending_seq, {", ".join(names)})
        SELECT lower({pk}), versionnumber, CAST({mod} AS VARCHAR), "@odata.etag", false, {flag}, {origin},
               {customer}, {master}, ?, ?, ?, {select}
        FROM page
        QUALIFY row_number() OVER (PARTITION BY lower({pk}) ORDER BY versionnumber DESC) = 1
        ON CONFLICT (id) DO UPDATE SET version = excluded.version, modified_on = excluded.modified_on,
            etag = excluded.etag, deleted = false, sync_flag = excluded.sync_flag,
            origin_lead = excluded.origin_lead, customer_contact = excluded.customer_contact,
            master_id = excluded.master_id, partition_key = excluded.partition_key, seen_at = excluded.seen_at,
            pending_seq = excluded.pending_seq, {sets}
        WHERE excluded.version > {table}.version OR {table}.version IS NULL OR {table}.deleted
    """,
        [partition_key, utcnow(), seq],
    ).fetchone()
    return int(res[0]) if res else 0


def _record_field_times(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    table: str,
    pk: str,
    mod: str,
    exprs: list[str],
    page: pa.Table,
) -> None:
    """Policy ``latest``: a field's time is the modified time of the first version read that showed its value."""
    timed = set(latest_fields(entity))
    if not timed:
        return
    con.register("ft_page", page)
    try:
        _field_times_sql(con, entity, table, pk, mod, exprs, timed)
    finally:
        con.unregister("ft_page")


def _field_times_sql(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    table: str,
    pk: str,
    mod: str,
    exprs: list[str],
    timed: set[str],
) -> None:
    for f, expr in zip(entity.all_fields, exprs, strict=True):
        if f.marketo not in timed:
            continue
        con.execute(f"""INSERT OR REPLACE INTO field_times
            SELECT {sql_text("d:" + entity.name)}, n.id, {sql_text(f.marketo)}, n.modified_on
            FROM (SELECT lower({pk}) AS id, versionnumber AS version, CAST({mod} AS VARCHAR) AS modified_on,
                         {expr} AS v FROM ft_page
                  QUALIFY row_number() OVER (PARTITION BY lower({pk}) ORDER BY versionnumber DESC) = 1) n
            LEFT JOIN {table} t ON t.id = n.id
            WHERE n.modified_on IS NOT NULL
              AND (t.id IS NULL OR t.version IS NULL OR n.version > t.version OR t.deleted)
              AND n.v IS DISTINCT FROM t.{fcol(f.marketo)}""")


def mark_dynamics_deleted(
    con: duckdb.DuckDBPyConnection, entity: Entity, ids: Iterable[str], partition_key: str
) -> int:
    ids = [i.lower() for i in ids]
    return ledger.mark_deleted(con, entity.name, ids, partition_key, utcnow()) if ids else 0
