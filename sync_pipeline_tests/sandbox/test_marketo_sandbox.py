"""Wire-level tests of the Marketo sandbox with raw httpx: what any Marketo client would see."""

from __future__ import annotations

import csv
import hashlib
import io
import threading
from datetime import timedelta

import httpx
import pytest

from sync_pipeline.sandbox.clock import Clock, iso
from sync_pipeline.sandbox.faults import Fault
from sync_pipeline.sandbox.marketo import MarketoSandbox, MarketoStore, StoreError


@pytest.fixture
def sandbox():
    sb = MarketoSandbox().start()
    yield sb
    sb.stop()


def token_of(sb: MarketoSandbox) -> str:
    r = httpx.post(
        f"{sb.base_url}/identity/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sb.client_id,
            "client_secret": sb.client_secret,
        },
    )
    assert r.status_code == 200
    return r.json()["access_token"]


class Api:
    def __init__(self, sb: MarketoSandbox):
        self.sb = sb
        self.http = httpx.Client(base_url=sb.base_url, headers={"Authorization": f"Bearer {token_of(sb)}"})

    def get(self, path: str, **params):
        return self.http.get(path, params=params).json()

    def post(self, path: str, body=None, **params):
        return self.http.post(path, json=body, params=params).json()


@pytest.fixture
def api(sandbox):
    return Api(sandbox)


def codes(body) -> list[str]:
    return [e["code"] for e in body.get("errors", [])]


# ---------------------------------------------------------------------- identity and auth
def test_token_by_get_and_post_is_the_same_and_counts_down(sandbox):
    creds = {
        "grant_type": "client_credentials",
        "client_id": sandbox.client_id,
        "client_secret": sandbox.client_secret,
    }
    first = httpx.get(f"{sandbox.base_url}/identity/oauth/token", params=creds).json()
    assert first["token_type"] == "bearer" and first["scope"] == "sync-api@sandbox.example"
    assert first["access_token"].endswith(":ab") and first["expires_in"] == 3600
    sandbox.clock.advance(600)
    second = httpx.post(f"{sandbox.base_url}/identity/oauth/token", data=creds).json()
    assert second["access_token"] == first["access_token"]
    assert 2990 <= second["expires_in"] <= 3000


def test_bad_credentials_are_http_401(sandbox):
    r = httpx.post(
        f"{sandbox.base_url}/identity/oauth/token",
        data={"grant_type": "client_credentials", "client_id": sandbox.client_id, "client_secret": "wrong"},
    )
    assert r.status_code == 401
    assert r.json() == {"error": "unauthorized", "error_description": "Bad client credentials"}


def test_missing_invalid_and_expired_tokens():
    sb = MarketoSandbox(token_lifetime=30).start()
    try:
        url = f"{sb.base_url}/rest/v1/leads/describe2.json"
        missing = httpx.get(url)
        assert missing.status_code == 200 and missing.json()["success"] is False
        assert codes(missing.json()) == ["601"] and missing.json()["requestId"]
        assert codes(httpx.get(url, headers={"Authorization": "Bearer nope:ab"}).json()) == ["601"]
        token = token_of(sb)
        assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).json()["success"] is True
        sb.clock.advance(31)
        assert codes(httpx.get(url, headers={"Authorization": f"Bearer {token}"}).json()) == ["602"]
        fresh = token_of(sb)
        assert fresh != token
        assert httpx.get(url, headers={"Authorization": f"Bearer {fresh}"}).json()["success"] is True
    finally:
        sb.stop()


# ---------------------------------------------------------------------- limits
def test_rate_limit_606_and_window_recovery(sandbox, api):
    sandbox.set_limits({"calls_per_window": 5, "window_seconds": 20})
    bodies = [api.get("/rest/v1/activities/types.json") for _ in range(6)]
    assert [b["success"] for b in bodies] == [True] * 5 + [False]
    assert bodies[-1]["errors"][0] == {
        "code": "606",
        "message": "Max rate limit '5' exceeded with in '20' secs",
    }
    sandbox.clock.advance(21)
    assert api.get("/rest/v1/activities/types.json")["success"] is True


