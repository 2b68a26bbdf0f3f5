"""Asset API read routes (``/rest/asset/v1``) and the lead-database list/campaign views (``/rest/v1``).

See :mod:`sync_pipeline.sandbox.marketo.assets` for the documented behaviour and its sources. Route names:
``marketo.assets.<kind>.{browse,byid,byname}``, ``marketo.assets.folder.tokens``,
``marketo.assets.segmentation.segments``, ``marketo.lists.{get,byid,leads,ismember}``, ``marketo.campaigns.{get,byid}``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sync_pipeline.sandbox.http import Request, Response
from sync_pipeline.sandbox.marketo.assets import DEFAULT_RETURN, MAX_RETURN, NO_ASSETS
from sync_pipeline.sandbox.marketo.validation import to_iso
from sync_pipeline.sandbox.marketo.wire import (
    ApiError,
    batch_size,
    csv_list,
    decode_offset,
    encode_offset,
    ok,
    params,
)

if TYPE_CHECKING:
    from sync_pipeline.sandbox.marketo.server import MarketoSandbox

A = r"/rest/asset/v1/"
# kind -> (browse path, single path) as Adobe names them
PATHS = {
    "program": ("programs", "program"),
    "folder": ("folders", "folder"),
    "smartCampaign": ("smartCampaigns", "smartCampaign"),
    "staticList": ("staticLists", "staticList"),
    "email": ("emails", "email"),
    "segmentation": ("segmentation", "segmentation"),
}
UPDATED_FILTER = {"program", "smartCampaign", "staticList", "email"}


def _empty() -> Response:
    """The documented empty answer of the Asset API: success, no result, one warning."""
    return ok(None, warnings=[NO_ASSETS])


def _found(rows: list[dict[str, Any]]) -> Response:
    return ok(rows, warnings=[]) if rows else _empty()


def _int(raw: str | None, name: str, default: int) -> int:
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError("1003", f"Invalid value for {name}: '{raw}'") from None


def _window(p: dict[str, str]) -> tuple[str | None, str | None]:
    def parse(name: str) -> str | None:
        raw = p.get(name)
        if not raw:
            return None
        try:
            return to_iso(raw)
        except Exception:
            raise ApiError("1003", f"Invalid value for {name}: '{raw}'") from None

    return parse("earliestUpdatedAt"), parse("latestUpdatedAt")


def _page(rows: list[dict[str, Any]], p: dict[str, str]) -> list[dict[str, Any]]:
    offset = _int(p.get("offset"), "offset", 0)
    size = _int(p.get("maxReturn"), "maxReturn", DEFAULT_RETURN)
    if size < 1 or size > MAX_RETURN:
        raise ApiError("1003", f"maxReturn must be between 1 and {MAX_RETURN}")
    if offset < 0:
        raise ApiError("1003", "offset must not be negative")
    return rows[offset : offset + size]


def register(sb: MarketoSandbox) -> None:
    app, assets = sb.app, sb.store.assets

    def browse_for(kind: str) -> Any:
        def browse(req: Request) -> Response:
            p = params(req)
            rows = assets.browse(kind)
            if kind in UPDATED_FILTER:
                start, end = _window(p)
                rows = [
                    r
                    for r in rows
                    if (start is None or r["updatedAt"] >= start) and (end is None or r["updatedAt"] <= end)
                ]
            if kind == "email" and p.get("status"):
                rows = [r for r in rows if r["status"] == p["status"]]
            if kind == "segmentation" and p.get("status"):
                rows = [r for r in rows if r["status"] == p["status"]]
            if kind == "program" and p.get("filterType"):
                values = set(csv_list(p.get("filterValues")))
                key = {"id": "id", "programId": "id", "folderId": "folder"}.get(p["filterType"])
                if key is None:
                    raise ApiError("1003", f"Invalid filterType '{p['filterType']}'")
                rows = [r for r in rows if str(r["id"] if key == "id" else r["folder"]["value"]) in values]
            if kind in ("smartCampaign", "staticList", "email") and p.get("folder"):
                try:
                    folder = json.loads(p["folder"])
                    fid = int(folder["id"])
                except (ValueError, KeyError, TypeError):
                    raise ApiError("1003", f"Invalid value for folder: '{p['folder']}'") from None
                rows = [r for r in rows if (r["folder"].get("id") or r["folder"].get("value")) == fid]
            if kind == "smartCampaign" and p.get("isActive"):
                want = p["isActive"].lower() == "true"
                rows = [r for r in rows if r["isActive"] is want]
            return _found(_page(rows, p))

        return browse

    def by_id_for(kind: str) -> Any:
        def by_id(req: Request) -> Response:
            found = assets.get(kind, int(req.params["id"]))
            return _found([found] if found else [])

        return by_id

    def by_name_for(kind: str) -> Any:
        def by_name(req: Request) -> Response:
            name = params(req).get("name")
            if not name:
                raise ApiError("701", "name cannot be blank")
            found = assets.by_name(kind, name)
            return _found([found] if found else [])

        return by_name

    for kind, (plural, single) in PATHS.items():
        route = f"marketo.assets.{kind.lower()}"
        app.route("GET", A + plural + r"\.json", f"{route}.browse")(browse_for(kind))
        if kind != "segmentation":
            app.route("GET", A + single + r"/byName\.json", f"{route}.byname")(by_name_for(kind))
            app.route("GET", A + single + r"/(?P<id>\d+)\.json", f"{route}.byid")(by_id_for(kind))

    @app.route("GET", A + r"folder/(?P<id>\d+)/tokens\.json", "marketo.assets.folder.tokens")
    def tokens(req: Request) -> Response:
        ftype = params(req).get("folderType") or "Folder"
        if ftype not in ("Folder", "Program"):
            raise ApiError("1003", f"Invalid folderType '{ftype}'")
        fid = int(req.params["id"])
        owner = assets.get("program" if ftype == "Program" else "folder", fid)
        if owner is None:
            raise ApiError("702", f"{fid} {ftype} not found")
        return ok(
            [
                {
                    "folderId": fid,
                    "folderName": owner["name"],
                    "folderType": ftype,
                    "workspaceName": "Default",
                    "tokens": [dict(t) for t in assets.tokens.get((ftype, fid), [])],
                }
            ],
            warnings=[],
        )

    @app.route("GET", A + r"segmentation/(?P<id>\d+)/segments\.json", "marketo.assets.segmentation.segments")
    def segments(req: Request) -> Response:
        rows = assets.segments.get(int(req.params["id"]), [])
        return _found(_page([dict(r) for r in rows], params(req)))

    # ----------------------------------------------------------------- lead database views (batchSize/nextPageToken)
    def paged(rows: list[dict[str, Any]], p: dict[str, str]) -> Response:
        size = batch_size(p.get("batchSize"))
        offset = decode_offset(p.get("nextPageToken"))
        page = rows[offset : offset + size]
        extra = {"nextPageToken": encode_offset(offset + size)} if offset + size < len(rows) else {}
        return ok(page, **extra)

    def list_view(r: dict[str, Any]) -> dict[str, Any]:
        program = assets.get("program", r["folder"]["id"]) if r["folder"]["type"] == "Program" else None
        return {
            "id": r["id"],
            "name": r["name"],
            "description": r["description"],
            "programName": program["name"] if program else None,
            "workspaceName": "Default",
            "createdAt": r["createdAt"],
            "updatedAt": r["updatedAt"],
        }

    @app.route("GET", r"/rest/v1/lists\.json", "marketo.lists.get")
    def lists(req: Request) -> Response:
        p = params(req)
        rows = [list_view(r) for r in assets.browse("staticList")]
        if p.get("id"):
            ids = {int(v) for v in csv_list(p["id"]) if v.isdigit()}
            rows = [r for r in rows if r["id"] in ids]
        if p.get("name"):
            names = set(csv_list(p["name"]))
            rows = [r for r in rows if r["name"] in names]
        return paged(rows, p)

    @app.route("GET", r"/rest/v1/lists/(?P<id>\d+)\.json", "marketo.lists.byid")
    def list_by_id(req: Request) -> Response:
        found = assets.get("staticList", int(req.params["id"]))
        if found is None:
            raise ApiError("1013", "Static list not found")
        return ok([list_view(found)])

    def members_of(req: Request) -> list[int]:
        members = assets.list_members(int(req.params["id"]))
        if members is None:
            raise ApiError("1013", "Static list not found")
        return members

    @app.route("GET", r"/rest/v1/lists/(?P<id>\d+)/leads\.json", "marketo.lists.leads")
    def list_leads(req: Request) -> Response:
        p = params(req)
        names = csv_list(p.get("fields")) or [
            "id",
            "email",
            "updatedAt",
            "createdAt",
            "firstName",
            "lastName",
        ]
        unknown = [n for n in names if sb.store.lead_object.field(n) is None]
        if unknown:
            raise ApiError("1006", f"Field '{unknown[0]}' not found")
        rows = []
        for lead_id in members_of(req):
            lead = sb.store.get_lead(lead_id)
            if lead is not None:
                rows.append({n: lead.get(n) for n in (names if "id" in names else ["id", *names])})
        return paged(rows, p)

    @app.route("GET", r"/rest/v1/lists/(?P<id>\d+)/leads/ismember\.json", "marketo.lists.ismember")
    def is_member(req: Request) -> Response:
        members = set(members_of(req))
        ids = csv_list(params(req).get("id"))
        if not ids:
            raise ApiError("701", "id cannot be blank")
        return ok(
            [
                {"id": int(i), "status": "memberof" if int(i) in members else "notmemberof"}
                if i.isdigit()
                else {
                    "id": i,
                    "status": "skipped",
                    "reasons": [{"code": "1004", "message": "Lead not found"}],
                }
                for i in ids
            ]
        )

    def campaign_view(r: dict[str, Any]) -> dict[str, Any]:
        program = assets.get("program", r["parentProgramId"])
        return {
            "id": r["id"],
            "name": r["name"],
            "description": r["description"],
            "type": r["type"],
            "programId": r["parentProgramId"],
            "programName": program["name"] if program else None,
            "workspaceName": "Default",
            "active": r["isActive"],
            "createdAt": r["createdAt"],
            "updatedAt": r["updatedAt"],
        }

    @app.route("GET", r"/rest/v1/campaigns\.json", "marketo.campaigns.get")
    def campaigns(req: Request) -> Response:
        p = params(req)
        rows = [campaign_view(r) for r in assets.browse("smartCampaign")]
        if p.get("id"):
            ids = {int(v) for v in csv_list(p["id"]) if v.isdigit()}
            rows = [r for r in rows if r["id"] in ids]
        if p.get("isTriggerable"):
            want = p["isTriggerable"].lower() == "true"
            rows = [r for r in rows if (r["type"] == "trigger") is want]
        return paged(rows, p)

    @app.route("GET", r"/rest/v1/campaigns/(?P<id>\d+)\.json", "marketo.campaigns.byid")
    def campaign_by_id(req: Request) -> Response:
        found = assets.get("smartCampaign", int(req.params["id"]))
        if found is None:
            raise ApiError("1013", "Campaign not found")
        return ok([campaign_view(found)])
