"""Apply a stored plan: write to Marketo or Dynamics in API-sized batches, then record what happened.

Writes are idempotent by construction (Marketo upserts keyed by the Dynamics id or external ids,
Dynamics upserts by deterministic GUIDs, deletes tolerate "already gone"), so a run killed anywhere can
simply run again. After the API calls one transaction advances the base and the mirrors for the
writes that succeeded, appends the ledger, and files failures with backoff (held after the limit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Protocol

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import Entity, FieldMap, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.state import ensure_split_base, fcol, latest_fields, qi

log = logging.getLogger(__name__)

CHUNK_RECORDS = 3000  # records per round trip to DuckDB; API batches are 300 inside it
OBJECT_PATHS = {"company": "companies", "opportunity": "opportunities", "opportunityRole": "opportunities/roles",
                "salesPerson": "salespersons"}


class RecordOutcome(Protocol):
    status: str
    id: Any
    reasons: list[dict[str, Any]]


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


def object_path(entity: Entity) -> str:
    name = entity.marketo.object
    return OBJECT_PATHS.get(name, f"customobjects/{name}")


def _field_maps(config: SyncConfig, entity: Entity) -> dict[str, FieldMap]:
    maps = {f.marketo: f for f in entity.all_fields}
    maps.setdefault("dynamicsIsDeleted", FieldMap(marketo="dynamicsIsDeleted", dynamics="x", transform="boolean"))
    return maps


def _planned_records(con: duckdb.DuckDBPyConnection, entity: Entity, target: str) -> int:
    """Number the records of the plan (deletes first) and lay their field rows out in that order, so that
    chunks are cheap range reads and nothing groups the whole plan in memory."""
    con.execute("""CREATE OR REPLACE TEMP TABLE pr_ids AS
        SELECT row_number() OVER (ORDER BY CASE op WHEN 'delete' THEN 0 ELSE 1 END, dynamics_id) AS rn, dynamics_id, op
        FROM (SELECT DISTINCT dynamics_id, op FROM plan
              WHERE entity = ? AND target = ? AND op NOT IN ('reject', 'agree', 'hold'))""", [entity.name, target])
    con.execute("""CREATE OR REPLACE TEMP TABLE pr AS
        SELECT r.rn, p.dynamics_id, p.op, p.marketo_id, p.etag, p.base_value, p.field, p.new_value
        FROM plan p JOIN pr_ids r ON r.dynamics_id = p.dynamics_id AND r.op = p.op
        WHERE p.entity = ? AND p.target = ? ORDER BY r.rn""", [entity.name, target])
    return int(con.execute("SELECT count(*) FROM pr_ids").fetchone()[0])


def _chunks(con: duckdb.DuckDBPyConnection, total: int) -> Iterable[list[tuple]]:
    """Records as (dynamics_id, op, marketo_id, etag, base_value, fields, values), CHUNK_RECORDS at a time."""
    for start in range(1, total + 1, CHUNK_RECORDS):
        rows = con.execute("""SELECT rn, dynamics_id, op, marketo_id, etag, base_value, field, new_value FROM pr
                              WHERE rn BETWEEN ? AND ? ORDER BY rn, field""",
                           [start, start + CHUNK_RECORDS - 1]).fetchall()
        records: list[tuple] = []
        current = None
        for rn, did, op, mid, etag, base, field_name, value in rows:
            if rn != current:
                current = rn
                records.append((did, op, mid, etag, base, [], []))
            records[-1][5].append(field_name)
            records[-1][6].append(value)
        yield records


def _outcomes(rows: list[tuple], payload_op: str, results: list[Any], key: Callable[[Any], str | None]
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


# ---- Marketo ------------------------------------------------------------------------------------------------


def apply_to_marketo(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, client: Any,
                     run_id: str, now: datetime) -> ApplyStats:
    stats = ApplyStats("marketo")
    if entity.is_person:
        _drop_raced_fields(con, config, entity, client, run_id, now)
    total = _planned_records(con, entity, "marketo")
    stats.records = total
    maps = _field_maps(config, entity)
    results: list[Result] = []
    from sync_pipeline.engine import bulk_push  # large batches of creates: bulk import; the rest below

    try:
        if bulk_push.wanted(con, config, entity):
            bulk_push.push(con, config, entity, client, maps, lambda done: _record_results(
                con, config, entity, "marketo", [Result(*d) for d in done], run_id, now, stats), run_id, now)
        for rows in _chunks(con, total):
            if entity.is_person:
                results += _push_persons(client, entity, maps, rows)
            elif entity.is_derived:
                results += _push_roles(client, entity, rows)
            else:
                unread = _read_objects_before(con, client, entity, maps, rows)
                if unread is not None:  # failed like the write would have: kept and retried, never blind
                    results += [Result(r[0], r[1], False, r[2], unread[0], unread[1]) for r in rows if r[1] == "update"]
                    rows = [r for r in rows if r[1] != "update"]
                results += _push_objects(client, entity, maps, rows)
            if len(results) >= 50_000:  # keep memory flat on a large initial copy
                _record_results(con, config, entity, "marketo", results, run_id, now, stats)
                results = []
    finally:
        _record_results(con, config, entity, "marketo", results, run_id, now, stats)
        _apply_local(con, config, entity, run_id, now)
    return stats


RACE_READ = 300  # persons per read (Get Leads by id: up to 300 filter values, domain.md 3.4)


def _drop_raced_fields(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, client: Any,
                       run_id: str, now: datetime) -> None:
    """A marketer may edit a person between our plan and our push. Sync Leads has no conditional update (no
    etag, no If-Match), so before writing we re-read the persons we are about to update (one Get Leads call per
    300 persons, only those with planned field updates) and compare each planned field with the value the plan
    was made against. A field that moved is not written: the fresh value goes into the mirror, the person stays
    pending, and the next plan resolves the two edits by the field's policy (e.g. the marketer's value on both
    sides for leads). The race is recorded in the ledger (op ``race``, rule ``conflict:<policy>``).

    Cheaper alternatives were rejected: ``updatedAt`` alone would also flag our own earlier writes and changes
    to fields we do not write, and reading lead-change activities since the extract's token costs as many
    calls as there were changes anywhere in the instance, not per person we write."""
    from sync_pipeline.engine import extract

    ids = [r[0] for r in con.execute(
        """SELECT DISTINCT marketo_id FROM plan WHERE entity = ? AND target = 'marketo' AND op = 'update'
           AND rule <> 'identity' AND TRY_CAST(marketo_id AS BIGINT) IS NOT NULL ORDER BY 1""",
        [entity.name]).fetchall()]
    if not ids or not hasattr(client, "get_leads"):
        return
    fields = extract.marketo_person_fields(config)
    for i in range(0, len(ids), RACE_READ):
        fresh = client.get_leads("id", [int(x) for x in ids[i:i + RACE_READ]], fields)
        extract.ingest_marketo_persons(con, config, list(fresh))
    maps = {f.marketo: f for f in entity.all_fields}
    planned = [r[0] for r in con.execute(
        """SELECT DISTINCT field FROM plan WHERE entity = ? AND target = 'marketo' AND op = 'update'
           AND rule <> 'identity'""", [entity.name]).fetchall()]
    parts = []
    for name in planned:
        f = maps.get(name)
        if f is None:
            continue
        now_v = normalize.compare_expr(f, f"m.{fcol(name)}")
        was_v = normalize.compare_expr(f, "p.old_value")
        parts.append(f"""SELECT p.dynamics_id, p.marketo_id, p.field, p.old_value, m.{fcol(name)} AS now_value,
                                {_race_rule(entity, f)} AS rule
                         FROM plan p JOIN m_person m ON CAST(m.id AS VARCHAR) = p.marketo_id
                         WHERE p.entity = {_sql_lit(entity.name)} AND p.target = 'marketo' AND p.op = 'update'
                           AND p.field = {_sql_lit(name)} AND ({now_v}) IS DISTINCT FROM ({was_v})""")
    if not parts:
        return
    con.execute(f"CREATE OR REPLACE TEMP TABLE raced AS {' UNION ALL '.join(parts)}")
    n = con.execute("SELECT count(*) FROM raced").fetchone()[0]
    if not n:
        return
    log.warning("%s: %d planned field write(s) to Marketo raced with an edit there; re-planned by policy",
                entity.name, n)
    con.execute("""INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                       value_before, value_after, rule)
                   SELECT ?, ?, ?, dynamics_id, marketo_id, 'marketo', 'race', field, old_value, now_value, rule
                   FROM raced""", [run_id, now, entity.name])
    con.execute("""DELETE FROM plan WHERE entity = ? AND target = 'marketo' AND op = 'update'
                   AND (dynamics_id, field) IN (SELECT (dynamics_id, field) FROM raced)""", [entity.name])
    # Policy latest: the marketer's edit is the field's newest Marketo change (the activity read later will
    # find the mirror already holding the value and record nothing).
    timed = latest_fields(entity)
    if timed:
        con.execute("""INSERT OR REPLACE INTO field_times SELECT 'm', r.marketo_id, r.field, m.updated_at
                       FROM raced r JOIN m_person m ON CAST(m.id AS VARCHAR) = r.marketo_id
                       WHERE r.field IN (SELECT unnest(?::VARCHAR[])) AND m.updated_at IS NOT NULL""", [timed])
    # The mirror already holds the fresh values; make sure each raced person is planned again.
    con.execute("""UPDATE m_person SET pending_seq = nextval('change_seq')
                   WHERE CAST(id AS VARCHAR) IN (SELECT marketo_id FROM raced)""")


def _race_rule(entity: Entity, f: FieldMap) -> str:
    return _sql_lit(f"conflict:{entity.field_policy(f)}")


def _sql_lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _values(maps: dict[str, FieldMap], fields: list[str], vals: list[str | None], drop_null: bool) -> dict[str, Any]:
    out = {}
    for f, v in zip(fields, vals):
        if f is None or (drop_null and v is None):
            continue
        fm = maps.get(f)
        out[f] = normalize.to_marketo(fm, v) if fm else v
    return out


def _push_persons(client: Any, entity: Entity, maps: dict[str, FieldMap], rows: list[tuple]) -> list[Result]:
    creates, updates, deletes = [], [], []
    for row in rows:
        did, op, mid, _etag, _base, fields, vals = row
        if op == "create":
            rec = {"dynamicsId": did, "dynamicsType": entity.marketo.type_value or entity.name.title(),
                   "dynamicsIsDeleted": False, **_values(maps, fields, vals, drop_null=True)}
            creates.append((row, rec))
        elif op in ("update", "flag"):
            updates.append((row, {"id": int(mid), **_values(maps, fields, vals, drop_null=False)}))
        elif op == "delete":
            deletes.append((row, {"id": int(mid)}))
    out: list[Result] = [_merge_person(client, row) for row in rows if row[1] == "merge"]
    if creates:
        res = client.sync_leads([r for _, r in creates], action="createOrUpdate", lookup_field="dynamicsId")
        out += _outcomes([row for row, _ in creates], "create", res, lambda r: str(r.id) if r.id else None)
    if updates:
        res = client.sync_leads([r for _, r in updates], action="updateOnly", lookup_field="id")
        out += _outcomes([row for row, _ in updates], "update", res, lambda r: str(r.id) if r.id else None)
    if deletes:
        res = client.delete_leads([r["id"] for _, r in deletes])
        out += _outcomes([row for row, _ in deletes], "delete", res, lambda r: None)
    return out


def _read_objects_before(con: duckdb.DuckDBPyConnection, client: Any, entity: Entity, maps: dict[str, FieldMap],
                         rows: list[tuple]) -> tuple[str, str] | None:
    """The ledger's before-value of an object update is what Marketo held, not what we last wrote there:
    read exactly the records about to be updated (by their dedupe field, up to 300 per call) and put
    their canonical values into the plan rows the ledger copies. Creates had nothing there to read.
    Returns (code, message) when the read failed: those updates are not written this time.
    (Query by dedupe field: experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/
    companies.)"""
    from sync_pipeline.clients.marketo import MarketoAuthError, MarketoError, MarketoTransientError, QuotaExhausted

    updates = [r for r in rows if r[1] == "update"]
    fields = sorted({f for r in updates for f in r[5] if f in maps and f != entity.marketo.key})
    if not updates or not fields:
        return None
    key = entity.marketo.key
    wanted = {r[0] for r in updates}
    try:
        found = {str(o.get(key) or "").lower(): o for o in
                 client.query_objects(object_path(entity), key, sorted(wanted), fields=[key, *fields])}
    except (QuotaExhausted, MarketoAuthError, MarketoTransientError):
        raise  # like a write: the step fails and is retried (or fails fast on credentials)
    except MarketoError as exc:
        return exc.code, f"could not read the current values before writing (the ledger's before-value): {exc}"
    dids, names, values = [], [], []
    for did, _op, _mid, _etag, _base, fs, _vals in updates:
        obj = found.get(did)
        for f in fs:
            if f in fields:
                dids.append(did)
                names.append(f)
                values.append(None if obj is None else _wire_text(obj.get(f)))
    con.register("before_raw", pa.table({"did": dids, "field": names, "value": pa.array(values, type=pa.string())}))
    try:
        whens = " ".join(f"WHEN '{f}' THEN {normalize.marketo_expr(maps[f], 'value')}" for f in fields)
        con.execute(f"""UPDATE plan SET old_value = r.v FROM (SELECT did, field, CASE field {whens} END AS v
                                                              FROM before_raw) r
                        WHERE plan.entity = ? AND plan.target = 'marketo' AND plan.op = 'update'
                          AND plan.dynamics_id = r.did AND plan.field = r.field""", [entity.name])
    finally:
        con.unregister("before_raw")
    return None


def _wire_text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _merge_person(client: Any, row: tuple) -> Result:
    """A Dataverse merge folded two linked records into one: merge the subordinate's person (the plan row's
    base value) into the master's (its Marketo id) with Merge Leads, so the human stays one person."""
    from sync_pipeline.clients.marketo import MarketoError

    did, op, winner, _etag, loser, _fields, _vals = row
    try:
        client.merge_leads(int(winner), [int(loser)])
    except MarketoError as exc:
        return Result(did, op, False, winner, exc.code, f"merge of person {loser} into {winner}: {exc.message}")
    return Result(did, op, True, winner)


