"""The Dataverse (Dynamics 365) Web API v9.2 sandbox: server, in-memory store and OData query engine."""

from sync_pipeline.sandbox.dynamics.server import DynamicsSandbox
from sync_pipeline.sandbox.dynamics.store import (
    DataverseFault,
    DuplicateRecord,
    DynamicsStore,
    RecordNotFound,
)

__all__ = ["DynamicsSandbox", "DynamicsStore", "DataverseFault", "DuplicateRecord", "RecordNotFound"]
