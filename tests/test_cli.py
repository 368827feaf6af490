"""The command line: serve (a real process on a real Redis, drained by SIGTERM), directory load, keys."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from gateway.cli import main
from gateway.store import Store
from tests import processes
from tests.conftest import DIRECTORY, RedisServer, free_port

ROOT = Path(__file__).parent.parent


def write_config(tmp: Path, store_url: str, port: int) -> Path:
    apps = {"control-panel": {"dialect": "activeplatform", "upstream": "http://127.0.0.1:9"}}
    return processes.write_config(tmp, store_url, port, apps=apps, prefix=f"cli{port}:")


async def test_serve_mints_then_drains_on_sigterm(tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    proc = processes.start(write_config(tmp_path, redis_server.url, port))
    with processes.running(proc):
        url = f"http://127.0.0.1:{port}"
        await processes.wait_ready(url, proc)
        async with aiohttp.ClientSession() as session:
            path = "/api/v3/resellers/1/user_authentication/token?account_id=505"
            async with session.get(url + path, headers={"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}) as response:
                assert response.status == 200
                assert (await response.json(content_type=None))["owner_email"] == "example@activeplatform.com"
        assert processes.stop(proc) == 0


def test_serve_refuses_workers_on_the_embedded_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "embedded", free_port())
    assert main(["serve", "--config", str(config), "--workers", "2"]) == 2
    assert "embedded" in capsys.readouterr().err


def test_config_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("store: {url: embedded, timeout: 3}\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().err == "impersonation-gateway: error: store.timeout: unknown key\n"


def test_keys_generate_writes_a_key_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "signing.pem"
    assert main(["keys", "generate", str(key)]) == 0
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key.stat().st_mode & 0o077 == 0
    before = key.read_bytes()
    assert main(["keys", "generate", str(key)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert key.read_bytes() == before


def test_python_dash_m_gateway_is_the_same_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True, check=True)
    for command in ("serve", "directory", "keys"):
        assert command in result.stdout


def assert_loaded(out: str, counts: str) -> None:
    """``out`` is the one line of a load of control-panel with ``counts``, in however many seconds it took."""
    assert re.fullmatch(rf"loaded control-panel: {re.escape(counts)} in \d+\.\d s\n", out), out


async def test_directory_load(tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    """A load prints what it did per app; a second load from JSON Lines replaces the subjects: a subject absent
    from it is gone, and the first load's generation is dropped after the grace period."""
    config = write_config(tmp_path, redis_server.url, free_port())
    raw = yaml.safe_load(config.read_text())
    raw["directory"]["refresh_seconds"] = 0.1  # the grace period before the old generation goes: 1.2 s
    config.write_text(yaml.safe_dump(raw))
    prefix = raw["store"]["prefix"]

    def load(path: Path) -> int:
        return main(["directory", "load", str(path), "--config", str(config)])

    assert await asyncio.to_thread(load, tmp_path / "directory.yaml") == 0
    assert_loaded(capsys.readouterr().out, "4 subjects (4 added, 0 changed, 0 removed)")
    store = Store(aioredis.Redis.from_url(redis_server.url), prefix)
    first = (await store.generations(["control-panel"]))["control-panel"]
    assert first is not None and (await store.subject("control-panel", first, "909")) is not None
    subjects = DIRECTORY["apps"]["control-panel"]["subjects"]
    changed = [{**subjects[0], "email": "changed@example.com"}, *subjects[1:3]]  # 909 removed, 505 changed
    (tmp_path / "subjects.jsonl").write_text("".join(json.dumps(s) + "\n\n" for s in changed))
    second = tmp_path / "second.yaml"
    app = {k: v for k, v in DIRECTORY["apps"]["control-panel"].items() if k != "subjects"}
    second.write_text(yaml.safe_dump({"apps": {"control-panel": {**app, "subjects_file": "subjects.jsonl"}}}))
    assert await asyncio.to_thread(load, second) == 0
    assert_loaded(capsys.readouterr().out, "3 subjects (0 added, 1 changed, 1 removed)")
    now = (await store.generations(["control-panel"]))["control-panel"]
    assert now not in (None, first)
    assert await store.subject("control-panel", now, "909") is None
    assert (await store.subject("control-panel", now, "505")).email == "changed@example.com"  # type: ignore[union-attr]
    assert [k async for k in store.redis.scan_iter(match=f"{prefix}{{dir:control-panel}}:{first}:*")] == []
    await store.close()
    unknown = tmp_path / "other.yaml"
    unknown.write_text(yaml.safe_dump({"apps": {"nope": {}}}))
    assert await asyncio.to_thread(load, unknown) == 2
    assert "apps.nope is not an app of the config" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"apps": {"control-panel": {"principals": [{"id": "x", "role": "admin"}]}}}))
    assert await asyncio.to_thread(load, bad) == 2
    assert "apps.control-panel.principals[0]: needs token or token_sha256" in capsys.readouterr().err
    (tmp_path / "subjects.jsonl").write_text('{"id": "1"}\n{"id": "2", "colour": "red"}\n')
    assert await asyncio.to_thread(load, second) == 2
    assert "subjects.jsonl:2.colour: unknown key" in capsys.readouterr().err
    store = Store(aioredis.Redis.from_url(redis_server.url), prefix)
    assert await store.generations(["control-panel"]) == {"control-panel": now}  # a failed load changes nothing
    await store.close()


