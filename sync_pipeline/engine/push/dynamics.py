"""Push to Dynamics: write Marketo-side changes of persons back with ``If-Match`` etags in ``$batch`` calls
(a record changed meanwhile is re-read and re-planned, never overwritten blindly); creates use
deterministic GUIDs, so a re-run upserts the same row."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import duckdb

from sync_pipeline.clients import errors
from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine import mapping, normalize
from sync_pipeline.engine.ports import BatchRequest, DynamicsPort, MarketoPort
from sync_pipeline.engine.push.payloads import chunks, field_maps, planned_records
from sync_pipeline.engine.push.results import ApplyStats, Result, record_results
from sync_pipeline.engine.store import ledger
from sync_pipeline.engine.store.state import record_stats, utcnow

log = logging.getLogger(__name__)


def push_dynamics(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    dynamics: DynamicsPort,
    marketo: MarketoPort,
    run_id: str,
) -> ApplyStats:
    """The push stage for Dynamics (persons only); it finishes the record's work for this plan."""
    stats = apply_to_dynamics(con, config, entity, dynamics, marketo, run_id, utcnow())
    ledger.finish(con, config, entity)
    mapping.note_in_ledger(con, entity.name, run_id, utcnow())
    record_stats(con, run_id, entity.name, "push_dynamics", stats.as_metadata())
    return stats


def apply_to_dynamics(
    con: duckdb.DuckDBPyConnection,
    config: SyncConfig,
    entity: Entity,
    dynamics: Any,
    marketo: Any,
    run_id: str,
    now: datetime,
) -> ApplyStats:
    stats = ApplyStats("dynamics")
    total = planned_records(con, entity, "dynamics")
    stats.records = total
    if not total or entity.dynamics is None:
        return stats
    maps = field_maps(config, entity)
    entity_set = entity.dynamics.entity_set
    results: list[Result] = []
    dropped: list[tuple[str, list[tuple[str, str]]]] = []
    unlinked: list[tuple[str, str]] = []  # leads created whose person did not get their id
    try:
        writes: list[tuple[str, str, str | None, str | None, dict[str, Any]]] = []
        for rows in chunks(con, total):
            for did, op, mid, etag, _base, fields, vals in rows:
                body, bad = {}, []
                for f, v in zip(fields, vals, strict=True):
                    if f not in maps:
                        continue
                    try:
                        body[maps[f].dynamics] = normalize.to_dynamics(maps[f], v)
                    except ValueError as exc:  # this field cannot be written; the rest of the record can
                        bad.append((f, str(exc)))
                if bad:
                    dropped.append((did, bad))
                    if not body:  # nothing writable: the held field failure says why; retrying cannot help
                        continue
                writes.append((did, op, mid, etag, body))
            batch_results = _write_dynamics_batched(dynamics, entity_set, writes)
            writes.clear()
            results += batch_results
            created = [
                (r.did, r.marketo_id) for r in batch_results if r.ok and r.op == "create" and r.marketo_id
            ]
            if created:  # the new lead's id goes back to the Marketo person it came from
                res = marketo.sync_leads(
                    [{"id": int(mid), "dynamicsId": did, "dynamicsType": "Lead"} for did, mid in created],
                    action="updateOnly",
                    lookup_field="id",
                )
                for (did, mid), r in zip(created, res, strict=False):  # only logs
                    if getattr(r, "status", None) not in ("updated", "created"):
                        log.warning(
                            "lead %s created from Marketo person %s, but the person was not updated "
                            "(the next sync writes the link): %s",
                            did,
                            mid,
                            getattr(r, "reasons", None),
                        )
                        unlinked.append((did, mid))
    finally:
        ledger.hold_fields(con, entity, dropped, run_id, now)
        record_results(con, config, entity, "dynamics", results, run_id, now, stats)
        if unlinked:
            # The mirror must not claim a link Marketo does not have: the next plan of the lead then writes
            # dynamicsId/dynamicsType to the person (rule "identity"), like for any linked person.
            ids = [int(mid) for _, mid in unlinked]
            con.execute(
                """UPDATE m_person SET f_dynamicsId = NULL, f_dynamicsType = NULL
                           WHERE id IN (SELECT unnest(?::BIGINT[]))""",
                [ids],
            )
            ledger.mark_pending(con, entity.name, [did for did, _ in unlinked])
    return stats


DYNAMICS_BATCH = 100  # requests per $batch: one HTTP call, each PATCH keeps its own If-Match


def _write_dynamics_batched(
    client: DynamicsPort,
    entity_set: str,
    writes: list[tuple[str, str, str | None, str | None, dict[str, Any]]],
) -> list[Result]:
    """PATCH updates (with the row's etag) and upserts (creates by a deterministic id) in ``$batch`` calls."""
    out: list[Result] = []
    for i in range(0, len(writes), DYNAMICS_BATCH):
        part = writes[i : i + DYNAMICS_BATCH]
        requests = [
            BatchRequest(
                "PATCH",
                f"{entity_set}({did})",
                body,
                headers={} if op == "create" else {"If-Match": etag or "*"},
            )
            for did, op, _mid, etag, body in part
        ]
        try:
            responses = client.execute_batch(requests, continue_on_error=True, idempotent=True)
        except errors.ClientError as exc:  # the whole call failed after retries: every record keeps its plan
            code = str(exc.code or "error")
            out += [Result(did, op, False, mid, code, str(exc)) for did, op, mid, _etag, _body in part]
            continue
        # A $batch that stopped early answers fewer parts: the rest are reported below as not attempted.
        for (did, op, mid, _etag, _body), resp in zip(part, responses, strict=False):
            error = resp.error(f"{entity_set}({did})")
            if error is None:
                out.append(Result(did, op, True, mid))
                continue
            kind, message = errors.kind_of(error), error.message
            if kind == errors.CHANGED:
                message = f"changed in Dynamics since it was read; re-planned ({message})"
            elif kind == errors.GONE:
                message = f"deleted in Dynamics meanwhile ({message})"
            out.append(Result(did, op, False, mid, error.code, message, kind))
        if len(responses) < len(part):  # a batch that stopped early: the rest were not attempted
            out += [
                Result(did, op, False, mid, "not_attempted", f"{entity_set}({did}): batch stopped early")
                for did, op, mid, _etag, _body in part[len(responses) :]
            ]
    return out
