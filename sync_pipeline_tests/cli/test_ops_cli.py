"""The operating commands against a harness that has synced: plan, status, errors, rollback, rebaseline."""

from __future__ import annotations

import csv
import os

import pytest
from click.testing import CliRunner

from sync_pipeline.cli import main

OPS_COMMANDS = ("plan", "status", "errors", "rollback", "rebaseline")


def invoke(*args: str) -> click.testing.Result:  # noqa: F821
    # Wide enough that no cell wraps, so texts can be asserted whole.
    return CliRunner(env={"COLUMNS": "400"}).invoke(main, list(args), catch_exceptions=False)


def linked(harness, entity: str) -> tuple[str, int]:
    did, mid = harness.query(
        """SELECT dynamics_id, marketo_id FROM identity WHERE entity = ? AND state = 'active'
                                ORDER BY dynamics_id LIMIT 1""",
        [entity],
    )[0]
    return did, int(mid)


@pytest.mark.parametrize("command", OPS_COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "--state" in result.output and "SYNC_STATE_PATH" in result.output


def test_missing_store_and_bad_usage_are_explained(tmp_path) -> None:
    missing = tmp_path / "nope.duckdb"
    result = invoke("status", "--state", str(missing))
    assert result.exit_code == 1 and "no state store at" in result.output and "nope.duckdb" in result.output
    assert not missing.exists()  # a read-only command never creates the store
    result = invoke("errors", "--state", str(missing), "--entity", "martian")
    assert result.exit_code == 2 and "martian" in result.output and "contact" in result.output
    result = invoke("rebaseline", "--state", str(missing))
    assert result.exit_code == 2 and "--yes" in result.output
    result = invoke("errors", "--release", "x", "--release-all", "--state", str(missing))
    assert result.exit_code == 2


def test_plan_previews_both_directions_without_writing_then_the_sync_does_exactly_that(
    harness, tmp_path
) -> None:
    sb = harness.sandbox
    assert harness.run("latest").success
    contact_id, contact_person = linked(harness, "contact")
    lead_id, lead_person = linked(harness, "lead")
    sb.dynamics_update("contact", contact_id, {"telephone1": "+1 555 0101"})
    sb.marketo_update_lead(lead_person, {"title": "Chief Preview Officer"})
    ledger_before = harness.query("SELECT count(*) FROM ledger")[0][0]
    cursors_before = harness.query("SELECT name, value FROM cursors ORDER BY name")

    out_csv = tmp_path / "plan.csv"
    result = invoke("plan", "--csv", str(out_csv))
    assert result.exit_code == 0, result.output
    assert "+1 555 0101" in result.output and "Chief Preview Officer" in result.output
    rows = list(csv.DictReader(out_csv.open()))
    phone = [r for r in rows if r["dynamics_id"] == contact_id and r["field"] == "phone"]
    title = [r for r in rows if r["dynamics_id"] == lead_id and r["field"] == "title"]
    assert [(r["entity"], r["target"], r["op"], r["after"]) for r in phone] == [
        ("contact", "marketo", "update", "+1 555 0101")
    ]
    assert [(r["entity"], r["target"], r["op"], r["after"]) for r in title] == [
        ("lead", "dynamics", "update", "Chief Preview Officer")
    ]
    assert all(r["rule"] for r in rows)
    # Nothing was written: not to Marketo, not to Dynamics, not to the ledger.
    assert sb.marketo_get_lead(contact_person).get("phone") != "+1 555 0101"
    assert sb.dynamics_get("lead", lead_id).get("jobtitle") != "Chief Preview Officer"
    assert harness.query("SELECT count(*) FROM ledger")[0][0] == ledger_before
    # The preview ran on a copy (issue 15 changed this: it used to extract into the real store): the store's
    # cursors and pending marks are untouched, so the next sync reads the changes itself.
    result = invoke("status")
    assert result.exit_code == 0, result.output
    status_rows = {
        line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5
    }
    assert {"systemuser", "account", "lead", "contact", "opportunity", "project"} <= set(status_rows)
    assert harness.query("SELECT name, value FROM cursors ORDER BY name") == cursors_before
    assert harness.query("SELECT count(*) FROM d_contact WHERE pending_seq IS NOT NULL")[0][0] == 0

    # The next sync writes what the preview showed.
    assert harness.run("latest").success
    written = harness.query(
        """SELECT entity, target, op, field, value_after FROM ledger WHERE dynamics_id IN (?, ?)
                               AND field IN ('phone', 'title') AND op = 'update'""",
        [contact_id, lead_id],
    )
    assert sorted(written) == [
        ("contact", "marketo", "update", "phone", "+1 555 0101"),
        ("lead", "dynamics", "update", "title", "Chief Preview Officer"),
    ]
    assert sb.marketo_get_lead(contact_person)["phone"] == "+1 555 0101"
    assert harness.query("SELECT count(*) FROM d_contact WHERE pending_seq IS NOT NULL")[0][0] == 0


def test_plan_for_one_entity_only_plans_that_entity(harness, tmp_path) -> None:
    assert harness.run("latest").success
    account_id = harness.query("SELECT dynamics_id FROM identity WHERE entity = 'account' LIMIT 1")[0][0]
    harness.sandbox.dynamics_update("account", account_id, {"telephone1": "+44 20 0000 0001"})
    out_csv = tmp_path / "plan.csv"
    result = invoke("plan", "--entity", "account", "--limit", "5", "--csv", str(out_csv))
    assert result.exit_code == 0, result.output
    assert "+44 20 0000 0001" in result.output
    entities = {r["entity"] for r in csv.DictReader(out_csv.open())}
    assert entities == {"account"}


def test_status_errors_and_release_of_a_held_record(harness) -> None:
    sb = harness.sandbox
    assert harness.run("latest").success
    account_id = harness.query("SELECT dynamics_id FROM identity WHERE entity = 'account' LIMIT 1")[0][0]
    sb.dynamics_update("account", account_id, {"industrycode": 999})  # no such option: the record is rejected
    assert harness.run("latest").success

    result = invoke("errors")
    assert result.exit_code == 0, result.output
    assert account_id in result.output and "unknown option code 999" in result.output
    result = invoke("status")
    lines = result.output.splitlines()
    header = [c.strip() for c in next(line for line in lines if "┃ entity" in line).split("┃")]
    account_line = next(line for line in lines if "│ account" in line)
    cells = dict(zip(header, (c.strip() for c in account_line.split("│")), strict=False))
    assert (cells["held"], cells["conflicts"]) == ("1", "0")

    result = invoke("errors", "--release", "no-such-id")
    assert result.exit_code == 1 and "no-such-id" in result.output
    result = invoke("errors", "--entity", "account", "--release", account_id)
    assert result.exit_code == 0 and "released 1" in result.output, result.output
    held, due, attempts = harness.query(
        """SELECT held, next_attempt_at <= now()::TIMESTAMP, attempts FROM failures
                                           WHERE dynamics_id = ?""",
        [account_id],
    )[0]
    assert held is False and due is True
    assert harness.query("SELECT pending_seq IS NOT NULL FROM d_account WHERE id = ?", [account_id]) == [
        (True,)
    ]
    assert "No held records." in invoke("errors", "--entity", "account").output

    # The next plan retries it: the value is still impossible, so it is held again (one attempt more).
    assert harness.run("latest").success
    assert harness.query("SELECT held, attempts FROM failures WHERE dynamics_id = ?", [account_id]) == [
        (True, attempts + 1)
    ]
    # Fixed in Dynamics and released: written, and no longer listed.
    sb.dynamics_update("account", account_id, {"industrycode": 15})
    assert "released 1 " in invoke("errors", "--entity", "account", "--release-all").output
    assert harness.run("latest").success
    assert harness.query("SELECT count(*) FROM failures WHERE dynamics_id = ?", [account_id]) == [(0,)]
    assert "No held records." in invoke("errors", "--entity", "account").output


def test_rollback_restores_what_a_run_replaced_in_both_systems(harness) -> None:
    sb = harness.sandbox
    first = harness.run("latest")
    assert first.success
    contact_id, contact_person = linked(harness, "contact")
    lead_id, lead_person = linked(harness, "lead")
    old_phone = sb.marketo_get_lead(contact_person).get("phone")
    old_title = sb.dynamics_get("lead", lead_id).get("jobtitle")
    sb.dynamics_update("contact", contact_id, {"telephone1": "+1 555 0199"})
    sb.marketo_update_lead(lead_person, {"title": "Accidental Title"})
    bad = harness.run("latest")
    assert bad.success
    assert sb.marketo_get_lead(contact_person)["phone"] == "+1 555 0199"
    assert sb.dynamics_get("lead", lead_id)["jobtitle"] == "Accidental Title"

    dry = invoke("rollback", bad.run_id)
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output and "+1 555 0199" in dry.output and "restore" in dry.output
    assert sb.marketo_get_lead(contact_person)["phone"] == "+1 555 0199"  # dry run wrote nothing

    # Writing needs the client settings; a missing one is named (and nothing is written).
    secret = os.environ.pop("MARKETO_CLIENT_SECRET")
    try:
        result = invoke("rollback", bad.run_id, "--yes")
    finally:
        os.environ["MARKETO_CLIENT_SECRET"] = secret
    assert result.exit_code == 1 and "MARKETO_CLIENT_SECRET is not set" in result.output
    assert secret not in result.output

    done = invoke("rollback", bad.run_id, "--yes")
    assert done.exit_code == 0, done.output
    assert sb.marketo_get_lead(contact_person).get("phone") == old_phone
    assert sb.dynamics_get("lead", lead_id).get("jobtitle") == old_title
    # (The run may also have absorbed echoes of the first one; only the two edits are asserted here.)
    rolled = harness.query(
        """SELECT run_id, entity, target, field, value_before, value_after FROM ledger
                              WHERE rule = ? AND dynamics_id IN (?, ?) AND field IN ('phone', 'title')
                              ORDER BY entity""",
        [f"rollback:{bad.run_id}", contact_id, lead_id],
    )
    assert [(r[1], r[2], r[3], r[4], r[5]) for r in rolled] == [
        ("contact", "marketo", "phone", "+1 555 0199", old_phone),
        ("lead", "dynamics", "title", "Accidental Title", old_title),
    ]
    assert (
        len({r[0] for r in rolled}) == 1
        and rolled[0][0].startswith("rollback-")
        and rolled[0][0] in done.output
    )

    # Rolling back twice writes nothing: the fields were written again (by the rollback) since.
    again = invoke("rollback", bad.run_id, "--yes")
    assert again.exit_code == 0 and "0 field value(s) to restore" in again.output
    assert "written again later by run rollback-" in again.output
    # The initial copy created records: rollback never deletes them.
    initial = invoke("rollback", first.run_id)
    assert initial.exit_code == 0 and "created by the run" in initial.output
    assert invoke("rollback", "no-such-run").exit_code == 1


def test_rebaseline_forgets_the_environment_and_the_next_sync_relinks(harness) -> None:
    assert harness.run("latest").success
    persons = harness.query("SELECT count(*) FROM identity WHERE entity IN ('lead', 'contact')")[0][0]
    result = invoke("rebaseline", "--yes")
    assert result.exit_code == 0, result.output
    assert "identity" in result.output and "dynamics_organization_id" in result.output
    assert harness.query("SELECT count(*) FROM environment") == [(0,)]
    assert harness.query("SELECT count(*) FROM identity") == [(0,)]
    assert harness.run("latest").success
    # Existing Marketo persons are linked again (by email), not duplicated.
    assert harness.query("SELECT count(*) FROM identity WHERE entity IN ('lead', 'contact')")[0][0] == persons
    assert harness.query("""SELECT count(*) FROM (SELECT marketo_id FROM identity WHERE state = 'active'
                            AND entity IN ('lead', 'contact') GROUP BY 1 HAVING count(*) > 1)""") == [(0,)]
