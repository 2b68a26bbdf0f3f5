"""`sync-pipeline sandbox --schema FILE` (issue 11): an org's custom tables, columns, option sets and the
sync-filter column present or not; the generator fills exactly what the file declares."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_pipeline.cli import main
from sync_pipeline.clients.dynamics import DynamicsClient
from sync_pipeline.sandbox.generator import SCALES, generate
from sync_pipeline.sandbox.runner import spawn_sandbox
from sync_pipeline.sandbox.schema import SandboxConfigError, load_schema

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "sandbox-schema.example.yaml"
NOW = datetime(2026, 11, 1, tzinfo=UTC)


def _rows(schema) -> dict[str, list[dict]]:  # noqa: ANN001
    out: dict[str, list[dict]] = {}
    for system, name, rows in generate("tiny", 0, NOW, schema=schema):
        if system == "dynamics":
            out.setdefault(name, []).extend(rows)
    return out


def test_the_generator_fills_exactly_what_the_schema_declares() -> None:
    schema = load_schema(EXAMPLE)
    assert schema.tables["account"].column("new_synctomkto") is None
    assert schema.tables["lead"].column("new_favoritecolor").global_option_set == "new_color"
    assert schema.objects["lead"].field("favoriteColor") is not None and "event_c" in schema.objects
    rows = _rows(schema)
    assert len(rows["new_event"]) == 12  # `rows: 12`, not the scale's count
    assert len(rows["new_project"]) == SCALES["tiny"].custom_rows  # the packaged table, no `rows:`
    assert not any("new_synctomkto" in r for r in rows["account"])
    assert any("new_synctomkto" in r for r in rows["contact"])  # still there where the file keeps it
    colors = {r.get("new_favoritecolor") for r in rows["lead"]}
    assert colors <= {1, 2, 3} and {1, 2, 3} <= colors
    assert all(len(r["new_nickname"]) <= 40 for r in rows["lead"] if r.get("new_nickname"))
    assert all(r.get("_new_accountid_value") for r in rows["new_event"])
    # The packaged org is unchanged by the schema support.
    plain = _rows(load_schema())
    assert "new_event" not in plain and len(plain["account"]) == len(rows["account"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dynamics:\n  tables:\n    invoice: {}\n", "dynamics.tables.invoice: not a standard table"),
        ("dynamics:\n  tables:\n    lead:\n      columns: [{name: new_x}]\n", "table 'lead': column"),
        (
            "dynamics:\n  tables:\n    lead:\n      columns: [{name: new_x, type: Picklist}]\n",
            "column 'new_x': a Picklist column needs options",
        ),
        ("dynamics:\n  tables:\n    lead: {filter: false}\n", "unknown settings ['filter']"),
        (
            "dynamics:\n  custom_tables: [{logical_name: new_y, rows: -1}]\n",
            "custom table 'new_y': rows must be",
        ),
        ("marketo:\n  lead_fields: [{name: email}]\n", "already exist on the lead"),
    ],
)
def test_a_bad_schema_file_names_the_table_and_column(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(text)
    with pytest.raises(SandboxConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_schema(path)
    result = CliRunner().invoke(main, ["sandbox", "--schema", str(path), "--quiet"])
    assert result.exit_code == 2 and "--schema" in result.output


def test_sandbox_command_serves_the_schema_files_org(tmp_path: Path) -> None:
    with spawn_sandbox(tmp_path / "sb", scale="tiny", schema=EXAMPLE) as remote:
        s = remote.settings()
        client = DynamicsClient(
            s["DYNAMICS_URL"],
            s["DYNAMICS_AUTHORITY"],
            s["DYNAMICS_CLIENT_ID"],
            s["DYNAMICS_CLIENT_SECRET"],
            verify=s["SYNC_CA_BUNDLE"],
        )
        with client:
            tables = {d["LogicalName"] for d in client.entity_definitions()}
            assert {"new_event", "new_project", "lead"} <= tables
            assert client.count("new_events") == 12
            assert "new_synctomkto" not in {
                a["LogicalName"] for a in client.attributes("account", "LogicalName")
            }
        assert remote.populated["counts"]["dynamics.new_event"] == 12


def test_marketo_schema_api_creates_lead_fields_as_documented(sandbox, tmp_path: Path) -> None:
    from sync_pipeline.clients.marketo import MarketoClient
    from sync_pipeline.sandbox.runner import Sandbox

    s = sandbox.settings()
    client = MarketoClient(
        s["MARKETO_BASE_URL"],
        s["MARKETO_CLIENT_ID"],
        s["MARKETO_CLIENT_SECRET"],
        verify=s.get("SYNC_CA_BUNDLE") or True,
    )
    results = client.create_lead_fields(
        [
            {"name": "shoeSize", "displayName": "Shoe Size", "dataType": "integer"},
            {"name": "nickname", "displayName": "Nickname", "dataType": "string", "length": 40},
            {"name": "email", "displayName": "Email 2", "dataType": "string"},  # the name exists
            {"name": "bad", "displayName": "Bad", "dataType": "colour"},
            {"name": "noDisplay", "dataType": "string"},
        ]
    )
    assert [r["status"] for r in results] == ["created", "created", "skipped", "skipped", "skipped"]
    assert "already exists" in results[2]["reasons"][0]["message"]
    assert (
        "dataType" in results[3]["reasons"][0]["message"]
        and "displayName" in results[4]["reasons"][0]["message"]
    )
    fields = {f["name"]: f for f in client.describe2()["fields"]}
    assert (fields["nickname"]["dataType"], fields["nickname"]["length"]) == ("string", 40)
    assert {f["rest"]["name"] for f in client.describe_leads()} >= {"shoeSize", "nickname"}
    created = client.sync_leads([{"email": "shoe@example.org", "shoeSize": 44, "nickname": "Shoe"}])
    assert created[0].ok
    assert client.get_lead(created[0].id, ["shoeSize", "nickname"])["shoeSize"] == 44
    # Another instance (another sandbox) has its own lead definition.
    with Sandbox(tmp_path / "other") as other:
        assert other.marketo.store.lead_object.field("shoeSize") is None
    client.close()
