"""The Dagster UI on the sandbox: the webserver loads workspace.yaml, GraphQL shows the whole asset graph,
and the lineage page renders every entity in headless Chromium (screenshot: docs/ui-asset-graph.png)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from sync_pipeline.config.model import load_config

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "docs" / "ui-asset-graph.png"

pytestmark = pytest.mark.ui

ASSETS_QUERY = """
{ assetNodes { assetKey { path } groupName partitionDefinition { type }
    assetChecksOrError { ... on AssetChecks { checks { name } } } } }
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def webserver(harness, tmp_path) -> Iterator[str]:
    """dagster-webserver on workspace.yaml with the sandbox settings and a throwaway DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    instance = yaml.safe_load((REPO / "dagster.yaml").read_text())
    instance["storage"] = {"sqlite": {"base_dir": str(home / "storage")}}  # never the repo's .state/
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    port = _free_port()
    env = dict(os.environ, DAGSTER_HOME=str(home))
    log = (tmp_path / "webserver.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("dagster-webserver")), "-w", "workspace.yaml",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "webserver did not answer /server_info within 60 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def graphql(url: str, query: str) -> dict[str, Any]:
    resp = httpx.post(f"{url}/graphql", json={"query": query}, timeout=30)
    resp.raise_for_status()
    body = resp.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


def test_asset_graph_in_graphql_and_the_lineage_page(webserver: str, tmp_path: Path) -> None:
    config = load_config(os.environ.get("SYNC_CONFIG"))
    deadline = time.monotonic() + 60
    while not (nodes := graphql(webserver, ASSETS_QUERY)["assetNodes"]):  # the code location is still loading
        assert time.monotonic() < deadline, "no assets after 60 s"
        time.sleep(0.5)
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    for e in config.entities:
        expected = [f"sync/plan/{e.name}", f"marketo/push/{e.name}"]
        expected += [] if e.is_derived else [f"dynamics/raw/{e.name}"]
        expected += [f"dynamics/push/{e.name}"] if e.is_person else []
        for key in expected:
            assert key in by_key, f"{key} missing from the asset graph"
            assert by_key[key]["groupName"] == e.name
            assert by_key[key]["partitionDefinition"]["type"] == "TIME_WINDOW"
        checks = {c["name"] for c in by_key[f"marketo/push/{e.name}"]["assetChecksOrError"]["checks"]}
        assert "rejected_rate" in checks
        if e.is_person:
            assert "one_person_per_record" in checks
    assert by_key["marketo/raw/person"]["groupName"] == "person"

    if not CHROMIUM.exists():
        if os.environ.get("SYNC_PIPELINE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SYNC_PIPELINE_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium): lineage page not rendered")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"], viewport={"width": 1800, "height": 1100})
        try:
            page = browser.new_page()
            page.goto(f"{webserver}/asset-groups", wait_until="domcontentloaded", timeout=60_000)
            # One graph node per group (entity) showing its asset count, e.g. "contact" + "4".
            expected = {e.name: (0 if e.is_derived else 1) + 2 + (1 if e.is_person else 0) for e in config.entities}
            expected["person"] = 1
            nodes = page.locator("svg foreignObject")
            page.wait_for_function("n => document.querySelectorAll('svg foreignObject').length >= n",
                                   arg=len(expected), timeout=60_000)
            skip = page.get_by_role("button", name="Skip")  # the first-visit newsletter dialog, if it comes
            try:
                skip.first.wait_for(state="visible", timeout=5_000)
                skip.first.click()
                skip.first.wait_for(state="hidden", timeout=5_000)
            except PlaywrightTimeout:
                pass
            texts = {" ".join(s.split()) for s in nodes.all_text_contents()}
            missing = [f"{name}{n}" for name, n in expected.items()
                       if not any(s.replace(" ", "").startswith(f"{name}{n}") for s in texts)]
            assert not missing, f"groups missing from the lineage graph (name + asset count): {missing}; saw {texts}"
            page.wait_for_timeout(1000)  # let the graph layout settle before the picture
            shot = tmp_path / "ui-asset-graph.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000  # a rendered graph, not a blank page
    # The README's picture is refreshed on request only, so a test run never dirties the work tree.
    if os.environ.get("SYNC_PIPELINE_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, SCREENSHOT)
