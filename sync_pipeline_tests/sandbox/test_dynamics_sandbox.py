"""Wire-level tests of the Dataverse sandbox and its identity endpoint, with raw httpx over TLS."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.dynamics import DynamicsSandbox
from sync_pipeline.sandbox.faults import Fault
from sync_pipeline.sandbox.tls import SandboxCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SandboxCA:
    return SandboxCA.create(tmp_path_factory.mktemp("tls"))


def _start(ca: SandboxCA, **kwargs: Any) -> DynamicsSandbox:
    ctx = ca.server_context()
    return DynamicsSandbox(**kwargs).start(identity_ssl=ctx, api_ssl=ctx)


@pytest.fixture
def sb(ca: SandboxCA) -> Iterator[DynamicsSandbox]:
    sandbox = _start(ca, clock=Clock())
    yield sandbox
    sandbox.stop()


def _token(sb: DynamicsSandbox, ca: SandboxCA, **overrides: str) -> httpx.Response:
    form = {
        "grant_type": "client_credentials",
        "client_id": sb.client_id,
        "client_secret": sb.client_secret,
        "scope": f"{sb.api_url}/.default",
        **overrides,
    }
    return httpx.post(f"{sb.authority}/oauth2/v2.0/token", data=form, verify=str(ca.ca_path))


@pytest.fixture
def api(sb: DynamicsSandbox, ca: SandboxCA) -> Iterator[httpx.Client]:
    token = _token(sb, ca).json()["access_token"]
    with httpx.Client(
        base_url=f"{sb.api_url}/api/data/v9.2/",
        verify=str(ca.ca_path),
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    ) as client:
        yield client


def _leads(n: int, **extra: Any) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {
            "leadid": str(uuid.UUID(int=i + 1)),
            "lastname": f"Last{i:05d}",
            "firstname": "F",
            "emailaddress1": f"p{i}@example.com",
            "statecode": 0,
            "statuscode": 1,
            **extra,
        }


# ------------------------------------------------------------------------------------------ identity
def test_openid_configuration_both_paths(sb: DynamicsSandbox, ca: SandboxCA) -> None:
    for path in ("/v2.0/.well-known/openid-configuration", "/.well-known/openid-configuration"):
        doc = httpx.get(sb.authority + path, verify=str(ca.ca_path)).json()
        assert doc["token_endpoint"] == f"{sb.authority}/oauth2/v2.0/token"
        assert doc["issuer"] == f"{sb.authority}/v2.0"
    bad = httpx.get(
        f"{sb.identity_url}/not-a-tenant/v2.0/.well-known/openid-configuration", verify=str(ca.ca_path)
    )
    assert bad.status_code == 400 and bad.json()["error_codes"] == [90002]


def test_token_success_and_identity_errors(sb: DynamicsSandbox, ca: SandboxCA) -> None:
    ok = _token(sb, ca).json()
    assert ok["token_type"] == "Bearer" and ok["expires_in"] == 3599 and ok["ext_expires_in"] == 3599
    assert len(ok["access_token"]) > 40 and sb.client_secret not in ok["access_token"]
    cases = [
        ({"client_secret": "wrong"}, 401, "invalid_client", 7000215),
        ({"client_id": str(uuid.uuid4())}, 400, "unauthorized_client", 700016),
        ({"scope": "https://graph.microsoft.com/.default"}, 400, "invalid_scope", 70011),
        ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
    ]
    for overrides, status, error, code in cases:
        resp = _token(sb, ca, **overrides)
        body = resp.json()
        assert (resp.status_code, body["error"], body["error_codes"]) == (status, error, [code]), overrides
        assert body["error_description"].startswith(f"AADSTS{code}:")
        assert {"timestamp", "trace_id", "correlation_id"} <= body.keys()
        assert sb.client_secret not in resp.text
    assert sb.identity_app.calls["identity.token"] == 5


# ------------------------------------------------------------------------------------------ auth
def test_api_rejects_missing_garbage_and_expired_tokens(
    sb: DynamicsSandbox, ca: SandboxCA, api: httpx.Client
) -> None:
    assert api.get("WhoAmI").status_code == 200
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}):
        resp = httpx.get(f"{sb.api_url}/api/data/v9.2/WhoAmI", headers=headers, verify=str(ca.ca_path))
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].startswith(f"Bearer authorization_uri={sb.authority}")
        assert resp.json()["error"]["message"]
    sb.clock.advance(3600)
    expired = api.get("WhoAmI")
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]


def test_whoami_service_document_metadata(api: httpx.Client, sb: DynamicsSandbox) -> None:
    who = api.get("WhoAmI").json()
    assert who["UserId"] == sb.app_user_id and who["OrganizationId"] == sb.organization_id
    assert sb.store.get("systemuser", sb.app_user_id)["applicationid"] == sb.client_id
    sets = {v["name"] for v in api.get("").json()["value"]}
    assert {"leads", "contacts", "accounts", "opportunities", "new_projects"} <= sets
    csdl = api.get("$metadata")
    assert (
        csdl.headers["Content-Type"].startswith("application/xml") and 'EntitySet Name="leads"' in csdl.text
    )


def test_entity_definitions_and_attributes(api: httpx.Client) -> None:
    custom = api.get(
        "EntityDefinitions",
        params={
            "$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
            "$filter": "IsCustomEntity eq true",
        },
    ).json()["value"]
    assert [(d["LogicalName"], d["EntitySetName"], d["PrimaryIdAttribute"]) for d in custom] == [
        ("new_project", "new_projects", "new_projectid")
    ]
    assert "ChangeTrackingEnabled" not in custom[0]
    one = api.get("EntityDefinitions(LogicalName='lead')").json()
    assert one["ChangeTrackingEnabled"] is True and one["PrimaryNameAttribute"] == "fullname"
    attrs = {
        a["LogicalName"]: a
        for a in api.get("EntityDefinitions(LogicalName='contact')/Attributes").json()["value"]
    }
    assert (
        attrs["lastname"]["MaxLength"] == 50
        and attrs["lastname"]["RequiredLevel"]["Value"] == "ApplicationRequired"
    )
    assert attrs["parentcustomerid"]["Targets"] == ["account", "contact"]
    # OptionSet is a navigation property: returned with $expand on the picklist cast (query-metadata-web-api).
    method = api.get(
        "EntityDefinitions(LogicalName='contact')/Attributes(LogicalName='preferredcontactmethodcode')/"
        "Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
        params={"$expand": "OptionSet"},
    ).json()
    assert {o["Value"] for o in method["OptionSet"]["Options"]} == {1, 2, 3, 4, 5}
    picklists = api.get(
        "EntityDefinitions(LogicalName='lead')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
        params={"$select": "LogicalName"},
    ).json()["value"]
    assert {a["LogicalName"] for a in picklists} == {
        "preferredcontactmethodcode",
        "leadsourcecode",
        "leadqualitycode",
    }
    missing = api.get("EntityDefinitions(LogicalName='nope')")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ paging
def test_paging_is_stateless_complete_and_side_effect_free(api: httpx.Client, sb: DynamicsSandbox) -> None:
    sb.store.bulk_load("lead", _leads(12_345))
    version = sb.store.version
    seen, pages, url = [], 0, "leads?$select=lastname,emailaddress1"
    while url:
        resp = api.get(url, headers={"Prefer": "odata.maxpagesize=5000"})
        assert resp.headers["Preference-Applied"] == "odata.maxpagesize=5000"
        body = resp.json()
        assert body["@odata.context"].endswith("$metadata#leads(leadid,lastname,emailaddress1)")
        assert all(r["@odata.etag"].startswith('W/"') for r in body["value"])
        seen += [r["leadid"] for r in body["value"]]
        pages += 1
        url = body.get("@odata.nextLink")
        if url:
            assert "$skiptoken=" in url and "%3Ccookie" in url
    assert pages == 3 and len(seen) == 12_345 and seen == sorted(set(seen))
    assert sb.store.version == version  # reads have no side effects
    default = api.get("leads", params={"$select": "lastname"}).json()
    assert len(default["value"]) == 5000 and "@odata.nextLink" in default
    assert (
        api.get("leads", headers={"Prefer": "odata.maxpagesize=99999"}).headers["Preference-Applied"]
        == "odata.maxpagesize=5000"
    )


def test_orderby_desc_paging_matches_python_sort(api: httpx.Client, sb: DynamicsSandbox) -> None:
    sb.store.bulk_load(
        "account", ({"name": f"A{i % 7}", "numberofemployees": (i * 37) % 11 or None} for i in range(60))
    )
    expected = sorted(sb.store.rows("account"), key=lambda r: r["accountid"])
    expected.sort(key=lambda r: r["name"])
    expected.sort(
        key=lambda r: (r.get("numberofemployees") is not None, r.get("numberofemployees") or 0), reverse=True
    )
    got, url = [], "accounts?$select=name,numberofemployees&$orderby=numberofemployees desc,name asc"
    while url:
        body = api.get(url, headers={"Prefer": "odata.maxpagesize=7"}).json()
        got += body["value"]
        url = body.get("@odata.nextLink")
    assert [r["accountid"] for r in got] == [r["accountid"] for r in expected]


def test_count_top_and_unsupported_options(api: httpx.Client, sb: DynamicsSandbox) -> None:
    sb.store.bulk_load("lead", _leads(6000))
    body = api.get("leads", params={"$select": "lastname", "$count": "true", "$top": "3"}).json()
    assert len(body["value"]) == 3 and "@odata.nextLink" not in body
    assert (
        body["@odata.count"] == 5000 and body["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] is True
    )
    small = api.get("leads", params={"$count": "true", "$filter": "lastname eq 'Last00042'"}).json()
    assert small["@odata.count"] == 1
    assert api.get("leads/$count").text == "5000"
    skip = api.get("leads", params={"$skip": "10"})
    assert skip.status_code == 400 and "$skip" in skip.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ filter
def _names(api: httpx.Client, flt: str, entity: str = "contacts") -> list[str]:
    resp = api.get(entity, params={"$select": "lastname", "$filter": flt})
    assert resp.status_code == 200, resp.text
    return sorted(r["lastname"] for r in resp.json()["value"])


def test_filter_grammar(api: httpx.Client, sb: DynamicsSandbox) -> None:
    acct = str(uuid.uuid4())
    sb.store.bulk_load("account", [{"accountid": acct, "name": "Acme"}])
    sb.store.bulk_load(
        "contact",
        [
            {
                "lastname": "O'Bryan",
                "firstname": "Ann",
                "mkt_leadscore": 10,
                "modifiedon": "2024-05-01T10:00:00Z",
                "_parentcustomerid_value": acct,
                "_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname": "account",
            },
            {
                "lastname": "Smith",
                "firstname": None,
                "mkt_leadscore": 50,
                "modifiedon": "2024-06-01T00:00:00Z",
                "donotemail": True,
            },
            {
                "lastname": "smithers",
                "firstname": "Bob",
                "mkt_leadscore": None,
                "modifiedon": "2024-04-01T00:00:00Z",
            },
        ],
    )
    assert _names(api, "lastname eq 'O''Bryan'") == ["O'Bryan"]
    assert _names(api, "lastname eq 'SMITH'") == ["Smith"]  # case-insensitive
    assert _names(api, "firstname eq null") == ["Smith"]
    assert _names(api, "firstname ne null and not (mkt_leadscore eq null)") == ["O'Bryan"]
    assert _names(api, "mkt_leadscore ge 10 and (mkt_leadscore lt 50 or donotemail eq true)") == [
        "O'Bryan",
        "Smith",
    ]
    assert _names(api, "modifiedon ge 2024-05-01T00:00:00Z") == ["O'Bryan", "Smith"]
    assert _names(api, "modifiedon lt 2024-05-01") == ["smithers"]
    assert _names(api, f"_parentcustomerid_value eq {acct.upper()}") == ["O'Bryan"]
    assert _names(api, "startswith(lastname,'smith') and contains(lastname,'er')") == ["smithers"]
    assert _names(api, "endswith(lastname,'ryan')") == ["O'Bryan"]


@pytest.mark.parametrize(
    "flt, fragment",
    [
        ("lastname eq 'O'Bryan'", "unterminated string literal"),
        ("lastname eq 'x' or 'a' eq 'a'", "Expected a property name"),
        ("lastname eq 'x'; delete", "Syntax error"),
        ("nosuchfield eq 1", "Could not find a property named 'nosuchfield'"),
        ("contactid eq 'not-a-guid'", "incompatible types"),
        ("mkt_leadscore eq '5'", "incompatible types"),
        ("lastname eq", "Unexpected end"),
        ("(lastname eq 'x'", "Unexpected end"),
    ],
)
def test_filter_rejections(api: httpx.Client, flt: str, fragment: str) -> None:
    resp = api.get("contacts", params={"$select": "lastname", "$filter": flt})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "0x80060888" and fragment in resp.json()["error"]["message"]


def test_escaped_injection_attempt_matches_nothing(api: httpx.Client, sb: DynamicsSandbox) -> None:
    sb.store.bulk_load("contact", [{"lastname": "Real"}])
    hostile = "x' or lastname ne 'y"
    assert _names(api, f"lastname eq '{hostile.replace(chr(39), chr(39) * 2)}'") == []
    assert _names(api, "lastname ne 'y'") == ["Real"]


def test_annotations_on_request(api: httpx.Client, sb: DynamicsSandbox) -> None:
    team = str(uuid.uuid4())
    sb.store.bulk_load("team", [{"teamid": team, "name": "Sales EMEA"}])
    sb.store.bulk_load(
        "lead",
        [
            {
                "lastname": "X",
                "leadsourcecode": 8,
                "donotemail": False,
                "_ownerid_value": team,
                "_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname": "team",
            }
        ],
    )
    plain = api.get("leads", params={"$select": "leadsourcecode,_ownerid_value"}).json()["value"][0]
    assert not [k for k in plain if "@" in k and k != "@odata.etag"]
    row = api.get(
        "leads",
        params={"$select": "leadsourcecode,donotemail,_ownerid_value"},
        headers={"Prefer": 'odata.include-annotations="*"'},
    ).json()["value"][0]
    assert row["leadsourcecode@OData.Community.Display.V1.FormattedValue"] == "Web"
    assert row["donotemail@OData.Community.Display.V1.FormattedValue"] == "No"
    assert row["_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "team"
    assert row["_ownerid_value@OData.Community.Display.V1.FormattedValue"] == "Sales EMEA"


# ------------------------------------------------------------------------------------------ change tracking
def test_change_tracking_full_then_delta(api: httpx.Client, sb: DynamicsSandbox) -> None:
    sb.store.bulk_load("lead", _leads(12))
    first = api.get("leads?$select=lastname", headers={"Prefer": "odata.track-changes,odata.maxpagesize=5"})
    assert "odata.track-changes" in first.headers["Preference-Applied"]
    body, rows = first.json(), []
    while "@odata.nextLink" in body:
        assert "@odata.deltaLink" not in body
        rows += body["value"]
        body = api.get(
            body["@odata.nextLink"], headers={"Prefer": "odata.track-changes,odata.maxpagesize=5"}
        ).json()
    rows += body["value"]
    assert len(rows) == 12 and "$deltatoken=" in body["@odata.deltaLink"]
    delta = body["@odata.deltaLink"]
    ids = [r["leadid"] for r in rows]
    sb.store.delete("lead", ids[0])
    sb.store.update("lead", ids[1], {"lastname": "Changed"})
    created = sb.store.insert("lead", {"lastname": "New"})
    temp = sb.store.insert("lead", {"lastname": "Gone soon"})
    sb.store.delete("lead", temp["leadid"])  # created and deleted between pulls: reported as deleted
    changes = api.get(delta).json()
    kinds = [
        ("deleted", v["id"]) if v.get("reason") == "deleted" else ("row", v["leadid"])
        for v in changes["value"]
    ]
    assert kinds == [
        ("row", ids[1]),
        ("row", created["leadid"]),
        ("deleted", ids[0]),
        ("deleted", temp["leadid"]),
    ]
    assert changes["value"][0]["lastname"] == "Changed" and changes["value"][0]["@odata.etag"]
    assert changes["value"][2]["@odata.context"].endswith("$metadata#leads/$deletedEntity")
    again = api.get(changes["@odata.deltaLink"]).json()
    assert again["value"] == [] and "@odata.deltaLink" in again


def test_change_tracking_rejections_and_expiry(api: httpx.Client, sb: DynamicsSandbox, ca: SandboxCA) -> None:
    for option in ("$filter=lastname eq 'x'", "$orderby=lastname", "$top=5"):
        resp = api.get(f"leads?$select=lastname&{option}", headers={"Prefer": "odata.track-changes"})
        assert resp.status_code == 400
        assert "isn't supported when Change Tracking is enabled" in resp.json()["error"]["message"]
    delta = api.get("leads?$select=lastname", headers={"Prefer": "odata.track-changes"}).json()[
        "@odata.deltaLink"
    ]
    assert api.get(delta).status_code == 200
    garbled = api.get("leads?$select=lastname&$deltatoken=garbage!x")
    assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "0x80044352"
    sb.clock.advance(31 * 86400)
    token = _token(sb, ca).json()  # the old access token expired with the clock too
    expired = api.get(delta, headers={"Authorization": f"Bearer {token['access_token']}"})
    assert expired.status_code == 400
    assert (
        expired.json()["error"]["code"] == "0x80044352" and "full sync" in expired.json()["error"]["message"]
    )


# ------------------------------------------------------------------------------------------ writes
def test_create_update_upsert_delete_semantics(api: httpx.Client, sb: DynamicsSandbox) -> None:
    created = api.post("accounts", json={"name": "Acme", "industrycode": 15})
    assert created.status_code == 204
    account_id = created.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    stored = sb.store.get("account", account_id)
    assert stored["_modifiedby_value"] == sb.app_user_id and stored["_ownerid_value"] == sb.app_user_id
    own_id = str(uuid.uuid4())
    rep = api.post(
        "contacts?$select=fullname,_parentcustomerid_value",
        json={
            "contactid": own_id,
            "firstname": "Jo",
            "lastname": "Ng",
            "parentcustomerid_account@odata.bind": f"/accounts({account_id})",
        },
        headers={"Prefer": "return=representation"},
    )
    assert rep.status_code == 201 and rep.json()["contactid"] == own_id and rep.json()["fullname"] == "Jo Ng"
    assert rep.json()["_parentcustomerid_value"] == account_id
    dup = api.post("contacts", json={"contactid": own_id, "lastname": "Again"})
    assert dup.status_code == 412 and dup.json()["error"]["code"] == "0x80040237"
    etag = api.get(f"contacts({own_id})").json()["@odata.etag"]
    assert (
        api.patch(f"contacts({own_id})", json={"jobtitle": "CTO"}, headers={"If-Match": etag}).status_code
        == 204
    )
    stale = api.patch(f"contacts({own_id})", json={"jobtitle": "CEO"}, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert stale.json()["error"]["message"] == (
        "The version of the existing record doesn't match the RowVersion property provided."
    )
    fresh = api.get(f"contacts({own_id})").json()
    assert fresh["jobtitle"] == "CTO" and fresh["@odata.etag"] != etag
    missing = str(uuid.uuid4())
    nope = api.patch(f"contacts({missing})", json={"lastname": "X"}, headers={"If-Match": "*"})
    assert nope.status_code == 404 and missing in nope.json()["error"]["message"]
    assert api.patch(f"contacts({missing})", json={"lastname": "Upserted"}).status_code == 204
    assert sb.store.get("contact", missing)["lastname"] == "Upserted"
    blocked = api.patch(f"contacts({missing})", json={"lastname": "Y"}, headers={"If-None-Match": "*"})
    assert blocked.status_code == 412
    assert blocked.json()["error"]["message"] == "A record with matching key values already exists."
    assert (
        api.patch(
            f"contacts({missing})", json={"ownerid@odata.bind": "/teams(" + str(uuid.uuid4()) + ")"}
        ).status_code
        == 400
    )  # team does not exist
    assert api.delete(f"contacts({missing})").status_code == 204
    assert api.delete(f"contacts({missing})").status_code == 404
    assert api.get(f"contacts({missing})").status_code == 404


@pytest.mark.parametrize(
    "body, code, fragment",
    [
        ({"lastname": "X", "nosuch": 1}, "0x80060888", "'nosuch'"),
        (
            {"lastname": "X", "_parentcustomerid_value": str(uuid.uuid4())},
            "0x80060888",
            "'_parentcustomerid_value'",
        ),
        (
            {"lastname": "X" * 51},
            "0x80044331",
            "'lastname' attribute of the 'contact' entity exceeded the maximum allowed length of '50'",
        ),
        ({"lastname": "X", "mkt_leadscore": "ten"}, "0x80048d19", "mkt_leadscore"),
        ({"lastname": "X", "donotemail": "yes"}, "0x80048d19", "donotemail"),
        (
            {"lastname": "X", "preferredcontactmethodcode": 99},
            "0x8004431A",
            "value 99 of 'preferredcontactmethodcode'",
        ),
        ({"firstname": "NoLast"}, "0x80040203", "'lastname'"),
        (
            {"lastname": "X", "parentcustomerid_account@odata.bind": "/contacts(" + str(uuid.uuid4()) + ")"},
            "0x80048d19",
            "cannot point to a 'contact'",
        ),
    ],
)
def test_write_validation(
    api: httpx.Client, sb: DynamicsSandbox, body: dict, code: str, fragment: str
) -> None:
    resp = api.post("contacts", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == code and fragment in resp.json()["error"]["message"]
    assert sb.store.count("contact") == 0


def test_qualify_lead(api: httpx.Client, sb: DynamicsSandbox) -> None:
    lead = sb.store.insert(
        "lead",
        {
            "lastname": "Lee",
            "firstname": "Ada",
            "companyname": "Lee Ltd",
            "subject": "Big deal",
            "statecode": 0,
            "statuscode": 1,
        },
    )
    resp = api.post(
        f"leads({lead['leadid']})/Microsoft.Dynamics.CRM.QualifyLead",
        json={"CreateAccount": True, "CreateContact": True, "CreateOpportunity": True, "Status": 3},
    )
    assert resp.status_code == 200
    made = {v["@odata.type"]: v for v in resp.json()["value"]}
    assert set(made) == {
        "#Microsoft.Dynamics.CRM.account",
        "#Microsoft.Dynamics.CRM.contact",
        "#Microsoft.Dynamics.CRM.opportunity",
    }
    contact = sb.store.get("contact", made["#Microsoft.Dynamics.CRM.contact"]["contactid"])
    opp = sb.store.get("opportunity", made["#Microsoft.Dynamics.CRM.opportunity"]["opportunityid"])
    assert contact["_originatingleadid_value"] == lead["leadid"] and contact["fullname"] == "Ada Lee"
    assert opp["_originatingleadid_value"] == lead["leadid"] and opp["name"] == "Big deal"
    closed = sb.store.get("lead", lead["leadid"])
    assert (closed["statecode"], closed["statuscode"]) == (1, 3)
    again = api.post(
        f"leads({lead['leadid']})/Microsoft.Dynamics.CRM.QualifyLead",
        json={"CreateAccount": False, "CreateContact": True, "CreateOpportunity": False},
    )
    assert again.status_code == 400 and "closed" in again.json()["error"]["message"]
    assert sb.store.count("contact") == 1


def test_upsert_multiple_is_all_or_nothing(api: httpx.Client, sb: DynamicsSandbox) -> None:
    existing = sb.store.insert("account", {"name": "Old"})
    new_id = str(uuid.uuid4())
    url = "accounts/Microsoft.Dynamics.CRM.UpsertMultiple"
    kind = "Microsoft.Dynamics.CRM.account"
    bad = api.post(
        url,
        json={
            "Targets": [
                {"@odata.type": kind, "accountid": new_id, "name": "New"},
                {"@odata.type": kind, "accountid": existing["accountid"], "name": "Y" * 200},
            ]
        },
    )
    assert bad.status_code == 400 and "Targets[1]" in bad.json()["error"]["message"]
    assert (
        sb.store.get("account", new_id) is None
        and sb.store.get("account", existing["accountid"])["name"] == "Old"
    )
    ok = api.post(
        url,
        json={
            "Targets": [
                {"@odata.type": kind, "accountid": new_id, "name": "New"},
                {"@odata.type": kind, "@odata.id": f"accounts({existing['accountid']})", "name": "Renamed"},
            ]
        },
    )
    assert ok.status_code == 204
    assert sb.store.get("account", new_id)["name"] == "New"
    assert sb.store.get("account", existing["accountid"])["name"] == "Renamed"
    ids = api.post(
        "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        json={"Targets": [{"@odata.type": kind, "name": "C1"}, {"@odata.type": kind, "name": "C2"}]},
    )
    assert ids.status_code == 200 and len(ids.json()["Ids"]) == 2


# ------------------------------------------------------------------------------------------ batch
def _batch_body(parts: list[str], boundary: str = "batch_x") -> str:
    return "".join(f"--{boundary}\r\n{p}\r\n" for p in parts) + f"--{boundary}--\r\n"


def _http_part(method: str, url: str, body: str = "", content_id: str | None = None) -> str:
    cid = f"Content-ID: {content_id}\r\n" if content_id else ""
    return (
        f"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n{cid}\r\n"
        f"{method} {url} HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{body}"
    )


def _changeset(parts: list[str]) -> str:
    return "Content-Type: multipart/mixed; boundary=changeset_y\r\n\r\n" + _batch_body(parts, "changeset_y")


def test_batch_changeset_with_content_id_reference(api: httpx.Client, sb: DynamicsSandbox) -> None:
    base = f"{sb.api_url}/api/data/v9.2/"
    body = _batch_body(
        [
            _changeset(
                [
                    _http_part("POST", base + "accounts", '{"name":"Batch Co"}', "1"),
                    _http_part(
                        "POST",
                        base + "contacts",
                        '{"lastname":"Ref","parentcustomerid_account@odata.bind":"$1"}',
                        "2",
                    ),
                    _http_part("PATCH", "$1", '{"telephone1":"555"}', "3"),
                ]
            ),
            _http_part("GET", base + "accounts?$select=name,telephone1"),
        ]
    )
    resp = api.post("$batch", content=body, headers={"Content-Type": "multipart/mixed; boundary=batch_x"})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith(
        "multipart/mixed; boundary=batchresponse_"
    )
    assert resp.text.count("HTTP/1.1 204 No Content") == 3 and "HTTP/1.1 200 OK" in resp.text
    account = next(sb.store.rows("account"))
    contact = next(sb.store.rows("contact"))
    assert account["telephone1"] == "555" and contact["_parentcustomerid_value"] == account["accountid"]
    assert '"name":"Batch Co"' in resp.text
    assert sb.api_app.calls["dynamics.create"] == 2 and sb.api_app.calls["dynamics.update"] == 1


def test_batch_changeset_rolls_back_and_continue_on_error(api: httpx.Client, sb: DynamicsSandbox) -> None:
    base = f"{sb.api_url}/api/data/v9.2/"
    failing_set = _changeset(
        [
            _http_part("POST", base + "accounts", '{"name":"Kept?"}', "1"),
            _http_part("POST", base + "accounts", '{"bogus":1}', "2"),
        ]
    )
    later = _http_part("POST", base + "accounts", '{"name":"After"}')
    stop = api.post(
        "$batch",
        content=_batch_body([failing_set, later]),
        headers={"Content-Type": "multipart/mixed; boundary=batch_x"},
    )
    assert stop.status_code == 400 and "'bogus'" in stop.text
    assert sb.store.count("account") == 0  # rolled back, and processing stopped
    go_on = api.post(
        "$batch",
        content=_batch_body([failing_set, later]),
        headers={"Content-Type": "multipart/mixed; boundary=batch_x", "Prefer": "odata.continue-on-error"},
    )
    assert go_on.status_code == 200 and "HTTP/1.1 400" in go_on.text and "HTTP/1.1 204" in go_on.text
    assert [r["name"] for r in sb.store.rows("account")] == ["After"]
    undefined = _changeset([_http_part("PATCH", "$9", '{"name":"x"}', "1")])
    bad_ref = api.post(
        "$batch",
        content=_batch_body([undefined]),
        headers={"Content-Type": "multipart/mixed; boundary=batch_x"},
    )
    assert bad_ref.status_code == 400 and "$9" in bad_ref.text


# ------------------------------------------------------------------------------------------ faults, limits
def test_faults_render_in_dataverse_shapes(api: httpx.Client, sb: DynamicsSandbox) -> None:
    sb.api_app.faults.add("dynamics.whoami", 1.0, Fault("throttle", seconds=7), count=1)
    throttled = api.get("WhoAmI")
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
    assert throttled.json()["error"]["code"] == "0x80072322"
    sb.api_app.faults.add("dynamics.whoami", 1.0, Fault("unauthorized"), count=1)
    unauthorized = api.get("WhoAmI")
    assert unauthorized.status_code == 401 and "WWW-Authenticate" in unauthorized.headers
    sb.api_app.faults.add("dynamics.whoami", 1.0, Fault("status", status=503), count=1)
    unavailable = api.get("WhoAmI")
    assert unavailable.status_code == 503 and unavailable.json()["error"]["code"] == "0x80040216"
    assert api.get("WhoAmI").status_code == 200
    assert sb.api_app.faults.total_injected == 3


def test_service_protection_limits(ca: SandboxCA) -> None:
    sandbox = _start(ca, limits={"requests_per_window": 3, "window_seconds": 300})
    try:
        token = _token(sandbox, ca).json()["access_token"]
        with httpx.Client(
            base_url=f"{sandbox.api_url}/api/data/v9.2/",
            verify=str(ca.ca_path),
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            assert [client.get("WhoAmI").status_code for _ in range(3)] == [200, 200, 200]
            limited = client.get("WhoAmI")
            assert limited.status_code == 429 and limited.json()["error"]["code"] == "0x80072322"
            assert (
                "6000" not in limited.json()["error"]["message"]
                and "limit of 3" in limited.json()["error"]["message"]
            )
            assert 1 <= int(limited.headers["Retry-After"]) <= 300
            sandbox.clock.advance(301)
            assert client.get("WhoAmI").status_code == 200
    finally:
        sandbox.stop()
