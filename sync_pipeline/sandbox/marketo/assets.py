"""The read side of Marketo's Asset API, and the lead-database views of static lists and campaigns.

Served as Adobe documents them (Marketo Engage developer docs, "Assets":
https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/assets/assets, and the pages of each
type: programs, folders, tokens, smart campaigns, static lists, emails, segmentations):

- three query patterns: by id, by name, and browse. Browsing takes ``offset`` and ``maxReturn`` ("Defaults to 20
  if unset, and has a maximum of 200"); programs, smart campaigns, static lists and emails also filter on
  ``earliestUpdatedAt``/``latestUpdatedAt``.
- an empty answer is ``success: true`` with no ``result`` and the warning "No assets found for the given search
  criteria." (by id and by name as well as browse); tokens of an unknown folder answer 702.
- lead-database views (``/rest/v1/lists.json``, ``/rest/v1/lists/{id}/leads.json``, ``/rest/v1/campaigns.json``)
  page with ``batchSize`` (<= 300) and ``nextPageToken``; an unknown list is 1013.

Simplifications (docs/sandbox.md): read only (no create/update/approve/clone/delete), one workspace ("Default"),
no tags/costs on programs, no email content (HTML) endpoints, the asset set is whatever the generator seeded.
"""

from __future__ import annotations

import threading
from typing import Any

NO_ASSETS = "No assets found for the given search criteria."
MAX_RETURN = 200
DEFAULT_RETURN = 20
KINDS = ("folder", "program", "smartCampaign", "staticList", "email", "segmentation")


