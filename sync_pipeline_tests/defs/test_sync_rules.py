"""The sync rules end to end (issue 3 acceptance): real Dagster runs against the sandbox, every entity.

Two worlds, each built once per module because a sync cycle costs seconds: ``default_world`` runs the
packaged configuration (initial copy twice, a batch of independent edits on both sides, an echo cycle,
follow-up edits, a re-run of push steps), ``custom_world`` a copy of it with other policies and delete
modes written to tmp and selected with SYNC_CONFIG. The fixtures only act and record; each test asserts
one rule on what was recorded (or on the sandbox, which nothing changes after the fixture finished).
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sync_pipeline.config.model import DEFAULT_PATH
from sync_pipeline.sandbox.runner import Sandbox

LOOKUP = "@Microsoft.Dynamics.CRM.lookuplogicalname"
ALL = 100_000
OBJECTS = (
    "salesPerson",
    "company",
    "opportunity",
    "opportunityRole",
    "dynamicsTeam_c",
    "dynamicsTeamMember_c",
    "project_c",
)
TABLES = ("systemuser", "team", "teammembership", "account", "lead", "contact", "opportunity", "new_project")


@dataclass
class World:
    """A populated sandbox, a state store and the pipeline environment pointing at both."""

    sandbox: Sandbox
    env: dict[str, str] = field(repr=False)  # holds the sandbox's client secrets
    state_path: Path
    instance: Any = field(default=None, repr=False)
    picks: dict[str, Any] = field(default_factory=dict, repr=False)  # records chosen for each rule
    snaps: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # named snapshots

    def run(self, scope: str = "latest", selection: list[Any] | None = None) -> Any:
        from sync_pipeline import runs

        with pytest.MonkeyPatch.context() as mp:
            for k, v in self.env.items():
                mp.setenv(k, v)
            result = runs.run_sync(self.instance, scope=scope, selection=selection)
        assert result.success
        return result

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        from sync_pipeline.engine.store import state

        with state.connect(self.state_path, read_only=True) as con:
            return con.execute(sql, params or []).fetchall()

    # -- reading the sandbox ----------------------------------------------------------------------
    def persons(self) -> list[dict[str, Any]]:
        return self.sandbox.marketo_rows("lead", ALL)

    def persons_of(self, dynamics_id: str) -> list[dict[str, Any]]:
        return [p for p in self.persons() if p.get("dynamicsId") == dynamics_id]

    def person_of(self, dynamics_id: str) -> dict[str, Any]:
        found = self.persons_of(dynamics_id)
        assert len(found) == 1, (
            f"expected one Marketo person with dynamicsId {dynamics_id}, found {len(found)}"
        )
        return found[0]

    def identity(self, entity: str, dynamics_id: str) -> tuple[str, str] | None:
        rows = self.query(
            "SELECT marketo_id, state FROM identity WHERE entity = ? AND dynamics_id = ?",
            [entity, dynamics_id],
        )
        return rows[0] if rows else None

    def snapshot(self, name: str) -> None:
        sb = self.sandbox
        self.snaps[name] = {
            "marketo": {o: sb.marketo_count(o) for o in ("lead", *OBJECTS)},
            "dynamics": {t: sb.dynamics_count(t) for t in TABLES},
            "ledger": self.query("SELECT count(*) FROM ledger")[0][0],
            "dynamics_ids": Counter(p.get("dynamicsId") for p in self.persons() if p.get("dynamicsId")),
        }


@contextlib.contextmanager
def _world(tmp: Path, config_path: Path | None = None) -> Iterator[World]:
    import dagster as dg

    with Sandbox(tmp / "sandbox") as sb:
        sb.populate("tiny", seed=0)
        env = dict(sb.settings(), SYNC_STATE_PATH=str(tmp / "state.duckdb"), MARKETO_CALLS_PER_20S="100")
        if config_path is not None:
            env["SYNC_CONFIG"] = str(config_path)
        world = World(sb, env, tmp / "state.duckdb", dg.DagsterInstance.ephemeral())
        yield world


def _synced(
    world: World, entity: str, how: str = "created", n: int = 1, exclude: set[str] | None = None
) -> list[str]:
    """Dynamics ids of ``n`` active links of ``entity`` (made ``how``), in a stable order."""
    rows = world.query(
        "SELECT dynamics_id FROM identity WHERE entity = ? AND state = 'active' AND how = ? "
        "ORDER BY dynamics_id",
        [entity, how],
    )
    ids = [r[0] for r in rows if r[0] not in (exclude or set())]
    assert len(ids) >= n, f"the tiny org has too few synced {entity} rows ({how})"
    return ids[:n]


def _with(world: World, table: str, ids: list[str], column: str) -> list[str]:
    return [i for i in ids if world.sandbox.dynamics_get(table, i).get(column)]


# ---------------------------------------------------------------------------------------------------------
# The default configuration


@pytest.fixture(scope="module")
def default_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with _world(tmp_path_factory.mktemp("default")) as world:
        sb = world.sandbox
        world.run("all")
        world.snapshot("initial")
        world.snaps["initial"]["objects"] = {o: sb.marketo_rows(o, ALL) for o in OBJECTS}
        world.snaps["initial"]["persons"] = world.persons()
        world.snaps["initial"]["rows"] = {t: sb.dynamics_rows(t, ALL) for t in TABLES}
        world.run("all")  # the initial copy again
        world.snapshot("initial_again")
        _edit_batch_one(world)
        world.snapshot("after_edits")
        world.run("latest")
        world.snapshot("cycle1")
        world.picks["yes_no_after_cycle1"] = world.person_of(world.picks["c_yes_no"])
        last_seq = world.query("SELECT max(seq) FROM ledger")[0][0]
        world.run("latest")  # nothing changed since: duplicates nothing
        world.snapshot("cycle2")
        world.picks["cycle2_writes"] = world.query(
            "SELECT entity, dynamics_id, target, field FROM ledger WHERE seq > ?", [last_seq]
        )
        _edit_batch_two(world)
        world.snapshot("after_edits2")
        world.run("latest")
        world.snapshot("cycle3")
        world.run("latest")  # a cycle after writes: our own echoes come back and bounce nowhere
        world.snapshot("cycle4")
        from sync_pipeline.connection.keys import asset_key
        from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

        # Re-run steps on their own: the last plans are applied again (upserts keyed by ids).
        world.run(
            "latest",
            selection=[
                asset_key(CONN, e, "push") for e in ("systemuser", "account", "lead", "contact", "project")
            ],
        )
        world.snapshot("push_rerun")
        yield world


def _edit_batch_one(world: World) -> None:
    sb, p = world.sandbox, world.picks
    contacts = _with(world, "contact", _synced(world, "contact", n=40), "address1_city")
    (
        p["c_dyn_edit"],
        p["c_mkto_edit"],
        p["c_conflict"],
        p["c_two_fields"],
        p["c_delete"],
        p["c_mkto_deleted"],
        p["c_yes_no"],
    ) = contacts[:7]
    leads = [
        i
        for i in _with(world, "lead", _synced(world, "lead", n=40), "address1_city")
        if sb.dynamics_get("lead", i).get("statecode", 0) == 0
    ]
    p["l_mkto_edit"], p["l_conflict"], p["l_qualify"] = leads[:3]

    # Incremental, each way.
    sb.dynamics_update("contact", p["c_dyn_edit"], {"telephone1": "+1 555 0100"})
    sb.marketo_update_lead(world.person_of(p["c_mkto_edit"])["id"], {"title": "Chief Sync Officer"})
    sb.marketo_update_lead(world.person_of(p["l_mkto_edit"])["id"], {"title": "Head of Leads"})
    # Conflicts on the same field: contacts Dynamics wins, leads Marketo wins.
    for key in ("c_conflict", "l_conflict"):
        table = "contact" if key.startswith("c_") else "lead"
        sb.dynamics_update(table, p[key], {"address1_city": "Dynamicsville"})
        sb.marketo_update_lead(world.person_of(p[key])["id"], {"city": "Marketoburg"})
    # Different fields of the same person on both sides: both survive.
    sb.dynamics_update("contact", p["c_two_fields"], {"telephone1": "+1 555 0111"})
    sb.marketo_update_lead(world.person_of(p["c_two_fields"])["id"], {"title": "VP Both Sides"})
    # Qualification: the contact takes over the lead's person.
    p["l_qualify_person"] = world.person_of(p["l_qualify"])["id"]
    p["q_created"] = sb.qualify_lead(p["l_qualify"], create_account=True, create_contact=True)
    # Deletes: a contact in Dynamics (flag), a person in Marketo (tombstone), a membership (delete), a user
    # (ignore: users are disabled, not deleted).
    p["c_delete_person"] = world.person_of(p["c_delete"])["id"]
    sb.dynamics_delete("contact", p["c_delete"])
    p["c_mkto_deleted_person"] = world.person_of(p["c_mkto_deleted"])["id"]
    sb.marketo_delete_lead(p["c_mkto_deleted_person"])
    p["membership"] = _synced(world, "teammembership")[0]
    sb.dynamics_delete("teammembership", p["membership"])
    users = [
        u
        for u in _synced(world, "systemuser", n=11)
        if not sb.dynamics_get("systemuser", u).get("applicationid")
    ]
    p["user_deleted"] = users[-1]
    sb.dynamics_delete("systemuser", p["user_deleted"])
    # Sync filter: Yes -> No with a change in the same edit; No -> Yes for a never-synced record; a new
    # record with the flag false.
    sb.dynamics_update("contact", p["c_yes_no"], {"new_synctomkto": False, "telephone1": "+1 555 0122"})
    excluded = [
        r["contactid"] for r in world.snaps["initial"]["rows"]["contact"] if r.get("new_synctomkto") is False
    ]
    assert len(excluded) >= 2, "the tiny org needs two contacts excluded by the sync filter"
    p["c_never_synced"], p["c_no_yes"] = excluded[:2]
    sb.dynamics_update("contact", p["c_no_yes"], {"new_synctomkto": True})
    p["c_new_excluded"] = sb.dynamics_insert(
        "contact",
        {
            "firstname": "Ned",
            "lastname": "Excluded",
            "emailaddress1": "ned.excluded@example.org",
            "new_synctomkto": False,
        },
    )["contactid"]
    # A new contact under an account; an account edit (one-way entity).
    p["account"] = _synced(world, "account")[0]
    p["c_new"] = sb.dynamics_insert(
        "contact",
        {
            "firstname": "Nina",
            "lastname": "New",
            "emailaddress1": "nina.new@example.org",
            "_parentcustomerid_value": p["account"],
            "_parentcustomerid_value" + LOOKUP: "account",
        },
    )["contactid"]
    sb.dynamics_update("account", p["account"], {"telephone1": "+1 555 0199", "numberofemployees": 4321})
    # New Marketo persons: one matches the lead rule (score >= 50, last name), two do not.
    p["m_match"] = sb.marketo_create_lead(
        {"email": "rita.rule@example.org", "firstName": "Rita", "lastName": "Rule", "leadScore": 75}
    )["id"]
    p["m_low_score"] = sb.marketo_create_lead(
        {"email": "lou.low@example.org", "firstName": "Lou", "lastName": "Low", "leadScore": 10}
    )["id"]
    p["m_no_last"] = sb.marketo_create_lead(
        {"email": "nola@example.org", "firstName": "Nola", "leadScore": 90}
    )["id"]


def _edit_batch_two(world: World) -> None:
    sb, p = world.sandbox, world.picks
    # The person deleted in Marketo must not come back when its contact changes in Dynamics.
    sb.dynamics_update("contact", p["c_mkto_deleted"], {"jobtitle": "Still here in Dynamics"})
    # No -> Yes again: the change made while excluded (and a new one) now flows.
    sb.dynamics_update("contact", p["c_yes_no"], {"new_synctomkto": True, "jobtitle": "Back in sync"})


def test_initial_copy_users_become_sales_persons(default_world: World) -> None:
    snap = default_world.snaps["initial"]
    by_key = {o["externalSalesPersonId"]: o for o in snap["objects"]["salesPerson"]}
    users = snap["rows"]["systemuser"]
    assert len(by_key) == len(users) == snap["marketo"]["salesPerson"]
    for u in users:
        o = by_key[u["systemuserid"]]
        assert (o.get("email"), o.get("firstName"), o.get("lastName")) == (
            u.get("internalemailaddress"),
            u.get("firstname"),
            u.get("lastname"),
        ), u["systemuserid"]
        assert bool(o.get("isDisabled")) == bool(u.get("isdisabled"))


def test_initial_copy_teams_and_memberships_become_custom_objects(default_world: World) -> None:
    snap = default_world.snaps["initial"]
    teams = {o["teamId"]: o for o in snap["objects"]["dynamicsTeam_c"]}
    labels = {0: "Owner", 1: "Access", 2: "Security Group", 3: "Office Group"}
    for t in snap["rows"]["team"]:
        o = teams.pop(t["teamid"])
        assert o["name"] == t["name"] and o["teamType"] == labels[t["teamtype"]]
        assert o.get("administratorId") == t.get("_administratorid_value")
    assert teams == {}
    members = {o["teamMembershipId"]: o for o in snap["objects"]["dynamicsTeamMember_c"]}
    assert len(members) == len(snap["rows"]["teammembership"])
    for m in snap["rows"]["teammembership"]:
        o = members[m["teammembershipid"]]
        assert (o["teamId"], o["salesPersonId"]) == (m["teamid"], m["systemuserid"])


def test_initial_copy_accounts_become_companies_with_owner(default_world: World) -> None:
    snap = default_world.snaps["initial"]
    companies = {o["externalCompanyId"]: o for o in snap["objects"]["company"]}
    kinds: Counter[str] = Counter()
    for a in snap["rows"]["account"]:
        if a.get("new_synctomkto") is False or a["accountid"] == default_world.picks["q_created"].get(
            "account"
        ):
            continue  # excluded by the filter, or created by the qualification after the initial copy
        o = companies[a["accountid"]]
        assert o["company"] == a["name"]
        owner_kind = a.get("_ownerid_value" + LOOKUP)
        kinds[owner_kind] += 1
        expected_owner = a["_ownerid_value"] if owner_kind == "systemuser" else None
        assert o.get("externalSalesPersonId") == expected_owner, a["accountid"]
    assert kinds["systemuser"] and kinds["team"], "the tiny org has user- and team-owned accounts"
    excluded = [a["accountid"] for a in snap["rows"]["account"] if a.get("new_synctomkto") is False]
    assert not set(excluded) & set(companies)


def test_initial_copy_leads_and_contacts_become_persons_once(default_world: World) -> None:
    world, snap = default_world, default_world.snaps["initial"]
    persons = {p["dynamicsId"]: p for p in snap["persons"] if p.get("dynamicsId")}
    assert max(snap["dynamics_ids"].values()) == 1
    checked: Counter[str] = Counter()
    active = set(world.query("SELECT entity, dynamics_id FROM identity WHERE state = 'active'"))
    for table in ("lead", "contact"):
        for r in snap["rows"][table]:
            did = r[f"{table}id"]
            if (table, did) not in active or did not in persons:
                continue  # converted leads, records created after the initial copy
            p = persons[did]
            assert p["dynamicsType"] == table.title()
            assert (
                (p.get("email") or "").lower() == (r.get("emailaddress1") or "").strip().lower()
                or p.get("email") is None
                and not r.get("emailaddress1")
            ), did
            assert p.get("lastName") == ((r.get("lastname") or "").strip() or None), did
            checked[table] += 1
    assert checked["lead"] > 50 and checked["contact"] > 50


def test_initial_copy_opportunities_with_company_via_account_or_contact(default_world: World) -> None:
    snap = default_world.snaps["initial"]
    opps = {o["externalOpportunityId"]: o for o in snap["objects"]["opportunity"]}
    kinds = Counter()
    for r in snap["rows"]["opportunity"]:
        oid = r["opportunityid"]
        if r.get("new_synctomkto") is False:
            assert oid not in opps
            continue
        o = opps[oid]
        assert o["name"] == r["name"]
        kind = r.get("_customerid_value" + LOOKUP)
        if kind == "account":
            assert o.get("externalCompanyId") == r["_customerid_value"], oid
        elif kind == "contact":
            contact = {c["contactid"]: c for c in snap["rows"]["contact"]}[r["_customerid_value"]]
            assert o.get("externalCompanyId") == contact.get("_parentcustomerid_value"), oid
        kinds[kind] += 1
    assert kinds["account"] and kinds["contact"]


def test_initial_copy_opportunity_contact_roles(default_world: World) -> None:
    snap = default_world.snaps["initial"]
    # The instance's own roles (on its mkto-opp-<seed>-<n> opportunities) are not the sync's.
    roles = {
        (r["externalOpportunityId"], r["leadId"], r["role"])
        for r in snap["objects"]["opportunityRole"]
        if not r["externalOpportunityId"].startswith("mkto-")
    }
    expected = set()
    for r in snap["rows"]["opportunity"]:
        if r.get("_customerid_value" + LOOKUP) != "contact" or r.get("new_synctomkto") is False:
            continue
        contact = {c["contactid"]: c for c in snap["rows"]["contact"]}[r["_customerid_value"]]
        if contact.get("new_synctomkto") is False:
            continue
        person = [p for p in snap["persons"] if p.get("dynamicsId") == contact["contactid"]]
        assert len(person) == 1
        expected.add((r["opportunityid"], person[0]["id"], "Potential Customer"))
    assert expected and roles == expected


def test_initial_copy_custom_table_becomes_custom_object(default_world: World) -> None:
    snap = default_world.snaps["initial"]
    projects = {o["projectId"]: o for o in snap["objects"]["project_c"]}
    labels = {1: "Planned", 2: "Active", 3: "Done", 4: "Cancelled"}
    rows = [r for r in snap["rows"]["new_project"] if r.get("new_synctomkto") is not False]
    assert len(rows) == len(projects)
    for r in rows:
        o = projects[r["new_projectid"]]
        assert o["name"] == r["new_name"]
        assert o.get("status") == labels.get(r.get("new_status"))
        assert o.get("companyId") == r.get("_new_accountid_value")
        assert o.get("contactId") == r.get("_new_contactid_value")
        assert r.get("new_budget") is None or abs(float(o["budget"]) - r["new_budget"]) < 0.005


def test_first_sync_links_existing_marketo_person_by_email(default_world: World) -> None:
    world = default_world
    links = world.query(
        "SELECT dynamics_id, marketo_id FROM identity WHERE entity = 'contact' AND how = 'email'"
    )
    assert links, "the tiny org has Marketo persons sharing a contact's email"
    before = {p["id"]: p for p in world.sandbox.marketo_rows("lead", ALL)}
    for did, mid in links:
        person = world.person_of(did)
        assert str(person["id"]) == mid
        contact = world.sandbox.dynamics_get("contact", did)
        assert person["email"].lower() == contact["emailaddress1"].strip().lower()
        # No second person with that email was created.
        same = [p for p in before.values() if (p.get("email") or "").lower() == person["email"].lower()]
        assert len(same) == 1


def test_initial_copy_twice_creates_no_duplicates(default_world: World) -> None:
    first, again = default_world.snaps["initial"], default_world.snaps["initial_again"]
    assert again["marketo"] == first["marketo"]
    assert again["dynamics"] == first["dynamics"]
    assert max(again["dynamics_ids"].values()) == 1


def test_incremental_dynamics_contact_change_reaches_marketo(default_world: World) -> None:
    world = default_world
    assert world.person_of(world.picks["c_dyn_edit"]).get("phone") == "+1 555 0100"
    rules = world.query(
        "SELECT target, op, rule FROM ledger WHERE dynamics_id = ? AND field = 'phone'",
        [world.picks["c_dyn_edit"]],
    )
    assert ("marketo", "update", "two_way") in rules


def test_incremental_marketo_change_reaches_dynamics_contact_and_lead(default_world: World) -> None:
    world = default_world
    sb, p = world.sandbox, world.picks
    assert sb.dynamics_get("contact", p["c_mkto_edit"])["jobtitle"] == "Chief Sync Officer"
    assert sb.dynamics_get("lead", p["l_mkto_edit"])["jobtitle"] == "Head of Leads"
    writes = world.query(
        "SELECT entity, target, op FROM ledger WHERE field = 'title' AND dynamics_id IN (?, ?) "
        "AND op = 'update'",
        [p["c_mkto_edit"], p["l_mkto_edit"]],
    )
    assert sorted(writes) == [("contact", "dynamics", "update"), ("lead", "dynamics", "update")]


def test_conflict_dynamics_wins_on_contacts(default_world: World) -> None:
    world = default_world
    did = world.picks["c_conflict"]
    assert world.sandbox.dynamics_get("contact", did)["address1_city"] == "Dynamicsville"
    assert world.person_of(did)["city"] == "Dynamicsville"
    assert world.query(
        "SELECT target, rule FROM ledger WHERE dynamics_id = ? AND field = 'city' AND op = 'update'", [did]
    ) == [("marketo", "conflict:dynamics_wins")]


def test_conflict_marketo_wins_on_leads(default_world: World) -> None:
    world = default_world
    did = world.picks["l_conflict"]
    assert world.sandbox.dynamics_get("lead", did)["address1_city"] == "Marketoburg"
    assert world.person_of(did)["city"] == "Marketoburg"
    assert world.query(
        "SELECT target, rule FROM ledger WHERE dynamics_id = ? AND field = 'city' AND op = 'update'", [did]
    ) == [("dynamics", "conflict:marketo_wins")]


def test_changes_to_different_fields_on_both_sides_both_survive(default_world: World) -> None:
    world = default_world
    did = world.picks["c_two_fields"]
    row, person = world.sandbox.dynamics_get("contact", did), world.person_of(did)
    assert (row["telephone1"], row["jobtitle"]) == ("+1 555 0111", "VP Both Sides")
    assert (person["phone"], person["title"]) == ("+1 555 0111", "VP Both Sides")
    assert not [
        r
        for r in world.query("SELECT rule FROM ledger WHERE dynamics_id = ?", [did])
        if r[0].startswith("conflict")
    ]


def test_echo_suppression_next_cycle_writes_nothing(default_world: World) -> None:
    snaps = default_world.snaps
    assert snaps["cycle3"]["ledger"] > snaps["cycle2"]["ledger"]  # cycle 3 wrote to Marketo
    assert snaps["cycle4"]["ledger"] == snaps["cycle3"]["ledger"]


def test_cycle_after_dynamics_creates_writes_only_what_dynamics_assigned(default_world: World) -> None:
    """Cycle 1 created a lead in Dynamics; cycle 2 brings back only the values Dynamics gave it itself."""
    world = default_world
    lead_id = world.sandbox.marketo_get_lead(world.picks["m_match"])["dynamicsId"]
    writes = world.picks["cycle2_writes"]
    assert {(e, d, t) for e, d, t, _ in writes} <= {("lead", lead_id, "marketo")}
    assert {f for *_, f in writes} <= {"externalSalesPersonId", "leadStatus"}


def test_same_cycle_twice_and_step_reruns_create_no_duplicates(default_world: World) -> None:
    snaps = default_world.snaps
    for name, previous in (("cycle2", "cycle1"), ("cycle4", "cycle3"), ("push_rerun", "cycle4")):
        assert snaps[name]["marketo"] == snaps[previous]["marketo"], name
        assert snaps[name]["dynamics"] == snaps[previous]["dynamics"], name
        assert max(snaps[name]["dynamics_ids"].values()) == 1, name


def test_lead_qualification_keeps_the_same_marketo_person(default_world: World) -> None:
    world = default_world
    p, snaps = world.picks, world.snaps
    contact_id = p["q_created"]["contact"]
    person = world.person_of(contact_id)
    assert person["id"] == p["l_qualify_person"]
    assert person["dynamicsType"] == "Contact"
    assert world.persons_of(p["l_qualify"]) == []
    assert world.identity("contact", contact_id) == (str(p["l_qualify_person"]), "active")
    assert world.identity("lead", p["l_qualify"])[1] == "converted"
    # Persons: only the contacts created in Dynamics (new + No->Yes) were added by the cycle.
    assert snaps["cycle1"]["marketo"]["lead"] == snaps["after_edits"]["marketo"]["lead"] + 2


def test_dynamics_delete_flags_the_person_and_keeps_it(default_world: World) -> None:
    world = default_world
    person = world.sandbox.marketo_get_lead(world.picks["c_delete_person"])
    assert person["dynamicsIsDeleted"] is True
    assert world.identity("contact", world.picks["c_delete"])[1] == "deleted"


def test_dynamics_delete_mode_delete_removes_membership(default_world: World) -> None:
    world = default_world
    keys = {o["teamMembershipId"] for o in world.sandbox.marketo_rows("dynamicsTeamMember_c", ALL)}
    assert world.picks["membership"] not in keys
    assert len(keys) == world.sandbox.dynamics_count("teammembership")


def test_dynamics_delete_mode_ignore_keeps_sales_person(default_world: World) -> None:
    world = default_world
    users = [
        o
        for o in world.sandbox.marketo_rows("salesPerson", ALL)
        if o["externalSalesPersonId"] == world.picks["user_deleted"]
    ]
    assert len(users) == 1 and not users[0].get("dynamicsIsDeleted")
    assert world.identity("systemuser", world.picks["user_deleted"])[1] == "deleted"


def test_marketo_delete_tombstones_and_dynamics_update_does_not_recreate(default_world: World) -> None:
    world = default_world
    did, snaps = world.picks["c_mkto_deleted"], world.snaps
    assert world.identity("contact", did)[1] == "tombstoned"
    assert world.persons_of(did) == []
    assert world.sandbox.dynamics_get("contact", did)["jobtitle"] == "Still here in Dynamics"
    # Cycle 3 created no person (the tombstoned contact changed, the No->Yes contact already existed).
    assert snaps["cycle3"]["marketo"]["lead"] == snaps["after_edits2"]["marketo"]["lead"]


def test_sync_filter_never_synced_false_record_is_not_created(default_world: World) -> None:
    world = default_world
    for key in ("c_never_synced", "c_new_excluded"):
        assert world.persons_of(world.picks[key]) == [], key
        assert world.identity("contact", world.picks[key]) is None, key


def test_sync_filter_yes_to_no_stops_updates_without_deleting(default_world: World) -> None:
    world = default_world
    did = world.picks["c_yes_no"]
    before = [p for p in world.snaps["initial"]["persons"] if p.get("dynamicsId") == did][0]
    after = world.picks["yes_no_after_cycle1"]  # the change made together with Yes -> No was not pushed
    assert after["id"] == before["id"] and after.get("phone") == before.get("phone") != "+1 555 0122"
    assert not after.get("dynamicsIsDeleted")


def test_sync_filter_no_to_yes_creates_and_resumes_updates(default_world: World) -> None:
    world = default_world
    created = world.person_of(world.picks["c_no_yes"])
    assert created["dynamicsType"] == "Contact"
    # Back to Yes: the change made while excluded and the new one both arrive, on the same person.
    person = world.person_of(world.picks["c_yes_no"])
    assert (person["phone"], person["title"]) == ("+1 555 0122", "Back in sync")


def test_new_dynamics_contact_created_with_company(default_world: World) -> None:
    world = default_world
    person = world.person_of(world.picks["c_new"])
    assert (person["email"], person["dynamicsType"]) == ("nina.new@example.org", "Contact")
    assert person["externalCompanyId"] == world.picks["account"]
    company = [
        o
        for o in world.sandbox.marketo_rows("company", ALL)
        if o["externalCompanyId"] == world.picks["account"]
    ][0]
    assert (company["mainPhone"], int(company["numberOfEmployees"])) == ("+1 555 0199", 4321)


def test_new_marketo_person_matching_rule_becomes_dynamics_lead(default_world: World) -> None:
    world = default_world
    sb, p = world.sandbox, world.picks
    person = sb.marketo_get_lead(p["m_match"])
    lead = sb.dynamics_get("lead", person["dynamicsId"])
    assert person["dynamicsType"] == "Lead"
    assert (lead["emailaddress1"], lead["lastname"]) == ("rita.rule@example.org", "Rule")
    assert world.identity("lead", person["dynamicsId"]) == (str(p["m_match"]), "active")
    emails = {
        (r.get("emailaddress1") or "").lower() for t in ("lead", "contact") for r in sb.dynamics_rows(t, ALL)
    }
    for key in ("m_low_score", "m_no_last"):
        other = sb.marketo_get_lead(p[key])
        assert other.get("dynamicsId") is None, key
        assert other["email"] not in emails, key
    assert world.snaps["cycle1"]["dynamics"]["lead"] == world.snaps["after_edits"]["dynamics"]["lead"] + 1


# ---------------------------------------------------------------------------------------------------------
# A custom configuration: latest / prefer_non_blank / hold, delete and ignore on persons


def _custom_config(path: Path) -> Path:
    raw = yaml.safe_load(DEFAULT_PATH.read_text())
    ents = {e["name"]: e for e in raw["entities"]}
    ents["lead"]["on_dynamics_delete"] = "delete"
    contact = ents["contact"]
    contact["on_dynamics_delete"] = "ignore"
    contact["fields"] = copy.deepcopy(contact["fields"])  # the YAML anchor shares the list with leads
    policies = {"title": "latest", "city": "prefer_non_blank", "phone": "hold"}
    for f in contact["fields"]:
        if f["marketo"] in policies:
            f["policy"] = policies[f["marketo"]]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def custom_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("custom")
    with _world(tmp, _custom_config(tmp / "entities.yaml")) as world:
        sb, p = world.sandbox, world.picks
        world.run("latest")  # the first cycle on an empty store is the initial copy
        contacts = _with(world, "contact", _synced(world, "contact", n=40), "address1_city")
        p["latest_m"], p["latest_d"], p["pnb_m"], p["pnb_d"], p["hold"], p["ignore"], p["if_match"] = (
            contacts[:7]
        )
        p["lead_delete"] = _synced(world, "lead")[0]
        p["lead_delete_person"] = world.person_of(p["lead_delete"])["id"]
        mid = {
            k: world.person_of(p[k])["id"]
            for k in ("latest_m", "latest_d", "pnb_m", "pnb_d", "hold", "ignore", "if_match")
        }
        p["mid"] = mid
        # latest: the later edit wins, whichever side it is on.
        sb.dynamics_update("contact", p["latest_m"], {"jobtitle": "Dynamics first"})
        sb.marketo_update_lead(mid["latest_d"], {"title": "Marketo first"})
        sb.advance_clock(120)
        sb.marketo_update_lead(mid["latest_m"], {"title": "Marketo later"})
        sb.dynamics_update("contact", p["latest_d"], {"jobtitle": "Dynamics later"})
        # prefer_non_blank: a side that blanked the field loses to the side that set a value.
        sb.dynamics_update("contact", p["pnb_m"], {"address1_city": None})
        sb.marketo_update_lead(mid["pnb_m"], {"city": "Marketo City"})
        sb.marketo_update_lead(mid["pnb_d"], {"city": None})
        sb.dynamics_update("contact", p["pnb_d"], {"address1_city": "Dynamics City"})
        # hold: neither side is written.
        sb.dynamics_update("contact", p["hold"], {"telephone1": "+1 555 0301"})
        sb.marketo_update_lead(mid["hold"], {"phone": "+1 555 0302"})
        # Deletes: lead (delete mode), contact (ignore).
        sb.dynamics_delete("lead", p["lead_delete"])
        sb.dynamics_delete("contact", p["ignore"])
        world.snapshot("before_cycle")
        world.run("latest")
        world.snapshot("cycle1")
        _if_match_race(world)
        yield world


def _if_match_race(world: World) -> None:
    """A Marketo change planned for Dynamics, then the record changes in Dynamics before the push."""
    from sync_pipeline.connection.keys import asset_key
    from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

    sb, p = world.sandbox, world.picks
    sb.marketo_update_lead(p["mid"]["if_match"], {"mobilePhone": "+1 555 0401"})
    world.run(
        "latest",
        selection=[
            asset_key(CONN, "person", "extract"),
            asset_key(CONN, "contact", "extract"),
            asset_key(CONN, "contact", "plan"),
        ],
    )
    world.picks["if_match_planned"] = world.query(
        "SELECT target, op, new_value, etag FROM plan WHERE entity = 'contact' AND dynamics_id = ? "
        "AND field = 'mobilePhone'",
        [p["if_match"]],
    )
    sb.dynamics_update("contact", p["if_match"], {"mobilephone": "+1 555 0402"})
    world.run(
        "latest",
        selection=[asset_key(CONN, "contact", "push"), asset_key(CONN, "contact", "push", "dynamics")],
    )
    world.picks["if_match_failure"] = world.query(
        "SELECT target, code FROM failures WHERE entity = 'contact' AND dynamics_id = ?", [p["if_match"]]
    )
    world.picks["if_match_after_push"] = sb.dynamics_get("contact", p["if_match"]).get("mobilephone")
    world.run("latest")  # re-read, re-planned: both changed, contacts' default policy (Dynamics wins)


def test_policy_latest_takes_the_later_change(custom_world: World) -> None:
    world = custom_world
    sb, p = world.sandbox, world.picks
    assert sb.dynamics_get("contact", p["latest_m"])["jobtitle"] == "Marketo later"
    assert world.person_of(p["latest_m"])["title"] == "Marketo later"
    assert sb.dynamics_get("contact", p["latest_d"])["jobtitle"] == "Dynamics later"
    assert world.person_of(p["latest_d"])["title"] == "Dynamics later"
    writes = world.query(
        "SELECT dynamics_id, target, rule FROM ledger WHERE field = 'title' AND op = 'update' "
        "AND dynamics_id IN (?, ?) ORDER BY target",
        [p["latest_m"], p["latest_d"]],
    )
    assert writes == [
        (p["latest_m"], "dynamics", "conflict:latest"),
        (p["latest_d"], "marketo", "conflict:latest"),
    ]


def test_policy_prefer_non_blank_keeps_the_value(custom_world: World) -> None:
    world = custom_world
    sb, p = world.sandbox, world.picks
    assert sb.dynamics_get("contact", p["pnb_m"])["address1_city"] == "Marketo City"
    assert world.person_of(p["pnb_m"])["city"] == "Marketo City"
    assert sb.dynamics_get("contact", p["pnb_d"])["address1_city"] == "Dynamics City"
    assert world.person_of(p["pnb_d"])["city"] == "Dynamics City"


def test_policy_hold_writes_neither_side_and_records_the_conflict(custom_world: World) -> None:
    world = custom_world
    sb, p = world.sandbox, world.picks
    assert sb.dynamics_get("contact", p["hold"])["telephone1"] == "+1 555 0301"
    assert world.person_of(p["hold"])["phone"] == "+1 555 0302"
    assert world.query(
        "SELECT dynamics_value, marketo_value FROM conflicts WHERE entity = 'contact' "
        "AND dynamics_id = ? AND field = 'phone'",
        [p["hold"]],
    ) == [("+1 555 0301", "+1 555 0302")]


def test_delete_mode_delete_removes_the_person(custom_world: World) -> None:
    world = custom_world
    p, snaps = world.picks, world.snaps
    assert world.sandbox.marketo_find_leads("id", p["lead_delete_person"]) == []
    assert world.identity("lead", p["lead_delete"])[1] == "deleted"
    assert snaps["cycle1"]["marketo"]["lead"] == snaps["before_cycle"]["marketo"]["lead"] - 1


def test_delete_mode_ignore_leaves_the_person_untouched(custom_world: World) -> None:
    world = custom_world
    person = world.sandbox.marketo_get_lead(world.picks["mid"]["ignore"])
    assert person["dynamicsId"] == world.picks["ignore"]
    assert not person.get("dynamicsIsDeleted")
    assert world.identity("contact", world.picks["ignore"])[1] == "deleted"


def test_marketo_change_is_written_to_dynamics_with_if_match(custom_world: World) -> None:
    world = custom_world
    p = world.picks
    planned = p["if_match_planned"]
    assert len(planned) == 1 and planned[0][:3] == ("dynamics", "update", "+1 555 0401") and planned[0][3]
    # The record changed in Dynamics after it was read: the write was refused (412), nothing overwritten ...
    assert p["if_match_failure"] == [("dynamics", "412")]
    assert p["if_match_after_push"] == "+1 555 0402"
    # ... and the next cycle re-read it and resolved the conflict by the contact's policy (Dynamics wins).
    assert world.sandbox.dynamics_get("contact", p["if_match"])["mobilephone"] == "+1 555 0402"
    assert world.person_of(p["if_match"])["mobilePhone"] == "+1 555 0402"
    assert (
        world.query(
            "SELECT count(*) FROM failures WHERE entity = 'contact' AND dynamics_id = ?", [p["if_match"]]
        )[0][0]
        == 0
    )
