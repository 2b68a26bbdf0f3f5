"""After a sync: read both systems through the clients and list every difference the rules do not explain.

Both sides are read over HTTP (``DynamicsClient.iter_pages``; ``MarketoClient.get_leads`` and
``query_objects`` by the ids of the identity map) and canonicalised by the same ingest functions and
SQL expressions the sync uses, in a scratch in-memory DuckDB. The state store is only read (identity
map, bases, failures, conflicts), never written.

Not differences, because the rules say so: records excluded by the sync filter, tombstoned, converted
or retired links, persons flagged ``dynamicsIsDeleted``, fields held (failures naming fields, records
held as rejected, conflicts held for review), fields a rollback left different on purpose (each system
still holds its value of the split base), and one-way fields the target side changed itself (a
field the target changed while the source kept the base value does not flow back). Marketo-only
fields are not mapped, so they are never compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import Entity, FieldMap, SyncConfig
from sync_pipeline.engine import normalize, orgmeta
from sync_pipeline.engine.extract import dynamics as dynamics_extract
from sync_pipeline.engine.extract import marketo as marketo_extract
from sync_pipeline.engine.push.payloads import object_path
from sync_pipeline.engine.store import state
from sync_pipeline.engine.store.state import fcol, qi, sql_text

RECORD = "(record)"  # the field of a Difference about a whole record missing on one side
BATCH = 300  # Marketo's maximum filter values per read

_STATE_TABLES = ("identity", "failures", "conflicts")


@dataclass(frozen=True)
class Difference:
    entity: str
    dynamics_id: str
    marketo_id: str | None
    field: str
    dynamics_value: str | None
    marketo_value: str | None


def compare(
    config: SyncConfig, dynamics_client: Any, marketo_client: Any, state_path: str | Path
) -> list[Difference]:
    con = duckdb.connect()  # scratch: both systems' current values, canonical
    try:
        _copy_state(con, config, state_path)
        # Option labels from the org, filter column only where the table has it: what the sync's runs use.
        config = orgmeta.runtime_config(
            config,
            orgmeta.read_metadata(dynamics_client, orgmeta.mapped_tables(config), config.sync.language),
        )
        state.ensure_schema(con, config)
        for e in config.entities:
            if not e.is_derived:
                _read_dynamics(con, e, dynamics_client, dynamics_extract.target_tables(config))
        _read_persons(con, config, marketo_client)
        diffs: list[Difference] = []
        for e in config.entities:
            if e.is_derived:
                diffs += _compare_roles(con, config, e, marketo_client)
                continue
            if not e.is_person:
                _read_objects(con, e, marketo_client)
            diffs += _compare_linked(con, config, e)
            diffs += _missing_in_marketo(con, e)
        return sorted(diffs, key=lambda d: (d.entity, d.dynamics_id, d.field))
    finally:
        con.close()


# ---- reading ---------------------------------------------------------------------------------------------


def _copy_state(con: duckdb.DuckDBPyConnection, config: SyncConfig, state_path: str | Path) -> None:
    """Copy what the rules need from the state store (read-only, short), so no lock is held while reading APIs."""
    if not Path(state_path).exists():
        raise FileNotFoundError(f"state store {state_path} does not exist: run a sync first")
    with state.connect(state_path, read_only=True) as st:
        have = {r[0] for r in st.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        wanted = [*_STATE_TABLES, *(f"b_{e.name}" for e in config.entities)]
        missing = [t for t in wanted if t not in have]
        if missing:
            raise ValueError(
                f"state store {state_path} has no table(s) {', '.join(missing)}: "
                "was it synced with this configuration?"
            )
        for t in wanted:
            data = st.execute(f"SELECT * FROM {qi(t)}").fetch_arrow_table()  # noqa: F841 - read by name below
            con.execute(f"CREATE TABLE {qi('s_' + t)} AS SELECT * FROM data")
        # Split bases (a rollback left a person field different on the two systems, on purpose).
        split = (
            st.execute(
                "SELECT entity, dynamics_id, field, d_value, m_value FROM b__split"
            ).fetch_arrow_table()
            if "b__split" in have
            else None
        )
        con.execute(
            "CREATE TABLE s_split AS SELECT * FROM split"
            if split is not None
            else "CREATE TABLE s_split (entity VARCHAR, dynamics_id VARCHAR, field VARCHAR, d_value VARCHAR, "
            "m_value VARCHAR)"
        )


def _read_dynamics(
    con: duckdb.DuckDBPyConnection, entity: Entity, client: Any, tables: dict[str, str] | None = None
) -> None:
    assert entity.dynamics is not None
    for page in client.iter_pages(
        entity.dynamics.entity_set, dynamics_extract.dynamics_select(entity), annotations=True
    ):
        dynamics_extract.ingest_dynamics_page(con, entity, page, "verify", tables)


def _linked_ids(con: duckdb.DuckDBPyConnection, entities: Iterable[str]) -> list[str]:
    names = list(entities)
    if not names:
        return []
    return [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT marketo_id FROM s_identity WHERE state = 'active' AND entity IN (SELECT unnest(?)) "
            "AND marketo_id IS NOT NULL ORDER BY 1",
            [names],
        ).fetchall()
    ]


def _chunks(items: list[Any], n: int = BATCH) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _read_persons(con: duckdb.DuckDBPyConnection, config: SyncConfig, client: Any) -> None:
    ids = [i for i in _linked_ids(con, (e.name for e in config.persons)) if i.isdigit()]
    fields = marketo_extract.marketo_person_fields(config)
    for chunk in _chunks(ids):
        marketo_extract.ingest_marketo_persons(con, config, client.get_leads("id", chunk, fields))


def _read_objects(con: duckdb.DuckDBPyConnection, entity: Entity, client: Any) -> None:
    """Marketo objects of one entity by their Dynamics-id key, canonical, into ``o_<entity>``."""
    key = entity.marketo.key
    maps = [f for f in entity.all_fields if f.marketo != key]
    names = [key, *(f.marketo for f in maps)]
    cols = ", ".join(f"{normalize.marketo_expr(f, qi(f.marketo))} AS {fcol(f.marketo)}" for f in maps)
    table = qi(f"o_{entity.name}")
    con.execute(
        f"CREATE OR REPLACE TABLE {table} (id VARCHAR PRIMARY KEY"
        + "".join(f", {fcol(f.marketo)} VARCHAR" for f in maps)
        + ")"
    )
    dids = [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT dynamics_id FROM s_identity WHERE entity = ? AND state = 'active' ORDER BY 1",
            [entity.name],
        ).fetchall()
    ]
    for chunk in _chunks(dids):
        rows = client.query_objects(object_path(entity), key, chunk, fields=names)
        if not rows:
            continue
        columns = {
            n: pa.array([marketo_extract.text_value(r.get(n)) for r in rows], type=pa.string()) for n in names
        }
        page = pa.table(columns)  # noqa: F841 (DuckDB reads it by name)
        con.execute(
            f"INSERT OR REPLACE INTO {table} SELECT lower({qi(key)}){', ' + cols if cols else ''} FROM page"
        )


# ---- comparing --------------------------------------------------------------------------------------------


def _dynamics_value(config: SyncConfig, f: FieldMap) -> str:
    if f.transform == "customer_account" and "contact" in config.by_name:
        return (
            f"COALESCE(d.{fcol(f.marketo)}, cc.{fcol('externalCompanyId')})"
            if "externalCompanyId" in {g.marketo for g in config.entity("contact").all_fields}
            else f"d.{fcol(f.marketo)}"
        )
    return f"d.{fcol(f.marketo)}"


def _differs_sql(entity: Entity, f: FieldMap) -> str:
    """True when the two canonical values (dv, mv) differ in a way the field's rules do not explain."""
    dv, mv, bv = (normalize.compare_expr(f, x) for x in ("dv", "mv", "bv"))
    differ = f"({dv}) IS DISTINCT FROM ({mv})"
    direction = entity.field_direction(f)
    if (
        direction == "to_marketo"
    ):  # Marketo changed it itself while Dynamics kept the base: does not flow back
        return f"{differ} AND NOT (({mv}) IS DISTINCT FROM ({bv}) AND ({dv}) IS NOT DISTINCT FROM ({bv}))"
    if direction == "to_dynamics":
        return f"{differ} AND NOT (({dv}) IS DISTINCT FROM ({bv}) AND ({mv}) IS NOT DISTINCT FROM ({bv}))"
    return differ


