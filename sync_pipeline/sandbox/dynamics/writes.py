"""Write side of the Dataverse sandbox: create, update/upsert, delete, QualifyLead and the *Multiple messages."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

from sync_pipeline.sandbox.dynamics.payload import is_guid, parse_body
from sync_pipeline.sandbox.dynamics.query import ApiContext, _columns
from sync_pipeline.sandbox.dynamics.store import DataverseFault, Row
from sync_pipeline.sandbox.dynamics.wire import (
    ODATA_HEADERS,
    RowRenderer,
    column_kinds,
    prefer,
    table_for_set,
)
from sync_pipeline.sandbox.http import Request, Response
from sync_pipeline.sandbox.schema import Table

RefResolver = Callable[[str], str | None]
_ODATA_ID = re.compile(r"(?:.*/)?(?P<set>\w+)\((?P<id>[0-9a-fA-F-]{36})\)\Z")


class WriteContext(ApiContext, Protocol):
    app_user_id: str


def entity_url(ctx: ApiContext, table: Table, record_id: str) -> str:
    return f"{ctx.api_url}/api/data/v9.2/{table.entity_set}({record_id})"


def parse_key(table: Table, key: str) -> str:
    key = key.strip()
    if key.lower().startswith(f"{table.primary_id}="):
        key = key.split("=", 1)[1]
    if not is_guid(key):
        raise DataverseFault(
            400,
            "0x80060888",
            f"The key '{key}' of entity set '{table.entity_set}' is not a "
            f"GUID; alternate keys are not defined on '{table.logical_name}'.",
        )
    return key.lower()


def _written(ctx: ApiContext, req: Request, table: Table, row: Row, created: bool) -> Response:
    headers = {**ODATA_HEADERS, "OData-EntityId": entity_url(ctx, table, row[table.primary_id])}
    if prefer(req).get("return") == "representation":
        args = {k: v[-1] for k, v in req.query.items()}
        cols = _columns(table, args.get("$select"), column_kinds(table))
        body = {
            "@odata.context": f"{ctx.api_url}/api/data/v9.2/$metadata#{table.entity_set}/$entity",
            **RowRenderer(ctx.store, table, cols).render(row),
        }
        return Response.json(body, 201 if created else 200, headers)
    return Response(204, b"", headers)


def create(ctx: WriteContext, req: Request, resolve_ref: RefResolver | None = None) -> Response:
    table = table_for_set(ctx.store, req.params["set"])
    row = parse_body(ctx.store, table, req.json(), creating=True, resolve_ref=resolve_ref)
    if row.get(table.primary_id) is not None and not is_guid(row[table.primary_id]):
        raise DataverseFault(400, "0x80048d19", f"'{table.primary_id}' must be a GUID.")
    stored = ctx.store.insert(table.logical_name, row, ctx.app_user_id)
    return _written(ctx, req, table, stored, True)


def _check_etag(table: Table, record_id: str, existing: Row | None, if_match: str | None) -> None:
    if if_match is None:
        return
    if existing is None:
        raise DataverseFault(404, "0x80040217", f"{table.logical_name} With Id = {record_id} Does Not Exist")
    if if_match.strip() != "*" and if_match.strip() != f'W/"{existing.get("versionnumber")}"':
        raise DataverseFault(
            412,
            "0x80060882",
            "The version of the existing record doesn't match the RowVersion property provided.",
        )


def update(ctx: WriteContext, req: Request, resolve_ref: RefResolver | None = None) -> Response:
    """PATCH: update, or upsert when no If-Match; If-None-Match: * forbids updating."""
    table = table_for_set(ctx.store, req.params["set"])
    record_id = parse_key(table, req.params["key"])
    body = req.json()
    with ctx.store.transaction():
        existing = ctx.store.get(table.logical_name, record_id)
        if req.header("if-none-match") == "*" and existing is not None:
            raise DataverseFault(412, "0x80040237", "A record with matching key values already exists.")
        _check_etag(table, record_id, existing, req.header("if-match"))
        row = parse_body(ctx.store, table, body, creating=existing is None, resolve_ref=resolve_ref)
        if str(row.pop(table.primary_id, record_id)).lower() != record_id:
            raise DataverseFault(
                400,
                "0x80048d19",
                f"The primary key '{table.primary_id}' in the body does not "
                f"match the key {record_id} in the URL.",
            )
        if existing is None:
            stored = ctx.store.insert(
                table.logical_name, {**row, table.primary_id: record_id}, ctx.app_user_id
            )
        else:
            stored = ctx.store.update(table.logical_name, record_id, row, ctx.app_user_id)
    return _written(ctx, req, table, stored, existing is None)


def delete(ctx: WriteContext, req: Request) -> Response:
    table = table_for_set(ctx.store, req.params["set"])
    record_id = parse_key(table, req.params["key"])
    with ctx.store.transaction():
        existing = ctx.store.get(table.logical_name, record_id)
        _check_etag(table, record_id, existing, req.header("if-match"))
        ctx.store.delete(table.logical_name, record_id)
    return Response(204, b"", dict(ODATA_HEADERS))


def qualify_lead(ctx: WriteContext, req: Request) -> Response:
    lead_id = req.params["key"].lower()
    body = req.json() or {}
    flags = {}
    for name in ("CreateAccount", "CreateContact", "CreateOpportunity"):
        value = body.get(name)
        if not isinstance(value, bool):
            raise DataverseFault(
                400,
                "0x80048d19",
                f"QualifyLead parameter '{name}' is required and must be a boolean, got {value!r}.",
            )
        flags[name] = value
    status = body.get("Status", 3)
    if not isinstance(status, int) or isinstance(status, bool):
        raise DataverseFault(
            400, "0x80048d19", f"QualifyLead parameter 'Status' must be an integer, got {status!r}."
        )
    created = ctx.store.qualify_lead(
        lead_id,
        flags["CreateAccount"],
        flags["CreateContact"],
        flags["CreateOpportunity"],
        status,
        ctx.app_user_id,
    )
    pks = {"account": "accountid", "contact": "contactid", "opportunity": "opportunityid"}
    value = [{"@odata.type": f"#Microsoft.Dynamics.CRM.{t}", pks[t]: i} for t, i in created.items()]
    return Response.json(
        {
            "@odata.context": f"{ctx.api_url}/api/data/v9.2/$metadata#Collection("
            f"Microsoft.Dynamics.CRM.crmbaseentity)",
            "value": value,
        },
        headers=ODATA_HEADERS,
    )


def _targets(table: Table, req: Request) -> list[dict[str, Any]]:
    body = req.json()
    targets = body.get("Targets") if isinstance(body, dict) else None
    if not isinstance(targets, list) or not targets:
        raise DataverseFault(400, "0x80048d19", "The request body must carry a non-empty 'Targets' array.")
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise DataverseFault(400, "0x80048d19", f"Targets[{i}] is not an object.")
        odata_type = str(target.get("@odata.type", "")).lstrip("#")
        if odata_type != f"Microsoft.Dynamics.CRM.{table.logical_name}":
            raise DataverseFault(
                400,
                "0x80048d19",
                f"Targets[{i}] has @odata.type '{odata_type}'; entity set "
                f"'{table.entity_set}' needs 'Microsoft.Dynamics.CRM."
                f"{table.logical_name}'.",
            )
    return targets


def _target_id(table: Table, target: dict[str, Any], i: int) -> str | None:
    if target.get(table.primary_id):
        return parse_key(table, str(target[table.primary_id]))
    m = _ODATA_ID.match(str(target.get("@odata.id", "")))
    if m and m.group("set") == table.entity_set:
        return m.group("id").lower()
    if "@odata.id" in target:
        raise DataverseFault(
            400,
            "0x80048d19",
            f"Targets[{i}] @odata.id '{target['@odata.id']}' is not '{table.entity_set}(<guid>)'.",
        )
    return None


def multiple(ctx: WriteContext, req: Request, message: str) -> Response:
    """CreateMultiple / UpdateMultiple / UpsertMultiple: one transaction, any row error rolls back all."""
    table = table_for_set(ctx.store, req.params["set"])
    targets = _targets(table, req)
    ids: list[str] = []
    with ctx.store.transaction():
        for i, target in enumerate(targets):
            record_id = _target_id(table, target, i)
            fields = {k: v for k, v in target.items() if k != "@odata.id"}
            try:
                exists = record_id is not None and ctx.store.get(table.logical_name, record_id) is not None
                if message == "UpdateMultiple" and not exists:
                    raise DataverseFault(
                        404, "0x80040217", f"{table.logical_name} With Id = {record_id} Does Not Exist"
                    )
                if message == "CreateMultiple" and exists:
                    raise DataverseFault(
                        412, "0x80040237", "A record with matching key values already exists."
                    )
                row = parse_body(ctx.store, table, fields, creating=not exists)
                row.pop(table.primary_id, None)
                if exists:
                    ctx.store.update(table.logical_name, record_id or "", row, ctx.app_user_id)
                else:
                    row[table.primary_id] = record_id
                    record_id = ctx.store.insert(table.logical_name, row, ctx.app_user_id)[table.primary_id]
            except DataverseFault as exc:
                raise DataverseFault(
                    exc.status,
                    exc.code,
                    f"{message} failed at Targets[{i}] "
                    f"({table.logical_name} {record_id or '(new)'}): "
                    f"{exc.message}",
                ) from None
            ids.append(str(record_id))
    if message == "CreateMultiple":
        return Response.json(
            {
                "@odata.context": f"{ctx.api_url}/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM."
                f"CreateMultipleResponse",
                "Ids": ids,
            },
            headers=ODATA_HEADERS,
        )
    return Response(204, b"", dict(ODATA_HEADERS))


def _merge_record(
    ctx: WriteContext, body: dict[str, Any], name: str
) -> tuple[Table, str | None, dict[str, Any]]:
    """A Merge parameter: an entity object with its @odata.type (required: the parameter is a crmbaseentity)."""
    value = body.get(name)
    if not isinstance(value, dict):
        raise DataverseFault(
            400, "0x80048d19", f"Merge parameter '{name}' is required and must be an entity object."
        )
    odata_type = str(value.get("@odata.type", "")).lstrip("#")
    if not odata_type.startswith("Microsoft.Dynamics.CRM."):
        raise DataverseFault(
            400,
            "0x80048d19",
            f"Merge parameter '{name}' needs an @odata.type annotation "
            f"(e.g. 'Microsoft.Dynamics.CRM.account').",
        )
    logical = odata_type.rsplit(".", 1)[1]
    table = ctx.store.schema.tables.get(logical)
    if table is None:
        raise DataverseFault(400, "0x80040203", f"This type: {logical} is not supported with merge operation")
    key = value.get(table.primary_id)
    return table, (parse_key(table, str(key)) if key is not None else None), value


def merge(ctx: WriteContext, req: Request) -> Response:
    """POST /Merge {Target, Subordinate, UpdateContent?, PerformParentingChecks}: 204 No Content."""
    body = req.json()
    if not isinstance(body, dict):
        raise DataverseFault(400, "0x80048d19", "The Merge request body must be a JSON object.")
    table, target_id, _ = _merge_record(ctx, body, "Target")
    sub_table, sub_id, _ = _merge_record(ctx, body, "Subordinate")
    if sub_table.logical_name != table.logical_name:
        raise DataverseFault(
            400,
            "0x80040203",
            f"Merge needs two records of one type, got {table.logical_name} and {sub_table.logical_name}.",
        )
    if target_id is None or sub_id is None:
        raise DataverseFault(
            400, "0x80048d19", f"Merge parameters 'Target' and 'Subordinate' must carry '{table.primary_id}'."
        )
    checks = body.get("PerformParentingChecks")
    if not isinstance(checks, bool):
        raise DataverseFault(
            400,
            "0x80048d19",
            f"Merge parameter 'PerformParentingChecks' is required and must be a boolean, got {checks!r}.",
        )
    content: Row = {}
    if body.get("UpdateContent") is not None:
        upd_table, _, raw = _merge_record(ctx, body, "UpdateContent")
        if upd_table.logical_name != table.logical_name:
            raise DataverseFault(
                400,
                "0x80040203",
                f"UpdateContent is a {upd_table.logical_name}, the merge is of {table.logical_name} records.",
            )
        content = parse_body(
            ctx.store, table, {k: v for k, v in raw.items() if k != table.primary_id}, creating=False
        )
    ctx.store.merge(table.logical_name, target_id, sub_id, content, checks, ctx.app_user_id)
    return Response(204, b"", dict(ODATA_HEADERS))
