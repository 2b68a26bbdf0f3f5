"""The instance-wide API limits: 606 rate window, 615 concurrency, 607 daily quota, artificial latency.

As Adobe documents them ("Marketo REST API", Limits, and "Error Codes",
https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/rest-api and
https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/error-codes): 100 calls per 20 s
sliding window (606), 10 concurrent calls (615), 50,000 calls a day reset at midnight US Central (607), shared
by every REST call of the instance, bulk endpoints included. Calls answered 606/615 still count in the window
and the day (only 601/602/604/605/608/611 are documented as not counted).

All OFF unless configured (``limits.realistic.marketo`` in sandbox.yaml has the real figures). Like
the real API, a rejected call answers HTTP 200 with the error in the body. Calls rejected for an
invalid/expired token never get here, so they are not counted (601/602 are free in the docs).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sync_pipeline.sandbox.clock import Clock

try:  # the daily quota resets at midnight US Central
    from zoneinfo import ZoneInfo

    CENTRAL: Any = ZoneInfo("America/Chicago")
except Exception:  # pragma: no cover - no tz database on this host
    CENTRAL = timezone(timedelta(hours=-6))


def next_central_midnight(now: datetime) -> datetime:
    local = now.astimezone(CENTRAL)
    midnight = datetime(local.year, local.month, local.day, tzinfo=CENTRAL) + timedelta(days=1)
    return midnight.astimezone(UTC)


@dataclass
class MarketoLimits:
    calls_per_window: int | None = None
    window_seconds: float = 20.0
    concurrent: int | None = None
    daily_quota: int | None = None
    bulk_export_daily_mb: float | None = None
    bulk_concurrent_jobs: int | None = None
    bulk_queued_jobs: int | None = None
    bulk_import_concurrent: int | None = None
    bulk_import_queued: int | None = None
    latency_seconds: float = 0.0
    bulk_processing_seconds: float = 0.0  # sandbox time a bulk job spends Processing/Importing

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> MarketoLimits:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"Marketo sandbox limits: unknown setting(s) {unknown}; known: {sorted(known)}")
        if "bulk_concurrent_jobs" in raw:  # the real import queue has the same 2 running / 10 queued shape
            raw.setdefault("bulk_import_concurrent", raw["bulk_concurrent_jobs"])
        if "bulk_queued_jobs" in raw:
            raw.setdefault("bulk_import_queued", raw["bulk_queued_jobs"])
        return cls(**raw)


class LimitGate:
    def __init__(self, clock: Clock, limits: MarketoLimits):
        self.clock = clock
        self.limits = limits
        self._lock = threading.Lock()
        self._window: deque[float] = deque()
        self._in_flight = 0
        self._day_end = next_central_midnight(clock.now())
        self.daily_calls = 0
        self.rejected: Counter[str] = Counter()  # refusals by code (606, 607, 615)

    def enter(self) -> tuple[str, str] | None:
        """None when the call may proceed (the caller must then call :meth:`leave`), else (code, message)."""
        lim = self.limits
        with self._lock:
            now_dt = self.clock.now()
            if now_dt >= self._day_end:
                self._day_end, self.daily_calls = next_central_midnight(now_dt), 0
            if lim.daily_quota is not None and self.daily_calls >= lim.daily_quota:
                self.rejected["607"] += 1
                return "607", "Daily quota reached"
            self.daily_calls += 1
            if lim.calls_per_window is not None:
                now = now_dt.timestamp()
                while self._window and self._window[0] <= now - lim.window_seconds:
                    self._window.popleft()
                self._window.append(now)
                if len(self._window) > lim.calls_per_window:
                    self.rejected["606"] += 1
                    return "606", (
                        f"Max rate limit '{lim.calls_per_window}' exceeded with in "
                        f"'{lim.window_seconds:g}' secs"
                    )
            if lim.concurrent is not None and self._in_flight >= lim.concurrent:
                self.rejected["615"] += 1
                return "615", "Concurrent access limit reached"
            self._in_flight += 1
        if lim.latency_seconds > 0:
            time.sleep(lim.latency_seconds)
        return None

    @property
    def active(self) -> bool:
        lim = self.limits
        return any(v is not None for v in (lim.calls_per_window, lim.daily_quota, lim.concurrent))

    def leave(self) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)

    @property
    def in_flight(self) -> int:
        return self._in_flight
