"""The engine's layers, checked on the source: no Dagster, no client classes, one writer of the sync's state."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import sync_pipeline

PACKAGE = Path(sync_pipeline.__file__).parent
ENGINE = PACKAGE / "engine"
ADMIN = PACKAGE / "admin"
# The engine may use the clients' error types and plain request values, never a client module.
CLIENT_MODULES_ALLOWED = {"sync_pipeline.clients.errors", "sync_pipeline.clients.types", "sync_pipeline.clients"}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def test_engine_and_admin_import_neither_dagster_nor_defs() -> None:
    for path in _modules(ENGINE) + _modules(ADMIN):
        bad = {m for m in _imports(path) if m.split(".")[0] == "dagster" or m.startswith("sync_pipeline.defs")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_engine_sees_clients_only_through_errors_and_ports() -> None:
    for path in _modules(ENGINE):
        clients = {m for m in _imports(path) if m.startswith("sync_pipeline.clients")}
        bad = {m for m in clients if m not in CLIENT_MODULES_ALLOWED and not m.startswith(
            ("sync_pipeline.clients.errors.", "sync_pipeline.clients.types."))}
        # ``from sync_pipeline.clients import errors`` shows up as the package plus ``.errors``
        bad -= {"sync_pipeline.clients.errors"}
        assert not bad, f"{path.relative_to(PACKAGE)} imports client modules {sorted(bad)}"


def test_engine_never_reads_http_statuses() -> None:
    pattern = re.compile(r"\.status\s*(==|!=|in\b|<|>)|status_code")
    for path in _modules(ENGINE):
        hits = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
        assert not hits, f"{path.relative_to(PACKAGE)} reads HTTP statuses at lines {hits}"


# Writes to the sync's state: base, split base, identity, failures, pending marks.
STATE_WRITE = re.compile(
    r"(INSERT( OR REPLACE)? INTO|UPDATE|DELETE FROM)\s+(identity|failures|b__split|\{b\}|b_\w+|\{qi\('b_)"
    r"|SET pending_seq|pending_seq\s*=\s*(\?|NULL|nextval)", re.IGNORECASE)
# The mirror upserts stamp the ledger's mark in the same statement as the row (``pending_seq =
# excluded.pending_seq``): a row and its mark cannot diverge after a crash. That form is not matched above.
LEDGER = ENGINE / "store" / "ledger.py"


def test_only_the_ledger_writes_state() -> None:
    for path in _modules(ENGINE) + _modules(ADMIN):
        if path == LEDGER:
            continue
        text = path.read_text(encoding="utf-8")
        hits = sorted({m.group(0) for m in STATE_WRITE.finditer(text)})
        assert not hits, f"{path.relative_to(PACKAGE)} writes state itself: {hits}"


def test_the_ledger_does_write_state() -> None:  # the pattern above finds what it is meant to find
    assert len(STATE_WRITE.findall(LEDGER.read_text(encoding="utf-8"))) >= 10
