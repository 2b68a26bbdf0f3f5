"""Typed client for the Dataverse (Dynamics 365) Web API v9.2.

Authentication is OAuth2 client credentials through MSAL; MSAL's HTTP goes through the same
``httpx.Client`` (keep-alive, ``verify`` = True or a CA bundle path, timeouts), so the CA setting applies
to the identity endpoint too and environment CA overrides cannot silently replace it. The token is
re-acquired shortly before expiry and once on a 401.

Retries: 429 waits ``Retry-After``; 5xx, transport errors and HTML / malformed / truncated JSON bodies
get bounded exponential backoff on idempotent calls (GET, PATCH with a key, DELETE, creates that carry a
client-generated primary key, UpsertMultiple). Errors are :class:`DynamicsError` subclasses that name
the request (entity set and record id) and never contain the client secret or the access token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx
import msal

from sync_pipeline.clients import errors
from sync_pipeline.clients.types import BatchRequest

log = logging.getLogger(__name__)
DELTA_EXPIRED_CODES = frozenset({"0x80044352"})
DUPLICATE_KEY = "0x80040237"


class DynamicsError(errors.ClientError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}" if status else f"{code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.retried = False  # set when the request had been sent more than once


class AuthenticationError(DynamicsError, errors.AuthError):
    pass


class PreconditionFailed(DynamicsError, errors.PreconditionFailed):
    pass


class RecordNotFound(DynamicsError, errors.NotFound):
    pass


class Throttled(DynamicsError, errors.Throttled):
    pass


class DeltaTokenExpired(DynamicsError, errors.DeltaExpired):
    """The change-tracking token is unknown or older than the org keeps changes: do a full read."""


class TransientError(DynamicsError, errors.Transient):
    """Retries exhausted on 5xx, dropped connections or unreadable bodies."""


def odata_literal(value: Any) -> str:
    """A Python value as an OData literal: strings quoted with doubled apostrophes, GUIDs/dates bare."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat().replace("+00:00", "Z")
    return "'" + str(value).replace("'", "''") + "'"


def filter_eq(field_name: str, value: Any) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w]*", field_name):
        raise ValueError(f"not a valid attribute name for a filter: {field_name!r}")
    return f"{field_name} eq {odata_literal(value)}"


@dataclass
class ChangeBatch:
    rows: list[dict[str, Any]]
    deleted_ids: list[str]
    delta_link: str


class RequestRefused(DynamicsError, errors.PermanentError):
    """A 4xx other than the ones above: the request as it is will not succeed."""


@dataclass
class BatchResponse:
    status: int
    headers: dict[str, str]
    body: Any
    content_id: str | None = None

    def error(self, what: str = "") -> DynamicsError | None:
        """This part's typed error (``None`` for a 2xx). ``code`` is the status for 404/412 (the row changed
        or vanished), else Dataverse's error code; ``message`` its message, prefixed by ``what``."""
        if 200 <= self.status < 300:
            return None
        err = self.body.get("error", {}) if isinstance(self.body, dict) else {}
        message = (
            f"{what}: {err.get('message') or self.status}" if what else str(err.get("message") or self.status)
        )
        code = str(self.status) if self.status in (404, 412) else str(err.get("code") or self.status)
        return _error_class(self.status, code)(self.status, code, message)


def _error_class(status: int, code: str) -> type[DynamicsError]:
    if code in DELTA_EXPIRED_CODES:
        return DeltaTokenExpired
    return {
        401: AuthenticationError,
        403: AuthenticationError,
        404: RecordNotFound,
        412: PreconditionFailed,
        429: Throttled,
    }.get(status, TransientError if status >= 500 else RequestRefused if status >= 400 else DynamicsError)


