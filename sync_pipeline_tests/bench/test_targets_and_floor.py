"""The API-budget floor per system, the targets' met/missed evaluation and the merge of runs into latest.json, from
constructed records (no benchmark run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sync_pipeline.bench.floor import (
    API_BUDGET,
    COUNTED_CALLS,
    DYNAMICS_EXECUTION_BUDGET,
    DYNAMICS_EXECUTION_MS,
    budget_floor,
    execution_floor_seconds,
)
from sync_pipeline.bench.freshness import percentile
from sync_pipeline.bench.pipeline import (
    asset_parts,
    http_requests,
    is_extract,
    is_marketo_push,
    marketo_calls,
    realistic_floor,
)
from sync_pipeline.bench.report import markdown, merge_latest
from sync_pipeline.bench.targets import evaluate


def test_floor_per_system_names_the_binding_one() -> None:
    per_window, window = API_BUDGET["marketo"]
    calls = {
        COUNTED_CALLS["marketo"]: 3 * per_window + 1,
        COUNTED_CALLS["dynamics"]: 10,
        DYNAMICS_EXECUTION_MS: 5_000,
    }
    floor = budget_floor(calls)
    assert floor["marketo"]["seconds"] == 3 * window and floor["dynamics"]["seconds"] == 0.0
    assert floor["binding"] == "marketo" and floor["seconds"] == 3 * window
    # Dataverse's execution-time rule binds when $batch requests carry much server work with few requests.
    exec_limit, exec_window = DYNAMICS_EXECUTION_BUDGET
    heavy = {COUNTED_CALLS["dynamics"]: 20, DYNAMICS_EXECUTION_MS: int(2.5 * exec_limit * 1000)}
    floor = budget_floor(heavy)
    assert floor["dynamics"]["requests_seconds"] == 0.0
    assert floor["dynamics"]["execution_floor_seconds"] == 2 * exec_window == floor["seconds"]
    assert floor["binding"] == "dynamics"
    assert execution_floor_seconds(exec_limit, exec_limit, exec_window) == 0.0
    assert budget_floor({})["seconds"] == 0.0


def test_requests_are_counted_as_the_services_count_them() -> None:
    calls = {
        "dynamics.batch": 2,
        "dynamics.update": 500,
        "parts.dynamics.batch": 500,
        "dynamics.query": 8,
        "marketo.identity": 1,
        "identity.token": 1,
        "marketo.leads.sync": 4,
        "marketo.bulk.export.file": 2,
        "limits.marketo.calls": 6,
    }
    assert http_requests(calls) == 2 + 8 + 1 + 1 + 4 + 2
    assert http_requests(calls, tokens=False) == 2 + 8 + 4 + 2
    assert marketo_calls(calls) == 6
    assert asset_parts("conn/marketo/lead/push") == ("marketo", "lead", "push")
    assert is_marketo_push("marketo/lead/push") and not is_marketo_push("dynamics/lead/push")
    assert is_extract("dynamics/contact/extract") and not is_extract("sync/contact/plan")


def test_percentile_and_lost_edits() -> None:
    assert percentile([], 95) is None
    values = [float(i) for i in range(1, 101)]
    assert (
        percentile(values, 50) == 50.0 and percentile(values, 95) == 95.0 and percentile(values, 100) == 100.0
    )
    assert math.isinf(percentile(values[:94] + [math.inf] * 6, 95))


def _scenarios(incremental: float, rss: float, realistic: float, floor: float) -> dict:
    api = {"total": 9, "marketo_calls": 2, "calls": {}, "floor": {}, "dynamics_query": 8}
    common = {"records_read": 1000, "records_per_second": 100, "stages": [], "api": api}
    return {
        "incremental": {
            **common,
            "seconds": incremental,
            "peak_rss_mb": rss,
            "changes": {"dynamics.lead": 1000},
        },
        "realistic": {
            **common,
            "seconds": realistic,
            "peak_rss_mb": rss,
            "budget_floor_seconds": floor,
            "vs_budget_floor": round(realistic / floor, 3) if floor else None,
        },
    }


def test_targets_are_computed_met_missed_or_not_measured(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    small = {"scale": "small", "scenarios": _scenarios(incremental=2.0, rss=400, realistic=5.0, floor=0.0)}
    large = {
        "scale": "large",
        "scenarios": _scenarios(incremental=3.5, rss=900, realistic=105.0, floor=100.0),
    }
    latest = merge_latest(path, small)
    path.write_text(json.dumps(latest))
    latest = merge_latest(path, large)
    rows = {(r["measure"], r["scale"]): r for r in evaluate(latest)}
    assert rows[("1,000 changes, incremental", "small")]["status"] == "met"
    assert rows[("1,000 changes, incremental", "large")]["status"] == "missed"
    assert rows[("1,000 changes, large / small", "large")]["value"] == 1.75
    assert rows[("1,000 changes, large / small", "large")]["status"] == "missed"
    assert rows[("peak RSS of the pipeline process", "large")]["status"] == "met"
    assert rows[("peak RSS, large / medium", "large")]["status"] == "not measured"
    assert (
        rows[("realistic profile, time / floor (API budget or limits-off copy)", "large")]["status"] == "met"
    )
    assert (
        rows[("realistic profile, time / floor (API budget or limits-off copy)", "small")]["status"]
        == "missed"
    )  # 0 s floor
    assert rows[("1,000 changes, incremental", "medium")]["status"] == "not measured"

    # A later run of one scenario at a scale keeps that scale's other scenarios.
    path.write_text(json.dumps(latest))
    side = {"p50": 20.0, "p95": 75.0, "max": 80.0}
    fresh = {
        "scale": "small",
        "scenarios": {
            "freshness": {
                "latency_seconds": side,
                "by_side": {"dynamics": side, "marketo": side},
                "edits": 10,
                "arrived": 10,
                "rate_per_second": 1.0,
                "duration_seconds": 10.0,
                "calls_per_edit": {"marketo": 0.5, "dynamics": 0.7},
                "runs": {"SUCCESS": 2},
            }
        },
    }
    latest = merge_latest(path, fresh)
    assert set(latest["scales"]["small"]["scenarios"]) == {"incremental", "realistic", "freshness"}
    rows = {r["measure"]: r for r in evaluate(latest) if r["measure"].startswith("edit-to-other-side")}
    assert len(rows) == 1 and next(iter(rows.values()))["status"] == "missed"
    assert next(iter(rows.values()))["scale"] == "small"
    md = markdown(latest)
    assert "| 1,000 changes, incremental | large | 3.50 s | <= 3.00 s | **missed** |" in md
    assert "| small | 10 (1/s, 10 s) | 10 | 20.00 | 75.00 | 80.00 |" in md


def test_realistic_floor_is_the_later_of_the_budget_and_the_limits_off_copy() -> None:
    budget_bound = realistic_floor(130.0, {"seconds": 120.0}, limits_off_seconds=90.0)
    assert budget_bound["floor_seconds"] == 120.0 and budget_bound["floor_bound_by"] == "API budget"
    assert budget_bound["vs_floor"] == round(130 / 120, 3) and budget_bound["over_floor_seconds"] == 10.0
    work_bound = realistic_floor(130.0, {"seconds": 40.0}, limits_off_seconds=125.0)
    assert work_bound["floor_seconds"] == 125.0 and work_bound["floor_bound_by"] == "limits-off copy"
    assert work_bound["vs_budget_floor"] == 3.25 and work_bound["vs_floor"] == 1.04
    # Calls that fit in one window and no limits-off run to compare with: no floor, so no ratio.
    nothing = realistic_floor(5.0, {"seconds": 0.0}, limits_off_seconds=None)
    assert nothing["vs_floor"] is None and nothing["vs_budget_floor"] is None
