"""Flat memory of a Dataverse read (issue 13): the Python heap a full read needs does not grow with the table.

Pages are upserted a few at a time; between upserts they wait as Arrow tables (outside the Python heap), so only
the page being converted is held as JSON dicts. A read 5x as long must not need 5x the heap."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from sync_pipeline.config.model import load_config
from sync_pipeline.engine.extract import dynamics as extract
from sync_pipeline.engine.extract.common import ExtractStats
from sync_pipeline.engine.store import state

PAGE = 500


class PagedOrg:
    """Yields a table's rows page by page as the Dataverse client does, making each page only when asked."""

    def __init__(self, entity: Any, rows: int) -> None:
        self.entity, self.rows = entity, rows

    def iter_changes(
        self,
        entity_set: str,
        select: list[str] | str,
        delta_link: str | None = None,
        *,
        annotations: bool = False,
    ) -> Iterator[tuple[list[dict[str, Any]], list[str], str | None]]:
        schema = extract.page_schema(self.entity)
        for start in range(0, self.rows, PAGE):
            page = [
                {f.name: _value(f.type, i) for f in schema}
                for i in range(start, min(start + PAGE, self.rows))
            ]
            last = start + PAGE >= self.rows
            yield page, [], "delta-link" if last else None


def _value(typ: pa.DataType, i: int) -> Any:
    if pa.types.is_boolean(typ):
        return False
    if pa.types.is_integer(typ):
        return i + 1
    if pa.types.is_floating(typ):
        return i / 2
    return f"00000000-0000-0000-0000-{i:012d}"


def _read_peak(tmp_path: Path, rows: int) -> tuple[int, int]:
    config = load_config()
    entity = config.entity("contact")
    con = state.open_connection(tmp_path / f"state-{rows}.duckdb")
    try:
        state.ensure_schema(con, config)
        select = extract.dynamics_select(entity)
        stats = ExtractStats(entity.name)
        tracemalloc.start()
        try:
            extract._changes(con, entity, PagedOrg(entity, rows), select, None, "p", stats, config=config)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        mirrored = state.one_row(con, "SELECT count(*) FROM d_contact")[0]
    finally:
        con.close()
    assert stats.rows == rows
    return peak, int(mirrored)


def test_a_full_read_needs_the_same_heap_for_5x_the_rows(tmp_path: Path) -> None:
    small_peak, small_rows = _read_peak(tmp_path, 2_000)
    large_peak, large_rows = _read_peak(tmp_path, 10_000)
    assert (small_rows, large_rows) == (2_000, 10_000)
    # Pages held as dicts until the upsert took ~5x the heap for 5x the rows (12 MB -> 59 MB); now ~6 MB both.
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)
