"""Contract tests of MarketoClient against the Marketo sandbox, for every endpoint and error path."""

from __future__ import annotations

import csv
import io
import threading
import time
from datetime import timedelta

import pytest

from sync_pipeline.clients.governor import RateGovernor
from sync_pipeline.clients.marketo import (
    MarketoAuthError,
    MarketoClient,
    MarketoError,
    MarketoTransientError,
    QuotaExhausted,
    RecordResult,
)
from sync_pipeline.resources.marketo import MarketoResource
from sync_pipeline.sandbox.faults import Fault
from sync_pipeline.sandbox.marketo import MarketoSandbox


@pytest.fixture
def sandbox():
    sb = MarketoSandbox().start()
    yield sb
    sb.stop()


def make_client(sb: MarketoSandbox, **kw) -> MarketoClient:
    settings = {"backoff_seconds": 0.01, "backoff_max_seconds": 0.05, "poll_seconds": 0.01, **kw}
    return MarketoClient(sb.base_url, sb.client_id, sb.client_secret, **settings)


@pytest.fixture
def client(sandbox):
    c = make_client(sandbox)
    yield c
    c.close()


# ---------------------------------------------------------------------- auth
def test_token_is_requested_by_post_form_and_cached(sandbox, client):
    seen: list[tuple[str, str, bytes]] = []
    before = sandbox.app.before
    sandbox.app.before = lambda req: seen.append((req.method, req.raw_path, req.body)) or before(req)
    client.describe2()
    client.activity_types()
    identity = [s for s in seen if s[1].startswith("/identity")]
    assert len(identity) == 1 and identity[0][0] == "POST"
    assert sandbox.client_secret not in identity[0][1] and sandbox.client_secret.encode() in identity[0][2]
    assert sandbox.client_secret not in repr(client) and client.calls["identity"] == 1


def test_reauthenticates_on_expired_and_invalid_tokens(sandbox, client):
    client.describe2()
    sandbox.clock.advance(3601)  # the server-side token expired: 602, then a fresh token
    assert client.describe2()["name"] == "API Lead"
    assert client.calls["identity"] == 2 and sandbox.app.calls["marketo.leads.describe2"] == 3
    sandbox.app.faults.add("marketo.leads.describe2", 1.0, Fault("code", code="601"), count=1)
    client.describe2()
    assert client.calls["identity"] == 3


def test_token_rejected_twice_is_an_auth_error(sandbox, client):
    sandbox.app.faults.add("marketo.activities.types", 1.0, Fault("code", code="601"))
    with pytest.raises(MarketoAuthError) as err:
        client.activity_types()
    assert err.value.code == "601" and "activities.types" in str(err.value)


def test_bad_credentials_name_the_client_not_the_secret(sandbox):
    c = MarketoClient(sandbox.base_url, sandbox.client_id, "not-the-secret", backoff_seconds=0.01)
    with pytest.raises(MarketoAuthError) as err:
        c.describe2()
    assert sandbox.client_id in str(err.value) and "not-the-secret" not in str(err.value)


# ---------------------------------------------------------------------- governor, retries, quota
def test_governor_keeps_four_threads_within_rate_and_concurrency_limits(sandbox):
    sandbox.set_limits(
        {"calls_per_window": 10, "window_seconds": 2, "concurrent": 3, "latency_seconds": 0.02}
    )
    governor = RateGovernor(calls_per_window=10, window_seconds=2, max_concurrent=3)
    clients = [
        make_client(sandbox, governor=governor) for _ in range(4)
    ]  # four clients, one instance's budget
    clients[0].describe2()  # fetch the token once so the burst below is API calls only
    errors: list[BaseException] = []

    def work(c: MarketoClient) -> None:
        try:
            for _ in range(4):
                c.activity_types()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sandbox.app.calls["marketo.activities.types"] == 16  # no call was refused and retried
    assert time.monotonic() - started >= 2.0  # the governor made callers wait for the next window


def test_backoff_on_injected_606_and_615(sandbox, client):
    sandbox.app.faults.add("marketo.leads.describe2", 1.0, Fault("code", code="606"), count=1)
    sandbox.app.faults.add("marketo.leads.describe2", 1.0, Fault("code", code="615"), count=1)
    assert client.describe2()["searchableFields"]
    assert client.calls["leads.describe2"] == 3 and sandbox.app.faults.total_injected == 2


