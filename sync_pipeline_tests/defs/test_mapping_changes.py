"""Mapping changes take effect on every record (issue 16), end to end: real Dagster runs on the sandbox.

One world per module: the initial copy runs with a mapping lacking two fields (companies' ``website``,
one-way; contacts' ``title``, two-way) and the ``project`` entity. Then the mapping gains them; an
incremental sync leaves the new fields alone (they wait for their back-fill); ``resync`` back-fills them
(writing only values that differ), and copies the added entity alone; ``title`` is removed (no more
writes), re-added (no conflicts); ``--since`` restricts a back-fill. The fixture only acts and records;
each test asserts one rule.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from sync_pipeline.config.model import DEFAULT_PATH, load_config
from sync_pipeline.sandbox.runner import Sandbox

ALL = 100_000
OBJECTS = (
    "salesPerson",
    "company",
    "opportunity",
    "opportunityRole",
    "dynamicsTeam_c",
    "dynamicsTeamMember_c",
    "project_c",
)


def _config(path: Path, *, website: bool, title: bool, project: bool, middle_name: str | None = None) -> Path:
    raw = yaml.safe_load(DEFAULT_PATH.read_text())
    # A week of daily partitions keeps the initial copy short (the latest window reads every row anyway).
    raw["sync"]["partitions"]["start_date"] = (date.today() - timedelta(days=7)).isoformat()
    ents = {e["name"]: e for e in raw["entities"]}
    account = ents["account"]
    account["fields"] = [f for f in account["fields"] if website or f["marketo"] != "website"]
    contact = ents["contact"]
    contact["fields"] = [
        copy.deepcopy(f)
        for f in contact["fields"]
        if (title or f["marketo"] != "title") and (website or f["marketo"] != "doNotEmail")
    ]
    for f in contact["fields"]:
        if f["marketo"] == "middleName" and middle_name:
            f["direction"] = middle_name
    if not project:
        raw["entities"] = [e for e in raw["entities"] if e["name"] != "project"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_config(path)  # valid
    return path


@dataclass
class World:
    sandbox: Sandbox
    env: dict[str, str] = field(repr=False)  # holds the sandbox's client secrets
    state_path: Path
    instance: Any = field(default=None, repr=False)
    rec: dict[str, Any] = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def environment(self, config: Path) -> Iterator[None]:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in self.env.items():
                mp.setenv(k, v)
            mp.setenv("SYNC_CONFIG", str(config))
            yield

    def run(self, config: Path, scope: str = "latest") -> Any:
        from sync_pipeline import runs

        with self.environment(config):
            result = runs.run_sync(self.instance, scope=scope)
        assert result.success
        return result

    def resync(
        self, config: Path, entity: str, fields: list[str] | None = None, since: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        from sync_pipeline.cli.resync import run_resync

        with self.environment(config):
            result, meta, _ = run_resync(self.instance, entity, fields or [], since, dry_run=False)
        assert result.success, [ev.message for ev in result.all_events if ev.is_failure]
        return result.run_id, meta

    def cli(self, config: Path, *args: str) -> Any:
        from sync_pipeline.cli import main

        with self.environment(config):
            return CliRunner(env={"COLUMNS": "400"}).invoke(main, list(args), catch_exceptions=False)

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        from sync_pipeline.engine.store import state

        with state.connect(self.state_path, read_only=True) as con:
            return con.execute(sql, params or []).fetchall()

    def last_seq(self) -> int:
        return self.query("SELECT coalesce(max(seq), 0) FROM ledger")[0][0]

    def ledger_since(self, seq: int) -> list[tuple]:
        return self.query(
            "SELECT run_id, entity, dynamics_id, target, op, field, value_before, value_after, rule "
            "FROM ledger WHERE seq > ? ORDER BY seq",
            [seq],
        )

    def persons_by_dynamics_id(self) -> dict[str, dict[str, Any]]:
        return {p["dynamicsId"]: p for p in self.sandbox.marketo_rows("lead", ALL) if p.get("dynamicsId")}

    def companies(self) -> dict[str, dict[str, Any]]:
        return {c["externalCompanyId"]: c for c in self.sandbox.marketo_rows("company", ALL)}

    def linked(self, entity: str) -> list[tuple[str, str]]:
        return self.query(
            "SELECT dynamics_id, marketo_id FROM identity WHERE entity = ? AND state = 'active' "
            "ORDER BY dynamics_id",
            [entity],
        )

    def writes(self) -> dict[str, int]:
        """API write calls since the last reset, by endpoint (the sandbox's call counters). A Dataverse ``$batch``
        counts only when it carried a write (a run's metadata read is a ``$batch`` of GETs)."""
        calls = self.sandbox.calls()
        dynamics_wrote = any(
            v and k.startswith("dynamics.") and k.split(".", 1)[1] in _DYNAMICS_WRITES
            for k, v in calls.items()
        )
        return {
            k: v
            for k, v in calls.items()
            if v
            and not k.startswith("parts.")
            and (
                k.endswith(".sync")
                or k.endswith(".delete")
                or ("batch" in k.lower() and (dynamics_wrote or not k.startswith("dynamics.")))
            )
        }


_DYNAMICS_WRITES = (
    "create",
    "update",
    "delete",
    "createmultiple",
    "updatemultiple",
    "upsertmultiple",
    "qualify",
    "merge",
)


def _marketo_client(env: dict[str, str]) -> Any:
    from sync_pipeline.clients.marketo import MarketoClient

    return MarketoClient(
        env["MARKETO_BASE_URL"],
        env["MARKETO_CLIENT_ID"],
        env["MARKETO_CLIENT_SECRET"],
        verify=env.get("SYNC_CA_BUNDLE") or True,
    )


def _norm(v: Any) -> Any:
    return None if v in (None, "") else v


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import dagster as dg

    tmp = tmp_path_factory.mktemp("mapping")
    v0 = _config(tmp / "v0.yaml", website=False, title=False, project=False)
    v1 = _config(tmp / "v1.yaml", website=True, title=True, project=False)
    v2 = _config(tmp / "v2.yaml", website=True, title=False, project=True)
    v3 = _config(tmp / "v3.yaml", website=True, title=True, project=True)
    v4 = _config(tmp / "v4.yaml", website=True, title=True, project=True, middle_name="none")
    with Sandbox(tmp / "sandbox") as sb:
        sb.populate("tiny", seed=0)
        env = dict(sb.settings(), SYNC_STATE_PATH=str(tmp / "state.duckdb"), MARKETO_CALLS_PER_20S="100")
        w = World(sb, env, tmp / "state.duckdb", dg.DagsterInstance.ephemeral())
        rec = w.rec
        rec["configs"] = (v0, v1, v2, v3, v4)
        try:
            # 1. The initial copy with a mapping lacking website, title and project.
            w.run(v0, "all")
            rec["v0_materializations"] = {
                "/".join(k.path): v for k, v in _code_versions_in_instance(w.instance).items()
            }
            contacts = w.linked("contact")
            accounts = w.linked("account")
            by_did = w.persons_by_dynamics_id()
            rows = {r["contactid"]: r for r in sb.dynamics_rows("contact", ALL)}
            with_title = [d for d, _ in contacts if rows[d].get("jobtitle")]
            # Some persons already hold the Dynamics value (no write due), one holds a value Dynamics lacks.
            rec["title_equal"] = with_title[:5]
            for d in rec["title_equal"]:
                sb.marketo_update_lead(int(by_did[d]["id"]), {"title": rows[d]["jobtitle"]})
            rec["title_blank_in_dynamics"] = with_title[5]
            # One bad record: Marketo's title is longer than Dynamics' jobtitle column (100) allows.
            rec["title_too_long"] = with_title[9]
            sb.dynamics_update("contact", with_title[9], {"jobtitle": None})
            sb.marketo_update_lead(int(by_did[with_title[9]]["id"]), {"title": "T" * 150})
            sb.dynamics_update("contact", with_title[5], {"jobtitle": None})
            sb.marketo_update_lead(int(by_did[with_title[5]]["id"]), {"title": "Marketo Only Title"})
            arows = {r["accountid"]: r for r in sb.dynamics_rows("account", ALL)}
            rec["website_equal"] = [d for d, _ in accounts][:4]
            with contextlib.closing(_marketo_client(env)) as mc:
                mc.upsert_objects(
                    "companies",
                    [{"externalCompanyId": d, "website": arows[d]["website"]} for d in rec["website_equal"]],
                    action="updateOnly",
                )
            # 2. The mapping gains website and title; an incremental sync (with a real change on a
            #    contact's title and phone) leaves the new fields to their back-fill.
            rec["changed_contact"] = with_title[6]
            sb.dynamics_update(
                "contact", with_title[6], {"jobtitle": "Changed Before Backfill", "telephone1": "+1 555 0160"}
            )
            seq = w.last_seq()
            rec["v1_checks"] = _checks(w.run(v1))
            rec["incremental_v1"] = w.ledger_since(seq)
            rec["v1_plan_notices"] = w.query(
                "SELECT entity, field, new_value, rule FROM plan WHERE op = 'mapping'"
            )
            # 3. Back-fill website (one-way, through the CLI) and title (two-way, through the job).
            rec["before_title"] = {
                "dynamics": {
                    r["contactid"]: _norm(r.get("jobtitle")) for r in sb.dynamics_rows("contact", ALL)
                },
                "marketo": {d: p for d, p in w.persons_by_dynamics_id().items()},
            }
            rec["before_website"] = {
                "dynamics": {
                    r["accountid"]: _norm(r.get("website")) for r in sb.dynamics_rows("account", ALL)
                },
                "marketo": {d: _norm(c.get("website")) for d, c in w.companies().items()},
            }
            sb.reset_calls()
            seq = w.last_seq()
            rec["website_cli"] = w.cli(v1, "resync", "--entity", "account", "--field", "website")
            rec["website_calls"] = dict(sb.calls())
            rec["website_ledger"] = w.ledger_since(seq)
            sb.reset_calls()
            seq = w.last_seq()
            rec["title_run"], rec["title_meta"] = w.resync(v1, "contact", ["title"])
            rec["title_calls"] = dict(sb.calls())
            rec["title_ledger"] = w.ledger_since(seq)
            rec["title_failures"] = w.query(
                "SELECT dynamics_id, target, code, message FROM failures "
                "WHERE entity = 'contact' AND run_id = ?",
                [rec["title_run"]],
            )
            rec["after_title"] = {
                "dynamics": {
                    r["contactid"]: _norm(r.get("jobtitle")) for r in sb.dynamics_rows("contact", ALL)
                },
                "marketo": w.persons_by_dynamics_id(),
            }
            rec["after_website"] = {
                "dynamics": {
                    r["accountid"]: _norm(r.get("website")) for r in sb.dynamics_rows("account", ALL)
                },
                "marketo": {d: _norm(c.get("website")) for d, c in w.companies().items()},
            }
            # A consent field added: the opt-out wins whichever side holds it.
            drows = {r["contactid"]: r for r in sb.dynamics_rows("contact", ALL)}
            opt_in = [d for d, _ in contacts if not drows[d].get("donotemail")][20:22]
            for d in opt_in:
                sb.marketo_update_lead(int(by_did[d]["id"]), {"doNotEmail": True})
            rec["consent_marketo_out"] = opt_in
            rec["consent_dynamics_out"] = [d for d, _ in contacts if drows[d].get("donotemail")]
            seq = w.last_seq()
            _, rec["consent_meta"] = w.resync(v1, "contact", ["doNotEmail"])
            rec["consent_ledger"] = w.ledger_since(seq)
            rec["consent_after"] = {
                "dynamics": {r["contactid"]: r.get("donotemail") for r in sb.dynamics_rows("contact", ALL)},
                "marketo": w.persons_by_dynamics_id(),
            }
            # A second back-fill finds nothing to write.
            sb.reset_calls()
            _, rec["title_again_meta"] = w.resync(v1, "contact", ["title"])
            rec["title_again_writes"] = w.writes()
            # 4. The added entity: its own initial copy, nothing else.
            counts = {o: sb.marketo_count(o) for o in ("lead", *OBJECTS)}
            sb.reset_calls()
            seq = w.last_seq()
            rec["project_cli"] = w.cli(v3, "resync", "--entity", "project")
            rec["project_counts"] = (counts, {o: sb.marketo_count(o) for o in ("lead", *OBJECTS)})
            rec["project_ledger"] = w.ledger_since(seq)
            rec["project_writes"] = w.writes()
            # 5. title removed: a change to it is no longer written, other fields still are.
            removed = with_title[7]
            rec["removed_contact"] = removed
            sb.dynamics_update(
                "contact", removed, {"jobtitle": "Changed While Unmapped", "telephone1": "+1 555 0170"}
            )
            seq = w.last_seq()
            rec["v2_checks"] = _checks(w.run(v2))
            rec["removed_ledger"] = w.ledger_since(seq)
            rec["removed_plan_notices"] = w.query(
                "SELECT entity, field, new_value, rule FROM plan WHERE op = 'mapping'"
            )
            rec["removed_person"] = w.persons_by_dynamics_id()[removed]
            # 6. title re-added: the back-fill compares against the kept base, so no conflicts.
            seq = w.last_seq()
            w.run(v3)  # the incremental sync first: title waits for its back-fill
            rec["readded_incremental"] = w.ledger_since(seq)
            seq = w.last_seq()
            rec["readd_run"], rec["readd_meta"] = w.resync(v3, "contact", ["title"])
            rec["readd_ledger"] = w.ledger_since(seq)
            rec["readd_person"] = w.persons_by_dynamics_id()[removed]
            rec["readd_conflicts"] = w.query("SELECT count(*) FROM conflicts WHERE field = 'title'")[0][0]
            # 7. --since: only accounts modified after the date are back-filled.
            older = [d for d, _ in accounts][10:13]
            newer = [d for d, _ in accounts][13:16]
            with contextlib.closing(_marketo_client(env)) as mc:  # Marketo now differs for all six
                mc.upsert_objects(
                    "companies",
                    [
                        {"externalCompanyId": d, "website": f"https://stale{i}.example"}
                        for i, d in enumerate(older + newer)
                    ],
                    action="updateOnly",
                )
            sb.advance_clock(3600)
            since = sb.now()
            sb.advance_clock(60)
            for i, d in enumerate(newer):
                sb.dynamics_update("account", d, {"telephone1": f"+1 555 02{i:02d}"})
            rec["since"], rec["since_older"], rec["since_newer"] = since, older, newer
            seq = w.last_seq()
            rec["since_run"], rec["since_meta"] = w.resync(v3, "account", ["website"], since=since)
            rec["since_ledger"] = w.ledger_since(seq)
            rec["since_companies"] = w.companies()
            rec["arows"] = {r["accountid"]: r for r in sb.dynamics_rows("account", ALL)}
            # 8. A direction change applies from the next change; `plan --all` shows the full re-evaluation.
            rec["rule_contact"] = rule_contact = with_title[8]
            mid = int(w.persons_by_dynamics_id()[rule_contact]["id"])
            seq = w.last_seq()
            w.run(v4)  # middleName: direction none
            sb.marketo_update_lead(mid, {"middleName": "Marketo Middle"})
            w.run(v4)
            w.run(v3)  # back to two-way: the change was consumed while the field did not sync
            rec["rule_incremental"] = w.ledger_since(seq)
            seq = w.last_seq()
            rec["plan_all"] = w.cli(v3, "plan", "--all", "--entity", "contact", "--limit", "0")
            rec["plan_all_ledger"] = w.ledger_since(seq)
            rec["plan_all_dynamics"] = sb.dynamics_get("contact", rule_contact).get("middlename")
            rec["rule_run"], rec["rule_meta"] = w.resync(v3, "contact")
            rec["rule_ledger"] = w.ledger_since(seq)
            rec["rule_dynamics"] = sb.dynamics_get("contact", rule_contact).get("middlename")
            yield w
        finally:
            w.instance.dispose()  # its temporary storage, the Marketo budget's file included


def _checks(result: Any) -> dict[tuple[str, str], tuple[bool, dict[str, Any]]]:
    """(asset key, check name) -> (passed, metadata) of a run's asset checks."""
    return {
        ("/".join(ev.asset_key.path), ev.check_name): (
            ev.passed,
            {k: v.value for k, v in ev.metadata.items()},
        )
        for ev in result.get_asset_check_evaluations()
    }


def _code_versions_in_instance(instance: Any) -> dict[Any, str | None]:
    import dagster as dg

    from sync_pipeline.connection.keys import asset_key
    from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

    out = {}
    for record in instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key(CONN, "contact", "plan")), limit=1
    ).records:
        out[record.asset_key] = record.asset_materialization.tags.get("dagster/code_version")
    return out


