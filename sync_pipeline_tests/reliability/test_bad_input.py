"""Bad input: every case gets a clear error naming the record, field or setting; good records still go
through; bad ones are held with the reason; nothing is lost. The catalogue is docs/bad-input.md.

Record-level cases share one org (``bad_org``): the tiny org plus one bad record per case, synced by
real Dagster runs with a retry limit of 1 so a failing record is held at once. API-level cases drive
the clients and engine steps against the sandbox with injected faults; configuration cases load
broken settings.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sync_pipeline.clients.dynamics import (
    AuthenticationError,
    DynamicsClient,
    PreconditionFailed,
    RecordNotFound,
    TransientError,
)
from sync_pipeline.config.model import ConfigError, load_config
from sync_pipeline.engine.extract import dynamics as dynamics_extract
from sync_pipeline.engine.push import dynamics as dynamics_push
from sync_pipeline.engine.store import state
from sync_pipeline.sandbox.runner import Sandbox
from sync_pipeline_tests.conftest import SyncHarness
from sync_pipeline_tests.reliability.conftest import write_config


def gid(n: int) -> str:
    return str(uuid.UUID(int=0xBAD0_0000_0000_0000_0000_0000_0000 + n))


LONG_SUBJECT = "S" * 300
EMOJI, RTL, CONTROL = "Zoë 🚀✨ Ωmega", "שלום עולם مرحبا", "line one\nline two\ttabbed"
BAD_SOURCES = ("Web Form", "Webinar")
GOOD = {"contact": gid(1), "lead": gid(2), "account": gid(3)}
BAD = {
    "invalid_email": ("contact", gid(10), {"emailaddress1": "not-an-email", "lastname": "Bademail"}),
    "dup_email_a": ("contact", gid(11), {"emailaddress1": "same@example.org", "lastname": "Twin A"}),
    "dup_email_b": ("contact", gid(12), {"emailaddress1": "same@example.org", "lastname": "Twin B"}),
    "too_long": (
        "lead",
        gid(13),
        {"subject": LONG_SUBJECT, "lastname": "Longsubject", "emailaddress1": "long.subject@example.org"},
    ),
    "missing_required": ("opportunity", gid(14), {"name": None, "estimatedvalue": 1000}),
    "unknown_picklist": ("account", gid(15), {"name": "Odd Industry Ltd", "industrycode": 99}),
    "emoji": (
        "contact",
        gid(16),
        {"firstname": EMOJI, "lastname": RTL, "emailaddress1": "emoji@example.org"},
    ),
    "control": (
        "contact",
        gid(17),
        {"lastname": "Control", "description": CONTROL, "emailaddress1": "control@example.org"},
    ),
    "date_offset": (
        "new_project",
        gid(18),
        {"new_name": "Offset", "new_startdate": "2026-08-03T10:00:00+02:00"},
    ),
}


def _insert_all(sb: Sandbox) -> None:
    sb.dynamics_insert(
        "contact",
        {
            "contactid": GOOD["contact"],
            "lastname": "Good",
            "firstname": "Gina",
            "emailaddress1": "good.contact@example.org",
            "telephone1": "+1 555 0100",
        },
    )
    sb.dynamics_insert(
        "lead",
        {
            "leadid": GOOD["lead"],
            "lastname": "Goodlead",
            "emailaddress1": "good.lead@example.org",
            "subject": "A fine subject",
        },
    )
    sb.dynamics_insert("account", {"accountid": GOOD["account"], "name": "Good Account Inc"})
    for table, did, row in BAD.values():
        key = "new_projectid" if table == "new_project" else f"{table}id"
        sb.dynamics_insert(table, {key: did, **row})
    # Marketo persons that become leads (score >= 50, a last name) with sources Dynamics has no option for.
    for source in BAD_SOURCES:
        slug = source.lower().replace(" ", ".")
        sb.marketo_create_lead(
            {
                "email": f"{slug}@example.org",
                "lastName": source.title().replace(" ", ""),
                "leadScore": 80,
                "leadSource": source,
            }
        )


class BadOrg:
    def __init__(self, harness: SyncHarness):
        self.h, self.sb = harness, harness.sandbox

    def failure(self, entity: str, did: str) -> tuple | None:
        rows = self.h.query(
            "SELECT target, op, field, code, message, held FROM failures "
            "WHERE entity = ? AND dynamics_id = ?",
            [entity, did],
        )
        return rows[0] if rows else None

    def persons(self, did: str) -> list[int]:
        return self.sb.marketo_find_leads("dynamicsId", did)

    def object_row(self, obj: str, key: str, did: str) -> dict[str, Any] | None:
        return next((r for r in self.sb.marketo_rows(obj, limit=1_000_000) if r.get(key) == did), None)


@pytest.fixture(scope="module")
def bad_org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BadOrg]:
    tmp = tmp_path_factory.mktemp("bad-org")
    with Sandbox(tmp / "sandbox") as sb, pytest.MonkeyPatch.context() as mp:
        sb.populate("tiny", seed=0)
        _insert_all(sb)
        for key, value in sb.settings().items():
            mp.setenv(key, value)
        mp.setenv("SYNC_STATE_PATH", str(tmp / "state.duckdb"))
        mp.setenv("SYNC_CONFIG", str(write_config(tmp, max_attempts=1, backoff_seconds=0)))
        harness = SyncHarness(sb, tmp / "state.duckdb")
        harness.run("latest")
        harness.run("latest")
        yield BadOrg(harness)


# ---- record level ---------------------------------------------------------------------------------------------


def test_good_records_go_through_beside_the_bad_ones(bad_org: BadOrg) -> None:
    assert len(bad_org.persons(GOOD["contact"])) == 1
    assert len(bad_org.persons(GOOD["lead"])) == 1
    assert (
        bad_org.object_row("company", "externalCompanyId", GOOD["account"])["company"] == "Good Account Inc"
    )
    for entity, did in (("contact", GOOD["contact"]), ("lead", GOOD["lead"]), ("account", GOOD["account"])):
        assert bad_org.failure(entity, did) is None


def test_invalid_email_is_held_naming_record_and_field(bad_org: BadOrg) -> None:
    _, did, _ = BAD["invalid_email"]
    assert bad_org.persons(did) == []
    target, _op, _f, code, message, held = bad_org.failure("contact", did)
    assert (target, code, held) == ("marketo", "1001", True)
    assert "email" in message.lower()
    assert bad_org.sb.dynamics_get("contact", did)["emailaddress1"] == "not-an-email"  # kept, nothing lost


def test_duplicate_emails_stay_two_separate_persons(bad_org: BadOrg) -> None:
    a, b = BAD["dup_email_a"][1], BAD["dup_email_b"][1]
    pa, pb = bad_org.persons(a), bad_org.persons(b)
    assert len(pa) == 1 and len(pb) == 1 and pa != pb  # linked by Dynamics id, never merged into one
    assert bad_org.failure("contact", a) is None and bad_org.failure("contact", b) is None


def test_text_longer_than_the_marketo_field_is_held_with_the_limit(bad_org: BadOrg) -> None:
    _, did, _ = BAD["too_long"]
    target, _op, _f, code, message, held = bad_org.failure("lead", did)
    assert (target, code, held) == ("marketo", "1001", True)
    assert "topic" in message and "255" in message
    assert bad_org.persons(did) == []
    assert bad_org.sb.dynamics_get("lead", did)["subject"] == LONG_SUBJECT


def test_missing_required_field_is_held_naming_the_field(bad_org: BadOrg) -> None:
    _, did, _ = BAD["missing_required"]  # an opportunity without a name (required by Marketo)
    assert bad_org.object_row("opportunity", "externalOpportunityId", did) is None
    target, _op, _f, code, message, held = bad_org.failure("opportunity", did)
    assert (target, code, held) == ("marketo", "1002", True)
    assert "'name'" in message


def test_unknown_picklist_code_is_rejected_naming_field_and_code(bad_org: BadOrg) -> None:
    _, did, _ = BAD["unknown_picklist"]
    target, op, field, code, message, held = bad_org.failure("account", did)
    assert (op, field, code, held) == ("reject", "industry", "invalid_value", True)
    assert "industry" in message and "99" in message
    assert bad_org.object_row("company", "externalCompanyId", did) is None


def test_unknown_picklist_label_from_marketo_is_held_field_by_field(bad_org: BadOrg) -> None:
    # Marketo persons made with lead sources Dynamics has no option for (BAD_SOURCES).
    rows = bad_org.h.query(
        "SELECT dynamics_id, field, message, held FROM failures WHERE target = 'dynamics:fields'"
    )
    assert len(rows) == len(BAD_SOURCES), "expected the unmapped lead sources to be held"
    for did, field, message, held in rows:
        assert held and field == "leadSource" and did in message and "leadsourcecode" in message
        # The rest of the record still synced: its person exists and carries the Dynamics id.
        assert len(bad_org.persons(did)) == 1


def test_emoji_and_right_to_left_text_round_trip_intact(bad_org: BadOrg) -> None:
    _, did, _ = BAD["emoji"]
    (mid,) = bad_org.persons(did)
    person = bad_org.sb.marketo_get_lead(mid)
    assert (person["firstName"], person["lastName"]) == (EMOJI, RTL)
    bad_org.sb.marketo_update_lead(mid, {"title": RTL + " " + EMOJI})
    bad_org.h.run("latest")
    assert bad_org.sb.dynamics_get("contact", did)["jobtitle"] == RTL + " " + EMOJI


def test_control_characters_survive(bad_org: BadOrg) -> None:
    _, did, _ = BAD["control"]
    (mid,) = bad_org.persons(did)
    assert bad_org.sb.marketo_get_lead(mid)["personNotes"] == CONTROL


def test_dates_with_offsets_arrive_in_utc(bad_org: BadOrg) -> None:
    _, did, _ = BAD["date_offset"]
    row = bad_org.object_row("project_c", "projectId", did)
    assert row is not None and str(row["startDate"]).startswith("2026-08-03T08:00:00")


# ---- API level ------------------------------------------------------------------------------------------------


@pytest.fixture
def dclient(sandbox: Sandbox) -> DynamicsClient:
    s = sandbox.settings()
    return DynamicsClient(
        s["DYNAMICS_URL"],
        s["DYNAMICS_AUTHORITY"],
        s["DYNAMICS_CLIENT_ID"],
        s["DYNAMICS_CLIENT_SECRET"],
        verify=s["SYNC_CA_BUNDLE"],
        max_retries=2,
        backoff_base=0.01,
        sleep=lambda s: None,
    )


def _seed_accounts(sb: Sandbox, n: int = 3) -> list[str]:
    ids = [gid(100 + i) for i in range(n)]
    for i, did in enumerate(ids):
        sb.dynamics_insert("account", {"accountid": did, "name": f"Account {i}"})
    return ids


@pytest.mark.parametrize("kind", ["malformed", "truncated", "html"])
def test_broken_bodies_are_retried_then_named(sandbox: Sandbox, dclient: DynamicsClient, kind: str) -> None:
    ids = _seed_accounts(sandbox)
    fault = {"kind": kind, "status": 502}
    sandbox.faults([{"pattern": "dynamics.query", "rate": 1.0, "count": 1, "faults": [fault]}])
    rows = [r for page in dclient.iter_pages("accounts", ["name"]) for r in page]
    assert sorted(r["accountid"] for r in rows) == sorted(ids)  # one bad body: retried, nothing lost
    sandbox.faults([{"pattern": "dynamics.query", "rate": 1.0, "faults": [fault]}])
    with pytest.raises(TransientError) as exc:
        list(dclient.iter_pages("accounts", ["name"]))
    assert "accounts" in str(exc.value)  # names the call
    assert ("JSON" in str(exc.value)) or ("502" in str(exc.value))


def test_401_mid_run_reauthenticates_and_continues(sandbox: Sandbox, dclient: DynamicsClient) -> None:
    ids = _seed_accounts(sandbox)
    assert dclient.whoami()["OrganizationId"]
    sandbox.faults(
        [{"pattern": "dynamics.query", "rate": 1.0, "count": 1, "faults": [{"kind": "unauthorized"}]}]
    )
    rows = [r for page in dclient.iter_pages("accounts", ["name"]) for r in page]
    assert sorted(r["accountid"] for r in rows) == sorted(ids)
    assert dclient.calls["reauth"] == 1
    sandbox.faults([{"pattern": "dynamics.query", "rate": 1.0, "faults": [{"kind": "unauthorized"}]}])
    with pytest.raises(AuthenticationError, match="accounts"):
        list(dclient.iter_pages("accounts", ["name"]))


def test_expired_delta_token_falls_back_to_a_full_read_without_losing_changes(
    sandbox: Sandbox, dclient: DynamicsClient, tmp_path: Path
) -> None:
    config = load_config()
    entity = config.entity("account")
    keep, change, drop = _seed_accounts(sandbox)
    now = datetime.now(UTC)
    with state.connect(tmp_path / "s.duckdb") as con:
        state.ensure_schema(con, config)
        first = dynamics_extract.extract_dynamics(con, config, entity, dclient, now, now, "p", latest=True)
        assert first.rows == 3 and state.get_cursor(con, dynamics_extract.delta_cursor(entity))
        sandbox.dynamics_update("account", change, {"name": "Renamed"})
        sandbox.dynamics_delete("account", drop)
        sandbox.advance_clock(91 * 24 * 3600)  # past the org's change-tracking retention
        second = dynamics_extract.extract_dynamics(con, config, entity, dclient, now, now, "p", latest=True)
        assert second.mode == "full (delta expired)"
        got = dict(con.execute("SELECT id, deleted FROM d_account").fetchall())
        assert got == {keep: False, change: False, drop: True}
        assert (
            con.execute("SELECT f_company FROM d_account WHERE id = ?", [change]).fetchone()[0] == "Renamed"
        )


def test_412_on_a_changed_record_is_named_and_replanned(sandbox: Sandbox, dclient: DynamicsClient) -> None:
    (did,) = _seed_accounts(sandbox, 1)
    etag = next(iter(dclient.iter_pages("accounts", ["name"], annotations=True)))[0]["@odata.etag"]
    sandbox.dynamics_update("account", did, {"name": "Changed meanwhile"})
    with pytest.raises(PreconditionFailed):
        dclient.update("accounts", did, {"name": "Ours"}, etag=etag)
    (result,) = dynamics_push._write_dynamics_batched(
        dclient, "accounts", [(did, "update", "7", etag, {"name": "Ours"})]
    )
    assert (result.ok, result.code) == (False, "412") and did in result.message
    assert sandbox.dynamics_get("account", did)["name"] == "Changed meanwhile"  # not overwritten blindly


def test_404_on_a_record_deleted_meanwhile_is_named(sandbox: Sandbox, dclient: DynamicsClient) -> None:
    (did,) = _seed_accounts(sandbox, 1)
    sandbox.dynamics_delete("account", did)
    with pytest.raises(RecordNotFound):
        dclient.update("accounts", did, {"name": "Ours"})
    (result,) = dynamics_push._write_dynamics_batched(
        dclient, "accounts", [(did, "update", "7", None, {"name": "Ours"})]
    )
    assert (
        (result.ok, result.code) == (False, "404") and did in result.message and "deleted" in result.message
    )
    with pytest.raises(KeyError):  # and the write did not resurrect it
        sandbox.dynamics_get("account", did)


@pytest.fixture
def mclient(sandbox: Sandbox) -> Any:
    from sync_pipeline.clients.marketo import MarketoClient

    s = sandbox.settings()
    return MarketoClient(
        s["MARKETO_BASE_URL"],
        s["MARKETO_CLIENT_ID"],
        s["MARKETO_CLIENT_SECRET"],
        verify=s["SYNC_CA_BUNDLE"],
        max_retries=2,
        backoff_seconds=0.01,
        backoff_max_seconds=0.02,
    )


def test_wrong_types_are_refused_per_record_naming_the_field(mclient: Any) -> None:
    res = mclient.upsert_objects(
        "companies",
        [
            {"externalCompanyId": gid(200), "company": "Typed Wrong", "numberOfEmployees": "many"},
            {"externalCompanyId": gid(201), "company": "Typed Right", "numberOfEmployees": 12},
        ],
        action="createOrUpdate",
        dedupe_by="dedupeFields",
    )
    assert res[0].status == "skipped" and "numberOfEmployees" in res[0].reasons[0]["message"]
    assert res[1].status == "created"
    from sync_pipeline.config.model import FieldMap
    from sync_pipeline.engine import normalize

    with pytest.raises(ValueError, match="leadqualitycode"):  # Marketo -> Dynamics: the column is named
        normalize.to_dynamics(
            FieldMap(
                marketo="leadRating", dynamics="leadqualitycode", transform="picklist", options={1: "Hot"}
            ),
            "Lukewarm",
        )


def test_marketo_html_error_page_is_retried_then_named(sandbox: Sandbox, mclient: Any) -> None:
    from sync_pipeline.clients.marketo import MarketoError

    lead = sandbox.marketo_create_lead({"email": "html.page@example.org", "lastName": "Html"})
    sandbox.faults(
        [
            {
                "pattern": "marketo.leads.get",
                "rate": 1.0,
                "count": 1,
                "faults": [{"kind": "html", "status": 503}],
            }
        ]
    )
    assert mclient.get_leads("id", [lead["id"]], ["email"])[0]["email"] == "html.page@example.org"
    sandbox.faults(
        [{"pattern": "marketo.leads.get", "rate": 1.0, "faults": [{"kind": "html", "status": 503}]}]
    )
    with pytest.raises(MarketoError) as exc:
        mclient.get_leads("id", [lead["id"]], ["email"])
    assert "leads" in str(exc.value) and "503" in str(exc.value)


# ---- configuration level --------------------------------------------------------------------------------------


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "entities.yaml"
    path.write_text("sync:\n  partitions: {start_date: '2026-08-01'\nentities: [\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value) and "line" in str(exc.value)


def test_unknown_entity_reference_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, edit="target: systemuser}=>target: no_such_entity}")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "no_such_entity" in str(exc.value) and "team" in str(exc.value)


def test_unknown_field_key_is_named(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        edit="{marketo: firstName, dynamics: firstname}=>"
        "{marketo: firstName, dynamics: firstname, drection: to_marketo}",
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "drection" in str(exc.value) and "systemuser" in str(exc.value)


def test_bad_url_is_refused_naming_the_setting(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETO_BASE_URL", "ftp://marketo.example.com")
    result = harness.run("latest", raise_on_error=False)
    assert not result.success
    text = _failures(result)
    assert "ftp://marketo.example.com" in text and "Marketo" in text
    assert harness.sandbox.calls().get("marketo.leads.sync", 0) == 0


def test_missing_secret_names_the_env_var(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNAMICS_CLIENT_SECRET")
    with pytest.raises(Exception) as exc:
        harness.run("latest")
    assert "DYNAMICS_CLIENT_SECRET" in str(exc.value)
    assert harness.sandbox.calls().get("marketo.leads.sync", 0) == 0


def test_wrong_credentials_fail_the_run_naming_the_client(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "definitely-wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("MARKETO_CLIENT_SECRET", secret)
    result = harness.run("latest", raise_on_error=False)
    assert not result.success
    text = _failures(result)
    assert "401" in text or "client" in text.lower() or "credential" in text.lower()
    assert secret not in text
    assert harness.query("SELECT count(*) FROM identity WHERE entity IN ('lead', 'contact')")[0][0] == 0


def _failures(result: Any) -> str:
    return "\n".join(
        str(ev.step_failure_data.error)
        for ev in result.all_events
        if ev.is_step_failure and ev.step_failure_data and ev.step_failure_data.error
    )
