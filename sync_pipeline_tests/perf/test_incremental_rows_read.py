"""An incremental run reads what changed, not the tables (issue 13): the same number of edits on an org ten
times larger reads at most 1.5 times the rows. Rows, not seconds: counted from DuckDB's profile of every
statement the run sends to the state store (:mod:`sync_pipeline.engine.store.rows_read`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sync_pipeline.bench.pipeline import make_changes
from sync_pipeline.engine.store import rows_read
from sync_pipeline_tests.perf.incremental import SMALL, config_with, synced_org, tenth

# Syncs two orgs (1x and 10x) and counts rows read: about 2 minutes, so with --long.
pytestmark = pytest.mark.slow

EDITS = 100  # over both systems and four tables (the benchmark's mix); a tenth of "small" has ~1,000 records
MAX_GROWTH = 1.5
# Opportunity contact roles are derived (engine/plan/roles.py): counted apart, so a regression shows where it is.
DERIVED_ROLES = (
    "role_opps",
    "role_base",
    "role_links",
    "role_by_contact",
    "role_wants",
    "role_changes",
    "derived_marks",
)


def _rows_read(tmp: Path, scale: Any, config: Path) -> rows_read.Tally:
    from sync_pipeline import runs

    with synced_org(tmp, scale, config=config) as (sandbox, instance):
        # Steady state: one incremental run first, so the measured run follows an incremental one (whose plan,
        # which every plan statement scans until replaced, is as small as its work), not the initial copy's echo.
        make_changes(sandbox, EDITS, seed=1)
        assert runs.run_sync(instance, scope="latest").success
        edits = make_changes(sandbox, EDITS, seed=2)
        assert sum(edits.values()) == EDITS
        with rows_read.counting() as tally:
            result = runs.run_sync(instance, scope="latest")
        assert result.success
    return tally


@pytest.fixture(scope="module")
def tallies(tmp_path_factory: pytest.TempPathFactory) -> tuple[rows_read.Tally, rows_read.Tally]:
    tmp = tmp_path_factory.mktemp("rows-read")
    # The store-wide search for damaged links and lost persons (a record nobody edits, a store repaired by hand)
    # reads identity and the person mirror whole; it runs every sync.damage_sweep_every runs, here not in the
    # measured one.
    # The indexes that let a run read only what changed are opt-in (sync.index_state).
    config = config_with(tmp, damage_sweep_every=1000, index_state=True)
    return _rows_read(tmp / "tenth", tenth(SMALL), config), _rows_read(tmp / "full", SMALL, config)


def _report(small: rows_read.Tally, large: rows_read.Tally, small_total: int, large_total: int) -> str:
    top = "\n".join(f"{n:>8} {s}" for s, n in large.by_statement.most_common(8))
    return (
        f"rows read: {small_total:,} at {tenth(SMALL).name}, {large_total:,} at {SMALL.name} "
        f"(x{large_total / small_total:.2f}); by table at {SMALL.name}: {dict(large.by_table.most_common(8))}\n{top}"
    )


def _without_roles(tally: rows_read.Tally) -> int:
    return sum(n for s, n in tally.by_statement.items() if not any(r in s for r in DERIVED_ROLES))


def test_the_per_record_stages_read_rows_in_proportion_to_the_changes(tallies) -> None:
    small, large = tallies
    assert _without_roles(small) > 0
    assert _without_roles(large) <= MAX_GROWTH * _without_roles(small), _report(
        small, large, _without_roles(small), _without_roles(large)
    )


def test_the_whole_run_reads_rows_in_proportion_to_the_changes(tallies) -> None:
    small, large = tallies
    assert large.total <= MAX_GROWTH * small.total, _report(small, large, small.total, large.total)
