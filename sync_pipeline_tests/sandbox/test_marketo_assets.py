"""Contract tests of the Marketo sandbox's Asset API read side, list/campaign views, the ``_method=GET``
override and the generated history, written from Adobe's Marketo Engage developer documentation:

- Assets (by id, by name, browse with offset/maxReturn <= 200, the empty answer):
  https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/assets/assets
- Programs, folders, tokens, smart campaigns, static lists, emails, segmentations: the pages under .../rest/assets/
- Static list membership and campaigns: .../rest/lead-database/static-lists, .../rest/lead-database/campaigns
- Leads / companies / opportunities / custom objects query with POST and _method=GET: .../rest/lead-database/
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from sync_pipeline.sandbox.generator import populate
from sync_pipeline.sandbox.marketo import MarketoSandbox

NO_ASSETS = "No assets found for the given search criteria."
NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


@pytest.fixture(scope="module")
def sb() -> Iterator[MarketoSandbox]:
    sandbox = MarketoSandbox().start()
    populate(None, sandbox.store, "tiny", seed=3, now=NOW)
    yield sandbox
    sandbox.stop()


@pytest.fixture(scope="module")
def http(sb: MarketoSandbox) -> Iterator[httpx.Client]:
    token = httpx.post(
        f"{sb.base_url}/identity/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sb.client_id,
            "client_secret": sb.client_secret,
        },
    ).json()["access_token"]
    with httpx.Client(base_url=sb.base_url, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


def _get(http: httpx.Client, path: str, **params: Any) -> Any:
    resp = http.get(path, params=params)
    assert resp.status_code == 200
    return resp.json()


def _empty(body: Any) -> bool:
    return body["success"] is True and "result" not in body and body["warnings"] == [NO_ASSETS]


def test_method_get_override_in_the_form_body_and_the_query_string(
    sb: MarketoSandbox, http: httpx.Client
) -> None:
    lead = next(p for p in sb.store.leads() if p.get("email"))
    form = {
        "_method": "GET",
        "filterType": "email",
        "filterValues": lead["email"],
        "fields": "email,firstName",
    }
    in_body = http.post("/rest/v1/leads.json", data=form).json()
    assert in_body["success"] is True and in_body["result"][0]["id"] == lead["id"]
    in_query = http.post(
        "/rest/v1/leads.json",
        params={"_method": "GET"},
        data={k: v for k, v in form.items() if k != "_method"},
    ).json()
    assert in_query["result"] == in_body["result"]
    # Every endpoint with a GET form: companies, opportunities, roles, sales persons, custom objects.
    for path, key, value in (
        ("/rest/v1/companies.json", "externalCompanyId", "C-none"),
        ("/rest/v1/opportunities.json", "externalOpportunityId", "O-none"),
        ("/rest/v1/opportunities/roles.json", "externalOpportunityId", "O-none"),
        ("/rest/v1/salespersons.json", "externalSalesPersonId", "S-none"),
        ("/rest/v1/customobjects/project_c.json", "projectId", "P-none"),
    ):
        body = http.post(path, data={"_method": "GET", "filterType": key, "filterValues": value}).json()
        assert body["success"] is True and body["result"] == [], (path, body)
        write = http.post(
            path, data={"filterType": key, "filterValues": value}
        ).json()  # no override: a write
        assert write["success"] is False, path
    assert sb.app.calls["marketo.leads.get"] == 2 and sb.app.calls["marketo.leads.sync"] == 0


def test_programs_browse_window_by_id_by_name_and_empty(http: httpx.Client) -> None:
    programs = _get(http, "/rest/asset/v1/programs.json", maxReturn=200)
    assert programs["success"] is True and programs["warnings"] == [] and len(programs["result"]) >= 3
    first = programs["result"][0]
    assert {
        "id",
        "name",
        "type",
        "channel",
        "folder",
        "status",
        "workspace",
        "createdAt",
        "updatedAt",
    } <= set(first)
    assert len(_get(http, "/rest/asset/v1/programs.json", maxReturn=1)["result"]) == 1
    assert (
        _get(http, "/rest/asset/v1/programs.json")["result"] == programs["result"][:20]
    )  # maxReturn defaults 20
    too_many = _get(http, "/rest/asset/v1/programs.json", maxReturn=201)
    assert too_many["success"] is False
    assert _empty(_get(http, "/rest/asset/v1/programs.json", offset=1000))
    stamps = sorted(p["updatedAt"] for p in programs["result"])
    window = _get(
        http,
        "/rest/asset/v1/programs.json",
        earliestUpdatedAt=stamps[1],
        latestUpdatedAt=stamps[-1],
        maxReturn=200,
    )
    assert sorted(p["updatedAt"] for p in window["result"]) == stamps[1:]
    assert _empty(_get(http, "/rest/asset/v1/programs.json", earliestUpdatedAt="2099-01-01T00:00:00Z"))
    assert _get(http, f"/rest/asset/v1/program/{first['id']}.json")["result"] == [first]
    assert _get(http, "/rest/asset/v1/program/byName.json", name=first["name"])["result"] == [first]
    assert _empty(_get(http, "/rest/asset/v1/program/999999.json"))
    assert _empty(_get(http, "/rest/asset/v1/program/byName.json", name="No such program"))


def test_folders_tokens_campaigns_lists_emails_segmentations(sb: MarketoSandbox, http: httpx.Client) -> None:
    folders = _get(http, "/rest/asset/v1/folders.json", maxReturn=200)["result"]
    assert folders[0]["name"] == "Marketing Activities" and folders[0]["folderType"] == "Marketing Folder"
    program = _get(http, "/rest/asset/v1/programs.json")["result"][0]
    tokens = _get(http, f"/rest/asset/v1/folder/{program['id']}/tokens.json", folderType="Program")["result"][
        0
    ]
    assert tokens["folderType"] == "Program" and {t["name"] for t in tokens["tokens"]} >= {"my.Subject Line"}
    unknown = _get(http, "/rest/asset/v1/folder/999999/tokens.json", folderType="Program")
    assert unknown["success"] is False and unknown["errors"][0]["code"] == "702"
    campaigns = _get(http, "/rest/asset/v1/smartCampaigns.json", maxReturn=200)["result"]
    assert {c["type"] for c in campaigns} == {"batch", "trigger"}
    one = _get(http, f"/rest/asset/v1/smartCampaign/{campaigns[0]['id']}.json")["result"][0]
    assert one["parentProgramId"] == campaigns[0]["parentProgramId"]
    lead_db = _get(http, "/rest/v1/campaigns.json", batchSize=300)["result"]
    assert {c["id"] for c in lead_db} == {c["id"] for c in campaigns}
    lists = _get(http, "/rest/asset/v1/staticLists.json")["result"]
    members = _get(
        http, f"/rest/v1/lists/{lists[0]['id']}/leads.json", fields="email,firstName", batchSize=300
    )
    assert members["success"] is True and members["result"]
    member_id = members["result"][0]["id"]
    assert sb.store.get_lead(member_id) is not None
    check = _get(http, f"/rest/v1/lists/{lists[0]['id']}/leads/ismember.json", id=f"{member_id},999999")[
        "result"
    ]
    assert [c["status"] for c in check] == ["memberof", "notmemberof"]
    missing = _get(http, "/rest/v1/lists/999999/leads.json")
    assert missing["success"] is False and missing["errors"][0]["code"] == "1013"
    paged = _get(http, f"/rest/v1/lists/{lists[0]['id']}/leads.json", batchSize=2)
    assert len(paged["result"]) == 2 and "nextPageToken" in paged
    emails = _get(http, "/rest/asset/v1/emails.json", status="approved", maxReturn=200)["result"]
    assert emails and all(e["status"] == "approved" for e in emails)
    segs = _get(http, "/rest/asset/v1/segmentation.json")["result"]
    assert [s["name"] for s in segs] == ["Region", "Company Size"]
    segments = _get(http, f"/rest/asset/v1/segmentation/{segs[0]['id']}/segments.json")["result"]
    assert [s["name"] for s in segments] == ["Americas", "EMEA", "APAC"]


def test_generated_persons_have_their_activity_history(sb: MarketoSandbox, http: httpx.Client) -> None:
    persons = list(sb.store.leads())
    token = _get(http, "/rest/v1/activities/pagingtoken.json", sinceDatetime="2000-01-01T00:00:00Z")[
        "nextPageToken"
    ]
    seen: list[dict[str, Any]] = []
    while True:
        page = _get(http, "/rest/v1/activities.json", nextPageToken=token, activityTypeIds="12,13")
        seen += page.get("result", [])
        token = page["nextPageToken"]
        if not page["moreResult"]:
            break
    new_leads = [a for a in seen if a["activityTypeId"] == 12]
    assert sorted(a["leadId"] for a in new_leads) == sorted(p["id"] for p in persons)
    for a in new_leads:
        assert a["activityDate"] == sb.store.get_lead(a["leadId"])["createdAt"]
    changes = [a for a in seen if a["activityTypeId"] == 13]
    edited = [p for p in persons if p["updatedAt"] != p["createdAt"]]
    assert len(changes) == len(edited) > 0
    dates = [a["activityDate"] for a in seen]
    assert dates == sorted(dates)
    types = {t["id"]: t["name"] for t in _get(http, "/rest/v1/activities/types.json")["result"]}
    assert types[12] == "New Lead" and types[13] == "Change Data Value"
    changed = _get(
        http,
        "/rest/v1/activities/leadchanges.json",
        fields="leadScore",
        nextPageToken=_get(
            http, "/rest/v1/activities/pagingtoken.json", sinceDatetime="2000-01-01T00:00:00Z"
        )["nextPageToken"],
    )
    first_change = next(a for a in changed["result"] if a["activityTypeId"] == 13)
    assert first_change["fields"][0]["name"] == "leadScore"


def test_generation_is_deterministic_per_seed() -> None:
    def snapshot(seed: int) -> tuple[Any, ...]:
        sandbox = MarketoSandbox()
        populate(None, sandbox.store, "tiny", seed=seed, now=NOW)
        acts = [(a["leadId"], a["activityTypeId"], a["activityDate"]) for a in sandbox.store.activities.items]
        return acts, sandbox.store.assets.browse("program"), sandbox.store.assets.members

    assert snapshot(5) == snapshot(5)
    assert snapshot(5) != snapshot(6)
