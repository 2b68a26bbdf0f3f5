"""The host's time zone never changes data (issue 9): the same org synced by a process running under
Asia/Kolkata and under America/Los_Angeles ends with identical values on both systems. DateOnly dates stay
dates; a date-time without an offset follows its column's DateTimeBehavior (UserLocal: UTC).

Each run is a real Dagster run in a child process started with ``TZ`` set (the sandbox runs there too, so
the whole host is in that zone), against a small hand-made org so it stays fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPP, PROJECT, ACCOUNT = (
    "0be00000-0000-4000-8000-000000000001",
    "0be00000-0000-4000-8000-000000000002",
    "0be00000-0000-4000-8000-000000000003",
)

PROBE = r"""
import json, os, sys, time
from pathlib import Path
import dagster as dg
from sync_pipeline import runs
from sync_pipeline.engine.store import state
from sync_pipeline.sandbox.runner import Sandbox

OPP, PROJECT, ACCOUNT, tmp = sys.argv[1:5]
with Sandbox(Path(tmp) / "sandbox") as sb:
    os.environ.update(sb.settings(), SYNC_STATE_PATH=str(Path(tmp) / "state.duckdb"))
    sb.dynamics_insert("account", {"accountid": ACCOUNT, "name": "Zone Test Ltd"})
    sb.dynamics_insert("opportunity", {"opportunityid": OPP, "name": "Zone deal",
                                       "estimatedclosedate": "2026-08-03", "actualclosedate": "2026-08-31",
                                       "_customerid_value": ACCOUNT,
                                       "_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname": "account"})
    sb.dynamics_insert("new_project", {"new_projectid": PROJECT, "new_name": "Zone project",
                                       "new_startdate": "2026-08-03T10:00:00"})
    instance = dg.DagsterInstance.ephemeral()
    assert runs.run_sync(instance, scope="latest").success  # the first latest run is a full read
    sb.dynamics_update("opportunity", OPP, {"estimatedclosedate": "2026-09-01"})
    sb.dynamics_update("new_project", PROJECT, {"new_startdate": "2026-12-31T23:30:00"})
    assert runs.run_sync(instance, scope="latest").success
    assert runs.run_sync(instance, scope="latest").success  # nothing moves on a quiet cycle
    opp = next(o for o in sb.marketo_rows("opportunity", 1000) if o.get("externalOpportunityId") == OPP)
    proj = next(o for o in sb.marketo_rows("project_c", 1000) if o.get("projectId") == PROJECT)
    with state.connect(Path(tmp) / "state.duckdb", read_only=True) as con:
        ledger = con.execute("SELECT entity, dynamics_id, field, value_after FROM ledger "
                             "WHERE field IN ('expectedCloseDate', 'closeDate', 'startDate') ORDER BY seq").fetchall()
    print("RESULT " + json.dumps({
        "tz": time.tzname, "opportunity": {k: opp.get(k) for k in ("expectedCloseDate", "closeDate")},
        "project": {"startDate": proj.get("startDate")},
        "dynamics": {"estimatedclosedate": sb.dynamics_get("opportunity", OPP).get("estimatedclosedate"),
                     "new_startdate": sb.dynamics_get("new_project", PROJECT).get("new_startdate")},
        "ledger": ledger}))
"""


def _sync_under(tz: str, tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNAMICS_", "MARKETO_", "SYNC_"))}
    env.update(
        TZ=tz, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), MARKETO_CALLS_PER_20S="100"
    )
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, OPP, PROJECT, ACCOUNT, str(tmp)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return {
        tz: _sync_under(tz, tmp_path_factory.mktemp(tz.replace("/", "-")))
        for tz in ("Asia/Kolkata", "America/Los_Angeles")
    }


def test_the_child_processes_really_ran_in_those_zones(results: dict[str, dict]) -> None:
    assert results["Asia/Kolkata"]["tz"][0] == "IST"
    assert results["America/Los_Angeles"]["tz"][0] == "PST"


def test_date_only_stays_the_same_date_on_any_host(results: dict[str, dict]) -> None:
    for tz, r in results.items():
        assert str(r["opportunity"]["expectedCloseDate"]).startswith("2026-09-01"), tz
        assert str(r["opportunity"]["closeDate"]).startswith("2026-08-31"), tz
        assert str(r["dynamics"]["estimatedclosedate"]).startswith("2026-09-01"), tz  # nothing written back


def test_naive_user_local_date_time_is_utc_on_any_host(results: dict[str, dict]) -> None:
    for tz, r in results.items():
        assert str(r["project"]["startDate"]).replace("+00:00", "Z").startswith("2026-12-31T23:30:00"), tz


def test_results_are_identical_across_host_time_zones(results: dict[str, dict]) -> None:
    a, b = (dict(r, tz=None) for r in results.values())
    assert a == b
    # One write per change, nothing bouncing on the quiet cycle.
    assert sorted(tuple(row[2:]) for row in a["ledger"]) == [
        ("closeDate", "2026-08-31"),
        ("expectedCloseDate", "2026-08-03"),
        ("expectedCloseDate", "2026-09-01"),
        ("startDate", "2026-08-03T10:00:00Z"),
        ("startDate", "2026-12-31T23:30:00Z"),
    ]


def test_packaged_date_time_behaviors_match_the_dataverse_metadata(sandbox) -> None:
    """The config declares each date column's DateTimeBehavior (read at sync time it would cost metadata calls
    on every run); this contract test holds the declarations to what the org's metadata says."""
    from sync_pipeline.clients.dynamics import DynamicsClient
    from sync_pipeline.config.model import load_config

    wire = {
        "DateOnly": "date_only",
        "UserLocal": "user_local",
        "TimeZoneIndependent": "time_zone_independent",
    }
    s = sandbox.settings()
    checked = 0
    with DynamicsClient(
        s["DYNAMICS_URL"],
        s["DYNAMICS_AUTHORITY"],
        s["DYNAMICS_CLIENT_ID"],
        s["DYNAMICS_CLIENT_SECRET"],
        verify=s["SYNC_CA_BUNDLE"],
    ) as client:
        for e in load_config().entities:
            dated = [f for f in e.all_fields if f.transform in ("date", "datetime")]
            if not dated or e.dynamics is None:
                continue
            attrs = {a["LogicalName"]: a for a in client.attributes(e.dynamics.table)}
            for f in dated:
                behavior = (attrs[f.dynamics].get("DateTimeBehavior") or {}).get("Value")
                assert wire[behavior] == f.behavior, (e.name, f.marketo, behavior)
                checked += 1
    assert checked >= 3  # opportunity close dates, project start date