# ---- adding a field ----------------------------------------------------------------------------------------


def test_added_fields_wait_for_their_backfill_and_the_plan_says_so(world: World) -> None:
    rec = world.rec
    fields = {(r[1], r[5]) for r in rec["incremental_v1"] if r[4] != "mapping"}
    assert ("contact", "title") not in fields and ("account", "website") not in fields
    assert ("contact", "phone") in fields  # the incremental sync kept flowing
    notices = {(e, f): (detail, rule) for e, f, detail, rule in rec["v1_plan_notices"]}
    assert notices[("contact", "title")][1] == "mapping:added"
    assert "resync --entity contact --field title" in notices[("contact", "title")][0]
    assert notices[("account", "website")][1] == "mapping:added"
    noted = {(r[1], r[5], r[8]) for r in rec["incremental_v1"] if r[4] == "mapping"}
    assert {("contact", "title", "mapping:added"), ("account", "website", "mapping:added")} <= noted


def test_one_way_backfill_gives_every_company_the_dynamics_value(world: World) -> None:
    rec = world.rec
    assert rec["website_cli"].exit_code == 0, rec["website_cli"].output
    dyn, mkto = rec["after_website"]["dynamics"], rec["after_website"]["marketo"]
    linked = [d for d, _ in world.linked("account")]
    assert linked and all(mkto[d] == dyn[d] for d in linked)


