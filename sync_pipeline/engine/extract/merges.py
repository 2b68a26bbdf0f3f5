"""Extract: Marketo merges (Merge Leads activities) moving Dynamics links to the winning person."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import utcnow

# "Merge Leads" (activity type 32 in ``GET /rest/v1/activities/types.json``; Adobe Marketo Engage developer
# docs, REST API > Activities): logged on the winner (``leadId``), its "Merge ids" attribute lists the losers.
MERGE_LEADS_TYPE = 32
DELETE_LEAD_TYPE = 37  # "Delete Lead", what deletedleads.json returns (domain reference section 3.5)
# Which Dynamics record keeps a merged person when several were linked to its persons: a contact before a
# lead (the native sync prefers contacts: a lead's person becomes its contact's on qualification; with a
# native CRM sync on, practitioners report that a merge of a CRM lead and a CRM contact always keeps the
# contact), then the winner's own link, then the losers' links in the merge's order.
KEEPER_RANK = {"contact": 0}


@dataclass
class MarketoMerge:
    winner: int
    losers: list[int]
    date: str | None = None


def parse_merge_activity(activity: dict[str, Any]) -> MarketoMerge | None:
    """(winner, losers) from a Merge Leads activity, or None when it names no loser."""
    try:
        winner = int(activity.get("primaryAttributeValueId") or activity["leadId"])
    except (KeyError, TypeError, ValueError):
        return None
    raw = next(
        (
            a.get("value")
            for a in activity.get("attributes") or []
            if str(a.get("name", "")).lower() == "merge ids"
        ),
        None,
    )
    losers: list[int] = []
    for part in str(raw or "").replace(";", ",").split(","):
        part = part.strip()
        if part.isdigit() and int(part) != winner and int(part) not in losers:
            losers.append(int(part))
    return MarketoMerge(winner, losers, activity.get("activityDate")) if losers else None


def apply_marketo_merges(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, merges: list[MarketoMerge], run_id: str | None
) -> int:
    """Follow Marketo merges: retire each loser in the mirror (``merged_into``: not a user's delete, so no
    tombstone) and move the Dynamics links of the merged persons to the winner, one record keeping it.

    A Dynamics record is never left pointing at a removed person and never shares one with another
    record: the keeper (see KEEPER_RANK) is linked to the winner; any other record that was linked to one
    of the merged persons is retired (identity state ``merged``, pointing at the winner), so it stops
    syncing instead of writing into a person that now belongs to another record. Every change is in the
    ledger (target ``state``, op ``relink`` / ``merge`` / ``merged``, rule ``marketo_merge``). A merge read
    twice (a re-run after a crash) moves nothing the second time; the ledger notes it again.
    """
    persons = [e.name for e in config.persons]
    if not merges or not persons:
        return 0
    now = utcnow()
    moved = 0
    notes: list[tuple] = []
    for m in merges:
        ids = [str(m.winner)] + [str(i) for i in m.losers]
        ledger.retire_merged_persons(con, m.winner, m.losers, now)
        links = con.execute(
            """SELECT entity, dynamics_id, marketo_id, state FROM identity
            WHERE entity IN (SELECT unnest(?::VARCHAR[])) AND marketo_id IN (SELECT unnest(?::VARCHAR[]))""",
            [persons, ids],
        ).fetchall()
        active = [r for r in links if r[3] == "active"]
        active.sort(key=lambda r: (KEEPER_RANK.get(r[0], 1), ids.index(r[2]), r[1]))
        losers_text = ",".join(str(i) for i in m.losers)
        for n, (entity, did, mid, _state) in enumerate(active):
            if n == 0:
                if mid != str(m.winner):
                    ledger.relink(con, entity, did, str(m.winner), "marketo_merge", now)
                    _keep_opt_outs(con, config, entity, did, m.winner)
                # relink: the record moves from a loser to the winner; merge: it kept the winner, losers folded in
                notes.append(
                    (
                        entity,
                        did,
                        str(m.winner),
                        "relink" if mid != str(m.winner) else "merge",
                        "marketo_id",
                        mid if mid != str(m.winner) else losers_text,
                        str(m.winner),
                        "marketo_merge",
                    )
                )
                ledger.mark_pending(con, entity, [did])
            else:
                ledger.retire_link(con, entity, did, str(m.winner), now)
                notes.append(
                    (entity, did, str(m.winner), "merged", "marketo_id", mid, str(m.winner), "marketo_merge")
                )
            moved += 1
        # Records no longer synced (converted, tombstoned, ...) still point at a live person.
        ledger.repoint_inactive_links(con, persons, [str(i) for i in m.losers], str(m.winner))
        # The winner's values (and the Dynamics id Marketo may have copied onto it) are planned again.
        ledger.mark_persons_pending(con, [m.winner])
    ledger.note_state_changes(con, run_id, now, notes)
    return moved


# Consent fields (domain reference section 1.19): an opt-out both sides had agreed on survives a merge.
CONSENT_FIELDS = ("unsubscribed", "doNotEmail", "doNotCall", "doNotFax", "doNotSendMarketingMaterial")


def _keep_opt_outs(
    con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: str, did: str, winner: int
) -> None:
    """A record that moves to a merge winner keeps its agreed opt-outs: where its base says opted out and the
    winner says opted in, the base takes the winner's value, so the plan sees the record's opt-out as the
    change and writes it to the winner, instead of reading the winner's opt-in as a Marketo change that
    would reverse the record's opt-out in Dynamics. (Marketo keeps the winner's non-empty values; a merge is
    not the person opting in.)"""
    e = config.by_name.get(entity)
    if e is None:
        return
    fields = [f.marketo for f in e.all_fields if f.marketo in CONSENT_FIELDS and f.transform == "boolean"]
    ledger.base_takes_person_opt_ins(con, entity, did, winner, fields)
