"""Read side of the Dataverse sandbox: collection queries, paging, change tracking, single retrieves.

Paging is stateless: ``$skiptoken`` is a Dataverse-style ``<cookie pagenumber=.. pagingcookie=..>`` whose
paging cookie carries the last row's sort values (and, when tracking changes, the row version the read
started at), so a next link works against any server instance and never needs server-side state.
Delta tokens look like Dataverse's ``<version>!<MM/dd/yyyy HH:mm:ss>``.
"""

from __future__ import annotations

import base64
import json
import re
from bisect import bisect_right
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

from sync_pipeline.sandbox.clock import Clock
from sync_pipeline.sandbox.dynamics.odata import ODataError, compile_filter, parse_orderby, parse_select
from sync_pipeline.sandbox.dynamics.store import DataverseFault, DynamicsStore, Row
from sync_pipeline.sandbox.dynamics.wire import (
    ODATA_HEADERS,
    RowRenderer,
    column_kinds,
    error,
    prefer,
    table_for_set,
    wants_annotations,
)
from sync_pipeline.sandbox.http import Request, Response
from sync_pipeline.sandbox.schema import Table

MAX_PAGE = 5000
_SUPPORTED = {"$select", "$filter", "$orderby", "$top", "$count", "$skiptoken", "$deltatoken", "$expand"}
_NOT_WITH_TRACKING = ("$filter", "$orderby", "$expand", "$top")
_COOKIE = re.compile(r'pagenumber="(?P<page>\d+)"\s+pagingcookie="(?P<cookie>[^"]*)"')
DELTA_EXPIRED_CODE = "0x80044352"


class ApiContext(Protocol):
    store: DynamicsStore
    clock: Clock
    delta_retention_seconds: int

    @property
    def api_url(self) -> str: ...


def _encode_cookie(page: int, state: dict[str, Any]) -> str:
    blob = base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode().rstrip("=")
    return f'<cookie pagenumber="{page}" pagingcookie="{blob}" istracking="False" />'


def _decode_cookie(token: str) -> tuple[int, dict[str, Any]]:
    m = _COOKIE.search(token)
    try:
        if m is None:
            raise ValueError("no paging cookie")
        blob = m.group("cookie")
        state = json.loads(base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)))
        if not isinstance(state, dict):
            raise ValueError("paging cookie is not an object")
        return int(m.group("page")), state
    except (ValueError, json.JSONDecodeError) as exc:
        raise ODataError(f"The $skiptoken '{token[:80]}' is not valid: {exc}.") from None


def _link(ctx: ApiContext, entity_set: str, params: dict[str, str]) -> str:
    query = "&".join(f"{k}={quote(v, safe=',()$')}" for k, v in params.items())
    return f"{ctx.api_url}/api/data/v9.2/{entity_set}?{query}"


def delta_token(version: int, clock: Clock) -> str:
    return f"{version}!{clock.now().strftime('%m/%d/%Y %H:%M:%S')}"


