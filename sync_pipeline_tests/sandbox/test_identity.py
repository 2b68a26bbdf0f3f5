"""Entra ID discovery of the sandbox: the OpenID configuration names the host the client used.

Microsoft identity platform, "OpenID Connect on the Microsoft identity platform", Find your app's OpenID
configuration document URI: https://learn.microsoft.com/entra/identity-platform/v2-protocols-oidc
MSAL validates the discovered ``issuer`` against the authority it was configured with, so the sandbox must
answer ``127.0.0.1`` to a client that asked ``127.0.0.1`` and ``localhost`` to one that asked ``localhost``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import msal
import pytest

from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.dynamics import DynamicsSandbox
from sync_pipeline.sandbox.tls import SandboxCA


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DynamicsSandbox, SandboxCA]]:
    ca = SandboxCA.create(tmp_path_factory.mktemp("tls"))
    ctx = ca.server_context()
    sb = DynamicsSandbox(clock=Clock()).start(identity_ssl=ctx, api_ssl=ctx)
    yield sb, ca
    sb.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_issuer_and_endpoints_follow_the_host_asked(
    env: tuple[DynamicsSandbox, SandboxCA], host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb, ca = env
    port = sb.identity_url.rsplit(":", 1)[1]
    authority = f"https://{host}:{port}/{sb.tenant_id}"
    for path in ("/v2.0/.well-known/openid-configuration", "/.well-known/openid-configuration"):
        doc = httpx.get(authority + path, verify=str(ca.ca_path)).json()
        assert doc["issuer"] == f"{authority}/v2.0"
        assert doc["token_endpoint"] == f"{authority}/oauth2/v2.0/token"
        assert doc["authorization_endpoint"].startswith(authority) and doc["jwks_uri"].startswith(authority)
    # An unmodified MSAL client configured with this host gets a token the API accepts.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    # instance_discovery=False as for any authority MSAL does not know (it would ask login.microsoftonline.com).
    app = msal.ConfidentialClientApplication(
        sb.client_id,
        authority=authority,
        client_credential=sb.client_secret,
        verify=str(ca.ca_path),
        instance_discovery=False,
    )
    api_port = sb.api_url.rsplit(":", 1)[1]
    result = app.acquire_token_for_client(scopes=[f"https://{host}:{api_port}/.default"])
    assert result.get("token_type") == "Bearer", result
    who = httpx.get(
        f"{sb.api_url}/api/data/v9.2/WhoAmI",
        verify=str(ca.ca_path),
        headers={"Authorization": f"Bearer {result['access_token']}"},
    )
    assert who.status_code == 200 and who.json()["UserId"] == sb.app_user_id


def test_a_forged_host_header_falls_back_to_the_servers_own_name(
    env: tuple[DynamicsSandbox, SandboxCA],
) -> None:
    sb, ca = env
    doc = httpx.get(
        f"{sb.authority}/v2.0/.well-known/openid-configuration",
        verify=str(ca.ca_path),
        headers={"Host": "evil.example/x?"},
    ).json()
    assert doc["issuer"] == f"{sb.authority}/v2.0"
