"""How fast the pipeline syncs: initial copy, 1,000-change incremental, idle cycle, realistic API limits.

The sandbox runs in a process of its own (:func:`spawn_sandbox`), so its CPU time is not charged to the
pipeline; the pipeline runs here as real in-process Dagster runs (:func:`sync_pipeline.runs.run_sync`)
against a state store in a temporary directory. Per stage (asset) the wall time is the step's duration
from the run's STEP_SUCCESS events and the record count comes from its materialization metadata.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil

from sync_pipeline.sandbox.runner import RemoteSandbox, spawn_sandbox

DYNAMICS_PAGE = 5000
MARKETO_BATCH = 300
INCREMENTAL_CHANGES = 1000
# Share of the incremental edits per (system, table): both systems, persons and one-way entities.
CHANGE_MIX = (("dynamics", "contact", 0.35), ("dynamics", "lead", 0.15), ("dynamics", "account", 0.15),
              ("dynamics", "opportunity", 0.05), ("marketo", "lead", 0.30))
DYNAMICS_WRITE_ROUTES = ("dynamics.create", "dynamics.update", "dynamics.delete", "dynamics.batch",
                         "dynamics.createmultiple", "dynamics.updatemultiple", "dynamics.upsertmultiple")


def is_marketo_write(route: str) -> bool:
    """Lead and object sync calls (``marketo.leads.sync``, ``marketo.companies.sync``, custom objects)."""
    return route.startswith("marketo.") and route.endswith(".sync")
# Realistic profile budgets (sandbox.yaml limits.realistic): (calls, per seconds) each service allows.
API_BUDGET = {"marketo": (100, 20), "dynamics": (6000, 300)}
SCENARIOS = ("initial", "incremental", "idle", "realistic")
REALISTIC_LATENCY = 0.02  # seconds added to every sandbox request: a WAN round trip


class PeakRss:
    """Samples this process's RSS in a thread (getrusage's maxrss never goes down between scenarios)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakRss":
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@contextmanager
def pipeline_env(remote: RemoteSandbox, state_dir: Path, marketo_calls_per_20s: int = 1_000_000,
                 marketo_max_concurrent: int = 10) -> Iterator[None]:
    """Point this process's pipeline at ``remote`` with a fresh state store; restore the env afterwards.

    With the sandbox's limits off our own rate governor is opened up too (we measure the pipeline, not the
    budget); the realistic scenario passes Marketo's real limits instead.
    """
    wanted = {**remote.settings(), "SYNC_STATE_PATH": str(state_dir / "state.duckdb"),
              "MARKETO_CALLS_PER_20S": str(marketo_calls_per_20s), "MARKETO_MAX_CONCURRENT": str(marketo_max_concurrent)}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        from sync_pipeline.clients.governor import RateGovernor

        RateGovernor.forget(wanted["MARKETO_BASE_URL"], wanted["MARKETO_CLIENT_ID"])


def _records(meta: dict[str, Any]) -> int:
    for key in ("rows_read", "records_written", "records_in_work"):
        if isinstance(meta.get(key), int):
            return meta[key]
    return 0


def stage_stats(result: Any) -> list[dict[str, Any]]:
    """Per asset: wall seconds (its step's duration) and records handled, summed over every partition
    the run materialized (an initial copy materializes each asset once per partition)."""
    durations: dict[str, float] = {}
    for ev in result.all_events:
        if ev.event_type_value == "STEP_SUCCESS":
            durations[ev.step_key] = ev.event_specific_data.duration_ms / 1000
    from sync_pipeline.connection.assets import RUN_TOTALS

    stages: dict[str, dict[str, Any]] = {}
    counted: set[tuple[str, str | None]] = set()
    for ev in result.get_asset_materialization_events():
        m = ev.materialization
        name = "/".join(m.asset_key.path)
        stage = stages.setdefault(name, {"asset": name, "seconds": round(durations.get(ev.step_key, 0.0), 3),
                                         "records": 0, "partitions": 0})
        meta = {k: v.value for k, v in m.metadata.items()}
        if RUN_TOTALS in meta:  # a range run: the same totals on every partition of the range, counted once
            if (name, ev.step_key) not in counted:
                counted.add((name, ev.step_key))
                stage["records"] += _records(meta[RUN_TOTALS])
        else:
            stage["records"] += _records(meta)
        stage["partitions"] += 1
    for stage in stages.values():
        stage["records_per_second"] = round(stage["records"] / stage["seconds"]) if stage["seconds"] > 0 else None
    return sorted(stages.values(), key=lambda s: -s["seconds"])


