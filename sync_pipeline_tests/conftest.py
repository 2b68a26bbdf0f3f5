"""Project-wide fixtures: a running sandbox (both services, in this process) and the ``--long`` switch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sync_pipeline.sandbox.runner import Sandbox


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="also run tests marked 'slow' (large scales, soaks)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="slow: run with --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """Dynamics (API + identity, HTTPS identity) and Marketo on free loopback ports, empty."""
    with Sandbox(tmp_path / "sandbox") as sb:
        yield sb


@pytest.fixture
def populated_sandbox(sandbox: Sandbox) -> Sandbox:
    """The ``sandbox`` holding the "tiny" synthetic org (seed 0)."""
    sandbox.populate("tiny", seed=0)
    return sandbox


@pytest.fixture
def sandbox_settings(sandbox: Sandbox) -> dict[str, str]:
    """The environment settings (DYNAMICS_URL, ..., SYNC_CA_BUNDLE) of the ``sandbox``."""
    return sandbox.settings()


class SyncHarness:
    """A populated sandbox wired to the pipeline: run sync cycles as real in-process Dagster runs."""

    def __init__(self, sandbox: Sandbox, state_path: Path):
        import dagster as dg

        self.sandbox = sandbox
        self.state_path = state_path
        self.instance = dg.DagsterInstance.ephemeral()

    def run(self, scope: str = "latest", raise_on_error: bool = True) -> dg.ExecuteInProcessResult:  # noqa: F821
        from sync_pipeline import runs

        return runs.run_sync(self.instance, scope=scope, raise_on_error=raise_on_error)

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        from sync_pipeline.engine.store import state

        with state.connect(self.state_path) as con:
            return con.execute(sql, params or []).fetchall()


@pytest.fixture
def harness(
    populated_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SyncHarness]:
    """The tiny org in the sandbox, the pipeline's environment pointing at it, an empty state store."""
    for key, value in populated_sandbox.settings().items():
        monkeypatch.setenv(key, value)
    state_path = tmp_path / "state.duckdb"
    monkeypatch.setenv("SYNC_STATE_PATH", str(state_path))
    yield SyncHarness(populated_sandbox, state_path)