def test_invalid_token_calls_are_not_counted(sandbox, api):
    sandbox.set_limits({"daily_quota": 2})
    for _ in range(5):
        assert codes(httpx.get(f"{sandbox.base_url}/rest/v1/activities/types.json").json()) == ["601"]
    assert api.get("/rest/v1/activities/types.json")["success"] is True
    assert api.get("/rest/v1/activities/types.json")["success"] is True
    assert codes(api.get("/rest/v1/activities/types.json")) == ["607"]
    sandbox.clock.advance(86_400)  # the quota resets at midnight US Central (the old token expired meanwhile)
    assert Api(sandbox).get("/rest/v1/activities/types.json")["success"] is True


def test_concurrency_limit_615(sandbox, api):
    sandbox.set_limits({"concurrent": 1, "latency_seconds": 0.4})
    results: list[dict] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                httpx.get(
                    f"{sandbox.base_url}/rest/v1/activities/types.json", headers=api.http.headers
                ).json()
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["success"] for r in results) == [False, False, True]
    assert {c for r in results for c in codes(r)} == {"615"}
    sandbox.set_limits(None)
    assert sandbox.gate.in_flight == 0


def test_unknown_limit_setting_is_named():
    with pytest.raises(ValueError, match="calls_per_windw"):
        MarketoSandbox(limits={"calls_per_windw": 5})


# ---------------------------------------------------------------------- leads
def test_describe_and_describe2(api):
    d2 = api.get("/rest/v1/leads/describe2.json")["result"][0]
    assert ["dynamicsId"] in d2["searchableFields"] and ["email"] in d2["searchableFields"]
    email = next(f for f in d2["fields"] if f["name"] == "email")
    assert email == {
        "name": "email",
        "displayName": "Email Address",
        "dataType": "email",
        "length": 255,
        "updateable": True,
        "crmManaged": False,
    }
    d1 = api.get("/rest/v1/leads/describe.json")["result"]
    assert any(f["rest"] == {"name": "id", "readOnly": True} for f in d1)


def test_sync_leads_record_level_codes(api):
    ok = api.post("/rest/v1/leads.json", {"input": [{"email": "ann@example.com", "firstName": "Ann"}]})
    ann = ok["result"][0]
    assert ann["status"] == "created" and isinstance(ann["id"], int)
    body = api.post(
        "/rest/v1/leads.json",
        {
            "action": "createOrUpdate",
            "input": [
                {"email": "ANN@example.com", "lastName": "Lee"},  # case-insensitive match -> updated
                {"email": "b@example.com", "leadScore": "ten"},
                {"email": "c@example.com", "unsubscribed": "maybe"},
                {"email": "d@example.com", "dynamicsCreatedDate": "yesterday"},
                {"email": "jöhn@example.com"},
                {"email": "e@example.com", "firstName": "x" * 256},
                {"email": "f@example.com", "noSuchField": 1},
                {"email": "ann@example.com", "firstName": "dup"},
                {"email": "g@example.com", "leadScore": "42", "doNotCall": "true"},
            ],
        },
    )
    r = body["result"]
    assert r[0] == {"id": ann["id"], "status": "updated"}
    assert [x["reasons"][0]["code"] for x in r[1:8]] == ["1001"] * 5 + ["1006", "1036"]
    assert "leadScore" in r[1]["reasons"][0]["message"]
    assert r[5]["reasons"][0]["message"] == "Value for field 'firstName' exceeds max length 255"
    assert r[8]["status"] == "created"
    g = api.get(f"/rest/v1/lead/{r[8]['id']}.json", fields="leadScore,doNotCall")["result"][0]
    assert g["leadScore"] == 42 and g["doNotCall"] is True

    only = api.post("/rest/v1/leads.json", {"action": "createOnly", "input": [{"email": "ann@example.com"}]})
    assert only["result"][0]["reasons"][0]["code"] == "1005"
    upd = api.post(
        "/rest/v1/leads.json", {"action": "updateOnly", "input": [{"email": "nobody@example.com"}]}
    )
    assert upd["result"][0]["reasons"][0]["code"] == "1004"
    api.post("/rest/v1/leads.json", {"action": "createDuplicate", "input": [{"email": "ann@example.com"}]})
    multi = api.post("/rest/v1/leads.json", {"input": [{"email": "ann@example.com", "firstName": "Z"}]})
    assert multi["result"][0]["reasons"][0]["code"] == "1007"
    by_id = api.post(
        "/rest/v1/leads.json",
        {"action": "updateOnly", "lookupField": "id", "input": [{"id": ann["id"], "title": "CTO"}]},
    )
    assert by_id["result"][0] == {"id": ann["id"], "status": "updated"}
    bad_id = api.post("/rest/v1/leads.json", {"lookupField": "id", "input": [{"id": ann["id"]}]})
    assert bad_id["result"][0]["reasons"][0]["code"] == "1003"
    assert codes(
        api.post("/rest/v1/leads.json", {"lookupField": "firstName", "input": [{"firstName": "a"}]})
    ) == ["1011"]
    too_many = api.post("/rest/v1/leads.json", {"input": [{"email": f"{i}@x.com"} for i in range(301)]})
    assert codes(too_many) == ["1003"]
    bad_json = api.http.post(
        "/rest/v1/leads.json", content=b"{oops", headers={"Content-Type": "application/json"}
    ).json()
    assert codes(bad_json) == ["609"]


