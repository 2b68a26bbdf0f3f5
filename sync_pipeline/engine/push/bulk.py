"""Creates of persons and custom objects through Marketo's bulk import, when a batch is large.

REST Sync Leads writes 300 records a call; an initial copy of a million persons is thousands of calls of a daily
quota shared with every other integration. Bulk import takes a CSV file of up to 10 MB (tens of thousands of
rows) per call (Adobe, "Bulk Lead Import" and "Bulk Custom Object Import",
https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/bulk-import/bulk-lead-import and
.../bulk-import/bulk-custom-object-import). A push uses it when its planned creates reach
``sync.bulk_import_threshold``; everything else (updates, deletes, merges, a small batch) stays on REST.

Only creates go bulk: a blank CSV cell leaves a field as it is, so an update clearing a value cannot be said in
a file, while a create leaves out null values on REST too. Rows are matched by the same key as the REST path:
persons by ``dynamicsId`` (createOrUpdate, so a re-run updates instead of duplicating), custom objects by their
dedupe field (the Dynamics id).

Per-record precision is kept:
- rows listed in a job's failures file fail with Marketo's reason, through the same bookkeeping as a REST
  failure (retried with backoff, held after ``retry.max_attempts``, the reason in ``failures``);
- rows listed in a warnings file were imported; the warning is logged and written to the ledger (target
  ``marketo:bulk``, op ``warning``), which nothing replays;
- bulk import reports no ids, so after every job of the push has finished ONE bulk lead export (fields ``id``
  and ``dynamicsId``, ``updatedAt`` over the import window) gives each imported person its Marketo id; the
  records then go through the same success bookkeeping as a REST result (ledger, base, identity, mirror).
  Custom objects are identified by their dedupe field, as in every later write; the marketoGUID is not read
  (identity and ledger carry the dedupe value where REST results carry the GUID).

Nothing is lost, whatever fails: a file Marketo refuses, a job that fails as a whole or never finishes, and an
imported person the export does not show (clock skew, a duplicate dynamicsId) are not recorded here; their
records stay in the push and go through REST in the same run (createOrUpdate by the same key, so a row the job
did import is updated, not duplicated) with REST's per-record results. A transient failure that outlasts the
client's retries or the daily quota fails the step like a REST call: nothing is recorded, the plan stays
pending, and the next run writes the same records again by the same key.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import duckdb
import pyarrow as pa

from sync_pipeline.config.model import Entity, FieldMap, SyncConfig
from sync_pipeline.engine import normalize
from sync_pipeline.engine.ports import MarketoPort
from sync_pipeline.engine.push.payloads import object_path
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import one_row

log = logging.getLogger(__name__)

FILE_BYTES = 9_500_000  # a file is closed past this size: under Marketo's 10 MB with room for one more row
READ_RECORDS = 5_000  # records per read from DuckDB while writing files
RECORD_SLICE = 20_000  # results handed to the bookkeeping at a time (one transaction each: flat memory)
EXPORT_MARGIN = timedelta(minutes=10)  # around the import window, for clocks that disagree
PERSON_KEY = "dynamicsId"
_CODE = re.compile(r"\s*(\d{3,4})\b[\s:-]*(.*)", re.S)

Done = tuple  # (dynamics_id, op, ok, marketo_id, code, message): the fields of push.results.Result


def bulk_path(entity: Entity) -> bool:
    """Persons and custom objects have a bulk import; companies, opportunities, roles and sales persons do not."""
    if entity.is_derived:
        return False
    return entity.is_person or object_path(entity).startswith("customobjects/")


def wanted(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity) -> bool:
    """Whether this push's creates go through bulk import (``planned_ids`` holds the push's planned records)."""
    threshold = config.sync.bulk_import_threshold
    if threshold is None or not bulk_path(entity):
        return False
    creates = one_row(con, "SELECT count(*) FROM planned_ids WHERE op = 'create'")[0]
    return int(creates) >= threshold


def push(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    client: MarketoPort,
    maps: dict[str, FieldMap],
    record: Callable[[list[Done]], None],
    run_id: str,
    now: datetime,
    work_dir: Path | None = None,
) -> int:
    """Import the push's planned creates; hand their results to ``record``; take the settled records out of
    ``planned_rows``/``planned_ids`` (the REST path writes whatever is left). Returns the records settled."""
    work = Path(work_dir or tempfile.mkdtemp(prefix="sync-pipeline-import-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _push(con, config, entity, client, maps, record, run_id, now, work)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _push(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    client: MarketoPort,
    maps: dict[str, FieldMap],
    record: Callable[[list[Done]], None],
    run_id: str,
    now: datetime,
    work: Path,
) -> int:
    person = entity.is_person
    key = PERSON_KEY if person else entity.marketo.key
    api_name = None if person else entity.marketo.object
    con.execute(
        "CREATE OR REPLACE TEMP TABLE bulk_rows (did VARCHAR, file INTEGER, state VARCHAR, mid VARCHAR, "
        "code VARCHAR, message VARCHAR)"
    )
    queue = client.import_queue(object_name=api_name, lookup_field=PERSON_KEY)
    started = datetime.now(UTC)
    files = 0
    for path, dids in _files(con, entity, maps, key, work):
        files += 1
        con.register("bulk_file", pa.table({"did": dids}))
        try:
            con.execute(
                "INSERT INTO bulk_rows SELECT did, ?, 'sent', NULL, NULL, NULL FROM bulk_file", [files]
            )
        finally:
            con.unregister("bulk_file")
        for outcome in queue.submit(path, files):
            _take(con, entity, key, outcome, run_id, now)
    for outcome in queue.drain():
        _take(con, entity, key, outcome, run_id, now)
    for p in work.glob("*.csv"):
        p.unlink(missing_ok=True)
    calls = queue.calls
    if person and one_row(con, "SELECT count(*) FROM bulk_rows WHERE state = 'sent'")[0]:
        calls += _find_person_ids(con, client, started, work)
    settled = _record(con, entity, person, record)
    left = one_row(con, "SELECT count(*) FROM bulk_rows WHERE state NOT IN ('ok', 'failed')")[0]
    log.info(
        "%s: %d create(s) through %d bulk import file(s), %d Marketo call(s); %d settled, %d left to REST",
        entity.name,
        settled + left,
        files,
        calls,
        settled,
        left,
    )
    con.execute("""DELETE FROM planned_rows WHERE op = 'create' AND dynamics_id IN
                   (SELECT did FROM bulk_rows WHERE state IN ('ok', 'failed'))""")
    con.execute("""DELETE FROM planned_ids WHERE op = 'create' AND dynamics_id IN
                   (SELECT did FROM bulk_rows WHERE state IN ('ok', 'failed'))""")
    return settled


# ---- files ----------------------------------------------------------------------------------------------------


def _files(con: duckdb.DuckDBPyConnection, entity: Entity, maps: dict[str, FieldMap], key: str, work: Path):
    """Yield (path, dynamics ids) per CSV file of at most FILE_BYTES, reading the plan in slices."""
    planned = [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT field FROM planned_rows WHERE op = 'create' AND field IS NOT NULL ORDER BY 1"
        ).fetchall()
    ]
    fixed = [PERSON_KEY, "dynamicsType", "dynamicsIsDeleted"] if entity.is_person else [key]
    header = fixed + [f for f in planned if f not in fixed]
    position = {f: i for i, f in enumerate(header)}
    type_value = entity.marketo.type_value or entity.name.title()
    bounds = one_row(con, "SELECT min(rn), max(rn) FROM planned_ids WHERE op = 'create'")
    if bounds[0] is None:
        return
    n, path = 0, work
    dids: list[str] = []
    out: TextIO | None = None
    writer: Any = None
    for start in range(int(bounds[0]), int(bounds[1]) + 1, READ_RECORDS):
        rows = con.execute(
            """SELECT rn, dynamics_id, field, new_value FROM planned_rows WHERE op = 'create'
                              AND rn BETWEEN ? AND ? ORDER BY rn, field""",
            [start, start + READ_RECORDS - 1],
        ).fetchall()
        for did, cells in _records(rows, header, position, maps):
            if out is None:
                n += 1
                path = work / f"{entity.name}-{n:04d}.csv"
                # Open across records until the file reaches FILE_BYTES (closed below, or after the loop).
                out = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115
                writer = csv.writer(out, lineterminator="\n")
                writer.writerow(header)
                dids = []
            # As on REST, the planned values win over these defaults of a new person.
            defaults = (did, type_value, "false") if entity.is_person else (did,)
            for i, value in enumerate(defaults):
                cells[i] = cells[i] or value
            writer.writerow(cells)
            dids.append(did)
            if out.tell() >= FILE_BYTES:
                out.close()
                out = None
                yield path, dids
    if out is not None:
        out.close()
        yield path, dids


def _records(rows: list[tuple], header: list[str], position: dict[str, int], maps: dict[str, FieldMap]):
    current, did = None, None
    cells: list[str] | None = None
    for rn, d, field, value in rows:
        if rn != current:
            if cells is not None:
                yield did, cells
            current, did = rn, d
            cells = [""] * len(header)
        if cells is not None and field is not None and value is not None:
            fm = maps.get(field)
            cells[position[field]] = _cell(normalize.to_marketo(fm, value) if fm else value)
    if cells is not None:
        yield did, cells


def _cell(value: Any) -> str:
    if value is None:
        return ""  # blank: the field is not set (a create leaves null values out on REST too)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---- outcomes -------------------------------------------------------------------------------------------------


def _take(
    con: duckdb.DuckDBPyConnection, entity: Entity, key: str, outcome: Any, run_id: str, now: datetime
) -> None:
    """Mark a finished file's rows: failed rows with their reason; a file refused or failed as a whole is left
    to REST (state ``rest``)."""
    if outcome.error is not None or not outcome.completed:
        log.warning(
            "%s: bulk import file %s (batch %s) did not complete (%s); its records go through REST",
            entity.name,
            outcome.tag,
            outcome.batch_id,
            outcome.error,
        )
        con.execute("UPDATE bulk_rows SET state = 'rest' WHERE file = ?", [outcome.tag])
        return
    failed = _report_rows(outcome.failures, key)
    if failed:
        con.register(
            "bulk_failed",
            pa.table(
                {
                    "did": [d for d, _, _ in failed],
                    "code": [c for _, c, _ in failed],
                    "message": [m for _, _, m in failed],
                }
            ),
        )
        try:
            con.execute(
                """UPDATE bulk_rows SET state = 'failed', code = f.code, message = f.message
                           FROM (SELECT did, any_value(code) AS code, any_value(message) AS message
                                 FROM bulk_failed GROUP BY did) f
                           WHERE bulk_rows.file = ? AND bulk_rows.did = f.did""",
                [outcome.tag],
            )
        finally:
            con.unregister("bulk_failed")
    declared = int(outcome.status.get("numOfRowsFailed") or 0)
    if declared > len(failed):
        # Failed rows the report did not name (e.g. without their key): which ones is unknown, so none of this
        # file's unconfirmed rows is trusted; persons are confirmed by the export, objects go through REST.
        log.warning(
            "%s: import batch %s reported %d failed row(s) but named %d",
            entity.name,
            outcome.batch_id,
            declared,
            len(failed),
        )
        if not entity.is_person:
            con.execute(
                "UPDATE bulk_rows SET state = 'rest' WHERE file = ? AND state = 'sent'", [outcome.tag]
            )
    warned = _report_rows(outcome.warnings, key)
    if warned:
        log.warning(
            "%s: import batch %s imported %d row(s) with a warning, e.g. %s: %s",
            entity.name,
            outcome.batch_id,
            len(warned),
            warned[0][0],
            warned[0][2],
        )
        con.register(
            "bulk_warned",
            pa.table(
                {"did": [d for d, _, _ in warned], "reason": [f"{c} {m}".strip() for _, c, m in warned]}
            ),
        )
        try:
            ledger.note_import_warnings(con, entity.name, "bulk_warned", run_id, now)
        finally:
            con.unregister("bulk_warned")


def _report_rows(text: str, key: str) -> list[tuple[str, str, str]]:
    """(key value, code, message) per row of a failures/warnings CSV (the row as sent plus a reason column)."""
    if not text.strip():
        return []
    reader = csv.reader(io.StringIO(text))  # a quoted cell may span lines
    header = next(reader, None)
    if not header or key not in header:
        return []
    at = header.index(key)
    out = []
    for row in reader:
        if len(row) < 2 or at >= len(row) - 1 or not row[at]:
            continue
        reason = row[-1]
        m = _CODE.match(reason)
        code, message = (m.group(1), m.group(2).strip() or reason) if m else ("bulk_import", reason)
        out.append((row[at], code, f"bulk import: {message}"))
    return out


def _find_person_ids(
    con: duckdb.DuckDBPyConnection, client: MarketoPort, started: datetime, work: Path
) -> int:
    """One bulk lead export (id, dynamicsId; updatedAt over the import window) gives the imported persons their
    Marketo ids. Returns the export's calls (create, enqueue, status polls, file)."""
    before = sum(getattr(client, "calls", {}).values()) if hasattr(client, "calls") else 0
    path = work / "imported-ids.csv"
    end = datetime.now(UTC) + EXPORT_MARGIN
    window = {"updatedAt": {"startAt": _iso(started - EXPORT_MARGIN), "endAt": _iso(end)}}
    client.export_to_file("leads", window, path, fields=["id", PERSON_KEY])
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE bulk_ids AS
        SELECT CAST(id AS VARCHAR) AS mid, {PERSON_KEY} AS did
        FROM read_csv(?, header = true, all_varchar = true, nullstr = 'null')
        WHERE {PERSON_KEY} IN (SELECT did FROM bulk_rows WHERE state = 'sent')""",
        [str(path)],
    )
    path.unlink(missing_ok=True)
    # A person Marketo shows exactly once is confirmed; none or several (a duplicate) are left to REST.
    con.execute("""UPDATE bulk_rows SET state = 'ok', mid = i.mid FROM
                   (SELECT did, any_value(mid) AS mid FROM bulk_ids GROUP BY did HAVING count(*) = 1) i
                   WHERE bulk_rows.state = 'sent' AND bulk_rows.did = i.did""")
    con.execute("UPDATE bulk_rows SET state = 'rest' WHERE state = 'sent'")
    return (sum(client.calls.values()) - before) if hasattr(client, "calls") else 0


def _record(
    con: duckdb.DuckDBPyConnection, entity: Entity, person: bool, record: Callable[[list[Done]], None]
) -> int:
    if not person:
        # Identified by the dedupe field (the Dynamics id), as identity records an object without a marketoGUID.
        con.execute("UPDATE bulk_rows SET state = 'ok', mid = did WHERE state = 'sent'")
    total = int(one_row(con, "SELECT count(*) FROM bulk_rows WHERE state IN ('ok', 'failed')")[0])
    con.execute("""CREATE OR REPLACE TEMP TABLE bulk_done AS
        SELECT row_number() OVER (ORDER BY did) AS n, did, state = 'ok' AS ok,
               mid, CASE WHEN state = 'failed' THEN code END AS code, message
        FROM bulk_rows WHERE state IN ('ok', 'failed')""")
    for start in range(1, total + 1, RECORD_SLICE):
        rows = con.execute(
            "SELECT did, ok, mid, code, message FROM bulk_done WHERE n BETWEEN ? AND ? ORDER BY n",
            [start, start + RECORD_SLICE - 1],
        ).fetchall()
        record([(did, "create", bool(ok), mid, code, message) for did, ok, mid, code, message in rows])
    return total


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
