"""The Dagster side of one connection (a Dynamics org <-> Marketo instance pair), as a dg Component."""

from sync_pipeline.connection.component import SyncConnection

__all__ = ["SyncConnection"]
