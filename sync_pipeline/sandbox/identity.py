"""An Entra ID (Azure AD v2.0) style identity endpoint for the sandbox.

Serves what an unmodified ``msal.ConfidentialClientApplication`` asks for in the client-credentials flow:

- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (and ``/{tenant}/.well-known/...``): tenant
  discovery (route ``identity.openid``);
- ``GET /common/discovery/instance``: instance discovery, for clients that leave it on (``identity.instance``);
- ``POST /{tenant}/oauth2/v2.0/token``: ``grant_type=client_credentials`` with ``client_id`` +
  ``client_secret`` and ``scope=<api url>/.default`` (``identity.token``).

Errors use the identity platform's body (``error``, ``error_description`` starting with the AADSTS code,
``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``). Access tokens are opaque random strings
kept in a :class:`TokenTable` that the API server consults; expiry follows the sandbox :class:`Clock`.
"""

from __future__ import annotations

import re
import secrets
import threading
import uuid
from dataclasses import dataclass

from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.http import App, Request, Response


@dataclass(frozen=True)
class IssuedToken:
    client_id: str
    audience: str  # the API base URL the token is for
    expires_at: float  # sandbox clock timestamp


class TokenTable:
    """Opaque bearer tokens issued by the identity app and accepted by the API app."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._tokens: dict[str, IssuedToken] = {}
        self._lock = threading.Lock()

    def issue(self, client_id: str, audience: str, lifetime: int) -> str:
        token = secrets.token_urlsafe(48)
        with self._lock:
            now = self.clock.timestamp()
            # Forget long-expired tokens so a long soak does not grow the table without bound.
            if len(self._tokens) > 1000:
                self._tokens = {k: v for k, v in self._tokens.items() if v.expires_at > now}
            self._tokens[token] = IssuedToken(client_id, audience, now + lifetime)
        return token

    def check(self, token: str, audience: str) -> tuple[IssuedToken | None, str]:
        """(token info, "") when valid for ``audience``; otherwise (None, why it is refused)."""
        with self._lock:
            info = self._tokens.get(token)
        if info is None:
            return None, "invalid_token"
        if info.audience.rstrip("/").lower() != audience.rstrip("/").lower():
            return None, "invalid_audience"
        if info.expires_at <= self.clock.timestamp():
            return None, "expired"
        return info, ""

    def revoke_all(self) -> None:
        with self._lock:
            self._tokens.clear()


_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::\d{1,5})?")


def _loopback_alias(url: str) -> str:
    """The sandbox's API is the same resource whether named ``localhost`` or ``127.0.0.1``."""
    return url.replace("://127.0.0.1:", "://localhost:")


def _aad_error(status: int, error: str, code: int, description: str) -> Response:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    timestamp = Clock().now().strftime("%Y-%m-%d %H:%M:%SZ")
    text = (
        f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {timestamp}"
    )
    return Response.json(
        {
            "error": error,
            "error_description": text,
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        },
        status,
    )