def test_one_way_backfill_writes_only_companies_that_differed(world: World) -> None:
    rec = world.rec
    before = rec["before_website"]
    differing = {d for d, _ in world.linked("account") if before["marketo"][d] != before["dynamics"][d]}
    assert set(rec["website_equal"]).isdisjoint(differing) and differing
    written = {r[2] for r in rec["website_ledger"] if r[4] == "update"}
    assert written == differing
    assert all(
        r[5] == "website" and r[8] == "resync:to_marketo" for r in rec["website_ledger"] if r[4] == "update"
    )
    # One Marketo write call per 300 differing companies; nothing else written anywhere.
    writes = {k: v for k, v in rec["website_calls"].items() if k.endswith(".sync") or "batch" in k}
    assert writes == {"marketo.companies.sync": -(-len(differing) // 300)}, writes


def test_two_way_backfill_every_linked_person_holds_the_value(world: World) -> None:
    rec = world.rec
    dyn, persons = rec["after_title"]["dynamics"], rec["after_title"]["marketo"]
    linked = [d for d, _ in world.linked("contact") if d != rec["title_too_long"]]
    for d in linked:
        assert _norm(persons[d].get("title")) == dyn[d], d
    # A blank in Dynamics never overwrote Marketo's value: it went to Dynamics instead.
    blank = rec["title_blank_in_dynamics"]
    assert dyn[blank] == "Marketo Only Title" and persons[blank]["title"] == "Marketo Only Title"


def test_two_way_backfill_writes_only_records_that_differed(world: World) -> None:
    rec = world.rec
    before = rec["before_title"]
    differing = {
        d
        for d, _ in world.linked("contact")
        if _norm(before["marketo"][d].get("title")) != before["dynamics"][d]
    }
    assert set(rec["title_equal"]).isdisjoint(differing)
    written = {r[2] for r in rec["title_ledger"] if r[4] == "update"}
    assert written == differing - {rec["title_too_long"]}
    assert {
        r[3] for r in rec["title_ledger"] if r[4] == "update" and r[2] == rec["title_blank_in_dynamics"]
    } == {"dynamics"}
    assert rec["title_meta"]["records_differing"] == len(differing)
    to_marketo = len({r[2] for r in rec["title_ledger"] if r[4] == "update" and r[3] == "marketo"})
    calls = rec["title_calls"]
    assert calls.get("marketo.leads.sync", 0) == -(-to_marketo // 300)
    # persons whose value already matched were not touched
    for d in rec["title_equal"]:
        assert rec["after_title"]["marketo"][d]["updatedAt"] == before["marketo"][d]["updatedAt"], d


def test_one_bad_record_is_kept_with_its_reason_and_the_others_are_written(world: World) -> None:
    rec = world.rec
    bad = rec["title_too_long"]
    assert [(d, t) for d, t, _, _ in rec["title_failures"]] == [(bad, "dynamics")]
    assert bad in rec["title_failures"][0][3]  # the message names the record
    assert rec["after_title"]["dynamics"][bad] is None  # nothing blanked, nothing half-written
    assert rec["after_title"]["marketo"][bad]["title"] == "T" * 150
    assert rec["title_meta"]["failed/dynamics"] == 1 and rec["title_meta"]["written/dynamics"] == 1


def test_backfill_again_writes_only_what_is_still_due(world: World) -> None:
    rec = world.rec
    assert rec["title_again_meta"]["records_differing"] == 1  # the record Dynamics refused
    assert "marketo.leads.sync" not in rec["title_again_writes"]


# ---- adding an entity -------------------------------------------------------------------------------------


def test_added_entity_copies_only_its_records(world: World) -> None:
    rec = world.rec
    assert rec["project_cli"].exit_code == 0, rec["project_cli"].output
    before, after = rec["project_counts"]
    projects = [
        r for r in world.sandbox.dynamics_rows("new_project", ALL) if r.get("new_synctomkto") is not False
    ]
    assert before["project_c"] == 0 and after["project_c"] == len(projects) > 0
    assert {o: n for o, n in after.items() if o != "project_c"} == {
        o: n for o, n in before.items() if o != "project_c"
    }
    assert {r[1] for r in rec["project_ledger"]} == {"project"}
    assert set(rec["project_writes"]) == {"marketo.customobjects.sync"} or all(
        "project" in k or "customobjects" in k for k in rec["project_writes"]
    ), rec["project_writes"]


# ---- removing and re-adding a field ---------------------------------------------------------------------


def test_removed_field_is_no_longer_written_and_the_ledger_says_so(world: World) -> None:
    rec = world.rec
    led = rec["removed_ledger"]
    assert not [r for r in led if r[5] == "title" and r[4] != "mapping"]
    assert ("contact", "phone") in {(r[1], r[5]) for r in led if r[4] == "update"}
    assert ("contact", "title", "mapping:removed") in {(r[1], r[5], r[8]) for r in led if r[4] == "mapping"}
    assert ("contact", "title", "mapping:removed") in {
        (e, f, rule) for e, f, _, rule in rec["removed_plan_notices"]
    }
    assert rec["removed_person"]["title"] != "Changed While Unmapped"
    assert rec["removed_person"]["phone"] == "+1 555 0170"


def test_changes_after_a_mapping_change_carry_the_new_columns(world: World) -> None:
    """The stored delta link replays its old $select: records changed later must not read as blanked."""
    rec = world.rec
    assert not [r for r in rec["removed_ledger"] if r[5] in ("doNotEmail", "website") and r[4] != "mapping"]
    # the back-fill's own writes to Dynamics came back through the delta link with the column
    for d in rec["consent_marketo_out"]:
        assert world.query("SELECT f_doNotEmail FROM d_contact WHERE id = ?", [d]) == [("true",)], d


def test_readded_field_backfills_without_conflicts(world: World) -> None:
    rec = world.rec
    assert not [r for r in rec["readded_incremental"] if r[5] == "title" and r[4] != "mapping"]
    assert ("contact", "title", "mapping:re-added") in {
        (r[1], r[5], r[8]) for r in rec["readded_incremental"]
    }
    rules = {r[8] for r in rec["readd_ledger"]}
    assert not any("conflict" in r for r in rules), rules
    assert rec["readd_conflicts"] == 0
    # Only the record changed while unmapped differs: the change flows one way, nothing else is written.
    assert {(r[2], r[3]) for r in rec["readd_ledger"] if r[4] == "update"} == {
        (rec["removed_contact"], "marketo")
    }
    assert rec["readd_person"]["title"] == "Changed While Unmapped"


# ---- --since --------------------------------------------------------------------------------------------


def test_since_restricts_the_backfill_to_records_modified_after_the_date(world: World) -> None:
    rec = world.rec
    written = {r[2] for r in rec["since_ledger"] if r[4] == "update"}
    assert written == set(rec["since_newer"])
    for d in rec["since_newer"]:
        assert rec["since_companies"][d]["website"] == rec["arows"][d]["website"]
    for i, d in enumerate(rec["since_older"]):
        assert rec["since_companies"][d]["website"] == f"https://stale{i}.example"


# ---- Dagster ------------------------------------------------------------------------------------------------


def test_mapping_is_part_of_the_affected_assets_code_versions(world: World) -> None:
    from sync_pipeline import runs as sync_runs
    from sync_pipeline.connection.keys import asset_key
    from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

    v0, v1, _, _, _ = world.rec["configs"]

    def versions(path: Path) -> dict[Any, str | None]:
        graph = sync_runs.definitions(sync_runs.connection(entities_path=str(path))).resolve_asset_graph()
        return {k: graph.get(k).code_version for k in graph.get_all_asset_keys()}

    old, new = versions(v0), versions(v1)
    changed = {k for k in old if old[k] != new.get(k)}
    affected = {
        asset_key(CONN, "contact", "plan"),
        asset_key(CONN, "contact", "push"),
        asset_key(CONN, "contact", "push", "dynamics"),
        asset_key(CONN, "contact", "extract"),
        asset_key(CONN, "account", "plan"),
        asset_key(CONN, "account", "push"),
        asset_key(CONN, "account", "extract"),
    }
    assert affected <= changed
    unaffected = {
        asset_key(CONN, "lead", "plan"),
        asset_key(CONN, "lead", "push"),
        asset_key(CONN, "systemuser", "plan"),
        asset_key(CONN, "systemuser", "push"),
        asset_key(CONN, "opportunity", "plan"),
        asset_key(CONN, "person", "extract"),
    }
    assert not unaffected & changed
    assert all(v and v.startswith("mapping-") for v in new.values())
    # The initial copy recorded the old mapping's version on its materializations: the UI compares them.
    recorded = world.rec["v0_materializations"]["/".join(asset_key(CONN, "contact", "plan").path)]
    assert recorded == old[asset_key(CONN, "contact", "plan")] != new[asset_key(CONN, "contact", "plan")]


# ---- direction and policy changes ---------------------------------------------------------------------------


def test_direction_change_applies_from_the_next_change_and_is_recorded(world: World) -> None:
    rec = world.rec
    led = rec["rule_incremental"]
    assert not [r for r in led if r[5] == "middleName" and r[4] != "mapping"]
    changes = [r for r in led if r[4] == "mapping" and r[5] == "middleName"]
    assert [r[8] for r in changes] == ["mapping:changed", "mapping:changed"]
    assert "direction two_way -> none" in changes[0][7] and "direction none -> two_way" in changes[1][7]


def test_plan_all_shows_the_full_reevaluation_without_writing(world: World) -> None:
    rec = world.rec
    out = rec["plan_all"]
    assert out.exit_code == 0, out.output
    assert rec["rule_contact"] in out.output and "Marketo Middle" in out.output
    assert rec["plan_all_ledger"] == [] and rec["plan_all_dynamics"] != "Marketo Middle"


def test_full_reevaluation_writes_what_plan_all_showed(world: World) -> None:
    rec = world.rec
    assert rec["rule_dynamics"] == "Marketo Middle"
    writes = {(r[2], r[3], r[5]) for r in rec["rule_ledger"] if r[4] == "update"}
    assert (rec["rule_contact"], "dynamics", "middleName") in writes
    # Everything else it wrote is what the preview listed: the one-way Marketo -> Dynamics score, whose
    # Dynamics values the generator invented (the incremental sync leaves them until Marketo changes).
    others = writes - {(rec["rule_contact"], "dynamics", "middleName")}
    assert {(t, f) for _, t, f in others} <= {("dynamics", "leadScore")}
    shown = rec["plan_all"].output
    assert all(d in shown for d, _, _ in writes)


def test_consent_field_backfill_keeps_every_opt_out(world: World) -> None:
    rec = world.rec
    after = rec["consent_after"]
    assert rec["consent_dynamics_out"], "the tiny org has contacts opted out in Dynamics"
    for d in rec["consent_marketo_out"]:  # Dynamics wins on contacts, but not over an opt-out
        assert after["dynamics"][d] is True and after["marketo"][d]["doNotEmail"] in (True, "true"), d
    for d in rec["consent_dynamics_out"]:
        assert after["dynamics"][d] is True and after["marketo"][d]["doNotEmail"] in (True, "true"), d
    updates = [r for r in rec["consent_ledger"] if r[4] == "update"]
    assert not [r for r in updates if r[6] == "true" and r[7] != "true"]  # no opt-out reversed
    assert {r[8] for r in updates if r[2] in rec["consent_marketo_out"]} == {"resync:conflict:opt_out_sticky"}


def test_after_a_mapping_change_the_ui_shows_the_entity_assets_stale(world: World) -> None:
    """What the asset pages show: the stale status Dagster computes from the recorded code versions."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleCauseCategory
    from dagster._core.loader import LoadingContextForTest

    from sync_pipeline import runs as sync_runs
    from sync_pipeline.connection.keys import asset_key
    from sync_pipeline.connection.partitions import build_partitions
    from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

    v4 = world.rec["configs"][4]  # the last runs used v3; v4 changes contact's middleName direction
    graph = sync_runs.definitions(sync_runs.connection(entities_path=str(v4))).resolve_asset_graph()
    latest = build_partitions(load_config(v4)).get_last_partition_key()
    resolver = CachingStaleStatusResolver(world.instance, graph, LoadingContextForTest(world.instance))

    def code_causes(key: Any) -> list[str]:
        # Plans and pushes are unpartitioned; only extracts have a partition to ask about.
        partition = latest if graph.get(key).is_partitioned else None
        return [
            c.reason
            for c in resolver.get_stale_causes(key, partition)
            if c.category == StaleCauseCategory.CODE
        ]

    assert code_causes(asset_key(CONN, "contact", "plan")) == ["has a new code version"]
    assert code_causes(asset_key(CONN, "contact", "push")) == ["has a new code version"]
    assert (
        code_causes(asset_key(CONN, "lead", "plan")) == []
        and code_causes(asset_key(CONN, "account", "push")) == []
    )


def test_plan_all_reads_every_entity_and_changes_nothing(world: World) -> None:
    """A dry run over every entity (objects by their external keys, persons by id) writes nothing."""
    v3 = world.rec["configs"][3]
    seq, calls_before = world.last_seq(), world.sandbox.calls()
    out = world.cli(v3, "plan", "--all", "--limit", "3")
    assert out.exit_code == 0, out.output
    for e in load_config(v3).entities:
        if not e.is_derived:
            assert f"{e.name}:" in out.output, e.name
    assert world.ledger_since(seq) == []
    calls = world.sandbox.calls()
    assert {
        k: calls[k] - calls_before.get(k, 0)
        for k in calls
        if (k.endswith(".sync") or "batch" in k) and calls[k] != calls_before.get(k, 0)
    } == {}


def test_the_plan_asset_check_says_which_fields_wait_for_their_backfill(world: World) -> None:
    from sync_pipeline.connection.keys import asset_key
    from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

    contact, account, lead = (
        "/".join(asset_key(CONN, e, "plan").path) for e in ("contact", "account", "lead")
    )
    v1, v2 = world.rec["v1_checks"], world.rec["v2_checks"]
    passed, md = v1[(contact, "mapping_backfilled")]
    assert not passed and md["pending_fields"] == "doNotEmail, title"
    assert md["launch"] == "sync-pipeline resync --entity contact --field doNotEmail --field title"
    assert v1[(account, "mapping_backfilled")][0] is False and v1[(lead, "mapping_backfilled")][0] is True
    assert v2[(contact, "mapping_backfilled")][0] is True and v2[(account, "mapping_backfilled")][0] is True
