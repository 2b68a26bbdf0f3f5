"""`sync-pipeline init` and `validate` against the sandbox (issue 11): the mapping from metadata reproduces the
packaged one on the generated org, maps an org's custom tables and columns, creates exactly the missing Marketo
fields on request, and never silently drops a user's edits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sync_pipeline import runs
from sync_pipeline.admin.verify import compare
from sync_pipeline.cli import main
from sync_pipeline.clients.dynamics import DynamicsClient
from sync_pipeline.clients.marketo import MarketoClient
from sync_pipeline.config.model import load_config
from sync_pipeline.connection.keys import asset_key
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN
from sync_pipeline.sandbox.runner import Sandbox
from sync_pipeline.sandbox.schema import Column, load_schema

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "sandbox-schema.example.yaml"


def invoke(*args: str) -> click.testing.Result:  # noqa: F821
    return CliRunner(env={"COLUMNS": "400"}).invoke(main, list(args), catch_exceptions=False)


def clients(sb: Sandbox) -> tuple[DynamicsClient, MarketoClient]:
    s = sb.settings()
    return (
        DynamicsClient(
            s["DYNAMICS_URL"],
            s["DYNAMICS_AUTHORITY"],
            s["DYNAMICS_CLIENT_ID"],
            s["DYNAMICS_CLIENT_SECRET"],
            verify=s["SYNC_CA_BUNDLE"],
        ),
        MarketoClient(
            s["MARKETO_BASE_URL"],
            s["MARKETO_CLIENT_ID"],
            s["MARKETO_CLIENT_SECRET"],
            verify=s.get("SYNC_CA_BUNDLE") or True,
        ),
    )


@pytest.fixture
def example_org(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    """The README walkthrough's org: docs/sandbox-schema.example.yaml, tiny, the environment pointing at it."""
    with Sandbox(tmp_path / "sb", schema=load_schema(EXAMPLE)) as sb:
        sb.populate("tiny", seed=0)
        for key, value in sb.settings().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("SYNC_STATE_PATH", str(tmp_path / "state.duckdb"))
        yield sb
    runs._definitions.cache_clear()


def test_init_on_the_generated_org_reproduces_the_packaged_mapping_and_syncs_the_same(
    harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "entities.yaml"
    result = invoke("init", "--out", str(out))
    assert result.exit_code == 0, result.output
    generated, packaged = load_config(out), load_config()
    assert generated.model_dump() == packaged.model_dump()  # same entities, fields, directions, policies

    monkeypatch.setenv("SYNC_CONFIG", str(out))
    assert harness.run("all").success
    assert harness.run("latest").success  # values Dynamics gave the leads the sync created come back
    dclient, mclient = clients(harness.sandbox)
    # Both systems read back field by field: nothing the rules do not explain.
    assert compare(generated, dclient, mclient, harness.state_path) == []
    again = invoke("init", "--out", str(out))
    assert again.exit_code == 0 and "up to date" in again.output
    runs._definitions.cache_clear()


def test_init_maps_custom_tables_and_columns_and_creates_only_the_missing_fields(
    example_org: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = example_org
    out = tmp_path / "entities.yaml"
    result = invoke("init", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "nickname" in result.output and "--create-marketo-fields" in result.output
    config = load_config(out)
    event = config.entity("event")
    assert (event.dynamics.table, event.marketo.object, event.marketo.key) == (
        "new_event",
        "event_c",
        "eventId",
    )
    assert event.sync_filter_column is None  # the table has no new_synctomkto
    assert [(f.marketo, f.dynamics, f.transform, f.target) for f in event.fields] == [
        ("name", "new_name", "text", None),
        ("venue", "new_venue", "text", None),
        ("attendees", "new_attendees", "integer", None),
        ("eventDate", "new_eventdate", "datetime", None),
        ("companyId", "new_accountid", "lookup", "account"),
    ]
    for person in ("lead", "contact"):
        assert ("favoriteColor", "new_favoritecolor", "picklist") in {
            (f.marketo, f.dynamics, f.transform) for f in config.entity(person).all_fields
        }
    assert "nickname" not in {f.marketo for f in config.entity("lead").all_fields}
    assert "# custom column new_nickname (Nickname): no Marketo lead field" in out.read_text()

    # --create-marketo-fields creates exactly the missing one, with the Dynamics type and length.
    _, mclient = clients(sb)
    before = {f["name"] for f in mclient.describe2()["fields"]}
    out.unlink()
    result = invoke("init", "--out", str(out), "--create-marketo-fields")
    assert result.exit_code == 0, result.output
    fields = {f["name"]: f for f in mclient.describe2()["fields"]}
    assert set(fields) - before == {"nickname"}
    assert (
        fields["nickname"]["dataType"],
        fields["nickname"]["length"],
        fields["nickname"]["displayName"],
    ) == ("string", 40, "Nickname")
    assert ("nickname", "new_nickname") in {
        (f.marketo, f.dynamics) for f in load_config(out).entity("lead").all_fields
    }
    assert "none missing" in invoke("init", "--out", str(out), "--create-marketo-fields").output

    # The generated mapping syncs this org: every event, the custom picklist's labels from the org.
    monkeypatch.setenv("SYNC_CONFIG", str(out))
    validated = invoke("validate", "--errors-only")
    assert validated.exit_code == 0, validated.output
    first = invoke("backfill")  # the README walkthrough's first backfill
    assert first.exit_code == 0 and "succeeded" in first.output, first.output
    assert f"{'/'.join(asset_key(CONN, 'event', 'extract').path)}: 12 rows read" in first.output
    assert invoke("backfill", "--scope", "latest").exit_code == 0  # values Dynamics gave the leads it created
    assert sb.marketo_count("event_c") == 12 == sb.dynamics_count("new_event")
    colors = {p.get("favoriteColor") for p in sb.marketo_rows("lead", 100_000) if p.get("dynamicsId")}
    assert {"Red", "Green", "Blue"} <= colors
    dclient, _ = clients(sb)
    assert compare(load_config(out), dclient, mclient, tmp_path / "state.duckdb") == []


def test_rerunning_init_shows_a_diff_and_keeps_the_users_edits(example_org: Sandbox, tmp_path: Path) -> None:
    out = tmp_path / "entities.yaml"
    assert invoke("init", "--out", str(out)).exit_code == 0
    raw = yaml.safe_load(out.read_text())
    event = next(e for e in raw["entities"] if e["name"] == "event")
    event["fields"] = [f for f in event["fields"] if f["marketo"] != "venue"]  # the user dropped a field
    event["policy"] = "hold"  # ... and changed a setting
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    mine = out.read_text()

    # The org changes: an admin adds a column the custom object has a field for.
    # (event_c has no field for it, so it is reported, not mapped.)
    events = example_org.schema.tables["new_event"]
    example_org.schema.tables["new_event"] = replace(
        events, columns=events.columns + (Column("new_capacity", "Integer", display_name="Capacity"),)
    )
    result = invoke("init", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text() == mine  # nothing written without --write
    assert "new_capacity" in result.output and "--write" in result.output

    result = invoke("init", "--out", str(out), "--write")
    assert result.exit_code == 0
    kept = load_config(out).entity("event")
    assert kept.policy == "hold" and "venue" not in {f.marketo for f in kept.fields}  # the user's edits stay
    assert "new_capacity" in out.read_text()
    # What the user removed is offered as a comment, never mapped again behind their back.
    assert (
        "# available in the org, not mapped here: - {marketo: venue, dynamics: new_venue}" in out.read_text()
    )
    assert (tmp_path / "entities.yaml.bak").read_text() == mine
