"""The code location: every connection declared under ``sync_pipeline/defs/<connection>/defs.yaml``.

``workspace.yaml`` and ``dg`` (pyproject ``[tool.dg.project]``) point here. Each ``defs.yaml`` instantiates the
``SyncConnection`` component (``sync_pipeline/connection/``), which builds that connection's assets, checks,
jobs, sensors and resources. The executor is set once: one process per run (DuckDB has one writer, and the
Marketo clients' rate limiting is per process).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    return dg.Definitions.merge(loaded, dg.Definitions(executor=dg.in_process_executor))
