"""The plan: a field-level three-way merge of Dynamics, Marketo and the base, in set-based SQL.

For every record with pending work (a newer version on either side, or a failed write due for retry)
and every mapped field: a side *changed* when its canonical value differs from the base (the last value
both sides agreed on). One side changed: the value flows per the field's direction. Both changed to the
same value: only the base moves. Both changed to different values: a conflict, resolved by the field's
policy. Our own writes come back as values equal to the base, so echoes never bounce.

The plan is stored (table ``plan``) before anything is written, so ``sync-pipeline plan`` can show it
and the load steps apply exactly it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from sync_pipeline.config.model import STICKY, Entity, FieldMap, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.state import ensure_split_base, fcol, latest_fields, mark_ledger_before_values, qi

PERSON_STATES_LINKED = ("active", "converted")
PLAN_SLICE = 50_000  # records per three-way join


@dataclass
class PlanSummary:
    entity: str
    run_id: str
    work: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # "<target>:<op>" -> records
    fields: dict[str, int] = field(default_factory=dict)  # "<target>:<op>" -> field writes
    conflicts: dict[str, int] = field(default_factory=dict)  # policy -> fields
    linked: dict[str, int] = field(default_factory=dict)  # how -> records
    rejected: int = 0
    quarantined: int = 0
    merged: int = 0  # Dynamics records whose merge (Dataverse Merge) was followed in this plan
    excluded: int = 0
    tombstoned: int = 0
    unchanged: int = 0

    def as_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"records_in_work": self.work, "unchanged": self.unchanged,
                               "rejected": self.rejected, "excluded_by_filter": self.excluded,
                               "tombstoned": self.tombstoned, "quarantined": self.quarantined,
                               "merged": self.merged}
        out.update({f"records/{k}": v for k, v in sorted(self.counts.items())})
        out.update({f"fields/{k}": v for k, v in sorted(self.fields.items())})
        out.update({f"conflicts/{k}": v for k, v in sorted(self.conflicts.items())})
        out.update({f"linked/{k}": v for k, v in sorted(self.linked.items())})
        return out


def _lit(s: str | None) -> str:
    return "NULL" if s is None else "'" + s.replace("'", "''") + "'"


def _person_entities(config: SyncConfig) -> str:
    return ", ".join(_lit(e.name) for e in config.persons)


def compute_plan(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str,
                 now: datetime) -> PlanSummary:
    con.execute("DELETE FROM plan WHERE entity = ?", [entity.name])
    con.execute("DELETE FROM plan_work WHERE entity = ?", [entity.name])
    ensure_split_base(con)
    mark_ledger_before_values(con)
    if entity.is_derived:
        summary = _plan_roles(con, config, entity, run_id)
    else:
        summary = _plan_entity(con, config, entity, run_id, now)
    _summarise(con, summary)
    con.execute("INSERT OR REPLACE INTO plan_meta VALUES (?, ?, ?, ?)",
                [entity.name, run_id, now, str(summary.as_metadata())])
    return summary


# ---- work set and linking ------------------------------------------------------------------------------


def _work_set(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, now: datetime) -> int:
    e, d = entity.name, qi(f"d_{entity.name}")
    person_part = ""
    if entity.is_person:
        person_part = f"""UNION SELECT i.dynamics_id FROM identity i JOIN m_person m ON CAST(m.id AS VARCHAR) = i.marketo_id
                          WHERE i.entity = {_lit(e)} AND m.pending_seq IS NOT NULL"""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE w AS
        SELECT ids.did, d.pending_seq AS d_seq FROM (
            SELECT id AS did FROM {d} WHERE pending_seq IS NOT NULL
            {person_part}
            UNION SELECT dynamics_id FROM failures WHERE entity = {_lit(e)} AND NOT held AND next_attempt_at <= ?
        ) ids JOIN {d} d ON d.id = ids.did""", [now])
    return int(con.execute("SELECT count(*) FROM w").fetchone()[0])


