"""Plan stage: decide, per record and field, what the push writes (stored in table ``plan``)."""

from sync_pipeline.engine.plan.stage import compute_plan, plan_entity
from sync_pipeline.engine.plan.summary import PlanSummary

__all__ = ["PlanSummary", "compute_plan", "plan_entity"]
