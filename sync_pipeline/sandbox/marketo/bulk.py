"""Bulk extract (leads, activities) and bulk import jobs (leads, custom objects).

Jobs move through their states lazily whenever the bulk API is called: an export goes
Created -> Queued (enqueue) -> Processing (when fewer than ``bulk_concurrent_jobs`` run) -> Completed
after ``bulk_processing_seconds`` of sandbox time (default 0, so it completes on the next status
poll). Queue limits and the daily export quota answer 1029 (exports) and 1016 (imports) when configured.

Imports are asynchronous as Adobe documents them ("Bulk Lead Import",
https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/bulk-import/bulk-lead-import, and
"Bulk Custom Object Import", .../rest/bulk-import/bulk-custom-object-import): a FIFO queue of at most 10 jobs
(including the 2 processed at a time; the 11th answers 1016 "Too many imports"), each job Queued -> Importing
-> Complete (or Failed), rows inserted or updated by the lookup field (leads) or the dedupe fields (custom
objects); rows that fail are listed in ``failures.json`` and rows imported with a problem in
``warnings.json``, each the original row plus a reason column. A job never moves more than one state per bulk
request and never in the request that created it, so a client always sees Queued or Importing before
Complete, however fast the sandbox is. A blank cell leaves the field as it is (it is not a null).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sync_pipeline.sandbox.clock import iso
from sync_pipeline.sandbox.marketo.limits import MarketoLimits, next_central_midnight
from sync_pipeline.sandbox.marketo.store import MarketoStore
from sync_pipeline.sandbox.marketo.validation import to_iso

MAX_RANGE = timedelta(days=31)
MAX_IMPORT_BYTES = 10 * 1024 * 1024
DELIMITERS = {"CSV": ",", "TSV": "\t", "SSV": " "}
# The activity export's columns, as Adobe documents them ("Bulk Activity Extract", https://experienceleague.adobe.com/
# en/docs/marketo-developer/marketo/rest/bulk-extract/bulk-activity-extract): these by default, ``fields`` a subset
# (plus ``actionResult``); ``attributes`` is a JSON object of the activity's attributes by name (Change Data Value:
# "New Value", "Old Value", "Reason", "Source"), its primary attribute the lead field's id and display name.
ACTIVITY_COLUMNS = (
    "marketoGUID",
    "leadId",
    "activityDate",
    "activityTypeId",
    "campaignId",
    "primaryAttributeValueId",
    "primaryAttributeValue",
    "attributes",
)


class BulkError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class ExportJob:
    export_id: str
    kind: str  # leads | activities
    fields: list[str]
    filter: dict[str, Any]
    format: str
    headers: dict[str, str]
    created_at: str
    status: str = "Created"
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    started_ts: float = 0.0
    content: bytes | None = None
    number_of_records: int | None = None
    error_msg: str | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exportId": self.export_id,
            "format": self.format,
            "status": self.status,
            "createdAt": self.created_at,
        }
        for key, value in (
            ("queuedAt", self.queued_at),
            ("startedAt", self.started_at),
            ("finishedAt", self.finished_at),
            ("errorMsg", self.error_msg),
        ):
            if value is not None:
                out[key] = value
        if self.content is not None:
            out.update(
                numberOfRecords=self.number_of_records,
                fileSize=len(self.content),
                fileChecksum=hashlib.sha256(self.content).hexdigest(),
            )
        return out


@dataclass
class ImportJob:
    batch_id: int
    header: list[str]
    rows: list[list[str]]
    lookup_field: str
    object_name: str | None = None  # None: leads; else the custom object's API name
    status: str = "Queued"
    started_ts: float = 0.0
    processed: int = 0
    failures: list[tuple[list[str], str]] = field(default_factory=list)
    warnings: list[tuple[list[str], str]] = field(default_factory=list)
    message: str = "Queued for processing"
    moved_at_tick: int = 0  # the bulk request in which the job last changed state
    fail_row: Callable[[int], dict[str, str] | None] = lambda i: None  # injected row failures (faults)

    def describe(self) -> dict[str, Any]:
        if self.object_name is not None:  # the custom object status shape (numOfObjectsProcessed)
            return {
                "batchId": self.batch_id,
                "operation": "import",
                "objectApiName": self.object_name,
                "status": self.status,
                "numOfObjectsProcessed": self.processed,
                "numOfRowsFailed": len(self.failures),
                "numOfRowsWithWarning": len(self.warnings),
                "message": self.message,
            }
        return {
            "batchId": self.batch_id,
            "importId": str(self.batch_id),
            "status": self.status,
            "numOfLeadsProcessed": self.processed,
            "numOfRowsFailed": len(self.failures),
            "numOfRowsWithWarning": len(self.warnings),
            "message": self.message,
        }

    def report(self, which: str) -> bytes:
        rows = self.failures if which == "failures" else self.warnings
        column = "Import Failure Reason" if which == "failures" else "Import Warning Reason"
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*self.header, column])
        for row, reason in rows:
            writer.writerow([*row, reason])
        return buf.getvalue().encode("utf-8")


def _iso_range(flt: dict[str, Any], name: str) -> tuple[str, str]:
    spec = flt.get(name)
    if not isinstance(spec, dict) or "startAt" not in spec or "endAt" not in spec:
        raise BulkError("1003", f"Filter '{name}' requires startAt and endAt")
    try:
        start, end = to_iso(spec["startAt"]), to_iso(spec["endAt"])
    except (TypeError, ValueError):
        raise BulkError("1003", f"Invalid date in filter '{name}': expected ISO-8601") from None
    span = datetime.fromisoformat(end[:-1]) - datetime.fromisoformat(start[:-1])
    if span < timedelta(0):
        raise BulkError("1003", f"Filter '{name}': endAt is before startAt")
    if span > MAX_RANGE:
        raise BulkError("1003", f"Filter '{name}': date range exceeds 31 days")
    return start, end


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


class BulkService:
    def __init__(self, store: MarketoStore, limits: Callable[[], MarketoLimits]):
        self.store = store
        self.clock = store.clock
        self.limits = limits
        self.lock = threading.RLock()
        self.exports: dict[str, dict[str, ExportJob]] = {"leads": {}, "activities": {}}
        self.imports: dict[int, ImportJob] = {}
        self._next_batch = 1001
        self._tick = 0  # bulk requests seen (import jobs move at most one state per request)
        self._export_day_end = next_central_midnight(self.clock.now())
        self.exported_bytes_today = 0

    # ------------------------------------------------------------------ exports
    def create_export(self, kind: str, body: Any) -> ExportJob:
        if not isinstance(body, dict):
            raise BulkError("609", "Invalid JSON body")
        fmt = str(body.get("format") or "CSV").upper()
        if fmt not in DELIMITERS:
            raise BulkError("1003", f"Invalid format '{fmt}': expected CSV, TSV or SSV")
        flt = body.get("filter") or {}
        if not isinstance(flt, dict) or not flt:
            raise BulkError("1003", "A filter is required")
        if kind == "leads":
            fields = body.get("fields")
            if not isinstance(fields, list) or not fields:
                raise BulkError("1003", "'fields' is required for a lead export")
            unknown = [f for f in fields if self.store.lead_object.field(f) is None]
            if unknown:
                raise BulkError("1006", f"Field '{unknown[0]}' not found")
            names = [k for k in flt if k in ("createdAt", "updatedAt")]
            others = [k for k in flt if k not in ("createdAt", "updatedAt")]
            if others:
                raise BulkError("1035", f"Unsupported filter type for target subscription: {others[0]}")
            if len(names) != 1:
                raise BulkError("1003", "Exactly one of createdAt or updatedAt filter is required")
            _iso_range(flt, names[0])
        else:
            fields = list(body.get("fields") or ACTIVITY_COLUMNS)
            unknown = [f for f in fields if f not in (*ACTIVITY_COLUMNS, "actionResult")]
            if unknown:
                raise BulkError("1003", f"Invalid field '{unknown[0]}' for an activity export")
            _iso_range(flt, "createdAt")
            type_ids = flt.get("activityTypeIds")
            if type_ids is not None and not (
                isinstance(type_ids, list) and all(isinstance(t, int) for t in type_ids)
            ):
                raise BulkError("1003", "activityTypeIds must be a list of integers")
        headers = body.get("columnHeaderNames") or {}
        job = ExportJob(str(uuid.uuid4()), kind, list(fields), flt, fmt, dict(headers), iso(self.clock.now()))
        with self.lock:
            self.exports[kind][job.export_id] = job
        return job

    def job(self, kind: str, export_id: str) -> ExportJob:
        job = self.exports[kind].get(export_id)
        if job is None:
            raise BulkError("1003", f"Export job {export_id} not found")
        return job

    def enqueue(self, kind: str, export_id: str) -> ExportJob:
        with self.lock:
            self.advance()
            job = self.job(kind, export_id)
            if job.status != "Created":
                raise BulkError("1029", f"Export job {export_id} already queued (status {job.status})")
            lim = self.limits()
            queued = sum(
                1
                for jobs in self.exports.values()
                for j in jobs.values()
                if j.status in ("Queued", "Processing")
            )
            if lim.bulk_queued_jobs is not None and queued >= lim.bulk_queued_jobs:
                raise BulkError("1029", f"Too many jobs ({lim.bulk_queued_jobs}) in queue")
            if (
                lim.bulk_export_daily_mb is not None
                and self.exported_bytes_today >= lim.bulk_export_daily_mb * 1024 * 1024
            ):
                raise BulkError("1029", f"Export daily quota {lim.bulk_export_daily_mb:g}MB exceeded")
            job.status, job.queued_at = "Queued", iso(self.clock.now())
            self.advance()
            return job

    def cancel(self, kind: str, export_id: str) -> ExportJob:
        with self.lock:
            job = self.job(kind, export_id)
            if job.status in ("Created", "Queued", "Processing"):
                job.status = "Cancelled"
            return job

    def advance(self) -> None:
        """Move queued/processing jobs along; called on every bulk request."""
        with self.lock:
            self._tick += 1
            now_dt = self.clock.now()
            if now_dt >= self._export_day_end:
                self._export_day_end, self.exported_bytes_today = next_central_midnight(now_dt), 0
            lim = self.limits()
            wait = lim.bulk_processing_seconds
            now = now_dt.timestamp()
            all_jobs = [j for jobs in self.exports.values() for j in jobs.values()]
            for job in all_jobs:
                if job.status == "Processing" and now - job.started_ts >= wait:
                    self._complete(job)
            running = sum(1 for j in all_jobs if j.status == "Processing")
            for job in sorted((j for j in all_jobs if j.status == "Queued"), key=lambda j: j.queued_at or ""):
                if lim.bulk_concurrent_jobs is not None and running >= lim.bulk_concurrent_jobs:
                    break
                job.status, job.started_at, job.started_ts = "Processing", iso(now_dt), now
                running += 1
                if wait <= 0:
                    self._complete(job)
                    running -= 1
            self._advance_imports(now, lim)

    def _complete(self, job: ExportJob) -> None:
        rows = self._lead_rows(job) if job.kind == "leads" else self._activity_rows(job)
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=DELIMITERS[job.format], lineterminator="\n")
        writer.writerow([job.headers.get(f, f) for f in job.fields])
        count = 0
        for row in rows:
            writer.writerow([_cell(row.get(f)) for f in job.fields])
            count += 1
        job.content = buf.getvalue().encode("utf-8")
        job.number_of_records = count
        job.status, job.finished_at = "Completed", iso(self.clock.now())
        self.exported_bytes_today += len(job.content)

    def _lead_rows(self, job: ExportJob) -> list[dict[str, Any]]:
        name = "createdAt" if "createdAt" in job.filter else "updatedAt"
        start, end = _iso_range(job.filter, name)
        with self.store.lock:
            return [dict(lead) for lead in self.store._leads.values() if start <= lead.get(name, "") <= end]

    def _activity_rows(self, job: ExportJob) -> list[dict[str, Any]]:
        start, end = _iso_range(job.filter, "createdAt")
        types = set(job.filter.get("activityTypeIds") or [])
        out = []
        with self.store.lock:
            for item in self.store.activities.created_between(start, end):
                if types and item["activityTypeId"] not in types:
                    continue
                if item["activityTypeId"] == 37:
                    continue  # Delete Lead is not exportable (use Get Deleted Leads)
                row = dict(item, actionResult="succeeded")
                row["attributes"] = {a["name"]: a["value"] for a in item["attributes"]}
                out.append(row)
        return out

    def list_exports(self, kind: str, statuses: list[str]) -> list[dict[str, Any]]:
        with self.lock:
            self.advance()
            return [j.describe() for j in self.exports[kind].values() if not statuses or j.status in statuses]

    # ------------------------------------------------------------------ imports
    def create_import(
        self,
        data: bytes,
        lookup_field: str,
        object_name: str | None = None,
        fail_row: Callable[[int], dict[str, str] | None] | None = None,
    ) -> ImportJob:
        """Queue an import of a CSV file: leads by ``lookup_field``, or records of custom object ``object_name``
        by its dedupe fields."""
        if len(data) > MAX_IMPORT_BYTES:
            raise BulkError("1003", f"File size {len(data)} bytes exceeds the 10 MB limit")
        text = data.decode("utf-8-sig", errors="strict") if data else ""
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or not rows[0]:
            raise BulkError("1003", "Import file is empty or has no header row")
        header = [h.strip() for h in rows[0]]
        if object_name is None:
            if lookup_field not in header:
                raise BulkError("1003", f"Lookup field '{lookup_field}' is not a column of the file")
            if lookup_field not in self.store.searchable:
                raise BulkError("1011", f"Field '{lookup_field}' not supported as lookupField")
        else:
            obj = self.store.table(object_name).obj
            missing = [f for f in obj.dedupe_fields if f not in header]
            if missing:
                raise BulkError("1003", f"Dedupe field '{missing[0]}' is not a column of the file")
        with self.lock:
            self.advance()
            lim = self.limits()
            active = [j for j in self.imports.values() if j.status in ("Queued", "Importing")]
            if lim.bulk_import_queued is not None and len(active) >= lim.bulk_import_queued:
                raise BulkError("1016", f"Too many imports ({lim.bulk_import_queued}) queued")
            job = ImportJob(
                self._next_batch,
                header,
                rows[1:],
                lookup_field,
                object_name,
                moved_at_tick=self._tick,
                fail_row=fail_row or (lambda i: None),
            )
            self._next_batch += 1
            self.imports[job.batch_id] = job
            return job

    def import_job(self, batch_id: str) -> ImportJob:
        try:
            job = self.imports.get(int(batch_id))
        except ValueError:
            job = None
        if job is None:
            raise BulkError("1003", f"Import batch {batch_id} not found")
        return job

    def _advance_imports(self, now: float, lim: MarketoLimits) -> None:
        wait = lim.bulk_processing_seconds
        tick = self._tick
        for job in self.imports.values():
            if job.status == "Importing" and job.moved_at_tick < tick and now - job.started_ts >= wait:
                self._run_import(job)
                job.moved_at_tick = tick
        running = sum(1 for j in self.imports.values() if j.status == "Importing")
        for job in sorted(
            (j for j in self.imports.values() if j.status == "Queued"), key=lambda j: j.batch_id
        ):
            if lim.bulk_import_concurrent is not None and running >= lim.bulk_import_concurrent:
                break
            if job.moved_at_tick >= tick:
                continue  # queued by this very request
            job.status, job.started_ts, job.message, job.moved_at_tick = "Importing", now, "Importing", tick
            running += 1

    def _run_import(self, job: ImportJob) -> None:
        obj = self.store.lead_object if job.object_name is None else self.store.table(job.object_name).obj
        unknown = [h for h in job.header if obj.field(h) is None]
        if unknown:
            job.status, job.message = "Failed", f"Field '{unknown[0]}' not found in the header row"
            job.rows = []
            return
        key_fields = {job.lookup_field} if job.object_name is None else set(obj.dedupe_fields)
        readonly = {h for h in job.header if not obj.field(h).updateable and h not in key_fields}  # type: ignore
        records: list[dict[str, str] | None] = []
        warn: list[str | None] = []
        for row in job.rows:
            if len(row) != len(job.header):
                records.append(None)
                warn.append(None)
                continue
            # A blank cell leaves the field as it is: it is not sent at all.
            records.append(
                {h: v for h, v in zip(job.header, row, strict=True) if v != "" and h not in readonly}
            )
            ignored = [h for h, v in zip(job.header, row, strict=True) if v != "" and h in readonly]
            warn.append(f"Field '{ignored[0]}' is not updateable; value ignored" if ignored else None)
        sendable: list[Any] = [r if r is not None else [] for r in records]
        with self.store.lock:
            if job.object_name is None:
                action = "updateOnly" if job.lookup_field == "id" else "createOrUpdate"
                results = self.store.sync_leads(
                    sendable, action, job.lookup_field, source="import", fail=job.fail_row
                )
            else:
                results = self.store.table(job.object_name).upsert(
                    sendable, "createOrUpdate", "dedupeFields", job.fail_row
                )
        for row, record, result, warning in zip(job.rows, records, results, warn, strict=True):
            if record is None:
                job.failures.append((row, f"1003 Row has {len(row)} columns, header has {len(job.header)}"))
            elif result["status"] == "skipped":
                reason = result["reasons"][0]
                job.failures.append((row, f"{reason['code']} {reason['message']}"))
            else:
                job.processed += 1
                if warning:
                    job.warnings.append((row, warning))
        job.rows = []
        job.status = "Complete"
        what = "records" if job.object_name is None else "objects"
        if job.failures:
            job.message = (
                f"Import completed with errors, {job.processed} {what} imported, {len(job.failures)} failed"
            )
        else:
            job.message = f"Import succeeded, {job.processed} {what} imported"