def _link_persons(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, now: datetime,
                  summary: PlanSummary) -> None:
    e, d = entity.name, qi(f"d_{entity.name}")
    persons = _person_entities(config)
    unlinked = f"NOT EXISTS (SELECT 1 FROM identity x WHERE x.entity = {_lit(e)} AND x.dynamics_id = d.id)"
    # A person that already carries this record's id is its person (a re-baselined store, a lost identity row).
    con.execute(f"""CREATE OR REPLACE TEMP TABLE dl AS
        SELECT d.id AS did, min(m.id) AS mid FROM w JOIN {d} d ON d.id = w.did
        JOIN m_person m ON lower(m.f_dynamicsId) = d.id AND NOT m.deleted
        WHERE {unlinked} AND NOT EXISTS (SELECT 1 FROM identity y WHERE y.entity IN ({persons})
                                         AND y.marketo_id = CAST(m.id AS VARCHAR) AND y.state = 'active')
        GROUP BY d.id""")
    n = con.execute("SELECT count(*) FROM dl").fetchone()[0]
    if n:
        con.execute(f"INSERT INTO identity SELECT {_lit(e)}, did, CAST(mid AS VARCHAR), 'active', ?, 'dynamics_id' "
                    "FROM dl", [now])
        summary.linked["dynamics_id"] = int(n)
    if entity.name == "lead" and "contact" in config.by_name:
        # A lead first seen after it was qualified: its contact carries the person, the lead gets none.
        n = con.execute(f"""INSERT INTO identity SELECT 'lead', d.id, NULL, 'converted', ?, 'qualified_before_sync'
            FROM w JOIN {d} d ON d.id = w.did
            WHERE {unlinked} AND EXISTS (SELECT 1 FROM d_contact c WHERE c.origin_lead = d.id AND NOT c.deleted
                                         AND c.sync_flag IS DISTINCT FROM false)""", [now]).fetchone()
        if n and n[0]:
            summary.linked["converted_before_sync"] = int(n[0])
    if entity.name == "contact" and "lead" in config.by_name:
        # Lead qualification: the contact takes over the lead's Marketo person, with the lead's base.
        con.execute(f"""CREATE OR REPLACE TEMP TABLE q AS
            SELECT d.id AS did, il.marketo_id, il.dynamics_id AS lead_id FROM w JOIN {d} d ON d.id = w.did
            JOIN identity il ON il.entity = 'lead' AND il.dynamics_id = d.origin_lead AND il.state = 'active'
            WHERE {unlinked} AND NOT d.deleted AND d.sync_flag IS DISTINCT FROM false
            QUALIFY row_number() OVER (PARTITION BY il.dynamics_id ORDER BY d.id) = 1""")
        n = con.execute("SELECT count(*) FROM q").fetchone()[0]
        if n:
            con.execute("INSERT INTO identity SELECT 'contact', did, marketo_id, 'active', ?, 'qualification' FROM q",
                        [now])
            con.execute("UPDATE identity SET state = 'converted' WHERE entity = 'lead' "
                        "AND dynamics_id IN (SELECT lead_id FROM q)")
            # The contact is a new record, not an edit of the lead: a field it holds with the lead's agreed
            # value keeps that base; any other field starts without one, so a field the contact did not
            # receive (blank) is no "Dynamics change" that would blank the person, and a value it carries
            # that differs meets the person's as on a first link (policy decides; consent stays opted out).
            shared = [f for f in entity.all_fields if f.marketo in
                      {g.marketo for g in config.entity("lead").all_fields}]
            cols = ", ".join(fcol(f.marketo) for f in shared)
            kept = ", ".join(
                f"CASE WHEN {normalize.compare_expr(f, 'c.' + fcol(f.marketo))} IS NOT DISTINCT FROM "
                f"{normalize.compare_expr(f, 'b.' + fcol(f.marketo))} THEN b.{fcol(f.marketo)} END" for f in shared)
            con.execute(f"""INSERT OR REPLACE INTO b_contact (dynamics_id, synced_at, run_id, {cols})
                SELECT q.did, b.synced_at, b.run_id, {kept}
                FROM q JOIN b_lead b ON b.dynamics_id = q.lead_id JOIN {d} c ON c.id = q.did""")
            summary.linked["qualification"] = int(n)
    if "email" in {f.marketo for f in entity.all_fields}:
        # First sync: an existing Marketo person with the same email is the same person, not a new one.
        con.execute(f"""CREATE OR REPLACE TEMP TABLE em AS
            SELECT d.id AS did, m.id AS mid,
                   row_number() OVER (PARTITION BY d.id ORDER BY m.id) AS rd,
                   row_number() OVER (PARTITION BY m.id ORDER BY d.id) AS rm
            FROM w JOIN {d} d ON d.id = w.did
            JOIN m_person m ON lower(m.f_email) = lower(d.f_email)
            WHERE d.f_email IS NOT NULL AND NOT d.deleted AND d.sync_flag IS DISTINCT FROM false
              AND NOT m.deleted AND m.f_dynamicsId IS NULL AND {unlinked}
              AND NOT EXISTS (SELECT 1 FROM identity y WHERE y.entity IN ({persons})
                              AND y.marketo_id = CAST(m.id AS VARCHAR))""")
        n = con.execute("SELECT count(*) FROM em WHERE rd = 1 AND rm = 1").fetchone()[0]
        if n:
            con.execute(f"INSERT INTO identity SELECT {_lit(e)}, did, CAST(mid AS VARCHAR), 'active', ?, 'email' "
                        "FROM em WHERE rd = 1 AND rm = 1", [now])
            summary.linked["email"] = int(n)


# ---- merges in Dynamics, and quarantine -------------------------------------------------------------------------

# The person check blocks the run only for damage that spans it: more quarantined records than this floor AND
# more than this share of the linked ones (a systematic fault such as a wrong mapping, a mass import or a bug
# in the sync; carrying on would spread it). Below that, quarantined records are held one by one and the rest
# of the world keeps syncing.
QUARANTINE_BLOCK_FLOOR = 25
QUARANTINE_BLOCK_SHARE = 0.02


