"""Extract stage: read both systems into the DuckDB mirrors (``d_<entity>``, ``m_person``)."""

from sync_pipeline.engine.extract.dynamics import extract_dynamics
from sync_pipeline.engine.extract.marketo import extract_marketo_persons

__all__ = ["extract_dynamics", "extract_marketo_persons"]
