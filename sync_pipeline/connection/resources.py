"""A connection's resources: its state store and its two API clients, under connection-prefixed keys.

Secrets come only from the environment variables the connection names, through ``dg.EnvVar`` (read at run
time). In-process runs (demo, CLI, tests) may pass ``settings`` instead: values for those names, so nothing
mutates ``os.environ``. Keys are ``<connection>__state``/``__dynamics``/``__marketo``, so two connections'
resources never collide in one code location.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import dagster as dg
import duckdb
from pydantic import Field, PrivateAttr

from sync_pipeline.config.model import SyncConfig, load_config
from sync_pipeline.connection.keys import qualified
from sync_pipeline.engine.store import state
from sync_pipeline.resources.dynamics import DynamicsResource
from sync_pipeline.resources.marketo import MarketoResource

if TYPE_CHECKING:
    from sync_pipeline.connection.component import SyncConnection

DEFAULT_STATE_PATH = ".state/sync.duckdb"


class SyncStateResource(dg.ConfigurableResource):
    """The DuckDB state store (one writer at a time: every asset that opens it is in the ``duckdb`` pool)."""

    path: str = Field(
        default=DEFAULT_STATE_PATH, description="DuckDB file holding mirrors, identities, ledger"
    )
    config_path: str | None = Field(default=None, description="entities.yaml (default: the packaged one)")
    config_json: str | None = Field(
        default=None, description="The mapping inline (JSON), instead of config_path"
    )
    marketo_instance: str | None = Field(
        default=None,
        description="Munchkin id of the Marketo instance; "
        "defaults to the first label of the Marketo host name",
    )
    work_dir: str | None = Field(default=None, description="Scratch space for bulk export files")

    @cached_property
    def config(self) -> SyncConfig:
        if self.config_json:
            return SyncConfig.model_validate_json(self.config_json)
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
        try:
            yield self._con
        finally:
            # A step's temp tables are its own: dropped, their memory goes back before the next step.
            with contextlib.suppress(duckdb.Error):
                state.release_step_memory(self._con)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def instance_id(self, marketo_base_url: str) -> str:
        if self.marketo_instance:
            return self.marketo_instance
        host = urlsplit(marketo_base_url).hostname or marketo_base_url
        return (
            host.split(".")[0]
            if host.endswith("mktorest.com")
            else f"{host}:{urlsplit(marketo_base_url).port}"
        )


RESOURCES = ("state", "dynamics", "marketo")


def resource_key(connection: str, kind: str) -> str:
    return qualified(connection, kind)


def required_keys(connection: str, *kinds: str) -> set[str]:
    return {resource_key(connection, k) for k in kinds}


def bound(context: Any, connection: str) -> tuple[SyncStateResource, DynamicsResource, MarketoResource]:
    """The connection's state, Dynamics and Marketo resources from a step's or sensor's context (None if the
    definition did not require one)."""
    return tuple(
        getattr(context.resources, resource_key(connection, k), None)  # type: ignore[return-value]
        for k in RESOURCES
    )


def by_kind(resources: Mapping[str, Any]) -> dict[str, Any]:
    """``{"state": ..., "dynamics": ..., "marketo": ...}`` from one connection's ``build_resources``."""
    return {key.rsplit("__", 1)[-1]: value for key, value in resources.items()}


def build_resources(spec: SyncConnection, settings: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``settings`` given: literal values for the env var names (in-process runs); else ``dg.EnvVar``s."""

    def secret(name: str) -> Any:
        if settings is None:
            return dg.EnvVar(name)
        if name not in settings:
            raise ValueError(f"connection {spec.connection}: setting {name} is missing")
        return settings[name]

    def optional(name: str) -> str | None:  # non-secret, optional: read when the definitions are built
        return (settings if settings is not None else os.environ).get(name) or None

    ca = optional(spec.env(spec.ca_bundle_env, "CA_BUNDLE"))
    d, m = spec.dynamics, spec.marketo
    conn = spec.connection
    munchkin = optional(spec.env(m.munchkin_id_env, "MARKETO_MUNCHKIN_ID"))
    return {
        resource_key(conn, "state"): SyncStateResource(
            path=spec.store_path,
            config_path=spec.entities_path or None,
            config_json=spec.config_json(),
            marketo_instance=munchkin,
            work_dir=spec.work_dir or None,
        ),
        resource_key(conn, "dynamics"): DynamicsResource(
            url=secret(spec.env(d.url_env, "DYNAMICS_URL")),
            authority=secret(spec.env(d.authority_env, "DYNAMICS_AUTHORITY")),
            client_id=secret(spec.env(d.client_id_env, "DYNAMICS_CLIENT_ID")),
            client_secret=secret(spec.env(d.client_secret_env, "DYNAMICS_CLIENT_SECRET")),
            ca_bundle=ca,
        ),
        resource_key(conn, "marketo"): MarketoResource(
            base_url=secret(spec.env(m.base_url_env, "MARKETO_BASE_URL")),
            client_id=secret(spec.env(m.client_id_env, "MARKETO_CLIENT_ID")),
            client_secret=secret(spec.env(m.client_secret_env, "MARKETO_CLIENT_SECRET")),
            ca_bundle=ca,
            calls_per_20s=m.calls_per_20s,
            max_concurrent=m.max_concurrent,
            daily_quota=m.daily_quota,
            munchkin_id=munchkin,
        ),  # connections of one Marketo instance share its budget
    }
