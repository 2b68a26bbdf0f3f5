"""A populated sandbox, a state store and the pipeline pointed at both, for module-scoped end-to-end worlds
(merges and quarantine tests): real in-process Dagster runs, reads of both systems and of the store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sync_pipeline.sandbox.runner import Sandbox

ALL = 100_000


@dataclass
class World:
    sandbox: Sandbox
    env: dict[str, str] = field(repr=False)  # holds the sandbox's client secrets
    state_path: Path
    instance: Any = field(default=None, repr=False)
    p: dict[str, Any] = field(default_factory=dict)  # picks and recorded observations
    results: list[Any] = field(default_factory=list, repr=False)

    def run(self, scope: str = "latest", must_succeed: bool = True) -> Any:
        from sync_pipeline import runs

        with pytest.MonkeyPatch.context() as mp:
            for k, v in self.env.items():
                mp.setenv(k, v)
            result = runs.run_sync(self.instance, scope=scope, raise_on_error=must_succeed)
        assert result.success or not must_succeed
        self.results.append(result)
        return result

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        from sync_pipeline.engine.store import state

        with state.connect(self.state_path, read_only=True) as con:
            return con.execute(sql, params or []).fetchall()

    def execute(self, sql: str, params: list[Any] | None = None) -> None:
        """Write to the state store directly (tests that inject damage); no run may be active."""
        from sync_pipeline.engine.store import state

        with state.connect(self.state_path) as con:
            con.execute(sql, params or [])

    def persons_of(self, dynamics_id: str) -> list[dict[str, Any]]:
        return [p for p in self.sandbox.marketo_rows("lead", ALL) if p.get("dynamicsId") == dynamics_id]

    def person_of(self, dynamics_id: str) -> dict[str, Any]:
        found = self.persons_of(dynamics_id)
        assert len(found) == 1, (
            f"expected one Marketo person with dynamicsId {dynamics_id}, found {len(found)}"
        )
        return found[0]

    def identity(self, entity: str, dynamics_id: str) -> tuple[str, str, str] | None:
        rows = self.query(
            "SELECT marketo_id, state, how FROM identity WHERE entity = ? AND dynamics_id = ?",
            [entity, dynamics_id],
        )
        return rows[0] if rows else None

    def synced(self, entity: str, n: int, how: str = "created") -> list[str]:
        rows = self.query(
            "SELECT dynamics_id FROM identity WHERE entity = ? AND state = 'active' AND how = ? "
            "ORDER BY dynamics_id",
            [entity, how],
        )
        assert len(rows) >= n, f"the tiny org has too few synced {entity} rows"
        return [r[0] for r in rows[:n]]

    def ledger(self, dynamics_id: str) -> list[tuple]:
        return self.query(
            "SELECT target, op, field, value_before, value_after, rule FROM ledger "
            "WHERE dynamics_id = ? ORDER BY seq",
            [dynamics_id],
        )

    def check(self, result: Any, entity: str, name: str = "one_person_per_record") -> Any:
        from sync_pipeline.connection.keys import asset_key
        from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

        evaluations = [
            e
            for e in result.get_asset_check_evaluations()
            if e.asset_check_key.name == name and e.asset_key == asset_key(CONN, entity, "push")
        ]
        assert evaluations, f"check {name} of {entity} did not run"
        return evaluations[-1]


def world_of(tmp: Path) -> Iterator[World]:
    """The tiny org (seed 0) in a fresh sandbox, an empty state store; nothing synced yet."""
    import dagster as dg

    with Sandbox(tmp / "sandbox") as sb:
        sb.populate("tiny", seed=0)
        env = dict(sb.settings(), SYNC_STATE_PATH=str(tmp / "state.duckdb"), MARKETO_CALLS_PER_20S="100")
        yield World(sb, env, tmp / "state.duckdb", dg.DagsterInstance.ephemeral())