def call_floor(config: Any, counts: dict[str, int], stages: list[dict[str, Any]], full_read: bool
               ) -> dict[str, int]:
    """The fewest calls the work needs: ceil(rows/5000) Dynamics pages a table (1 per delta read), and
    ceil(written/300) Marketo writes per object."""
    dynamics = 0
    for e in config.entities:
        if e.dynamics is not None:
            rows = counts.get(f"dynamics.{e.dynamics.table}", 0)
            dynamics += max(1, math.ceil(rows / DYNAMICS_PAGE)) if full_read else 1
    from sync_pipeline.connection.keys import asset_key, key_name
    from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

    pushes = {key_name(asset_key(CONN, e.name, "push")) for e in config.entities}
    written = {s["asset"]: s["records"] for s in stages if s["asset"] in pushes}
    marketo = sum(math.ceil(n / MARKETO_BATCH) for n in written.values())
    return {"dynamics.query": dynamics, "marketo.writes": marketo}


def calls_vs_floor(calls: dict[str, int], floor: dict[str, int]) -> dict[str, Any]:
    dynamics = calls.get("dynamics.query", 0)
    marketo = sum(n for r, n in calls.items() if is_marketo_write(r))
    total = sum(n for r, n in calls.items() if not r.startswith("limits."))  # limiter counters are not calls
    return {"calls": dict(sorted(calls.items())), "total": total, "floor": floor,
            "dynamics_query": dynamics, "marketo_writes": marketo,
            "dynamics_writes": sum(calls.get(r, 0) for r in DYNAMICS_WRITE_ROUTES),
            "dynamics_ratio": round(dynamics / floor["dynamics.query"], 3) if floor["dynamics.query"] else None,
            "marketo_ratio": round(marketo / floor["marketo.writes"], 3) if floor["marketo.writes"] else None}


def run_cycle(instance: Any, remote: RemoteSandbox, config: Any, counts: dict[str, int], scope: str,
              full_read: bool) -> dict[str, Any]:
    from sync_pipeline.runs import run_sync

    remote.reset_calls()
    with PeakRss() as rss:
        started = time.perf_counter()
        result = run_sync(instance, scope=scope)
        seconds = time.perf_counter() - started
    stages = stage_stats(result)
    from sync_pipeline.connection.keys import asset_key, key_name
    from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

    extracts = ({key_name(asset_key(CONN, e.name, "extract")) for e in config.entities}
                | {key_name(asset_key(CONN, "person", "extract"))})
    records = sum(s["records"] for s in stages if s["asset"] in extracts)
    calls = remote.calls()
    return {"seconds": round(seconds, 3), "records_read": records,
            "records_per_second": round(records / seconds) if seconds else None,
            "peak_rss_mb": round(rss.peak / 2**20, 1), "stages": stages,
            "api": calls_vs_floor(calls, call_floor(config, counts, stages, full_read))}


