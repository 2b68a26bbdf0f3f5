"""Preflight against the sandbox (issue 11): a table without the sync-filter column syncs everything, a mapped
column that does not exist fails `validate` and the run at once, option labels come from the org's metadata."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from click.testing import CliRunner

from sync_pipeline import runs
from sync_pipeline.cli import main
from sync_pipeline.config.model import DEFAULT_PATH
from sync_pipeline.sandbox.runner import Sandbox
from sync_pipeline.sandbox.schema import load_schema

NO_FILTER_ON_ACCOUNT = """
dynamics:
  tables:
    account: {sync_filter_column: false}
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SYNC_STATE_PATH", str(tmp_path / "state.duckdb"))
    monkeypatch.setenv("COLUMNS", "400")
    yield
    runs._definitions.cache_clear()


def _point_at(sb: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in sb.settings().items():
        monkeypatch.setenv(key, value)


def _config(tmp_path: Path, change) -> Path:  # noqa: ANN001
    raw = yaml.safe_load(DEFAULT_PATH.read_text())
    change(raw)
    path = tmp_path / "entities.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _entity(raw: dict, name: str) -> dict:
    return next(e for e in raw["entities"] if e["name"] == name)


def test_a_table_without_the_filter_column_syncs_every_row_and_labels_follow_the_org(
    tmp_path: Path, monkeypatch, env
) -> None:
    schema_file = tmp_path / "schema.yaml"
    schema_file.write_text(NO_FILTER_ON_ACCOUNT)
    # Org metadata is reused for sync.metadata_ttl_seconds (an hour by default): a second here.
    ttl = 1
    monkeypatch.setenv(
        "SYNC_CONFIG", str(_config(tmp_path, lambda raw: raw["sync"].update(metadata_ttl_seconds=ttl)))
    )
    with Sandbox(tmp_path / "sb", schema=load_schema(schema_file)) as sb:
        sb.populate("tiny", seed=0)
        _point_at(sb, monkeypatch)
        # The packaged entities.yaml names new_synctomkto on account; this org's account table lacks it.
        assert "new_synctomkto" not in sb.dynamics_rows("account", 1)[0]
        out = CliRunner().invoke(main, ["validate"], catch_exceptions=False)
        assert out.exit_code == 0, out.output
        assert "account.new_synctomkto" in out.output and "every row syncs" in out.output
        instance = dg.DagsterInstance.ephemeral()
        assert runs.run_sync(instance, scope="all").success
        accounts = {r["accountid"] for r in sb.dynamics_rows("account", 10_000)}
        companies = {c["externalCompanyId"] for c in sb.marketo_rows("company", 10_000)}
        assert accounts and accounts <= companies  # all of them, not only the ones flagged Yes
        # Contacts still have the column: an explicit No keeps a contact out, as before.
        excluded = [
            r["contactid"] for r in sb.dynamics_rows("contact", 10_000) if r.get("new_synctomkto") is False
        ]
        assert excluded
        persons = {p.get("dynamicsId"): p for p in sb.marketo_rows("lead", 100_000)}
        assert not set(persons) & set(excluded)

        # Option labels come from the org's metadata, and a label an admin renames reaches the first sync after
        # the cached metadata's TTL.
        leads = [r["leadid"] for r in sb.dynamics_rows("lead", 10_000) if r.get("leadsourcecode") == 8]
        synced = [i for i in leads if i in persons]
        assert synced and all(persons[i].get("leadSource") == "Web" for i in synced)
        sb.dynamics.schema.set_option_label("lead", "leadsourcecode", 8, "Website")
        time.sleep(ttl + 0.1)
        result = runs.run_sync(instance, scope="latest")
        assert result.success
        persons = {p.get("dynamicsId"): p for p in sb.marketo_rows("lead", 100_000)}
        assert all(persons[i].get("leadSource") == "Website" for i in synced)
        # Exactly the renamed label was written: other codes' records were not touched.
        from sync_pipeline.engine.store import state

        with state.connect(tmp_path / "state.duckdb") as con:
            written = con.execute(
                "SELECT DISTINCT value_after FROM ledger WHERE run_id = ? AND field = 'leadSource'",
                [result.run_id],
            ).fetchall()
        assert written == [("Website",)]


def test_a_missing_column_fails_validate_and_the_run_at_once(
    sandbox: Sandbox, tmp_path: Path, monkeypatch, env
) -> None:
    def change(raw: dict) -> None:
        _entity(raw, "lead")["extra_fields"].append({"marketo": "fax2", "dynamics": "new_faxnumber"})

    monkeypatch.setenv("SYNC_CONFIG", str(_config(tmp_path, change)))
    _point_at(sandbox, monkeypatch)
    out = CliRunner().invoke(main, ["validate", "--errors-only"], catch_exceptions=False)
    assert out.exit_code == 1, out.output
    assert "column 'new_faxnumber' of table 'lead'" in out.output and "does not exist" in out.output
    assert "Marketo field 'fax2' of lead" in out.output  # Marketo has no such field either

    started = time.monotonic()
    result = runs.run_sync(dg.DagsterInstance.ephemeral(), scope="latest", raise_on_error=False)
    took = time.monotonic() - started
    assert not result.success
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failures and all(
        "new_faxnumber" in e.event_specific_data.error.message
        and "'lead'" in e.event_specific_data.error.message
        for e in failures
    )
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert took < 30  # no retry backoff (the policy waits 10 s, then 20 s)
    assert sandbox.calls().get("dynamics.query", 0) == 0  # no data was read, let alone written


def test_validate_reports_lengths_tracking_and_access_each_with_its_fix(
    tmp_path: Path, monkeypatch, env
) -> None:
    schema_file = tmp_path / "schema.yaml"
    schema_file.write_text("dynamics:\n  tables:\n    opportunity: {change_tracking: false}\n")
    with Sandbox(tmp_path / "sb", schema=load_schema(schema_file)) as sb:
        _point_at(sb, monkeypatch)
        out = CliRunner().invoke(main, ["validate", "--json"], catch_exceptions=False)
        assert out.exit_code == 1  # change tracking off is an error
        import json

        checks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        by = {(c["check"], c["subject"]): c for c in checks}
        assert by[("dynamics.tracking", "opportunity")]["status"] == "error"
        assert "Track changes" in by[("dynamics.tracking", "opportunity")]["fix"]
        # Dynamics lead.subject holds 300 characters, the Marketo field it fills 255: a warning naming both.
        topic = by[("length", "lead.topic")]
        assert topic["status"] == "warning"
        assert (
            "Dynamics lead.subject holds 300" in topic["message"]
            and "Marketo lead.topic 255" in topic["message"]
        )
        # Two-way the other way: Marketo's firstName (255) is longer than Dynamics' (50).
        assert any(
            c["check"] == "length"
            and "Marketo lead.firstName holds 255" in c["message"]
            and "Dynamics lead.firstname 50" in c["message"]
            for c in checks
        )
        login = next(c for c in checks if c["check"] == "dynamics.login")
        assert (
            "Sandbox Org (sandboxorg" in login["message"] and sb.dynamics.organization_id in login["message"]
        )
        for name in ("dynamics.login", "marketo.login", "marketo.activities", "marketo.bulk"):
            assert any(c["check"] == name and c["status"] == "ok" for c in checks), name
        quota = by[("marketo.quota", "marketo")]
        assert (
            quota["status"] == "ok"
            and "calls used today" in quota["message"]
            and " 0 calls" not in quota["message"]
        )
        assert by[("dynamics.options", "lead.leadsourcecode")]["status"] == "ok"
        assert by[("marketo.field", "lead.dynamicsId")]["status"] == "ok"  # the key is searchable
        assert sb.settings()["DYNAMICS_CLIENT_SECRET"] not in out.output

        # The same checks as a Dagster job users can run from the UI.
        from sync_pipeline.connection.validate import validate_job_name

        result = (
            runs.definitions()
            .resolve_job_def(validate_job_name(runs.DEFAULT_CONNECTION))
            .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
        )
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
        assert "change tracking is not enabled" in failure.event_specific_data.error.message
        assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