class _MsalHttp:
    """MSAL's http_client protocol on top of our httpx client (same TLS settings, keep-alive)."""

    def __init__(self, client: httpx.Client):
        self._client = client

    def get(self, url: str, params: Any = None, headers: Any = None, **_: Any) -> httpx.Response:
        return self._client.get(url, params=params, headers=headers)

    def post(
        self, url: str, params: Any = None, data: Any = None, headers: Any = None, **_: Any
    ) -> httpx.Response:
        if isinstance(data, (str, bytes)):
            return self._client.post(url, params=params, content=data, headers=headers)
        return self._client.post(url, params=params, data=data, headers=headers)

    def close(self) -> None:  # the owning DynamicsClient closes the httpx client
        return None


# MSAL's token cache and HTTP cache (the authority's OpenID discovery document) per authority, client id, secret
# and TLS trust, shared by the clients of this process: successive runs and the sensor reuse a token until MSAL renews
# it, instead of a discovery and a token request per run. Memory only, never persisted.
_MSAL_CACHES: dict[tuple[str, str, str, str], tuple[msal.TokenCache, dict[Any, Any]]] = {}
_MSAL_CACHES_LOCK = threading.Lock()


def _msal_caches(
    authority: str, client_id: str, secret: str, verify: bool | str
) -> tuple[msal.TokenCache, dict[Any, Any]]:
    key = (authority, client_id, hashlib.sha256(secret.encode()).hexdigest(), str(verify))
    with _MSAL_CACHES_LOCK:
        return _MSAL_CACHES.setdefault(key, (msal.TokenCache(), {}))


