"""Plain request values shared by the clients and their callers (no client code behind them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Marketo's standard objects by their API names and aliases -> REST path under /rest/v1 (anything else is a
# custom object, ``customobjects/<apiName>``).
MARKETO_OBJECT_PATHS = {
    "companies": "companies",
    "company": "companies",
    "opportunities": "opportunities",
    "opportunity": "opportunities",
    "opportunities/roles": "opportunities/roles",
    "opportunityRole": "opportunities/roles",
    "roles": "opportunities/roles",
    "salespersons": "salespersons",
    "salesPerson": "salespersons",
}


def marketo_object_path(name: str) -> str:
    """The path of a Marketo object (standard or custom) relative to /rest/v1."""
    if name.startswith("customobjects/"):
        return name
    return MARKETO_OBJECT_PATHS.get(name, f"customobjects/{name}")


@dataclass
class BatchRequest:
    """One request of a Dataverse ``$batch``."""

    method: str
    url: str  # relative to the Web API base, e.g. "accounts(<id>)", or "$1" inside a change set
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_id: str | None = None
    changeset: str | None = None  # consecutive requests with the same id form one atomic change set
