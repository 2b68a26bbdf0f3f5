"""Extract from Marketo: persons into the mirror ``m_person``.

A paging token taken before anything is read, then lead-change activities (for the persons that changed),
then Merge Leads and Delete Lead activities (merges move links to the winners, see ``merges.py``); the
initial copy uses bulk extract windows. Rows are upserted set-based; a person whose canonical values
changed becomes pending for the next plan.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from sync_pipeline.clients import errors
from sync_pipeline.config.model import FieldMap, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.extract import echo
from sync_pipeline.engine.extract.common import ExtractStats, IngestStats, iso_utc
from sync_pipeline.engine.extract.merges import (
    DELETE_LEAD_TYPE,
    MERGE_LEADS_TYPE,
    MarketoMerge,
    apply_marketo_merges,
    parse_merge_activity,
)
from sync_pipeline.engine.ports import MarketoPort
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import (
    column,
    fcol,
    get_cursor,
    keyed_execute,
    keyed_rows,
    latest_fields,
    next_seq,
    qi,
    set_cursor,
    sweep_due,
    utcnow,
)

log = logging.getLogger(__name__)

MAX_EXPORT_DAYS = 31
ACTIVITY_SLICE = 20_000  # persons whose lead changes are applied together
LEADCHANGES_CURSOR = "marketo:leadchanges"
# The time no activity after the lead-change token can be older than (ISO, UTC): where an echo export starts.
LEADCHANGES_SINCE = "marketo:leadchanges_since"
WATERMARK_MARGIN = timedelta(seconds=5)
DELETED_CURSOR = "marketo:deletedleads"  # the position of the Delete Lead and Merge Leads activities read


def extract_marketo_persons(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    client: MarketoPort,
    start: datetime,
    end: datetime,
    latest: bool,
    work_dir: Path | None = None,
    run_id: str | None = None,
) -> ExtractStats:
    stats = ExtractStats("person")
    token = get_cursor(con, LEADCHANGES_CURSOR)
    fields = marketo_person_fields(config)
    if token is None:
        # Take the watermark before reading, so nothing changed during the initial read is missed.
        watermark = utcnow().replace(tzinfo=UTC) - WATERMARK_MARGIN
        first = client.paging_token(watermark)
        stats.mode = "bulk export"
        # The first read covers everything since the configured start, whatever window triggered it.
        since = datetime.fromisoformat(config.sync.partitions.start_date).replace(tzinfo=UTC)
        _bulk_windows(con, config, client, min(start, since), end, fields, stats, work_dir)
        set_cursor(con, LEADCHANGES_CURSOR, first)
        set_cursor(con, LEADCHANGES_SINCE, watermark.isoformat())
        set_cursor(con, DELETED_CURSOR, first)
        return stats
    if not latest:
        stats.mode = "bulk export (re-read window)"
        _bulk_windows(con, config, client, start, end, fields, stats, work_dir)
        return stats
    stats.mode = "lead changes"
    watch = [f for f in fields if f not in ("id", "updatedAt")]
    activities: dict[int, list[dict[str, Any]]] = {}

    timed = {f for e in config.persons for f in latest_fields(e)}
    since_text = get_cursor(con, LEADCHANGES_SINCE)
    since_cursor = datetime.fromisoformat(since_text) if since_text else None
    if since_cursor is not None and (
        echo.own_person_writes_since(con, config, since_cursor) > echo.ECHO_EXPORT_PERSONS
    ):
        # Mostly our own echo: one bulk activity export for cursor time .. window end, then the lead changes
        # from a paging token taken at the window's end (before the export), so nothing after it is lost.
        window_end = utcnow().replace(tzinfo=UTC) - WATERMARK_MARGIN
        after_window = client.paging_token(window_end)
        try:
            echo.export_window(con, client, since_cursor, window_end, work_dir, stats)
        except (errors.AuthError, errors.QuotaExceeded, errors.Transient):
            raise  # the run fails and retries; paging instead would only spend more of the same budget
        except (
            errors.ClientError
        ) as exc:  # e.g. the daily export quota (1029): page the lead changes as before
            log.warning(
                "echo export refused (%s %s); reading the lead changes instead", exc.code, exc.message
            )
        else:
            stats.mode = "echo export + lead changes"
            _absorb_echo(con, config, client, watch, timed, fields, stats)
            token = after_window
    # A lower bound of the time of every activity after the token this run ends with (read before paging).
    read_from = utcnow().replace(tzinfo=UTC) - WATERMARK_MARGIN

    def flush() -> None:
        times: list[tuple[int, str, str]] = []
        rows, fetch = _apply_activities(con, watch, activities, timed, times)
        for ids in _chunked(sorted(fetch), 300):  # persons we have never seen: read them whole
            rows += client.get_leads("id", ids, fields)
        stats.take(ingest_marketo_persons(con, config, rows))
        record_marketo_field_times(con, times)
        activities.clear()

    for page in client.lead_changes(token, watch):
        stats.pages += 1
        for a in page.results:
            if a.get("leadId") is not None:
                activities.setdefault(int(a["leadId"]), []).append(a)
        token = page.next_page_token
        # Pages come in activity order, so applying them a slice at a time keeps memory flat (the echo of an
        # initial copy is one activity per person created) without reordering anyone's changes.
        if len(activities) >= ACTIVITY_SLICE:
            flush()
    if activities:
        flush()
    _reread_lost_persons(con, config, client, fields, stats)
    deleted_token = _removals(
        con, config, client, get_cursor(con, DELETED_CURSOR) or token, fields, run_id, stats
    )
    set_cursor(con, LEADCHANGES_CURSOR, token)
    set_cursor(con, LEADCHANGES_SINCE, read_from.isoformat())
    set_cursor(con, DELETED_CURSOR, deleted_token)
    return stats


def _absorb_echo(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    client: MarketoPort,
    watch: list[str],
    timed: set[str],
    fields: list[str],
    stats: ExtractStats,
) -> None:
    """The exported activities applied like lead-change pages (``_apply_activities``), set-based."""
    table, unknown, times = echo.apply_echo(con, client, watch, timed)
    if table is not None:
        maps = person_field_maps(config)
        for part in echo.slices(table):
            stats.take(_upsert_persons(con, maps, "echo_page", part.to_batches(max_chunksize=UPSERT_ROWS)))
    rows: list[dict[str, Any]] = []
    for ids in _chunked(unknown, 300):  # persons we have never seen: read them whole
        rows += client.get_leads("id", ids, fields)
    stats.take(ingest_marketo_persons(con, config, rows))
    record_marketo_field_times(con, times)


LOST_PERSONS_PER_RUN = 3000


def _reread_lost_persons(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    client: MarketoPort,
    fields: list[str],
    stats: ExtractStats,
) -> None:
    """Linked persons missing from the mirror (a damaged or partly restored store) are read again, so their
    records plan normally instead of staying quarantined; an id Marketo does not know stays quarantined."""
    if not sweep_due(con, config, "lost_persons"):
        return
    persons = [e.name for e in config.persons]
    ids = [
        int(r[0])
        for r in con.execute(
            """SELECT DISTINCT TRY_CAST(marketo_id AS BIGINT) AS mid FROM identity
        WHERE state = 'active' AND entity IN (SELECT unnest(?::VARCHAR[])) AND TRY_CAST(marketo_id AS BIGINT) IS NOT NULL
          AND TRY_CAST(marketo_id AS BIGINT) NOT IN (SELECT id FROM m_person) ORDER BY mid LIMIT ?""",
            [persons, LOST_PERSONS_PER_RUN],
        ).fetchall()
    ]
    rows: list[dict[str, Any]] = []
    for chunk in _chunked(ids, 300):
        rows += client.get_leads("id", chunk, fields)
    if rows:
        stats.take(ingest_marketo_persons(con, config, rows))


def _removals(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    client: MarketoPort,
    token: str,
    fields: list[str],
    run_id: str | None,
    stats: ExtractStats,
) -> str:
    """Persons that left Marketo since ``token``: Merge Leads and Delete Lead activities, read together in
    one ``activities.json`` call (up to 10 type ids per call; the Delete Lead activities are the ones
    ``deletedleads.json`` serves, type 37), so following merges costs no extra call. Runs after the lead
    changes (a winner's copied values are mirrored first); merges are applied before deletes. Returns the
    new paging token."""
    merges: list[MarketoMerge] = []
    gone: list[int] = []
    for page in client.activities(token, [MERGE_LEADS_TYPE, DELETE_LEAD_TYPE]):
        stats.pages += 1
        for a in page.results or []:
            kind = a.get("activityTypeId")
            if kind == MERGE_LEADS_TYPE:
                merge = parse_merge_activity(a)
                if merge is not None:
                    merges.append(merge)
            elif kind == DELETE_LEAD_TYPE and a.get("leadId") is not None:
                gone.append(int(a["leadId"]))
        token = page.next_page_token or token
    if merges:
        winners = sorted({m.winner for m in merges})
        known = {
            r[0]
            for r in con.execute(
                "SELECT id FROM m_person WHERE NOT deleted AND id IN (SELECT unnest(?::BIGINT[]))", [winners]
            ).fetchall()
        }
        rows: list[dict[str, Any]] = []
        for ids in _chunked([w for w in winners if w not in known], 300):  # a winner we never read: read it
            rows += client.get_leads("id", ids, fields)
        stats.take(ingest_marketo_persons(con, config, rows))
        stats.merged += apply_marketo_merges(con, config, merges, run_id)
    stats.deleted += mark_marketo_deleted(con, gone)
    return token


def _apply_activities(
    con: duckdb.DuckDBPyConnection,
    watch: list[str],
    activities: dict[int, list[dict[str, Any]]],
    timed: set[str] | None = None,
    times: list[tuple[int, str, str]] | None = None,
) -> tuple[list[dict[str, Any]], set[int]]:
    """Known persons: the mirror plus each change's new value (no read; our own echoes compare equal and
    change nothing). Unknown persons are returned to be read whole. For the ``timed`` fields (policy
    latest), each change to a new value appends (person, field, activity time) to ``times``: Marketo's
    lead-change activities carry the time per field (domain.md 3.5)."""
    cols = ", ".join(f'f_{f} AS "{f}"' for f in watch)
    keyed_rows(con, "activity_persons", "m_person", "id", list(activities), "NOT deleted", f"id, {cols}")
    known = {r[0]: r for r in con.execute("SELECT * FROM activity_persons").fetchall()}
    rows: list[dict[str, Any]] = []
    fetch: set[int] = set()
    for lead_id, acts in activities.items():
        mirrored = known.get(lead_id)
        if mirrored is None:
            fetch.add(lead_id)
            continue
        row: dict[str, Any] = {"id": lead_id, **dict(zip(watch, mirrored[1:], strict=True))}
        for a in sorted(acts, key=lambda a: (str(a.get("activityDate", "")), int(a.get("id") or 0))):
            row["updatedAt"] = a.get("activityDate")
            for change in a.get("fields") or []:
                name = change.get("name")
                if name in row:
                    if (
                        timed
                        and times is not None
                        and name in timed
                        and a.get("activityDate")
                        and _text_of(change.get("newValue")) != _text_of(row[name])
                    ):
                        times.append((lead_id, name, str(a["activityDate"])))
                    row[name] = change.get("newValue")
        rows.append(row)
    return rows, fetch


def _text_of(v: Any) -> str | None:
    """Loose comparison of a mirrored (canonical) and an activity (raw) value."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v).strip()


