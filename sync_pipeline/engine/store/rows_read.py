"""An opt-in counter of the table rows the state store's queries read (off in production).

Tests that prove an incremental run reads only what changed (O(changes), not O(tables)) switch it on with
:func:`counting`; every connection :func:`state.open_connection` opens meanwhile profiles each statement and
adds the rows its table scans read. DuckDB's ``operator_rows_scanned`` of a sequential scan is the rows of
the row groups it went through (zone maps skip the others); for an ART index scan it reports the whole
table, so there the rows the index returned (the scan's cardinality) are what was read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import duckdb
import pyarrow as pa

_PROFILE_SETTINGS = json.dumps({"OPERATOR_ROWS_SCANNED": "true", "OPERATOR_TYPE": "true",
                                "OPERATOR_CARDINALITY": "true", "EXTRA_INFO": "true"})


@dataclass
class Tally:
    """Rows read per table and per statement (the statement's first 160 characters, whitespace folded)."""
    by_table: Counter = field(default_factory=Counter)
    by_statement: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_table.values())


_lock = threading.Lock()
_tally: Tally | None = None


def active() -> bool:
    return _tally is not None


@contextlib.contextmanager
def counting() -> Iterator[Tally]:
    """Count the rows read by every statement of connections opened inside the block."""
    global _tally
    tally = Tally()
    _tally = tally
    try:
        yield tally
    finally:
        _tally = None


def scans(node: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """(table, rows read) of each table scan in a profile tree."""
    if node.get("operator_type") == "TABLE_SCAN":
        info = node.get("extra_info") or {}
        index = info.get("Type") == "Index Scan"
        rows = node.get("operator_cardinality") if index else node.get("operator_rows_scanned")
        yield str(info.get("Table") or info.get("Function") or "?"), int(rows or 0)
    for child in node.get("children") or []:
        yield from scans(child)


class CountingConnection:
    """A DuckDB connection whose statements are profiled and tallied; everything else is delegated."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        fd, self._profile = tempfile.mkstemp(prefix="rows-read-", suffix=".json")
        os.close(fd)
        self._con = con
        self._last: str | None = None
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute(f"PRAGMA profiling_output = '{self._profile}'")
        con.execute(f"SET custom_profiling_settings = '{_PROFILE_SETTINGS}'")

    def _tally(self, sql: str) -> None:
        tally = _tally
        if tally is None:
            return
        try:
            with open(self._profile) as fh:
                profile = json.load(fh)
        except (OSError, ValueError):
            return
        if " ".join(str(profile.get("query_name", "")).split()) != " ".join(str(sql).split()):
            return  # a statement without a plan (DDL, transaction control) leaves the previous profile
        key = " ".join(str(sql).split())[:160]
        with _lock:
            for table, rows in scans(profile):
                tally.by_table[table] += rows
                tally.by_statement[key] += rows

    def execute(self, sql: str, *args: Any, **kwargs: Any) -> "CountingConnection":
        # DuckDB finds Arrow tables named in the SQL among its caller's local variables; the caller is one
        # frame further out here, so they are registered for the statement.
        named = [(n, v) for n, v in sys._getframe(1).f_locals.items()
                 if isinstance(v, (pa.Table, pa.RecordBatch)) and n in str(sql)]
        for name, value in named:
            self._con.register(name, value)
        self._harvest()
        try:
            self._con.execute(sql, *args, **kwargs)
        finally:
            for name, _ in named:
                self._con.unregister(name)
        # A query's profile is written once its result has been fetched: read it before the next statement
        # (or at close), not now. (A result never fetched leaves no profile: it is not counted.)
        self._last = sql
        return self

    def _harvest(self) -> None:
        if self._last is not None:
            sql, self._last = self._last, None
            self._tally(sql)

    def executemany(self, sql: str, *args: Any, **kwargs: Any) -> "CountingConnection":
        self._harvest()
        self._con.executemany(sql, *args, **kwargs)
        return self

    def close(self) -> None:
        with contextlib.suppress(duckdb.Error):
            self._harvest()
        self._con.close()
        with contextlib.suppress(OSError):
            os.unlink(self._profile)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def watch(con: duckdb.DuckDBPyConnection) -> Any:
    return CountingConnection(con)
