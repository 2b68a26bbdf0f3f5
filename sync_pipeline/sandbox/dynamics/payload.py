"""Validate a Web API write body and turn it into a wire-keyed row change.

Accepts column values by logical name and lookups as ``<nav>@odata.bind`` (``parentcustomerid_account``
style for Customer lookups, ``ownerid`` to ``/systemusers(..)`` or ``/teams(..)``); rejects unknown
properties, wrong JSON types, over-long strings, invalid option values and (on create) missing
required columns with the Dataverse error codes and messages.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

from sync_pipeline.sandbox.dynamics.odata import normalize_datetime
from sync_pipeline.sandbox.dynamics.store import LOOKUP_TARGET, DataverseFault, DynamicsStore, Row
from sync_pipeline.sandbox.schema import Column, Table

_BIND = "@odata.bind"
_BIND_TARGET = re.compile(r"(?:.*/api/data/v[\d.]+/|/)?(?P<set>[A-Za-z_][\w]*)\((?P<id>[0-9a-fA-F-]{36})\)\Z")
_EDM = {
    "String": "Edm.String",
    "Memo": "Edm.String",
    "Integer": "Edm.Int32",
    "BigInt": "Edm.Int64",
    "Decimal": "Edm.Decimal",
    "Double": "Edm.Double",
    "Money": "Edm.Decimal",
    "Boolean": "Edm.Boolean",
    "DateTime": "Edm.DateTimeOffset",
    "Picklist": "Edm.Int32",
    "State": "Edm.Int32",
    "Status": "Edm.Int32",
    "Uniqueidentifier": "Edm.Guid",
}


def is_guid(text: Any) -> bool:
    try:
        uuid.UUID(str(text))
        return len(str(text)) == 36
    except ValueError:
        return False


def _unknown(table: Table, name: str) -> DataverseFault:
    return DataverseFault(
        400,
        "0x80060888",
        f"The property '{name}' does not exist on type "
        f"'Microsoft.Dynamics.CRM.{table.logical_name}'. Make sure to only "
        f"use property names that are defined by the type.",
    )


def _type_error(table: Table, col: Column, value: Any) -> DataverseFault:
    return DataverseFault(
        400,
        "0x80048d19",
        f"Error identified in Payload provided by the user for Entity :"
        f"'{table.entity_set}', Cause: Cannot convert the literal "
        f"'{value}' to the expected type '{_EDM.get(col.type, col.type)}' "
        f"for the property '{col.name}'.",
    )


def _convert(table: Table, col: Column, value: Any) -> Any:
    if value is None:
        return None
    kind = col.type
    if kind in ("String", "Memo"):
        if not isinstance(value, str):
            raise _type_error(table, col, value)
        if col.max_length is not None and len(value) > col.max_length:
            raise DataverseFault(
                400,
                "0x80044331",
                f"A validation error occurred.  The length of the "
                f"'{col.name}' attribute of the '{table.logical_name}' entity "
                f"exceeded the maximum allowed length of '{col.max_length}'.",
            )
        return value
    if kind in ("Integer", "BigInt", "Picklist", "State", "Status"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(table, col, value)
        if kind == "Integer" and not -(2**31) <= value < 2**31:
            raise DataverseFault(
                400,
                "0x80044330",
                f"A validation error occurred. The value {value} of "
                f"'{col.name}' on record of type '{table.logical_name}' is "
                f"outside the valid range.",
            )
        if col.options and value not in col.option_codes:
            accepted = ",".join(str(c) for c, _ in col.options)
            raise DataverseFault(
                400,
                "0x8004431A",
                f"A validation error occurred. The value {value} of "
                f"'{col.name}' on record of type '{table.logical_name}' is "
                f"outside the valid range. Accepted Values: {accepted}",
            )
        return value
    if kind in ("Decimal", "Double", "Money"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _type_error(table, col, value)
        return float(value)
    if kind == "Boolean":
        if not isinstance(value, bool):
            raise _type_error(table, col, value)
        return value
    if kind == "DateTime":
        try:
            return normalize_datetime(value)
        except (TypeError, ValueError, AttributeError):
            raise _type_error(table, col, value) from None
    if kind == "Uniqueidentifier":
        if not is_guid(value):
            raise _type_error(table, col, value)
        return str(value).lower()
    return value


def _lookup_for_nav(table: Table, nav: str) -> tuple[Column, str | None] | None:
    """(lookup column, fixed target or None) for a navigation property name, e.g. parentcustomerid_account."""
    nav_l = nav.lower()
    for col in table.columns:
        if not col.is_lookup:
            continue
        if col.name == nav_l:
            return col, None
        for target in col.targets:
            if nav_l == f"{col.name}_{target}":
                return col, target
    return None


def parse_body(
    store: DynamicsStore,
    table: Table,
    body: Any,
    *,
    creating: bool,
    resolve_ref: Callable[[str], str | None] | None = None,
) -> Row:
    """Body of a POST/PATCH -> row change keyed by wire names (validated)."""
    if not isinstance(body, dict):
        raise DataverseFault(
            400,
            "0x80048d19",
            f"Error identified in Payload provided by the user for Entity :"
            f"'{table.entity_set}': the body must be a JSON object.",
        )
    row: Row = {}
    for key, value in body.items():
        if key.endswith(_BIND):
            _bind(store, table, key[: -len(_BIND)], value, row, resolve_ref)
            continue
        if key.startswith("@odata.") or key.startswith("@"):
            continue  # @odata.type / @odata.etag annotations ride along on bulk messages
        col = table.column(key)
        if col is None or col.is_lookup:
            raise _unknown(table, key)
        if col.read_only and col.name != table.primary_id:
            continue  # system-managed columns are ignored, as Dataverse does
        row[key] = _convert(table, col, value)
    for col in table.columns:
        if (
            col.required
            and not col.read_only
            and ((creating and row.get(col.name) is None) or (col.name in row and row[col.name] is None))
        ):
            raise DataverseFault(
                400,
                "0x80040203",
                f"Attribute '{col.name}' of entity '{table.logical_name}' "
                f"is required and cannot be null or missing.",
            )
    return row


def _bind(
    store: DynamicsStore,
    table: Table,
    nav: str,
    value: Any,
    row: Row,
    resolve_ref: Callable[[str], str | None] | None,
) -> None:
    found = _lookup_for_nav(table, nav)
    if found is None:
        raise _unknown(table, nav)
    col, fixed_target = found
    wire = col.wire_name
    if value is None:
        row[wire] = None
        if len(col.targets) > 1:
            row[wire + LOOKUP_TARGET] = None
        return
    ref = str(value)
    if ref.startswith("$") and resolve_ref is not None:
        ref = resolve_ref(ref) or ref
    m = _BIND_TARGET.match(ref)
    target_table = store.schema.table_by_set(m.group("set")) if m else None
    if m is None or target_table is None:
        raise DataverseFault(
            400,
            "0x80048d19",
            f"Invalid value '{value}' for '{nav}@odata.bind': expected '/<entityset>(<guid>)'.",
        )
    target = target_table.logical_name
    if target not in col.targets or (fixed_target and fixed_target != target):
        raise DataverseFault(
            400,
            "0x80048d19",
            f"'{nav}@odata.bind' cannot point to a '{target}' record; "
            f"'{col.name}' accepts {', '.join(col.targets)}.",
        )
    record_id = m.group("id").lower()
    if store.get(target, record_id) is None:
        raise DataverseFault(
            400, "0x80040217", f"{target} With Id = {record_id} Does Not Exist (bound by '{nav}@odata.bind')."
        )
    row[wire] = record_id
    if len(col.targets) > 1:
        row[wire + LOOKUP_TARGET] = target