def test_query_leads_filters_paging_and_limits(sandbox, api):
    sandbox.store.bulk_load(
        "lead",
        (
            {
                "email": f"p{i}@example.com",
                "dynamicsId": f"00000000-0000-0000-0000-{i:012d}",
                "externalCompanyId": "big" if i < 1001 else "small",
            }
            for i in range(1100)
        ),
    )
    ids = [f"00000000-0000-0000-0000-{i:012d}" for i in (3, 5, 7)]
    body = api.get(
        "/rest/v1/leads.json",
        filterType="dynamicsId",
        filterValues=",".join(ids),
        fields="email,dynamicsId",
        batchSize=2,
    )
    assert [r["dynamicsId"] for r in body["result"]] == ids[:2] and body["nextPageToken"]
    rest = api.get(
        "/rest/v1/leads.json",
        filterType="dynamicsId",
        filterValues=",".join(ids),
        fields="email,dynamicsId",
        batchSize=2,
        nextPageToken=body["nextPageToken"],
    )
    assert [r["dynamicsId"] for r in rest["result"]] == ids[2:] and "nextPageToken" not in rest
    default = api.get("/rest/v1/leads.json", filterType="email", filterValues="P3@EXAMPLE.COM")["result"][0]
    assert set(default) == {"id", "email", "updatedAt", "createdAt", "firstName", "lastName"}
    assert codes(api.get("/rest/v1/leads.json", filterType="externalCompanyId", filterValues="big")) == [
        "1003"
    ]
    assert (
        len(api.get("/rest/v1/leads.json", filterType="externalCompanyId", filterValues="small")["result"])
        == 99
    )
    assert codes(api.get("/rest/v1/leads.json", filterType="firstName", filterValues="x")) == ["1011"]
    assert codes(
        api.get(
            "/rest/v1/leads.json", filterType="email", filterValues=",".join(f"{i}@x.com" for i in range(301))
        )
    ) == ["1003"]
    assert codes(
        api.get("/rest/v1/leads.json", filterType="email", filterValues="a@x.com", fields="nope")
    ) == ["1006"]
    posted = api.http.post(
        "/rest/v1/leads.json",
        params={"_method": "GET"},
        data={"filterType": "dynamicsId", "filterValues": ",".join(ids)},
    ).json()
    assert len(posted["result"]) == 3 and sandbox.app.calls["marketo.leads.get"] == 9


