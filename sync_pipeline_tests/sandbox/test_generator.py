from __future__ import annotations

import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from sync_pipeline.sandbox import generator
from sync_pipeline.sandbox.dynamics.store import DynamicsStore
from sync_pipeline.sandbox.generator import SCALES, Scale, generate, populate
from sync_pipeline.sandbox.marketo import MarketoSandbox
from sync_pipeline.sandbox.marketo.store import MarketoStore
from sync_pipeline.sandbox.schema import load_schema

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
GUID = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")
TARGET = "@Microsoft.Dynamics.CRM.lookuplogicalname"


def collect(scale: str | Scale, seed: int = 0, **kw: Any) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for system, name, rows in generate(scale, seed, NOW, **kw):
        out.setdefault((system, name), []).extend(rows)
    return out


@pytest.fixture(scope="module")
def small() -> dict[tuple[str, str], list[dict[str, Any]]]:
    return collect("small")


def by_id(rows: list[dict[str, Any]], pk: str) -> dict[str, dict[str, Any]]:
    return {r[pk]: r for r in rows}


def test_scale_counts_match_their_definition(small: dict) -> None:
    spec = SCALES["small"]
    counts = {name: len(rows) for (_, name), rows in small.items() if _ == "dynamics"}
    assert counts == {
        "systemuser": spec.users,
        "team": spec.teams,
        "teammembership": spec.memberships,
        "account": spec.accounts,
        "contact": spec.contacts,
        "lead": spec.leads,
        "opportunity": spec.opportunities,
        "new_project": spec.custom_rows,
    }
    persons = spec.leads + spec.contacts
    assert len(small[("marketo", "lead")]) == persons // 10
    assert 9_000 <= sum(counts.values()) <= 11_000


def test_named_scales_have_the_promised_sizes() -> None:
    large = SCALES["large"]
    assert (
        large.leads,
        large.contacts,
        large.accounts,
        large.opportunities,
        large.users,
        large.teams,
        large.custom_rows,
    ) == (400_000, 400_000, 100_000, 100_000, 5000, 200, 100_000)

    def total(s: Any) -> int:
        return (
            s.users
            + s.teams
            + s.memberships
            + s.accounts
            + s.contacts
            + s.leads
            + s.opportunities
            + s.custom_rows
        )

    assert 1_100_000 <= total(large) <= 1_150_000
    assert 260_000 <= total(SCALES["medium"]) <= 290_000
    assert 100 <= total(SCALES["tiny"]) <= 1000


def test_same_seed_same_org_other_seed_other_org() -> None:
    first, again, other = collect("tiny", seed=7), collect("tiny", seed=7), collect("tiny", seed=8)
    assert first == again
    assert first[("dynamics", "lead")] != other[("dynamics", "lead")]
    assert {r["leadid"] for r in first[("dynamics", "lead")]}.isdisjoint(
        r["leadid"] for r in other[("dynamics", "lead")]
    )


def test_guids_are_well_formed_and_unique_across_tables(small: dict) -> None:
    pks = {
        "systemuser": "systemuserid",
        "team": "teamid",
        "teammembership": "teammembershipid",
        "account": "accountid",
        "contact": "contactid",
        "lead": "leadid",
        "opportunity": "opportunityid",
        "new_project": "new_projectid",
    }
    ids = [row[pks[name]] for (system, name), rows in small.items() if system == "dynamics" for row in rows]
    assert all(GUID.match(i) for i in ids)
    assert len(ids) == len(set(ids))


