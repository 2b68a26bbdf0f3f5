"""deploy/postgres/dagster.yaml against a throwaway PostgreSQL server: a sync run lands in PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync_pipeline.connection.keys import asset_key
from sync_pipeline.runs import DEFAULT_CONNECTION as CONN

REPO = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
REQUIRED = os.environ.get("SYNC_PIPELINE_REQUIRE_POSTGRES") == "1"

pytestmark = pytest.mark.postgres


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"SYNC_PIPELINE_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the unprivileged ``postgres`` user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture
def postgres() -> Iterator[dict[str, str]]:
    if not (PG_BIN / "initdb").exists():
        _unavailable(f"no PostgreSQL binaries in {PG_BIN} (apt-get install postgresql-15)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _unavailable("running as root without runuser to drop to the postgres user")
    # Not tmp_path: pytest's root-owned 0700 tree is closed to the postgres user.
    base = Path(tempfile.mkdtemp(prefix="sync-pg-"))
    data, pwfile = base / "data", base / "pw"
    password = "pg-" + os.urandom(8).hex()
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(pwfile, "postgres")
    port = _free_port()
    try:
        subprocess.run(
            _as_server_user(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "dagster",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            _as_server_user(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(base / "server.log"),
                    "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1",
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        _unavailable(f"could not start PostgreSQL: {getattr(exc, 'stderr', b'')!r} {log[-500:]}")
    try:
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(port),
            "DAGSTER_PG_USERNAME": "dagster",
            "DAGSTER_PG_PASSWORD": password,
            "DAGSTER_PG_DB": "postgres",
        }
    finally:
        subprocess.run(
            _as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


def test_sync_runs_are_stored_in_postgresql(harness, postgres, tmp_path, monkeypatch) -> None:
    import dagster as dg
    import psycopg2

    from sync_pipeline import runs

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    for key, value in postgres.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        result = runs.run_sync(instance, scope="latest")
        assert result.success
        # Read back through a second instance: what the UI and the daemon would see.
    with dg.DagsterInstance.get() as other:
        record = other.get_run_record_by_id(result.run_id)
        assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert other.get_latest_materialization_event(asset_key(CONN, "contact", "push")) is not None

    conn = psycopg2.connect(
        host="127.0.0.1",
        port=int(postgres["DAGSTER_PG_PORT"]),
        user="dagster",
        password=postgres["DAGSTER_PG_PASSWORD"],
        dbname="postgres",
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, pipeline_name FROM runs WHERE run_id = %s", (result.run_id,))
            assert cur.fetchall() == [("SUCCESS", f"{CONN}__sync")]
            cur.execute(
                "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = "
                "'ASSET_MATERIALIZATION'",
                (result.run_id,),
            )
            assert cur.fetchone()[0] >= 20  # every raw, plan and push asset of every entity
    finally:
        conn.close()
    # The password only comes from the environment: not in the instance file, not in the stored run.
    assert postgres["DAGSTER_PG_PASSWORD"] not in (home / "dagster.yaml").read_text()


def _run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_the_daemon_runs_connections_in_parallel_and_each_connection_one_run_at_a_time(
    postgres, tmp_path, monkeypatch
) -> None:
    """deploy/postgres/dagster.yaml with the daemon's queued run coordinator: two sync runs of `east` and one
    of `west`, queued together, run as `east` | `west` in parallel and `east` after `east` (the
    `sync/connection` tag limit: one DuckDB writer per connection)."""
    import dagster as dg

    from sync_pipeline.connection.build import sync_job_name
    from sync_pipeline.sandbox.runner import Sandbox
    from sync_pipeline_tests.defs.test_connections import export

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: sync_pipeline_tests.deploy.two_connections\n"
        f"      location_name: two_connections\n      working_directory: {REPO}\n"
    )
    with Sandbox(tmp_path / "east-sb", seed=1) as east, Sandbox(tmp_path / "west-sb", seed=2) as west:
        for i, (name, sb) in enumerate((("east", east), ("west", west))):
            sb.populate("tiny", seed=i + 1)
            export(monkeypatch, name, sb)
        for key, value in postgres.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        monkeypatch.setenv("SYNC_TEST_STATE_DIR", str(tmp_path))
        monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        )
        env = dict(os.environ)
        bin_dir = Path(sys.executable).parent
        from sync_pipeline_tests.deploy.two_connections import defs

        latest = defs.resolve_job_def(sync_job_name("east")).partitions_def.get_last_partition_key()
        # Queue all three before the daemon starts, so it sees them together.
        for name in ("east", "west", "east"):
            _run(
                [
                    str(bin_dir / "dagster"),
                    "job",
                    "launch",
                    "-w",
                    str(workspace),
                    "-j",
                    sync_job_name(name),
                    "--tags",
                    json.dumps({"dagster/partition": latest}),
                ],
                env,
            )
        daemon = subprocess.Popen(
            [str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "daemon.log").open("wb"),
        )
        try:
            with dg.DagsterInstance.get() as instance:
                deadline = time.monotonic() + 600
                while True:
                    records = instance.get_run_records()
                    if len(records) == 3 and all(r.dagster_run.is_finished for r in records):
                        break
                    assert time.monotonic() < deadline, [
                        (r.dagster_run.job_name, r.dagster_run.status) for r in records
                    ]
                    time.sleep(2)
        finally:
            daemon.terminate()
            daemon.wait(60)
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records), [
        (r.dagster_run.job_name, r.dagster_run.status) for r in records
    ]
    spans = {}
    for r in records:
        spans.setdefault(r.dagster_run.job_name, []).append((r.start_time, r.end_time))
        assert r.dagster_run.tags["sync/connection"] == r.dagster_run.job_name.split("__")[0]
    (e1, e2), (w,) = sorted(spans[sync_job_name("east")]), spans[sync_job_name("west")]
    assert e1[1] <= e2[0], "two runs of one connection overlapped"
    assert w[0] < e1[1] and e1[0] < w[1], "runs of different connections did not run in parallel"
    print(
        f"east runs {e1[1] - e1[0]:.0f} s then {e2[1] - e2[0]:.0f} s; west {w[1] - w[0]:.0f} s alongside the first"
    )
