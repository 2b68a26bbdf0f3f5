"""The ledger: the only writer of the sync's state — the base (``b_<entity>``, ``b__split``), identity (links
between Dynamics records and Marketo persons), pending marks (``pending_seq`` on the mirrors) and failures
(with conflicts and the ``ledger`` table of every write). The stages decide; they call these functions to
record what they decided or what happened.

Outcomes of a push arrive as a table (``record_outcomes``): one transaction then advances the base and the
mirrors for the writes that succeeded, appends the ledger, and files failures with backoff (held after the
limit); ``finish`` takes the applied records out of the work set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from sync_pipeline.clients import errors
from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.store.state import (
    KEYED_CHUNK,
    column,
    ensure_split_base,
    fcol,
    get_cursor,
    keyed_execute,
    keyed_rows,
    next_seq,
    one_row,
    qi,
    set_cursor,
    sql_text,
)

IDENTITY_INSERT = "INSERT INTO identity (entity, dynamics_id, marketo_id, state, linked_at, how)"
# Not INSERT OR REPLACE: identity's marketo_id is indexed, and DuckDB's OR REPLACE leaves indexed columns as they were.
IDENTITY_UPSERT = """ON CONFLICT (entity, dynamics_id) DO UPDATE SET marketo_id = excluded.marketo_id, state = excluded.state,
    linked_at = excluded.linked_at, how = excluded.how"""
FAILURES_INSERT = """INSERT INTO failures (entity, dynamics_id, target, op, marketo_id, field, code, message, attempts,
                                          first_failed_at, last_failed_at, next_attempt_at, held, run_id)"""


# ---- pending marks: a record with a mark is in the next plan's work set -------------------------------------------


def mark_pending(con: duckdb.DuckDBPyConnection, entity: str, dynamics_ids: Iterable[str]) -> int:
    """Put Dynamics records of ``entity`` into the next plan (a new mark, so a plan already running for them
    does not clear it: ``finish`` only clears the mark it planned)."""
    ids = list(dynamics_ids)
    if not ids:
        return 0
    res = con.execute(
        f"UPDATE {qi('d_' + entity)} SET pending_seq = ? WHERE id IN (SELECT unnest(?::VARCHAR[]))",
        [next_seq(con), ids],
    ).fetchone()
    return int(res[0]) if res else 0


def relabel(con: duckdb.DuckDBPyConnection, entity: str, field: str, pairs: list[tuple[str, str]]) -> int:
    """Mirrored rows holding an old option label (``pairs``: old -> new) take the new one and become pending, in
    one statement (a crash cannot leave a relabelled row unplanned)."""
    col = fcol(field)
    whens = " ".join("WHEN ? THEN ?" for _ in pairs)
    res = con.execute(
        f"""UPDATE {qi("d_" + entity)} SET {col} = CASE {col} {whens} END, pending_seq = ?
                          WHERE NOT deleted AND {col} IN (SELECT unnest(?::VARCHAR[]))""",
        [v for pair in pairs for v in pair] + [next_seq(con), [p[0] for p in pairs]],
    ).fetchone()
    return int(res[0]) if res else 0


def mark_persons_pending(con: duckdb.DuckDBPyConnection, marketo_ids: Iterable[int]) -> int:
    ids = [int(i) for i in marketo_ids]
    if not ids:
        return 0
    res = con.execute(
        "UPDATE m_person SET pending_seq = ? WHERE id IN (SELECT unnest(?::BIGINT[]))", [next_seq(con), ids]
    ).fetchone()
    return int(res[0]) if res else 0


def mark_deleted(
    con: duckdb.DuckDBPyConnection, entity: str, dynamics_ids: list[str], partition_key: str, now: datetime
) -> int:
    """Dynamics rows reported deleted: flagged in the mirror and pending (the plan decides what follows)."""
    res = con.execute(
        f"""UPDATE {qi("d_" + entity)} SET deleted = true, pending_seq = ?, partition_key = ?,
                              seen_at = ? WHERE id IN (SELECT unnest(?::VARCHAR[])) AND NOT deleted""",
        [next_seq(con), partition_key, now, dynamics_ids],
    ).fetchone()
    return int(res[0]) if res else 0


def mark_persons_deleted(con: duckdb.DuckDBPyConnection, marketo_ids: list[int], now: datetime) -> int:
    """Marketo persons deleted there: flagged and pending; a person never mirrored may still be linked (created
    by us), so it gets a tombstone row."""
    seq = next_seq(con)
    res = con.execute(
        """UPDATE m_person SET deleted = true, pending_seq = ?, seen_at = ?
                         WHERE id IN (SELECT unnest(?::BIGINT[])) AND NOT deleted""",
        [seq, now, marketo_ids],
    ).fetchone()
    known = {
        r[0]
        for r in con.execute(
            "SELECT id FROM m_person WHERE id IN (SELECT unnest(?::BIGINT[]))", [marketo_ids]
        ).fetchall()
    }
    new = sorted(set(marketo_ids) - known)
    if new:
        con.execute(
            """INSERT INTO m_person (id, deleted, seen_at, pending_seq)
                       SELECT unnest(?::BIGINT[]), true, ?, ?""",
            [new, now, seq],
        )
    return (int(res[0]) if res else 0) + len(new)


def retire_merged_persons(
    con: duckdb.DuckDBPyConnection, winner: int, losers: list[int], now: datetime
) -> None:
    """Marketo merged ``losers`` into ``winner``: the losers leave the mirror (``merged_into``, not a user's delete,
    so no tombstone) and the work set."""
    con.execute(
        """UPDATE m_person SET deleted = true, merged_into = ?, pending_seq = NULL, seen_at = ?
                   WHERE id IN (SELECT unnest(?::BIGINT[])) AND merged_into IS DISTINCT FROM ?""",
        [winner, now, losers, winner],
    )


def settle_restored_field(
    con: duckdb.DuckDBPyConnection, entity: str, field: str, run_id: str, now: datetime
) -> None:
    """After a rollback restored ``field`` of the records in temp table ``restored_field`` (did, target, restored,
    other, agreed): where both systems agree again the base takes the value and any split ends; where they
    differ (as before the run) each system keeps its own agreed value (``b__split``) until either side changes."""
    b, col = qi(f"b_{entity}"), fcol(field)
    con.execute(
        """DELETE FROM b__split WHERE entity = ? AND field = ?
                   AND dynamics_id IN (SELECT did FROM restored_field WHERE agreed)""",
        [entity, field],
    )
    con.execute(
        f"""INSERT INTO {b} (dynamics_id, synced_at, run_id, {col})
                    SELECT did, ?, ?, restored FROM restored_field WHERE agreed
                    ON CONFLICT (dynamics_id) DO UPDATE SET {col} = excluded.{col}, synced_at = excluded.synced_at,
                        run_id = excluded.run_id""",
        [now, run_id],
    )
    con.execute(
        """INSERT OR REPLACE INTO b__split (entity, dynamics_id, field, d_value, m_value, run_id, split_at)
                   SELECT ?, did, ?, CASE target WHEN 'dynamics' THEN restored ELSE other END,
                          CASE target WHEN 'dynamics' THEN other ELSE restored END, ?, ?
                   FROM restored_field WHERE NOT agreed""",
        [entity, field, run_id, now],
    )
    con.execute("DROP TABLE restored_field")


# ---- derived marks: what a derived entity's plan (opportunity roles) looks at again --------------------------------

# Derived roles follow the customer contact's active link and its quarantine (engine/plan/roles.py).
LINKED = "contact"


def _mark_links(
    con: duckdb.DuckDBPyConnection, entity: str, ids_query: str, params: list | None = None
) -> None:
    """The link (or quarantine) of the records ``ids_query`` returns is about to change: for contacts, the derived
    plans look at the opportunities they are the customer of again. Written before the change, in the same
    transaction where there is one; a mark for a change that did not happen only costs a look."""
    if entity == LINKED:
        con.execute(
            f"""INSERT INTO derived_marks (kind, id, seq)
                        SELECT ?, CAST(s.id AS VARCHAR), nextval('change_seq') FROM ({ids_query}) s (id)""",
            [entity, *(params or [])],
        )


def mark_applied(
    con: duckdb.DuckDBPyConnection, entity: str, ids_query: str, params: list | None = None
) -> None:
    """Records of ``entity`` (a derived entity's source) whose planned change was applied: their pending marks
    go, so the derived plan finds them here."""
    con.execute(
        f"""INSERT INTO derived_marks (kind, id, seq)
                    SELECT ?, CAST(s.id AS VARCHAR), nextval('change_seq') FROM ({ids_query}) s (id)""",
        [entity, *(params or [])],
    )


# Set once a derived entity's plan was applied in full: until then its plan compares every source record.
DERIVED_COMPLETE = "derived:complete:"


def _finish_derived(con: duckdb.DuckDBPyConnection, entity: str) -> None:
    """A derived plan was applied: the marks it covered (up to the ``d_seq`` it noted in ``plan_work``) are dropped.
    (One derived entity reads these marks: the configuration allows a single one.)"""
    upto = one_row(
        con, "SELECT max(d_seq), bool_or(marketo_id = 'full') FROM plan_work WHERE entity = ?", [entity]
    )
    if upto[0] is not None:
        con.execute("DELETE FROM derived_marks WHERE seq <= ?", [upto[0]])
    if upto[1]:
        set_cursor(con, DERIVED_COMPLETE + entity, "true")
    con.execute("DELETE FROM plan_work WHERE entity = ?", [entity])


# ---- identity ---------------------------------------------------------------------------------------------------


def link(
    con: duckdb.DuckDBPyConnection,
    entity: str,
    source: str,
    how: str,
    now: datetime,
    state: str = "active",
    params: list | None = None,
) -> int:
    """New identity rows for ``entity``: ``source`` is a query returning (did, mid). Returns the rows added."""
    _mark_links(con, entity, f"SELECT s.did FROM ({source}) s", params)
    res = con.execute(
        f"""INSERT INTO identity (entity, dynamics_id, marketo_id, state, linked_at, how)
                          SELECT ?, s.did, s.mid, ?, ?, ? FROM ({source}) s""",
        [entity, state, now, how, *(params or [])],
    ).fetchone()
    return int(res[0]) if res else 0


def set_link_state(
    con: duckdb.DuckDBPyConnection, entity: str, ids_query: str, state: str, params: list | None = None
) -> None:
    """Links of ``entity`` whose record id ``ids_query`` returns take ``state`` (converted, merged, deleted, ...)."""
    for chunk in _chunks(column(con, f"SELECT DISTINCT * FROM ({ids_query})", params)):
        _mark_links(con, entity, "SELECT unnest(?::VARCHAR[])", [chunk])
        # The id list is the only filter of the scan, so identity is read through its dynamics_id index; rows of
        # other entities with the same id keep their state.
        con.execute(
            f"""UPDATE identity SET state = CASE WHEN entity = ? THEN ? ELSE state END
                        WHERE dynamics_id IN ({", ".join("?" * len(chunk))})""",
            [entity, state, *chunk],
        )


def _empty(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> bool:
    """No row in a small (work-sized) query: a statement driven by it that would still scan its target is skipped."""
    return one_row(con, f"SELECT count(*) FROM ({sql} LIMIT 1)", params or [])[0] == 0


def _chunks(keys: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(keys), KEYED_CHUNK):
        yield keys[i : i + KEYED_CHUNK]


def write_base(con: duckdb.DuckDBPyConnection, entity: str, fields: list[str], source: str) -> None:
    """Base rows (insert or replace) from ``source``: a query returning dynamics_id, synced_at, run_id and then
    the ``fields`` in order."""
    cols = "".join(f", {fcol(f)}" for f in fields)
    con.execute(f"INSERT OR REPLACE INTO {qi('b_' + entity)} (dynamics_id, synced_at, run_id{cols}) {source}")


def move_base(con: duckdb.DuckDBPyConnection, entity: str, pairs: str) -> None:
    """Copy each record's base to another record: ``pairs`` is a query returning (sub, master)."""
    b = qi(f"b_{entity}")
    con.execute(f"""INSERT OR REPLACE INTO {b} SELECT x.* REPLACE (p.master AS dynamics_id)
                    FROM {b} x JOIN ({pairs}) p ON p.sub = x.dynamics_id""")


def base_takes_record_opt_ins(
    con: duckdb.DuckDBPyConnection, entity: str, fields: list[str], pairs: str
) -> None:
    """For each (sub, master) of ``pairs``: where the master's base says opted out (consent ``fields``) and the master
    row says otherwise, the base takes the row's value, so the opt-out is what flows (to the master)."""
    b, d = qi(f"b_{entity}"), qi(f"d_{entity}")
    for f in fields:
        c = fcol(f)
        con.execute(f"""UPDATE {b} SET {c} = d.{c} FROM ({pairs}) p JOIN {d} d ON d.id = p.master
                        WHERE {b}.dynamics_id = p.master AND {b}.{c} = 'true' AND d.{c} IS DISTINCT FROM 'true'""")


def relink(
    con: duckdb.DuckDBPyConnection, entity: str, dynamics_id: str, marketo_id: str, how: str, now: datetime
) -> None:
    """The record's link moves to another person (it stays active)."""
    _mark_links(con, entity, "SELECT ?", [dynamics_id])
    con.execute(
        """UPDATE identity SET marketo_id = ?, how = ?, linked_at = ? WHERE entity = ? AND dynamics_id = ?""",
        [marketo_id, how, now, entity, dynamics_id],
    )


def retire_link(
    con: duckdb.DuckDBPyConnection, entity: str, dynamics_id: str, marketo_id: str, now: datetime
) -> None:
    """The record stops syncing because its person merged into one another record keeps (state ``merged``)."""
    _mark_links(con, entity, "SELECT ?", [dynamics_id])
    con.execute(
        """UPDATE identity SET marketo_id = ?, state = 'merged', linked_at = ?
                   WHERE entity = ? AND dynamics_id = ?""",
        [marketo_id, now, entity, dynamics_id],
    )


def repoint_inactive_links(
    con: duckdb.DuckDBPyConnection, entities: list[str], losers: list[str], winner: str
) -> None:
    """Links no longer synced (converted, tombstoned, ...) that named a merged-away person name the winner."""
    con.execute(
        """UPDATE identity SET marketo_id = ? WHERE state <> 'active'
                   AND entity IN (SELECT unnest(?::VARCHAR[])) AND marketo_id IN (SELECT unnest(?::VARCHAR[]))""",
        [winner, entities, losers],
    )


def base_takes_person_opt_ins(
    con: duckdb.DuckDBPyConnection, entity: str, dynamics_id: str, marketo_id: int, fields: list[str]
) -> None:
    """Where the record's base says opted out (consent ``fields``) and the person says otherwise, the base takes
    the person's value, so the plan reads the record's opt-out as the change (written to the person)."""
    b = qi(f"b_{entity}")
    for f in fields:
        col = fcol(f)
        con.execute(
            f"""UPDATE {b} SET {col} = m.{col} FROM m_person m
                        WHERE {b}.dynamics_id = ? AND m.id = ? AND {b}.{col} = 'true'
                          AND m.{col} IS DISTINCT FROM 'true'""",
            [dynamics_id, marketo_id],
        )


def note_state_changes(
    con: duckdb.DuckDBPyConnection, run_id: str | None, now: datetime, rows: list[tuple]
) -> None:
    """Ledger rows (target ``state``): (entity, dynamics_id, marketo_id, op, field, before, after, rule)."""
    if rows:
        con.executemany(
            """INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                               value_before, value_after, rule)
                           VALUES (?, ?, ?, ?, ?, 'state', ?, ?, ?, ?, ?)""",
            [[run_id, now, *row] for row in rows],
        )


def note_state_changes_from(
    con: duckdb.DuckDBPyConnection, run_id: str, now: datetime, source: str, params: list | None = None
) -> None:
    """Ledger rows (target ``state``) from a query returning entity, dynamics_id, marketo_id, op, field,
    value_before, value_after, rule."""
    con.execute(
        f"""INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                        value_before, value_after, rule)
                    SELECT ?, ?, s.entity, s.dynamics_id, s.marketo_id, 'state', s.op, s.field, s.value_before,
                           s.value_after, s.rule FROM ({source}) s""",
        [run_id, now, *(params or [])],
    )


def note_import_warnings(
    con: duckdb.DuckDBPyConnection, entity: str, source: str, run_id: str, now: datetime
) -> None:
    """Rows a Marketo bulk import took with a warning (``source``: did, reason): ledger rows of target
    ``marketo:bulk``, op ``warning`` (informational; rollback replays only targets marketo and dynamics)."""
    con.execute(
        f"""INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                        value_before, value_after, rule)
                    SELECT ?, ?, ?, did, NULL, 'marketo:bulk', 'warning', NULL, NULL, reason, 'bulk_import'
                    FROM {source}""",
        [run_id, now, entity],
    )


# ---- failures ---------------------------------------------------------------------------------------------------


def settle_quarantine(con: duckdb.DuckDBPyConnection, entity: str, run_id: str, now: datetime) -> None:
    """The plan looked at the records of temp table ``work_set`` and found those of ``quarantined`` (did, code,
    message) damaged: the repaired ones lose their quarantine row, the damaged ones are filed (held)."""
    _mark_links(
        con,
        entity,
        """SELECT dynamics_id FROM failures WHERE entity = ? AND target = 'quarantine'
           AND dynamics_id IN (SELECT did FROM work_set) AND dynamics_id NOT IN (SELECT did FROM quarantined)
           UNION SELECT did FROM quarantined WHERE did NOT IN
               (SELECT dynamics_id FROM failures WHERE entity = ? AND target = 'quarantine')""",
        [entity, entity],
    )
    con.execute(
        """DELETE FROM failures WHERE entity = ? AND target = 'quarantine'
                   AND dynamics_id IN (SELECT did FROM work_set) AND dynamics_id NOT IN (SELECT did FROM quarantined)""",
        [entity],
    )
    if _empty(con, "SELECT 1 FROM quarantined"):
        return
    con.execute(
        f"""{FAILURES_INSERT}
                    SELECT ?, q.did, 'quarantine', 'quarantine', i.marketo_id, NULL, q.code, q.message, 1, ?, ?, NULL,
                           true, ?
                    FROM quarantined q LEFT JOIN identity i ON i.entity = ? AND i.dynamics_id = q.did
                    ON CONFLICT (entity, dynamics_id, target) DO UPDATE SET code = excluded.code,
                        message = excluded.message, marketo_id = excluded.marketo_id,
                        last_failed_at = excluded.last_failed_at, held = true, run_id = excluded.run_id""",
        [entity, now, now, run_id, entity],
    )


def keep_failures(con: duckdb.DuckDBPyConnection, entity: str) -> None:
    """Remember the entity's failures (temp table ``kept_failures``) before a push that is not the sync's own
    (a back-fill): ``restore_failures`` puts back the ones that push cleared without settling them."""
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kept_failures AS SELECT * FROM failures WHERE entity = ?", [entity]
    )


