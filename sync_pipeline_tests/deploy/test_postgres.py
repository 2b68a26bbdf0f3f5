"""deploy/postgres/dagster.yaml against a throwaway PostgreSQL server: a sync run lands in PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

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
        subprocess.run(_as_server_user([str(PG_BIN / "initdb"), "-D", str(data), "-U", "dagster",
                                        "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=60)
        subprocess.run(_as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"),
                                        "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "-w", "start"]),
                       check=True, capture_output=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        _unavailable(f"could not start PostgreSQL: {getattr(exc, 'stderr', b'')!r} {log[-500:]}")
    try:
        yield {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_USERNAME": "dagster",
               "DAGSTER_PG_PASSWORD": password, "DAGSTER_PG_DB": "postgres"}
    finally:
        subprocess.run(_as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
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

    conn = psycopg2.connect(host="127.0.0.1", port=int(postgres["DAGSTER_PG_PORT"]), user="dagster",
                            password=postgres["DAGSTER_PG_PASSWORD"], dbname="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, pipeline_name FROM runs WHERE run_id = %s", (result.run_id,))
            assert cur.fetchall() == [("SUCCESS", f"{CONN}__sync")]
            cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = "
                        "'ASSET_MATERIALIZATION'", (result.run_id,))
            assert cur.fetchone()[0] >= 20  # every raw, plan and push asset of every entity
    finally:
        conn.close()
    # The password only comes from the environment: not in the instance file, not in the stored run.
    assert postgres["DAGSTER_PG_PASSWORD"] not in (home / "dagster.yaml").read_text()
