"""The stored mapping and its changes (engine/mapping.py), on a real DuckDB store, no APIs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from sync_pipeline.config.model import DEFAULT_PATH, SyncConfig
from sync_pipeline.engine import mapping
from sync_pipeline.engine.store import state


def _config(edit: Any = None) -> SyncConfig:
    raw = yaml.safe_load(DEFAULT_PATH.read_text())
    raw["entities"] = [e for e in raw["entities"] if e["name"] in ("systemuser", "account", "project")]
    for e in raw["entities"]:
        e["fields"] = [f for f in e["fields"] if f.get("target") != "contact"]
    if edit:
        edit({e["name"]: e for e in raw["entities"]}, raw)
    return SyncConfig.model_validate(raw)


def _drop(entity: str, field: str) -> Any:
    def edit(ents: dict[str, Any], raw: dict[str, Any]) -> None:
        ents[entity]["fields"] = [f for f in ents[entity]["fields"] if f["marketo"] != field]

    return edit


@pytest.fixture
def con(tmp_path: Path) -> Any:
    c = duckdb.connect(str(tmp_path / "s.duckdb"))
    yield c
    c.close()


def _changes(con: Any) -> list[tuple]:
    return con.execute("SELECT entity, field, change FROM mapping_changes ORDER BY seq").fetchall()


def _states(con: Any, entity: str) -> dict[str, str]:
    return dict(con.execute("SELECT field, state FROM mapping_fields WHERE entity = ?", [entity]).fetchall())


def test_first_store_is_the_baseline(con: Any) -> None:
    state.ensure_schema(con, _config())
    assert _changes(con) == []
    assert set(_states(con, "account").values()) == {"active"}


def test_field_added_waits_for_backfill_then_removed_and_readded(con: Any) -> None:
    without, full = _config(_drop("account", "website")), _config()
    state.ensure_schema(con, without)
    con.execute("INSERT INTO identity VALUES ('account', 'a1', 'a1', 'active', now(), 'created')")
    state.ensure_schema(con, full)
    assert _changes(con) == [("account", "website", "added")]
    assert _states(con, "account")["website"] == "pending"
    eff_config, eff = mapping.effective(con, full, full.entity("account"))
    assert "website" not in {f.marketo for f in eff.all_fields}
    assert "website" not in {f.marketo for f in eff_config.entity("account").all_fields}
    assert eff_config.entity("systemuser") == full.entity("systemuser")
    mapping.mark_backfilled(con, "account", ["website"], "run1", state.utcnow())
    assert _states(con, "account")["website"] == "active"
    assert mapping.effective(con, full, full.entity("account"))[1] == full.entity("account")
    state.ensure_schema(con, without)
    assert _changes(con)[-1] == ("account", "website", "removed")
    assert _states(con, "account")["website"] == "removed"
    state.ensure_schema(con, full)
    assert _changes(con)[-1] == ("account", "website", "re-added")
    assert _states(con, "account")["website"] == "pending"


def test_direction_or_policy_change_is_recorded_with_what_changed(con: Any) -> None:
    state.ensure_schema(con, _config())

    def edit(ents: dict[str, Any], raw: dict[str, Any]) -> None:
        for f in ents["account"]["fields"]:
            if f["marketo"] == "website":
                f["direction"] = "none"

    state.ensure_schema(con, _config(edit))
    (detail,) = con.execute("SELECT detail FROM mapping_changes WHERE change = 'changed'").fetchone()
    assert "direction to_marketo -> none" in detail and "plan --all" in detail
    assert _states(con, "account")["website"] == "active"


def test_entity_added_and_removed(con: Any) -> None:
    def no_project(ents: dict[str, Any], raw: dict[str, Any]) -> None:
        raw["entities"] = [e for e in raw["entities"] if e["name"] != "project"]

    state.ensure_schema(con, _config(no_project))
    state.ensure_schema(con, _config())
    assert _changes(con) == [("project", None, "entity_added")]
    assert set(_states(con, "project").values()) == {"active"}  # its initial copy carries every field
    state.ensure_schema(con, _config(no_project))
    assert _changes(con)[-1] == ("project", None, "entity_removed")


def test_pending_fields_of_an_entity_never_copied_arrive_with_its_copy(con: Any) -> None:
    """A mapping edited before the first copy (or after a rebaseline) holds nothing back."""
    state.ensure_schema(con, _config(_drop("account", "website")))
    full = _config()
    state.ensure_schema(con, full)
    assert _states(con, "account")["website"] == "pending"
    assert mapping.effective(con, full, full.entity("account"))[1] == full.entity("account")
    assert _states(con, "account")["website"] == "active"


def test_code_version_changes_only_with_the_entity_mapping() -> None:
    a, b = _config(), _config(_drop("account", "website"))
    assert mapping.code_version(a, a.entity("account")) != mapping.code_version(b, b.entity("account"))
    assert mapping.code_version(a, a.entity("project")) == mapping.code_version(b, b.entity("project"))
