"""Rollback: put back, field by field, the values a run replaced, on the system it wrote them to.

What it does (``docs/operations.md`` says the same for operators):

- It starts from the ledger: every field the run wrote, with the value that was there before (read
  from Marketo or Dynamics just before the run wrote it) and the value the run wrote.
- It reads the current value of exactly those records from the system that was written (a fresh
  read, never the state store's mirrors) and decides per field: the field still holds what the run
  wrote -> restore the before-value; anything else -> skip, "changed since" (a newer edit is never
  overwritten). A field a later run wrote again is skipped the same way.
- Dynamics writes carry the etag of that read (``If-Match``): a record changed between the read and
  the write answers 412 and is skipped, not overwritten. Marketo has no conditional update, so the
  records are read again right before the write and a field that changed meanwhile is skipped.
- Records the run created are left alone (``skip: created``) unless ``delete_created`` is set: then a
  Marketo person the run created is deleted if every field still holds what the run wrote (never a
  person edited since); its link is tombstoned so the next sync does not create it again. Deletes
  cannot be undone (``skip: deleted``); the ``dynamicsIsDeleted`` flag a run set is restored like a
  field (the Dynamics record stays deleted and unlinked).
- The state store moves with the rollback, so the next sync neither re-pushes the run's values nor
  carries the restored values over the other system: the mirrors take the restored values, and for
  persons a restored field whose two systems now hold different values (they did before the run too)
  gets a *split base* (``b__split``: one agreed value per system, see ``engine/plan/fields.py``) until
  either side changes it again. When both systems agree again the ordinary base takes the value.
- The rollback is a run in the ledger (run id ``rollback-<uuid>``, rule ``rollback:<run>``, before =
  what it found, after = what it restored), so it can itself be rolled back; rolling the same run
  back twice finds the restored values, not the run's, and skips everything.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import STICKY, Entity, FieldMap, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.push.payloads import object_path
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import (
    BEFORE_VALUES_FROM,
    ensure_split_base,
    fcol,
    one_row,
    qi,
    record_stats,
    sql_text,
    utcnow,
)

LINK_FIELDS = ("dynamicsId", "dynamicsType")
BATCH = 300  # Marketo's records per call
FLAG_FIELD = "dynamicsIsDeleted"
# The ledger op of a rollback's field write (its before = what was there, after = the restored value). Not
# "update": checks of what the *sync* wrote (e.g. "never blanks a value") do not apply to a restore.
RESTORE_OP = "restore"

# What the dry-run says an item will do.
RESTORE, DELETE = "restore", "delete"
SKIP_CHANGED, SKIP_CREATED, SKIP_DELETED = "skip: changed since", "skip: created", "skip: deleted"
SKIP_OTHER = "skip"


class RollbackError(RuntimeError):
    """A rollback that cannot start: the ledger has no write of that run to undo."""


class _Marker:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


UNKNOWN: Any = _Marker("(unknown)")  # the current value could not be read
GONE: Any = _Marker("(deleted)")  # the record no longer exists in the written system
NOT_READ: Any = _Marker("(not read)")  # no need to read it: the item is skipped whatever it holds


@dataclass
class Item:
    seq: int
    entity: str
    dynamics_id: str
    marketo_id: str | None
    target: str
    op: str
    field: str | None
    restore: str | None  # the value before the run (ledger value_before)
    replaced: str | None  # what the run wrote (ledger value_after)
    source_run: str = ""
    now: Any = NOT_READ  # the written system's value at rollback time
    action: str = RESTORE  # one of the constants above
    reason: str = ""
    etag: str | None = None  # Dynamics: the record's etag at the decision read (sent as If-Match)

    @property
    def will_do(self) -> str:
        return self.action + (f" ({self.reason})" if self.reason else "")


@dataclass
class Outcome:
    run_id: str
    restored: int = 0
    deleted: int = 0
    skipped: list[Item] = field(
        default_factory=list
    )  # skipped at write time (changed between read and write)
    failed: list[tuple[Item, str]] = field(default_factory=list)


# Called once per (entity, target) group after the decision read and before the writes (tests use it to
# change a record in between, as a concurrent user would).
BeforeWrite = Callable[[str, str, list[Item]], None]


def new_run_id() -> str:
    return f"rollback-{uuid.uuid4()}"


def display(value: Any) -> str:
    """Blank and unknown are different things: a known empty value, or one nobody could read."""
    if value is None:
        return "(blank)"
    return repr(value) if isinstance(value, _Marker) else str(value)


def runs_since(con: duckdb.DuckDBPyConnection, since: datetime) -> list[str]:
    """Sync runs that wrote to either system at or after ``since``, newest first (rollbacks excluded)."""
    if since.tzinfo is not None:
        since = since.astimezone(UTC).replace(tzinfo=None)
    rows = con.execute(
        """SELECT run_id FROM ledger WHERE target IN ('marketo', 'dynamics')
                          GROUP BY run_id
                          HAVING max(written_at) >= ? AND NOT bool_or(starts_with(COALESCE(rule, ''), 'rollback:'))
                          ORDER BY max(seq) DESC""",
        [since],
    ).fetchall()
    return [r[0] for r in rows]


# ---- deciding -------------------------------------------------------------------------------------------


def load_items(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    run_id: str,
    *,
    delete_created: bool = False,
    ignore_runs: Iterable[str] = (),
) -> list[Item]:
    """The run's ledger rows with every decision that needs no read (creates, deletes, later writes)."""
    rows = con.execute(
        """SELECT seq, entity, dynamics_id, marketo_id, target, op, field, value_before, value_after
                          FROM ledger WHERE run_id = ? AND target IN ('marketo', 'dynamics')
                          ORDER BY entity, target, dynamics_id, field""",
        [run_id],
    ).fetchall()
    if not rows:
        raise RollbackError(
            f"run {run_id!r} wrote nothing to Marketo or Dynamics according to the ledger "
            "(unknown run id, or a run without writes)"
        )
    ignore = sorted(set(ignore_runs) - {run_id})
    skip_ignored = "AND l.run_id NOT IN (SELECT unnest(?::VARCHAR[]))" if ignore else ""
    later = {
        (r[0], r[1], r[2], r[3]): r[4]
        for r in con.execute(
            f"""SELECT l.entity, l.dynamics_id, l.target, l.field, arg_max(l.run_id, l.seq) FROM ledger l
           JOIN (SELECT entity, dynamics_id, target, field, seq FROM ledger WHERE run_id = ?) r
             ON l.entity = r.entity AND l.dynamics_id = r.dynamics_id AND l.target = r.target
                AND l.field IS NOT DISTINCT FROM r.field AND l.seq > r.seq
           WHERE l.op NOT IN ('hold', 'reject') {skip_ignored}
           GROUP BY ALL""",
            [run_id, ignore] if ignore else [run_id],
        ).fetchall()
    }
    items = [
        Item(seq, entity, did, mid, target, op, fld, before, after, source_run=run_id)
        for seq, entity, did, mid, target, op, fld, before, after in rows
    ]
    marker = (
        con.execute("SELECT value FROM schema_meta WHERE key = ?", [BEFORE_VALUES_FROM]).fetchone()
        if _has_table(con, "schema_meta")
        else None
    )
    true_from = int(marker[0]) if marker else None
    for it in items:
        e = config.by_name.get(it.entity)
        if e is None:
            it.action, it.reason = SKIP_OTHER, "entity no longer configured"
            continue
        if (
            it.op in ("update", RESTORE_OP)
            and it.target == "marketo"
            and not e.is_person
            and it.restore is None
            and (true_from is None or it.seq < true_from)
        ):
            # Written by a version that did not record before-values of one-way objects: unknown, not blank.
            it.restore = UNKNOWN
            it.action, it.reason = SKIP_OTHER, "before-value not recorded (ledger row from an older version)"
            continue
        if it.op == "create":
            can_delete = e.is_person and it.target == "marketo"
            it.action = DELETE if delete_created and can_delete else SKIP_CREATED
            if it.action == SKIP_CREATED:
                it.reason = "created by the run" + (
                    "; --delete-created removes it if unchanged" if can_delete else ""
                )
            continue
        if it.op == "delete":
            it.action, it.reason = SKIP_DELETED, "a deleted record cannot be brought back"
            continue
        if it.op == "flag":
            it.field = it.field or FLAG_FIELD
            if it.restore is None:  # ledgers written before flags carried their before-value
                it.restore = "false"
        elif it.op not in ("update", RESTORE_OP):  # a rollback's own write is rolled back like an update
            it.action, it.reason = SKIP_OTHER, f"op {it.op} wrote nothing to revert"
            continue
        key = (it.entity, it.dynamics_id, it.target, it.field)
        fm = next((f for f in e.all_fields if f.marketo == it.field), None)
        if fm is not None and e.field_policy(fm) == STICKY and it.replaced == "true" and it.restore != "true":
            # Consent: the run wrote an opt-out; putting the opt-in (or blank) back would reverse it.
            it.action, it.reason = (
                SKIP_OTHER,
                "an opt-out is never turned back into an opt-in (opt_out_sticky)",
            )
        elif it.field in LINK_FIELDS:
            it.action, it.reason = SKIP_OTHER, "link field (keeps the person linked)"
        elif key in later:
            it.action, it.reason = SKIP_CHANGED, f"written again later by run {later[key]}"
        elif it.op != "flag" and it.field not in {f.marketo for f in e.all_fields}:
            it.action, it.reason = SKIP_OTHER, f"field {it.field} is no longer mapped"
    return items


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        one_row(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])[0]
    )


