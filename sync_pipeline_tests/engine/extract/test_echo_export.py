"""The echo export (engine/extract/echo.py) against the sandbox, without Dagster: the same backlog of our own
writes and a marketer's edits is read once through one bulk activity export and once through REST lead changes,
and both leave the same mirror, pending marks and per-field times (policy ``latest``); below the threshold the
REST lead changes are read as before."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from sync_pipeline.clients.marketo import MarketoClient
from sync_pipeline.config.model import DEFAULT_PATH, load_config
from sync_pipeline.engine.extract import echo, marketo
from sync_pipeline.engine.store.state import ensure_schema
from sync_pipeline.sandbox.marketo.api_leads import SCAN_WINDOW

OURS = 40  # persons our "push" writes; the threshold is lowered below it


@pytest.fixture
def config(tmp_path: Path):
    text = DEFAULT_PATH.read_text()
    old = "{marketo: title, dynamics: jobtitle}"
    assert old in text
    path = tmp_path / "entities-latest.yaml"
    path.write_text(text.replace(old, "{marketo: title, dynamics: jobtitle, policy: latest}"))
    return load_config(path)


@pytest.fixture
def client(sandbox):
    s = sandbox.settings()
    c = MarketoClient(
        s["MARKETO_BASE_URL"],
        s["MARKETO_CLIENT_ID"],
        s["MARKETO_CLIENT_SECRET"],
        verify=s["SYNC_CA_BUNDLE"],
        poll_seconds=0.05,
    )
    yield c
    c.close()


def _extract(con, config, client) -> marketo.ExtractStats:
    now = datetime.now(UTC)
    return marketo.extract_marketo_persons(con, config, client, now - timedelta(days=1), now, latest=True)


def _backlog(sandbox, client, config, con) -> None:
    """The state an initial copy leaves: persons we created and updated (mirrored and in the ledger), and a
    marketer's edits made meanwhile."""
    _extract(con, config, client)  # the initial read: watermark and cursors
    rows = [
        {
            "email": f"echo{i}@example.org",
            "firstName": f"First{i}",
            "lastName": f"Last{i}",
            "title": f"Our title {i}",
            "dynamicsId": str(uuid.UUID(int=i + 1)),
            "dynamicsType": "Lead",
        }
        for i in range(OURS)
    ]
    ids = [r.id for r in client.sync_leads(rows, "createOrUpdate", "email")]
    updates = [
        {"id": ids[i], "title": f"Our new title {i}"} for i in range(10)
    ]  # echoed as Change Data Value
    client.sync_leads(updates, "updateOnly", "id")
    for i, u in enumerate(updates):
        rows[i]["title"] = u["title"]
    marketo.ingest_marketo_persons(con, config, [{"id": ids[i], **r} for i, r in enumerate(rows)])
    con.execute("UPDATE m_person SET pending_seq = NULL")  # what the push leaves: mirrored, nothing pending
    con.executemany(
        """INSERT INTO ledger (run_id, written_at, entity, dynamics_id, marketo_id, target, op, field, value_after)
           VALUES ('copy', ?, 'lead', ?, ?, 'marketo', 'create', 'title', ?)""",
        [
            [datetime.now(UTC).replace(tzinfo=None), r["dynamicsId"], str(ids[i]), r["title"]]
            for i, r in enumerate(rows)
        ],
    )
    sb = sandbox.marketo.store
    sb.update_lead(ids[0], {"title": "Marketer A1"}, source="UI")
    sb.update_lead(ids[0], {"title": "Marketer A2"}, source="UI")  # the last one wins, its time is kept
    sb.update_lead(ids[1], {"phone": "+1 555 0100"}, source="UI")
    sb.update_lead(ids[3], {"title": None}, source="UI")  # cleared: a null New Value
    sb.update_lead(ids[12], {"title": "Briefly"}, source="UI")
    sb.update_lead(ids[12], {"title": "Our title 12"}, source="UI")  # back to the mirror's value
    sb.create_lead(
        {"email": "walk.in@example.org", "lastName": "Walkin"}, source="UI"
    )  # never seen: read whole