def _follow_dynamics_merges(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str,
                            now: datetime, summary: PlanSummary) -> int:
    """Follow Dataverse ``Merge``: a subordinate row (``merged``, ``masterid`` = the master) stops syncing.

    Its Marketo person goes with it, never duplicated: if the master has no person yet, the subordinate's
    person becomes the master's (the link and its base move; the master is planned in this run, so the
    person's ``dynamicsId`` is re-pointed and the master's values flow by the field policies); if both
    have one, the subordinate's person is merged into the master's in Marketo (a ``merge`` write, the
    master's person wins, as the master row does in Dynamics); otherwise (no person, or a master that no
    longer syncs) the subordinate is simply retired. The retired link keeps state ``merged``. Returns the
    number of records added to the work set (masters).
    """
    from sync_pipeline.engine.extract import MERGEABLE

    con.execute("CREATE OR REPLACE TEMP TABLE hb (did VARCHAR, cls VARCHAR)")
    if entity.dynamics is None or entity.dynamics.table not in MERGEABLE:
        return 0
    e, d, b = _lit(entity.name), qi(f"d_{entity.name}"), qi(f"b_{entity.name}")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE dm AS
        SELECT d.id AS sub, d.master_id AS master, i.marketo_id AS sub_mid, i.state AS sub_state,
               im.marketo_id AS master_mid, im.state AS master_state,
               CASE WHEN i.state = 'active' AND im.dynamics_id IS NULL AND {str(entity.is_person).lower()}
                         THEN 'relink'
                    WHEN i.state = 'active' AND im.state = 'active' AND {str(entity.is_person).lower()}
                         AND i.marketo_id IS DISTINCT FROM im.marketo_id THEN 'merge'
                    WHEN i.state = 'active' AND NOT {str(entity.is_person).lower()} THEN 'retire_after'
                    ELSE 'retire' END AS action
        FROM w JOIN {d} d ON d.id = w.did
        LEFT JOIN identity i ON i.entity = {e} AND i.dynamics_id = d.id
        LEFT JOIN identity im ON im.entity = {e} AND im.dynamics_id = d.master_id
        WHERE d.master_id IS NOT NULL AND d.master_id <> d.id AND NOT d.deleted
          AND i.state IS DISTINCT FROM 'merged'""")
    n = int(con.execute("SELECT count(*) FROM dm").fetchone()[0])
    if not n:
        return 0
    summary.merged += n
    # The master's person: the subordinate's, with the subordinate's base (the last values both agreed on).
    con.execute(f"""INSERT INTO identity SELECT {e}, master, sub_mid, 'active', ?, 'dynamics_merge'
                    FROM dm WHERE action = 'relink'""", [now])
    con.execute(f"""INSERT OR REPLACE INTO {b} SELECT x.* REPLACE (dm.master AS dynamics_id)
                    FROM {b} x JOIN dm ON dm.sub = x.dynamics_id AND dm.action = 'relink'""")
    # An opt-out the subordinate had agreed on survives the merge: where the master says opted in, its value
    # becomes the base, so the person's opt-out is the change that flows (to the master), not the reverse.
    from sync_pipeline.engine.extract import CONSENT_FIELDS

    for f in [f.marketo for f in entity.all_fields if f.marketo in CONSENT_FIELDS and f.transform == "boolean"]:
        c = fcol(f)
        con.execute(f"""UPDATE {b} SET {c} = d.{c} FROM dm JOIN {d} d ON d.id = dm.master
                        WHERE dm.action = 'relink' AND {b}.dynamics_id = dm.master AND {b}.{c} = 'true'
                          AND d.{c} IS DISTINCT FROM 'true'""")
    # Both had a person: merge the subordinate's into the master's in Marketo (applied by the push).
    con.execute(f"""INSERT INTO plan SELECT {_lit(run_id)}, {e}, sub, master_mid, 'marketo', 'merge', 'leadIds',
                        sub_mid, master_mid, sub_mid, 'dynamics_merge', NULL FROM dm WHERE action = 'merge'""")
    con.execute("INSERT INTO hb SELECT sub, 'merging' FROM dm WHERE action = 'merge'")
    # A one-way record (an account's company) receives its last state (e.g. Inactive) in this run, then retires.
    con.execute(f"""INSERT INTO plan SELECT {_lit(run_id)}, {e}, sub, sub_mid, 'state', 'merged', NULL, sub, master,
                        NULL, 'dynamics_merge', NULL FROM dm WHERE action = 'retire_after'""")
    # Everything else: the subordinate is retired (a link kept for the record, state merged).
    con.execute(f"""UPDATE identity SET state = 'merged' FROM dm WHERE identity.entity = {e}
                    AND identity.dynamics_id = dm.sub AND dm.action IN ('relink', 'retire')""")
    con.execute(f"""INSERT INTO identity SELECT {e}, sub, master_mid, 'merged', ?, 'dynamics_merge'
                    FROM dm WHERE sub_state IS NULL""", [now])
    con.execute(f"""INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field,
                                       value_before, value_after, rule)
        SELECT {_lit(run_id)}, ?, {e}, sub, COALESCE(sub_mid, master_mid), 'state',
               CASE action WHEN 'relink' THEN 'relink' ELSE 'merged' END, 'dynamics_id', sub, master,
               'dynamics_merge' FROM dm WHERE action IN ('relink', 'retire')""", [now])
    # Masters whose person moved are planned now (their person's dynamicsId is re-pointed to them).
    seq = int(con.execute("SELECT nextval('change_seq')").fetchone()[0])
    con.execute(f"""UPDATE {d} SET pending_seq = ? WHERE id IN (SELECT master FROM dm WHERE action = 'relink')""",
                [seq])
    added = con.execute(f"""INSERT INTO w SELECT DISTINCT d.id, d.pending_seq FROM dm JOIN {d} d ON d.id = dm.master
                            WHERE dm.action = 'relink' AND d.id NOT IN (SELECT did FROM w)""").fetchone()
    return int(added[0]) if added else 0


def _quarantine(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str, now: datetime,
                summary: PlanSummary) -> int:
    """Hold back the records of the work set whose links are inconsistent; everything else plans as usual.

    Each is filed in ``failures`` (target ``quarantine``, held, code ``quarantine:<reason>``, a message naming
    the records involved), so ``errors`` and ``status`` show it. A quarantined record is looked at again in
    every plan, so its row clears by itself once the damage is repaired (e.g. the duplicate person merged or
    deleted in Marketo). Reasons: ``duplicate_dynamics_id`` (two live persons carry this record's id),
    ``person_shared`` (another live record is linked to the same person), ``vanished_person`` (the link names
    a person id that is not a number, or one Marketo does not return: the extract reads linked persons the
    mirror lacks again, so a mirror that merely lost a row heals without a hold).
    """
    e = _lit(entity.name)
    persons = _person_entities(config)
    # Damage is looked for in the whole store, not only among the records that changed (a record nobody edits
    # must still show up in errors and status), and quarantined records are re-examined in every plan.
    added = con.execute(f"""INSERT INTO w SELECT d.id, d.pending_seq FROM {qi('d_' + entity.name)} d WHERE d.id IN (
            SELECT dynamics_id FROM failures WHERE entity = {e} AND target = 'quarantine'
            UNION ALL
            SELECT i.dynamics_id FROM identity i LEFT JOIN m_person m ON m.id = TRY_CAST(i.marketo_id AS BIGINT)
            WHERE i.entity = {e} AND i.state = 'active' AND m.id IS NULL
            UNION ALL
            SELECT i.dynamics_id FROM identity i WHERE i.entity = {e} AND i.state = 'active' AND i.marketo_id IN
                (SELECT marketo_id FROM identity WHERE state = 'active' AND entity IN ({persons})
                 GROUP BY marketo_id HAVING count(*) > 1)
            UNION ALL
            SELECT lower(f_dynamicsId) FROM m_person WHERE NOT deleted AND f_dynamicsId IS NOT NULL
            GROUP BY lower(f_dynamicsId) HAVING count(*) > 1)
        AND d.id NOT IN (SELECT did FROM w)""").fetchone()
    # Set-based, anti/semi-joins only. Measured on a store of 1,000,000 linked contacts (2 cores): about 1.3 s
    # per plan for an incremental work set (the store-wide scan above), 4.4 s when every record is in it.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE ql AS SELECT i.dynamics_id AS did, i.marketo_id FROM w
                    JOIN identity i ON i.entity = {e} AND i.dynamics_id = w.did AND i.state = 'active'""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE qr AS
        SELECT l.did, 'quarantine:vanished_person' AS code,
               {_lit(entity.name)} || ' ' || l.did || ' is linked to Marketo person ' || COALESCE(l.marketo_id, '(none)')
               || CASE WHEN TRY_CAST(l.marketo_id AS BIGINT) IS NULL THEN ', which is not a person id'
                       ELSE ', which Marketo does not return (it is read again in every run)' END
               || '; held until the link is repaired or the record is released' AS message
        FROM ql l LEFT JOIN m_person m ON m.id = TRY_CAST(l.marketo_id AS BIGINT) WHERE m.id IS NULL
        UNION ALL
        SELECT l.did, 'quarantine:person_shared',
               {_lit(entity.name)} || ' ' || l.did || ' and ' || string_agg(o.entity || ' ' || o.dynamics_id, ', ')
               || ' are all linked to Marketo person ' || l.marketo_id
               || '; held until only one record owns the person'
        FROM ql l JOIN identity o ON o.marketo_id = l.marketo_id AND o.state = 'active'
             AND o.entity IN ({persons}) AND NOT (o.entity = {e} AND o.dynamics_id = l.did)
        WHERE l.marketo_id IN (SELECT x.marketo_id FROM identity x WHERE x.state = 'active'
                               AND x.entity IN ({persons}) AND x.marketo_id IN (SELECT marketo_id FROM ql)
                               GROUP BY x.marketo_id HAVING count(*) > 1)
        GROUP BY l.did, l.marketo_id
        UNION ALL
        SELECT d.did, 'quarantine:duplicate_dynamics_id',
               {_lit(entity.name)} || ' ' || d.did || ' is claimed by ' || count(*) || ' Marketo persons ('
               || string_agg(CAST(m.id AS VARCHAR), ', ' ORDER BY m.id)
               || ') that all carry it as dynamicsId; held until one of them is merged or deleted in Marketo'
        FROM (SELECT lower(f_dynamicsId) AS did FROM m_person WHERE NOT deleted AND f_dynamicsId IS NOT NULL
              AND lower(f_dynamicsId) IN (SELECT did FROM w) GROUP BY 1 HAVING count(*) > 1) d
        JOIN m_person m ON lower(m.f_dynamicsId) = d.did AND NOT m.deleted
        GROUP BY d.did""")
    con.execute("DROP TABLE ql")
    con.execute("""CREATE OR REPLACE TEMP TABLE qr1 AS SELECT did, string_agg(code, ',' ORDER BY code) AS codes,
                   arg_min(code, code) AS code, string_agg(message, '; ' ORDER BY code) AS message
                   FROM qr GROUP BY did""")
    con.execute("DROP TABLE qr")
    # Repaired: the record plans normally again and its quarantine row goes.
    con.execute(f"""DELETE FROM failures WHERE entity = {e} AND target = 'quarantine'
                    AND dynamics_id IN (SELECT did FROM w) AND dynamics_id NOT IN (SELECT did FROM qr1)""")
    con.execute(f"""INSERT INTO failures SELECT {e}, q.did, 'quarantine', 'quarantine', i.marketo_id, NULL, q.code,
                        q.message, 1, ?, ?, NULL, true, {_lit(run_id)}
                    FROM qr1 q LEFT JOIN identity i ON i.entity = {e} AND i.dynamics_id = q.did
                    ON CONFLICT (entity, dynamics_id, target) DO UPDATE SET code = excluded.code,
                        message = excluded.message, marketo_id = excluded.marketo_id,
                        last_failed_at = excluded.last_failed_at, held = true, run_id = excluded.run_id""",
                [now, now])
    con.execute("INSERT INTO hb SELECT did, 'quarantined' FROM qr1 WHERE did NOT IN (SELECT did FROM hb)")
    summary.quarantined += int(con.execute("SELECT count(*) FROM qr1").fetchone()[0])
    return int(added[0]) if added else 0


