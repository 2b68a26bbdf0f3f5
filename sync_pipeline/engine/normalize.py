"""Canonical values: one text form per mapped field, whichever system a value came from.

Both mirrors store canonical text so that the three-way merge compares like with like (a Dynamics
picklist code and a Marketo label, ``true`` and ``1``, ``12.50`` and ``12.5``, ``+02:00`` and ``Z``).
Canonicalisation is SQL (set-based, over whole pages); conversion back to each API's wire types is
Python, applied only to the values being written.
"""

from __future__ import annotations

from typing import Any

from sync_pipeline.config.model import FieldMap
from sync_pipeline.engine.store.state import sql_text

INVALID = "\u2400invalid:"  # prefix of a value that cannot be represented; such records are rejected

_NUMBER = "regexp_replace(printf('%.4f', {x}), '\\.?0+$', '')"

# Time never depends on the host: DuckDB reads a string without an offset as the *session* time zone (the
# host's), so no expression here casts such a string to TIMESTAMPTZ. A value with an offset is an instant
# (converted to UTC); a value without one is read per the column's DateTimeBehavior (FieldMap.behavior):
# UserLocal columns are stored and returned in UTC by Dataverse, so a bare value is UTC; TimeZoneIndependent
# values are wall-clock times kept as written; DateOnly values are calendar dates, never shifted
# (learn.microsoft.com/power-apps/developer/data-platform/behavior-format-date-time-attribute).
_OFFSET = "'([0-9]{2}:[0-9]{2}(:[0-9]{2}([.][0-9]+)?)?) ?([Zz]|[+-][0-9]{2}(:?[0-9]{2})?)$'"
_DATE = "'^[0-9]{4}-[0-9]{2}-[0-9]{2}'"


def _utc_ts(x: str) -> str:
    """A TIMESTAMP (no zone) holding the UTC wall-clock time of ``x``; bare values are taken as UTC."""
    return (
        f"CASE WHEN regexp_matches({x}, {_OFFSET}) THEN TRY_CAST({x} AS TIMESTAMPTZ) AT TIME ZONE 'UTC' "
        f"ELSE TRY_CAST({x} AS TIMESTAMP) END"
    )


def _wall_ts(x: str) -> str:
    """A TIMESTAMP holding the wall-clock time of ``x`` as written (any offset dropped, nothing converted)."""
    return f"TRY_CAST(regexp_replace({x}, {_OFFSET}, '\\1') AS TIMESTAMP)"


def _datetime_expr(f: FieldMap, x: str) -> str:
    behavior = f.behavior
    if f.transform == "date":
        if behavior == "user_local":
            return f"strftime({_utc_ts(x)}, '%Y-%m-%d')"
        # DateOnly (and a zone-independent date): the calendar date as written.
        return f"CASE WHEN regexp_matches({x}, {_DATE}) THEN strftime(TRY_CAST(substr({x}, 1, 10) AS DATE), '%Y-%m-%d') END"
    if behavior == "date_only":
        return (
            f"CASE WHEN regexp_matches({x}, {_DATE}) THEN "
            f"strftime(TRY_CAST(substr({x}, 1, 10) AS DATE), '%Y-%m-%dT00:00:00Z') END"
        )
    ts = _wall_ts(x) if behavior == "time_zone_independent" else _utc_ts(x)
    return f"strftime({ts}, '%Y-%m-%dT%H:%M:%SZ')"


def _shared_expr(f: FieldMap, x: str) -> str | None:
    """Numbers, dates and ids canonicalise the same way from either system (``x`` is the value as text)."""
    t = f.transform
    if t == "number":
        return f"CASE WHEN {x} IS NULL THEN NULL ELSE {_NUMBER.format(x=f'TRY_CAST({x} AS DOUBLE)')} END"
    if t in ("datetime", "date"):
        return _datetime_expr(f, x)
    if t in ("lookup", "customer_account", "owner"):
        return f"lower({x})"
    return None


def dynamics_expr(f: FieldMap, col: str) -> str:
    """SQL turning a typed Dynamics column (from the page's Arrow table) into canonical text."""
    t = f.transform
    if t in ("text", "email"):
        return f"nullif(trim(CAST({col} AS VARCHAR)), '')"
    if t == "boolean":  # unset is unset, not "false" (an opt-out column nobody filled in is no opt-in)
        return f"CASE WHEN {col} IS NULL THEN NULL WHEN CAST({col} AS BOOLEAN) THEN 'true' ELSE 'false' END"
    if t == "integer":
        return f"CAST(TRY_CAST({col} AS BIGINT) AS VARCHAR)"
    if t == "picklist":
        whens = " ".join(
            f"WHEN {int(code)} THEN {sql_text(label)}" for code, label in (f.options or {}).items()
        )
        if not whens:  # no labels known (neither the org's metadata nor the YAML): every code is unknown
            return f"CASE WHEN {col} IS NULL THEN NULL ELSE {sql_text(INVALID)} || CAST({col} AS VARCHAR) END"
        return (
            f"CASE WHEN {col} IS NULL THEN NULL ELSE CASE TRY_CAST({col} AS BIGINT) {whens} "
            f"ELSE {sql_text(INVALID)} || CAST({col} AS VARCHAR) END END"
        )
    shared = _shared_expr(f, f"CAST({col} AS VARCHAR)")
    if shared is None:
        raise ValueError(f"field {f.marketo!r}: unknown transform {t!r}")
    return shared


def marketo_expr(f: FieldMap, col: str) -> str:
    """SQL turning a Marketo value (as text, from REST JSON or a bulk CSV) into canonical text."""
    v = f"nullif(trim(CAST({col} AS VARCHAR)), '')"
    t = f.transform
    if t in ("text", "email", "picklist"):
        return v
    if t == "boolean":
        return f"CASE WHEN {v} IS NULL THEN NULL WHEN lower({v}) IN ('true', '1', 'yes') THEN 'true' ELSE 'false' END"
    if t == "integer":
        return f"CAST(TRY_CAST(TRY_CAST({v} AS DOUBLE) AS BIGINT) AS VARCHAR)"
    shared = _shared_expr(f, v)
    if shared is None:
        raise ValueError(f"field {f.marketo!r}: unknown transform {t!r}")
    return shared


def compare_expr(f: FieldMap, x: str) -> str:
    """What counts as 'the same value' (emails compare case-insensitively)."""
    return f"lower({x})" if f.transform == "email" else x


# ---- wire values ----------------------------------------------------------------------------------


def _scalar(t: str, value: str) -> Any:
    """Booleans and numbers are JSON values on both APIs; everything else stays text."""
    if t == "boolean":
        return value == "true"
    if t == "integer":
        return int(value)
    if t == "number":
        return float(value)
    return value


def to_marketo(f: FieldMap, value: str | None) -> Any:
    return None if value is None else _scalar(f.transform, value)


def to_dynamics(f: FieldMap, value: str | None) -> Any:
    """Canonical text to a Dataverse JSON value; raises ValueError naming the field when impossible."""
    if value is None:
        return None
    t = f.transform
    if t == "picklist":
        for code, label in (f.options or {}).items():
            if label.lower() == value.lower():
                return int(code)
        raise ValueError(
            f"value {value!r} is not one of the options of {f.dynamics} "
            f"({', '.join((f.options or {}).values())})"
        )
    if t == "date":
        return f"{value}T00:00:00Z"
    return _scalar(t, value)
