"""Keyed access to the state store (issue 13): lookups by a list of keys return what a join would, read only the
keyed rows (DuckDB's ART index, counted by the rows-read profile), and link upserts keep working with the
indexes in place (DuckDB's INSERT OR REPLACE would leave an indexed column unchanged)."""

from __future__ import annotations

import tracemalloc
from datetime import datetime
from pathlib import Path

import pytest

from sync_pipeline.config.model import load_config
from sync_pipeline.engine.store import ledger, rows_read, state

NOW = datetime(2026, 11, 20, 12, 0, 0)
ROWS = 20_000


@pytest.fixture
def con(tmp_path: Path):
    c = state.open_connection(tmp_path / "state.duckdb")
    base = load_config()
    # The indexes are opt-in (sync.index_state); these tests are about reading through them.
    config = base.model_copy(update={"sync": base.sync.model_copy(update={"index_state": True})})
    state.ensure_schema(c, config)
    c.execute(f"""INSERT INTO d_lead (id, version, deleted, pending_seq, f_email)
                  SELECT 'lead-' || i, 1, false, CASE WHEN i % 1000 = 7 THEN i END, 'Person' || i || '@Example.com'
                  FROM range({ROWS}) t(i)""")
    c.execute(
        f"""INSERT INTO identity SELECT 'lead', 'lead-' || i, CAST(i AS VARCHAR), 'active', ?, 'created'
                  FROM range({ROWS}) t(i)""",
        [NOW],
    )
    c.execute(
        f"INSERT INTO m_person (id, deleted, f_email) SELECT i, false, 'person' || i || '@example.com' FROM range({ROWS}) t(i)"
    )
    yield c
    c.close()


def _counted(tmp_path: Path, work) -> rows_read.Tally:
    with rows_read.counting() as tally:
        c = state.open_connection(tmp_path / "state.duckdb")
        try:
            work(c)
        finally:
            c.close()
    return tally


def test_keyed_rows_equal_the_join_and_read_only_the_keys(con, tmp_path: Path) -> None:
    keys = ["lead-3", "lead-19999", "lead-12345", "missing", "lead-3"]
    state.keyed_rows(
        con, "picked", "identity", "dynamics_id", keys, "entity = 'lead'", "dynamics_id, marketo_id"
    )
    joined = con.execute(
        """SELECT dynamics_id, marketo_id FROM identity WHERE entity = 'lead'
                            AND dynamics_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY 1""",
        [keys],
    ).fetchall()
    assert con.execute("SELECT * FROM picked ORDER BY 1").fetchall() == joined and len(joined) == 3
    con.close()
    tally = _counted(
        tmp_path, lambda c: state.keyed_rows(c, "picked", "identity", "dynamics_id", keys, "entity = 'lead'")
    )
    assert 0 < tally.by_table["identity"] <= 3


def test_pending_marks_and_expression_lookups_go_through_indexes(con, tmp_path: Path) -> None:
    pending = sorted(
        r[0] for r in con.execute("SELECT id FROM d_lead WHERE pending_seq IS NOT NULL").fetchall()
    )
    con.close()

    def work(c) -> None:
        assert sorted(state.column(c, "SELECT id FROM d_lead WHERE pending_seq > 0")) == pending
        state.rows_equal(
            c,
            "owners",
            "m_person",
            "lower(f_email)",
            ["person5@example.com", "nobody@example.com"],
            columns="id",
        )
        assert state.column(c, "SELECT id FROM owners") == [5]

    tally = _counted(tmp_path, work)
    assert tally.by_table["d_lead"] == len(pending) == ROWS // 1000
    assert tally.by_table["m_person"] <= 1


def test_keyed_execute_touches_only_the_keys_and_skips_an_empty_list(con) -> None:
    n = state.keyed_execute(
        con, "UPDATE d_lead SET pending_seq = NULL WHERE id IN {keys}", ["lead-7", "lead-1007"]
    )
    assert n == 2
    assert state.keyed_execute(con, "UPDATE d_lead SET pending_seq = NULL WHERE id IN {keys}", []) == 0
    left = state.column(con, "SELECT id FROM d_lead WHERE pending_seq > 0")
    assert "lead-7" not in left and "lead-2007" in left and len(left) == ROWS // 1000 - 2


def test_a_link_moves_to_another_person_despite_the_marketo_id_index(con) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE push_outcomes AS SELECT 'lead-5' AS did, '777777' AS mid")
    con.execute(
        f"""{ledger.IDENTITY_INSERT} SELECT 'lead', did, mid, 'active', ?, 'created' FROM push_outcomes
                    {ledger.IDENTITY_UPSERT}""",
        [NOW],
    )
    assert con.execute(
        "SELECT marketo_id FROM identity WHERE entity = 'lead' AND dynamics_id = 'lead-5'"
    ).fetchall() == [("777777",)]
    assert state.column(con, "SELECT dynamics_id FROM identity WHERE marketo_id = '777777'") == ["lead-5"]
    ledger.set_link_state(con, "lead", "SELECT 'lead-5'", "tombstoned")
    assert con.execute("SELECT state FROM identity WHERE dynamics_id = 'lead-5'").fetchall() == [
        ("tombstoned",)
    ]


