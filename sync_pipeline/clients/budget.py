"""One Marketo instance's call budget, shared by every process and pod through a database.

Marketo counts its limits per instance (100 calls / 20 s, 10 in flight, a daily quota), whoever calls.
Two connections syncing into the same instance, each run in its own process or pod, must therefore share
one budget. It lives in the Dagster instance's database (PostgreSQL in production, a SQLite file next to
the instance's storage locally): no extra server to run.

Each call is admitted in one short transaction that holds a per-instance lock (PostgreSQL:
``pg_advisory_xact_lock``; SQLite: ``BEGIN IMMEDIATE``), counts the calls started in the last window,
counts the unexpired concurrency leases, and if both have room records the call and takes a lease. At
Marketo's pace (at most 5 calls a second) one round trip per call costs nothing, so calls are not
admitted in blocks. Leases expire, so a process that dies mid-call gives its slot back after
``lease_seconds``. Times come from the database server on PostgreSQL (one clock for every pod).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sync_pipeline.clients.governor import next_quota_reset, window_safety

log = logging.getLogger(__name__)

_META = sa.MetaData()
CALLS = sa.Table(
    "sync_marketo_budget_calls",
    _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("instance", sa.String(255), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),  # epoch seconds
    sa.Index("ix_sync_marketo_budget_calls", "instance", "started_at"),
)
LEASES = sa.Table(
    "sync_marketo_budget_leases",
    _META,
    sa.Column("lease_id", sa.String(36), primary_key=True),
    sa.Column("instance", sa.String(255), nullable=False, index=True),
    sa.Column("expires_at", sa.Float, nullable=False),
)
STATE = sa.Table(
    "sync_marketo_budget_state",
    _META,
    sa.Column("instance", sa.String(255), primary_key=True),
    sa.Column(
        "quota_day", sa.String(32), nullable=False
    ),  # the quota's next reset (midnight US Central), ISO
    sa.Column("daily_calls", sa.Integer, nullable=False, default=0),
    sa.Column("paused_until", sa.Float, nullable=False, default=0.0),
    sa.Column("halted_until", sa.Float, nullable=False, default=0.0),
)


def wait_for_room(starts: list[float], now: float, span: float, limit: int) -> float:
    """Seconds until one more call fits in a window of ``span`` holding at most ``limit`` calls (0: now)."""
    inside = sorted(s for s in starts if now - span < s <= now)
    if len(inside) < limit:
        return 0.0
    # The call that must leave the window before ours may enter: the (len - limit + 1)-th oldest.
    return inside[len(inside) - limit] + span - now


def sqlite_url(directory: str | Path) -> str:
    return f"sqlite:///{Path(directory) / 'marketo_budget.db'}"


def _lock_key(instance: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock`` (Python's hash() differs per process)."""
    return int.from_bytes(
        hashlib.blake2b(f"marketo-budget:{instance}".encode(), digest_size=8).digest(), "big", signed=True
    )


