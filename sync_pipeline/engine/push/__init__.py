"""Push stage: write the stored plan to Marketo and Dynamics and record the outcome."""

from sync_pipeline.engine.push.dynamics import push_dynamics
from sync_pipeline.engine.push.marketo import push_marketo
from sync_pipeline.engine.push.results import ApplyStats

__all__ = ["ApplyStats", "push_dynamics", "push_marketo"]
