"""A per-record integrity problem never halts the world (issue 9), end to end with real Dagster runs.

Damage is injected directly (a marketer copies a synced contact's Dynamics id onto another person; the
state store's identity rows of other contacts are pointed at a person that does not exist, at a value
that is no person id, and at a person another contact owns). In the same run an unrelated contact's edit
and an opportunity's edit must arrive, the damaged records are held with the reason (``failures``,
``errors``, ``status``, the person check's metadata), and the check warns without blocking. Repairing the
damage releases the record by itself. Damage that spans the run (more than the threshold) still blocks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from sync_pipeline.engine.plan.identity import QUARANTINE_BLOCK_FLOOR
from sync_pipeline_tests.defs.sync_world import World, world_of


def _cli(world: World, *args: str) -> str:
    from sync_pipeline.cli import main

    result = CliRunner(env={"COLUMNS": "400"}).invoke(
        main, [*args, "--state", str(world.state_path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for w in world_of(tmp_path_factory.mktemp("quarantine")):
        sb, p = w.sandbox, w.p
        w.run("all")
        # The contact whose link gets a value that is no person id is an opportunity's customer (it has a role).
        p["garbage"] = w.query("""SELECT o.customer_contact FROM d_opportunity o JOIN identity i
            ON i.entity = 'contact' AND i.dynamics_id = o.customer_contact AND i.state = 'active'
            WHERE NOT o.deleted ORDER BY o.id LIMIT 1""")[0][0]
        contacts = [c for c in w.synced("contact", 41) if c != p["garbage"]]
        p["dup"], p["vanished"], p["shared"], p["owner"], p["unrelated"], p["lost"] = contacts[:6]
        p["many"] = contacts[6 : 6 + QUARANTINE_BLOCK_FLOOR + 5]
        pid = {k: w.person_of(p[k])["id"] for k in ("dup", "vanished", "shared", "owner", "garbage", "lost")}
        p["pid"] = pid
        p["roles0"] = [
            r for r in sb.marketo_rows("opportunityRole", 100_000) if r.get("leadId") == pid["garbage"]
        ]
        opps = w.query(
            "SELECT dynamics_id FROM identity WHERE entity = 'opportunity' AND state = 'active' "
            "ORDER BY dynamics_id LIMIT 1"
        )
        p["opp"] = opps[0][0]

        # A marketer copies a synced contact's Dynamics id onto another person: two persons claim it.
        p["twin"] = sb.marketo_create_lead(
            {
                "email": "twin@example.com",
                "lastName": "Twin",
                "dynamicsId": p["dup"],
                "dynamicsType": "Contact",
            }
        )["id"]
        # Identity rows damaged in the store: a vanished person, a value that is no id, a person owned twice.
        w.execute(
            "UPDATE identity SET marketo_id = '99999999' WHERE entity = 'contact' AND dynamics_id = ?",
            [p["vanished"]],
        )
        w.execute(
            "UPDATE identity SET marketo_id = 'not-a-person' WHERE entity = 'contact' AND dynamics_id = ?",
            [p["garbage"]],
        )
        w.execute(
            "UPDATE identity SET marketo_id = ? WHERE entity = 'contact' AND dynamics_id = ?",
            [str(pid["owner"]), p["shared"]],
        )
        # A person the mirror lost (it still exists in Marketo) is read again: not damage, nothing is held.
        w.execute("DELETE FROM m_person WHERE id = ?", [pid["lost"]])
        sb.dynamics_update("contact", p["lost"], {"jobtitle": "Arrives although the mirror lost its person"})
        # Three damaged records also have an edit to sync; the fourth ("garbage") has none and is found anyway.
        for k in ("dup", "vanished", "shared"):
            sb.dynamics_update("contact", p[k], {"jobtitle": f"Held edit {k}"})
        sb.dynamics_update("contact", p["unrelated"], {"jobtitle": "Arrives despite the damage"})
        sb.dynamics_update("opportunity", p["opp"], {"name": "Opportunity edited next to damage"})
        p["run1"] = w.run("latest")
        p["failures1"] = w.query(
            "SELECT dynamics_id, code, message, held, target FROM failures "
            "WHERE target = 'quarantine' ORDER BY dynamics_id"
        )
        p["roles1"] = [
            r for r in sb.marketo_rows("opportunityRole", 100_000) if r.get("leadId") == pid["garbage"]
        ]
        p["held_titles1"] = [
            (r["id"], r["title"])
            for r in sb.marketo_rows("lead", 100_000)
            if str(r.get("title", "")).startswith("Held edit")
        ]
        p["errors1"] = _cli(w, "errors", "--full")
        p["status1"] = _cli(w, "status")

        # Repair: the duplicate person is deleted in Marketo; the next run releases the record by itself.
        sb.marketo_delete_lead(p["twin"])
        p["run2"] = w.run("latest")
        p["failures2"] = w.query(
            "SELECT dynamics_id, code FROM failures WHERE target = 'quarantine' ORDER BY dynamics_id"
        )

        # Damage that spans the run: more records than the threshold lose their person at once.
        for did in p["many"]:
            w.execute(
                "UPDATE identity SET marketo_id = '8' || substr(md5(dynamics_id), 1, 6) "
                "WHERE entity = 'contact' AND dynamics_id = ?",
                [did],
            )
            sb.dynamics_update("contact", did, {"jobtitle": "Mass damage"})
        p["run3"] = w.run("latest", must_succeed=False)
        yield w


def _codes(world: World) -> dict[str, str]:
    return {did: code for did, code, _m, _h, _t in world.p["failures1"]}


def test_damaged_records_are_quarantined_with_the_reason(world: World) -> None:
    p = world.p
    assert _codes(world) == {
        p["dup"]: "quarantine:duplicate_dynamics_id",
        p["vanished"]: "quarantine:vanished_person",
        p["garbage"]: "quarantine:vanished_person",
        p["shared"]: "quarantine:person_shared",
        p["owner"]: "quarantine:person_shared",
    }  # both claim the person: neither writes
    messages = {did: m for did, _c, m, _h, _t in p["failures1"]}
    assert str(p["twin"]) in messages[p["dup"]] and str(p["pid"]["dup"]) in messages[p["dup"]]
    assert "99999999" in messages[p["vanished"]]
    assert p["owner"] in messages[p["shared"]] and str(p["pid"]["owner"]) in messages[p["shared"]]
    assert p["shared"] in messages[p["owner"]]
    assert all(held for _d, _c, _m, held, _t in p["failures1"])
    # Held means held: after that run, none of the damaged records' edits was written to any person.
    assert p["held_titles1"] == []


def test_everything_else_keeps_syncing_in_the_same_run(world: World) -> None:
    p, sb = world.p, world.sandbox
    assert p["run1"].success
    assert world.person_of(p["unrelated"])["title"] == "Arrives despite the damage"
    assert world.person_of(p["lost"])["title"] == "Arrives although the mirror lost its person"
    opportunity = sb.marketo.store.get_object("opportunity", p["opp"])
    assert opportunity is not None and opportunity["name"] == "Opportunity edited next to damage"


def test_a_quarantined_contacts_roles_stay_as_they_were(world: World) -> None:
    p = world.p
    assert p["roles0"] and p["roles1"] == p["roles0"]


def test_quarantine_is_visible_in_errors_status_and_the_check(world: World) -> None:
    p = world.p
    for did, code in _codes(world).items():
        assert did in p["errors1"] and code in p["errors1"]
    lines = p["status1"].splitlines()
    header = [
        c.strip() for c in next(line for line in lines if "entity" in line and "held" in line).split("┃")
    ]
    row = [line for line in lines if "contact " in line and "(Marketo)" not in line]
    cells = [c.strip() for c in row[0].split("│")] if row else []
    assert cells and cells[header.index("held")] == "5", p["status1"]
    assert cells[header.index("quarantined")] == "5", p["status1"]
    evaluation = world.check(p["run1"], "contact")
    assert not evaluation.passed
    assert evaluation.severity.value == "WARN"  # per-record damage: a warning, nothing downstream blocked
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    assert meta["quarantined"] == 5 and meta["quarantined/vanished_person"] == 2
    assert meta["dynamics_ids_twice"] == 1


def test_repaired_damage_releases_the_record(world: World) -> None:
    p = world.p
    assert p["dup"] not in {did for did, _ in p["failures2"]}
    assert {did for did, _ in p["failures2"]} == {p["vanished"], p["garbage"], p["shared"], p["owner"]}
    assert world.person_of(p["dup"])["title"] == "Held edit dup"  # its held edit arrives once repaired


def test_damage_spanning_the_run_still_blocks(world: World) -> None:
    from sync_pipeline.connection.keys import asset_key
    from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

    p = world.p
    evaluation = world.check(p["run3"], "contact")
    assert not evaluation.passed and evaluation.severity.value == "ERROR"
    assert not p["run3"].success
    materialized = {e.asset_key for e in p["run3"].get_asset_materialization_events()}
    assert (
        asset_key(CONN, "contact", "push", "dynamics") not in materialized
    )  # downstream of the blocking check
    assert asset_key(CONN, "contact", "push") in materialized  # the check runs on what was pushed