class IdentityService:
    """The identity App plus its registered client (one app registration, as in a real tenant)."""

    def __init__(
        self,
        *,
        tenant_id: str,
        client_id: str,
        client_secret: str,
        tokens: TokenTable,
        token_lifetime: int = 3599,
    ):
        self.tenant_id = tenant_id
        self.client_id = client_id
        self._client_secret = client_secret
        self.tokens = tokens
        self.token_lifetime = token_lifetime
        self.audience = ""  # the API base URL; set once the API server knows its port
        self.base_url = ""  # this server's URL; set once started
        self.app = App("identity")
        self._register()

    def __repr__(self) -> str:  # never show the secret
        return f"IdentityService(tenant_id={self.tenant_id!r}, client_id={self.client_id!r})"

    def _register(self) -> None:
        app = self.app
        app.route(
            "GET", r"/(?P<tenant>[^/]+)(?:/v2\.0)?/\.well-known/openid-configuration", "identity.openid"
        )(self.openid_configuration)
        app.route("GET", r"/common/discovery/instance", "identity.instance")(self.instance_discovery)
        app.route("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", "identity.token")(self.token)
        app.render_fault = self._render_fault

    def _render_fault(self, fault, req: Request) -> Response | None:  # noqa: ANN001 - Fault
        if fault.kind == "status":
            return _aad_error(
                fault.status,
                "temporarily_unavailable",
                50196 if fault.status == 429 else 90033,
                "The service is temporarily unavailable.",
            )
        if fault.kind == "unauthorized":
            return _aad_error(401, "invalid_client", 7000215, "Invalid client secret provided.")
        if fault.kind == "throttle":
            resp = _aad_error(429, "temporarily_unavailable", 50196, "The server is busy; retry later.")
            resp.headers["Retry-After"] = str(int(fault.seconds) or 1)
            return resp
        return None

    def _tenant_ok(self, tenant: str) -> bool:
        return tenant.lower() in (self.tenant_id.lower(), "organizations", "common")

    def _origin(self, req: Request) -> str:
        """``scheme://host:port`` as the client addressed this server (its Host header), else our own URL.

        Entra ID's discovery document names the issuer and endpoints on the host the client asked
        (https://learn.microsoft.com/entra/identity-platform/v2-protocols-oidc#find-your-apps-openid-configuration-document-uri);
        MSAL checks that the ``issuer`` matches the authority it was given, so a client configured with
        ``127.0.0.1`` must get ``127.0.0.1`` back, one configured with ``localhost`` must get ``localhost``.
        """
        host = (req.header("host") or "").strip()
        if not _HOST.fullmatch(host):
            return self.base_url
        return f"{self.base_url.split('://', 1)[0]}://{host}"

    def openid_configuration(self, req: Request) -> Response:
        tenant = req.params["tenant"]
        if not self._tenant_ok(tenant):
            return _aad_error(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure "
                "you have the correct tenant ID and are signing into the correct cloud.",
            )
        origin = self._origin(req)
        base = f"{origin}/{self.tenant_id}"
        return Response.json(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": f"{origin}/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid", "oid"],
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
            }
        )

    def instance_discovery(self, req: Request) -> Response:
        origin = self._origin(req)
        host = origin.split("://", 1)[-1]
        return Response.json(
            {
                "tenant_discovery_endpoint": f"{origin}/{self.tenant_id}/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            }
        )

    def token(self, req: Request) -> Response:
        if not self._tenant_ok(req.params["tenant"]):
            return _aad_error(400, "invalid_request", 90002, f"Tenant '{req.params['tenant']}' not found.")
        form = {k: v[-1] for k, v in req.form().items()}
        grant = form.get("grant_type", "")
        if grant != "client_credentials":
            return _aad_error(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant}'.",
            )
        client_id = form.get("client_id", "")
        if client_id.lower() != self.client_id.lower():
            return _aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{self.tenant_id}'.",
            )
        if not secrets.compare_digest(form.get("client_secret", ""), self._client_secret):
            return _aad_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the "
                "secret being sent in the request is the client secret value, not the client "
                f"secret ID, for a secret added to app '{self.client_id}'.",
            )
        scopes = form.get("scope", "").split()
        wanted = f"{self.audience.rstrip('/')}/.default"
        resource_scopes = [s for s in scopes if s not in ("openid", "profile", "offline_access")]
        if len(resource_scopes) != 1 or _loopback_alias(resource_scopes[0].lower()) != _loopback_alias(
            wanted.lower()
        ):
            return _aad_error(
                400,
                "invalid_scope",
                70011,
                f"The provided request must include a 'scope' input "
                f"parameter. The provided value for the input parameter 'scope' is not valid. "
                f"The scope {' '.join(scopes) or '(none)'} is not valid; expected {wanted}.",
            )
        token = self.tokens.issue(self.client_id, self.audience, self.token_lifetime)
        return Response.json(
            {
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
                "ext_expires_in": self.token_lifetime,
                "access_token": token,
            },
            headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"},
        )
