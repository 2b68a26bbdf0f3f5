from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sync_pipeline.bench.sandbox_rates import dynamics_token
from sync_pipeline.sandbox.admin import AdminClient, SandboxAdminError
from sync_pipeline.sandbox.runner import Sandbox, spawn_sandbox

ENV_KEYS = {
    "DYNAMICS_URL",
    "DYNAMICS_AUTHORITY",
    "DYNAMICS_CLIENT_ID",
    "DYNAMICS_CLIENT_SECRET",
    "MARKETO_BASE_URL",
    "MARKETO_CLIENT_ID",
    "MARKETO_CLIENT_SECRET",
    "SYNC_CA_BUNDLE",
}


def client_for(settings: dict[str, str]) -> httpx.Client:
    return httpx.Client(
        verify=ssl.create_default_context(cafile=settings["SYNC_CA_BUNDLE"]), trust_env=False, timeout=30
    )


def query_leads(settings: dict[str, str], token: str) -> httpx.Response:
    with client_for(settings) as http:
        return http.get(
            f"{settings['DYNAMICS_URL']}/api/data/v9.2/leads?$select=fullname",
            headers={"Authorization": f"Bearer {token}", "Prefer": "odata.maxpagesize=50"},
        )


def marketo_token(settings: dict[str, str]) -> str:
    with client_for(settings) as http:
        resp = http.get(
            f"{settings['MARKETO_BASE_URL']}/identity/oauth/token",
            params={
                "grant_type": "client_credentials",
                "client_id": settings["MARKETO_CLIENT_ID"],
                "client_secret": settings["MARKETO_CLIENT_SECRET"],
            },
        )
    resp.raise_for_status()
    return resp.json()["access_token"]


def test_settings_reach_both_services_with_real_clients(
    populated_sandbox: Sandbox, sandbox_settings: dict[str, str]
) -> None:
    settings = sandbox_settings
    assert set(settings) >= ENV_KEYS
    assert settings["DYNAMICS_AUTHORITY"].startswith("https://")
    assert Path(settings["SYNC_CA_BUNDLE"]).is_file()
    resp = query_leads(settings, dynamics_token(settings))  # msal, against the sandbox's identity endpoint
    assert resp.status_code == 200
    assert len(resp.json()["value"]) == 50 and "@odata.nextLink" in resp.json()
    assert marketo_token(settings)
    calls = populated_sandbox.calls()
    assert calls["identity.token"] == 1 and calls["dynamics.query"] == 1 and calls["marketo.identity"] == 1
    populated_sandbox.reset_calls()
    assert populated_sandbox.calls() == {}


def test_reprs_hold_no_secrets(sandbox: Sandbox) -> None:
    settings = sandbox.settings()
    for secret in (settings["DYNAMICS_CLIENT_SECRET"], settings["MARKETO_CLIENT_SECRET"]):
        assert secret not in repr(sandbox)


def test_tls_serves_the_apis_over_https(tmp_path: Path) -> None:
    with Sandbox(tmp_path, tls=True) as sb:
        settings = sb.settings()
        assert settings["DYNAMICS_URL"].startswith("https://") and settings["MARKETO_BASE_URL"].startswith(
            "https://"
        )
        assert query_leads(settings, dynamics_token(settings)).status_code == 200
        assert marketo_token(settings)


def test_fault_plans_go_to_the_apps_that_have_the_routes(populated_sandbox: Sandbox) -> None:
    sb = populated_sandbox
    settings = sb.settings()
    token = dynamics_token(settings)
    sb.faults(
        [
            {
                "pattern": "dynamics.query",
                "rate": 1.0,
                "count": 1,
                "faults": [{"kind": "status", "status": 503}],
            },
            {"pattern": "marketo.identity", "rate": 1.0, "faults": [{"kind": "code", "code": "611"}]},
        ],
        seed=3,
    )
    assert sb.dynamics.api_app.faults.rules and not sb.dynamics.identity_app.faults.rules
    assert [r.pattern for r in sb.marketo.app.faults.rules] == ["marketo.identity"]
    assert query_leads(settings, token).status_code == 503
    assert query_leads(settings, token).status_code == 200  # count=1: only the first
    assert sb.faults_injected() == {"dynamics.query:status": 1}
    sb.clear_faults()
    assert marketo_token(settings)
    with pytest.raises(ValueError, match="fault rule 0"):
        sb.faults([{"pattern": "dynamics.*", "faults": []}])


def test_profile_switches_limits_on_both_services(sandbox: Sandbox) -> None:
    sandbox.set_profile("realistic")
    assert sandbox.dynamics.limits["requests_per_window"] == 6000
    assert sandbox.marketo.gate.limits.calls_per_window == 100
    sandbox.set_profile("off")
    assert not sandbox.dynamics.limits
    with pytest.raises(ValueError, match="profile 'fast'"):
        sandbox.set_profile("fast")


def test_latency_delays_every_request(tmp_path: Path) -> None:
    with Sandbox(tmp_path, latency_seconds=0.2) as sb:
        settings = sb.settings()
        started = time.perf_counter()
        marketo_token(settings)
        assert time.perf_counter() - started >= 0.2