def test_referential_integrity(small: dict) -> None:
    users = by_id(small[("dynamics", "systemuser")], "systemuserid")
    teams = by_id(small[("dynamics", "team")], "teamid")
    accounts = by_id(small[("dynamics", "account")], "accountid")
    contacts = by_id(small[("dynamics", "contact")], "contactid")
    leads = by_id(small[("dynamics", "lead")], "leadid")
    owned = {"systemuser": users, "team": teams}
    owner_kinds: Counter[str] = Counter()
    for name in ("account", "contact", "lead", "opportunity", "new_project"):
        for row in small[("dynamics", name)]:
            kind = row["_ownerid_value" + TARGET]
            owner_kinds[kind] += 1
            owner = owned[kind][row["_ownerid_value"]]
            assert (
                kind == "systemuser" and not owner["isdisabled"] or kind == "team" and owner["teamtype"] == 0
            )
            assert row["_createdby_value"] in users and row["_modifiedby_value"] in users
    assert owner_kinds["systemuser"] > 5 * owner_kinds["team"] > 0

    for m in small[("dynamics", "teammembership")]:
        assert m["systemuserid"] in users and m["teamid"] in teams
    assert all(t["_administratorid_value"] in users for t in teams.values())

    parented = 0
    for c in contacts.values():
        if "_parentcustomerid_value" in c:
            assert c["_parentcustomerid_value" + TARGET] == "account"
            assert c["_parentcustomerid_value"] in accounts
            parented += 1
    assert parented > 0.95 * len(contacts)
    originated = [c for c in contacts.values() if "_originatingleadid_value" in c]
    assert len(originated) >= 0.15 * len(contacts)
    for c in originated:
        lead = leads[c["_originatingleadid_value"]]
        assert lead["statecode"] == 1 and lead["statuscode"] == 3
        assert (lead["firstname"], lead["lastname"]) == (c["firstname"], c["lastname"])
        assert lead.get("emailaddress1") == c.get("emailaddress1")

    for a in accounts.values():
        if "_primarycontactid_value" in a:
            assert contacts[a["_primarycontactid_value"]]["_parentcustomerid_value"] == a["accountid"]

    customers = Counter()
    for o in small[("dynamics", "opportunity")]:
        kind = o["_customerid_value" + TARGET]
        customers[kind] += 1
        assert o["_customerid_value"] in {"account": accounts, "contact": contacts}[kind]
        if "_parentaccountid_value" in o:
            assert o["_parentaccountid_value"] in accounts
        if "_parentcontactid_value" in o:
            assert o["_parentcontactid_value"] in contacts
        if kind == "contact" and "_parentaccountid_value" in o:
            assert contacts[o["_customerid_value"]]["_parentcustomerid_value"] == o["_parentaccountid_value"]
        if "_originatingleadid_value" in o:
            assert leads[o["_originatingleadid_value"]]["statecode"] == 1
    assert customers["account"] > customers["contact"] > 0

    for p in small[("dynamics", "new_project")]:
        assert p["_new_accountid_value"] in accounts
        if "_new_contactid_value" in p:
            assert contacts[p["_new_contactid_value"]]["_parentcustomerid_value"] == p["_new_accountid_value"]


def test_values_follow_the_schema_and_look_real(small: dict) -> None:
    schema = load_schema()
    for (system, name), rows in small.items():
        if system != "dynamics":
            continue
        table = schema.tables[name]
        wire = set(table.wire_columns()) | {c.wire_name + TARGET for c in table.columns if c.is_lookup}
        for row in rows:
            assert set(row) <= wire, f"{name}: columns not in the schema: {set(row) - wire}"
            for col in table.columns:
                if col.options and col.name in row:
                    assert row[col.name] in col.option_codes, (name, col.name, row[col.name])
                if col.max_length and isinstance(row.get(col.name), str):
                    assert len(row[col.name]) <= col.max_length, (name, col.name)
    leads = small[("dynamics", "lead")]
    flags = Counter(r.get("new_synctomkto") for r in leads)
    assert flags[None] > flags[True] > flags[False] > 0
    assert flags[None] > 0.7 * len(leads)
    states = Counter(r["statecode"] for r in leads)
    assert states[0] > states[1] > 0 and states[2] > 0

    people = small[("dynamics", "lead")] + small[("dynamics", "contact")]
    emails = [r["emailaddress1"] for r in people if "emailaddress1" in r]
    assert len(emails) > 0.9 * len(people)
    assert any(e != e.strip() for e in emails), "whitespace-padded emails"
    assert any(e == e.upper() for e in emails), "upper-case emails"
    assert all(e.strip().isascii() and "@" in e for e in emails)
    names = {r["firstname"] for r in people} | {r["lastname"] for r in people}
    assert not all(n.isascii() for n in names), "a few non-ASCII names"
    assert sum(1 for r in people if not (r["firstname"] + r["lastname"]).isascii()) < 0.05 * len(people)
    assert any("'" in n for n in names), "apostrophes (O'Brien) exercise OData escaping"


