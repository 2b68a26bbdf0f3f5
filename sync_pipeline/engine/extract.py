"""Ingest pages from either system into the DuckDB mirrors, idempotently.

A page becomes an Arrow table (typed by the field map, converted in C++), then one set-based
``INSERT ... ON CONFLICT`` canonicalises and upserts it. A row only replaces a mirrored row when its
version is newer, so re-running an extract, or reading the same change through a window query and a
delta link, changes nothing; a newer version marks the record pending for the next plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import Entity, FieldMap, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.state import fcol, latest_fields, next_seq, qi, utcnow

LOOKUP_TYPE = "@Microsoft.Dynamics.CRM.lookuplogicalname"
PK = {"systemuser": "systemuserid", "team": "teamid", "teammembership": "teammembershipid"}
# Tables Dataverse's ``Merge`` action applies to; a merged (subordinate) row is deactivated with ``merged`` =
# true and ``masterid`` pointing at the row it was merged into ("Merge table rows using the Web API",
# https://learn.microsoft.com/power-apps/developer/data-platform/webapi/merge-table-rows).
MERGEABLE = ("account", "contact", "lead")
MASTER = "_masterid_value"


@dataclass
class IngestStats:
    rows: int = 0
    changed: int = 0
    deleted: int = 0

    def add(self, other: "IngestStats") -> None:
        self.rows += other.rows
        self.changed += other.changed
        self.deleted += other.deleted


def primary_key(entity: Entity) -> str:
    assert entity.dynamics is not None
    return PK.get(entity.dynamics.table, f"{entity.dynamics.table}id")


def wire_name(f: FieldMap) -> str:
    return f"_{f.dynamics}_value" if f.transform in ("lookup", "owner", "customer_account") else f.dynamics


def _arrow_type(f: FieldMap) -> pa.DataType:
    return {"boolean": pa.bool_(), "integer": pa.int64(), "picklist": pa.int64(),
            "number": pa.float64()}.get(f.transform, pa.string())


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


def _page_schema(entity: Entity) -> pa.Schema:
    assert entity.dynamics is not None
    fields: dict[str, pa.DataType] = {primary_key(entity): pa.string(), "versionnumber": pa.int64(),
                                      "@odata.etag": pa.string()}
    if entity.dynamics.modified_column:
        fields[entity.dynamics.modified_column] = pa.string()
    if entity.sync_filter_column:
        fields[entity.sync_filter_column] = pa.bool_()
    if entity.name == "contact":
        fields["_originatingleadid_value"] = pa.string()
    if entity.dynamics.table in MERGEABLE:
        fields[MASTER], fields["merged"] = pa.string(), pa.bool_()
    for f in entity.all_fields:
        fields[wire_name(f)] = _arrow_type(f)
        if f.transform in ("owner", "customer_account", "lookup"):
            fields[wire_name(f) + LOOKUP_TYPE] = pa.string()
    return pa.schema(list(fields.items()))


def _coerce(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
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


def _dynamics_value_expr(entity: Entity, f: FieldMap, tables: dict[str, str] | None = None) -> str:
    col = qi(wire_name(f))
    if f.transform == "lookup":
        # A polymorphic lookup (a Customer column such as parentcustomerid points at an account *or* a
        # contact) carries the target's table in the lookuplogicalname annotation. Only the declared target
        # becomes the Marketo link: a contact's id is no company (same rule as opportunities' customer).
        typ = qi(wire_name(f) + LOOKUP_TYPE)
        target = (tables or {}).get(f.target or "", f.target or "")
        return f"CASE WHEN {typ} IS NULL OR {typ} = {_sql_text(target)} THEN lower({col}) END"
    if f.transform == "owner":  # only users become Marketo sales persons (domain.md section 5, item 18)
        typ = qi(wire_name(f) + LOOKUP_TYPE)
        return f"CASE WHEN {typ} = 'systemuser' THEN lower({col}) END"
    if f.transform == "customer_account":  # a contact customer resolves to its account at plan time
        typ = qi(wire_name(f) + LOOKUP_TYPE)
        return f"CASE WHEN {typ} = 'account' THEN lower({col}) END"
    return normalize.dynamics_expr(f, col)


def _sql_text(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def target_tables(config: SyncConfig) -> dict[str, str]:
    """Entity name -> Dataverse table, for checking lookup targets."""
    return {e.name: e.dynamics.table for e in config.entities if e.dynamics is not None}


def _is_deleted_entry(row: dict[str, Any]) -> bool:
    return str(row.get("@odata.context", "")).endswith("$deletedEntity")


def ingest_dynamics_page(con: duckdb.DuckDBPyConnection, entity: Entity, rows: list[dict[str, Any]],
                         partition_key: str, tables: dict[str, str] | None = None) -> IngestStats:
    live = [r for r in rows if not _is_deleted_entry(r)]
    deleted = [r["id"] for r in rows if _is_deleted_entry(r) and "id" in r]
    stats = IngestStats(rows=len(rows))
    seq = next_seq(con)
    if live:
        page = _coerce(live, _page_schema(entity))  # noqa: F841 - referenced by name in the SQL below
        pk, table = qi(primary_key(entity)), qi(f"d_{entity.name}")
        assert entity.dynamics is not None
        mod = qi(entity.dynamics.modified_column) if entity.dynamics.modified_column else "NULL"
        flag = qi(entity.sync_filter_column) if entity.sync_filter_column else "NULL"
        origin = "lower(\"_originatingleadid_value\")" if entity.name == "contact" else "NULL"
        master = f"CASE WHEN merged THEN lower({qi(MASTER)}) END" if entity.dynamics.table in MERGEABLE else "NULL"
        customer = "NULL"
        for f in entity.all_fields:
            if f.transform == "customer_account":
                customer = (f"CASE WHEN {qi(wire_name(f) + LOOKUP_TYPE)} = 'contact' "
                            f"THEN lower({qi(wire_name(f))}) END")
        names = [fcol(f.marketo) for f in entity.all_fields]
        exprs = [_dynamics_value_expr(entity, f, tables) for f in entity.all_fields]
        _record_field_times(con, entity, table, pk, mod, exprs, page)
        select = ", ".join(f"{e} AS {n}" for e, n in zip(exprs, names))
        sets = ", ".join(f"{n} = excluded.{n}" for n in names)
        res = con.execute(f"""
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
        """, [partition_key, utcnow(), seq]).fetchone()
        stats.changed = int(res[0]) if res else 0
    if deleted:
        stats.deleted = mark_dynamics_deleted(con, entity, deleted, partition_key)
    return stats


def _record_field_times(con: duckdb.DuckDBPyConnection, entity: Entity, table: str, pk: str, mod: str,
                        exprs: list[str], page: pa.Table) -> None:
    """Policy ``latest``: a field's time is the modified time of the first version read that showed its value."""
    timed = set(latest_fields(entity))
    if not timed:
        return
    con.register("ft_page", page)
    try:
        _field_times_sql(con, entity, table, pk, mod, exprs, timed)
    finally:
        con.unregister("ft_page")


