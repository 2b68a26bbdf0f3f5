"""Merges on both sides, end to end (issue 9): real Dagster runs against the sandbox, both systems checked.

One world per module (a sync cycle costs seconds): the tiny org's initial copy, then, before one
incremental run, every kind of merge at once plus unrelated edits that must still arrive in that run:

- Marketo, loser linked: contact A's person merged into a new Marketo-only person (the winner);
- Marketo, winner linked: a Marketo-only duplicate merged into contact B's person;
- Marketo, both linked: contact C's person merged into lead L's person (the lead's person wins);
- Dataverse ``Merge`` of two synced contacts, of two synced leads, of a synced contact into a brand-new
  contact, and of two accounts;

then follow-up edits on both sides and a second run. The fixture only acts and records; each test asserts
one rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sync_pipeline_tests.defs.sync_world import ALL, World, world_of

# Person fields a duplicate can bring to a winner that lacks them (the first one blank on the winner is used).
FILLABLE = {
    "title": "jobtitle",
    "mobilePhone": "mobilephone",
    "address2": "address1_line2",
    "address3": "address1_line3",
    "middleName": "middlename",
    "personNotes": "description",
}


def _blank_field(person: dict[str, Any]) -> str:
    return next(f for f in FILLABLE if not person.get(f))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for w in world_of(tmp_path_factory.mktemp("merges")):
        sb, p = w.sandbox, w.p
        w.run("all")
        every = [
            r[0]
            for r in w.query(
                "SELECT dynamics_id FROM identity WHERE entity = 'contact' "
                "AND state = 'active' AND how = 'created' ORDER BY dynamics_id"
            )
        ]
        # A and E are contacts whose opt-out both sides agree on: it must survive their merges.
        opted_out = [c for c in every if sb.dynamics_get("contact", c).get("donotbulkemail")]
        assert len(opted_out) >= 2, "the tiny org needs two synced contacts that opted out"
        p["cA"], p["cE"] = opted_out[:2]
        contacts = [c for c in every if c not in opted_out]
        (p["cB"], p["cC"], p["cD1"], p["cD2"], p["cU"]) = contacts[:5]
        leads = [i for i in w.synced("lead", 30) if (sb.dynamics_get("lead", i).get("statecode") or 0) == 0]
        p["lC"], p["lG1"], p["lG2"] = leads[:3]
        pid = {k: w.person_of(p[k])["id"] for k in ("cA", "cB", "cC", "cD1", "cD2", "cE", "lC", "lG1", "lG2")}
        p["pid"] = pid

        # A: contact A's person loses a merge to a Marketo-only person.
        winner = sb.marketo_create_lead(
            {
                "email": "winnie.winner@example.com",
                "firstName": "Winnie",
                "lastName": "Winner",
                "unsubscribed": False,
            }
        )
        p["wA"] = winner["id"]
        sb.marketo_merge_leads(p["wA"], [pid["cA"]])
        p["wA_after_merge"] = sb.marketo_get_lead(p["wA"])

        # B: a Marketo-only duplicate merged into contact B's person; it fills a field B's person lacks.
        p["fieldB"] = _blank_field(sb.marketo_get_lead(pid["cB"]))
        dup = sb.marketo_create_lead(
            {"email": "dup.b@example.com", "lastName": "Dupe", p["fieldB"]: "From the dupe"}
        )
        p["dupB"] = dup["id"]
        sb.marketo_merge_leads(pid["cB"], [p["dupB"]])

        # C: contact C's person merged into lead L's person (the lead's person wins in Marketo).
        sb.marketo_merge_leads(pid["lC"], [pid["cC"]])

        # D / G: Dataverse Merge of two synced contacts, and of two synced leads.
        sb.dynamics_merge("contact", p["cD1"], p["cD2"])
        sb.dynamics_merge("lead", p["lG1"], p["lG2"])
        # E: a synced contact merged into a contact created after the last sync (never synced itself).
        row = sb.dynamics_get("contact", p["cE"])
        p["mE"] = sb.dynamics_insert(
            "contact",
            {
                "lastname": row.get("lastname") or "Master",
                "firstname": "Master",
                "jobtitle": "Merged Master",
                "donotbulkemail": False,
            },
        )["contactid"]
        sb.dynamics_merge("contact", p["mE"], p["cE"])
        # F: two accounts; the subordinate's contacts are re-parented to the master.
        accounts = w.synced("account", 2)
        p["aF1"], p["aF2"] = accounts
        children = [
            c["contactid"]
            for c in sb.dynamics_rows("contact", ALL)
            if c.get("_parentcustomerid_value") == p["aF2"] and not c.get("merged")
        ]
        p["aF2_children"] = [
            c for c in children if w.identity("contact", c) and w.identity("contact", c)[1] == "active"
        ]
        sb.dynamics_merge("account", p["aF1"], p["aF2"])
        # An unrelated edit must arrive in the same run.
        sb.dynamics_update("contact", p["cU"], {"jobtitle": "Unrelated Edit"})

        p["run1"] = w.run("latest")
        p["persons_after_run1"] = sb.marketo_rows("lead", ALL)

        # Follow-up edits on both sides, then a second run.
        sb.dynamics_update("contact", p["cA"], {"jobtitle": "Edited in Dynamics after the merge"})
        sb.marketo_update_lead(p["wA"], {"phone": "+1 555 0199"})
        sb.dynamics_update("contact", p["cC"], {"jobtitle": "Contact C after merge"})
        sb.dynamics_update("lead", p["lC"], {"jobtitle": "Retired lead edit"})
        sb.dynamics_update("contact", p["cD2"], {"jobtitle": "Edit of a merged-away contact"})
        sb.dynamics_update("contact", p["mE"], {"telephone1": "+1 555 0142"})
        p["run2"] = w.run("latest")
        yield w


# ---- Marketo merge, loser linked ---------------------------------------------------------------------------


def test_marketo_merge_moves_the_link_to_the_winner(world: World) -> None:
    p = world.p
    assert (
        p["wA_after_merge"]["dynamicsId"] == p["cA"]
    )  # what Marketo does: the loser's CRM id fills the winner
    assert world.identity("contact", p["cA"])[:2] == (str(p["wA"]), "active")
    # The loser is retired in the mirror: merged into the winner, not a user's delete, not a tombstone.
    assert world.query("SELECT deleted, merged_into FROM m_person WHERE id = ?", [p["pid"]["cA"]]) == [
        (True, p["wA"])
    ]
    assert not world.query("SELECT 1 FROM identity WHERE state = 'tombstoned' AND dynamics_id = ?", [p["cA"]])
    assert (
        "state",
        "relink",
        "marketo_id",
        str(p["pid"]["cA"]),
        str(p["wA"]),
        "marketo_merge",
    ) in world.ledger(p["cA"])
    assert not world.query("SELECT * FROM failures WHERE dynamics_id = ?", [p["cA"]])


def test_marketo_merge_values_follow_the_policies_and_edits_flow_both_ways(world: World) -> None:
    p, sb = world.p, world.sandbox
    contact = sb.dynamics_get("contact", p["cA"])
    # The winner's own values are Marketo-side changes against the last agreed values: they reach the contact.
    assert contact["firstname"] == "Winnie" and contact["emailaddress1"] == "winnie.winner@example.com"
    # Later edits: the contact's reach the winner, the winner's reach the contact.
    person = sb.marketo_get_lead(p["wA"])
    assert person["title"] == "Edited in Dynamics after the merge"
    assert contact["telephone1"] == "+1 555 0199"
    assert world.persons_of(p["cA"]) == [person]


def test_an_agreed_opt_out_survives_merges(world: World) -> None:
    """The winner of the Marketo merge said opted in (its own value wins in Marketo); the master of the
    Dataverse merge said opted in too. Neither merge may turn the record's agreed opt-out into an opt-in."""
    p, sb = world.p, world.sandbox
    assert p["wA_after_merge"]["unsubscribed"] is False  # what Marketo's merge made of it
    assert sb.dynamics_get("contact", p["cA"])["donotbulkemail"] is True
    assert sb.marketo_get_lead(p["wA"])["unsubscribed"] is True
    assert sb.dynamics_get("contact", p["mE"])["donotbulkemail"] is True
    assert sb.marketo_get_lead(p["pid"]["cE"])["unsubscribed"] is True


