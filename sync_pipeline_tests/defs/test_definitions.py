"""The code location loads, validates, and follows the asset conventions (keys, descriptions, groups, kinds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from sync_pipeline.config.model import load_config
from sync_pipeline.definitions import build_definitions

ROOT = Path(__file__).resolve().parents[2]


def test_every_entity_has_extract_plan_push_with_metadata() -> None:
    config = load_config()
    defs = build_definitions(config)
    graph = defs.resolve_asset_graph()
    keys = {"/".join(k.path) for k in graph.get_all_asset_keys()}
    for e in config.entities:
        raw = f"dynamics/raw/{e.derived_from or e.name}"
        assert {raw, f"sync/plan/{e.name}", f"marketo/push/{e.name}"} <= keys, e.name
        if e.is_person:
            assert f"dynamics/push/{e.name}" in keys
    assert "marketo/raw/person" in keys
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
    up = lambda k: {"/".join(p.path) for p in graph.get(dg.AssetKey(k.split("/"))).parent_keys}  # noqa: E731
    assert "marketo/push/systemuser" in up("marketo/push/account")
    assert "marketo/push/account" in up("marketo/push/contact")
    assert {"marketo/push/opportunity", "marketo/push/contact"} <= up("sync/plan/opportunity_role")
    assert "marketo/push/lead" in up("sync/plan/contact")  # qualification: the lead's person exists first
