"""What keeps the sync going: a change sensor, declarative automation, a safety-net schedule, alerts.

The change sensor is a classic sensor because it polls external systems (Dataverse delta links,
Marketo lead-change activities), which declarative automation cannot see. It asks only "is there
anything new?": one ``$batch`` holding every table's delta link plus two Marketo activity calls, so
an idle cycle costs three API calls. Plans and pushes follow their extracts through declarative
automation (``eager``); the schedule catches anything a sensor outage missed.
"""


import hashlib
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import httpx

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.defs.partitions import latest_partition_key
from sync_pipeline.defs.resources import SyncStateResource
from sync_pipeline.engine.store import state as state_mod
from sync_pipeline.engine.extract.marketo import marketo_person_fields
from sync_pipeline.engine.extract.dynamics import delta_cursor
from sync_pipeline.engine.extract.marketo import DELETED_CURSOR, LEADCHANGES_CURSOR
from sync_pipeline.resources.dynamics import DynamicsResource
from sync_pipeline.resources.marketo import MarketoResource

JOB_NAME = "sync"
ALERT_WEBHOOK_ENV = "SYNC_ALERT_WEBHOOK_URL"


def pending_changes(config: SyncConfig, tokens: dict[str, str], dynamics: Any, marketo: Any) -> dict[str, bool]:
    """Which sources have something new since the stored cursors (cheap: no rows are ingested)."""
    from sync_pipeline.clients.dynamics import BatchRequest

    found: dict[str, bool] = {}
    links = [(e, tokens[delta_cursor(e)]) for e in config.entities if delta_cursor(e) in tokens]
    if links:
        requests = [BatchRequest("GET", link, headers={"Prefer": "odata.track-changes,odata.maxpagesize=1"})
                    for _, link in links]
        for (entity, _), resp in zip(links, dynamics.execute_batch(requests, continue_on_error=True)):
            body = resp.body if isinstance(resp.body, dict) else {}
            found[f"dynamics:{entity.name}"] = resp.status != 200 or bool(body.get("value"))
    for e in config.entities:  # never read yet: needs its first run
        if e.dynamics is not None and delta_cursor(e) not in tokens:
            found[f"dynamics:{e.name}"] = True
    if config.persons:
        token = tokens.get(LEADCHANGES_CURSOR)
        if token is None:
            found["marketo:person"] = True
        else:
            # Lead changes only reports the fields asked for: watch the same fields the extract watches.
            watch = [f for f in marketo_person_fields(config) if f not in ("id", "updatedAt")]
            page = next(iter(marketo.lead_changes(token, watch, batch_size=1)))
            found["marketo:person"] = bool(page.results)
            deleted = next(iter(marketo.deleted_leads(tokens.get(DELETED_CURSOR) or token, batch_size=1)))
            found["marketo:person"] |= bool(deleted.results)
    return found


INITIAL_COPY_HOW = ("launch it with `sync-pipeline initial-copy` (or in the UI: Jobs > sync > Partitions > "
                    "Materialize..., select every partition, Launch backfill)")
WAITING_FOR_INITIAL_COPY = ("waiting for the initial copy: nothing is read into or written to Dynamics or Marketo "
                            "until you start it; " + INITIAL_COPY_HOW)
# Runs the change sensor requests jump the run queue ahead of a backfill's queued runs, so an incremental sync
# waits for at most one backfill run (https://docs.dagster.io/deployment/execution/run-coordinators:
# "dagster/priority" orders queued runs, higher first).
INCREMENTAL_PRIORITY = "10"


def initial_copy_started(tokens: dict[str, str]) -> bool:
    """The state store holds a delta link or a Marketo paging token: some sync has read the latest window.

    Only the initial copy (or a deliberate run of the latest partition) sets them; until then the sensors
    and the schedule launch nothing, so nothing is written to either system unasked."""
    return any(k == LEADCHANGES_CURSOR or k.startswith("dynamics:delta:") for k in tokens)