def _push_objects(client: Any, entity: Entity, maps: dict[str, FieldMap], rows: list[tuple]) -> list[Result]:
    key, path = entity.marketo.key, object_path(entity)
    upserts, deletes = [], []
    for row in rows:
        did, op, _mid, _etag, _base, fields, vals = row
        if op == "delete":
            deletes.append((row, {key: did}))
        else:
            upserts.append((row, {key: did, **_values(maps, fields, vals, drop_null=op == "create")}))
    out: list[Result] = []
    ident = lambda r: str(getattr(r, "id", None) or getattr(r, "marketoGUID", None) or "") or None  # noqa: E731
    if upserts:
        res = client.upsert_objects(path, [r for _, r in upserts], action="createOrUpdate", dedupe_by="dedupeFields")
        out += _outcomes([row for row, _ in upserts], "upsert", res, ident)
    if deletes:
        res = client.delete_objects(path, [r for _, r in deletes], delete_by="dedupeFields")
        out += _outcomes([row for row, _ in deletes], "delete", res, lambda r: None)
    return out


def _push_roles(client: Any, entity: Entity, rows: list[tuple]) -> list[Result]:
    path = object_path(entity)
    deletes = [(row, {"externalOpportunityId": row[0], "leadId": int(row[2]), "role": row[4]})
               for row in rows if row[1] == "delete"]
    creates = []
    for row in rows:
        if row[1] == "create":
            v = dict(zip(row[5], row[6]))
            creates.append((row, {"externalOpportunityId": v["externalOpportunityId"], "leadId": int(v["leadId"]),
                                  "role": v["role"], "isPrimary": True}))
    out: list[Result] = []
    if deletes:
        res = client.delete_objects(path, [r for _, r in deletes], delete_by="dedupeFields")
        out += _outcomes([row for row, _ in deletes], "delete", res, lambda r: None)
    if creates:
        res = client.upsert_objects(path, [r for _, r in creates], action="createOrUpdate", dedupe_by="dedupeFields")
        out += _outcomes([row for row, _ in creates], "create", res,
                         lambda r: str(getattr(r, "marketoGUID", None) or getattr(r, "id", "") or "") or None)
    return out