def _state(con) -> tuple:
    cur = con.execute(
        "SELECT * EXCLUDE (seen_at, pending_seq), pending_seq IS NOT NULL AS pending FROM m_person ORDER BY id"
    )
    names = [d[0] for d in cur.description]
    persons = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    times = con.execute("SELECT * FROM field_times ORDER BY ALL").fetchall()
    return persons, times


def test_one_export_leaves_what_paging_the_lead_changes_leaves(
    sandbox, client, config, tmp_path, monkeypatch
):
    monkeypatch.setattr(marketo, "WATERMARK_MARGIN", timedelta(0))  # the backlog is seconds old, not minutes
    path = tmp_path / "export.duckdb"
    con = duckdb.connect(str(path))
    ensure_schema(con, config)
    _backlog(sandbox, client, config, con)
    con.close()
    shutil.copy(path, tmp_path / "rest.duckdb")
    log_length = len(sandbox.marketo.store.activities)

    monkeypatch.setattr(echo, "ECHO_EXPORT_PERSONS", OURS - 1)
    with duckdb.connect(str(path)) as con:
        sandbox.reset_calls()
        stats = _extract(con, config, client)
        calls = sandbox.calls()
        via_export = _state(con)
    assert stats.mode.startswith("echo export")
    assert calls["marketo.bulk.export.create"] == 1
    # paging token, describe, create, enqueue, <= 2 status polls, file, one lead-change page after the window,
    # the Merge/Delete read (SCAN_WINDOW activities a call) and one read of the unknown person.
    bound = 1 + 1 + (1 + 1 + 2 + 1) + 1 + (log_length // SCAN_WINDOW + 1) + 1
    spent = sum(n for r, n in calls.items() if r.startswith("marketo.") and r != "marketo.identity")
    assert spent <= bound, (spent, bound, calls)

    monkeypatch.setattr(echo, "ECHO_EXPORT_PERSONS", 10**9)  # the same backlog the REST way
    with duckdb.connect(str(tmp_path / "rest.duckdb")) as con:
        sandbox.reset_calls()
        stats = _extract(con, config, client)
        calls = sandbox.calls()
        via_rest = _state(con)
    assert stats.mode == "lead changes"
    assert "marketo.bulk.export.create" not in calls and calls["marketo.activities.leadchanges"] >= 1

    assert via_export == via_rest
    persons, times = via_export
    by_email = {p["f_email"]: p for p in persons if p["f_email"]}
    assert by_email["walk.in@example.org"]["f_lastName"] == "Walkin"  # the unknown person was read whole
    assert by_email["echo0@example.org"]["f_title"] == "Marketer A2"
    assert by_email["echo1@example.org"]["f_phone"] == "+1 555 0100"
    assert by_email["echo3@example.org"]["f_title"] is None
    pending = {p["f_email"] for p in persons if p["pending"]}
    assert {"echo0@example.org", "echo1@example.org", "echo3@example.org", "walk.in@example.org"} <= pending
    assert not pending & {
        f"echo{i}@example.org" for i in (2, *range(4, OURS))
    }  # our echo, and a change undone
    timed = {(t[1], t[2]) for t in times}
    assert {(str(by_email[f"echo{i}@example.org"]["id"]), "title") for i in (0, 12)} <= timed


def test_an_export_marketo_refuses_falls_back_to_the_lead_changes(
    sandbox, client, config, tmp_path, monkeypatch
):
    monkeypatch.setattr(marketo, "WATERMARK_MARGIN", timedelta(0))
    monkeypatch.setattr(echo, "ECHO_EXPORT_PERSONS", OURS - 1)
    with duckdb.connect(str(tmp_path / "state.duckdb")) as con:
        ensure_schema(con, config)
        _backlog(sandbox, client, config, con)
        # The daily export quota is spent: Marketo answers 1029 when the job is queued.
        sandbox.faults(
            [
                {
                    "pattern": "marketo.bulk.export.enqueue",
                    "rate": 1.0,
                    "faults": [{"kind": "code", "code": "1029"}],
                }
            ]
        )
        sandbox.reset_calls()
        stats = _extract(con, config, client)
        calls = sandbox.calls()
        persons, _times = _state(con)
    assert stats.mode == "lead changes" and calls["marketo.activities.leadchanges"] >= 1
    assert {p["f_email"]: p for p in persons}["echo0@example.org"]["f_title"] == "Marketer A2"