def test_retries_html_dropped_connections_and_malformed_bodies(sandbox, client):
    sandbox.app.faults.add("marketo.activities.types", 1.0, Fault("html", status=502), count=1)
    sandbox.app.faults.add("marketo.activities.types", 1.0, Fault("drop"), count=1)
    sandbox.app.faults.add("marketo.activities.types", 1.0, Fault("malformed"), count=1)
    assert {t["id"] for t in client.activity_types()} >= {12, 13, 37}
    assert client.calls["activities.types"] == 4


def test_transient_errors_are_bounded(sandbox):
    c = make_client(sandbox, max_retries=2)
    sandbox.app.faults.add("marketo.activities.types", 1.0, Fault("code", code="611"))
    with pytest.raises(MarketoTransientError) as err:
        c.activity_types()
    assert c.calls["activities.types"] == 3 and "activities.types" in str(err.value)
    assert sandbox.client_secret not in str(err.value) and ":ab" not in str(err.value)


def test_quota_exhausted_stops_every_caller(sandbox, client):
    client.describe2()
    sandbox.set_limits({"daily_quota": 2})
    client.activity_types()
    with pytest.raises(QuotaExhausted) as err:
        client.activity_types()
    assert err.value.code == "607" and err.value.resets_at is not None
    other = MarketoClient(
        sandbox.base_url, sandbox.client_id, sandbox.client_secret, governor=client.governor
    )
    before = sum(sandbox.app.calls.values())
    with pytest.raises(QuotaExhausted):
        other.describe2()
    assert sum(sandbox.app.calls.values()) == before  # stopped without calling Marketo


def test_own_daily_budget_stops_before_marketo_does(sandbox):
    c = make_client(sandbox, daily_quota=2)
    c.activity_types()
    c.activity_types()
    with pytest.raises(QuotaExhausted):
        c.activity_types()
    assert sandbox.app.calls["marketo.activities.types"] == 2


def test_non_transient_errors_are_raised_with_the_endpoint(client):
    with pytest.raises(MarketoError) as err:
        client.get_leads("firstName", ["x"])
    assert err.value.code == "1011" and err.value.endpoint == "leads.get"


# ---------------------------------------------------------------------- leads
def test_sync_1000_leads_in_4_calls_with_outcomes_in_order(sandbox, client):
    records = [{"email": f"p{i}@example.com", "dynamicsId": f"d-{i}"} for i in range(1000)]
    records[500]["leadScore"] = "high"
    results = client.sync_leads(records)
    assert sandbox.app.calls["marketo.leads.sync"] == 4
    assert [r.index for r in results] == list(range(1000))
    assert sum(r.status == "created" for r in results) == 999
    assert results[500].status == "skipped" and results[500].reasons[0]["code"] == "1001"
    assert sandbox.store.count("lead") == 999


def test_partial_failures_are_reported_per_record(sandbox, client):
    sandbox.app.faults.add("marketo.leads.sync", 1.0, Fault("partial", code="1001"), count=1)
    results = client.sync_leads([{"email": f"{i}@example.com"} for i in range(6)])
    assert [r.status for r in results] == ["created", "skipped"] * 3
    assert all(r.reasons[0]["code"] == "1001" for r in results if not r.ok)


def test_whole_call_refusal_becomes_per_record_failures(client):
    results = client.sync_leads([{"email": "a@example.com"}, {"email": "b@example.com"}], action="bogus")
    assert [(r.index, r.status, r.reasons[0]["code"]) for r in results] == [
        (0, "failed", "1003"),
        (1, "failed", "1003"),
    ]


def test_oversized_record_fails_alone(sandbox, client):
    huge = {"email": "b@example.com", "personNotes": "x" * 1_100_000}
    results = client.sync_leads([{"email": "a@example.com"}, huge])
    assert results[0].status == "created" and results[1].status == "failed"
    assert results[1].reasons[0]["code"] == "413"


