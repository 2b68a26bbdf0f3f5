"""Field validation and coercion the way the Marketo API applies it to written values.

Every problem is a :class:`FieldError` carrying the record-level code Marketo uses (1001 invalid value
or type mismatch, 1002 missing required value, 1006 unknown field) and a message naming the field.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any

from sync_pipeline.sandbox.schema import MField, MObject

_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$"
)
_TRUE = {"true", "1", "yes", "y"}
_FALSE = {"false", "0", "no", "n"}
_TEXT_TYPES = {"string", "text", "email", "phone", "url", "reference"}


class FieldError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def reason(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def to_iso(value: Any) -> str:
    """Normalise a datetime (or ISO-8601 string with offset/Z) to whole-second UTC ``...Z``."""
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def coerce(field: MField, value: Any) -> Any:
    """The stored form of ``value`` for ``field``; ``None`` and ``""`` write null."""
    if value is None or value == "":
        return None
    kind = field.data_type
    name = field.name
    if kind in _TEXT_TYPES:
        if isinstance(value, (dict, list)):
            raise FieldError("1001", f"Invalid value for field '{name}': expected {kind}")
        text = value if isinstance(value, str) else str(value)
        if field.length is not None and len(text) > field.length:
            raise FieldError("1001", f"Value for field '{name}' exceeds max length {field.length}")
        if kind == "email" and (not text.isascii() or not _EMAIL.match(text)):
            raise FieldError("1001", f"Invalid email address for field '{name}'")
        return text
    if kind == "integer":
        if isinstance(value, bool):
            raise FieldError("1001", f"Invalid value for field '{name}' of type integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise FieldError("1001", f"Invalid value for field '{name}' of type integer")
    if kind in ("float", "currency"):
        if isinstance(value, bool):
            raise FieldError("1001", f"Invalid value for field '{name}' of type {kind}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise FieldError("1001", f"Invalid value for field '{name}' of type {kind}") from None
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise FieldError("1001", f"Invalid value for field '{name}' of type boolean")
    if kind == "date":
        try:
            return date.fromisoformat(str(value)[:10]).isoformat()
        except ValueError:
            raise FieldError("1001", f"Invalid date for field '{name}'") from None
    if kind == "datetime":
        try:
            return to_iso(value)
        except (TypeError, ValueError):
            raise FieldError("1001", f"Invalid datetime for field '{name}'") from None
    return value


def validate_record(
    obj: MObject, record: dict[str, Any], *, allowed_readonly: tuple[str, ...] = (), creating: bool
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Coerced writable values of ``record`` and the list of record-level reasons (empty when valid)."""
    values: dict[str, Any] = {}
    reasons: list[dict[str, str]] = []
    for name, raw in record.items():
        field = obj.field(name)
        if field is None:
            reasons.append({"code": "1006", "message": f"Field '{name}' not found"})
            continue
        if not field.updateable and name not in allowed_readonly:
            reasons.append({"code": "1003", "message": f"Field '{name}' is not updateable"})
            continue
        try:
            values[name] = coerce(field, raw)
        except FieldError as exc:
            reasons.append(exc.reason())
    if creating:
        for name in obj.required:
            if values.get(name) is None:
                reasons.append(
                    {"code": "1002", "message": f"Value for required field '{name}' not specified"}
                )
    else:
        for name in obj.required:
            if name in values and values[name] is None:
                reasons.append(
                    {"code": "1002", "message": f"Value for required field '{name}' not specified"}
                )
    return values, reasons
