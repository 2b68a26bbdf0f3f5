"""One connection's assets, generated from its declared entities: extract -> plan -> push, per entity.

Keys come from ``keys.asset_key`` (``<connection>/<system>/<entity>/<stage>``). Each asset is a thin shell around
the engine's stages (``sync_pipeline.engine.extract``, ``.plan``,
``.push``). Every asset opens the connection's DuckDB state file, so all carry the
connection's pool (``keys.pool``, limit 1 in dagster.yaml): steps of that connection's concurrent runs queue
instead of failing on the file lock, while other connections run in parallel. No asset ``RetryPolicy``: transient
API errors are retried by the clients, crashed runs by the instance's run retries (docs/operations.md).
"""

import contextlib
import warnings
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import dagster as dg

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.connection.checks import push_check_results, push_check_specs
from sync_pipeline.connection.keys import PERSON, asset_key, group_name, pool
from sync_pipeline.connection.partitions import is_latest_window
from sync_pipeline.connection.resources import SyncStateResource, bound, required_keys
from sync_pipeline.engine import guard, mapping
from sync_pipeline.engine.extract import extract_dynamics, extract_marketo_persons
from sync_pipeline.engine.plan import plan_entity
from sync_pipeline.engine.push import push_dynamics, push_marketo
from sync_pipeline.engine.store import ledger
from sync_pipeline.resources.dynamics import DynamicsResource
from sync_pipeline.resources.marketo import MarketoResource

# backfill_policy is marked beta in Dagster 1.13; we rely on it knowingly (multi-run backfills).
warnings.filterwarnings("ignore", message=r".*backfill_policy.*", category=Warning)

OWNERS = ["team:data-platform"]


def mapping_version(config: SyncConfig | None, entity: Entity | None = None) -> str:
    """An asset's code version: a hash of its entity's mapping (no entity: the person extract's fields), so
    a mapping change shows the entity's assets as changed in the UI (engine/mapping.py)."""
    return mapping.code_version(config, entity)


@contextlib.contextmanager
def permanent_errors_fail_fast() -> Iterator[None]:
    """Failures name their cause first, and fail at once when Dagster's retry cannot help.

    Configuration, credentials and wrong-environment errors need a person. API errors already went through the
    client's own retries with backoff (transient ones: 429/5xx/transport) or are permanent (4xx, Marketo
    record-independent codes): a Dagster retry on top would only repeat them for minutes. The step's failure
    description starts with the system, the call, the code and the API's message.
    """
    from sync_pipeline.clients.dynamics import DynamicsError
    from sync_pipeline.clients.marketo import MarketoError
    from sync_pipeline.config.model import ConfigError

    try:
        yield
    except MarketoError as exc:  # "Marketo <call>: <code> <message>"
        raise dg.Failure(
            description=str(exc),
            allow_retries=False,
            metadata={"system": "marketo", "call": exc.endpoint, "code": exc.code},
        ) from exc
    except DynamicsError as exc:  # "HTTP <status> <code>: <message>", the call is in the message
        raise dg.Failure(
            description=f"Dynamics: {exc}",
            allow_retries=False,
            metadata={"system": "dynamics", "status": exc.status, "code": exc.code},
        ) from exc
    except (ConfigError, guard.WrongEnvironmentError) as exc:
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc


def prepare_persons(run_id: str, config: SyncConfig, client: Any, con: Any) -> None:
    from sync_pipeline.admin.validate import prepare_persons as check

    check(run_id, config, client, con)


def run_config(context: Any, state: SyncStateResource, client: Any, con: Any) -> SyncConfig:
    """The run's configuration after the preflight checks (at most one metadata call per run, none while the
    store's copy is fresh: see admin/validate.py)."""
    from sync_pipeline.admin.validate import prepare

    return prepare(context.run_id, state.config, client, con)


def _calls(client: Any) -> int:
    calls = getattr(client, "calls", None)
    return int(sum(calls.values())) if calls else 0


RUN_TOTALS = "run_totals_data"


