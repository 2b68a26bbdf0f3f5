"""Keyed tables for companies, opportunities, roles, sales persons and custom objects.

Each table holds rows by their idField (integer ``id`` or string ``marketoGUID``), a unique index on
the dedupe key and a value index per searchable field. Write results follow the API: one entry per
input record, in order, with ``seq``, ``status`` and record-level ``reasons``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

from sync_pipeline.sandbox.clock import Clock, iso
from sync_pipeline.sandbox.marketo.validation import validate_record
from sync_pipeline.sandbox.schema import MObject


def norm(value: Any) -> str | None:
    """Index form of a value: Marketo lookups are case-insensitive; null and "" never match."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).lower()


class ValueIndex:
    """value -> keys, storing a bare key for the (usual) single match to keep memory low."""

    def __init__(self) -> None:
        self._map: dict[str, Any] = {}

    def add(self, value: Any, key: Any) -> None:
        v = norm(value)
        if v is None:
            return
        cur = self._map.get(v)
        if cur is None:
            self._map[v] = key
        elif isinstance(cur, set):
            cur.add(key)
        elif cur != key:
            self._map[v] = {cur, key}

    def remove(self, value: Any, key: Any) -> None:
        v = norm(value)
        cur = self._map.get(v) if v is not None else None
        if v is None or cur is None:
            return
        if isinstance(cur, set):
            cur.discard(key)
            if len(cur) == 1:
                self._map[v] = next(iter(cur))
        elif cur == key:
            del self._map[v]

    def get(self, value: Any) -> list[Any]:
        v = norm(value)
        cur = self._map.get(v) if v is not None else None
        if cur is None:
            return []
        return sorted(cur) if isinstance(cur, set) else [cur]


