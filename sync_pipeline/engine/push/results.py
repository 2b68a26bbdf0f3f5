"""Push: record what happened. After the API calls one transaction advances the base and the mirrors for
the writes that succeeded, appends the ledger, and files failures with backoff (held after the limit);
``finish`` takes the applied records out of the work set."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.store.state import ensure_split_base, fcol, qi


@dataclass
class Result:
    did: str
    op: str
    ok: bool
    marketo_id: str | None = None
    code: str | None = None
    message: str | None = None
    new_etag: str | None = None
    new_version: int | None = None


@dataclass
class ApplyStats:
    target: str
    records: int = 0
    ok: int = 0
    failed: int = 0
    held: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # code -> records

    def as_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"records_planned": self.records, "records_written": self.ok,
                               "records_failed": self.failed, "records_held": self.held}
        out.update({f"written/{k}": v for k, v in sorted(self.by_op.items())})
        out.update({f"errors/{k}": v for k, v in sorted(self.errors.items())})
        return out


def outcomes(rows: list[tuple], payload_op: str, results: list[Any], key: Callable[[Any], str | None]
              ) -> list[Result]:
    out = []
    for row, res in zip(rows, results):
        status = getattr(res, "status", None)
        if status in ("created", "updated", "deleted"):
            out.append(Result(row[0], row[1], True, key(res) or row[2]))
        else:
            reasons = getattr(res, "reasons", None) or [{"code": "unknown", "message": f"status {status!r}"}]
            out.append(Result(row[0], row[1], False, row[2], str(reasons[0].get("code")),
                              str(reasons[0].get("message"))))
    return out


def hold_fields(con: duckdb.DuckDBPyConnection, entity: Entity, dropped: list[tuple[str, list[tuple[str, str]]]],
                 run_id: str, now: datetime) -> None:
    """Fields left out of a write are held with their reason; their base stays, so nothing is lost."""
    if not dropped:
        return
    fields = pa.table({"did": [d for d, bad in dropped for _ in bad], "field": [f for _, bad in dropped for f, _ in bad]})
    held = pa.table({"did": [d for d, _ in dropped], "fields": [",".join(f for f, _ in bad) for _, bad in dropped],
                     "message": [f"{entity.name} {d}: " + "; ".join(f"field {f}: {m}" for f, m in bad)
                                 for d, bad in dropped]})
    con.register("held_fields", fields)
    con.register("held_records", held)
    try:
        con.execute("""DELETE FROM plan WHERE entity = ? AND target = 'dynamics'
                       AND (dynamics_id, field) IN (SELECT (did, field) FROM held_fields)""", [entity.name])
        con.execute("""INSERT OR REPLACE INTO failures SELECT ?, did, 'dynamics:fields', 'update', NULL, fields,
                       'invalid_value', message, 1, ?, ?, ?, true, ? FROM held_records""",
                    [entity.name, now, now, now, run_id])
    finally:
        con.unregister("held_fields")
        con.unregister("held_records")


def record_results(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, target: str,
                    results: list[Result], run_id: str, now: datetime, stats: ApplyStats) -> None:
    if not results:
        return
    table = pa.table({
        "did": [r.did for r in results], "op": [r.op for r in results], "ok": [r.ok for r in results],
        "mid": [r.marketo_id for r in results], "code": [r.code for r in results],
        "message": [r.message for r in results]})
    con.register("res_page", table)
    try:
        con.execute("BEGIN TRANSACTION")
        con.execute("CREATE OR REPLACE TEMP TABLE res AS SELECT * FROM res_page")
        _on_success(con, config, entity, target, run_id, now)
        _on_failure(con, config, entity, target, run_id, now)
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("res_page")
    for r in results:
        if r.ok:
            stats.ok += 1
            stats.by_op[r.op] = stats.by_op.get(r.op, 0) + 1
        else:
            stats.failed += 1
            stats.errors[r.code or "?"] = stats.errors.get(r.code or "?", 0) + 1
    stats.held = int(con.execute("SELECT count(*) FROM failures WHERE entity = ? AND target = ? AND held",
                                 [entity.name, target]).fetchone()[0])


def _on_success(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, target: str, run_id: str,
                now: datetime) -> None:
    e = entity.name
    con.execute("""CREATE OR REPLACE TEMP TABLE okp AS
        SELECT p.*, r.mid AS result_mid FROM plan p JOIN res r ON r.did = p.dynamics_id AND r.op = p.op AND r.ok
        WHERE p.entity = ? AND p.target = ?""", [e, target])
    con.execute("""INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field, value_before,
                                       value_after, rule)
        SELECT ?, ?, entity, dynamics_id, COALESCE(result_mid, marketo_id), target, op, field, old_value, new_value, rule
        FROM okp""", [run_id, now])
    con.execute("DELETE FROM failures WHERE entity = ? AND target = ? AND dynamics_id IN (SELECT did FROM res WHERE ok)",
                [e, target])
    # Identity: creates link, deletes and flags retire the link.
    if entity.is_derived:
        con.execute(f"""DELETE FROM {qi('b_' + e)} WHERE dynamics_id IN
            (SELECT did FROM res WHERE ok AND op = 'delete')""")
        con.execute(f"""INSERT OR REPLACE INTO {qi('b_' + e)} (dynamics_id, synced_at, run_id, f_leadId, f_role,
                f_externalOpportunityId)
            SELECT dynamics_id, ?, ?, max(CASE WHEN field = 'leadId' THEN new_value END),
                   max(CASE WHEN field = 'role' THEN new_value END), dynamics_id
            FROM okp WHERE op = 'create' GROUP BY dynamics_id""", [now, run_id])
        return
    if target == "marketo":
        con.execute("""INSERT OR REPLACE INTO identity
            SELECT ?, did, COALESCE(mid, did), 'active', ?, 'created' FROM res WHERE ok AND op = 'create'""", [e, now])
        con.execute("""UPDATE identity SET state = 'deleted' WHERE entity = ? AND dynamics_id IN
            (SELECT did FROM res WHERE ok AND op IN ('delete', 'flag'))""", [e])
        _on_merged(con, e, now)
    else:
        con.execute("""INSERT OR REPLACE INTO identity
            SELECT ?, did, mid, 'active', ?, 'created_in_dynamics' FROM res WHERE ok AND op = 'create'""", [e, now])
        con.execute("""UPDATE m_person SET f_dynamicsId = r.did, f_dynamicsType = ? FROM res r
                       WHERE r.ok AND r.op = 'create' AND m_person.id = TRY_CAST(r.mid AS BIGINT)""",
                    [entity.marketo.type_value or entity.name.title()])
    _advance_base(con, entity, "okp", run_id, now)
    if entity.is_person:
        _update_person_mirror(con, config, entity, target, run_id, now)


def _on_merged(con: duckdb.DuckDBPyConnection, e: str, now: datetime) -> None:
    """A merged subordinate's person is gone into the master's: its link retires, the loser is retired in the
    mirror (``merged_into``; the Merge Leads activity read later finds nothing left to do)."""
    con.execute("""UPDATE identity SET state = 'merged', marketo_id = okp.new_value FROM okp
                   WHERE okp.op = 'merge' AND identity.entity = ? AND identity.dynamics_id = okp.dynamics_id""", [e])
    con.execute("""UPDATE m_person SET deleted = true, merged_into = TRY_CAST(okp.new_value AS BIGINT),
                   pending_seq = NULL, seen_at = ? FROM okp
                   WHERE okp.op = 'merge' AND m_person.id = TRY_CAST(okp.old_value AS BIGINT)""", [now])


def _advance_base(con: duckdb.DuckDBPyConnection, entity: Entity, source: str, run_id: str, now: datetime) -> None:
    fields = [f.marketo for f in entity.all_fields]
    b = qi(f"b_{entity.name}")
    pivots = ", ".join(f"bool_or(field = '{f}') AS {qi('h_' + f)}, "
                       f"max(CASE WHEN field = '{f}' THEN new_value END) AS {qi('v_' + f)}" for f in fields)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE nb AS SELECT dynamics_id, {pivots} FROM {source}
                    WHERE op IN ('create', 'update', 'agree') GROUP BY dynamics_id""")
    con.execute(f"""INSERT INTO {b} (dynamics_id, synced_at, run_id)
                    SELECT dynamics_id, ?, ? FROM nb WHERE dynamics_id NOT IN (SELECT dynamics_id FROM {b})""",
                [now, run_id])
    sets = ", ".join(f"{fcol(f)} = CASE WHEN nb.{qi('h_' + f)} THEN nb.{qi('v_' + f)} ELSE {b}.{fcol(f)} END"
                     for f in fields)
    con.execute(f"UPDATE {b} SET synced_at = ?, run_id = ?, {sets} FROM nb WHERE {b}.dynamics_id = nb.dynamics_id",
                [now, run_id])
    # A field written or agreed on again has one base again (a rollback's split base ends here).
    ensure_split_base(con)
    con.execute(f"""DELETE FROM b__split WHERE entity = ? AND (dynamics_id, field) IN
                    (SELECT (dynamics_id, field) FROM {source} WHERE op IN ('create', 'update', 'agree'))""",
                [entity.name])