def test_timestamps_spread_over_the_window(small: dict) -> None:
    start = NOW - timedelta(days=90)
    days: set[str] = set()
    for name in ("account", "contact", "lead", "opportunity"):
        for row in small[("dynamics", name)]:
            modified = datetime.fromisoformat(row["modifiedon"].replace("Z", "+00:00"))
            assert start <= modified <= NOW
            assert row["createdon"] <= row["modifiedon"]
            days.add(row["modifiedon"][:10])
    assert len(days) >= 85
    week = collect("tiny", window_days=7)
    assert all(
        r["modifiedon"] >= (NOW - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
        for r in week[("dynamics", "lead")]
    )


def test_marketo_persons_share_some_emails_with_contacts(small: dict) -> None:
    persons = small[("marketo", "lead")]
    assert not any("dynamicsId" in p for p in persons)
    contact_emails = {c["emailaddress1"] for c in small[("dynamics", "contact")] if "emailaddress1" in c}
    folded = {e.strip().casefold() for e in contact_emails}
    exact = [p for p in persons if p.get("email") in contact_emails]
    variant = [
        p
        for p in persons
        if p.get("email") not in contact_emails and (p.get("email") or "").casefold() in folded
    ]
    assert len(exact) >= 0.05 * len(persons) and len(variant) >= 0.05 * len(persons)
    own = [p for p in persons if (p.get("email") or "").casefold() not in folded]
    assert len(own) > 0.7 * len(persons)


MARKETO_BORN = ("company", "opportunity", "opportunityRole")


def test_marketo_born_companies_opportunities_and_roles(small: dict) -> None:
    persons = small[("marketo", "lead")]
    companies = small[("marketo", "company")]
    names = {p["company"] for p in persons if p.get("company")}
    # About half of the company names the persons carry have a company record, keyed by a non-Dynamics id.
    assert 0.35 * len(names) <= len(companies) <= 0.65 * len(names)
    assert [c["externalCompanyId"] for c in companies] == [
        f"mkto-0-{n}" for n in range(1, len(companies) + 1)
    ]
    assert {c["company"] for c in companies} <= names and len({c["company"] for c in companies}) == len(
        companies
    )
    assert all(
        c["website"].startswith("https://www.") and c["industry"] and c["billingCity"] for c in companies
    )
    by_company = {c["externalCompanyId"]: c for c in companies}
    opportunities = small[("marketo", "opportunity")]
    assert 0.3 * len(companies) <= len(opportunities) <= 0.7 * len(companies)
    assert len({o["externalOpportunityId"] for o in opportunities}) == len(opportunities)
    for o in opportunities:
        assert o["externalOpportunityId"].startswith("mkto-opp-0-") and o["amount"] > 0
        assert o["name"].startswith(by_company[o["externalCompanyId"]]["company"] + " - ")
        assert o["isWon"] <= o["isClosed"] and ("closeDate" in o) == o["isClosed"]
    assert {o["stage"] for o in opportunities} >= {"Closed Won", "Prospecting"}
    # Roles name the opportunity's company's own people (by position from the end, like activities), never
    # with the role the sync writes.
    roles = small[("marketo", "opportunityRole")]
    opps = {o["externalOpportunityId"]: o for o in opportunities}
    assert {r["externalOpportunityId"] for r in roles} == set(opps)
    for r in roles:
        person = persons[r["leadIndex"]]
        assert (
            person["company"] == by_company[opps[r["externalOpportunityId"]]["externalCompanyId"]]["company"]
        )
        assert r["role"] != "Potential Customer"
    assert sum(r["isPrimary"] for r in roles) == len(opps)


def test_marketo_born_records_have_their_own_random_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    with_them = collect("tiny", seed=4)
    assert collect("tiny", seed=4)[("marketo", "company")] == with_them[("marketo", "company")]
    assert collect("tiny", seed=5)[("marketo", "company")] != with_them[("marketo", "company")]
    monkeypatch.setattr(generator, "MARKETO_COMPANY_SHARE", 0.0)
    without = collect("tiny", seed=4)
    assert all(with_them[("marketo", name)] for name in MARKETO_BORN)
    assert not any(("marketo", name) in without for name in MARKETO_BORN)
    assert {k: v for k, v in with_them.items() if k[0] == "dynamics" or k[1] not in MARKETO_BORN} == without


def test_seeded_companies_answer_the_documented_queries() -> None:
    """GET companies / opportunities / roles by their dedupe field and by idField (Adobe, "Companies",
    https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/companies, and
    "Opportunities", .../rest/lead-database/opportunities)."""
    sandbox = MarketoSandbox().start()
    try:
        counts = populate(None, sandbox.store, "tiny", seed=2, now=NOW)
        token = httpx.post(
            f"{sandbox.base_url}/identity/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": sandbox.client_id,
                "client_secret": sandbox.client_secret,
            },
        ).json()["access_token"]
        http = httpx.Client(base_url=sandbox.base_url, headers={"Authorization": f"Bearer {token}"})

        def get(path: str, **params: Any) -> list[dict[str, Any]]:
            body = http.get(path, params=params).json()
            assert body["success"] is True, body
            return body["result"]

        stored = sorted(sandbox.store.objects("company"), key=lambda c: c["id"])
        assert len(stored) == counts["marketo.company"] > 0
        keys = [c["externalCompanyId"] for c in stored]
        found = get(
            "/rest/v1/companies.json",
            filterType="externalCompanyId",
            filterValues=",".join(keys),
            fields="externalCompanyId,company,billingCity",
        )
        assert sorted((c["externalCompanyId"], c["company"]) for c in found) == sorted(
            (c["externalCompanyId"], c["company"]) for c in stored
        )
        by_id = get(
            "/rest/v1/companies.json",
            filterType="id",
            filterValues=str(stored[0]["id"]),
            fields="externalCompanyId,company",
        )
        assert [(c["id"], c["externalCompanyId"]) for c in by_id] == [(stored[0]["id"], keys[0])]
        by_name = get("/rest/v1/companies.json", filterType="company", filterValues=stored[0]["company"])
        assert stored[0]["id"] in [c["id"] for c in by_name]

        opps = list(sandbox.store.objects("opportunity"))
        assert len(opps) == counts["marketo.opportunity"] > 0
        found = get(
            "/rest/v1/opportunities.json",
            filterType="externalOpportunityId",
            filterValues=opps[0]["externalOpportunityId"],
            fields="externalOpportunityId,externalCompanyId,name",
        )
        assert found[0]["externalCompanyId"] in keys and found[0]["marketoGUID"] == opps[0]["marketoGUID"]
        assert (
            get("/rest/v1/opportunities.json", filterType="marketoGUID", filterValues=opps[0]["marketoGUID"])[
                0
            ]["externalOpportunityId"]
            == opps[0]["externalOpportunityId"]
        )
        roles = get(
            "/rest/v1/opportunities/roles.json",
            filterType="externalOpportunityId",
            filterValues=opps[0]["externalOpportunityId"],
            fields="leadId,role,isPrimary",
        )
        assert roles and all(sandbox.store.get_lead(r["leadId"]) for r in roles)
        http.close()
    finally:
        sandbox.stop()


