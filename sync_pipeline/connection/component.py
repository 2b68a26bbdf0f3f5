"""``SyncConnection``: one Dynamics org <-> Marketo instance pair, declared in ``defs/<connection>/defs.yaml``.

The component builds that connection's assets, checks, jobs, sensors and resources, every name prefixed with
the connection (``connection/keys.py``), so several connections live side by side in one code location, each
with its own state store, credentials and DuckDB pool. Credentials are environment variable *names*, read at run
time through ``dg.EnvVar``. Add a connection with ``dg scaffold defs sync_pipeline.connection.SyncConnection <name>``
or by copying a ``defs.yaml`` (README).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import dagster as dg
from pydantic import Field

from sync_pipeline.config.model import SyncConfig, load_config
from sync_pipeline.connection.keys import check_connection_name


# Unset env var names default to <CONNECTION>_<NAME> (e.g. EMEA_DYNAMICS_URL), so a scaffolded connection never
# reads another connection's credentials by accident.
def env_name(connection: str, declared: str | None, default: str) -> str:
    return declared or f"{connection.upper()}_{default}"


class DynamicsCredentials(dg.Model, dg.Resolvable):
    """Names of the environment variables holding the Dynamics 365 app registration (never the values)."""

    url_env: str | None = Field(
        None, description="Org URL, e.g. https://contoso.crm.dynamics.com (default <CONNECTION>_DYNAMICS_URL)"
    )
    authority_env: str | None = Field(
        None,
        description="https://login.microsoftonline.com/<tenant> (default <CONNECTION>_DYNAMICS_AUTHORITY)",
    )
    client_id_env: str | None = Field(None, description="default <CONNECTION>_DYNAMICS_CLIENT_ID")
    client_secret_env: str | None = Field(None, description="default <CONNECTION>_DYNAMICS_CLIENT_SECRET")


class MarketoCredentials(dg.Model, dg.Resolvable):
    """Names of the environment variables holding the Marketo LaunchPoint service, and its call budget."""

    base_url_env: str | None = Field(
        None, description="e.g. https://123-ABC-456.mktorest.com (default <CONNECTION>_MARKETO_BASE_URL)"
    )
    client_id_env: str | None = Field(None, description="default <CONNECTION>_MARKETO_CLIENT_ID")
    client_secret_env: str | None = Field(None, description="default <CONNECTION>_MARKETO_CLIENT_SECRET")
    munchkin_id_env: str | None = Field(
        None, description="Optional (default <CONNECTION>_MARKETO_MUNCHKIN_ID); unset: from the host name"
    )
    calls_per_20s: int = Field(50, description="Our share of Marketo's 100 calls / 20 s")
    max_concurrent: int = Field(5, description="In-flight calls (Marketo allows 10)")
    daily_quota: int = Field(50_000, description="Calls per day this connection may spend")


class AutomationSettings(dg.Model, dg.Resolvable):
    """The one trigger path: the change sensor (with its safety tick). docs/operations.md explains the choice."""

    running: bool = Field(True, description="Sensors start running when the code location loads")
    check_interval_seconds: int = Field(30, description="How often the change sensor asks both systems")
    safety_tick_minutes: int = Field(
        60,
        description="Sync the latest window at least this often, even "
        "when no change was reported (covers a missed change or a sensor outage)",
    )
    alert_webhook_env: str = Field("SYNC_ALERT_WEBHOOK_URL", description="Env var with the alert webhook URL")


class SyncConnection(dg.Component, dg.Model, dg.Resolvable):
    """A Dynamics 365 <-> Marketo connection: extract, plan and push per declared entity, with its own state."""

    name: str | None = Field(None, description="Key prefix and job/sensor prefix; default: the folder's name")
    entities_path: str | None = Field(
        None, description="entities.yaml of this connection (default: packaged)"
    )
    entities: dict[str, Any] | None = Field(
        None, description="The entity mapping inline (the entities.yaml schema); instead of entities_path"
    )
    state_path: str | None = Field(
        None,
        description="DuckDB state store of this connection (one writer; its own "
        "file); default .state/<connection>.duckdb",
    )
    work_dir: str | None = Field(None, description="Scratch space for bulk export files")
    ca_bundle_env: str | None = Field(
        None, description="Env var naming a PEM bundle to trust (optional; default <CONNECTION>_CA_BUNDLE)"
    )
    dynamics: DynamicsCredentials = DynamicsCredentials()
    marketo: MarketoCredentials = MarketoCredentials()
    automation: AutomationSettings = AutomationSettings()

    @cached_property
    def config(self) -> SyncConfig:
        if self.entities is not None:
            if self.entities_path:
                raise ValueError("set either entities or entities_path, not both")
            return SyncConfig.model_validate(self.entities)
        return load_config(self.entities_path or None)

    @property
    def connection(self) -> str:
        if self.name is None:
            raise ValueError("SyncConnection needs a name (the defs folder names it when loaded from YAML)")
        return check_connection_name(self.name)

    def named(self, name: str) -> SyncConnection:
        return self if self.name else self.model_copy(update={"name": name})

    @property
    def store_path(self) -> str:
        return self.state_path or f".state/{self.connection}.duckdb"

    def env(self, declared: str | None, default: str) -> str:
        return env_name(self.connection, declared, default)

    def build_time_env(self) -> list[str]:
        """Env var names of optional non-secret settings read when the resources are built (not at run time)."""
        return [
            self.env(self.ca_bundle_env, "CA_BUNDLE"),
            self.env(self.marketo.munchkin_id_env, "MARKETO_MUNCHKIN_ID"),
        ]

    def config_json(self) -> str | None:
        """The inline mapping as the state resource carries it (None: the resource loads ``entities_path``)."""
        return None if self.entities is None else json.dumps(self.entities)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return self.named(context.path.name).definitions()

    def definitions(self, settings: Mapping[str, str] | None = None) -> dg.Definitions:
        """``settings``: values for the env var names, for in-process runs that must not touch ``os.environ``."""
        from sync_pipeline.connection.build import build_connection

        return build_connection(self, settings)
