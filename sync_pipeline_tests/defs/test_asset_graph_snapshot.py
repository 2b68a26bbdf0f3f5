"""The shipped connection's asset graph, rendered to stable text and compared with the checked-in snapshot
(``snapshots/asset_graph.txt``): asset keys, deps, checks, automation conditions, partitions, kinds, groups,
and the jobs and sensors that trigger them. A change to the graph shows up as a diff in review.

After an intended change, regenerate the snapshot and commit it with the change:

    SYNC_UPDATE_SNAPSHOTS=1 pytest sync_pipeline_tests/defs/test_asset_graph_snapshot.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg

from sync_pipeline import runs

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.txt"


def _condition(cond: dg.AutomationCondition | None) -> str:
    """An automation condition on one line: ``operator[label](operands...)``."""
    if cond is None:
        return "-"
    label = cond.get_label()
    text = cond.name + (f"[{label}]" if label and label != cond.name else "")
    if cond.children:
        text += "(" + ", ".join(_condition(child) for child in cond.children) + ")"
    return text


def _partitions(partitions: dg.PartitionsDefinition | None) -> str:
    return "-" if partitions is None else f"{type(partitions).__name__}: {partitions}"


def _names(items: Any) -> str:
    return ", ".join(sorted(items)) or "-"


def render(defs: dg.Definitions) -> str:
    """One block per asset, then the jobs, sensors and schedules; sorted, so the text is stable."""
    graph = defs.resolve_asset_graph()
    lines: list[str] = []
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        blocking = {
            spec.key.name for spec in node.assets_def.check_specs if spec.asset_key == key and spec.blocking
        }
        checks = [c.name + (" (blocking)" if c.name in blocking else "") for c in node.check_keys]
        lines += [
            f"asset {key.to_user_string()}",
            f"  group: {node.group_name}; kinds: {_names(node.kinds)}; pools: {_names(node.pools or ())}",
            f"  deps: {_names(parent.to_user_string() for parent in node.parent_keys)}",
            f"  partitions: {_partitions(node.partitions_def)}",
            f"  backfill policy: {node.backfill_policy or '-'}",
            f"  checks: {_names(checks)}",
            f"  automation: {_condition(node.automation_condition)}",
        ]
    repo = defs.get_repository_def()
    for job in sorted(repo.get_all_jobs(), key=lambda j: j.name):
        if not job.name.startswith("__"):
            keys = sorted(k.to_user_string() for k in job.asset_layer.executable_asset_keys)
            lines += [f"job {job.name}"] + [f"  {key}" for key in keys]
    for sensor in sorted(repo.sensor_defs, key=lambda s: s.name):
        jobs = _names(j.name for j in sensor.jobs) if sensor.has_jobs else "-"
        lines.append(
            f"sensor {sensor.name} ({type(sensor).__name__}): jobs {jobs}; every "
            f"{sensor.minimum_interval_seconds} s; default {sensor.default_status.value}"
        )
    for schedule in sorted(repo.schedule_defs, key=lambda s: s.name):
        lines.append(f"schedule {schedule.name}: {schedule.cron_schedule} -> {schedule.job_name}")
    return "\n".join(lines) + "\n"


def test_the_asset_graph_matches_its_snapshot() -> None:
    rendered = render(runs.definitions())
    if os.environ.get("SYNC_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(rendered, encoding="utf-8")
    assert SNAPSHOT.exists(), "no snapshot yet: run with SYNC_UPDATE_SNAPSHOTS=1 and commit it"
    expected = SNAPSHOT.read_text(encoding="utf-8")
    assert rendered == expected, (
        "the asset graph changed; if intended, regenerate the snapshot with "
        "SYNC_UPDATE_SNAPSHOTS=1 (see this module's docstring) and commit it"
    )
