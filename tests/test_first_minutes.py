"""What a new user meets first: processes side by side on one host, one clear line for each problem a user can
fix (a taken port, a store that does not answer, a bad YAML file), and where the gateway listens.

Real processes (``python -m gateway``) on free ports; a port is "taken" by a socket this test holds.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.conftest import free_port
from tests.processes import stop

APPS = {"control-panel": {"dialect": "activeplatform", "upstream": "http://127.0.0.1:9"}}
ADMIN_TOKENS = [{"id": "ops", "token": "ops-token", "scopes": ["revoke"]}]


def config_file(tmp: Path, **sections: Any) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({"apps": APPS, **sections}))
    return path


def gateway(
    config: Path, *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``impersonation-gateway serve`` (or another command) as a process; its stdout in ``log`` when given."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | (env or {})
    command = [sys.executable, "-m", "gateway", *args, "--config", str(config)]
    if log is None:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
    with log.open("wb") as stdout:  # the child keeps its own copy
        return subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, env=environment)


def run(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)], capture_output=True,
                          text=True, env=environment, timeout=60)  # fmt: skip


@pytest.fixture
def held() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def one_line_error(proc: subprocess.Popen[bytes]) -> str:
    """The process ends on its own with status 2 and one line on stderr (no traceback): that line."""
    _, raw = proc.communicate(timeout=30)
    err = raw.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err.strip()


async def listening_lines(log: Path, proc: subprocess.Popen[bytes], count: int) -> list[dict[str, Any]]:
    """Wait until the process has logged ``count`` listener lines; them."""
    deadline = time.monotonic() + 30
    while True:
        events = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]
        found = [e for e in events if e["event"] in ("listening", "admin_listening")]
        if len(found) >= count:
            return found
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, events
        await asyncio.sleep(0.05)


async def test_two_gateways_with_one_config_start_side_by_side(tmp_path: Path) -> None:
    """No admin tokens, no admin listener: the way DESIGN section 1 scales, --port apart."""
    config = config_file(tmp_path)
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"{p}.log" for p in ports]
    procs = [gateway(config, "serve", "--port", str(p), log=log) for p, log in zip(ports, logs, strict=True)]
    try:
        for port, log, proc in zip(ports, logs, procs, strict=True):
            (line,) = await listening_lines(log, proc, 1)
            assert (line["event"], line["url"]) == ("listening", f"http://127.0.0.1:{port}")
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as answer:
                assert answer.status == 200
    finally:
        assert [stop(p) for p in procs] == [0, 0]
    assert not any(b"admin_listening" in log.read_bytes() for log in logs)


async def test_each_listener_says_where_it_listens(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    config = config_file(tmp_path, admin={"port": admin, "tokens": ADMIN_TOKENS})
    log = tmp_path / "out.log"
    proc = gateway(config, "serve", "--port", str(port), log=log)
    try:
        lines = await listening_lines(log, proc, 2)
        urls = {line["event"]: line["url"] for line in lines}
        assert urls == {"listening": f"http://127.0.0.1:{port}", "admin_listening": f"http://127.0.0.1:{admin}"}
    finally:
        assert stop(proc) == 0


@pytest.mark.parametrize(
    ("how", "env", "args", "setting"),
    [
        ("config", {}, (), "server.port"),
        ("environment", {"GATEWAY_PORT": "{port}"}, (), "GATEWAY_PORT"),
        ("argument", {}, ("--port", "{port}"), "--port"),
    ],
)
def test_a_taken_main_port_is_one_line_naming_the_setting(
    tmp_path: Path, held: int, how: str, env: dict[str, str], args: tuple[str, ...], setting: str
) -> None:
    config = config_file(tmp_path, server={"port": held if how == "config" else free_port()})
    proc = gateway(config, "serve", *(a.format(port=held) for a in args),
                   env={k: v.format(port=held) for k, v in env.items()})  # fmt: skip
    assert one_line_error(proc) == (
        f"impersonation-gateway: error: cannot listen on 127.0.0.1:{held} ({setting}): something else is already "
        "listening there"
    )


@pytest.mark.parametrize(("env", "setting"), [(False, "admin.port"), (True, "GATEWAY_ADMIN_PORT")])
def test_a_taken_admin_port_is_one_line_naming_the_setting(tmp_path: Path, held: int, env: bool, setting: str) -> None:
    admin = {"port": free_port() if env else held, "tokens": ADMIN_TOKENS}
    config = config_file(tmp_path, admin=admin)
    proc = gateway(config, "serve", "--port", str(free_port()), env={"GATEWAY_ADMIN_PORT": str(held)} if env else None)
    assert one_line_error(proc) == (
        f"impersonation-gateway: error: cannot listen on 127.0.0.1:{held} ({setting}): something else is already "
        "listening there"
    )


def test_check_config_and_serve_exit_alike_on_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  port: 8080\n  host: a: b\n")
    checked, served = run(config, "check-config"), run(config, "serve")
    expected = (
        f"impersonation-gateway: error: config: {config}:3:10: not valid YAML: mapping values are not allowed here\n"
    )
    assert (checked.returncode, checked.stderr) == (2, expected)
    assert (served.returncode, served.stderr) == (2, expected)


def test_a_directory_file_with_a_yaml_error_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "directory.yaml").write_text("apps:\n  control-panel:\n    principals: [\n")
    config = config_file(tmp_path, directory={"file": "directory.yaml"})
    checked = run(config, "check-config")
    assert checked.returncode == 2
    where = f"{tmp_path / 'directory.yaml'}:4:1"
    assert checked.stderr.startswith(f"impersonation-gateway: error: directory.file: {where}: not valid YAML")
    assert "<unicode string>" not in checked.stderr and len(checked.stderr.splitlines()) == 1


def test_a_store_that_does_not_answer_is_named_with_its_cause(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    config = config_file(tmp_path, store={"url": url})
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"apps": {"control-panel": {}}}))
    for args in (("check-config",), ("directory", "load", str(tmp_path / "d.yaml")), ("audit", "tail")):
        done = run(config, *args)
        assert done.returncode == 2, (args, done.stderr)
        (line,) = done.stderr.splitlines()
        assert f"connection refused at {url}" in line, line
        assert "Error" not in line.split(": error: ", 1)[1], line  # no class names


async def test_serve_names_the_store_that_does_not_answer(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    port = free_port()
    config = config_file(tmp_path, store={"url": url})
    log = tmp_path / "out.log"
    proc = gateway(config, "serve", "--port", str(port), log=log)
    try:
        await listening_lines(log, proc, 1)  # it serves anyway: /readyz says 503 until the store answers
        events = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]
        (warning,) = [e for e in events if e["event"] == "store_unavailable"]
        assert warning["detail"] == f"connection refused at {url}"
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as answer:
            assert answer.status == 503
    finally:
        assert stop(proc) == 0


def test_a_password_never_shows_in_a_store_message(tmp_path: Path) -> None:
    url = f"redis://user:s3cret-pass@127.0.0.1:{free_port()}/0"
    done = run(config_file(tmp_path, store={"url": url}), "audit", "tail")
    assert done.returncode == 2 and "s3cret-pass" not in done.stderr and "user:***@127.0.0.1" in done.stderr


def test_audit_tail_on_the_embedded_store_says_where_its_events_are(tmp_path: Path) -> None:
    done = run(config_file(tmp_path), "audit", "tail")
    assert done.returncode == 2
    assert "directory.file" not in done.stderr and "log lines" in done.stderr


def test_a_truncated_json_lines_subject_is_not_valid_json(tmp_path: Path) -> None:
    (tmp_path / "subjects.jsonl").write_text('{"id": "1"}\n{"id": "2", "ema\n')
    (tmp_path / "directory.yaml").write_text(
        yaml.safe_dump({"apps": {"control-panel": {"subjects_file": "subjects.jsonl"}}})
    )
    done = run(config_file(tmp_path, directory={"file": "directory.yaml"}), "check-config")
    assert (
        done.stderr
        == "impersonation-gateway: error: directory.file: subjects.jsonl:2: not valid JSON (a line cut short?)\n"
    )
