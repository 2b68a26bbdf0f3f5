"""The engine's layers, checked on the source: no HTTP statuses, one writer of the sync's state.

Which packages the engine may import (no Dagster, clients only through their errors and request values) is
an import contract (pyproject.toml, [tool.importlinter]; sync_pipeline_tests/test_import_contracts.py)."""

from __future__ import annotations

import re
from pathlib import Path

import sync_pipeline

PACKAGE = Path(sync_pipeline.__file__).parent
ENGINE = PACKAGE / "engine"
ADMIN = PACKAGE / "admin"


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def test_engine_never_reads_http_statuses() -> None:
    pattern = re.compile(r"\.status\s*(==|!=|in\b|<|>)|status_code")
    for path in _modules(ENGINE):
        hits = [
            n
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)
        ]
        assert not hits, f"{path.relative_to(PACKAGE)} reads HTTP statuses at lines {hits}"


# Writes to the sync's state: base, split base, identity, failures, pending marks.
STATE_WRITE = re.compile(
    r"(INSERT( OR REPLACE)? INTO|UPDATE|DELETE FROM)\s+(identity|failures|b__split|\{b\}|b_\w+|\{qi\('b_)"
    r"|SET pending_seq|pending_seq\s*=\s*(\?|NULL|nextval)",
    re.IGNORECASE,
)
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
