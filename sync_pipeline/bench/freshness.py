"""Freshness: how long an edit takes to reach the other side with the daemon and the change sensor running.

Against the realistic sandbox (the services' limits, a WAN latency a call): an initial copy in-process, then
``dagster-daemon`` (sensors, run queue, run launcher; as deployed) on the same state store, while edits are made
at a steady rate, alternating sides, each on a different synced lead: a Dynamics edit of ``telephone1`` must
arrive as the Marketo person's ``phone``, a Marketo edit of ``title`` as the Dynamics lead's ``jobtitle``. Arrival
is polled through the sandbox's admin API (free: not counted as service calls), so the measurement costs the
sync nothing. Reports edit-to-arrival p50/p95/max and the service calls spent per edit.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sync_pipeline.bench.floor import COUNTED_CALLS
from sync_pipeline.sandbox.runner import RemoteSandbox

POLL_SECONDS = 0.5
TARGET_P95_SECONDS = 60.0
SETTLE_SECONDS = 120.0  # at most this long after the last arrival for the runs in flight to finish


@dataclass
class Edit:
    side: str  # where the edit was made: "dynamics" or "marketo"
    made_at: float
    arrived: Callable[[], bool]
    arrived_at: float | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values, inf when the rank falls on a lost edit."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _arrived_in_marketo(remote: RemoteSandbox, person_id: int, field: str, value: str) -> Callable[[], bool]:
    return lambda: remote.marketo_get_lead(person_id).get(field) == value


def _arrived_in_dynamics(remote: RemoteSandbox, lead_id: str, column: str, value: str) -> Callable[[], bool]:
    return lambda: remote.dynamics_get("lead", lead_id).get(column) == value


def synced_lead_pairs(remote: RemoteSandbox, want: int) -> list[tuple[str, int]]:
    """(Dynamics leadid, Marketo person id) of leads the initial copy linked (the person carries dynamicsId)."""
    pairs: list[tuple[str, int]] = []
    for row in remote.dynamics_rows("lead", limit=want * 3):
        found = remote.marketo_find_leads("dynamicsId", row["leadid"])
        if len(found) == 1:
            pairs.append((row["leadid"], found[0]))
            if len(pairs) == want:
                break
    return pairs


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def start_daemon(home: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``dagster-daemon run`` on the project's workspace with the shipped dagster.yaml in ``home``; its own process
    group, so stopping it stops the code server and runs it started."""
    home.mkdir(parents=True, exist_ok=True)
    root = repo_root()
    if (root / "dagster.yaml").exists():
        shutil.copy(root / "dagster.yaml", home / "dagster.yaml")
    target = (
        ["-w", "workspace.yaml"]
        if (root / "workspace.yaml").exists()
        else ["-m", "sync_pipeline.definitions"]
    )
    env = dict(os.environ, DAGSTER_HOME=str(home))
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-daemon")), "run", *target],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _poll(edits: list[Edit], lock: threading.Lock, stop: threading.Event) -> None:
    while not stop.is_set():
        with lock:
            pending = [e for e in edits if e.arrived_at is None]
        for edit in pending:
            try:
                if edit.arrived():
                    edit.arrived_at = time.monotonic()
            except Exception:  # noqa: BLE001 - a record mid-write: look again next round
                pass
        stop.wait(POLL_SECONDS)


