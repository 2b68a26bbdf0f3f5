"""The Dagster UI on the sandbox, as an operator uses it (issue 15), with `dagster dev -w workspace.yaml` (webserver
and daemon) and headless Chromium:

1. before the initial copy nothing is written, and the change sensor's tick says it waits for the initial copy;
2. the initial copy is launched the documented way (`sync-pipeline initial-copy`): a backfill of the `sync` job
   over every partition, shown under the job;
3. the lineage graph titles each asset by its stage (extract, plan, push);
4. an edit, then `sync-pipeline plan`, and the change sensor still delivers the edit;
5. a held record shows in the UI: the push's `no_held_records` check is not green, and the alert sensor says
   there is no webhook instead of "notified".

Screenshots of each step go to the folder in $SYNC_PIPELINE_UI_SCREENSHOTS, if set; the README's picture
(docs/ui-asset-graph.png) is refreshed with SYNC_PIPELINE_UPDATE_SCREENSHOT=1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from sync_pipeline import runs
from sync_pipeline.cli import main
from sync_pipeline.config.model import load_config
from sync_pipeline.connection.keys import asset_key, group_name
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "docs" / "ui-asset-graph.png"
LOCATION = "sync_pipeline"
REPO_SELECTOR = f'repositoryName: "__repository__", repositoryLocationName: "{LOCATION}"'

pytestmark = pytest.mark.ui

ASSETS_QUERY = """
{ assetNodes { assetKey { path } groupName partitionDefinition { type }
    assetChecksOrError { ... on AssetChecks { checks { name } } } } }
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    resp = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
    resp.raise_for_status()
    body = resp.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


@pytest.fixture
def short_history(tmp_path, monkeypatch) -> Path:
    """The packaged entities.yaml with five daily partitions (one backfill run), so the daemon-driven initial
    copy takes a minute, not several; the latest window's full read still copies every record."""
    from datetime import datetime, timedelta

    from sync_pipeline.config.model import DEFAULT_PATH

    raw = yaml.safe_load(DEFAULT_PATH.read_text())
    raw["sync"]["partitions"]["start_date"] = (datetime.now(UTC).date() - timedelta(days=3)).isoformat()
    path = tmp_path / "entities.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("SYNC_CONFIG", str(path))
    return path


def start_dagster_dev(tmp_path: Path) -> Iterator[str]:
    """`dagster dev -w workspace.yaml` (webserver + daemon) with the current environment (sandbox settings, state
    store), the shipped dagster.yaml in a throwaway DAGSTER_HOME; stopped (its whole process group) at the end."""
    import signal

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = dict(os.environ, DAGSTER_HOME=str(home))
    log_path = tmp_path / "dagster-dev.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster")),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                return httpx.get(f"{url}/server_info", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the webserver", up, 120, 0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def dagster_dev(short_history, harness, tmp_path) -> Iterator[str]:
    """Dagster on the sandbox with the harness's empty state store (five partitions)."""
    yield from start_dagster_dev(tmp_path)


class Shots:
    """Screenshots of each step into $SYNC_PIPELINE_UI_SCREENSHOTS (when set)."""

    def __init__(self, page: Any):
        self.page = page
        folder = os.environ.get("SYNC_PIPELINE_UI_SCREENSHOTS")
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def take(self, name: str) -> None:
        self.n += 1
        if self.folder:
            self.page.screenshot(path=str(self.folder / f"{self.n:02d}-{name}.png"), full_page=True)


def sensor_ticks(url: str, name: str) -> list[dict[str, Any]]:
    data = graphql(
        url,
        f"""{{ sensorOrError(sensorSelector: {{{REPO_SELECTOR}, sensorName: "{name}"}}) {{
        ... on Sensor {{ sensorState {{ ticks(limit: 10) {{ status skipReason timestamp runIds }} }} }} }} }}""",
    )
    return data["sensorOrError"]["sensorState"]["ticks"]


def check_status(url: str, key: Any, check: str) -> dict[str, Any] | None:
    data = graphql(
        url,
        """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
        assetChecksOrError { ... on AssetChecks { checks { name
            executionForLatestMaterialization { status evaluation { severity } } } } } } } }""",
        {"key": {"path": list(key.path)}},
    )
    checks = data["assetNodeOrError"]["assetChecksOrError"]["checks"]
    return next(c["executionForLatestMaterialization"] for c in checks if c["name"] == check)


def runs_count(url: str) -> int:
    data = graphql(url, "{ runsOrError { ... on Runs { results { runId } } } }")
    return len(data["runsOrError"]["results"])


def open_browser(pw: Any, tmp_path: Path) -> Any:
    return pw.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"),
        executable_path=str(CHROMIUM),
        headless=True,
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
        viewport={"width": 1800, "height": 1100},
    )


