"""Contract tests of the Dataverse sandbox's ``Merge`` action, over raw HTTPS.

The request and the documented answer follow "Merge table rows using the Web API" (Microsoft Learn,
power-apps/developer/data-platform/webapi/merge-entity-using-web-api) and the ``Merge`` action reference:
an unbound action with ``Target``, ``Subordinate`` (both with ``@odata.type``), an optional
``UpdateContent`` and ``PerformParentingChecks``; ``204 No Content``; the subordinate is deactivated with
``merged`` = true and ``masterid`` = the target; UpdateContent's columns land on the target.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.dynamics import DynamicsSandbox
from sync_pipeline.sandbox.tls import SandboxCA

CRM = "Microsoft.Dynamics.CRM."


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SandboxCA:
    return SandboxCA.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def sb(ca: SandboxCA) -> Iterator[DynamicsSandbox]:
    ctx = ca.server_context()
    sandbox = DynamicsSandbox(clock=Clock()).start(identity_ssl=ctx, api_ssl=ctx)
    yield sandbox
    sandbox.stop()


@pytest.fixture
def api(sb: DynamicsSandbox, ca: SandboxCA) -> Iterator[httpx.Client]:
    form = {
        "grant_type": "client_credentials",
        "client_id": sb.client_id,
        "client_secret": sb.client_secret,
        "scope": f"{sb.api_url}/.default",
    }
    token = httpx.post(f"{sb.authority}/oauth2/v2.0/token", data=form, verify=str(ca.ca_path)).json()[
        "access_token"
    ]
    with httpx.Client(
        base_url=f"{sb.api_url}/api/data/v9.2/",
        verify=str(ca.ca_path),
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    ) as client:
        yield client


def _create(api: httpx.Client, entity_set: str, body: dict[str, Any]) -> str:
    resp = api.post(entity_set, json=body)
    assert resp.status_code == 204, resp.text
    return resp.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")


def _ref(table: str, pk: str, record_id: str, **extra: Any) -> dict[str, Any]:
    return {"@odata.type": CRM + table, pk: record_id, **extra}


def _merge(
    api: httpx.Client,
    table: str,
    pk: str,
    target: str,
    sub: str,
    update: dict[str, Any] | None = None,
    checks: Any = False,
) -> httpx.Response:
    body: dict[str, Any] = {
        "Target": _ref(table, pk, target),
        "Subordinate": _ref(table, pk, sub),
        "PerformParentingChecks": checks,
    }
    if update is not None:
        body["UpdateContent"] = {"@odata.type": CRM + table, **update}
    return api.post("Merge", json=body)


def test_merge_accounts_as_documented(api: httpx.Client) -> None:
    """The documentation's example: two accounts, UpdateContent sets accountnumber on the target."""
    target = _create(api, "accounts", {"name": "Account 1", "telephone1": "111"})
    sub = _create(
        api, "accounts", {"name": "Account 2", "telephone1": "222", "website": "https://two.example"}
    )
    contact = _create(
        api, "contacts", {"lastname": "Child", "parentcustomerid_account@odata.bind": f"/accounts({sub})"}
    )
    before = api.get(f"accounts({target})").json()

    resp = _merge(api, "account", "accountid", target, sub, {"accountnumber": "1234"})
    assert resp.status_code == 204 and resp.content == b""

    master = api.get(f"accounts({target})").json()
    assert master["accountnumber"] == "1234"
    assert master["telephone1"] == "111"  # existing data in the target is not overwritten
    assert int(master["versionnumber"]) > int(before["versionnumber"])
    merged = api.get(
        f"accounts({sub})", params={"$select": "statecode,statuscode,merged,_masterid_value"}
    ).json()
    assert (merged["statecode"], merged["statuscode"], merged["merged"]) == (1, 2, True)
    assert merged["_masterid_value"] == target
    # Child rows are re-parented to the target.
    child = api.get(f"contacts({contact})", params={"$select": "_parentcustomerid_value"}).json()
    assert child["_parentcustomerid_value"] == target


