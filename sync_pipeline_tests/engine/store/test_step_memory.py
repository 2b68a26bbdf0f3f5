"""A step's temp tables do not outlive it (issue 13): the run's shared connection would otherwise hold every
step's work sets and plan slices in DuckDB's buffer memory until the run ends."""

from __future__ import annotations

from pathlib import Path

from sync_pipeline.config.model import load_config
from sync_pipeline.engine.store import state


def test_release_drops_the_temp_tables_and_keeps_the_store(tmp_path: Path) -> None:
    con = state.open_connection(tmp_path / "state.duckdb")
    try:
        state.ensure_schema(con, load_config())
        con.execute("INSERT INTO cursors (name, value) VALUES ('kept', 'yes')")
        con.execute("CREATE TEMP TABLE work_all AS SELECT range AS wn FROM range(100000)")
        con.execute('CREATE TEMP TABLE "odd ""name""" (x INTEGER)')
        assert state.column(con, "SELECT count(*) FROM duckdb_tables() WHERE temporary") == [2]
        state.release_step_memory(con)
        assert state.column(con, "SELECT count(*) FROM duckdb_tables() WHERE temporary") == [0]
        assert state.get_cursor(con, "kept") == "yes"
        con.execute("CREATE TEMP TABLE work_all AS SELECT 1 AS wn")  # the next step starts clean
    finally:
        con.close()
