"""The container files, checked by reading them (no container engine here): the Dockerfile's health check asks
/readyz on the port the image listens on, and compose.yaml runs a config that loads and points at its services."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.nginx import main_conf, nginx_binary
from gateway.check import check
from gateway.config import load_config
from tests.conftest import RedisServer, free_port

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


def test_the_compose_config_passes_check_config(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Laid out as compose mounts it (the config and the demo directory side by side), it has no problem. check-config
    pings the store: the session's redis-server stands in for compose's redis service (GATEWAY_REDIS_URL, as
    compose.yaml sets it)."""
    shutil.copy(ROOT / "deploy" / "config.yaml", tmp_path / "config.yaml")
    shutil.copy(ROOT / "directory.yaml", tmp_path / "directory.yaml")
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_server.url)
    report = check(tmp_path / "config.yaml")
    assert report.problems == []
    assert "admin listener on 0.0.0.0:8081" in "\n".join(report.routes)


def test_the_demo_checks_its_own_health() -> None:
    """The demo reuses the gateway's image, whose HEALTHCHECK asks :8080/readyz: the demo has its own, on the port
    and the path the demo app answers (any path: a page saying who is signed in)."""
    demo = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["demo"]
    command = demo["command"]
    port = command[command.index("--port") + 1]
    test = demo["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and f"u.urlopen('http://127.0.0.1:{port}/', timeout=2)" in test[3]
    assert "/readyz" not in test[3]
    compile(test[3], "healthcheck", "exec")
    assert demo["healthcheck"].get("disable") is not True


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether the build context leaves ``path`` out, by Docker's rules: the last pattern that matches the path or
    one of its parent folders decides, ``!`` takes back in, ``**`` is any number of folders, ``*`` stays in one."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_the_build_context_holds_what_the_dockerfile_copies_and_not_the_venv_or_git() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    sources = [
        source
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith(("COPY ", "ADD ")) and "--from" not in line
        for source in line.split()[1:-1]
    ]
    assert sources == ["pyproject.toml", "gateway"]
    copied = [
        path.relative_to(ROOT).as_posix()
        for source in sources
        for path in ([ROOT / source] if (ROOT / source).is_file() else sorted((ROOT / source).rglob("*")))
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert "gateway/openapi.yaml" in copied and "gateway/py.typed" in copied  # package data: the image needs it
    assert [path for path in copied if dockerignore_excludes(patterns, path)] == []
    left_out = [".venv/bin/python", ".git/HEAD", "gateway/__pycache__/app.cpython-311.pyc", "signing.pem",
                "deploy/signing.pem", ".mypy_cache/x", "bench-results.json", "tests/golden/nginx.conf"]  # fmt: skip
    assert [path for path in left_out if not dockerignore_excludes(patterns, path)] == []
    assert not dockerignore_excludes(["*", "!gateway"], "gateway/app.py")  # the matcher's own rules
    assert dockerignore_excludes(["gateway", "!gateway/x.py"], "gateway/y.py")


def test_the_nginx_page_commands_work_pasted_whole(tmp_path: Path) -> None:
    """The block of docs/nginx.md (which the README links to), run as pasted (but for starting the gateway and
    reloading the system's nginx): the internal port reaches proxy-config, whose output a real nginx accepts."""
    assert "](docs/nginx.md)" in (ROOT / "README.md").read_text()
    page = (ROOT / "docs" / "nginx.md").read_text()
    section = page[page.index("# Deploying behind nginx\n") :]
    start = section.index("```sh\n") + 6
    block = section[start : section.index("\n```", start)].splitlines()
    commands = [line for line in block if line.strip() and not line.startswith("#")]
    target = "/etc/nginx/conf.d/impersonation-gateway.conf"
    assert any(" serve " in line for line in commands) and any(target in line for line in commands)
    cli = f"{Path(sys.executable).parent}/impersonation-gateway "
    script = [
        line.replace("impersonation-gateway ", cli, 1).replace(target, str(tmp_path / "gateway.conf"))
        for line in commands
        if " serve " not in line and not line.startswith("nginx ")
    ]
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    shutil.copy(ROOT / "directory.yaml", tmp_path / "directory.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(["bash", "-euc", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    conf = (tmp_path / "gateway.conf").read_text()
    internal = re.search(r"^export GATEWAY_PORT=(\d+)$", "\n".join(commands), re.MULTILINE)
    assert internal is not None and f"server 127.0.0.1:{internal.group(1)};" in conf
    # nginx -t tries the listen addresses too: move them to a free port (never the demo's own 8080)
    include = tmp_path / "include.conf"
    include.write_text(
        re.sub(r"listen 127\.0\.0\.1:\d+", f"listen 127.0.0.1:{free_port()}", conf).replace(
            "/var/log/nginx/access.log", str(tmp_path / "access.log")
        )
    )
    checked = subprocess.run([nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(main_conf(tmp_path, include))],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
