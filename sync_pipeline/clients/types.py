"""Plain request values shared by the clients and their callers (no client code behind them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchRequest:
    """One request of a Dataverse ``$batch``."""

    method: str
    url: str  # relative to the Web API base, e.g. "accounts(<id>)", or "$1" inside a change set
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_id: str | None = None
    changeset: str | None = None  # consecutive requests with the same id form one atomic change set
