"""Configuration validation: every error names the file, the entity and the field it is about."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sync_pipeline.config.model import DEFAULT_PATH, ConfigError, load_config


def _raw() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(DEFAULT_PATH.read_text()))


def _entity(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in raw["entities"] if e["name"] == name)


def _write(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    raw = _raw()
    change(raw)
    path = tmp_path / "entities.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_packaged_configuration_loads() -> None:
    config = load_config()
    assert [e.name for e in config.entities] == [
        "systemuser",
        "team",
        "teammembership",
        "account",
        "lead",
        "contact",
        "opportunity",
        "opportunity_role",
        "project",
    ]
    assert {e.name for e in config.persons} == {"lead", "contact"}
    contact = config.entity("contact")
    lead_score = next(f for f in contact.all_fields if f.marketo == "leadScore")
    assert (contact.policy, contact.field_direction(lead_score)) == ("dynamics_wins", "to_dynamics")


def test_unknown_transform_names_entity_and_field(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        _entity(raw, "account")["fields"][1]["transform"] = "rot13"

    with pytest.raises(ConfigError, match=r"entity 'account', field 'accountNumber', setting transform"):
        load_config(_write(tmp_path, change))


def test_duplicate_field_names_entity_and_field(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        fields = _entity(raw, "project")["fields"]
        fields.append(dict(fields[0]))

    with pytest.raises(ConfigError, match=r"entity 'project'.*field 'name' is mapped twice"):
        load_config(_write(tmp_path, change))


def test_lookup_target_not_declared_names_entity_field_and_target(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        _entity(raw, "project")["fields"][4]["target"] = "invoice"

    with pytest.raises(
        ConfigError,
        match=r"entity 'project': field 'companyId': lookup target 'invoice' is not a "
        r"declared entity",
    ):
        load_config(_write(tmp_path, change))


def test_picklist_needs_no_options_in_yaml_and_yaml_labels_override(tmp_path: Path) -> None:
    # Issue 11: labels come from the org's option sets at run time; the YAML may still override single labels.
    assert load_config().entity("project").all_fields[2].options is None

    def change(raw: dict[str, Any]) -> None:
        _entity(raw, "project")["fields"][2]["options"] = {2: "In progress"}

    assert load_config(_write(tmp_path, change)).entity("project").all_fields[2].options == {2: "In progress"}


def test_lookup_without_target_and_unknown_setting_name_the_field(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        del _entity(raw, "team")["fields"][2]["target"]
        _entity(raw, "account")["fields"][0]["polcy"] = "latest"

    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, change))
    assert "entity 'team', field 'administratorId'" in str(err.value)
    assert "entity 'account', field 'company', setting polcy" in str(err.value)


def test_one_way_entity_cannot_write_to_dynamics(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        _entity(raw, "account")["fields"][0]["direction"] = "two_way"

    with pytest.raises(ConfigError, match=r"entity 'account'.*field 'company': only persons"):
        load_config(_write(tmp_path, change))


def test_create_rule_on_unmapped_field_names_entity_and_field(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        _entity(raw, "lead")["create_in_dynamics"]["all"][0]["field"] = "shoeSize"

    with pytest.raises(ConfigError, match=r"entity 'lead': create_in_dynamics: field 'shoeSize'"):
        load_config(_write(tmp_path, change))


def test_invalid_yaml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("entities:\n  - name: account\n    fields: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: configuration file not found"):
        load_config(tmp_path / "nowhere.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("sync: {}\n")
    with pytest.raises(ConfigError, match="expected a mapping with an 'entities' list"):
        load_config(empty)


def test_unknown_entity_lookup_lists_the_declared_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown entity 'invoice'; declared: systemuser, team"):
        load_config().entity("invoice")