# ---- Dynamics ----------------------------------------------------------------------------------------------


def apply_to_dynamics(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, dynamics: Any,
                      marketo: Any, run_id: str, now: datetime) -> ApplyStats:
    stats = ApplyStats("dynamics")
    total = _planned_records(con, entity, "dynamics")
    stats.records = total
    if not total or entity.dynamics is None:
        return stats
    maps = _field_maps(config, entity)
    entity_set = entity.dynamics.entity_set
    results: list[Result] = []
    dropped: list[tuple[str, list[tuple[str, str]]]] = []
    unlinked: list[tuple[str, str]] = []  # leads created whose person did not get their id
    try:
        writes: list[tuple[str, str, str | None, str | None, dict[str, Any]]] = []
        for rows in _chunks(con, total):
            for did, op, mid, etag, _base, fields, vals in rows:
                body, bad = {}, []
                for f, v in zip(fields, vals):
                    if f not in maps:
                        continue
                    try:
                        body[maps[f].dynamics] = normalize.to_dynamics(maps[f], v)
                    except ValueError as exc:  # this field cannot be written; the rest of the record can
                        bad.append((f, str(exc)))
                if bad:
                    dropped.append((did, bad))
                    if not body:  # nothing writable: the held field failure says why; retrying cannot help
                        continue
                writes.append((did, op, mid, etag, body))
            batch_results = _write_dynamics_batched(dynamics, entity_set, writes)
            writes.clear()
            results += batch_results
            created = [(r.did, r.marketo_id) for r in batch_results if r.ok and r.op == "create" and r.marketo_id]
            if created:  # the new lead's id goes back to the Marketo person it came from
                res = marketo.sync_leads([{"id": int(mid), "dynamicsId": did, "dynamicsType": "Lead"}
                                          for did, mid in created], action="updateOnly", lookup_field="id")
                for (did, mid), r in zip(created, res):
                    if getattr(r, "status", None) not in ("updated", "created"):
                        log.warning("lead %s created from Marketo person %s, but the person was not updated "
                                    "(the next sync writes the link): %s", did, mid, getattr(r, "reasons", None))
                        unlinked.append((did, mid))
    finally:
        _hold_fields(con, entity, dropped, run_id, now)
        _record_results(con, config, entity, "dynamics", results, run_id, now, stats)
        if unlinked:
            # The mirror must not claim a link Marketo does not have: the next plan of the lead then writes
            # dynamicsId/dynamicsType to the person (rule "identity"), like for any linked person.
            ids = [int(mid) for _, mid in unlinked]
            con.execute("""UPDATE m_person SET f_dynamicsId = NULL, f_dynamicsType = NULL
                           WHERE id IN (SELECT unnest(?::BIGINT[]))""", [ids])
            con.execute(f"""UPDATE {qi('d_' + entity.name)} SET pending_seq = nextval('change_seq')
                            WHERE id IN (SELECT unnest(?::VARCHAR[]))""", [[did for did, _ in unlinked]])
    return stats