# ---------------------------------------------------------------------- activities
def test_lead_changes_paging_tokens_survive_restart(sandbox, api):
    store = sandbox.store
    t0 = api.get(
        "/rest/v1/activities/pagingtoken.json", sinceDatetime=iso(store.clock.now() - timedelta(seconds=5))
    )
    created = api.post("/rest/v1/leads.json", {"input": [{"email": "x@example.com", "firstName": "X"}]})
    lead_id = created["result"][0]["id"]
    store.update_lead(lead_id, {"firstName": "Y", "title": "VP"}, source="UI")  # a marketer edits in the UI
    first = api.get(
        "/rest/v1/activities/leadchanges.json",
        nextPageToken=t0["nextPageToken"],
        fields="firstName",
        batchSize=1,
    )
    assert first["moreResult"] is True and len(first["result"]) == 1
    new_lead = first["result"][0]
    assert new_lead["activityTypeId"] == 12 and new_lead["leadId"] == lead_id and new_lead["marketoGUID"]
    assert {"name": "Source", "value": "Web service API"} in new_lead["attributes"]

    sandbox.stop()  # tokens encode a position in the store's log: a restarted server honours them
    sandbox.start()
    api2 = Api(sandbox)
    second = api2.get(
        "/rest/v1/activities/leadchanges.json",
        nextPageToken=first["nextPageToken"],
        fields="firstName",
        batchSize=1,
    )
    change = second["result"][0]
    assert change["activityTypeId"] == 13
    assert change["fields"] == [
        {"id": change["fields"][0]["id"], "name": "firstName", "newValue": "Y", "oldValue": "X"}
    ]
    assert {"name": "Source", "value": "Person Details Page"} in change["attributes"]
    assert len(change["activityDate"]) == 20 and change["activityDate"].endswith("Z")
    tail = api2.get(
        "/rest/v1/activities/leadchanges.json", nextPageToken=second["nextPageToken"], fields="firstName"
    )
    assert tail["moreResult"] is False and "result" not in tail  # the title change is not a requested field
    again = api2.get(
        "/rest/v1/activities/leadchanges.json",
        nextPageToken=first["nextPageToken"],
        fields="firstName",
        batchSize=1,
    )
    assert again["result"] == second["result"]  # stable: the same token reads the same page
    assert codes(api2.get("/rest/v1/activities/leadchanges.json", nextPageToken="!!bad", fields="email")) == [
        "1003"
    ]
    assert codes(api2.get("/rest/v1/activities/leadchanges.json", nextPageToken=t0["nextPageToken"])) == [
        "1003"
    ]


def test_deleted_leads_merge_and_activities(sandbox, api):
    ids = [
        r["id"]
        for r in api.post(
            "/rest/v1/leads.json",
            {
                "input": [
                    {"email": "w@example.com", "firstName": "Win"},
                    {"email": "l1@example.com", "title": "CEO"},
                    {"email": "l2@example.com", "phone": "555"},
                    {"email": "gone@example.com"},
                ]
            },
        )["result"]
    ]
    token = api.get("/rest/v1/activities/pagingtoken.json", sinceDatetime="2000-01-01T00:00:00Z")[
        "nextPageToken"
    ]
    assert codes(
        api.post(f"/rest/v1/leads/{ids[0]}/merge.json", leadIds=",".join(str(i) for i in range(1, 27)))
    ) == ["1080"]
    assert api.post(f"/rest/v1/leads/{ids[0]}/merge.json", leadIds=f"{ids[1]},{ids[2]}")["success"] is True
    winner = sandbox.store.get_lead(ids[0])
    assert winner["firstName"] == "Win" and winner["title"] == "CEO" and winner["phone"] == "555"
    assert sandbox.store.get_lead(ids[1]) is None and sandbox.store.count("lead") == 2
    deleted = api.post("/rest/v1/leads/delete.json", {"input": [{"id": ids[3]}, {"id": 99999}]})["result"]
    assert deleted[0] == {"id": ids[3], "status": "deleted"} and deleted[1]["reasons"][0]["code"] == "1004"
    dl = api.get("/rest/v1/activities/deletedleads.json", nextPageToken=token)
    assert [(a["leadId"], a["activityTypeId"]) for a in dl["result"]] == [(ids[3], 37)]
    merges = api.get("/rest/v1/activities.json", nextPageToken=token, activityTypeIds="32")["result"]
    assert merges[0]["leadId"] == ids[0]
    assert {"name": "Merge ids", "value": f"{ids[1]},{ids[2]}"} in merges[0]["attributes"]
    types = {t["id"]: t["name"] for t in api.get("/rest/v1/activities/types.json")["result"]}
    assert types[12] == "New Lead" and types[13] == "Change Data Value" and types[37] == "Delete Lead"


