"""Typed client errors, the same for both systems: callers branch on these types, never on HTTP statuses or
vendor error codes (the clients map those). Each carries ``code`` (the vendor's code, kept for people and the
failures table) and ``message``.

Dataverse statuses: 412 is a failed ``If-Match`` (the row changed since it was read), 404 a row that does not
exist, 429 a service protection limit ("Web API error codes", learn.microsoft.com/en-us/power-apps/developer/
data-platform/webapi/compose-http-requests-handle-errors). Marketo: 606/615 rate and concurrency limits, 607 the
daily quota, 1004/1013 a record that is not there (Adobe Marketo Engage developer docs, "Error Codes").
"""

from __future__ import annotations


class ClientError(Exception):
    """A request either system refused, or one that could not be completed."""

    code: str = ""
    message: str = ""


class AuthError(ClientError):
    """Credentials or permissions rejected: nothing will work until someone fixes the configuration."""


class PreconditionFailed(ClientError):
    """A conditional write found the record changed since it was read (Dataverse ``If-Match``)."""


class NotFound(ClientError):
    """The record is not there (deleted, merged away, or never existed)."""


class Throttled(ClientError):
    """A rate or concurrency limit; the same call succeeds later."""


class QuotaExceeded(ClientError):
    """The daily API quota is spent; no call succeeds until it resets."""


class Transient(ClientError):
    """Retries exhausted on a failure that is not the request's fault (5xx, dropped connections)."""


class DeltaExpired(ClientError):
    """A change-tracking link the system no longer honours: start again with a full read."""


class PermanentError(ClientError):
    """The system refused this request as it is (bad data, a missing field): retrying it unchanged fails again."""


class MalformedResponse(Transient):
    """An answer that does not match the request (e.g. a ``$batch`` with fewer parts than requests)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


# Record-level outcomes of a batch write, for callers that record per-record results.
OK = "ok"
CHANGED = "changed"  # PreconditionFailed: re-read before planning again
GONE = "gone"  # NotFound
FAILED = "failed"  # anything else


def kind_of(error: BaseException | None) -> str:
    """The record-level outcome kind of ``error`` (``None``: the write succeeded)."""
    if error is None:
        return OK
    if isinstance(error, PreconditionFailed):
        return CHANGED
    if isinstance(error, NotFound):
        return GONE
    return FAILED