def measure(
    remote: RemoteSandbox,
    *,
    rate: float,
    duration: float,
    drain: float,
    log: Any = print,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the daemon and make ``rate`` edits a second for ``duration`` seconds; wait up to ``drain`` seconds after
    the last edit for arrivals. The pipeline environment (state store with a finished initial copy) is set."""
    n = max(1, round(rate * duration))
    pairs = synced_lead_pairs(remote, n)
    if not pairs:
        raise RuntimeError("no synced lead to edit: did the initial copy link any lead?")
    edits: list[Edit] = []
    lock, stop = threading.Lock(), threading.Event()
    poller = threading.Thread(
        target=_poll, args=(edits, lock, stop), name="bench-freshness-poll", daemon=True
    )
    with tempfile.TemporaryDirectory(prefix="bench-freshness-", dir=work_dir) as tmp:
        daemon = start_daemon(Path(tmp) / "dagster_home", Path(tmp) / "daemon.log")
        try:
            time.sleep(2)  # let the daemon load the code location before the clock starts
            if daemon.poll() is not None:
                raise RuntimeError(f"dagster-daemon exited: {(Path(tmp) / 'daemon.log').read_text()[-2000:]}")
            remote.reset_calls()
            poller.start()
            started = time.monotonic()
            log(f"freshness: {n} edits at {rate:g}/s over {duration:g} s, both sides...")
            for i in range(n):
                time.sleep(max(0.0, started + i / rate - time.monotonic()))
                dynamics_id, person_id = pairs[i % len(pairs)]
                stamp = f"{int(started) % 100000:05d}{i:05d}"
                if i % 2 == 0:
                    phone = f"+1 555 {stamp}"
                    remote.dynamics_update("lead", dynamics_id, {"telephone1": phone})
                    edit = Edit(
                        "dynamics", time.monotonic(), _arrived_in_marketo(remote, person_id, "phone", phone)
                    )
                else:
                    title = f"Freshness {stamp}"
                    remote.marketo_update_lead(person_id, {"title": title})
                    edit = Edit(
                        "marketo",
                        time.monotonic(),
                        _arrived_in_dynamics(remote, dynamics_id, "jobtitle", title),
                    )
                with lock:
                    edits.append(edit)
            last_edit = time.monotonic()
            while time.monotonic() < last_edit + drain and any(e.arrived_at is None for e in edits):
                time.sleep(POLL_SECONDS)
            stop.set()
            poller.join()
            # The calls of the runs that delivered the last edits count too: let them finish (bounded).
            settle_until = time.monotonic() + SETTLE_SECONDS
            while _in_flight(Path(tmp) / "dagster_home") and time.monotonic() < settle_until:
                time.sleep(1)
            calls = remote.calls()
            in_flight = _in_flight(Path(tmp) / "dagster_home")
        finally:
            stop.set()
            stop_daemon(daemon)
        runs = _runs(Path(tmp) / "dagster_home", in_flight)
    latencies = [(e.arrived_at - e.made_at) if e.arrived_at is not None else math.inf for e in edits]
    counted = {s: calls.get(k, 0) for s, k in COUNTED_CALLS.items()}

    def stat(q: float, side: str | None = None) -> float | None:
        values = [lat for lat, e in zip(latencies, edits, strict=True) if side in (None, e.side)]
        v = percentile(values, q)
        return None if v is None or math.isinf(v) else round(v, 1)

    return {
        "edits": len(edits),
        "rate_per_second": rate,
        "duration_seconds": duration,
        "arrived": sum(e.arrived_at is not None for e in edits),
        "drain_seconds": drain,
        "latency_seconds": {
            "p50": stat(50),
            "p95": stat(95),
            "max": stat(100),
            "poll_resolution": POLL_SECONDS,
        },
        "by_side": {
            side: {"p50": stat(50, side), "p95": stat(95, side), "max": stat(100, side)}
            for side in ("dynamics", "marketo")
        },
        "calls": counted,
        "calls_per_edit": {s: round(v / len(edits), 2) for s, v in counted.items()},
        "runs": runs,
        "target_p95_seconds": TARGET_P95_SECONDS,
    }


def _in_flight(home: Path) -> set[str]:
    """Runs not finished when the measurement ends: stopping the daemon interrupts them (not a failure of theirs)."""
    import dagster as dg

    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            return {r.dagster_run.run_id for r in instance.get_run_records() if not r.dagster_run.is_finished}
    except Exception:  # noqa: BLE001 - then they are reported by their final status
        return set()


def _runs(home: Path, in_flight: set[str]) -> dict[str, Any]:
    """Runs the daemon launched, by status, and why any failed; runs in flight at the end count apart."""
    import dagster as dg

    out: dict[str, Any] = {}
    failures: list[str] = []
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for record in instance.get_run_records():
                run = record.dagster_run
                status = "IN_FLIGHT_AT_END" if run.run_id in in_flight else run.status.value
                out[status] = out.get(status, 0) + 1
                if status == dg.DagsterRunStatus.FAILURE.value:
                    events = instance.all_logs(
                        run.run_id,
                        of_type={dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.STEP_FAILURE},
                    )
                    message = next((e.message for e in reversed(events) if e.message), "")
                    failures.append(f"{run.tags.get('dagster/sensor_name', '?')}: {message[:300]}")
    except Exception as exc:  # noqa: BLE001 - the count is informative; the latencies are the result
        out["unreadable"] = str(exc)[:200]
    if failures:
        out["failures"] = failures
    return out
