"""Read-side reports over the state store: per-entity status and held records, plus releasing them.

Everything here takes an open DuckDB connection; ``status`` and ``held_records`` only read, so the
CLI opens the store read-only for them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import one_row, qi, utcnow

PUSH_STAGES = ("push_marketo", "push_dynamics")


def target_filter(system: str) -> str:
    """Failures a push asset owns: targets starting with ``dynamics`` (``dynamics``, ``dynamics:fields``) for the
    Dynamics push, every other target (``marketo``, and any record-level class such as a quarantine filed under
    another target) for the Marketo push."""
    if system == "dynamics":
        return "coalesce(target, '') LIKE 'dynamics%'"
    return "coalesce(target, '') NOT LIKE 'dynamics%'"


def reason_class_sql(column: str = "code") -> str:
    """SQL for a failure's reason class: ``quarantine`` for every quarantine code, else the code."""
    return f"CASE WHEN {column} LIKE 'quarantine%' THEN 'quarantine' ELSE coalesce({column}, 'unknown') END"


@dataclass
class FailureCounts:
    held: int  # every held record, quarantined ones included
    quarantined: int  # held records whose code starts with "quarantine"
    retrying: int  # failed, retried automatically with backoff (not held yet)
    classes: dict[str, int]  # held records per reason class


def failure_counts(
    con: duckdb.DuckDBPyConnection, entity: str | None = None, system: str | None = None
) -> FailureCounts:
    """Held / quarantined / retrying records of an entity (all entities: None), as the ``failures`` table has them."""
    where, params = ["true"], []
    if entity is not None:
        where.append("entity = ?")
        params.append(entity)
    if system is not None:
        where.append(target_filter(system))
    sql = " AND ".join(where)
    held, quarantined, retrying = one_row(
        con,
        f"""SELECT count(*) FILTER (WHERE held), count(*) FILTER (WHERE held AND code LIKE 'quarantine%'),
                        count(*) FILTER (WHERE NOT held) FROM failures WHERE {sql}""",
        params,
    )
    classes = dict(
        con.execute(
            f"SELECT {reason_class_sql()} AS c, count(*) FROM failures WHERE held AND {sql} "
            "GROUP BY c ORDER BY 2 DESC, 1",
            params,
        ).fetchall()
    )
    return FailureCounts(int(held), int(quarantined), int(retrying), {k: int(v) for k, v in classes.items()})


@dataclass
class EntityStatus:
    entity: str
    last_sync: datetime | None  # last push step recorded for the entity
    last_run: str | None
    last_write: datetime | None  # last ledger entry (a run may push nothing)
    backlog: int | None  # records with a pending change in the Dynamics mirror (None: not extracted yet)
    oldest_pending: datetime | None  # when the oldest of those was read
    retrying: int | None  # None: counted elsewhere (the Marketo person row: under lead and contact)
    held: int | None
    conflicts: int | None
    quarantined: int | None = None
    held_classes: dict[str, int] = field(default_factory=dict)

    def lag_seconds(self, now: datetime) -> float | None:
        """How long the oldest change nobody has synced yet has been waiting (0 when nothing waits)."""
        if self.backlog is None:
            return None
        if not self.backlog or self.oldest_pending is None:
            return 0.0
        return max(0.0, (now - self.oldest_pending).total_seconds())


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
    }


def _counts_by_entity(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, int]:
    return {e: int(n) for e, n in con.execute(sql).fetchall()}


