"""The Marketo sandbox: a local server speaking the Marketo REST, bulk and identity APIs.

Routes (names are what ``app.calls`` counts and fault rules match):

- identity: ``marketo.identity`` (GET|POST /identity/oauth/token)
- leads: ``marketo.leads.describe``, ``marketo.leads.describe2``, ``marketo.leads.get`` (GET, and POST
  ?_method=GET), ``marketo.leads.byid``, ``marketo.leads.sync``, ``marketo.leads.delete``, ``marketo.leads.merge``
- activities: ``marketo.activities.types``, ``marketo.activities.pagingtoken``, ``marketo.activities.leadchanges``,
  ``marketo.activities.deletedleads``, ``marketo.activities``
- bulk: ``marketo.bulk.export.{create,enqueue,status,file,cancel,list}`` (leads and activities),
  ``marketo.bulk.import.{create,status,failures,warnings}``
- ``marketo.{companies,opportunities,roles,salespersons,customobjects}.{describe,get,sync,delete}`` and
  ``marketo.customobjects.list``
- assets (read side, :mod:`~sync_pipeline.sandbox.marketo.api_assets`): ``marketo.assets.<kind>.{browse,byid,byname}``,
  ``marketo.assets.folder.tokens``, ``marketo.assets.segmentation.segments``; lead-database views
  ``marketo.lists.{get,byid,leads,ismember}`` and ``marketo.campaigns.{get,byid}``

Fault kinds beyond the shared ones: ``code`` (``Fault(kind="code", code="606")``: that API error inside
an HTTP 200 body) and ``partial`` (the call runs, but every other input record of a write is skipped with
the fault's code, default 1001).
"""

from __future__ import annotations

import re
import ssl as ssl_module
import threading
import uuid
from typing import Any
from urllib.parse import parse_qs

from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.faults import Fault
from sync_pipeline.sandbox.http import App, Request, Response, SandboxServer
from sync_pipeline.sandbox.marketo import api_assets, api_bulk, api_leads, api_objects, api_schema
from sync_pipeline.sandbox.marketo.bulk import BulkService
from sync_pipeline.sandbox.marketo.limits import LimitGate, MarketoLimits
from sync_pipeline.sandbox.marketo.store import MarketoStore
from sync_pipeline.sandbox.marketo.wire import ERROR_MESSAGES, ApiError, error
from sync_pipeline.sandbox.schema import SandboxSchema, load_schema

# Calls the rate/quota gate admitted (counted only while limits are on): every REST and bulk call, not the
# identity endpoint, not calls refused for their token (601/602). The benchmark's API-budget floor is computed
# from this number (sync_pipeline.bench.floor.budget_floor).
COUNTED = "limits.marketo.calls"
MAX_URI_BYTES = 8 * 1024
MAX_BODY_BYTES = 1024 * 1024
MAX_IMPORT_BODY = 10 * 1024 * 1024 + 64 * 1024  # the file plus multipart framing
# Bulk import uploads: leads, and custom objects (POST /bulk/v1/customobjects/{apiName}/import.json).
IMPORT_UPLOAD = re.compile(r"^/bulk/v1/(leads|customobjects/[A-Za-z0-9_]+/import)\.json$")


def _override(req: Request) -> str:
    method = req.arg("_method")
    if method is None and "application/x-www-form-urlencoded" in (req.header("content-type") or "").lower():
        try:
            values = req.form().get("_method")
            method = values[-1] if values else None
        except UnicodeDecodeError:
            method = None
    return (method or "").upper()


class _MarketoApp(App):
    def dispatch(self, req: Request) -> Response:
        # The real API's only HTTP-level errors: 414 for URIs over 8 KB, 413 for bodies over 1 MB
        # (10 MB for a bulk import file).
        if len(req.raw_path.encode()) > MAX_URI_BYTES:
            return Response.text("Request-URI Too Long", 414)
        limit = MAX_IMPORT_BODY if IMPORT_UPLOAD.match(req.path) else MAX_BODY_BYTES
        if len(req.body) > limit:
            return Response.text("Request Entity Too Large", 413)
        # POST with _method=GET is a GET whose query string travels in the body (URIs over 8 KB). The override is
        # an ordinary request parameter, so it is honoured in the query string and in an
        # application/x-www-form-urlencoded body alike, for every endpoint that has a GET form (Adobe, "Leads",
        # Query, and the Companies/Opportunities/Custom Objects pages:
        # https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/leads).
        if req.method == "POST" and _override(req) == "GET":
            req.method = "GET"
        return super().dispatch(req)

    def not_found(self, req: Request, path_matched: bool) -> Response:
        if path_matched:
            return error("605", f"Request method '{req.method}' not supported")
        return Response.json(
            {
                "requestId": "",
                "success": False,
                "errors": [{"code": "610", "message": "Requested resource not found"}],
            },
            404,
        )


