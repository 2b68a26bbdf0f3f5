"""Wire helpers shared by the Dataverse sandbox handlers: errors, Prefer headers, row rendering."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sync_pipeline.sandbox.dynamics.odata import ODataError
from sync_pipeline.sandbox.dynamics.store import LOOKUP_TARGET, DataverseFault, DynamicsStore, Row
from sync_pipeline.sandbox.http import Request, Response
from sync_pipeline.sandbox.schema import Table

ODATA_HEADERS = {"OData-Version": "4.0"}
FORMATTED = "@OData.Community.Display.V1.FormattedValue"
_PREFER_ITEM = re.compile(r'\s*([\w.\-]+)\s*(?:=\s*("[^"]*"|[^,]*))?\s*(?:,|$)')


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response.json(
        {"error": {"code": code, "message": message}}, status, {**ODATA_HEADERS, **(headers or {})}
    )


def fault_response(exc: DataverseFault | ODataError) -> Response:
    if isinstance(exc, DataverseFault):
        return error(exc.status, exc.code, exc.message)
    return error(400, exc.code, str(exc))


def guarded(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """Turn the sandbox's DataverseFault/ODataError/bad JSON into Dataverse error responses."""

    def run(req: Request) -> Response:
        try:
            return handler(req)
        except (DataverseFault, ODataError) as exc:
            return fault_response(exc)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(
                400,
                "0x80048d19",
                f"Error identified in Payload provided by the user: the request "
                f"body is not valid JSON ({exc}).",
            )

    run.__name__ = handler.__name__
    return run


def prefer(req: Request) -> dict[str, str]:
    """Parsed ``Prefer`` header: {"odata.maxpagesize": "500", "odata.track-changes": "", ...}."""
    raw = req.header("prefer") or ""
    return {
        m.group(1).lower(): (m.group(2) or "").strip('"') for m in _PREFER_ITEM.finditer(raw) if m.group(1)
    }


def table_for_set(store: DynamicsStore, entity_set: str) -> Table:
    table = store.schema.table_by_set(entity_set)
    if table is None:
        raise DataverseFault(404, "0x8006088a", f"Resource not found for the segment '{entity_set}'.")
    return table


def column_kinds(table: Table) -> dict[str, str]:
    """Wire name -> filter kind for every column of ``table``."""
    kinds = {}
    for c in table.columns:
        if c.type in ("String", "Memo"):
            kind = "string"
        elif c.type in ("Uniqueidentifier", "Lookup", "Owner", "Customer"):
            kind = "guid"
        elif c.type == "Boolean":
            kind = "bool"
        elif c.type == "DateTime":
            kind = "datetime"
        else:
            kind = "number"
        kinds[c.wire_name] = kind
    return kinds


def wants_annotations(prefs: dict[str, str]) -> tuple[bool, bool]:
    """(formatted values, lookup logical names) asked for by odata.include-annotations."""
    spec = prefs.get("odata.include-annotations")
    if spec is None:
        return False, False
    parts = [p.strip() for p in spec.split(",")]
    every = "*" in parts
    formatted = every or any(p.startswith("OData.Community.Display.V1.FormattedValue") for p in parts)
    lookups = every or any(p.startswith("Microsoft.Dynamics.CRM.") for p in parts)
    return formatted, lookups


@dataclass
class RowRenderer:
    """Renders stored rows for one query: the selected columns, @odata.etag and asked-for annotations.

    Paging renders millions of rows, so the plain path is C-level work: one ``itemgetter`` projection
    (rows written through the API may lack columns: those take the ``dict.get`` path) zipped with the keys.
    Formatted lookup names are memoised per renderer (one query), as owners and parents repeat a lot.
    """

    store: DynamicsStore
    table: Table
    columns: list[str]  # wire names
    formatted: bool = False
    lookups: bool = False

    def __post_init__(self) -> None:
        wire_cols = {c.wire_name: c for c in self.table.columns}
        annotated = [
            (w, wire_cols[w])
            for w in self.columns
            if w in wire_cols
            and (wire_cols[w].is_lookup or wire_cols[w].options or wire_cols[w].type == "Boolean")
        ]
        self._plain = not (self.formatted or self.lookups) or not annotated
        # Per annotated column, everything but the row's value worked out once per query.
        self._lookup_cols = [
            (
                w,
                w + LOOKUP_TARGET,
                w + "@Microsoft.Dynamics.CRM.lookuplogicalname",
                w + "@Microsoft.Dynamics.CRM.associatednavigationproperty",
                w + FORMATTED,
                col.name,
                col.targets,
            )
            for w, col in annotated
            if col.is_lookup
        ]
        self._bool_cols = [
            (w, w + FORMATTED) for w, col in annotated if not col.is_lookup and col.type == "Boolean"
        ]
        self._option_cols = [
            (w, w + FORMATTED, dict(col.options))
            for w, col in annotated
            if not col.is_lookup and col.type != "Boolean"
        ]
        self._keys = ("@odata.etag", *self.columns)
        self._project = (
            itemgetter(*self.columns)
            if len(self.columns) > 1
            else (lambda row, _c=self.columns[0]: (row[_c],))
        )
        self._blank = dict.fromkeys(self.columns)
        self._names: dict[tuple[str, str], Any] = {}

    def render(self, row: Row) -> dict[str, Any]:
        try:
            values = self._project(row)
        except KeyError:  # a row without some selected columns: they read as null
            values = self._project({**self._blank, **row})
        out = dict(zip(self._keys, (f'W/"{row.get("versionnumber", 0)}"', *values), strict=True))
        if not self._plain:
            self._annotate(row, out)
        return out

    def _lookup_name(self, target: str, record_id: str) -> Any:
        key = (target, record_id)
        if key not in self._names:
            target_table = self.store.schema.tables.get(target)
            ref = self.store.get(target, record_id) if target_table else None
            self._names[key] = (
                None if ref is None or target_table is None else (True, ref.get(target_table.primary_name))
            )
        return self._names[key]

    def _annotate(self, row: Row, out: dict[str, Any]) -> None:
        get = row.get
        for wire, target_key, logical_key, nav_key, formatted_key, name, targets in self._lookup_cols:
            value = get(wire)
            if value is None:
                continue
            target = get(target_key) or targets[0]
            if self.lookups:
                out[logical_key] = target
                out[nav_key] = f"{name}_{target}" if len(targets) > 1 else name
            if self.formatted:
                found = self._lookup_name(target, value)
                if found is not None:
                    out[formatted_key] = found[1]
        if not self.formatted:
            return
        for wire, formatted_key in self._bool_cols:
            value = get(wire)
            if value is not None:
                out[formatted_key] = "Yes" if value else "No"
        for wire, formatted_key, labels in self._option_cols:
            value = get(wire)
            if value is not None:
                out[formatted_key] = labels.get(value, str(value))
