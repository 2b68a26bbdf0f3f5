"""Asset selections the CLI runs: one entity's own initial copy, and the extract+plan preview (never a push)."""

from __future__ import annotations

import dagster as dg

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.connection.keys import PERSON, asset_key


def entity_selection(conn: str, config: SyncConfig, name: str) -> list[dg.AssetKey]:
    """The assets of one entity (its extract, plan and pushes): its own initial copy."""
    e = config.entity(name)
    keys = [
        asset_key(conn, e.derived_from or e.name, "extract"),
        asset_key(conn, e.name, "plan"),
        asset_key(conn, e.name, "push"),
    ]
    if e.is_person:
        keys += [asset_key(conn, PERSON, "extract"), asset_key(conn, e.name, "push", "dynamics")]
    return keys


def preview_selection(conn: str, config: SyncConfig, entity: str | None = None) -> list[dg.AssetKey]:
    """Extract and plan assets (never a push) for one entity or all of them."""
    entities = [config.entity(entity)] if entity else config.entities
    keys: list[dg.AssetKey] = []
    for e in entities:
        keys.append(asset_key(conn, e.derived_from or e.name, "extract"))
        if e.is_person:
            keys.append(asset_key(conn, PERSON, "extract"))
        keys.append(asset_key(conn, e.name, "plan"))
    return list(dict.fromkeys(keys))