def _field_times_sql(con: duckdb.DuckDBPyConnection, entity: Entity, table: str, pk: str, mod: str,
                     exprs: list[str], timed: set[str]) -> None:
    for f, expr in zip(entity.all_fields, exprs):
        if f.marketo not in timed:
            continue
        con.execute(f"""INSERT OR REPLACE INTO field_times
            SELECT {_sql_text('d:' + entity.name)}, n.id, {_sql_text(f.marketo)}, n.modified_on
            FROM (SELECT lower({pk}) AS id, versionnumber AS version, CAST({mod} AS VARCHAR) AS modified_on,
                         {expr} AS v FROM ft_page
                  QUALIFY row_number() OVER (PARTITION BY lower({pk}) ORDER BY versionnumber DESC) = 1) n
            LEFT JOIN {table} t ON t.id = n.id
            WHERE n.modified_on IS NOT NULL
              AND (t.id IS NULL OR t.version IS NULL OR n.version > t.version OR t.deleted)
              AND n.v IS DISTINCT FROM t.{fcol(f.marketo)}""")


def record_marketo_field_times(con: duckdb.DuckDBPyConnection, times: list[tuple[int, str, str]]) -> None:
    """(person id, field, activity time) of lead changes to fields with policy ``latest``."""
    if not times:
        return
    # Not "at": DuckDB 1.4 parses AT as a keyword, and `max(at)` was a syntax error (hidden by a step retry).
    tbl = pa.table({"id": [str(t[0]) for t in times], "field": [t[1] for t in times],  # noqa: F841
                    "changed_at": [t[2] for t in times]})
    con.execute("""INSERT OR REPLACE INTO field_times (side, id, field, changed_at)
                   SELECT 'm', id, field, max(changed_at) FROM tbl GROUP BY id, field""")


