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
from typing import Any

import dagster as dg
import httpx

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.defs.partitions import latest_partition_key
from sync_pipeline.defs.resources import SyncStateResource
from sync_pipeline.engine import state as state_mod
from sync_pipeline.engine.extract import marketo_person_fields
from sync_pipeline.engine.steps import DELETED_CURSOR, LEADCHANGES_CURSOR, delta_cursor
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


def build_sensors(config: SyncConfig, job: Any,
                  partitions: dg.TimeWindowPartitionsDefinition) -> list[Any]:
    @dg.sensor(name="change_sensor", job=job, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Requests a sync of the latest partition when Dynamics or Marketo report changes.")
    def change_sensor(context: dg.SensorEvaluationContext, state: SyncStateResource, dynamics: DynamicsResource,
                      marketo: MarketoResource) -> dg.SensorResult | dg.SkipReason:
        in_flight = context.instance.get_run_records(dg.RunsFilter(
            job_name=JOB_NAME, statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTED,
                                         dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED]), limit=1)
        if in_flight:
            return dg.SkipReason("a sync run is in flight; its extract will see the changes")
        try:
            with state_mod.connect(state.path, read_only=True, wait=2) as con:
                tokens = dict(con.execute("SELECT name, value FROM cursors").fetchall())
        except (state_mod.StateLockedError, Exception) as exc:  # no store yet, or a run holds it
            if "does not exist" not in str(exc) and "No such file" not in str(exc) and \
                    "Catalog Error" not in str(exc):
                return dg.SkipReason(f"state store busy: {type(exc).__name__}")
            tokens = {}
        found = pending_changes(config, tokens, dynamics.get_client(), marketo.get_client())
        changed = sorted(k for k, v in found.items() if v)
        if not changed:
            return dg.SkipReason("no changes")
        # Same stored cursors = same key: a second tick before the run advances them requests nothing new.
        key = hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest()[:16]
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"changes-{key}", partition_key=latest_partition_key(partitions),
                                        tags={"sync/changed": ",".join(changed)[:200]})],
            cursor=key)

    @dg.schedule(name="safety_net", job=job, cron_schedule="0 * * * *",
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Hourly sync of the latest partition, in case the change sensor was down.")
    def safety_net(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        return dg.RunRequest(partition_key=latest_partition_key(partitions))

    @dg.run_failure_sensor(name="alert_on_failure", default_status=dg.DefaultSensorStatus.RUNNING,
                           description=f"Posts failed sync runs to the webhook in ${ALERT_WEBHOOK_ENV}, if set.")
    def alert_on_failure(context: dg.RunFailureSensorContext) -> None:
        notify({"event": "run_failed", "run_id": context.dagster_run.run_id, "job": context.dagster_run.job_name,
                "error": context.failure_event.message})

    @dg.sensor(name="alert_on_held_records", minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Posts newly held records (with reasons) to the webhook in ${ALERT_WEBHOOK_ENV}.")
    def alert_on_held_records(context: dg.SensorEvaluationContext, state: SyncStateResource) -> dg.SkipReason:
        since = context.cursor or "1970-01-01 00:00:00"
        try:
            with state_mod.connect(state.path, read_only=True, wait=2) as con:
                rows = con.execute("""SELECT entity, dynamics_id, target, code, message, CAST(last_failed_at AS VARCHAR)
                                      FROM failures WHERE held AND last_failed_at > CAST(? AS TIMESTAMP)
                                      ORDER BY last_failed_at LIMIT 500""", [since]).fetchall()
        except Exception as exc:  # store busy or not created yet: try again next tick
            return dg.SkipReason(f"state store not readable: {type(exc).__name__}")
        if not rows:
            return dg.SkipReason("no newly held records")
        notify({"event": "records_held", "records": [
            {"entity": r[0], "dynamics_id": r[1], "target": r[2], "code": r[3], "reason": r[4]} for r in rows]})
        context.update_cursor(rows[-1][5])
        return dg.SkipReason(f"notified {len(rows)} held records")

    automation = dg.AutomationConditionSensorDefinition(
        "sync_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30, description="Plans and pushes follow their extracts (declarative automation).")
    return [change_sensor, safety_net, alert_on_failure, alert_on_held_records, automation]


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
