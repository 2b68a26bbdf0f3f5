"""The wrong-environment guard: a state store refuses to write to a different org or instance.

After one sync the store is pinned to the sandbox's Dynamics organisation and Marketo instance. Pointing
the pipeline at another Dynamics org (a second sandbox) or another Marketo instance (a different Munchkin
id) makes every push refuse with ``WrongEnvironmentError`` naming what changed, and writes nothing, until
``rebaseline`` (engine function or ``sync-pipeline rebaseline --yes``) starts a fresh baseline.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from click.testing import CliRunner

from sync_pipeline import runs
from sync_pipeline.connection.keys import asset_key
from sync_pipeline.engine import guard
from sync_pipeline.engine.store import state
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN
from sync_pipeline.sandbox.runner import Sandbox

# One push asset is enough to exercise the guard (every push asset calls it before writing).
PUSH_USERS = [asset_key(CONN, "systemuser", "push")]


def _push_users(harness: Any) -> dg.ExecuteInProcessResult:
    return runs.run_sync(harness.instance, scope="latest", raise_on_error=False, selection=PUSH_USERS)


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(
        str(ev.step_failure_data.error)
        for ev in result.all_events
        if ev.is_step_failure and ev.step_failure_data and ev.step_failure_data.error
    )


def test_guard_directly_names_the_changed_system(tmp_path: Path) -> None:
    with state.connect(tmp_path / "s.duckdb") as con:
        con.execute("CREATE TABLE environment (key VARCHAR PRIMARY KEY, value VARCHAR, pinned_at TIMESTAMP)")
        guard.check_environment(con, dynamics_org="ORG-A", marketo_instance="111-AAA-111")
        guard.check_environment(con, dynamics_org="org-a", marketo_instance="111-aaa-111")  # case-insensitive
        with pytest.raises(guard.WrongEnvironmentError) as exc:
            guard.check_environment(con, dynamics_org="org-a", marketo_instance="222-BBB-222")
        assert "marketo_instance" in str(exc.value) and "'111-aaa-111'" in str(exc.value)
        assert "'222-bbb-222'" in str(exc.value) and "dynamics_organization_id" not in str(exc.value)


def test_whoami_confirms_the_pinned_org_once_per_ttl_and_at_once_for_another_url(tmp_path: Path) -> None:
    asked: list[str] = []

    def check(url: str, org: str, ttl: int = 3600, client_id: str = "app") -> None:
        def whoami() -> str:
            asked.append(url)
            return org

        guard.check_environment_recent(
            con,
            dynamics_url=url,
            client_id=client_id,
            organization_id=whoami,
            marketo_instance="111-AAA-111",
            ttl_seconds=ttl,
        )

    with state.connect(tmp_path / "s.duckdb") as con:
        con.execute("CREATE TABLE environment (key VARCHAR PRIMARY KEY, value VARCHAR, pinned_at TIMESTAMP)")
        check("https://a.crm.dynamics.com", "ORG-A")
        check("https://a.crm.dynamics.com/", "ORG-A")  # within the TTL, same URL: no call
        assert asked == ["https://a.crm.dynamics.com"]
        # Another URL (or app registration) is asked at once, and another org behind it is refused.
        with pytest.raises(guard.WrongEnvironmentError):
            check("https://b.crm.dynamics.com", "ORG-B")
        with pytest.raises(guard.WrongEnvironmentError):
            check("https://a.crm.dynamics.com", "ORG-B", client_id="other-app")
        assert len(asked) == 3
        # The refused checks confirmed nothing (the earlier confirmation of the pinned URL still holds).
        check("https://a.crm.dynamics.com", "ORG-A")
        assert len(asked) == 3
        # Once the TTL passed, WhoAmI runs again: an org swapped behind the same URL is refused then.
        con.execute(
            "UPDATE environment SET pinned_at = pinned_at - INTERVAL 2 HOUR WHERE key = ?", [guard.VERIFIED]
        )
        with pytest.raises(guard.WrongEnvironmentError):
            check("https://a.crm.dynamics.com", "ORG-SWAPPED")
        check("https://a.crm.dynamics.com", "ORG-A", ttl=0)
        check("https://a.crm.dynamics.com", "ORG-A", ttl=0)  # 0: every run asks
        assert len(asked) == 6


def test_other_marketo_instance_is_refused_until_rebaselined(
    fast_retry_harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = fast_retry_harness
    assert h.run("latest").success
    pinned = dict(h.query("SELECT key, value FROM environment"))
    assert pinned["marketo_instance"] == h.sandbox.marketo.munchkin_id.lower()
    monkeypatch.setenv("MARKETO_MUNCHKIN_ID", "999-ZZZ-999")
    h.sandbox.dynamics_insert(
        "systemuser",
        {"firstname": "Guard", "lastname": "Probe", "internalemailaddress": "guard.probe@example.com"},
    )
    before = h.sandbox.marketo_count("salesPerson")
    ledger_before = h.query("SELECT count(*) FROM ledger")[0][0]
    refused = h.run("latest", raise_on_error=False)
    assert refused.success is False
    text = _failure_text(refused)
    assert "WrongEnvironmentError" in text and "marketo_instance" in text and "999-zzz-999" in text
    assert "rebaseline" in text
    assert h.sandbox.marketo_count("salesPerson") == before  # nothing written to the "other" instance
    assert h.query("SELECT count(*) FROM ledger")[0][0] == ledger_before

    with state.connect(h.state_path) as con:
        forgotten = guard.rebaseline(con)
    # Both pins and the last WhoAmI confirmation are forgotten.
    assert forgotten["environment"] == 3 and forgotten["identity"] > 0
    assert h.run("latest").success
    assert dict(h.query("SELECT key, value FROM environment"))["marketo_instance"] == "999-zzz-999"
    assert h.sandbox.marketo_count("salesPerson") == before + 1  # the new user arrived exactly once
    assert h.sandbox.marketo_count("salesPerson") == h.sandbox.dynamics_count("systemuser")


def test_other_dynamics_org_is_refused_and_cli_rebaseline_resets(
    fast_retry_harness: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sync_pipeline.cli import main

    h = fast_retry_harness
    assert h.run("latest").success
    pinned_org = dict(h.query("SELECT key, value FROM environment"))["dynamics_organization_id"]
    other = Sandbox(tmp_path / "other-org")
    other.dynamics.organization_id = str(uuid.uuid4())  # a different organisation behind a different URL
    with other:
        other.populate("tiny", seed=7)
        for key in ("DYNAMICS_URL", "DYNAMICS_AUTHORITY", "DYNAMICS_CLIENT_ID", "DYNAMICS_CLIENT_SECRET"):
            monkeypatch.setenv(key, other.settings()[key])
        monkeypatch.setenv("SYNC_CA_BUNDLE", other.settings()["SYNC_CA_BUNDLE"])
        marketo_before = h.sandbox.marketo_count("salesPerson")
        text = _failure_text(_push_users(h))
        assert "WrongEnvironmentError" in text and "dynamics_organization_id" in text
        assert pinned_org in text and other.dynamics.organization_id.lower() in text
        assert h.sandbox.marketo_count("salesPerson") == marketo_before

        refused = CliRunner().invoke(main, ["rebaseline", "--state", str(h.state_path)])
        assert refused.exit_code != 0 and "--yes" in refused.output
        done = CliRunner().invoke(main, ["rebaseline", "--yes", "--state", str(h.state_path)])
        assert done.exit_code == 0, done.output
        assert "previously pinned" in done.output and pinned_org in done.output
        assert h.query("SELECT count(*) FROM environment")[0][0] == 0
        assert h.query("SELECT count(*) FROM identity")[0][0] == 0
        result = _push_users(h)
        assert result.success, _failure_text(result)
        assert (
            dict(h.query("SELECT key, value FROM environment"))["dynamics_organization_id"]
            == other.dynamics.organization_id.lower()
        )


def test_rebaseline_resync_creates_no_duplicate_persons(fast_retry_harness: Any) -> None:
    """Re-syncing after a rebaseline finds every person again (qualified leads' persons included)."""
    h = fast_retry_harness
    assert h.run("latest").success
    persons = h.sandbox.marketo_count("lead")
    with state.connect(h.state_path) as con:
        guard.rebaseline(con)
    result = h.run("latest", raise_on_error=False)
    twins = [p for p in h.sandbox.marketo_rows("lead", limit=100_000) if p.get("dynamicsId")]
    ids = [p["dynamicsId"] for p in twins]
    assert len(ids) == len(set(ids)), "a Dynamics record owns two Marketo persons after rebaseline"
    assert h.sandbox.marketo_count("lead") == persons
    assert result.success