def mark_dynamics_deleted(con: duckdb.DuckDBPyConnection, entity: Entity, ids: Iterable[str],
                          partition_key: str) -> int:
    ids = [i.lower() for i in ids]
    if not ids:
        return 0
    seq = next_seq(con)
    table = qi(f"d_{entity.name}")
    res = con.execute(f"""UPDATE {table} SET deleted = true, pending_seq = ?, partition_key = ?, seen_at = ?
                          WHERE id IN (SELECT unnest(?::VARCHAR[])) AND NOT deleted""",
                      [seq, partition_key, utcnow(), ids]).fetchone()
    return int(res[0]) if res else 0


# ---- Marketo persons --------------------------------------------------------------------------------


def person_field_maps(config: SyncConfig) -> list[FieldMap]:
    system = [FieldMap(marketo="dynamicsId", dynamics="id_", transform="lookup", target=config.entities[0].name),
              FieldMap(marketo="dynamicsType", dynamics="type_"),
              FieldMap(marketo="dynamicsIsDeleted", dynamics="deleted_", transform="boolean")]
    known = {f.marketo for f in config.person_fields()}
    return config.person_fields() + [f for f in system if f.marketo not in known]


def marketo_person_fields(config: SyncConfig) -> list[str]:
    return ["id", "updatedAt"] + [f.marketo for f in person_field_maps(config)]


def ingest_marketo_persons(con: duckdb.DuckDBPyConnection, config: SyncConfig, rows: list[dict[str, Any]]
                           ) -> IngestStats:
    """Upsert Marketo persons (REST JSON rows); a person whose canonical values changed becomes pending."""
    if not rows:
        return IngestStats()
    maps = person_field_maps(config)
    names = ["id", "updatedAt"] + [f.marketo for f in maps]
    table = pa.table({n: pa.array([_text(r.get(n)) for r in rows], type=pa.string()) for n in names})
    return _upsert_persons(con, maps, "persons_page", table)


def ingest_marketo_csv(con: duckdb.DuckDBPyConnection, config: SyncConfig, csv_path: str) -> IngestStats:
    """Upsert persons from a bulk-extract CSV file (null values are the literal ``null``)."""
    maps = person_field_maps(config)
    path = "'" + str(csv_path).replace("'", "''") + "'"
    src = f"read_csv({path}, all_varchar = true, nullstr = 'null', header = true)"
    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    cols = ", ".join(qi(n) if n in have else f"NULL AS {qi(n)}" for n in ["id", "updatedAt"] + [f.marketo for f in maps])
    table = con.execute(f"SELECT {cols} FROM {src}").fetch_arrow_table()
    return _upsert_persons(con, maps, "persons_page", table)


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


UPSERT_ROWS = 20_000  # rows per upsert statement: DuckDB's ON CONFLICT keeps its input in memory


def _upsert_persons(con: duckdb.DuckDBPyConnection, maps: list[FieldMap], name: str, table: pa.Table) -> IngestStats:
    stats = IngestStats(rows=table.num_rows)
    names = [fcol(f.marketo) for f in maps]
    exprs = [normalize.marketo_expr(f, qi(f.marketo)) for f in maps]
    changed = " OR ".join(f"m_person.{n} IS DISTINCT FROM excluded.{n}" for n in names)
    for batch in table.to_batches(max_chunksize=UPSERT_ROWS):
        con.register(name, pa.Table.from_batches([batch]))
        try:
            res = con.execute(f"""
                INSERT INTO m_person (id, updated_at, deleted, seen_at, pending_seq, {", ".join(names)})
                SELECT CAST(id AS BIGINT), "updatedAt", false, ?, ?, {", ".join(exprs)} FROM {name}
                WHERE TRY_CAST(id AS BIGINT) IS NOT NULL
                QUALIFY row_number() OVER (PARTITION BY CAST(id AS BIGINT) ORDER BY "updatedAt" DESC) = 1
                ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at, deleted = false,
                    seen_at = excluded.seen_at, pending_seq = excluded.pending_seq,
                    {", ".join(f"{n} = excluded.{n}" for n in names)}
                WHERE m_person.deleted OR {changed}
            """, [utcnow(), next_seq(con)]).fetchone()
            stats.changed += int(res[0]) if res else 0
        finally:
            con.unregister(name)
    return stats


