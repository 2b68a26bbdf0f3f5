"""The derived role plan reads only what changed (issue 13) and plans exactly what the whole comparison plans:
after each change to a store (contact merges, relinks, quarantine, opportunity deletes, customer changes, failed
role writes) the incremental plan and a full recomputation over the same store are compared."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

import duckdb
import pyarrow as pa
import pytest

from sync_pipeline.config.model import SyncConfig, load_config
from sync_pipeline.engine.plan.roles import plan_roles
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import ensure_schema

NOW = datetime(2026, 11, 20, 12, 0, 0)
ROLE, OPP = "opportunity_role", "opportunity"


def _config() -> SyncConfig:
    base = load_config()
    return base.model_copy(update={"sync": base.sync.model_copy(update={"damage_sweep_every": 1000})})


@pytest.fixture
def store() -> Iterator[tuple[duckdb.DuckDBPyConnection, SyncConfig]]:
    con, config = duckdb.connect(), _config()
    ensure_schema(con, config)
    yield con, config
    con.close()


def _link(con: duckdb.DuckDBPyConnection, contact: str, person: int) -> None:
    ledger.link(con, "contact", "SELECT ? AS did, ? AS mid", "email", NOW, params=[contact, str(person)])


def _opportunity(
    con: duckdb.DuckDBPyConnection, opp: str, customer: str | None, flag: bool | None = True
) -> None:
    con.execute(
        """INSERT INTO d_opportunity (id, version, deleted, sync_flag, customer_contact, pending_seq)
           VALUES (?, 1, false, ?, ?, nextval('change_seq'))
           ON CONFLICT (id) DO UPDATE SET sync_flag = excluded.sync_flag,
               customer_contact = excluded.customer_contact, pending_seq = excluded.pending_seq""",
        [opp, flag, customer],
    )


def _plan(con: duckdb.DuckDBPyConnection, config: SyncConfig, full: bool) -> tuple[list[tuple], int]:
    """The role plan's rows and how many opportunities it compared."""
    con.execute("DELETE FROM plan WHERE entity = ?", [ROLE])
    con.execute("DELETE FROM plan_work WHERE entity = ?", [ROLE])
    plan_roles(con, config, config.entity(ROLE), "r", full=full)
    rows = con.execute(
        """SELECT dynamics_id, op, field, old_value, new_value FROM plan WHERE entity = ?
           ORDER BY ALL""",
        [ROLE],
    ).fetchall()
    return rows, int(con.execute("SELECT count(*) FROM role_opps").fetchone()[0])


def _apply_opportunities(con: duckdb.DuckDBPyConnection, config: SyncConfig) -> None:
    """The opportunity plan covered its pending records and was applied (its marks clear)."""
    con.execute("DELETE FROM plan_work WHERE entity = ?", [OPP])
    con.execute(
        "INSERT INTO plan_work SELECT 'r', ?, id, pending_seq, NULL, NULL FROM d_opportunity WHERE pending_seq > 0",
        [OPP],
    )
    ledger.finish(con, config, config.entity(OPP))


def _push_roles(con: duckdb.DuckDBPyConnection, config: SyncConfig, failing: set[str] = frozenset()) -> None:
    rows = con.execute("SELECT DISTINCT dynamics_id, op FROM plan WHERE entity = ?", [ROLE]).fetchall()
    outcomes = pa.table(
        {
            "did": [d for d, _ in rows],
            "op": [op for _, op in rows],
            "ok": [d not in failing for d, _ in rows],
            "mid": [None for _ in rows],
            "code": [("610" if d in failing else None) for d, _ in rows],
            "message": [("failed" if d in failing else None) for d, _ in rows],
            "kind": [("transient" if d in failing else None) for d, _ in rows],
        },
        schema=pa.schema(
            [
                ("did", pa.string()),
                ("op", pa.string()),
                ("ok", pa.bool_()),
                ("mid", pa.string()),
                ("code", pa.string()),
                ("message", pa.string()),
                ("kind", pa.string()),
            ]
        ),
    )
    ledger.record_outcomes(con, config, config.entity(ROLE), "marketo", outcomes, "r", NOW)
    ledger.finish(con, config, config.entity(ROLE))


