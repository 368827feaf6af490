"""Shared fixtures: a real redis-server per session, fakeredis per test, a recording upstream, and a
factory that builds a gateway test client on either store."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import jwt
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.app import create_app
from gateway.config import Config, config_from_dict
from gateway.directory import parse_directory
from gateway.store import Store

KEY = Ed25519PrivateKey.generate()
PUBLIC_URL = "http://gateway.test"

# One app per dialect, as the demo has them, each with a small directory.
DIRECTORY: dict[str, Any] = {
    "apps": {
        "control-panel": {
            "resellers": [{"id": 1}, {"id": 7, "parent": 1}, {"id": 8, "parent": 7}, {"id": 9}],
            "principals": [
                {"id": "mgr-1", "token": "vY5fwetestK3gJXZH5uHCw", "role": "admin", "reseller": 1},
                {"id": "mgr-7", "token": "manager-7-token", "role": "admin", "reseller": 7},
                {"id": "own-1", "token": "owner-1-token", "role": "owner", "reseller": 1},
                {"id": "mkt-1", "token": "marketing-1-token", "role": "marketing", "reseller": 1},
            ],
            "subjects": [
                {"id": "505", "email": "example@activeplatform.com", "reseller": 1},
                {"id": "707", "email": "owner707@example.com", "reseller": 7},
                {"id": "808", "email": "owner808@example.com", "reseller": 8},
                {"id": "909", "email": "owner909@example.com", "reseller": 9},
            ],
        },
    }
}

APPS: dict[str, Any] = {
    "control-panel": {"dialect": "activeplatform", "upstream": "http://upstream.invalid", "grant_ttl_seconds": 60},
}


# The gateway's and the demo's default ports. The whole session holds each of them that is free, so a test that
# needs one (a config without an explicit port, a hard-coded URL) fails on every run, not only on a machine where
# something else happens to listen there.
DEFAULT_PORTS = (8080, 8081, 9001)


@pytest.fixture(scope="session", autouse=True)
def default_ports_held() -> Iterator[list[socket.socket]]:
    """Listen on 127.0.0.1 at each of ``DEFAULT_PORTS`` that is free, for the whole session (a port something
    else already holds stays held by it); yields the sockets this fixture opened."""
    held = []
    for port in DEFAULT_PORTS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            sock.close()
            continue
        held.append(sock)
    yield held
    for sock in held:
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_redis(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll PING until the server answers (or fail saying whether it exited: a port another process took between
    ``free_port()`` and the server's bind makes it exit at once)."""
    client = sync_redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.ping():
                return
        except sync_redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                how = f"exited with {proc.returncode}" if proc.poll() is not None else f"no answer in {timeout} s"
                raise RuntimeError(f"redis-server on {port} did not start ({how})") from None
            time.sleep(0.02)
        finally:
            client.close()


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout: float = 15.0, every: float = 0.02) -> Any:
    """Await ``check()`` until it returns something truthy, and return that; fail naming ``what`` once ``timeout``
    seconds have passed without. The deadline is generous: it bounds a failure, never a passing run."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_redis(self.port, self.proc)


def start_redis(tmp: Path, *extra: str) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server): integration tests need it")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp), *extra]  # fmt: skip
    server = RedisServer(port, subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), args)
    wait_for_redis(port, server.proc)
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session, on a free port."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["fakeredis", "redis"])
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Each test runs twice: on a fresh fakeredis, and on the real redis-server."""
    if request.param == "fakeredis":
        client: Any = fakeredis.FakeAsyncRedis()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own: tests share the real server and never flush it."""
    return f"t{uuid.uuid4().hex[:10]}:"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    url: str
    requests: list[Recorded]

    def claims(self, index: int = -1, audience: str = "control-panel") -> dict[str, Any]:
        """The verified claims of the assertion the upstream received."""
        token = self.requests[index].headers["X-Impersonation-Assertion"]
        return jwt.decode(token, KEY.public_key(), algorithms=["EdDSA"], audience=audience, issuer=PUBLIC_URL)


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    """A downstream app that records every request and answers with a cookie, a Location and a body."""
    seen: list[Recorded] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(
            Recorded(request.method, request.path, dict(request.query), dict(request.headers), await request.read())
        )
        response = web.json_response({"path": request.path, "n": len(seen)}, status=200)
        response.set_cookie("app_session", f"s{len(seen)}")
        response.headers["Location"] = "/dashboard"
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(app)
    return Upstream(str(server.make_url("")).rstrip("/"), seen)


GatewayFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def make_config(prefix: str, upstream_url: str, apps: dict[str, Any] | None = None, **sections: Any) -> Config:
    apps = apps or APPS
    raw: dict[str, Any] = {
        "server": {"public_url": PUBLIC_URL, **sections.pop("server", {})},
        "store": {"url": "embedded", "prefix": prefix, **sections.pop("store", {})},
        "admin": {"port": None, **sections.pop("admin", {})},
        "apps": {name: {**settings, "upstream": upstream_url} for name, settings in apps.items()},
        **sections,
    }
    return config_from_dict(raw)


@pytest.fixture
async def gateway(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], redis_client: Any, upstream: Upstream, prefix: str
) -> GatewayFactory:
    """``await gateway(apps=..., directory=..., **config sections)`` -> a test client on a fresh gateway."""

    async def make(
        apps: dict[str, Any] | None = None, directory: dict[str, Any] | None = None, **sections: Any
    ) -> TestClient[Any, Any]:
        config = make_config(prefix, upstream.url, apps, **sections)
        await Store(redis_client, prefix).load_directory(parse_directory(directory or DIRECTORY))
        return await aiohttp_client(create_app(config, redis=redis_client, key=KEY))

    return make