def _same(f: FieldMap | None, a: Any, b: Any) -> bool:
    if f is not None and f.transform == "email" and isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


def _field_map(config: SyncConfig, it: Item) -> FieldMap | None:
    e = config.by_name.get(it.entity)
    if e is None:
        return None
    if it.field == FLAG_FIELD:
        return FieldMap(marketo=FLAG_FIELD, dynamics="x", transform="boolean")
    return next((f for f in e.all_fields if f.marketo == it.field), None)


def decide(
    config: SyncConfig, items: list[Item], current: dict[tuple[str, str, str], dict[str, Any]]
) -> None:
    """Compare each field's fresh value with what the run wrote: equal -> restore, else skip."""
    for it in items:
        if it.action not in (RESTORE, DELETE):
            continue
        rec = current.get((it.entity, it.target, it.dynamics_id))
        if rec is None:
            it.now = UNKNOWN
            it.action, it.reason = SKIP_OTHER, "could not read the record"
            continue
        if rec.get("__gone__"):
            it.now = GONE
            it.action, it.reason = SKIP_DELETED, f"no longer exists in {it.target.title()}"
            continue
        it.now = rec.get(it.field or "", UNKNOWN)
        it.etag = rec.get("__etag__")
        if it.now is UNKNOWN:
            it.action, it.reason = SKIP_OTHER, "could not read the field"
        elif not _same(_field_map(config, it), it.now, it.replaced):
            it.action = SKIP_CHANGED
    # A created person is deleted only if nothing about it changed since: one edited field keeps it all.
    edited = {(it.entity, it.dynamics_id) for it in items if it.op == "create" and it.action != DELETE}
    for it in items:
        if it.action == DELETE and (it.entity, it.dynamics_id) in edited:
            it.action, it.reason = SKIP_CREATED, "edited since the run created it"