def _hold_back(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("UPDATE j SET cls = hb.cls FROM hb WHERE j.did = hb.did")


# ---- the joined view ---------------------------------------------------------------------------------------


def _joined(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity) -> None:
    e, d, b = entity.name, qi(f"d_{entity.name}"), qi(f"b_{entity.name}")
    sel = []
    for f in entity.all_fields:
        c = fcol(f.marketo)
        dval = f"d.{c}"
        if f.transform == "customer_account" and "contact" in config.by_name:
            dval = f"COALESCE(d.{c}, cc.f_externalCompanyId)" if "externalCompanyId" in {
                g.marketo for g in config.entity("contact").all_fields} else dval
        sel.append(f"{dval} AS {qi('d_' + f.marketo)}")
        sel.append(f"b.{c} AS {qi('b_' + f.marketo)}")
        if entity.is_person:
            # No mirrored Marketo row (we created it and have not read it back): Marketo holds the base.
            sel.append(f"CASE WHEN m.id IS NULL THEN b.{c} ELSE m.{c} END AS {qi('m_' + f.marketo)}")
            # After a rollback a field may have one agreed value per system (b__split, ops/rollback.py).
            for side in ("d", "m"):
                sel.append(f"CASE WHEN sp.{qi('sh_' + f.marketo)} THEN sp.{qi('s' + side + '_' + f.marketo)} "
                           f"ELSE b.{c} END AS {qi('b' + side + '_' + f.marketo)}")
    person_cols = ("m.id AS m_id, m.deleted AS m_deleted, m.updated_at AS m_updated, m.pending_seq AS m_seq, "
                   "m.f_dynamicsId AS m_dynamicsId, m.f_dynamicsType AS m_dynamicsType, "
                   "m.f_dynamicsIsDeleted AS m_dynamicsIsDeleted") if entity.is_person else \
        ("NULL AS m_id, false AS m_deleted, NULL AS m_updated, NULL AS m_seq, NULL AS m_dynamicsId, "
         "NULL AS m_dynamicsType, NULL AS m_dynamicsIsDeleted")
    person_join = "LEFT JOIN m_person m ON CAST(m.id AS VARCHAR) = i.marketo_id" if entity.is_person else ""
    if entity.is_person:
        pivots = ", ".join(f"bool_or(field = {_lit(f.marketo)}) AS {qi('sh_' + f.marketo)}, "
                           f"max(CASE WHEN field = {_lit(f.marketo)} THEN d_value END) AS {qi('sd_' + f.marketo)}, "
                           f"max(CASE WHEN field = {_lit(f.marketo)} THEN m_value END) AS {qi('sm_' + f.marketo)}"
                           for f in entity.all_fields)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE sp AS SELECT dynamics_id, {pivots} FROM b__split
                        WHERE entity = {_lit(e)} AND dynamics_id IN (SELECT did FROM w) GROUP BY dynamics_id""")
        person_join += " LEFT JOIN sp ON sp.dynamics_id = w.did"
    for n, name in enumerate(latest_fields(entity)):  # per-field change times, for policy latest
        sel.append(f"td{n}.changed_at AS {qi('dt_' + name)}")
        sel.append(f"tm{n}.changed_at AS {qi('mt_' + name)}")
        person_join += (f" LEFT JOIN field_times td{n} ON td{n}.side = {_lit('d:' + e)} AND td{n}.id = w.did"
                        f" AND td{n}.field = {_lit(name)}"
                        f" LEFT JOIN field_times tm{n} ON tm{n}.side = 'm' AND tm{n}.id = i.marketo_id"
                        f" AND tm{n}.field = {_lit(name)}")
    contact_join = ("LEFT JOIN d_contact cc ON cc.id = d.customer_contact"
                    if any(f.transform == "customer_account" for f in entity.all_fields) and "contact" in config.by_name
                    else "")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE j AS
        SELECT w.did, w.d_seq, d.deleted AS d_deleted, d.sync_flag, d.etag, d.modified_on AS d_modified,
               i.marketo_id, i.state, b.dynamics_id IS NOT NULL AS has_base, {person_cols}, {", ".join(sel)}
        FROM w JOIN {d} d ON d.id = w.did
        LEFT JOIN identity i ON i.entity = {_lit(e)} AND i.dynamics_id = w.did
        LEFT JOIN {b} b ON b.dynamics_id = w.did
        {person_join} {contact_join}""")
    recreate = entity.on_marketo_delete == "recreate"
    con.execute(f"""ALTER TABLE j ADD COLUMN cls VARCHAR""")
    con.execute(f"""UPDATE j SET cls = CASE
        WHEN state IN ('converted', 'merged') THEN 'inactive'
        WHEN marketo_id IS NULL AND d_deleted THEN 'gone'
        WHEN marketo_id IS NULL AND sync_flag = false THEN 'excluded'
        WHEN marketo_id IS NULL THEN 'create'
        WHEN state = 'tombstoned' AND {str(recreate).lower()} AND NOT d_deleted THEN 'create'
        WHEN state <> 'active' THEN 'inactive'
        WHEN m_deleted THEN 'marketo_deleted'
        WHEN d_deleted THEN 'delete'
        WHEN sync_flag = false THEN 'filtered'
        ELSE 'update' END""")


