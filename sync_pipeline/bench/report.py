"""Benchmark outputs: one JSON record per run, a Markdown table and a PNG chart (time and memory by scale).

``write_outputs`` merges the new run into ``latest.json`` by scale, so running one scale keeps the other
scales' latest numbers; the table and chart are drawn from the merged record.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from sync_pipeline.sandbox.generator import SCALES

TARGETS = {"initial_records_per_second": 20_000, "peak_rss_mb": 1024, "incremental_seconds": 5.0,
           "calls_vs_floor": 1.02, "idle_calls": 10, "realistic_vs_budget_floor": 1.10}


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
    latest.setdefault("scales", {})[run["scale"]] = run
    latest["scales"] = dict(sorted(latest["scales"].items(), key=lambda kv: _scale_order(kv[0])))
    latest["targets"] = TARGETS
    return latest


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{suffix}"
    if isinstance(value, int):
        return f"{value:,}{suffix}"
    return f"{value}{suffix}"


def markdown(latest: dict[str, Any]) -> str:
    lines = ["# Pipeline benchmarks", "",
             "Written by `sync-pipeline bench`. Targets: large initial copy >= 20,000 records/s end to end and "
             "<= 1 GiB peak RSS; incremental 1,000 changes <= 5 s; API calls <= 1.02x the floor; idle cycle "
             "< 10 calls; realistic profile <= 1.10x the API-budget floor.", "",
             "| scale | scenario | records | seconds | records/s | peak RSS MB | calls | Dynamics pages / floor "
             "| Marketo writes / floor | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for scale, run in latest["scales"].items():
        for name, sc in run["scenarios"].items():
            if name == "population":
                lines.append(f"| {scale} | population | {_fmt(sc['records'])} | {_fmt(sc['seconds'])} | | | | | | "
                             f"sandbox generate + load |")
                continue
            if name == "idle_sensor_tick":
                lines.append(f"| {scale} | idle (sensor tick) | | | | | {sc['http_calls']} | | | "
                             f"HTTP calls of one change-sensor check; changes found: {sc['changes_found'] or 'none'} |")
                continue
            api = sc["api"]
            note = ""
            if name == "incremental":
                note = f"{sum(sc['changes'].values()):,} edits"
            elif name == "realistic":
                note = f"budget floor {sc['budget_floor_seconds']:.1f} s, x{sc['vs_budget_floor']}"
            lines.append(
                f"| {scale} | {name} | {_fmt(sc['records_read'])} | {_fmt(sc['seconds'])} | "
                f"{_fmt(sc['records_per_second'])} | {_fmt(sc['peak_rss_mb'])} | {_fmt(api['total'])} | "
                f"{api['dynamics_query']} / {api['floor']['dynamics.query']} | "
                f"{api['marketo_writes']} / {api['floor']['marketo.writes']} | {note} |")
    lines += ["", "## Slowest stages per scale and scenario", ""]
    for scale, run in latest["scales"].items():
        for name, sc in run["scenarios"].items():
            if name in ("population", "idle_sensor_tick"):
                continue
            top = ", ".join(f"{s['asset']} {s['seconds']:.2f} s ({_fmt(s['records_per_second'])}/s)"
                            for s in sc["stages"][:4])
            lines.append(f"- **{scale} / {name}**: {top}")
    host = latest.get("host", {})
    lines += ["", f"Host: {host.get('cpus', '?')} CPUs, Python {host.get('python', '?')}; "
                  f"written {latest.get('written', '?')}.", ""]
    return "\n".join(lines)


def chart(latest: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [s for s, run in latest["scales"].items() if "initial" in run["scenarios"]]
    records = [latest["scales"][s]["scenarios"]["initial"]["records_read"] for s in scales]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for scenario, marker in (("initial", "o"), ("incremental", "s"), ("idle", "^"), ("realistic", "D")):
        xs = [r for s, r in zip(scales, records) if scenario in latest["scales"][s]["scenarios"]]
        points = [latest["scales"][s]["scenarios"][scenario] for s in scales
                  if scenario in latest["scales"][s]["scenarios"]]
        if not points:
            continue
        ax_time.plot(xs, [p["seconds"] for p in points], marker=marker, label=scenario)
        ax_mem.plot(xs, [p["peak_rss_mb"] for p in points], marker=marker, label=scenario)
    for ax, label in ((ax_time, "wall time (s)"), (ax_mem, "peak RSS of the pipeline (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("records in the org (initial copy)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        for s, r in zip(scales, records):
            ax.annotate(s, (r, ax.get_ylim()[0]), textcoords="offset points", xytext=(0, 4), fontsize=8)
    ax_mem.axhline(TARGETS["peak_rss_mb"], color="red", linestyle="--", linewidth=0.8)
    fig.suptitle("sync-pipeline: time and memory by scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(run: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``run-<scale>.json`` (this run) plus the merged ``latest.json``, ``results.md`` and ``chart.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    run = {**run, "written": stamp}
    paths = {"run": out_dir / f"run-{run['scale']}.json", "latest": out_dir / "latest.json",
             "markdown": out_dir / "results.md", "chart": out_dir / "chart.png"}
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
