"""Fixtures for the reliability tests: the harness with a test configuration (fast, unbounded retries)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sync_pipeline.config.model import DEFAULT_PATH


def write_config(
    tmp_path: Path, *, max_attempts: int = 1000, backoff_seconds: int = 0, edit: str | None = None
) -> Path:
    """The packaged entities.yaml with a different retry policy (and an optional text replacement).

    The packaged policy backs off 60 s * 2^n of wall time; a test that re-runs until converged retries
    immediately instead, and never holds a record because the fault rate was high.
    """
    text = DEFAULT_PATH.read_text()
    text, n = re.subn(
        r"retry: \{[^}]*\}",
        f"retry: {{max_attempts: {max_attempts}, backoff_seconds: {backoff_seconds}}}",
        text,
        count=1,
    )
    assert n == 1, "entities.yaml has no retry line to replace"
    if edit:
        old, new = edit.split("=>", 1)
        assert old in text, f"entities.yaml has no {old!r}"
        text = text.replace(old, new, 1)
    path = tmp_path / "entities-test.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def fast_retry_harness(harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``harness`` whose configuration retries failed records on the next run, without holding them."""
    monkeypatch.setenv("SYNC_CONFIG", str(write_config(tmp_path)))
    return harness
