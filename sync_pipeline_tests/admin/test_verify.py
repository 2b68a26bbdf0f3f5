"""verify.compare: both systems read over HTTP agree after a sync, and a drift the rules do not explain shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sync_pipeline.admin.verify import RECORD, Difference, compare
from sync_pipeline.clients.dynamics import DynamicsClient
from sync_pipeline.clients.marketo import MarketoClient
from sync_pipeline.config.model import load_config


@pytest.fixture
def clients(harness) -> Iterator[tuple[DynamicsClient, MarketoClient]]:
    s = harness.sandbox.settings()
    dyn = DynamicsClient(
        s["DYNAMICS_URL"],
        s["DYNAMICS_AUTHORITY"],
        s["DYNAMICS_CLIENT_ID"],
        s["DYNAMICS_CLIENT_SECRET"],
        verify=s["SYNC_CA_BUNDLE"],
    )
    mkto = MarketoClient(
        s["MARKETO_BASE_URL"], s["MARKETO_CLIENT_ID"], s["MARKETO_CLIENT_SECRET"], verify=s["SYNC_CA_BUNDLE"]
    )
    yield dyn, mkto
    dyn.close()
    mkto.close()


def _person_id(sb, dynamics_id: str) -> int:
    (mid,) = [p["id"] for p in sb.marketo_rows("lead", 100_000) if p.get("dynamicsId") == dynamics_id]
    return mid


def test_after_sync_both_sides_agree_and_unsynced_drift_is_reported(harness, clients) -> None:
    sb, config = harness.sandbox, load_config()
    harness.run("latest")  # initial copy
    contacts = [
        r[0]
        for r in harness.query(
            "SELECT dynamics_id FROM identity WHERE entity = 'contact' "
            "AND state = 'active' AND how = 'created' ORDER BY 1 LIMIT 4"
        )
    ]
    account, company_id = harness.query(
        "SELECT dynamics_id, marketo_id FROM identity WHERE entity = 'account' ORDER BY 1 LIMIT 1"
    )[0]
    # Edits on both sides, including ones the rules keep apart (filter, Marketo delete).
    sb.dynamics_update("contact", contacts[0], {"telephone1": "+1 555 0700"})
    sb.marketo_update_lead(_person_id(sb, contacts[1]), {"title": "Verified Title"})
    sb.dynamics_update("contact", contacts[2], {"new_synctomkto": False, "jobtitle": "Not synced"})
    sb.marketo_delete_lead(_person_id(sb, contacts[3]))
    sb.dynamics_update("account", account, {"name": "Verified Account"})
    sb.marketo_create_lead({"email": "vera.verify@example.org", "lastName": "Verify", "leadScore": 80})
    harness.run("latest")
    harness.run("latest")  # values Dynamics assigned to the lead it created (owner, status) come back
    dyn, mkto = clients
    # The instance's own companies (keyed mkto-<seed>-<n>, no Dynamics account) are not the sync's: present, edited by
    # a marketer, and still no difference.
    own = sorted(
        c["externalCompanyId"]
        for c in sb.marketo_rows("company", 100_000)
        if c["externalCompanyId"].startswith("mkto-")
    )
    assert own
    assert (
        mkto.upsert_objects("companies", [{"externalCompanyId": own[0], "company": "Renamed in Marketo"}])[
            0
        ].status
        == "updated"
    )
    assert compare(config, dyn, mkto, harness.state_path) == []

    # Drift nobody synced yet is reported field by field, with canonical values from both sides.
    drifted = [
        r[0]
        for r in harness.query(
            "SELECT dynamics_id FROM identity WHERE entity = 'contact' "
            "AND state = 'active' AND how = 'created' ORDER BY 1 DESC LIMIT 2"
        )
    ]
    person = _person_id(sb, drifted[0])
    sb.marketo_update_lead(person, {"city": "Driftwood"})
    sb.dynamics_update("account", account, {"numberofemployees": 77})
    # A Marketo edit to a field that only flows to Marketo is not a difference (direction rule).
    sb.marketo_update_lead(_person_id(sb, drifted[1]), {"leadStatus": "Marketo-only status"})
    city = sb.dynamics_get("contact", drifted[0]).get("address1_city")
    employees = next(o for o in sb.marketo_rows("company", 1000) if o["externalCompanyId"] == account)
    assert compare(config, dyn, mkto, harness.state_path) == [
        Difference(
            "account",
            account,
            company_id,
            "numberOfEmployees",
            "77",
            None if employees.get("numberOfEmployees") is None else str(employees["numberOfEmployees"]),
        ),
        Difference("contact", drifted[0], str(person), "city", city.strip() if city else None, "Driftwood"),
    ]
    # A person deleted in Marketo that the sync has not seen yet: the whole record is missing there.
    sb.marketo_delete_lead(person)
    diffs = compare(config, dyn, mkto, harness.state_path)
    assert Difference("contact", drifted[0], str(person), RECORD, drifted[0], None) in diffs


def test_compare_without_a_state_store_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run a sync first"):
        compare(load_config(), object(), object(), tmp_path / "missing.duckdb")
