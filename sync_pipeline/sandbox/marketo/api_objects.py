"""Companies, opportunities, opportunity roles, sales persons and custom objects: one set of conventions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sync_pipeline.sandbox.http import Request, Response
from sync_pipeline.sandbox.marketo.objects import ObjectTable
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
from sync_pipeline.sandbox.schema import MObject

if TYPE_CHECKING:
    from sync_pipeline.sandbox.marketo.server import MarketoSandbox

# URL path -> (object name, route-name prefix)
STANDARD_PATHS = {
    "companies": ("company", "marketo.companies"),
    "opportunities": ("opportunity", "marketo.opportunities"),
    "opportunities/roles": ("opportunityRole", "marketo.roles"),
    "salespersons": ("salesPerson", "marketo.salespersons"),
}
ACTIONS = ("createOnly", "updateOnly", "createOrUpdate")


def describe_object(obj: MObject) -> dict[str, Any]:
    return {
        "name": obj.name,
        "displayName": obj.display_name,
        "pluralName": obj.display_name + "s",
        "idField": obj.id_field,
        "dedupeFields": list(obj.dedupe_fields),
        "searchableFields": [list(s) for s in obj.searchable_fields],
        "relationships": [dict(r) for r in obj.relationships],
        "fields": [
            {
                "name": f.name,
                "displayName": f.label,
                "dataType": f.data_type,
                "length": f.length,
                "updateable": f.updateable,
                "crmManaged": f.crm_managed,
            }
            for f in obj.fields
        ],
    }


def _query(table: ObjectTable, req: Request, lock: Any) -> Response:
    obj = table.obj
    p = params(req)
    body: dict[str, Any] = {}
    if req.body and "json" in (req.header("content-type") or ""):
        parsed = json_body(req)
        if not isinstance(parsed, dict):
            raise ApiError("609", "Invalid JSON: expected an object")
        body = parsed
    filter_type = body.get("filterType") or p.get("filterType") or ""
    if filter_type == "idField":
        filter_type = obj.id_field
    elif filter_type == "dedupeFields":
        filter_type = ",".join(obj.dedupe_fields)
    key = tuple(filter_type.split(",")) if filter_type else ()
    if key not in obj.searchable_fields and key != obj.dedupe_fields:
        raise ApiError("1003", f"Invalid filterType '{filter_type}' for {obj.name}")
    if "input" in body:
        records = body["input"]
        if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
            raise ApiError("1003", "'input' must be a non-empty list of objects")
    else:
        values = csv_list(p.get("filterValues"))
        if not values:
            raise ApiError("1003", "filterValues cannot be blank")
        if len(key) != 1:
            raise ApiError("1003", "Compound keys must be queried with POST ?_method=GET and an input list")
        records = [{key[0]: v} for v in values]
    if len(records) > MAX_BATCH:
        raise ApiError("1003", f"Too many filter values ({len(records)}); the maximum is {MAX_BATCH}")
    raw_fields = body.get("fields") or csv_list(p.get("fields"))
    names = list(raw_fields) if raw_fields else [obj.id_field, *obj.dedupe_fields, "createdAt", "updatedAt"]
    unknown = [n for n in names if obj.field(n) is None]
    if unknown:
        raise ApiError("1006", f"Field '{unknown[0]}' not found")
    names = names if obj.id_field in names else [obj.id_field, *names]
    size = batch_size(str(body["batchSize"]) if "batchSize" in body else p.get("batchSize"))
    offset = decode_offset(body.get("nextPageToken") or p.get("nextPageToken"))
    with lock:
        keys: dict[Any, int] = {}
        for seq, record in enumerate(records):
            for k in table.find_compound(key, record):
                keys.setdefault(k, seq)
        rows = [(k, seq) for k, seq in keys.items()][offset : offset + size]
        result = [{"seq": seq, **{n: table.rows[k].get(n) for n in names}} for k, seq in rows]
    extra = {"nextPageToken": encode_offset(offset + size)} if offset + size < len(keys) else {}
    return ok(result, **extra)


def register(sb: MarketoSandbox) -> None:
    app, store = sb.app, sb.store

    def writes(table_of: Callable[[Request], ObjectTable]) -> tuple[Callable, Callable, Callable, Callable]:
        def describe(req: Request) -> Response:
            return ok([describe_object(table_of(req).obj)])

        def query(req: Request) -> Response:
            return _query(table_of(req), req, store.lock)

        def upsert(req: Request) -> Response:
            table = table_of(req)
            body = json_body(req)
            records = input_list(body)
            action = body.get("action") or "createOrUpdate"
            if action not in ACTIONS:
                raise ApiError("1003", f"Invalid action '{action}'; expected one of {', '.join(ACTIONS)}")
            dedupe_by = body.get("dedupeBy") or "dedupeFields"
            if dedupe_by not in ("dedupeFields", "idField"):
                raise ApiError("1003", f"Invalid dedupeBy '{dedupe_by}'; expected dedupeFields or idField")
            with store.lock:
                return ok(table.upsert(records, action, dedupe_by, partial_failer(req)))

        def delete(req: Request) -> Response:
            table = table_of(req)
            body = json_body(req)
            records = input_list(body)
            delete_by = body.get("deleteBy") or "dedupeFields"
            if delete_by not in ("dedupeFields", "idField"):
                raise ApiError("1003", f"Invalid deleteBy '{delete_by}'; expected dedupeFields or idField")
            guard = store.opportunity_in_use if table.obj.name == "opportunity" else (lambda key: None)
            with store.lock:
                return ok(table.delete_records(records, delete_by, guard))

        return describe, query, upsert, delete

    def register_set(path: str, prefix: str, table_of: Callable[[Request], ObjectTable]) -> None:
        describe, query, upsert, delete = writes(table_of)
        app.route("GET", rf"/rest/v1/{path}/describe\.json", f"{prefix}.describe")(describe)
        app.route("GET", rf"/rest/v1/{path}\.json", f"{prefix}.get")(query)
        app.route("POST", rf"/rest/v1/{path}\.json", f"{prefix}.sync")(upsert)
        app.route("POST", rf"/rest/v1/{path}/delete\.json", f"{prefix}.delete")(delete)

    def standard_table(name: str) -> Callable[[Request], ObjectTable]:
        return lambda req: store.tables[name]

    for path, (name, prefix) in STANDARD_PATHS.items():
        register_set(path, prefix, standard_table(name))

    @app.route("GET", r"/rest/v1/customobjects\.json", "marketo.customobjects.list")
    def list_custom(req: Request) -> Response:
        wanted = set(csv_list(params(req).get("names")))
        return ok(
            [
                {k: v for k, v in describe_object(o).items() if k != "fields"}
                for o in store.schema.custom_objects
                if not wanted or o.name in wanted
            ]
        )

    def custom_table(req: Request) -> ObjectTable:
        api_name = req.params["api"]
        obj = store.schema.objects.get(api_name)
        if obj is None or not obj.custom:
            raise ApiError("1003", f"Custom object type '{api_name}' not found")
        return store.tables[api_name]

    register_set(r"customobjects/(?P<api>[A-Za-z0-9_]+)", "marketo.customobjects", custom_table)