def sensor_tick(remote: RemoteSandbox, config: Any) -> dict[str, Any]:
    """API calls of one change-sensor evaluation with nothing changed (what an idle cycle costs when
    the sensor, not a schedule, drives the sync): one Dataverse $batch plus two Marketo activity reads."""
    from sync_pipeline.clients.dynamics import DynamicsClient
    from sync_pipeline.clients.marketo import MarketoClient
    from sync_pipeline.connection.automation import pending_changes
    from sync_pipeline.engine import state

    env = os.environ
    dyn = DynamicsClient(env["DYNAMICS_URL"], env["DYNAMICS_AUTHORITY"], env["DYNAMICS_CLIENT_ID"],
                         env["DYNAMICS_CLIENT_SECRET"], verify=env["SYNC_CA_BUNDLE"])
    mkto = MarketoClient(env["MARKETO_BASE_URL"], env["MARKETO_CLIENT_ID"], env["MARKETO_CLIENT_SECRET"],
                         verify=env["SYNC_CA_BUNDLE"])
    with state.connect(env["SYNC_STATE_PATH"]) as con:
        tokens = dict(con.execute("SELECT name, value FROM cursors").fetchall())
    dyn.whoami(), mkto.describe2()  # tokens first: they are cached for an hour, not paid per tick
    remote.reset_calls()
    found = pending_changes(config, tokens, dyn, mkto)
    calls = {k: v for k, v in remote.calls().items()}
    http = sum(v for k, v in calls.items() if k.startswith(("marketo.", "identity.")) or k == "dynamics.batch")
    return {"changes_found": sorted(k for k, v in found.items() if v), "http_calls": http, "calls": calls}


