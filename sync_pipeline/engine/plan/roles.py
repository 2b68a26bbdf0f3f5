"""Plan: derived opportunity contact roles, from each opportunity's customer contact."""

from __future__ import annotations

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.plan.summary import PLAN_INSERT, PlanSummary
from sync_pipeline.engine.store.state import one_row, qi


def plan_roles(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str
) -> PlanSummary:
    summary = PlanSummary(entity.name, run_id)
    src = qi(f"d_{entity.derived_from}")
    b, head = qi(f"b_{entity.name}"), [run_id, entity.name]
    con.execute(f"""CREATE OR REPLACE TEMP TABLE role_wants AS
        SELECT o.id AS did, ic.marketo_id AS lead_id, o.sync_flag, o.deleted
        FROM {src} o LEFT JOIN identity ic ON ic.entity = 'contact' AND ic.dynamics_id = o.customer_contact
             AND ic.state = 'active' AND TRY_CAST(ic.marketo_id AS BIGINT) IS NOT NULL
        WHERE o.customer_contact IS NOT NULL AND NOT o.deleted AND o.sync_flag IS DISTINCT FROM false""")

    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE role_changes AS
        SELECT COALESCE(r.did, b.dynamics_id) AS did, r.lead_id AS want, b.f_leadId AS have, b.f_role AS have_role
        FROM role_wants r FULL OUTER JOIN {b} b ON b.dynamics_id = r.did
        WHERE (r.lead_id IS DISTINCT FROM b.f_leadId OR b.f_role IS DISTINCT FROM ?)
          -- a quarantined contact's roles stay as they are until it is repaired (neither moved nor removed)
          AND COALESCE(r.did, b.dynamics_id) NOT IN (SELECT o.id FROM {src} o JOIN failures q
              ON q.entity = 'contact' AND q.target = 'quarantine' AND q.dynamics_id = o.customer_contact)""",
        [entity.role_name],
    )
    summary.work = int(one_row(con, "SELECT count(*) FROM role_changes")[0])
    con.execute(
        f"""{PLAN_INSERT} SELECT ?, ?, did, have, 'marketo', 'delete', 'leadId', have, NULL, have_role,
            'role_removed', NULL FROM role_changes WHERE have IS NOT NULL""",
        head,
    )
    for field, value, bound in (
        ("leadId", "want", []),
        ("role", "?", [entity.role_name]),
        ("externalOpportunityId", "did", []),
    ):
        con.execute(
            f"""{PLAN_INSERT} SELECT ?, ?, did, want, 'marketo', 'create', ?, NULL,
                {value}, NULL, 'role_from_customer', NULL FROM role_changes WHERE want IS NOT NULL""",
            head + [field] + bound,
        )
    return summary
