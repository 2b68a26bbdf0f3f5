"""The change sensor of the definitions, evaluated like the daemon does, against the synced sandbox."""

from __future__ import annotations

from typing import Any

import dagster as dg

from sync_pipeline import runs
from sync_pipeline.connection.build import sync_job_name
from sync_pipeline.connection.keys import qualified
from sync_pipeline.connection.resources import build_resources

SENSOR = qualified(runs.DEFAULT_CONNECTION, "change_sensor")


def tick(harness, cursor: str | None) -> Any:
    """One evaluation with a fresh context (what a restarted daemon does), carrying only the stored cursor."""
    defs = runs.definitions()
    sensor = defs.get_sensor_def(SENSOR)
    with dg.build_sensor_context(
        instance=harness.instance,
        resources=build_resources(runs.connection()),
        cursor=cursor,
        sensor_name=SENSOR,
        definitions=defs,
    ) as context:
        return sensor.evaluate_tick(context)


def settle(harness, cursor: str | None, max_runs: int = 3) -> Any:
    """Sync until the sensor sees nothing new (our own writes come back once as Marketo activities)."""
    for _ in range(max_runs):
        data = tick(harness, cursor)
        if not data.run_requests:
            return data
        cursor = data.cursor
        assert harness.run("latest").success
    raise AssertionError(f"the sensor still requests runs after {max_runs} syncs: {data.run_requests}")


def test_change_sensor_requests_once_per_change_and_misses_nothing_across_restarts(harness) -> None:
    sb = harness.sandbox
    latest = runs.partition_keys()[-1]

    # Nothing synced yet: the sensor waits for the initial copy (issue 15: it used to start it by itself).
    calls = sb.calls()
    first = tick(harness, None)
    assert not first.run_requests and "waiting for the initial copy" in (first.skip_message or "")
    assert not [k for k, v in sb.calls().items() if v != calls.get(k, 0) and not k.startswith("identity.")]
    assert not harness.state_path.exists()

    assert harness.run("all").success  # the initial copy, launched deliberately (what the backfill runs)
    quiet = settle(harness, first.cursor)
    assert quiet.skip_message == "no changes"
    before = sb.calls()
    assert tick(harness, quiet.cursor).skip_message == "no changes"
    spent = {k: v - before.get(k, 0) for k, v in sb.calls().items() if v != before.get(k, 0)}
    # An idle tick is cheap: one $batch holding every delta link, two Marketo activity calls (plus tokens).
    tables = len(harness.query("SELECT name FROM cursors WHERE name LIKE 'dynamics:delta:%'"))
    assert spent.pop("dynamics.batch") == 1 and spent.pop("dynamics.query") == tables
    assert spent.pop("parts.dynamics.batch") == tables  # the delta reads are parts of the one $batch
    assert (
        spent.pop("marketo.activities.leadchanges") == 1 and spent.pop("marketo.activities.deletedleads") == 1
    )
    assert set(spent) <= {"identity.openid", "identity.token", "marketo.identity"}, spent

    # A change in Dynamics: a new run key (the stored cursors moved since the first request).
    contact_id = harness.query("SELECT dynamics_id FROM identity WHERE entity = 'contact' LIMIT 1")[0][0]
    sb.dynamics_update("contact", contact_id, {"telephone1": "+1 555 0177"})
    changed = tick(harness, quiet.cursor)
    assert len(changed.run_requests) == 1
    key = changed.run_requests[0].run_key
    assert changed.run_requests[0].partition_key == latest and key.startswith("changes-")
    assert changed.run_requests[0].tags["sync/changed"] == "dynamics:contact"
    # Repeated ticks before the run: the same key, so the daemon launches it once.
    assert [r.run_key for r in tick(harness, changed.cursor).run_requests] == [key]
    # A daemon restart that lost the sensor cursor still sees the change: the state store is the memory.
    assert [r.run_key for r in tick(harness, None).run_requests] == [key]

    # A change in Marketo is seen too, and after the sync everything is quiet again.
    lead_person = int(
        harness.query("SELECT marketo_id FROM identity WHERE entity = 'lead' AND state = 'active' LIMIT 1")[
            0
        ][0]
    )
    sb.marketo_update_lead(lead_person, {"title": "Sensor Watcher"})
    both = tick(harness, changed.cursor)
    assert both.run_requests[0].tags["sync/changed"] == "dynamics:contact,marketo:person"
    assert harness.run("latest").success
    assert settle(harness, both.cursor).skip_message == "no changes"
    assert harness.query(
        "SELECT count(*) FROM ledger WHERE field = 'phone' AND value_after = '+1 555 0177'"
    ) == [(1,)]


def test_change_sensor_skips_while_a_sync_run_is_in_flight(harness) -> None:
    assert harness.run("latest").success  # a synced store (the initial copy done)
    job = runs.definitions().resolve_job_def(sync_job_name(runs.DEFAULT_CONNECTION))
    run = harness.instance.create_run_for_job(
        job, run_config={}, tags={"dagster/partition": runs.partition_keys()[-1]}
    )
    data = tick(harness, None)
    assert not data.run_requests and "in flight" in (data.skip_message or "")
    harness.instance.report_run_canceled(run)
    harness.sandbox.dynamics_update(
        "contact",
        harness.query("SELECT dynamics_id FROM identity WHERE entity = 'contact' LIMIT 1")[0][0],
        {"telephone1": "+1 555 0142"},
    )
    assert len(tick(harness, None).run_requests) == 1
