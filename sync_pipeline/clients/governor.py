"""The in-process rate governor of a Marketo instance, and the interface every call budget offers.

Marketo's limits are per instance (100 calls / 20 s sliding window -> 606, 10 concurrent -> 615,
a daily quota -> 607). Whoever builds the clients hands them their budget: a :class:`RateGovernor` shared
by the clients and threads of one process, or a :class:`~sync_pipeline.clients.budget.SharedBudget`
shared through a database by every process and pod calling the instance. The governor enforces a sliding-window call budget (stricter than a token bucket: a bucket's burst could still
put more calls than allowed into the server's window), a concurrency semaphore, a daily call counter,
a shared pause after a 606/615 (so every thread backs off, not just the one that was told), and a
halt after 607 until the quota resets (midnight US Central).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Protocol

try:
    from zoneinfo import ZoneInfo

    _CENTRAL: Any = ZoneInfo("America/Chicago")
except Exception:  # pragma: no cover - no tz database
    _CENTRAL = timezone(timedelta(hours=-6))


log = logging.getLogger(__name__)


class CallBudget(Protocol):
    """What a Marketo client needs from its budget (:class:`RateGovernor` or ``SharedBudget``)."""

    calls_per_window: int
    max_concurrent: int
    daily_quota: int

    def slot(self) -> AbstractContextManager[None]: ...
    def halted_until(self) -> datetime | None: ...
    def halt(self, until: datetime | None = None) -> datetime: ...
    def pause(self, seconds: float) -> None: ...
    def uncount(self) -> None: ...


def window_safety(window_seconds: float) -> float:
    """Calls reach the server a little after we admit them; count our window this much longer so skew
    cannot squeeze one call too many into the server's window."""
    return max(0.05, window_seconds * 0.03)


def next_quota_reset(now: datetime | None = None) -> datetime:
    local = (now or datetime.now(UTC)).astimezone(_CENTRAL)
    midnight = datetime(local.year, local.month, local.day, tzinfo=_CENTRAL) + timedelta(days=1)
    return midnight.astimezone(UTC)


class RateGovernor:
    """The budget of one Marketo instance within one process (every client and thread given this object)."""

    def __init__(
        self,
        calls_per_window: int = 50,
        window_seconds: float = 20.0,
        max_concurrent: int = 5,
        daily_quota: int = 50_000,
        safety_seconds: float | None = None,
    ):
        if calls_per_window < 1 or max_concurrent < 1:
            raise ValueError(
                f"calls_per_window and max_concurrent must be >= 1, got {calls_per_window}, {max_concurrent}"
            )
        if calls_per_window > 100 or max_concurrent > 10:
            # Only sensible against a sandbox with its limits off (benchmarks of our own code).
            log.warning(
                "Marketo governor above the real limits (100 calls / 20 s, 10 in flight): %d calls, %d in flight",
                calls_per_window,
                max_concurrent,
            )
        if daily_quota < 1:
            raise ValueError(f"daily_quota must be positive, got {daily_quota}")
        self.calls_per_window = calls_per_window
        self.window_seconds = window_seconds
        self.safety_seconds = safety_seconds if safety_seconds is not None else window_safety(window_seconds)
        self.max_concurrent = max_concurrent
        self.daily_quota = daily_quota
        self._lock = threading.Condition()
        self._starts: deque[float] = deque()
        self._semaphore = threading.BoundedSemaphore(max_concurrent)
        self._paused_until = 0.0
        self._halted_until: datetime | None = None
        self._day_reset = next_quota_reset()
        self.daily_calls = 0
        self.waited_seconds = 0.0

    # ------------------------------------------------------------------ quota state
    def halted_until(self) -> datetime | None:
        with self._lock:
            if self._halted_until is not None and datetime.now(UTC) >= self._halted_until:
                self._halted_until = None
            return self._halted_until

    def halt(self, until: datetime | None = None) -> datetime:
        """After a 607: every caller stops until the quota resets."""
        with self._lock:
            self._halted_until = until or next_quota_reset()
            self._lock.notify_all()
            return self._halted_until

    def pause(self, seconds: float) -> None:
        """After a 606/615: hold every caller back for a while, not just the one that was refused."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    # ------------------------------------------------------------------ admission
    @contextmanager
    def slot(self) -> Iterator[None]:
        """Admit one API call: wait for a concurrency slot and room in the call window."""
        started = time.monotonic()
        self._semaphore.acquire()
        try:
            self._admit()
            with self._lock:
                self.waited_seconds += time.monotonic() - started
            yield
        finally:
            self._semaphore.release()

    def _admit(self) -> None:
        window = self.window_seconds + self.safety_seconds
        with self._lock:
            while True:
                if self._halted_until is not None:
                    return  # the caller checks halted_until() and raises QuotaExhausted
                now = time.monotonic()
                while self._starts and self._starts[0] <= now - window:
                    self._starts.popleft()
                wait = self._paused_until - now
                if len(self._starts) >= self.calls_per_window:
                    wait = max(wait, self._starts[0] + window - now)
                if wait <= 0:
                    break
                self._lock.wait(timeout=wait)
            utc = datetime.now(UTC)
            if utc >= self._day_reset:
                self._day_reset, self.daily_calls = next_quota_reset(utc), 0
            if self.daily_calls >= self.daily_quota:
                self._halted_until = self._day_reset  # our own budget is spent: stop before Marketo says 607
                return
            self._starts.append(now)
            self.daily_calls += 1

    def uncount(self) -> None:
        """A call the server does not count (601/602): give its daily-quota unit back."""
        with self._lock:
            self.daily_calls = max(0, self.daily_calls - 1)