def test_populate_loads_both_stores() -> None:
    schema = load_schema()
    dynamics, marketo = DynamicsStore(schema), MarketoStore(schema)
    counts = populate(dynamics, marketo, "tiny", seed=1, now=NOW, schema=schema)
    for key, n in counts.items():
        system, name = key.split(".")
        assert (dynamics if system == "dynamics" else marketo).count(name) == n
    email = next(p["email"] for p in marketo.leads() if p.get("email"))
    assert marketo.find_leads("email", email)
    lead = next(dynamics.rows("lead"))
    assert lead["versionnumber"] > 0 and lead["fullname"]


def test_populate_names_the_rows_a_store_refuses() -> None:
    class Refusing:
        def bulk_load(self, name: str, rows: list) -> None:
            raise ValueError("disk full")

    with pytest.raises(
        RuntimeError, match=r"dynamics store refused generated systemuser rows 0-9: disk full"
    ):
        populate(Refusing(), None, "tiny", now=NOW)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown sandbox scale 'huge'.*tiny, small, medium, large"):
        next(generate("huge"))
    with pytest.raises(ValueError, match="timezone-aware"):
        next(generate("tiny", now=datetime(2025, 1, 1)))
    with pytest.raises(ValueError, match="window_days"):
        next(generate("tiny", window_days=0))


@pytest.mark.slow
def test_large_generates_and_loads_within_a_minute() -> None:
    schema = load_schema()
    started = time.perf_counter()
    counts = populate(DynamicsStore(schema), MarketoStore(schema), "large", now=NOW, schema=schema)
    assert time.perf_counter() - started < 60
    assert counts["dynamics.lead"] == 400_000 and counts["marketo.lead"] == 80_000
