"""Conflicts over time and races, end to end (issue 9). Real Dagster runs against the sandbox; both systems
checked.

- ``latest`` is per field: Dynamics edits a lead's title at t0, Marketo at t0+2 min, Dynamics the phone at
  t0+4 min: the marketer's title wins (the later edit of *that* field), the phone still flows.
- A Marketo edit between plan and push is not lost: the push notices it, writes nothing over it, records the
  race, and the next plan resolves it by the field's policy (leads: Marketo wins, on both sides).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sync_pipeline.config.model import DEFAULT_PATH
from sync_pipeline.connection.keys import asset_key
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN
from sync_pipeline_tests.defs.test_sync_rules import World, _synced, _world


def _config(tmp: Path) -> Path:
    raw = yaml.safe_load(DEFAULT_PATH.read_text())
    for e in raw["entities"]:
        if e["name"] == "lead":
            e["fields"] = copy.deepcopy(
                e["fields"]
            )  # the person fields are shared with contacts (YAML alias)
            for f in e["fields"]:
                if f["marketo"] == "title":
                    f["policy"] = "latest"
    path = tmp / "entities.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("time")
    with _world(tmp, _config(tmp)) as w:
        sb, p = w.sandbox, w.picks
        w.run("all")
        leads = [i for i in _synced(w, "lead", n=20) if sb.dynamics_get("lead", i).get("statecode", 0) == 0]
        p["l_latest"], p["l_race"] = leads[:2]
        # latest per field. The extract that sees the Dynamics title edit runs before the marketer's edit
        # (e.g. a sensor-triggered read whose plan had not run yet); the phone edit comes after both.
        sb.dynamics_update("lead", p["l_latest"], {"jobtitle": "Title from Dynamics"})
        w.run("latest", selection=[asset_key(CONN, "lead", "extract")])
        sb.advance_clock(120)
        sb.marketo_update_lead(w.person_of(p["l_latest"])["id"], {"title": "Title from Marketo"})
        sb.advance_clock(120)
        sb.dynamics_update("lead", p["l_latest"], {"telephone1": "+1 555 0404"})
        # The race: Dynamics edits the city, the plan says "write it to Marketo", a marketer edits the city,
        # then the push runs.
        p["race_city_before"] = w.person_of(p["l_race"])["city"]
        sb.dynamics_update("lead", p["l_race"], {"address1_city": "Dynamicsford"})
        w.run(
            "latest",
            selection=[
                asset_key(CONN, "lead", "extract"),
                asset_key(CONN, "person", "extract"),
                asset_key(CONN, "lead", "plan"),
            ],
        )
        p["race_plan"] = w.query(
            "SELECT target, new_value FROM plan WHERE entity = 'lead' AND dynamics_id = ? AND field = 'city'",
            [p["l_race"]],
        )
        sb.marketo_update_lead(w.person_of(p["l_race"])["id"], {"city": "Marketoville"})
        w.run(
            "latest", selection=[asset_key(CONN, "lead", "push"), asset_key(CONN, "lead", "push", "dynamics")]
        )
        p["race_after_push"] = w.person_of(p["l_race"])["city"]
        w.run("latest")
        w.run("latest")  # echoes
        yield w


def test_latest_is_decided_per_field(world: World) -> None:
    sb, p = world.sandbox, world.picks
    person = world.person_of(p["l_latest"])
    lead = sb.dynamics_get("lead", p["l_latest"])
    assert (lead["jobtitle"], person["title"]) == ("Title from Marketo", "Title from Marketo")
    assert (lead["telephone1"], person["phone"]) == ("+1 555 0404", "+1 555 0404")
    assert world.query(
        "SELECT target, value_after, rule FROM ledger WHERE dynamics_id = ? AND field = 'title' AND op <> 'create'",
        [p["l_latest"]],
    ) == [("dynamics", "Title from Marketo", "conflict:latest")]


def test_marketo_edit_between_plan_and_push_is_not_lost(world: World) -> None:
    sb, p = world.sandbox, world.picks
    assert p["race_plan"] == [("marketo", "Dynamicsford")]  # the plan was made before the marketer's edit
    assert p["race_after_push"] == "Marketoville"  # the push did not overwrite it
    assert world.person_of(p["l_race"])["city"] == "Marketoville"
    assert sb.dynamics_get("lead", p["l_race"])["address1_city"] == "Marketoville"  # leads: Marketo wins
    ledger = world.query(
        "SELECT target, op, value_before, value_after, rule FROM ledger WHERE dynamics_id = ? "
        "AND field = 'city' AND op <> 'create' ORDER BY seq",
        [p["l_race"]],
    )
    # The race (before: what Marketo held when the plan was made; after: the marketer's value), then the
    # conflict resolved by the leads' policy on the next plan.
    assert ledger == [
        ("marketo", "race", p["race_city_before"], "Marketoville", "conflict:marketo_wins"),
        ("dynamics", "update", "Dynamicsford", "Marketoville", "conflict:marketo_wins"),
    ]
