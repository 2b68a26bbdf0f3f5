"""Contract tests: the sandbox's bulk import (leads and custom objects) as Adobe documents it
("Bulk Lead Import", "Bulk Custom Object Import" under experienceleague.adobe.com/en/docs/marketo-developer/
marketo/rest/bulk-import/)."""

from __future__ import annotations

import csv
import io

import httpx
import pytest

from sync_pipeline.sandbox.marketo import MarketoSandbox


@pytest.fixture
def sandbox():
    sb = MarketoSandbox().start()
    yield sb
    sb.stop()


@pytest.fixture
def http(sandbox):
    token = httpx.post(
        f"{sandbox.base_url}/identity/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sandbox.client_id,
            "client_secret": sandbox.client_secret,
        },
    ).json()["access_token"]
    with httpx.Client(base_url=sandbox.base_url, headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def upload(http, path: str, text: str, params=None, data=None):
    return http.post(
        path, params=params, data=data, files={"file": ("f.csv", text.encode(), "text/csv")}
    ).json()


def codes(body) -> list[str]:
    return [e["code"] for e in body.get("errors", [])]


def test_custom_object_import_lifecycle_failures_and_status_shape(sandbox, http):
    base = "/bulk/v1/customobjects/project_c/import"
    created = upload(
        http,
        base + ".json",
        "projectId,name,budget,startDate\nP1,Roll-out,10.5,2026-01-02\nP2,Bad date,,not a date\nP3,Third,,\n",
        {"format": "csv"},
    )
    job = created["result"][0]
    assert job["status"] == "Queued" and job["objectApiName"] == "project_c"
    statuses = [http.get(f"{base}/{job['batchId']}/status.json").json()["result"][0] for _ in range(2)]
    assert [s["status"] for s in statuses] == ["Importing", "Complete"]
    done = statuses[-1]
    assert (done["numOfObjectsProcessed"], done["numOfRowsFailed"], done["numOfRowsWithWarning"]) == (2, 1, 0)
    failures = list(csv.DictReader(io.StringIO(http.get(f"{base}/{job['batchId']}/failures.json").text)))
    assert [f["projectId"] for f in failures] == ["P2"]
    assert failures[0]["Import Failure Reason"].startswith("1001")  # the original row plus the reason column
    assert (
        sandbox.store.get_object(
            "project_c",
            next(r["marketoGUID"] for r in sandbox.store.objects("project_c") if r["projectId"] == "P1"),
        )["budget"]
        == 10.5
    )
    # insert or update by the dedupe field: importing P1 again updates it, no second record
    again = upload(http, base + ".json", "projectId,name\nP1,Renamed\n", {"format": "csv"})["result"][0]
    for _ in range(2):
        http.get(f"{base}/{again['batchId']}/status.json")
    rows = [r for r in sandbox.store.objects("project_c") if r["projectId"] == "P1"]
    assert (
        len(rows) == 1 and rows[0]["name"] == "Renamed" and rows[0]["budget"] == 10.5
    )  # blank cell: unchanged
    assert codes(upload(http, "/bulk/v1/customobjects/nope_c/import.json", "x\n1\n", {"format": "csv"})) == [
        "1003"
    ]
    assert codes(upload(http, base + ".json", "name\nNo key\n", {"format": "csv"})) == [
        "1003"
    ]  # no dedupe column
    assert codes(
        http.get(f"/bulk/v1/customobjects/dynamicsTeam_c/import/{job['batchId']}/status.json").json()
    ) == ["1003"]  # a batch of another object


def test_lead_import_parameters(sandbox, http):
    assert codes(upload(http, "/bulk/v1/leads.json", "email\na@example.com\n")) == [
        "1003"
    ]  # format is required
    body = upload(
        http, "/bulk/v1/leads.json", "email\na@example.com\n", data={"format": "csv"}
    )  # -F format=csv
    assert body["success"] is True
    assert codes(
        upload(
            http, "/bulk/v1/leads.json", "email\nb@example.com\n", {"format": "csv", "partitionName": "Nope"}
        )
    ) == ["1003"]
    ok = upload(
        http, "/bulk/v1/leads.json", "email\nb@example.com\n", {"format": "csv", "partitionName": "Default"}
    )
    assert ok["success"] is True
    assert codes(upload(http, "/bulk/v1/leads.json", "firstName\nX\n", {"format": "csv"})) == [
        "1003"
    ]  # no lookup col
    too_big = http.post(
        "/bulk/v1/customobjects/project_c/import.json",
        params={"format": "csv"},
        files={"file": ("f.csv", b"projectId\n" + b"P123456789\n" * 1_000_000, "text/csv")},
    )
    assert too_big.status_code == 413  # over 10 MB
    # Between REST's 1 MB body limit and the import's 10 MB: a custom-object file is accepted like a lead file.
    two_mb = http.post(
        "/bulk/v1/customobjects/project_c/import.json",
        params={"format": "csv"},
        files={"file": ("f.csv", b"projectId\n" + b"P123456789\n" * 200_000, "text/csv")},
    )
    assert two_mb.status_code == 200, two_mb.text[:200]


def test_queue_of_ten_two_importing_then_1016(sandbox, http):
    sandbox.set_limits({"bulk_import_concurrent": 2, "bulk_import_queued": 10, "bulk_processing_seconds": 60})
    ids = [
        upload(http, "/bulk/v1/leads.json", f"email\nq{i}@example.com\n", {"format": "csv"})["result"][0][
            "batchId"
        ]
        for i in range(10)
    ]
    refused = upload(http, "/bulk/v1/leads.json", "email\nq10@example.com\n", {"format": "csv"})
    assert codes(refused) == ["1016"] and "Too many imports" in refused["errors"][0]["message"]
    states = [http.get(f"/bulk/v1/leads/batch/{i}.json").json()["result"][0]["status"] for i in ids]
    assert states.count("Importing") == 2 and states.count("Queued") == 8
    sandbox.clock.advance(61)
    for _ in range(2):
        states = [http.get(f"/bulk/v1/leads/batch/{i}.json").json()["result"][0]["status"] for i in ids]
    assert states[:2] == ["Complete", "Complete"] and states.count("Importing") == 2  # FIFO
    assert (
        upload(http, "/bulk/v1/leads.json", "email\nq10@example.com\n", {"format": "csv"})["success"] is True
    )


def test_import_calls_count_against_the_daily_quota(sandbox, http):
    sandbox.set_limits({"daily_quota": 2})
    assert upload(http, "/bulk/v1/leads.json", "email\na@example.com\n", {"format": "csv"})["success"] is True
    http.get("/rest/v1/leads/describe.json")
    assert codes(upload(http, "/bulk/v1/leads.json", "email\nb@example.com\n", {"format": "csv"})) == ["607"]


def test_injected_partial_fault_fails_rows_in_the_failures_file(sandbox, http):
    from sync_pipeline.sandbox.faults import Fault

    sandbox.app.faults.add("marketo.bulk.import.create", 1.0, Fault("partial", code="1001"), count=1)
    job = upload(http, "/bulk/v1/leads.json", "email\na@example.com\nb@example.com\n", {"format": "csv"})[
        "result"
    ][0]
    for _ in range(2):
        status = http.get(f"/bulk/v1/leads/batch/{job['batchId']}.json").json()["result"][0]
    assert (status["numOfLeadsProcessed"], status["numOfRowsFailed"]) == (1, 1)
    failed = http.get(f"/bulk/v1/leads/batch/{job['batchId']}/failures.json").text
    assert "a@example.com" in failed and "b@example.com" not in failed
