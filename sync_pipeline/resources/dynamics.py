"""Dagster resource for the Dataverse Web API client."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from sync_pipeline.resources.common import build_client
from sync_pipeline.clients.dynamics import DynamicsClient



_CLIENTS: dict[tuple, DynamicsClient] = {}
_LOCK = threading.Lock()


class DynamicsResource(dg.ConfigurableResource):
    """Connection settings for Dynamics 365; ``client_secret`` comes from ``dg.EnvVar`` in the definitions."""

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

    def _verify(self) -> bool | str:
        if not self.verify_tls:
            return False
        return self.ca_bundle or True

    def get_client(self) -> DynamicsClient:
        """One client per process and settings: steps and runs in a process share the token and connections."""
        if self._client is None:
            if not 1 <= self.page_size <= 5000:
                raise ValueError(f"DynamicsResource.page_size must be 1..5000, got {self.page_size}")
            key = (self.url, self.authority, self.client_id, hashlib.sha256(self.client_secret.encode()).hexdigest(),
                   str(self._verify()), self.timeout_seconds, self.max_retries, self.page_size)
            with _LOCK:
                if key not in _CLIENTS:
                    _CLIENTS[key] = build_client(DynamicsClient, self.url, self.authority, self.client_id, self.client_secret,
                                                   verify=self._verify(), timeout_seconds=self.timeout_seconds,
                                                   max_retries=self.max_retries, page_size=self.page_size)
                self._client = _CLIENTS[key]
        return self._client