class ObjectTable:
    def __init__(self, obj: MObject, clock: Clock):
        self.obj = obj
        self.clock = clock
        self.rows: dict[Any, dict[str, Any]] = {}
        self.dedupe: dict[tuple, Any] = {}
        self.indexes = {
            f[0]: ValueIndex()
            for f in obj.searchable_fields
            if len(f) == 1 and f[0] != obj.id_field and obj.field(f[0])
        }
        self._next_id = 1
        # Extra per-record checks (e.g. a role's opportunity and lead must exist); returns reasons.
        self.check: Callable[[dict[str, Any]], list[dict[str, str]]] = lambda row: []

    @property
    def integer_ids(self) -> bool:
        return self.obj.id_field == "id"

    def dedupe_key(self, record: dict[str, Any]) -> tuple | None:
        key = tuple(norm(record.get(f)) for f in self.obj.dedupe_fields)
        return None if any(k is None for k in key) else key

    def new_key(self) -> Any:
        if self.integer_ids:
            key, self._next_id = self._next_id, self._next_id + 1
            return key
        return str(uuid.uuid4())

    def parse_key(self, value: Any) -> Any:
        if self.integer_ids:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
        return None if value is None else str(value)

    def _index(self, key: Any, row: dict[str, Any], add: bool) -> None:
        for name, index in self.indexes.items():
            (index.add if add else index.remove)(row.get(name), key)
        dk = self.dedupe_key(row)
        if dk is not None:
            if add:
                self.dedupe[dk] = key
            elif self.dedupe.get(dk) == key:
                del self.dedupe[dk]

    def insert(self, values: dict[str, Any], now: str | None = None) -> Any:
        now = now or iso(self.clock.now())
        key = self.new_key()
        row = {k: v for k, v in values.items() if v is not None}
        row[self.obj.id_field] = key
        row.setdefault("createdAt", now)
        row.setdefault("updatedAt", now)
        self.rows[key] = row
        self._index(key, row, True)
        return key

    def update(self, key: Any, values: dict[str, Any]) -> None:
        row = self.rows[key]
        self._index(key, row, False)
        for k, v in values.items():
            if v is None:
                row.pop(k, None)
            else:
                row[k] = v
        row["updatedAt"] = iso(self.clock.now())
        self._index(key, row, True)

    def delete(self, key: Any) -> None:
        row = self.rows.pop(key)
        self._index(key, row, False)

    def find(self, field: str, value: Any) -> list[Any]:
        if field == self.obj.id_field:
            key = self.parse_key(value)
            return [key] if key in self.rows else []
        if field in self.indexes:
            return self.indexes[field].get(value)
        target = norm(value)
        return [k for k, r in self.rows.items() if target is not None and norm(r.get(field)) == target]

    def find_compound(self, fields: tuple[str, ...], record: dict[str, Any]) -> list[Any]:
        if len(fields) == 1:
            return self.find(fields[0], record.get(fields[0]))
        if fields == self.obj.dedupe_fields:
            key = self.dedupe_key(record)
            return [self.dedupe[key]] if key in self.dedupe else []
        wanted = [(f, norm(record.get(f))) for f in fields]
        return [k for k, r in self.rows.items() if all(norm(r.get(f)) == v for f, v in wanted)]

    def _id_entry(self, key: Any) -> dict[str, Any]:
        return {self.obj.id_field: key}

    def upsert(
        self,
        records: list[dict[str, Any]],
        action: str,
        dedupe_by: str,
        fail: Callable[[int], dict[str, str] | None] = lambda i: None,
    ) -> list[dict[str, Any]]:
        results = []
        seen: set[Any] = set()
        by_id = dedupe_by == "idField"
        for seq, record in enumerate(records):
            out = self._upsert_one(seq, record, action, by_id, seen, fail(seq))
            results.append(out)
        return results

    def _upsert_one(
        self, seq: int, record: Any, action: str, by_id: bool, seen: set, injected: dict[str, str] | None
    ) -> dict[str, Any]:
        skip = lambda *reasons: {"seq": seq, "status": "skipped", "reasons": list(reasons)}  # noqa: E731
        if not isinstance(record, dict):
            return skip({"code": "1003", "message": "Invalid record: expected a JSON object"})
        if injected:
            return skip(injected)
        id_field = self.obj.id_field
        if by_id:
            if action != "updateOnly":
                return skip({"code": "1003", "message": "dedupeBy idField is only allowed with updateOnly"})
            key = self.parse_key(record.get(id_field))
            marker: Any = ("id", key)
            matches = [key] if key in self.rows else []
        else:
            marker = self.dedupe_key(record)
            if marker is None:
                missing = [f for f in self.obj.dedupe_fields if norm(record.get(f)) is None]
                return skip(
                    {"code": "1002", "message": f"Value for required field '{missing[0]}' not specified"}
                )
            matches = [self.dedupe[marker]] if marker in self.dedupe else []
        if marker in seen:
            return skip({"code": "1036", "message": "Duplicate object in input"})
        seen.add(marker)
        fields = {k: v for k, v in record.items() if not (by_id and k == id_field)}
        values, reasons = validate_record(self.obj, fields, creating=not matches)
        if reasons:
            return skip(*reasons)
        if matches and action == "createOnly":
            return skip({"code": "1017", "message": f"{self.obj.display_name} already exists"})
        if not matches and action == "updateOnly":
            return skip({"code": "1013", "message": f"{self.obj.display_name} not found"})
        reasons = self.check({**(self.rows[matches[0]] if matches else {}), **values})
        if reasons:
            return skip(*reasons)
        if matches:
            if not by_id:
                for f in self.obj.dedupe_fields:
                    values.pop(f, None)  # the key that matched stays as stored
            self.update(matches[0], values)
            return {"seq": seq, "status": "updated", **self._id_entry(matches[0])}
        return {"seq": seq, "status": "created", **self._id_entry(self.insert(values))}

    def delete_records(
        self,
        records: list[dict[str, Any]],
        delete_by: str,
        guard: Callable[[Any], dict[str, str] | None] = lambda key: None,
    ) -> list[dict[str, Any]]:
        results = []
        for seq, record in enumerate(records):
            if not isinstance(record, dict):
                results.append(
                    {
                        "seq": seq,
                        "status": "skipped",
                        "reasons": [{"code": "1003", "message": "Invalid record: expected a JSON object"}],
                    }
                )
                continue
            if delete_by == "idField":
                matches = self.find(self.obj.id_field, record.get(self.obj.id_field))
            else:
                matches = self.find_compound(self.obj.dedupe_fields, record)
            if not matches:
                results.append(
                    {
                        "seq": seq,
                        "status": "skipped",
                        "reasons": [{"code": "1013", "message": f"{self.obj.display_name} not found"}],
                    }
                )
                continue
            blocked = guard(matches[0])
            if blocked:
                results.append({"seq": seq, "status": "skipped", "reasons": [blocked]})
                continue
            self.delete(matches[0])
            results.append({"seq": seq, "status": "deleted", **self._id_entry(matches[0])})
        return results

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self.rows.values()))
