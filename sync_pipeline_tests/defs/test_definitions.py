"""The code location loads, validates, and follows the asset conventions (keys, descriptions, groups, kinds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sync_pipeline import runs as sync_runs
from sync_pipeline.config.model import load_config
from sync_pipeline.connection.keys import asset_key, stage_of
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

ROOT = Path(__file__).resolve().parents[2]


def test_every_entity_has_extract_plan_push_with_metadata() -> None:
    config = load_config()
    defs = sync_runs.definitions()
    graph = defs.resolve_asset_graph()
    keys = set(graph.get_all_asset_keys())
    for e in config.entities:
        assert {
            asset_key(CONN, e.derived_from or e.name, "extract"),
            asset_key(CONN, e.name, "plan"),
            asset_key(CONN, e.name, "push"),
        } <= keys, e.name
        if e.is_person:
            assert asset_key(CONN, e.name, "push", "dynamics") in keys
    assert asset_key(CONN, "person", "extract") in keys
    # The last key part (what the UI titles a node by) names the stage.
    assert {stage_of(k) for k in keys} == {"extract", "plan", "push"}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description, key
        assert node.group_name and node.group_name != "default", key
        assert node.kinds, key
        # Partitions slice extraction only; plans and pushes run on what is pending.
        assert (node.partitions_def is not None) == (stage_of(key) == "extract"), key


def test_dagster_definitions_validate_passes_on_workspace() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Validation successful" in proc.stdout + proc.stderr


def test_load_order_puts_referenced_objects_first() -> None:
    defs = sync_runs.definitions()
    graph = defs.resolve_asset_graph()
    up = lambda k: set(graph.get(k).parent_keys)  # noqa: E731
    assert asset_key(CONN, "systemuser", "push") in up(asset_key(CONN, "account", "push"))
    assert asset_key(CONN, "account", "push") in up(asset_key(CONN, "contact", "push"))
    assert {asset_key(CONN, "opportunity", "push"), asset_key(CONN, "contact", "push")} <= up(
        asset_key(CONN, "opportunity_role", "plan")
    )
    # qualification: the lead's person exists first
    assert asset_key(CONN, "lead", "push") in up(asset_key(CONN, "contact", "plan"))
