"""Wrong-environment guard: a state store belongs to one Dynamics organisation and one Marketo instance.

The first sync pins both identities; afterwards any mismatch (a refreshed sandbox, a copied instance,
a mistyped URL) stops every write with an explanation, until someone re-baselines on purpose.
"""

from __future__ import annotations

from typing import Any

import duckdb

from sync_pipeline.engine.store.state import one_row, utcnow


class WrongEnvironmentError(RuntimeError):
    pass


def check_environment(con: duckdb.DuckDBPyConnection, *, dynamics_org: str, marketo_instance: str) -> None:
    seen = {"dynamics_organization_id": dynamics_org.lower(), "marketo_instance": marketo_instance.lower()}
    pinned = dict(con.execute("SELECT key, value FROM environment").fetchall())
    problems = [
        f"{key}: this state store was synced with {pinned[key]!r}, but the configured system is {value!r}"
        for key, value in seen.items()
        if key in pinned and pinned[key] != value
    ]
    if problems:
        raise WrongEnvironmentError(
            "refusing to write: " + "; ".join(problems) + ". If the change is deliberate (for example a new "
            "sandbox), run `sync-pipeline rebaseline --yes` to start a fresh baseline; otherwise fix the URL."
        )
    for key, value in seen.items():
        if key not in pinned:
            con.execute("INSERT INTO environment VALUES (?, ?, ?)", [key, value, utcnow()])


def check_systems(con: duckdb.DuckDBPyConnection, dynamics_client: Any, marketo_instance: str) -> None:
    """The guard for one caller outside a sync run (the CLI): asks Dynamics who it is (one WhoAmI call)."""
    check_environment(
        con, dynamics_org=str(dynamics_client.whoami()["OrganizationId"]), marketo_instance=marketo_instance
    )


def rebaseline(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Forget the pinned environment and every per-record state tied to it (mirrors, identities, bases)."""
    counts: dict[str, int] = {}
    tables = [
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
    ]
    for t in tables:
        if t.startswith(("d_", "b_")) or t in (
            "m_person",
            "identity",
            "plan",
            "plan_work",
            "plan_meta",
            "derived_marks",
            "cursors",
            "environment",
            "failures",
            "conflicts",
        ):
            counts[t] = int(one_row(con, f'SELECT count(*) FROM "{t}"')[0])
            con.execute(f'DELETE FROM "{t}"')
    return counts