# ---------------------------------------------------------------------- bulk
def test_bulk_lead_export_lifecycle(sandbox, api):
    sandbox.store.bulk_load(
        "lead", [{"email": "a@example.com", "firstName": "A"}, {"email": "b@example.com"}]
    )
    now = sandbox.clock.now()
    too_long = {"createdAt": {"startAt": iso(now - timedelta(days=40)), "endAt": iso(now)}}
    assert codes(
        api.post("/bulk/v1/leads/export/create.json", {"fields": ["email"], "filter": too_long})
    ) == ["1003"]
    flt = {"createdAt": {"startAt": iso(now - timedelta(days=1)), "endAt": iso(now + timedelta(minutes=1))}}
    job = api.post(
        "/bulk/v1/leads/export/create.json",
        {"fields": ["id", "email", "firstName"], "format": "CSV", "filter": flt},
    )["result"][0]
    assert job["status"] == "Created"
    eid = job["exportId"]
    assert api.http.get(f"/bulk/v1/leads/export/{eid}/file.json").status_code == 404
    api.post(f"/bulk/v1/leads/export/{eid}/enqueue.json")
    status = api.get(f"/bulk/v1/leads/export/{eid}/status.json")["result"][0]
    assert status["status"] == "Completed" and status["numberOfRecords"] == 2
    content = api.http.get(f"/bulk/v1/leads/export/{eid}/file.json").content
    assert (
        hashlib.sha256(content).hexdigest() == status["fileChecksum"] and len(content) == status["fileSize"]
    )
    rows = list(csv.reader(io.StringIO(content.decode())))
    assert rows[0] == ["id", "email", "firstName"] and rows[2][2] == "null"
    part = api.http.get(f"/bulk/v1/leads/export/{eid}/file.json", headers={"Range": "bytes=0-1"})
    assert part.status_code == 206 and part.content == content[:2]
    assert [j["exportId"] for j in api.get("/bulk/v1/leads/export.json", status="Completed")["result"]] == [
        eid
    ]
    again = api.post(f"/bulk/v1/leads/export/{eid}/enqueue.json")
    assert codes(again) == ["1029"]


def test_bulk_export_queue_limit_and_daily_quota(sandbox, api):
    sandbox.set_limits(
        {
            "bulk_concurrent_jobs": 2,
            "bulk_queued_jobs": 3,
            "bulk_processing_seconds": 60,
            "bulk_export_daily_mb": 0.000001,
        }
    )
    sandbox.store.bulk_load("lead", [{"email": "a@example.com"}])
    now = sandbox.clock.now()
    flt = {"updatedAt": {"startAt": iso(now - timedelta(days=1)), "endAt": iso(now + timedelta(minutes=1))}}
    ids = [
        api.post("/bulk/v1/leads/export/create.json", {"fields": ["email"], "filter": flt})["result"][0][
            "exportId"
        ]
        for _ in range(4)
    ]
    for eid in ids[:3]:
        assert api.post(f"/bulk/v1/leads/export/{eid}/enqueue.json")["success"] is True
    assert codes(api.post(f"/bulk/v1/leads/export/{ids[3]}/enqueue.json")) == ["1029"]
    states = [api.get(f"/bulk/v1/leads/export/{e}/status.json")["result"][0]["status"] for e in ids[:3]]
    assert states == ["Processing", "Processing", "Queued"]
    sandbox.clock.advance(61)
    assert api.get(f"/bulk/v1/leads/export/{ids[0]}/status.json")["result"][0]["status"] == "Completed"
    quota = api.post(f"/bulk/v1/leads/export/{ids[3]}/enqueue.json")
    assert codes(quota) == ["1029"] and "quota" in quota["errors"][0]["message"]