def status(con: duckdb.DuckDBPyConnection, config: SyncConfig) -> list[EntityStatus]:
    tables = _tables(con)
    missing = {"run_stats", "ledger", "failures", "conflicts"} - tables
    if missing:
        raise LookupError(
            f"the state store has no {', '.join(sorted(missing))} table: no sync has run against it"
        )
    last_sync = {
        e: (t, r)
        for e, t, r in con.execute(
            f"""SELECT entity, max(recorded_at), arg_max(run_id, recorded_at) FROM run_stats
            WHERE stage IN {PUSH_STAGES} GROUP BY entity"""
        ).fetchall()
    }
    last_write = dict(con.execute("SELECT entity, max(written_at) FROM ledger GROUP BY entity").fetchall())
    retrying = _counts_by_entity(con, "SELECT entity, count(*) FROM failures WHERE NOT held GROUP BY entity")
    held = _counts_by_entity(con, "SELECT entity, count(*) FROM failures WHERE held GROUP BY entity")
    conflicts = _counts_by_entity(con, "SELECT entity, count(*) FROM conflicts GROUP BY entity")
    quarantined = _counts_by_entity(
        con, "SELECT entity, count(*) FROM failures WHERE held AND code LIKE 'quarantine%' GROUP BY entity"
    )
    classes: dict[str, dict[str, int]] = {}
    for e, c, n in con.execute(f"""SELECT entity, {reason_class_sql()} AS c, count(*) FROM failures WHERE held
                                   GROUP BY ALL ORDER BY 1, 3 DESC, 2""").fetchall():
        classes.setdefault(e, {})[c] = int(n)
    out = []
    for e in config.entities:
        backlog, oldest = _backlog(con, tables, e)
        t, run = last_sync.get(e.name, (None, None))
        out.append(
            EntityStatus(
                e.name,
                t,
                run,
                last_write.get(e.name),
                backlog,
                oldest,
                retrying.get(e.name, 0),
                held.get(e.name, 0),
                conflicts.get(e.name, 0),
                quarantined.get(e.name, 0),
                classes.get(e.name, {}),
            )
        )
    if config.persons and "m_person" in tables:
        n, oldest = one_row(con, "SELECT count(*), min(seen_at) FROM m_person WHERE pending_seq IS NOT NULL")
        # Persons are synced by the lead and contact pushes: their latest is the person row's last sync / write.
        persons = [s for s in out if s.entity in {p.name for p in config.persons}]
        synced = max(
            (s for s in persons if s.last_sync), key=lambda s: s.last_sync or datetime.min, default=None
        )
        writes = [s.last_write for s in persons if s.last_write]
        out.append(
            EntityStatus(
                "person (Marketo)",
                synced.last_sync if synced else None,
                synced.last_run if synced else None,
                max(writes) if writes else None,
                int(n),
                oldest,
                None,
                None,
                None,
            )
        )
    return out


def _backlog(
    con: duckdb.DuckDBPyConnection, tables: set[str], e: Entity
) -> tuple[int | None, datetime | None]:
    source = e.derived_from or e.name
    if f"d_{source}" not in tables:
        return None, None
    if e.is_derived:  # roles are recomputed from the opportunities on every plan; they have no own backlog
        return 0, None
    n, oldest = one_row(
        con, f"SELECT count(*), min(seen_at) FROM {qi('d_' + source)} WHERE pending_seq IS NOT NULL"
    )
    return int(n), oldest


@dataclass
class HeldRecord:
    entity: str
    dynamics_id: str
    target: str
    op: str
    marketo_id: str | None
    code: str | None
    message: str | None
    attempts: int
    last_failed_at: datetime | None
    run_id: str | None


HELD_COLUMNS = "entity, dynamics_id, target, op, marketo_id, code, message, attempts, last_failed_at, run_id"


def held_records(
    con: duckdb.DuckDBPyConnection, entity: str | None = None, record_id: str | None = None
) -> list[HeldRecord]:
    where, params = ["held"], []
    if entity:
        where.append("entity = ?")
        params.append(entity)
    if record_id:
        where.append("(lower(dynamics_id) = lower(?) OR marketo_id = ?)")
        params += [record_id, record_id]
    rows = con.execute(
        f"SELECT {HELD_COLUMNS} FROM failures WHERE {' AND '.join(where)} "
        "ORDER BY entity, last_failed_at, dynamics_id",
        params,
    ).fetchall()
    return [HeldRecord(*r) for r in rows]


def short_reason(message: str | None, limit: int = 120) -> str:
    """The first line of a reason, at most ``limit`` characters (the terminal ellipsizes it further to fit)."""
    if not message:
        return "-"
    line = " ".join(message.strip().splitlines()[0].split()) if message.strip() else "-"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def write_held_csv(records: list[HeldRecord], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow([c.strip() for c in HELD_COLUMNS.split(",")])
        for r in records:
            out.writerow(
                [
                    r.entity,
                    r.dynamics_id,
                    r.target,
                    r.op,
                    r.marketo_id or "",
                    r.code or "",
                    r.message or "",
                    r.attempts,
                    r.last_failed_at or "",
                    r.run_id or "",
                ]
            )


def retrying_count(con: duckdb.DuckDBPyConnection, entity: str | None = None) -> int:
    sql, params = "SELECT count(*) FROM failures WHERE NOT held", []
    if entity:
        sql += " AND entity = ?"
        params.append(entity)
    return int(one_row(con, sql, params)[0])


def release(con: duckdb.DuckDBPyConnection, config: SyncConfig, records: list[HeldRecord]) -> int:
    """Give held records another attempt now: unhold, due immediately, and pending so the next plan covers them.

    The attempt counter stays: a record that fails again is held again at once, not retried five more times.
    """
    if not records:
        return 0
    now = utcnow()
    con.execute("BEGIN TRANSACTION")
    try:
        for r in records:
            e = config.by_name.get(r.entity)
            # An entity removed from the configuration: unheld, but nothing will plan it.
            ledger.release(
                con,
                r.entity,
                r.dynamics_id,
                r.target,
                r.marketo_id,
                now,
                mirrored=e is not None and not e.is_derived,
                person=e is not None and e.is_person,
            )
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return len(records)