def restore_failures(con: duckdb.DuckDBPyConnection) -> None:
    cols = (
        "entity, dynamics_id, target, op, marketo_id, field, code, message, attempts, first_failed_at, "
        "last_failed_at, next_attempt_at, held, run_id"
    )
    _mark_links(
        con,
        LINKED,
        """SELECT dynamics_id FROM kept_failures f WHERE entity = ? AND target = 'quarantine' AND NOT EXISTS
           (SELECT 1 FROM failures x WHERE x.entity = f.entity AND x.dynamics_id = f.dynamics_id
            AND x.target = f.target)""",
        [LINKED],
    )
    con.execute(f"""INSERT INTO failures ({cols}) SELECT {cols} FROM kept_failures f WHERE NOT EXISTS
                    (SELECT 1 FROM failures x WHERE x.entity = f.entity AND x.dynamics_id = f.dynamics_id
                     AND x.target = f.target)""")
    con.execute("DROP TABLE IF EXISTS kept_failures")


def release(
    con: duckdb.DuckDBPyConnection,
    entity: str,
    dynamics_id: str,
    target: str,
    marketo_id: str | None,
    now: datetime,
    *,
    mirrored: bool,
    person: bool,
) -> None:
    """A held record gets another attempt now: unheld, due at once, and pending so the next plan covers it (the
    attempt counter stays: failing again holds it again at once)."""
    con.execute(
        """UPDATE failures SET held = false, next_attempt_at = ?
                   WHERE entity = ? AND dynamics_id = ? AND target = ?""",
        [now, entity, dynamics_id, target],
    )
    if mirrored:
        mark_pending(con, entity, [dynamics_id])
    if (
        person and marketo_id and str(marketo_id).strip().isdigit()
    ):  # e.g. a lead to create from a Marketo person
        mark_persons_pending(con, [int(marketo_id)])


