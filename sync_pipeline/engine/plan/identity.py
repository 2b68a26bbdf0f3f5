"""Plan: who is whom. Linking Dynamics records to Marketo persons (by dynamicsId, lead qualification,
email), following merges made in Dynamics, and quarantining records whose links are inconsistent."""

from __future__ import annotations

from datetime import datetime

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.plan.summary import PLAN_INSERT, PlanSummary, person_entities
from sync_pipeline.engine.store import ledger, state
from sync_pipeline.engine.store.state import (
    fcol,
    keyed_rows,
    one_row,
    qi,
    rows_equal,
    sql_text,
)


def link_persons(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, now: datetime, summary: PlanSummary
) -> None:
    """Link the work set's unlinked records to their Marketo persons (or mark leads already converted)."""
    e, d = entity.name, qi(f"d_{entity.name}")
    # Every lookup goes through the key indexes, starting from the work set's unlinked records (most runs
    # have none); ``unlinked_d`` holds their mirror rows and loses each record as soon as a step links it.
    keyed_rows(
        con,
        "work_links",
        "identity",
        "dynamics_id",
        "SELECT did FROM work_set",
        f"entity = {sql_text(e)}",
        "dynamics_id",
    )
    keyed_rows(
        con,
        "unlinked_d",
        d,
        "id",
        "SELECT did FROM work_set WHERE did NOT IN (SELECT dynamics_id FROM work_links)",
    )
    if not one_row(con, "SELECT count(*) FROM unlinked_d")[0]:
        return
    persons = [p.name for p in config.persons]
    in_persons = "entity IN (" + ", ".join(sql_text(p) for p in persons) + ")"

    def linked(table: str) -> None:
        con.execute(f"DELETE FROM unlinked_d WHERE id IN (SELECT did FROM {table})")

    # A person that already carries this record's id is its person (a re-baselined store, a lost identity row).
    rows_equal(
        con,
        "id_claimants",
        "m_person",
        "lower(f_dynamicsId)",
        "SELECT id FROM unlinked_d",
        "NOT deleted",
        "id, f_dynamicsId",
    )
    keyed_rows(
        con,
        "claimant_links",
        "identity",
        "marketo_id",
        "SELECT CAST(id AS VARCHAR) FROM id_claimants",
        f"{in_persons} AND state = 'active'",
        "marketo_id",
    )
    con.execute("""CREATE OR REPLACE TEMP TABLE id_matches AS
        SELECT d.id AS did, min(m.id) AS mid FROM unlinked_d d
        JOIN id_claimants m ON lower(m.f_dynamicsId) = d.id
        WHERE NOT EXISTS (SELECT 1 FROM claimant_links y WHERE y.marketo_id = CAST(m.id AS VARCHAR))
        GROUP BY d.id""")
    n = ledger.link(con, e, "SELECT did, CAST(mid AS VARCHAR) AS mid FROM id_matches", "dynamics_id", now)
    linked("id_matches")
    if n:
        summary.linked["dynamics_id"] = n
    if entity.name == "lead" and "contact" in config.by_name:
        # A lead first seen after it was qualified: its contact carries the person, the lead gets none.
        keyed_rows(
            con,
            "origin_contacts",
            "d_contact",
            "origin_lead",
            "SELECT id FROM unlinked_d",
            "NOT deleted AND sync_flag IS DISTINCT FROM false",
            "origin_lead",
        )
        con.execute("""CREATE OR REPLACE TEMP TABLE converted_leads AS
            SELECT d.id AS did, CAST(NULL AS VARCHAR) AS mid FROM unlinked_d d
            WHERE EXISTS (SELECT 1 FROM origin_contacts c WHERE c.origin_lead = d.id)""")
        n = ledger.link(
            con,
            "lead",
            "SELECT did, mid FROM converted_leads",
            "qualified_before_sync",
            now,
            state="converted",
        )
        linked("converted_leads")
        if n:
            summary.linked["converted_before_sync"] = n
    if entity.name == "contact" and "lead" in config.by_name:
        # Lead qualification: the contact takes over the lead's Marketo person, with the lead's base.
        keyed_rows(
            con,
            "origin_links",
            "identity",
            "dynamics_id",
            "SELECT origin_lead FROM unlinked_d",
            "entity = 'lead' AND state = 'active'",
        )
        con.execute("""CREATE OR REPLACE TEMP TABLE qualified AS
            SELECT d.id AS did, il.marketo_id, il.dynamics_id AS lead_id FROM unlinked_d d
            JOIN origin_links il ON il.dynamics_id = d.origin_lead
            WHERE NOT d.deleted AND d.sync_flag IS DISTINCT FROM false
            QUALIFY row_number() OVER (PARTITION BY il.dynamics_id ORDER BY d.id) = 1""")
        n = ledger.link(con, "contact", "SELECT did, marketo_id AS mid FROM qualified", "qualification", now)
        linked("qualified")
        if n:
            ledger.set_link_state(con, "lead", "SELECT lead_id FROM qualified", "converted")
            # The contact is a new record, not an edit of the lead: a field it holds with the lead's agreed
            # value keeps that base; any other field starts without one, so a field the contact did not
            # receive (blank) is no "Dynamics change" that would blank the person, and a value it carries
            # that differs meets the person's as on a first link (policy decides; consent stays opted out).
            shared = [
                f
                for f in entity.all_fields
                if f.marketo in {g.marketo for g in config.entity("lead").all_fields}
            ]
            kept = ", ".join(
                f"CASE WHEN {normalize.compare_expr(f, 'c.' + fcol(f.marketo))} IS NOT DISTINCT FROM "
                f"{normalize.compare_expr(f, 'b.' + fcol(f.marketo))} THEN b.{fcol(f.marketo)} END"
                for f in shared
            )
            ledger.write_base(
                con,
                "contact",
                [f.marketo for f in shared],
                f"""SELECT q.did, b.synced_at, b.run_id, {kept}
                                  FROM qualified q JOIN b_lead b ON b.dynamics_id = q.lead_id JOIN {d} c ON c.id = q.did""",
            )
            summary.linked["qualification"] = n
    if "email" in {f.marketo for f in entity.all_fields}:
        # First sync: an existing Marketo person with the same email is the same person, not a new one.
        rows_equal(
            con,
            "email_persons",
            "m_person",
            "lower(f_email)",
            """SELECT lower(f_email) FROM unlinked_d WHERE f_email IS NOT NULL AND NOT deleted
                          AND sync_flag IS DISTINCT FROM false""",
            "NOT deleted AND f_dynamicsId IS NULL",
            "id, f_email",
        )
        keyed_rows(
            con,
            "email_links",
            "identity",
            "marketo_id",
            "SELECT CAST(id AS VARCHAR) FROM email_persons",
            in_persons,
            "marketo_id",
        )
        con.execute("""CREATE OR REPLACE TEMP TABLE email_matches AS
            SELECT d.id AS did, m.id AS mid,
                   row_number() OVER (PARTITION BY d.id ORDER BY m.id) AS rd,
                   row_number() OVER (PARTITION BY m.id ORDER BY d.id) AS rm
            FROM unlinked_d d
            JOIN email_persons m ON lower(m.f_email) = lower(d.f_email)
            WHERE d.f_email IS NOT NULL AND NOT d.deleted AND d.sync_flag IS DISTINCT FROM false
              AND NOT EXISTS (SELECT 1 FROM email_links y WHERE y.marketo_id = CAST(m.id AS VARCHAR))""")
        n = ledger.link(
            con,
            e,
            "SELECT did, CAST(mid AS VARCHAR) AS mid FROM email_matches WHERE rd = 1 AND rm = 1",
            "email",
            now,
        )
        if n:
            summary.linked["email"] = n