def test_get_leads_chunks_values_and_posts_long_queries(sandbox, client):
    ids = [f"{i:08d}-aaaa-bbbb-cccc-dddddddddddd" for i in range(650)]
    sandbox.store.bulk_load(
        "lead", ({"email": f"{i}@example.com", "dynamicsId": d} for i, d in enumerate(ids))
    )
    rows = client.get_leads("dynamicsId", ids + ["missing"], fields=["email", "dynamicsId"])
    assert sorted(r["dynamicsId"] for r in rows) == sorted(ids)
    assert client.calls["leads.get"] >= 3
    assert client.get_lead(rows[0]["id"], ["dynamicsId"])["dynamicsId"] == rows[0]["dynamicsId"]


def test_get_leads_splits_queries_matching_over_1000(sandbox, client):
    sandbox.store.bulk_load(
        "lead", ({"email": f"{i}@example.com", "externalCompanyId": f"C{i % 2}"} for i in range(1200))
    )
    rows = client.get_leads("externalCompanyId", ["C0", "C1"], fields=["externalCompanyId"])
    assert len(rows) == 1200 and len({r["id"] for r in rows}) == 1200


def test_delete_and_merge_leads(sandbox, client):
    created = client.sync_leads(
        [{"email": "w@example.com"}, {"email": "l@example.com", "title": "CEO"}, {"email": "d@example.com"}]
    )
    w, loser, d = (r.id for r in created)
    client.merge_leads(w, [loser])
    assert sandbox.store.get_lead(w)["title"] == "CEO" and sandbox.store.get_lead(loser) is None
    deleted = client.delete_leads([d, 424242])
    assert deleted[0] == RecordResult(0, "deleted", d) and deleted[1].reasons[0]["code"] == "1004"
    with pytest.raises(MarketoError) as err:
        client.merge_leads(w, [999999])
    assert err.value.code == "1004"


def test_describe_leads(client):
    assert any(f["rest"]["name"] == "dynamicsId" for f in client.describe_leads())
    assert ["dynamicsId"] in client.describe2()["searchableFields"]


# ---------------------------------------------------------------------- activities
def test_lead_changes_deleted_leads_and_activities_pages(sandbox, client):
    token = client.paging_token(sandbox.clock.now() - timedelta(seconds=5))
    results = client.sync_leads([{"email": f"{i}@example.com", "firstName": "A"} for i in range(5)])
    for r in results[:3]:
        sandbox.store.update_lead(r.id, {"firstName": "B"})
    sandbox.store.delete_lead(results[4].id)
    pages = list(client.lead_changes(token, ["firstName"], batch_size=2))
    # 8 matching activities in pages of 2; the trailing Delete Lead makes a last, empty page
    assert [len(p.results) for p in pages] == [2, 2, 2, 2, 0]
    assert [p.more_result for p in pages] == [True, True, True, True, False]
    acts = [a for p in pages for a in p.results]
    assert [a["activityTypeId"] for a in acts] == [12] * 5 + [13] * 3
    assert len({a["marketoGUID"] for a in acts}) == 8
    assert list(client.lead_changes(pages[-1].next_page_token, ["firstName"]))[0].results == []
    deleted = [a for p in client.deleted_leads(token) for a in p.results]
    assert [a["leadId"] for a in deleted] == [results[4].id]
    news = [a for p in client.activities(token, [12]) for a in p.results]
    assert len(news) == 5
    with pytest.raises(ValueError):
        list(client.activities(token, list(range(11))))