class DynamicsClient:
    def __init__(
        self,
        url: str,
        authority: str,
        client_id: str,
        client_secret: str,
        *,
        verify: bool | str = True,
        timeout_seconds: float = 60.0,
        max_retries: int = 5,
        page_size: int = 5000,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"Dynamics url must start with https:// (got {url!r})")
        self.url = url.rstrip("/")
        self.base = f"{self.url}/api/data/v9.2/"
        self.authority, self.client_id = authority.rstrip("/"), client_id
        self._secret = client_secret
        self.max_retries, self.page_size = max_retries, max(1, min(page_size, 5000))
        self.backoff_base, self.backoff_max, self.max_retry_after = backoff_base, backoff_max, max_retry_after
        self._sleep = sleep
        self.calls: Counter[str] = Counter()
        self._verify = verify
        self._http = httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(timeout_seconds, connect=min(10.0, timeout_seconds)),
            headers={"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"},
        )
        self._msal: msal.ConfidentialClientApplication | None = None
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._pk_cache: dict[str, tuple[str, str]] = {}  # entity set -> (logical name, primary key)

    def __repr__(self) -> str:
        return f"DynamicsClient(url={self.url!r}, client_id={self.client_id!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DynamicsClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- auth
    def _access_token(self) -> str:
        if self._token is not None and time.monotonic() < self._token_renew_at:
            return self._token
        self.calls["token"] += 1
        try:
            if self._msal is None:
                token_cache, http_cache = _msal_caches(
                    self.authority, self.client_id, self._secret, self._verify
                )
                self._msal = msal.ConfidentialClientApplication(
                    self.client_id,
                    token_cache=token_cache,
                    http_cache=http_cache,
                    authority=self.authority,
                    client_credential=self._secret,
                    http_client=_MsalHttp(self._http),
                    instance_discovery=False,
                )
            result = self._msal.acquire_token_for_client(scopes=[f"{self.url}/.default"])
        except (httpx.HTTPError, ValueError) as exc:
            raise AuthenticationError(
                0,
                "token_request_failed",
                f"token request to {self.authority} failed: {type(exc).__name__}: {exc}",
            ) from None
        if "access_token" not in result:
            raise AuthenticationError(
                401,
                str(result.get("error", "no_token")),
                f"token request to {self.authority} for client {self.client_id} was refused: "
                f"{result.get('error_description', result.get('error'))}",
            )
        lifetime = float(result.get("expires_in", 3599))
        self._token = result["access_token"]
        self._token_renew_at = time.monotonic() + max(lifetime - 300, lifetime / 2)
        return self._token

    def _forget_token(self) -> None:
        self._token = None
        if self._msal is not None:  # MSAL would otherwise hand back the same cached token
            cache = self._msal.token_cache
            for item in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
                cache.remove_at(item)

    # ------------------------------------------------------------------------------------- transport
    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff_base * 2**attempt) * (0.5 + random.random() / 2)

    def _retry_after(self, resp: httpx.Response, attempt: int) -> float:
        raw = resp.headers.get("Retry-After")
        if raw:
            try:
                return min(self.max_retry_after, max(0.0, float(raw)))
            except ValueError:
                try:
                    return min(
                        self.max_retry_after, max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
                    )
                except (TypeError, ValueError):
                    pass
        return self._backoff(attempt)

    def _send(
        self,
        kind: str,
        method: str,
        url: str,
        what: str,
        *,
        params: dict[str, str] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        idempotent: bool = True,
        parse: bool = True,
        ok_statuses: tuple[int, ...] = (),
    ) -> tuple[httpx.Response, Any]:
        """One logical call with auth, retries and error mapping; returns (response, parsed JSON or None)."""
        full = url if url.startswith("http") else self.base + url
        attempt, reauthed = 0, False
        while True:
            self.calls[kind] += 1
            hdrs = {"Authorization": f"Bearer {self._access_token()}", **(headers or {})}
            try:
                resp = self._http.request(
                    method, full, params=params, json=json_body, content=content, headers=hdrs
                )
            except httpx.TransportError as exc:
                retry_ok = idempotent or isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                if retry_ok and attempt < self.max_retries:
                    self.calls["retry.transport"] += 1
                    log.debug("%s: %s, retrying", what, type(exc).__name__)
                    self._sleep(self._backoff(attempt))
                    attempt += 1
                    continue
                raise TransientError(0, type(exc).__name__, f"{what}: {exc or 'connection failed'}") from None
            status = resp.status_code
            log.debug("%s -> %s", what, status)
            if status == 401 and not reauthed:
                self.calls["reauth"] += 1
                reauthed = True
                self._forget_token()
                continue
            if status == 429 and attempt < self.max_retries:
                self.calls["retry.429"] += 1
                self._sleep(self._retry_after(resp, attempt))
                attempt += 1
                continue
            if status >= 500 and idempotent and attempt < self.max_retries:
                self.calls["retry.5xx"] += 1
                self._sleep(self._backoff(attempt))
                attempt += 1
                continue
            if status >= 400 and status not in ok_statuses:
                error = self._error(resp, what)
                error.retried = attempt > 0
                raise error
            if not parse or status == 204 or status == 304:
                return resp, None
            try:
                return resp, resp.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                if idempotent and attempt < self.max_retries:
                    self.calls["retry.invalid_body"] += 1
                    self._sleep(self._backoff(attempt))
                    attempt += 1
                    continue
                raise TransientError(
                    status,
                    "invalid_body",
                    f"{what}: the response body is not valid JSON ({resp.text[:120]!r})",
                ) from None

    @staticmethod
    def _error(resp: httpx.Response, what: str) -> DynamicsError:
        status = resp.status_code
        try:
            err = resp.json().get("error", {})
            code, message = str(err.get("code", status)), str(err.get("message", ""))
        except (ValueError, AttributeError):
            code, message = str(status), re.sub(r"\s+", " ", resp.text[:200])
        return _error_class(status, code)(status, code, f"{what}: {message}")

    # ----------------------------------------------------------------------------------------- reads
    def whoami(self) -> dict[str, Any]:
        return self._send("whoami", "GET", "WhoAmI", "GET WhoAmI")[1]

    def current_organization(self) -> dict[str, Any]:
        """``RetrieveCurrentOrganization``: the org's ``OrganizationDetail`` (FriendlyName, UniqueName, version)."""
        body = self._send(
            "organization",
            "GET",
            "RetrieveCurrentOrganization(AccessType=@p1)",
            "GET RetrieveCurrentOrganization",
            params={"@p1": "Microsoft.Dynamics.CRM.EndpointAccessType'Default'"},
        )[1]
        return body.get("Detail") or {}

    def entity_definitions(
        self,
        select: str = "LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute,"
        "ChangeTrackingEnabled,IsCustomEntity",
        filter: str | None = None,
    ) -> list[dict[str, Any]]:
        params = {"$select": select, **({"$filter": filter} if filter else {})}
        return self._send("metadata", "GET", "EntityDefinitions", "GET EntityDefinitions", params=params)[1][
            "value"
        ]

    def attributes(self, logical_name: str, select: str | None = None) -> list[dict[str, Any]]:
        path = f"EntityDefinitions(LogicalName='{quote(logical_name)}')/Attributes"
        params = {"$select": select} if select else None
        return self._send("metadata", "GET", path, f"GET attributes of {logical_name}", params=params)[1][
            "value"
        ]

    def _table_of(self, entity_set: str) -> tuple[str, str]:
        if entity_set not in self._pk_cache:
            for d in self.entity_definitions():
                self._pk_cache[d["EntitySetName"]] = (d["LogicalName"], d["PrimaryIdAttribute"])
        if entity_set not in self._pk_cache:
            raise DynamicsError(
                404, "unknown_entity_set", f"entity set '{entity_set}' is not in EntityDefinitions"
            )
        return self._pk_cache[entity_set]

    def _prefer(
        self, page_size: int | None, track: bool = False, annotations: bool = False
    ) -> dict[str, str]:
        parts = [f"odata.maxpagesize={page_size or self.page_size}"]
        if track:
            parts.append("odata.track-changes")
        if annotations:
            # Only the Microsoft.Dynamics.CRM annotations (lookuplogicalname: the target table of a polymorphic
            # lookup); "*" would add a FormattedValue per lookup, option and boolean of every row, which nothing
            # reads and which doubled a page's size in memory. OData's Prefer takes a namespace wildcard:
            # https://learn.microsoft.com/en-us/odata/webapi/include-annotations
            parts.append('odata.include-annotations="Microsoft.Dynamics.CRM.*"')
        return {"Prefer": ",".join(parts)}

    def iter_pages(
        self,
        entity_set: str,
        select: list[str] | str,
        filter: str | None = None,
        orderby: str | None = None,
        page_size: int | None = None,
        annotations: bool = False,
    ) -> Iterator[list[dict[str, Any]]]:
        """Stream a query page by page, following ``@odata.nextLink`` unchanged."""
        params = {"$select": select if isinstance(select, str) else ",".join(select)}
        if filter:
            params["$filter"] = filter
        if orderby:
            params["$orderby"] = orderby
        headers = self._prefer(page_size, annotations=annotations)
        url: str | None = entity_set
        first = True
        while url:
            body = self._send(
                "query", "GET", url, f"GET {entity_set}", params=params if first else None, headers=headers
            )[1]
            first = False
            yield body.get("value", [])
            url = body.get("@odata.nextLink")

    def iter_changes(
        self,
        entity_set: str,
        select: list[str] | str,
        delta_link: str | None = None,
        page_size: int | None = None,
        annotations: bool = False,
    ) -> Iterator[tuple[list[dict[str, Any]], list[str], str | None]]:
        """Pages of (new/updated rows, deleted ids, delta link on the last page else None)."""
        headers = self._prefer(page_size, track=True, annotations=annotations)
        sel = select if isinstance(select, str) else ",".join(select)
        url: str | None = delta_link or entity_set
        params = None if delta_link else {"$select": sel}
        while url:
            body = self._send(
                "delta", "GET", url, f"GET {entity_set} changes", params=params, headers=headers
            )[1]
            params = None
            rows, deleted = [], []
            for item in body.get("value", []):
                if str(item.get("@odata.context", "")).endswith("/$deletedEntity"):
                    deleted.append(item["id"])
                else:
                    rows.append(item)
            url = body.get("@odata.nextLink")
            new_link = body.get("@odata.deltaLink")
            if url is None and new_link is None:
                raise DynamicsError(
                    200,
                    "no_delta_link",
                    f"GET {entity_set} changes: the last page has no "
                    f"@odata.deltaLink; is change tracking enabled?",
                )
            yield rows, deleted, new_link

    def read_changes(
        self, entity_set: str, select: list[str] | str, delta_link: str | None = None
    ) -> ChangeBatch:
        rows, deleted, link = [], [], ""
        for page_rows, page_deleted, page_link in self.iter_changes(entity_set, select, delta_link):
            rows += page_rows
            deleted += page_deleted
            link = page_link or link
        return ChangeBatch(rows, deleted, link)

    def get(self, entity_set: str, record_id: str, select: list[str] | str | None = None) -> dict[str, Any]:
        params = {"$select": select if isinstance(select, str) else ",".join(select)} if select else None
        return self._send(
            "get", "GET", f"{entity_set}({record_id})", f"GET {entity_set}({record_id})", params=params
        )[1]

    def count(self, entity_set: str, filter: str | None = None) -> int:
        params = {"$count": "true", "$top": "1", **({"$filter": filter} if filter else {})}
        _, pk = self._table_of(entity_set)
        body = self._send(
            "count", "GET", entity_set, f"COUNT {entity_set}", params={**params, "$select": pk}
        )[1]
        if not body.get("@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"):
            return int(body["@odata.count"])
        return sum(len(page) for page in self.iter_pages(entity_set, pk, filter=filter))

    # ---------------------------------------------------------------------------------------- writes
    def create(self, entity_set: str, data: dict[str, Any], primary_key: str | None = None) -> str:
        """Create with a client-generated id so a retried POST cannot create a duplicate."""
        pk = primary_key or self._table_of(entity_set)[1]
        record_id = str(data.get(pk) or uuid.uuid4())
        what = f"POST {entity_set} ({record_id})"
        try:
            self._send("create", "POST", entity_set, what, json_body={**data, pk: record_id}, parse=False)
        except PreconditionFailed as exc:
            # A retry after a lost response finds our own row: the create did happen.
            if exc.code != DUPLICATE_KEY or not exc.retried:
                raise
        return record_id

    def update(
        self, entity_set: str, record_id: str, changes: dict[str, Any], etag: str | None = None
    ) -> None:
        self._send(
            "update",
            "PATCH",
            f"{entity_set}({record_id})",
            f"PATCH {entity_set}({record_id})",
            json_body=changes,
            headers={"If-Match": etag or "*"},
            parse=False,
        )

    def upsert(self, entity_set: str, record_id: str, data: dict[str, Any]) -> None:
        self._send(
            "upsert",
            "PATCH",
            f"{entity_set}({record_id})",
            f"UPSERT {entity_set}({record_id})",
            json_body=data,
            parse=False,
        )

    def delete(self, entity_set: str, record_id: str, etag: str | None = None) -> None:
        self._send(
            "delete",
            "DELETE",
            f"{entity_set}({record_id})",
            f"DELETE {entity_set}({record_id})",
            headers={"If-Match": etag} if etag else None,
            parse=False,
        )

    def qualify_lead(
        self,
        lead_id: str,
        create_account: bool = True,
        create_contact: bool = True,
        create_opportunity: bool = False,
        status: int = 3,
    ) -> dict[str, str]:
        body = {
            "CreateAccount": create_account,
            "CreateContact": create_contact,
            "CreateOpportunity": create_opportunity,
            "Status": status,
        }
        result = self._send(
            "qualify",
            "POST",
            f"leads({lead_id})/Microsoft.Dynamics.CRM.QualifyLead",
            f"QualifyLead leads({lead_id})",
            json_body=body,
            idempotent=False,
        )[1]
        created = {}
        for item in result.get("value", []):
            logical = str(item.get("@odata.type", "")).rsplit(".", 1)[-1]
            created[logical] = item.get(f"{logical}id")
        return created

    def upsert_multiple(self, entity_set: str, logical_name: str, rows: list[dict[str, Any]]) -> None:
        """All-or-nothing UpsertMultiple; every row must carry its primary key."""
        targets = [{**row, "@odata.type": f"Microsoft.Dynamics.CRM.{logical_name}"} for row in rows]
        self._send(
            "upsertmultiple",
            "POST",
            f"{entity_set}/Microsoft.Dynamics.CRM.UpsertMultiple",
            f"UpsertMultiple {entity_set} ({len(rows)} rows)",
            json_body={"Targets": targets},
            parse=False,
        )

    def execute_batch(
        self, requests: list[BatchRequest], continue_on_error: bool = True, idempotent: bool = False
    ) -> list[BatchResponse]:
        boundary = f"batch_{uuid.uuid4()}"
        body = _encode_batch(self.base, requests, boundary)
        headers = {"Content-Type": f"multipart/mixed; boundary={boundary}"}
        if continue_on_error:
            headers["Prefer"] = "odata.continue-on-error"
        what = f"POST $batch ({len(requests)} requests)"
        resp, _ = self._send(
            "batch",
            "POST",
            "$batch",
            what,
            content=body,
            headers=headers,
            idempotent=idempotent,
            parse=False,
            ok_statuses=(400,),
        )
        if resp.status_code == 400 and not resp.headers.get("Content-Type", "").startswith("multipart/"):
            raise self._error(resp, what)
        return _decode_batch(resp)


