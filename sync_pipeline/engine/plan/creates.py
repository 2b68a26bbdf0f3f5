"""Plan: new Marketo persons matching the entity's rule become Dynamics records ("Sync Person to Microsoft")."""

from __future__ import annotations

from typing import Any

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.plan.summary import PLAN_INSERT
from sync_pipeline.engine.store.state import (
    fcol,
    keyed_rows,
    qi,
    rows_equal,
    sql_text,
)


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


def plan_dynamics_creates(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str
) -> None:
    """New Marketo persons matching the rule become Dynamics leads ("Sync Person to Microsoft")."""
    assert entity.create_in_dynamics is not None
    conds = [_rule_condition(c) for c in entity.create_in_dynamics.all]
    cond = " AND ".join(sql for sql, _ in conds) or "true"
    to_d = [f for f in entity.all_fields if entity.field_direction(f) in ("two_way", "to_dynamics")]
    # Deterministic GUID from the person id: a re-run after a crash upserts the same lead, never a second.
    guid = (
        "(SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4) || '-' || "
        "substr(h, 17, 4) || '-' || substr(h, 21, 12) FROM (SELECT md5('marketo-person:' || CAST(m.id AS VARCHAR)) AS h))"
    )
    # A person whose email a Dynamics lead or contact already has is that record's person (linked by
    # email when that record is planned), not a new lead.
    with_email = [p for p in config.persons if "email" in {f.marketo for f in p.all_fields}]
    same_email = "".join(
        f" AND NOT EXISTS (SELECT 1 FROM {qi('email_owners_' + p.name)} x WHERE x.email = lower(m.f_email))"
        for p in with_email
    )
    # The pending persons and their links, read through the indexes (pending_seq > 0: every mark is positive).
    keyed_rows(
        con,
        "pending_persons",
        "m_person",
        "id",
        "SELECT id FROM m_person WHERE pending_seq > 0",
        "NOT deleted AND f_dynamicsId IS NULL",
    )
    keyed_rows(
        con,
        "pending_person_links",
        "identity",
        "marketo_id",
        "SELECT CAST(id AS VARCHAR) FROM pending_persons",
        "entity IN (" + ", ".join(sql_text(p.name) for p in config.persons) + ")",
        "marketo_id",
    )
    con.execute(
        "DELETE FROM pending_persons WHERE CAST(id AS VARCHAR) IN (SELECT marketo_id FROM pending_person_links)"
    )
    emails = "SELECT lower(f_email) FROM pending_persons WHERE f_email IS NOT NULL"
    for p in with_email:  # the Dynamics records holding those emails, through the mirrors' email indexes
        rows_equal(
            con,
            f"email_owners_{p.name}",
            qi(f"d_{p.name}"),
            "lower(f_email)",
            emails,
            "NOT deleted",
            "lower(f_email) AS email",
        )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE person_creates AS
        SELECT m.*, {guid} AS new_id, ({cond}) AS matches FROM pending_persons m
        WHERE true {same_email}""",
        [v for _, bound in conds for v in bound],
    )
    head = [run_id, entity.name]
    if to_d:
        con.execute(
            f"""{PLAN_INSERT} SELECT ?, ?, new_id, CAST(id AS VARCHAR), 'dynamics', 'create', field,
                NULL, value, NULL, 'create_in_dynamics', NULL
            FROM (SELECT new_id, id, unnest(?::VARCHAR[]) AS field,
                         unnest([{", ".join(fcol(f.marketo) for f in to_d)}]) AS value FROM person_creates WHERE matches)""",
            head + [[f.marketo for f in to_d]],
        )
    con.execute(
        """INSERT INTO plan_work (run_id, entity, dynamics_id, d_seq, marketo_id, m_seq)
                   SELECT ?, ?, NULL, NULL, CAST(id AS VARCHAR), pending_seq FROM person_creates""",
        head,
    )