def _hold_fields(con: duckdb.DuckDBPyConnection, entity: Entity, dropped: list[tuple[str, list[tuple[str, str]]]],
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


DYNAMICS_BATCH = 100  # requests per $batch: one HTTP call, each PATCH keeps its own If-Match


def _write_dynamics_batched(client: Any, entity_set: str,
                            writes: list[tuple[str, str, str | None, str | None, dict[str, Any]]]) -> list[Result]:
    """PATCH updates (with the row's etag) and upserts (creates by a deterministic id) in ``$batch`` calls."""
    from sync_pipeline.clients.dynamics import BatchRequest, DynamicsError

    out: list[Result] = []
    for i in range(0, len(writes), DYNAMICS_BATCH):
        part = writes[i:i + DYNAMICS_BATCH]
        requests = [BatchRequest("PATCH", f"{entity_set}({did})", body,
                                 headers={} if op == "create" else {"If-Match": etag or "*"})
                    for did, op, _mid, etag, body in part]
        try:
            responses = client.execute_batch(requests, continue_on_error=True, idempotent=True)
        except DynamicsError as exc:  # the whole call failed after retries: every record keeps its plan
            code = str(getattr(exc, "code", None) or getattr(exc, "status", "error"))
            out += [Result(did, op, False, mid, code, str(exc)) for did, op, mid, _etag, _body in part]
            continue
        for (did, op, mid, _etag, _body), resp in zip(part, responses):
            if 200 <= resp.status < 300:
                out.append(Result(did, op, True, mid))
                continue
            err = resp.body.get("error", {}) if isinstance(resp.body, dict) else {}
            message = f"{entity_set}({did}): {err.get('message') or resp.status}"
            if resp.status == 412:
                message = f"changed in Dynamics since it was read; re-planned ({message})"
            elif resp.status == 404:
                message = f"deleted in Dynamics meanwhile ({message})"
            code = str(resp.status) if resp.status in (404, 412) else str(err.get("code") or resp.status)
            out.append(Result(did, op, False, mid, code, message))
        if len(responses) < len(part):  # a batch that stopped early: the rest were not attempted
            out += [Result(did, op, False, mid, "not_attempted", f"{entity_set}({did}): batch stopped early")
                    for did, op, mid, _etag, _body in part[len(responses):]]
    return out


# ---- bookkeeping ----------------------------------------------------------------------------------------------


def _record_results(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, target: str,
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


def _apply_local(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str, now: datetime) -> None:
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


def due_retry_time(now: datetime, seconds: int) -> datetime:
    return now + timedelta(seconds=seconds)
