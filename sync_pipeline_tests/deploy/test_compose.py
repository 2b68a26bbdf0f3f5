"""deploy/compose: the compose file parses, starts webserver, daemon, PostgreSQL and the code location, and every
file it and its Dockerfile reference exists (Docker itself cannot run here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose"


def test_compose_file_starts_the_deployment_from_files_that_exist() -> None:
    spec = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())
    services = spec["services"]
    assert {"postgres", "code", "webserver", "daemon"} <= set(services)
    commands = {name: " ".join(s.get("command") or []) for name, s in services.items()}
    assert commands["webserver"].startswith("dagster-webserver") and commands["daemon"].startswith(
        "dagster-daemon"
    )
    assert "code-server start" in commands["code"] and "-m sync_pipeline.definitions" in commands["code"]
    for name in ("code", "webserver", "daemon"):
        build = services[name]["build"]
        context = (COMPOSE / build["context"]).resolve()
        assert context == REPO and (context / build["dockerfile"]).is_file(), name
        env = services[name]["environment"]
        assert env["DAGSTER_HOME"] == "/opt/dagster/home" and env["DAGSTER_PG_HOST"] == "postgres", name
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}, name
    # The state stores live on a volume of the container that executes the runs.
    assert any(v.startswith("state:") for v in services["code"]["volumes"]) and "state" in spec["volumes"]
    # No secret is written in the file: passwords and credentials come from the environment / .env.
    assert "${DAGSTER_PG_PASSWORD" in (COMPOSE / "docker-compose.yaml").read_text()

    dockerfile = (COMPOSE / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
    home_files = dict(re.findall(r"^COPY (\S+) /opt/dagster/home/(\S+)$", dockerfile, flags=re.M))
    instance = yaml.safe_load(
        (REPO / next(k for k, v in home_files.items() if v == "dagster.yaml")).read_text()
    )
    assert instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    limits = instance["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "sync/connection", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits

    workspace = yaml.safe_load(
        (REPO / next(k for k, v in home_files.items() if v == "workspace.yaml")).read_text()
    )
    grpc = workspace["load_from"][0]["grpc_server"]
    assert grpc["host"] == "code" and f"-p {grpc['port']}" in commands["code"]
    assert grpc["location_name"] == "sync_pipeline"  # the name sensor cursors and history are stored under
