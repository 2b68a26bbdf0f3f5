"""Contract tests of DynamicsClient against the Dataverse sandbox over HTTPS with the generated CA."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import msal
import pytest

from sync_pipeline.clients.dynamics import (
    AuthenticationError,
    BatchRequest,
    DeltaTokenExpired,
    DynamicsClient,
    DynamicsError,
    PreconditionFailed,
    RecordNotFound,
    TransientError,
    filter_eq,
    odata_literal,
)
from sync_pipeline.resources.dynamics import DynamicsResource
from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.dynamics import DynamicsSandbox
from sync_pipeline.sandbox.faults import Fault
from sync_pipeline.sandbox.tls import SandboxCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SandboxCA:
    return SandboxCA.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def sb(ca: SandboxCA) -> Iterator[DynamicsSandbox]:
    ctx = ca.server_context()
    sandbox = DynamicsSandbox(clock=Clock()).start(identity_ssl=ctx, api_ssl=ctx)
    yield sandbox
    sandbox.stop()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(sb: DynamicsSandbox, ca: SandboxCA, sleeps: list[float]) -> Iterator[DynamicsClient]:
    with DynamicsClient(
        sb.api_url,
        sb.authority,
        sb.client_id,
        sb.client_secret,
        verify=str(ca.ca_path),
        timeout_seconds=10,
        max_retries=4,
        backoff_base=0.001,
        sleep=sleeps.append,
    ) as c:
        yield c


def test_unmodified_msal_gets_a_token(
    sb: DynamicsSandbox, ca: SandboxCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests lets these variables override a session's CA bundle; a real deployment sets neither for MSAL.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    app = msal.ConfidentialClientApplication(
        sb.client_id,
        authority=sb.authority,
        client_credential=sb.client_secret,
        verify=str(ca.ca_path),
        instance_discovery=False,
    )
    result = app.acquire_token_for_client(scopes=[f"{sb.api_url}/.default"])
    assert result["token_type"] == "Bearer" and result["access_token"]
    info, reason = sb.tokens.check(result["access_token"], sb.api_url)
    assert info is not None and reason == ""
    assert sb.identity_app.calls["identity.openid"] == 1 and sb.identity_app.calls["identity.token"] == 1
    wrong = msal.ConfidentialClientApplication(
        sb.client_id,
        authority=sb.authority,
        client_credential="nope",
        verify=str(ca.ca_path),
        instance_discovery=False,
    )
    refused = wrong.acquire_token_for_client(scopes=[f"{sb.api_url}/.default"])
    assert refused["error"] == "invalid_client" and 7000215 in refused["error_codes"]


def test_tls_refused_without_ca_bundle_accepted_with_it(sb: DynamicsSandbox, ca: SandboxCA) -> None:
    with (
        DynamicsClient(sb.api_url, sb.authority, sb.client_id, sb.client_secret, max_retries=0) as untrusting,
        pytest.raises(AuthenticationError) as info,
    ):
        untrusting.whoami()
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) and sb.client_secret not in str(info.value)
    with DynamicsClient(
        sb.api_url, sb.authority, sb.client_id, sb.client_secret, verify=str(ca.ca_path)
    ) as trusting:
        assert trusting.whoami()["UserId"] == sb.app_user_id


def test_bad_secret_error_names_client_not_secret(sb: DynamicsSandbox, ca: SandboxCA) -> None:
    secret = "super-secret-value-123"
    with DynamicsClient(sb.api_url, sb.authority, sb.client_id, secret, verify=str(ca.ca_path)) as bad:
        with pytest.raises(AuthenticationError) as info:
            bad.whoami()
        assert "AADSTS7000215" in str(info.value) and sb.client_id in str(info.value)
        assert secret not in str(info.value) and secret not in repr(bad)


def test_metadata_calls(client: DynamicsClient) -> None:
    defs = {d["LogicalName"]: d for d in client.entity_definitions()}
    assert defs["new_project"]["EntitySetName"] == "new_projects" and defs["new_project"]["IsCustomEntity"]
    custom = client.entity_definitions(select="LogicalName", filter="IsCustomEntity eq true")
    assert [d["LogicalName"] for d in custom] == ["new_project"]
    # MaxLength belongs to StringAttributeMetadata: Dataverse returns it for the derived items of the full
    # Attributes collection, but rejects it in a $select on the base AttributeMetadata.
    attrs = {a["LogicalName"]: a for a in client.attributes("lead")}
    assert attrs["subject"]["MaxLength"] == 300 and attrs["ownerid"]["AttributeType"] == "Owner"
    typed = client.attributes("lead", select="LogicalName,AttributeType")
    assert {"LogicalName", "AttributeType"} <= set(typed[0])


def test_token_reacquired_on_401(client: DynamicsClient, sb: DynamicsSandbox) -> None:
    client.whoami()
    sb.tokens.revoke_all()  # like a token the service no longer accepts
    assert client.whoami()["UserId"] == sb.app_user_id
    assert client.calls["reauth"] == 1 and sb.identity_app.calls["identity.token"] == 2
    sb.clock.advance(4000)  # past expiry by the server's clock; the client learns it from the 401
    assert client.whoami()["UserId"] == sb.app_user_id and client.calls["reauth"] == 2


def test_persistent_401_surfaces_after_one_reauth(client: DynamicsClient, sb: DynamicsSandbox) -> None:
    sb.api_app.faults.add("dynamics.whoami", 1.0, Fault("unauthorized"))
    with pytest.raises(AuthenticationError) as info:
        client.whoami()
    assert info.value.status == 401 and client.calls["reauth"] == 1


def test_429_waits_retry_after(client: DynamicsClient, sb: DynamicsSandbox, sleeps: list[float]) -> None:
    sb.api_app.faults.add("dynamics.whoami", 1.0, Fault("throttle", seconds=7), count=2)
    assert client.whoami()["UserId"] == sb.app_user_id
    assert sleeps == [7.0, 7.0] and client.calls["retry.429"] == 2


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=503),
        Fault("html", status=502),
        Fault("drop"),
        Fault("truncated"),
        Fault("malformed"),
    ],
)
def test_transient_failures_are_retried_on_reads(
    client: DynamicsClient, sb: DynamicsSandbox, fault: Fault
) -> None:
    sb.store.bulk_load("lead", [{"lastname": "Only"}])
    sb.api_app.faults.add("dynamics.query", 1.0, fault, count=2)
    pages = list(client.iter_pages("leads", ["lastname"]))
    assert [r["lastname"] for r in pages[0]] == ["Only"]
    assert sb.api_app.calls["dynamics.query"] == 3


def test_retries_are_bounded(client: DynamicsClient, sb: DynamicsSandbox) -> None:
    sb.api_app.faults.add("dynamics.whoami", 1.0, Fault("status", status=500))
    with pytest.raises(TransientError) as info:
        client.whoami()
    assert info.value.status == 500 and sb.api_app.calls["dynamics.whoami"] == 5


def test_create_is_idempotent_across_a_dropped_response(client: DynamicsClient, sb: DynamicsSandbox) -> None:
    # The server creates the row, then the response is lost: the retry must not create a second row.
    original = sb.api_app.routes
    create_route = next(r for r in original if r.name == "dynamics.create")
    handler, dropped = create_route.handler, []

    def create_then_drop(req: Any) -> Any:
        resp = handler(req)
        if not dropped:
            dropped.append(resp.status)
            from sync_pipeline.sandbox.http import Response

            return Response(close=True)
        return resp

    create_route.handler = create_then_drop
    new_id = client.create("accounts", {"name": "Once"})
    assert dropped == [204] and sb.store.count("account") == 1
    assert sb.store.get("account", new_id)["name"] == "Once"
    with pytest.raises(PreconditionFailed):  # a genuine duplicate (no retry involved) is still an error
        client.create("accounts", {"accountid": new_id, "name": "Twice"})


def test_writes_and_their_errors(client: DynamicsClient, sb: DynamicsSandbox) -> None:
    account = client.create("accounts", {"name": "Acme"})
    contact = client.create(
        "contacts", {"lastname": "O'Neil", "parentcustomerid_account@odata.bind": f"/accounts({account})"}
    )
    row = client.get("contacts", contact, ["lastname", "_parentcustomerid_value"])
    assert row["_parentcustomerid_value"] == account
    client.update("contacts", contact, {"jobtitle": "CFO"}, etag=row["@odata.etag"])
    with pytest.raises(PreconditionFailed) as stale:
        client.update("contacts", contact, {"jobtitle": "CEO"}, etag=row["@odata.etag"])
    assert f"contacts({contact})" in str(stale.value) and stale.value.status == 412
    missing = str(uuid.uuid4())
    with pytest.raises(RecordNotFound) as nf:
        client.update("contacts", missing, {"jobtitle": "x"})
    assert missing in str(nf.value)
    with pytest.raises(RecordNotFound):
        client.get("contacts", missing)
    client.upsert("contacts", missing, {"lastname": "Upserted"})
    assert sb.store.get("contact", missing)["lastname"] == "Upserted"
    with pytest.raises(DynamicsError) as bad:
        client.update("contacts", missing, {"lastname": "X" * 60})
    assert bad.value.status == 400 and bad.value.code == "0x80044331" and "lastname" in str(bad.value)
    client.delete("contacts", missing)
    with pytest.raises(RecordNotFound):
        client.delete("contacts", missing)
    matches = [
        r
        for page in client.iter_pages("contacts", ["lastname"], filter=filter_eq("lastname", "O'Neil"))
        for r in page
    ]
    assert [r["contactid"] for r in matches] == [contact]
    assert client.count("contacts", filter_eq("lastname", "O'Neil")) == 1
    assert (
        odata_literal("a'b") == "'a''b'" and odata_literal(None) == "null" and odata_literal(True) == "true"
    )
    with pytest.raises(ValueError):
        filter_eq("lastname eq 'x' or 1", "y")


def test_paging_over_12000_rows(client: DynamicsClient, sb: DynamicsSandbox) -> None:
    sb.store.bulk_load("lead", ({"lastname": f"L{i}"} for i in range(12_000)))
    pages = list(client.iter_pages("leads", ["lastname"], page_size=5000))
    assert [len(p) for p in pages] == [5000, 5000, 2000]
    assert len({r["leadid"] for p in pages for r in p}) == 12_000
    assert client.count("leads") == 12_000


def test_delta_and_expired_token(client: DynamicsClient, sb: DynamicsSandbox) -> None:
    sb.store.bulk_load("account", ({"name": f"A{i}"} for i in range(7)))
    full = client.read_changes("accounts", ["name"])
    assert len(full.rows) == 7 and full.deleted_ids == [] and "$deltatoken=" in full.delta_link
    first = full.rows[0]["accountid"]
    sb.store.update("account", first, {"name": "Renamed"})
    sb.store.delete("account", full.rows[1]["accountid"])
    delta = client.read_changes("accounts", ["name"], full.delta_link)
    assert [r["name"] for r in delta.rows] == ["Renamed"] and delta.deleted_ids == [full.rows[1]["accountid"]]
    sb.clock.advance(31 * 86400)
    with pytest.raises(DeltaTokenExpired) as info:
        client.read_changes("accounts", ["name"], delta.delta_link)
    assert "accounts" in str(info.value) and client.calls["reauth"] == 1  # the token expired as well


def test_batch_qualify_and_upsert_multiple(client: DynamicsClient, sb: DynamicsSandbox) -> None:
    responses = client.execute_batch(
        [
            BatchRequest("POST", "accounts", {"name": "Batch Co"}, content_id="1", changeset="a"),
            BatchRequest(
                "POST",
                "contacts",
                {"lastname": "Ref", "parentcustomerid_account@odata.bind": "$1"},
                content_id="2",
                changeset="a",
            ),
            BatchRequest("GET", "accounts?$select=name"),
            BatchRequest("POST", "accounts", {"nope": 1}),
        ]
    )
    assert [r.status for r in responses] == [204, 204, 200, 400]
    assert (
        responses[2].body["value"][0]["name"] == "Batch Co"
        and "'nope'" in responses[3].body["error"]["message"]
    )
    lead = sb.store.insert("lead", {"lastname": "Lee", "companyname": "Lee Ltd", "statecode": 0})
    created = client.qualify_lead(
        lead["leadid"], create_account=True, create_contact=True, create_opportunity=True
    )
    assert set(created) == {"account", "contact", "opportunity"}
    assert sb.store.get("contact", created["contact"])["_originatingleadid_value"] == lead["leadid"]
    ids = [str(uuid.uuid4()) for _ in range(3)]
    client.upsert_multiple(
        "accounts", "account", [{"accountid": i, "name": f"U{n}"} for n, i in enumerate(ids)]
    )
    assert [sb.store.get("account", i)["name"] for i in ids] == ["U0", "U1", "U2"]
    with pytest.raises(DynamicsError) as info:
        client.upsert_multiple(
            "accounts",
            "account",
            [{"accountid": ids[0], "name": "ok"}, {"accountid": ids[1], "industrycode": 999}],
        )
    assert "Targets[1]" in str(info.value) and sb.store.get("account", ids[0])["name"] == "U0"


def test_logs_carry_no_secrets(
    client: DynamicsClient, sb: DynamicsSandbox, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        client.whoami()
        sb.tokens.revoke_all()
        client.whoami()
    text = caplog.text
    assert "GET WhoAmI -> 200" in text
    assert sb.client_secret not in text and client._token and client._token not in text


def test_resource_builds_and_caches_client(sb: DynamicsSandbox, ca: SandboxCA) -> None:
    resource = DynamicsResource(
        url=sb.api_url,
        authority=sb.authority,
        client_id=sb.client_id,
        client_secret=sb.client_secret,
        ca_bundle=str(ca.ca_path),
        page_size=1000,
    )
    first = resource.get_client()
    assert first is resource.get_client() and first.page_size == 1000
    assert first.whoami()["UserId"] == sb.app_user_id
    assert sb.client_secret not in repr(resource)
    first.close()
