"""Push to Marketo: write a stored plan in API-sized batches (persons, custom objects, opportunity roles).

Writes are idempotent by construction (Marketo upserts keyed by the Dynamics id or external ids, deletes
tolerate "already gone"), so a run killed anywhere can simply run again.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from sync_pipeline.clients import errors
from sync_pipeline.config.model import Entity, FieldMap, SyncConfig
from sync_pipeline.engine import mapping, normalize
from sync_pipeline.engine.extract.marketo import (
    ingest_marketo_persons,
    marketo_person_fields,
)
from sync_pipeline.engine.ports import MarketoPort
from sync_pipeline.engine.push import bulk
from sync_pipeline.engine.push.payloads import (
    chunks,
    field_maps,
    object_path,
    planned_records,
)
from sync_pipeline.engine.push.results import (
    ApplyStats,
    Result,
    outcomes,
    record_results,
)
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import (
    fcol,
    keyed_rows,
    latest_fields,
    one_row,
    record_stats,
    sql_text,
    utcnow,
)

log = logging.getLogger(__name__)


def push_marketo(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, client: MarketoPort, run_id: str
) -> ApplyStats:
    """The push stage for Marketo. A person's work is done only after its Dynamics push (``push_dynamics``
    finishes it); every other entity is done here."""
    stats = apply_to_marketo(con, config, entity, client, run_id, utcnow())
    if not entity.is_person:
        ledger.finish(con, config, entity)
        mapping.note_in_ledger(con, entity.name, run_id, utcnow())
    record_stats(con, run_id, entity.name, "push_marketo", stats.as_metadata())
    return stats


def apply_to_marketo(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    client: MarketoPort,
    run_id: str,
    now: datetime,
) -> ApplyStats:
    stats = ApplyStats("marketo")
    if entity.is_person:
        _drop_raced_fields(con, config, entity, client, run_id, now)
    total = planned_records(con, entity, "marketo")
    stats.records = total
    maps = field_maps(config, entity)
    results: list[Result] = []
    try:
        if bulk.wanted(con, config, entity) and hasattr(client, "import_queue"):  # large batches of creates
            bulk.push(
                con,
                config,
                entity,
                client,
                maps,
                lambda done: record_results(
                    con, config, entity, "marketo", [Result(*d) for d in done], run_id, now, stats
                ),
                run_id,
                now,
            )
        for rows in chunks(con, total):
            if entity.is_person:
                results += _push_persons(client, entity, maps, rows)
            elif entity.is_derived:
                results += _push_roles(client, entity, rows)
            else:
                unread = _read_objects_before(con, client, entity, maps, rows)
                if unread is not None:  # failed like the write would have: kept and retried, never blind
                    results += [
                        Result(r[0], r[1], False, r[2], unread[0], unread[1])
                        for r in rows
                        if r[1] == "update"
                    ]
                    rows = [r for r in rows if r[1] != "update"]
                results += _push_objects(client, entity, maps, rows)
            if len(results) >= bulk.RECORD_SLICE:  # keep memory flat on a large initial copy
                record_results(con, config, entity, "marketo", results, run_id, now, stats)
                results = []
    finally:
        record_results(con, config, entity, "marketo", results, run_id, now, stats)
        ledger.apply_local(con, config, entity, run_id, now)
    return stats


RACE_READ = 300  # persons per read (Get Leads by id: up to 300 filter values, domain.md 3.4)


def _drop_raced_fields(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    client: MarketoPort,
    run_id: str,
    now: datetime,
) -> None:
    """A marketer may edit a person between our plan and our push. Sync Leads has no conditional update (no
    etag, no If-Match), so before writing we re-read the persons we are about to update (one Get Leads call per
    300 persons, only those with planned field updates) and compare each planned field with the value the plan
    was made against. A field that moved is not written: the fresh value goes into the mirror, the person stays
    pending, and the next plan resolves the two edits by the field's policy (e.g. the marketer's value on both
    sides for leads). The race is recorded in the ledger (op ``race``, rule ``conflict:<policy>``).

    Cheaper alternatives were rejected: ``updatedAt`` alone would also flag our own earlier writes and changes
    to fields we do not write, and reading lead-change activities since the extract's token costs as many
    calls as there were changes anywhere in the instance, not per person we write."""
    ids = [
        r[0]
        for r in con.execute(
            """SELECT DISTINCT marketo_id FROM plan WHERE entity = ? AND target = 'marketo' AND op = 'update'
           AND rule <> 'identity' AND TRY_CAST(marketo_id AS BIGINT) IS NOT NULL ORDER BY 1""",
            [entity.name],
        ).fetchall()
    ]
    if not ids or not hasattr(client, "get_leads"):
        return
    fields = marketo_person_fields(config)
    for i in range(0, len(ids), RACE_READ):
        fresh = client.get_leads("id", [int(x) for x in ids[i : i + RACE_READ]], fields)
        ingest_marketo_persons(con, config, list(fresh))
    # The persons just read, through the mirror's key index (a join would scan the whole mirror).
    keyed_rows(con, "race_persons", "m_person", "id", [int(x) for x in ids])
    maps = {f.marketo: f for f in entity.all_fields}
    planned = [
        r[0]
        for r in con.execute(
            """SELECT DISTINCT field FROM plan WHERE entity = ? AND target = 'marketo' AND op = 'update'
           AND rule <> 'identity'""",
            [entity.name],
        ).fetchall()
    ]
    parts = []
    for name in planned:
        f = maps.get(name)
        if f is None:
            continue
        now_v = normalize.compare_expr(f, f"m.{fcol(name)}")
        was_v = normalize.compare_expr(f, "p.old_value")
        parts.append(f"""SELECT p.dynamics_id, p.marketo_id, p.field, p.old_value, m.{fcol(name)} AS now_value,
                                {_race_rule(entity, f)} AS rule
                         FROM plan p JOIN race_persons m ON CAST(m.id AS VARCHAR) = p.marketo_id
                         WHERE p.entity = {sql_text(entity.name)} AND p.target = 'marketo' AND p.op = 'update'
                           AND p.field = {sql_text(name)} AND ({now_v}) IS DISTINCT FROM ({was_v})""")
    if not parts:
        return
    con.execute(f"CREATE OR REPLACE TEMP TABLE raced AS {' UNION ALL '.join(parts)}")
    n = one_row(con, "SELECT count(*) FROM raced")[0]
    if not n:
        return
    log.warning(
        "%s: %d planned field write(s) to Marketo raced with an edit there; re-planned by policy",
        entity.name,
        n,
    )
    con.execute(
        """INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                       value_before, value_after, rule)
                   SELECT ?, ?, ?, dynamics_id, marketo_id, 'marketo', 'race', field, old_value, now_value, rule
                   FROM raced""",
        [run_id, now, entity.name],
    )
    con.execute(
        """DELETE FROM plan WHERE entity = ? AND target = 'marketo' AND op = 'update'
                   AND (dynamics_id, field) IN (SELECT (dynamics_id, field) FROM raced)""",
        [entity.name],
    )
    # Policy latest: the marketer's edit is the field's newest Marketo change (the activity read later will
    # find the mirror already holding the value and record nothing).
    timed = latest_fields(entity)
    if timed:
        con.execute(
            """INSERT OR REPLACE INTO field_times SELECT 'm', r.marketo_id, r.field, m.updated_at
                       FROM raced r JOIN race_persons m ON CAST(m.id AS VARCHAR) = r.marketo_id
                       WHERE r.field IN (SELECT unnest(?::VARCHAR[])) AND m.updated_at IS NOT NULL""",
            [timed],
        )
    # The mirror already holds the fresh values; make sure each raced person is planned again.
    raced = con.execute("""SELECT DISTINCT TRY_CAST(marketo_id AS BIGINT) FROM raced
                           WHERE TRY_CAST(marketo_id AS BIGINT) IS NOT NULL""").fetchall()
    ledger.mark_persons_pending(con, [r[0] for r in raced])


def _race_rule(entity: Entity, f: FieldMap) -> str:
    return sql_text(f"conflict:{entity.field_policy(f)}")


def _values(
    maps: dict[str, FieldMap], fields: list[str], vals: list[str | None], drop_null: bool
) -> dict[str, Any]:
    out = {}
    for f, v in zip(fields, vals, strict=True):
        if f is None or (drop_null and v is None):
            continue
        fm = maps.get(f)
        out[f] = normalize.to_marketo(fm, v) if fm else v
    return out


def _push_persons(
    client: MarketoPort, entity: Entity, maps: dict[str, FieldMap], rows: list[tuple]
) -> list[Result]:
    creates, updates, deletes = [], [], []
    for row in rows:
        did, op, mid, _etag, _base, fields, vals = row
        if op == "create":
            rec = {
                "dynamicsId": did,
                "dynamicsType": entity.marketo.type_value or entity.name.title(),
                "dynamicsIsDeleted": False,
                **_values(maps, fields, vals, drop_null=True),
            }
            creates.append((row, rec))
        elif op in ("update", "flag"):
            updates.append((row, {"id": int(mid), **_values(maps, fields, vals, drop_null=False)}))
        elif op == "delete":
            deletes.append((row, {"id": int(mid)}))
    out: list[Result] = [_merge_person(client, row) for row in rows if row[1] == "merge"]
    if creates:
        res = client.sync_leads([r for _, r in creates], action="createOrUpdate", lookup_field="dynamicsId")
        out += outcomes([row for row, _ in creates], "create", res, lambda r: str(r.id) if r.id else None)
    if updates:
        res = client.sync_leads([r for _, r in updates], action="updateOnly", lookup_field="id")
        out += outcomes([row for row, _ in updates], "update", res, lambda r: str(r.id) if r.id else None)
    if deletes:
        res = client.delete_leads([r["id"] for _, r in deletes])
        out += outcomes([row for row, _ in deletes], "delete", res, lambda r: None)
    return out


def _read_objects_before(
    con: duckdb.DuckDBPyConnection,
    client: MarketoPort,
    entity: Entity,
    maps: dict[str, FieldMap],
    rows: list[tuple],
) -> tuple[str, str] | None:
    """The ledger's before-value of an object update is what Marketo held, not what we last wrote there:
    read exactly the records about to be updated (by their dedupe field, up to 300 per call) and put
    their canonical values into the plan rows the ledger copies. Creates had nothing there to read.
    Returns (code, message) when the read failed: those updates are not written this time.
    (Query by dedupe field: experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/
    companies.)"""
    updates = [r for r in rows if r[1] == "update"]
    fields = sorted({f for r in updates for f in r[5] if f in maps and f != entity.marketo.key})
    if not updates or not fields:
        return None
    key = entity.marketo.key
    wanted = {r[0] for r in updates}
    try:
        found = {
            str(o.get(key) or "").lower(): o
            for o in client.query_objects(object_path(entity), key, sorted(wanted), fields=[key, *fields])
        }
    except (errors.QuotaExceeded, errors.AuthError, errors.Transient):
        raise  # like a write: the step fails and is retried (or fails fast on credentials)
    except errors.ClientError as exc:
        return (
            exc.code,
            f"could not read the current values before writing (the ledger's before-value): {exc}",
        )
    dids, names, values = [], [], []
    for did, _op, _mid, _etag, _base, fs, _vals in updates:
        obj = found.get(did)
        for f in fs:
            if f in fields:
                dids.append(did)
                names.append(f)
                values.append(None if obj is None else _wire_text(obj.get(f)))
    con.register(
        "before_raw", pa.table({"did": dids, "field": names, "value": pa.array(values, type=pa.string())})
    )
    try:
        whens = " ".join(f"WHEN '{f}' THEN {normalize.marketo_expr(maps[f], 'value')}" for f in fields)
        con.execute(
            f"""UPDATE plan SET old_value = r.v FROM (SELECT did, field, CASE field {whens} END AS v
                                                              FROM before_raw) r
                        WHERE plan.entity = ? AND plan.target = 'marketo' AND plan.op = 'update'
                          AND plan.dynamics_id = r.did AND plan.field = r.field""",
            [entity.name],
        )
    finally:
        con.unregister("before_raw")
    return None


def _wire_text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _merge_person(client: MarketoPort, row: tuple) -> Result:
    """A Dataverse merge folded two linked records into one: merge the subordinate's person (the plan row's
    base value) into the master's (its Marketo id) with Merge Leads, so the human stays one person."""
    did, op, winner, _etag, loser, _fields, _vals = row
    try:
        client.merge_leads(int(winner), [int(loser)])
    except errors.ClientError as exc:
        return Result(
            did, op, False, winner, exc.code, f"merge of person {loser} into {winner}: {exc.message}"
        )
    return Result(did, op, True, winner)