# ---- field decisions -----------------------------------------------------------------------------------------


# Consent (policy opt_out_sticky, domain.md 1.19): "true" is opted out. An opt-in is written only where the
# side it comes from itself changed from out to in since the last sync (base true, now false, the other side
# untouched); a blank is never written over a value. Everything else keeps or spreads the opt-out.
_STICKY_OUTCOME = """CASE WHEN NOT dc AND NOT mc THEN NULL
        WHEN same THEN 'base'
        WHEN dv = 'true' THEN CASE WHEN mc AND NOT dc AND bv = 'true' AND mv = 'false' THEN 'dynamics'
                                   ELSE 'marketo' END
        WHEN mv = 'true' THEN CASE WHEN dc AND NOT mc AND bv = 'true' AND dv = 'false' THEN 'marketo'
                                   ELSE 'dynamics' END
        WHEN dv IS NULL THEN 'dynamics'
        WHEN mv IS NULL THEN 'marketo'
        WHEN dc AND NOT mc THEN 'marketo'
        WHEN mc AND NOT dc THEN 'dynamics'
        ELSE NULL END"""


def _one_way_sticky(outcome: str, source: str) -> str:
    """A one-way consent field: never carry an opt-in or a blank over an opt-out the source did not revoke."""
    v, other = ("dv", "mv") if source == "marketo" else ("mv", "dv")
    return f"""CASE WHEN ({outcome}) = '{source}' AND {other} = 'true'
                         AND NOT ({v} = 'false' AND bv = 'true') THEN NULL ELSE ({outcome}) END"""


