"""Consent and blanks in the three-way merge (issue 9): policy opt_out_sticky, first links with no base,
qualification. Hand-made mirror, base and identity rows; the helpers are the merge tests' own."""

from __future__ import annotations

import copy

import pytest
import yaml

from sync_pipeline.config.model import DEFAULT_PATH, ConfigError, SyncConfig, load_config
from sync_pipeline.engine.store.state import ensure_schema
from sync_pipeline_tests.engine.plan.test_merge import AGREED, C1, C2, L1, dyn, mkto, plan, synced_contact

CONSENT = ("unsubscribed", "doNotEmail", "doNotCall", "doNotFax", "doNotSendMarketingMaterial")
C3 = "c0000000-0000-4000-8000-000000000003"


@pytest.fixture
def con():
    import duckdb

    c = duckdb.connect()
    yield c
    c.close()


@pytest.fixture
def config() -> SyncConfig:
    return load_config()


def test_packaged_config_makes_every_consent_field_sticky_on_both_person_entities(config) -> None:
    for entity in ("lead", "contact"):
        e = config.entity(entity)
        policies = {f.marketo: e.field_policy(f) for f in e.all_fields}
        assert {f: policies[f] for f in CONSENT} == {f: "opt_out_sticky" for f in CONSENT}
        dyn_cols = {f.marketo: f.dynamics for f in e.all_fields}
        assert [dyn_cols[f] for f in CONSENT] == [
            "donotbulkemail",
            "donotemail",
            "donotphone",
            "donotfax",
            "donotsendmm",
        ]


def test_sticky_policy_is_validated(tmp_path) -> None:
    raw = copy.deepcopy(yaml.safe_load(DEFAULT_PATH.read_text()))
    raw["entities"][0]["fields"][1]["policy"] = "opt_out_sticky"  # systemuser firstName: text
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="entity 'systemuser'.*field 'firstName'.*opt_out_sticky"):
        load_config(path)
    raw = copy.deepcopy(yaml.safe_load(DEFAULT_PATH.read_text()))
    raw["entities"][4]["policy"] = "opt_out_sticky"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="entity 'lead'.*per consent field"):
        load_config(path)


def test_an_opt_out_on_either_side_wins_over_an_opt_in_nobody_made(con, config) -> None:
    ensure_schema(con, config)
    # Marketo opted out; Dynamics says "false" without having changed (base false): Marketo's opt-out flows.
    synced_contact(con, C1, 11, {**AGREED, "unsubscribed": "false"}, marketo={"unsubscribed": "true"})
    # Both changed from no base to different values (a contacts' conflict is Dynamics-wins, not here).
    synced_contact(
        con,
        C2,
        12,
        {**AGREED, "doNotEmail": None},
        dynamics={"doNotEmail": "false"},
        marketo={"doNotEmail": "true"},
    )
    # Marketo blanked an opt-out: a blank never overwrites it; the opt-out is written back.
    synced_contact(con, C3, 13, {**AGREED, "doNotCall": "true"}, marketo={"doNotCall": None})
    summary, rows = plan(con, config, "contact")
    assert rows == [
        (C1, "dynamics", "update", "unsubscribed", "true", "two_way"),
        (C2, "dynamics", "update", "doNotEmail", "true", "conflict:opt_out_sticky"),
        (C3, "marketo", "update", "doNotCall", "true", "opt_out_sticky"),
    ]
    assert summary.conflicts == {"opt_out_sticky": 1}


def test_an_opt_in_flows_only_from_the_side_that_opted_back_in(con, config) -> None:
    ensure_schema(con, config)
    out = {**AGREED, "unsubscribed": "true"}
    synced_contact(con, C1, 11, out, dynamics={"unsubscribed": "false"})  # Dynamics: out -> in
    synced_contact(con, C2, 12, out, marketo={"unsubscribed": "false"})  # Marketo: out -> in
    # Both opted in at once: they agree.
    synced_contact(con, C3, 13, out, dynamics={"unsubscribed": "false"}, marketo={"unsubscribed": "false"})
    _, rows = plan(con, config, "contact")
    assert rows == [
        (C1, "marketo", "update", "unsubscribed", "false", "two_way"),
        (C2, "dynamics", "update", "unsubscribed", "false", "two_way"),
        (C3, "base", "agree", "unsubscribed", "false", "two_way"),
    ]


