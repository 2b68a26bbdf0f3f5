"""Back-fill: re-evaluate mapped fields for every linked record of one entity (Marketo's "Quick Sync").

Marketo's native sync back-fills a newly selected field for every synced record, from Dynamics and
nulls included, optionally only for records created or updated in a date range ("Advanced Sync"),
while normal syncing goes on (domain.md 1.10, [A-QS]: Experience League, "Use Quick Sync with Microsoft
Dynamics for a New Custom Field"). Here a back-fill is one run of the ``resync`` job:

1. **Re-read the source column(s).** The mirrors hold a newly mapped column only for records that changed
   since it was mapped, so the back-fill reads it again: one Dataverse query of the table with ``$select``
   of the key, version, modified time and the fields (``$filter`` on the modified time with ``since``),
   then the Marketo values of the linked records (persons by id, objects by their external key; 300 per
   call). Reads go to temporary tables; nothing is marked pending, so incremental syncs see no change.
2. **Plan the difference only.** Per record and field: values already equal on both sides cost no call
   (the base moves to the agreed value); a one-way field takes its source's value, nulls included
   (Quick Sync semantics); a two-way field goes through the three-way merge against the base, which for
   a field never synced is empty: a blank never overwrites a value, and two different values are a
   conflict resolved by the field's policy; consent fields (``opt_out_sticky``) never turn an opt-out into
   an opt-in the side did not make itself.
3. **Write through the ordinary load steps** (batches of 300 to Marketo, ``If-Match`` PATCHes in
   ``$batch`` to Dynamics, ledger rows with rule ``resync:...``, base advanced only for successful writes,
   failures kept and retried by the incremental sync).

API cost: reads ``ceil(rows/5000)`` Dataverse pages plus ``ceil(linked/300)`` Marketo reads; writes
``ceil(differing/300)`` Marketo calls (persons: plus the push's re-read of the same persons) and
``ceil(differing/100)`` Dataverse ``$batch`` calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import STICKY, ConfigError, Entity, FieldMap, SyncConfig
from sync_pipeline.engine import mapping, normalize
from sync_pipeline.engine.extract import dynamics as extract
from sync_pipeline.engine.extract.marketo import text_value
from sync_pipeline.engine.plan.fields import STICKY_OUTCOME, one_way_sticky, policy_resolution
from sync_pipeline.engine.plan.summary import PLAN_INSERT
from sync_pipeline.engine.push.dynamics import apply_to_dynamics
from sync_pipeline.engine.push.marketo import apply_to_marketo
from sync_pipeline.engine.push.payloads import object_path
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import fcol, get_cursor, one_row, qi, sql_text

log = logging.getLogger(__name__)


@dataclass
class ResyncStats:
    entity: str
    fields: list[str]
    since: str | None = None
    dry_run: bool = False
    read_rows: int = 0
    in_scope: int = 0
    differing: int = 0  # records with at least one field to write
    planned: dict[str, int] = field(default_factory=dict)  # "<target>:<op>" -> field rows
    written: dict[str, int] = field(default_factory=dict)  # target -> records written
    failed: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # system -> API calls made by the back-fill

    def as_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "entity": self.entity,
            "fields": ", ".join(self.fields),
            "since": self.since or "-",
            "dry_run": self.dry_run,
            "rows_read": self.read_rows,
            "records_in_scope": self.in_scope,
            "records_differing": self.differing,
        }
        out.update({f"planned/{k}": v for k, v in sorted(self.planned.items())})
        out.update({f"written/{k}": v for k, v in sorted(self.written.items())})
        out.update({f"failed/{k}": v for k, v in sorted(self.failed.items())})
        out.update({f"api_calls/{k}": v for k, v in sorted(self.calls.items())})
        return out


def needs_initial_copy(con: duckdb.DuckDBPyConnection, entity: Entity) -> bool:
    """An entity never copied (added to the mapping after the first sync): its back-fill is its initial copy."""
    from sync_pipeline.engine.extract.dynamics import delta_cursor

    if entity.is_derived:
        return False
    linked = one_row(con, "SELECT count(*) FROM identity WHERE entity = ?", [entity.name])[0]
    based = one_row(con, f"SELECT count(*) FROM {qi('b_' + entity.name)}")[0]
    return not linked and not based and get_cursor(con, delta_cursor(entity)) is None


def resolve_fields(entity: Entity, fields: list[str] | None) -> list[str]:
    """The fields to back-fill: the given ones (each must be mapped), or every synced field."""
    if entity.is_derived:
        raise ConfigError(
            f"entity {entity.name!r} is derived from {entity.derived_from!r} and has no fields of "
            f"its own: resync {entity.derived_from!r}"
        )
    mapped = {f.marketo: f for f in entity.all_fields}
    if not fields:
        return [f.marketo for f in entity.all_fields if entity.field_direction(f) != "none"]
    unknown = [f for f in fields if f not in mapped]
    if unknown:
        raise ConfigError(
            f"entity {entity.name!r}: field(s) {', '.join(map(repr, unknown))} not mapped "
            f"(mapped: {', '.join(mapped)})"
        )
    return list(dict.fromkeys(fields))


def _calls(client: Any) -> int:
    calls = getattr(client, "calls", None)
    return int(sum(calls.values())) if calls else 0


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--since {value!r}: expected a date or date-time (YYYY-MM-DD[THH:MM[:SS]][Z])"
        ) from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


# ---- 1. re-read -----------------------------------------------------------------------------------------


def _read_dynamics(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    maps: list[FieldMap],
    client: Any,
    since: datetime | None,
    tables: dict[str, str],
) -> int:
    assert entity.dynamics is not None
    pk, mod = extract.primary_key(entity), entity.dynamics.modified_column
    if since is not None and not mod:
        raise ConfigError(f"entity {entity.name!r} has no modified-time column: --since cannot restrict it")
    select = [pk, "versionnumber"] + ([mod] if mod else []) + [extract.wire_name(f) for f in maps]
    schema: dict[str, pa.DataType] = {
        pk: pa.string(),
        "versionnumber": pa.int64(),
        "@odata.etag": pa.string(),
    }
    if mod:
        schema[mod] = pa.string()
    for f in maps:
        schema[extract.wire_name(f)] = extract.arrow_type(f)
        if f.transform in ("lookup", "owner", "customer_account"):
            schema[extract.wire_name(f) + extract.LOOKUP_TYPE] = pa.string()
    cols = "".join(f", {fcol(f.marketo)} VARCHAR" for f in maps)
    con.execute(f"CREATE OR REPLACE TEMP TABLE rs_d (did VARCHAR, etag VARCHAR, modified_on VARCHAR {cols})")
    exprs = "".join(f", {extract.dynamics_value_expr(entity, f, tables)}" for f in maps)
    modcol = qi(mod) if mod else "NULL"
    flt = f"{mod} ge {_iso(since)}" if since is not None else None
    rows = 0
    for page in client.iter_pages(
        entity.dynamics.entity_set, list(dict.fromkeys(select)), filter=flt, annotations=True
    ):
        if not page:
            continue
        rows += len(page)
        rs_page = extract.coerce_page(page, pa.schema(list(schema.items())))  # noqa: F841 - used in the SQL
        con.execute(f"""INSERT INTO rs_d SELECT lower({qi(pk)}), "@odata.etag", CAST({modcol} AS VARCHAR) {exprs}
                        FROM rs_page""")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE rs_d AS SELECT DISTINCT ON (did) * FROM rs_d"
    )  # a row paged twice
    return rows


def _read_marketo(con: duckdb.DuckDBPyConnection, entity: Entity, maps: list[FieldMap], client: Any) -> None:
    """The other side's current values of the records in scope (``rs_m``: did, updated_at, f_*)."""
    names = [f.marketo for f in maps]
    if entity.is_person:
        ids = [
            int(r[0])
            for r in con.execute(
                "SELECT DISTINCT mid FROM rs_scope WHERE TRY_CAST(mid AS BIGINT) IS NOT NULL ORDER BY 1"
            ).fetchall()
        ]
        rows = client.get_leads("id", ids, ["id", "updatedAt", *names]) if ids else []
        key = "id"
    else:
        key = entity.marketo.key
        dids = [r[0] for r in con.execute("SELECT did FROM rs_scope ORDER BY 1").fetchall()]
        rows = client.query_objects(object_path(entity), key, dids, [key, *names]) if dids else []
    table = pa.table(
        {
            n: pa.array([text_value(r.get(n)) for r in rows], type=pa.string())
            for n in [key, "updatedAt", *names]
        }
    )
    exprs = "".join(f", {normalize.marketo_expr(f, qi(f.marketo))}" for f in maps)
    cols = "".join(f", {fcol(n)} VARCHAR" for n in names)
    con.execute(f"CREATE OR REPLACE TEMP TABLE rs_m (mkey VARCHAR, updated_at VARCHAR {cols})")
    con.register("rs_mpage", table)
    try:
        keyexpr = qi(key) if entity.is_person else f"lower({qi(key)})"
        con.execute(f"""INSERT INTO rs_m SELECT {keyexpr}, "updatedAt" {exprs} FROM rs_mpage
                        WHERE {qi(key)} IS NOT NULL
                        QUALIFY row_number() OVER (PARTITION BY {keyexpr} ORDER BY "updatedAt" DESC) = 1""")
    finally:
        con.unregister("rs_mpage")