def policy_resolution(entity: Entity, policy: str, field_times: bool = True) -> str:
    """SQL naming the side a conflict is written to under ``policy`` ('marketo' = Dynamics' value wins).

    ``field_times``: ``latest`` compares the per-field change times (columns ``dt``/``mt``, from table
    field_times) where known, else the records' times; without them only the records' times.
    """
    fallback = {"marketo_wins": "'dynamics'"}.get(entity.policy, "'marketo'")
    d_time, m_time = ("COALESCE(dt, d_modified)", "COALESCE(mt, m_updated)") if field_times else \
        ("d_modified", "m_updated")
    return {
        "dynamics_wins": "'marketo'",
        "marketo_wins": "'dynamics'",
        # The later edit of this field wins.
        "latest": f"CASE WHEN TRY_CAST({d_time} AS TIMESTAMPTZ) >= TRY_CAST({m_time} AS TIMESTAMPTZ) "
                  "THEN 'marketo' ELSE 'dynamics' END",
        "prefer_non_blank": f"CASE WHEN dv IS NULL THEN 'dynamics' WHEN mv IS NULL THEN 'marketo' ELSE {fallback} END",
        "hold": "'hold'",
    }[policy]


def _outcome_sql(entity: Entity, f: FieldMap) -> str:
    """CASE giving 'marketo' | 'dynamics' | 'base' | 'hold' | NULL for one field of a linked record."""
    direction, policy = entity.field_direction(f), entity.field_policy(f)
    if direction == "none":
        return "NULL"
    if not entity.is_person:  # one-way: push what changed in Dynamics since we last pushed it
        return "CASE WHEN dc THEN 'marketo' END"
    if direction == "to_marketo":
        out = "CASE WHEN dc AND same THEN 'base' WHEN dc THEN 'marketo' END"
        return _one_way_sticky(out, "marketo") if policy == STICKY else out
    if direction == "to_dynamics":
        out = "CASE WHEN mc AND same THEN 'base' WHEN mc THEN 'dynamics' END"
        return _one_way_sticky(out, "dynamics") if policy == STICKY else out
    if policy == STICKY:
        return _STICKY_OUTCOME
    resolve = policy_resolution(entity, policy)
    return f"""CASE WHEN NOT dc AND NOT mc THEN NULL
                    WHEN same THEN 'base'
                    WHEN dc AND NOT mc THEN 'marketo'
                    WHEN mc AND NOT dc THEN 'dynamics'
                    ELSE {resolve} END"""


def _rule_sql(entity: Entity, f: FieldMap) -> str:
    """The ledger's rule; evaluated where ``outcome`` is known."""
    direction, policy = entity.field_direction(f), entity.field_policy(f)
    if not entity.is_person or direction != "two_way":
        if policy == STICKY and entity.is_person:
            return f"CASE WHEN outcome IS NULL AND (dc OR mc) THEN '{STICKY}' ELSE '{direction}' END"
        return f"'{direction}'"
    if policy == STICKY:  # a one-sided change the opt-out overruled is named as such
        return (f"CASE WHEN dc AND mc AND NOT same THEN 'conflict:{STICKY}' "
                f"WHEN (dc AND NOT mc AND outcome = 'dynamics') OR (mc AND NOT dc AND outcome = 'marketo') "
                f"THEN '{STICKY}' ELSE 'two_way' END")
    return f"CASE WHEN dc AND mc AND NOT same THEN 'conflict:{policy}' ELSE 'two_way' END"


def _field_rows_sql(entity: Entity, f: FieldMap) -> str:
    cmp_d = normalize.compare_expr(f, qi("d_" + f.marketo))
    cmp_bd = normalize.compare_expr(f, qi(("bd_" if entity.is_person else "b_") + f.marketo))
    cmp_bm = normalize.compare_expr(f, qi(("bm_" if entity.is_person else "b_") + f.marketo))
    cmp_m = normalize.compare_expr(f, qi("m_" + f.marketo)) if entity.is_person else "CAST(NULL AS VARCHAR)"
    # One-way objects have no Marketo mirror: their before-value is the base (the value we last wrote
    # there); the push reads the records it writes and replaces it by what Marketo actually holds.
    mv = qi("m_" + f.marketo) if entity.is_person else qi("b_" + f.marketo)
    timed = f.marketo in latest_fields(entity)
    dt = qi("dt_" + f.marketo) if timed else "CAST(NULL AS VARCHAR)"
    mt = qi("mt_" + f.marketo) if timed else "CAST(NULL AS VARCHAR)"
    return f"""SELECT did, marketo_id, etag, d_modified, m_updated, field, dv, mv, bv, outcome,
                      {_rule_sql(entity, f)} AS rule
               FROM (SELECT *, {_outcome_sql(entity, f)} AS outcome
                     FROM (SELECT did, marketo_id, etag, d_modified, m_updated, {_lit(f.marketo)} AS field,
                            {qi('d_' + f.marketo)} AS dv, {mv} AS mv, {qi('b_' + f.marketo)} AS bv,
                            {dt} AS dt, {mt} AS mt,
                            ({cmp_d}) IS DISTINCT FROM ({cmp_bd}) AS dc,
                            ({cmp_m}) IS DISTINCT FROM ({cmp_bm}) AS mc,
                            ({cmp_d}) IS NOT DISTINCT FROM ({cmp_m}) AS same
                     FROM j WHERE cls = 'update'))"""


def _plan_entity(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str,
                 now: datetime) -> PlanSummary:
    summary = PlanSummary(entity.name, run_id)
    summary.work = _work_set(con, config, entity, now)
    summary.work += _follow_dynamics_merges(con, config, entity, run_id, now, summary)
    if entity.is_person:
        _link_persons(con, config, entity, now, summary)
        summary.work += _quarantine(con, config, entity, run_id, now, summary)
    e, rid = _lit(entity.name), _lit(run_id)
    # The three-way join is wide (three values per field): plan the work set a slice at a time, so memory
    # stays flat whether 1,000 or 1,000,000 records changed.
    con.execute("CREATE OR REPLACE TEMP TABLE w_all AS SELECT did, d_seq, row_number() OVER (ORDER BY did) AS wn FROM w")
    for start in range(1, summary.work + 1, PLAN_SLICE):
        con.execute("CREATE OR REPLACE TEMP TABLE w AS SELECT did, d_seq FROM w_all WHERE wn BETWEEN ? AND ?",
                    [start, start + PLAN_SLICE - 1])
        _plan_slice(con, config, entity, rid, e, summary)
    if entity.is_person and entity.create_in_dynamics:
        _plan_dynamics_creates(con, config, entity, rid, e)
    return summary


