"""Lead database and activity routes: describe, query, sync, delete, merge, paging tokens, lead changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sync_pipeline.sandbox.http import Request, Response
from sync_pipeline.sandbox.marketo.activities import (
    ACTIVITY_TYPES,
    CHANGE_DATA_VALUE,
    DELETE_LEAD,
    NEW_LEAD,
    InvalidToken,
    decode_token,
)
from sync_pipeline.sandbox.marketo.store import LEAD_ACTIONS
from sync_pipeline.sandbox.marketo.validation import to_iso
from sync_pipeline.sandbox.marketo.wire import (
    MAX_BATCH,
    ApiError,
    batch_size,
    csv_list,
    decode_offset,
    encode_offset,
    input_list,
    json_body,
    ok,
    params,
    partial_failer,
)

if TYPE_CHECKING:
    from sync_pipeline.sandbox.marketo.server import MarketoSandbox

DEFAULT_FIELDS = ("id", "email", "updatedAt", "createdAt", "firstName", "lastName")
MAX_MATCHES = 1000
MAX_MERGE = 25
SCAN_WINDOW = 10_000  # activities examined per call; a page may be short with moreResult true


def register(sb: MarketoSandbox) -> None:
    app, store = sb.app, sb.store
    lead = store.lead_object

    def field_entry(f: Any) -> dict[str, Any]:
        return {
            "name": f.name,
            "displayName": f.label,
            "dataType": f.data_type,
            "length": f.length,
            "updateable": f.updateable,
            "crmManaged": f.crm_managed,
        }

    @app.route("GET", r"/rest/v1/leads/describe\.json", "marketo.leads.describe")
    def describe(req: Request) -> Response:
        return ok(
            [
                {
                    "id": store.field_ids[f.name],
                    "displayName": f.label,
                    "dataType": f.data_type,
                    **({"length": f.length} if f.length else {}),
                    "rest": {"name": f.name, "readOnly": not f.updateable},
                    "soap": {"name": f.name[:1].upper() + f.name[1:], "readOnly": not f.updateable},
                }
                for f in lead.fields
            ]
        )

    @app.route("GET", r"/rest/v1/leads/describe2\.json", "marketo.leads.describe2")
    def describe2(req: Request) -> Response:
        return ok(
            [
                {
                    "name": "API Lead",
                    "searchableFields": [[n] for n in store.searchable],
                    "fields": [field_entry(f) for f in lead.fields],
                }
            ]
        )

    def requested_fields(raw: str | None) -> list[str]:
        names = csv_list(raw) or list(DEFAULT_FIELDS)
        unknown = [n for n in names if lead.field(n) is None]
        if unknown:
            raise ApiError("1006", f"Field '{unknown[0]}' not found")
        return names if "id" in names else ["id", *names]

    def shape(row: dict[str, Any], names: list[str]) -> dict[str, Any]:
        return {n: row.get(n) for n in names}

    @app.route("GET", r"/rest/v1/leads\.json", "marketo.leads.get")
    def get_leads(req: Request) -> Response:
        p = params(req)
        filter_type = p.get("filterType") or ""
        if not filter_type:
            raise ApiError("1003", "filterType cannot be blank")
        if filter_type not in store.searchable:
            raise ApiError("1011", f"Field '{filter_type}' not supported for filterType")
        values = csv_list(p.get("filterValues"))
        if not values:
            raise ApiError("1003", "filterValues cannot be blank")
        if len(values) > MAX_BATCH:
            raise ApiError("1003", f"Too many filterValues ({len(values)}); the maximum is {MAX_BATCH}")
        names, size, offset = requested_fields(p.get("fields")), batch_size(p.get("batchSize")), 0
        offset = decode_offset(p.get("nextPageToken"))
        with store.lock:
            ids: dict[int, None] = {}
            for value in values:
                for lead_id in store.find_leads(filter_type, value):
                    ids[lead_id] = None
            if len(ids) > MAX_MATCHES:
                raise ApiError("1003", "Too many results match the filter")
            page_ids = list(ids)[offset : offset + size]
            rows = [shape(store._leads[i], names) for i in page_ids]
        extra = {"nextPageToken": encode_offset(offset + size)} if offset + size < len(ids) else {}
        return ok(rows, **extra)

    @app.route("GET", r"/rest/v1/lead/(?P<id>\d+)\.json", "marketo.leads.byid")
    def get_lead(req: Request) -> Response:
        names = requested_fields(params(req).get("fields"))
        row = store.get_lead(int(req.params["id"]))
        return ok([shape(row, names)] if row else [])

    @app.route("POST", r"/rest/v1/leads\.json", "marketo.leads.sync")
    def sync_leads(req: Request) -> Response:
        body = json_body(req)
        records = input_list(body)
        action = body.get("action") or "createOrUpdate"
        if action not in LEAD_ACTIONS:
            raise ApiError("1003", f"Invalid action '{action}'; expected one of {', '.join(LEAD_ACTIONS)}")
        lookup = body.get("lookupField") or "email"
        if lookup not in store.searchable:
            raise ApiError("1011", f"Field '{lookup}' not supported as lookupField")
        return ok(store.sync_leads(records, action, lookup, "API", partial_failer(req)))

    @app.route("POST", r"/rest/v1/leads/delete\.json", "marketo.leads.delete")
    def delete_leads(req: Request) -> Response:
        body = json_body(req)
        records = input_list(body)
        fail = partial_failer(req)
        results = []
        with store.lock:
            for i, record in enumerate(records):
                lead_id = record.get("id") if isinstance(record, dict) else None
                injected = fail(i)
                if injected:
                    results.append({"id": lead_id, "status": "skipped", "reasons": [injected]})
                elif isinstance(lead_id, int) and store.get_lead(lead_id) is not None:
                    store.delete_lead(lead_id, source="API")
                    results.append({"id": lead_id, "status": "deleted"})
                else:
                    results.append(
                        {
                            "id": lead_id,
                            "status": "skipped",
                            "reasons": [{"code": "1004", "message": "Lead not found"}],
                        }
                    )
        return ok(results)

    @app.route("POST", r"/rest/v1/leads/(?P<id>\d+)/merge\.json", "marketo.leads.merge")
    def merge(req: Request) -> Response:
        p = params(req)
        raw = csv_list(p.get("leadIds")) or csv_list(p.get("leadId"))
        if not raw:
            raise ApiError("1003", "leadId or leadIds cannot be blank")
        if len(raw) > MAX_MERGE:
            raise ApiError("1080", f"Merge of more than {MAX_MERGE} leads is not allowed")
        try:
            losers = [int(x) for x in raw]
        except ValueError:
            raise ApiError("1003", "leadIds must be integers") from None
        winner = int(req.params["id"])
        with store.lock:
            missing = [i for i in [winner, *losers] if store.get_lead(i) is None]
            if missing:
                raise ApiError("1004", f"Lead(s) not found: {', '.join(map(str, missing))}")
            if winner in losers:
                raise ApiError("1003", "A lead cannot be merged into itself")
            store.merge_leads(winner, losers, source="API")
        return ok()

    # ------------------------------------------------------------------ activities
    @app.route("GET", r"/rest/v1/activities/types\.json", "marketo.activities.types")
    def types(req: Request) -> Response:
        return ok([dict(t) for t in ACTIVITY_TYPES])

    @app.route("GET", r"/rest/v1/activities/pagingtoken\.json", "marketo.activities.pagingtoken")
    def paging_token(req: Request) -> Response:
        since = params(req).get("sinceDatetime")
        if not since:
            raise ApiError("1003", "sinceDatetime cannot be blank")
        try:
            since_iso = to_iso(since)
        except (TypeError, ValueError):
            raise ApiError("1003", f"Invalid sinceDatetime '{since}'") from None
        with store.lock:
            position = store.activities.position_since(since_iso)
            return ok(None, nextPageToken=store.activities.token(position))

    def page(req: Request, pick: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Response:
        p = params(req)
        token = p.get("nextPageToken")
        if not token:
            raise ApiError("1003", "nextPageToken cannot be blank")
        try:
            position = decode_token(token)
        except InvalidToken as exc:
            raise ApiError("1003", str(exc)) from None
        size = batch_size(p.get("batchSize"))
        lead_ids = set()
        for raw in csv_list(p.get("leadIds")):
            try:
                lead_ids.add(int(raw))
            except ValueError:
                raise ApiError("1003", f"Invalid leadId '{raw}'") from None
        if len(lead_ids) > 30:
            raise ApiError("1003", "leadIds cannot contain more than 30 ids")
        results: list[dict[str, Any]] = []
        with store.lock:
            log = store.activities
            start = position = min(position, len(log))
            for after, item in log.scan(start, SCAN_WINDOW):
                position = after
                if lead_ids and item["leadId"] not in lead_ids:
                    continue
                shaped = pick(item)
                if shaped is not None:
                    results.append(shaped)
                    if len(results) >= size:
                        break
            more = position < len(log)
            token_out = log.token(position)
        return ok(results or None, nextPageToken=token_out, moreResult=more)  # no "result" key when empty

    def base(item: dict[str, Any]) -> dict[str, Any]:
        return {k: item[k] for k in ("id", "marketoGUID", "leadId", "activityDate", "activityTypeId")}

    def general(item: dict[str, Any]) -> dict[str, Any]:
        return {
            **base(item),
            "campaignId": item["campaignId"],
            "primaryAttributeValueId": item["primaryAttributeValueId"],
            "primaryAttributeValue": item["primaryAttributeValue"],
            "attributes": item["attributes"],
        }

    @app.route("GET", r"/rest/v1/activities/leadchanges\.json", "marketo.activities.leadchanges")
    def lead_changes(req: Request) -> Response:
        wanted = csv_list(params(req).get("fields"))
        if not wanted:
            raise ApiError("1003", "fields cannot be blank")
        unknown = [n for n in wanted if lead.field(n) is None]
        if unknown:
            raise ApiError("1006", f"Field '{unknown[0]}' not found")
        wanted_set = set(wanted)

        def pick(item: dict[str, Any]) -> dict[str, Any] | None:
            kind = item["activityTypeId"]
            if kind == CHANGE_DATA_VALUE and item["fields"][0]["name"] in wanted_set:
                attrs = [a for a in item["attributes"] if a["name"] in ("Source", "Reason")]
                return {**base(item), "fields": item["fields"], "attributes": attrs}
            if kind == NEW_LEAD:
                return {**base(item), "fields": [], "attributes": item["attributes"]}
            return None

        return page(req, pick)

    @app.route("GET", r"/rest/v1/activities/deletedleads\.json", "marketo.activities.deletedleads")
    def deleted_leads(req: Request) -> Response:
        return page(req, lambda item: general(item) if item["activityTypeId"] == DELETE_LEAD else None)

    @app.route("GET", r"/rest/v1/activities\.json", "marketo.activities")
    def activities(req: Request) -> Response:
        raw = csv_list(params(req).get("activityTypeIds"))
        if not raw:
            raise ApiError("1003", "activityTypeIds cannot be blank")
        if len(raw) > 10:
            raise ApiError("1003", "activityTypeIds cannot contain more than 10 ids")
        try:
            type_ids = {int(t) for t in raw}
        except ValueError:
            raise ApiError("1003", "activityTypeIds must be integers") from None
        return page(req, lambda item: general(item) if item["activityTypeId"] in type_ids else None)
