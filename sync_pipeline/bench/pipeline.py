"""How fast the pipeline syncs: initial copy, 1,000-change incremental, idle cycle, realistic API limits, freshness.

The sandbox runs in a process of its own (:func:`spawn_sandbox`), so its CPU time is not charged to the
pipeline; the pipeline runs here as real in-process Dagster runs (:func:`sync_pipeline.runs.run_sync`)
against a state store in a temporary directory. Per stage (asset) the wall time is the step's duration
from the run's STEP_SUCCESS events and the record count comes from its materialization metadata. CPU is measured per
process (psutil): the pipeline's and the sandbox's, apart. The benchmark uses only public entry points of the
pipeline (:mod:`sync_pipeline.runs`, the definitions' sensors by name, asset keys as printed); nothing in the
pipeline imports it.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from sync_pipeline.bench.floor import API_BUDGET, budget_floor, budget_floor_seconds  # noqa: F401 (re-exported)
from sync_pipeline.sandbox.runner import RemoteSandbox, spawn_sandbox

DYNAMICS_PAGE = 5000
MARKETO_BATCH = 300
INCREMENTAL_CHANGES = 1000
# Share of the incremental edits per (system, table): both systems, persons and one-way entities.
CHANGE_MIX = (
    ("dynamics", "contact", 0.35),
    ("dynamics", "lead", 0.15),
    ("dynamics", "account", 0.15),
    ("dynamics", "opportunity", 0.05),
    ("marketo", "lead", 0.30),
)
DYNAMICS_WRITE_ROUTES = (
    "dynamics.create",
    "dynamics.update",
    "dynamics.delete",
    "dynamics.batch",
    "dynamics.createmultiple",
    "dynamics.updatemultiple",
    "dynamics.upsertmultiple",
)


def is_marketo_write(route: str) -> bool:
    """Lead and object sync calls (``marketo.leads.sync``, ``marketo.companies.sync``, custom objects)."""
    return route.startswith("marketo.") and route.endswith(".sync")


SCENARIOS = ("initial", "incremental", "idle", "realistic", "freshness")
DEFAULT_SCENARIOS = SCENARIOS[:4]  # "all": freshness runs the daemon for minutes, so it is asked for by name
# Materialization metadata key of a range run's totals (the same on every partition of the range).
RUN_TOTALS = "run_totals_data"


def asset_parts(asset: str) -> tuple[str, str, str]:
    """(system, entity, stage) of an asset key printed as ``[<connection>/]<system>/<entity>/<stage>``; read from
    the key's tail so the benchmark needs no import of the definitions' internals."""
    parts = asset.split("/")
    return (parts[-3], parts[-2], parts[-1]) if len(parts) >= 3 else ("", "", asset)


def is_extract(asset: str) -> bool:
    return asset_parts(asset)[2] == "extract"


def is_marketo_push(asset: str) -> bool:
    system, _, stage = asset_parts(asset)
    return system == "marketo" and stage == "push"


# Counters that are not HTTP requests: the limiters' admitted counts and the parts of Dataverse $batch requests
# (counted under their own routes too; the services count a $batch as one request).
BATCH_PARTS = "parts.dynamics.batch"
TOKEN_ROUTES = ("identity.token", "identity.openid", "marketo.identity")


def http_requests(calls: dict[str, int], tokens: bool = True) -> int:
    """HTTP requests to the services, as they count them: a $batch is one, its parts are not requests."""
    routes = sum(
        n
        for r, n in calls.items()
        if not r.startswith(("limits.", "parts.")) and (tokens or r not in TOKEN_ROUTES)
    )
    return routes - calls.get(BATCH_PARTS, 0)


def marketo_calls(calls: dict[str, int]) -> int:
    """Marketo API calls of a run (REST and bulk; the token calls are free, as Marketo counts them)."""
    return sum(n for r, n in calls.items() if r.startswith("marketo.") and r != "marketo.identity")


class CpuTimes:
    """User + system CPU seconds of this process (the pipeline) and of the sandbox process over a block."""

    def __init__(self, sandbox_pid: int | None):
        self._procs = {"pipeline": psutil.Process()}
        if sandbox_pid:
            self._procs["sandbox"] = psutil.Process(sandbox_pid)
        self.seconds: dict[str, float] = {}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)

    def __enter__(self) -> CpuTimes:
        self._start = {k: self._cpu(p) for k, p in self._procs.items()}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = {k: round(self._cpu(p) - self._start[k], 3) for k, p in self._procs.items()}


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

    def __enter__(self) -> PeakRss:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@contextmanager
def pipeline_env(
    remote: RemoteSandbox,
    state_dir: Path,
    marketo_calls_per_20s: int = 1_000_000,
    marketo_max_concurrent: int = 10,
) -> Iterator[None]:
    """Point this process's pipeline at ``remote`` with a fresh state store; restore the env afterwards.

    With the sandbox's limits off our own rate governor is opened up too (we measure the pipeline, not the
    budget); the realistic scenario passes Marketo's real limits instead.
    """
    wanted = {
        **remote.settings(),
        "SYNC_STATE_PATH": str(state_dir / "state.duckdb"),
        "MARKETO_CALLS_PER_20S": str(marketo_calls_per_20s),
        "MARKETO_MAX_CONCURRENT": str(marketo_max_concurrent),
    }
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
    stages: dict[str, dict[str, Any]] = {}
    counted: set[tuple[str, str | None]] = set()
    for ev in result.get_asset_materialization_events():
        m = ev.materialization
        name = "/".join(m.asset_key.path)
        stage = stages.setdefault(
            name,
            {
                "asset": name,
                "seconds": round(durations.get(ev.step_key, 0.0), 3),
                "records": 0,
                "partitions": 0,
            },
        )
        meta = {k: v.value for k, v in m.metadata.items()}
        if RUN_TOTALS in meta:  # a range run: the same totals on every partition of the range, counted once
            if (name, ev.step_key) not in counted:
                counted.add((name, ev.step_key))
                stage["records"] += _records(meta[RUN_TOTALS])
        else:
            stage["records"] += _records(meta)
        stage["partitions"] += 1
    for stage in stages.values():
        stage["records_per_second"] = (
            round(stage["records"] / stage["seconds"]) if stage["seconds"] > 0 else None
        )
    return sorted(stages.values(), key=lambda s: -s["seconds"])


def call_floor(
    config: Any, counts: dict[str, int], stages: list[dict[str, Any]], full_read: bool
) -> dict[str, int]:
    """The fewest calls the work needs: ceil(rows/5000) Dynamics pages a table (1 per delta read), and
    ceil(written/300) Marketo writes per object."""
    dynamics = 0
    for e in config.entities:
        if e.dynamics is not None:
            rows = counts.get(f"dynamics.{e.dynamics.table}", 0)
            dynamics += max(1, math.ceil(rows / DYNAMICS_PAGE)) if full_read else 1
    written = {s["asset"]: s["records"] for s in stages if is_marketo_push(s["asset"])}
    marketo = sum(math.ceil(n / MARKETO_BATCH) for n in written.values())
    return {"dynamics.query": dynamics, "marketo.writes": marketo}


def calls_vs_floor(calls: dict[str, int], floor: dict[str, int]) -> dict[str, Any]:
    dynamics = calls.get("dynamics.query", 0)
    marketo = sum(n for r, n in calls.items() if is_marketo_write(r))
    return {
        "calls": dict(sorted(calls.items())),
        "total": http_requests(calls),
        "floor": floor,
        "dynamics_query": dynamics,
        "marketo_writes": marketo,
        "dynamics_writes": sum(calls.get(r, 0) for r in DYNAMICS_WRITE_ROUTES),
        "dynamics_ratio": round(dynamics / floor["dynamics.query"], 3) if floor["dynamics.query"] else None,
        "marketo_ratio": round(marketo / floor["marketo.writes"], 3) if floor["marketo.writes"] else None,
    }


def run_cycle(
    instance: Any, remote: RemoteSandbox, config: Any, counts: dict[str, int], scope: str, full_read: bool
) -> dict[str, Any]:
    from sync_pipeline.runs import run_sync

    remote.reset_calls()
    with PeakRss() as rss, CpuTimes(remote.pid) as cpu:
        started = time.perf_counter()
        result = run_sync(instance, scope=scope)
        seconds = time.perf_counter() - started
    stages = stage_stats(result)
    records = sum(s["records"] for s in stages if is_extract(s["asset"]))
    calls = remote.calls()
    per_100k = {
        f"{k}_per_100k_records": round(v * 100_000 / records, 3) if records else None
        for k, v in cpu.seconds.items()
    }
    return {
        "seconds": round(seconds, 3),
        "records_read": records,
        "records_per_second": round(records / seconds) if seconds else None,
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "stages": stages,
        "cpu": {**{f"{k}_seconds": v for k, v in cpu.seconds.items()}, **per_100k},
        "api": {
            **calls_vs_floor(calls, call_floor(config, counts, stages, full_read)),
            "marketo_calls": marketo_calls(calls),
        },
    }


def change_sensors(defs: Any) -> list[Any]:
    """The change sensor(s) of the definitions (one per connection once there are several)."""
    return [s for s in defs.sensors if s.name.endswith("change_sensor")]


def evaluate_sensor(instance: Any, sensor: Any, defs: Any, cursor: str | None = None) -> Any:
    """One evaluation as the daemon makes it, through Dagster's public API (resources from the definitions)."""
    import dagster as dg

    with dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        sensor_name=sensor.name,
        definitions=defs,
        resources=dict(defs.resources or {}),
    ) as context:
        return sensor.evaluate_tick(context)


