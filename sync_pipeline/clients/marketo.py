"""Typed client for the Marketo REST, bulk and identity APIs.

Every call goes through the budget the client was given (``governor``: a :class:`RateGovernor` for one
process, or a ``SharedBudget`` shared by every process calling the instance; call window, concurrency, daily
quota). Transient failures (606/615/604/608/611/713, HTTP 5xx, transport errors, HTML or malformed
bodies) are retried with exponential backoff, a bounded number of times; 601/602 re-authenticate and
retry once; 607 stops every caller with :class:`QuotaExhausted`. Writes are split into batches of 300
records under the 1 MB body limit and return one :class:`RecordResult` per input record, in input
order: a record is never silently dropped. Secrets and tokens never appear in messages or reprs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from sync_pipeline.clients import errors
from sync_pipeline.clients.governor import CallBudget, RateGovernor
from sync_pipeline.clients.types import MARKETO_OBJECT_PATHS

log = logging.getLogger(__name__)

MAX_BATCH = 300
MAX_BODY_BYTES = 1_000_000
MAX_URL_BYTES = 8_000
MAX_IMPORT_BYTES = 10 * 1024 * 1024
MAX_MERGE = 25
RETRYABLE_CODES = {"604", "606", "608", "611", "614", "615", "713", "500", "502"}
THROTTLE_CODES = {"606", "615"}
NOT_FOUND_CODES = {"1004", "1013"}


class MarketoError(errors.ClientError):
    """An error answered by Marketo (``code`` is its error code) or met talking to it."""

    def __init__(self, code: str, message: str, endpoint: str = ""):
        self.code, self.message, self.endpoint = str(code), message, endpoint
        super().__init__(
            f"Marketo {endpoint}: {code} {message}" if endpoint else f"Marketo: {code} {message}"
        )


class MarketoAuthError(MarketoError, errors.AuthError):
    """Bad client credentials, or a token rejected even after re-authenticating."""


class MarketoTransientError(MarketoError, errors.Transient):
    """Retries exhausted on a transient failure (throttling, 5xx, transport, broken bodies)."""


class QuotaExhausted(MarketoError, errors.QuotaExceeded):
    """Daily API quota reached (607); nobody may call this instance until ``resets_at``."""

    def __init__(self, endpoint: str, resets_at: datetime):
        self.resets_at = resets_at
        super().__init__("607", f"Daily quota reached; calls resume after {resets_at.isoformat()}", endpoint)


@dataclass(frozen=True)
class RecordResult:
    index: int  # position in the caller's input
    status: str  # created | updated | deleted | skipped | failed (the call itself failed for this record)
    id: Any = None  # lead/company/sales person id, or marketoGUID
    reasons: tuple[dict[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in ("created", "updated", "deleted")

    @property
    def kind(self) -> str:
        """The outcome kind (``clients.errors``): a record Marketo does not have (1004 lead not found, 1013
        object not found) is ``gone``."""
        if self.ok:
            return errors.OK
        codes = {str(r.get("code")) for r in self.reasons}
        return errors.GONE if codes & NOT_FOUND_CODES else errors.FAILED


@dataclass(frozen=True)
class ActivityPage:
    results: list[dict[str, Any]]
    next_page_token: str
    more_result: bool


@dataclass
class _Token:
    value: str = ""
    valid_until: float = 0.0  # monotonic
    final: bool = False  # identity handed back the same token: no fresh one until it expires


class _TokenSlot:
    """One access token per instance, client id, secret and TLS trust in this process: the clients of successive runs (and
    the sensor's) reuse it until it expires instead of asking identity again. Memory only, never persisted."""

    def __init__(self) -> None:
        self.token = _Token()
        self.lock = threading.Lock()


_SLOTS: dict[tuple[str, str, str, str], _TokenSlot] = {}
_SLOTS_LOCK = threading.Lock()


def _token_slot(base_url: str, client_id: str, secret: str, verify: bool | str) -> _TokenSlot:
    key = (base_url, client_id, hashlib.sha256(secret.encode()).hexdigest(), str(verify))
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(key, _TokenSlot())


@dataclass
class _Outcome:
    body: Any = None
    failure: str = ""
    code: str = ""
    raw: httpx.Response | None = field(default=None, repr=False)


class MarketoClient:
    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        verify: bool | str = True,
        timeout_seconds: float = 60.0,
        calls_per_window: int = 50,
        window_seconds: float = 20.0,
        max_concurrent: int = 5,
        daily_quota: int = 50_000,
        governor: CallBudget | None = None,
        max_retries: int = 6,
        backoff_seconds: float = 1.0,
        backoff_max_seconds: float = 30.0,
        refresh_margin_seconds: float = 60.0,
        poll_seconds: float = 60.0,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"Marketo base_url must start with http:// or https://, got {base_url!r}")
        if not client_id or not client_secret:
            raise ValueError("Marketo client_id and client_secret are required")
        self.base_url = base_url.rstrip("/")
        for suffix in ("/rest", "/identity"):
            if self.base_url.endswith(suffix):
                self.base_url = self.base_url[: -len(suffix)]
        self.client_id = client_id
        self.__secret = client_secret
        # Clients that share an instance must be handed one budget; without one, this client has its own
        # (calls_per_window ... daily_quota configure only that one).
        self.governor: CallBudget = governor or RateGovernor(
            calls_per_window=calls_per_window,
            window_seconds=window_seconds,
            max_concurrent=max_concurrent,
            daily_quota=daily_quota,
        )
        self.max_retries, self.backoff_seconds, self.backoff_max = (
            max_retries,
            backoff_seconds,
            backoff_max_seconds,
        )
        self.refresh_margin, self.poll_seconds = refresh_margin_seconds, poll_seconds
        self.calls: Counter[str] = Counter()
        self._calls_lock = threading.Lock()
        self._slot = _token_slot(self.base_url, self.client_id, client_secret, verify)
        self._http = httpx.Client(
            verify=verify,
            timeout=timeout_seconds,
            limits=httpx.Limits(max_connections=self.governor.max_concurrent + 2),
        )

    def __repr__(self) -> str:
        return f"MarketoClient(base_url={self.base_url!r}, client_id={self.client_id!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MarketoClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ auth
    def _access_token(self) -> str:
        with self._slot.lock:
            tok, now = self._slot.token, time.monotonic()
            if (
                tok.value
                and (tok.final or tok.valid_until - now > self.refresh_margin)
                and tok.valid_until > now
            ):
                return tok.value
            value, expires_in = self._fetch_token()
            final = value == tok.value and expires_in <= self.refresh_margin
            self._slot.token = _Token(value, time.monotonic() + expires_in, final)
            return value

    def _invalidate(self, rejected: str) -> None:
        with self._slot.lock:
            if self._slot.token.value == rejected:
                self._slot.token = _Token()

    def _fetch_token(self) -> tuple[str, float]:
        url = f"{self.base_url}/identity/oauth/token"
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self.__secret,
        }
        for attempt in range(self.max_retries + 1):
            self._count("identity")
            try:
                resp = self._http.post(url, data=form)  # form body: the secret never goes into a URL
            except httpx.TransportError as exc:
                _raise_if_tls_rejected(exc, "identity")
                problem = f"transport error {type(exc).__name__}"
            else:
                if resp.status_code == 401:
                    raise MarketoAuthError(
                        "401",
                        f"identity rejected client_id {self.client_id!r}: bad client credentials",
                        "identity",
                    )
                try:
                    body = resp.json()
                    return str(body["access_token"]), float(body["expires_in"])
                except (ValueError, KeyError, TypeError):
                    problem = f"HTTP {resp.status_code} without a token"
            if attempt < self.max_retries:
                log.warning("Marketo identity: %s (attempt %d), retrying", problem, attempt + 1)
                time.sleep(self._backoff(attempt))
        raise MarketoTransientError(
            "identity", f"no token after {self.max_retries + 1} attempts: {problem}", "identity"
        )

    # ------------------------------------------------------------------ the call loop
    def _count(self, endpoint: str) -> None:
        with self._calls_lock:
            self.calls[endpoint] += 1

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff_seconds * 2**attempt) * (0.5 + random.random() / 2)

    def _raise_if_halted(self, endpoint: str) -> None:
        until = self.governor.halted_until()
        if until is not None:
            raise QuotaExhausted(endpoint, until)

    def _call(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        form: dict[str, Any] | None = None,
        files: Any = None,
        raw: bool = False,
        sink: Path | None = None,
    ) -> Any:
        """JSON body of a successful call (or the raw response when ``raw``); retries as documented."""
        url = f"{self.base_url}{path}"
        reauthenticated = False
        attempt = 0
        while True:
            self._raise_if_halted(endpoint)
            token = self._access_token()
            with self.governor.slot():
                self._raise_if_halted(endpoint)
                self._count(endpoint)
                outcome = self._send(method, url, token, params, json_body, form, files, raw, sink)
            if outcome.code in ("601", "602"):
                self.governor.uncount()
                self._invalidate(token)
                if reauthenticated:
                    raise MarketoAuthError(
                        outcome.code, "access token rejected again after re-authenticating", endpoint
                    )
                reauthenticated = True
                continue
            if outcome.code == "607":
                raise QuotaExhausted(endpoint, self.governor.halt())
            if not outcome.failure:
                return outcome.raw if raw else outcome.body
            if outcome.code and outcome.code not in RETRYABLE_CODES:
                raise MarketoError(outcome.code, outcome.failure, endpoint)
            if attempt >= self.max_retries:
                raise MarketoTransientError(
                    outcome.code or "transport",
                    f"gave up after {attempt + 1} attempts: {outcome.failure}",
                    endpoint,
                )
            delay = self._backoff(attempt)
            if outcome.code in THROTTLE_CODES:
                self.governor.pause(delay)
            log.warning(
                "Marketo %s: %s (attempt %d), retrying in %.2fs",
                endpoint,
                outcome.failure,
                attempt + 1,
                delay,
            )
            time.sleep(delay)
            attempt += 1

    def _send(
        self,
        method: str,
        url: str,
        token: str,
        params: Any,
        json_body: Any,
        form: Any,
        files: Any,
        raw: bool,
        sink: Path | None,
    ) -> _Outcome:
        try:
            request = self._http.build_request(
                method,
                url,
                params=params,
                json=json_body,
                data=form,
                files=files,
                headers={"Authorization": f"Bearer {token}"},
            )
            resp = self._http.send(request, stream=True)
            try:
                ctype = resp.headers.get("content-type", "")
                if sink is not None and resp.status_code == 200 and "json" not in ctype:
                    with open(sink, "wb") as out:
                        for chunk in resp.iter_bytes(1 << 20):
                            out.write(chunk)
                    return _Outcome(raw=resp)
                resp.read()
            finally:
                resp.close()
        except httpx.TransportError as exc:
            _raise_if_tls_rejected(exc, url.removeprefix(self.base_url))
            return _Outcome(failure=f"transport error {type(exc).__name__}")
        if resp.status_code in (413, 414):
            return _Outcome(
                failure=f"HTTP {resp.status_code} (request too large)", code=str(resp.status_code)
            )
        if resp.status_code >= 500:
            return _Outcome(failure=f"HTTP {resp.status_code}", raw=resp)
        if raw and resp.status_code in (200, 206) and "json" not in ctype:
            return _Outcome(raw=resp)
        if resp.status_code == 404 and "json" not in ctype:
            return _Outcome(failure=f"HTTP 404: {resp.text[:200]}", code="404")
        try:
            body = resp.json()
        except ValueError:
            kind = "HTML page" if "html" in ctype else "malformed body"
            return _Outcome(failure=f"HTTP {resp.status_code} with a {kind}")
        if not isinstance(body, dict) or "success" not in body:
            return _Outcome(failure=f"HTTP {resp.status_code} with an unexpected body")
        if body["success"] is not True:
            errors = body.get("errors") or [{"code": "0", "message": "success false without errors"}]
            first = errors[0]
            return _Outcome(body=body, failure=str(first.get("message", "")), code=str(first.get("code", "")))
        return _Outcome(body=body, raw=resp)

    def _get(self, path: str, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
        """GET, switching to ``POST ?_method=GET`` with a form body when the URL would exceed 8 KB."""
        if len(self.base_url) + len(path) + len(urlencode(params)) + 1 > MAX_URL_BYTES:
            return self._call("POST", path, endpoint, params={"_method": "GET"}, form=params)
        return self._call("GET", path, endpoint, params=params)

    # ------------------------------------------------------------------ batching
    @staticmethod
    def _batches(records: Sequence[Any]) -> tuple[list[list[tuple[int, Any]]], list[int]]:
        """Batches of (index, record), each <= 300 records and under 1 MB, plus records too big to send."""
        budget = MAX_BODY_BYTES - 1_000  # room for the envelope (action, lookupField, ...)
        batches: list[list[tuple[int, Any]]] = []
        too_big: list[int] = []
        batch: list[tuple[int, Any]] = []
        size = 0
        for i, record in enumerate(records):
            rec_size = len(json.dumps(record, default=str).encode()) + 1
            if rec_size > budget:
                too_big.append(i)
                continue
            if batch and (len(batch) >= MAX_BATCH or size + rec_size > budget):
                batches.append(batch)
                batch, size = [], 0
            batch.append((i, record))
            size += rec_size
        if batch:
            batches.append(batch)
        return batches, too_big

    def _write(
        self,
        path: str,
        endpoint: str,
        records: Sequence[Any],
        envelope: dict[str, Any],
        id_keys: tuple[str, ...],
    ) -> list[RecordResult]:
        """One result per input record, in input order: failures of a whole call are per-record too."""
        batches, too_big = self._batches(records)
        results: dict[int, RecordResult] = {
            i: RecordResult(
                i,
                "failed",
                None,
                ({"code": "413", "message": f"{endpoint}: record {i} exceeds the 1 MB request body limit"},),
            )
            for i in too_big
        }
        for batch in batches:
            try:
                body = self._call(
                    "POST", path, endpoint, json_body={**envelope, "input": [r for _, r in batch]}
                )
            except (QuotaExhausted, MarketoAuthError, MarketoTransientError):
                raise
            except MarketoError as exc:  # the call was refused as a whole (e.g. 1003): every record failed
                reason = {"code": exc.code, "message": exc.message}
                results.update((i, RecordResult(i, "failed", None, (reason,))) for i, _ in batch)
                continue
            answers = body.get("result") or []
            for pos, (index, _) in enumerate(batch):
                if pos >= len(answers):
                    results[index] = RecordResult(
                        index,
                        "failed",
                        None,
                        (
                            {
                                "code": "0",
                                "message": f"{endpoint}: Marketo returned no result for record {index}",
                            },
                        ),
                    )
                    continue
                a = answers[pos]
                results[index] = RecordResult(
                    index,
                    str(a.get("status", "failed")),
                    next((a[k] for k in id_keys if a.get(k) is not None), None),
                    tuple(a.get("reasons") or ()),
                )
        return [results[i] for i in range(len(records))]

    # ------------------------------------------------------------------ leads
    def describe_leads(self) -> list[dict[str, Any]]:
        return self._call("GET", "/rest/v1/leads/describe.json", "leads.describe").get("result", [])

    def describe2(self) -> dict[str, Any]:
        result = self._call("GET", "/rest/v1/leads/describe2.json", "leads.describe2").get("result", [])
        return result[0] if result else {}

    def create_lead_fields(self, fields: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Create custom lead fields (``POST /rest/v1/leads/schema/fields.json``, Adobe "Field Management";
        needs Read-Write Schema Custom Field). One result per input: ``{"name", "status", "reasons"?}``.
        Marketo fields cannot be deleted through the API: callers create only on the user's request."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(fields), 100):  # at most 100 fields per call
            body = self._call(
                "POST",
                "/rest/v1/leads/schema/fields.json",
                "leads.schema.create",
                json_body={"input": list(fields[i : i + 100])},
            )
            out += body.get("result") or []
        return out

    def usage(self) -> list[dict[str, Any]]:
        """Today's API calls per user (``GET /rest/v1/stats/usage.json``, Adobe "REST API": usage statistics)."""
        return self._call("GET", "/rest/v1/stats/usage.json", "stats.usage").get("result", [])

    def get_lead(self, lead_id: int, fields: Sequence[str] | None = None) -> dict[str, Any] | None:
        params = {"fields": ",".join(fields)} if fields else {}
        result = self._call("GET", f"/rest/v1/lead/{int(lead_id)}.json", "leads.byid", params=params).get(
            "result"
        )
        return result[0] if result else None

    def get_leads(
        self,
        filter_type: str,
        values: Iterable[Any],
        fields: Sequence[str] | None = None,
        batch_size: int = MAX_BATCH,
    ) -> list[dict[str, Any]]:
        unique = list(dict.fromkeys(str(v) for v in values if v is not None and v != ""))
        out: list[dict[str, Any]] = []
        for i in range(0, len(unique), MAX_BATCH):
            out.extend(self._get_leads_chunk(filter_type, unique[i : i + MAX_BATCH], fields, batch_size))
        return out

    def _get_leads_chunk(
        self, filter_type: str, values: list[str], fields: Sequence[str] | None, batch_size: int
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {
            "filterType": filter_type,
            "filterValues": ",".join(values),
            "batchSize": batch_size,
        }
        if fields:
            params["fields"] = ",".join(fields)
        rows: list[dict[str, Any]] = []
        try:
            while True:
                body = self._get("/rest/v1/leads.json", "leads.get", params)
                rows.extend(body.get("result") or [])
                if not body.get("nextPageToken"):
                    return rows
                params["nextPageToken"] = body["nextPageToken"]
        except MarketoError as exc:
            if exc.code == "1003" and "Too many results" in exc.message and len(values) > 1:
                half = len(values) // 2  # more than 1,000 matches: ask for fewer values at a time
                return self._get_leads_chunk(
                    filter_type, values[:half], fields, batch_size
                ) + self._get_leads_chunk(filter_type, values[half:], fields, batch_size)
            raise

    def sync_leads(
        self,
        records: Sequence[dict[str, Any]],
        action: str = "createOrUpdate",
        lookup_field: str = "email",
        partition_name: str | None = None,
    ) -> list[RecordResult]:
        envelope: dict[str, Any] = {"action": action, "lookupField": lookup_field}
        if partition_name:
            envelope["partitionName"] = partition_name
        return self._write("/rest/v1/leads.json", "leads.sync", records, envelope, ("id",))

    def delete_leads(self, ids: Sequence[int]) -> list[RecordResult]:
        return self._write(
            "/rest/v1/leads/delete.json", "leads.delete", [{"id": int(i)} for i in ids], {}, ("id",)
        )

    def merge_leads(self, winner: int, losers: Sequence[int]) -> None:
        """Merge ``losers`` into ``winner`` (25 per call, the API maximum)."""
        losers = [int(x) for x in losers]
        if not losers:
            raise ValueError("merge_leads: no losing lead ids given")
        for i in range(0, len(losers), MAX_MERGE):
            chunk = losers[i : i + MAX_MERGE]
            self._call(
                "POST",
                f"/rest/v1/leads/{int(winner)}/merge.json",
                "leads.merge",
                params={"leadIds": ",".join(map(str, chunk))},
            )

    # ------------------------------------------------------------------ activities
    def activity_types(self) -> list[dict[str, Any]]:
        return self._call("GET", "/rest/v1/activities/types.json", "activities.types").get("result", [])

    def paging_token(self, since: datetime | str) -> str:
        if isinstance(since, datetime):
            since = (
                (since if since.tzinfo else since.replace(tzinfo=UTC))
                .astimezone(UTC)
                .strftime("%Y-%m-%dT%H:%M:%SZ")
            )
        body = self._call(
            "GET",
            "/rest/v1/activities/pagingtoken.json",
            "activities.pagingtoken",
            params={"sinceDatetime": since},
        )
        return str(body["nextPageToken"])

    def _pages(self, path: str, endpoint: str, token: str, params: dict[str, Any]) -> Iterator[ActivityPage]:
        while True:
            body = self._get(path, endpoint, {**params, "nextPageToken": token})
            token = str(body.get("nextPageToken") or token)
            more = bool(body.get("moreResult"))
            yield ActivityPage(body.get("result") or [], token, more)
            if not more:
                return

    def lead_changes(
        self,
        token: str,
        fields: Sequence[str],
        batch_size: int = MAX_BATCH,
        lead_ids: Sequence[int] | None = None,
    ) -> Iterator[ActivityPage]:
        """Pages of New Lead / Change Data Value activities; the last page's token is the new watermark."""
        if not fields:
            raise ValueError("lead_changes: fields is required")
        params: dict[str, Any] = {"fields": ",".join(fields), "batchSize": batch_size}
        if lead_ids:
            params["leadIds"] = ",".join(map(str, lead_ids))
        return self._pages("/rest/v1/activities/leadchanges.json", "activities.leadchanges", token, params)

    def deleted_leads(self, token: str, batch_size: int = MAX_BATCH) -> Iterator[ActivityPage]:
        return self._pages(
            "/rest/v1/activities/deletedleads.json",
            "activities.deletedleads",
            token,
            {"batchSize": batch_size},
        )

    def activities(
        self,
        token: str,
        type_ids: Sequence[int],
        batch_size: int = MAX_BATCH,
        lead_ids: Sequence[int] | None = None,
    ) -> Iterator[ActivityPage]:
        if not 1 <= len(type_ids) <= 10:
            raise ValueError(f"activities: 1 to 10 activity type ids allowed, got {len(type_ids)}")
        params: dict[str, Any] = {"activityTypeIds": ",".join(map(str, type_ids)), "batchSize": batch_size}
        if lead_ids:
            params["leadIds"] = ",".join(map(str, lead_ids))
        return self._pages("/rest/v1/activities.json", "activities", token, params)

    # ------------------------------------------------------------------ bulk export
    def create_export(
        self,
        kind: str,
        filter: dict[str, Any],
        fields: Sequence[str] | None = None,
        format: str = "CSV",
        column_header_names: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create a ``leads`` or ``activities`` export job; returns its status (with ``exportId``)."""
        body: dict[str, Any] = {"format": format, "filter": filter}
        if fields:
            body["fields"] = list(fields)
        if column_header_names:
            body["columnHeaderNames"] = column_header_names
        return self._call(
            "POST", f"/bulk/v1/{kind}/export/create.json", "bulk.export.create", json_body=body
        )["result"][0]

    def create_activity_export(
        self, start: datetime | str, end: datetime | str, type_ids: Sequence[int] | None = None
    ) -> dict[str, Any]:
        flt: dict[str, Any] = {"createdAt": {"startAt": _iso(start), "endAt": _iso(end)}}
        if type_ids:
            flt["activityTypeIds"] = list(type_ids)
        return self.create_export("activities", flt)

    def enqueue_export(self, kind: str, export_id: str) -> dict[str, Any]:
        return self._call("POST", f"/bulk/v1/{kind}/export/{export_id}/enqueue.json", "bulk.export.enqueue")[
            "result"
        ][0]

    def export_status(self, kind: str, export_id: str) -> dict[str, Any]:
        return self._call("GET", f"/bulk/v1/{kind}/export/{export_id}/status.json", "bulk.export.status")[
            "result"
        ][0]

    def cancel_export(self, kind: str, export_id: str) -> dict[str, Any]:
        return self._call("POST", f"/bulk/v1/{kind}/export/{export_id}/cancel.json", "bulk.export.cancel")[
            "result"
        ][0]

    def list_exports(self, kind: str, statuses: Sequence[str] = ()) -> list[dict[str, Any]]:
        params = {"status": ",".join(statuses)} if statuses else None
        return self._call("GET", f"/bulk/v1/{kind}/export.json", "bulk.export.list", params=params).get(
            "result", []
        )

    def wait_for_export(
        self, kind: str, export_id: str, poll_seconds: float | None = None, timeout_seconds: float = 6 * 3600
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_seconds
        while True:
            status = self.export_status(kind, export_id)
            if status["status"] == "Completed":
                return status
            if status["status"] in ("Failed", "Cancelled"):
                raise MarketoError(
                    "1029" if status["status"] == "Failed" else "0",
                    f"export {export_id} ended {status['status']}: {status.get('errorMsg', '')}",
                    "bulk.export.status",
                )
            if time.monotonic() >= deadline:
                raise MarketoTransientError(
                    "timeout",
                    f"export {export_id} still {status['status']} after {timeout_seconds:g}s",
                    "bulk.export.status",
                )
            time.sleep(self.poll_seconds if poll_seconds is None else poll_seconds)

    def download_export(
        self, kind: str, export_id: str, path: str | Path, expected_sha256: str | None = None
    ) -> Path:
        """Stream the finished file to ``path`` and verify its SHA-256 checksum when given."""
        path = Path(path)
        self._call(
            "GET", f"/bulk/v1/{kind}/export/{export_id}/file.json", "bulk.export.file", raw=True, sink=path
        )
        if expected_sha256:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != expected_sha256:
                raise MarketoError(
                    "checksum",
                    f"export {export_id}: file checksum mismatch (expected "
                    f"{expected_sha256}, got {digest.hexdigest()})",
                    "bulk.export.file",
                )
        return path

    def export_to_file(
        self,
        kind: str,
        filter: dict[str, Any],
        path: str | Path,
        fields: Sequence[str] | None = None,
        poll_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Create, enqueue, wait for and download one export; returns the final job status."""
        export_id = self.create_export(kind, filter, fields)["exportId"]
        self.enqueue_export(kind, export_id)
        status = self.wait_for_export(kind, export_id, poll_seconds)
        self.download_export(kind, export_id, path, status.get("fileChecksum"))
        return status

    # ------------------------------------------------------------------ bulk import
    # Adobe, "Bulk Lead Import" and "Bulk Custom Object Import" (experienceleague.adobe.com/en/docs/
    # marketo-developer/marketo/rest/bulk-import/bulk-lead-import, .../bulk-custom-object-import): CSV files under
    # 10 MB, a FIFO queue of 10 jobs (2 processed at a time; 1016 "Too many imports" beyond), status polled,
    # failed and warned rows fetched as CSV (the row plus a reason column). ``object_name`` None means leads.
    @staticmethod
    def _import_base(object_name: str | None) -> str:
        return "/bulk/v1/leads" if object_name is None else f"/bulk/v1/customobjects/{object_name}/import"

    @staticmethod
    def _import_endpoint(object_name: str | None, what: str) -> str:
        return f"bulk.import.{what}" if object_name is None else f"bulk.customobjects.import.{what}"

    def import_leads(
        self,
        data: bytes | str | Path,
        lookup_field: str = "email",
        partition_name: str | None = None,
        list_id: int | None = None,
    ) -> dict[str, Any]:
        """Upload a CSV (header row = REST field names); returns ``batchId`` and status."""
        params: dict[str, Any] = {"format": "csv", "lookupField": lookup_field}
        if partition_name:
            params["partitionName"] = partition_name
        if list_id is not None:
            params["listId"] = int(list_id)
        return self._call(
            "POST",
            "/bulk/v1/leads.json",
            "bulk.import.create",
            params=params,
            files={"file": ("leads.csv", _import_content(data), "text/csv")},
        )["result"][0]

    def import_custom_objects(self, object_name: str, data: bytes | str | Path) -> dict[str, Any]:
        """Upload a CSV of custom object records (header = the object's API field names, its dedupe fields
        included); records are inserted or updated by the dedupe fields. Returns ``batchId`` and status."""
        return self._call(
            "POST",
            f"{self._import_base(object_name)}.json",
            self._import_endpoint(object_name, "create"),
            params={"format": "csv"},
            files={"file": (f"{object_name}.csv", _import_content(data), "text/csv")},
        )["result"][0]

    def import_status(self, batch_id: int, object_name: str | None = None) -> dict[str, Any]:
        path = (
            f"/bulk/v1/leads/batch/{int(batch_id)}.json"
            if object_name is None
            else f"{self._import_base(object_name)}/{int(batch_id)}/status.json"
        )
        return self._call("GET", path, self._import_endpoint(object_name, "status"))["result"][0]

    def wait_for_import(
        self,
        batch_id: int,
        poll_seconds: float | None = None,
        timeout_seconds: float = 6 * 3600,
        object_name: str | None = None,
        first_poll_seconds: float = 0.25,
    ) -> dict[str, Any]:
        """Poll until Complete or Failed, backing off from ``first_poll_seconds`` to ``poll_seconds``."""
        deadline = time.monotonic() + timeout_seconds
        delay = first_poll_seconds
        cap = self.poll_seconds if poll_seconds is None else poll_seconds
        while True:
            status = self.import_status(batch_id, object_name)
            if status["status"] in ("Complete", "Failed"):
                return status
            if time.monotonic() >= deadline:
                raise MarketoTransientError(
                    "timeout",
                    f"import {batch_id} still {status['status']}",
                    self._import_endpoint(object_name, "status"),
                )
            time.sleep(min(delay, cap))
            delay = min(delay * 2, cap)

    def _import_report(self, batch_id: int, object_name: str | None, which: str) -> str:
        path = (
            f"/bulk/v1/leads/batch/{int(batch_id)}/{which}.json"
            if object_name is None
            else f"{self._import_base(object_name)}/{int(batch_id)}/{which}.json"
        )
        return self._call("GET", path, self._import_endpoint(object_name, which), raw=True).text

    def import_queue(self, object_name: str | None = None, lookup_field: str = "email") -> Any:
        """An :class:`~sync_pipeline.clients.bulk_import.ImportQueue` of leads (``object_name`` None) or of a
        custom object: many files through the import queue, at most 10 queued, 1016 waited out."""
        from sync_pipeline.clients.bulk_import import ImportQueue

        return ImportQueue(self, object_name=object_name, lookup_field=lookup_field)

    def import_failures(self, batch_id: int, object_name: str | None = None) -> str:
        """CSV: the failed rows as sent, plus the column ``Import Failure Reason``."""
        return self._import_report(batch_id, object_name, "failures")

    def import_warnings(self, batch_id: int, object_name: str | None = None) -> str:
        """CSV: the rows imported with a warning, plus the column ``Import Warning Reason``."""
        return self._import_report(batch_id, object_name, "warnings")

    # ------------------------------------------------------------------ companies, opportunities, ...
    @staticmethod
    def _object_path(name: str) -> str:
        if name.startswith("customobjects/"):
            return f"/rest/v1/{name}"
        if name in MARKETO_OBJECT_PATHS:
            return f"/rest/v1/{MARKETO_OBJECT_PATHS[name]}"
        raise ValueError(
            f"unknown Marketo object {name!r}: use companies, opportunities, opportunities/roles, "
            "salespersons or customobjects/<apiName>"
        )

    def list_custom_objects(self) -> list[dict[str, Any]]:
        return self._call("GET", "/rest/v1/customobjects.json", "customobjects.list").get("result", [])

    def describe_object(self, name: str) -> dict[str, Any]:
        path = self._object_path(name)
        result = self._call("GET", f"{path}/describe.json", f"{name}.describe").get("result") or []
        return result[0] if result else {}

    def query_objects(
        self, name: str, filter_type: str, values: Iterable[Any], fields: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Values are scalars, or dicts for compound keys (sent as ``POST ?_method=GET`` JSON)."""
        path, endpoint = self._object_path(name), f"{name}.get"
        items = list(values)
        out: list[dict[str, Any]] = []
        for i in range(0, len(items), MAX_BATCH):
            chunk = items[i : i + MAX_BATCH]
            compound = any(isinstance(v, dict) for v in chunk)
            token: str | None = None
            while True:
                if compound:
                    body: dict[str, Any] = {"filterType": filter_type, "input": chunk}
                    if fields:
                        body["fields"] = list(fields)
                    if token:
                        body["nextPageToken"] = token
                    answer = self._call(
                        "POST", f"{path}.json", endpoint, params={"_method": "GET"}, json_body=body
                    )
                else:
                    params: dict[str, Any] = {
                        "filterType": filter_type,
                        "filterValues": ",".join(map(str, chunk)),
                    }
                    if fields:
                        params["fields"] = ",".join(fields)
                    if token:
                        params["nextPageToken"] = token
                    answer = self._get(f"{path}.json", endpoint, params)
                out.extend(answer.get("result") or [])
                token = answer.get("nextPageToken")
                if not token:
                    break
        return out

    def upsert_objects(
        self,
        name: str,
        records: Sequence[dict[str, Any]],
        action: str = "createOrUpdate",
        dedupe_by: str = "dedupeFields",
    ) -> list[RecordResult]:
        return self._write(
            f"{self._object_path(name)}.json",
            f"{name}.sync",
            records,
            {"action": action, "dedupeBy": dedupe_by},
            ("marketoGUID", "id"),
        )

    def delete_objects(
        self, name: str, records: Sequence[dict[str, Any]], delete_by: str = "dedupeFields"
    ) -> list[RecordResult]:
        return self._write(
            f"{self._object_path(name)}/delete.json",
            f"{name}.delete",
            records,
            {"deleteBy": delete_by},
            ("marketoGUID", "id"),
        )


def _raise_if_tls_rejected(exc: httpx.TransportError, endpoint: str) -> None:
    """A certificate Marketo's side cannot prove is a configuration error: retrying will not help."""
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        raise MarketoError(
            "tls", "server certificate not trusted (set ca_bundle to the issuing CA's PEM)", endpoint
        ) from None


def _import_content(data: bytes | str | Path) -> bytes:
    content = (
        data.read_bytes() if isinstance(data, Path) else data.encode() if isinstance(data, str) else data
    )
    if len(content) > MAX_IMPORT_BYTES:
        raise ValueError(
            f"bulk import: file is {len(content)} bytes; Marketo accepts at most 10 MB per import"
        )
    return content


def _iso(value: datetime | str) -> str:
    if isinstance(value, str):
        return value
    dt = value if value.tzinfo else value.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