# ---- push outcomes ------------------------------------------------------------------------------------------


def record_outcomes(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    target: str,
    outcomes: pa.Table,
    run_id: str,
    now: datetime,
) -> None:
    """One transaction per page of outcomes (columns did, op, ok, mid, code, message, kind)."""
    con.register("outcome_page", outcomes)
    try:
        con.execute("BEGIN TRANSACTION")
        con.execute("CREATE OR REPLACE TEMP TABLE push_outcomes AS SELECT * FROM outcome_page")
        _on_success(con, config, entity, target, run_id, now)
        _on_failure(con, config, entity, target, run_id, now)
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("outcome_page")


def held_count(con: duckdb.DuckDBPyConnection, entity: str, target: str) -> int:
    return int(
        one_row(
            con, "SELECT count(*) FROM failures WHERE entity = ? AND target = ? AND held", [entity, target]
        )[0]
    )


def hold_fields(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    dropped: list[tuple[str, list[tuple[str, str]]]],
    run_id: str,
    now: datetime,
) -> None:
    """Fields left out of a write are held with their reason; their base stays, so nothing is lost."""
    if not dropped:
        return
    fields = pa.table(
        {"did": [d for d, bad in dropped for _ in bad], "field": [f for _, bad in dropped for f, _ in bad]}
    )
    held = pa.table(
        {
            "did": [d for d, _ in dropped],
            "fields": [",".join(f for f, _ in bad) for _, bad in dropped],
            "message": [
                f"{entity.name} {d}: " + "; ".join(f"field {f}: {m}" for f, m in bad) for d, bad in dropped
            ],
        }
    )
    con.register("held_fields", fields)
    con.register("held_records", held)
    try:
        con.execute(
            """DELETE FROM plan WHERE entity = ? AND target = 'dynamics'
                       AND (dynamics_id, field) IN (SELECT (did, field) FROM held_fields)""",
            [entity.name],
        )
        con.execute(
            """INSERT OR REPLACE INTO failures (entity, dynamics_id, target, op, marketo_id, field, code, message,
                           attempts, first_failed_at, last_failed_at, next_attempt_at, held, run_id)
                       SELECT ?, did, 'dynamics:fields', 'update', NULL, fields,
                       'invalid_value', message, 1, ?, ?, ?, true, ? FROM held_records""",
            [entity.name, now, now, now, run_id],
        )
    finally:
        con.unregister("held_fields")
        con.unregister("held_records")