# The person check blocks the run only for damage that spans it: more quarantined records than this floor AND
# more than this share of the linked ones (a systematic fault such as a wrong mapping, a mass import or a bug
# in the sync; carrying on would spread it). Below that, quarantined records are held one by one and the rest
# of the world keeps syncing.
QUARANTINE_BLOCK_FLOOR = 25
QUARANTINE_BLOCK_SHARE = 0.02


def follow_dynamics_merges(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    run_id: str,
    now: datetime,
    summary: PlanSummary,
) -> int:
    """Follow Dataverse ``Merge``: a subordinate row (``merged``, ``masterid`` = the master) stops syncing.

    Its Marketo person goes with it, never duplicated: if the master has no person yet, the subordinate's
    person becomes the master's (the link and its base move; the master is planned in this run, so the
    person's ``dynamicsId`` is re-pointed and the master's values flow by the field policies); if both
    have one, the subordinate's person is merged into the master's in Marketo (a ``merge`` write, the
    master's person wins, as the master row does in Dynamics); otherwise (no person, or a master that no
    longer syncs) the subordinate is simply retired. The retired link keeps state ``merged``. Returns the
    number of records added to the work set (masters).
    """
    from sync_pipeline.engine.extract.dynamics import MERGEABLE

    con.execute("CREATE OR REPLACE TEMP TABLE held_back (did VARCHAR, cls VARCHAR)")
    if entity.dynamics is None or entity.dynamics.table not in MERGEABLE:
        return 0
    d, person = qi(f"d_{entity.name}"), entity.is_person
    keyed_rows(
        con,
        "work_subordinates",
        d,
        "id",
        "SELECT did FROM work_set",
        "master_id IS NOT NULL AND master_id <> id AND NOT deleted",
        "id",
    )
    if not one_row(con, "SELECT count(*) FROM work_subordinates")[0]:
        return 0
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE dynamics_merges AS
        SELECT d.id AS sub, d.master_id AS master, i.marketo_id AS sub_mid, i.state AS sub_state,
               im.marketo_id AS master_mid, im.state AS master_state,
               CASE WHEN i.state = 'active' AND im.dynamics_id IS NULL AND $person
                         THEN 'relink'
                    WHEN i.state = 'active' AND im.state = 'active' AND $person
                         AND i.marketo_id IS DISTINCT FROM im.marketo_id THEN 'merge'
                    WHEN i.state = 'active' AND NOT $person THEN 'retire_after'
                    ELSE 'retire' END AS action
        FROM work_set JOIN {d} d ON d.id = work_set.did
        LEFT JOIN identity i ON i.entity = $entity AND i.dynamics_id = d.id
        LEFT JOIN identity im ON im.entity = $entity AND im.dynamics_id = d.master_id
        WHERE d.master_id IS NOT NULL AND d.master_id <> d.id AND NOT d.deleted
          AND i.state IS DISTINCT FROM 'merged'""",
        {"person": person, "entity": entity.name},
    )
    n = int(one_row(con, "SELECT count(*) FROM dynamics_merges")[0])
    if not n:
        return 0
    summary.merged += n
    e = entity.name
    relinked = "SELECT sub, master FROM dynamics_merges WHERE action = 'relink'"
    # The master's person: the subordinate's, with the subordinate's base (the last values both agreed on).
    ledger.link(
        con,
        e,
        "SELECT master AS did, sub_mid AS mid FROM dynamics_merges WHERE action = 'relink'",
        "dynamics_merge",
        now,
    )
    ledger.move_base(con, e, relinked)
    # An opt-out the subordinate had agreed on survives the merge: where the master says opted in, its value
    # becomes the base, so the person's opt-out is the change that flows (to the master), not the reverse.
    from sync_pipeline.engine.extract.merges import CONSENT_FIELDS

    consent = [
        f.marketo for f in entity.all_fields if f.marketo in CONSENT_FIELDS and f.transform == "boolean"
    ]
    ledger.base_takes_record_opt_ins(con, e, consent, relinked)
    # Both had a person: merge the subordinate's into the master's in Marketo (applied by the push).
    con.execute(
        f"""{PLAN_INSERT} SELECT ?, ?, sub, master_mid, 'marketo', 'merge', 'leadIds',
                        sub_mid, master_mid, sub_mid, 'dynamics_merge', NULL FROM dynamics_merges WHERE action = 'merge'""",
        [run_id, e],
    )
    con.execute(
        "INSERT INTO held_back (did, cls) SELECT sub, 'merging' FROM dynamics_merges WHERE action = 'merge'"
    )
    # A one-way record (an account's company) receives its last state (e.g. Inactive) in this run, then retires.
    con.execute(
        f"""{PLAN_INSERT} SELECT ?, ?, sub, sub_mid, 'state', 'merged', NULL, sub, master,
                        NULL, 'dynamics_merge', NULL FROM dynamics_merges WHERE action = 'retire_after'""",
        [run_id, e],
    )
    # Everything else: the subordinate is retired (a link kept for the record, state merged).
    ledger.set_link_state(
        con, e, "SELECT sub FROM dynamics_merges WHERE action IN ('relink', 'retire')", "merged"
    )
    ledger.link(
        con,
        e,
        "SELECT sub AS did, master_mid AS mid FROM dynamics_merges WHERE sub_state IS NULL",
        "dynamics_merge",
        now,
        state="merged",
    )
    ledger.note_state_changes_from(
        con,
        run_id,
        now,
        """
        SELECT ? AS entity, sub AS dynamics_id, COALESCE(sub_mid, master_mid) AS marketo_id,
               CASE action WHEN 'relink' THEN 'relink' ELSE 'merged' END AS op, 'dynamics_id' AS field,
               sub AS value_before, master AS value_after, 'dynamics_merge' AS rule
        FROM dynamics_merges WHERE action IN ('relink', 'retire')""",
        [e],
    )
    # Masters whose person moved are planned now (their person's dynamicsId is re-pointed to them).
    ledger.mark_pending(
        con,
        e,
        [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT master FROM dynamics_merges WHERE action = 'relink'"
            ).fetchall()
        ],
    )
    added = con.execute(f"""INSERT INTO work_set (did, d_seq) SELECT DISTINCT d.id, d.pending_seq FROM dynamics_merges JOIN {d} d ON d.id = dynamics_merges.master
                            WHERE dynamics_merges.action = 'relink' AND d.id NOT IN (SELECT did FROM work_set)""").fetchone()
    return int(added[0]) if added else 0


def quarantine(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    run_id: str,
    now: datetime,
    summary: PlanSummary,
) -> int:
    """Hold back the records of the work set whose links are inconsistent; everything else plans as usual.

    Each is filed in ``failures`` (target ``quarantine``, held, code ``quarantine:<reason>``, a message naming
    the records involved), so ``errors`` and ``status`` show it. A quarantined record is looked at again in
    every plan, so its row clears by itself once the damage is repaired (e.g. the duplicate person merged or
    deleted in Marketo). Reasons: ``duplicate_dynamics_id`` (two live persons carry this record's id),
    ``person_shared`` (another live record is linked to the same person), ``vanished_person`` (the link names
    a person id that is not a number, or one Marketo does not return: the extract reads linked persons the
    mirror lacks again, so a mirror that merely lost a row heals without a hold).
    """
    e = sql_text(entity.name)
    persons = person_entities(config)
    added = None
    if state.sweep_due(con, config, entity.name):
        # Damage is looked for in the whole store, not only among the records that changed (a record nobody edits
        # must still show up in errors and status), and quarantined records are re-examined in every sweep.
        added = con.execute(f"""INSERT INTO work_set SELECT d.id, d.pending_seq FROM {qi("d_" + entity.name)} d WHERE d.id IN (
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
            AND d.id NOT IN (SELECT did FROM work_set)""").fetchone()
    # The work set's links, their persons, the other links to those persons and the persons claiming the work
    # set's ids, all read through the key indexes.
    work = "SELECT did FROM work_set"
    keyed_rows(
        con,
        "linked_work",
        "identity",
        "dynamics_id",
        work,
        f"entity = {e} AND state = 'active'",
        "dynamics_id AS did, marketo_id",
    )
    mids = "SELECT marketo_id FROM linked_work"
    keyed_rows(
        con,
        "linked_persons",
        "m_person",
        "id",
        "SELECT TRY_CAST(marketo_id AS BIGINT) FROM linked_work",
        columns="id",
    )
    keyed_rows(
        con, "person_links", "identity", "marketo_id", mids, f"state = 'active' AND entity IN ({persons})"
    )
    rows_equal(
        con,
        "claimants",
        "m_person",
        "lower(f_dynamicsId)",
        work,
        "NOT deleted AND f_dynamicsId IS NOT NULL",
        "id, lower(f_dynamicsId) AS did",
    )
    con.execute(f"""CREATE OR REPLACE TEMP TABLE quarantine_found AS
        SELECT l.did, 'quarantine:vanished_person' AS code,
               {sql_text(entity.name)} || ' ' || l.did || ' is linked to Marketo person ' || COALESCE(l.marketo_id, '(none)')
               || CASE WHEN TRY_CAST(l.marketo_id AS BIGINT) IS NULL THEN ', which is not a person id'
                       ELSE ', which Marketo does not return (it is read again in every run)' END
               || '; held until the link is repaired or the record is released' AS message
        FROM linked_work l LEFT JOIN linked_persons m ON m.id = TRY_CAST(l.marketo_id AS BIGINT) WHERE m.id IS NULL
        UNION ALL
        SELECT l.did, 'quarantine:person_shared',
               {sql_text(entity.name)} || ' ' || l.did || ' and ' || string_agg(o.entity || ' ' || o.dynamics_id, ', ')
               || ' are all linked to Marketo person ' || l.marketo_id
               || '; held until only one record owns the person'
        FROM linked_work l JOIN person_links o ON o.marketo_id = l.marketo_id
             AND NOT (o.entity = {e} AND o.dynamics_id = l.did)
        WHERE l.marketo_id IN (SELECT x.marketo_id FROM person_links x GROUP BY x.marketo_id HAVING count(*) > 1)
        GROUP BY l.did, l.marketo_id
        UNION ALL
        SELECT d.did, 'quarantine:duplicate_dynamics_id',
               {sql_text(entity.name)} || ' ' || d.did || ' is claimed by ' || count(*) || ' Marketo persons ('
               || string_agg(CAST(m.id AS VARCHAR), ', ' ORDER BY m.id)
               || ') that all carry it as dynamicsId; held until one of them is merged or deleted in Marketo'
        FROM (SELECT did FROM claimants GROUP BY 1 HAVING count(*) > 1) d
        JOIN claimants m ON m.did = d.did
        GROUP BY d.did""")
    con.execute("DROP TABLE linked_work")
    con.execute("""CREATE OR REPLACE TEMP TABLE quarantined AS SELECT did, string_agg(code, ',' ORDER BY code) AS codes,
                   arg_min(code, code) AS code, string_agg(message, '; ' ORDER BY code) AS message
                   FROM quarantine_found GROUP BY did""")
    con.execute("DROP TABLE quarantine_found")
    # Repaired: the record plans normally again and its quarantine row goes.
    ledger.settle_quarantine(con, entity.name, run_id, now)
    con.execute(
        "INSERT INTO held_back (did, cls) SELECT did, 'quarantined' FROM quarantined WHERE did NOT IN (SELECT did FROM held_back)"
    )
    summary.quarantined += int(one_row(con, "SELECT count(*) FROM quarantined")[0])
    return int(added[0]) if added else 0


def hold_back(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        "UPDATE joined_work SET cls = held_back.cls FROM held_back WHERE joined_work.did = held_back.did"
    )