def org_config(config: SyncConfig, dynamics: Any) -> SyncConfig:
    """Picklist labels from the org's option sets (reading and writing Dynamics values), as the sync's runs."""
    from sync_pipeline.engine import orgmeta

    if dynamics is None or not any(
        f.transform == "picklist" and not f.options for e in config.entities for f in e.all_fields
    ):
        return config
    return orgmeta.runtime_config(
        config,
        orgmeta.read_metadata(
            dynamics, orgmeta.mapped_tables(config), config.sync.language, casts=orgmeta.run_casts(config)
        ),
    )


def plan_rollback(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    run_id: str,
    dynamics: Any,
    marketo: Any,
    *,
    delete_created: bool = False,
    ignore_runs: Iterable[str] = (),
    overlay: dict[tuple[str, str, str, str], Any] | None = None,
) -> list[Item]:
    """Every ledger row of the run with what rollback will do with it, from a fresh read of both systems.

    ``overlay`` (dry runs over several runs) replaces read values by what newer rollbacks would restore.
    """
    config = org_config(config, dynamics)
    items = load_items(con, config, run_id, delete_created=delete_created, ignore_runs=ignore_runs)
    current = read_current(config, [it for it in items if it.action in (RESTORE, DELETE)], dynamics, marketo)
    for (entity, target, did, fld), value in (overlay or {}).items():
        rec = current.get((entity, target, did))
        if rec is not None and not rec.get("__gone__"):
            rec[fld] = value
    decide(config, items, current)
    return items