def budget_floor_seconds(calls: int, per_window: int, window_seconds: float) -> float:
    """Least wall time ``calls`` need under a sliding window: each full window of calls waits one window."""
    return ((calls - 1) // per_window) * window_seconds if calls > 0 else 0.0


# The sandbox counts, per service, the calls its limiter admitted, by the vendors' rules (Marketo: every REST and
# bulk call; Dataverse: every HTTP request, a $batch or a bulk message being ONE request). A run cannot admit more
# than ``per_window`` of them in any window, so the time between its first and last admitted call is at least
# :func:`budget_floor_seconds` of their number: that is the floor.
COUNTED_CALLS = {"marketo": "limits.marketo.calls", "dynamics": "limits.dynamics.requests"}


def budget_floor(calls: dict[str, int], budget: dict[str, tuple[int, float]] | None = None) -> dict[str, Any]:
    """The API-budget floor of a run from the sandbox's admitted-call counters: seconds per service and overall."""
    budget = budget or API_BUDGET
    per = {service: budget_floor_seconds(calls.get(key, 0), *budget[service])
           for service, key in COUNTED_CALLS.items()}
    return {"counted": {s: calls.get(k, 0) for s, k in COUNTED_CALLS.items()}, "per_service": per,
            "seconds": max(per.values())}


def make_changes(remote: RemoteSandbox, n: int, seed: int = 0) -> dict[str, int]:
    """``n`` edits through the admin API, spread over :data:`CHANGE_MIX`; returns edits per target."""
    rng = random.Random(seed)
    done: dict[str, int] = {}
    stamp = int(time.time())
    for system, table, share in CHANGE_MIX:
        want = round(n * share)
        if system == "dynamics":
            rows = remote.dynamics_rows(table, limit=want)
            pk = f"{table}id"
            for i, row in enumerate(rows):
                field = "telephone1" if table in ("contact", "lead", "account") else "description"
                remote.dynamics_update(table, row[pk], {field: f"+1555{stamp % 1000:03d}{i:04d}"})
        else:
            rows = remote.marketo_rows("lead", limit=want * 3)
            rows = rng.sample(rows, min(want, len(rows)))
            for i, row in enumerate(rows):
                remote.marketo_update_lead(row["id"], {"title": f"Bench title {stamp} {i}"})
        done[f"{system}.{table}"] = len(rows)
    return done


def run_scale(scale: str, scenarios: tuple[str, ...], seed: int = 0, work_dir: Path | None = None,
              log: Any = print) -> dict[str, Any]:
    """Every asked-for scenario at one scale: one sandbox process for initial/incremental/idle, another
    (realistic profile, added latency) for the realistic one."""
    from sync_pipeline.config.model import load_config

    config = load_config(os.environ.get("SYNC_CONFIG"))
    out: dict[str, Any] = {"scale": scale, "seed": seed, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix=f"bench-{scale}-", dir=work_dir) as tmp:
        base = [s for s in scenarios if s != "realistic"]
        if base:
            out["scenarios"].update(_plain_scenarios(scale, base, seed, Path(tmp) / "plain", config, log))
        if "realistic" in scenarios:
            out["scenarios"]["realistic"] = _realistic(scale, seed, Path(tmp) / "realistic", config, log)
    return out


def _plain_scenarios(scale: str, scenarios: list[str], seed: int, tmp: Path, config: Any, log: Any
                     ) -> dict[str, Any]:
    import dagster as dg

    results: dict[str, Any] = {}
    log(f"[{scale}] starting sandbox process and populating...")
    remote = spawn_sandbox(tmp / "sandbox", scale=scale, seed=seed, timeout=1800)
    try:
        counts = dict((remote.populated or {}).get("counts", {}))
        results["population"] = {"records": sum(counts.values()), "counts": counts,
                                 "seconds": (remote.populated or {}).get("seconds")}
        with pipeline_env(remote, tmp), dg.DagsterInstance.ephemeral() as instance:
            log(f"[{scale}] initial copy of {sum(counts.values()):,} records...")
            # The first run on an empty store copies everything (full read + first delta link, bulk extract of
            # Marketo since the configured start), whatever its window; "all" would add Dagster's per-partition
            # bookkeeping for ~120 daily partitions (reported separately by the backfill test).
            initial = run_cycle(instance, remote, config, counts, "latest", full_read=True)
            if "initial" in scenarios:
                results["initial"] = initial
            # The cycle after an initial copy reads back its echoes (every person it created); settle first so
            # the incremental scenario measures 1,000 changes, not the echo of the whole copy.
            results["settle_after_initial"] = run_cycle(instance, remote, config, counts, "latest", full_read=False)
            if "incremental" in scenarios:
                log(f"[{scale}] incremental: {INCREMENTAL_CHANGES:,} changes...")
                edits = make_changes(remote, INCREMENTAL_CHANGES, seed)
                cycle = run_cycle(instance, remote, config, counts, "latest", full_read=False)
                results["incremental"] = {**cycle, "changes": edits}
            if "idle" in scenarios:
                log(f"[{scale}] idle cycle...")
                run_cycle(instance, remote, config, counts, "latest", full_read=False)  # settle the edits' echoes
                results["idle"] = run_cycle(instance, remote, config, counts, "latest", full_read=False)
                results["idle_sensor_tick"] = sensor_tick(remote, config)
    finally:
        remote.stop()
    return results


def _realistic(scale: str, seed: int, tmp: Path, config: Any, log: Any) -> dict[str, Any]:
    import dagster as dg

    log(f"[{scale}] realistic profile ({REALISTIC_LATENCY * 1000:.0f} ms latency a call): initial copy...")
    remote = spawn_sandbox(tmp / "sandbox", scale=scale, seed=seed, profile="realistic",
                           latency_seconds=REALISTIC_LATENCY, timeout=1800)
    try:
        counts = dict((remote.populated or {}).get("counts", {}))
        with pipeline_env(remote, tmp, marketo_calls_per_20s=100, marketo_max_concurrent=10), \
                dg.DagsterInstance.ephemeral() as instance:
            cycle = run_cycle(instance, remote, config, counts, "latest", full_read=True)
    finally:
        remote.stop()
    # Counted the way the services count (and the sandbox enforces): see budget_floor. Latency is not part of
    # the floor: the sandbox adds it before its limiter, outside any concurrency slot, so it bounds nothing.
    budget = budget_floor(cycle["api"]["calls"])
    floor = max(budget["seconds"], 1e-3)
    return {**cycle, "latency_seconds": REALISTIC_LATENCY, "budget": budget,
            "budget_floor_seconds": round(floor, 3),
            "vs_budget_floor": round(cycle["seconds"] / floor, 3) if floor else None}
