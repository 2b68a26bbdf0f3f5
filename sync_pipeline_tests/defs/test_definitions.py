"""The code location loads, validates, and follows the asset conventions (keys, descriptions, groups, kinds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path



from sync_pipeline.config.model import load_config
from sync_pipeline.defs.assets import PERSON_RAW, plan_key, push_key, raw_key, stage_of
from sync_pipeline.definitions import build_definitions

ROOT = Path(__file__).resolve().parents[2]


def test_every_entity_has_extract_plan_push_with_metadata() -> None:
    config = load_config()
    defs = build_definitions(config)
    graph = defs.resolve_asset_graph()
    keys = set(graph.get_all_asset_keys())
    for e in config.entities:
        assert {raw_key(e.derived_from or e.name), plan_key(e.name), push_key(e.name)} <= keys, e.name
        if e.is_person:
            assert push_key(e.name, "dynamics") in keys
    assert PERSON_RAW in keys
    # The last key part (what the UI titles a node by) names the stage.
    assert {stage_of(k) for k in keys} == {"extract", "plan", "push"}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description, key
        assert node.group_name and node.group_name != "default", key
        assert node.kinds, key
        assert node.partitions_def is not None, key


def test_dagster_definitions_validate_passes_on_workspace() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    proc = subprocess.run([str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w",
                           "workspace.yaml"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Validation successful" in proc.stdout + proc.stderr


def test_load_order_puts_referenced_objects_first() -> None:
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    up = lambda k: set(graph.get(k).parent_keys)  # noqa: E731
    assert push_key("systemuser") in up(push_key("account"))
    assert push_key("account") in up(push_key("contact"))
    assert {push_key("opportunity"), push_key("contact")} <= up(plan_key("opportunity_role"))
    assert push_key("lead") in up(plan_key("contact"))  # qualification: the lead's person exists first
