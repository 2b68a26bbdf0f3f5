"""Push: what happened to each record of a write (``Result``), the push counters, and handing outcomes to the
ledger (``store/ledger.py``), which alone writes the state they change."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from sync_pipeline.clients import errors
from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.store import ledger


@dataclass
class Result:
    did: str
    op: str
    ok: bool
    marketo_id: str | None = None
    code: str | None = None
    message: str | None = None
    kind: str = errors.OK  # errors.OK / CHANGED / GONE / FAILED: what the bookkeeping branches on


@dataclass
class ApplyStats:
    target: str
    records: int = 0
    ok: int = 0
    failed: int = 0
    held: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # code -> records

    def as_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "records_planned": self.records,
            "records_written": self.ok,
            "records_failed": self.failed,
            "records_held": self.held,
        }
        out.update({f"written/{k}": v for k, v in sorted(self.by_op.items())})
        out.update({f"errors/{k}": v for k, v in sorted(self.errors.items())})
        return out


def outcomes(
    rows: list[tuple], payload_op: str, results: Sequence[Any], key: Callable[[Any], str | None]
) -> list[Result]:
    out = []
    # Marketo answers one result per record, in order; records past a short answer get no outcome here.
    for row, res in zip(rows, results, strict=False):
        status = getattr(res, "status", None)
        if status in ("created", "updated", "deleted"):
            out.append(Result(row[0], row[1], True, key(res) or row[2]))
        else:
            reasons = getattr(res, "reasons", None) or [{"code": "unknown", "message": f"status {status!r}"}]
            out.append(
                Result(
                    row[0],
                    row[1],
                    False,
                    row[2],
                    str(reasons[0].get("code")),
                    str(reasons[0].get("message")),
                    getattr(res, "kind", None) or errors.FAILED,
                )
            )
    return out


def record_results(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    target: str,
    results: list[Result],
    run_id: str,
    now: datetime,
    stats: ApplyStats,
) -> None:
    if not results:
        return
    table = pa.table(
        {
            "did": [r.did for r in results],
            "op": [r.op for r in results],
            "ok": [r.ok for r in results],
            "mid": [r.marketo_id for r in results],
            "code": [r.code for r in results],
            "message": [r.message for r in results],
            "kind": [r.kind for r in results],
        }
    )
    ledger.record_outcomes(con, config, entity, target, table, run_id, now)
    for r in results:
        if r.ok:
            stats.ok += 1
            stats.by_op[r.op] = stats.by_op.get(r.op, 0) + 1
        else:
            stats.failed += 1
            stats.errors[r.code or "?"] = stats.errors.get(r.code or "?", 0) + 1
    stats.held = ledger.held_count(con, entity.name, target)
