"""Operating it (issue 15) through real in-process Dagster runs on the sandbox: previews are pure, nothing is
written before the initial copy, held records are visible in metadata and checks, alerts say what they did,
failures name their cause first, range runs report only what is true per partition."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import dagster as dg
import pytest
from click.testing import CliRunner

from sync_pipeline import runs
from sync_pipeline.cli import main
from sync_pipeline.connection.assets import RUN_TOTALS
from sync_pipeline.connection.automation import ALERT_WEBHOOK_ENV, held_records_tick
from sync_pipeline.connection.keys import asset_key, key_name, stage_of
from sync_pipeline.engine.store import state as state_mod
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN
from sync_pipeline_tests.defs.test_sensors import settle, tick


def safety_tick(harness, monkeypatch, hours_later: float) -> Any:
    """A change-sensor tick ``hours_later`` than now (no change in either system): its safety tick is due after
    ``safety_tick_minutes`` without a run."""
    from sync_pipeline.connection import automation

    now = time.time()
    monkeypatch.setattr(automation.time, "time", lambda: now + hours_later * 3600)
    try:
        return tick(harness, None)
    finally:
        monkeypatch.setattr(automation.time, "time", time.time)


class _Context:
    """What held_records_tick uses of a sensor context: the cursor and a logger."""

    def __init__(self, cursor: str | None):
        import logging

        self.cursor = cursor
        self.log = logging.getLogger("alert_on_held_records")


def alert_tick(path: str, cursor: str | None) -> tuple[str, str | None]:
    """(skip message, new cursor) of one held-records tick."""
    result = held_records_tick(_Context(cursor), path)
    if isinstance(result, dg.SensorResult):
        return str(result.skip_reason.skip_message), result.cursor
    return str(result.skip_message), cursor


def hold_an_account(harness, code: int = 999) -> str:
    account_id = harness.query(
        "SELECT dynamics_id FROM identity WHERE entity = 'account' ORDER BY 1 LIMIT 1"
    )[0][0]
    harness.sandbox.dynamics_update(
        "account", account_id, {"industrycode": code}
    )  # no such option: rejected, held
    return account_id


def test_nothing_is_read_or_written_before_the_initial_copy(harness, monkeypatch) -> None:
    sb = harness.sandbox
    before = sb.calls()
    data = tick(harness, None)
    assert not data.run_requests and "waiting for the initial copy" in data.skip_message
    assert "sync-pipeline initial-copy" in data.skip_message
    late = safety_tick(harness, monkeypatch, hours_later=2)
    assert not late.run_requests and "waiting for the initial copy" in late.skip_message
    assert sb.calls() == before and not harness.state_path.exists()
    # Once the initial copy has run (launched deliberately), the sensor's safety tick requests a run when none
    # ran for an hour, though neither system reports a change; not before.
    assert harness.run("latest").success
    assert settle(harness, None).skip_message == "no changes"
    late = safety_tick(harness, monkeypatch, hours_later=2)
    assert len(late.run_requests) == 1 and late.run_requests[0].tags["sync/changed"].startswith("safety tick")


def test_plan_between_an_edit_and_the_sensor_does_not_swallow_the_change(harness) -> None:
    sb = harness.sandbox
    assert harness.run("latest").success  # the initial copy's effect on the latest window (cursors, mirrors)
    quiet = settle(harness, None)
    contact_id, person = (
        harness.query("""SELECT dynamics_id, marketo_id FROM identity WHERE entity = 'contact'
                                          AND state = 'active' ORDER BY 1 LIMIT 1""")[0]
    )
    sb.dynamics_update("contact", contact_id, {"telephone1": "+1 555 0150"})
    cursors = harness.query("SELECT name, value FROM cursors ORDER BY name")

    result = CliRunner(env={"COLUMNS": "300"}).invoke(
        main, ["plan", "--entity", "contact"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "+1 555 0150" in result.output
    assert harness.query("SELECT name, value FROM cursors ORDER BY name") == cursors  # nothing moved

    changed = tick(harness, quiet.cursor)  # the next tick still sees the change ...
    assert [r.tags["sync/changed"] for r in changed.run_requests] == ["dynamics:contact"]
    assert harness.run("latest").success  # ... and the run it requests delivers it
    assert sb.marketo_get_lead(int(person))["phone"] == "+1 555 0150"


def test_held_records_show_in_push_metadata_and_checks(harness) -> None:
    assert harness.run("latest").success
    account_id = hold_an_account(harness)
    result = harness.run("latest")
    assert result.success
    md = runs.materialized_metadata(result)
    held = harness.query("SELECT count(*) FROM failures WHERE entity = 'account' AND held")[0][0]
    assert held >= 1
    push = md[key_name(asset_key(CONN, "account", "push"))]
    assert push["records_held"] == held and push["records_quarantined"] == 0
    assert sum(v for k, v in push.items() if k.startswith("held/")) == held
    linked = harness.query("SELECT count(*) FROM identity WHERE entity = 'account' AND state = 'active'")[0][
        0
    ]
    assert push["dagster/row_count"] == linked  # the table as it is, not this run's writes
    # Every push asset has a held-records check; the account one is not green.
    checks = {(key_name(e.asset_key), e.check_name): e for e in result.get_asset_check_evaluations()}
    defs = runs.definitions()
    evaluation = checks[(key_name(asset_key(CONN, "account", "push")), "no_held_records")]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.metadata["held"].value == held and account_id in evaluation.metadata["sample"].value
    assert checks[(key_name(asset_key(CONN, "contact", "push")), "no_held_records")].passed
    assert checks[(key_name(asset_key(CONN, "lead", "push", "dynamics")), "no_held_records")].passed
    graph = defs.resolve_asset_graph()
    with_check = {k.asset_key for k in graph.asset_check_keys if k.name == "no_held_records"}
    pushes = {k for k in graph.get_all_asset_keys() if stage_of(k) == "push"}
    assert pushes and pushes == with_check


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        _Webhook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    _Webhook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()


def test_held_record_alerts_say_what_happened_and_notify_each_hold_once(
    harness, webhook, monkeypatch
) -> None:
    path = str(harness.state_path)
    assert "no state store yet" in alert_tick(path, None)[0]
    assert harness.run("latest").success
    account_id = hold_an_account(harness)
    assert harness.run("latest").success

    monkeypatch.delenv(ALERT_WEBHOOK_ENV, raising=False)
    message, cursor = alert_tick(path, None)
    assert "no webhook configured" in message and "notified" not in message
    held = harness.query("SELECT count(*) FROM failures WHERE held")[0][0]
    assert f"{held} newly held record(s) (" in message and "invalid_value: " in message
    assert "no newly held records" in alert_tick(path, cursor)[0]

    monkeypatch.setenv(ALERT_WEBHOOK_ENV, webhook)
    message, cursor = alert_tick(path, None)
    assert message.startswith(f"notified the webhook of {held} newly held record(s)")
    sent = [r["dynamics_id"] for p in _Webhook.received for r in p["records"]]
    assert len(sent) == len(set(sent)) == held and account_id in sent
    message, _ = alert_tick(path, cursor)  # the same hold is never sent twice
    assert "no newly held records" in message and len(_Webhook.received) == 1

    # While a run holds the store the tick is skipped with the reason, not failed with StateLockedError.
    import multiprocessing

    with state_mod.connect(path), multiprocessing.get_context("spawn").Pool(1) as pool:
        message = pool.apply(_tick_message, (path,))
    assert "state store busy" in message


def _tick_message(path: str) -> str:
    return alert_tick(path, None)[0]


def test_a_permanent_api_error_fails_in_seconds_naming_its_cause_first(harness) -> None:
    sb = harness.sandbox
    assert harness.run("latest").success
    account_id = harness.query(
        "SELECT dynamics_id FROM identity WHERE entity = 'account' ORDER BY 1 LIMIT 1"
    )[0][0]
    sb.dynamics_update("account", account_id, {"telephone1": "+1 555 0160"})
    # A 403 on every Dataverse query: permanent (no retry fixes permissions).
    sb.faults([{"pattern": "dynamics.query", "rate": 1.0, "faults": [{"kind": "status", "status": 403}]}])
    started = time.monotonic()
    result = harness.run("latest", raise_on_error=False)
    elapsed = time.monotonic() - started
    sb.clear_faults()
    assert not result.success and elapsed < 30
    events = [ev for ev in result.all_events if ev.step_key and "account" in ev.step_key]
    assert not [ev for ev in events if ev.event_type_value == "STEP_UP_FOR_RETRY"]  # no Dagster retries
    failure = next(ev for ev in events if ev.event_type_value == "STEP_FAILURE")
    error = failure.event_specific_data.error
    assert error.message.split(": ", 1)[1].startswith("Dynamics: HTTP 403"), error.message


def test_a_range_run_reports_totals_for_the_range_not_per_partition(harness) -> None:
    keys = runs.partition_keys()[-3:]  # a three-partition range ending in the latest window
    result = harness.run(f"{keys[0]}...{keys[-1]}")
    assert result.success
    events = [
        ev.materialization
        for ev in result.get_asset_materialization_events()
        if ev.materialization.asset_key == asset_key(CONN, "contact", "extract")
    ]
    assert len(events) == 3
    for m in events:
        assert "rows_read" not in m.metadata and "dagster/row_count" not in m.metadata
        assert RUN_TOTALS in m.metadata and "not per partition" in m.metadata["run_totals"].value
    assert events[0].metadata[RUN_TOTALS].value["rows_read"] > 0
    # Plans and pushes are unpartitioned: once in the range run, with their own numbers.
    for key in (asset_key(CONN, "contact", "plan"), asset_key(CONN, "contact", "push")):
        done = [
            ev.materialization
            for ev in result.get_asset_materialization_events()
            if ev.materialization.asset_key == key
        ]
        assert len(done) == 1 and done[0].partition is None, key
        assert RUN_TOTALS not in done[0].metadata and "dagster/row_count" in done[0].metadata, key
    linked = harness.query("SELECT count(*) FROM identity WHERE entity = 'contact' AND state = 'active'")[0][
        0
    ]
    assert done[0].metadata["dagster/row_count"].value == linked > 0
    # A single-partition run reports its own numbers and the mirror's size.
    md = runs.materialized_metadata(harness.run("latest"))
    extract = md[key_name(asset_key(CONN, "person", "extract"))]
    assert (
        extract["dagster/row_count"] == harness.query("SELECT count(*) FROM m_person WHERE NOT deleted")[0][0]
    )
    assert "rows_read" in extract
