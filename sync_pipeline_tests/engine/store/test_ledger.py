"""Held errors clear once their record syncs (issue 9): the bookkeeping of ``ledger.finish`` on hand-made rows."""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb
import pytest

from sync_pipeline.config.model import load_config
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import ensure_schema

NOW = datetime(2026, 11, 20, 12, 0, 0)
L1, L2, L3 = (
    "10000000-0000-4000-8000-000000000001",
    "10000000-0000-4000-8000-000000000002",
    "10000000-0000-4000-8000-000000000003",
)


@pytest.fixture
def con():
    c = duckdb.connect()
    ensure_schema(c, load_config())
    yield c
    c.close()


def _failure(con, did: str, target: str, held: bool, at: datetime, field: str | None = None) -> None:
    con.execute(
        "INSERT INTO failures VALUES ('lead', ?, ?, 'update', '7', ?, 'x', 'msg', 5, ?, ?, ?, ?, 'r0')",
        [did, target, field, at, at, at, held],
    )


def test_failures_of_re_planned_records_clear_unless_the_write_is_still_needed(con) -> None:
    plan_made = NOW
    con.execute("INSERT INTO plan_meta VALUES ('lead', 'r1', ?, '{}')", [plan_made])
    for did in (L1, L2, L3):
        con.execute("INSERT INTO plan_work VALUES ('r1', 'lead', ?, NULL, '7', NULL)", [did])
    # L1: a held Marketo write whose value was fixed back: nothing left to write -> cleared.
    _failure(con, L1, "marketo", True, NOW - timedelta(hours=1))
    # L2: a held field from an earlier run, not held again by this plan's push -> cleared; L3: held again by
    # this push (after the plan was made) -> stays, and so does L3's Marketo write that is still planned.
    _failure(con, L2, "dynamics:fields", True, NOW - timedelta(hours=1), "leadSource")
    _failure(con, L3, "dynamics:fields", True, NOW + timedelta(seconds=5), "leadSource")
    _failure(con, L3, "marketo", True, NOW - timedelta(hours=1))
    con.execute(
        """INSERT INTO plan VALUES ('r1', 'lead', ?, '7', 'marketo', 'update', 'title', 'a', 'b', 'a',
                   'two_way', NULL)""",
        [L3],
    )
    ledger.finish(con, load_config(), load_config().entity("lead"))
    left = con.execute("SELECT dynamics_id, target FROM failures ORDER BY 1, 2").fetchall()
    assert left == [(L3, "dynamics:fields"), (L3, "marketo")]
