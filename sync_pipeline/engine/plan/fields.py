"""Plan: the field-level three-way merge (the joined view ``joined_work``, per-field outcomes, policy SQL)."""

from __future__ import annotations

import duckdb

from sync_pipeline.config.model import STICKY, Entity, FieldMap, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.plan.identity import hold_back
from sync_pipeline.engine.plan.summary import PLAN_INSERT, PlanSummary
from sync_pipeline.engine.store.state import (
    fcol,
    keyed_rows,
    latest_fields,
    one_row,
    qi,
    sql_text,
)


def _work_rows(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity) -> None:
    """The rows of the slice's records (mirror, base, link, person, a customer contact), read through the key
    indexes into temp tables ``work_d``/``work_b``/``work_i``/``work_m``/``work_cc``: the join below then never
    scans the store's tables."""
    ids = "SELECT did FROM work_set"
    keyed_rows(con, "work_d", qi(f"d_{entity.name}"), "id", ids)
    keyed_rows(con, "work_b", qi(f"b_{entity.name}"), "dynamics_id", ids)
    keyed_rows(con, "work_i", "identity", "dynamics_id", ids, f"entity = {sql_text(entity.name)}")
    if entity.is_person:
        keyed_rows(con, "work_m", "m_person", "id", "SELECT TRY_CAST(marketo_id AS BIGINT) FROM work_i")
    if any(f.transform == "customer_account" for f in entity.all_fields) and "contact" in config.by_name:
        keyed_rows(con, "work_cc", "d_contact", "id", "SELECT customer_contact FROM work_d")