def test_one_merge_never_halts_the_rest(world: World) -> None:
    p = world.p
    assert world.person_of(p["cU"])["title"] == "Unrelated Edit"
    for entity in ("lead", "contact"):
        evaluation = world.check(p["run1"], entity)
        assert evaluation.passed, evaluation.metadata
    assert not world.query(
        "SELECT entity, dynamics_id, code FROM failures WHERE starts_with(code, 'quarantine') "
        "OR target = 'quarantine'"
    )
    merged = [p[k] for k in ("cA", "cB", "cC", "lC", "cD1", "cD2", "lG1", "lG2", "cE", "mE", "aF1", "aF2")]
    assert not world.query(
        "SELECT * FROM failures WHERE dynamics_id IN (SELECT unnest(?::VARCHAR[]))", [merged]
    )


# ---- Marketo merge, winner linked / both linked -------------------------------------------------------------


def test_marketo_merge_winner_linked(world: World) -> None:
    p, sb = world.p, world.sandbox
    assert world.identity("contact", p["cB"])[:2] == (str(p["pid"]["cB"]), "active")
    assert sb.dynamics_get("contact", p["cB"])[FILLABLE[p["fieldB"]]] == "From the dupe"
    assert not world.query("SELECT 1 FROM m_person WHERE id = ? AND NOT deleted", [p["dupB"]])
    assert any(r[1] == "merge" and r[5] == "marketo_merge" for r in world.ledger(p["cB"]))


