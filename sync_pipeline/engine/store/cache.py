"""Answers that change rarely (the org's table metadata, the Marketo lead describe), kept in the state store for
``sync.metadata_ttl_seconds`` so an idle run does not read them again. A key names the request and the mapping it
was made for (its version), so a field added to the mapping is looked up at once."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

import duckdb

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.engine.store.state import utcnow


class ResponseCache:
    def __init__(self, con: duckdb.DuckDBPyConnection, config: SyncConfig):
        self.con, self.ttl = con, config.sync.metadata_ttl_seconds
        self.version = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
        con.execute("""CREATE TABLE IF NOT EXISTS response_cache (kind VARCHAR PRIMARY KEY, key VARCHAR,
            stored_at TIMESTAMP, value VARCHAR)""")

    def _key(self, parts: list[str]) -> str:
        return hashlib.sha256(json.dumps([self.version, *parts]).encode()).hexdigest()

    def get(self, kind: str, parts: list[str]) -> Any | None:
        if self.ttl <= 0:
            return None
        row = self.con.execute(
            "SELECT value FROM response_cache WHERE kind = ? AND key = ? AND stored_at > ?",
            [kind, self._key(parts), utcnow() - timedelta(seconds=self.ttl)],
        ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, kind: str, parts: list[str], value: Any) -> None:
        """One entry per kind: a newer answer (or one for another mapping version) replaces it."""
        if self.ttl > 0:
            self.con.execute(
                "INSERT OR REPLACE INTO response_cache VALUES (?, ?, ?, ?)",
                [kind, self._key(parts), utcnow(), json.dumps(value)],
            )

    def drop(self, kind: str) -> None:
        """Forget an answer the checks found wanting: the next run asks again (the fix may be made meanwhile)."""
        self.con.execute("DELETE FROM response_cache WHERE kind = ?", [kind])


class CachedDescribe:
    """A Marketo client whose lead describe (``describe2``) is answered from the cache while fresh."""

    def __init__(self, client: Any, cache: ResponseCache):
        self._client, self._cache = client, cache
        self._key = [str(getattr(client, "base_url", ""))]

    def describe2(self) -> Any:
        doc = self._cache.get("marketo.describe2", self._key)
        if doc is None:
            doc = self._client.describe2()
            self._cache.put("marketo.describe2", self._key, doc)
        return doc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