def test_keys_given_as_a_query_pick_the_same_rows_and_stay_in_duckdb(con, tmp_path: Path) -> None:
    """A work set as large as the org (an initial copy) is not fetched into Python: its keys stay a query."""
    few = "SELECT 'lead-' || i FROM range(0, 50) t(i) UNION ALL SELECT NULL UNION ALL SELECT 'lead-3'"
    many = "SELECT dynamics_id FROM identity WHERE dynamics_id <> 'lead-0' UNION ALL SELECT NULL"
    for name, keys in (("few", few), ("many", many)):
        state.keyed_rows(con, name, "identity", "dynamics_id", keys, "entity = 'lead'", "dynamics_id")
        joined = state.column(
            con,
            f"SELECT dynamics_id FROM identity WHERE entity = 'lead' AND dynamics_id IN ({keys}) ORDER BY 1",
        )
        assert state.column(con, f"SELECT dynamics_id FROM {name} ORDER BY 1") == joined
    assert len(state.column(con, "SELECT * FROM few")) == 50
    assert len(state.column(con, "SELECT * FROM many")) == ROWS - 1
    tracemalloc.start()
    try:
        state.keyed_rows(con, "many", "identity", "dynamics_id", many, "entity = 'lead'", "dynamics_id")
        state.rows_equal(con, "many_eq", "identity", "lower(dynamics_id)", many, columns="dynamics_id")
        changed = state.keyed_execute(con, "UPDATE d_lead SET version = 2 WHERE id IN {keys}", many)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert changed == ROWS - 1
    assert len(state.column(con, "SELECT * FROM many_eq")) == ROWS - 1
    # 20,000 keys fetched into Python would take ~2.5 MB (tuples and strings); a query keeps at most one chunk.
    assert peak < 1_000_000


def test_a_long_key_list_against_a_small_or_unindexed_table_is_one_scan_with_the_same_rows(
    tmp_path: Path,
) -> None:
    c = state.open_connection(tmp_path / "small.duckdb")
    state.ensure_schema(c, load_config())  # no opt-in indexes: identity.marketo_id has none
    c.execute("INSERT INTO d_lead (id, version, deleted) SELECT 'lead-' || i, 1, false FROM range(500) t(i)")
    c.execute(
        "INSERT INTO identity SELECT 'lead', 'lead-' || i, CAST(i AS VARCHAR), 'active', ?, 'x' FROM range(500) t(i)",
        [NOW],
    )
    many = [f"lead-{i}" for i in range(0, 1000, 3)]  # 334 keys, half of them missing, against 500 rows
    assert state.indexed(c, "d_lead", "id") and not state.indexed(c, "identity", "marketo_id")
    assert not state.use_index(c, '"d_lead"', "id", len(many))  # 500 rows < 50 per key: a scan is cheaper
    assert state.use_index(c, "d_lead", "id", 3)  # a few keys always go through the primary key
    assert not state.use_index(c, "identity", "marketo_id", 3)  # no index: the list would scan anyway
    state.keyed_rows(c, "picked", "d_lead", "id", many, columns="id")
    assert sorted(state.column(c, "SELECT id FROM picked")) == sorted(k for k in many if int(k[5:]) < 500)
    state.keyed_rows(c, "by_mid", "identity", "marketo_id", ["3", "499", "nope"], columns="dynamics_id")
    assert sorted(state.column(c, "SELECT dynamics_id FROM by_mid")) == ["lead-3", "lead-499"]
    changed = state.keyed_execute(
        c, "UPDATE d_lead SET pending_seq = 1 WHERE id IN {keys}", many, on=("d_lead", "id")
    )
    assert changed == len([k for k in many if int(k[5:]) < 500])
    c.close()


def test_the_last_write_is_the_ledger_maximum_read_from_what_was_appended_since(tmp_path: Path) -> None:
    c = state.open_connection(tmp_path / "ledger.duckdb")
    state.ensure_schema(c, load_config())
    insert = "INSERT INTO ledger (run_id, written_at, entity, target, op) VALUES (?, ?, ?, ?, 'update')"
    assert ledger.last_write(c, "lead", "marketo") is None
    c.execute(insert, ["run-1", NOW, "lead", "marketo"])
    c.execute(insert, ["run-2", NOW.replace(hour=13), "contact", "marketo"])
    assert ledger.last_write(c, "lead", "marketo") == (str(NOW), "run-1")
    c.execute(insert, ["run-3", NOW.replace(hour=14), "lead", "dynamics"])  # another target: not this one
    assert ledger.last_write(c, "lead", "marketo") == (str(NOW), "run-1")
    c.execute(insert, ["run-4", NOW.replace(hour=15), "lead", "marketo"])
    expected = c.execute(
        """SELECT max(written_at), arg_max(run_id, written_at) FROM ledger
           WHERE entity = 'lead' AND target = 'marketo'"""
    ).fetchone()
    assert (
        ledger.last_write(c, "lead", "marketo")
        == (str(expected[0]), expected[1])
        == (
            str(NOW.replace(hour=15)),
            "run-4",
        )
    )
    c.execute("DELETE FROM cursors")  # a rebaseline clears the cursors, the ledger stays: read again whole
    assert ledger.last_write(c, "lead", "marketo") == (str(NOW.replace(hour=15)), "run-4")
    c.close()