def _encode_batch(base: str, requests: list[BatchRequest], boundary: str) -> bytes:
    out: list[str] = []

    def part(req: BatchRequest) -> str:
        url = req.url if req.url.startswith(("$", "http")) else base + req.url
        lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
        if req.content_id:
            lines.append(f"Content-ID: {req.content_id}")
        lines += ["", f"{req.method.upper()} {url} HTTP/1.1"]
        headers = dict(req.headers)
        if req.body is not None:
            headers.setdefault("Content-Type", "application/json; type=entry")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines += ["", json.dumps(req.body) if req.body is not None else ""]
        return "\r\n".join(lines)

    i = 0
    while i < len(requests):
        req = requests[i]
        if req.changeset is None:
            out.append(f"--{boundary}\r\n{part(req)}\r\n")
            i += 1
            continue
        cs = f"changeset_{uuid.uuid4()}"
        members = []
        while i < len(requests) and requests[i].changeset == req.changeset:
            members.append(f"--{cs}\r\n{part(requests[i])}\r\n")
            i += 1
        out.append(
            f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n{''.join(members)}--{cs}--\r\n"
        )
    out.append(f"--{boundary}--\r\n")
    return "".join(out).encode("utf-8")


def _decode_batch(resp: httpx.Response) -> list[BatchResponse]:
    m = re.search(r'boundary="?([^";]+)"?', resp.headers.get("Content-Type", ""))
    if m is None:
        raise DynamicsError(
            resp.status_code, "invalid_batch_response", "POST $batch: response is not multipart"
        )
    return _parts(resp.text.replace("\r\n", "\n"), m.group(1))


def _parts(text: str, boundary: str) -> list[BatchResponse]:
    out: list[BatchResponse] = []
    end = text.find(f"--{boundary}--")
    for chunk in text[:end].split(f"--{boundary}")[1:]:
        head, _, rest = chunk.strip("\n").partition("\n\n")
        mime = {
            k.strip().lower(): v.strip()
            for k, v in (ln.split(":", 1) for ln in head.split("\n") if ":" in ln)
        }
        inner = re.search(r'boundary="?([^";]+)"?', mime.get("content-type", ""))
        if mime.get("content-type", "").startswith("multipart/mixed") and inner:
            out += _parts(rest, inner.group(1))
            continue
        status_line, _, rest = rest.partition("\n")
        head2, _, body = rest.partition("\n\n")
        headers = {
            k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in head2.split("\n") if ":" in ln)
        }
        body = body.strip()
        try:
            parsed: Any = json.loads(body) if body else None
        except json.JSONDecodeError:
            parsed = body
        out.append(BatchResponse(int(status_line.split()[1]), headers, parsed, mime.get("content-id")))
    return out
