"""``sync-pipeline bench`` (the pipeline's speed, memory and API calls at a scale) and ``bench-sandbox`` (the
sandbox's own rates); see sync_pipeline.bench. Both need the ``sandbox`` and ``bench`` extras."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from sync_pipeline.cli.extras import require
from sync_pipeline.sandbox.generator import SCALES

SCENARIO_CHOICES = ("initial", "incremental", "idle", "realistic", "freshness", "all")


@click.command("bench")
@click.option(
    "--scale",
    type=click.Choice([s for s in SCALES if s != "tiny"] + ["tiny"]),
    default="small",
    show_default=True,
    help="Size of the synthetic org.",
)
@click.option(
    "--scenario",
    "scenarios",
    type=click.Choice(SCENARIO_CHOICES),
    multiple=True,
    default=("all",),
    show_default=True,
    help="Repeatable; 'all' = initial, incremental, idle and realistic (freshness runs "
    "the daemon for minutes: ask for it by name).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the synthetic org and the edits."
)
@click.option(
    "--edit-rate",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="freshness: edits a second, alternating Dynamics and Marketo.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="freshness: seconds of edits.",
)
@click.option(
    "--drain",
    type=click.FloatRange(min=1),
    default=180.0,
    show_default=True,
    help="freshness: seconds to wait after the last edit for it to arrive (later = lost).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("benchmarks"),
    show_default=True,
    help="Where latest.json, results.md and chart.png go.",
)
def bench(
    scale: str,
    scenarios: tuple[str, ...],
    seed: int,
    edit_rate: float,
    duration: float,
    drain: float,
    out_dir: Path,
) -> None:
    """Benchmark the pipeline against a sandbox in its own process."""
    require("bench", "sandbox", "bench")
    from sync_pipeline.bench.pipeline import DEFAULT_SCENARIOS, SCENARIOS, run_scale
    from sync_pipeline.bench.report import write_outputs

    wanted = set(scenarios) | (set(DEFAULT_SCENARIOS) if "all" in scenarios else set())
    chosen = tuple(s for s in SCENARIOS if s in wanted)
    run = run_scale(
        scale,
        chosen,
        seed=seed,
        log=lambda msg: click.echo(msg, err=True),
        freshness={"rate": edit_rate, "duration": duration, "drain": drain},
    )
    paths = write_outputs(run, out_dir)
    for name, sc in run["scenarios"].items():
        if name == "population":
            continue
        if name == "idle_sensor_tick":
            click.echo(
                f"{scale:>6} idle sensor tick: {sc['http_calls']} HTTP calls, run requests: {sc['run_requests']}"
            )
            continue
        if name == "freshness":
            lat = sc["latency_seconds"]
            click.echo(
                f"{scale:>6} freshness   {sc['arrived']}/{sc['edits']} edits arrived; edit-to-arrival p50 "
                f"{lat['p50']} s, p95 {lat['p95']} s, max {lat['max']} s; calls per edit {sc['calls_per_edit']}"
            )
            continue
        api, cpu = sc["api"], sc["cpu"]
        line = (
            f"{scale:>6} {name:<11} {sc['seconds']:8.2f} s  {sc['records_per_second'] or 0:>8,} rec/s  "
            f"peak {sc['peak_rss_mb']:7.1f} MB  cpu {cpu['pipeline_seconds']:.1f} s "
            f"(sandbox {cpu.get('sandbox_seconds', 0):.1f} s)  calls {api['total']:>5} "
            f"(Marketo {api['marketo_calls']})"
        )
        if name == "realistic":
            b = sc["budget"]
            line += (
                f"  floor {sc['budget_floor_seconds']:.1f} s (Dynamics {b['dynamics']['seconds']:.0f} s, "
                f"Marketo {b['marketo']['seconds']:.0f} s; binding {b['binding']}), x{sc['vs_budget_floor']}; "
                f"floor {sc['floor_seconds']:.1f} s ({sc['floor_bound_by']}), x{sc['vs_floor']}"
            )
        click.echo(line)
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@click.command("bench-sandbox")
@click.option("--scale", type=click.Choice(list(SCALES)), default="small", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tls/--no-tls", default=False, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench_out/sandbox_rates.json"),
    show_default=True,
    help="JSON results file.",
)
def bench_sandbox(scale: str, seed: int, tls: bool, out: Path) -> None:
    """Measure the generator's load rate and the sandbox's Dynamics paging rate over HTTP."""
    require("bench-sandbox", "sandbox", "bench")
    from sync_pipeline.bench.sandbox_rates import print_results, run_benchmark

    results = run_benchmark(scale, seed=seed, tls=tls, out=out)
    print_results(Console(), results)
    click.echo(f"results written to {out}")