def _push_objects(
    client: MarketoPort, entity: Entity, maps: dict[str, FieldMap], rows: list[tuple]
) -> list[Result]:
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
        res = client.upsert_objects(
            path, [r for _, r in upserts], action="createOrUpdate", dedupe_by="dedupeFields"
        )
        out += outcomes([row for row, _ in upserts], "upsert", res, ident)
    if deletes:
        res = client.delete_objects(path, [r for _, r in deletes], delete_by="dedupeFields")
        out += outcomes([row for row, _ in deletes], "delete", res, lambda r: None)
    return out


def _push_roles(client: MarketoPort, entity: Entity, rows: list[tuple]) -> list[Result]:
    path = object_path(entity)
    deletes = [
        (row, {"externalOpportunityId": row[0], "leadId": int(row[2]), "role": row[4]})
        for row in rows
        if row[1] == "delete"
    ]
    creates = []
    for row in rows:
        if row[1] == "create":
            v = dict(zip(row[5], row[6], strict=True))
            creates.append(
                (
                    row,
                    {
                        "externalOpportunityId": v["externalOpportunityId"],
                        "leadId": int(v["leadId"]),
                        "role": v["role"],
                        "isPrimary": True,
                    },
                )
            )
    out: list[Result] = []
    if deletes:
        res = client.delete_objects(path, [r for _, r in deletes], delete_by="dedupeFields")
        out += outcomes([row for row, _ in deletes], "delete", res, lambda r: None)
    if creates:
        res = client.upsert_objects(
            path, [r for _, r in creates], action="createOrUpdate", dedupe_by="dedupeFields"
        )
        out += outcomes(
            [row for row, _ in creates],
            "create",
            res,
            lambda r: str(getattr(r, "marketoGUID", None) or getattr(r, "id", "") or "") or None,
        )
    return out
