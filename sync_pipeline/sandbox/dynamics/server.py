"""The Dataverse Web API v9.2 sandbox and its Entra ID identity endpoint.

Route names (``api_app.calls`` / fault patterns) under ``/api/data/v9.2/``:

==========================  =========================================================================
``dynamics.service``        ``GET /`` service document
``dynamics.metadata``       ``GET $metadata`` (CSDL of the tables and the metadata types)
``dynamics.whoami``         ``GET WhoAmI`` / ``WhoAmI()``
``dynamics.entitydefinitions`` ``GET EntityDefinitions`` (``$select``/``$filter``)
``dynamics.entitydefinition``  ``GET EntityDefinitions(LogicalName='x')``
``dynamics.attributes``     ``GET EntityDefinitions(LogicalName='x')/Attributes[/Microsoft.Dynamics.CRM.<Type>]``
``dynamics.attribute``      ``GET EntityDefinitions(LogicalName='x')/Attributes(LogicalName='y')[/<cast>]``
``dynamics.entityrelationships`` ``GET EntityDefinitions(...)/ManyToOneRelationships`` (also OneToMany, ManyToMany, Keys)
``dynamics.relationships``  ``GET RelationshipDefinitions[/<cast>]``; ``dynamics.relationship`` one by SchemaName
``dynamics.globaloptionsets`` ``GET GlobalOptionSetDefinitions``; ``dynamics.globaloptionset`` one by Name
``dynamics.batch``          ``POST $batch``
``dynamics.qualify``        ``POST leads(<id>)/Microsoft.Dynamics.CRM.QualifyLead``
``dynamics.merge``          ``POST Merge`` (Target, Subordinate, UpdateContent, PerformParentingChecks)
``dynamics.createmultiple`` / ``dynamics.updatemultiple`` / ``dynamics.upsertmultiple``
                            ``POST <set>/Microsoft.Dynamics.CRM.<Message>``
``dynamics.count``          ``GET <set>/$count``
``dynamics.query``          ``GET <set>`` (incl. paging and change tracking)
``dynamics.create``         ``POST <set>``
``dynamics.retrieve``       ``GET <set>(<id>)``
``dynamics.update``         ``PATCH <set>(<id>)`` (update or upsert)
``dynamics.delete``         ``DELETE <set>(<id>)``
==========================  =========================================================================

Identity routes: ``identity.openid``, ``identity.instance``, ``identity.token`` (see
:mod:`sync_pipeline.sandbox.identity`). Requests inside a ``$batch`` are counted under their own route
names too. Fault kinds rendered in Dataverse shapes: ``throttle`` (429 + ``Retry-After`` =
``fault.seconds``, code 0x80072322), ``unauthorized`` (401 + ``WWW-Authenticate``), ``status`` (error body
with ``fault.status`` and ``fault.code`` or 0x80040216); plus the generic kinds of ``FaultInjector``.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.dynamics import batch, metadata, metadata_api, query, writes
from sync_pipeline.sandbox.dynamics.store import DynamicsStore
from sync_pipeline.sandbox.dynamics.wire import ODATA_HEADERS, error, guarded, prefer
from sync_pipeline.sandbox.faults import Fault
from sync_pipeline.sandbox.http import App, Request, Response, SandboxServer
from sync_pipeline.sandbox.identity import IdentityService, TokenTable
from sync_pipeline.sandbox.schema import SandboxSchema, load_schema

P = "/api/data/v9\\.2/"
# Requests the service-protection limiter admitted (counted only while limits are on); the benchmark's
# API-budget floor is computed from this number (sync_pipeline.bench.floor.budget_floor).
COUNTED = "limits.dynamics.requests"
# Their combined execution time in milliseconds (measured plus modelled per operation), the second measure the
# service counts per window; the floor's execution-time rule is computed from it.
EXECUTION_MS = "limits.dynamics.execution_ms"
# Requests carried inside $batch requests: counted under their own routes as well, so that HTTP requests are the
# route counts minus this (the services count a $batch as one request).
BATCH_PARTS = "parts.dynamics.batch"
_GUID = r"[0-9a-fA-F-]{36}"


class DynamicsSandbox:
    """A Dataverse org (Web API) plus its Entra ID tenant, both served on loopback."""

    def __init__(
        self,
        schema: SandboxSchema | None = None,
        *,
        clock: Clock | None = None,
        limits: dict | None = None,
        token_lifetime: int = 3599,
        delta_retention_seconds: int = 30 * 86400,
    ):
        self.schema = schema or load_schema()
        self.clock = clock or Clock()
        self.delta_retention_seconds = delta_retention_seconds
        cfg = self.schema.raw.get("dynamics", {})
        self.tenant_id: str = cfg.get("tenant_id", "0d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6")
        self.client_id: str = cfg.get("client_id", "3b9c2f61-7a0e-4d2b-9f5c-8e1a6d4c2b70")
        self._client_secret: str = cfg.get("client_secret", "sandbox-dynamics-secret")
        self.organization_id: str = cfg.get("organization_id", "6f0e4b8a-2c1d-4e5f-9a7b-3c2d1e0f9a8b")
        self.business_unit_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox-bu:{self.organization_id}"))
        self.app_user_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox-app-user:{self.client_id}"))
        self.store = DynamicsStore(self.schema, self.clock)
        self.store.bulk_load(
            "systemuser",
            [
                {
                    "systemuserid": self.app_user_id,
                    "firstname": "# sync-pipeline",
                    "lastname": "application user",
                    "applicationid": self.client_id,
                    "accessmode": 4,
                    "isdisabled": False,
                    "internalemailaddress": "sync-pipeline-app@sandbox.example",
                }
            ],
        )
        self.tokens = TokenTable(self.clock)
        self.identity = IdentityService(
            tenant_id=self.tenant_id,
            client_id=self.client_id,
            client_secret=self._client_secret,
            tokens=self.tokens,
            token_lifetime=token_lifetime,
        )
        self.identity_app = self.identity.app
        self.api_app = App("dynamics")
        self.limits = dict(limits or {})
        self._window: deque[float] = deque()
        self._exec: deque[tuple[float, float]] = deque()  # (sandbox time, execution seconds) of each request
        self._exec_total = 0.0
        self.limit_rejections: Counter[str] = Counter()  # 429s by Dataverse error code
        self._in_flight = 0
        self._limit_lock = threading.Lock()
        self._api_server: SandboxServer | None = None
        self._identity_server: SandboxServer | None = None
        self._register()

    def __repr__(self) -> str:
        return f"DynamicsSandbox(api_url={self.api_url!r}, client_id={self.client_id!r})"

    # ---------------------------------------------------------------------------------------- lifecycle
    @property
    def client_secret(self) -> str:
        return self._client_secret

    @property
    def api_url(self) -> str:
        if self._api_server is None:
            raise RuntimeError("DynamicsSandbox is not started")
        return self._api_server.url

    @property
    def identity_url(self) -> str:
        if self._identity_server is None:
            raise RuntimeError("DynamicsSandbox is not started")
        return self._identity_server.url

    @property
    def authority(self) -> str:
        return f"{self.identity_url}/{self.tenant_id}"

    def start(
        self,
        host: str = "127.0.0.1",
        identity_ssl: ssl.SSLContext | None = None,
        api_ssl: ssl.SSLContext | None = None,
        *,
        api_port: int = 0,
        identity_port: int = 0,
    ) -> DynamicsSandbox:
        if identity_ssl is None:
            raise ValueError("DynamicsSandbox.start needs identity_ssl: MSAL only talks to HTTPS authorities")
        self._identity_server = SandboxServer(self.identity_app, host, identity_port, identity_ssl)
        self._api_server = SandboxServer(self.api_app, host, api_port, api_ssl)
        self.identity.base_url = self._identity_server.url
        self.identity.audience = self._api_server.url
        self._identity_server.start()
        self._api_server.start()
        return self

    def stop(self) -> None:
        for server in (self._api_server, self._identity_server):
            if server is not None:
                server.stop()

    def __enter__(self) -> DynamicsSandbox:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -------------------------------------------------------------------------------- auth and limits
    def _unauthorized(self, message: str) -> Response:
        challenge = (
            f"Bearer authorization_uri={self.identity_url}/{self.tenant_id}/oauth2/authorize, "
            f"resource_id={self.api_url}/"
        )
        return error(401, "0x80072560", message, {"WWW-Authenticate": challenge})

    def _before(self, req: Request) -> Response | None:
        auth = req.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._unauthorized(
                "The request has no bearer token; send 'Authorization: Bearer <token>'."
            )
        info, reason = self.tokens.check(token.strip(), self.api_url)
        if info is None:
            why = {
                "expired": "The access token has expired.",
                "invalid_audience": f"The access token was not issued for {self.api_url}.",
            }
            return self._unauthorized(why.get(reason, "The access token is not valid."))
        return self._check_limits(req)

    def _check_limits(self, req: Request | None = None) -> Response | None:
        """Service protection API limits, per user (all our tokens are the one application user), counted as
        Microsoft documents them ("Service protection API limits",
        https://learn.microsoft.com/power-apps/developer/data-platform/api-limits):

        - number of requests over a sliding window (6,000 / 300 s; 429, ``0x80072322``). A ``$batch`` or a
          bulk message (``CreateMultiple``...) is ONE request: "You could send fewer requests by bundling them
          in batch operations. The combined execution time limit will counter this."
        - combined execution time over the window (1,200 s / 300 s; 429, ``0x80072321``): every request adds
          its measured handler time plus, to model server work the sandbox does not really spend,
          ``execution_seconds_per_operation`` for each operation it carries (each request inside a ``$batch``,
          each target of a bulk message, else one).
        - concurrent requests (52; 429, ``0x80072326``), immediate.

        Each 429 carries ``Retry-After`` (seconds). Requests answered 429 are not counted. The limiter uses
        the sandbox clock, so tests move time instead of waiting.
        """
        if not self.limits:
            return None
        concurrent = self.limits.get("concurrent")
        per_window = self.limits.get("requests_per_window")
        exec_limit = self.limits.get("execution_seconds_per_window")
        window = float(self.limits.get("window_seconds", 300))
        now = self.clock.timestamp()
        with self._limit_lock:
            if concurrent and self._in_flight >= concurrent:
                self.limit_rejections["0x80072326"] += 1
                return error(
                    429,
                    "0x80072326",
                    f"Number of concurrent requests exceeded the limit of {concurrent}.",
                    {"Retry-After": str(int(self.limits.get("concurrent_retry_after", 1)))},
                )
            while self._window and self._window[0] <= now - window:
                self._window.popleft()
            while self._exec and self._exec[0][0] <= now - window:
                self._exec_total -= self._exec.popleft()[1]
            if per_window and len(self._window) >= per_window:
                retry = max(1, math.ceil(self._window[0] + window - now))
                self.limit_rejections["0x80072322"] += 1
                return error(
                    429,
                    "0x80072322",
                    f"Number of requests exceeded the limit of {per_window} over "
                    f"time window of {int(window)} seconds.",
                    {"Retry-After": str(retry)},
                )
            if exec_limit and self._exec_total >= exec_limit:
                # Retry when enough of the window's execution time has expired to fall under the limit.
                excess, retry_at = self._exec_total - exec_limit, now
                for at, seconds in self._exec:
                    excess -= seconds
                    retry_at = at + window
                    if excess < 0:
                        break
                self.limit_rejections["0x80072321"] += 1
                return error(
                    429,
                    "0x80072321",
                    f"Combined execution time of incoming requests exceeded limit of "
                    f"{int(exec_limit * 1000):,} milliseconds over time window of "
                    f"{int(window)} seconds. Decrease number of concurrent requests or "
                    f"reduce the duration of requests and try again later.",
                    {"Retry-After": str(max(1, math.ceil(retry_at - now)))},
                )
            self._window.append(now)
            self._in_flight += 1
            self.api_app.calls[COUNTED] += 1
        if req is not None:
            req.limit_started = time.perf_counter()
        return None

    def _operations(self, req: Request) -> int:
        if req.route == "dynamics.batch":
            return max(1, req.operations)
        if req.route in ("dynamics.createmultiple", "dynamics.updatemultiple", "dynamics.upsertmultiple"):
            return max(1, req.body.count(b'"@odata.type"'))
        return 1

    def _after(self, req: Request) -> None:
        started = req.limit_started
        if self.limits and started is not None:
            spent = time.perf_counter() - started
            spent += self._operations(req) * float(self.limits.get("execution_seconds_per_operation", 0.0))
            with self._limit_lock:
                self._in_flight = max(0, self._in_flight - 1)
                self._exec.append((self.clock.timestamp(), spent))
                self._exec_total += spent
                self.api_app.calls[EXECUTION_MS] += round(spent * 1000)

    def _render_fault(self, fault: Fault, req: Request) -> Response | None:
        if fault.kind == "throttle":
            return error(
                429,
                fault.code or "0x80072322",
                "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
                {"Retry-After": str(max(0, round(fault.seconds)))},
            )
        if fault.kind == "unauthorized":
            return self._unauthorized("The access token has expired.")
        if fault.kind == "status":
            return error(fault.status, fault.code or "0x80040216", "An unexpected error occurred.")
        return None

    # ------------------------------------------------------------------------------------------ routes
    def _register(self) -> None:
        app = self.api_app
        app.before, app.after, app.render_fault = self._before, self._after, self._render_fault

        def add(method: str, pattern: str, name: str, handler: Callable[[Request], Response]) -> None:
            app.route(method, P + pattern, name)(guarded(handler))

        add("GET", r"?", "dynamics.service", self._service_document)
        add("GET", r"\$metadata", "dynamics.metadata", self._metadata)
        add("GET", r"WhoAmI(?:\(\))?", "dynamics.whoami", self._whoami)
        add(
            "GET",
            r"RetrieveCurrentOrganization\(AccessType=[^)]*\)",
            "dynamics.organization",
            self._organization,
        )
        for pattern, name, handler in metadata_api.routes(self):
            add("GET", pattern, name, handler)
        add("POST", r"\$batch", "dynamics.batch", self._batch)
        add(
            "POST",
            rf"leads\((?P<key>{_GUID})\)/Microsoft\.Dynamics\.CRM\.QualifyLead",
            "dynamics.qualify",
            lambda req: writes.qualify_lead(self, req),
        )
        add("POST", r"Merge", "dynamics.merge", lambda req: writes.merge(self, req))

        def multiple(message: str) -> Callable[[Request], Response]:
            return lambda req: writes.multiple(self, req, message)

        for message in ("CreateMultiple", "UpdateMultiple", "UpsertMultiple"):
            add(
                "POST",
                rf"(?P<set>\w+)/Microsoft\.Dynamics\.CRM\.{message}",
                f"dynamics.{message.lower()}",
                multiple(message),
            )
        add("GET", r"(?P<set>\w+)/\$count", "dynamics.count", lambda req: query.count_collection(self, req))
        add("GET", r"(?P<set>\w+)", "dynamics.query", lambda req: query.query_collection(self, req))
        add("POST", r"(?P<set>\w+)", "dynamics.create", lambda req: writes.create(self, req))
        add("GET", r"(?P<set>\w+)\((?P<key>[^)]*)\)", "dynamics.retrieve", self._retrieve)
        add(
            "PATCH",
            r"(?P<set>\w+)\((?P<key>[^)]*)\)",
            "dynamics.update",
            lambda req: writes.update(self, req),
        )
        add(
            "DELETE",
            r"(?P<set>\w+)\((?P<key>[^)]*)\)",
            "dynamics.delete",
            lambda req: writes.delete(self, req),
        )
        # Inside $batch, creates and updates may bind to "$<Content-ID>" of earlier requests.
        self._with_refs: dict[str, Callable[[Request, Callable[[str], str | None]], Response]] = {
            "dynamics.create": lambda req, res: writes.create(self, req, res),
            "dynamics.update": lambda req, res: writes.update(self, req, res),
        }

    def _retrieve(self, req: Request) -> Response:
        table = query.table_for_set(self.store, req.params["set"])
        return query.retrieve(self, req, table, writes.parse_key(table, req.params["key"]))

    def _service_document(self, req: Request) -> Response:
        sets = [
            {"name": t.entity_set, "kind": "EntitySet", "url": t.entity_set}
            for t in self.schema.tables.values()
        ]
        return Response.json(
            {"@odata.context": f"{self.api_url}/api/data/v9.2/$metadata", "value": sets},
            headers=ODATA_HEADERS,
        )

    def _metadata(self, req: Request) -> Response:
        return Response.text(
            metadata.csdl(list(self.schema.tables.values())),
            content_type="application/xml",
            headers=ODATA_HEADERS,
        )

    def _organization(self, req: Request) -> Response:
        """``RetrieveCurrentOrganization`` (Web API function; ``Detail`` is an ``OrganizationDetail``:
        https://learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/retrievecurrentorganization)."""
        cfg = self.schema.raw.get("dynamics", {})
        unique = str(cfg.get("organization_unique_name", "sandboxorg"))
        base = self.api_url
        return Response.json(
            {
                "@odata.context": f"{base}/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM.RetrieveCurrentOrganizationResponse",
                "Detail": {
                    "OrganizationId": self.organization_id,
                    "FriendlyName": str(cfg.get("organization_name", "Sandbox Org")),
                    "OrganizationVersion": "9.2.24101.00000",
                    "EnvironmentId": self.organization_id,
                    "DatacenterId": None,
                    "Geo": "LOCAL",
                    "TenantId": cfg.get("tenant_id"),
                    "UrlName": unique,
                    "UniqueName": unique,
                    "State": "Enabled",
                    "Endpoints": {
                        "Count": 2,
                        "IsReadOnly": False,
                        "Keys": ["WebApplication", "OrganizationService"],
                        "Values": [f"{base}/", f"{base}/XRMServices/2011/Organization.svc"],
                    },
                },
            },
            headers=ODATA_HEADERS,
        )

    def _whoami(self, req: Request) -> Response:
        return Response.json(
            {
                "@odata.context": f"{self.api_url}/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM."
                f"WhoAmIResponse",
                "BusinessUnitId": self.business_unit_id,
                "UserId": self.app_user_id,
                "OrganizationId": self.organization_id,
            },
            headers=ODATA_HEADERS,
        )

    # ------------------------------------------------------------------------------------------- batch
    def _batch(self, req: Request) -> Response:
        items = batch.parse_batch(req.header("content-type") or "", req.body)
        req.operations = sum(len(i.parts) if isinstance(i, batch.ChangeSet) else 1 for i in items)
        return batch.execute_batch(
            self.store, items, self._dispatch_inner, "odata.continue-on-error" in prefer(req)
        )

    def _dispatch_inner(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        resolve: Callable[[str], str | None],
    ) -> Response:
        parts = urlsplit(url)
        path = unquote(parts.path)
        if not path.startswith("/"):
            path = "/api/data/v9.2/" + path
        inner = Request(
            method,
            path,
            url,
            parse_qs(parts.query, keep_blank_values=True),
            {k.lower(): v for k, v in headers.items()},
            body,
        )
        route, params, _ = self.api_app.match(method, path)
        if route is None or route.name == "dynamics.batch":
            return error(
                404 if route is None else 400,
                "0x8006088a",
                f"Resource not found for the segment '{path}'."
                if route is None
                else "Batches cannot be nested.",
            )
        inner.params, inner.route = params, route.name
        with self._limit_lock:
            self.api_app.calls[route.name] += 1
            self.api_app.calls[BATCH_PARTS] += 1
        if route.name in self._with_refs:
            handler = self._with_refs[route.name]
            return guarded(lambda r: handler(r, resolve))(inner)
        return route.handler(inner)
