"""What keeps one connection's sync going: its change sensor (the one trigger path) and its alerts.

The change sensor is a classic sensor because it polls external systems (Dataverse delta links,
Marketo lead-change activities), which declarative automation cannot see. It asks only "is there
anything new?": one ``$batch`` holding every table's delta link plus two Marketo activity calls, so
an idle cycle costs three API calls. A requested run is the whole ``sync`` job (extract, plan, push), so
nothing else has to follow the extracts. The safety tick inside the same sensor requests a run when none
was requested for ``safety_tick_minutes`` (a change the probe missed); there is no separate schedule and no
automation condition, so exactly one thing decides when a connection syncs (docs/operations.md).
"""

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import duckdb
import httpx

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.connection.keys import CONNECTION_TAG, qualified
from sync_pipeline.connection.partitions import latest_partition_key
from sync_pipeline.connection.resources import bound, required_keys
from sync_pipeline.engine.extract.dynamics import delta_cursor
from sync_pipeline.engine.extract.marketo import DELETED_CURSOR, LEADCHANGES_CURSOR, marketo_person_fields
from sync_pipeline.engine.store import state as state_mod
from sync_pipeline.engine.store.state import one_row

if TYPE_CHECKING:
    from sync_pipeline.connection.component import SyncConnection

ALERT_WEBHOOK_ENV = "SYNC_ALERT_WEBHOOK_URL"


def pending_changes(
    config: SyncConfig, tokens: dict[str, str], dynamics: Any, marketo: Any
) -> dict[str, bool]:
    """Which sources have something new since the stored cursors (cheap: no rows are ingested)."""
    from sync_pipeline.clients.dynamics import BatchRequest

    found: dict[str, bool] = {}
    links = [(e, tokens[delta_cursor(e)]) for e in config.entities if delta_cursor(e) in tokens]
    if links:
        requests = [
            BatchRequest("GET", link, headers={"Prefer": "odata.track-changes,odata.maxpagesize=1"})
            for _, link in links
        ]
        # strict=False: a $batch that stopped early answers fewer parts.
        for (entity, _), resp in zip(
            links, dynamics.execute_batch(requests, continue_on_error=True), strict=False
        ):
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


INITIAL_COPY_HOW = (
    "launch it with `sync-pipeline initial-copy` (or in the UI: Jobs > <connection>__sync > "
    "Partitions > Materialize..., select every partition, Launch backfill)"
)
WAITING_FOR_INITIAL_COPY = (
    "waiting for the initial copy: nothing is read into or written to Dynamics or Marketo "
    "until you start it; " + INITIAL_COPY_HOW
)
# Runs the change sensor requests jump the run queue ahead of a backfill's queued runs, so an incremental sync
# waits for at most one backfill run (https://docs.dagster.io/deployment/execution/run-coordinators:
# "dagster/priority" orders queued runs, higher first).
INCREMENTAL_PRIORITY = "10"


def initial_copy_started(tokens: dict[str, str]) -> bool:
    """The state store holds a delta link or a Marketo paging token: some sync has read the latest window.

    Only the initial copy (or a deliberate run of the latest partition) sets them; until then the change
    sensor launches nothing, so nothing is written to either system unasked."""
    return any(k == LEADCHANGES_CURSOR or k.startswith("dynamics:delta:") for k in tokens)


def read_cursors(path: str) -> dict[str, str] | None:
    """The stored cursors ({} for no store yet); None when a run holds the store (single writer)."""
    if not Path(path).exists():
        return {}
    try:
        with state_mod.connect(path, read_only=True, wait=2) as con:
            if not one_row(
                con, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'cursors'"
            )[0]:
                return {}
            return dict(con.execute("SELECT name, value FROM cursors").fetchall())
    except state_mod.StateLockedError:
        return None


def backfills_in_progress(instance: dg.DagsterInstance, job_name: str) -> list[Any]:
    from dagster._core.execution.backfill import BulkActionStatus

    return [
        b
        for b in instance.get_backfills(status=BulkActionStatus.REQUESTED, limit=20)
        if getattr(b, "job_name", None) in (None, job_name)
    ]


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


