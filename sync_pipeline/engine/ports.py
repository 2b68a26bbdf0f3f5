"""What the engine needs from each system's client, as typed interfaces (``typing.Protocol``).

The engine never imports a client class: it is handed objects that satisfy these protocols (the real clients in
``sync_pipeline.clients``, or fakes in tests), raises and catches only ``sync_pipeline.clients.errors`` types, and
reads per-record outcomes through ``error()`` / ``kind`` instead of HTTP statuses or vendor codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from sync_pipeline.clients.errors import ClientError
from sync_pipeline.clients.types import BatchRequest, marketo_object_path

__all__ = [
    "marketo_object_path",
    "BatchRequest",
    "BatchPart",
    "DynamicsPort",
    "MarketoPort",
    "RecordOutcome",
    "ActivityPageLike",
    "ImportQueueLike",
]


class BatchPart(Protocol):
    """One response of a ``$batch``."""

    # Read-only members (properties): the clients' results are frozen dataclasses.
    @property
    def status(self) -> int: ...

    @property
    def body(self) -> Any: ...

    def error(self, what: str = "") -> ClientError | None: ...


class RecordOutcome(Protocol):
    """One record's result of a Marketo batch write."""

    @property
    def status(self) -> str: ...

    @property
    def id(self) -> Any: ...

    @property
    def reasons(self) -> Sequence[dict[str, str]]: ...

    @property
    def ok(self) -> bool: ...

    @property
    def kind(self) -> str: ...


class ActivityPageLike(Protocol):
    @property
    def results(self) -> list[dict[str, Any]]: ...

    @property
    def next_page_token(self) -> str: ...


class DynamicsPort(Protocol):
    def whoami(self) -> dict[str, Any]: ...

    def iter_pages(
        self,
        entity_set: str,
        select: list[str] | str,
        filter: str | None = None,
        *,
        annotations: bool = False,
    ) -> Iterator[list[dict[str, Any]]]: ...

    def iter_changes(
        self,
        entity_set: str,
        select: list[str] | str,
        delta_link: str | None = None,
        *,
        annotations: bool = False,
    ) -> Iterator[tuple[list[dict[str, Any]], list[str], str | None]]: ...

    def execute_batch(
        self, requests: list[BatchRequest], continue_on_error: bool = True, idempotent: bool = False
    ) -> Sequence[BatchPart]: ...


class ImportQueueLike(Protocol):
    """Bulk import files through Marketo's import queue (``MarketoClient.import_queue``): ``submit`` and ``drain``
    return finished outcomes with ``tag``, ``batch_id``, ``status`` (dict), ``failures`` / ``warnings`` (CSV
    text), ``error`` and ``completed``."""

    calls: int

    def submit(self, path: Path, tag: Any) -> list[Any]: ...

    def drain(self) -> list[Any]: ...


class MarketoPort(Protocol):
    def get_leads(
        self, filter_type: str, values: Iterable[Any], fields: Sequence[str] | None = None
    ) -> list[dict[str, Any]]: ...

    def describe_leads(self) -> list[dict[str, Any]]: ...

    def paging_token(self, since: datetime | str) -> str: ...

    def lead_changes(self, token: str, fields: Sequence[str]) -> Iterator[ActivityPageLike]: ...

    def activities(self, token: str, type_ids: Sequence[int]) -> Iterator[ActivityPageLike]: ...

    def export_to_file(
        self, kind: str, filter: dict[str, Any], path: str | Path, fields: Sequence[str] | None = None
    ) -> Any: ...

    def sync_leads(
        self, records: Sequence[dict[str, Any]], action: str = "createOrUpdate", lookup_field: str = "email"
    ) -> Sequence[RecordOutcome]: ...

    def delete_leads(self, ids: Sequence[int]) -> Sequence[RecordOutcome]: ...

    def merge_leads(self, winner: int, losers: Sequence[int]) -> None: ...

    def query_objects(
        self, name: str, filter_type: str, values: Iterable[Any], fields: Sequence[str] | None = None
    ) -> list[dict[str, Any]]: ...

    def upsert_objects(
        self,
        name: str,
        records: Sequence[dict[str, Any]],
        action: str = "createOrUpdate",
        dedupe_by: str = "dedupeFields",
    ) -> Sequence[RecordOutcome]: ...

    def delete_objects(
        self, name: str, records: Sequence[dict[str, Any]], delete_by: str = "dedupeFields"
    ) -> Sequence[RecordOutcome]: ...

    def import_queue(
        self, object_name: str | None = None, lookup_field: str = "email"
    ) -> ImportQueueLike: ...
