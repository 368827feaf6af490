"""Real gateway processes on one real Redis: a grant works exactly once anywhere; SIGTERM drains."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.assertion import generate_key_file
from tests import processes
from tests.conftest import RedisServer, free_port

GRANTS = 15
ATTEMPTS_PER_GRANT = 8  # split across both processes, fired together
SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"


async def recording_upstream(
    aiohttp_server: Callable[..., Awaitable[TestServer]], delay: float = 0
) -> tuple[str, list[str]]:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Impersonation-Assertion", ""))
        if delay:  # the request is now in flight through the gateway
            await asyncio.sleep(delay)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


async def test_exactly_once_across_two_processes(
    tmp_path: Path, redis_server: RedisServer, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream, seen = await recording_upstream(aiohttp_server)
    key = tmp_path / "signing.pem"
    generate_key_file(key)
    ports = [free_port(), free_port()]
    apps = {"control-panel": {"dialect": "activeplatform", "upstream": upstream, "redeem_on_get": True}}
    configs = [
        processes.write_config(tmp_path, redis_server.url, port, apps=apps, prefix="once:",
                               assertion={"private_key_file": str(key)})
        for port in ports
    ]  # fmt: skip
    procs = [processes.start(c) for c in configs]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with processes.running(*procs):
        for url, proc in zip(urls, procs, strict=True):
            await processes.wait_ready(url, proc)
        async with aiohttp.ClientSession() as session:
            links = []
            for i in range(GRANTS):  # mint on either process
                headers = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
                async with session.get(urls[i % 2] + SEED, headers=headers) as response:
                    assert response.status == 200
                    body = await response.json(content_type=None)
                links.append(f"/?user_email={body['owner_email']}&user_token={body['owner_token']}")

            async def attempt(url: str) -> int:
                async with session.get(url) as response:
                    await response.read()
                    return response.status

            for link in links:
                statuses = await asyncio.gather(*(attempt(urls[i % 2] + link) for i in range(ATTEMPTS_PER_GRANT)))
                assert sorted(statuses) == [200] + [401] * (ATTEMPTS_PER_GRANT - 1), statuses
    assert len(seen) == GRANTS
    assert all(seen), "every forwarded redemption carries an assertion"
    assert [processes.stop(p) for p in procs] == [0, 0]


async def test_sigterm_finishes_in_flight_requests(
    tmp_path: Path, redis_server: RedisServer, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream, seen = await recording_upstream(aiohttp_server, delay=1.0)
    port = free_port()
    apps: dict[str, Any] = {"control-panel": {"dialect": "activeplatform", "upstream": upstream}}
    proc = processes.start(processes.write_config(tmp_path, redis_server.url, port, apps=apps))
    with processes.running(proc):
        url = f"http://127.0.0.1:{port}"
        await processes.wait_ready(url, proc)
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.get(url + "/slow"))
            while not seen:  # wait until the request is in flight upstream
                assert proc.poll() is None and not slow.done()
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            response = await slow
            assert response.status == 200 and await response.text() == "ok"
        assert await asyncio.to_thread(proc.wait, 15) == 0