def _plan_slice(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, rid: str, e: str,
                summary: PlanSummary) -> None:
    _joined(con, config, entity)
    _hold_back(con)  # records being merged or quarantined plan nothing else
    fields = [f for f in entity.all_fields if entity.field_direction(f) != "none"]
    to_m = [f for f in fields if entity.field_direction(f) in ("to_marketo", "two_way")]

    # Records holding a value that cannot be represented (e.g. an unknown picklist code) are rejected.
    if fields:
        bad = " OR ".join(f"starts_with({qi('d_' + f.marketo)}, {_lit(normalize.INVALID)})" for f in fields)
        con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, did, marketo_id, 'marketo', 'reject', field,
                NULL, value, NULL, 'invalid value', etag
            FROM (SELECT did, marketo_id, etag, unnest([{", ".join(_lit(f.marketo) for f in fields)}]) AS field,
                         unnest([{", ".join(qi('d_' + f.marketo) for f in fields)}]) AS value
                  FROM j WHERE cls IN ('create', 'update') AND ({bad}))
            WHERE starts_with(value, {_lit(normalize.INVALID)})""")
        con.execute(f"UPDATE j SET cls = 'rejected' WHERE did IN (SELECT dynamics_id FROM plan WHERE entity = {e} "
                    "AND op = 'reject')")

    # Creates in Marketo: every mapped value travels.
    if to_m:
        con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, did, NULL, 'marketo', 'create', field, NULL, value, NULL,
                'create', etag
            FROM (SELECT did, etag, unnest([{", ".join(_lit(f.marketo) for f in to_m)}]) AS field,
                         unnest([{", ".join(qi('d_' + f.marketo) for f in to_m)}]) AS value
                  FROM j WHERE cls = 'create')""")
    # Deletes in Dynamics: flag, delete or ignore in Marketo.
    if entity.on_dynamics_delete != "ignore":
        op = entity.on_dynamics_delete
        con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, did, marketo_id, 'marketo', {_lit(op)},
                'dynamicsIsDeleted', m_dynamicsIsDeleted, 'true', NULL, {_lit('dynamics_delete:' + op)}, etag
            FROM j WHERE cls = 'delete'""")
    con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, did, marketo_id, 'state', 'retire', NULL, NULL, NULL, NULL,
            'dynamics_delete:ignore', etag FROM j WHERE cls = 'delete' AND {str(entity.on_dynamics_delete == 'ignore').lower()}""")
    # Persons deleted in Marketo: tombstone the link so nothing silently re-creates them.
    con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, did, marketo_id, 'state', 'tombstone', NULL, NULL, NULL, NULL,
            'marketo_delete:tombstone', etag FROM j WHERE cls = 'marketo_deleted'""")

    # Updates: the field-level three-way merge.
    if fields:
        con.execute(f"CREATE OR REPLACE TEMP TABLE fx AS {' UNION ALL '.join(_field_rows_sql(entity, f) for f in fields)}")
        con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, did, marketo_id,
                CASE outcome WHEN 'marketo' THEN 'marketo' WHEN 'dynamics' THEN 'dynamics' WHEN 'base' THEN 'base'
                             ELSE 'hold' END,
                CASE outcome WHEN 'base' THEN 'agree' WHEN 'hold' THEN 'hold' ELSE 'update' END,
                field,
                CASE outcome WHEN 'marketo' THEN mv WHEN 'dynamics' THEN dv WHEN 'hold' THEN mv END,  -- hold keeps both
                CASE outcome WHEN 'dynamics' THEN mv ELSE dv END,
                bv, rule, etag
            FROM fx WHERE outcome IS NOT NULL""")
        for policy, n in con.execute("""SELECT split_part(rule, ':', 2), count(*) FROM fx
                                        WHERE starts_with(rule, 'conflict:') AND outcome IS NOT NULL
                                        GROUP BY 1""").fetchall():
            summary.conflicts[policy] = summary.conflicts.get(policy, 0) + int(n)
        con.execute("DROP TABLE fx")
    if entity.is_person:
        _plan_person_identity_fields(con, entity, rid, e)

    con.execute(f"""INSERT INTO plan_work SELECT {rid}, {e}, did, d_seq, marketo_id, m_seq FROM j""")
    for cls, n in con.execute("SELECT cls, count(*) FROM j GROUP BY cls").fetchall():
        if cls in ("excluded", "filtered"):
            summary.excluded += int(n)
        elif cls == "marketo_deleted":
            summary.tombstoned += int(n)
    summary.unchanged += int(con.execute(f"""SELECT count(*) FROM j WHERE cls = 'update' AND did NOT IN
        (SELECT dynamics_id FROM plan WHERE entity = {e} AND target IN ('marketo', 'dynamics'))""").fetchone()[0])
    con.execute("DROP TABLE j")


