"""The command line: serve (a real process on a real Redis, drained by SIGTERM), directory load, keys."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from gateway.cli import main
from tests.conftest import DIRECTORY, RedisServer, free_port

ROOT = Path(__file__).parent.parent


def write_config(tmp: Path, store_url: str, port: int, **extra: Any) -> Path:
    (tmp / "directory.yaml").write_text(yaml.safe_dump(DIRECTORY))
    config = {
        "server": {"port": port, "public_url": f"http://127.0.0.1:{port}"},
        "store": {"url": store_url, "prefix": f"cli{port}:"},
        "directory": {"file": "directory.yaml"},
        "apps": {"control-panel": {"dialect": "activeplatform", "upstream": "http://127.0.0.1:9"}},
        **extra,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway did not become ready: {proc.stderr.read() if proc.stderr else ''}")
            await asyncio.sleep(0.05)


def serve(config: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


async def test_serve_mints_then_drains_on_sigterm(tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    proc = serve(write_config(tmp_path, redis_server.url, port))
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, proc)
        async with aiohttp.ClientSession() as session:
            path = "/api/v3/resellers/1/user_authentication/token?account_id=505"
            async with session.get(url + path, headers={"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}) as response:
                assert response.status == 200
                assert (await response.json(content_type=None))["owner_email"] == "example@activeplatform.com"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


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


async def test_directory_load(tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, redis_server.url, free_port())
    assert (
        await asyncio.to_thread(main, ["directory", "load", str(tmp_path / "directory.yaml"), "--config", str(config)])
        == 0
    )
    assert "control-panel (4 principals, 4 subjects)" in capsys.readouterr().out
    redis = aioredis.Redis.from_url(redis_server.url)
    prefix = yaml.safe_load(config.read_text())["store"]["prefix"]
    assert await redis.exists(f"{prefix}{{directory}}:app:control-panel") == 1
    await redis.aclose()
    unknown = tmp_path / "other.yaml"
    unknown.write_text(yaml.safe_dump({"apps": {"nope": {}}}))
    assert await asyncio.to_thread(main, ["directory", "load", str(unknown), "--config", str(config)]) == 2
    assert "apps.nope is not an app of the config" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"apps": {"control-panel": {"principals": [{"id": "x", "role": "admin"}]}}}))
    assert await asyncio.to_thread(main, ["directory", "load", str(bad), "--config", str(config)]) == 2
    assert "apps.control-panel.principals[0]: needs token or token_sha256" in capsys.readouterr().err


def test_directory_load_needs_a_shared_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "embedded", free_port())
    assert main(["directory", "load", str(tmp_path / "directory.yaml"), "--config", str(config)]) == 2
    assert "needs a shared Redis" in capsys.readouterr().err
