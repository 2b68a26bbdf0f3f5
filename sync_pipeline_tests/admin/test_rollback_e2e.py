"""Rollback end to end: the sandbox, real in-process Dagster runs, both systems read back after each step.

One populated world per module (the initial copy is the expensive part); every test works on its own
records, picked from the identity map, so the tests do not see each other's edits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sync_pipeline.admin import rollback as rb
from sync_pipeline.engine.store import state
from sync_pipeline.sandbox.runner import Sandbox


class World:
    def __init__(self, sb: Sandbox, state_path: Path):
        import dagster as dg

        from sync_pipeline.cli.ops import _clients
        from sync_pipeline.config.model import load_config

        self.sb, self.state_path = sb, state_path
        self.instance = dg.DagsterInstance.ephemeral()
        self.config = load_config(None)
        self.stack, dynamics, marketo = _clients()
        self.dynamics, self.marketo = dynamics.get_client(), marketo.get_client()
        self.used: set[str] = set()

    def run(self) -> str:
        from sync_pipeline import runs

        result = runs.run_sync(self.instance, scope="latest", raise_on_error=True)
        assert result.success
        return result.run_id

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        with state.connect(self.state_path) as con:
            return con.execute(sql, params or []).fetchall()

    def pick(self, entity: str) -> tuple[str, str]:
        """A linked record no other test has used."""
        for did, mid in self.query(
            """SELECT dynamics_id, marketo_id FROM identity WHERE entity = ? AND state = 'active'
                                      ORDER BY dynamics_id""",
            [entity],
        ):
            if did not in self.used:
                self.used.add(did)
                return did, mid
        raise AssertionError(f"no unused linked {entity}")

    def plan(self, run_id: str, **kw: Any) -> list[rb.Item]:
        with state.connect(self.state_path) as con:
            return rb.plan_rollback(con, self.config, run_id, self.dynamics, self.marketo, **kw)

    def rollback(self, run_id: str, **kw: Any) -> tuple[list[rb.Item], rb.Outcome]:
        before_write = kw.pop("before_write", None)
        with state.connect(self.state_path) as con:
            items = rb.plan_rollback(con, self.config, run_id, self.dynamics, self.marketo, **kw)
            outcome = rb.execute_rollback(
                con,
                self.config,
                items,
                self.dynamics,
                self.marketo,
                source_run=run_id,
                before_write=before_write,
            )
        return items, outcome

    def company(self, did: str) -> dict[str, Any]:
        return next(
            c for c in self.sb.marketo_rows("company", limit=1_000_000) if c["externalCompanyId"] == did
        )

    def writes(self, run_id: str, did: str) -> list[tuple]:
        return self.query(
            """SELECT target, op, field, value_before, value_after FROM ledger
                             WHERE run_id = ? AND dynamics_id = ? AND op = 'update' ORDER BY target, field""",
            [run_id, did],
        )


def _item(items: list[rb.Item], did: str, fld: str) -> rb.Item:
    return next(it for it in items if it.dynamics_id == did and it.field == fld)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("rollback")
    with Sandbox(base / "sandbox") as sb, pytest.MonkeyPatch.context() as mp:
        sb.populate("tiny", seed=0)
        for key, value in sb.settings().items():
            mp.setenv(key, value)
        mp.setenv("SYNC_STATE_PATH", str(base / "state.duckdb"))
        w = World(sb, base / "state.duckdb")
        with w.stack:
            w.run()  # the initial copy
            w.run()  # and its echoes
            yield w


def test_one_way_field_is_restored_to_what_marketo_really_held(world: World) -> None:
    sb = world.sb
    account, _ = world.pick("account")
    synced = world.company(account)["mainPhone"]
    # A marketer changed the company's phone in Marketo; the base still says `synced`.
    world.marketo.upsert_objects(
        "companies", [{"externalCompanyId": account, "mainPhone": "+1 555 0100"}], action="updateOnly"
    )
    sb.dynamics_update("account", account, {"telephone1": "+1 555 0111"})
    run = world.run()
    assert world.company(account)["mainPhone"] == "+1 555 0111"
    # The ledger has what was really there, not NULL and not the stale base.
    assert ("marketo", "update", "mainPhone", "+1 555 0100", "+1 555 0111") in world.writes(run, account)
    assert synced != "+1 555 0100"

    items, outcome = world.rollback(run)
    it = _item(items, account, "mainPhone")
    assert (it.action, it.now, it.restore) == (rb.RESTORE, "+1 555 0111", "+1 555 0100")
    assert outcome.restored >= 1 and not outcome.failed
    assert world.company(account)["mainPhone"] == "+1 555 0100"
    assert sb.dynamics_get("account", account)["telephone1"] == "+1 555 0111"  # untouched

    # One more sync: nothing bounces, on either system.
    after = world.run()
    assert world.company(account)["mainPhone"] == "+1 555 0100"
    assert sb.dynamics_get("account", account)["telephone1"] == "+1 555 0111"
    assert world.writes(after, account) == []


def test_two_way_field_is_restored_and_the_other_side_keeps_its_value(world: World) -> None:
    sb = world.sb
    contact, person = world.pick("contact")
    old = sb.marketo_get_lead(int(person)).get("phone")
    sb.dynamics_update("contact", contact, {"telephone1": "+1 555 0222"})
    run = world.run()
    assert sb.marketo_get_lead(int(person))["phone"] == "+1 555 0222"
    assert ("marketo", "update", "phone", old, "+1 555 0222") in world.writes(run, contact)

    items, outcome = world.rollback(run)
    assert _item(items, contact, "phone").action == rb.RESTORE and not outcome.failed
    assert sb.marketo_get_lead(int(person)).get("phone") == old
    assert sb.dynamics_get("contact", contact)["telephone1"] == "+1 555 0222"
    after = world.run()  # reads the rollback's echo: nothing bounces
    assert world.writes(after, contact) == []
    assert sb.marketo_get_lead(int(person)).get("phone") == old
    assert sb.dynamics_get("contact", contact)["telephone1"] == "+1 555 0222"

    # A new edit on either side after the rollback flows as usual (the split base ends there).
    sb.marketo_update_lead(int(person), {"phone": "+1 555 0223"})
    world.run()
    assert sb.dynamics_get("contact", contact)["telephone1"] == "+1 555 0223"
    assert world.query("SELECT count(*) FROM b__split WHERE dynamics_id = ?", [contact]) == [(0,)]


def test_conflict_resolution_is_undone_on_both_sides(world: World) -> None:
    sb = world.sb
    lead, person = world.pick("lead")
    sb.dynamics_update("lead", lead, {"address1_city": "Dynamicsville"})
    sb.marketo_update_lead(int(person), {"city": "Marketoburg"})
    run = world.run()
    # Leads: Marketo wins; Dynamics got Marketo's value.
    assert sb.dynamics_get("lead", lead)["address1_city"] == "Marketoburg"
    assert ("dynamics", "update", "city", "Dynamicsville", "Marketoburg") in world.writes(run, lead)

    items, outcome = world.rollback(run)
    assert _item(items, lead, "city").action == rb.RESTORE and not outcome.failed
    assert sb.dynamics_get("lead", lead)["address1_city"] == "Dynamicsville"
    assert sb.marketo_get_lead(int(person))["city"] == "Marketoburg"
    after = world.run()  # reads the rollback's echo (a new Dynamics version): nothing bounces
    assert world.writes(after, lead) == []
    assert sb.dynamics_get("lead", lead)["address1_city"] == "Dynamicsville"
    assert sb.marketo_get_lead(int(person))["city"] == "Marketoburg"  # the marketer's value is kept
    # `verify` knows the difference is the rollback's, not a sync bug; a difference elsewhere would show.
    from sync_pipeline.admin import verify

    diffs = verify.compare(world.config, world.dynamics, world.marketo, world.state_path)
    assert [d for d in diffs if d.dynamics_id == lead] == []
    sb.marketo_update_lead(int(person), {"city": "Sneaky"})  # not synced yet: a real difference
    diffs = verify.compare(world.config, world.dynamics, world.marketo, world.state_path)
    assert [(d.field, d.dynamics_value, d.marketo_value) for d in diffs if d.dynamics_id == lead] == [
        ("city", "Dynamicsville", "Sneaky")
    ]
    sb.marketo_update_lead(int(person), {"city": "Marketoburg"})  # back to its split value: nothing to sync
    after = world.run()
    assert (
        world.writes(after, lead) == [] and sb.dynamics_get("lead", lead)["address1_city"] == "Dynamicsville"
    )


def test_fields_changed_since_are_skipped_and_left_untouched(world: World) -> None:
    sb = world.sb
    account, _ = world.pick("account")
    lead, person = world.pick("lead")
    sb.dynamics_update("account", account, {"telephone1": "+1 555 0331"})
    sb.marketo_update_lead(int(person), {"title": "Run Title"})
    run = world.run()
    assert sb.dynamics_get("lead", lead)["jobtitle"] == "Run Title"
    # After the run: a marketer edits the company, a Dynamics user edits the lead's title.
    world.marketo.upsert_objects(
        "companies", [{"externalCompanyId": account, "mainPhone": "+1 555 0332"}], action="updateOnly"
    )
    sb.dynamics_update("lead", lead, {"jobtitle": "Newer Title"})

    items, outcome = world.rollback(run)
    phone, title = _item(items, account, "mainPhone"), _item(items, lead, "title")
    assert (phone.action, phone.now) == (rb.SKIP_CHANGED, "+1 555 0332")
    assert (title.action, title.now) == (rb.SKIP_CHANGED, "Newer Title")
    assert world.company(account)["mainPhone"] == "+1 555 0332"
    assert sb.dynamics_get("lead", lead)["jobtitle"] == "Newer Title"
    assert not any(it.dynamics_id in (account, lead) for it, _ in outcome.failed)
    assert world.query(
        """SELECT count(*) FROM ledger WHERE rule = ? AND dynamics_id IN (?, ?)""",
        [f"rollback:{run}", account, lead],
    ) == [(0,)]


def test_a_change_between_the_read_and_the_write_is_skipped_not_overwritten(world: World) -> None:
    sb = world.sb
    lead, lead_person = world.pick("lead")
    contact, contact_person = world.pick("contact")
    sb.marketo_update_lead(int(lead_person), {"title": "Race Title"})  # -> Dynamics
    sb.dynamics_update("contact", contact, {"telephone1": "+1 555 0441"})  # -> Marketo
    run = world.run()

    def meanwhile(entity: str, target: str, items: list[rb.Item]) -> None:
        # Someone edits both records after rollback decided to restore them, before it writes.
        if (entity, target) == ("lead", "dynamics"):
            sb.dynamics_update("lead", lead, {"jobtitle": "Edited Meanwhile"})
        if (entity, target) == ("contact", "marketo"):
            sb.marketo_update_lead(int(contact_person), {"phone": "+1 555 0442"})

    items, outcome = world.rollback(run, before_write=meanwhile)
    title, phone = _item(items, lead, "title"), _item(items, contact, "phone")
    assert title.action == rb.SKIP_CHANGED and "412" in title.reason
    assert phone.action == rb.SKIP_CHANGED and "between the read and the write" in phone.reason
    assert {title.seq, phone.seq} <= {it.seq for it in outcome.skipped}
    assert sb.dynamics_get("lead", lead)["jobtitle"] == "Edited Meanwhile"
    assert sb.marketo_get_lead(int(contact_person))["phone"] == "+1 555 0442"


def test_a_rollback_can_be_rolled_back_and_rolling_back_twice_is_a_no_op(world: World) -> None:
    sb = world.sb
    contact, person = world.pick("contact")
    old = sb.marketo_get_lead(int(person)).get("phone")
    sb.dynamics_update("contact", contact, {"telephone1": "+1 555 0551"})
    run = world.run()

    _, first = world.rollback(run)
    assert first.restored >= 1 and sb.marketo_get_lead(int(person)).get("phone") == old
    again, second = world.rollback(run)
    assert second.restored == 0 and _item(again, contact, "phone").action == rb.SKIP_CHANGED
    assert sb.marketo_get_lead(int(person)).get("phone") == old

    # Undo the undo: the run's value is back, and the state agrees with both systems again.
    items, undo = world.rollback(first.run_id)
    assert _item(items, contact, "phone").action == rb.RESTORE and undo.restored >= 1
    assert sb.marketo_get_lead(int(person))["phone"] == "+1 555 0551"
    assert world.query("SELECT count(*) FROM b__split WHERE dynamics_id = ?", [contact]) == [(0,)]
    assert world.query("SELECT f_phone FROM b_contact WHERE dynamics_id = ?", [contact]) == [("+1 555 0551",)]
    after = world.run()
    assert world.writes(after, contact) == []
    assert sb.dynamics_get("contact", contact)["telephone1"] == "+1 555 0551"


def test_since_rolls_back_every_run_after_a_time_newest_first(world: World) -> None:
    sb = world.sb
    contact, person = world.pick("contact")
    old = sb.marketo_get_lead(int(person)).get("phone")
    since = state.utcnow()
    sb.dynamics_update("contact", contact, {"telephone1": "+1 555 0661"})
    first = world.run()
    sb.dynamics_update("contact", contact, {"telephone1": "+1 555 0662"})
    second = world.run()
    with state.connect(world.state_path) as con:
        runs = rb.runs_since(con, since)
    assert runs[:2] == [second, first] and all(not r.startswith("rollback-") for r in runs)
    done: list[str] = []
    for source in runs:  # what `rollback --since` does
        _, outcome = world.rollback(source, ignore_runs=[*runs, *done])
        done.append(outcome.run_id)
    assert sb.marketo_get_lead(int(person)).get("phone") == old
    after = world.run()
    assert world.writes(after, contact) == []
    assert sb.marketo_get_lead(int(person)).get("phone") == old
    assert sb.dynamics_get("contact", contact)["telephone1"] == "+1 555 0662"


# (entity, Dynamics table, Dynamics column, Marketo object, Marketo field, new value)
ONE_WAY = [
    ("systemuser", "systemuser", "title", "salesPerson", "title", "Rollback Tester"),
    ("team", "team", "description", "dynamicsTeam_c", "description", "rolled team"),
    ("opportunity", "opportunity", "name", "opportunity", "name", "Rolled Opportunity"),
    ("project", "new_project", "new_name", "project_c", "name", "Rolled Project"),
]


def test_every_one_way_object_records_its_true_before_value_and_is_restored(world: World) -> None:
    sb = world.sb
    picked = []
    for entity, table, column, obj, fld, value in ONE_WAY:
        did, _ = world.pick(entity)
        key = world.config.entity(entity).marketo.key
        row = next(r for r in sb.marketo_rows(obj, limit=1_000_000) if str(r.get(key)).lower() == did)
        sb.dynamics_update(table, did, {column: value})
        assert row.get(fld) is not None, (obj, did)  # a real value: NULL is what the ledger used to say
        picked.append((did, key, obj, fld, value, row.get(fld)))
    run = world.run()
    for did, _key, obj, fld, value, before in picked:
        written = [w for w in world.writes(run, did) if w[2] == fld]
        assert written == [("marketo", "update", fld, before, value)], (obj, written)
    items, outcome = world.rollback(run)
    assert not outcome.failed
    for did, key, obj, fld, _value, before in picked:
        assert _item(items, did, fld).action == rb.RESTORE
        row = next(r for r in sb.marketo_rows(obj, limit=1_000_000) if str(r.get(key)).lower() == did)
        assert row.get(fld) == before, obj


def test_an_object_update_whose_before_value_cannot_be_read_waits_for_the_next_run(world: World) -> None:
    sb = world.sb
    account, _ = world.pick("account")
    before = world.company(account)["mainPhone"]
    sb.dynamics_update("account", account, {"telephone1": "+1 555 0881"})
    sb.faults(
        [{"pattern": "marketo.companies.get", "rate": 1.0, "faults": [{"kind": "code", "code": "1003"}]}]
    )
    try:
        run = world.run()
    finally:
        sb.clear_faults()
    assert world.company(account)["mainPhone"] == before  # not written blind
    assert world.writes(run, account) == []
    code, message = world.query("SELECT code, message FROM failures WHERE dynamics_id = ?", [account])[0]
    assert code == "1003" and "before-value" in message
    world.query(
        "UPDATE failures SET next_attempt_at = TIMESTAMP '2000-01-01' WHERE dynamics_id = ?", [account]
    )
    again = world.run()  # the retry (due now instead of after the packaged 60 s backoff)
    assert world.company(account)["mainPhone"] == "+1 555 0881"
    assert ("marketo", "update", "mainPhone", before, "+1 555 0881") in world.writes(again, account)


def test_a_ledger_row_from_before_before_values_is_unknown_not_blank(world: World) -> None:
    account, _ = world.pick("account")
    world.sb.dynamics_update("account", account, {"telephone1": "+1 555 0991"})
    run = world.run()
    marker = world.query("SELECT value FROM schema_meta WHERE key = 'ledger_before_values_from_seq'")[0][0]
    # What an older version wrote: NULL before-values for objects, and no marker past its rows.
    world.query("UPDATE ledger SET value_before = NULL WHERE run_id = ? AND dynamics_id = ?", [run, account])
    world.query(
        "UPDATE schema_meta SET value = CAST((SELECT max(seq) + 1 FROM ledger) AS VARCHAR) "
        "WHERE key = 'ledger_before_values_from_seq'"
    )
    try:
        phone = _item(world.plan(run), account, "mainPhone")
        assert phone.action == rb.SKIP_OTHER and "not recorded" in phone.reason
        assert rb.display(phone.restore) == "(unknown)"
    finally:
        world.query("UPDATE schema_meta SET value = ? WHERE key = 'ledger_before_values_from_seq'", [marker])
    assert world.company(account)["mainPhone"] == "+1 555 0991"


def test_a_new_lead_whose_link_back_to_its_person_failed_is_linked_by_the_next_sync(world: World) -> None:
    # (Not rollback itself: the random rollbacks of the convergence soak shifted its fault draws onto this.)
    sb = world.sb
    person = int(
        sb.marketo_create_lead({"email": "link.back@example.net", "lastName": "Linkback", "leadScore": 80})[
            "id"
        ]
    )
    sb.faults([{"pattern": "marketo.leads.sync", "rate": 1.0, "faults": [{"kind": "code", "code": "1003"}]}])
    try:
        world.run()
    finally:
        sb.clear_faults()
    lead = world.query(
        "SELECT dynamics_id FROM identity WHERE entity = 'lead' AND marketo_id = ?", [str(person)]
    )
    assert len(lead) == 1 and sb.dynamics_get("lead", lead[0][0])["lastname"] == "Linkback"
    assert sb.marketo_get_lead(person).get("dynamicsId") is None  # the write-back failed
    world.run()
    assert sb.marketo_get_lead(person).get("dynamicsId") == lead[0][0]
    assert sb.marketo_get_lead(person).get("dynamicsType") == "Lead"


def test_an_opt_out_the_run_wrote_is_never_rolled_back_into_an_opt_in(world: World) -> None:
    sb = world.sb
    contact, person = world.pick("contact")
    assert sb.marketo_get_lead(int(person)).get("unsubscribed") is not True
    sb.dynamics_update("contact", contact, {"donotbulkemail": True, "jobtitle": "Opted Out Title"})
    run = world.run()
    assert sb.marketo_get_lead(int(person))["unsubscribed"] is True
    items, outcome = world.rollback(run)
    consent, title = _item(items, contact, "unsubscribed"), _item(items, contact, "title")
    assert consent.action == rb.SKIP_OTHER and "opt-out" in consent.reason
    assert title.action == rb.RESTORE  # the rest of the record is rolled back
    assert sb.marketo_get_lead(int(person))["unsubscribed"] is True
    assert world.query("SELECT DISTINCT op FROM ledger WHERE run_id = ?", [outcome.run_id]) == [("restore",)]