def make_engine(url: str) -> sa.Engine:
    """An engine whose transactions take the instance lock the dialect needs (SQLite: BEGIN IMMEDIATE)."""
    if not url.startswith("sqlite"):
        parsed = sa.make_url(url)
        if parsed.drivername in (
            "postgresql",
            "postgres",
        ):  # SQLAlchemy 2.1 would pick psycopg 3; dagster-postgres
            parsed = parsed.set(drivername="postgresql+psycopg2")  # installs psycopg2
        return sa.create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=10)
    database = sa.make_url(url).database
    if database and database != ":memory:":  # an ephemeral instance creates its storage directory lazily
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    # Pooled connections: closing the last one checkpoints the WAL, which costs more than the admission.
    engine = sa.create_engine(
        url,
        connect_args={"timeout": 30, "check_same_thread": False},
        poolclass=sa.pool.QueuePool,
        pool_size=2,
        max_overflow=10,
    )

    # pysqlite's own transaction handling would issue a deferred BEGIN; take the write lock up front instead
    # (https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#serializable-isolation-savepoints-transactional-ddl).
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")  # a budget need not survive a power cut

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class SharedBudget:
    """The cross-process budget of one Marketo instance; a drop-in for :class:`RateGovernor`.

    ``instance`` names the Marketo instance (its Munchkin id or base URL): every budget built with the same
    name over the same database shares one window, one set of leases and one daily counter.
    """

    def __init__(
        self,
        url_or_engine: str | sa.Engine,
        instance: str,
        *,
        calls_per_window: int = 50,
        window_seconds: float = 20.0,
        max_concurrent: int = 5,
        daily_quota: int = 50_000,
        safety_seconds: float | None = None,
        lease_seconds: float = 300.0,
        poll_seconds: float = 0.05,
    ):
        if calls_per_window < 1 or max_concurrent < 1 or daily_quota < 1:
            raise ValueError(
                "calls_per_window, max_concurrent and daily_quota must be >= 1, got "
                f"{calls_per_window}, {max_concurrent}, {daily_quota}"
            )
        self.engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        self.instance = instance.rstrip("/").lower()
        self.calls_per_window, self.window_seconds = calls_per_window, window_seconds
        self.safety_seconds = window_safety(window_seconds) if safety_seconds is None else safety_seconds
        self.max_concurrent, self.daily_quota = max_concurrent, daily_quota
        self.lease_seconds, self.poll_seconds = lease_seconds, poll_seconds
        self._postgres = self.engine.dialect.name == "postgresql"
        self._local = threading.BoundedSemaphore(max_concurrent)  # no point in more of our threads polling
        self._halted_until: datetime | None = None
        self.waited_seconds = 0.0
        self._ensure_tables()

    def __repr__(self) -> str:
        return (
            f"SharedBudget({self.engine.dialect.name}, instance={self.instance!r}, "
            f"{self.calls_per_window}/{self.window_seconds:g}s, {self.max_concurrent} in flight)"
        )

    def _ensure_tables(self) -> None:
        for attempt in range(5):
            try:
                _META.create_all(self.engine, checkfirst=True)
                return
            except sa.exc.DBAPIError:  # another process created them at the same moment
                if attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))

    # ------------------------------------------------------------------ one locked transaction
    @contextmanager
    def _locked(self) -> Iterator[tuple[sa.Connection, float]]:
        with self.engine.begin() as conn:
            if self._postgres:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(self.instance)})
                now = float(
                    conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one()
                )
            else:
                now = time.time()
            yield conn, now

    def _state(self, conn: sa.Connection, now: float) -> dict[str, Any]:
        row = conn.execute(sa.select(STATE).where(STATE.c.instance == self.instance)).mappings().first()
        day = next_quota_reset(datetime.fromtimestamp(now, UTC)).isoformat()
        if row is None:
            state = {
                "instance": self.instance,
                "quota_day": day,
                "daily_calls": 0,
                "paused_until": 0.0,
                "halted_until": 0.0,
            }
            conn.execute(sa.insert(STATE).values(**state))
            return state
        state = dict(row)
        if state["quota_day"] != day:  # a new Marketo day: the quota and any halt are over
            state.update(quota_day=day, daily_calls=0, halted_until=0.0)
            self._save(conn, state)
        return state

    def _save(self, conn: sa.Connection, state: dict[str, Any]) -> None:
        conn.execute(
            sa.update(STATE)
            .where(STATE.c.instance == self.instance)
            .values(**{k: v for k, v in state.items() if k != "instance"})
        )

    def _try_admit(self) -> tuple[str | None, float]:
        """(lease id, 0) when admitted; (None, seconds to wait) when not; ("", 0) when halted."""
        span = self.window_seconds + self.safety_seconds
        with self._locked() as (conn, now):
            state = self._state(conn, now)
            if state["halted_until"] > now:
                self._halted_until = datetime.fromtimestamp(state["halted_until"], UTC)
                return "", 0.0
            if state["daily_calls"] >= self.daily_quota:  # our share is spent: stop before Marketo says 607
                state["halted_until"] = datetime.fromisoformat(state["quota_day"]).timestamp()
                self._save(conn, state)
                self._halted_until = datetime.fromtimestamp(state["halted_until"], UTC)
                return "", 0.0
            if state["paused_until"] > now:
                return None, state["paused_until"] - now
            mine = CALLS.c.instance == self.instance
            conn.execute(sa.delete(CALLS).where(mine, CALLS.c.started_at <= now - span))
            in_window = conn.execute(sa.select(sa.func.count()).select_from(CALLS).where(mine)).scalar_one()
            if in_window >= self.calls_per_window:
                starts = [float(s) for s in conn.execute(sa.select(CALLS.c.started_at).where(mine)).scalars()]
                return None, max(wait_for_room(starts, now, span, self.calls_per_window), 0.001)
            conn.execute(
                sa.delete(LEASES).where(LEASES.c.instance == self.instance, LEASES.c.expires_at <= now)
            )
            in_flight = conn.execute(
                sa.select(sa.func.count()).select_from(LEASES).where(LEASES.c.instance == self.instance)
            ).scalar_one()
            if in_flight >= self.max_concurrent:
                return None, self.poll_seconds * (0.5 + random.random())
            lease = str(uuid.uuid4())
            conn.execute(sa.insert(CALLS).values(instance=self.instance, started_at=now))
            conn.execute(
                sa.insert(LEASES).values(
                    lease_id=lease, instance=self.instance, expires_at=now + self.lease_seconds
                )
            )
            state["daily_calls"] += 1
            self._save(conn, state)
            self._halted_until = None
            return lease, 0.0

    # ------------------------------------------------------------------ the RateGovernor interface
    @contextmanager
    def slot(self) -> Iterator[None]:
        """Admit one API call: wait for room in the instance's window and a concurrency lease."""
        started = time.monotonic()
        with self._local:
            while True:
                lease, wait = self._try_admit()
                if lease is not None:
                    break
                time.sleep(min(wait, 5.0))  # re-check at least every 5 s: a pause may be lifted by a new day
            self.waited_seconds += time.monotonic() - started
            try:
                yield  # when halted (lease ""), the caller checks halted_until() and raises QuotaExhausted
            finally:
                if lease:
                    with self.engine.begin() as conn:
                        conn.execute(sa.delete(LEASES).where(LEASES.c.lease_id == lease))

    def halted_until(self) -> datetime | None:
        """The quota halt last seen by this process (refreshed by every admission, so at most one call late)."""
        if self._halted_until is not None and datetime.now(UTC) >= self._halted_until:
            self._halted_until = None
        return self._halted_until

    def halt(self, until: datetime | None = None) -> datetime:
        """After a 607: every caller of the instance, in every process, stops until the quota resets."""
        until = until or next_quota_reset()
        with self._locked() as (conn, now):
            state = self._state(conn, now)
            state["halted_until"] = max(state["halted_until"], until.timestamp())
            self._save(conn, state)
        self._halted_until = until
        return until

    def pause(self, seconds: float) -> None:
        """After a 606/615: hold back every caller of the instance, not just the one that was refused."""
        with self._locked() as (conn, now):
            state = self._state(conn, now)
            state["paused_until"] = max(state["paused_until"], now + seconds)
            self._save(conn, state)

    def uncount(self) -> None:
        """A call the server does not count (601/602): give its daily-quota unit back."""
        with self._locked() as (conn, now):
            state = self._state(conn, now)
            state["daily_calls"] = max(0, state["daily_calls"] - 1)
            self._save(conn, state)

    @property
    def daily_calls(self) -> int:
        with self._locked() as (conn, now):
            return int(self._state(conn, now)["daily_calls"])

    def close(self) -> None:
        self.engine.dispose()
