"""Rollback: write back the values a run replaced, from the ledger, to the system the run wrote.

Only field updates are reverted. Creates are not deleted and deletes cannot be undone (listed as
skipped with the reason), link fields (``dynamicsId``/``dynamicsType``) are kept so persons stay
linked, and a field that a later run wrote again or that changed since (per the mirror) is left
alone: a rollback never overwrites newer data. The rollback writes go to the ledger under a new run
id (rule ``rollback:<run>``). The base is left as it is, so the next sync sees the restored values
as an edit in the written system: one-way fields stay restored, two-way fields carry the restored
value to the other system as well (the run is undone on both sides).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import duckdb

from sync_pipeline.config.model import Entity, FieldMap, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.apply import object_path
from sync_pipeline.engine.state import fcol, qi, record_stats, utcnow

LINK_FIELDS = ("dynamicsId", "dynamicsType")
BATCH = 300  # Marketo's records per call


class RollbackError(RuntimeError):
    pass


@dataclass
class Item:
    seq: int
    entity: str
    dynamics_id: str
    marketo_id: str | None
    target: str
    op: str
    field: str | None
    restore: str | None  # the value the run replaced (ledger value_before)
    replaced: str | None  # what the run wrote (ledger value_after)
    action: str = "restore"  # restore | skip
    reason: str = ""


@dataclass
class Outcome:
    run_id: str
    restored: int = 0
    failed: list[tuple[Item, str]] = field(default_factory=list)


def new_run_id() -> str:
    return f"rollback-{uuid.uuid4()}"


def plan_rollback(con: duckdb.DuckDBPyConnection, config: SyncConfig, run_id: str) -> list[Item]:
    rows = con.execute("""SELECT seq, entity, dynamics_id, marketo_id, target, op, field, value_before, value_after
                          FROM ledger WHERE run_id = ? AND target IN ('marketo', 'dynamics')
                          ORDER BY entity, target, dynamics_id, field""", [run_id]).fetchall()
    if not rows:
        raise RollbackError(f"run {run_id!r} wrote nothing to Marketo or Dynamics according to the ledger "
                            "(unknown run id, or a run without writes)")
    later = {(r[0], r[1], r[2], r[3]): r[4] for r in con.execute(
        """SELECT l.entity, l.dynamics_id, l.target, l.field, arg_max(l.run_id, l.seq) FROM ledger l
           JOIN (SELECT entity, dynamics_id, target, field, seq FROM ledger WHERE run_id = ?) r
             ON l.entity = r.entity AND l.dynamics_id = r.dynamics_id AND l.target = r.target
                AND l.field IS NOT DISTINCT FROM r.field AND l.seq > r.seq
           WHERE l.op NOT IN ('hold', 'reject') GROUP BY ALL""", [run_id]).fetchall()}
    items = [Item(*r) for r in rows]
    for it in items:
        e = config.by_name.get(it.entity)
        if e is None:
            it.action, it.reason = "skip", "entity no longer configured"
        elif it.op == "create":
            it.action, it.reason = "skip", "created by the run (rollback does not delete records)"
        elif it.op in ("delete", "flag"):
            it.action, it.reason = "skip", f"{it.op} of a record deleted in Dynamics cannot be undone"
        elif it.op != "update":
            it.action, it.reason = "skip", f"op {it.op} wrote nothing to revert"
        elif it.field in LINK_FIELDS:
            it.action, it.reason = "skip", "link field (keeps the person linked)"
        elif (key := (it.entity, it.dynamics_id, it.target, it.field)) in later:
            it.action, it.reason = "skip", f"written again later by run {later[key]}"
        elif it.field not in {f.marketo for f in e.all_fields}:
            it.action, it.reason = "skip", f"field {it.field} is no longer mapped"
        else:
            now_value = _current_value(con, e, it)
            if now_value is not _UNKNOWN and now_value != it.replaced:
                it.action, it.reason = "skip", f"changed since the run (now {now_value!r})"
    return items


_UNKNOWN = object()


def _current_value(con: duckdb.DuckDBPyConnection, e: Entity, it: Item) -> Any:
    """The written system's value as last mirrored (objects in Marketo have no mirror: unknown)."""
    if it.target == "dynamics":
        row = con.execute(f"SELECT {fcol(it.field or '')} FROM {qi('d_' + e.name)} WHERE id = ?",
                          [it.dynamics_id]).fetchone()
    elif e.is_person and it.marketo_id:
        row = con.execute(f"SELECT {fcol(it.field or '')} FROM m_person WHERE id = TRY_CAST(? AS BIGINT)",
                          [it.marketo_id]).fetchone()
    else:
        return _UNKNOWN
    return _UNKNOWN if row is None else row[0]


