"""`sync-pipeline rollback` and the before-values of `plan`, against a harness that has synced."""

from __future__ import annotations

import csv

from click.testing import CliRunner

from sync_pipeline.cli import main
from sync_pipeline.engine.store.state import utcnow


def invoke(*args: str) -> click.testing.Result:  # noqa: F821
    return CliRunner(env={"COLUMNS": "400"}).invoke(main, list(args), catch_exceptions=False)


def test_rollback_needs_a_run_or_a_time(tmp_path) -> None:
    store = tmp_path / "s.duckdb"
    assert invoke("rollback", "--state", str(store)).exit_code == 2
    assert invoke("rollback", "r1", "--since", "2026-08-01T00:00:00Z", "--state", str(store)).exit_code == 2
    result = invoke("rollback", "--since", "yesterday", "--state", str(store))
    assert result.exit_code == 2 and "not an ISO time" in result.output


def test_rollback_dry_run_table_csv_since_created_and_flags(harness, tmp_path) -> None:
    sb = harness.sandbox
    assert harness.run("latest").success
    account = harness.query("SELECT dynamics_id FROM identity WHERE entity = 'account' ORDER BY 1 LIMIT 1")[
        0
    ][0]
    contacts = harness.query("""SELECT dynamics_id, marketo_id FROM identity WHERE entity = 'contact'
                                AND state = 'active' ORDER BY 1 LIMIT 2""")
    (contact, person), (gone, gone_person) = contacts
    # A marketer edits the company in Marketo: the base (what the sync last wrote) is stale now.
    from sync_pipeline.cli.ops import _clients

    stack, _, marketo = _clients()
    with stack:
        marketo.get_client().upsert_objects(
            "companies", [{"externalCompanyId": account, "mainPhone": "+1 555 0700"}], action="updateOnly"
        )
    old_phone = "+1 555 0700"
    old_contact_phone = sb.marketo_get_lead(int(person)).get("phone")

    # `plan` shows the real before-value of a one-way write: what Marketo holds (it used to show "-").
    sb.dynamics_update("account", account, {"telephone1": "+1 555 0701"})
    plan_csv = tmp_path / "plan.csv"
    assert invoke("plan", "--entity", "account", "--csv", str(plan_csv)).exit_code == 0
    row = next(
        r
        for r in csv.DictReader(plan_csv.open())
        if r["dynamics_id"] == account and r["field"] == "mainPhone"
    )
    assert (row["before"], row["after"]) == ("+1 555 0700", "+1 555 0701")
    # Marketo cannot be read: the before-value is unknown, and `plan` says so (not "-", not blank).
    sb.faults(
        [{"pattern": "marketo.companies.get", "rate": 1.0, "faults": [{"kind": "code", "code": "1003"}]}]
    )
    try:
        assert invoke("plan", "--entity", "account", "--csv", str(plan_csv)).exit_code == 0
    finally:
        sb.clear_faults()
    row = next(
        r
        for r in csv.DictReader(plan_csv.open())
        if r["dynamics_id"] == account and r["field"] == "mainPhone"
    )
    assert row["before"] == "(unknown)"

    since = utcnow()
    sb.dynamics_update("contact", contact, {"telephone1": "+1 555 0702"})
    sb.dynamics_delete("contact", gone)  # -> the person is flagged dynamicsIsDeleted
    sb.dynamics_insert(
        "contact",
        {
            "contactid": "0000cafe-0000-4000-8000-000000000001",
            "firstname": "Brand",
            "lastname": "New",
            "emailaddress1": "brand.new@example.org",
            "new_synctomkto": True,
        },
    )
    run = harness.run("latest")
    assert run.success
    assert sb.marketo_get_lead(int(gone_person))["dynamicsIsDeleted"] is True
    created = sb.marketo_find_leads("dynamicsId", "0000cafe-0000-4000-8000-000000000001")
    assert len(created) == 1

    # The dry run: columns, totals, the CSV; nothing written.
    rb_csv = tmp_path / "rollback.csv"
    dry = invoke("rollback", run.run_id, "--csv", str(rb_csv))
    assert dry.exit_code == 0, dry.output
    for column in ("before the run", "the run wrote", "now", "will do", "dry run"):
        assert column in dry.output
    assert "totals: restore" in dry.output and "skip: created" in dry.output
    rows = list(csv.DictReader(rb_csv.open()))
    phone = next(r for r in rows if r["dynamics_id"] == account and r["field"] == "mainPhone")
    assert (phone["before_the_run"], phone["the_run_wrote"], phone["now"], phone["will_do"]) == (
        "+1 555 0700",
        "+1 555 0701",
        "+1 555 0701",
        "restore",
    )
    flag = next(r for r in rows if r["dynamics_id"] == gone and r["field"] == "dynamicsIsDeleted")
    assert (flag["before_the_run"], flag["now"], flag["will_do"]) == ("false", "true", "restore")
    assert sb.marketo_get_lead(int(gone_person))["dynamicsIsDeleted"] is True

    # --since: every run after the time, newest first, with --delete-created for the unchanged new person.
    done = invoke("rollback", "--since", since.isoformat(), "--delete-created", "--yes")
    assert done.exit_code == 0, done.output
    assert "deleted 1 person(s)" in done.output
    assert sb.marketo_find_leads("dynamicsId", "0000cafe-0000-4000-8000-000000000001") == []
    assert sb.marketo_get_lead(int(person)).get("phone") == old_contact_phone
    assert sb.marketo_get_lead(int(gone_person))["dynamicsIsDeleted"] is False
    assert (
        next(c for c in sb.marketo_rows("company", limit=100_000) if c["externalCompanyId"] == account)[
            "mainPhone"
        ]
        == old_phone
    )

    # The next sync brings nothing back: no re-created person, no re-flag, no re-pushed phone.
    assert harness.run("latest").success
    assert sb.marketo_find_leads("dynamicsId", "0000cafe-0000-4000-8000-000000000001") == []
    assert sb.marketo_get_lead(int(gone_person))["dynamicsIsDeleted"] is False
    assert sb.marketo_get_lead(int(person)).get("phone") == old_contact_phone
    assert harness.query(
        "SELECT state FROM identity WHERE dynamics_id = ?", ["0000cafe-0000-4000-8000-000000000001"]
    ) == [("tombstoned",)]
