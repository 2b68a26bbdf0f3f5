"""A code location with two connections (``east``, ``west``) for the scale-out test: what two ``defs.yaml``
folders declare, built from the env var names and the state directory the test exports."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from sync_pipeline_tests.defs.test_connections import NAMES, declare

_DIR = Path(os.environ.get("SYNC_TEST_STATE_DIR", ".state"))

defs = dg.Definitions.merge(
    *(declare(name, _DIR / f"{name}.duckdb").definitions() for name in NAMES),
    dg.Definitions(executor=dg.in_process_executor),
)
