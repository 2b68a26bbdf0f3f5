"""OData ``$batch`` (multipart/mixed) for the Dataverse sandbox.

Parts are ``application/http`` requests or change sets (nested ``multipart/mixed``). A change set runs
in one store transaction: the first failing request rolls back the whole set and is the set's only
response. ``Content-ID: n`` lets later requests in the same change set use ``$n`` as a URL prefix or an
``@odata.bind`` value. Without ``Prefer: odata.continue-on-error`` processing stops at the first failure
and the batch answers 400 whose multipart body holds that request's error only ("the batch fails on the
first request ... The batch error represents the error of the first failing request"); with it, 200 and
every part carries its own status, later parts still run. Requests before the failure that are outside a
change set are not rolled back. Source: "Execute batch operations using the Web API", Handling errors,
https://learn.microsoft.com/power-apps/developer/data-platform/webapi/execute-batch-operations-using-web-api#handling-errors
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from sync_pipeline.sandbox.dynamics.store import DataverseFault, DynamicsStore
from sync_pipeline.sandbox.http import Response

MAX_REQUESTS = 1000
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


@dataclass
class Part:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class ChangeSet:
    parts: list[Part] = field(default_factory=list)


# (method, url, headers, body, resolve_ref) -> Response
Dispatch = Callable[[str, str, dict[str, str], bytes, Callable[[str], str | None]], Response]


class BatchError(DataverseFault):
    def __init__(self, message: str):
        super().__init__(400, "0x80048d19", message)


def _headers_and_rest(text: str) -> tuple[dict[str, str], str]:
    head, _, rest = text.partition("\n\n")
    headers = {}
    for line in head.split("\n"):
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return headers, rest


def _split(text: str, boundary: str) -> list[str]:
    delimiter = f"--{boundary}"
    end = text.find(f"{delimiter}--")
    if end < 0:
        raise BatchError(f"The multipart body is not terminated with '{delimiter}--'.")
    chunks = text[:end].split(delimiter)[1:]
    return [c.strip("\n") for c in chunks]


def _parse_request(chunk: str, where: str) -> Part:
    mime, rest = _headers_and_rest(chunk)
    if "application/http" not in mime.get("content-type", ""):
        raise BatchError(f"{where}: Content-Type must be application/http, got {mime.get('content-type')!r}.")
    request_line, _, rest = rest.partition("\n")
    words = request_line.split()
    if len(words) < 2:
        raise BatchError(f"{where}: malformed request line {request_line!r}.")
    headers, body = _headers_and_rest(rest)
    return Part(words[0].upper(), words[1], headers, body.strip("\n").encode("utf-8"), mime.get("content-id"))


def parse_batch(content_type: str, body: bytes) -> list[Part | ChangeSet]:
    m = _BOUNDARY.search(content_type or "")
    if not content_type.lower().startswith("multipart/mixed") or m is None:
        raise BatchError("A $batch request needs 'Content-Type: multipart/mixed; boundary=...'.")
    text = body.decode("utf-8").replace("\r\n", "\n")
    items: list[Part | ChangeSet] = []
    for n, chunk in enumerate(_split(text, m.group(1)), start=1):
        mime, rest = _headers_and_rest(chunk)
        inner = _BOUNDARY.search(mime.get("content-type", ""))
        if mime.get("content-type", "").lower().startswith("multipart/mixed") and inner:
            changeset = ChangeSet(
                [
                    _parse_request(c, f"change set {n} part {i}")
                    for i, c in enumerate(_split(rest, inner.group(1)), start=1)
                ]
            )
            for part in changeset.parts:
                if part.method == "GET":
                    raise BatchError(f"change set {n}: GET requests are not allowed inside a change set.")
            items.append(changeset)
        else:
            items.append(_parse_request(chunk, f"batch part {n}"))
    total = sum(len(i.parts) if isinstance(i, ChangeSet) else 1 for i in items)
    if total > MAX_REQUESTS:
        raise BatchError(
            f"The number of requests in the batch ({total}) exceeds the limit of {MAX_REQUESTS}."
        )
    return items


def _render(resp: Response, content_id: str | None = None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    reason = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else ""
    lines += ["", f"HTTP/1.1 {resp.status} {reason}"]
    lines += [f"{k}: {v}" for k, v in resp.headers.items()]
    lines += ["", resp.body.decode("utf-8")]
    return "\r\n".join(lines)


def execute_batch(
    store: DynamicsStore, items: list[Part | ChangeSet], dispatch: Dispatch, continue_on_error: bool
) -> Response:
    boundary = f"batchresponse_{uuid.uuid4()}"
    out: list[str] = []
    failed = False
    for item in items:
        if isinstance(item, ChangeSet):
            rendered, ok = _run_changeset(store, item, dispatch)
        else:
            resp = dispatch(item.method, item.url, item.headers, item.body, lambda ref: None)
            rendered, ok = _render(resp), resp.status < 400
        if not ok and not continue_on_error:
            out, failed = [rendered], True
            break
        out.append(rendered)
        failed = failed or not ok
    body = "".join(f"--{boundary}\r\n{part}\r\n" for part in out) + f"--{boundary}--\r\n"
    status = 400 if failed and not continue_on_error else 200
    return Response(
        status,
        body.encode("utf-8"),
        {"Content-Type": f"multipart/mixed; boundary={boundary}", "OData-Version": "4.0"},
    )


class _Rollback(Exception):
    def __init__(self, response: Response, content_id: str | None):
        super().__init__("change set failed")
        self.response, self.content_id = response, content_id


def _run_changeset(store: DynamicsStore, changeset: ChangeSet, dispatch: Dispatch) -> tuple[str, bool]:
    boundary = f"changesetresponse_{uuid.uuid4()}"
    refs: dict[str, str] = {}
    parts: list[str] = []

    def resolve(ref: str) -> str | None:
        return refs.get(ref.lstrip("$"))

    try:
        with store.transaction():
            for part in changeset.parts:
                url = part.url
                if url.startswith("$"):
                    ref, _, tail = url[1:].partition("/")
                    if ref not in refs:
                        raise _Rollback(
                            _error_response(
                                f"Content-ID Reference: '${ref}' does not exist in the batch context."
                            ),
                            part.content_id,
                        )
                    url = refs[ref] + (f"/{tail}" if tail else "")
                resp = dispatch(part.method, url, part.headers, part.body, resolve)
                if resp.status >= 400:
                    raise _Rollback(resp, part.content_id)
                if part.content_id and "OData-EntityId" in resp.headers:
                    refs[part.content_id] = resp.headers["OData-EntityId"]
                parts.append(_render(resp, part.content_id))
    except _Rollback as failure:
        return _render(failure.response, failure.content_id), False
    body = "".join(f"--{boundary}\r\n{p}\r\n" for p in parts) + f"--{boundary}--"
    return f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n{body}", True


def _error_response(message: str) -> Response:
    return Response.json({"error": {"code": "0x80048d19", "message": message}}, 400)
