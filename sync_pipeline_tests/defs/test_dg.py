"""`dg` works as shipped: `dg list defs` and `dg check defs` from the project folder, and `dg` names the code
location like workspace.yaml does (so sensor cursors, schedule state and tick history survive switching between
`dg dev` and `dagster dev -w workspace.yaml`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from sync_pipeline.connection.keys import asset_key, key_name
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

ROOT = Path(__file__).resolve().parents[2]
DG = Path(sys.executable).with_name("dg")


def dg(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    env["COLUMNS"] = "200"
    return subprocess.run([str(DG), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_dg_list_defs_and_check_defs() -> None:
    listed = dg("list", "defs")
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    out = listed.stdout
    for key in (
        asset_key(CONN, "contact", "extract"),
        asset_key(CONN, "contact", "plan"),
        asset_key(CONN, "contact", "push"),
        asset_key(CONN, "contact", "push", "dynamics"),
    ):
        assert key_name(key) in out, key
    # One trigger path per connection (its change sensor); jobs and sensors are named per connection.
    for name in ("sync", "resync", "validate", "change_sensor", "alert_on_failure", "alert_on_held_records"):
        assert f"{CONN}__{name}" in out, name
    assert "safety_net" not in out and "sync_automation" not in out
    checked = dg("check", "defs")
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr


def test_dg_and_workspace_yaml_use_one_code_location_name() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = {
        line.split("==")[0].lower(): line.split("==")[1]
        for line in lines
        if "==" in line and not line.startswith("#")
    }
    assert (
        "dagster-dg-cli==1.13.27" in project["project"]["dependencies"]
        and pins["dagster-dg-cli"] == pins["dagster"]
    )
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    names = [entry["python_module"]["location_name"] for entry in workspace["load_from"]]
    assert names == [project["tool"]["dg"]["project"]["code_location_name"]] == ["sync_pipeline"]


def test_dagster_yaml_keeps_storage_under_dagster_home_wherever_commands_start(tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import dagster as dg\nwith dg.DagsterInstance.get() as i:\n    print(i.run_storage._conn_string)\n"
    )
    env = dict(os.environ, DAGSTER_HOME=str(home))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(home) in proc.stdout and not any(elsewhere.iterdir())
