"""Real gateway processes on one real Redis: a grant works exactly once anywhere; SIGTERM drains."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.assertion import generate_key_file
from tests import processes
from tests.conftest import RedisServer, free_port, until

GRANTS = 10  # per dialect
ATTEMPTS_PER_GRANT = 8  # split across both processes, fired together
SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"


async def recording_upstream(
    aiohttp_server: Callable[..., Awaitable[TestServer]], hold: asyncio.Event | None = None
) -> tuple[str, list[str]]:
    """An upstream that records each request's assertion and answers ``ok`` (once ``hold`` is set, if given)."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Impersonation-Assertion", ""))
        if hold is not None:  # the request is now in flight through the gateway, until the test lets it go
            await hold.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


DEMO_DIRECTORY = yaml.safe_load((Path(__file__).parent.parent / "directory.yaml").read_text())
DEMO_DIALECTS = {
    "control-panel": "activeplatform",
    "analytics": "pyramid",
    "switch": "denovolab",
    "exchange": "btcdirect",
}
Attempt = tuple[str, str, dict[str, str], Any]  # method, path, headers, JSON body


async def mint(session: aiohttp.ClientSession, url: str, app: str) -> Attempt:
    """Mint a grant on ``url`` in ``app``'s dialect; return the redemption request through its carrier."""
    if app == "control-panel":
        async with session.get(url + SEED, headers={"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}) as r:
            body = await r.json(content_type=None)
        return "GET", "/?" + urlencode({"user_email": body["owner_email"], "user_token": body["owner_token"]}), {}, None
    if app == "analytics":
        request = {"token": "pyramid-enterprise-admin-token", "userIdentity": "jdoe"}
        async with session.post(url + "/API3/authentication/authenticateUserByToken", json=request) as r:
            return "GET", "/reports?" + urlencode({"token": await r.text()}), {}, None
    if app == "switch":
        headers = {"X-Auth-Token": "denovolab-demo-admin-token"}
        async with session.post(url + "/v1/auth/as_client", json={"client_id": 41}, headers=headers) as r:
            body = await r.json(content_type=None)
        return "GET", "/cdr", {"X-Auth-Token": body["cdr_api_token"]}, None
    headers = {"Authorization": "Bearer btcdirect-partner-demo-token",
               "User-Identifier": "7c3f9a1e2b4d6f8091a3c5e7f9b1d3e5a7c9e1f3"}  # fmt: skip
    async with session.get(url + "/api/v1/user/login-token", headers=headers) as r:
        body = await r.json(content_type=None)
    return "POST", "/api/v2/user/login-with-token", {}, {"uuid": body["uuid"], "token": body["token"]}


async def test_exactly_once_across_two_processes_in_every_dialect(
    tmp_path: Path, redis_server: RedisServer, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream, seen = await recording_upstream(aiohttp_server)
    key = tmp_path / "signing.pem"
    generate_key_file(key)
    ports = [free_port(), free_port()]
    apps = {app: {"dialect": d, "upstream": upstream, "redeem_on_get": True} for app, d in DEMO_DIALECTS.items()}
    configs = [
        processes.write_config(tmp_path, redis_server.url, port, apps=apps, directory=DEMO_DIRECTORY, prefix="once:",
                               assertion={"private_key_file": str(key)}, rate_limit=processes.NO_REFUSAL_LIMIT)
        for port in ports
    ]  # fmt: skip
    procs = [processes.start(c) for c in configs]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with processes.running(*procs):
        for url, proc in zip(urls, procs, strict=True):
            await processes.wait_ready(url, proc)
        async with aiohttp.ClientSession() as session:

            async def attempt(url: str, request: Attempt) -> int:
                method, path, headers, body = request
                async with session.request(method, url + path, headers=headers, json=body) as response:
                    await response.read()
                    return response.status

            for app in DEMO_DIALECTS:
                for i in range(GRANTS):  # minted on either process, raced on both
                    request = await mint(session, urls[i % 2], app)
                    statuses = await asyncio.gather(*(attempt(urls[j % 2], request) for j in range(ATTEMPTS_PER_GRANT)))
                    assert sorted(statuses) == [200] + [401] * (ATTEMPTS_PER_GRANT - 1), (app, statuses)
    assert len(seen) == GRANTS * len(DEMO_DIALECTS)
    assert all(seen), "every forwarded redemption carries an assertion"
    assert [processes.stop(p) for p in procs] == [0, 0]


async def test_sigterm_finishes_in_flight_requests(
    tmp_path: Path, redis_server: RedisServer, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    hold = asyncio.Event()
    upstream, seen = await recording_upstream(aiohttp_server, hold)
    port = free_port()
    apps: dict[str, Any] = {"control-panel": {"dialect": "activeplatform", "upstream": upstream}}
    proc = processes.start(processes.write_config(tmp_path, redis_server.url, port, apps=apps))
    with processes.running(proc):
        url = f"http://127.0.0.1:{port}"
        await processes.wait_ready(url, proc)
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.get(url + "/slow"))
            try:

                async def in_flight() -> bool:
                    assert proc.poll() is None and not slow.done()
                    return bool(seen)

                await until("the request to be in flight upstream", in_flight)
                proc.send_signal(signal.SIGTERM)
                # Draining: the listener is closed, and the request still waits for its upstream.
                await until("the gateway to stop listening", lambda: refused(port))
                assert proc.poll() is None and not slow.done()
            finally:
                hold.set()
            response = await slow
            assert response.status == 200 and await response.text() == "ok"
        assert await asyncio.to_thread(proc.wait, 15) == 0


async def refused(port: int) -> bool:
    """Whether 127.0.0.1:``port`` refuses a connection (nothing listens there any more)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False