def _plan_person_identity_fields(con: duckdb.DuckDBPyConnection, entity: Entity, rid: str, e: str) -> None:
    """A linked person must carry our id and type (after an email match, or when a lead became a contact)."""
    typ = _lit(entity.marketo.type_value or entity.name.title())
    for field, value in (("dynamicsId", "did"), ("dynamicsType", typ)):
        con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, did, marketo_id, 'marketo', 'update', {_lit(field)},
                {qi('m_' + field)}, {value}, NULL, 'identity', etag
            FROM j WHERE cls = 'update' AND m_id IS NOT NULL AND {qi('m_' + field)} IS DISTINCT FROM {value}""")


def _rule_condition(cond: Any) -> str:
    col = f"m.{fcol(cond.field)}"
    num = f"TRY_CAST({col} AS DOUBLE)"
    if cond.op == "not_blank":
        return f"{col} IS NOT NULL"
    if cond.op == "blank":
        return f"{col} IS NULL"
    if cond.op == "in":
        return f"{col} IN ({', '.join(_lit(str(v)) for v in cond.value)})"
    sql_op = {"eq": "=", "ne": "<>", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}[cond.op]
    if isinstance(cond.value, (int, float)) and not isinstance(cond.value, bool):
        return f"{num} {sql_op} {float(cond.value)}"
    return f"{col} {sql_op} {_lit(str(cond.value))}"


def _plan_dynamics_creates(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, rid: str, e: str) -> None:
    """New Marketo persons matching the rule become Dynamics leads ("Sync Person to Microsoft")."""
    assert entity.create_in_dynamics is not None
    persons = _person_entities(config)
    cond = " AND ".join(_rule_condition(c) for c in entity.create_in_dynamics.all) or "true"
    to_d = [f for f in entity.all_fields if entity.field_direction(f) in ("two_way", "to_dynamics")]
    # Deterministic GUID from the person id: a re-run after a crash upserts the same lead, never a second.
    guid = ("(SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4) || '-' || "
            "substr(h, 17, 4) || '-' || substr(h, 21, 12) FROM (SELECT md5('marketo-person:' || CAST(m.id AS VARCHAR)) AS h))")
    # A person whose email a Dynamics lead or contact already has is that record's person (linked by
    # email when that record is planned), not a new lead.
    same_email = "".join(
        f" AND NOT EXISTS (SELECT 1 FROM {qi('d_' + p.name)} x WHERE NOT x.deleted AND lower(x.f_email) = lower(m.f_email))"
        for p in config.persons if "email" in {f.marketo for f in p.all_fields})
    con.execute(f"""CREATE OR REPLACE TEMP TABLE mc AS
        SELECT m.*, {guid} AS new_id, ({cond}) AS matches FROM m_person m
        WHERE m.pending_seq IS NOT NULL AND NOT m.deleted AND m.f_dynamicsId IS NULL
          AND NOT EXISTS (SELECT 1 FROM identity i WHERE i.entity IN ({persons}) AND i.marketo_id = CAST(m.id AS VARCHAR))
          {same_email}""")
    if to_d:
        con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, new_id, CAST(id AS VARCHAR), 'dynamics', 'create', field,
                NULL, value, NULL, 'create_in_dynamics', NULL
            FROM (SELECT new_id, id, unnest([{", ".join(_lit(f.marketo) for f in to_d)}]) AS field,
                         unnest([{", ".join(fcol(f.marketo) for f in to_d)}]) AS value FROM mc WHERE matches)""")
    con.execute(f"INSERT INTO plan_work SELECT {rid}, {e}, NULL, NULL, CAST(id AS VARCHAR), pending_seq FROM mc")


# ---- derived: opportunity contact roles ------------------------------------------------------------------------


def _plan_roles(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str) -> PlanSummary:
    summary = PlanSummary(entity.name, run_id)
    src = qi(f"d_{entity.derived_from}")
    e, rid, b = _lit(entity.name), _lit(run_id), qi(f"b_{entity.name}")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE roles AS
        SELECT o.id AS did, ic.marketo_id AS lead_id, o.sync_flag, o.deleted
        FROM {src} o LEFT JOIN identity ic ON ic.entity = 'contact' AND ic.dynamics_id = o.customer_contact
             AND ic.state = 'active' AND TRY_CAST(ic.marketo_id AS BIGINT) IS NOT NULL
        WHERE o.customer_contact IS NOT NULL AND NOT o.deleted AND o.sync_flag IS DISTINCT FROM false""")

    con.execute(f"""CREATE OR REPLACE TEMP TABLE rd AS
        SELECT COALESCE(r.did, b.dynamics_id) AS did, r.lead_id AS want, b.f_leadId AS have, b.f_role AS have_role
        FROM roles r FULL OUTER JOIN {b} b ON b.dynamics_id = r.did
        WHERE (r.lead_id IS DISTINCT FROM b.f_leadId OR b.f_role IS DISTINCT FROM {_lit(entity.role_name)})
          -- a quarantined contact's roles stay as they are until it is repaired (neither moved nor removed)
          AND COALESCE(r.did, b.dynamics_id) NOT IN (SELECT o.id FROM {src} o JOIN failures q
              ON q.entity = 'contact' AND q.target = 'quarantine' AND q.dynamics_id = o.customer_contact)""")
    summary.work = int(con.execute("SELECT count(*) FROM rd").fetchone()[0])
    con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, did, have, 'marketo', 'delete', 'leadId', have, NULL, have_role,
            'role_removed', NULL FROM rd WHERE have IS NOT NULL""")
    for field, value in (("leadId", "want"), ("role", _lit(entity.role_name)), ("externalOpportunityId", "did")):
        con.execute(f"""INSERT INTO plan SELECT {rid}, {e}, did, want, 'marketo', 'create', {_lit(field)}, NULL,
                {value}, NULL, 'role_from_customer', NULL FROM rd WHERE want IS NOT NULL""")
    return summary


def _summarise(con: duckdb.DuckDBPyConnection, summary: PlanSummary) -> None:
    for target, op, recs, n in con.execute("""SELECT target, op, count(DISTINCT dynamics_id), count(*) FROM plan
                                              WHERE entity = ? GROUP BY 1, 2""", [summary.entity]).fetchall():
        summary.counts[f"{target}:{op}"] = int(recs)
        summary.fields[f"{target}:{op}"] = int(n)
        if op == "reject":
            summary.rejected += int(recs)
