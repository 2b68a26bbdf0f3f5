"""Smoke test of ``sync-pipeline bench --scale small``: a real run (sandbox process + Dagster runs) whose outputs are
well-formed. No timing assertions: the numbers depend on the machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_pipeline.bench.pipeline import budget_floor_seconds, call_floor, http_requests, is_marketo_write
from sync_pipeline.cli import main
from sync_pipeline.config.model import load_config
from sync_pipeline.connection.keys import asset_key, key_name
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN


def test_bench_writes_json_markdown_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks"
    result = CliRunner().invoke(
        main, ["bench", "--scale", "small", "--scenario", "incremental", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)

    latest = json.loads((out / "latest.json").read_text())
    run = latest["scales"]["small"]
    assert json.loads((out / "run-small.json").read_text())["scenarios"].keys() == run["scenarios"].keys()
    assert set(run["scenarios"]) == {"population", "settle_after_initial", "incremental"}
    population = run["scenarios"]["population"]["counts"]
    cycle = run["scenarios"]["incremental"]
    assert sum(cycle["changes"].values()) >= 500  # small orgs cap some tables below their share
    assert cycle["seconds"] > 0 and cycle["peak_rss_mb"] > 50
    # The delta reads saw the Dynamics edits: at least the contacts and accounts edited.
    raw = {s["asset"]: s["records"] for s in cycle["stages"]}
    assert raw[key_name(asset_key(CONN, "contact", "extract"))] >= cycle["changes"]["dynamics.contact"]
    assert raw[key_name(asset_key(CONN, "account", "extract"))] >= cycle["changes"]["dynamics.account"]
    api = cycle["api"]
    assert api["total"] == http_requests(api["calls"]) <= sum(api["calls"].values())
    extracted = [e for e in load_config(None).entities if e.dynamics is not None]
    assert api["floor"]["dynamics.query"] == len(extracted)  # one delta read a table
    assert all(population[f"dynamics.{e.dynamics.table}"] > 0 for e in extracted)
    assert api["dynamics_query"] >= api["floor"]["dynamics.query"]

    md = (out / "results.md").read_text()
    assert "| small | incremental |" in md and "| small | population |" in md
    png = (out / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_floors() -> None:
    assert budget_floor_seconds(0, 100, 20) == 0.0
    assert budget_floor_seconds(100, 100, 20) == 0.0
    assert budget_floor_seconds(101, 100, 20) == 20.0
    assert budget_floor_seconds(350, 100, 20) == 60.0
    assert is_marketo_write("marketo.leads.sync") and is_marketo_write("marketo.customobjects.sync")
    assert not is_marketo_write("marketo.leads.get") and not is_marketo_write("dynamics.sync")

    class Side:
        def __init__(self, table: str):
            self.table = table

    class Entity:
        def __init__(self, table: str | None):
            self.name = table or "derived"
            self.dynamics = Side(table) if table else None

    class Config:
        entities = [Entity("contact"), Entity("account"), Entity(None)]

    stages = [
        {"asset": key_name(asset_key(CONN, "contact", "push")), "records": 601},
        {"asset": key_name(asset_key(CONN, "account", "push")), "records": 0},
        {"asset": key_name(asset_key(CONN, "contact", "extract")), "records": 12_000},
    ]
    counts = {"dynamics.contact": 12_000, "dynamics.account": 5000}
    assert call_floor(Config(), counts, stages, full_read=True) == {
        "dynamics.query": 3 + 1,
        "marketo.writes": 3,
    }
    assert call_floor(Config(), counts, stages, full_read=False) == {"dynamics.query": 2, "marketo.writes": 3}


@pytest.mark.slow
def test_freshness_measures_edit_to_arrival_with_the_daemon(tmp_path: Path) -> None:
    """A short freshness run (10 s of edits, both sides) at scale small: every edit arrives through the daemon's
    change sensor and runs, and the calls it spent are counted (about 90 s: behind --long)."""
    out = tmp_path / "benchmarks"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--scale",
            "small",
            "--scenario",
            "freshness",
            "--duration",
            "10",
            "--drain",
            "150",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    fresh = json.loads((out / "latest.json").read_text())["scales"]["small"]["scenarios"]["freshness"]
    assert fresh["edits"] == 10 and fresh["arrived"] == fresh["edits"]
    lat = fresh["latency_seconds"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"] <= 150 + fresh["latency_seconds"]["poll_resolution"]
    assert fresh["by_side"]["dynamics"]["max"] is not None and fresh["by_side"]["marketo"]["max"] is not None
    assert (
        fresh["calls"]["marketo"] > 0 and fresh["calls"]["dynamics"] > 0
    )  # sensor ticks and runs spend calls
    assert "## Freshness" in (out / "results.md").read_text()