def _chunked(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _bulk_windows(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    client: MarketoPort,
    start: datetime,
    end: datetime,
    fields: list[str],
    stats: ExtractStats,
    work_dir: Path | None,
) -> None:
    work = Path(work_dir or tempfile.mkdtemp(prefix="sync-pipeline-export-"))
    work.mkdir(parents=True, exist_ok=True)
    s = start
    while s < end:
        e = min(s + timedelta(days=MAX_EXPORT_DAYS), end)
        path = work / f"leads-{s:%Y%m%d%H%M}-{e:%Y%m%d%H%M}.csv"
        client.export_to_file(
            "leads", {"updatedAt": {"startAt": iso_utc(s), "endAt": iso_utc(e)}}, path, fields=fields
        )
        stats.pages += 1
        stats.take(ingest_marketo_csv(con, config, str(path)))
        path.unlink(missing_ok=True)
        s = e


def person_field_maps(config: SyncConfig) -> list[FieldMap]:
    system = [
        FieldMap(marketo="dynamicsId", dynamics="id_", transform="lookup", target=config.entities[0].name),
        FieldMap(marketo="dynamicsType", dynamics="type_"),
        FieldMap(marketo="dynamicsIsDeleted", dynamics="deleted_", transform="boolean"),
    ]
    known = {f.marketo for f in config.person_fields()}
    return config.person_fields() + [f for f in system if f.marketo not in known]


def marketo_person_fields(config: SyncConfig) -> list[str]:
    return ["id", "updatedAt"] + [f.marketo for f in person_field_maps(config)]


def ingest_marketo_persons(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, rows: list[dict[str, Any]]
) -> IngestStats:
    """Upsert Marketo persons (REST JSON rows); a person whose canonical values changed becomes pending."""
    if not rows:
        return IngestStats()
    maps = person_field_maps(config)
    names = ["id", "updatedAt"] + [f.marketo for f in maps]
    table = pa.table({n: pa.array([text_value(r.get(n)) for r in rows], type=pa.string()) for n in names})
    return _upsert_persons(con, maps, "persons_page", table.to_batches(max_chunksize=UPSERT_ROWS))


def ingest_marketo_csv(con: duckdb.DuckDBPyConnection, config: SyncConfig, csv_path: str) -> IngestStats:
    """Upsert persons from a bulk-extract CSV file (null values are the literal ``null``)."""
    maps = person_field_maps(config)
    path = "'" + str(csv_path).replace("'", "''") + "'"
    src = f"read_csv({path}, all_varchar = true, nullstr = 'null', header = true)"
    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    cols = ", ".join(
        qi(n) if n in have else f"NULL AS {qi(n)}" for n in ["id", "updatedAt"] + [f.marketo for f in maps]
    )
    # Streamed in slices from a second cursor (the upserts run on ``con`` meanwhile): an export window may hold
    # every person of the instance, which as one Arrow table would cost memory in proportion to it.
    with con.cursor() as reader:
        batches = reader.execute(f"SELECT {cols} FROM {src}").fetch_record_batch(UPSERT_ROWS)
        return _upsert_persons(con, maps, "persons_page", batches)


def text_value(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


UPSERT_ROWS = 20_000  # rows per upsert statement: DuckDB's ON CONFLICT keeps its input in memory


def _upsert_persons(
    con: duckdb.DuckDBPyConnection, maps: list[FieldMap], name: str, batches: Iterable[pa.RecordBatch]
) -> IngestStats:
    """New persons are inserted; known ones are updated where deleted or changed (and become pending). An update
    and an insert rather than ``INSERT ... ON CONFLICT``: DuckDB's conflict handling reads the whole mirror for
    every statement, the update reads the batch's persons through the key index."""
    stats = IngestStats()
    names = [fcol(f.marketo) for f in maps]
    exprs = [normalize.marketo_expr(f, qi(f.marketo)) for f in maps]
    changed = " OR ".join(f"m_person.{n} IS DISTINCT FROM p.{n}" for n in names)
    for batch in batches:
        stats.rows += batch.num_rows
        con.register(name, pa.Table.from_batches([batch]))
        try:
            # The ledger's mark travels with each row, so a row and its mark are written in one statement.
            con.execute(
                f"""CREATE OR REPLACE TEMP TABLE persons_in AS
                SELECT CAST(id AS BIGINT) AS id, "updatedAt" AS updated_at, CAST(? AS BIGINT) AS pending_seq,
                       {", ".join(f"{e} AS {n}" for e, n in zip(exprs, names, strict=True))} FROM {name}
                WHERE TRY_CAST(id AS BIGINT) IS NOT NULL
                QUALIFY row_number() OVER (PARTITION BY CAST(id AS BIGINT) ORDER BY "updatedAt" DESC) = 1""",
                [next_seq(con)],
            )
        finally:
            con.unregister(name)
        ids = column(con, "SELECT id FROM persons_in")
        keyed_rows(con, "persons_known", "m_person", "id", ids, columns="id")
        now = utcnow()
        stats.changed += keyed_execute(
            con,
            f"""UPDATE m_person SET updated_at = p.updated_at, deleted = false, seen_at = ?,
                pending_seq = p.pending_seq, {", ".join(f"{n} = p.{n}" for n in names)}
            FROM persons_in p WHERE m_person.id = p.id AND (m_person.deleted OR {changed}) AND m_person.id IN {{keys}}""",
            column(con, "SELECT id FROM persons_known"),
            [now],
            on=("m_person", "id"),
        )
        res = con.execute(
            f"""INSERT INTO m_person (id, updated_at, deleted, seen_at, pending_seq, {", ".join(names)})
            SELECT id, updated_at, false, ?, pending_seq, {", ".join(names)} FROM persons_in
            WHERE id NOT IN (SELECT id FROM persons_known)""",
            [now],
        ).fetchone()
        stats.changed += int(res[0]) if res else 0
    return stats


def mark_marketo_deleted(con: duckdb.DuckDBPyConnection, ids: Iterable[int]) -> int:
    ids = [int(i) for i in ids]
    return ledger.mark_persons_deleted(con, ids, utcnow()) if ids else 0


def record_marketo_field_times(con: duckdb.DuckDBPyConnection, times: list[tuple[int, str, str]]) -> None:
    """(person id, field, activity time) of lead changes to fields with policy ``latest``."""
    if not times:
        return
    # Not "at": DuckDB 1.4 parses AT as a keyword, and `max(at)` was a syntax error (hidden by a step retry).
    tbl = pa.table(  # noqa: F841 (DuckDB reads it by name)
        {
            "id": [str(t[0]) for t in times],
            "field": [t[1] for t in times],
            "changed_at": [t[2] for t in times],
        }
    )
    con.execute("""INSERT OR REPLACE INTO field_times (side, id, field, changed_at)
                   SELECT 'm', id, field, max(changed_at) FROM tbl GROUP BY id, field""")