def test_activity_export(sandbox, api):
    api.post("/rest/v1/leads.json", {"input": [{"email": "a@example.com"}]})
    now = sandbox.clock.now()
    flt = {
        "createdAt": {"startAt": iso(now - timedelta(hours=1)), "endAt": iso(now + timedelta(minutes=1))},
        "activityTypeIds": [12],
    }
    eid = api.post("/bulk/v1/activities/export/create.json", {"filter": flt})["result"][0]["exportId"]
    api.post(f"/bulk/v1/activities/export/{eid}/enqueue.json")
    assert api.get(f"/bulk/v1/activities/export/{eid}/status.json")["result"][0]["numberOfRecords"] == 1
    rows = list(csv.DictReader(io.StringIO(api.http.get(f"/bulk/v1/activities/export/{eid}/file.json").text)))
    assert rows[0]["activityTypeId"] == "12" and '"Source":"Web service API"' in rows[0]["attributes"]


def _upload(api: Api, text: str, **params):
    return api.http.post(
        "/bulk/v1/leads.json",
        params={"format": "csv", **params},
        files={"file": ("leads.csv", text.encode(), "text/csv")},
    ).json()


def test_bulk_import_with_failures_and_warnings(sandbox, api):
    sandbox.store.bulk_load("lead", [{"email": "old@example.com", "firstName": "Old"}])
    text = (
        "email,firstName,leadScore,createdAt\nold@example.com,New,,\nnew@example.com,Neu,5,2020-01-01\n"
        "bad-email,B,,\nx@example.com,X,notanumber,\n"
    )
    created = _upload(api, text)
    assert created["result"][0]["status"] == "Queued"
    batch = created["result"][0]["batchId"]
    seen = [api.get(f"/bulk/v1/leads/batch/{batch}.json")["result"][0] for _ in range(3)]
    assert [s["status"] for s in seen] == ["Importing", "Complete", "Complete"]  # asynchronous, never skipped
    status = seen[-1]
    assert (status["numOfLeadsProcessed"], status["numOfRowsFailed"], status["numOfRowsWithWarning"]) == (
        2,
        2,
        1,
    )
    failures = list(
        csv.DictReader(io.StringIO(api.http.get(f"/bulk/v1/leads/batch/{batch}/failures.json").text))
    )
    assert [f["email"] for f in failures] == ["bad-email", "x@example.com"]
    assert failures[1]["Import Failure Reason"].startswith("1001")
    warnings = api.http.get(f"/bulk/v1/leads/batch/{batch}/warnings.json").text
    assert "Import Warning Reason" in warnings and "new@example.com" in warnings
    assert (
        sandbox.store.get_lead(sandbox.store.find_leads("email", "old@example.com")[0])["firstName"] == "New"
    )
    too_big = api.http.post(
        "/bulk/v1/leads.json",
        params={"format": "csv"},
        files={"file": ("leads.csv", b"email\n" + b"a@example.com\n" * 800_000, "text/csv")},
    )
    assert too_big.status_code == 413  # files over 10 MB are refused at the HTTP level


def test_bulk_import_queue_limit_1016(sandbox, api):
    sandbox.set_limits({"bulk_import_concurrent": 2, "bulk_import_queued": 2, "bulk_processing_seconds": 30})
    assert _upload(api, "email\na@example.com\n")["success"] is True
    assert _upload(api, "email\nb@example.com\n")["success"] is True
    assert codes(_upload(api, "email\nc@example.com\n")) == ["1016"]
    sandbox.clock.advance(31)
    assert _upload(api, "email\nc@example.com\n")["success"] is True


