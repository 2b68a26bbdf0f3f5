"""Persons and custom objects through Marketo bulk import (engine/push/bulk.py), end to end through Dagster runs.

(a) The initial copy of the "small" org with the default threshold: persons go through bulk import files, the
    Marketo calls stay under a bound derived from the org's size, and both systems agree afterwards.
(c) A row the sandbox rejects in an import file: that record is held with Marketo's reason, the others sync.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync_pipeline.config.model import DEFAULT_PATH, load_config


def write_config(tmp_path: Path, *, threshold: int | None, max_attempts: int = 5) -> Path:
    text = DEFAULT_PATH.read_text()
    setting = "null" if threshold is None else str(threshold)
    old = "  marketo_person_object: lead\n"
    assert old in text
    text = text.replace(old, f"{old}  bulk_import_threshold: {setting}\n", 1)
    text = text.replace("retry: {max_attempts: 5,", f"retry: {{max_attempts: {max_attempts},", 1)
    path = tmp_path / "entities-bulk.yaml"
    path.write_text(text)
    return path


def marketo_write_calls(calls: dict[str, int]) -> int:
    return sum(n for route, n in calls.items() if route.startswith("marketo.") and "identity" not in route)


@pytest.fixture
def small_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    import dagster as dg

    from sync_pipeline.sandbox.runner import Sandbox

    with Sandbox(tmp_path / "sandbox") as sb:
        counts = sb.populate("small", seed=0)
        for key, value in sb.settings().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("SYNC_STATE_PATH", str(tmp_path / "state.duckdb"))
        monkeypatch.setenv("SYNC_CONFIG", str(write_config(tmp_path, threshold=1000)))
        yield sb, counts, dg.DagsterInstance.ephemeral(), tmp_path / "state.duckdb"


def test_initial_copy_at_small_goes_bulk_under_the_call_bound_and_both_sides_agree(small_world) -> None:
    from sync_pipeline import runs
    from sync_pipeline.admin.verify import compare
    from sync_pipeline.clients.dynamics import DynamicsClient
    from sync_pipeline.clients.marketo import MarketoClient
    from sync_pipeline.engine.store import state

    sb, _counts, instance, state_path = small_world
    sb.reset_calls()
    assert runs.run_sync(instance, scope="latest").success
    calls = {k: v for k, v in sb.calls().items() if k.startswith("marketo.")}
    with state.connect(state_path, read_only=True) as con:
        created = dict(
            con.execute("SELECT entity, count(*) FROM identity WHERE how = 'created' GROUP BY 1").fetchall()
        )
        failures = con.execute("SELECT count(*) FROM failures").fetchone()[0]
    persons = created["lead"] + created["contact"]
    assert persons >= 6000 and failures == 0
    # Persons went through import files, not Sync Leads: with REST their creates alone are ceil(n/300) calls a type.
    rest_person_writes = math.ceil(created["lead"] / 300) + math.ceil(created["contact"] / 300)
    bulk_person_calls = sum(n for route, n in calls.items() if route.startswith("marketo.bulk.import."))
    assert calls["marketo.bulk.import.create"] == 2  # one file per person type (each well under 10 MB)
    assert bulk_person_calls <= 2 * (1 + 4 + 2)  # per file: create, a few status polls, failures and warnings
    assert calls.get("marketo.leads.sync", 0) < rest_person_writes / 4  # what is left: identity updates
    # The bound: the REST writes of the types without a bulk path and of the custom objects under the threshold
    # (ceil(n/300) each; roles one per opportunity), + per person type one import file (create, status polls,
    # failures, warnings: <= 7) and one id export (create, enqueue, status, file: 4), + 24 for the rest: the
    # person extract's export windows (4 x 4 calls), describe, paging token, the race read, and the REST updates
    # of persons matched by email (not creates, so never bulk).
    rest_only = sum(
        math.ceil(created.get(e, 0) / 300)
        for e in ("account", "opportunity", "systemuser", "project", "team", "teammembership")
    )
    bound = rest_only + math.ceil(created["opportunity"] / 300) + 2 * (7 + 4) + 24
    total = marketo_write_calls(calls)
    assert total <= bound, (total, bound, calls)
    # Lower than REST: the person creates cost their import calls plus two id exports instead of ceil(n/300).
    assert bulk_person_calls + 2 * 4 < rest_person_writes, (bulk_person_calls, rest_person_writes)
    # Like after a REST copy, the owners Dynamics assigned to the leads created from Marketo persons come back
    # in the next cycle; then both systems agree field by field.
    assert runs.run_sync(instance, scope="latest").success
    s = sb.settings()
    dyn = DynamicsClient(
        s["DYNAMICS_URL"],
        s["DYNAMICS_AUTHORITY"],
        s["DYNAMICS_CLIENT_ID"],
        s["DYNAMICS_CLIENT_SECRET"],
        verify=s["SYNC_CA_BUNDLE"],
    )
    mkto = MarketoClient(
        s["MARKETO_BASE_URL"], s["MARKETO_CLIENT_ID"], s["MARKETO_CLIENT_SECRET"], verify=s["SYNC_CA_BUNDLE"]
    )
    try:
        assert compare(load_config(os.environ["SYNC_CONFIG"]), dyn, mkto, state_path) == []
    finally:
        dyn.close()
        mkto.close()


def test_a_row_the_import_rejects_is_held_with_the_reason_and_the_rest_sync(
    harness, tmp_path, monkeypatch
) -> None:
    sb = harness.sandbox
    monkeypatch.setenv("SYNC_CONFIG", str(write_config(tmp_path, threshold=1, max_attempts=1)))
    bad = sb.dynamics_insert(
        "contact", {"firstname": "Bad", "lastname": "Address", "emailaddress1": "not an email address"}
    )["contactid"]
    good = sb.dynamics_insert(
        "contact", {"firstname": "Good", "lastname": "Address", "emailaddress1": "good.address@example.org"}
    )["contactid"]
    sb.reset_calls()
    assert harness.run("latest").success
    calls = sb.calls()
    assert calls["marketo.bulk.import.create"] >= 2 and calls["marketo.bulk.import.failures"] >= 1
    assert calls["marketo.bulk.customobjects.import.create"] >= 1
    held = harness.query(
        "SELECT code, message, held, op FROM failures WHERE entity = 'contact' AND dynamics_id = ?", [bad]
    )
    assert len(held) == 1 and held[0][0] == "1001" and "email" in held[0][1].lower() and held[0][2] is True
    assert sb.marketo_find_leads("dynamicsId", bad) == []
    (person,) = sb.marketo_find_leads("dynamicsId", good)
    # The good record went through the same bookkeeping as a REST create: identity, ledger, base and mirror.
    assert harness.query(
        "SELECT marketo_id, state FROM identity WHERE entity = 'contact' AND dynamics_id = ?", [good]
    ) == [(str(person), "active")]
    assert harness.query(
        "SELECT DISTINCT marketo_id FROM ledger WHERE dynamics_id = ? AND op = 'create'", [good]
    ) == [(str(person),)]
    assert harness.query("SELECT f_email FROM b_contact WHERE dynamics_id = ?", [good]) == [
        ("good.address@example.org",)
    ]
    assert harness.query("SELECT f_dynamicsId FROM m_person WHERE id = ?", [person]) == [(good,)]
    # Every other planned person exists exactly once in Marketo.
    dupes = harness.query("""SELECT marketo_id FROM identity WHERE entity IN ('lead', 'contact') AND state = 'active'
                             GROUP BY marketo_id HAVING count(*) > 1""")
    assert dupes == []
    assert sb.marketo_count("dynamicsTeam_c") == sb.dynamics_count("team")
    # Quiet afterwards: the next cycles write nothing for the settled records (no echo bounces).
    harness.run("latest")
    before = harness.query("SELECT count(*) FROM ledger WHERE target = 'marketo' AND op = 'create'")[0][0]
    harness.run("latest")
    assert (
        harness.query("SELECT count(*) FROM ledger WHERE target = 'marketo' AND op = 'create'")[0][0]
        == before
    )


def test_files_marketo_refuses_go_through_rest_in_the_same_run(harness, tmp_path, monkeypatch) -> None:
    """Nothing is lost when an upload is refused (or a job fails as a whole): its records are written through
    REST in the same run, with REST's per-record results."""
    sb = harness.sandbox
    monkeypatch.setenv("SYNC_CONFIG", str(write_config(tmp_path, threshold=1)))
    sb.faults(
        [{"pattern": "marketo.bulk.import.create", "rate": 1.0, "faults": [{"kind": "code", "code": "1003"}]}]
    )
    sb.reset_calls()
    assert harness.run("latest").success
    calls = sb.calls()
    assert calls["marketo.bulk.import.create"] >= 2 and calls["marketo.leads.sync"] >= 2
    assert calls.get("marketo.bulk.import.status", 0) == 0
    assert calls["marketo.bulk.customobjects.import.create"] >= 1  # custom objects were not refused
    assert harness.query("SELECT count(*) FROM failures")[0][0] == 0
    for entity in ("lead", "contact"):
        linked = harness.query(
            "SELECT dynamics_id, marketo_id FROM identity WHERE entity = ? AND state = 'active' "
            "AND how = 'created'",
            [entity],
        )
        assert linked
        for did, mid in linked[:20]:
            assert sb.marketo_find_leads("dynamicsId", did) == [int(mid)]
