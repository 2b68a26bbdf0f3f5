"""The realistic limits profile, as the vendors document and count them, and the API-budget floor.

- Dataverse "Service protection API limits": https://learn.microsoft.com/power-apps/developer/data-platform/api-limits
- Dataverse $batch errors: https://learn.microsoft.com/power-apps/developer/data-platform/webapi/execute-batch-operations-using-web-api
- Marketo limits and error codes: https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/rest-api,
  .../rest/error-codes, .../rest/bulk-extract/bulk-extract, .../rest/bulk-import/bulk-import

Each limit is triggered at its documented threshold (the realistic profile's figures), with the sandbox's clock
moved instead of waiting; our clients, which respect the limits, never surface them to their callers.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from sync_pipeline.bench.pipeline import API_BUDGET, budget_floor, budget_floor_seconds
from sync_pipeline.clients.dynamics import DynamicsClient
from sync_pipeline.clients.governor import RateGovernor
from sync_pipeline.clients.marketo import MarketoClient
from sync_pipeline.sandbox.clock import Clock, iso
from sync_pipeline.sandbox.dynamics import DynamicsSandbox
from sync_pipeline.sandbox.dynamics.server import BATCH_PARTS, EXECUTION_MS
from sync_pipeline.sandbox.dynamics.server import COUNTED as DYN_COUNTED
from sync_pipeline.sandbox.marketo import MarketoSandbox
from sync_pipeline.sandbox.marketo.server import COUNTED as MKTO_COUNTED
from sync_pipeline.sandbox.schema import load_schema
from sync_pipeline.sandbox.tls import SandboxCA

REALISTIC = load_schema().raw["limits"]["realistic"]


def test_realistic_profile_has_the_documented_figures() -> None:
    assert REALISTIC["dynamics"] == {
        "requests_per_window": 6000,
        "window_seconds": 300,
        "concurrent": 52,
        "execution_seconds_per_window": 1200,
    }
    assert REALISTIC["marketo"] == {
        "calls_per_window": 100,
        "window_seconds": 20,
        "concurrent": 10,
        "daily_quota": 50000,
        "bulk_export_daily_mb": 500,
        "bulk_concurrent_jobs": 2,
        "bulk_queued_jobs": 10,
        "bulk_import_concurrent": 2,
        "bulk_import_queued": 10,
    }
    assert API_BUDGET == {"marketo": (100, 20), "dynamics": (6000, 300)}


# ============================================================================================ Dataverse
@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SandboxCA:
    return SandboxCA.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def dyn(ca: SandboxCA) -> Iterator[DynamicsSandbox]:
    ctx = ca.server_context()
    sb = DynamicsSandbox(clock=Clock(), limits=dict(REALISTIC["dynamics"])).start(
        identity_ssl=ctx, api_ssl=ctx
    )
    yield sb
    sb.stop()


@pytest.fixture
def dapi(dyn: DynamicsSandbox, ca: SandboxCA) -> Iterator[httpx.Client]:
    form = {
        "grant_type": "client_credentials",
        "client_id": dyn.client_id,
        "client_secret": dyn.client_secret,
        "scope": f"{dyn.api_url}/.default",
    }
    token = httpx.post(f"{dyn.authority}/oauth2/v2.0/token", data=form, verify=str(ca.ca_path)).json()[
        "access_token"
    ]
    with httpx.Client(
        base_url=f"{dyn.api_url}/api/data/v9.2/",
        verify=str(ca.ca_path),
        headers={"Authorization": f"Bearer {token}"},
    ) as client:
        yield client


def _admit(sb: DynamicsSandbox, n: int) -> None:
    """``n`` requests through the very limiter the HTTP path uses (fast, same counting)."""
    for _ in range(n):
        assert sb._check_limits() is None
        with sb._limit_lock:
            sb._in_flight -= 1


def _batch(base: str, urls: list[str]) -> tuple[str, str]:
    parts = "".join(
        f"--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"GET {base}{u} HTTP/1.1\r\nAccept: application/json\r\n\r\n"
        for u in urls
    )
    return parts + "--b--\r\n", "multipart/mixed; boundary=b"


def test_dataverse_6000_requests_per_5_minutes_and_batch_counts_once(
    dyn: DynamicsSandbox, dapi: httpx.Client
) -> None:
    base = f"{dyn.api_url}/api/data/v9.2/"
    body, ctype = _batch(base, ["WhoAmI", "EntityDefinitions?$select=LogicalName", "accounts?$top=1"])
    resp = dapi.post("$batch", content=body, headers={"Content-Type": ctype})
    assert resp.status_code == 200 and resp.text.count("HTTP/1.1 200 OK") == 3
    assert dyn.api_app.calls[DYN_COUNTED] == 1  # a $batch is one request toward the limit
    # Its parts are counted under their own routes and as parts, so HTTP requests = routes - parts.
    assert dyn.api_app.calls[BATCH_PARTS] == 3 and dyn.api_app.calls["dynamics.batch"] == 1
    _admit(dyn, 5998)
    assert dapi.get("WhoAmI").status_code == 200  # the 6,000th request in the window
    limited = dapi.get("WhoAmI")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "0x80072322"
    assert limited.json()["error"]["message"] == (
        "Number of requests exceeded the limit of 6000 over time window of 300 seconds."
    )
    retry = int(limited.headers["Retry-After"])
    assert 1 <= retry <= 300
    dyn.clock.advance(retry)
    assert dapi.get("WhoAmI").status_code == 200


def test_dataverse_combined_execution_time_counts_bulk_targets(
    dyn: DynamicsSandbox, dapi: httpx.Client
) -> None:
    dyn.limits["execution_seconds_per_operation"] = 1.0  # a modelled second of server work per operation
    kind = "Microsoft.Dynamics.CRM.account"
    first = dapi.post(
        "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        json={"Targets": [{"@odata.type": kind, "name": f"A{i}"} for i in range(1199)]},
    )
    assert first.status_code == 200 and dyn.api_app.calls[DYN_COUNTED] == 1
    assert dapi.get("WhoAmI").status_code == 200  # 1,199 s + this one's second: now at the 1,200 s limit
    limited = dapi.get("WhoAmI")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "0x80072321"
    assert "1,200,000 milliseconds over time window of 300 seconds" in limited.json()["error"]["message"]
    retry = int(limited.headers["Retry-After"])
    assert 1 <= retry <= 300
    dyn.clock.advance(retry)
    assert dapi.get("WhoAmI").status_code == 200
    # Inside a $batch every request is an operation of the one counted request.
    before = dyn._exec_total
    body, ctype = _batch(f"{dyn.api_url}/api/data/v9.2/", ["WhoAmI"] * 5)
    assert dapi.post("$batch", content=body, headers={"Content-Type": ctype}).status_code == 200
    assert dyn._exec_total - before >= 5.0
    # The admitted requests' execution time is counted too (what the benchmark's floor reads): the modelled
    # 1,199 + 1 + 1 + 5 operations at least.
    assert dyn.api_app.calls[EXECUTION_MS] >= (1199 + 1 + 1 + 5) * 1000


def test_dataverse_52_concurrent_requests(dyn: DynamicsSandbox, dapi: httpx.Client) -> None:
    with dyn._limit_lock:
        dyn._in_flight = 52  # 52 requests in flight (the limiter's own count)
    limited = dapi.get("WhoAmI")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "0x80072326"
    assert "limit of 52" in limited.json()["error"]["message"] and limited.headers["Retry-After"] == "1"
    with dyn._limit_lock:
        dyn._in_flight = 51
    assert dapi.get("WhoAmI").status_code == 200


def test_our_dataverse_client_never_surfaces_a_429(dyn: DynamicsSandbox, ca: SandboxCA) -> None:
    # The client honours Retry-After (it sleeps on the sandbox clock here), so its caller never sees the limit.
    with DynamicsClient(
        dyn.api_url,
        dyn.authority,
        dyn.client_id,
        dyn.client_secret,
        verify=str(ca.ca_path),
        sleep=dyn.clock.advance,
    ) as client:
        client.whoami()
        _admit(dyn, 6000 - dyn.api_app.calls[DYN_COUNTED])
        assert client.whoami()["UserId"] == dyn.app_user_id
        assert dyn.limit_rejections["0x80072322"] >= 1 and client.calls["retry.429"] >= 1


def test_batch_failure_outside_a_change_set_stops_or_continues(
    dyn: DynamicsSandbox, dapi: httpx.Client
) -> None:
    base = f"{dyn.api_url}/api/data/v9.2/"
    parts = [
        ("POST", "accounts", '{"name":"First"}'),
        ("POST", "accounts", '{"bogus":1}'),
        ("POST", "accounts", '{"name":"Third"}'),
    ]
    body = (
        "".join(
            f"--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            f"{m} {base}{u} HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n{b}\r\n"
            for m, u, b in parts
        )
        + "--b--\r\n"
    )
    stop = dapi.post("$batch", content=body, headers={"Content-Type": "multipart/mixed; boundary=b"})
    # "the batch fails on the first request ... The batch error represents the error of the first failing request"
    assert stop.status_code == 400 and stop.text.count("HTTP/1.1 ") == 1 and "'bogus'" in stop.text
    assert sorted(r["name"] for r in dyn.store.rows("account")) == [
        "First"
    ]  # no rollback outside a change set
    go_on = dapi.post(
        "$batch",
        content=body,
        headers={"Content-Type": "multipart/mixed; boundary=b", "Prefer": "odata.continue-on-error"},
    )
    assert go_on.status_code == 200
    assert [line for line in go_on.text.splitlines() if line.startswith("HTTP/1.1")] == [
        "HTTP/1.1 204 No Content",
        "HTTP/1.1 400 Bad Request",
        "HTTP/1.1 204 No Content",
    ]
    assert sorted(r["name"] for r in dyn.store.rows("account")) == ["First", "First", "Third"]
    # Metadata reads work inside a batch too.
    meta, ctype = _batch(
        base,
        [
            "EntityDefinitions(LogicalName='lead')/Attributes/Microsoft.Dynamics.CRM."
            "PicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet($select=Options)",
            "GlobalOptionSetDefinitions?$select=Name",
        ],
    )
    answer = dapi.post("$batch", content=meta, headers={"Content-Type": ctype})
    assert (
        answer.status_code == 200 and '"leadsourcecode"' in answer.text and "new_projectstatus" in answer.text
    )


# ============================================================================================ Marketo
@pytest.fixture
def mkto() -> Iterator[MarketoSandbox]:
    sb = MarketoSandbox(limits=dict(REALISTIC["marketo"])).start()
    yield sb
    sb.stop()


class _Api:
    def __init__(self, sb: MarketoSandbox):
        token = httpx.post(
            f"{sb.base_url}/identity/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": sb.client_id,
                "client_secret": sb.client_secret,
            },
        ).json()["access_token"]
        self.http = httpx.Client(base_url=sb.base_url, headers={"Authorization": f"Bearer {token}"})

    def get(self, path: str, **params: Any) -> Any:
        return self.http.get(path, params=params).json()

    def post(self, path: str, body: Any = None) -> Any:
        return self.http.post(path, json=body).json()


def _codes(body: Any) -> list[str]:
    return [e["code"] for e in body.get("errors", [])]


def test_marketo_100_calls_per_20_seconds_bulk_included(mkto: MarketoSandbox) -> None:
    api = _Api(mkto)
    for i in range(100):  # half REST, half bulk: all count
        path = "/rest/v1/activities/types.json" if i % 2 else "/bulk/v1/leads/export.json"
        assert api.get(path)["success"] is True, i
    limited = api.get("/bulk/v1/leads/export.json")
    assert (
        _codes(limited) == ["606"]
        and limited["errors"][0]["message"] == "Max rate limit '100' exceeded with in '20' secs"
    )
    assert mkto.app.calls[MKTO_COUNTED] == 100 and mkto.gate.daily_calls == 101
    mkto.clock.advance(20)
    assert api.get("/rest/v1/activities/types.json")["success"] is True


def test_marketo_daily_quota_50000(mkto: MarketoSandbox) -> None:
    api = _Api(mkto)
    mkto.set_limits({**REALISTIC["marketo"], "calls_per_window": None})  # the day, not the window, under test
    for _ in range(49_999):
        assert mkto.gate.enter() is None
        mkto.gate.leave()
    assert api.get("/rest/v1/activities/types.json")["success"] is True  # call 50,000
    assert _codes(api.get("/bulk/v1/leads/export.json")) == ["607"]
    mkto.clock.advance(86_400)  # resets at midnight US Central
    assert _Api(mkto).get("/rest/v1/activities/types.json")["success"] is True


def test_marketo_10_concurrent_calls(mkto: MarketoSandbox) -> None:
    api = _Api(mkto)
    mkto.set_limits({**REALISTIC["marketo"], "latency_seconds": 0.5})  # calls held in flight
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(api.get("/rest/v1/activities/types.json")))
        for _ in range(11)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["success"] for r in results) == [False] + [True] * 10
    assert [c for r in results for c in _codes(r)] == ["615"]


def _export(api: _Api, sb: MarketoSandbox) -> str:
    now = sb.clock.now()
    flt = {"createdAt": {"startAt": iso(now - timedelta(days=1)), "endAt": iso(now + timedelta(minutes=1))}}
    return api.post("/bulk/v1/leads/export/create.json", {"fields": ["email"], "filter": flt})["result"][0][
        "exportId"
    ]


def test_marketo_bulk_extract_2_processing_10_queued_500_mb(mkto: MarketoSandbox) -> None:
    api = _Api(mkto)
    mkto.set_limits({**REALISTIC["marketo"], "bulk_processing_seconds": 60})
    ids = [_export(api, mkto) for _ in range(11)]
    for eid in ids[:10]:
        assert api.post(f"/bulk/v1/leads/export/{eid}/enqueue.json")["success"] is True
    refused = api.post(f"/bulk/v1/leads/export/{ids[10]}/enqueue.json")
    assert _codes(refused) == ["1029"] and "queue" in refused["errors"][0]["message"]
    states = [api.get(f"/bulk/v1/leads/export/{e}/status.json")["result"][0]["status"] for e in ids[:10]]
    assert states == ["Processing"] * 2 + ["Queued"] * 8
    mkto.clock.advance(21)  # a new rate window for the calls below
    mkto.bulk.exported_bytes_today = 500 * 1024 * 1024  # the day's 500 MB extracted
    for eid in ids[:10]:
        api.post(f"/bulk/v1/leads/export/{eid}/cancel.json")
    quota = api.post(f"/bulk/v1/leads/export/{ids[10]}/enqueue.json")
    assert _codes(quota) == ["1029"] and "quota" in quota["errors"][0]["message"]


def test_marketo_bulk_import_2_processing_10_queued_10_mb(mkto: MarketoSandbox) -> None:
    api = _Api(mkto)
    mkto.set_limits({**REALISTIC["marketo"], "bulk_processing_seconds": 60})

    def upload(data: bytes) -> Any:
        return api.http.post(
            "/bulk/v1/leads.json", params={"format": "csv"}, files={"file": ("leads.csv", data, "text/csv")}
        )

    batches = [upload(f"email\nu{i}@example.com\n".encode()).json() for i in range(10)]
    assert all(b["success"] for b in batches)
    statuses = [
        api.get(f"/bulk/v1/leads/batch/{b['result'][0]['batchId']}.json")["result"][0]["status"]
        for b in batches
    ]
    assert statuses.count("Importing") == 2 and statuses.count("Queued") == 8
    assert _codes(upload(b"email\nx@example.com\n").json()) == ["1016"]
    mkto.clock.advance(21)
    over = upload(b"email\n" + b"a@example.com\n" * (10 * 1024 * 1024 // 14 + 1))  # just over 10 MB
    assert over.status_code == 200 and _codes(over.json()) == ["1003"] and "10 MB" in over.text


def test_our_marketo_client_never_sees_606_or_615() -> None:
    # Our governor paces calls under the instance's window, scaled to 10 calls / 2 s so the test is quick. As in
    # production (5 of Marketo's 10), it keeps a margin below the concurrency limit: a slot the client has
    # released may still be held by the server for the moment it takes to finish the response.
    sb = MarketoSandbox(limits={"calls_per_window": 10, "window_seconds": 2.0, "concurrent": 3}).start()
    try:
        gov = RateGovernor(calls_per_window=10, window_seconds=2.0, max_concurrent=2, safety_seconds=0.25)
        client = MarketoClient(sb.base_url, sb.client_id, sb.client_secret, governor=gov)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(8):
                    client.activity_types()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and sb.gate.rejected == {}
        assert sb.app.calls[MKTO_COUNTED] == 24
        client.close()
    finally:
        sb.stop()


# ============================================================================================ the floor
def test_budget_floor_uses_the_limiters_counts() -> None:
    calls = {MKTO_COUNTED: 1001, DYN_COUNTED: 6001, "marketo.leads.sync": 5000, "dynamics.create": 90_000}
    floor = budget_floor(calls)
    assert floor["per_service"] == {"marketo": 200.0, "dynamics": 300.0} and floor["seconds"] == 300.0
    assert budget_floor({})["seconds"] == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_no_run_can_be_measured_below_its_floor(seed: int, ca: SandboxCA) -> None:
    """Whatever a client does (bursts, retries, idling), the sandbox time between its first and last admitted
    call is never below the floor computed from the admitted counts."""
    rng = random.Random(seed)
    mk = MarketoSandbox(limits=dict(REALISTIC["marketo"]))
    dv = DynamicsSandbox(clock=Clock(), limits=dict(REALISTIC["dynamics"]))
    start_m, start_d = mk.clock.timestamp(), dv.clock.timestamp()
    admitted_m: list[float] = []
    admitted_d: list[float] = []
    for _ in range(400):
        burst = rng.choice([1, 1, 5, 50, 300])
        for _ in range(burst):
            if mk.gate.enter() is None:
                mk.gate.leave()
                admitted_m.append(mk.clock.timestamp())
        for _ in range(burst * 3):
            if dv._check_limits() is None:
                with dv._limit_lock:
                    dv._in_flight -= 1
                admitted_d.append(dv.clock.timestamp())
        step = rng.choice([0.0, 0.01, 0.5, 3.0, 21.0])
        mk.clock.advance(step)
        dv.clock.advance(step)
    assert len(admitted_m) > 1000 and len(admitted_d) > 6000  # beyond one window of each
    for admitted, budget, start in (
        (admitted_m, API_BUDGET["marketo"], start_m),
        (admitted_d, API_BUDGET["dynamics"], start_d),
    ):
        assert admitted[-1] - admitted[0] >= budget_floor_seconds(len(admitted), *budget)
        assert admitted[0] >= start
    assert (
        budget_floor({MKTO_COUNTED: len(admitted_m), DYN_COUNTED: 0})["seconds"]
        <= admitted_m[-1] - admitted_m[0]
    )
