"""An initial copy of a generated org, then a fixed number of edits and one incremental run whose state-store
reads are counted (:mod:`sync_pipeline.engine.store.rows_read`)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from sync_pipeline.sandbox.generator import SCALES, Scale
from sync_pipeline.sandbox.runner import Sandbox

SMALL = SCALES["small"]


def tenth(scale: Scale) -> Scale:
    """The org at a tenth of ``scale`` (at least one user and team)."""
    return replace(scale, name=f"{scale.name}/10", users=max(1, scale.users // 10), teams=max(1, scale.teams // 10),
                   accounts=scale.accounts // 10, contacts=scale.contacts // 10, leads=scale.leads // 10,
                   opportunities=scale.opportunities // 10, custom_rows=scale.custom_rows // 10)


@contextmanager
def synced_org(tmp: Path, scale: Scale, seed: int = 0) -> Iterator[tuple[Sandbox, Any]]:
    """A sandbox holding the org at ``scale``, the pipeline's environment pointing at it, its initial copy done
    and settled (its echoes absorbed); yields the sandbox and the Dagster instance."""
    import dagster as dg

    from sync_pipeline import runs

    with Sandbox(tmp / "sandbox") as sb:
        sb.populate(scale, seed=seed)
        wanted = {**sb.settings(), "SYNC_STATE_PATH": str(tmp / "state.duckdb")}
        saved = {k: os.environ.get(k) for k in wanted}
        os.environ.update(wanted)
        try:
            with dg.DagsterInstance.ephemeral() as instance:
                runs.run_sync(instance, scope="latest")
                runs.run_sync(instance, scope="latest")
                yield sb, instance
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