def _on_success(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    target: str,
    run_id: str,
    now: datetime,
) -> None:
    e = entity.name
    con.execute(
        """CREATE OR REPLACE TEMP TABLE written_plan AS
        SELECT p.*, r.mid AS result_mid FROM plan p JOIN push_outcomes r ON r.did = p.dynamics_id AND r.op = p.op AND r.ok
        WHERE p.entity = ? AND p.target = ?""",
        [e, target],
    )
    con.execute(
        """INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field, value_before,
                                       value_after, rule)
        SELECT ?, ?, entity, dynamics_id, COALESCE(result_mid, marketo_id), target, op, field, old_value, new_value, rule
        FROM written_plan""",
        [run_id, now],
    )
    con.execute(
        "DELETE FROM failures WHERE entity = ? AND target = ? AND dynamics_id IN (SELECT did FROM push_outcomes WHERE ok)",
        [e, target],
    )
    # Identity: creates link, deletes and flags retire the link.
    if entity.is_derived:
        con.execute(f"""DELETE FROM {qi("b_" + e)} WHERE dynamics_id IN
            (SELECT did FROM push_outcomes WHERE ok AND op = 'delete')""")
        con.execute(
            f"""INSERT OR REPLACE INTO {qi("b_" + e)} (dynamics_id, synced_at, run_id, f_leadId, f_role,
                f_externalOpportunityId)
            SELECT dynamics_id, ?, ?, max(CASE WHEN field = 'leadId' THEN new_value END),
                   max(CASE WHEN field = 'role' THEN new_value END), dynamics_id
            FROM written_plan WHERE op = 'create' GROUP BY dynamics_id""",
            [now, run_id],
        )
        return
    creates = not _empty(con, "SELECT 1 FROM push_outcomes WHERE ok AND op = 'create'")
    if target == "marketo":
        if creates:
            _mark_links(con, e, "SELECT did FROM push_outcomes WHERE ok AND op = 'create'")
            con.execute(
                f"""{IDENTITY_INSERT}
            SELECT ?, did, COALESCE(mid, did), 'active', ?, 'created' FROM push_outcomes WHERE ok AND op = 'create'
            {IDENTITY_UPSERT}""",
                [e, now],
            )
        set_link_state(
            con, e, "SELECT did FROM push_outcomes WHERE ok AND op IN ('delete', 'flag')", "deleted"
        )
        _on_merged(con, e, now)
    elif creates:
        _mark_links(con, e, "SELECT did FROM push_outcomes WHERE ok AND op = 'create'")
        con.execute(
            f"""{IDENTITY_INSERT}
            SELECT ?, did, mid, 'active', ?, 'created_in_dynamics' FROM push_outcomes WHERE ok AND op = 'create'
            {IDENTITY_UPSERT}""",
            [e, now],
        )
        keyed_execute(
            con,
            """UPDATE m_person SET f_dynamicsId = r.did, f_dynamicsType = ? FROM push_outcomes r
                       WHERE r.ok AND r.op = 'create' AND m_person.id = TRY_CAST(r.mid AS BIGINT) AND m_person.id IN {keys}""",
            "SELECT TRY_CAST(mid AS BIGINT) FROM push_outcomes WHERE ok AND op = 'create'",
            [entity.marketo.type_value or entity.name.title()],
            on=("m_person", "id"),
        )
    _advance_base(con, entity, "written_plan", run_id, now)
    if entity.is_person:
        _update_person_mirror(con, config, entity, target, run_id, now)


