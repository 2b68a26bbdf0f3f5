"""Assets, generated from the declared entities: extract -> plan -> push, per entity.

Keys are path segments: ``dynamics/raw/<entity>`` and ``marketo/raw/person`` (extract),
``sync/plan/<entity>`` (three-way merge), ``marketo/push/<entity>`` and, for leads and contacts,
``dynamics/push/<entity>`` (load). Each asset is a thin shell around ``sync_pipeline.engine.steps``.
Every asset opens the DuckDB state file, so all carry ``pool="duckdb"`` (limit 1 in dagster.yaml):
steps of concurrent runs queue instead of failing on the file lock, and Marketo is never called by
two runs at once.
"""


import contextlib
import time
import warnings
from datetime import timezone
from pathlib import Path
from typing import Any, Iterator

import dagster as dg

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.defs.partitions import is_latest_window
from sync_pipeline.defs.resources import SyncStateResource
from sync_pipeline.engine import guard, steps
from sync_pipeline.resources.dynamics import DynamicsResource
from sync_pipeline.resources.marketo import MarketoResource

# backfill_policy is marked beta in Dagster 1.13; we rely on it knowingly (multi-run backfills).
warnings.filterwarnings("ignore", message=r".*backfill_policy.*", category=Warning)

POOL = "duckdb"
OWNERS = ["team:data-platform"]
RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


def raw_key(entity: str) -> dg.AssetKey:
    return dg.AssetKey(["dynamics", "raw", entity])


PERSON_RAW = dg.AssetKey(["marketo", "raw", "person"])


def plan_key(entity: str) -> dg.AssetKey:
    return dg.AssetKey(["sync", "plan", entity])


def push_key(entity: str, system: str = "marketo") -> dg.AssetKey:
    return dg.AssetKey([system, "push", entity])


@contextlib.contextmanager
def permanent_errors_fail_fast() -> Iterator[None]:
    """Errors no retry can fix (configuration, credentials, wrong environment) fail the step at once,
    skipping the retry policy, so the operator sees them in seconds instead of after the backoff."""
    from sync_pipeline.clients.dynamics import AuthenticationError
    from sync_pipeline.clients.marketo import MarketoAuthError
    from sync_pipeline.config.model import ConfigError

    from sync_pipeline.clients.dynamics import DynamicsError

    try:
        yield
    except (ConfigError, AuthenticationError, MarketoAuthError, guard.WrongEnvironmentError) as exc:
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc
    except DynamicsError as exc:
        if exc.status != 400:  # a malformed query (e.g. a column the table lacks) fails the same way every time
            raise
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc


def prepare_persons(run_id: str, config: SyncConfig, client: Any) -> None:
    from sync_pipeline.ops.validate import prepare_persons as check

    check(run_id, config, client)


def run_config(context: Any, state: SyncStateResource, client: Any) -> SyncConfig:
    """The run's configuration after the preflight checks (one metadata call per run, see ops/validate.py)."""
    from sync_pipeline.ops.validate import prepare

    return prepare(context.run_id, state.config, client)


def _calls(client: Any) -> int:
    calls = getattr(client, "calls", None)
    return int(sum(calls.values())) if calls else 0


def _meta(stats: dict[str, Any], rows: int, calls: dict[str, int]) -> dict[str, Any]:
    md: dict[str, Any] = {"dagster/row_count": dg.MetadataValue.int(int(rows))}
    for k, v in stats.items():
        md[k] = v
    for system, n in calls.items():
        md[f"api_calls/{system}"] = dg.MetadataValue.int(int(n))
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


_ORG_IDS: dict[str, tuple[float, str]] = {}  # org URL -> (when read, OrganizationId); one WhoAmI per run, not per step


def guard_environment(con: Any, state: SyncStateResource, dynamics: DynamicsResource, marketo: MarketoResource) -> None:
    cached = _ORG_IDS.get(dynamics.url)
    if cached is None or time.monotonic() - cached[0] > 600:
        cached = (time.monotonic(), str(dynamics.get_client().whoami()["OrganizationId"]))
        _ORG_IDS[dynamics.url] = cached
    org = cached[1]
    guard.check_environment(con, dynamics_org=str(org), marketo_instance=state.instance_id(marketo.base_url))


def build_assets(config: SyncConfig, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    common: dict[str, Any] = dict(partitions_def=partitions, owners=OWNERS, pool=POOL,
                                  backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=100))
    assets: list[dg.AssetsDefinition] = []
    if config.persons:
        assets.append(_person_extract(config, common))
    for e in config.entities:
        if not e.is_derived:
            assets.append(_dynamics_extract(e, common))
        assets.append(_plan(config, e, common))
        assets.append(_marketo_push(config, e, common))
        if e.is_person:
            assets.append(_dynamics_push(config, e, common))
    return assets


def _dynamics_extract(e: Entity, common: dict[str, Any]) -> dg.AssetsDefinition:
    assert e.dynamics is not None

    @dg.asset(key=raw_key(e.name), group_name=e.name, kinds={"dynamics", "duckdb"}, retry_policy=RETRY,
              description=f"Mirror of Dynamics `{e.dynamics.entity_set}` rows modified in the partition window "
                          "(the latest window follows the change-tracking delta link, which also reports deletes).",
              **common)
    def extract(context: dg.AssetExecutionContext, state: SyncStateResource,
                dynamics: DynamicsResource) -> dg.MaterializeResult:
        window = context.partition_time_window
        with permanent_errors_fail_fast(), state.connect() as con:
            client = dynamics.get_client()
            before = _calls(client)
            cfg = run_config(context, state, client)
            stats = steps.extract_dynamics(con, cfg, cfg.entity(e.name), client, window.start, window.end,
                                           context.partition_key_range.start, is_latest_window(context, window))
        context.log.info(f"{e.name}: {stats.mode}: {stats.rows} rows read, {stats.changed} changed, "
                         f"{stats.deleted} deleted")
        return dg.MaterializeResult(metadata=_meta(stats.as_metadata(), stats.rows,
                                                   {"dynamics": _calls(client) - before}))

    return extract


