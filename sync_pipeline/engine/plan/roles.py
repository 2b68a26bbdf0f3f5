"""Plan: derived opportunity contact roles, from each opportunity's customer contact.

An opportunity wants a role for its customer contact's active linked person. What can change that: the
opportunity (customer, delete, sync flag: its pending mark, or the derived mark the ledger leaves when its plan
was applied), the contact's link or quarantine (the ledger's derived marks, kind ``contact``) and a failed role
write. Only those opportunities are compared with the base; the whole comparison runs the first time, after a
plan that was not applied in full, and every ``sync.damage_sweep_every`` runs as a safety net."""

from __future__ import annotations

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.plan.summary import PLAN_INSERT, PlanSummary
from sync_pipeline.engine.store.ledger import DERIVED_COMPLETE, LINKED
from sync_pipeline.engine.store.state import column, get_cursor, keyed_rows, one_row, qi, sql_text, sweep_due

ACTIVE_LINK = (
    f"entity = {sql_text(LINKED)} AND state = 'active' AND TRY_CAST(marketo_id AS BIGINT) IS NOT NULL"
)


def plan_roles(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str, full: bool = False
) -> PlanSummary:
    summary = PlanSummary(entity.name, run_id)
    assert entity.derived_from is not None
    src = qi(f"d_{entity.derived_from}")
    b, head = qi(f"b_{entity.name}"), [run_id, entity.name]
    upto = int(one_row(con, "SELECT COALESCE(max(seq), 0) FROM derived_marks")[0])
    sweep = sweep_due(con, config, "roles:" + entity.name)
    full = full or sweep or get_cursor(con, DERIVED_COMPLETE + entity.name) is None
    if full:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE role_opps AS SELECT id, customer_contact, sync_flag, deleted FROM {src}"
        )
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE role_base AS SELECT dynamics_id, f_leadId, f_role FROM {b}"
        )
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE role_links AS SELECT dynamics_id, marketo_id FROM identity WHERE {ACTIVE_LINK}"
        )
    else:
        _changed(con, entity, src, b, upto)
    # The plan notes how far it read the marks (and whether it compared everything): ledger.finish drops them.
    con.execute(
        "INSERT INTO plan_work (run_id, entity, dynamics_id, d_seq, marketo_id) VALUES (?, ?, NULL, ?, ?)",
        head + [upto, "full" if full else None],
    )
    con.execute("""CREATE OR REPLACE TEMP TABLE role_wants AS
        SELECT o.id AS did, l.marketo_id AS lead_id
        FROM role_opps o LEFT JOIN role_links l ON l.dynamics_id = o.customer_contact
        WHERE o.customer_contact IS NOT NULL AND NOT o.deleted AND o.sync_flag IS DISTINCT FROM false""")

    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE role_changes AS
        SELECT COALESCE(r.did, b.dynamics_id) AS did, r.lead_id AS want, b.f_leadId AS have, b.f_role AS have_role
        FROM role_wants r FULL OUTER JOIN role_base b ON b.dynamics_id = r.did
        WHERE (r.lead_id IS DISTINCT FROM b.f_leadId OR b.f_role IS DISTINCT FROM ?)
          -- a quarantined contact's roles stay as they are until it is repaired (neither moved nor removed)
          AND COALESCE(r.did, b.dynamics_id) NOT IN (SELECT o.id FROM role_opps o JOIN failures q
              ON q.entity = {sql_text(LINKED)} AND q.target = 'quarantine' AND q.dynamics_id = o.customer_contact)""",
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


def _changed(con: duckdb.DuckDBPyConnection, entity: Entity, src: str, b: str, upto: int) -> None:
    """Temp tables ``role_opps``, ``role_base`` and ``role_links`` for the opportunities whose role may have
    changed, read by key (through the indexes with ``sync.index_state``)."""
    marks = "SELECT id FROM derived_marks WHERE kind = ? AND seq <= ?"
    contacts = column(con, marks, [LINKED, upto])
    keyed_rows(con, "role_by_contact", src, "customer_contact", contacts, columns="id")
    ids = column(con, f"SELECT id FROM {src} WHERE pending_seq > 0")
    ids += column(con, marks, [entity.derived_from, upto])
    ids += column(con, "SELECT id FROM role_by_contact")
    ids += column(con, "SELECT dynamics_id FROM failures WHERE entity = ?", [entity.name])
    keyed_rows(con, "role_opps", src, "id", ids, columns="id, customer_contact, sync_flag, deleted")
    keyed_rows(con, "role_base", b, "dynamics_id", ids, columns="dynamics_id, f_leadId, f_role")
    customers = column(
        con, "SELECT DISTINCT customer_contact FROM role_opps WHERE customer_contact IS NOT NULL"
    )
    keyed_rows(
        con, "role_links", "identity", "dynamics_id", customers, ACTIVE_LINK, "dynamics_id, marketo_id"
    )
