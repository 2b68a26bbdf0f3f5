"""Benchmark outputs: one JSON record per run, a Markdown table and a PNG chart (time and memory by scale).

``write_outputs`` merges the new run into ``latest.json`` by scale and scenario, so running one scale (or one
scenario) keeps the other latest numbers; the targets, table and chart are drawn from the merged record.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from sync_pipeline.bench.targets import GIB_MB, evaluate
from sync_pipeline.sandbox.generator import SCALES

CHART_SCENARIOS = (
    ("initial", "o"),
    ("settle_after_initial", "v"),
    ("incremental", "s"),
    ("idle", "^"),
    ("realistic", "D"),
)


def _scale_order(scale: str) -> int:
    names = list(SCALES)
    return names.index(scale) if scale in names else len(names)


def merge_latest(path: Path, run: dict[str, Any]) -> dict[str, Any]:
    latest: dict[str, Any] = {"scales": {}}
    if path.exists():
        try:
            latest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); move it away to start a new record") from None
    previous = latest.setdefault("scales", {}).get(run["scale"], {})
    # A run of some scenarios replaces those and keeps the others (e.g. freshness measured on its own).
    latest["scales"][run["scale"]] = {
        **previous,
        **run,
        "scenarios": {**previous.get("scenarios", {}), **run["scenarios"]},
    }
    latest["scales"] = dict(sorted(latest["scales"].items(), key=lambda kv: _scale_order(kv[0])))
    latest.pop("targets", None)  # superseded by the evaluated table in results.md
    return latest


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{suffix}"
    if isinstance(value, int):
        return f"{value:,}{suffix}"
    return f"{value}{suffix}"


def _value(row: dict[str, Any]) -> str:
    value = row["value"]
    if value is None:
        return "-"
    if value == float("inf"):
        return "unbounded" if row["measure"].startswith("realistic") else "lost edits"
    return _fmt(value) + ("x" if row["unit"] == "x" else f" {row['unit']}")


def targets_table(latest: dict[str, Any]) -> list[str]:
    lines = ["| measure | scale | measured | target | |", "|---|---|---:|---:|---|"]
    for row in evaluate(latest):
        bound = _fmt(row["bound"]) + ("x" if row["unit"] == "x" else f" {row['unit']}")
        mark = {"met": "met", "missed": "**missed**", "not measured": "not measured"}[row["status"]]
        lines.append(
            f"| {row['measure']} | {row['scale']} | {_value(row)} | {row['sense']} {bound} | {mark} |"
        )
    return lines


def markdown(latest: dict[str, Any]) -> str:
    lines = [
        "# Pipeline benchmarks",
        "",
        "Written by `sync-pipeline bench` (one run per scale; `--scenario freshness` separately). The targets "
        "are issue 13's; met/missed is computed from the numbers below.",
        "",
        "## Targets",
        "",
    ]
    lines += targets_table(latest)
    lines += [
        "",
        "## Runs",
        "",
        "CPU: user + system seconds of the pipeline process and, separately, of the sandbox process. Calls: "
        "every API call (Marketo: REST and bulk, token calls excluded).",
        "",
        "| scale | scenario | records | seconds | records/s | peak RSS MB | pipeline CPU s (/100k) "
        "| sandbox CPU s | calls | Marketo calls | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scale, run in latest["scales"].items():
        for name, sc in run["scenarios"].items():
            if name == "population":
                lines.append(
                    f"| {scale} | population | {_fmt(sc['records'])} | {_fmt(sc['seconds'])} | | | | | | | "
                    f"sandbox generate + load |"
                )
                continue
            if name == "idle_sensor_tick":
                lines.append(
                    f"| {scale} | idle (sensor tick) | | | | | | | {sc['http_calls']} | | "
                    f"calls of one change-sensor tick, tokens cached |"
                )
                continue
            if name == "freshness":
                continue
            api, cpu = sc["api"], sc.get("cpu", {})
            note = ""
            if name == "incremental":
                note = f"{sum(sc['changes'].values()):,} edits"
            elif name == "realistic":
                note = (
                    f"floor {_fmt(sc.get('floor_seconds', sc['budget_floor_seconds']))} s "
                    f"({sc.get('floor_bound_by', 'API budget')}), x{_fmt(sc.get('vs_floor', sc['vs_budget_floor']))}"
                )
            lines.append(
                f"| {scale} | {name} | {_fmt(sc['records_read'])} | {_fmt(sc['seconds'])} | "
                f"{_fmt(sc['records_per_second'])} | {_fmt(sc['peak_rss_mb'])} | "
                f"{_fmt(cpu.get('pipeline_seconds'))} ({_fmt(cpu.get('pipeline_per_100k_records'))}) | "
                f"{_fmt(cpu.get('sandbox_seconds'))} | {_fmt(api['total'])} | {_fmt(api.get('marketo_calls'))} | "
                f"{note} |"
            )
    lines += _floors(latest) + _freshness(latest)
    lines += ["", "## Slowest stages per scale and scenario", ""]
    for scale, run in latest["scales"].items():
        for name, sc in run["scenarios"].items():
            if name in ("population", "idle_sensor_tick", "freshness"):
                continue
            top = ", ".join(
                f"{s['asset']} {s['seconds']:.2f} s ({_fmt(s['records_per_second'])}/s)"
                for s in sc["stages"][:4]
            )
            lines.append(f"- **{scale} / {name}**: {top}")
    host = latest.get("host", {})
    lines += [
        "",
        f"Host: {host.get('cpus', '?')} CPUs, Python {host.get('python', '?')}; "
        f"written {latest.get('written', '?')}.",
        "",
    ]
    return "\n".join(lines)


def _floors(latest: dict[str, Any]) -> list[str]:
    """The realistic run's API-budget floor per system (sync_pipeline.bench.floor), the binding one first."""
    rows = [
        (scale, run["scenarios"]["realistic"])
        for scale, run in latest["scales"].items()
        if "realistic" in run["scenarios"] and "marketo" in run["scenarios"]["realistic"].get("budget", {})
    ]
    if not rows:
        return []
    lines = [
        "",
        "## Realistic profile: API-budget floor per system",
        "",
        "The least time the calls the run made need under the services' own rules (Marketo 100 calls / 20 s; "
        "Dataverse 6,000 requests and 1,200 s execution time / 300 s, a $batch one request), from the "
        "sandbox's admitted-call counters. The run's floor is the later of that and the same copy with limits "
        "off at this scale (what the work itself takes).",
        "",
        "| scale | run s | Marketo calls | Marketo floor s | daily quota used | Dynamics requests | Dynamics "
        "execution s | Dynamics floor s | binding | run / budget floor | limits-off copy s | run / floor | "
        "run - floor s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for scale, sc in rows:
        b = sc["budget"]
        m, d = b["marketo"], b["dynamics"]
        lines.append(
            f"| {scale} | {_fmt(sc['seconds'])} | {_fmt(m['calls'])} | {_fmt(m['seconds'])} | "
            f"{m['daily_quota_share'] * 100:.2f}% | {_fmt(d['requests'])} | {_fmt(d['execution_seconds'])} | "
            f"{_fmt(d['seconds'])} | {b['binding']} | {_fmt(sc['vs_budget_floor'])} | "
            f"{_fmt(sc.get('limits_off_seconds'))} | {_fmt(sc.get('vs_floor'))} | "
            f"{_fmt(sc.get('over_floor_seconds'))} |"
        )
    return lines


def _freshness(latest: dict[str, Any]) -> list[str]:
    rows = [
        (scale, run["scenarios"]["freshness"])
        for scale, run in latest["scales"].items()
        if "freshness" in run["scenarios"]
    ]
    if not rows:
        return []
    lines = [
        "",
        "## Freshness: edit to other side, daemon + change sensor, realistic profile",
        "",
        "| scale | edits (rate, duration) | arrived | p50 s | p95 s | max s | Dynamics->Marketo p95 | "
        "Marketo->Dynamics p95 | calls per edit (Marketo / Dynamics) | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for scale, sc in rows:
        lat, side, per = sc["latency_seconds"], sc["by_side"], sc["calls_per_edit"]
        runs = ", ".join(f"{k} {v}" for k, v in sc.get("runs", {}).items() if isinstance(v, int))
        lines.append(
            f"| {scale} | {sc['edits']} ({sc['rate_per_second']:g}/s, {sc['duration_seconds']:g} s) | "
            f"{sc['arrived']} | {_fmt(lat['p50'])} | {_fmt(lat['p95'])} | {_fmt(lat['max'])} | "
            f"{_fmt(side['dynamics']['p95'])} | {_fmt(side['marketo']['p95'])} | "
            f"{_fmt(per.get('marketo'))} / {_fmt(per.get('dynamics'))} | {runs} |"
        )
    return lines


def chart(latest: dict[str, Any], path: Path) -> None:
    """Time, records/s, peak RSS of the pipeline and API calls, per scenario, against the org's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [
        s
        for s, run in latest["scales"].items()
        if "population" in run["scenarios"] or "initial" in run["scenarios"]
    ]
    size = {
        s: (latest["scales"][s]["scenarios"].get("population") or {}).get("records")
        or latest["scales"][s]["scenarios"]["initial"]["records_read"]
        for s in scales
    }
    panels = (
        ("seconds", "wall time (s)"),
        ("records_per_second", "records read / s"),
        ("peak_rss_mb", "peak RSS of the pipeline (MB)"),
        ("calls", "API calls"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    for (metric, label), ax in zip(panels, axes.flat, strict=True):
        for scenario, marker in CHART_SCENARIOS:
            points = [
                (size[s], latest["scales"][s]["scenarios"][scenario])
                for s in scales
                if scenario in latest["scales"][s]["scenarios"]
            ]
            if metric == "calls":
                values = [(x, p["api"]["total"]) for x, p in points]
            else:
                values = [(x, p.get(metric)) for x, p in points]
            values = [(x, y) for x, y in values if isinstance(y, (int, float)) and y > 0]
            if values:
                ax.plot([x for x, _ in values], [y for _, y in values], marker=marker, label=scenario)
        ax.set_xscale("log")
        if metric in ("calls", "seconds"):
            ax.set_yscale("log")
        ax.set_xlabel("records in the org")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        for s in scales:
            ax.axvline(size[s], color="grey", linewidth=0.4)
            ax.annotate(
                s,
                (size[s], 1),
                xycoords=("data", "axes fraction"),
                textcoords="offset points",
                xytext=(2, -10),
                fontsize=8,
            )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[1][0].axhline(GIB_MB, color="red", linestyle="--", linewidth=0.8)
    axes[0][1].axhline(20_000, color="red", linestyle="--", linewidth=0.8)
    fig.suptitle("sync-pipeline by scale: time, throughput, memory, API calls (red: issue 13 targets)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(run: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``run-<scale>.json`` (this run) plus the merged ``latest.json``, ``results.md`` and ``chart.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    run = {**run, "written": stamp}
    paths = {
        "run": out_dir / f"run-{run['scale']}.json",
        "latest": out_dir / "latest.json",
        "markdown": out_dir / "results.md",
        "chart": out_dir / "chart.png",
    }
    paths["run"].write_text(json.dumps(run, indent=2))
    latest = merge_latest(paths["latest"], run)
    latest["written"] = stamp
    latest["host"] = {"cpus": _cpus(), "python": platform.python_version()}
    paths["latest"].write_text(json.dumps(latest, indent=2))
    paths["markdown"].write_text(markdown(latest))
    chart(latest, paths["chart"])
    return paths


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