# ---- 2. plan ----------------------------------------------------------------------------------------------


def _scope(con: duckdb.DuckDBPyConnection, entity: Entity) -> int:
    """Linked, live, not filtered-out records that the re-read returned (``since`` already applied)."""
    d = qi(f"d_{entity.name}")
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE rs_scope AS
        SELECT d.id AS did, i.marketo_id AS mid, d.customer_contact FROM identity i
        JOIN {d} d ON d.id = i.dynamics_id JOIN rs_d r ON r.did = d.id
        WHERE i.entity = ? AND i.state = 'active' AND i.marketo_id IS NOT NULL
          AND NOT d.deleted AND d.sync_flag IS DISTINCT FROM false""",
        [entity.name],
    )
    return int(one_row(con, "SELECT count(*) FROM rs_scope")[0])


def _joined(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, maps: list[FieldMap]) -> None:
    b = qi(f"b_{entity.name}")
    sel = []
    contact_join = ""
    for f in maps:
        c = fcol(f.marketo)
        dval = f"r.{c}"
        if (
            f.transform == "customer_account"
            and "contact" in config.by_name
            and "externalCompanyId" in {g.marketo for g in config.entity("contact").all_fields}
        ):
            dval = f"COALESCE(r.{c}, cc.f_externalCompanyId)"  # a contact customer: its account (as the plan does)
            contact_join = "LEFT JOIN d_contact cc ON cc.id = s.customer_contact"
        sel.append(
            f"{dval} AS {qi('d_' + f.marketo)}, m.{c} AS {qi('m_' + f.marketo)}, "
            f"b.{c} AS {qi('b_' + f.marketo)}"
        )
    mjoin = "CAST(s.mid AS VARCHAR) = m.mkey" if entity.is_person else "s.did = m.mkey"
    # Records the other side no longer has are left to the incremental sync (tombstones, deletes).
    con.execute(f"""CREATE OR REPLACE TEMP TABLE rs_j AS
        SELECT s.did, s.mid, r.etag, r.modified_on AS d_modified, m.updated_at AS m_updated, {", ".join(sel)}
        FROM rs_scope s JOIN rs_d r ON r.did = s.did JOIN rs_m m ON {mjoin}
        LEFT JOIN {b} b ON b.dynamics_id = s.did {contact_join}""")


def _outcome_sql(entity: Entity, f: FieldMap) -> str:
    """'marketo' | 'dynamics' | 'base' | 'hold' | NULL for one field of a record in scope. Consent fields
    (policy ``opt_out_sticky``) follow the same rule as the incremental plan (engine/plan/fields.py): an opt-in
    is written only where its side itself changed from out to in since the last sync."""
    direction, policy = entity.field_direction(f), entity.field_policy(f)
    if direction == "none":
        return "NULL"
    agree = "WHEN same AND dc THEN 'base' WHEN same THEN NULL"
    if not entity.is_person or direction == "to_marketo":
        out = f"CASE {agree} ELSE 'marketo' END"
        return one_way_sticky(out, "marketo") if policy == STICKY else out
    if direction == "to_dynamics":
        out = f"CASE {agree} ELSE 'dynamics' END"
        return one_way_sticky(out, "dynamics") if policy == STICKY else out
    if policy == STICKY:
        return STICKY_OUTCOME
    resolve = policy_resolution(entity, policy, field_times=False)
    # With no base (a field never synced) a side holding a value "changed" and a blank one did not: the
    # value flows, a blank never overwrites it; two different values are a conflict.
    return f"""CASE {agree}
                    WHEN dc AND NOT mc THEN 'marketo'
                    WHEN mc AND NOT dc THEN 'dynamics'
                    ELSE {resolve} END"""


def _rule_sql(entity: Entity, f: FieldMap) -> str:
    direction, policy = entity.field_direction(f), entity.field_policy(f)
    if not entity.is_person or direction != "two_way":
        return f"'resync:{direction}'"
    return (
        f"CASE WHEN dc AND mc AND outcome <> 'base' THEN 'resync:conflict:{policy}' ELSE 'resync:two_way' END"
    )


def _plan_rows(con: duckdb.DuckDBPyConnection, entity: Entity, maps: list[FieldMap], run_id: str) -> None:
    parts = []
    for f in maps:
        d, m, b = (qi(p + f.marketo) for p in ("d_", "m_", "b_"))
        cd, cm, cb = (normalize.compare_expr(f, x) for x in (d, m, b))
        inner = f"""SELECT did, mid, etag, d_modified, m_updated, {d} AS dv, {m} AS mv, {b} AS bv,
                           ({cd}) IS DISTINCT FROM ({cb}) AS dc, ({cm}) IS DISTINCT FROM ({cb}) AS mc,
                           ({cd}) IS NOT DISTINCT FROM ({cm}) AS same,
                           starts_with({d}, {sql_text(normalize.INVALID)}) AS invalid
                    FROM rs_j"""
        scored = f"""SELECT *, CASE WHEN invalid THEN 'reject' ELSE {_outcome_sql(entity, f)} END AS outcome
                     FROM ({inner})"""
        parts.append(f"""SELECT did, mid, etag, {sql_text(f.marketo)} AS field, dv, mv, bv, outcome,
                                CASE WHEN outcome = 'reject' THEN 'invalid value' ELSE {_rule_sql(entity, f)} END
                                AS rule
                         FROM ({scored}) WHERE outcome IS NOT NULL""")
    con.execute(f"CREATE OR REPLACE TEMP TABLE rs_fx AS {' UNION ALL '.join(parts)}")
    con.execute(
        """CREATE OR REPLACE TEMP TABLE rs_plan AS SELECT ? AS run_id, ? AS entity, did AS dynamics_id,
            mid AS marketo_id,
            CASE outcome WHEN 'reject' THEN 'marketo' ELSE outcome END AS target,
            CASE outcome WHEN 'base' THEN 'agree' WHEN 'hold' THEN 'hold' WHEN 'reject' THEN 'reject'
                         ELSE 'update' END AS op,
            field,
            CASE outcome WHEN 'marketo' THEN mv WHEN 'dynamics' THEN dv WHEN 'hold' THEN mv END AS old_value,
            CASE outcome WHEN 'dynamics' THEN mv ELSE dv END AS new_value,
            bv AS base_value, rule, etag
        FROM rs_fx""",
        [run_id, entity.name],
    )


# ---- 3. run -----------------------------------------------------------------------------------------------


PLAN_COLUMNS = ("entity", "dynamics_id", "marketo_id", "target", "op", "field", "before", "after", "rule")


def resync(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity_name: str,
    fields: list[str] | None,
    since: datetime | None,
    dynamics: Any,
    marketo: Any,
    run_id: str,
    now: datetime,
    dry_run: bool = False,
) -> tuple[ResyncStats, list[tuple]]:
    """Back-fill ``fields`` (default: every synced field) of ``entity_name``; returns the stats and, for a
    dry run, the field writes it would make (nothing is written and nothing in the store changes)."""
    entity = config.entity(entity_name)
    names = resolve_fields(entity, fields)
    if needs_initial_copy(con, entity):
        raise ConfigError(
            f"entity {entity.name!r} has not been copied yet: its back-fill is its initial copy "
            f"(sync-pipeline resync --entity {entity.name} launches it)"
        )
    maps = [f for f in entity.all_fields if f.marketo in names]
    stats = ResyncStats(entity.name, names, _iso(since) if since else None, dry_run)
    d0, m0 = _calls(dynamics), _calls(marketo)
    stats.read_rows = _read_dynamics(con, entity, maps, dynamics, since, extract.target_tables(config))
    stats.in_scope = _scope(con, entity)
    _read_marketo(con, entity, maps, marketo)
    _joined(con, config, entity, maps)
    _plan_rows(con, entity, maps, run_id)
    for target, op, n in con.execute("SELECT target, op, count(*) FROM rs_plan GROUP BY ALL").fetchall():
        stats.planned[f"{target}:{op}"] = int(n)
    stats.differing = int(
        one_row(con, "SELECT count(DISTINCT dynamics_id) FROM rs_plan WHERE op = 'update'")[0]
    )
    preview: list[tuple] = []
    if dry_run:
        preview = con.execute("""SELECT entity, dynamics_id, marketo_id, target, op, field, old_value, new_value, rule
                                 FROM rs_plan WHERE op <> 'agree' ORDER BY target, op, dynamics_id, field""").fetchall()
    else:
        _write(con, config, entity, maps, dynamics, marketo, run_id, now, stats)
        mapping.mark_backfilled(con, entity.name, names, run_id, now)
    for t in ("rs_d", "rs_m", "rs_scope", "rs_j", "rs_fx", "rs_plan"):
        con.execute(f"DROP TABLE IF EXISTS {t}")
    stats.calls = {"dynamics": _calls(dynamics) - d0, "marketo": _calls(marketo) - m0}
    log.info("resync %s %s: %s", entity.name, names, stats.as_metadata())
    return stats, preview


def _write(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    maps: list[FieldMap],
    dynamics: Any,
    marketo: Any,
    run_id: str,
    now: datetime,
    stats: ResyncStats,
) -> None:
    e, d = entity.name, qi(f"d_{entity.name}")
    # The mirrors now hold what was read (fresher than before; no record becomes pending). Written values
    # replace them again when the writes succeed.
    sets = ", ".join(f"{fcol(f.marketo)} = r.{fcol(f.marketo)}" for f in maps)
    con.execute(
        f"UPDATE {d} SET {sets} FROM rs_d r WHERE {d}.id = r.did AND r.did IN (SELECT did FROM rs_scope)"
    )
    if entity.is_person:
        sets = ", ".join(f"{fcol(f.marketo)} = r.{fcol(f.marketo)}" for f in maps)
        con.execute(f"UPDATE m_person SET {sets} FROM rs_m r WHERE CAST(m_person.id AS VARCHAR) = r.mkey")
    # The load steps apply the stored plan of the entity: this back-fill's, restricted to its fields. A
    # failure an incremental write left behind stays (its retry re-plans that record).
    ledger.keep_failures(con, e)
    con.execute("DELETE FROM plan WHERE entity = ?", [e])
    con.execute("DELETE FROM plan_work WHERE entity = ?", [e])
    con.execute(
        f"{PLAN_INSERT} SELECT run_id, entity, dynamics_id, marketo_id, target, op, field, old_value, new_value, base_value, rule, etag FROM rs_plan"
    )
    narrowed = mapping.restrict(entity, [f.marketo for f in maps], keep_rules=False)
    try:
        ms = apply_to_marketo(con, config, narrowed, marketo, run_id, now)
        stats.written["marketo"], stats.failed["marketo"] = ms.ok, ms.failed
        if entity.is_person:
            ds = apply_to_dynamics(con, config, narrowed, dynamics, marketo, run_id, now)
            stats.written["dynamics"], stats.failed["dynamics"] = ds.ok, ds.failed
    finally:
        ledger.restore_failures(con)
        con.execute("DELETE FROM plan WHERE entity = ? AND run_id = ?", [e, run_id])
