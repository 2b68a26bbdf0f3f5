"""Crash safety: SIGKILL the sync process at many points of extract, plan and push, re-run, and end in
exactly the state an uninterrupted sync reaches (same Marketo and Dynamics contents, no duplicate creates).

Each sandbox runs in a process of its own (``spawn_sandbox``) and each sync in a subprocess, so the
kill is real: no ``finally`` block, no flush, the DuckDB file and its WAL left as the kernel found them.
Kill points are chosen by watching the sandbox's call counters through the admin API (after N reads,
at the first write of persons, companies, ...) or by elapsed time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sync_pipeline.sandbox.runner import RemoteSandbox, spawn_sandbox

SYNC = (
    "import sys, dagster as dg; from sync_pipeline import runs; "
    "r = runs.run_sync(dg.DagsterInstance.ephemeral(), scope='latest', raise_on_error=False); "
    "sys.exit(0 if r.success else 1)"
)
VOLATILE = {
    "id",
    "createdAt",
    "updatedAt",
    "marketoGUID",
    "seq",
    "createdon",
    "modifiedon",
    "versionnumber",
    "_modifiedby_value",
    "_createdby_value",
    "_modifiedby_value@Microsoft.Dynamics.CRM.lookuplogicalname",
    "_createdby_value@Microsoft.Dynamics.CRM.lookuplogicalname",
}
MARKETO_OBJECTS = (
    "salesPerson",
    "company",
    "opportunity",
    "opportunityRole",
    "dynamicsTeam_c",
    "dynamicsTeamMember_c",
    "project_c",
)
DYNAMICS_TABLES = ("lead", "contact", "account")

Trigger = Callable[[dict[str, int], float], bool]


def _env(sb: RemoteSandbox, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNAMICS_", "MARKETO_", "SYNC_"))}
    env.update(sb.settings())
    env["SYNC_STATE_PATH"] = str(state)
    env["DAGSTER_HOME"] = str(state.parent / "dagster-home")
    Path(env["DAGSTER_HOME"]).mkdir(exist_ok=True)
    return env


def sync(sb: RemoteSandbox, state: Path, kill_when: Trigger | None = None, timeout: float = 300) -> str:
    """Run one sync in a subprocess; SIGKILL it when ``kill_when(calls since start, seconds)`` holds.

    Returns "ok", "failed" or "killed" (a run that finished before the trigger fired counts as ok/failed).
    """
    before = sb.calls()
    proc = subprocess.Popen(
        [sys.executable, "-c", SYNC],
        env=_env(sb, state),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise AssertionError(f"sync did not finish within {timeout} s")
            if kill_when is not None:
                now = sb.calls()
                delta = {k: v - before.get(k, 0) for k, v in now.items()}
                if kill_when(delta, elapsed):
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return "killed"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "ok" if proc.returncode == 0 else "failed"


def after_calls(route: str, n: int = 1) -> Trigger:
    return lambda delta, _t: delta.get(route, 0) >= n


def after_seconds(s: float) -> Trigger:
    return lambda _delta, t: t >= s


def snapshot(sb: RemoteSandbox) -> dict[str, Any]:
    """Both systems' contents without ids and timestamps that legitimately differ between runs."""
    persons = sb.marketo_rows("lead", limit=1_000_000)
    person_key = {p["id"]: p.get("dynamicsId") or p.get("email") for p in persons}

    def clean(row: dict[str, Any]) -> str:
        out = {k: v for k, v in row.items() if k not in VOLATILE}
        if "leadId" in out:
            out["leadId"] = person_key.get(out["leadId"], out["leadId"])
        return json.dumps(out, sort_keys=True, default=str)

    # The generator derives project start times from the sandbox's "now", so two sandboxes differ there;
    # what must match is that each Marketo project carries its own Dynamics row's start time.
    starts = {
        r["new_projectid"]: _instant(r.get("new_startdate"))
        for r in sb.dynamics_rows("new_project", 1_000_000)
    }
    snap: dict[str, Any] = {"persons": Counter(clean(p) for p in persons)}
    for obj in MARKETO_OBJECTS:
        rows = sb.marketo_rows(obj, limit=1_000_000)
        if obj == "project_c":
            rows = [
                {
                    **r,
                    "startDate": "= Dynamics"
                    if _instant(r.get("startDate")) == starts.get(r["projectId"])
                    else r.get("startDate"),
                }
                for r in rows
            ]
        snap[obj] = Counter(clean(r) for r in rows)
    for table in DYNAMICS_TABLES:
        snap[f"dynamics {table}"] = Counter(clean(r) for r in sb.dynamics_rows(table, limit=1_000_000))
    return snap


