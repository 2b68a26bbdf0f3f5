"""An initial copy of a generated org, then a fixed number of edits and one incremental run whose state-store
reads are counted (:mod:`sync_pipeline.engine.store.rows_read`)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import yaml

from sync_pipeline.sandbox.generator import SCALES, Scale
from sync_pipeline.sandbox.runner import Sandbox

SMALL = SCALES["small"]


def tenth(scale: Scale) -> Scale:
    """The org at a tenth of ``scale`` (at least one user and team)."""
    return replace(scale, name=f"{scale.name}/10", users=max(1, scale.users // 10), teams=max(1, scale.teams // 10),
                   accounts=scale.accounts // 10, contacts=scale.contacts // 10, leads=scale.leads // 10,
                   opportunities=scale.opportunities // 10, custom_rows=scale.custom_rows // 10)


def config_with(tmp: Path, **sync: Any) -> Path:
    """The packaged configuration with ``sync`` settings overridden, written to ``tmp``."""
    from sync_pipeline.config.model import DEFAULT_PATH

    raw = yaml.safe_load(Path(DEFAULT_PATH).read_text(encoding="utf-8"))
    raw["sync"].update(sync)
    path = tmp / "entities.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@contextmanager
def synced_org(tmp: Path, scale: Scale, seed: int = 0, config: Path | None = None,
               settle: bool = True) -> Iterator[tuple[Sandbox, Any]]:
    """A sandbox holding the org at ``scale``, the pipeline's environment pointing at it (with ``config``), its
    initial copy done and (``settle``) its echoes absorbed; yields the sandbox and the Dagster instance."""
    import dagster as dg

    from sync_pipeline import runs

    with Sandbox(tmp / "sandbox") as sb:
        sb.populate(scale, seed=seed)
        wanted = {**sb.settings(), "SYNC_STATE_PATH": str(tmp / "state.duckdb")}
        if config is not None:
            wanted["SYNC_CONFIG"] = str(config)
        saved = {k: os.environ.get(k) for k in wanted}
        os.environ.update(wanted)
        try:
            with dg.DagsterInstance.ephemeral() as instance:
                runs.run_sync(instance, scope="latest")
                if settle:
                    runs.run_sync(instance, scope="latest")
                yield sb, instance
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
