"""The three-way merge on hand-made mirror, base and identity rows: which write, which rule, per field."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import duckdb
import pytest
import yaml

from sync_pipeline.config.model import DEFAULT_PATH, SyncConfig, load_config
from sync_pipeline.engine import normalize
from sync_pipeline.engine import plan as plan_stage
from sync_pipeline.engine.store.state import ensure_schema, qi

NOW = datetime(2026, 11, 20, 12, 0, 0)
C1, C2, L1, A1 = (
    "c0000000-0000-4000-8000-000000000001",
    "c0000000-0000-4000-8000-000000000002",
    "10000000-0000-4000-8000-000000000001",
    "a0000000-0000-4000-8000-000000000001",
)


def _config(**contact_changes: Any) -> SyncConfig:
    raw = copy.deepcopy(yaml.safe_load(DEFAULT_PATH.read_text()))
    for e in raw["entities"]:
        if e["name"] == "contact":
            e["fields"] = copy.deepcopy(e["fields"])
            policies = contact_changes.pop("field_policies", {})
            for f in e["fields"]:
                if f["marketo"] in policies:
                    f["policy"] = policies[f["marketo"]]
            e.update(contact_changes)
    return SyncConfig.model_validate(raw)


@pytest.fixture
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    c = duckdb.connect()
    yield c
    c.close()


def _insert(con: duckdb.DuckDBPyConnection, table: str, cols: dict[str, Any]) -> None:
    con.execute(
        f"INSERT INTO {qi(table)} ({', '.join(qi(k) for k in cols)}) VALUES ({', '.join('?' for _ in cols)})",
        list(cols.values()),
    )


def _f(fields: dict[str, Any]) -> dict[str, Any]:
    return {f"f_{k}": v for k, v in fields.items()}


def dyn(
    con: duckdb.DuckDBPyConnection,
    entity: str,
    did: str,
    *,
    modified: str = "2026-11-20T10:00:00Z",
    sync_flag: bool | None = None,
    deleted: bool = False,
    origin_lead: str | None = None,
    pending: bool = True,
    **fields: Any,
) -> None:
    _insert(
        con,
        f"d_{entity}",
        {
            "id": did,
            "version": 2,
            "modified_on": modified,
            "etag": f'W/"{did[:4]}"',
            "deleted": deleted,
            "sync_flag": sync_flag,
            "origin_lead": origin_lead,
            "pending_seq": 7 if pending else None,
            **_f(fields),
        },
    )


def mkto(
    con: duckdb.DuckDBPyConnection,
    mid: int,
    *,
    updated: str = "2026-11-20T10:00:00Z",
    deleted: bool = False,
    pending: bool = True,
    **fields: Any,
) -> None:
    _insert(
        con,
        "m_person",
        {
            "id": mid,
            "updated_at": updated,
            "deleted": deleted,
            "pending_seq": 8 if pending else None,
            **_f(fields),
        },
    )


def base(con: duckdb.DuckDBPyConnection, entity: str, did: str, **fields: Any) -> None:
    _insert(con, f"b_{entity}", {"dynamics_id": did, "synced_at": NOW, "run_id": "r0", **_f(fields)})


def link(
    con: duckdb.DuckDBPyConnection, entity: str, did: str, mid: int | str, state: str = "active"
) -> None:
    _insert(
        con,
        "identity",
        {
            "entity": entity,
            "dynamics_id": did,
            "marketo_id": str(mid),
            "state": state,
            "linked_at": NOW,
            "how": "created",
        },
    )


def synced_contact(
    con: duckdb.DuckDBPyConnection,
    did: str,
    mid: int,
    agreed: dict[str, Any],
    dynamics: dict[str, Any] | None = None,
    marketo: dict[str, Any] | None = None,
    entity: str = "contact",
    **dyn_kw: Any,
) -> None:
    """A linked person: base = ``agreed``; each side = base overlaid with its own changes."""
    typ = entity.title()
    base(con, entity, did, **agreed)
    link(con, entity, did, mid)
    dyn(con, entity, did, **{**agreed, **(dynamics or {})}, **dyn_kw)
    mkto(
        con, mid, **{**agreed, **(marketo or {})}, dynamicsId=did, dynamicsType=typ, dynamicsIsDeleted="false"
    )


def plan(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: str
) -> tuple[plan_stage.PlanSummary, list[tuple]]:
    ensure_schema(con, config)
    summary = plan_stage.compute_plan(con, config, config.entity(entity), "r1", NOW)
    rows = con.execute(
        """SELECT dynamics_id, target, op, field, new_value, rule FROM plan WHERE entity = ?
                          ORDER BY dynamics_id, target, op, field""",
        [entity],
    ).fetchall()
    return summary, rows


@pytest.fixture
def config() -> SyncConfig:
    return load_config()


@pytest.fixture
def ready(con: duckdb.DuckDBPyConnection, config: SyncConfig) -> duckdb.DuckDBPyConnection:
    ensure_schema(con, config)
    return con


AGREED = {"email": "ann@example.org", "lastName": "Lee", "city": "Oslo", "title": "CTO", "phone": "+47 1"}


def test_new_dynamics_record_is_created_with_every_mapped_value(ready, config) -> None:
    dyn(ready, "contact", C1, email="ann@example.org", lastName="Lee", doNotCall="true")
    summary, rows = plan(ready, config, "contact")
    creates = {
        (f, v)
        for did, target, op, f, v, rule in rows
        if (target, op, rule) == ("marketo", "create", "create")
    }
    assert {("email", "ann@example.org"), ("lastName", "Lee"), ("doNotCall", "true")} <= creates
    assert ("leadScore", None) not in creates  # to_dynamics fields do not travel to Marketo
    assert {r[1:3] for r in rows} == {("marketo", "create")}
    assert summary.counts == {"marketo:create": 1}


def test_one_way_entity_pushes_only_what_changed_in_dynamics(ready, config) -> None:
    base(ready, "account", A1, company="Acme", mainPhone="+1 1")
    link(ready, "account", A1, A1)
    dyn(ready, "account", A1, company="Acme Corp", mainPhone="+1 1")
    _, rows = plan(ready, config, "account")
    assert rows == [(A1, "marketo", "update", "company", "Acme Corp", "to_marketo")]


def test_dynamics_change_flows_to_marketo_and_marketo_change_to_dynamics(ready, config) -> None:
    synced_contact(ready, C1, 11, AGREED, dynamics={"phone": "+47 2"})
    synced_contact(ready, C2, 12, AGREED, marketo={"title": "CEO"})
    _, rows = plan(ready, config, "contact")
    assert rows == [
        (C1, "marketo", "update", "phone", "+47 2", "two_way"),
        (C2, "dynamics", "update", "title", "CEO", "two_way"),
    ]
    etag = ready.execute("SELECT etag FROM plan WHERE dynamics_id = ?", [C2]).fetchone()[0]
    assert etag == f'W/"{C2[:4]}"'  # the write to Dynamics carries the etag read (If-Match)


def test_conflict_dynamics_wins_on_contacts(ready, config) -> None:
    synced_contact(ready, C1, 11, AGREED, dynamics={"city": "Bergen"}, marketo={"city": "Trondheim"})
    summary, rows = plan(ready, config, "contact")
    assert rows == [(C1, "marketo", "update", "city", "Bergen", "conflict:dynamics_wins")]
    assert summary.conflicts == {"dynamics_wins": 1}


def test_conflict_marketo_wins_on_leads(ready, config) -> None:
    synced_contact(
        ready, L1, 21, AGREED, dynamics={"city": "Bergen"}, marketo={"city": "Trondheim"}, entity="lead"
    )
    _, rows = plan(ready, config, "lead")
    assert rows == [(L1, "dynamics", "update", "city", "Trondheim", "conflict:marketo_wins")]


def test_same_change_on_both_sides_only_moves_the_base(ready, config) -> None:
    synced_contact(
        ready, C1, 11, AGREED, dynamics={"email": "ANN@example.org"}, marketo={"email": "ann@example.org"}
    )
    synced_contact(ready, C2, 12, AGREED, dynamics={"title": "CFO"}, marketo={"title": "CFO"})
    summary, rows = plan(ready, config, "contact")
    assert rows == [(C2, "base", "agree", "title", "CFO", "two_way")]  # emails compare case-insensitively
    assert summary.unchanged == 2


def test_different_fields_changed_on_both_sides_both_flow(ready, config) -> None:
    synced_contact(ready, C1, 11, AGREED, dynamics={"phone": "+47 2"}, marketo={"title": "CEO"})
    _, rows = plan(ready, config, "contact")
    assert rows == [
        (C1, "dynamics", "update", "title", "CEO", "two_way"),
        (C1, "marketo", "update", "phone", "+47 2", "two_way"),
    ]


def test_policy_latest_takes_the_later_side(con) -> None:
    cfg = _config(field_policies={"title": "latest"})
    ensure_schema(con, cfg)
    synced_contact(
        con, C1, 11, AGREED, dynamics={"title": "D"}, marketo={"title": "M"}, modified="2026-11-20T10:00:00Z"
    )
    con.execute("UPDATE m_person SET updated_at = '2026-11-20T11:00:00+01:00' WHERE id = 11")  # 10:00Z: a tie
    synced_contact(
        con, C2, 12, AGREED, dynamics={"title": "D"}, marketo={"title": "M"}, modified="2026-11-20T10:00:00Z"
    )
    con.execute("UPDATE m_person SET updated_at = '2026-11-20T10:00:01Z' WHERE id = 12")
    _, rows = plan(con, cfg, "contact")
    assert rows == [
        (C1, "marketo", "update", "title", "D", "conflict:latest"),  # tie: Dynamics
        (C2, "dynamics", "update", "title", "M", "conflict:latest"),
    ]


def test_policy_prefer_non_blank_keeps_the_value(con) -> None:
    cfg = _config(field_policies={"city": "prefer_non_blank"})
    ensure_schema(con, cfg)
    synced_contact(con, C1, 11, AGREED, dynamics={"city": None}, marketo={"city": "Trondheim"})
    synced_contact(con, C2, 12, AGREED, dynamics={"city": "Bergen"}, marketo={"city": None})
    _, rows = plan(con, cfg, "contact")
    assert rows == [
        (C1, "dynamics", "update", "city", "Trondheim", "conflict:prefer_non_blank"),
        (C2, "marketo", "update", "city", "Bergen", "conflict:prefer_non_blank"),
    ]


def test_policy_hold_writes_nothing_and_keeps_both_values(con) -> None:
    cfg = _config(field_policies={"phone": "hold"})
    ensure_schema(con, cfg)
    synced_contact(con, C1, 11, AGREED, dynamics={"phone": "+47 2"}, marketo={"phone": "+47 3"})
    summary, rows = plan(con, cfg, "contact")
    assert rows == [(C1, "hold", "hold", "phone", "+47 2", "conflict:hold")]
    assert con.execute("SELECT old_value, base_value FROM plan").fetchone() == ("+47 3", "+47 1")
    assert summary.conflicts == {"hold": 1}


def test_one_way_person_fields_do_not_flow_back(ready, config) -> None:
    agreed = {**AGREED, "externalCompanyId": A1, "leadScore": "40"}
    # Marketo edits a to_marketo field, Dynamics edits a to_dynamics field: neither flows.
    synced_contact(
        ready, C1, 11, agreed, dynamics={"leadScore": "99"}, marketo={"externalCompanyId": "other"}
    )
    # Marketo's score changes: it flows to Dynamics.
    synced_contact(ready, C2, 12, agreed, marketo={"leadScore": "70"})
    _, rows = plan(ready, config, "contact")
    assert rows == [(C2, "dynamics", "update", "leadScore", "70", "to_dynamics")]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("flag", [(C1, "marketo", "flag", "dynamicsIsDeleted", "true", "dynamics_delete:flag")]),
        ("delete", [(C1, "marketo", "delete", "dynamicsIsDeleted", "true", "dynamics_delete:delete")]),
        ("ignore", [(C1, "state", "retire", None, None, "dynamics_delete:ignore")]),
    ],
)
def test_dynamics_delete_modes(con, mode: str, expected: list[tuple]) -> None:
    cfg = _config(on_dynamics_delete=mode)
    ensure_schema(con, cfg)
    synced_contact(con, C1, 11, AGREED, dynamics={"phone": "+47 9"}, deleted=True)
    _, rows = plan(con, cfg, "contact")
    assert rows == expected


def test_sync_filter_excludes_never_synced_and_stops_updates(ready, config) -> None:
    dyn(ready, "contact", C1, sync_flag=False, email="new@example.org")
    synced_contact(ready, C2, 12, AGREED, dynamics={"phone": "+47 2"}, sync_flag=False)
    summary, rows = plan(ready, config, "contact")
    assert rows == []
    assert summary.excluded == 2


def test_marketo_delete_tombstones_and_tombstone_blocks_recreate(ready, config) -> None:
    synced_contact(ready, C1, 11, AGREED)
    ready.execute("UPDATE m_person SET deleted = true WHERE id = 11")
    base(ready, "contact", C2, **AGREED)
    link(ready, "contact", C2, 12, state="tombstoned")
    dyn(ready, "contact", C2, **{**AGREED, "phone": "+47 5"})
    summary, rows = plan(ready, config, "contact")
    assert rows == [(C1, "state", "tombstone", None, None, "marketo_delete:tombstone")]
    assert summary.tombstoned == 1


def test_invalid_picklist_code_rejects_the_record(ready, config) -> None:
    dyn(ready, "contact", C1, email="x@example.org", preferredMethodOfContact=normalize.INVALID + "9")
    summary, rows = plan(ready, config, "contact")
    assert rows == [
        (C1, "marketo", "reject", "preferredMethodOfContact", normalize.INVALID + "9", "invalid value")
    ]
    assert summary.rejected == 1


def test_first_sync_links_by_email_instead_of_creating(ready, config) -> None:
    dyn(ready, "contact", C1, email="Ann@Example.org", lastName="Lee")
    mkto(ready, 11, email="ann@example.org", lastName="Lee")
    summary, rows = plan(ready, config, "contact")
    assert ready.execute("SELECT marketo_id, how FROM identity WHERE dynamics_id = ?", [C1]).fetchall() == [
        ("11", "email")
    ]
    assert [r for r in rows if r[2] == "create"] == []
    assert {(r[3], r[4], r[5]) for r in rows if r[5] == "identity"} == {
        ("dynamicsId", C1, "identity"),
        ("dynamicsType", "Contact", "identity"),
    }
    assert summary.linked == {"email": 1}


def test_qualified_lead_contact_takes_over_the_same_person(ready, config) -> None:
    synced_contact(ready, L1, 21, AGREED, entity="lead", pending=False)
    ready.execute("UPDATE m_person SET pending_seq = NULL")
    dyn(ready, "contact", C1, origin_lead=L1, **AGREED)
    summary, rows = plan(ready, config, "contact")
    assert ready.execute(
        "SELECT entity, marketo_id, state, how FROM identity ORDER BY entity"
    ).fetchall() == [("contact", "21", "active", "qualification"), ("lead", "21", "converted", "created")]
    assert [r for r in rows if r[2] == "create"] == []
    assert [(r[3], r[4]) for r in rows] == [("dynamicsId", C1), ("dynamicsType", "Contact")]
    assert summary.linked == {"qualification": 1}


def test_new_marketo_person_matching_the_rule_becomes_a_lead(ready, config) -> None:
    mkto(ready, 31, email="hot@example.org", lastName="Hot", leadScore="75")
    mkto(ready, 32, email="cold@example.org", lastName="Cold", leadScore="10")
    mkto(ready, 33, email="noname@example.org", leadScore="90")
    _, rows = plan(ready, config, "lead")
    creates = ready.execute(
        "SELECT DISTINCT marketo_id, dynamics_id FROM plan WHERE op = 'create'"
    ).fetchall()
    assert [c[0] for c in creates] == ["31"]
    assert {(r[1], r[2], r[5]) for r in rows} == {("dynamics", "create", "create_in_dynamics")}
    assert ("email", "hot@example.org") in {(r[3], r[4]) for r in rows}
    again, _ = plan(ready, config, "lead")  # the new lead's id is derived from the person: re-plans agree
    assert ready.execute("SELECT DISTINCT dynamics_id FROM plan WHERE op = 'create'").fetchall() == [
        (creates[0][1],)
    ]