class AssetStore:
    """Assets by kind and id, plus static-list memberships and program tokens."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.items: dict[str, dict[int, dict[str, Any]]] = {k: {} for k in KINDS}
        self.members: dict[int, list[int]] = {}  # static list id -> lead ids (insertion order)
        self.tokens: dict[tuple[str, int], list[dict[str, Any]]] = {}  # (folder type, id) -> tokens
        self.segments: dict[int, list[dict[str, Any]]] = {}  # segmentation id -> segments

    def load(self, rows: list[dict[str, Any]], lead_ids: list[int]) -> int:
        """Generated asset rows: ``{"kind": ..., **asset}``; static lists carry ``memberIndexes`` (positions in
        the generated persons), programs ``tokens``, segmentations ``segments``."""
        with self.lock:
            for row in rows:
                row = dict(row)
                kind = row.pop("kind")
                if kind not in self.items:
                    raise ValueError(f"Marketo sandbox: unknown asset kind {kind!r}")
                if kind == "staticList":
                    self.members[row["id"]] = [
                        lead_ids[i]
                        for i in row.pop("memberIndexes", ())
                        if -len(lead_ids) <= i < len(lead_ids)
                    ]
                if "tokens" in row:
                    ftype = "Program" if kind == "program" else "Folder"
                    self.tokens[(ftype, row["id"])] = row.pop("tokens")
                if kind == "segmentation":
                    self.segments[row["id"]] = row.pop("segments", [])
                self.items[kind][row["id"]] = row
        return len(rows)

    def browse(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(v) for _, v in sorted(self.items[kind].items())]

    def get(self, kind: str, asset_id: int) -> dict[str, Any] | None:
        with self.lock:
            found = self.items[kind].get(asset_id)
            return dict(found) if found else None

    def by_name(self, kind: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            return next((dict(v) for v in self.items[kind].values() if v["name"] == name), None)

    def list_members(self, list_id: int) -> list[int] | None:
        with self.lock:
            found = self.members.get(list_id)
            return list(found) if found is not None else None


# ------------------------------------------------------------------------------------------------ seeding
def generate_assets(
    rng: Any, n_persons: int, stamps: Any, munchkin_url: str = "https://app-sandbox.marketo.com"
) -> list[dict[str, Any]]:
    """A small, plausible asset tree, deterministic for ``rng``: folders, programs (with tokens), smart
    campaigns, static lists (with members among the generated persons), emails and segmentations."""
    rows: list[dict[str, Any]] = []
    n_programs = max(3, min(40, n_persons // 2500 + 3))
    next_id = iter(range(1001, 10**9))

    def stamp() -> tuple[str, str]:
        return stamps()

    root_id = next(next_id)
    created, updated = stamp()
    rows.append(
        {
            "kind": "folder",
            "id": root_id,
            "name": "Marketing Activities",
            "description": "",
            "createdAt": created,
            "updatedAt": updated,
            "url": None,
            "folderId": {"id": root_id, "type": "Folder"},
            "folderType": "Marketing Folder",
            "parent": None,
            "path": "/Marketing Activities",
            "isArchive": False,
            "isSystem": True,
            "accessZoneId": 1,
            "workspace": "Default",
        }
    )
    channels = [
        ("Default", "Operational"),
        ("Email", "Email Send"),
        ("Event", "Webinar"),
        ("Engagement", "Nurture"),
        ("Default", "Content"),
    ]
    folders = []
    for name in ("Campaigns", "Operational", "Nurture"):
        fid = next(next_id)
        created, updated = stamp()
        folders.append((fid, name))
        rows.append(
            {
                "kind": "folder",
                "id": fid,
                "name": name,
                "description": "",
                "createdAt": created,
                "updatedAt": updated,
                "url": f"{munchkin_url}/#MF{fid}A1",
                "folderId": {"id": fid, "type": "Folder"},
                "folderType": "Marketing Folder",
                "parent": {"id": root_id, "type": "Folder"},
                "path": f"/Marketing Activities/{name}",
                "isArchive": False,
                "isSystem": False,
                "accessZoneId": 1,
                "workspace": "Default",
            }
        )
    segmentations = []
    for name, segs in (
        ("Region", ("Americas", "EMEA", "APAC")),
        ("Company Size", ("SMB", "Mid-Market", "Enterprise")),
    ):
        sid = next(next_id)
        created, updated = stamp()
        segmentations.append(sid)
        rows.append(
            {
                "kind": "segmentation",
                "id": sid,
                "name": name,
                "description": None,
                "createdAt": created,
                "updatedAt": updated,
                "url": None,
                "folder": {"type": "Folder", "value": root_id},
                "status": "approved",
                "workspace": "Default",
                "segments": [
                    {
                        "id": next(next_id),
                        "name": s,
                        "createdAt": created,
                        "updatedAt": updated,
                        "url": None,
                        "segmentationId": sid,
                        "status": "approved",
                    }
                    for s in segs
                ],
            }
        )
    for p in range(n_programs):
        pid = next(next_id)
        ptype, channel = channels[p % len(channels)]
        fid, fname = folders[p % len(folders)]
        created, updated = stamp()
        name = f"{2024 + p % 3}-{p + 1:02d} {channel} Program {p + 1}"
        folder_ref = {"type": "Program", "value": pid, "folderName": name}
        rows.append(
            {
                "kind": "program",
                "id": pid,
                "name": name,
                "description": f"Sandbox program {p + 1}",
                "createdAt": created,
                "updatedAt": updated,
                "url": f"{munchkin_url}/#PG{pid}A1",
                "type": ptype,
                "channel": channel,
                "folder": {"type": "Folder", "value": fid, "folderName": fname},
                "status": "on" if ptype == "Engagement" else "",
                "workspace": "Default",
                "headStart": False,
                "tags": [],
                "costs": [],
                "tokens": [
                    {"name": "my.Event Date", "type": "date", "value": created[:10], "computedUrl": None},
                    {
                        "name": "my.Subject Line",
                        "type": "text",
                        "value": f"News {p + 1}",
                        "computedUrl": None,
                    },
                    {"name": "my.Score", "type": "score", "value": str(5 + p % 10), "computedUrl": None},
                ],
            }
        )
        for c, ctype in enumerate(("batch", "trigger")):
            cid = next(next_id)
            created, updated = stamp()
            active = ctype == "trigger" and rng.random() < 0.7
            rows.append(
                {
                    "kind": "smartCampaign",
                    "id": cid,
                    "name": f"{ctype.title()} {c + 1}",
                    "description": "",
                    "type": ctype,
                    "isSystem": False,
                    "isActive": active,
                    "isRequestable": ctype == "trigger",
                    "isCommunicationLimitEnabled": False,
                    "recurrence": {"weekdayOnly": False},
                    "qualificationRuleType": "once",
                    "status": "Active" if active else "Inactive",
                    "createdAt": created,
                    "updatedAt": updated,
                    "folder": {"type": "Program", "id": pid},
                    "computedUrl": f"{munchkin_url}/#SC{cid}A1",
                    "workspace": "Default",
                    "smartListId": cid + 500000,
                    "flowId": cid + 600000,
                    "parentProgramId": pid,
                }
            )
        lid = next(next_id)
        created, updated = stamp()
        size = min(n_persons, int(rng.random() * 40) + 5)
        start = int(rng.random() * max(1, n_persons - size))
        rows.append(
            {
                "kind": "staticList",
                "id": lid,
                "name": f"{name} - Members",
                "description": None,
                "createdAt": created,
                "updatedAt": updated,
                "folder": {"id": pid, "type": "Program"},
                "computedUrl": f"{munchkin_url}/#ST{lid}A1",
                "workspace": "Default",
                "memberIndexes": list(range(start, start + size)),
            }
        )
        for e in range(2):
            eid = next(next_id)
            created, updated = stamp()
            rows.append(
                {
                    "kind": "email",
                    "id": eid,
                    "name": f"Email {e + 1}",
                    "description": "",
                    "createdAt": created,
                    "updatedAt": updated,
                    "url": f"{munchkin_url}/#EM{eid}A1",
                    "subject": {"type": "Text", "value": f"{{{{my.Subject Line}}}} ({e + 1})"},
                    "fromName": {"type": "Text", "value": "Sandbox Marketing"},
                    "fromEmail": {"type": "Text", "value": "marketing@sandbox.example"},
                    "replyEmail": {"type": "Text", "value": "marketing@sandbox.example"},
                    "folder": folder_ref,
                    "operational": ptype == "Default" and e == 1,
                    "textOnly": False,
                    "publishToMSI": False,
                    "webView": False,
                    "status": "approved" if e == 0 else "draft",
                    "template": 1,
                    "workspace": "Default",
                    "version": 2,
                    "autoCopyToText": True,
                    "preHeader": None,
                }
            )
    return rows
