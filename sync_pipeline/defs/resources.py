"""Resources: the state store and the two API clients, configured from the environment.

Secrets come only from environment variables through ``dg.EnvVar``; everything else has a default
that points at the local sandbox layout, so ``dagster dev`` works once the sandbox settings are exported.
"""

from __future__ import annotations

import contextlib
import os
from functools import cached_property
from typing import Iterator
from urllib.parse import urlsplit

import dagster as dg
import duckdb
from pydantic import Field, PrivateAttr

from sync_pipeline.config.model import SyncConfig, load_config
from sync_pipeline.engine.store import state
from sync_pipeline.resources.dynamics import DynamicsResource
from sync_pipeline.resources.marketo import MarketoResource

DEFAULT_STATE_PATH = ".state/sync.duckdb"


class SyncStateResource(dg.ConfigurableResource):
    """The DuckDB state store (one writer at a time: every asset that opens it is in the ``duckdb`` pool)."""

    path: str = Field(default=DEFAULT_STATE_PATH, description="DuckDB file holding mirrors, identities, ledger")
    config_path: str | None = Field(default=None, description="entities.yaml (default: the packaged one)")
    marketo_instance: str | None = Field(default=None, description="Munchkin id of the Marketo instance; "
                                         "defaults to the first label of the Marketo host name")
    work_dir: str | None = Field(default=None, description="Scratch space for bulk export files")

    @cached_property
    def config(self) -> SyncConfig:
        return load_config(self.config_path)

    _con: duckdb.DuckDBPyConnection | None = PrivateAttr(default=None)

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The run's connection: opened by the first step that needs it, closed when the run ends.

        Opening a DuckDB file (WAL replay, checkpoint on close) costs ~0.1 s; a run has dozens of steps. Runs
        still never overlap on the file: the ``duckdb`` pool has run granularity in dagster.yaml.
        """
        if self._con is None:
            self._con = state.open_connection(self.path)
            state.ensure_schema(self._con, self.config)
        yield self._con

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def instance_id(self, marketo_base_url: str) -> str:
        if self.marketo_instance:
            return self.marketo_instance
        host = urlsplit(marketo_base_url).hostname or marketo_base_url
        return host.split(".")[0] if host.endswith("mktorest.com") else f"{host}:{urlsplit(marketo_base_url).port}"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def build_resources() -> dict[str, dg.ConfigurableResource]:
    ca = _env("SYNC_CA_BUNDLE") or None
    return {
        "state": SyncStateResource(path=_env("SYNC_STATE_PATH", DEFAULT_STATE_PATH) or DEFAULT_STATE_PATH,
                                   config_path=_env("SYNC_CONFIG"), marketo_instance=_env("MARKETO_MUNCHKIN_ID"),
                                   work_dir=_env("SYNC_WORK_DIR")),
        "dynamics": DynamicsResource(url=dg.EnvVar("DYNAMICS_URL"), authority=dg.EnvVar("DYNAMICS_AUTHORITY"),
                                     client_id=dg.EnvVar("DYNAMICS_CLIENT_ID"),
                                     client_secret=dg.EnvVar("DYNAMICS_CLIENT_SECRET"), ca_bundle=ca),
        "marketo": MarketoResource(base_url=dg.EnvVar("MARKETO_BASE_URL"), client_id=dg.EnvVar("MARKETO_CLIENT_ID"),
                                   client_secret=dg.EnvVar("MARKETO_CLIENT_SECRET"), ca_bundle=ca,
                                   calls_per_20s=int(_env("MARKETO_CALLS_PER_20S", "50") or 50),
                                   max_concurrent=int(_env("MARKETO_MAX_CONCURRENT", "5") or 5),
                                   daily_quota=int(_env("MARKETO_DAILY_QUOTA", "50000") or 50000)),
    }
