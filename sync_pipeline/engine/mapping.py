"""The mapping the store last synced with, and what changed since: fields added, removed, re-ruled.

A mapping change is detected when the state store is opened with a configuration whose digest differs
from the stored one (``state.ensure_schema``) and recorded per entity and field:

- ``mapping_fields``   one row per entity and Marketo field ever mapped: its spec (direction, policy,
                       transform, Dynamics column), its state (``active``, ``pending`` = added, waiting for
                       its back-fill, ``removed``) and when it was last back-filled.
- ``mapping_entities`` one row per entity ever mapped, with the digest of its mapping.
- ``mapping_changes``  the log of changes (``added``, ``re-added``, ``removed``, ``changed``,
                       ``entity_added``, ``entity_removed``); each is shown by the next plan of its entity
                       and written to the ledger by the next push (``noted_run``).

A field added to an existing entity stays out of the incremental plans until its back-fill ran
(``sync-pipeline resync``): until then the mirrors hold its values only for records that changed since,
and the other side's value is unknown, so an incremental plan could overwrite a value it never read.
A removed field stops syncing at once (the engine plans only mapped fields); its base column is kept,
so re-adding it compares against the last agreed values instead of treating every record as a conflict.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import duckdb

from sync_pipeline.config.model import Entity, FieldMap, SyncConfig
from sync_pipeline.engine.store.state import one_row


def entity_digest(config: SyncConfig | None, entity: Entity) -> str:
    """A short hash of one entity's mapping (a derived entity includes its source's): its code version."""
    parts = [entity.model_dump_json()]
    if config is not None and entity.derived_from and entity.derived_from in config.by_name:
        parts.append(config.by_name[entity.derived_from].model_dump_json())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def persons_digest(config: SyncConfig) -> str:
    """The person extract reads the union of the person entities' fields."""
    spec = json.dumps([f.model_dump(mode="json") for f in config.person_fields()], sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def code_version(config: SyncConfig | None, entity: Entity | None = None) -> str:
    """The ``code_version`` of an entity's assets (no entity: the Marketo person extract, from ``config``)."""
    if entity is not None:
        return "mapping-" + entity_digest(config, entity)
    assert config is not None
    return "mapping-" + persons_digest(config)


def field_spec(entity: Entity, f: FieldMap) -> dict[str, Any]:
    """What decides how a field syncs, as stored (JSON: picklist codes become text keys)."""
    return json.loads(
        json.dumps(
            {
                "dynamics": f.dynamics,
                "direction": entity.field_direction(f),
                "policy": entity.field_policy(f),
                "transform": f.transform,
                "options": f.options,
                "target": f.target,
            }
        )
    )


def _describe(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in new if old.get(k) != new.get(k))


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SEQUENCE IF NOT EXISTS mapping_seq START 1")
    con.execute("""CREATE TABLE IF NOT EXISTS mapping_entities (entity VARCHAR PRIMARY KEY, digest VARCHAR,
        state VARCHAR, changed_at TIMESTAMP)""")
    con.execute("""CREATE TABLE IF NOT EXISTS mapping_fields (entity VARCHAR, field VARCHAR, spec VARCHAR,
        state VARCHAR, changed_at TIMESTAMP, backfilled_at TIMESTAMP, backfill_run VARCHAR,
        PRIMARY KEY (entity, field))""")
    con.execute("""CREATE TABLE IF NOT EXISTS mapping_changes (seq BIGINT DEFAULT nextval('mapping_seq'),
        detected_at TIMESTAMP, entity VARCHAR, field VARCHAR, change VARCHAR, detail VARCHAR, noted_run VARCHAR)""")


def record(con: duckdb.DuckDBPyConnection, config: SyncConfig, now: Any) -> list[tuple[str, str | None, str]]:
    """Compare the configuration with the stored mapping; record and return (entity, field, change)."""
    create_tables(con)
    stored_entities = {
        r[0]: (r[1], r[2])
        for r in con.execute("SELECT entity, digest, state FROM mapping_entities").fetchall()
    }
    baseline = not stored_entities
    stored_fields = {
        (r[0], r[1]): (json.loads(r[2]), r[3])
        for r in con.execute("SELECT entity, field, spec, state FROM mapping_fields").fetchall()
    }
    changes: list[tuple[str, str | None, str, str]] = []
    for e in config.entities:
        digest = entity_digest(config, e)
        before = stored_entities.get(e.name)
        new_entity = baseline or before is None or before[1] == "removed"
        if before is None or before[0] != digest or before[1] == "removed":
            con.execute(
                "INSERT OR REPLACE INTO mapping_entities VALUES (?, ?, 'active', ?)", [e.name, digest, now]
            )
        if new_entity and not baseline:
            changes.append(
                (
                    e.name,
                    None,
                    "entity_added",
                    f"initial copy of {e.name} only: sync-pipeline resync --entity {e.name}",
                )
            )
        current = {f.marketo: f for f in e.all_fields}
        for name, f in current.items():
            spec = field_spec(e, f)
            old = stored_fields.get((e.name, name))
            if old is None or old[1] == "removed":
                # Fields of a new entity arrive with its initial copy; a field added to a synced entity
                # waits for its back-fill.
                state = "active" if new_entity else "pending"
                con.execute(
                    "INSERT OR REPLACE INTO mapping_fields VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                    [e.name, name, json.dumps(spec), state, now],
                )
                if state == "pending":
                    kind = "re-added" if old is not None else "added"
                    changes.append(
                        (
                            e.name,
                            name,
                            kind,
                            f"not synced until back-filled: sync-pipeline resync --entity {e.name} "
                            f"--field {name}",
                        )
                    )
            elif old[0] != spec:
                con.execute(
                    "UPDATE mapping_fields SET spec = ?, changed_at = ? WHERE entity = ? AND field = ?",
                    [json.dumps(spec), now, e.name, name],
                )
                changes.append(
                    (
                        e.name,
                        name,
                        "changed",
                        f"{_describe(old[0], spec)}; applies from the next change "
                        f"(sync-pipeline plan --all shows a full re-evaluation)",
                    )
                )
        for (ent, name), (_spec, state) in stored_fields.items():
            if ent == e.name and name not in current and state != "removed":
                con.execute(
                    "UPDATE mapping_fields SET state = 'removed', changed_at = ? "
                    "WHERE entity = ? AND field = ?",
                    [now, ent, name],
                )
                changes.append((ent, name, "removed", "no longer synced; its last agreed values are kept"))
    names = {e.name for e in config.entities}
    for ent, (_digest, state) in stored_entities.items():
        if ent not in names and state != "removed":
            con.execute(
                "UPDATE mapping_entities SET state = 'removed', changed_at = ? WHERE entity = ?", [now, ent]
            )
            con.execute(
                "UPDATE mapping_fields SET state = 'removed', changed_at = ? WHERE entity = ?", [now, ent]
            )
            changes.append((ent, None, "entity_removed", "no longer synced; its state is kept"))
    for ent, changed, kind, detail in changes:
        con.execute(
            "INSERT INTO mapping_changes (detected_at, entity, field, change, detail) VALUES (?, ?, ?, ?, ?)",
            [now, ent, changed, kind, detail],
        )
    return [(ent, changed, kind) for ent, changed, kind, _ in changes]


# Connections known to have the tables (never dropped once created): has_tables is asked by every step, and
# even duckdb_tables() costs ~1-2 ms a time. Weakly held, so a connection still closes when collected.
_HAVE_TABLES: weakref.WeakSet[Any] = weakref.WeakSet()


def has_tables(con: duckdb.DuckDBPyConnection) -> bool:
    if con in _HAVE_TABLES:
        return True
    # duckdb_tables() rather than information_schema (a view over several catalogs): 4x cheaper.
    found = bool(one_row(con, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'mapping_fields'")[0])
    if found:
        _HAVE_TABLES.add(con)
    return found


def pending_fields(con: duckdb.DuckDBPyConnection, entity: str) -> list[str]:
    """Fields added to ``entity`` whose back-fill has not run yet."""
    if not has_tables(con):
        return []
    return [
        r[0]
        for r in con.execute(
            "SELECT field FROM mapping_fields WHERE entity = ? AND state = 'pending' ORDER BY field", [entity]
        ).fetchall()
    ]


def effective(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity
) -> tuple[SyncConfig, Entity]:
    """The configuration an incremental plan uses: the mapping without fields still waiting for a back-fill."""
    pending: dict[str, set[str]] = {}
    if has_tables(con):
        rows = con.execute("SELECT entity, field FROM mapping_fields WHERE state = 'pending'").fetchall()
        # Whether the entity has a linked record: one row is enough (an EXISTS per row joined all of identity).
        copied = {
            ent: bool(
                one_row(con, "SELECT count(*) FROM (SELECT 1 FROM identity WHERE entity = ? LIMIT 1)", [ent])[
                    0
                ]
            )
            for ent in {r[0] for r in rows}
        }
        rows = [(ent, name, copied[ent]) for ent, name in rows]
        # An entity with no linked record yet (never copied, or re-baselined) gets every field with its copy.
        fresh = sorted({ent for ent, _name, copied in rows if not copied})
        if fresh:
            con.execute(
                "UPDATE mapping_fields SET state = 'active' WHERE state = 'pending' "
                "AND entity IN (SELECT unnest(?::VARCHAR[]))",
                [fresh],
            )
        for ent, name, copied in rows:
            if copied:
                pending.setdefault(ent, set()).add(name)
    if not pending:
        return config, entity
    entities = [
        restrict(e, [f.marketo for f in e.all_fields if f.marketo not in pending.get(e.name, set())])
        if e.name in pending
        else e
        for e in config.entities
    ]
    eff = config.model_copy(update={"entities": entities})
    eff.__dict__.pop("by_name", None)  # a cached property of the copied model
    return eff, eff.entity(entity.name)


def restrict(entity: Entity, fields: list[str], keep_rules: bool = True) -> Entity:
    """The entity mapping only ``fields`` (in mapping order); ``keep_rules=False`` also drops creating
    Dynamics leads from Marketo persons (a back-fill creates nothing)."""
    keep = set(fields)
    update: dict[str, Any] = {
        "fields": [f for f in entity.fields if f.marketo in keep],
        "extra_fields": [f for f in entity.extra_fields if f.marketo in keep],
    }
    if not keep_rules:
        update["create_in_dynamics"] = None
    return entity.model_copy(update=update)


def mark_backfilled(
    con: duckdb.DuckDBPyConnection, entity: str, fields: list[str], run_id: str, now: Any
) -> None:
    if not fields:
        return
    con.execute(
        """UPDATE mapping_fields SET state = 'active', backfilled_at = ?, backfill_run = ?
                   WHERE entity = ? AND field IN (SELECT unnest(?::VARCHAR[])) AND state <> 'removed'""",
        [now, run_id, entity, fields],
    )


def unnoted(con: duckdb.DuckDBPyConnection, entity: str) -> list[tuple[int, str | None, str, str]]:
    if not has_tables(con):
        return []
    return con.execute(
        """SELECT seq, field, change, detail FROM mapping_changes
                          WHERE entity = ? AND noted_run IS NULL ORDER BY seq""",
        [entity],
    ).fetchall()


def add_plan_notices(con: duckdb.DuckDBPyConnection, entity: str, run_id: str) -> int:
    """The plan says what changed in the mapping (target ``state``, op ``mapping``, no record ids)."""
    rows = [(field, detail, f"mapping:{change}") for _seq, field, change, detail in unnoted(con, entity)]
    told = {r[0] for r in rows}
    # A field added stays in every plan's notices until its back-fill ran.
    rows += [
        (
            name,
            f"not synced until back-filled: sync-pipeline resync --entity {entity} --field {name}",
            "mapping:pending",
        )
        for name in pending_fields(con, entity)
        if name not in told
    ]
    for field, detail, rule in rows:
        con.execute(
            """INSERT INTO plan (run_id, entity, target, op, field, new_value, rule)
                       VALUES (?, ?, 'state', 'mapping', ?, ?, ?)""",
            [run_id, entity, field, detail, rule],
        )
    return len(rows)


def note_in_ledger(con: duckdb.DuckDBPyConnection, entity: str, run_id: str, now: Any) -> int:
    """The first push after a mapping change records it in the ledger (op ``mapping``, rule ``mapping:<change>``)."""
    rows = unnoted(con, entity)
    for seq, field, change, detail in rows:
        con.execute(
            """INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                           value_before, value_after, rule)
                       VALUES (?, ?, ?, NULL, NULL, 'state', 'mapping', ?, NULL, ?, ?)""",
            [run_id, now, entity, field, detail, f"mapping:{change}"],
        )
        con.execute("UPDATE mapping_changes SET noted_run = ? WHERE seq = ?", [run_id, seq])
    return len(rows)