def test_lead_opt_out_beats_marketo_wins_and_contact_opt_out_beats_dynamics_wins(con, config) -> None:
    ensure_schema(con, config)
    synced_contact(
        con,
        L1,
        21,
        {**AGREED, "doNotFax": None},
        dynamics={"doNotFax": "true"},
        marketo={"doNotFax": "false"},
        entity="lead",
    )
    synced_contact(
        con,
        C1,
        11,
        {**AGREED, "doNotSendMarketingMaterial": None},
        dynamics={"doNotSendMarketingMaterial": "false"},
        marketo={"doNotSendMarketingMaterial": "true"},
    )
    _, lead_rows = plan(con, config, "lead")
    _, contact_rows = plan(con, config, "contact")
    assert lead_rows == [(L1, "marketo", "update", "doNotFax", "true", "conflict:opt_out_sticky")]
    assert contact_rows == [
        (C1, "dynamics", "update", "doNotSendMarketingMaterial", "true", "conflict:opt_out_sticky")
    ]


def test_first_link_by_email_never_blanks_nor_opts_in(con, config) -> None:
    ensure_schema(con, config)
    # A new contact with unset opt-out columns (NULL: not "false") and no notes, and a Marketo person
    # who opted out and has notes; a second contact that explicitly says "false".
    dyn(con, "contact", C1, email="ann@example.org", lastName="Lee")
    mkto(
        con,
        11,
        email="ann@example.org",
        lastName="Lee",
        unsubscribed="true",
        doNotEmail="true",
        personNotes="met at fair",
        homePhone="+47 9",
    )
    dyn(con, "contact", C2, email="bob@example.org", lastName="Berg", unsubscribed="false", title="CTO")
    mkto(con, 12, email="bob@example.org", lastName="Berg", unsubscribed="true", title="Engineer")
    _, rows = plan(con, config, "contact")
    to_marketo = {(r[0], r[3]): r[4] for r in rows if r[1] == "marketo" and r[5] != "identity"}
    to_dynamics = {(r[0], r[3]): r[4] for r in rows if r[1] == "dynamics"}
    # Nothing blank or opted in goes to the person; the real, different title does (contacts: Dynamics wins).
    assert to_marketo == {(C2, "title"): "CTO"}
    assert to_dynamics == {
        (C1, "unsubscribed"): "true",
        (C1, "doNotEmail"): "true",
        (C1, "personNotes"): "met at fair",
        (C1, "homePhone"): "+47 9",
        (C2, "unsubscribed"): "true",
    }


def test_qualification_changes_the_person_only_where_the_contact_differs(con, config) -> None:
    ensure_schema(con, config)
    lead_agreed = {
        **AGREED,
        "unsubscribed": "true",
        "doNotEmail": "true",
        "doNotCall": "true",
        "personNotes": "VIP",
        "homePhone": "+47 8",
        "preferredMethodOfContact": "Email",
    }
    synced_contact(con, L1, 21, lead_agreed, entity="lead", pending=False)
    con.execute("UPDATE m_person SET pending_seq = NULL")
    # The contact Dynamics made: consent columns false (Dataverse defaults), no notes or home phone, a new
    # title; email, name, city and phone carried over.
    dyn(
        con,
        "contact",
        C1,
        origin_lead=L1,
        email=AGREED["email"],
        lastName="Lee",
        city="Oslo",
        phone="+47 1",
        title="CEO",
        unsubscribed="false",
        doNotEmail="false",
        doNotCall="false",
    )
    _, rows = plan(con, config, "contact")
    to_marketo = {r[3]: r[4] for r in rows if r[1] == "marketo" and r[5] != "identity"}
    to_dynamics = {r[3]: r[4] for r in rows if r[1] == "dynamics"}
    assert to_marketo == {"title": "CEO"}
    assert to_dynamics == {
        "unsubscribed": "true",
        "doNotEmail": "true",
        "doNotCall": "true",
        "personNotes": "VIP",
        "homePhone": "+47 8",
        "preferredMethodOfContact": "Email",
    }
    base = con.execute("SELECT f_email, f_title, f_personNotes, f_unsubscribed FROM b_contact").fetchone()
    assert base == (AGREED["email"], None, None, None)  # only agreed values carry over
