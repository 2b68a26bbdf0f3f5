"""Plan: new Marketo persons matching the entity's rule become Dynamics records ("Sync Person to Microsoft")."""

from __future__ import annotations

from typing import Any

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.plan.summary import PLAN_INSERT
from sync_pipeline.engine.store.state import fcol, qi


def _rule_condition(cond: Any) -> tuple[str, list[Any]]:
    """SQL for one condition of the create rule over person ``m``, and its bound values."""
    col = f"m.{fcol(cond.field)}"
    if cond.op == "not_blank":
        return f"{col} IS NOT NULL", []
    if cond.op == "blank":
        return f"{col} IS NULL", []
    if cond.op == "in":
        return f"{col} IN (SELECT unnest(?::VARCHAR[]))", [[str(v) for v in cond.value]]
    sql_op = {"eq": "=", "ne": "<>", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}[cond.op]
    if isinstance(cond.value, (int, float)) and not isinstance(cond.value, bool):
        return f"TRY_CAST({col} AS DOUBLE) {sql_op} ?", [float(cond.value)]
    return f"{col} {sql_op} ?", [str(cond.value)]


def plan_dynamics_creates(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str) -> None:
    """New Marketo persons matching the rule become Dynamics leads ("Sync Person to Microsoft")."""
    assert entity.create_in_dynamics is not None
    conds = [_rule_condition(c) for c in entity.create_in_dynamics.all]
    cond = " AND ".join(sql for sql, _ in conds) or "true"
    to_d = [f for f in entity.all_fields if entity.field_direction(f) in ("two_way", "to_dynamics")]
    # Deterministic GUID from the person id: a re-run after a crash upserts the same lead, never a second.
    guid = ("(SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4) || '-' || "
            "substr(h, 17, 4) || '-' || substr(h, 21, 12) FROM (SELECT md5('marketo-person:' || CAST(m.id AS VARCHAR)) AS h))")
    # A person whose email a Dynamics lead or contact already has is that record's person (linked by
    # email when that record is planned), not a new lead.
    same_email = "".join(
        f" AND NOT EXISTS (SELECT 1 FROM {qi('d_' + p.name)} x WHERE NOT x.deleted AND lower(x.f_email) = lower(m.f_email))"
        for p in config.persons if "email" in {f.marketo for f in p.all_fields})
    con.execute(f"""CREATE OR REPLACE TEMP TABLE person_creates AS
        SELECT m.*, {guid} AS new_id, ({cond}) AS matches FROM m_person m
        WHERE m.pending_seq IS NOT NULL AND NOT m.deleted AND m.f_dynamicsId IS NULL
          AND NOT EXISTS (SELECT 1 FROM identity i WHERE i.entity IN (SELECT unnest(?::VARCHAR[]))
                          AND i.marketo_id = CAST(m.id AS VARCHAR))
          {same_email}""", [v for _, bound in conds for v in bound] + [[e.name for e in config.persons]])
    head = [run_id, entity.name]
    if to_d:
        con.execute(f"""{PLAN_INSERT} SELECT ?, ?, new_id, CAST(id AS VARCHAR), 'dynamics', 'create', field,
                NULL, value, NULL, 'create_in_dynamics', NULL
            FROM (SELECT new_id, id, unnest(?::VARCHAR[]) AS field,
                         unnest([{", ".join(fcol(f.marketo) for f in to_d)}]) AS value FROM person_creates WHERE matches)""",
                    head + [[f.marketo for f in to_d]])
    con.execute("""INSERT INTO plan_work (run_id, entity, dynamics_id, d_seq, marketo_id, m_seq)
                   SELECT ?, ?, NULL, NULL, CAST(id AS VARCHAR), pending_seq FROM person_creates""", head)
