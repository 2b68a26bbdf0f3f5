"""Security: TLS verified by default, secrets and tokens never stored or logged, API values are only data."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from sync_pipeline.clients.dynamics import DynamicsClient, filter_eq, odata_literal
from sync_pipeline.clients.marketo import MarketoClient
from sync_pipeline.sandbox.runner import Sandbox

HOSTILE = [
    "{{7*7}}",
    "__import__('os').system('echo pwned')",
    "'; DROP TABLE ledger; --",
    "${jndi:ldap://x/a}",
    "<script>alert(1)</script>",
    "Robert'); DELETE FROM identity WHERE ('1'='1",
]


def _is_tls_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc} {exc.__cause__!r}".lower()
    return "certificate" in text or "ssl" in text


@pytest.fixture
def tls_sandbox(tmp_path: Path) -> Any:
    with Sandbox(tmp_path / "tls", tls=True) as sb:
        sb.populate("tiny", seed=0)
        yield sb


def test_tls_is_verified_by_default_and_a_custom_ca_bundle_works(tls_sandbox: Sandbox) -> None:
    s = tls_sandbox.settings()
    assert s["DYNAMICS_URL"].startswith("https://") and s["MARKETO_BASE_URL"].startswith("https://")
    # Default: the system trust store, which does not know the sandbox CA -> refused.
    with pytest.raises(Exception) as refused_d:
        DynamicsClient(
            s["DYNAMICS_URL"],
            s["DYNAMICS_AUTHORITY"],
            s["DYNAMICS_CLIENT_ID"],
            s["DYNAMICS_CLIENT_SECRET"],
            max_retries=0,
        ).whoami()
    assert _is_tls_failure(refused_d.value), refused_d.value
    with pytest.raises(Exception) as refused_m:
        MarketoClient(
            s["MARKETO_BASE_URL"], s["MARKETO_CLIENT_ID"], s["MARKETO_CLIENT_SECRET"], max_retries=0
        ).describe_leads()
    assert _is_tls_failure(refused_m.value), refused_m.value
    # Neither refusal message carries a secret.
    for exc in (refused_d.value, refused_m.value):
        assert s["DYNAMICS_CLIENT_SECRET"] not in str(exc) and s["MARKETO_CLIENT_SECRET"] not in str(exc)
    # With the sandbox CA as the bundle (SYNC_CA_BUNDLE): accepted.
    ca = s["SYNC_CA_BUNDLE"]
    who = DynamicsClient(
        s["DYNAMICS_URL"],
        s["DYNAMICS_AUTHORITY"],
        s["DYNAMICS_CLIENT_ID"],
        s["DYNAMICS_CLIENT_SECRET"],
        verify=ca,
    ).whoami()
    assert who["OrganizationId"] == tls_sandbox.dynamics.organization_id
    fields = MarketoClient(
        s["MARKETO_BASE_URL"], s["MARKETO_CLIENT_ID"], s["MARKETO_CLIENT_SECRET"], verify=ca
    ).describe_leads()
    assert any(f.get("rest", {}).get("name") == "email" for f in fields)
    # A plain httpx call without the CA is refused too: the sandbox really serves TLS with its own CA.
    with pytest.raises(httpx.ConnectError):
        httpx.get(s["MARKETO_BASE_URL"] + "/identity/oauth/token")


def test_odata_literals_are_escaped_and_filters_return_only_the_intended_row(sandbox: Sandbox) -> None:
    s = sandbox.settings()
    client = DynamicsClient(
        s["DYNAMICS_URL"],
        s["DYNAMICS_AUTHORITY"],
        s["DYNAMICS_CLIENT_ID"],
        s["DYNAMICS_CLIENT_SECRET"],
        verify=s["SYNC_CA_BUNDLE"],
    )
    names = ["O'Brien & Sons", "x' or name ne 'x", "a') or (name ne '", "plain", "x' or 1 eq 1 or name eq 'y"]
    for name in names:
        sandbox.dynamics_insert("account", {"accountid": str(uuid.uuid4()), "name": name})
    assert odata_literal("O'Brien") == "'O''Brien'"
    assert filter_eq("name", "x' or name ne 'x") == "name eq 'x'' or name ne ''x'"
    for name in names:
        rows = [
            r
            for page in client.iter_pages("accounts", ["name"], filter=filter_eq("name", name))
            for r in page
        ]
        assert [r["name"] for r in rows] == [name], f"filter on {name!r} returned {rows}"
    with pytest.raises(ValueError, match="not a valid attribute name"):
        filter_eq("name eq 'a' or accountid", "x")


def _contact_person(sb: Sandbox) -> tuple[str, int]:
    for row in sb.dynamics_rows("contact", limit=1000):
        ids = sb.marketo_find_leads("dynamicsId", row["contactid"])
        if len(ids) == 1 and row.get("new_synctomkto") is not False:
            return row["contactid"], ids[0]
    raise AssertionError("no synced contact in the tiny org")


def test_api_values_are_data_and_no_secret_or_token_leaks(
    harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sb = harness.sandbox
    results = [harness.run("latest")]
    did, mid = _contact_person(sb)
    account = sb.dynamics_rows("account", limit=1)[0]["accountid"]
    # Marketo -> Dynamics (a Marketo-only change of a contact flows back) and Dynamics -> Marketo.
    sb.marketo_update_lead(mid, {"title": HOSTILE[0], "personNotes": HOSTILE[1], "city": HOSTILE[2]})
    sb.dynamics_update("account", account, {"name": HOSTILE[3], "description": HOSTILE[4]})
    sb.dynamics_update("contact", did, {"address1_line1": HOSTILE[5]})
    results.append(harness.run("latest"))
    results.append(harness.run("latest"))
    row = sb.dynamics_get("contact", did)
    assert (row["jobtitle"], row["description"], row["address1_city"]) == tuple(HOSTILE[:3])
    assert sb.marketo_get_lead(mid)["address"] == HOSTILE[5]
    company = next(c for c in sb.marketo_rows("company", limit=1000) if c["externalCompanyId"] == account)
    assert (company["company"], company["companyNotes"]) == (HOSTILE[3], HOSTILE[4])
    # The state store is intact (no statement was built from a value) and recorded the values verbatim.
    assert harness.query("SELECT count(*) FROM ledger")[0][0] > 0
    assert harness.query("SELECT count(*) FROM identity")[0][0] > 0
    assert {
        v
        for (v,) in harness.query(
            "SELECT value_after FROM ledger WHERE dynamics_id IN (?, ?)", [did, account]
        )
    } >= set(HOSTILE[:6])

    secrets = [sb.dynamics.client_secret, sb.marketo.client_secret]
    tokens = list(sb.dynamics.tokens._tokens) + list(sb.marketo._tokens)
    assert tokens, "the sandbox issued no tokens, so the scan would prove nothing"
    needles = [s for s in secrets + tokens if len(s) >= 8]

    haystacks: dict[str, str] = {"caplog": caplog.text}
    for n, result in enumerate(results):
        logs = harness.instance.all_logs(result.run_id)
        haystacks[f"run {n} event log"] = "\n".join(f"{e.user_message} {e.dagster_event!r}" for e in logs)
        haystacks[f"run {n} metadata"] = repr(
            [ev.materialization.metadata for ev in result.get_asset_materialization_events()]
        )
    haystacks["duckdb file"] = harness.state_path.read_bytes().decode("latin-1")
    haystacks["resources repr"] = repr(_resources())
    for where, text in haystacks.items():
        for needle in needles:
            assert needle not in text, f"a secret or access token appears in the {where}"


def test_wrong_credentials_fail_without_echoing_the_secret(sandbox: Sandbox) -> None:
    s = sandbox.settings()
    wrong = "wrong-" + uuid.uuid4().hex
    with pytest.raises(Exception) as d_exc:
        DynamicsClient(
            s["DYNAMICS_URL"],
            s["DYNAMICS_AUTHORITY"],
            s["DYNAMICS_CLIENT_ID"],
            wrong,
            verify=s["SYNC_CA_BUNDLE"],
            max_retries=0,
        ).whoami()
    with pytest.raises(Exception) as m_exc:
        MarketoClient(
            s["MARKETO_BASE_URL"], s["MARKETO_CLIENT_ID"], wrong, verify=s["SYNC_CA_BUNDLE"], max_retries=0
        ).describe_leads()
    for exc in (d_exc.value, m_exc.value):
        text = f"{exc} {exc!r}"
        assert (
            wrong not in text
            and s["DYNAMICS_CLIENT_SECRET"] not in text
            and s["MARKETO_CLIENT_SECRET"] not in text
        )
        assert "client" in text.lower() or "credential" in text.lower() or "secret" in text.lower(), text
    client = MarketoClient(
        s["MARKETO_BASE_URL"], s["MARKETO_CLIENT_ID"], s["MARKETO_CLIENT_SECRET"], verify=s["SYNC_CA_BUNDLE"]
    )
    assert s["MARKETO_CLIENT_SECRET"] not in repr(client)


def _resources() -> Any:
    from sync_pipeline import runs
    from sync_pipeline.connection.resources import build_resources

    return build_resources(runs.connection())