def _meta(
    context: dg.AssetExecutionContext,
    stats: dict[str, Any],
    table_rows: int | None,
    calls: dict[str, int],
    lasting: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """True metadata for what the run materialises: an extract's partition(s), or a plan's or push's one result.

    ``dagster/row_count`` is the asset's table size (mirror rows, planned writes, linked records), so a run with
    nothing to do shows the table as it is rather than a 0 over the latest real numbers; ``lasting`` carries the
    latest real change (e.g. the last write) forward the same way. A range run (a backfill of many partitions in one
    run) materialises every extract partition in the range with the same metadata, so an extract reports its totals
    as text for the whole range, never as per-partition numbers.
    """
    md: dict[str, Any] = {}
    # Plans and pushes are unpartitioned: one materialization per run, with its own numbers, even in a range run.
    partitioned = context.assets_def.partitions_def is not None
    keys = context.partition_key_range if partitioned and context.has_partition_key_range else None
    per_run = dict(stats) | {f"api_calls/{system}": int(n) for system, n in calls.items()}
    if keys is not None and keys.start != keys.end:
        n = len(context.partition_keys)
        md["run_totals"] = dg.MetadataValue.md(
            f"Totals of run `{context.run_id}` for the {n} partitions {keys.start}...{keys.end} together "
            "(not per partition):\n\n" + "\n".join(f"- {k}: {v}" for k, v in per_run.items())
        )
        md["partition_range"] = f"{keys.start}...{keys.end}"
        md[RUN_TOTALS] = dg.MetadataValue.json(per_run)  # machine-readable, never plotted per partition
        return md
    if table_rows is not None:
        md["dagster/row_count"] = dg.MetadataValue.int(int(table_rows))
    md.update(per_run)
    md.update(lasting or {})
    return md


def _table_rows(con: Any, sql: str, params: list[Any]) -> int:
    return int(con.execute(sql, params).fetchone()[0])


def _push_state(con: Any, entity: str, system: str) -> dict[str, Any]:
    """Held/quarantined/retrying counts exactly as the state store has them, and the last real write."""
    from sync_pipeline.admin import report

    counts = report.failure_counts(con, entity, system)
    last = ledger.last_write(con, entity, system)
    md: dict[str, Any] = {
        "records_held": counts.held,
        "records_quarantined": counts.quarantined,
        "records_retrying": counts.retrying,
    }
    md.update({f"held/{k}": v for k, v in counts.classes.items()})
    if last is not None:
        md["last_write_at"], md["last_write_run"] = last
    return md


def push_order(config: SyncConfig, entity: Entity) -> list[str]:
    """Entities whose Marketo records this entity's records point at (sales persons, companies, ...)."""
    deps: list[str] = []
    for f in entity.all_fields:
        if f.transform == "owner" and "systemuser" in config.by_name and entity.name != "systemuser":
            deps.append("systemuser")
        elif f.transform == "lookup" and f.target and f.target != entity.name:
            deps.append(f.target)
        elif f.transform == "customer_account":
            deps += [n for n in ("account", "contact") if n in config.by_name]
    if entity.is_derived and entity.derived_from:
        deps += [entity.derived_from] + [n for n in ("contact",) if n in config.by_name]
    return [d for d in dict.fromkeys(deps) if d != entity.name]


def guard_environment(
    con: Any, state: SyncStateResource, dynamics: DynamicsResource, marketo: MarketoResource
) -> None:
    guard.check_environment_recent(
        con,
        dynamics_url=dynamics.url,
        client_id=dynamics.client_id,
        organization_id=dynamics.organization_id,
        marketo_instance=state.instance_id(marketo.base_url),
        ttl_seconds=state.config.sync.environment_check_seconds,
    )


# A backfill runs at most this many extract partitions per run (a job backfill: then that run's plan and push).
MAX_PARTITIONS_PER_RUN = 100


def build_assets(
    conn: str, config: SyncConfig, partitions: dg.PartitionsDefinition
) -> list[dg.AssetsDefinition]:
    """Partitions slice extraction only: extracts are partitioned by modified time (historical windows for
    backfills; the latest window follows delta links), plans and pushes are unpartitioned and work on whatever
    is pending in the state store, once per run (docs/operations.md, "How the initial copy proceeds")."""
    common: dict[str, Any] = {"owners": OWNERS, "pool": pool(conn)}
    extracts: dict[str, Any] = {
        **common,
        "partitions_def": partitions,
        "backfill_policy": dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN),
    }
    assets: list[dg.AssetsDefinition] = []
    if config.persons:
        assets.append(_person_extract(conn, config, extracts))
    for e in config.entities:
        if not e.is_derived:
            assets.append(_dynamics_extract(conn, e, extracts))
        assets.append(_plan(conn, config, e, common))
        assets.append(_marketo_push(conn, config, e, common))
        if e.is_person:
            assets.append(_dynamics_push(conn, config, e, common))
    return assets