# ---------------------------------------------------------------------- bulk
def test_bulk_lead_and_activity_export_to_file(sandbox, client, tmp_path):
    client.sync_leads([{"email": f"{i}@example.com", "firstName": f"F{i}"} for i in range(50)])
    now = sandbox.clock.now()
    window = {
        "startAt": (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "endAt": (now + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    status = client.export_to_file(
        "leads",
        {"updatedAt": window},
        tmp_path / "leads.csv",
        fields=["id", "email", "firstName", "lastName"],
    )
    rows = list(csv.DictReader(io.StringIO((tmp_path / "leads.csv").read_text())))
    assert status["numberOfRecords"] == len(rows) == 50 and rows[0]["lastName"] == "null"
    job = client.create_activity_export(now - timedelta(hours=1), now + timedelta(minutes=1), [12])
    client.enqueue_export("activities", job["exportId"])
    done = client.wait_for_export("activities", job["exportId"])
    client.download_export("activities", job["exportId"], tmp_path / "acts.csv", done["fileChecksum"])
    assert len((tmp_path / "acts.csv").read_text().splitlines()) == 51
    assert [j["exportId"] for j in client.list_exports("activities")] == [job["exportId"]]
    with pytest.raises(MarketoError) as err:
        client.download_export("leads", job["exportId"], tmp_path / "x.csv")  # not a lead export
    assert err.value.code == "1003"
    with pytest.raises(MarketoError) as err:
        client.download_export("leads", status["exportId"], tmp_path / "bad.csv", expected_sha256="0" * 64)
    assert err.value.code == "checksum"
    pending = client.create_export("leads", {"createdAt": window}, ["email"])
    assert client.cancel_export("leads", pending["exportId"])["status"] == "Cancelled"


def test_bulk_import_status_failures_and_warnings(sandbox, client):
    job = client.import_leads("email,firstName,updatedAt\na@example.com,A,2020-01-01\nbad,B,\n")
    status = client.wait_for_import(job["batchId"])
    assert (status["status"], status["numOfLeadsProcessed"], status["numOfRowsFailed"]) == ("Complete", 1, 1)
    assert "bad" in client.import_failures(job["batchId"])
    assert "a@example.com" in client.import_warnings(job["batchId"])
    with pytest.raises(ValueError, match="10 MB"):
        client.import_leads(b"x" * (10 * 1024 * 1024 + 1))


# ---------------------------------------------------------------------- other objects
def test_objects_describe_query_upsert_delete(sandbox, client):
    assert client.describe_object("companies")["dedupeFields"] == ["externalCompanyId"]
    comps = client.upsert_objects(
        "companies", [{"externalCompanyId": f"C{i}", "company": f"Co {i}"} for i in range(310)]
    )
    assert sandbox.app.calls["marketo.companies.sync"] == 2 and all(r.status == "created" for r in comps)
    found = client.query_objects("companies", "externalCompanyId", [f"C{i}" for i in range(305)], ["company"])
    assert len(found) == 305
    sp = client.upsert_objects("salespersons", [{"externalSalesPersonId": "U1", "email": "u@x.com"}])
    assert sp[0].status == "created" and isinstance(sp[0].id, int)
    opp = client.upsert_objects(
        "opportunities", [{"externalOpportunityId": "O1", "name": "Deal"}, {"name": "x"}]
    )
    assert opp[0].status == "created" and opp[1].reasons[0]["code"] == "1002"
    lead = client.sync_leads([{"email": "r@example.com"}])[0].id
    role = {"externalOpportunityId": "O1", "leadId": lead, "role": "Buyer"}
    assert client.upsert_objects("opportunities/roles", [role])[0].status == "created"
    assert client.query_objects("opportunities/roles", "dedupeFields", [role], ["role"])[0]["role"] == "Buyer"
    assert client.delete_objects("opportunities/roles", [role])[0].status == "deleted"
    assert client.delete_objects("opportunities", [{"externalOpportunityId": "O1"}])[0].status == "deleted"
    assert {o["name"] for o in client.list_custom_objects()} >= {"project_c"}
    co = client.upsert_objects("customobjects/dynamicsTeam_c", [{"teamId": "T1", "name": "Sales"}])
    assert co[0].status == "created" and len(co[0].id) == 36
    assert client.describe_object("customobjects/dynamicsTeam_c")["idField"] == "marketoGUID"
    gone = client.delete_objects(
        "customobjects/dynamicsTeam_c", [{"marketoGUID": co[0].id}], delete_by="idField"
    )
    assert gone[0].status == "deleted" and sandbox.store.count("dynamicsTeam_c") == 0
    with pytest.raises(ValueError, match="unknown Marketo object"):
        client.describe_object("widgets")


# ---------------------------------------------------------------------- resource
def test_resource_builds_one_cached_client(sandbox):
    res = MarketoResource(
        base_url=sandbox.base_url,
        client_id=sandbox.client_id,
        client_secret=sandbox.client_secret,
        calls_per_20s=40,
        max_concurrent=4,
    )
    c = res.get_client()
    assert res.get_client() is c and c.governor.calls_per_window == 40 and c.governor.max_concurrent == 4
    assert c.describe2()["name"] == "API Lead"
    assert sandbox.client_secret not in repr(res)


def test_resource_over_tls_with_a_ca_bundle(tmp_path):
    from sync_pipeline.sandbox.tls import SandboxCA

    ca = SandboxCA.create(tmp_path / "ca")
    sb = MarketoSandbox().start(ssl=ca.server_context())
    try:
        assert sb.base_url.startswith("https://")
        res = MarketoResource(
            base_url=sb.base_url,
            client_id=sb.client_id,
            client_secret=sb.client_secret,
            ca_bundle=str(ca.ca_path),
        )
        assert res.get_client().describe2()["name"] == "API Lead"
        untrusted = MarketoClient(sb.base_url, sb.client_id, sb.client_secret, governor=RateGovernor())
        with pytest.raises(MarketoError, match="identity: tls server certificate not trusted"):
            untrusted.describe2()  # the default trust store does not know the sandbox CA: no retries
    finally:
        sb.stop()


def test_custom_object_import_and_backoff_polling(sandbox, client):
    job = client.import_custom_objects("project_c", "projectId,name,startDate\nP1,One,\nP2,Two,not a date\n")
    assert job["status"] == "Queued"
    status = client.wait_for_import(job["batchId"], object_name="project_c", first_poll_seconds=0.01)
    assert (status["status"], status["numOfObjectsProcessed"], status["numOfRowsFailed"]) == (
        "Complete",
        1,
        1,
    )
    assert sandbox.app.calls["marketo.bulk.customobjects.import.status"] == 2  # Importing, then Complete
    assert "P2" in client.import_failures(job["batchId"], "project_c")
    assert client.import_warnings(job["batchId"], "project_c").startswith("projectId,name,startDate,")


def test_import_queue_keeps_ten_queued_and_waits_out_1016(sandbox, client, tmp_path):
    from sync_pipeline.clients.bulk_import import ImportQueue

    # Imports take 0.3 s each, 2 at a time; another integration already holds 9 of the 10 queue places.
    sandbox.set_limits(
        {"bulk_import_concurrent": 2, "bulk_import_queued": 10, "bulk_processing_seconds": 0.3}
    )
    for i in range(9):
        client.import_leads(f"email\nother{i}@example.com\n")
    queue = ImportQueue(client, lookup_field="email", first_poll_seconds=0.05, max_poll_seconds=0.2)
    done = []
    for i in range(4):
        path = tmp_path / f"f{i}.csv"
        path.write_text(f"email\nours{i}@example.com\nbad-{i}\n")
        done += queue.submit(path, i)
    done += queue.drain()
    assert sorted(o.tag for o in done) == [0, 1, 2, 3]
    assert all(o.completed and o.status["numOfLeadsProcessed"] == 1 for o in done)
    assert all(f"bad-{o.tag}" in o.failures for o in done)  # the failures report is fetched when rows failed
    assert sandbox.app.calls["marketo.bulk.import.create"] > 9 + 4  # 1016 was answered and waited out
    assert all(sandbox.store.find_leads("email", f"ours{i}@example.com") for i in range(4))


def test_import_queue_reports_a_refused_file_without_raising(sandbox, client, tmp_path):
    from sync_pipeline.clients.bulk_import import ImportQueue

    path = tmp_path / "bad.csv"
    path.write_text("firstName\nNo lookup column\n")
    queue = ImportQueue(client, lookup_field="email")
    (outcome,) = queue.submit(path, "bad")
    assert outcome.error is not None and outcome.error.code == "1003" and not outcome.completed
    assert queue.drain() == []


def test_import_queue_reports_a_job_failed_as_a_whole(sandbox, client, tmp_path):
    from sync_pipeline.clients.bulk_import import ImportQueue

    path = tmp_path / "unknown-column.csv"
    path.write_text("email,noSuchField\na@example.com,x\n")
    queue = ImportQueue(client, lookup_field="email", first_poll_seconds=0.01)
    assert queue.submit(path, "f") == []
    (outcome,) = queue.drain()
    assert outcome.status["status"] == "Failed" and outcome.error.code == "import_failed"
    assert "noSuchField" in outcome.error.message and not outcome.completed