def joined(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity) -> None:
    e, d, b = entity.name, "work_d", "work_b"
    _work_rows(con, config, entity)
    sel = []
    for f in entity.all_fields:
        c = fcol(f.marketo)
        dval = f"d.{c}"
        if f.transform == "customer_account" and "contact" in config.by_name:
            dval = (
                f"COALESCE(d.{c}, cc.f_externalCompanyId)"
                if "externalCompanyId" in {g.marketo for g in config.entity("contact").all_fields}
                else dval
            )
        sel.append(f"{dval} AS {qi('d_' + f.marketo)}")
        sel.append(f"b.{c} AS {qi('b_' + f.marketo)}")
        if entity.is_person:
            # No mirrored Marketo row (we created it and have not read it back): Marketo holds the base.
            sel.append(f"CASE WHEN m.id IS NULL THEN b.{c} ELSE m.{c} END AS {qi('m_' + f.marketo)}")
            # After a rollback a field may have one agreed value per system (b__split, admin/rollback.py).
            for side in ("d", "m"):
                sel.append(
                    f"CASE WHEN split_base.{qi('sh_' + f.marketo)} THEN split_base.{qi('s' + side + '_' + f.marketo)} "
                    f"ELSE b.{c} END AS {qi('b' + side + '_' + f.marketo)}"
                )
    person_cols = (
        (
            "m.id AS m_id, m.deleted AS m_deleted, m.updated_at AS m_updated, m.pending_seq AS m_seq, "
            "m.f_dynamicsId AS m_dynamicsId, m.f_dynamicsType AS m_dynamicsType, "
            "m.f_dynamicsIsDeleted AS m_dynamicsIsDeleted"
        )
        if entity.is_person
        else (
            "NULL AS m_id, false AS m_deleted, NULL AS m_updated, NULL AS m_seq, NULL AS m_dynamicsId, "
            "NULL AS m_dynamicsType, NULL AS m_dynamicsIsDeleted"
        )
    )
    person_join = "LEFT JOIN work_m m ON CAST(m.id AS VARCHAR) = i.marketo_id" if entity.is_person else ""
    if entity.is_person:
        pivots = ", ".join(
            f"bool_or(field = {sql_text(f.marketo)}) AS {qi('sh_' + f.marketo)}, "
            f"max(CASE WHEN field = {sql_text(f.marketo)} THEN d_value END) AS {qi('sd_' + f.marketo)}, "
            f"max(CASE WHEN field = {sql_text(f.marketo)} THEN m_value END) AS {qi('sm_' + f.marketo)}"
            for f in entity.all_fields
        )
        con.execute(f"""CREATE OR REPLACE TEMP TABLE split_base AS SELECT dynamics_id, {pivots} FROM b__split
                        WHERE entity = {sql_text(e)} AND dynamics_id IN (SELECT did FROM work_set) GROUP BY dynamics_id""")
        person_join += " LEFT JOIN split_base ON split_base.dynamics_id = work_set.did"
    for n, name in enumerate(latest_fields(entity)):  # per-field change times, for policy latest
        sel.append(f"td{n}.changed_at AS {qi('dt_' + name)}")
        sel.append(f"tm{n}.changed_at AS {qi('mt_' + name)}")
        person_join += (
            f" LEFT JOIN field_times td{n} ON td{n}.side = {sql_text('d:' + e)} AND td{n}.id = work_set.did"
            f" AND td{n}.field = {sql_text(name)}"
            f" LEFT JOIN field_times tm{n} ON tm{n}.side = 'm' AND tm{n}.id = i.marketo_id"
            f" AND tm{n}.field = {sql_text(name)}"
        )
    contact_join = (
        "LEFT JOIN work_cc cc ON cc.id = d.customer_contact"
        if any(f.transform == "customer_account" for f in entity.all_fields) and "contact" in config.by_name
        else ""
    )
    con.execute(f"""CREATE OR REPLACE TEMP TABLE joined_work AS
        SELECT work_set.did, work_set.d_seq, d.deleted AS d_deleted, d.sync_flag, d.etag, d.modified_on AS d_modified,
               i.marketo_id, i.state, b.dynamics_id IS NOT NULL AS has_base, {person_cols}, {", ".join(sel)}
        FROM work_set JOIN {d} d ON d.id = work_set.did
        LEFT JOIN work_i i ON i.entity = {sql_text(e)} AND i.dynamics_id = work_set.did
        LEFT JOIN {b} b ON b.dynamics_id = work_set.did
        {person_join} {contact_join}""")
    recreate = entity.on_marketo_delete == "recreate"
    con.execute("""ALTER TABLE joined_work ADD COLUMN cls VARCHAR""")
    con.execute(f"""UPDATE joined_work SET cls = CASE
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


# Consent (policy opt_out_sticky, domain.md 1.19): "true" is opted out. An opt-in is written only where the
# side it comes from itself changed from out to in since the last sync (base true, now false, the other side
# untouched); a blank is never written over a value. Everything else keeps or spreads the opt-out.
STICKY_OUTCOME = """CASE WHEN NOT dc AND NOT mc THEN NULL
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


def one_way_sticky(outcome: str, source: str) -> str:
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
    d_time, m_time = (
        ("COALESCE(dt, d_modified)", "COALESCE(mt, m_updated)")
        if field_times
        else ("d_modified", "m_updated")
    )
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
        return one_way_sticky(out, "marketo") if policy == STICKY else out
    if direction == "to_dynamics":
        out = "CASE WHEN mc AND same THEN 'base' WHEN mc THEN 'dynamics' END"
        return one_way_sticky(out, "dynamics") if policy == STICKY else out
    if policy == STICKY:
        return STICKY_OUTCOME
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
        return (
            f"CASE WHEN dc AND mc AND NOT same THEN 'conflict:{STICKY}' "
            f"WHEN (dc AND NOT mc AND outcome = 'dynamics') OR (mc AND NOT dc AND outcome = 'marketo') "
            f"THEN '{STICKY}' ELSE 'two_way' END"
        )
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
                     FROM (SELECT did, marketo_id, etag, d_modified, m_updated, {sql_text(f.marketo)} AS field,
                            {qi("d_" + f.marketo)} AS dv, {mv} AS mv, {qi("b_" + f.marketo)} AS bv,
                            {dt} AS dt, {mt} AS mt,
                            ({cmp_d}) IS DISTINCT FROM ({cmp_bd}) AS dc,
                            ({cmp_m}) IS DISTINCT FROM ({cmp_bm}) AS mc,
                            ({cmp_d}) IS NOT DISTINCT FROM ({cmp_m}) AS same
                     FROM joined_work WHERE cls = 'update'))"""


def plan_slice(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str, summary: PlanSummary
) -> None:
    """Plan one slice of the work set (temp table ``work_set``) into table ``plan``."""
    joined(con, config, entity)
    hold_back(con)  # records being merged or quarantined plan nothing else
    e, head = entity.name, [run_id, entity.name]
    fields = [f for f in entity.all_fields if entity.field_direction(f) != "none"]
    to_m = [f for f in fields if entity.field_direction(f) in ("to_marketo", "two_way")]

    # Records holding a value that cannot be represented (e.g. an unknown picklist code) are rejected.
    if fields:
        bad = " OR ".join(f"starts_with({qi('d_' + f.marketo)}, $invalid)" for f in fields)
        con.execute(
            f"""{PLAN_INSERT} SELECT $run_id, $entity, did, marketo_id, 'marketo', 'reject', field,
                NULL, value, NULL, 'invalid value', etag
            FROM (SELECT did, marketo_id, etag, unnest($fields::VARCHAR[]) AS field,
                         unnest([{", ".join(qi("d_" + f.marketo) for f in fields)}]) AS value
                  FROM joined_work WHERE cls IN ('create', 'update') AND ({bad}))
            WHERE starts_with(value, $invalid)""",
            {
                "run_id": run_id,
                "entity": e,
                "fields": [f.marketo for f in fields],
                "invalid": normalize.INVALID,
            },
        )
        con.execute(
            """UPDATE joined_work SET cls = 'rejected' WHERE did IN (SELECT dynamics_id FROM plan
                       WHERE entity = ? AND op = 'reject')""",
            [e],
        )

    # Creates in Marketo: every mapped value travels.
    if to_m:
        con.execute(
            f"""{PLAN_INSERT} SELECT ?, ?, did, NULL, 'marketo', 'create', field, NULL, value, NULL,
                'create', etag
            FROM (SELECT did, etag, unnest(?::VARCHAR[]) AS field,
                         unnest([{", ".join(qi("d_" + f.marketo) for f in to_m)}]) AS value
                  FROM joined_work WHERE cls = 'create')""",
            head + [[f.marketo for f in to_m]],
        )
    # Deletes in Dynamics: flag, delete or ignore in Marketo.
    if entity.on_dynamics_delete != "ignore":
        op = entity.on_dynamics_delete
        con.execute(
            f"""{PLAN_INSERT} SELECT ?, ?, did, marketo_id, 'marketo', ?,
                'dynamicsIsDeleted', m_dynamicsIsDeleted, 'true', NULL, ?, etag
            FROM joined_work WHERE cls = 'delete'""",
            head + [op, "dynamics_delete:" + op],
        )
    else:
        con.execute(
            f"""{PLAN_INSERT} SELECT ?, ?, did, marketo_id, 'state', 'retire', NULL, NULL, NULL, NULL,
                'dynamics_delete:ignore', etag FROM joined_work WHERE cls = 'delete'""",
            head,
        )
    # Persons deleted in Marketo: tombstone the link so nothing silently re-creates them.
    con.execute(
        f"""{PLAN_INSERT} SELECT ?, ?, did, marketo_id, 'state', 'tombstone', NULL, NULL, NULL, NULL,
            'marketo_delete:tombstone', etag FROM joined_work WHERE cls = 'marketo_deleted'""",
        head,
    )

    # Updates: the field-level three-way merge.
    if fields:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE field_outcomes AS "
            + " UNION ALL ".join(_field_rows_sql(entity, f) for f in fields)
        )
        con.execute(
            f"""{PLAN_INSERT} SELECT ?, ?, did, marketo_id,
                CASE outcome WHEN 'marketo' THEN 'marketo' WHEN 'dynamics' THEN 'dynamics' WHEN 'base' THEN 'base'
                             ELSE 'hold' END,
                CASE outcome WHEN 'base' THEN 'agree' WHEN 'hold' THEN 'hold' ELSE 'update' END,
                field,
                CASE outcome WHEN 'marketo' THEN mv WHEN 'dynamics' THEN dv WHEN 'hold' THEN mv END,  -- hold keeps both
                CASE outcome WHEN 'dynamics' THEN mv ELSE dv END,
                bv, rule, etag
            FROM field_outcomes WHERE outcome IS NOT NULL""",
            head,
        )
        for policy, n in con.execute("""SELECT split_part(rule, ':', 2), count(*) FROM field_outcomes
                                        WHERE starts_with(rule, 'conflict:') AND outcome IS NOT NULL
                                        GROUP BY 1""").fetchall():
            summary.conflicts[policy] = summary.conflicts.get(policy, 0) + int(n)
        con.execute("DROP TABLE field_outcomes")
    if entity.is_person:
        _plan_person_identity_fields(con, entity, run_id)

    con.execute(
        """INSERT INTO plan_work (run_id, entity, dynamics_id, d_seq, marketo_id, m_seq)
                   SELECT ?, ?, did, d_seq, marketo_id, m_seq FROM joined_work""",
        head,
    )
    for cls, n in con.execute("SELECT cls, count(*) FROM joined_work GROUP BY cls").fetchall():
        if cls in ("excluded", "filtered"):
            summary.excluded += int(n)
        elif cls == "marketo_deleted":
            summary.tombstoned += int(n)
    summary.unchanged += int(
        one_row(
            con,
            """SELECT count(*) FROM joined_work WHERE cls = 'update' AND did NOT IN
        (SELECT dynamics_id FROM plan WHERE entity = ? AND target IN ('marketo', 'dynamics'))""",
            [e],
        )[0]
    )
    con.execute("DROP TABLE joined_work")


def _plan_person_identity_fields(con: duckdb.DuckDBPyConnection, entity: Entity, run_id: str) -> None:
    """A linked person must carry our id and type (after an email match, or when a lead became a contact)."""
    typ = entity.marketo.type_value or entity.name.title()
    for field, value, bound in (("dynamicsId", "did", []), ("dynamicsType", "?", [typ])):
        col = qi("m_" + field)
        con.execute(
            f"""{PLAN_INSERT} SELECT ?, ?, did, marketo_id, 'marketo', 'update', ?, {col}, {value}, NULL,
                'identity', etag
            FROM joined_work WHERE cls = 'update' AND m_id IS NOT NULL AND {col} IS DISTINCT FROM {value}""",
            [run_id, entity.name, field] + bound + bound,
        )