def _dynamics_extract(conn: str, e: Entity, common: dict[str, Any]) -> dg.AssetsDefinition:
    assert e.dynamics is not None

    @dg.asset(
        key=asset_key(conn, e.name, "extract"),
        group_name=group_name(conn, e.name),
        kinds={"dynamics", "duckdb"},
        code_version=mapping_version(None, e),
        required_resource_keys=required_keys(conn, "state", "dynamics"),
        description=f"Mirror of Dynamics `{e.dynamics.entity_set}` rows modified in the partition window "
        "(the latest window follows the change-tracking delta link, which also reports deletes).",
        **common,
    )
    def extract(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        state, dynamics, _ = bound(context, conn)
        window = context.partition_time_window
        with permanent_errors_fail_fast(), state.connect() as con:
            client = dynamics.get_client()
            before = _calls(client)
            cfg = run_config(context, state, client, con)
            stats = extract_dynamics(
                con,
                cfg,
                cfg.entity(e.name),
                client,
                window.start,
                window.end,
                context.partition_key_range.start,
                is_latest_window(context, window),
            )
            rows = _table_rows(con, f"SELECT count(*) FROM d_{e.name} WHERE NOT deleted", [])
        context.log.info(
            f"{e.name}: {stats.mode}: {stats.rows} rows read, {stats.changed} changed, "
            f"{stats.deleted} deleted"
        )
        return dg.MaterializeResult(
            metadata=_meta(context, stats.as_metadata(), rows, {"dynamics": _calls(client) - before})
        )

    return extract


def _person_extract(conn: str, config: SyncConfig, common: dict[str, Any]) -> dg.AssetsDefinition:
    @dg.asset(
        key=asset_key(conn, PERSON, "extract"),
        group_name=group_name(conn, PERSON),
        kinds={"marketo", "duckdb"},
        code_version=mapping_version(config),
        required_resource_keys=required_keys(conn, "state", "marketo"),
        description="Mirror of Marketo persons: bulk extract by updatedAt for the initial copy, then "
        "lead-change, merge and deleted-lead activities since the stored paging token.",
        **common,
    )
    def extract(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        state, _, marketo = bound(context, conn)
        window = context.partition_time_window
        with permanent_errors_fail_fast(), state.connect() as con:
            client = marketo.get_client()
            before = _calls(client)
            prepare_persons(context.run_id, state.config, client, con)
            stats = extract_marketo_persons(
                con,
                state.config,
                client,
                window.start.astimezone(UTC),
                window.end.astimezone(UTC),
                is_latest_window(context, window),
                work_dir=Path(state.work_dir) if state.work_dir else None,
                run_id=context.run_id,
            )
            rows = _table_rows(con, "SELECT count(*) FROM m_person WHERE NOT deleted", [])
        return dg.MaterializeResult(
            metadata=_meta(context, stats.as_metadata(), rows, {"marketo": _calls(client) - before})
        )

    return extract


def _plan(conn: str, config: SyncConfig, e: Entity, common: dict[str, Any]) -> dg.AssetsDefinition:
    deps = [asset_key(conn, e.derived_from or e.name, "extract")]
    if e.is_person:
        deps.append(asset_key(conn, PERSON, "extract"))
    if e.name == "contact" and "lead" in config.by_name:  # qualification needs the lead's person first
        deps += [asset_key(conn, "lead", "push"), asset_key(conn, "lead", "push", "dynamics")]
    if e.is_derived:
        deps += [asset_key(conn, d, "push") for d in push_order(config, e)]

    @dg.asset(
        key=asset_key(conn, e.name, "plan"),
        group_name=group_name(conn, e.name),
        kinds={"duckdb"},
        deps=deps,
        code_version=mapping_version(config, e),
        required_resource_keys=required_keys(conn, "state"),
        description=f"What the next sync writes for `{e.name}`: a field-level three-way merge of Dynamics, "
        "Marketo and the last agreed values, with the rule behind every write.",
        **common,
    )
    def plan(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        state, _, _ = bound(context, conn)
        with permanent_errors_fail_fast(), state.connect() as con:
            summary = plan_entity(con, state.config, e, context.run_id)
        md = summary.as_metadata()
        writes = sum(v for k, v in summary.counts.items() if k.split(":")[0] in ("marketo", "dynamics"))
        return dg.MaterializeResult(metadata=_meta(context, md, writes, {}))

    return plan


def _marketo_push(conn: str, config: SyncConfig, e: Entity, common: dict[str, Any]) -> dg.AssetsDefinition:
    deps = [asset_key(conn, e.name, "plan")] + [asset_key(conn, d, "push") for d in push_order(config, e)]

    key = asset_key(conn, e.name, "push")

    @dg.asset(
        key=key,
        check_specs=push_check_specs(key, config, e, "marketo"),
        group_name=group_name(conn, e.name),
        kinds={"marketo"},
        deps=deps,
        code_version=mapping_version(config, e),
        required_resource_keys=required_keys(conn, "state", "dynamics", "marketo"),
        description=f"Writes the plan of `{e.name}` to Marketo `{e.marketo.object}` in batches of up to 300, "
        "upserting by external ids so re-runs never duplicate; failures are kept and retried.",
        **common,
    )
    def push(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        state, dynamics, marketo = bound(context, conn)
        with permanent_errors_fail_fast(), state.connect() as con:
            client = marketo.get_client()
            before = _calls(client)
            guard_environment(con, state, dynamics, marketo)
            cfg = run_config(context, state, dynamics.get_client(), con)
            stats = push_marketo(con, cfg, cfg.entity(e.name), client, context.run_id)
            lasting = _push_state(con, e.name, "marketo")
            linked = _table_rows(
                con, "SELECT count(*) FROM identity WHERE entity = ? AND state = 'active'", [e.name]
            )
            checks = push_check_results(con, config, e, "marketo")
        if stats.failed:
            context.log.warning(f"{e.name}: {stats.failed} records failed in Marketo: {stats.errors}")
        if lasting["records_held"]:
            context.log.warning(
                f"{e.name}: {lasting['records_held']} records held for Marketo "
                "(`sync-pipeline errors` lists them)"
            )
        md = stats.as_metadata()
        md.pop("records_held", None)  # from the store below, for every reason a record is held
        return dg.MaterializeResult(
            metadata=_meta(context, md, linked, {"marketo": _calls(client) - before}, lasting),
            check_results=checks,
        )

    return push


def _dynamics_push(conn: str, config: SyncConfig, e: Entity, common: dict[str, Any]) -> dg.AssetsDefinition:
    key = asset_key(conn, e.name, "push", "dynamics")

    @dg.asset(
        key=key,
        check_specs=push_check_specs(key, config, e, "dynamics"),
        group_name=group_name(conn, e.name),
        kinds={"dynamics"},
        code_version=mapping_version(config, e),
        deps=[asset_key(conn, e.name, "push")],
        required_resource_keys=required_keys(conn, "state", "dynamics", "marketo"),
        description=f"Writes Marketo-side changes of `{e.name}` persons back to Dynamics with `If-Match` etags "
        "(a record changed meanwhile is re-read and re-planned, never overwritten blindly).",
        **common,
    )
    def push(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        state, dynamics, marketo = bound(context, conn)
        with permanent_errors_fail_fast(), state.connect() as con:
            dclient, mclient = dynamics.get_client(), marketo.get_client()
            before = (_calls(dclient), _calls(mclient))
            guard_environment(con, state, dynamics, marketo)
            cfg = run_config(context, state, dclient, con)
            stats = push_dynamics(con, cfg, cfg.entity(e.name), dclient, mclient, context.run_id)
            lasting = _push_state(con, e.name, "dynamics")
            linked = _table_rows(
                con, "SELECT count(*) FROM identity WHERE entity = ? AND state = 'active'", [e.name]
            )
            checks = push_check_results(con, config, e, "dynamics")
        if lasting["records_held"]:
            context.log.warning(
                f"{e.name}: {lasting['records_held']} records held for Dynamics "
                "(`sync-pipeline errors` lists them)"
            )
        md = stats.as_metadata()
        md.pop("records_held", None)
        return dg.MaterializeResult(
            metadata=_meta(
                context,
                md,
                linked,
                {"dynamics": _calls(dclient) - before[0], "marketo": _calls(mclient) - before[1]},
                lasting,
            ),
            check_results=checks,
        )

    return push
