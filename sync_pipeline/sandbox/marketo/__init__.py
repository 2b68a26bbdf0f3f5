"""Marketo sandbox: REST, bulk and identity APIs on loopback (see :mod:`.server` for routes and faults)."""

from sync_pipeline.sandbox.marketo.server import MarketoSandbox
from sync_pipeline.sandbox.marketo.store import MarketoStore, StoreError

__all__ = ["MarketoSandbox", "MarketoStore", "StoreError"]
