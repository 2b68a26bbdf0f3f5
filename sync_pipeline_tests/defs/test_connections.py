"""Two connections side by side in one code location (issue 14): each its own org pair, credentials (env var
names), state store, resources, jobs and sensors; their syncs run at the same time and never touch each
other's systems or state."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from sync_pipeline.connection import SyncConnection
from sync_pipeline.connection.build import sync_job_name
from sync_pipeline.connection.keys import asset_key, connection_of, pool
from sync_pipeline.sandbox.runner import Sandbox

NAMES = ("east", "west")


def declare(name: str, state_path: Path) -> SyncConnection:
    """What ``defs/<name>/defs.yaml`` declares for a second org pair: its own env var names and state store."""
    up = name.upper()
    return SyncConnection.model_validate(
        {
            "name": name,
            "state_path": str(state_path),
            "ca_bundle_env": f"{up}_CA_BUNDLE",
            "dynamics": {
                "url_env": f"{up}_DYNAMICS_URL",
                "authority_env": f"{up}_DYNAMICS_AUTHORITY",
                "client_id_env": f"{up}_DYNAMICS_CLIENT_ID",
                "client_secret_env": f"{up}_DYNAMICS_SECRET",
            },
            "marketo": {
                "base_url_env": f"{up}_MARKETO_BASE_URL",
                "client_id_env": f"{up}_MARKETO_CLIENT_ID",
                "client_secret_env": f"{up}_MARKETO_SECRET",
                "munchkin_id_env": f"{up}_MUNCHKIN_ID",
            },
            # Tests launch the runs they measure; a running change sensor would add runs of its own.
            "automation": {"running": False},
        }
    )


def export(monkeypatch: pytest.MonkeyPatch, name: str, sb: Sandbox) -> None:
    s, up = sb.settings(), name.upper()
    for ours, theirs in (
        ("CA_BUNDLE", "SYNC_CA_BUNDLE"),
        ("DYNAMICS_URL", "DYNAMICS_URL"),
        ("DYNAMICS_AUTHORITY", "DYNAMICS_AUTHORITY"),
        ("DYNAMICS_CLIENT_ID", "DYNAMICS_CLIENT_ID"),
        ("DYNAMICS_SECRET", "DYNAMICS_CLIENT_SECRET"),
        ("MARKETO_BASE_URL", "MARKETO_BASE_URL"),
        ("MARKETO_CLIENT_ID", "MARKETO_CLIENT_ID"),
        ("MARKETO_SECRET", "MARKETO_CLIENT_SECRET"),
        ("MUNCHKIN_ID", "MARKETO_MUNCHKIN_ID"),
    ):
        monkeypatch.setenv(f"{up}_{ours}", s[theirs])
    # The shipped connection's variables stay unset: a connection reading them would fail, not cross over.
    for theirs in s:
        monkeypatch.delenv(theirs, raising=False)


def test_two_connections_sync_concurrently_without_touching_each_other(tmp_path: Path, monkeypatch) -> None:
    with Sandbox(tmp_path / "east-sb", seed=1) as east_sb, Sandbox(tmp_path / "west-sb", seed=2) as west_sb:
        sandboxes = {"east": east_sb, "west": west_sb}
        for i, (name, sb) in enumerate(sandboxes.items()):
            sb.populate("tiny", seed=i + 1)
            export(monkeypatch, name, sb)
        specs = {name: declare(name, tmp_path / f"{name}.duckdb") for name in NAMES}
        # One code location holding both: no key, job, sensor, op, pool or resource name collides.
        defs = dg.Definitions.merge(
            *(s.definitions() for s in specs.values()), dg.Definitions(executor=dg.in_process_executor)
        )
        repo = defs.get_repository_def()
        assert {connection_of(k) for k in defs.resolve_asset_graph().get_all_asset_keys()} == set(NAMES)
        assert {j.name for j in repo.get_all_jobs() if not j.name.startswith("__")} >= {
            f"{n}__{j}" for n in NAMES for j in ("sync", "resync", "validate")
        }
        assert {s.name for s in repo.sensor_defs} == {
            f"{n}__{s}" for n in NAMES for s in ("change_sensor", "alert_on_failure", "alert_on_held_records")
        }
        plans = {n: defs.get_assets_def(asset_key(n, "contact", "plan")) for n in NAMES}
        assert {n: {op.pool for op in a.node_def.iterate_op_defs()} for n, a in plans.items()} == {
            n: {pool(n)} for n in NAMES
        }

        before = {name: sb.calls() for name, sb in sandboxes.items()}
        results: dict[str, Any] = {}
        errors: list[BaseException] = []
        started = threading.Barrier(len(NAMES))

        def sync(name: str) -> None:
            try:
                job = defs.resolve_job_def(sync_job_name(name))
                started.wait(30)
                with dg.DagsterInstance.ephemeral() as instance:
                    partitions = job.partitions_def
                    assert partitions is not None
                    key = partitions.get_last_partition_key()
                    results[name] = job.execute_in_process(instance=instance, partition_key=key)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=sync, args=(n,)) for n in NAMES]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not errors, errors
        assert all(results[n].success for n in NAMES)

        from sync_pipeline.engine.store import state

        for name, sb in sandboxes.items():
            other = sandboxes["west" if name == "east" else "east"]
            with state.connect(tmp_path / f"{name}.duckdb", read_only=True) as con:
                linked = dict(
                    con.execute(
                        "SELECT dynamics_id, marketo_id FROM identity WHERE entity = 'contact' "
                        "AND state = 'active'"
                    ).fetchall()
                )
                run_ids = {r[0] for r in con.execute("SELECT DISTINCT run_id FROM ledger").fetchall()}
            ours = {r["contactid"] for r in sb.dynamics_rows("contact", 100_000)}
            theirs = {r["contactid"] for r in other.dynamics_rows("contact", 100_000)}
            # Synced: its org's contacts (all but the few the tiny org holds back on purpose) are linked to
            # Marketo persons of its own instance; none of the other org's.
            assert len(linked) >= 0.8 * len(ours) and set(linked) <= ours and not set(linked) & theirs, name
            persons = {str(p["id"]): p.get("dynamicsId") for p in sb.marketo_rows("lead", 100_000)}
            assert all(persons.get(str(m)) == d for d, m in linked.items()), name
            assert not {p.get("dynamicsId") for p in other.marketo_rows("lead", 100_000)} & set(linked), name
            # Its state holds only its own run; both systems of the pair were called by its run.
            assert run_ids == {results[name].run_id}, name
            calls = sb.calls()
            assert sum(calls.values()) > sum(before[name].values()), name
