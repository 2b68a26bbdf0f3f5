"""Dagster resource for one Marketo instance.

Construct one per connection, every setting a field (secrets through ``dg.EnvVar``)::

    MarketoResource(base_url=dg.EnvVar("ACME_MARKETO_BASE_URL"), client_id=dg.EnvVar("ACME_MARKETO_CLIENT_ID"),
                    client_secret=dg.EnvVar("ACME_MARKETO_CLIENT_SECRET"), calls_per_20s=50, max_concurrent=5)

Run by Dagster, the resource keeps the instance's call budget in the Dagster instance's database
(PostgreSQL, or a SQLite file in the instance's storage directory), so every run, process and pod calling
the same Marketo instance (same ``munchkin_id``, by default the base URL's host) shares one window,
concurrency and daily quota. Outside Dagster (CLI, plain Python) the budget is this process's own unless
``budget_url`` names the database.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
from pydantic import Field, PrivateAttr

from sync_pipeline.clients.budget import SharedBudget, sqlite_url
from sync_pipeline.clients.governor import CallBudget, RateGovernor
from sync_pipeline.clients.marketo import MarketoClient
from sync_pipeline.resources.common import build_client

WINDOW_SECONDS = 20.0  # Marketo's rate window


def instance_budget_url(instance: dg.DagsterInstance) -> str:
    """Where a Dagster instance can keep shared budgets: its PostgreSQL database, else a SQLite file."""
    url = getattr(instance.run_storage, "postgres_url", None)  # dagster_postgres run storage
    return url or sqlite_url(instance.storage_directory())


class MarketoResource(dg.ConfigurableResource):
    """Marketo REST/bulk access. ``base_url`` is ``https://<munchkin>.mktorest.com`` (no ``/rest``).

    One client per resource instance (so per run); its calls are admitted by the instance's budget
    (``calls_per_20s``, ``max_concurrent``, ``daily_quota`` are this pipeline's share of Marketo's limits).
    """

    base_url: str = Field(description="Instance URL, e.g. https://123-ABC-456.mktorest.com")
    client_id: str = Field(description="LaunchPoint custom service client id")
    client_secret: str = Field(
        repr=False, description="LaunchPoint custom service client secret (use dg.EnvVar)"
    )
    ca_bundle: str | None = Field(default=None, description="PEM bundle to verify the server with")
    verify_tls: bool = True
    timeout_seconds: float = 60.0
    calls_per_20s: int = Field(
        default=50,
        ge=1,
        description="Our share of Marketo's 100 calls/20 s (higher only for "
        "a sandbox with its limits off, e.g. benchmarks)",
    )
    max_concurrent: int = Field(default=5, ge=1, description="In-flight calls (Marketo allows 10)")
    daily_quota: int = Field(default=50_000, ge=1, description="Calls per day this pipeline may spend")
    munchkin_id: str | None = Field(
        default=None,
        description="The Marketo instance; resources with the same id "
        "share one budget (default: the base URL's host)",
    )
    shared_budget: bool = Field(
        default=True,
        description="Under Dagster, keep the budget in the Dagster "
        "instance's database, shared by every process; off: this process's own",
    )
    budget_url: str | None = Field(
        default=None,
        repr=False,
        description="SQLAlchemy URL of the database holding "
        "the shared budget (default under Dagster: the Dagster instance's)",
    )

    _budget_url: str | None = PrivateAttr(default=None)
    _budget: CallBudget | None = PrivateAttr(default=None)
    _client: MarketoClient | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._budget_url = self.budget_url
        if self._budget_url is None and self.shared_budget and context.instance is not None:
            self._budget_url = instance_budget_url(context.instance)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            if isinstance(self._budget, SharedBudget):
                self._budget.close()
            self._client = self._budget = None

    @property
    def budget_key(self) -> str:
        return (self.munchkin_id or urlsplit(self.base_url).netloc or self.base_url).lower()

    def get_budget(self) -> CallBudget:
        """The budget every call of this resource's client goes through (built once)."""
        if self._budget is None:
            url = self._budget_url or self.budget_url
            settings: dict[str, Any] = {
                "calls_per_window": self.calls_per_20s,
                "window_seconds": WINDOW_SECONDS,
                "max_concurrent": self.max_concurrent,
                "daily_quota": self.daily_quota,
            }
            self._budget = SharedBudget(url, self.budget_key, **settings) if url else RateGovernor(**settings)
        return self._budget

    def get_client(self) -> MarketoClient:
        """One client per resource instance: the steps of a run share its token, connections and budget."""
        with self._lock:
            if self._client is None:
                verify: bool | str = (
                    self.ca_bundle if (self.ca_bundle and self.verify_tls) else self.verify_tls
                )
                self._client = build_client(
                    MarketoClient,
                    self.base_url,
                    self.client_id,
                    self.client_secret,
                    verify=verify,
                    timeout_seconds=self.timeout_seconds,
                    governor=self.get_budget(),
                )
            return self._client