def test_marketo_merge_of_a_lead_and_a_contact_person_keeps_the_contact(world: World) -> None:
    """Decision: the contact keeps the surviving person; the lead's link is retired (state merged)."""
    p, sb = world.p, world.sandbox
    winner = p["pid"]["lC"]
    assert world.identity("contact", p["cC"])[:2] == (str(winner), "active")
    assert world.identity("lead", p["lC"])[:2] == (str(winner), "merged")
    person = sb.marketo_get_lead(winner)
    assert (person["dynamicsId"], person["dynamicsType"]) == (p["cC"], "Contact")
    # The contact's later edit reaches the person; the retired lead's does not.
    assert person["title"] == "Contact C after merge"
    assert not world.persons_of(p["lC"])
    assert ("state", "merged", "marketo_id", str(winner), str(winner), "marketo_merge") in world.ledger(
        p["lC"]
    )


def test_no_record_left_pointing_at_a_removed_person(world: World) -> None:
    live = {str(r["id"]) for r in world.sandbox.marketo_rows("lead", ALL)}
    rows = world.query(
        "SELECT entity, dynamics_id, marketo_id, state FROM identity "
        "WHERE entity IN ('lead', 'contact') AND state IN ('active', 'merged') AND marketo_id IS NOT NULL"
    )
    assert [r for r in rows if r[2] not in live] == []
    shared = world.query(
        "SELECT marketo_id FROM identity WHERE entity IN ('lead', 'contact') AND state = 'active' "
        "GROUP BY marketo_id HAVING count(*) > 1"
    )
    assert shared == []
    ids = [r.get("dynamicsId") for r in world.sandbox.marketo_rows("lead", ALL) if r.get("dynamicsId")]
    assert len(ids) == len(set(ids)), "a Dynamics id is carried by two persons"


# ---- Dataverse Merge ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("table,master,sub", [("contact", "cD1", "cD2"), ("lead", "lG1", "lG2")])
def test_dynamics_merge_of_two_synced_records_merges_their_persons(
    world: World, table: str, master: str, sub: str
) -> None:
    p, sb = world.p, world.sandbox
    assert sb.marketo.store.get_lead(p["pid"][sub]) is None  # merged into the master's person in Marketo
    assert world.identity(table, p[master])[:2] == (str(p["pid"][master]), "active")
    assert world.identity(table, p[sub])[1] == "merged"
    assert world.person_of(p[master])["id"] == p["pid"][master]
    assert not world.persons_of(p[sub])
    assert (
        "marketo",
        "merge",
        "leadIds",
        str(p["pid"][sub]),
        str(p["pid"][master]),
        "dynamics_merge",
    ) in world.ledger(p[sub])
    if table == "contact":  # the deactivated record's later edit is not synced
        assert sb.marketo_get_lead(p["pid"][master]).get("title") != "Edit of a merged-away contact"


def test_dynamics_merge_into_a_new_record_moves_the_person(world: World) -> None:
    p = world.p
    person = world.person_of(p["mE"])
    assert person["id"] == p["pid"]["cE"]  # the same person, re-pointed, never a second one
    assert world.identity("contact", p["mE"])[:3] == (str(p["pid"]["cE"]), "active", "dynamics_merge")
    assert world.identity("contact", p["cE"])[1] == "merged"
    assert not world.persons_of(p["cE"])
    # The master's values flow by the policies, and its later edits too.
    assert person["title"] == "Merged Master" and person["phone"] == "+1 555 0142"
    assert ("state", "relink", "dynamics_id", p["cE"], p["mE"], "dynamics_merge") in world.ledger(p["cE"])


def test_dynamics_merge_of_accounts(world: World) -> None:
    p, sb = world.p, world.sandbox
    assert world.identity("account", p["aF2"])[1] == "merged"
    company = sb.marketo.store.get_object("company", p["aF2"])
    assert company is not None and company.get("companyStatus") == "Inactive"  # its last state went out
    for contact in p["aF2_children"]:
        assert world.person_of(contact).get("externalCompanyId") == p["aF1"]