# ---------------------------------------------------------------------- other objects
def test_companies_opportunities_roles_salespersons(sandbox, api):
    desc = api.get("/rest/v1/companies/describe.json")["result"][0]
    assert desc["idField"] == "id" and desc["dedupeFields"] == ["externalCompanyId"]
    comp = api.post(
        "/rest/v1/companies.json",
        {
            "input": [
                {"externalCompanyId": "C1", "company": "Acme"},
                {"company": "No key"},
                {"externalCompanyId": "C1", "company": "Dup"},
            ]
        },
    )["result"]
    assert comp[0]["status"] == "created" and comp[0]["seq"] == 0
    assert [comp[1]["reasons"][0]["code"], comp[2]["reasons"][0]["code"]] == ["1002", "1036"]
    assert (
        api.post("/rest/v1/companies.json", {"action": "createOnly", "input": [{"externalCompanyId": "c1"}]})[
            "result"
        ][0]["reasons"][0]["code"]
        == "1017"
    )
    assert (
        api.post("/rest/v1/companies.json", {"action": "updateOnly", "input": [{"externalCompanyId": "C9"}]})[
            "result"
        ][0]["reasons"][0]["code"]
        == "1013"
    )
    assert (
        api.post(
            "/rest/v1/companies.json", {"input": [{"externalCompanyId": "C2", "numberOfEmployees": "many"}]}
        )["result"][0]["reasons"][0]["code"]
        == "1001"
    )

    sp = api.post(
        "/rest/v1/salespersons.json", {"input": [{"externalSalesPersonId": "U1", "email": "u1@x.com"}]}
    )
    assert sp["result"][0]["status"] == "created"
    opp = api.post(
        "/rest/v1/opportunities.json", {"input": [{"externalOpportunityId": "O1", "name": "Deal"}]}
    )
    guid = opp["result"][0]["marketoGUID"]
    assert len(guid) == 36
    lead_id = api.post("/rest/v1/leads.json", {"input": [{"email": "r@example.com"}]})["result"][0]["id"]
    roles = api.post(
        "/rest/v1/opportunities/roles.json",
        {
            "input": [
                {"externalOpportunityId": "O1", "leadId": lead_id, "role": "Buyer"},
                {"externalOpportunityId": "O404", "leadId": lead_id, "role": "Buyer"},
                {"externalOpportunityId": "O1", "leadId": 99999, "role": "Buyer"},
            ]
        },
    )["result"]
    assert roles[0]["status"] == "created" and [r["reasons"][0]["code"] for r in roles[1:]] == [
        "1013",
        "1013",
    ]
    compound = api.http.post(
        "/rest/v1/opportunities/roles.json",
        params={"_method": "GET"},
        json={
            "filterType": "dedupeFields",
            "fields": ["role", "leadId"],
            "input": [{"externalOpportunityId": "O1", "leadId": lead_id, "role": "buyer"}],
        },
    ).json()
    assert compound["result"][0]["leadId"] == lead_id and compound["result"][0]["role"] == "Buyer"
    blocked = api.post("/rest/v1/opportunities/delete.json", {"input": [{"externalOpportunityId": "O1"}]})
    assert blocked["result"][0]["reasons"][0]["code"] == "1022"
    api.post(
        "/rest/v1/opportunities/roles/delete.json",
        {"deleteBy": "idField", "input": [{"marketoGUID": roles[0]["marketoGUID"]}]},
    )
    done = api.post("/rest/v1/opportunities/delete.json", {"input": [{"externalOpportunityId": "O1"}]})
    assert done["result"][0] == {"seq": 0, "status": "deleted", "marketoGUID": guid}
    assert sandbox.store.count("opportunity") == 0
    found = api.get(
        "/rest/v1/companies.json", filterType="dedupeFields", filterValues="c1,c404", fields="company"
    )
    assert [r["company"] for r in found["result"]] == ["Acme"]