def _on_merged(con: duckdb.DuckDBPyConnection, e: str, now: datetime) -> None:
    """A merged subordinate's person is gone into the master's: its link retires, the loser is retired in the
    mirror (``merged_into``; the Merge Leads activity read later finds nothing left to do)."""
    if not one_row(con, "SELECT count(*) FROM written_plan WHERE op = 'merge'")[0]:
        return
    _mark_links(con, e, "SELECT dynamics_id FROM written_plan WHERE op = 'merge'")
    con.execute(
        """UPDATE identity SET state = 'merged', marketo_id = written_plan.new_value FROM written_plan
                   WHERE written_plan.op = 'merge' AND identity.entity = ? AND identity.dynamics_id = written_plan.dynamics_id""",
        [e],
    )
    con.execute(
        """UPDATE m_person SET deleted = true, merged_into = TRY_CAST(written_plan.new_value AS BIGINT),
                   pending_seq = NULL, seen_at = ? FROM written_plan
                   WHERE written_plan.op = 'merge' AND m_person.id = TRY_CAST(written_plan.old_value AS BIGINT)""",
        [now],
    )


def _advance_base(
    con: duckdb.DuckDBPyConnection, entity: Entity, source: str, run_id: str, now: datetime
) -> None:
    fields = [f.marketo for f in entity.all_fields]
    b = qi(f"b_{entity.name}")
    pivots = ", ".join(
        f"bool_or(field = '{f}') AS {qi('h_' + f)}, "
        f"max(CASE WHEN field = '{f}' THEN new_value END) AS {qi('v_' + f)}"
        for f in fields
    )
    con.execute(f"""CREATE OR REPLACE TEMP TABLE new_base AS SELECT dynamics_id, {pivots} FROM {source}
                    WHERE op IN ('create', 'update', 'agree') GROUP BY dynamics_id""")
    ids = "SELECT dynamics_id FROM new_base"
    keyed_rows(con, "base_known", b, "dynamics_id", ids, columns="dynamics_id")
    con.execute(
        f"""INSERT INTO {b} (dynamics_id, synced_at, run_id)
                    SELECT dynamics_id, ?, ? FROM new_base WHERE dynamics_id NOT IN (SELECT dynamics_id FROM base_known)""",
        [now, run_id],
    )
    sets = ", ".join(
        f"{fcol(f)} = CASE WHEN new_base.{qi('h_' + f)} THEN new_base.{qi('v_' + f)} ELSE {b}.{fcol(f)} END"
        for f in fields
    )
    keyed_execute(
        con,
        f"""UPDATE {b} SET synced_at = ?, run_id = ?, {sets} FROM new_base
                           WHERE {b}.dynamics_id = new_base.dynamics_id AND {b}.dynamics_id IN {{keys}}""",
        ids,
        [now, run_id],
        on=(b, "dynamics_id"),
    )
    # A field written or agreed on again has one base again (a rollback's split base ends here).
    ensure_split_base(con)
    con.execute(
        f"""DELETE FROM b__split WHERE entity = ? AND (dynamics_id, field) IN
                    (SELECT (dynamics_id, field) FROM {source} WHERE op IN ('create', 'update', 'agree'))""",
        [entity.name],
    )


