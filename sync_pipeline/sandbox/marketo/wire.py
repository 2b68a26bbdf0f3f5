"""Marketo response envelopes and request-parameter helpers shared by the route modules."""

from __future__ import annotations

import base64
import itertools
import secrets
from typing import Any

from sync_pipeline.sandbox.http import Request, Response

MAX_BATCH = 300
_counter = itertools.count(0x1000)

ERROR_MESSAGES = {
    "601": "Access token invalid",
    "602": "Access token expired",
    "603": "Access denied",
    "604": "Request time-out",
    "605": "HTTP Method not supported",
    "606": "Max rate limit '100' exceeded with in '20' secs",
    "607": "Daily quota reached",
    "608": "API Temporarily Unavailable",
    "609": "Invalid JSON",
    "610": "Requested resource not found",
    "611": "System error",
    "612": "Invalid Content Type",
    "613": "Invalid Multipart Request",
    "614": "Invalid Subscription",
    "615": "Concurrent access limit reached",
    "702": "No data found for given search scenario",
    "713": "Transient Error",
}


class ApiError(Exception):
    """A response-level error (HTTP 200, ``success: false``)."""

    def __init__(self, code: str, message: str | None = None):
        super().__init__(message or ERROR_MESSAGES.get(code, "Error"))
        self.code, self.message = code, message or ERROR_MESSAGES.get(code, "Error")


def request_id() -> str:
    return f"{next(_counter):x}#{secrets.token_hex(6)}"


def ok(result: list[Any] | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {"requestId": request_id(), "success": True}
    if result is not None:
        body["result"] = result
    body.update(extra)
    return Response.json(body)


def error(code: str, message: str | None = None) -> Response:
    return Response.json(
        {
            "requestId": request_id(),
            "success": False,
            "errors": [{"code": code, "message": message or ERROR_MESSAGES.get(code, "Error")}],
        }
    )


def params(req: Request) -> dict[str, str]:
    """Query parameters, plus a form body (``POST ...?_method=GET`` sends the query string there)."""
    out = {k: v[-1] for k, v in req.query.items()}
    ctype = (req.header("content-type") or "").lower()
    if req.body and "application/x-www-form-urlencoded" in ctype:
        out.update({k: v[-1] for k, v in req.form().items()})
    return out


def json_body(req: Request) -> Any:
    try:
        return req.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError("609", "Invalid JSON") from None


def csv_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def batch_size(raw: str | None, default: int = MAX_BATCH) -> int:
    if raw in (None, ""):
        return default
    try:
        size = int(raw)
    except ValueError:
        raise ApiError("1003", f"Invalid batchSize '{raw}'") from None
    if size < 1 or size > MAX_BATCH:
        raise ApiError("1003", f"batchSize must be between 1 and {MAX_BATCH}")
    return size


def input_list(body: Any, what: str = "input") -> list[Any]:
    if not isinstance(body, dict):
        raise ApiError("609", "Invalid JSON: expected an object")
    records = body.get(what)
    if not isinstance(records, list) or not records:
        raise ApiError("1003", f"'{what}' cannot be blank")
    if len(records) > MAX_BATCH:
        raise ApiError("1003", f"Batch size {len(records)} exceeds the maximum of {MAX_BATCH} records")
    return records


def partial_failer(req: Request):
    """Record-level failures for a ``partial`` fault: every other record fails with the fault's code."""
    code = getattr(req, "partial_code", None)
    if not code:
        return lambda i: None
    return lambda i: {"code": code, "message": "Injected record failure"} if i % 2 == 1 else None


def encode_offset(offset: int) -> str:
    return base64.b32encode(f"q|{offset}".encode()).decode().rstrip("=")


def decode_offset(token: str | None) -> int:
    if not token:
        return 0
    try:
        kind, _, offset = base64.b32decode(token.upper() + "=" * (-len(token) % 8)).decode().partition("|")
        if kind != "q":
            raise ValueError
        return int(offset)
    except Exception:
        raise ApiError("1003", f"Invalid nextPageToken {token[:40]!r}") from None
