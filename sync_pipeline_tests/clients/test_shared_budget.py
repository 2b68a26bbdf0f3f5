"""The Marketo budget shared through a database: two OS processes, one instance, never over its limits.

The sandbox runs the realistic profile (100 calls / 20 s, 10 in flight: the figures Adobe documents,
https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/rest-api) and records when each
call reached it; two worker processes, each with its own client, call it as fast as their budget lets them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from sync_pipeline.clients.budget import CALLS, SharedBudget, sqlite_url, wait_for_room
from sync_pipeline.resources.marketo import MarketoResource, instance_budget_url
from sync_pipeline.sandbox.marketo import MarketoSandbox
from sync_pipeline.sandbox.schema import load_schema

HERE = Path(__file__).resolve().parent
REALISTIC = load_schema().raw["limits"]["realistic"]["marketo"]


def _pg_fixture_module() -> Any:
    """The throwaway-PostgreSQL fixture of the deploy tests, reused rather than copied."""
    spec = importlib.util.spec_from_file_location(
        "_deploy_postgres", HERE.parent / "deploy" / "test_postgres.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


postgres = _pg_fixture_module().postgres


def max_in_any_window(times: list[float], span: float) -> int:
    """The most calls any window ``(t - span, t]`` holds (the server's sliding window)."""
    times, most, first = sorted(times), 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - span:
            first += 1
        most = max(most, last - first + 1)
    return most


# ------------------------------------------------------------------------------------------- arithmetic
def test_wait_for_room_is_the_time_until_the_oldest_blocking_call_leaves() -> None:
    assert wait_for_room([], 100.0, 20.0, 3) == 0.0
    assert wait_for_room([90.0, 95.0], 100.0, 20.0, 3) == 0.0  # room for one more
    assert wait_for_room([81.0, 90.0, 95.0], 100.0, 20.0, 3) == pytest.approx(1.0)  # 81 leaves at 101
    assert wait_for_room([70.0, 80.0, 90.0, 95.0], 100.0, 20.0, 3) == 0.0  # 70 and 80 have left (80 just now)
    assert wait_for_room([70.0, 81.0, 90.0, 95.0], 100.0, 20.0, 3) == pytest.approx(1.0)
    # Over the limit (another process with a larger share): wait until enough calls have left, not just one.
    assert wait_for_room([85.0, 86.0, 90.0, 95.0, 99.0], 100.0, 20.0, 3) == pytest.approx(10.0)
    assert max_in_any_window([0.0, 1.0, 19.9, 20.0, 20.5, 40.0], 20.0) == 4  # (0.5, 20.5]: 1, 19.9, 20, 20.5


def test_budget_admits_a_window_then_waits_and_shares_it_across_objects(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    first = SharedBudget(url, "123-ABC-456", calls_per_window=3, window_seconds=1.0, safety_seconds=0.05)
    second = SharedBudget(url, "123-abc-456", calls_per_window=3, window_seconds=1.0, safety_seconds=0.05)
    other = SharedBudget(url, "999-XYZ-000", calls_per_window=3, window_seconds=1.0, safety_seconds=0.05)
    started = time.monotonic()
    for budget in (first, second, first):
        with budget.slot():
            pass
    assert time.monotonic() - started < 0.5
    with other.slot():  # another Marketo instance: its own window
        pass
    assert time.monotonic() - started < 0.5
    with second.slot():  # the instance's fourth call waits for the first to leave the window
        pass
    assert time.monotonic() - started >= 1.0
    assert first.daily_calls == 4 and other.daily_calls == 1


def test_concurrency_leases_are_shared_and_expire(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    a = SharedBudget(url, "inst", calls_per_window=100, max_concurrent=2, lease_seconds=0.5)
    b = SharedBudget(url, "inst", calls_per_window=100, max_concurrent=2, lease_seconds=0.5)
    crashed, _ = a._try_admit()  # a process that took a lease and died: its lease expires
    assert crashed
    entered = threading.Event()
    with a.slot():

        def third() -> None:
            with b.slot():
                entered.set()

        t = threading.Thread(target=third)
        t.start()
        assert not entered.wait(0.3)  # two leases held: the third call waits
        assert entered.wait(2.0)  # the dead process's lease expired
        t.join()


def test_a_halt_and_a_pause_reach_every_process(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    a = SharedBudget(url, "inst", daily_quota=2)
    b = SharedBudget(url, "inst", daily_quota=2)
    with b.slot():
        pass
    started = time.monotonic()
    a.pause(0.4)  # a 606 seen by a holds b back too
    with b.slot():
        pass
    assert time.monotonic() - started >= 0.35
    with a.slot():  # the daily share is spent: admitted as halted, not as a call
        pass
    assert a.halted_until() is not None and b.halted_until() is None
    with b.slot():
        pass
    assert b.halted_until() == a.halted_until() and a.daily_calls == 2


# ------------------------------------------------------------------------------------------- under Dagster
def _pg_url(pg: dict[str, str]) -> str:
    return (
        f"postgresql+psycopg2://{pg['DAGSTER_PG_USERNAME']}:{pg['DAGSTER_PG_PASSWORD']}@{pg['DAGSTER_PG_HOST']}:"
        f"{pg['DAGSTER_PG_PORT']}/{pg['DAGSTER_PG_DB']}"
    )


def _budget_in_instance_storage(
    tmp_path: Path, overrides: dict[str, Any] | None, expected_url: str | None
) -> None:
    sb = MarketoSandbox().start()
    try:

        @dg.asset
        def probe(marketo: MarketoResource) -> dg.MaterializeResult:
            marketo.get_client().describe2()
            return dg.MaterializeResult(metadata={"budget": type(marketo.get_budget()).__name__})

        res = MarketoResource(base_url=sb.base_url, client_id=sb.client_id, client_secret=sb.client_secret)
        with dg.instance_for_test(temp_dir=str(tmp_path), overrides=overrides) as instance:
            url = instance_budget_url(instance)
            assert url == (expected_url or sqlite_url(instance.storage_directory()))
            result = dg.materialize([probe], resources={"marketo": res}, instance=instance)
            assert result.success
            meta = result.asset_materializations_for_node("probe")[0].metadata
            assert meta["budget"].value == "SharedBudget"
            engine = SharedBudget(url, "probe").engine
            with engine.connect() as conn:
                keys = conn.execute(sa.select(CALLS.c.instance).distinct()).scalars().all()
            engine.dispose()
            assert keys == [res.budget_key]  # the run's calls were admitted by the instance's database
        assert type(res.get_budget()).__name__ == "RateGovernor"  # outside Dagster: this process's own
    finally:
        sb.stop()


def test_resource_under_a_dagster_instance_keeps_the_budget_in_its_storage(tmp_path: Path) -> None:
    _budget_in_instance_storage(tmp_path, None, None)


@pytest.mark.postgres
def test_resource_under_a_postgres_instance_keeps_the_budget_in_postgresql(tmp_path: Path, postgres) -> None:
    url = _pg_url(postgres)
    _budget_in_instance_storage(tmp_path, {"storage": {"postgres": {"postgres_url": url}}}, url)


# ------------------------------------------------------------------------------------------- two processes
@pytest.fixture
def realistic_marketo() -> Iterator[tuple[MarketoSandbox, list[float]]]:
    # A real call spends a while in flight: with 0.2 s each, the two processes' 12 threads would hold more than
    # Marketo's 10 concurrent calls unless their leases are shared.
    sb = MarketoSandbox(limits={**REALISTIC, "latency_seconds": 0.2}).start()
    arrivals: list[float] = []
    enter = sb.gate.enter

    def recorded() -> Any:  # every call the server counts, refused ones included (Marketo counts them too)
        arrivals.append(time.monotonic())
        return enter()

    sb.gate.enter = recorded  # type: ignore[method-assign]
    yield sb, arrivals
    sb.stop()


def _hammer(
    sb: MarketoSandbox, budget_url: str | None, calls_per_window: int, calls: int
) -> list[dict[str, Any]]:
    cfg = {
        "base_url": sb.base_url,
        "client_id": sb.client_id,
        "client_secret": sb.client_secret,
        "budget_url": budget_url,
        "instance": "shared-instance",
        "calls_per_window": calls_per_window,
        "window_seconds": 20.0,
        "max_concurrent": 8,
        "calls": calls,
        "threads": 6,
        "start_at": time.time() + 3.0,
    }
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    workers = [
        subprocess.Popen(
            [sys.executable, str(HERE / "budget_worker.py"), json.dumps(cfg)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for w in workers:
        out, err = w.communicate(timeout=180)
        assert w.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


CALLS_EACH = 70  # two processes: 2 x (70 + 1) calls, more than one window's 100


def _shared_run(sb: MarketoSandbox, arrivals: list[float], url: str) -> None:
    started = time.monotonic()
    results = _hammer(sb, url, calls_per_window=REALISTIC["calls_per_window"], calls=CALLS_EACH)
    elapsed = time.monotonic() - started
    busiest = max_in_any_window(arrivals, REALISTIC["window_seconds"])
    print(
        f"shared budget: {len(arrivals)} calls, busiest 20 s window {busiest}, {elapsed:.1f}s, "
        f"sandbox refusals {dict(sb.gate.rejected)}"
    )
    assert [r["errors"] for r in results] == [{}, {}] and sum(r["ok"] for r in results) == 2 * CALLS_EACH
    assert sb.gate.rejected == {}  # never a 606, 615 or 607
    assert len(arrivals) == 2 * (CALLS_EACH + 1)
    assert busiest <= REALISTIC["calls_per_window"]
    assert busiest >= REALISTIC["calls_per_window"] - 10  # the budget was actually the constraint
    assert arrivals[-1] - arrivals[0] >= REALISTIC["window_seconds"]  # the last calls waited for the window


def test_two_processes_share_one_budget_over_sqlite(realistic_marketo, tmp_path: Path) -> None:
    sb, arrivals = realistic_marketo
    _shared_run(sb, arrivals, sqlite_url(tmp_path))


@pytest.mark.postgres
def test_two_processes_share_one_budget_over_postgresql(realistic_marketo, postgres: dict[str, str]) -> None:
    sb, arrivals = realistic_marketo
    _shared_run(sb, arrivals, _pg_url(postgres).replace("+psycopg2", ""))  # dagster's plain URLs work too


def test_without_the_shared_budget_the_same_load_exceeds_the_window(realistic_marketo) -> None:
    """The control: each process keeps within its own 71 calls / 20 s and 8 in flight; together they overrun
    the instance."""
    sb, arrivals = realistic_marketo
    results = _hammer(sb, None, calls_per_window=CALLS_EACH + 1, calls=CALLS_EACH)
    busiest = max_in_any_window(arrivals, REALISTIC["window_seconds"])
    print(f"per-process budgets: busiest 20 s window {busiest}, sandbox refusals {dict(sb.gate.rejected)}")
    assert busiest > REALISTIC["calls_per_window"]
    assert sb.gate.rejected["606"] > 0 and sum(r["errors"].get("606", 0) for r in results) > 0
    assert sb.gate.rejected["615"] > 0
