"""The container files, checked by reading them (no container engine here): the Dockerfile's health check asks
/readyz on the port the image listens on, and compose.yaml runs a config that loads and points at its services."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from gateway.check import check
from gateway.config import load_config

ROOT = Path(__file__).parent.parent


def test_the_dockerfile_checks_readiness_on_its_own_port() -> None:
    text = (ROOT / "Dockerfile").read_text()
    port = re.search(r"GATEWAY_PORT=(\d+)", text)
    assert port is not None and f"EXPOSE {port.group(1)}" in text
    found = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", text, re.MULTILINE)
    assert found is not None, "no HEALTHCHECK"
    command = json.loads(found.group(1))
    assert command[:2] == ["python", "-c"] and f"http://127.0.0.1:{port.group(1)}/readyz" in command[2]
    compile(command[2], "healthcheck", "exec")  # the probe is valid Python
    assert "USER gateway" in text and "COPY gateway ./gateway" in text


def test_compose_runs_redis_the_gateway_and_the_demo() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "gateway", "demo"}
    gateway = services["gateway"]
    mounts = {m.split(":")[1]: ROOT / m.split(":")[0] for m in gateway["volumes"]}
    assert all(path.exists() for path in mounts.values()), mounts
    config = load_config(mounts["/etc/gateway/config.yaml"], env=gateway["environment"])
    assert config.store.url == "redis://redis:6379/0"
    assert {a.upstream for a in config.apps} == {"http://demo:9001"}
    assert "--port" in services["demo"]["command"] and "9001" in services["demo"]["command"]
    assert "http://gateway:8080" in services["demo"]["command"]
    assert f"127.0.0.1:{config.admin.port}:{config.admin.port}" in gateway["ports"]  # admin: loopback only
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    # the files the config names are the ones mounted beside it
    assert config.directory.file is not None and config.directory.file.name in {p.name for p in mounts.values()}


def test_the_compose_config_passes_check_config(tmp_path: Path) -> None:
    """Laid out as compose mounts it (the config and the demo directory side by side), it has no problem."""
    shutil.copy(ROOT / "deploy" / "config.yaml", tmp_path / "config.yaml")
    shutil.copy(ROOT / "directory.yaml", tmp_path / "directory.yaml")
    report = check(tmp_path / "config.yaml")
    assert report.problems == []
    assert "admin listener on 0.0.0.0:8081" in "\n".join(report.routes)
