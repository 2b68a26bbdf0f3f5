"""Dagster resource for the Dataverse Web API client.

Construct one per connection, every setting a field (secrets through ``dg.EnvVar``)::

    DynamicsResource(url=dg.EnvVar("ACME_DYNAMICS_URL"), authority=dg.EnvVar("ACME_DYNAMICS_AUTHORITY"),
                     client_id=dg.EnvVar("ACME_DYNAMICS_CLIENT_ID"),
                     client_secret=dg.EnvVar("ACME_DYNAMICS_CLIENT_SECRET"))
"""

from __future__ import annotations

import threading

import dagster as dg
from pydantic import Field, PrivateAttr

from sync_pipeline.clients.dynamics import DynamicsClient
from sync_pipeline.resources.common import build_client


class DynamicsResource(dg.ConfigurableResource):
    """Connection settings for Dynamics 365; ``client_secret`` comes from ``dg.EnvVar`` in the definitions.

    One client per resource instance (so per run): the steps of a run share its token and connections.
    """

    url: str  # the org URL, e.g. https://contoso.crm.dynamics.com
    authority: str  # https://login.microsoftonline.com/<tenant id>
    client_id: str
    client_secret: str = Field(repr=False)  # never shown in reprs or logs
    ca_bundle: str | None = None  # PEM bundle to trust instead of the system store
    verify_tls: bool = True
    timeout_seconds: float = 60.0
    max_retries: int = 5
    page_size: int = 5000

    _client: DynamicsClient | None = PrivateAttr(default=None)
    _organization_id: str | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _verify(self) -> bool | str:
        if not self.verify_tls:
            return False
        return self.ca_bundle or True

    def get_client(self) -> DynamicsClient:
        with self._lock:
            if self._client is None:
                if not 1 <= self.page_size <= 5000:
                    raise ValueError(f"DynamicsResource.page_size must be 1..5000, got {self.page_size}")
                self._client = build_client(
                    DynamicsClient,
                    self.url,
                    self.authority,
                    self.client_id,
                    self.client_secret,
                    verify=self._verify(),
                    timeout_seconds=self.timeout_seconds,
                    max_retries=self.max_retries,
                    page_size=self.page_size,
                )
            return self._client

    def organization_id(self) -> str:
        """The org's OrganizationId, read once per resource instance (one WhoAmI per run, not per step)."""
        if self._organization_id is None:
            self._organization_id = str(self.get_client().whoami()["OrganizationId"])
        return self._organization_id

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None
