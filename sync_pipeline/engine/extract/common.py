"""What the extract stage counts, shared by the Dynamics and Marketo readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def iso_utc(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class IngestStats:
    rows: int = 0
    changed: int = 0
    deleted: int = 0

    def add(self, other: IngestStats) -> None:
        self.rows += other.rows
        self.changed += other.changed
        self.deleted += other.deleted


@dataclass
class ExtractStats:
    entity: str
    mode: str = ""
    pages: int = 0
    rows: int = 0
    changed: int = 0
    deleted: int = 0
    merged: int = 0  # Dynamics links moved or retired by Marketo merges
    calls: dict[str, int] = field(default_factory=dict)
    relabeled: int = 0  # mirrored rows whose option label changed in the org's metadata

    def take(self, s: IngestStats) -> None:
        self.rows += s.rows
        self.changed += s.changed
        self.deleted += s.deleted

    def as_metadata(self) -> dict[str, Any]:
        out = {
            "mode": self.mode,
            "pages": self.pages,
            "rows_read": self.rows,
            "rows_changed": self.changed,
            "rows_deleted": self.deleted,
        }
        if self.merged:
            out["links_moved_by_merges"] = self.merged
        if self.relabeled:
            out["rows_relabeled"] = self.relabeled
        return out