@pytest.mark.parametrize(
    "table,entity_set,pk,state",
    [("contact", "contacts", "contactid", (1, 2)), ("lead", "leads", "leadid", (2, 7))],
)
def test_merge_contacts_and_leads(
    api: httpx.Client, table: str, entity_set: str, pk: str, state: tuple[int, int]
) -> None:
    target = _create(api, entity_set, {"lastname": "Master", "emailaddress1": "m@example.com"})
    sub = _create(api, entity_set, {"lastname": "Dupe", "jobtitle": "Engineer"})
    assert _merge(api, table, pk, target, sub, {"jobtitle": "Engineer"}).status_code == 204
    master = api.get(f"{entity_set}({target})").json()
    assert (master["jobtitle"], master["lastname"]) == ("Engineer", "Master")
    assert master.get("statecode") in (None, 0) and not master.get("merged")
    sub_row = api.get(f"{entity_set}({sub})").json()
    assert (sub_row["statecode"], sub_row["statuscode"]) == state
    assert sub_row["merged"] is True and sub_row["_masterid_value"] == target
    # The subordinate shows up in the table's changes (a sync following a delta link sees the merge).
    rows = api.get(
        entity_set, params={"$select": f"{pk},merged,_masterid_value", "$filter": "merged eq true"}
    ).json()["value"]
    assert [r[pk] for r in rows] == [sub]


def test_merge_is_refused_when_the_documentation_says_so(api: httpx.Client) -> None:
    a = _create(api, "contacts", {"lastname": "A"})
    b = _create(api, "contacts", {"lastname": "B"})
    c = _create(api, "contacts", {"lastname": "C"})
    missing = str(uuid.uuid4())

    def error(resp: httpx.Response, status: int) -> str:
        assert resp.status_code == status, resp.text
        return resp.json()["error"]["message"]

    assert "identical" in error(_merge(api, "contact", "contactid", a, a), 400)
    assert "Does Not Exist" in error(_merge(api, "contact", "contactid", a, missing), 404)
    assert "PerformParentingChecks" in error(_merge(api, "contact", "contactid", a, b, checks=None), 400)
    no_type = api.post(
        "Merge",
        json={
            "Target": {"contactid": a},
            "Subordinate": _ref("contact", "contactid", b),
            "PerformParentingChecks": False,
        },
    )
    assert "@odata.type" in error(no_type, 400)
    opp = _create(api, "opportunities", {"name": "O"})
    other = _create(api, "opportunities", {"name": "P"})
    assert "not supported with merge" in error(_merge(api, "opportunity", "opportunityid", opp, other), 400)
    # Both records must be active: a merged subordinate cannot be merged again.
    assert _merge(api, "contact", "contactid", a, b).status_code == 204
    assert "is deactive" in error(_merge(api, "contact", "contactid", c, b), 400)
    assert "is deactive" in error(_merge(api, "contact", "contactid", b, c), 400)
    # merged is read-only: a client's PATCH is ignored, as Dataverse ignores system-managed columns.
    assert api.patch(f"contacts({c})", json={"merged": True}).status_code == 204
    assert api.get(f"contacts({c})").json().get("merged") in (None, False)


def test_parenting_checks(api: httpx.Client) -> None:
    acc1 = _create(api, "accounts", {"name": "One"})
    acc2 = _create(api, "accounts", {"name": "Two"})
    a = _create(
        api, "contacts", {"lastname": "A", "parentcustomerid_account@odata.bind": f"/accounts({acc1})"}
    )
    b = _create(
        api, "contacts", {"lastname": "B", "parentcustomerid_account@odata.bind": f"/accounts({acc2})"}
    )
    refused = _merge(api, "contact", "contactid", a, b, checks=True)
    assert refused.status_code == 400 and "parent" in refused.json()["error"]["message"]
    assert not api.get(f"contacts({b})").json().get("merged")  # nothing happened
    assert _merge(api, "contact", "contactid", a, b, checks=False).status_code == 204
