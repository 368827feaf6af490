"""Running real gateway processes (``python -m gateway serve``) for tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import DIRECTORY

# For tests that race many presentations of one grant from one client: the losers' refusals are the point there,
# and must not add up to the client's limit (which would answer 429 instead of 401).
NO_REFUSAL_LIMIT = {"failures": 1_000_000, "window_seconds": 60}


def write_config(tmp: Path, store_url: str, port: int, *, apps: dict[str, Any], directory: dict[str, Any] | None = None,
                 prefix: str | None = None, **extra: Any) -> Path:  # fmt: skip
    """A config file (and its directory file) in ``tmp`` for a gateway on ``port``."""
    (tmp / "directory.yaml").write_text(yaml.safe_dump(directory or DIRECTORY))
    config = {
        "server": {"port": port, "public_url": f"http://127.0.0.1:{port}"},
        "store": {"url": store_url, "prefix": prefix or f"p{port}:"},
        "directory": {"file": "directory.yaml"},
        "admin": {"port": None},
        "apps": apps,
        **extra,
    }
    path = tmp / f"config-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Poll /readyz until the process answers 200 (fail with its stderr if it dies or times out)."""
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
                proc.kill()
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"gateway at {url} did not become ready: {err[-2000:]}")
            await asyncio.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
    return proc.returncode


@contextmanager
def running(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            stop(proc)