def _update_person_mirror(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    target: str,
    run_id: str,
    now: datetime,
) -> None:
    """What we wrote is now what the target holds: mirror it, so neither the echo nor a stale read bounces."""
    mirror_cols = {
        r[0][2:]
        for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'm_person'"
        ).fetchall()
        if r[0].startswith("f_")
    }
    fields = [f.marketo for f in entity.all_fields if f.marketo in mirror_cols] + [
        f for f in ("dynamicsId", "dynamicsType", "dynamicsIsDeleted") if f in mirror_cols
    ]
    fields = list(dict.fromkeys(fields))
    pivots = ", ".join(
        f"bool_or(field = '{f}') AS {qi('h_' + f)}, "
        f"max(CASE WHEN field = '{f}' THEN new_value END) AS {qi('v_' + f)}"
        for f in fields
    )
    con.execute(f"""CREATE OR REPLACE TEMP TABLE new_mirror AS
        SELECT dynamics_id, any_value(COALESCE(result_mid, marketo_id)) AS mid, any_value(op) AS op, {pivots}
        FROM written_plan WHERE op IN ('create', 'update', 'flag') GROUP BY dynamics_id""")
    if target == "marketo":
        typ = entity.marketo.type_value or entity.name.title()
        mids = "SELECT TRY_CAST(mid AS BIGINT) FROM new_mirror"
        created = "SELECT TRY_CAST(mid AS BIGINT) FROM new_mirror WHERE op = 'create'"
        keyed_rows(con, "persons_known", "m_person", "id", created, columns="id")
        con.execute(
            """INSERT INTO m_person (id, deleted, seen_at, f_dynamicsId, f_dynamicsType, f_dynamicsIsDeleted)
            SELECT TRY_CAST(mid AS BIGINT), false, ?, dynamics_id, ?, 'false' FROM new_mirror
            WHERE op = 'create' AND TRY_CAST(mid AS BIGINT) IS NOT NULL
              AND TRY_CAST(mid AS BIGINT) NOT IN (SELECT id FROM persons_known)""",
            [now, typ],
        )
        sets = ", ".join(
            f"{fcol(f)} = CASE WHEN new_mirror.{qi('h_' + f)} THEN new_mirror.{qi('v_' + f)} ELSE m_person.{fcol(f)} END"
            for f in fields
        )
        keyed_execute(
            con,
            f"""UPDATE m_person SET {sets} FROM new_mirror
                               WHERE m_person.id = TRY_CAST(new_mirror.mid AS BIGINT) AND m_person.id IN {{keys}}""",
            mids,
            on=("m_person", "id"),
        )
    else:
        d = qi(f"d_{entity.name}")
        dfields = [f for f in fields if f in {g.marketo for g in entity.all_fields}]
        sets = ", ".join(
            f"{fcol(f)} = CASE WHEN new_mirror.{qi('h_' + f)} THEN new_mirror.{qi('v_' + f)} ELSE {d}.{fcol(f)} END"
            for f in dfields
        )
        if sets:
            keyed_execute(
                con,
                f"UPDATE {d} SET {sets} FROM new_mirror WHERE {d}.id = new_mirror.dynamics_id AND {d}.id IN {{keys}}",
                "SELECT dynamics_id FROM new_mirror",
                on=(d, "id"),
            )