def mark_marketo_deleted(con: duckdb.DuckDBPyConnection, ids: Iterable[int]) -> int:
    ids = [int(i) for i in ids]
    if not ids:
        return 0
    seq = next_seq(con)
    res = con.execute("""UPDATE m_person SET deleted = true, pending_seq = ?, seen_at = ?
                         WHERE id IN (SELECT unnest(?::BIGINT[])) AND NOT deleted""", [seq, utcnow(), ids]).fetchone()
    known = {r[0] for r in con.execute("SELECT id FROM m_person WHERE id IN (SELECT unnest(?::BIGINT[]))",
                                       [ids]).fetchall()}
    # A person we never mirrored may still be linked (created by us): keep a tombstone row for it.
    for i in set(ids) - known:
        con.execute("INSERT INTO m_person (id, deleted, seen_at, pending_seq) VALUES (?, true, ?, ?)",
                    [i, utcnow(), seq])
    return (int(res[0]) if res else 0) + len(set(ids) - known)


# ---- Marketo merges ---------------------------------------------------------------------------------------

# "Merge Leads" (activity type 32 in ``GET /rest/v1/activities/types.json``; Adobe Marketo Engage developer
# docs, REST API > Activities): logged on the winner (``leadId``), its "Merge ids" attribute lists the losers.
MERGE_LEADS_TYPE = 32
DELETE_LEAD_TYPE = 37  # "Delete Lead", what deletedleads.json returns (domain reference section 3.5)
# Which Dynamics record keeps a merged person when several were linked to its persons: a contact before a
# lead (the native sync prefers contacts: a lead's person becomes its contact's on qualification; with a
# native CRM sync on, practitioners report that a merge of a CRM lead and a CRM contact always keeps the
# contact), then the winner's own link, then the losers' links in the merge's order.
KEEPER_RANK = {"contact": 0}


@dataclass
class MarketoMerge:
    winner: int
    losers: list[int]
    date: str | None = None


def parse_merge_activity(activity: dict[str, Any]) -> MarketoMerge | None:
    """(winner, losers) from a Merge Leads activity, or None when it names no loser."""
    try:
        winner = int(activity.get("primaryAttributeValueId") or activity["leadId"])
    except (KeyError, TypeError, ValueError):
        return None
    raw = next((a.get("value") for a in activity.get("attributes") or []
                if str(a.get("name", "")).lower() == "merge ids"), None)
    losers: list[int] = []
    for part in str(raw or "").replace(";", ",").split(","):
        part = part.strip()
        if part.isdigit() and int(part) != winner and int(part) not in losers:
            losers.append(int(part))
    return MarketoMerge(winner, losers, activity.get("activityDate")) if losers else None


