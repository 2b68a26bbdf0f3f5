"""Run many Marketo bulk import files through the import queue without overrunning it.

Marketo processes imports from one FIFO queue per instance: at most 10 jobs queued (the 2 being processed
included); the 11th answers 1016 "Too many imports", and the queue is shared with list imports made in the UI
and by other integrations (Adobe, "Bulk Lead Import", https://experienceleague.adobe.com/en/docs/
marketo-developer/marketo/rest/bulk-import/bulk-lead-import). :class:`ImportQueue` keeps at most ``max_queued``
of our jobs active, answers 1016 by waiting for one of ours to finish (or, when none of ours is active, by
backing off), and polls only the oldest of our active jobs: FIFO means it finishes first, so waiting costs
one status call per poll interval, not one per job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sync_pipeline.clients.marketo import (
    MarketoAuthError,
    MarketoError,
    MarketoTransientError,
    QuotaExhausted,
)

FATAL = (
    QuotaExhausted,
    MarketoAuthError,
)  # raised to the caller like on REST: the step fails, nothing recorded

log = logging.getLogger(__name__)

MAX_QUEUED = 10


@dataclass
class ImportOutcome:
    """One file's import: ``status`` is Marketo's final job status (None when the file was refused), the
    failure and warning reports are CSV text (empty when the job reported no such rows)."""

    tag: Any
    batch_id: int | None = None
    status: dict[str, Any] = field(default_factory=dict)
    failures: str = ""
    warnings: str = ""
    error: MarketoError | None = None  # the upload was refused or the job failed as a whole

    @property
    def completed(self) -> bool:
        return self.error is None and self.status.get("status") == "Complete"


class ImportQueue:
    def __init__(
        self,
        client: Any,
        object_name: str | None = None,
        lookup_field: str = "email",
        max_queued: int = MAX_QUEUED,
        first_poll_seconds: float = 0.25,
        max_poll_seconds: float | None = None,
        timeout_seconds: float = 6 * 3600,
    ):
        self.client, self.object_name, self.lookup_field = client, object_name, lookup_field
        self.max_queued = max(1, min(max_queued, MAX_QUEUED))
        self.first_poll = first_poll_seconds
        self.max_poll = client.poll_seconds if max_poll_seconds is None else max_poll_seconds
        self.timeout = timeout_seconds
        self.active: list[tuple[int, Any]] = []  # (batch id, tag), oldest first
        self.calls = 0  # import API calls made (create, status, failures, warnings)

    def submit(self, path: Path, tag: Any) -> list[ImportOutcome]:
        """Queue ``path``; returns the outcomes of our jobs that finished while making room (possibly none)."""
        done: list[ImportOutcome] = []
        while len(self.active) >= self.max_queued:
            done.append(self._wait_oldest())
        delay, deadline = self.first_poll, time.monotonic() + self.timeout
        while True:
            try:
                self.calls += 1
                if self.object_name is None:
                    job = self.client.import_leads(path, lookup_field=self.lookup_field)
                else:
                    job = self.client.import_custom_objects(self.object_name, path)
            except (MarketoTransientError, *FATAL):
                raise
            except MarketoError as exc:
                if exc.code != "1016":
                    done.append(ImportOutcome(tag, error=exc))
                    return done
                if self.active:  # the queue is full: one of ours finishing makes room
                    done.append(self._wait_oldest())
                    continue
                if time.monotonic() >= deadline:  # full of other imports for hours: give up on this file
                    done.append(ImportOutcome(tag, error=exc))
                    return done
                log.info("Marketo import queue full (1016) with none of ours in it; retrying in %.1fs", delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_poll)
                continue
            self.active.append((int(job["batchId"]), tag))
            return done

    def drain(self) -> list[ImportOutcome]:
        """Wait for every job still active."""
        out = []
        while self.active:
            out.append(self._wait_oldest())
        return out

    def _wait_oldest(self) -> ImportOutcome:
        batch_id, tag = self.active.pop(0)
        before = _status_calls(self.client)
        try:
            status = self.client.wait_for_import(
                batch_id,
                poll_seconds=self.max_poll,
                timeout_seconds=self.timeout,
                object_name=self.object_name,
                first_poll_seconds=self.first_poll,
            )
        except FATAL:
            raise
        except MarketoError as exc:
            if isinstance(exc, MarketoTransientError) and exc.code != "timeout":
                raise
            return ImportOutcome(tag, batch_id, error=exc)  # 1003 (unknown batch) or our timeout
        finally:
            self.calls += _status_calls(self.client) - before
        out = ImportOutcome(tag, batch_id, status)
        if status.get("status") == "Failed":
            out.error = MarketoError(
                "import_failed", f"import batch {batch_id} failed: {status.get('message', '')}", "bulk.import"
            )
            return out
        if int(status.get("numOfRowsFailed") or 0):
            self.calls += 1
            out.failures = self.client.import_failures(batch_id, self.object_name)
        if int(status.get("numOfRowsWithWarning") or 0):
            self.calls += 1
            out.warnings = self.client.import_warnings(batch_id, self.object_name)
        return out


def _status_calls(client: Any) -> int:
    calls = getattr(client, "calls", None) or {}
    return int(calls.get("bulk.import.status", 0)) + int(calls.get("bulk.customobjects.import.status", 0))