def execute_rollback(con: duckdb.DuckDBPyConnection, config: SyncConfig, items: list[Item], dynamics: Any,
                     marketo: Any, source_run: str, run_id: str | None = None) -> Outcome:
    """Write the ``restore`` items, record the successful ones in the ledger, return the failures."""
    outcome = Outcome(run_id or new_run_id())
    if any(it.action == "restore" and it.target == "dynamics" for it in items):
        from sync_pipeline.engine import orgmeta  # picklist labels -> codes come from the org's option sets

        config = orgmeta.runtime_config(config, orgmeta.read_metadata(dynamics, orgmeta.mapped_tables(config),
                                                                       config.sync.language))
    groups: dict[tuple[str, str], dict[tuple[str, str | None], list[Item]]] = defaultdict(lambda: defaultdict(list))
    for it in items:
        if it.action == "restore":
            groups[(it.entity, it.target)][(it.dynamics_id, it.marketo_id)].append(it)
    for (entity_name, target), records in groups.items():
        e = config.entity(entity_name)
        maps = {f.marketo: f for f in e.all_fields}
        recs = list(records.items())
        restored = failed = 0
        for start in range(0, len(recs), BATCH):
            chunk = recs[start:start + BATCH]
            if target == "marketo":
                errors = _write_marketo(marketo, e, maps, chunk)
            else:
                errors = _write_dynamics(dynamics, e, maps, chunk)
            done = [it for (key, its) in chunk if key not in errors for it in its]
            lost = [(it, errors[key]) for (key, its) in chunk if key in errors for it in its]
            _record(con, outcome.run_id, source_run, done)
            outcome.restored += len(done)
            outcome.failed += lost
            restored, failed = restored + len(done), failed + len(lost)
        record_stats(con, outcome.run_id, entity_name, "rollback",
                     {"source_run": source_run, "target": target, "restored": restored, "failed": failed})
    return outcome


Key = tuple[str, str | None]


def _write_marketo(client: Any, e: Entity, maps: dict[str, FieldMap], chunk: list[tuple[Key, list[Item]]]
                   ) -> dict[Key, str]:
    values = [{it.field: normalize.to_marketo(maps[it.field], it.restore) for it in its if it.field}
              for _, its in chunk]
    if e.is_person:
        records = [{"id": int(key[1] or 0), **v} for (key, _), v in zip(chunk, values)]
        results = client.sync_leads(records, action="updateOnly", lookup_field="id")
    else:
        records = [{e.marketo.key: key[0], **v} for (key, _), v in zip(chunk, values)]
        results = client.upsert_objects(object_path(e), records, action="updateOnly", dedupe_by="dedupeFields")
    errors: dict[Key, str] = {}
    for (key, _), res in zip(chunk, results):
        if not res.ok:
            reason = res.reasons[0] if res.reasons else {"code": "?", "message": f"status {res.status}"}
            errors[key] = f"Marketo {reason.get('code')}: {reason.get('message')}"
    return errors


def _write_dynamics(client: Any, e: Entity, maps: dict[str, FieldMap], chunk: list[tuple[Key, list[Item]]]
                    ) -> dict[Key, str]:
    from sync_pipeline.clients.dynamics import DynamicsError

    assert e.dynamics is not None
    errors: dict[Key, str] = {}
    for key, its in chunk:
        try:
            body = {maps[it.field].dynamics: normalize.to_dynamics(maps[it.field], it.restore)
                    for it in its if it.field}
            client.update(e.dynamics.entity_set, key[0], body)
        except (DynamicsError, ValueError) as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"
    return errors


def _record(con: duckdb.DuckDBPyConnection, run_id: str, source_run: str, done: list[Item]) -> None:
    if not done:
        return
    now = utcnow()
    con.executemany("""INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                           value_before, value_after, rule) VALUES (?, ?, ?, ?, ?, ?, 'update', ?, ?, ?, ?)""",
                    [[run_id, now, it.entity, it.dynamics_id, it.marketo_id, it.target, it.field, it.replaced,
                      it.restore, f"rollback:{source_run}"] for it in done])
