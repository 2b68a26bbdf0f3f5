"""Lead field management (``POST /rest/v1/leads/schema/fields.json``) and today's usage (``stats/usage.json``).

Adobe, "Field Management" (https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/field-management):
the body is ``{"input": [{"displayName", "name", "dataType", "description", "length", "isHidden",
"isHtmlEncodingInEmail", "isSensitive"}]}``; each input gets a result ``{"name", "status": "created"}`` or
``"skipped"`` with ``reasons``; the API user needs the Read-Write Schema Custom Field permission. A created
field is a custom field of the lead: ``describe``/``describe2`` list it and records can carry it at once.
Fields cannot be deleted through the API (only in Admin > Field Management).

``GET /rest/v1/stats/usage.json`` (Adobe, "REST API" page, usage statistics): today's calls, ``[{"date",
"total", "users": [{"userId", "count"}]}]``, counted by the sandbox's quota gate (the day ends at midnight
US Central, as the 607 quota does); one API user.

Simplifications: no permission model beyond the token; an input whose name or display name exists is skipped
with a reason under code ``1009`` (the page does not pin that code down); no ``GET`` of the field list.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sync_pipeline.sandbox.http import Request, Response
from sync_pipeline.sandbox.marketo.wire import ApiError, json_body, ok
from sync_pipeline.sandbox.schema import MField

if TYPE_CHECKING:
    from sync_pipeline.sandbox.marketo.server import MarketoSandbox

MAX_FIELDS = 100  # inputs per call
DATA_TYPES = {
    "string": 255,
    "text": 65535,
    "email": 255,
    "phone": 255,
    "url": 255,
    "integer": None,
    "float": None,
    "currency": None,
    "boolean": None,
    "date": None,
    "datetime": None,
    "score": None,
    "percent": None,
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,99}$")


def register(sb: MarketoSandbox) -> None:
    app, store = sb.app, sb.store

    @app.route("POST", r"/rest/v1/leads/schema/fields\.json", "marketo.leads.schema.create")
    def create_fields(req: Request) -> Response:
        body = json_body(req)
        if not isinstance(body, dict) or not isinstance(body.get("input"), list) or not body["input"]:
            raise ApiError("1003", "'input' cannot be blank")
        if len(body["input"]) > MAX_FIELDS:
            raise ApiError(
                "1003", f"Batch size {len(body['input'])} exceeds the maximum of {MAX_FIELDS} fields"
            )
        results: list[dict[str, Any]] = []
        for item in body["input"]:
            name = str(item.get("name") or "") if isinstance(item, dict) else ""
            reason = _invalid(item, store)
            if reason:
                results.append({"name": name, "status": "skipped", "reasons": [reason]})
                continue
            dtype = item["dataType"]
            length = item.get("length") if DATA_TYPES[dtype] else None
            store.add_lead_field(
                MField(
                    name,
                    dtype,
                    int(length or DATA_TYPES[dtype] or 0) or None,
                    display_name=str(item["displayName"]),
                )
            )
            results.append({"name": name, "status": "created"})
        return ok(results)

    @app.route("GET", r"/rest/v1/stats/usage\.json", "marketo.stats.usage")
    def usage(req: Request) -> Response:
        gate = sb.gate
        total = gate.daily_calls
        return ok(
            [
                {
                    "date": sb.clock.now().strftime("%Y-%m-%d"),
                    "total": total,
                    "users": [{"userId": sb.api_user, "count": total}],
                }
            ]
        )


def _invalid(item: Any, store: Any) -> dict[str, str] | None:
    if not isinstance(item, dict):
        return {"code": "1003", "message": "Invalid field definition"}
    name, display, dtype = item.get("name"), item.get("displayName"), item.get("dataType")
    if not name or not display or not dtype:
        missing = [k for k in ("name", "displayName", "dataType") if not item.get(k)]
        return {"code": "1003", "message": f"Missing required attribute: {', '.join(missing)}"}
    if not _NAME.match(str(name)):
        return {"code": "1003", "message": f"Invalid field name '{name}'"}
    if dtype not in DATA_TYPES:
        return {"code": "1003", "message": f"Invalid dataType '{dtype}'"}
    length, max_length = item.get("length"), DATA_TYPES[dtype]
    if length is not None and (
        not isinstance(length, int) or length < 1 or (max_length is not None and length > max_length)
    ):
        return {"code": "1003", "message": f"Invalid length '{length}' for dataType '{dtype}'"}
    if store.lead_object.field(str(name)) is not None or any(
        f.label.lower() == str(display).lower() for f in store.lead_object.fields
    ):
        return {"code": "1009", "message": f"Field '{name}' already exists"}
    return None