def _on_failure(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    target: str,
    run_id: str,
    now: datetime,
) -> None:
    retry = config.sync.retry
    if _empty(con, "SELECT 1 FROM push_outcomes WHERE NOT ok"):
        return
    con.execute(
        f"""{FAILURES_INSERT}
        SELECT ?, r.did, ?, r.op, r.mid, NULL, r.code, r.message, 1, ?, ?, ? + to_seconds(?), 1 >= ?, ?
        FROM push_outcomes r WHERE NOT r.ok
        ON CONFLICT (entity, dynamics_id, target) DO UPDATE SET op = excluded.op, code = excluded.code,
            message = excluded.message, attempts = failures.attempts + 1, last_failed_at = excluded.last_failed_at,
            next_attempt_at = excluded.last_failed_at + to_seconds(? * pow(2, failures.attempts)),
            held = failures.attempts + 1 >= ?, run_id = excluded.run_id""",
        [
            entity.name,
            target,
            now,
            now,
            now,
            retry.backoff_seconds,
            retry.max_attempts,
            run_id,
            retry.backoff_seconds,
            retry.max_attempts,
        ],
    )
    # The Dynamics record changed since it was read, or vanished: read it again before planning anything else.
    if target == "dynamics":
        keyed_execute(
            con,
            f"UPDATE {qi('d_' + entity.name)} SET pending_seq = nextval('change_seq') WHERE id IN {{keys}}",
            column(
                con,
                "SELECT did FROM push_outcomes WHERE NOT ok AND kind IN (?, ?)",
                [errors.CHANGED, errors.GONE],
            ),
            on=(qi("d_" + entity.name), "id"),
        )
    # The Marketo person or object an update was for is gone there: tombstone instead of retrying.
    if target == "marketo":
        set_link_state(
            con,
            entity.name,
            "SELECT did FROM push_outcomes WHERE NOT ok AND kind = ? AND op IN ('update', 'flag')",
            "tombstoned",
            [errors.GONE],
        )