def sensor_tick(instance: Any, remote: RemoteSandbox) -> dict[str, Any]:
    """API calls of one change-sensor tick with nothing changed (what an idle cycle costs when the sensor, not a
    schedule, drives the sync), token calls excluded: they are cached for an hour, not paid per tick."""
    from sync_pipeline.runs import definitions

    defs = definitions()
    sensors = change_sensors(defs)
    for sensor in sensors:  # the first tick may fetch tokens
        evaluate_sensor(instance, sensor, defs)
    remote.reset_calls()
    requested = [r for sensor in sensors for r in evaluate_sensor(instance, sensor, defs).run_requests or []]
    calls = dict(remote.calls())
    http = http_requests(calls, tokens=False)
    return {
        "sensors": [s.name for s in sensors],
        "run_requests": len(requested),
        "http_calls": http,
        "calls": calls,
    }


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


def run_scale(
    scale: str,
    scenarios: tuple[str, ...],
    seed: int = 0,
    work_dir: Path | None = None,
    log: Any = print,
    freshness: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Every asked-for scenario at one scale: one sandbox process for initial/incremental/idle, another
    (realistic profile, added latency) for the realistic one."""
    from sync_pipeline.config.model import load_config

    config = load_config(os.environ.get("SYNC_CONFIG"))
    out: dict[str, Any] = {"scale": scale, "seed": seed, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix=f"bench-{scale}-", dir=work_dir) as tmp:
        base = [s for s in scenarios if s not in ("realistic", "freshness")]
        if base:
            out["scenarios"].update(_plain_scenarios(scale, base, seed, Path(tmp) / "plain", config, log))
        if "realistic" in scenarios:
            limits_off = out["scenarios"].get("initial", {}).get("seconds")
            out["scenarios"]["realistic"] = _realistic(
                scale, seed, Path(tmp) / "realistic", config, log, limits_off_seconds=limits_off
            )
        if "freshness" in scenarios:
            out["scenarios"]["freshness"] = _freshness(
                scale, seed, Path(tmp) / "freshness", config, log, **(freshness or {})
            )
    return out


def _plain_scenarios(
    scale: str, scenarios: list[str], seed: int, tmp: Path, config: Any, log: Any
) -> dict[str, Any]:
    import dagster as dg

    results: dict[str, Any] = {}
    log(f"[{scale}] starting sandbox process and populating...")
    remote = spawn_sandbox(tmp / "sandbox", scale=scale, seed=seed, timeout=1800)
    try:
        counts = dict((remote.populated or {}).get("counts", {}))
        results["population"] = {
            "records": sum(counts.values()),
            "counts": counts,
            "seconds": (remote.populated or {}).get("seconds"),
        }
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
            results["settle_after_initial"] = run_cycle(
                instance, remote, config, counts, "latest", full_read=False
            )
            if "incremental" in scenarios:
                log(f"[{scale}] incremental: {INCREMENTAL_CHANGES:,} changes...")
                edits = make_changes(remote, INCREMENTAL_CHANGES, seed)
                cycle = run_cycle(instance, remote, config, counts, "latest", full_read=False)
                results["incremental"] = {**cycle, "changes": edits}
            if "idle" in scenarios:
                log(f"[{scale}] idle cycle...")
                run_cycle(
                    instance, remote, config, counts, "latest", full_read=False
                )  # settle the edits' echoes
                results["idle"] = run_cycle(instance, remote, config, counts, "latest", full_read=False)
                results["idle_sensor_tick"] = sensor_tick(instance, remote)
    finally:
        remote.stop()
    return results


def _realistic(
    scale: str, seed: int, tmp: Path, config: Any, log: Any, limits_off_seconds: float | None = None
) -> dict[str, Any]:
    import dagster as dg

    log(f"[{scale}] realistic profile ({REALISTIC_LATENCY * 1000:.0f} ms latency a call): initial copy...")
    remote = spawn_sandbox(
        tmp / "sandbox",
        scale=scale,
        seed=seed,
        profile="realistic",
        latency_seconds=REALISTIC_LATENCY,
        timeout=1800,
    )
    try:
        counts = dict((remote.populated or {}).get("counts", {}))
        with (
            pipeline_env(remote, tmp, marketo_calls_per_20s=100, marketo_max_concurrent=10),
            dg.DagsterInstance.ephemeral() as instance,
        ):
            cycle = run_cycle(instance, remote, config, counts, "latest", full_read=True)
    finally:
        remote.stop()
    # Counted the way the services count (and the sandbox enforces): see budget_floor. Latency is not part of
    # the floor: the sandbox adds it before its limiter, outside any concurrency slot, so it bounds nothing.
    budget = budget_floor(cycle["api"]["calls"])
    return {
        **cycle,
        "latency_seconds": REALISTIC_LATENCY,
        **realistic_floor(cycle["seconds"], budget, limits_off_seconds),
    }


def realistic_floor(
    seconds: float, budget: dict[str, Any], limits_off_seconds: float | None
) -> dict[str, Any]:
    """The realistic run against its floor: the later of the API-budget floor (what the services' limits force)
    and the same copy with limits off at this scale (what the work itself takes). Either alone misleads: a
    small copy's calls fit in one window (a 0 s budget floor), and at scale the copy's own work can outlast
    the budget, so a ratio to the budget alone would charge the limits with the work's time."""
    budget_seconds = float(budget["seconds"])
    floor = max(budget_seconds, limits_off_seconds or 0.0)
    return {
        "budget": budget,
        "budget_floor_seconds": round(budget_seconds, 3),
        "limits_off_seconds": limits_off_seconds,
        "floor_seconds": round(floor, 3),
        "floor_bound_by": "API budget"
        if budget_seconds >= (limits_off_seconds or 0.0)
        else "limits-off copy",
        "over_floor_seconds": round(seconds - floor, 3),
        "vs_budget_floor": round(seconds / budget_seconds, 3) if budget_seconds > 0 else None,
        "vs_floor": round(seconds / floor, 3) if floor > 0 else None,
    }


def _freshness(
    scale: str,
    seed: int,
    tmp: Path,
    config: Any,
    log: Any,
    rate: float = 1.0,
    duration: float = 120.0,
    drain: float = 180.0,
) -> dict[str, Any]:
    """Edit-to-arrival latency with the daemon and change sensor running (see :mod:`sync_pipeline.bench.freshness`)."""
    import dagster as dg

    from sync_pipeline.bench import freshness

    log(f"[{scale}] freshness: realistic profile, initial copy in-process, then the daemon...")
    remote = spawn_sandbox(
        tmp / "sandbox",
        scale=scale,
        seed=seed,
        profile="realistic",
        latency_seconds=REALISTIC_LATENCY,
        timeout=1800,
    )
    try:
        counts = dict((remote.populated or {}).get("counts", {}))
        with pipeline_env(remote, tmp, marketo_calls_per_20s=100, marketo_max_concurrent=10):
            with dg.DagsterInstance.ephemeral() as instance:
                run_cycle(instance, remote, config, counts, "latest", full_read=True)
                run_cycle(
                    instance, remote, config, counts, "latest", full_read=False
                )  # absorb the copy's echo
            return freshness.measure(remote, rate=rate, duration=duration, drain=drain, log=log, work_dir=tmp)
    finally:
        remote.stop()