def _instant(value: Any) -> datetime | None:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for key in a:
        if a[key] == b[key]:
            continue
        only_a, only_b = list((a[key] - b[key]).elements()), list((b[key] - a[key]).elements())
        detail = ""
        if only_a and only_b:  # the closest pair, and the fields in which they differ
            ra = json.loads(only_a[0])
            rb = max((json.loads(x) for x in only_b), key=lambda r: sum(r.get(k) == v for k, v in ra.items()))
            detail = "; e.g. " + ", ".join(
                f"{k}: {ra.get(k)!r} vs {rb.get(k)!r}"
                for k in sorted(set(ra) | set(rb))
                if ra.get(k) != rb.get(k)
            )
        out.append(
            f"{key}: {len(only_a)} rows only in the reference, {len(only_b)} only after crashes{detail}"
        )
    return out


def duplicate_persons(sb: RemoteSandbox) -> list[str]:
    ids = Counter(
        p.get("dynamicsId") for p in sb.marketo_rows("lead", limit=1_000_000) if p.get("dynamicsId")
    )
    return [d for d, n in ids.items() if n > 1]


def crash_and_compare(tmp_path: Path, kills: list[Trigger]) -> tuple[list[str], list[str]]:
    with (
        spawn_sandbox(tmp_path / "ref", scale="tiny", seed=0) as ref,
        spawn_sandbox(tmp_path / "crash", scale="tiny", seed=0) as crashed,
    ):
        ref_state, crash_state = tmp_path / "ref" / "state.duckdb", tmp_path / "crash" / "state.duckdb"
        outcomes = [sync(crashed, crash_state, k) for k in kills]
        assert sync(ref, ref_state) == "ok"
        assert sync(ref, ref_state) == "ok"
        assert sync(crashed, crash_state) == "ok", f"the run after the crashes failed; kills: {outcomes}"
        assert sync(crashed, crash_state) == "ok"
        assert duplicate_persons(crashed) == []
        return outcomes, diff(snapshot(ref), snapshot(crashed))


def test_sigkill_at_many_points_then_rerun_equals_an_uninterrupted_sync(tmp_path: Path) -> None:
    kills = [
        after_calls("dynamics.query", 2),  # extract: mid-way through the Dynamics reads
        after_calls("marketo.bulk.export.create"),  # extract: Marketo bulk export in flight
        after_calls("marketo.companies"),  # push: object writes
        after_calls("marketo.leads.sync"),  # push: persons being created
        after_seconds(9.0),
    ]  # wherever the re-run is by then (plan or push)
    outcomes, differences = crash_and_compare(tmp_path, kills)
    print(f"\ncrash safety: kill outcomes {outcomes}")
    assert outcomes.count("killed") >= 3, outcomes
    assert differences == []


@pytest.mark.slow
def test_sigkill_by_elapsed_time_across_the_whole_run(tmp_path: Path) -> None:
    kills = [after_seconds(s) for s in (3, 5, 7, 9, 11, 13, 15, 18, 21, 25)]
    outcomes, differences = crash_and_compare(tmp_path, kills)
    print(f"\ncrash safety (timed): kill outcomes {outcomes}")
    assert differences == []
