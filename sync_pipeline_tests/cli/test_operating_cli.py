"""The CLI as an operator meets it (issue 15): missing settings named in one line, `errors` readable at 100
columns (`--full`, `--csv`), `status` with the Marketo person row and held/quarantined counts by reason class,
`initial-copy` refusing what it should."""

from __future__ import annotations

import csv

from click.testing import CliRunner

from sync_pipeline.cli import main
from sync_pipeline.cli.ops import REQUIRED_SETTINGS


def invoke(*args: str, columns: int = 100, env: dict[str, str | None] | None = None) -> click.testing.Result:  # noqa: F821
    return CliRunner(env={"COLUMNS": str(columns), **(env or {})}).invoke(
        main, list(args), catch_exceptions=False
    )


def test_plan_without_settings_names_the_variable_in_one_line(tmp_path) -> None:
    result = invoke("plan", "--state", str(tmp_path / "s.duckdb"), env={k: None for k in REQUIRED_SETTINGS})
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith("Error: missing setting: environment variable DYNAMICS_URL, ")
    assert "MARKETO_CLIENT_SECRET" in lines[0]
    one = invoke(
        "plan",
        "--state",
        str(tmp_path / "s.duckdb"),
        env={
            "MARKETO_CLIENT_SECRET": None,
            **{k: "x" for k in REQUIRED_SETTINGS if k != "MARKETO_CLIENT_SECRET"},
        },
    )
    assert one.exit_code == 1 and "environment variable MARKETO_CLIENT_SECRET is not set" in one.output
    assert not (tmp_path / "s.duckdb").exists()


def test_errors_and_status_are_readable_and_complete(harness, tmp_path) -> None:
    sb = harness.sandbox
    assert harness.run("latest").success
    account_id = harness.query(
        "SELECT dynamics_id FROM identity WHERE entity = 'account' ORDER BY 1 LIMIT 1"
    )[0][0]
    long_reason = "field industry: unknown option code 999"
    sb.dynamics_update("account", account_id, {"industrycode": 999})
    assert harness.run("latest").success
    # A quarantined record (the engine files them with a code starting with "quarantine") and a long reason.
    contact_id = harness.query(
        "SELECT dynamics_id FROM identity WHERE entity = 'contact' ORDER BY 1 LIMIT 1"
    )[0][0]
    harness.query(
        """INSERT INTO failures VALUES ('contact', ?, 'marketo', 'update', NULL, 'email', 'quarantine:email',
                     ?, 1, now()::TIMESTAMP, now()::TIMESTAMP, now()::TIMESTAMP, true, 'r1')""",
        [contact_id, "the email address bounced hard five times in a row; " * 6],
    )
    held = harness.query("SELECT count(*) FROM failures WHERE held")[0][0]

    short = invoke("errors")
    assert short.exit_code == 0, short.output
    lines = short.output.splitlines()
    assert max(len(line) for line in lines) <= 100, short.output
    assert (
        sum(1 for line in lines if account_id in line) == 1
        and sum(1 for line in lines if contact_id in line) == 1
    )
    assert f"Held records ({held};" in short.output and "…" in short.output  # long reasons are shortened
    full = invoke("errors", "--full", columns=400)
    assert long_reason in full.output and "".join(full.output.split()).count("bounced") == 6  # whole, folded
    out = tmp_path / "held.csv"
    assert invoke("errors", "--csv", str(out)).exit_code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == held and {"entity", "dynamics_id", "code", "message", "attempts"} <= set(rows[0])
    assert next(r for r in rows if r["dynamics_id"] == contact_id)["message"].count("bounced") == 6

    status = invoke("status", columns=400)
    assert status.exit_code == 0, status.output
    lines = status.output.splitlines()
    header = [c.strip() for c in next(line for line in lines if "┃ entity" in line).split("┃")]
    rows_by_entity = {}
    for line in lines:
        cells = dict(zip(header, (c.strip() for c in line.split("│")), strict=False))
        if cells.get("entity"):
            rows_by_entity[cells["entity"]] = cells
    person = rows_by_entity["person (Marketo)"]
    assert person["last sync"] != "-" and person["last run"] != "-"
    contact = rows_by_entity["contact"]
    assert contact["quarantined"] == "1" and "quarantine 1" in contact["held by reason"]
    assert "invalid_value" in rows_by_entity["account"]["held by reason"]
    assert "Initial copy not started" not in status.output


def test_initial_copy_refuses_a_synced_store_and_names_an_unreachable_webserver(harness) -> None:
    missing = invoke("initial-copy", "--url", "http://127.0.0.1:9", "--state", str(harness.state_path))
    assert (
        missing.exit_code == 1
        and "cannot reach the Dagster webserver at http://127.0.0.1:9" in missing.output
    )
    assert harness.run("latest").success
    done = invoke("initial-copy", "--url", "http://127.0.0.1:9")
    assert done.exit_code == 1 and "already synced" in done.output and "--again" in done.output