def test_directory_load_needs_a_shared_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "embedded", free_port())
    assert main(["directory", "load", str(tmp_path / "directory.yaml"), "--config", str(config)]) == 2
    assert "needs a shared Redis" in capsys.readouterr().err


async def test_audit_tail_prints_the_latest_events(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, redis_server.url, free_port())
    prefix = yaml.safe_load(config.read_text())["store"]["prefix"]
    redis = aioredis.Redis.from_url(redis_server.url)
    for n in range(3):
        await redis.xadd(f"{prefix}audit", {"event": "grant_minted", "grant_id": f"g{n}", "actor": "mgr-1"})
    await redis.aclose()
    assert await asyncio.to_thread(main, ["audit", "tail", "-n", "2", "--config", str(config)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e["grant_id"], e["actor"]) for e in lines] == [
        ("grant_minted", "g1", "mgr-1"), ("grant_minted", "g2", "mgr-1")
    ]  # fmt: skip
    assert all(e["id"] for e in lines)


def test_check_config_prints_the_routes_of_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(ROOT / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "app control-panel (activeplatform) -> http://127.0.0.1:9001" in out
    assert "  mint   GET    /api/v3/resellers/{reseller_id}/user_authentication/token" in out
    assert "  carrier query user_token + user_email (the grant's email)" in out
    assert "  carrier cookie PyramidAuth (or the app's own credential)" in out
    assert "  carrier body token + uuid (the grant's uuid) on POST /api/v2/user/login-with-token" in out
    assert "  directory: 3 principals, 3 resellers, 3 subjects" in out
    assert "gateway, on hosts no app lists: POST /v1/grants, GET /healthz, GET /readyz, GET /metrics" in out
    assert "admin listener on 127.0.0.1:8081" in out and "demo-provisioner (scim)" in out


def test_check_config_shows_hosts_and_mounts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "server": {"public_url": "https://gw.example.com"},
        "admin": {"port": None},
        "apps": {"crm": {"dialect": "pyramid", "upstream": "http://10.0.0.5:8000/base", "mount": "/crm",
                         "hosts": ["crm.example.com"], "require_reason": True, "supersede": True}},
    }))  # fmt: skip
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "app crm (pyramid) -> http://10.0.0.5:8000/base" in out
    assert "  hosts: crm.example.com; mount: /crm; login URLs: https://gw.example.com/crm/" in out
    assert "  mint   POST   /crm/API3/authentication/authenticateUserByToken" in out
    assert "require_reason: yes; supersede: yes" in out
    assert "directory: none in directory.file" in out and "admin listener: none" in out


def test_check_config_names_every_problem_on_its_own_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "subjects.jsonl").write_text('{"id": "1"}\n{"id": "1"}\n')
    (tmp_path / "directory.yaml").write_text(yaml.safe_dump({"apps": {
        "cp": {"principals": [{"id": "m", "token": "t", "role": "admin"}], "subjects_file": "subjects.jsonl"},
        "ghost": {},
    }}))  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "server": {"port": 8080},
        "admin": {"port": 8080, "tokens": [{"id": "a", "token": "t", "scopes": ["scim"]}]},
        "directory": {"file": "directory.yaml"},
        "assertion": {"private_key_file": "missing.pem", "previous_key_files": ["old.pem"]},
        "apps": {"cp": {"dialect": "activeplatform", "upstream": "http://127.0.0.1:9"},
                 "cp2": {"dialect": "activeplatform", "upstream": "http://127.0.0.1:9"}},
    }))  # fmt: skip
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert all(line.startswith("impersonation-gateway: error: ") for line in lines)
    text = "\n".join(lines)
    for expected in ("assertion.private_key_file: cannot read", "assertion.previous_key_files[0]: cannot read",
                     "admin.port: 8080 is server.port too", "apps.cp2: same no host and mount '/' as apps.cp",
                     "directory.file: apps.ghost is not an app of the config",
                     "directory.file: apps.cp: subject '1' is given twice"):  # fmt: skip
        assert expected in text, text
    assert len(lines) == 6


def test_check_config_stops_at_a_config_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.yaml").write_text("server: {port: eighty}\n")
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == 2
    assert capsys.readouterr().err == "impersonation-gateway: error: server.port: expected an integer, got 'eighty'\n"
    (tmp_path / "config.yaml").write_text(
        "directory: {file: dir.yaml}\napps: {x: {dialect: pyramid, upstream: 'http://127.0.0.1:9'}}\n"
    )
    (tmp_path / "dir.yaml").write_text('{"apps": {"x": {"subjects_file": "s.jsonl"}}}')
    (tmp_path / "s.jsonl").write_text('{"id": "1"}\nnot json\n')
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == 2
    assert capsys.readouterr().err == (
        "impersonation-gateway: error: directory.file: s.jsonl:2: not valid JSON (a line cut short?)\n"
    )
