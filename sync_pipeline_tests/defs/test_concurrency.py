"""Two processes syncing the same state file at once: both succeed, they take turns on the DuckDB lock,
and nothing is written twice (no duplicate persons or companies in Marketo, one identity per record)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

SYNC_ONE_CYCLE = """
import json, sys
import dagster as dg
from sync_pipeline import runs
with dg.DagsterInstance.ephemeral() as instance:
    result = runs.run_sync(instance, scope="latest", raise_on_error=False)
    failures = [ev.message for ev in result.all_events if ev.is_failure]
print(json.dumps({"success": result.success, "run_id": result.run_id, "failures": failures[:3]}))
"""


def start_sync(log_path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SYNC_ONE_CYCLE],
        env=dict(os.environ),
        text=True,
        stdout=subprocess.PIPE,
        stderr=open(log_path, "w"),
    )


def test_two_concurrent_syncs_on_one_state_file_both_succeed_without_duplicates(harness, tmp_path) -> None:
    sb = harness.sandbox
    persons_before = sb.marketo_count("lead")
    procs = [start_sync(tmp_path / f"sync-{i}.log") for i in range(2)]
    outcomes = []
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=300)
        log = (tmp_path / f"sync-{i}.log").read_text()
        assert proc.returncode == 0, log[-3000:]
        assert "locked by another process" not in log and "Could not set lock" not in log
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    assert all(o["success"] for o in outcomes), outcomes
    assert outcomes[0]["run_id"] != outcomes[1]["run_id"]

    # Every Dynamics record has at most one Marketo person / company; no person carries a Dynamics id twice.
    leads = sb.marketo_rows("lead", limit=100_000)
    assert len(leads) == sb.marketo_count("lead")
    twice = {
        k: n for k, n in Counter(r.get("dynamicsId") for r in leads if r.get("dynamicsId")).items() if n > 1
    }
    assert twice == {}
    assert harness.query("""SELECT count(*) FROM (SELECT marketo_id FROM identity WHERE state = 'active'
                            AND entity IN ('lead', 'contact') GROUP BY 1 HAVING count(*) > 1)""") == [(0,)]
    companies = sb.marketo_rows("company", limit=100_000)
    assert len({c["externalCompanyId"] for c in companies}) == len(companies)
    created = harness.query(
        "SELECT count(*) FROM identity WHERE entity IN ('lead', 'contact') AND how = 'created'"
    )
    assert sb.marketo_count("lead") - persons_before == created[0][0]
    # And the state converged: a third sync finds both systems in agreement with the store.
    assert harness.run("latest").success
    before = harness.query("SELECT count(*) FROM ledger WHERE op IN ('create', 'update')")[0][0]
    assert harness.run("latest").success
    assert harness.query("SELECT count(*) FROM ledger WHERE op IN ('create', 'update')")[0][0] == before
