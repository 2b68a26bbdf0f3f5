"""What a plan counts, and the small SQL helpers the plan modules share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sync_pipeline.config.model import SyncConfig
from sync_pipeline.engine.store.state import sql_text

# Every row of table ``plan`` is written through this column list (a plan row, in order: who, what, the values).
PLAN_INSERT = """INSERT INTO plan (run_id, entity, dynamics_id, marketo_id, target, op, field, old_value, new_value,
                                  base_value, rule, etag)"""


@dataclass
class PlanSummary:
    entity: str
    run_id: str
    work: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # "<target>:<op>" -> records
    fields: dict[str, int] = field(default_factory=dict)  # "<target>:<op>" -> field writes
    conflicts: dict[str, int] = field(default_factory=dict)  # policy -> fields
    linked: dict[str, int] = field(default_factory=dict)  # how -> records
    rejected: int = 0
    quarantined: int = 0
    merged: int = 0  # Dynamics records whose merge (Dataverse Merge) was followed in this plan
    excluded: int = 0
    tombstoned: int = 0
    unchanged: int = 0

    def as_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "records_in_work": self.work,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
            "excluded_by_filter": self.excluded,
            "tombstoned": self.tombstoned,
            "quarantined": self.quarantined,
            "merged": self.merged,
        }
        out.update({f"records/{k}": v for k, v in sorted(self.counts.items())})
        out.update({f"fields/{k}": v for k, v in sorted(self.fields.items())})
        out.update({f"conflicts/{k}": v for k, v in sorted(self.conflicts.items())})
        out.update({f"linked/{k}": v for k, v in sorted(self.linked.items())})
        return out


def person_entities(config: SyncConfig) -> str:
    return ", ".join(sql_text(e.name) for e in config.persons)
