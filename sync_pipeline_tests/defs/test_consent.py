"""Consent and blanks end to end (issue 9): qualification of an opted-out lead, a first link by email to an
opted-out person, and the sticky opt-out policy. Real Dagster runs against the sandbox; both systems checked.

One world per module: the tiny org copied once, two rounds of edits, each followed by a sync (and an echo
cycle at the end). The fixture only acts and records; each test asserts one rule.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sync_pipeline_tests.defs.test_sync_rules import World, _synced, _with, _world

CONSENT = {"unsubscribed": "donotbulkemail", "doNotEmail": "donotemail", "doNotCall": "donotphone"}


def _open_leads(world: World, n: int) -> list[str]:
    sb = world.sandbox
    leads = [
        i
        for i in _with(world, "lead", _synced(world, "lead", n=60), "emailaddress1")
        if sb.dynamics_get("lead", i).get("statecode", 0) == 0
    ]
    assert len(leads) >= n
    return leads[:n]


def _consent_writes(world: World, ids: list[str], value: str) -> list[tuple]:
    return world.query(
        f"""SELECT dynamics_id, target, field, value_after, rule FROM ledger
        WHERE dynamics_id IN ({", ".join("?" for _ in ids)}) AND field IN
              ('unsubscribed', 'doNotEmail', 'doNotCall', 'doNotFax', 'doNotSendMarketingMaterial')
          AND op <> 'create' AND value_after IS NOT DISTINCT FROM ?""",
        [*ids, value],
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with _world(tmp_path_factory.mktemp("consent")) as w:
        sb, p = w.sandbox, w.picks
        w.run("all")
        # Round 1: opt-outs, notes and a home phone on a lead; an opted-out Marketo-only person; a lead's fax
        # consent set both ways at once; a contact opting out on each side.
        p["l_qualify"], p["l_fax"] = _open_leads(w, 2)
        sb.dynamics_update(
            "lead",
            p["l_qualify"],
            {
                "donotbulkemail": True,
                "donotemail": True,
                "donotphone": True,
                "description": "Call before noon",
                "telephone2": "+1 555 0142",
                "preferredcontactmethodcode": 3,
            },
        )
        p["first_link_email"] = "olga.optout@example.org"
        p["m_first_link"] = sb.marketo_create_lead(
            {
                "email": p["first_link_email"],
                "firstName": "Olga",
                "lastName": "Optout",
                "leadScore": 5,
                "unsubscribed": True,
                "doNotEmail": True,
                "doNotCall": True,
                "personNotes": "Asked for no calls",
                "homePhone": "+1 555 0177",
            }
        )["id"]
        sb.dynamics_update("lead", p["l_fax"], {"donotfax": True})
        sb.marketo_update_lead(w.person_of(p["l_fax"])["id"], {"doNotFax": False})
        contacts = [
            c
            for c in _synced(w, "contact", n=40)
            if sb.dynamics_get("contact", c).get("donotbulkemail") is False
        ]
        p["c_dyn_out_in"], p["c_mkto_out"] = contacts[:2]
        sb.dynamics_update("contact", p["c_dyn_out_in"], {"donotbulkemail": True})
        sb.marketo_update_lead(w.person_of(p["c_mkto_out"])["id"], {"unsubscribed": True})
        w.run("latest")
        p["l_qualify_person"] = w.person_of(p["l_qualify"])["id"]
        p["person_before_qualify"] = sb.marketo_get_lead(p["l_qualify_person"])
        # Round 2: qualify the opted-out lead; a new contact with the opted-out person's email and no
        # consent columns; Dynamics opts the first contact back in; Dynamics edits the second one (Dynamics
        # wins on contacts) without touching consent.
        p["q_created"] = sb.qualify_lead(p["l_qualify"], create_account=True, create_contact=True)
        p["c_first_link"] = sb.dynamics_insert(
            "contact",
            {
                "firstname": "Olga",
                "lastname": "Optout",
                "emailaddress1": p["first_link_email"].upper(),
                "jobtitle": "Buyer",
            },
        )["contactid"]
        sb.dynamics_update("contact", p["c_dyn_out_in"], {"donotbulkemail": False})
        sb.dynamics_update("contact", p["c_mkto_out"], {"jobtitle": "Consent Tester"})
        w.run("latest")
        w.run("latest")  # echoes
        yield w


def test_qualified_opted_out_lead_keeps_its_person_opted_out_and_nothing_blanked(world: World) -> None:
    sb, p = world.sandbox, world.picks
    contact_id = p["q_created"]["contact"]
    person = world.person_of(contact_id)
    assert person["id"] == p["l_qualify_person"]  # the same person, no duplicate
    before = p["person_before_qualify"]
    assert (before["unsubscribed"], before["doNotEmail"], before["doNotCall"]) == (True, True, True)
    for field in ("unsubscribed", "doNotEmail", "doNotCall"):
        assert person[field] is True, field
    # Fields the new contact did not receive are not blanked on the person ...
    assert (person["personNotes"], person["homePhone"], person["preferredMethodOfContact"]) == (
        "Call before noon",
        "+1 555 0142",
        "Phone",
    )
    # ... they reach the contact instead, consent included.
    contact = sb.dynamics_get("contact", contact_id)
    assert (contact["donotbulkemail"], contact["donotemail"], contact["donotphone"]) == (True, True, True)
    assert (
        contact.get("description"),
        contact.get("telephone2"),
        contact.get("preferredcontactmethodcode"),
    ) == ("Call before noon", "+1 555 0142", 3)
    # Everything else the person had is unchanged, except the type and id the contact gives it.
    changed = {
        k
        for k in before
        if k not in ("updatedAt", "dynamicsId", "dynamicsType", "leadStatus", "externalCompanyId")
        and before[k] != person.get(k)
    }
    assert changed == set()
    assert _consent_writes(world, [contact_id], "false") == []


def test_first_link_by_email_keeps_the_opt_out_and_blanks_nothing(world: World) -> None:
    sb, p = world.sandbox, world.picks
    person = sb.marketo_get_lead(p["m_first_link"])
    assert person["dynamicsId"] == p["c_first_link"]
    assert world.identity("contact", p["c_first_link"]) == (str(p["m_first_link"]), "active")
    assert (person["unsubscribed"], person["doNotEmail"], person["doNotCall"]) == (True, True, True)
    assert (person["personNotes"], person["homePhone"]) == ("Asked for no calls", "+1 555 0177")
    assert person["title"] == "Buyer"  # a real value the contact carries does travel
    contact = sb.dynamics_get("contact", p["c_first_link"])
    assert (contact["donotbulkemail"], contact["donotemail"], contact["donotphone"]) == (True, True, True)
    assert (contact.get("description"), contact.get("telephone2")) == ("Asked for no calls", "+1 555 0177")
    assert _consent_writes(world, [p["c_first_link"]], "false") == []
    assert world.query(
        "SELECT count(*) FROM ledger WHERE dynamics_id = ? AND target = 'marketo' AND value_after IS NULL",
        [p["c_first_link"]],
    ) == [(0,)]


def test_opt_out_wins_a_conflict_even_where_marketo_wins(world: World) -> None:
    sb, p = world.sandbox, world.picks
    assert sb.dynamics_get("lead", p["l_fax"])["donotfax"] is True
    assert world.person_of(p["l_fax"])["doNotFax"] is True
    assert world.query(
        "SELECT target, value_after, rule FROM ledger WHERE dynamics_id = ? AND field = 'doNotFax' AND op <> 'create'",
        [p["l_fax"]],
    ) == [("marketo", "true", "conflict:opt_out_sticky")]


def test_opt_out_stays_when_the_other_side_edits_something_else(world: World) -> None:
    sb, p = world.sandbox, world.picks
    person = world.person_of(p["c_mkto_out"])
    assert person["unsubscribed"] is True and person["title"] == "Consent Tester"
    assert sb.dynamics_get("contact", p["c_mkto_out"])["donotbulkemail"] is True
    assert _consent_writes(world, [p["c_mkto_out"]], "false") == []


def test_an_opt_in_flows_from_the_side_that_opted_back_in(world: World) -> None:
    sb, p = world.sandbox, world.picks
    assert sb.dynamics_get("contact", p["c_dyn_out_in"])["donotbulkemail"] is False
    assert world.person_of(p["c_dyn_out_in"])["unsubscribed"] is False
    assert [
        r[1:]
        for r in world.query(
            "SELECT seq, target, value_after FROM ledger WHERE dynamics_id = ? AND field = 'unsubscribed' AND op <> 'create' ORDER BY seq",
            [p["c_dyn_out_in"]],
        )
    ] == [("marketo", "true"), ("marketo", "false")]
