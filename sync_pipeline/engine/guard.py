"""Wrong-environment guard: a state store belongs to one Dynamics organisation and one Marketo instance.

The first sync pins both identities; afterwards any mismatch (a refreshed sandbox, a copied instance,
a mistyped URL) stops every write with an explanation, until someone re-baselines on purpose.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
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


VERIFIED = "dynamics_verified_for"  # environment row: the URL and client id a WhoAmI last confirmed, and when


def check_environment_recent(
    con: duckdb.DuckDBPyConnection,
    *,
    dynamics_url: str,
    client_id: str,
    organization_id: Callable[[], str],
    marketo_instance: str,
    ttl_seconds: int,
) -> None:
    """The guard for the sync's runs: WhoAmI (``organization_id``) confirms the pinned org at most once per
    ``ttl_seconds`` for the same URL and client id. The check is about pointing at the wrong org: a changed URL or
    app registration, the usual cause, is asked about at once; the same URL answering for another org (a
    sandbox reset or copied over in place) is noticed within the TTL. 0: every run asks."""
    now = utcnow()
    target = f"{dynamics_url.rstrip('/').lower()}|{client_id.lower()}"
    pinned = dict(con.execute("SELECT key, value FROM environment").fetchall())
    row = con.execute("SELECT value, pinned_at FROM environment WHERE key = ?", [VERIFIED]).fetchone()
    fresh = (
        ttl_seconds > 0
        and row is not None
        and row[0] == target
        and row[1] > now - timedelta(seconds=ttl_seconds)
        and "dynamics_organization_id" in pinned
    )
    org = pinned["dynamics_organization_id"] if fresh else organization_id()
    check_environment(con, dynamics_org=str(org), marketo_instance=marketo_instance)
    if not fresh:
        con.execute("INSERT OR REPLACE INTO environment VALUES (?, ?, ?)", [VERIFIED, target, now])


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
