"""Project-wide fixtures: a running sandbox (both services, in this process) and the ``--long`` switch."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from sync_pipeline.sandbox.runner import Sandbox


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="also run tests marked 'slow' (large scales, soaks)")


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
