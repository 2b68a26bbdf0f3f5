"""Dagster resource for one Marketo instance."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from sync_pipeline.resources.common import build_client
from sync_pipeline.clients.marketo import MarketoClient



_CLIENTS: dict[tuple, MarketoClient] = {}
_LOCK = threading.Lock()


class MarketoResource(dg.ConfigurableResource):
    """Marketo REST/bulk access. ``base_url`` is ``https://<munchkin>.mktorest.com`` (no ``/rest``).

    All clients of the same instance in a process share one rate governor, so several assets or
    threads together stay within the configured call window, concurrency and daily quota.
    """

    base_url: str = Field(description="Instance URL, e.g. https://123-ABC-456.mktorest.com")
    client_id: str = Field(description="LaunchPoint custom service client id")
    client_secret: str = Field(repr=False, description="LaunchPoint custom service client secret (use dg.EnvVar)")
    ca_bundle: str | None = Field(default=None, description="PEM bundle to verify the server with")
    verify_tls: bool = True
    timeout_seconds: float = 60.0
    calls_per_20s: int = Field(default=50, ge=1, description="Our share of Marketo's 100 calls/20 s (higher only for "
                               "a sandbox with its limits off, e.g. benchmarks)")
    max_concurrent: int = Field(default=5, ge=1, description="In-flight calls (Marketo allows 10)")
    daily_quota: int = Field(default=50_000, ge=1, description="Calls per day this pipeline may spend")

    _client: MarketoClient | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def get_client(self) -> MarketoClient:
        """One client per process and settings: steps and runs in a process share the token and connections."""
        with self._lock:
            if self._client is None:
                verify: bool | str = self.ca_bundle if (self.ca_bundle and self.verify_tls) else self.verify_tls
                key = (self.base_url, self.client_id, hashlib.sha256(self.client_secret.encode()).hexdigest(),
                       str(verify), self.timeout_seconds, self.calls_per_20s, self.max_concurrent, self.daily_quota)
                with _LOCK:
                    if key not in _CLIENTS:
                        _CLIENTS[key] = build_client(MarketoClient, 
                            self.base_url, self.client_id, self.client_secret, verify=verify,
                            timeout_seconds=self.timeout_seconds, calls_per_window=self.calls_per_20s,
                            window_seconds=20.0, max_concurrent=self.max_concurrent, daily_quota=self.daily_quota)
                    self._client = _CLIENTS[key]
            return self._client