def _compare_linked(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity) -> list[Difference]:
    e, d, b = entity.name, qi(f"d_{entity.name}"), qi(f"s_b_{entity.name}")
    if entity.is_person:
        m_join = "LEFT JOIN m_person m ON CAST(m.id AS VARCHAR) = i.marketo_id"
        m_missing, m_id = "m.id IS NULL OR m.deleted", "i.marketo_id"
    else:
        m_join = f"LEFT JOIN {qi('o_' + e)} m ON m.id = i.dynamics_id"
        m_missing, m_id = "m.id IS NULL", "i.marketo_id"
    contact_join = (
        "LEFT JOIN d_contact cc ON cc.id = d.customer_contact"
        if any(f.transform == "customer_account" for f in entity.all_fields) and "contact" in config.by_name
        else ""
    )
    held_record = (
        "EXISTS (SELECT 1 FROM s_failures x WHERE x.entity = i.entity AND x.dynamics_id = i.dynamics_id "
        "AND x.held AND x.field IS NULL)"
    )
    # The linked records in scope: active link, present in Dynamics and Marketo, not filtered, flagged or held.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE vj AS
        SELECT i.dynamics_id AS did, {m_id} AS mid, d.id IS NULL AS d_missing, {m_missing} AS m_missing,
               {
        "m.f_dynamicsId AS m_dynamicsId, m.f_dynamicsType AS m_dynamicsType, " if entity.is_person else ""
    }
               {
        ", ".join(f"m.{fcol(f.marketo)} AS {qi('m_' + f.marketo)}" for f in _compared(entity))
        if _compared(entity)
        else "NULL AS m_none"
    },
               {
        ", ".join(f"{_dynamics_value(config, f)} AS {qi('dv_' + f.marketo)}" for f in _compared(entity))
        if _compared(entity)
        else "NULL AS dv_none"
    },
               {
        ", ".join(f"b.{fcol(f.marketo)} AS {qi('b_' + f.marketo)}" for f in _compared(entity))
        if _compared(entity)
        else "NULL AS b_none"
    }
        FROM s_identity i LEFT JOIN {d} d ON d.id = i.dynamics_id {m_join} {contact_join}
        LEFT JOIN {b} b ON b.dynamics_id = i.dynamics_id
        WHERE i.entity = {sql_text(e)} AND i.state = 'active' AND NOT {held_record}
          AND (d.id IS NULL OR d.sync_flag IS DISTINCT FROM false)
          {
        "AND (m.id IS NULL OR m.f_dynamicsIsDeleted IS DISTINCT FROM 'true')" if entity.is_person else ""
    }""")
    out = [
        Difference(e, did, mid, RECORD, None if dm else did, None if mm else mid)
        for did, mid, dm, mm in con.execute(
            "SELECT did, mid, d_missing, m_missing FROM vj WHERE d_missing OR m_missing"
        ).fetchall()
    ]
    parts = []
    for f in _compared(entity):
        cond = _differs_sql(entity, f)
        parts.append(f"""SELECT did, mid, {sql_text(f.marketo)} AS field, dv, mv FROM (
            SELECT did, mid, {qi("dv_" + f.marketo)} AS dv, {qi("m_" + f.marketo)} AS mv, {qi("b_" + f.marketo)} AS bv
            FROM vj WHERE NOT d_missing AND NOT m_missing) WHERE {cond}""")
    if entity.is_person:
        typ = sql_text(entity.marketo.type_value or entity.name.title())
        parts.append(
            "SELECT did, mid, 'dynamicsId', did, m_dynamicsId FROM vj WHERE NOT d_missing AND NOT m_missing "
            "AND m_dynamicsId IS DISTINCT FROM lower(did)"
        )
        parts.append(
            f"SELECT did, mid, 'dynamicsType', {typ}, m_dynamicsType FROM vj WHERE NOT d_missing "
            f"AND NOT m_missing AND m_dynamicsType IS DISTINCT FROM {typ}"
        )
    if parts:
        rows = con.execute(f"""SELECT * FROM ({" UNION ALL ".join(parts)}) x
            WHERE NOT EXISTS (SELECT 1 FROM s_conflicts c WHERE c.entity = {sql_text(e)} AND c.dynamics_id = x.did
                              AND c.field = x.field)
              AND NOT EXISTS (SELECT 1 FROM s_split s WHERE s.entity = {sql_text(e)} AND s.dynamics_id = x.did
                              AND s.field = x.field AND s.d_value IS NOT DISTINCT FROM x.dv
                              AND s.m_value IS NOT DISTINCT FROM x.mv)
              AND NOT EXISTS (SELECT 1 FROM s_failures h WHERE h.entity = {sql_text(e)} AND h.dynamics_id = x.did
                              AND h.field IS NOT NULL AND list_contains(string_split(h.field, ','), x.field))
        """).fetchall()
        out += [Difference(e, did, mid, field, dv, mv) for did, mid, field, dv, mv in rows]
    return out


def _compared(entity: Entity) -> list[FieldMap]:
    key = entity.marketo.key if not entity.is_person else None
    return [f for f in entity.all_fields if entity.field_direction(f) != "none" and f.marketo != key]


def _missing_in_marketo(con: duckdb.DuckDBPyConnection, entity: Entity) -> list[Difference]:
    """Dynamics records in scope of the sync that have no link at all (never created in Marketo)."""
    rows = con.execute(
        f"""SELECT d.id FROM {qi("d_" + entity.name)} d
        WHERE d.sync_flag IS DISTINCT FROM false
          AND NOT EXISTS (SELECT 1 FROM s_identity i WHERE i.entity = ? AND i.dynamics_id = d.id)
          AND NOT EXISTS (SELECT 1 FROM s_failures x WHERE x.entity = ? AND x.dynamics_id = d.id AND x.held)
        ORDER BY 1""",
        [entity.name, entity.name],
    ).fetchall()
    return [Difference(entity.name, r[0], None, RECORD, r[0], None) for r in rows]


def _compare_roles(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, client: Any
) -> list[Difference]:
    """Derived contact roles: every opportunity with a linked contact customer has exactly that role."""
    assert entity.derived_from is not None
    src = qi(f"d_{entity.derived_from}")
    want = {
        did: mid
        for did, mid in con.execute(f"""SELECT o.id, ic.marketo_id FROM {src} o
        JOIN s_identity ic ON ic.entity = 'contact' AND ic.dynamics_id = o.customer_contact AND ic.state = 'active'
        WHERE o.sync_flag IS DISTINCT FROM false""").fetchall()
    }
    known = [r[0] for r in con.execute(f"SELECT dynamics_id FROM {qi('s_b_' + entity.name)}").fetchall()]
    have: dict[str, set[str]] = {}
    for chunk in _chunks(sorted(set(want) | set(known))):
        for r in client.query_objects(
            object_path(entity),
            "externalOpportunityId",
            chunk,
            fields=["externalOpportunityId", "leadId", "role"],
        ):
            if r.get("role") == entity.role_name:
                have.setdefault(str(r["externalOpportunityId"]).lower(), set()).add(str(r.get("leadId")))
    out = []
    for did in sorted(set(want) | set(have)):
        expected = {want[did]} if did in want else set()
        if have.get(did, set()) != expected:
            out.append(
                Difference(
                    entity.name,
                    did,
                    ",".join(sorted(have.get(did, set()))) or None,
                    "leadId",
                    want.get(did),
                    ",".join(sorted(have.get(did, set()))) or None,
                )
            )
    return out