def read_cursors(path: str) -> dict[str, str] | None:
    """The stored cursors ({} for no store yet); None when a run holds the store (single writer)."""
    if not Path(path).exists():
        return {}
    try:
        with state_mod.connect(path, read_only=True, wait=2) as con:
            if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'cursors'"
                               ).fetchone()[0]:
                return {}
            return dict(con.execute("SELECT name, value FROM cursors").fetchall())
    except state_mod.StateLockedError:
        return None


def backfills_in_progress(instance: dg.DagsterInstance) -> list[Any]:
    from dagster._core.execution.backfill import BulkActionStatus

    return list(instance.get_backfills(status=BulkActionStatus.REQUESTED, limit=5))


def _skip(context: Any, reason: str) -> dg.SkipReason:
    """The reason is the tick's skip reason in the UI and in the tick's logs ("View logs")."""
    context.log.info(reason)
    return dg.SkipReason(reason)


def _sensor_cursor(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {}


def build_sensors(config: SyncConfig, job: Any,
                  partitions: dg.TimeWindowPartitionsDefinition) -> list[Any]:
    @dg.sensor(name="change_sensor", job=job, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Requests a sync of the latest partition when Dynamics or Marketo report changes "
                           "(after the initial copy; until then it launches nothing).")
    def change_sensor(context: dg.SensorEvaluationContext, state: SyncStateResource, dynamics: DynamicsResource,
                      marketo: MarketoResource) -> dg.SensorResult | dg.SkipReason:
        # Backfill runs do not count: they queue behind each other, and an incremental run jumps ahead of them.
        in_flight = [r for r in context.instance.get_run_records(dg.RunsFilter(
            job_name=JOB_NAME, statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTED,
                                         dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED]), limit=50)
            if "dagster/backfill" not in r.dagster_run.tags]
        if in_flight:
            return _skip(context, f"a sync run is in flight ({in_flight[0].dagster_run.run_id[:8]}); "
                                  "its extract will see the changes")
        remembered = _sensor_cursor(context.cursor)
        tokens = read_cursors(state.path)
        busy = tokens is None
        if busy:  # a run (e.g. a backfill's) holds the store: check against the cursors read last time
            tokens = remembered.get("tokens") or {}
            if not initial_copy_started(tokens):
                return _skip(context, "state store busy: a sync run is writing (the initial copy?); "
                                      "checking again next tick")
        assert tokens is not None
        if not initial_copy_started(tokens):
            running = backfills_in_progress(context.instance)
            if running:
                return _skip(context, f"initial copy in progress (backfill {running[0].backfill_id}); incremental "
                                      "syncs start once it has read the latest partition")
            return _skip(context, WAITING_FOR_INITIAL_COPY)
        found = pending_changes(config, tokens, dynamics.get_client(), marketo.get_client())
        changed = sorted(k for k, v in found.items() if v)
        if not changed:
            return dg.SensorResult(skip_reason=_skip(context, "no changes" + (
                " (state store busy: checked against the cursors read last time)" if busy else "")).skip_message,
                cursor=json.dumps({"key": remembered.get("key"), "tokens": tokens}))
        # Same stored cursors = same key: a second tick before the run advances them requests nothing new. While
        # the store is busy the remembered cursors may be stale, so no key: the in-flight check bounds the runs.
        key = hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest()[:16]
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=None if busy else f"changes-{key}",
                                        partition_key=latest_partition_key(partitions),
                                        tags={"sync/changed": ",".join(changed)[:200],
                                              "dagster/priority": INCREMENTAL_PRIORITY})],
            cursor=json.dumps({"key": key, "tokens": tokens}))

    @dg.schedule(name="safety_net", job=job, cron_schedule="0 * * * *",
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Hourly sync of the latest partition, in case the change sensor was down "
                             "(after the initial copy; until then it launches nothing).")
    def safety_net(context: dg.ScheduleEvaluationContext, state: SyncStateResource) -> dg.RunRequest | dg.SkipReason:
        tokens = read_cursors(state.path)
        if tokens is not None and not initial_copy_started(tokens):  # None: a run holds the store, so it exists
            return _skip(context, WAITING_FOR_INITIAL_COPY)
        return dg.RunRequest(partition_key=latest_partition_key(partitions),
                             tags={"dagster/priority": INCREMENTAL_PRIORITY})

    @dg.run_failure_sensor(name="alert_on_failure", default_status=dg.DefaultSensorStatus.RUNNING,
                           description=f"Posts failed sync runs to the webhook in ${ALERT_WEBHOOK_ENV}, if set.")
    def alert_on_failure(context: dg.RunFailureSensorContext) -> None:
        notify({"event": "run_failed", "run_id": context.dagster_run.run_id, "job": context.dagster_run.job_name,
                "error": context.failure_event.message})

    @dg.sensor(name="alert_on_held_records", minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Posts newly held records (with reasons) to the webhook in ${ALERT_WEBHOOK_ENV}, "
                           "each hold once.")
    def alert_on_held_records(context: dg.SensorEvaluationContext,
                              state: SyncStateResource) -> dg.SensorResult | dg.SkipReason:
        return held_records_tick(context, state.path)

    automation = dg.AutomationConditionSensorDefinition(
        "sync_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30, description="Plans and pushes follow their extracts (declarative automation).")
    return [change_sensor, safety_net, alert_on_failure, alert_on_held_records, automation]


def held_records_tick(context: Any, path: str) -> dg.SensorResult | dg.SkipReason:
    """Each hold is reported once: the cursor is the newest hold time seen plus the records held at that time."""
    cursor = _sensor_cursor(context.cursor)
    since = str(cursor.get("since") or "1970-01-01 00:00:00")
    seen = set(cursor.get("keys") or [])
    if not Path(path).exists():
        return _skip(context, "no state store yet (nothing synced, nothing held)")
    try:
        with state_mod.connect(path, read_only=True, wait=2) as con:
            rows = con.execute("""SELECT entity, dynamics_id, target, code, message, CAST(last_failed_at AS VARCHAR)
                                  FROM failures WHERE held AND last_failed_at >= CAST(? AS TIMESTAMP)
                                  ORDER BY last_failed_at, entity, dynamics_id, target LIMIT 500""",
                               [since]).fetchall()
    except state_mod.StateLockedError:
        return _skip(context, "state store busy: a sync run is writing; held records are checked next tick")
    except duckdb.CatalogException:
        return _skip(context, "no sync has run yet (nothing held)")
    new = [r for r in rows if not (r[5] == since and "|".join(r[:3]) in seen)]
    if not new:
        return _skip(context, "no newly held records")
    last = new[-1][5]
    next_cursor = json.dumps({"since": last, "keys": sorted(
        {"|".join(r[:3]) for r in new if r[5] == last} | (seen if last == since else set()))})
    by_code: dict[str, int] = {}
    for r in new:
        by_code[reason_class(r[3])] = by_code.get(reason_class(r[3]), 0) + 1
    what = f"{len(new)} newly held record(s) (" + ", ".join(f"{k}: {n}" for k, n in sorted(by_code.items())) + ")"
    if not os.environ.get(ALERT_WEBHOOK_ENV):
        return dg.SensorResult(skip_reason=_skip(
            context, f"{what}; no webhook configured (set ${ALERT_WEBHOOK_ENV} to get alerts); "
                     "see `sync-pipeline errors`").skip_message, cursor=next_cursor)
    sent = notify({"event": "records_held", "records": [
        {"entity": r[0], "dynamics_id": r[1], "target": r[2], "code": r[3], "reason": r[4]} for r in new]})
    if not sent:
        return _skip(context, f"{what}; the webhook did not accept the alert; retrying next tick")
    return dg.SensorResult(skip_reason=_skip(context, f"notified the webhook of {what}").skip_message,
                           cursor=next_cursor)


def reason_class(code: str | None) -> str:
    """A short class for a failure code: ``quarantine`` for any quarantine code, else the code itself."""
    if not code:
        return "unknown"
    return "quarantine" if code.startswith("quarantine") else code.split(":")[0]


def notify(payload: dict[str, Any]) -> bool:
    """POST an alert to the configured webhook; returns whether one was sent. Never raises."""
    url = os.environ.get(ALERT_WEBHOOK_ENV)
    if not url:
        return False
    try:
        httpx.post(url, json=payload, timeout=10).raise_for_status()
        return True
    except httpx.HTTPError:
        return False
