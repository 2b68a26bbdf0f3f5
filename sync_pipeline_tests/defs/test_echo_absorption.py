"""The echo of a bulk-sized initial copy is absorbed with one bulk activity export (engine/extract/echo.py), end to
end through Dagster runs against the "small" org:

- a marketer's edits made DURING the copy (after its watermark, while its pushes run) still reach Dynamics after
  the settle run, the last of two edits of a field winning;
- the settle run's person extract spends a bounded number of Marketo calls, derived from the activity log, far
  below paging the window's lead changes;
- the next, small incremental run reads REST lead changes again (no export).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sync_pipeline_tests.defs.test_bulk_import import write_config

EXTRACT_ROUTES = (
    "marketo.activities",
    "marketo.activities.leadchanges",
    "marketo.activities.pagingtoken",
    "marketo.leads.describe",
    "marketo.leads.get",
)


def extract_calls(calls: dict[str, int]) -> int:
    """Marketo calls of the person extract (the run's own pushes and its checks are not part of the echo)."""
    return sum(n for r, n in calls.items() if r in EXTRACT_ROUTES or r.startswith("marketo.bulk.export."))


@pytest.fixture
def small_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    import dagster as dg

    from sync_pipeline.sandbox.runner import Sandbox

    with Sandbox(tmp_path / "sandbox") as sb:
        sb.populate("small", seed=0)
        for key, value in sb.settings().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("SYNC_STATE_PATH", str(tmp_path / "state.duckdb"))
        monkeypatch.setenv("SYNC_CONFIG", str(write_config(tmp_path, threshold=1000)))
        yield sb, dg.DagsterInstance.ephemeral(), tmp_path / "state.duckdb"


def _edit_during_the_copy(sb: Any, first_new_id: int) -> dict[str, Any]:
    """When the copy starts writing opportunities (its lead and contact persons are written by then), a marketer
    edits a lead's person twice and a contact's person once, in the Marketo UI."""
    edits: dict[str, Any] = {}
    inner = sb.marketo.app.before

    def before(req: Any) -> Any:
        if req.route == "marketo.opportunities.sync" and not edits:
            store = sb.marketo.store
            picked: dict[str, dict[str, Any]] = {}
            for person in store.leads():
                kind = person.get("dynamicsType")
                if person["id"] >= first_new_id and person.get("dynamicsId") and kind not in picked:
                    picked[kind] = person
                if len(picked) == 2:
                    break
            lead, contact = picked["Lead"], picked["Contact"]
            store.update_lead(lead["id"], {"title": "Edited during the copy (first)"}, source="UI")
            store.update_lead(lead["id"], {"title": "Edited during the copy (last)"}, source="UI")
            store.update_lead(contact["id"], {"title": "Contact edited during the copy"}, source="UI")
            edits.update(
                lead=lead["dynamicsId"], contact=contact["dynamicsId"], at=store.activities.items[-1]
            )
        return inner(req)

    sb.marketo.app.before = before
    return edits


def test_mid_copy_edits_survive_the_echo_export_and_its_calls_are_bounded(small_world) -> None:
    from sync_pipeline import runs
    from sync_pipeline.sandbox.marketo.api_leads import SCAN_WINDOW

    sb, instance, _state_path = small_world
    log = sb.marketo.store.activities
    start_position = len(log)
    first_new_id = max(p["id"] for p in sb.marketo.store.leads()) + 1
    edits = _edit_during_the_copy(sb, first_new_id)
    assert runs.run_sync(instance, scope="latest").success
    assert edits, "the copy never wrote opportunities: no edit was made during it"
    copied = len(log) - start_position  # the copy's echo (and the edits)

    settle_start = datetime.now(UTC)
    tail = len(log) - log.position_since((settle_start - timedelta(seconds=6)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    sb.reset_calls()
    assert runs.run_sync(instance, scope="latest").success
    calls = sb.calls()

    # The edits arrived: the lead's person's last title, and the contact's.
    assert sb.dynamics_get("lead", edits["lead"])["jobtitle"] == "Edited during the copy (last)"
    assert sb.dynamics_get("contact", edits["contact"])["jobtitle"] == "Contact edited during the copy"

    # One export: paging token at the window's end, describe, create, enqueue, <= 2 status polls, file; then the
    # lead changes logged after the window's end (pages of 300, one more to see the end), the Merge/Delete read
    # (the sandbox scans SCAN_WINDOW activities a call from the copy's watermark) and nothing else.
    assert calls.get("marketo.bulk.export.create") == 1, calls
    bound = 1 + 1 + (1 + 1 + 2 + 1) + (math.ceil(tail / 300) + 1) + (math.ceil(copied / SCAN_WINDOW) + 1)
    spent = extract_calls(calls)
    assert spent <= bound, (spent, bound, calls)
    assert calls.get("marketo.activities.leadchanges", 0) <= math.ceil(tail / 300) + 1
    assert spent < math.ceil(copied / 300)  # what paging the window's lead changes alone would cost

    # A small change afterwards goes the REST lead-change way.
    person = sb.marketo_find_leads("dynamicsId", edits["lead"])[0]
    sb.marketo_update_lead(person, {"title": "Edited after the settle"})
    sb.reset_calls()
    assert runs.run_sync(instance, scope="latest").success
    calls = sb.calls()
    assert "marketo.bulk.export.create" not in calls and calls.get("marketo.activities.leadchanges", 0) >= 1
    assert sb.dynamics_get("lead", edits["lead"])["jobtitle"] == "Edited after the settle"
