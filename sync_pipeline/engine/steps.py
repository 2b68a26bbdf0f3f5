"""The sync's steps as plain functions: extract, plan, push. Dagster assets and the CLI call these.

Extraction by partition: a historical window reads Dataverse rows by ``modifiedon`` (``$filter``); the
latest window follows the table's delta link, which also reports deletes. The first read of a table
with change tracking is a full read that yields the first delta link (one pass, the API floor); an
expired link falls back to such a full read and marks rows that vanished meanwhile as deleted.
Marketo persons: a paging token taken before anything is read, then lead-change activities (for the
persons that changed), then Merge Leads and Delete Lead activities (merges move links to the winners); the
initial copy uses bulk extract windows.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine import apply as apply_mod
from sync_pipeline.engine import extract, mapping, merge, normalize
from sync_pipeline.engine.state import fcol, get_cursor, latest_fields, next_seq, qi, record_stats, set_cursor, utcnow

log = logging.getLogger(__name__)

MAX_EXPORT_DAYS = 31
ACTIVITY_SLICE = 20_000  # persons whose lead changes are applied together
INGEST_ROWS = 25_000  # rows held in memory between upserts (a few 5,000-row pages)


@dataclass
class ExtractStats:
    entity: str
    mode: str = ""
    pages: int = 0
    rows: int = 0
    changed: int = 0
    deleted: int = 0
    merged: int = 0  # Dynamics links moved or retired by Marketo merges
    calls: dict[str, int] = field(default_factory=dict)
    relabeled: int = 0  # mirrored rows whose option label changed in the org's metadata

    def take(self, s: extract.IngestStats) -> None:
        self.rows += s.rows
        self.changed += s.changed
        self.deleted += s.deleted

    def as_metadata(self) -> dict[str, Any]:
        out = {"mode": self.mode, "pages": self.pages, "rows_read": self.rows, "rows_changed": self.changed,
               "rows_deleted": self.deleted}
        if self.merged:
            out["links_moved_by_merges"] = self.merged
        if self.relabeled:
            out["rows_relabeled"] = self.relabeled
        return out


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def delta_cursor(entity: Entity) -> str:
    return f"dynamics:delta:{entity.name}"


def select_cursor(entity: Entity) -> str:
    """The $select the stored delta link was started with."""
    return f"dynamics:delta-select:{entity.name}"


# ---- Dynamics -----------------------------------------------------------------------------------------------


def extract_dynamics(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, client: Any,
                     start: datetime, end: datetime, partition_key: str, latest: bool) -> ExtractStats:
    """Mirror the Dynamics rows of one entity for a modified-time window (and its deletes when latest)."""
    assert entity.dynamics is not None
    stats = ExtractStats(entity.name)
    stats.relabeled = relabel_options(con, entity)
    select = extract.dynamics_select(entity)
    modified = entity.dynamics.modified_column
    delta = get_cursor(con, delta_cursor(entity))
    # A delta link is opaque and replays the query it came from, $select included ("opaque, service-generated
    # links", learn.microsoft.com/en-us/training/modules/dataverse-web-api/change-tracking): after a mapping
    # change its rows would lack the new columns, which would read as blanks. A new $select starts a new link.
    selected, wanted = get_cursor(con, select_cursor(entity)), ",".join(select)
    if latest and delta and selected is not None and selected != wanted:
        stats.mode = "full (mapping changed: new delta link)"
        # The old link stays until the new one is complete: a run killed meanwhile starts this read again.
        new_link = _full_read(con, entity, client, select, partition_key, stats, detect_deletes=True)
        set_cursor(con, delta_cursor(entity), new_link)
    elif latest and delta:
        stats.mode = "delta"
        try:
            new_link = _ingest_changes(con, entity, client, select, delta, partition_key, stats, config)
        except _delta_expired_errors() as exc:
            log.warning("%s: delta link no longer valid (%s); falling back to a full read", entity.name, exc)
            set_cursor(con, delta_cursor(entity), None)
            stats.mode = "full (delta expired)"
            new_link = _full_read(con, entity, client, select, partition_key, stats, detect_deletes=True,
                                  config=config)
        set_cursor(con, delta_cursor(entity), new_link)
    elif latest:
        stats.mode = "full (first delta link)"
        new_link = _full_read(con, entity, client, select, partition_key, stats, detect_deletes=False,
                              config=config)
        set_cursor(con, delta_cursor(entity), new_link)
    elif modified:
        stats.mode = "window"
        flt = f"{modified} ge {_iso(start)} and {modified} lt {_iso(end)}"
        for page in client.iter_pages(entity.dynamics.entity_set, select, filter=flt,
                                      annotations=True):
            stats.pages += 1
            stats.take(extract.ingest_dynamics_page(con, entity, page, partition_key, extract.target_tables(config)))
    else:
        stats.mode = "skipped (no modified-time column; read on the latest window)"
    if latest:
        set_cursor(con, select_cursor(entity), wanted)
    return stats


def relabel_options(con: duckdb.DuckDBPyConnection, entity: Entity) -> int:
    """Option labels the org renamed since the last run: mirrored rows take the new label and become pending,
    so the next plan writes it (a label change does not change the Dynamics rows' versions). Labels of
    codes that were unknown before (held as invalid) are filled in too. Returns the rows changed."""
    changed = 0
    for f in entity.all_fields:
        if f.transform != "picklist" or not f.options:
            continue
        name = f"optionsets:{entity.name}:{f.marketo}"
        now = {str(k): v for k, v in sorted(f.options.items())}
        stored = get_cursor(con, name)
        if stored is not None:
            old = json.loads(stored)
            unique = Counter(old.values())
            pairs = [(old[c], now[c]) for c in old if c in now and old[c] != now[c] and unique[old[c]] == 1]
            pairs += [(normalize.INVALID + c, now[c]) for c in now if c not in old]
            if pairs:
                col = fcol(f.marketo)
                whens = " ".join("WHEN ? THEN ?" for _ in pairs)
                args = [v for pair in pairs for v in pair]
                res = con.execute(f"""UPDATE {qi('d_' + entity.name)} SET {col} = CASE {col} {whens} END,
                                      pending_seq = ? WHERE NOT deleted AND {col} IN (SELECT unnest(?::VARCHAR[]))""",
                                  args + [next_seq(con), [p[0] for p in pairs]]).fetchone()
                changed += int(res[0]) if res else 0
        if stored != json.dumps(now):
            set_cursor(con, name, json.dumps(now))
    if changed:
        log.info("%s: %d mirrored rows took renamed option labels", entity.name, changed)
    return changed


def _delta_expired_errors() -> tuple[type[BaseException], ...]:
    from sync_pipeline.clients.dynamics import DeltaTokenExpired

    return (DeltaTokenExpired,)


def _changes(con: duckdb.DuckDBPyConnection, entity: Entity, client: Any, select: list[str], delta: str | None,
             partition_key: str, stats: ExtractStats, seen: bool = False, config: SyncConfig | None = None) -> str:
    """Follow a delta link (or start change tracking with a full read); returns the next delta link."""
    assert entity.dynamics is not None
    pk = extract.primary_key(entity)
    link = ""
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        stats.take(extract.ingest_dynamics_page(con, entity, buffer, partition_key,
                                                extract.target_tables(config) if config else None))
        if seen and buffer:
            ids = pa.table({"id": [str(r.get(pk, "")).lower() for r in buffer]})  # noqa: F841
            con.execute("INSERT INTO seen_ids SELECT id FROM ids")
        buffer.clear()

    for rows, deleted, page_link in client.iter_changes(entity.dynamics.entity_set, select, delta_link=delta,
                                                        annotations=True):
        stats.pages += 1
        buffer += rows  # a few pages per statement: fewer, larger set-based upserts
        if len(buffer) >= INGEST_ROWS or (deleted and buffer):  # deletes apply after the rows before them
            flush()
        stats.deleted += extract.mark_dynamics_deleted(con, entity, deleted, partition_key)
        link = page_link or link
    if buffer:
        flush()
    return link


def _ingest_changes(con: duckdb.DuckDBPyConnection, entity: Entity, client: Any, select: list[str], delta: str,
                    partition_key: str, stats: ExtractStats, config: SyncConfig | None = None) -> str:
    return _changes(con, entity, client, select, delta, partition_key, stats, config=config)


def _full_read(con: duckdb.DuckDBPyConnection, entity: Entity, client: Any, select: list[str],
               partition_key: str, stats: ExtractStats, detect_deletes: bool, config: SyncConfig | None = None) -> str:
    if detect_deletes:
        con.execute("CREATE OR REPLACE TEMP TABLE seen_ids (id VARCHAR)")
    link = _changes(con, entity, client, select, None, partition_key, stats, seen=detect_deletes, config=config)
    if detect_deletes:
        gone = [r[0] for r in con.execute(f"SELECT id FROM {qi('d_' + entity.name)} WHERE NOT deleted "
                                          "AND id NOT IN (SELECT id FROM seen_ids)").fetchall()]
        stats.deleted += extract.mark_dynamics_deleted(con, entity, gone, partition_key)
    return link


# ---- Marketo persons ----------------------------------------------------------------------------------------


LEADCHANGES_CURSOR = "marketo:leadchanges"
DELETED_CURSOR = "marketo:deletedleads"  # the position of the Delete Lead and Merge Leads activities read


def extract_marketo_persons(con: duckdb.DuckDBPyConnection, config: SyncConfig, client: Any, start: datetime,
                            end: datetime, latest: bool, work_dir: Path | None = None,
                            run_id: str | None = None) -> ExtractStats:
    stats = ExtractStats("person")
    token = get_cursor(con, LEADCHANGES_CURSOR)
    fields = extract.marketo_person_fields(config)
    if token is None:
        # Take the watermark before reading, so nothing changed during the initial read is missed.
        first = client.paging_token(utcnow().replace(tzinfo=timezone.utc) - timedelta(seconds=5))
        stats.mode = "bulk export"
        # The first read covers everything since the configured start, whatever window triggered it.
        since = datetime.fromisoformat(config.sync.partitions.start_date).replace(tzinfo=timezone.utc)
        _bulk_windows(con, config, client, min(start, since), end, fields, stats, work_dir)
        set_cursor(con, LEADCHANGES_CURSOR, first)
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

    def flush() -> None:
        times: list[tuple[int, str, str]] = []
        rows, fetch = _apply_activities(con, watch, activities, timed, times)
        for ids in _chunked(sorted(fetch), 300):  # persons we have never seen: read them whole
            rows += client.get_leads("id", ids, fields)
        stats.take(extract.ingest_marketo_persons(con, config, rows))
        extract.record_marketo_field_times(con, times)
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
    deleted_token = _removals(con, config, client, get_cursor(con, DELETED_CURSOR) or token, fields, run_id, stats)
    set_cursor(con, LEADCHANGES_CURSOR, token)
    set_cursor(con, DELETED_CURSOR, deleted_token)
    return stats


LOST_PERSONS_PER_RUN = 3000


def _reread_lost_persons(con: duckdb.DuckDBPyConnection, config: SyncConfig, client: Any, fields: list[str],
                         stats: ExtractStats) -> None:
    """Linked persons missing from the mirror (a damaged or partly restored store) are read again, so their
    records plan normally instead of staying quarantined; an id Marketo does not know stays quarantined."""
    persons = [e.name for e in config.persons]
    ids = [int(r[0]) for r in con.execute("""SELECT DISTINCT TRY_CAST(marketo_id AS BIGINT) AS mid FROM identity
        WHERE state = 'active' AND entity IN (SELECT unnest(?::VARCHAR[])) AND TRY_CAST(marketo_id AS BIGINT) IS NOT NULL
          AND TRY_CAST(marketo_id AS BIGINT) NOT IN (SELECT id FROM m_person) ORDER BY mid LIMIT ?""",
                                          [persons, LOST_PERSONS_PER_RUN]).fetchall()]
    rows: list[dict[str, Any]] = []
    for chunk in _chunked(ids, 300):
        rows += client.get_leads("id", chunk, fields)
    if rows:
        stats.take(extract.ingest_marketo_persons(con, config, rows))


def _removals(con: duckdb.DuckDBPyConnection, config: SyncConfig, client: Any, token: str, fields: list[str],
              run_id: str | None, stats: ExtractStats) -> str:
    """Persons that left Marketo since ``token``: Merge Leads and Delete Lead activities, read together in
    one ``activities.json`` call (up to 10 type ids per call; the Delete Lead activities are the ones
    ``deletedleads.json`` serves, type 37), so following merges costs no extra call. Runs after the lead
    changes (a winner's copied values are mirrored first); merges are applied before deletes. Returns the
    new paging token."""
    merges: list[extract.MarketoMerge] = []
    gone: list[int] = []
    for page in client.activities(token, [extract.MERGE_LEADS_TYPE, extract.DELETE_LEAD_TYPE]):
        stats.pages += 1
        for a in page.results or []:
            kind = a.get("activityTypeId")
            if kind == extract.MERGE_LEADS_TYPE:
                merge = extract.parse_merge_activity(a)
                if merge is not None:
                    merges.append(merge)
            elif kind == extract.DELETE_LEAD_TYPE and a.get("leadId") is not None:
                gone.append(int(a["leadId"]))
        token = page.next_page_token or token
    if merges:
        winners = sorted({m.winner for m in merges})
        known = {r[0] for r in con.execute("SELECT id FROM m_person WHERE NOT deleted AND id IN "
                                           "(SELECT unnest(?::BIGINT[]))", [winners]).fetchall()}
        rows: list[dict[str, Any]] = []
        for ids in _chunked([w for w in winners if w not in known], 300):  # a winner we never read: read it
            rows += client.get_leads("id", ids, fields)
        stats.take(extract.ingest_marketo_persons(con, config, rows))
        stats.merged += extract.apply_marketo_merges(con, config, merges, run_id)
    stats.deleted += extract.mark_marketo_deleted(con, gone)
    return token


def _apply_activities(con: duckdb.DuckDBPyConnection, watch: list[str], activities: dict[int, list[dict[str, Any]]],
                      timed: set[str] | None = None, times: list[tuple[int, str, str]] | None = None
                      ) -> tuple[list[dict[str, Any]], set[int]]:
    """Known persons: the mirror plus each change's new value (no read; our own echoes compare equal and
    change nothing). Unknown persons are returned to be read whole. For the ``timed`` fields (policy
    latest), each change to a new value appends (person, field, activity time) to ``times``: Marketo's
    lead-change activities carry the time per field (domain.md 3.5)."""
    cols = ", ".join(f'f_{f} AS "{f}"' for f in watch)
    ids = list(activities)
    known = {r[0]: r for r in con.execute(
        f"SELECT id, {cols} FROM m_person WHERE NOT deleted AND id IN (SELECT unnest(?::BIGINT[]))", [ids]).fetchall()}
    rows: list[dict[str, Any]] = []
    fetch: set[int] = set()
    for lead_id, acts in activities.items():
        mirrored = known.get(lead_id)
        if mirrored is None:
            fetch.add(lead_id)
            continue
        row: dict[str, Any] = {"id": lead_id, **dict(zip(watch, mirrored[1:]))}
        for a in sorted(acts, key=lambda a: (str(a.get("activityDate", "")), int(a.get("id") or 0))):
            row["updatedAt"] = a.get("activityDate")
            for change in a.get("fields") or []:
                name = change.get("name")
                if name in row:
                    if timed and times is not None and name in timed and a.get("activityDate") and \
                            _text_of(change.get("newValue")) != _text_of(row[name]):
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
        yield items[i:i + n]


def _bulk_windows(con: duckdb.DuckDBPyConnection, config: SyncConfig, client: Any, start: datetime, end: datetime,
                  fields: list[str], stats: ExtractStats, work_dir: Path | None) -> None:
    work = Path(work_dir or tempfile.mkdtemp(prefix="sync-pipeline-export-"))
    work.mkdir(parents=True, exist_ok=True)
    s = start
    while s < end:
        e = min(s + timedelta(days=MAX_EXPORT_DAYS), end)
        path = work / f"leads-{s:%Y%m%d%H%M}-{e:%Y%m%d%H%M}.csv"
        client.export_to_file("leads", {"updatedAt": {"startAt": _iso(s), "endAt": _iso(e)}}, path, fields=fields)
        stats.pages += 1
        stats.take(extract.ingest_marketo_csv(con, config, str(path)))
        path.unlink(missing_ok=True)
        s = e


# ---- plan and push --------------------------------------------------------------------------------------------


def plan(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str) -> merge.PlanSummary:
    # Fields added to the mapping wait for their back-fill (engine/mapping.py); the plan says what changed.
    config, entity = mapping.effective(con, config, entity)
    summary = merge.compute_plan(con, config, entity, run_id, utcnow())
    mapping.add_plan_notices(con, entity.name, run_id)
    record_stats(con, run_id, entity.name, "plan", summary.as_metadata())
    return summary


def push_marketo(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, client: Any, run_id: str,
                 final: bool) -> apply_mod.ApplyStats:
    stats = apply_mod.apply_to_marketo(con, config, entity, client, run_id, utcnow())
    if final:
        apply_mod.finish(con, entity)
        mapping.note_in_ledger(con, entity.name, run_id, utcnow())
    record_stats(con, run_id, entity.name, "push_marketo", stats.as_metadata())
    return stats


def push_dynamics(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, dynamics: Any, marketo: Any,
                  run_id: str) -> apply_mod.ApplyStats:
    stats = apply_mod.apply_to_dynamics(con, config, entity, dynamics, marketo, run_id, utcnow())
    apply_mod.finish(con, entity)
    mapping.note_in_ledger(con, entity.name, run_id, utcnow())
    record_stats(con, run_id, entity.name, "push_dynamics", stats.as_metadata())
    return stats