class MarketoSandbox:
    def __init__(
        self,
        schema: SandboxSchema | None = None,
        *,
        clock: Clock | None = None,
        limits: dict[str, Any] | None = None,
        token_lifetime: int = 3600,
        store: MarketoStore | None = None,
    ):
        self.schema = schema or load_schema()
        self.clock = clock or (store.clock if store else Clock())
        self.store = store or MarketoStore(self.schema, self.clock)
        cfg = self.schema.raw.get("marketo", {})
        self.client_id: str = cfg.get("client_id", "marketo-sandbox-client")
        self.client_secret: str = cfg.get("client_secret", "marketo-sandbox-secret")
        self.munchkin_id: str = cfg.get("munchkin_id", "000-AAA-000")
        self.api_user: str = cfg.get("api_user", "api@sandbox.example")
        self.token_lifetime = token_lifetime
        self.gate = LimitGate(self.clock, MarketoLimits.from_dict(limits))
        self.bulk = BulkService(self.store, lambda: self.gate.limits)
        self.app = _MarketoApp("marketo")
        self.app.before = self._before
        self.app.after = self._after
        self.app.render_fault = self._render_fault
        self._token_lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> expiry (sandbox epoch seconds)
        self._current: str | None = None
        self._server: SandboxServer | None = None
        self.app.route("GET", r"/identity/oauth/token", "marketo.identity")(self._identity)
        self.app.route("POST", r"/identity/oauth/token", "marketo.identity")(self._identity)
        api_leads.register(self)
        api_assets.register(self)
        api_objects.register(self)
        api_bulk.register(self)
        api_schema.register(self)
        for route in self.app.routes:
            route.handler = self._api_errors(route.handler)

    def __repr__(self) -> str:
        return f"MarketoSandbox(munchkin_id={self.munchkin_id!r}, base_url={self.base_url if self._server else None!r})"

    # ------------------------------------------------------------------ lifecycle
    def start(
        self, host: str = "127.0.0.1", ssl: ssl_module.SSLContext | None = None, port: int = 0
    ) -> MarketoSandbox:
        self._server = SandboxServer(self.app, host, port, ssl).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> MarketoSandbox:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("Marketo sandbox is not started")
        return self._server.url

    @property
    def identity_url(self) -> str:
        return f"{self.base_url}/identity"

    def set_limits(self, limits: dict[str, Any] | None) -> None:
        self.gate.limits = MarketoLimits.from_dict(limits)

    # ------------------------------------------------------------------ identity and auth
    def _identity(self, req: Request) -> Response:
        args = {k: v[-1] for k, v in req.query.items()}
        if req.method == "POST" and req.body:
            args.update({k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()})
        if args.get("grant_type") != "client_credentials":
            return Response.json(
                {
                    "error": "unsupported_grant_type",
                    "error_description": "grant_type must be client_credentials",
                },
                400,
            )
        if args.get("client_id") != self.client_id or args.get("client_secret") != self.client_secret:
            return Response.json(
                {"error": "unauthorized", "error_description": "Bad client credentials"}, 401
            )
        now = self.clock.timestamp()
        with self._token_lock:
            if self._current is None or self._tokens[self._current] <= now:
                self._current = f"{uuid.uuid4()}:ab"
                self._tokens[self._current] = now + self.token_lifetime
            remaining = max(0, int(self._tokens[self._current] - now))
            token = self._current
        return Response.json(
            {"access_token": token, "token_type": "bearer", "expires_in": remaining, "scope": self.api_user}
        )

    def _check_token(self, req: Request) -> Response | None:
        auth = req.header("authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else (req.arg("access_token") or "")
        with self._token_lock:
            expiry = self._tokens.get(token)
        if expiry is None:
            return error("601")
        if expiry <= self.clock.timestamp():
            return error("602")
        return None

    def _before(self, req: Request) -> Response | None:
        if req.route == "marketo.identity":
            return None
        rejected = self._check_token(req)
        if rejected is not None:
            return rejected
        refused = self.gate.enter()
        if refused is not None:
            return error(*refused)
        req.gated = True  # type: ignore[attr-defined]
        if self.gate.active:
            with self.app._lock:
                self.app.calls[COUNTED] += 1
        return None

    def _after(self, req: Request) -> None:
        if getattr(req, "gated", False):
            self.gate.leave()

    # ------------------------------------------------------------------ errors and faults
    @staticmethod
    def _api_errors(handler: Any) -> Any:
        def run(req: Request) -> Response:
            try:
                return handler(req)
            except ApiError as exc:
                return error(exc.code, exc.message)

        return run

    def _render_fault(self, fault: Fault, req: Request) -> Response | None:
        if fault.kind == "code":
            code = fault.code or "611"
            return error(code, ERROR_MESSAGES.get(code, "Injected error"))
        if fault.kind == "partial":
            route = self.app.match(req.method, req.path)[0]
            assert route is not None  # dispatch matched it before drawing the fault
            req.partial_code = fault.code or "1001"  # type: ignore[attr-defined]
            early = self._before(req)
            if early is not None:
                return early
            try:
                return route.handler(req)
            finally:
                self._after(req)
        return None