def apply_marketo_merges(con: duckdb.DuckDBPyConnection, config: SyncConfig, merges: list[MarketoMerge],
                         run_id: str | None) -> int:
    """Follow Marketo merges: retire each loser in the mirror (``merged_into``: not a user's delete, so no
    tombstone) and move the Dynamics links of the merged persons to the winner, one record keeping it.

    A Dynamics record is never left pointing at a removed person and never shares one with another
    record: the keeper (see KEEPER_RANK) is linked to the winner; any other record that was linked to one
    of the merged persons is retired (identity state ``merged``, pointing at the winner), so it stops
    syncing instead of writing into a person that now belongs to another record. Every change is in the
    ledger (target ``state``, op ``relink`` / ``merge`` / ``merged``, rule ``marketo_merge``). A merge read
    twice (a re-run after a crash) moves nothing the second time; the ledger notes it again.
    """
    persons = [e.name for e in config.persons]
    if not merges or not persons:
        return 0
    now = utcnow()
    moved = 0
    ledger: list[tuple] = []
    for m in merges:
        ids = [str(m.winner)] + [str(i) for i in m.losers]
        con.execute("""UPDATE m_person SET deleted = true, merged_into = ?, pending_seq = NULL, seen_at = ?
                       WHERE id IN (SELECT unnest(?::BIGINT[])) AND merged_into IS DISTINCT FROM ?""",
                    [m.winner, now, m.losers, m.winner])
        links = con.execute(f"""SELECT entity, dynamics_id, marketo_id, state FROM identity
            WHERE entity IN (SELECT unnest(?::VARCHAR[])) AND marketo_id IN (SELECT unnest(?::VARCHAR[]))""",
                            [persons, ids]).fetchall()
        active = [r for r in links if r[3] == "active"]
        active.sort(key=lambda r: (KEEPER_RANK.get(r[0], 1), ids.index(r[2]), r[1]))
        losers_text = ",".join(str(i) for i in m.losers)
        for n, (entity, did, mid, state) in enumerate(active):
            if n == 0:
                if mid != str(m.winner):
                    con.execute("""UPDATE identity SET marketo_id = ?, how = 'marketo_merge', linked_at = ?
                                   WHERE entity = ? AND dynamics_id = ?""", [str(m.winner), now, entity, did])
                    _keep_opt_outs(con, config, entity, did, m.winner)
                # relink: the record moves from a loser to the winner; merge: it kept the winner, losers folded in
                ledger.append((entity, did, str(m.winner), "relink" if mid != str(m.winner) else "merge",
                               "marketo_id", mid if mid != str(m.winner) else losers_text, str(m.winner),
                               "marketo_merge"))
                _mark_pending(con, entity, did)
            else:
                con.execute("""UPDATE identity SET marketo_id = ?, state = 'merged', linked_at = ?
                               WHERE entity = ? AND dynamics_id = ?""", [str(m.winner), now, entity, did])
                ledger.append((entity, did, str(m.winner), "merged", "marketo_id", mid, str(m.winner),
                               "marketo_merge"))
            moved += 1
        # Records no longer synced (converted, tombstoned, ...) still point at a live person.
        con.execute("""UPDATE identity SET marketo_id = ? WHERE state <> 'active'
                       AND entity IN (SELECT unnest(?::VARCHAR[])) AND marketo_id IN (SELECT unnest(?::VARCHAR[]))""",
                    [str(m.winner), persons, [str(i) for i in m.losers]])
        # The winner's values (and the Dynamics id Marketo may have copied onto it) are planned again.
        con.execute("UPDATE m_person SET pending_seq = ? WHERE id = ?", [next_seq(con), m.winner])
    if ledger:
        con.executemany("""INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                               value_before, value_after, rule)
                           VALUES (?, ?, ?, ?, ?, 'state', ?, ?, ?, ?, ?)""",
                        [[run_id, now, *row] for row in ledger])
    return moved


# Consent fields (domain reference section 1.19): an opt-out both sides had agreed on survives a merge.
CONSENT_FIELDS = ("unsubscribed", "doNotEmail", "doNotCall", "doNotFax", "doNotSendMarketingMaterial")


def _keep_opt_outs(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: str, did: str, winner: int) -> None:
    """A record that moves to a merge winner keeps its agreed opt-outs: where its base says opted out and the
    winner says opted in, the base takes the winner's value, so the plan sees the record's opt-out as the
    change and writes it to the winner, instead of reading the winner's opt-in as a Marketo change that
    would reverse the record's opt-out in Dynamics. (Marketo keeps the winner's non-empty values; a merge is
    not the person opting in.)"""
    e = config.by_name.get(entity)
    if e is None:
        return
    fields = [f.marketo for f in e.all_fields if f.marketo in CONSENT_FIELDS and f.transform == "boolean"]
    b = qi(f"b_{entity}")
    for f in fields:
        col = fcol(f)
        con.execute(f"""UPDATE {b} SET {col} = m.{col} FROM m_person m
                        WHERE {b}.dynamics_id = ? AND m.id = ? AND {b}.{col} = 'true'
                          AND m.{col} IS DISTINCT FROM 'true'""", [did, winner])


def _mark_pending(con: duckdb.DuckDBPyConnection, entity: str, dynamics_id: str) -> None:
    con.execute(f"UPDATE {qi('d_' + entity)} SET pending_seq = ? WHERE id = ?", [next_seq(con), dynamics_id])