def _person_extract(config: SyncConfig, common: dict[str, Any]) -> dg.AssetsDefinition:
    @dg.asset(key=PERSON_RAW, group_name="person", kinds={"marketo", "duckdb"}, retry_policy=RETRY,
              description="Mirror of Marketo persons: bulk extract by updatedAt for the initial copy, then "
                          "lead-change, merge and deleted-lead activities since the stored paging token.", **common)
    def extract(context: dg.AssetExecutionContext, state: SyncStateResource,
                marketo: MarketoResource) -> dg.MaterializeResult:
        window = context.partition_time_window
        with permanent_errors_fail_fast(), state.connect() as con:
            client = marketo.get_client()
            before = _calls(client)
            prepare_persons(context.run_id, state.config, client)
            stats = steps.extract_marketo_persons(con, state.config, client, window.start.astimezone(timezone.utc),
                                                  window.end.astimezone(timezone.utc),
                                                  is_latest_window(context, window),
                                                  work_dir=Path(state.work_dir) if state.work_dir else None,
                                                  run_id=context.run_id)
        return dg.MaterializeResult(metadata=_meta(stats.as_metadata(), stats.rows,
                                                   {"marketo": _calls(client) - before}))

    return extract


def _plan(config: SyncConfig, e: Entity, common: dict[str, Any]) -> dg.AssetsDefinition:
    deps = [raw_key(e.derived_from or e.name)]
    if e.is_person:
        deps.append(PERSON_RAW)
    if e.name == "contact" and "lead" in config.by_name:  # qualification needs the lead's person first
        deps += [push_key("lead"), push_key("lead", "dynamics")]
    if e.is_derived:
        deps += [push_key(d) for d in push_order(config, e)]

    @dg.asset(key=plan_key(e.name), group_name=e.name, kinds={"duckdb"}, deps=deps,
              automation_condition=dg.AutomationCondition.eager(),
              description=f"What the next sync writes for `{e.name}`: a field-level three-way merge of Dynamics, "
                          "Marketo and the last agreed values, with the rule behind every write.", **common)
    def plan(context: dg.AssetExecutionContext, state: SyncStateResource) -> dg.MaterializeResult:
        with permanent_errors_fail_fast(), state.connect() as con:
            summary = steps.plan(con, state.config, e, context.run_id)
        md = summary.as_metadata()
        writes = sum(v for k, v in summary.counts.items() if k.split(":")[0] in ("marketo", "dynamics"))
        return dg.MaterializeResult(metadata=_meta(md, writes, {}))

    return plan


def _marketo_push(config: SyncConfig, e: Entity, common: dict[str, Any]) -> dg.AssetsDefinition:
    deps = [plan_key(e.name)] + [push_key(d) for d in push_order(config, e)]

    @dg.asset(key=push_key(e.name), group_name=e.name, kinds={"marketo"}, deps=deps, retry_policy=RETRY,
              automation_condition=dg.AutomationCondition.eager(),
              description=f"Writes the plan of `{e.name}` to Marketo `{e.marketo.object}` in batches of up to 300, "
                          "upserting by external ids so re-runs never duplicate; failures are kept and retried.",
              **common)
    def push(context: dg.AssetExecutionContext, state: SyncStateResource, dynamics: DynamicsResource,
             marketo: MarketoResource) -> dg.MaterializeResult:
        with permanent_errors_fail_fast(), state.connect() as con:
            client = marketo.get_client()
            before = _calls(client)
            guard_environment(con, state, dynamics, marketo)
            cfg = run_config(context, state, dynamics.get_client())
            stats = steps.push_marketo(con, cfg, cfg.entity(e.name), client, context.run_id, final=not e.is_person)
        if stats.failed:
            context.log.warning(f"{e.name}: {stats.failed} records failed in Marketo: {stats.errors}")
        return dg.MaterializeResult(metadata=_meta(stats.as_metadata(), stats.ok,
                                                   {"marketo": _calls(client) - before}))

    return push


def _dynamics_push(config: SyncConfig, e: Entity, common: dict[str, Any]) -> dg.AssetsDefinition:
    @dg.asset(key=push_key(e.name, "dynamics"), group_name=e.name, kinds={"dynamics"}, retry_policy=RETRY,
              deps=[push_key(e.name)], automation_condition=dg.AutomationCondition.eager(),
              description=f"Writes Marketo-side changes of `{e.name}` persons back to Dynamics with `If-Match` etags "
                          "(a record changed meanwhile is re-read and re-planned, never overwritten blindly).",
              **common)
    def push(context: dg.AssetExecutionContext, state: SyncStateResource, dynamics: DynamicsResource,
             marketo: MarketoResource) -> dg.MaterializeResult:
        with permanent_errors_fail_fast(), state.connect() as con:
            dclient, mclient = dynamics.get_client(), marketo.get_client()
            before = (_calls(dclient), _calls(mclient))
            guard_environment(con, state, dynamics, marketo)
            cfg = run_config(context, state, dclient)
            stats = steps.push_dynamics(con, cfg, cfg.entity(e.name), dclient, mclient, context.run_id)
        return dg.MaterializeResult(metadata=_meta(stats.as_metadata(), stats.ok,
                                                   {"dynamics": _calls(dclient) - before[0],
                                                    "marketo": _calls(mclient) - before[1]}))

    return push