def build_sensors(
    spec: "SyncConnection", job: Any, partitions: dg.TimeWindowPartitionsDefinition
) -> list[Any]:
    conn, config, settings = spec.connection, spec.config, spec.automation
    status = dg.DefaultSensorStatus.RUNNING if settings.running else dg.DefaultSensorStatus.STOPPED
    safety_seconds = max(60, settings.safety_tick_minutes * 60)
    webhook_env = settings.alert_webhook_env

    @dg.sensor(
        name=qualified(conn, "change_sensor"),
        job=job,
        minimum_interval_seconds=settings.check_interval_seconds,
        default_status=status,
        required_resource_keys=required_keys(conn, "state", "dynamics", "marketo"),
        description=f"`{conn}`: requests a sync of the latest partition when Dynamics or Marketo report "
        f"changes, and at least every {settings.safety_tick_minutes} min (safety tick); after "
        "the initial copy (until then it launches nothing).",
    )
    def change_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        state, dynamics, marketo = bound(context, conn)
        # Backfill runs do not count: they queue behind each other, and an incremental run jumps ahead of them.
        in_flight = [
            r
            for r in context.instance.get_run_records(
                dg.RunsFilter(
                    job_name=job.name,
                    statuses=[
                        dg.DagsterRunStatus.QUEUED,
                        dg.DagsterRunStatus.STARTED,
                        dg.DagsterRunStatus.STARTING,
                        dg.DagsterRunStatus.NOT_STARTED,
                    ],
                ),
                limit=50,
            )
            if "dagster/backfill" not in r.dagster_run.tags
        ]
        if in_flight:
            return _skip(
                context,
                f"a sync run is in flight ({in_flight[0].dagster_run.run_id[:8]}); "
                "its extract will see the changes",
            )
        remembered = _sensor_cursor(context.cursor)
        # The safety tick's clock: the newer of this job's last run (whoever launched it) and our last request.
        latest = context.instance.get_run_records(dg.RunsFilter(job_name=job.name), limit=1)
        last_request = max(
            [float(remembered.get("requested_at") or 0)] + [r.create_timestamp.timestamp() for r in latest]
        )
        tokens = read_cursors(state.path)
        busy = tokens is None
        if busy:  # a run (e.g. a backfill's) holds the store: check against the cursors read last time
            tokens = remembered.get("tokens") or {}
            if not initial_copy_started(tokens):
                return _skip(
                    context,
                    "state store busy: a sync run is writing (the initial copy?); checking again next tick",
                )
        assert tokens is not None
        if not initial_copy_started(tokens):
            running = backfills_in_progress(context.instance, job.name)
            if running:
                return _skip(
                    context,
                    f"initial copy in progress (backfill {running[0].backfill_id}); incremental "
                    "syncs start once it has read the latest partition",
                )
            return _skip(context, WAITING_FOR_INITIAL_COPY)
        found = pending_changes(config, tokens, dynamics.get_client(), marketo.get_client())
        changed = sorted(k for k, v in found.items() if v)
        now = time.time()
        safety_due = now - last_request >= safety_seconds
        if not changed and not safety_due:
            return dg.SensorResult(
                skip_reason=_skip(
                    context,
                    "no changes"
                    + (" (state store busy: checked against the cursors read last time)" if busy else ""),
                ).skip_message,
                cursor=json.dumps(
                    {"key": remembered.get("key"), "tokens": tokens, "requested_at": last_request}
                ),
            )
        # Same stored cursors = same key: a second tick before the run advances them requests nothing new. While
        # the store is busy the remembered cursors may be stale, so no key: the in-flight check bounds the runs.
        # A safety tick adds its time slot, so it is not swallowed by the key of the last change run.
        key = hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest()[:16]
        run_key = (
            None if busy else (f"changes-{key}" if changed else f"safety-{key}-{int(now // safety_seconds)}")
        )
        reason = (
            ",".join(changed)[:200]
            if changed
            else f"safety tick (no run for {settings.safety_tick_minutes} min)"
        )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key,
                    partition_key=latest_partition_key(partitions),
                    tags={
                        "sync/changed": reason,
                        CONNECTION_TAG: conn,
                        "dagster/priority": INCREMENTAL_PRIORITY,
                    },
                )
            ],
            cursor=json.dumps({"key": key, "tokens": tokens, "requested_at": now}),
        )

    @dg.run_failure_sensor(
        name=qualified(conn, "alert_on_failure"),
        default_status=status,
        monitored_jobs=[job],
        description=f"Posts failed `{conn}` sync runs to the webhook in ${webhook_env}, if set.",
    )
    def alert_on_failure(context: dg.RunFailureSensorContext) -> None:
        notify(
            {
                "event": "run_failed",
                "connection": conn,
                "run_id": context.dagster_run.run_id,
                "job": context.dagster_run.job_name,
                "error": context.failure_event.message,
            },
            webhook_env,
        )

    @dg.sensor(
        name=qualified(conn, "alert_on_held_records"),
        minimum_interval_seconds=60,
        default_status=status,
        required_resource_keys=required_keys(conn, "state"),
        description=f"Posts newly held `{conn}` records (with reasons) to the webhook in ${webhook_env}, "
        "each hold once.",
    )
    def alert_on_held_records(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        return held_records_tick(context, bound(context, conn)[0].path, webhook_env)

    return [change_sensor, alert_on_failure, alert_on_held_records]


def held_records_tick(
    context: Any, path: str, webhook_env: str = ALERT_WEBHOOK_ENV
) -> dg.SensorResult | dg.SkipReason:
    """Each hold is reported once: the cursor is the newest hold time seen plus the records held at that time."""
    cursor = _sensor_cursor(context.cursor)
    since = str(cursor.get("since") or "1970-01-01 00:00:00")
    seen = set(cursor.get("keys") or [])
    if not Path(path).exists():
        return _skip(context, "no state store yet (nothing synced, nothing held)")
    try:
        with state_mod.connect(path, read_only=True, wait=2) as con:
            rows = con.execute(
                """SELECT entity, dynamics_id, target, code, message, CAST(last_failed_at AS VARCHAR)
                                  FROM failures WHERE held AND last_failed_at >= CAST(? AS TIMESTAMP)
                                  ORDER BY last_failed_at, entity, dynamics_id, target LIMIT 500""",
                [since],
            ).fetchall()
    except state_mod.StateLockedError:
        return _skip(context, "state store busy: a sync run is writing; held records are checked next tick")
    except duckdb.CatalogException:
        return _skip(context, "no sync has run yet (nothing held)")
    new = [r for r in rows if not (r[5] == since and "|".join(r[:3]) in seen)]
    if not new:
        return _skip(context, "no newly held records")
    last = new[-1][5]
    next_cursor = json.dumps(
        {
            "since": last,
            "keys": sorted(
                {"|".join(r[:3]) for r in new if r[5] == last} | (seen if last == since else set())
            ),
        }
    )
    by_code: dict[str, int] = {}
    for r in new:
        by_code[reason_class(r[3])] = by_code.get(reason_class(r[3]), 0) + 1
    what = (
        f"{len(new)} newly held record(s) ("
        + ", ".join(f"{k}: {n}" for k, n in sorted(by_code.items()))
        + ")"
    )
    if not os.environ.get(webhook_env):
        return dg.SensorResult(
            skip_reason=_skip(
                context,
                f"{what}; no webhook configured (set ${webhook_env} to get alerts); "
                "see `sync-pipeline errors`",
            ).skip_message,
            cursor=next_cursor,
        )
    sent = notify(
        {
            "event": "records_held",
            "records": [
                {"entity": r[0], "dynamics_id": r[1], "target": r[2], "code": r[3], "reason": r[4]}
                for r in new
            ],
        },
        webhook_env,
    )
    if not sent:
        return _skip(context, f"{what}; the webhook did not accept the alert; retrying next tick")
    return dg.SensorResult(
        skip_reason=_skip(context, f"notified the webhook of {what}").skip_message, cursor=next_cursor
    )


def reason_class(code: str | None) -> str:
    """A short class for a failure code: ``quarantine`` for any quarantine code, else the code itself."""
    if not code:
        return "unknown"
    return "quarantine" if code.startswith("quarantine") else code.split(":")[0]


def notify(payload: dict[str, Any], webhook_env: str = ALERT_WEBHOOK_ENV) -> bool:
    """POST an alert to the webhook in ``$webhook_env`` (read at run time, like ``dg.EnvVar``); returns whether
    one was sent. Never raises."""
    url = os.environ.get(webhook_env)
    if not url:
        return False
    try:
        httpx.post(url, json=payload, timeout=10).raise_for_status()
        return True
    except httpx.HTTPError:
        return False
