"""Bulk routes (``/bulk/v1``): lead/activity export jobs, bulk lead import and bulk custom object import.

Import routes as Adobe documents them: ``POST /bulk/v1/leads.json`` (multipart ``file``, ``format``,
``lookupField``, ``partitionName``, ``listId``), ``GET /bulk/v1/leads/batch/{batchId}.json`` and its
``failures.json`` / ``warnings.json`` (https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/
bulk-import/bulk-lead-import); ``POST /bulk/v1/customobjects/{apiName}/import.json`` with
``.../import/{batchId}/status.json``, ``failures.json``, ``warnings.json`` (.../bulk-import/
bulk-custom-object-import). Files over 10 MB never reach a handler: the server answers HTTP 413.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from typing import TYPE_CHECKING

from sync_pipeline.sandbox.http import Request, Response
from sync_pipeline.sandbox.marketo.bulk import BulkError
from sync_pipeline.sandbox.marketo.wire import ApiError, csv_list, json_body, ok, params

if TYPE_CHECKING:
    from sync_pipeline.sandbox.marketo.server import MarketoSandbox

_EXPORT = r"/bulk/v1/(?P<kind>leads|activities)/export"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")


def multipart_file(req: Request) -> bytes:
    return multipart(req)[0]


def multipart(req: Request) -> tuple[bytes, dict[str, str]]:
    """The ``file`` part and the other form fields (``format``, ``lookupField``... may come as ``-F`` fields)."""
    ctype = req.header("content-type") or ""
    if "multipart/form-data" not in ctype.lower():
        raise ApiError("612", "Invalid Content Type: expected multipart/form-data")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + req.body
    )
    if not message.is_multipart():
        raise ApiError("613", "Invalid Multipart Request")
    content: bytes | None = None
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if name == "file":
            content = data
        elif name:
            fields[str(name)] = data.decode("utf-8", "replace")
    if content is None:
        raise ApiError("613", "Invalid Multipart Request: no 'file' part")
    return content, fields


def _ranged(content: bytes, header: str | None, ctype: str) -> Response:
    m = _RANGE.match(header.strip()) if header else None
    if not m or (not m.group(1) and not m.group(2)):
        return Response(200, content, {"Content-Type": ctype, "Accept-Ranges": "bytes"})
    size = len(content)
    if m.group(1):
        start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else size - 1
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    end = min(end, size - 1)
    if start > end:
        return Response(416, b"", {"Content-Range": f"bytes */{size}"})
    return Response(
        206, content[start : end + 1], {"Content-Type": ctype, "Content-Range": f"bytes {start}-{end}/{size}"}
    )


def row_failer(req: Request):
    """An injected ``partial`` fault on an import upload fails every other row of the file, the first one
    included (a file of one row fails it), listed in the failures file like a row Marketo rejected."""
    code = getattr(req, "partial_code", None)
    if not code:
        return lambda i: None
    return lambda i: {"code": code, "message": "Injected record failure"} if i % 2 == 0 else None


def register(sb: MarketoSandbox) -> None:
    app, bulk = sb.app, sb.bulk

    def guarded(fn):
        def run(req: Request) -> Response:
            try:
                return fn(req)
            except BulkError as exc:
                raise ApiError(exc.code, exc.message) from None

        return run

    @app.route("POST", _EXPORT + r"/create\.json", "marketo.bulk.export.create")
    @guarded
    def create(req: Request) -> Response:
        job = bulk.create_export(req.params["kind"], json_body(req))
        return ok([job.describe()])

    @app.route("POST", _EXPORT + r"/(?P<id>[^/]+)/enqueue\.json", "marketo.bulk.export.enqueue")
    @guarded
    def enqueue(req: Request) -> Response:
        return ok([bulk.enqueue(req.params["kind"], req.params["id"]).describe()])

    @app.route("GET", _EXPORT + r"/(?P<id>[^/]+)/status\.json", "marketo.bulk.export.status")
    @guarded
    def status(req: Request) -> Response:
        with bulk.lock:
            bulk.advance()
            return ok([bulk.job(req.params["kind"], req.params["id"]).describe()])

    @app.route("POST", _EXPORT + r"/(?P<id>[^/]+)/cancel\.json", "marketo.bulk.export.cancel")
    @guarded
    def cancel(req: Request) -> Response:
        return ok([bulk.cancel(req.params["kind"], req.params["id"]).describe()])

    @app.route("GET", _EXPORT + r"/(?P<id>[^/]+)/file\.json", "marketo.bulk.export.file")
    @guarded
    def file(req: Request) -> Response:
        with bulk.lock:
            bulk.advance()
            job = bulk.job(req.params["kind"], req.params["id"])
            content = job.content
        if job.status != "Completed" or content is None:
            return Response.text(
                f"Export file for job {job.export_id} is not available (status {job.status})", 404
            )
        return _ranged(content, req.header("range"), "text/csv; charset=utf-8")

    @app.route("GET", r"/bulk/v1/(?P<kind>leads|activities)/export\.json", "marketo.bulk.export.list")
    @guarded
    def list_jobs(req: Request) -> Response:
        return ok(bulk.list_exports(req.params["kind"], csv_list(params(req).get("status"))))

    def import_format(p: dict[str, str]) -> None:
        fmt = (p.get("format") or "").lower()
        if not fmt:
            raise ApiError("1003", "Required parameter 'format' is missing (csv, tsv or ssv)")
        if fmt != "csv":
            raise ApiError("1003", f"Unsupported import format '{fmt}' (this sandbox reads csv)")

    @app.route("POST", r"/bulk/v1/leads\.json", "marketo.bulk.import.create")
    @guarded
    def import_create(req: Request) -> Response:
        content, form = multipart(req)
        p = {**form, **params(req)}
        import_format(p)
        partition = p.get("partitionName")
        if partition is not None and partition != "Default":  # the sandbox has one lead partition
            raise ApiError("1003", f"Partition '{partition}' not found")
        list_id = p.get("listId")
        if list_id is not None and not list_id.isdigit():
            raise ApiError("1003", f"Invalid listId '{list_id}'")
        job = bulk.create_import(content, p.get("lookupField") or "email", fail_row=row_failer(req))
        return ok([{"batchId": job.batch_id, "importId": str(job.batch_id), "status": job.status}])

    @app.route("GET", r"/bulk/v1/leads/batch/(?P<id>\d+)\.json", "marketo.bulk.import.status")
    @guarded
    def import_status(req: Request) -> Response:
        with bulk.lock:
            bulk.advance()
            return ok([bulk.import_job(req.params["id"]).describe()])

    def report(which: str, custom: bool = False):
        @guarded
        def run(req: Request) -> Response:
            with bulk.lock:
                bulk.advance()
                job = bulk.import_job(req.params["id"])
                if custom and job.object_name != req.params["api"]:
                    raise ApiError("1003", f"Import batch {job.batch_id} not found for {req.params['api']}")
                if job.status not in ("Complete", "Failed"):
                    return Response.text(f"Import batch {job.batch_id} is still {job.status}", 404)
                return Response(200, job.report(which), {"Content-Type": "text/csv; charset=utf-8"})

        return run

    app.route("GET", r"/bulk/v1/leads/batch/(?P<id>\d+)/failures\.json", "marketo.bulk.import.failures")(
        report("failures")
    )
    app.route("GET", r"/bulk/v1/leads/batch/(?P<id>\d+)/warnings\.json", "marketo.bulk.import.warnings")(
        report("warnings")
    )

    custom = r"/bulk/v1/customobjects/(?P<api>[A-Za-z0-9_]+)/import"

    def custom_object(req: Request) -> str:
        api_name = req.params["api"]
        obj = sb.store.schema.objects.get(api_name)
        if obj is None or not obj.custom:
            raise ApiError("1003", f"Custom object type '{api_name}' not found")
        return api_name

    @app.route("POST", custom + r"\.json", "marketo.bulk.customobjects.import.create")
    @guarded
    def custom_create(req: Request) -> Response:
        api_name = custom_object(req)
        content, form = multipart(req)
        import_format({**form, **params(req)})
        job = bulk.create_import(content, "dedupeFields", object_name=api_name, fail_row=row_failer(req))
        return ok([job.describe()])

    @app.route("GET", custom + r"/(?P<id>\d+)/status\.json", "marketo.bulk.customobjects.import.status")
    @guarded
    def custom_status(req: Request) -> Response:
        api_name = custom_object(req)
        with bulk.lock:
            bulk.advance()
            job = bulk.import_job(req.params["id"])
            if job.object_name != api_name:
                raise ApiError("1003", f"Import batch {job.batch_id} not found for {api_name}")
            return ok([job.describe()])

    app.route("GET", custom + r"/(?P<id>\d+)/failures\.json", "marketo.bulk.customobjects.import.failures")(
        report("failures", custom=True)
    )
    app.route("GET", custom + r"/(?P<id>\d+)/warnings\.json", "marketo.bulk.customobjects.import.warnings")(
        report("warnings", custom=True)
    )