def apply_local(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str, now: datetime
) -> None:
    """Plan rows that need no API call: agreements, held conflicts, rejects, tombstones, retirements."""
    e = entity.name
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE written_plan AS SELECT *, NULL AS result_mid FROM plan "
            "WHERE entity = ? AND target = 'base'",
            [e],
        )
        if not entity.is_derived:
            _advance_base(con, entity, "written_plan", run_id, now)
        con.execute(
            """INSERT OR REPLACE INTO conflicts (entity, dynamics_id, marketo_id, field, dynamics_value,
                                                         marketo_value, base_value, detected_at, run_id)
            SELECT entity, dynamics_id, marketo_id, field, new_value, old_value, base_value, ?, run_id
            FROM plan WHERE entity = ? AND op = 'hold'""",
            [now, e],
        )
        if not _empty(con, "SELECT 1 FROM plan WHERE entity = ? AND op = 'reject'", [e]):
            con.execute(
                f"""{FAILURES_INSERT}
            SELECT entity, dynamics_id, 'marketo', 'reject', marketo_id, any_value(field), 'invalid_value',
                   'field ' || any_value(field) || ': ' || any_value(replace(new_value, ?, 'unknown option code ')),
                   ?, ?, ?, ?, true, ?
            FROM plan WHERE entity = ? AND op = 'reject' GROUP BY entity, dynamics_id, marketo_id
            ON CONFLICT (entity, dynamics_id, target) DO UPDATE SET code = excluded.code, message = excluded.message,
                last_failed_at = excluded.last_failed_at, held = true, attempts = failures.attempts + 1""",
                [normalize.INVALID, config.sync.retry.max_attempts, now, now, now, run_id, e],
            )
        set_link_state(
            con, e, "SELECT dynamics_id FROM plan WHERE entity = ? AND op = 'tombstone'", "tombstoned", [e]
        )
        set_link_state(
            con, e, "SELECT dynamics_id FROM plan WHERE entity = ? AND op = 'retire'", "deleted", [e]
        )
        # Merged in Dynamics (Merge): the subordinate's last state went out with this push; it syncs no more.
        set_link_state(
            con,
            e,
            "SELECT dynamics_id FROM plan WHERE entity = ? AND target = 'state' AND op = 'merged'",
            "merged",
            [e],
        )
        con.execute(
            """INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field, value_before,
                                           value_after, rule)
            SELECT ?, ?, entity, dynamics_id, marketo_id, target, op, field, old_value, new_value, rule FROM plan
            WHERE entity = ? AND op IN ('tombstone', 'retire', 'merged', 'hold', 'reject')""",
            [run_id, now, e],
        )
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def finish(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity) -> int:
    """The plan was applied: its records leave the work set unless something newer arrived meanwhile."""
    e = entity.name
    if entity.is_derived:
        _finish_derived(con, e)
        return 0
    d, ent = qi(f"d_{e}"), sql_text(e)
    if any(x.derived_from == e for x in config.entities):
        mark_applied(con, e, "SELECT dynamics_id FROM plan_work WHERE entity = ?", [e])
    # The marks to clear are found on keyed copies of the rows, then cleared by key: an UPDATE joined to
    # plan_work would scan the whole mirror. (One writer holds the store, so nothing moves in between.)
    keyed_rows(
        con,
        "finish_d",
        d,
        "id",
        f"SELECT dynamics_id FROM plan_work WHERE entity = {ent}",
        columns="id, pending_seq",
    )
    n = keyed_execute(
        con,
        f"UPDATE {d} SET pending_seq = NULL WHERE id IN {{keys}}",
        f"""SELECT f.id FROM finish_d f JOIN plan_work w
            ON w.entity = {ent} AND w.dynamics_id = f.id AND f.pending_seq = w.d_seq""",
        on=(d, "id"),
    )
    if entity.is_person:
        # A person now owned by another record (a converted lead's person belongs to its contact) keeps
        # its change for that record's plan: the lead's plan covered it but cannot apply it.
        mids = f"SELECT DISTINCT marketo_id FROM plan_work WHERE entity = {ent} AND m_seq IS NOT NULL"
        keyed_rows(
            con,
            "person_owners",
            "identity",
            "marketo_id",
            mids,
            "state = 'active' AND entity <> " + sql_text(e),
            "marketo_id, dynamics_id",
        )
        keyed_rows(
            con,
            "finish_m",
            "m_person",
            "id",
            f"SELECT TRY_CAST(marketo_id AS BIGINT) FROM plan_work WHERE entity = {ent} AND m_seq IS NOT NULL",
            columns="id, pending_seq, f_dynamicsId",
        )
        keyed_execute(
            con,
            "UPDATE m_person SET pending_seq = NULL WHERE id IN {keys}",
            f"""SELECT m.id FROM finish_m m JOIN plan_work w ON w.entity = {ent} AND w.marketo_id = CAST(m.id AS VARCHAR)
            WHERE m.pending_seq = w.m_seq
              AND NOT EXISTS (SELECT 1 FROM person_owners o WHERE o.marketo_id = w.marketo_id
                              AND o.dynamics_id = m.f_dynamicsId)""",
            on=("m_person", "id"),
        )
    # A failed write whose record was re-planned with nothing left to write to that target is resolved
    # (e.g. a 412 re-read and settled by the policy, or a held record whose value was fixed back to what the
    # other side holds); otherwise it would stay "failed" or "held" forever. A write that is still needed is
    # planned again, so its failure stays.
    con.execute(
        """DELETE FROM failures f WHERE f.entity = ? AND f.target IN ('marketo', 'dynamics')
                   AND f.dynamics_id IN (SELECT dynamics_id FROM plan_work WHERE entity = ?)
                   AND NOT EXISTS (SELECT 1 FROM plan p WHERE p.entity = f.entity AND p.dynamics_id = f.dynamics_id
                                   AND p.target = f.target AND p.op NOT IN ('agree', 'hold'))""",
        [e, e],
    )
    # A field held because its value could not be written (e.g. a picklist label with no option) clears once
    # its record was planned again and this plan's push did not hold it again: the value was fixed (written,
    # agreed, or reverted). Otherwise a released hold would stay "retrying" and in every work set for good.
    con.execute(
        """DELETE FROM failures f WHERE f.entity = ? AND f.target = 'dynamics:fields'
                   AND f.dynamics_id IN (SELECT dynamics_id FROM plan_work WHERE entity = ?)
                   AND f.last_failed_at < (SELECT max(created_at) FROM plan_meta WHERE entity = ?)""",
        [e, e, e],
    )
    # Likewise a record rejected for a value Dynamics could not express, once a plan covered it without a reject.
    con.execute(
        """DELETE FROM failures f WHERE f.entity = ? AND f.op = 'reject'
                   AND f.dynamics_id IN (SELECT dynamics_id FROM plan_work WHERE entity = ?)
                   AND NOT EXISTS (SELECT 1 FROM plan p WHERE p.entity = f.entity AND p.dynamics_id = f.dynamics_id
                                   AND p.op = 'reject')""",
        [e, e],
    )
    con.execute("DELETE FROM plan_work WHERE entity = ?", [e])
    return n


LAST_WRITE_CURSOR = "ledger:last_write:"


def last_write(con: duckdb.DuckDBPyConnection, entity: str, target: str) -> tuple[str, str] | None:
    """When the ledger last recorded a write of ``entity`` to ``target``, and by which run (None: never).

    Kept as a summary in ``cursors`` (the ledger's seq it covers, the time and the run) and brought up to date from
    the ledger rows after that seq only: ledger rows are only ever appended, in seq order, so a run reads what was
    written since, not the whole ledger (row groups wholly at or below the seq are skipped on their min/max)."""
    name = f"{LAST_WRITE_CURSOR}{entity}:{target}"
    stored = get_cursor(con, name)
    known: dict[str, Any] = json.loads(stored) if stored else {"upto": 0, "at": None, "run": None}
    upto, at, run = one_row(
        con,
        """SELECT max(seq), max(written_at) FILTER (WHERE entity = ? AND target = ?),
                  arg_max(run_id, written_at) FILTER (WHERE entity = ? AND target = ?)
           FROM ledger WHERE seq > ?""",
        [entity, target, entity, target, int(known["upto"])],
    )
    if upto is not None:
        if at is not None and (known["at"] is None or at >= datetime.fromisoformat(known["at"])):
            known["at"], known["run"] = str(at), str(run)
        known["upto"] = int(upto)
        set_cursor(con, name, json.dumps(known))
    return (known["at"], known["run"]) if known["at"] is not None else None