def _quarantine(con: duckdb.DuckDBPyConnection, contact: str, damaged: bool) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE work_set AS SELECT ? AS did, 1 AS d_seq", [contact])
    con.execute(
        "CREATE OR REPLACE TEMP TABLE quarantined AS SELECT ? AS did, 'quarantine_x' AS code, 'm' AS message "
        "WHERE ?",
        [contact, damaged],
    )
    ledger.settle_quarantine(con, "contact", "r", NOW)


def _step(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, failing: set[str] = frozenset()
) -> tuple[list, int]:
    _apply_opportunities(con, config)
    incremental, looked_at = _plan(con, config, full=False)
    full, _ = _plan(con, config, full=True)
    assert incremental == full
    # The plan pushed is the incremental one (the full one was computed last: plan it again).
    _plan(con, config, full=False)
    _push_roles(con, config, failing)
    return incremental, looked_at


def test_the_incremental_role_plan_equals_the_full_one_after_every_change(store) -> None:
    con, config = store
    contacts = [f"c{i}" for i in range(1, 9)]
    for i, c in enumerate(contacts[:6], 1):
        _link(con, c, 100 + i)
    opps = {f"o{i}": contacts[i - 1] for i in range(1, 9)}
    for o, c in opps.items():
        _opportunity(con, o, c)
    _opportunity(con, "o9", None)  # no customer contact: no role
    _link(con, "c9", 109)
    for i in range(10, 40):  # opportunities of a contact nobody touches again
        _opportunity(con, f"o{i}", "c9")
    total = int(con.execute("SELECT count(*) FROM d_opportunity").fetchone()[0])

    first, looked_at = _step(con, config)  # the first plan compares everything
    assert looked_at == total
    assert {r[0] for r in first if r[1] == "create"} >= {"o1", "o6", "o10"}

    changes: list[tuple[str, Callable[[], None], set[str]]] = [
        (
            "relink after a Marketo merge",
            lambda: ledger.relink(con, "contact", "c1", "201", "merge", NOW),
            {"o1"},
        ),
        (
            "a Dynamics contact merge: the subordinate's link retires, its opportunity moves to the master",
            lambda: (
                ledger.set_link_state(con, "contact", "SELECT ?", "merged", ["c2"]),
                _opportunity(con, "o2", "c3"),
            ),
            {"o2"},
        ),
        (
            "the person of a quarantined contact moves: its role stays",
            lambda: (_quarantine(con, "c4", True), ledger.relink(con, "contact", "c4", "204", "merge", NOW)),
            set(),
        ),
        ("the quarantine is repaired: the role follows", lambda: _quarantine(con, "c4", False), {"o4"}),
        ("an opportunity deleted", lambda: ledger.mark_deleted(con, OPP, ["o5"], "p", NOW), {"o5"}),
        ("an opportunity unflagged", lambda: _opportunity(con, "o6", "c6", flag=False), {"o6"}),
        ("a customer contact changed", lambda: _opportunity(con, "o3", "c5"), {"o3"}),
        (
            "a contact unlinked",
            lambda: ledger.set_link_state(con, "contact", "SELECT ?", "deleted", ["c6"]),
            set(),
        ),
        ("a new link for a customer contact", lambda: _link(con, "c7", 107), {"o7"}),
        (
            "the contact retired by a merge",
            lambda: ledger.retire_link(con, "contact", "c5", "105", NOW),
            {"o3"},
        ),
    ]
    for what, change, expected in changes:
        change()
        plan, looked_at = _step(con, config)
        assert {r[0] for r in plan} == expected, what
        assert looked_at < total / 3, f"{what}: compared {looked_at} of {total} opportunities"

    # A failed role write is planned again, with nothing else changed, until it succeeds.
    _link(con, "c8", 108)
    plan, _ = _step(con, config, failing={"o8"})
    assert {r[0] for r in plan} == {"o8"}
    again, _ = _step(con, config)
    assert {r[0] for r in again} == {"o8"}
    settled, looked_at = _step(con, config)
    assert settled == [] and looked_at == 0
    assert con.execute("SELECT count(*) FROM derived_marks").fetchone()[0] == 0