def _update_person_mirror(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, target: str,
                          run_id: str, now: datetime) -> None:
    """What we wrote is now what the target holds: mirror it, so neither the echo nor a stale read bounces."""
    mirror_cols = {r[0][2:] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'm_person'").fetchall()
        if r[0].startswith("f_")}
    fields = [f.marketo for f in entity.all_fields if f.marketo in mirror_cols] + \
        [f for f in ("dynamicsId", "dynamicsType", "dynamicsIsDeleted") if f in mirror_cols]
    fields = list(dict.fromkeys(fields))
    pivots = ", ".join(f"bool_or(field = '{f}') AS {qi('h_' + f)}, "
                       f"max(CASE WHEN field = '{f}' THEN new_value END) AS {qi('v_' + f)}" for f in fields)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE nm AS
        SELECT dynamics_id, any_value(COALESCE(result_mid, marketo_id)) AS mid, any_value(op) AS op, {pivots}
        FROM okp WHERE op IN ('create', 'update', 'flag') GROUP BY dynamics_id""")
    if target == "marketo":
        typ = entity.marketo.type_value or entity.name.title()
        con.execute("""INSERT INTO m_person (id, deleted, seen_at, f_dynamicsId, f_dynamicsType, f_dynamicsIsDeleted)
            SELECT TRY_CAST(mid AS BIGINT), false, ?, dynamics_id, ?, 'false' FROM nm
            WHERE op = 'create' AND TRY_CAST(mid AS BIGINT) IS NOT NULL
              AND TRY_CAST(mid AS BIGINT) NOT IN (SELECT id FROM m_person)""", [now, typ])
        sets = ", ".join(f"{fcol(f)} = CASE WHEN nm.{qi('h_' + f)} THEN nm.{qi('v_' + f)} ELSE m_person.{fcol(f)} END"
                         for f in fields)
        con.execute(f"UPDATE m_person SET {sets} FROM nm WHERE m_person.id = TRY_CAST(nm.mid AS BIGINT)")
    else:
        d = qi(f"d_{entity.name}")
        dfields = [f for f in fields if f in {g.marketo for g in entity.all_fields}]
        sets = ", ".join(f"{fcol(f)} = CASE WHEN nm.{qi('h_' + f)} THEN nm.{qi('v_' + f)} ELSE {d}.{fcol(f)} END"
                         for f in dfields)
        if sets:
            con.execute(f"UPDATE {d} SET {sets} FROM nm WHERE {d}.id = nm.dynamics_id")


def _on_failure(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, target: str, run_id: str,
                now: datetime) -> None:
    retry = config.sync.retry
    con.execute("""INSERT INTO failures
        SELECT ?, r.did, ?, r.op, r.mid, NULL, r.code, r.message, 1, ?, ?, ? + to_seconds(?), 1 >= ?, ?
        FROM res r WHERE NOT r.ok
        ON CONFLICT (entity, dynamics_id, target) DO UPDATE SET op = excluded.op, code = excluded.code,
            message = excluded.message, attempts = failures.attempts + 1, last_failed_at = excluded.last_failed_at,
            next_attempt_at = excluded.last_failed_at + to_seconds(? * pow(2, failures.attempts)),
            held = failures.attempts + 1 >= ?, run_id = excluded.run_id""",
                [entity.name, target, now, now, now, retry.backoff_seconds, retry.max_attempts, run_id,
                 retry.backoff_seconds, retry.max_attempts])
    # 412/404 from Dynamics: the record changed or vanished; read it again before planning anything else.
    if target == "dynamics":
        con.execute(f"""UPDATE {qi('d_' + entity.name)} SET pending_seq = nextval('change_seq')
                        WHERE id IN (SELECT did FROM res WHERE NOT ok AND code IN ('412', '404'))""")
    # 1004 / 1013 from Marketo on an update: the person or object is gone there; tombstone instead of retrying.
    con.execute("""UPDATE identity SET state = 'tombstoned' WHERE entity = ? AND dynamics_id IN
                   (SELECT did FROM res WHERE NOT ok AND code IN ('1004', '1013') AND op IN ('update', 'flag'))""",
                [entity.name])


def apply_local(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str, now: datetime) -> None:
    """Plan rows that need no API call: agreements, held conflicts, rejects, tombstones, retirements."""
    e = entity.name
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE okp AS SELECT *, NULL AS result_mid FROM plan "
                    "WHERE entity = ? AND target = 'base'", [e])
        if not entity.is_derived:
            _advance_base(con, entity, "okp", run_id, now)
        con.execute("""INSERT OR REPLACE INTO conflicts
            SELECT entity, dynamics_id, marketo_id, field, new_value, old_value, base_value, ?, run_id
            FROM plan WHERE entity = ? AND op = 'hold'""", [now, e])
        con.execute("""INSERT INTO failures
            SELECT entity, dynamics_id, 'marketo', 'reject', marketo_id, any_value(field), 'invalid_value',
                   'field ' || any_value(field) || ': ' || any_value(replace(new_value, ?, 'unknown option code ')),
                   ?, ?, ?, ?, true, ?
            FROM plan WHERE entity = ? AND op = 'reject' GROUP BY entity, dynamics_id, marketo_id
            ON CONFLICT (entity, dynamics_id, target) DO UPDATE SET code = excluded.code, message = excluded.message,
                last_failed_at = excluded.last_failed_at, held = true, attempts = failures.attempts + 1""",
                    [normalize.INVALID, config.sync.retry.max_attempts, now, now, now, run_id, e])
        con.execute("""UPDATE identity SET state = 'tombstoned' WHERE entity = ? AND dynamics_id IN
            (SELECT dynamics_id FROM plan WHERE entity = ? AND op = 'tombstone')""", [e, e])
        con.execute("""UPDATE identity SET state = 'deleted' WHERE entity = ? AND dynamics_id IN
            (SELECT dynamics_id FROM plan WHERE entity = ? AND op = 'retire')""", [e, e])
        # Merged in Dynamics (Merge): the subordinate's last state went out with this push; it syncs no more.
        con.execute("""UPDATE identity SET state = 'merged' WHERE entity = ? AND dynamics_id IN
            (SELECT dynamics_id FROM plan WHERE entity = ? AND target = 'state' AND op = 'merged')""", [e, e])
        con.execute("""INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field, value_before,
                                           value_after, rule)
            SELECT ?, ?, entity, dynamics_id, marketo_id, target, op, field, old_value, new_value, rule FROM plan
            WHERE entity = ? AND op IN ('tombstone', 'retire', 'merged', 'hold', 'reject')""", [run_id, now, e])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def finish(con: duckdb.DuckDBPyConnection, entity: Entity) -> int:
    """The plan was applied: its records leave the work set unless something newer arrived meanwhile."""
    e = entity.name
    if entity.is_derived:
        return 0
    d = qi(f"d_{e}")
    n = con.execute(f"""UPDATE {d} SET pending_seq = NULL FROM plan_work w
                        WHERE w.entity = ? AND w.dynamics_id = {d}.id AND {d}.pending_seq = w.d_seq""", [e]).fetchone()
    if entity.is_person:
        # A person now owned by another record (a converted lead's person belongs to its contact) keeps
        # its change for that record's plan: the lead's plan covered it but cannot apply it.
        con.execute("""UPDATE m_person SET pending_seq = NULL FROM plan_work w
                       WHERE w.entity = ? AND w.marketo_id = CAST(m_person.id AS VARCHAR)
                         AND m_person.pending_seq = w.m_seq
                         AND NOT EXISTS (SELECT 1 FROM identity o WHERE o.entity <> w.entity AND o.state = 'active'
                                         AND o.marketo_id = w.marketo_id AND o.dynamics_id = m_person.f_dynamicsId)""",
                    [e])
    # A failed write whose record was re-planned with nothing left to write to that target is resolved
    # (e.g. a 412 re-read and settled by the policy, or a held record whose value was fixed back to what the
    # other side holds); otherwise it would stay "failed" or "held" forever. A write that is still needed is
    # planned again, so its failure stays.
    con.execute("""DELETE FROM failures f WHERE f.entity = ? AND f.target IN ('marketo', 'dynamics')
                   AND f.dynamics_id IN (SELECT dynamics_id FROM plan_work WHERE entity = ?)
                   AND NOT EXISTS (SELECT 1 FROM plan p WHERE p.entity = f.entity AND p.dynamics_id = f.dynamics_id
                                   AND p.target = f.target AND p.op NOT IN ('agree', 'hold'))""", [e, e])
    # A field held because its value could not be written (e.g. a picklist label with no option) clears once
    # its record was planned again and this plan's push did not hold it again: the value was fixed (written,
    # agreed, or reverted). Otherwise a released hold would stay "retrying" and in every work set for good.
    con.execute("""DELETE FROM failures f WHERE f.entity = ? AND f.target = 'dynamics:fields'
                   AND f.dynamics_id IN (SELECT dynamics_id FROM plan_work WHERE entity = ?)
                   AND f.last_failed_at < (SELECT max(created_at) FROM plan_meta WHERE entity = ?)""", [e, e, e])
    # Likewise a record rejected for a value Dynamics could not express, once a plan covered it without a reject.
    con.execute("""DELETE FROM failures f WHERE f.entity = ? AND f.op = 'reject'
                   AND f.dynamics_id IN (SELECT dynamics_id FROM plan_work WHERE entity = ?)
                   AND NOT EXISTS (SELECT 1 FROM plan p WHERE p.entity = f.entity AND p.dynamics_id = f.dynamics_id
                                   AND p.op = 'reject')""", [e, e])
    con.execute("DELETE FROM plan_work WHERE entity = ?", [e])
    return int(n[0]) if n else 0
