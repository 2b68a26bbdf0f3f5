"""``sync-pipeline bench``: the pipeline's speed, memory and API calls at a scale (see sync_pipeline.bench)."""

from __future__ import annotations

from pathlib import Path

import click

from sync_pipeline.sandbox.generator import SCALES

SCENARIO_CHOICES = ("initial", "incremental", "idle", "realistic", "all")


@click.command("bench")
@click.option("--scale", type=click.Choice([s for s in SCALES if s != "tiny"] + ["tiny"]), default="small",
              show_default=True, help="Size of the synthetic org.")
@click.option("--scenario", "scenarios", type=click.Choice(SCENARIO_CHOICES), multiple=True, default=("all",),
              show_default=True, help="Repeatable; 'all' = initial, incremental, idle and realistic.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic org and the edits.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks"),
              show_default=True, help="Where latest.json, results.md and chart.png go.")
def bench(scale: str, scenarios: tuple[str, ...], seed: int, out_dir: Path) -> None:
    """Benchmark the pipeline against a sandbox in its own process."""
    from sync_pipeline.bench.pipeline import SCENARIOS, run_scale
    from sync_pipeline.bench.report import write_outputs

    chosen = SCENARIOS if "all" in scenarios else tuple(s for s in SCENARIOS if s in scenarios)
    run = run_scale(scale, chosen, seed=seed, log=lambda msg: click.echo(msg, err=True))
    paths = write_outputs(run, out_dir)
    for name, sc in run["scenarios"].items():
        if name == "population":
            continue
        if name == "idle_sensor_tick":
            click.echo(f"{scale:>6} idle sensor tick: {sc['http_calls']} HTTP calls, changes found: "
                       f"{', '.join(sc['changes_found']) or 'none'}")
            continue
        api = sc["api"]
        click.echo(f"{scale:>6} {name:<11} {sc['seconds']:8.2f} s  {sc['records_per_second'] or 0:>8,} rec/s  "
                   f"peak {sc['peak_rss_mb']:7.1f} MB  calls {api['total']:>5}  "
                   f"pages {api['dynamics_query']}/{api['floor']['dynamics.query']}  "
                   f"writes {api['marketo_writes']}/{api['floor']['marketo.writes']}")
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