def dismiss_dialogs(page: Any) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    skip = page.get_by_role("button", name="Skip")  # the first-visit newsletter dialog, if it comes
    try:
        skip.first.wait_for(state="visible", timeout=5_000)
        skip.first.click()
        skip.first.wait_for(state="hidden", timeout=5_000)
    except PlaywrightTimeout:
        pass


def require_browser() -> None:
    if not CHROMIUM.exists():
        if os.environ.get("SYNC_PIPELINE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SYNC_PIPELINE_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium): the UI is not rendered")


def test_operating_it_in_the_ui_from_an_empty_store_to_a_held_record(
    dagster_dev: str, harness, tmp_path: Path
) -> None:
    url, sb = dagster_dev, harness.sandbox
    config = load_config(os.environ.get("SYNC_CONFIG"))
    nodes = wait_for("the code location", lambda: graphql(url, ASSETS_QUERY)["assetNodes"], 120)
    by_key = {tuple(n["assetKey"]["path"]): n for n in nodes}
    for e in config.entities:
        expected = [asset_key(CONN, e.name, "plan"), asset_key(CONN, e.name, "push")] + (
            [] if e.is_derived else [asset_key(CONN, e.name, "extract")]
        )
        expected += [asset_key(CONN, e.name, "push", "dynamics")] if e.is_person else []
        for key in expected:
            assert tuple(key.path) in by_key, f"{key} missing from the asset graph"
            assert by_key[tuple(key.path)]["groupName"] == group_name(CONN, e.name)
            # Partitions slice extraction only; plans and pushes are unpartitioned (no partition bar).
            partitions = by_key[tuple(key.path)]["partitionDefinition"]
            if key.path[-1] == "extract":
                assert partitions["type"] == "TIME_WINDOW", key
            else:
                assert partitions is None, key
            if key.path[-1] == "push":
                checks = {c["name"] for c in by_key[tuple(key.path)]["assetChecksOrError"]["checks"]}
                assert "no_held_records" in checks, key
    assert by_key[tuple(asset_key(CONN, "person", "extract").path)]["groupName"] == group_name(CONN, "person")
    require_browser()
    from playwright.sync_api import sync_playwright

    # 1. Nothing is written before the initial copy: the sensor's tick says why it waits.
    writes_before = {
        k: v for k, v in sb.calls().items() if k.endswith((".sync", ".create", ".update", ".delete"))
    }
    waiting = wait_for(
        "a change-sensor tick",
        lambda: [t for t in sensor_ticks(url, f"{CONN}__change_sensor") if t["status"] == "SKIPPED"],
        120,
    )
    assert "waiting for the initial copy" in waiting[0]["skipReason"]
    time.sleep(5)  # the automation sensor and the schedule had their chance too
    assert runs_count(url) == 0 and not harness.state_path.exists()
    assert {
        k: v for k, v in sb.calls().items() if k.endswith((".sync", ".create", ".update", ".delete"))
    } == writes_before
    with sync_playwright() as pw:
        browser = open_browser(pw, tmp_path)
        page = browser.new_page()
        shots = Shots(page)
        try:
            page.goto(
                f"{url}/locations/{LOCATION}/sensors/{CONN}__change_sensor",
                wait_until="domcontentloaded",
                timeout=60_000,
            )
            dismiss_dialogs(page)
            # The tick's reason is in its logs (the sensor logs every skip reason): View logs of the latest tick.
            page.get_by_role("button", name="View logs").first.click(timeout=60_000)
            try:
                page.get_by_text("waiting for the initial copy").first.wait_for(timeout=60_000)
            finally:
                shots.take("sensor-waits-for-the-initial-copy")
            page.keyboard.press("Escape")

            # 2. The initial copy, the documented way: a backfill of the sync job over every partition.
            launched = CliRunner().invoke(main, ["initial-copy", "--url", url], catch_exceptions=False)
            assert launched.exit_code == 0, launched.output
            backfill_id = launched.output.split("backfill ")[1].split()[0]
            query = f"""{{ partitionBackfillOrError(backfillId: "{backfill_id}") {{ ... on PartitionBackfill {{
                status numPartitions partitionSetName isAssetBackfill }} }} }}"""
            info = graphql(url, query)["partitionBackfillOrError"]
            assert info["partitionSetName"] == f"{CONN}__sync_partition_set" and not info["isAssetBackfill"]
            assert info["numPartitions"] == len(runs.partition_keys())
            started = time.monotonic()
            done = wait_for(
                "the initial copy",
                lambda: (
                    graphql(url, query)["partitionBackfillOrError"]["status"]
                    in ("COMPLETED", "COMPLETED_SUCCESS", "FAILED", "COMPLETED_FAILED")
                ),
                900,
                5,
            )
            assert done and graphql(url, query)["partitionBackfillOrError"]["status"] in (
                "COMPLETED",
                "COMPLETED_SUCCESS",
            ), graphql(url, query)
            print(f"initial copy (tiny) through the daemon: {time.monotonic() - started:.0f} s")
            assert sb.marketo_count("company") > 0
            page.goto(
                f"{url}/locations/{LOCATION}/jobs/{CONN}__sync/partitions", wait_until="domcontentloaded"
            )
            page.get_by_text(backfill_id).first.wait_for(timeout=60_000)  # the backfill, under the job
            shots.take("initial-copy-under-the-sync-job")

            # 3. Distinct stage names in the graph: the contact group reads extract -> plan -> push.
            page.goto(
                f"{url}/locations/{LOCATION}/asset-groups/{group_name(CONN, 'contact')}/lineage",
                wait_until="domcontentloaded",
            )
            page.wait_for_function(
                "() => document.querySelectorAll('svg foreignObject').length >= 4", timeout=60_000
            )
            page.wait_for_function("() => !document.body.innerText.includes('Loading...')", timeout=60_000)
            page.wait_for_timeout(1500)
            titles = " ".join(page.locator("svg foreignObject").all_text_contents())
            for stage in ("extract", "plan", "push"):
                assert stage in titles, titles
            shot = tmp_path / "ui-asset-graph.png"
            page.screenshot(path=str(shot), full_page=True)
            shots.take("contact-group-stages")
            if os.environ.get("SYNC_PIPELINE_UPDATE_SCREENSHOT") == "1":
                shutil.copy(shot, SCREENSHOT)

            # 4. An edit, a preview, and the sensor still delivers the edit.
            contact_id, person = harness.query("""SELECT dynamics_id, marketo_id FROM identity WHERE entity =
                'contact' AND state = 'active' ORDER BY 1 LIMIT 1""")[0]
            sb.dynamics_update("contact", contact_id, {"telephone1": "+1 555 0115"})
            edited = time.monotonic()
            preview = CliRunner(env={"COLUMNS": "300"}).invoke(
                main, ["plan", "--entity", "contact"], catch_exceptions=False
            )
            assert preview.exit_code == 0 and "+1 555 0115" in preview.output, preview.output
            wait_for(
                "the edit to reach Marketo",
                lambda: sb.marketo_get_lead(int(person)).get("phone") == "+1 555 0115",
                300,
                2,
            )
            print(f"edit to arrival (with a plan in between): {time.monotonic() - edited:.0f} s")
            page.goto(f"{url}/runs", wait_until="domcontentloaded")
            page.wait_for_timeout(2000)
            shots.take("sensor-delivered-the-edit")

            # 5. A held record is visible: the account push's check is not green; the alert says no webhook.
            account_id = harness.query(
                "SELECT dynamics_id FROM identity WHERE entity = 'account' ORDER BY 1 LIMIT 1"
            )[0][0]
            sb.dynamics_update("account", account_id, {"industrycode": 999})
            wait_for(
                "the account to be held",
                lambda: (
                    (check_status(url, asset_key(CONN, "account", "push"), "no_held_records") or {}).get(
                        "status"
                    )
                    == "FAILED"
                ),
                300,
                3,
            )
            assert (
                check_status(url, asset_key(CONN, "account", "push"), "no_held_records")["evaluation"][
                    "severity"
                ]
                == "WARN"
            )
            alerts = wait_for(
                "an alert tick about held records",
                lambda: [
                    t
                    for t in sensor_ticks(url, f"{CONN}__alert_on_held_records")
                    if "newly held record(s)" in (t["skipReason"] or "")
                ],
                180,
                5,
            )
            assert "no webhook configured" in alerts[0]["skipReason"]
            assert "notified" not in alerts[0]["skipReason"].split(";")[0]
            page.goto(
                f"{url}/assets/{'/'.join(asset_key(CONN, 'account', 'push').path)}?view=checks",
                wait_until="domcontentloaded",
            )
            page.get_by_text("no_held_records").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            shots.take("held-record-check")
        except BaseException:
            shots.take("failed-here")
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000  # a rendered graph, not a blank page