# ---- reading the systems ------------------------------------------------------------------------------


def read_current(
    config: SyncConfig, items: list[Item], dynamics: Any, marketo: Any
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Canonical current values of exactly the records ``items`` touch, per (entity, target, dynamics id).

    A record that no longer exists maps to ``{"__gone__": True}``; one that could not be read is absent.
    Dynamics records also carry ``__etag__``.
    """
    wanted: dict[tuple[str, str], dict[str, tuple[str | None, set[str]]]] = defaultdict(dict)
    for it in items:
        rec = wanted[(it.entity, it.target)].setdefault(it.dynamics_id, (it.marketo_id, set()))
        if it.field:
            rec[1].add(it.field)
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    with duckdb.connect() as scratch:  # canonicalisation only: the same SQL the extracts use
        for (entity_name, target), records in wanted.items():
            e = config.entity(entity_name)
            if target == "dynamics":
                got = _read_dynamics(scratch, e, list(records), dynamics)
            elif e.is_person:
                got = _read_persons(scratch, e, records, marketo)
            else:
                got = _read_objects(scratch, e, records, marketo)
            for did, values in got.items():
                out[(entity_name, target, did)] = values
    return out


def _person_maps(e: Entity) -> dict[str, FieldMap]:
    maps = {f.marketo: f for f in e.all_fields}
    maps.setdefault(FLAG_FIELD, FieldMap(marketo=FLAG_FIELD, dynamics="x", transform="boolean"))
    maps.setdefault(
        "dynamicsId", FieldMap(marketo="dynamicsId", dynamics="x", transform="lookup", target=e.name)
    )
    maps.setdefault("dynamicsType", FieldMap(marketo="dynamicsType", dynamics="x"))
    return maps


def _canon_marketo(
    scratch: duckdb.DuckDBPyConnection, maps: dict[str, FieldMap], rows: list[tuple[str, str, Any]]
) -> dict[str, dict[str, Any]]:
    """(dynamics id, field, raw Marketo value) -> canonical text, per record (the extract's SQL)."""
    from sync_pipeline.engine.extract.marketo import text_value

    out: dict[str, dict[str, Any]] = defaultdict(dict)
    rows = [r for r in rows if r[1] in maps]
    if not rows:
        return out
    fields = sorted({r[1] for r in rows})
    scratch.register(
        "mk_values",
        pa.table(
            {
                "did": [r[0] for r in rows],
                "field": [r[1] for r in rows],
                "value": pa.array([text_value(r[2]) for r in rows], type=pa.string()),
            }
        ),
    )
    try:
        whens = " ".join(
            f"WHEN {sql_text(f)} THEN {normalize.marketo_expr(maps[f], 'value')}" for f in fields
        )
        for did, fld, value in scratch.execute(
            f"SELECT did, field, CASE field {whens} END FROM mk_values"
        ).fetchall():
            out[did][fld] = value
    finally:
        scratch.unregister("mk_values")
    return out


def _collect(
    records: dict[str, Any],
    found: dict[str, dict[str, Any]],
    fields: list[str],
    scratch: duckdb.DuckDBPyConnection,
    maps: dict[str, FieldMap],
) -> dict[str, dict[str, Any]]:
    rows = [(did, f, raw.get(f)) for did, raw in found.items() for f in fields]
    out: dict[str, dict[str, Any]] = {did: {"__gone__": True} for did in records if did not in found}
    canon = _canon_marketo(scratch, maps, rows)
    for did in found:
        out[did] = dict(canon.get(did, {}))
    return out


def _read_persons(
    scratch: duckdb.DuckDBPyConnection,
    e: Entity,
    records: dict[str, tuple[str | None, set[str]]],
    client: Any,
) -> dict[str, dict[str, Any]]:
    from sync_pipeline.clients.marketo import MarketoAuthError, MarketoError, QuotaExhausted

    maps = _person_maps(e)
    by_mid = {str(mid): did for did, (mid, _) in records.items() if mid}
    fields = sorted({f for _, fs in records.values() for f in fs if f in maps})
    try:
        leads = client.get_leads("id", list(by_mid), fields=["id", *fields])
    except (MarketoAuthError, QuotaExhausted):
        raise  # nothing can be read or written: stop, and say why
    except MarketoError:
        return {}  # unreadable: every field of these records is skipped with the reason
    found = {by_mid[str(lead.get("id"))]: lead for lead in leads if str(lead.get("id")) in by_mid}
    return _collect(records, found, fields, scratch, maps)


def _read_objects(
    scratch: duckdb.DuckDBPyConnection,
    e: Entity,
    records: dict[str, tuple[str | None, set[str]]],
    client: Any,
) -> dict[str, dict[str, Any]]:
    from sync_pipeline.clients.marketo import MarketoAuthError, MarketoError, QuotaExhausted

    if e.is_derived:  # roles are only created and deleted, never updated: nothing to compare
        return {}
    maps = {f.marketo: f for f in e.all_fields}
    key = e.marketo.key
    fields = sorted({f for _, fs in records.values() for f in fs if f in maps and f != key})
    try:
        # Companies, opportunities, sales persons and custom objects are readable by their dedupe field
        # (filterType takes any field of the describe's searchableFields; up to 300 values per call):
        # https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/companies
        # and .../lead-database/custom-objects
        objs = client.query_objects(object_path(e), key, list(records), fields=[key, *fields])
    except (MarketoAuthError, QuotaExhausted):
        raise  # nothing can be read or written: stop, and say why
    except MarketoError:
        return {}
    found = {str(o.get(key)).lower(): o for o in objs if str(o.get(key) or "").lower() in records}
    return _collect(records, found, fields, scratch, maps)


DYNAMICS_BATCH = 100  # requests per $batch call (one HTTP call; each part keeps its own status and headers)


def _read_dynamics(
    scratch: duckdb.DuckDBPyConnection, e: Entity, ids: list[str], client: Any
) -> dict[str, dict[str, Any]]:
    """GET exactly these records (in ``$batch`` calls of 100): their values and the etag of this read,
    which is what the write carries as If-Match."""
    from sync_pipeline.clients.dynamics import AuthenticationError, BatchRequest, DynamicsError
    from sync_pipeline.engine.extract.dynamics import (
        coerce_page,
        dynamics_select,
        dynamics_value_expr,
        page_schema,
        primary_key,
    )

    assert e.dynamics is not None
    select = ",".join(dynamics_select(e))
    out: dict[str, dict[str, Any]] = {}
    rows = []
    for start in range(0, len(ids), DYNAMICS_BATCH):
        part = ids[start : start + DYNAMICS_BATCH]
        try:
            responses = client.execute_batch(
                [BatchRequest("GET", f"{e.dynamics.entity_set}({did})?$select={select}") for did in part],
                continue_on_error=True,
                idempotent=True,
            )
        except AuthenticationError:
            raise
        except DynamicsError:
            continue  # unreadable: every field of these records is skipped with the reason
        for did, resp in zip(part, responses, strict=False):  # a $batch that stopped early answers fewer
            if resp.status == 404:
                out[did] = {"__gone__": True}
            elif 200 <= resp.status < 300 and isinstance(resp.body, dict):
                rows.append(resp.body)
    if not rows:
        return out
    scratch.register("dy_page", coerce_page(rows, page_schema(e)))
    try:
        names = [f.marketo for f in e.all_fields]
        cols = ", ".join(f"{dynamics_value_expr(e, f)} AS {qi(f.marketo)}" for f in e.all_fields)
        for row in scratch.execute(
            f'SELECT lower({qi(primary_key(e))}), "@odata.etag", {cols} FROM dy_page'
        ).fetchall():
            out[row[0]] = {"__etag__": row[1], **dict(zip(names, row[2:], strict=True))}
    finally:
        scratch.unregister("dy_page")
    return out


# ---- writing ------------------------------------------------------------------------------------------


def execute_rollback(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    items: list[Item],
    dynamics: Any,
    marketo: Any,
    source_run: str,
    run_id: str | None = None,
    before_write: BeforeWrite | None = None,
) -> Outcome:
    """Write the ``restore`` (and ``delete``) items, record the done ones, move the base and mirrors."""
    ensure_split_base(con)
    outcome = Outcome(run_id or new_run_id())
    if any(it.action == RESTORE and it.target == "dynamics" for it in items):
        config = org_config(config, dynamics)
    groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for it in items:
        if it.action in (RESTORE, DELETE):
            groups[(it.entity, it.target)].append(it)
    for (entity_name, target), group in groups.items():
        e = config.entity(entity_name)
        if before_write is not None:
            before_write(entity_name, target, group)
        skipped_before, failed_before = len(outcome.skipped), len(outcome.failed)
        restores = [it for it in group if it.action == RESTORE]
        done: list[Item] = []  # the writers add what landed as it lands, so an error midway loses nothing
        try:
            if target == "dynamics":
                _write_dynamics(config, e, restores, dynamics, outcome, done)
            else:
                _write_marketo(config, e, restores, marketo, outcome, done)
                _delete_persons(
                    config, e, [it for it in group if it.action == DELETE], marketo, outcome, done
                )
        finally:
            _record(con, e, outcome.run_id, source_run, done)
        restored = sum(it.action == RESTORE for it in done)
        deleted = len({it.dynamics_id for it in done if it.action == DELETE})
        outcome.restored += restored
        outcome.deleted += deleted
        record_stats(
            con,
            outcome.run_id,
            entity_name,
            "rollback",
            {
                "source_run": source_run,
                "target": target,
                "restored": restored,
                "deleted": deleted,
                "skipped_at_write": len(outcome.skipped) - skipped_before,
                "failed": len(outcome.failed) - failed_before,
            },
        )
    return outcome


def _by_record(items: list[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        out[it.dynamics_id].append(it)
    return out


def _recheck(config: SyncConfig, items: list[Item], marketo: Any, outcome: Outcome) -> list[Item]:
    """Marketo has no conditional update (no If-Match on /rest/v1/leads.json or the object endpoints):
    read the records again right before the write and keep only the fields that did not change."""
    current = read_current(config, items, None, marketo)
    keep = []
    for it in items:
        rec = current.get((it.entity, it.target, it.dynamics_id))
        now = UNKNOWN if rec is None else GONE if rec.get("__gone__") else rec.get(it.field or "", UNKNOWN)
        if not isinstance(now, _Marker) and _same(_field_map(config, it), now, it.now):
            keep.append(it)
            continue
        it.now = now
        if now is GONE:
            it.action, it.reason = SKIP_DELETED, "deleted meanwhile"
        elif now is UNKNOWN:
            it.action, it.reason = SKIP_OTHER, "could not read the record again before the write"
        else:
            it.action, it.reason = SKIP_CHANGED, "changed between the read and the write"
        outcome.skipped.append(it)
    return keep


def _marketo_reason(res: Any) -> str:
    reason = res.reasons[0] if res.reasons else {"code": "?", "message": f"status {res.status}"}
    return f"Marketo {reason.get('code')}: {reason.get('message')}"


def _write_marketo(
    config: SyncConfig, e: Entity, items: list[Item], client: Any, outcome: Outcome, done: list[Item]
) -> None:
    from sync_pipeline.clients.marketo import MarketoError

    if not items:
        return
    items = _recheck(config, items, client, outcome)
    maps = _person_maps(e) if e.is_person else {f.marketo: f for f in e.all_fields}
    records = list(_by_record(items).items())
    for start in range(0, len(records), BATCH):
        chunk = records[start : start + BATCH]
        values = [
            {it.field: normalize.to_marketo(maps[it.field], it.restore) for it in its if it.field}
            for _, its in chunk
        ]
        try:
            if e.is_person:
                payload = [
                    {"id": int(its[0].marketo_id or 0), **v}
                    for (_, its), v in zip(chunk, values, strict=True)
                ]
                results = client.sync_leads(payload, action="updateOnly", lookup_field="id")
            else:
                payload = [{e.marketo.key: did, **v} for (did, _), v in zip(chunk, values, strict=True)]
                results = client.upsert_objects(
                    object_path(e), payload, action="updateOnly", dedupe_by="dedupeFields"
                )
        except MarketoError as exc:
            outcome.failed += [(it, f"Marketo {exc.code}: {exc.message}") for _, its in chunk for it in its]
            continue
        for (_, its), res in zip(chunk, results, strict=True):
            if res.ok:
                done += its
            else:
                outcome.failed += [(it, _marketo_reason(res)) for it in its]


def _delete_persons(
    config: SyncConfig, e: Entity, items: list[Item], client: Any, outcome: Outcome, done: list[Item]
) -> None:
    from sync_pipeline.clients.marketo import MarketoError

    if not items:
        return
    kept = _recheck(config, items, client, outcome)
    changed = {it.dynamics_id for it in items if it not in kept}
    for it in kept:  # one field changed between the read and the write keeps the whole person
        if it.dynamics_id in changed:
            it.action, it.reason = SKIP_CREATED, "edited between the read and the write"
            outcome.skipped.append(it)
    records = _by_record([it for it in kept if it.dynamics_id not in changed])
    ids = list(records)
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        try:
            results = client.delete_leads([int(records[did][0].marketo_id or 0) for did in chunk])
        except MarketoError as exc:
            outcome.failed += [
                (it, f"Marketo {exc.code}: {exc.message}") for did in chunk for it in records[did]
            ]
            continue
        for did, res in zip(chunk, results, strict=True):
            if res.ok:
                done += records[did]
            else:
                outcome.failed += [(it, _marketo_reason(res)) for it in records[did]]


def _write_dynamics(
    config: SyncConfig, e: Entity, items: list[Item], client: Any, outcome: Outcome, done: list[Item]
) -> None:
    from sync_pipeline.clients.dynamics import BatchRequest, DynamicsError

    assert e.dynamics is not None
    maps = {f.marketo: f for f in e.all_fields}
    writes: list[tuple[str, list[Item], dict[str, Any]]] = []
    for did, its in _by_record(items).items():
        try:
            writes.append(
                (
                    did,
                    its,
                    {
                        maps[it.field].dynamics: normalize.to_dynamics(maps[it.field], it.restore)
                        for it in its
                        if it.field
                    },
                )
            )
        except ValueError as exc:
            outcome.failed += [(it, f"ValueError: {exc}") for it in its]
    changed: list[tuple[str, list[Item]]] = []
    for start in range(0, len(writes), DYNAMICS_BATCH):
        part = writes[start : start + DYNAMICS_BATCH]
        # If-Match carries the etag of the decision read: a record changed since answers 412
        # Precondition Failed instead of being overwritten ("Apply optimistic concurrency",
        # learn.microsoft.com/en-us/power-apps/developer/data-platform/webapi/
        # perform-conditional-operations-using-web-api). Never "*": that would overwrite anything.
        requests = [
            BatchRequest(
                "PATCH",
                f"{e.dynamics.entity_set}({did})",
                body,
                headers={"If-Match": its[0].etag or 'W/"unknown"'},
            )
            for did, its, body in part
        ]
        try:
            responses = client.execute_batch(requests, continue_on_error=True, idempotent=True)
        except DynamicsError as exc:
            outcome.failed += [(it, f"{type(exc).__name__}: {exc}") for _, its, _ in part for it in its]
            continue
        for (did, its, _), resp in zip(part, responses, strict=False):  # fewer: stopped early
            if 200 <= resp.status < 300:
                done += its
            elif resp.status == 412:
                changed.append((did, its))
            elif resp.status == 404:
                for it in its:
                    it.now, it.action, it.reason = GONE, SKIP_DELETED, "deleted meanwhile (404)"
                    outcome.skipped.append(it)
            else:
                err = resp.body.get("error", {}) if isinstance(resp.body, dict) else {}
                outcome.failed += [
                    (it, f"Dynamics {resp.status} {err.get('code', '')}: {err.get('message', '')}")
                    for it in its
                ]
        for _did, its, _ in part[len(responses) :]:  # a batch that stopped early: not attempted
            outcome.failed += [(it, "Dynamics: not attempted (the batch stopped early)") for it in its]
    if changed:
        # 412: changed after the read, so skipped. Read again to show what is there now; a record that holds
        # exactly the restored values is ours (a retried $batch whose first attempt had landed).
        fresh = read_current(config, [it for _, its in changed for it in its], client, None)
        for did, its in changed:
            rec = fresh.get((e.name, "dynamics", did)) or {}
            if not rec.get("__gone__") and all(
                _same(maps.get(it.field or ""), rec.get(it.field or "", UNKNOWN), it.restore) for it in its
            ):
                done += its
                continue
            for it in its:
                it.now = rec.get(it.field or "", UNKNOWN)
                it.action, it.reason = SKIP_CHANGED, "changed between the read and the write (412)"
                outcome.skipped.append(it)


# ---- bookkeeping --------------------------------------------------------------------------------------


def _record(
    con: duckdb.DuckDBPyConnection, e: Entity, run_id: str, source_run: str, done: list[Item]
) -> None:
    """Ledger rows, mirrors, base and split base for the writes that succeeded: set-based, one transaction."""
    if not done:
        return
    now = utcnow()
    table = pa.table(
        {
            "did": [it.dynamics_id for it in done],
            "mid": [it.marketo_id for it in done],
            "target": [it.target for it in done],
            "op": ["delete" if it.action == DELETE else RESTORE_OP for it in done],
            "field": [it.field for it in done],
            "before": pa.array(
                [it.replaced if isinstance(it.now, _Marker) else it.now for it in done], type=pa.string()
            ),
            "after": pa.array([None if it.action == DELETE else it.restore for it in done], type=pa.string()),
        }
    )
    con.register("rb_done", table)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            """INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                           value_before, value_after, rule)
                       SELECT ?, ?, ?, did, mid, target, op, field, before, after, ? FROM rb_done""",
            [run_id, now, e.name, f"rollback:{source_run}"],
        )
        # Persons deleted (--delete-created): tombstone the link so the next sync does not create them again.
        ledger.set_link_state(con, e.name, "SELECT did FROM rb_done WHERE op = 'delete'", "tombstoned")
        con.execute("""UPDATE m_person SET deleted = true
                       WHERE id IN (SELECT TRY_CAST(mid AS BIGINT) FROM rb_done WHERE op = 'delete')""")
        for fld in sorted({it.field for it in done if it.action == RESTORE and it.field}):
            _move_state(con, e, fld, run_id, now)
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("rb_done")


def _move_state(con: duckdb.DuckDBPyConnection, e: Entity, fld: str, run_id: str, now: datetime) -> None:
    """One field of the restored records (``rb_done``): mirrors, then base or split base."""
    col, rows = fcol(fld), f"(SELECT * FROM rb_done WHERE op = '{RESTORE_OP}' AND field = {sql_text(fld)})"
    # The mirror of the written system takes the restored value: its echo is not an edit.
    if e.is_person:
        con.execute(f"""UPDATE m_person SET {col} = r.after FROM {rows} r
                        WHERE r.target = 'marketo' AND m_person.id = TRY_CAST(r.mid AS BIGINT)""")
    if fld == FLAG_FIELD:
        return
    if e.dynamics is not None and not e.is_derived:
        d = qi("d_" + e.name)
        con.execute(
            f"UPDATE {d} SET {col} = r.after FROM {rows} r WHERE r.target = 'dynamics' AND {d}.id = r.did"
        )
    if not e.is_person:
        # One-way objects: the base is the last Dynamics value pushed, and Dynamics was not touched, so it
        # stays; the next sync pushes this field again only when it changes in Dynamics.
        return
    # Persons: each system's agreed value is what it holds now. The restored side holds the restored
    # value; the other side holds what it held (its split value, or the base the run agreed on).
    b = qi("b_" + e.name)
    fm = next((f for f in e.all_fields if f.marketo == fld), FieldMap(marketo=fld, dynamics="x"))
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE restored_field AS
        SELECT r.did, r.target, r.after AS restored,
               CASE WHEN s.dynamics_id IS NULL THEN b.{col}
                    WHEN r.target = 'dynamics' THEN s.m_value ELSE s.d_value END AS other
        FROM {rows} r
        LEFT JOIN b__split s ON s.entity = ? AND s.dynamics_id = r.did AND s.field = ?
        LEFT JOIN {b} b ON b.dynamics_id = r.did""",
        [e.name, fld],
    )
    con.execute("ALTER TABLE restored_field ADD COLUMN agreed BOOLEAN")
    con.execute(f"""UPDATE restored_field SET agreed = ({normalize.compare_expr(fm, "other")})
                                             IS NOT DISTINCT FROM ({normalize.compare_expr(fm, "restored")})""")
    ledger.settle_restored_field(con, e.name, fld, run_id, now)
