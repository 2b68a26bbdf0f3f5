"""The activity log: append-only, 1-second timestamps, opaque paging tokens that encode a position.

A paging token is base32 of ``"<activity index>|<epoch seconds>"``: it names a position in the log
(the next activity to read) and the time it was taken at, so it is stable, survives a server restart
over the same store, and cannot be confused with any other token.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from sync_pipeline.sandbox.clock import Clock, iso

NEW_LEAD = 12
CHANGE_DATA_VALUE = 13
MERGE_LEADS = 32
DELETE_LEAD = 37

ACTIVITY_TYPES: tuple[dict[str, Any], ...] = (
    {
        "id": NEW_LEAD,
        "name": "New Lead",
        "description": "New person",
        "primaryAttribute": {"name": "Source Type", "dataType": "string"},
        "attributes": [{"name": "Source", "dataType": "string"}, {"name": "Reason", "dataType": "string"}],
    },
    {
        "id": CHANGE_DATA_VALUE,
        "name": "Change Data Value",
        "description": "Changed attribute value for a person",
        "primaryAttribute": {"name": "Attribute Name", "dataType": "integer"},
        "attributes": [
            {"name": "New Value", "dataType": "string"},
            {"name": "Old Value", "dataType": "string"},
            {"name": "Reason", "dataType": "string"},
            {"name": "Source", "dataType": "string"},
        ],
    },
    {
        "id": MERGE_LEADS,
        "name": "Merge Leads",
        "description": "Merge people",
        "primaryAttribute": {"name": "Lead ID", "dataType": "integer"},
        "attributes": [
            {"name": "Merge ids", "dataType": "string"},
            {"name": "Master Updated", "dataType": "boolean"},
            {"name": "Merge Source", "dataType": "string"},
        ],
    },
    {
        "id": DELETE_LEAD,
        "name": "Delete Lead",
        "description": "Delete a person",
        "primaryAttribute": {"name": "Lead ID", "dataType": "integer"},
        "attributes": [
            {"name": "Remove from CRM", "dataType": "boolean"},
            {"name": "Source", "dataType": "string"},
        ],
    },
)

# How a change's origin shows in the activity's Source attribute.
SOURCES = {
    "API": "Web service API",
    "UI": "Person Details Page",
    "import": "List Import",
    "merge": "Lead merge",
    "web": "Web form fillout",
}


class InvalidToken(ValueError):
    pass


def encode_token(position: int, epoch: int) -> str:
    return base64.b32encode(f"{position}|{epoch}".encode()).decode().rstrip("=")


def decode_token(token: str) -> int:
    try:
        padded = token + "=" * (-len(token) % 8)
        position, _, epoch = base64.b32decode(padded.upper()).decode().partition("|")
        value = int(position)
        int(epoch)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidToken(f"Invalid nextPageToken {token[:40]!r}") from None
    if value < 0:
        raise InvalidToken(f"Invalid nextPageToken {token[:40]!r}")
    return value


class ActivityLog:
    """Not locked itself: the owning store serialises writers and readers."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.items: list[dict[str, Any]] = []
        self._dates: list[str] = []  # parallel to items, non-decreasing

    def record(
        self,
        type_id: int,
        lead_id: int,
        *,
        primary_id: int | None = None,
        primary: str | None = None,
        attributes: list[dict[str, Any]] | None = None,
        fields: list[dict[str, Any]] | None = None,
    ) -> dict:
        date = iso(self.clock.now())
        if self._dates and date < self._dates[-1]:
            date = self._dates[-1]  # keep the log ordered even if wall time steps back
        activity_id = len(self.items) + 1
        item = {
            "id": activity_id,
            "marketoGUID": str(activity_id),
            "leadId": lead_id,
            "activityDate": date,
            "activityTypeId": type_id,
            "campaignId": None,
            "primaryAttributeValueId": primary_id,
            "primaryAttributeValue": primary,
            "attributes": attributes or [],
        }
        if fields is not None:
            item["fields"] = fields
        self.items.append(item)
        self._dates.append(date)
        return item

    def load_history(self, items: list[dict[str, Any]]) -> None:
        """Append generated past activities, sorted by date; a date before the log's last one is moved up to it
        (the log is ordered by date: positions and ``sinceDatetime`` look-ups rely on it)."""
        for item in sorted(items, key=lambda i: i["activityDate"]):
            date = item["activityDate"]
            if self._dates and date < self._dates[-1]:
                date = self._dates[-1]
            activity_id = len(self.items) + 1
            full = {"id": activity_id, "marketoGUID": str(activity_id), **item, "activityDate": date}
            full.setdefault("primaryAttributeValueId", None)
            full.setdefault("primaryAttributeValue", None)
            full.setdefault("attributes", [])
            self.items.append(full)
            self._dates.append(date)

    def position_since(self, since_iso: str) -> int:
        return bisect_left(self._dates, since_iso)

    def token(self, position: int) -> str:
        return encode_token(position, int(self.clock.timestamp()))

    def scan(self, position: int, limit: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position after the item, item) for at most ``limit`` items from ``position``."""
        end = min(len(self.items), position + limit)
        for i in range(position, end):
            yield i + 1, self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def created_between(self, start: str, end: str) -> Iterator[dict[str, Any]]:
        for i in range(bisect_left(self._dates, start), len(self.items)):
            if self._dates[i] > end:
                break
            yield self.items[i]
