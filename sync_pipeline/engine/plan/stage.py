"""The plan stage's entry point: a field-level three-way merge of Dynamics, Marketo and the base.

For every record with pending work (a newer version on either side, or a failed write due for retry)
and every mapped field: a side *changed* when its canonical value differs from the base (the last value
both sides agreed on). One side changed: the value flows per the field's direction. Both changed to the
same value: only the base moves. Both changed to different values: a conflict, resolved by the field's
policy. Our own writes come back as values equal to the base, so echoes never bounce.

The plan is stored (table ``plan``) before anything is written, so ``sync-pipeline plan`` can show it
and the push stage applies exactly it. Steps: the work set (``workset.py``), identity linking, merges
and quarantine (``identity.py``), the field merge (``fields.py``), creates in Dynamics (``creates.py``),
derived opportunity roles (``roles.py``).
"""

from __future__ import annotations

import contextlib
from datetime import datetime

import duckdb

from sync_pipeline.config.model import Entity, SyncConfig
from sync_pipeline.engine import mapping
from sync_pipeline.engine.plan.creates import plan_dynamics_creates
from sync_pipeline.engine.plan.fields import plan_slice
from sync_pipeline.engine.plan.identity import (
    follow_dynamics_merges,
    link_persons,
    quarantine,
)
from sync_pipeline.engine.plan.roles import plan_roles
from sync_pipeline.engine.plan.summary import PlanSummary
from sync_pipeline.engine.plan.workset import PLAN_SLICE, work_set
from sync_pipeline.engine.store.state import (
    ensure_split_base,
    mark_ledger_before_values,
    record_stats,
    utcnow,
)

PLAN_VACUUM_ROWS = 1  # any: a checkpoint after a small plan costs little


def plan_entity(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str) -> PlanSummary:
    # Fields added to the mapping wait for their back-fill (engine/mapping.py); the plan says what changed.
    config, entity = mapping.effective(con, config, entity)
    summary = compute_plan(con, config, entity, run_id, utcnow())
    mapping.add_plan_notices(con, entity.name, run_id)
    record_stats(con, run_id, entity.name, "plan", summary.as_metadata())
    return summary


def compute_plan(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str,
                 now: datetime) -> PlanSummary:
    dropped = con.execute("DELETE FROM plan WHERE entity = ?", [entity.name]).fetchone()
    con.execute("DELETE FROM plan_work WHERE entity = ?", [entity.name])
    if dropped and int(dropped[0]) >= PLAN_VACUUM_ROWS:
        # Deleted rows stay in their row groups, and every later scan of the plan reads them, until a checkpoint
        # vacuums them: after a large plan (an initial copy) the next small ones would otherwise read it again.
        with contextlib.suppress(duckdb.Error):  # another transaction open on the store: the vacuum waits
            con.execute("CHECKPOINT")
    ensure_split_base(con)
    mark_ledger_before_values(con)
    if entity.is_derived:
        summary = plan_roles(con, config, entity, run_id)
    else:
        summary = _plan_entity(con, config, entity, run_id, now)
    _summarise(con, summary)
    con.execute("INSERT OR REPLACE INTO plan_meta (entity, run_id, created_at, summary) VALUES (?, ?, ?, ?)",
                [entity.name, run_id, now, str(summary.as_metadata())])
    return summary


def _plan_entity(con: duckdb.DuckDBPyConnection, config: SyncConfig, entity: Entity, run_id: str,
                 now: datetime) -> PlanSummary:
    summary = PlanSummary(entity.name, run_id)
    summary.work = work_set(con, config, entity, now)
    summary.work += follow_dynamics_merges(con, config, entity, run_id, now, summary)
    if entity.is_person:
        link_persons(con, config, entity, now, summary)
        summary.work += quarantine(con, config, entity, run_id, now, summary)
    # The three-way join is wide (three values per field): plan the work set a slice at a time, so memory
    # stays flat whether 1,000 or 1,000,000 records changed.
    con.execute("CREATE OR REPLACE TEMP TABLE work_all AS SELECT did, d_seq, row_number() OVER (ORDER BY did) AS wn FROM work_set")
    for start in range(1, summary.work + 1, PLAN_SLICE):
        con.execute("CREATE OR REPLACE TEMP TABLE work_set AS SELECT did, d_seq FROM work_all WHERE wn BETWEEN ? AND ?",
                    [start, start + PLAN_SLICE - 1])
        plan_slice(con, config, entity, run_id, summary)
    if entity.is_person and entity.create_in_dynamics:
        plan_dynamics_creates(con, config, entity, run_id)
    return summary


def _summarise(con: duckdb.DuckDBPyConnection, summary: PlanSummary) -> None:
    for target, op, recs, n in con.execute("""SELECT target, op, count(DISTINCT dynamics_id), count(*) FROM plan
                                              WHERE entity = ? GROUP BY 1, 2""", [summary.entity]).fetchall():
        summary.counts[f"{target}:{op}"] = int(recs)
        summary.fields[f"{target}:{op}"] = int(n)
        if op == "reject":
            summary.rejected += int(recs)
