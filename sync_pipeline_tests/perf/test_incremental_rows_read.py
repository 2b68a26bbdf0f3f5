"""An incremental run reads what changed, not the tables (issue 13): the same number of edits on an org ten
times larger reads at most 1.5 times the rows. Rows, not seconds: counted from DuckDB's profile of every
statement the run sends to the state store (:mod:`sync_pipeline.engine.store.rows_read`)."""

from __future__ import annotations

from pathlib import Path

from sync_pipeline.bench.pipeline import make_changes
from sync_pipeline.engine.store import rows_read
from sync_pipeline_tests.perf.incremental import SMALL, config_with, synced_org, tenth

EDITS = 100  # over both systems and four tables (the benchmark's mix); a tenth of "small" has ~1,000 records
MAX_GROWTH = 1.5


def _rows_read(tmp: Path, scale, config: Path) -> rows_read.Tally:
    from sync_pipeline import runs

    with synced_org(tmp, scale, config=config) as (sandbox, instance):
        edits = make_changes(sandbox, EDITS, seed=1)
        assert sum(edits.values()) == EDITS
        with rows_read.counting() as tally:
            result = runs.run_sync(instance, scope="latest")
        assert result.success
    return tally


def test_incremental_run_reads_rows_in_proportion_to_the_changes(tmp_path: Path) -> None:
    # The store-wide search for damaged links (a record nobody edits, a store repaired by hand) reads identity and
    # the person mirror whole; it runs every sync.damage_sweep_every plans, here not within the measured run.
    config = config_with(tmp_path, damage_sweep_every=1000)
    small = _rows_read(tmp_path / "tenth", tenth(SMALL), config)
    large = _rows_read(tmp_path / "full", SMALL, config)
    top = "\n".join(f"{n:>8} {s}" for s, n in large.by_statement.most_common(8))
    assert small.total > 0
    assert large.total <= MAX_GROWTH * small.total, (
        f"rows read: {small.total:,} at {tenth(SMALL).name}, {large.total:,} at {SMALL.name} "
        f"(x{large.total / small.total:.2f}); by table at {SMALL.name}: {dict(large.by_table.most_common(8))}\n{top}")