def _parse_delta_token(ctx: ApiContext, token: str, table: Table) -> int:
    expired = DataverseFault(
        400,
        DELTA_EXPIRED_CODE,
        f"The change tracking token '{token}' for entity "
        f"'{table.logical_name}' is invalid or has expired. "
        f"Changes are kept for {ctx.delta_retention_seconds // 86400}"
        f" days; perform a full sync to get a new token.",
    )
    try:
        version_text, stamp = token.split("!", 1)
        version = int(version_text)
        issued = datetime.strptime(stamp, "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise expired from None
    age = (ctx.clock.now() - issued).total_seconds()
    if version > ctx.store.version or age > ctx.delta_retention_seconds or age < -300:
        raise expired
    return version


def _columns(table: Table, select: str | None, kinds: dict[str, str]) -> list[str]:
    if not select:
        return list(kinds)
    cols = parse_select(select, kinds, table.logical_name)
    return cols if table.primary_id in cols else [table.primary_id, *cols]


def _page_size(prefs: dict[str, str]) -> int | None:
    raw = prefs.get("odata.maxpagesize")
    if raw is None:
        return None
    try:
        size = int(raw)
    except ValueError:
        raise ODataError(f"The odata.maxpagesize preference '{raw}' is not an integer.") from None
    return max(1, min(size, MAX_PAGE))


def query_collection(ctx: ApiContext, req: Request) -> Response:
    store = ctx.store
    table = table_for_set(store, req.params["set"])
    args = {k: v[-1] for k, v in req.query.items()}
    unknown = [k for k in args if k.startswith("$") and k not in _SUPPORTED]
    if unknown:
        raise ODataError(f"The query parameter {unknown[0]} is not supported.")
    if "$expand" in args:
        raise ODataError(
            "$expand is not supported by the sandbox; select lookup values (_<name>_value) instead."
        )
    prefs = prefer(req)
    tracking = "odata.track-changes" in prefs or "$deltatoken" in args
    if tracking:
        for name in _NOT_WITH_TRACKING:
            if name in args:
                raise ODataError(
                    f"The query parameter {name} isn't supported when Change Tracking is enabled."
                )
        if not table.change_tracking:
            raise DataverseFault(
                400, "0x80044351", f"Change tracking is not enabled for entity '{table.logical_name}'."
            )
    kinds = column_kinds(table)
    cols = _columns(table, args.get("$select"), kinds)
    formatted, lookups = wants_annotations(prefs)
    renderer = RowRenderer(store, table, cols, formatted, lookups)
    page_size = _page_size(prefs)
    applied = ["odata.track-changes"] if tracking else []
    if page_size is not None:
        applied.append(f"odata.maxpagesize={page_size}")
    if "odata.include-annotations" in prefs:
        applied.append(f'odata.include-annotations="{prefs["odata.include-annotations"]}"')
    headers = {**ODATA_HEADERS, **({"Preference-Applied": ",".join(applied)} if applied else {})}
    context = f"{ctx.api_url}/api/data/v9.2/$metadata#{table.entity_set}({','.join(cols)})"
    base_params = {k: v for k, v in args.items() if k not in ("$skiptoken",)}
    if "$deltatoken" in args:
        return _delta(ctx, table, args, renderer, page_size or MAX_PAGE, context, headers)

    page_no, state = _decode_cookie(args["$skiptoken"]) if "$skiptoken" in args else (1, {})
    predicate = compile_filter(args["$filter"], kinds, table.logical_name) if "$filter" in args else None
    orderby = parse_orderby(args["$orderby"], kinds, table.logical_name) if "$orderby" in args else []
    view = store.view(table.logical_name, args.get("$filter", ""), predicate, orderby)
    snapshot = state.get("s", store.version)
    if page_size is None and "$top" in args:
        try:
            top = int(args["$top"])
        except ValueError:
            raise ODataError(f"The $top value '{args['$top']}' is not an integer.") from None
        rows, more = view.rows[: max(0, min(top, MAX_PAGE))], False
    else:
        rows, more = store.page(view, state.get("k"), page_size or MAX_PAGE)
    body: dict[str, Any] = {"@odata.context": context}
    if args.get("$count", "").lower() == "true":
        body["@odata.count"] = min(len(view.rows), MAX_PAGE)
        body["@Microsoft.Dynamics.CRM.totalrecordcount"] = -1
        body["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] = len(view.rows) > MAX_PAGE
    body["value"] = [renderer.render(r) for r in rows]
    if more:
        cookie = _encode_cookie(page_no + 1, {"k": list(view.raw_of(rows[-1])), "s": snapshot})
        body["@odata.nextLink"] = _link(ctx, table.entity_set, {**base_params, "$skiptoken": cookie})
    elif tracking:
        params = {k: v for k, v in base_params.items() if k == "$select"}
        body["@odata.deltaLink"] = _link(
            ctx, table.entity_set, {**params, "$deltatoken": delta_token(snapshot, ctx.clock)}
        )
    return Response.json(body, headers=headers)


def _delta(
    ctx: ApiContext,
    table: Table,
    args: dict[str, str],
    renderer: RowRenderer,
    page_size: int,
    context: str,
    headers: dict[str, str],
) -> Response:
    since = _parse_delta_token(ctx, args["$deltatoken"], table)
    page_no, state = _decode_cookie(args["$skiptoken"]) if "$skiptoken" in args else (1, {})
    snapshot = state.get("s", ctx.store.version)
    changed, deleted = ctx.store.changes_since(table.logical_name, since)
    # One ordered stream: (phase 0 = new/updated, phase 1 = deleted) by row version.
    positions = [(0, r["versionnumber"]) for r in changed] + [(1, v) for v, _ in deleted]
    start = bisect_right(positions, tuple(state["k"])) if "k" in state else 0
    end = min(start + page_size, len(positions))
    deleted_ctx = f"{ctx.api_url}/api/data/v9.2/$metadata#{table.entity_set}/$deletedEntity"
    value = []
    for i in range(start, end):
        if i < len(changed):
            value.append(renderer.render(changed[i]))
        else:
            value.append(
                {"@odata.context": deleted_ctx, "id": deleted[i - len(changed)][1], "reason": "deleted"}
            )
    body: dict[str, Any] = {"@odata.context": context, "value": value}
    select = {"$select": args["$select"]} if "$select" in args else {}
    if end < len(positions):
        cookie = _encode_cookie(page_no + 1, {"k": list(positions[end - 1]), "s": snapshot})
        body["@odata.nextLink"] = _link(
            ctx, table.entity_set, {**select, "$deltatoken": args["$deltatoken"], "$skiptoken": cookie}
        )
    else:
        body["@odata.deltaLink"] = _link(
            ctx, table.entity_set, {**select, "$deltatoken": delta_token(snapshot, ctx.clock)}
        )
    return Response.json(body, headers=headers)


def count_collection(ctx: ApiContext, req: Request) -> Response:
    """``GET <set>/$count``: a plain-text number, capped at 5,000 like Dataverse."""
    table = table_for_set(ctx.store, req.params["set"])
    return Response.text(str(min(ctx.store.count(table.logical_name), MAX_PAGE)), headers=ODATA_HEADERS)


def retrieve(ctx: ApiContext, req: Request, table: Table, record_id: str) -> Response:
    kinds = column_kinds(table)
    args = {k: v[-1] for k, v in req.query.items()}
    cols = _columns(table, args.get("$select"), kinds)
    row: Row | None = ctx.store.get(table.logical_name, record_id)
    if row is None:
        return error(404, "0x80040217", f"{table.logical_name} With Id = {record_id} Does Not Exist")
    etag = f'W/"{row.get("versionnumber", 0)}"'
    prefs = prefer(req)
    if req.header("if-none-match") == etag and "odata.include-annotations" not in prefs:
        return Response(304, b"", {**ODATA_HEADERS, "ETag": etag})
    renderer = RowRenderer(ctx.store, table, cols, *wants_annotations(prefs))
    body = {
        "@odata.context": f"{ctx.api_url}/api/data/v9.2/$metadata#{table.entity_set}({','.join(cols)})"
        f"/$entity",
        **renderer.render(row),
    }
    return Response.json(body, headers={**ODATA_HEADERS, "ETag": etag})