def test_custom_objects(sandbox, api):
    listed = {o["name"] for o in api.get("/rest/v1/customobjects.json")["result"]}
    assert {"project_c", "dynamicsTeam_c", "dynamicsTeamMember_c"} <= listed
    desc = api.get("/rest/v1/customobjects/project_c/describe.json")["result"][0]
    assert desc["idField"] == "marketoGUID" and desc["dedupeFields"] == ["projectId"]
    assert {
        "field": "contactId",
        "type": "parent",
        "relatedTo": {"name": "Lead", "field": "dynamicsId"},
    } in desc["relationships"]
    up = api.post(
        "/rest/v1/customobjects/project_c.json",
        {
            "input": [
                {"projectId": "P1", "name": "Roll-out", "companyId": "C1", "budget": 10.5},
                {"projectId": "P2", "startDate": "not a date"},
            ]
        },
    )["result"]
    assert up[0]["status"] == "created" and up[1]["reasons"][0]["code"] == "1001"
    q = api.get(
        "/rest/v1/customobjects/project_c.json",
        filterType="companyId",
        filterValues="C1",
        fields="projectId,budget",
    )
    assert q["result"][0]["budget"] == 10.5
    gone = api.post(
        "/rest/v1/customobjects/project_c/delete.json",
        {"deleteBy": "idField", "input": [{"marketoGUID": up[0]["marketoGUID"]}]},
    )
    assert gone["result"][0]["status"] == "deleted"
    assert codes(api.get("/rest/v1/customobjects/nope_c/describe.json")) == ["1003"]


# ---------------------------------------------------------------------- faults
def test_oversized_uri_and_body_are_http_errors(sandbox, api):
    assert (
        api.http.get(
            "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "x" * 9000}
        ).status_code
        == 414
    )
    big = api.http.post(
        "/rest/v1/leads.json", json={"input": [{"email": "a@x.com", "personNotes": "x" * 1_100_000}]}
    )
    assert big.status_code == 413


def test_faults_code_partial_and_html(sandbox, api):
    sandbox.app.faults.add("marketo.leads.describe2", 1.0, Fault("code", code="606"), count=1)
    injected = api.get("/rest/v1/leads/describe2.json")
    assert codes(injected) == ["606"] and injected["success"] is False
    assert api.get("/rest/v1/leads/describe2.json")["success"] is True
    sandbox.app.faults.add("marketo.leads.sync", 1.0, Fault("partial", code="1001"), count=1)
    body = api.post("/rest/v1/leads.json", {"input": [{"email": f"{i}@example.com"} for i in range(4)]})
    assert [r["status"] for r in body["result"]] == ["created", "skipped", "created", "skipped"]
    assert sandbox.store.count("lead") == 2
    sandbox.app.faults.add("marketo.activities.types", 1.0, Fault("html", status=502), count=1)
    r = api.http.get("/rest/v1/activities/types.json")
    assert r.status_code == 502 and "text/html" in r.headers["content-type"]


# ---------------------------------------------------------------------- store
def test_store_direct_api_and_bad_input_names_the_field():
    store = MarketoStore(clock=Clock())
    lead = store.create_lead({"email": "ui@example.com", "firstName": "Ui"})
    store.update_lead(lead["id"], {"leadScore": 7})
    assert store.find_leads("email", "UI@EXAMPLE.COM") == [lead["id"]]
    assert [a["activityTypeId"] for a in store.activities.items] == [12, 13]
    with pytest.raises(StoreError, match="leadScore"):
        store.update_lead(lead["id"], {"leadScore": "x"})
    with pytest.raises(StoreError, match="row 1: field 'bogus'"):
        store.bulk_load("lead", [{"email": "a@x.com"}, {"bogus": 1}])
    store.bulk_load("company", [{"externalCompanyId": "C1", "company": "Acme"}])
    assert store.get_object("companies", "c1")["company"] == "Acme"
    with pytest.raises(StoreError, match="duplicate"):
        store.bulk_load("company", [{"externalCompanyId": "C1"}])
    store.delete_lead(lead["id"])
    assert store.activities.items[-1]["activityTypeId"] == 37 and store.get_lead(lead["id"]) is None