def test_admin_api_round_trips(populated_sandbox: Sandbox) -> None:
    sb = populated_sandbox
    admin = AdminClient(sb.admin_url)
    try:
        assert admin.dynamics_count("lead") == 120
        lead = next(
            r for r in admin.dynamics_rows("lead", 200) if r["statecode"] == 0 and r.get("companyname")
        )
        edited = admin.dynamics_update("lead", lead["leadid"], {"jobtitle": "Edited in the UI"})
        ui_user = sb.ui_user()
        assert edited["_modifiedby_value"] == ui_user and edited["versionnumber"] > lead["versionnumber"]
        assert sb.dynamics.store.get("lead", lead["leadid"])["jobtitle"] == "Edited in the UI"
        created = admin.qualify_lead(lead["leadid"], create_account=True, create_contact=True)
        contact = admin.dynamics_get("contact", created["contact"])
        assert contact["_originatingleadid_value"] == lead["leadid"]
        assert admin.dynamics_get("lead", lead["leadid"])["statecode"] == 1
        admin.dynamics_delete("contact", created["contact"])
        with pytest.raises(SandboxAdminError, match=f"contact {created['contact']} not found") as err:
            admin.dynamics_get("contact", created["contact"])
        assert err.value.status == 404
        inserted = admin.dynamics_insert("account", {"name": "Typed in the UI"})
        assert inserted["_ownerid_value"] == ui_user

        person = admin.marketo_create_lead({"email": "ui.person@example.com", "firstName": "Ui"})
        twin = admin.marketo_create_lead({"email": "ui.twin@example.com", "lastName": "Twin"})
        assert admin.marketo_find_leads("email", "UI.PERSON@example.com") == [person["id"]]
        assert admin.marketo_update_lead(person["id"], {"title": "CMO"})["title"] == "CMO"
        merged = admin.marketo_merge_leads(person["id"], [twin["id"]])
        assert merged["lastName"] == "Twin"
        admin.marketo_delete_lead(person["id"])
        assert admin.marketo_count("lead") == 24
        with pytest.raises(SandboxAdminError, match="Marketo lead .* not found"):
            admin.marketo_get_lead(person["id"])
        with pytest.raises(SandboxAdminError, match="Invalid email"):
            admin.marketo_create_lead({"email": "not an email"})

        before = sb.clock.now()
        admin.advance_clock(3600)
        assert (sb.clock.now() - before).total_seconds() >= 3600
        admin.set_profile("realistic")
        assert sb.profile == "realistic"
        admin.faults(
            [{"pattern": "marketo.*", "rate": 0.5, "faults": [{"kind": "code", "code": "606"}]}], seed=1
        )
        assert sb.marketo.app.faults.rules[0].rate == 0.5
        admin.clear_faults()
        assert admin.calls() == sb.calls()
        assert admin.populate("tiny", seed=5)["dynamics.lead"] == 120
        assert admin.dynamics_count("lead") == 240
    finally:
        admin.close()


def test_admin_api_rejects_bad_requests_clearly(sandbox: Sandbox) -> None:
    url = sandbox.admin_url + "/_sandbox"
    with httpx.Client(trust_env=False) as http:
        resp = http.put(f"{url}/limits", content=b"{nope")
        assert resp.status_code == 400 and "not JSON" in resp.json()["error"]
        resp = http.get(f"{url}/dynamics/nosuchtable")
        assert resp.status_code == 404 and "nosuchtable" in resp.json()["error"]
        resp = http.get(f"{url}/marketo/leads/abc")
        assert resp.status_code == 400 and "'abc'" in resp.json()["error"]
        resp = http.post(f"{url}/marketo/leads/1/merge", json={"losers": []})
        assert resp.status_code == 400 and "losers" in resp.json()["error"]


def test_spawned_sandbox_serves_and_stops(tmp_path: Path) -> None:
    remote = spawn_sandbox(tmp_path, scale="tiny", seed=2)
    try:
        settings = remote.settings()
        assert set(settings) >= ENV_KEYS
        assert remote.populated["counts"]["dynamics.contact"] == 120
        assert query_leads(settings, dynamics_token(settings)).status_code == 200
        assert remote.calls()["dynamics.query"] == 1
        remote.reset_calls()
        assert remote.calls() == {}
        lead = remote.dynamics_rows("lead", 1)[0]
        assert remote.dynamics_update("lead", lead["leadid"], {"lastname": "Remote"})["fullname"].endswith(
            "Remote"
        )
        assert "secret" not in repr(remote)
    finally:
        assert remote.stop() == 0
    assert not (tmp_path / "sandbox-settings.json").exists()


def test_spawn_reports_a_child_that_fails_to_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 2.*--ports.*nonsense"):
        spawn_sandbox(tmp_path, ports={"nonsense": 1})


_PARENT = """
import sys, time
from sync_pipeline.sandbox.runner import spawn_sandbox
remote = spawn_sandbox(sys.argv[1])
print(remote.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_spawned_sandbox_dies_with_its_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
        info = json.loads((tmp_path / "sandbox-settings.json").read_text())
        assert info["pid"] == child_pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "sandbox process outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
