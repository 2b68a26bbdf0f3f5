"""The sandbox's notion of time: real UTC time plus an offset that tests can advance."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta


class Clock:
    def __init__(self) -> None:
        self._offset = timedelta()
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return datetime.now(UTC) + self._offset

    def advance(self, seconds: float) -> None:
        """Move sandbox time forward (token expiry, delta-token retention, daily quotas)."""
        with self._lock:
            self._offset += timedelta(seconds=seconds)

    def timestamp(self) -> float:
        return self.now().timestamp()


def iso(dt: datetime) -> str:
    """Dataverse/Marketo style UTC timestamp with a Z suffix and whole seconds."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
