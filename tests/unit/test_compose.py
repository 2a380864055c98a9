"""compose/docker-compose.yml: what a Docker host relies on, checked without an engine.

`docker compose config` validates the file against Compose's own schema where the
compose plugin is installed; the assertions hold everywhere."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if n.startswith("worker-")}


def test_compose_file_is_valid_for_docker_compose() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client here")
    plugin = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if plugin.returncode != 0:
        pytest.skip("the docker client has no compose plugin here")
    done = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_kafka_keeps_its_log_on_a_volume_like_s3_keeps_its_data(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    log_dir = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert f"kafka-data:{log_dir}" in kafka["volumes"]
    assert "s3-data:/data" in compose["services"]["s3"]["volumes"]
    assert {"kafka-data", "s3-data"} <= set(compose["volumes"])


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("restart") == "no":
            continue  # one-shot init and build services
        assert "healthcheck" in service, name
    assert "/healthz" in " ".join(compose["services"]["s3"]["healthcheck"]["test"])


def test_workers_are_healthy_when_both_healthz_and_readyz_answer(
    compose: dict[str, Any],
) -> None:
    workers = _workers(compose)
    assert len(workers) >= 2
    for name, service in workers.items():
        port = service["environment"]["LHV_METRICS_PORT"]
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/" in probe and "healthz" in probe and "readyz" in probe, name


def test_the_lhv_image_is_built_by_one_service_and_run_by_the_others(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    builders = [n for n, s in services.items() if "build" in s]
    assert builders == ["lhv-image"]
    users = [n for n, s in services.items() if s.get("image") == "lhv:dev" and n != "lhv-image"]
    assert set(_workers(compose)) | {"s3-init"} <= set(users)
    for name in users:
        assert services[name].get("pull_policy") == "never", name
        condition = services[name]["depends_on"]["lhv-image"]["condition"]
        assert condition == "service_completed_successfully", name


def test_services_get_s3_credentials_under_lhv_names_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        assert not [k for k in env if k.startswith("AWS_")], name
    for service in _workers(compose).values():
        assert {"LHV_S3_ACCESS_KEY_ID", "LHV_S3_SECRET_ACCESS_KEY"} <= set(service["environment"])
