"""A real redis-server killed and restarted under load: bounded 503s, readiness, self-healing, and no grant
handed out unstored or redeemed twice."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from gateway.app import create_app
from gateway.core import grant_id
from gateway.directory import parse_directory
from gateway.store import Store
from tests.conftest import DIRECTORY, KEY, Upstream, make_config, start_redis

SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
APPS = {"control-panel": {"dialect": "activeplatform", "redeem_on_get": True, "grant_ttl_seconds": 300}}


async def test_redis_killed_and_restarted_under_load(
    aiohttp_client: Any, upstream: Upstream, prefix: str, tmp_path: Path
) -> None:
    # appendfsync always: a write Redis acknowledged survives its restart, so "stored" can be checked after.
    server = start_redis(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    redis = aioredis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
    config = make_config(prefix, upstream.url, apps=APPS, store={"timeout_seconds": 0.5})
    client = await aiohttp_client(create_app(config, redis=redis, key=KEY))

    held: list[str] = []  # tokens handed out and never redeemed: must all be stored
    redeemed: list[str] = []  # tokens whose redemption got a 200: each at most once
    statuses: list[int] = []
    slowest = 0.0
    stop_at = time.monotonic() + 3.0

    async def timed(coro: Any) -> Any:
        nonlocal slowest
        started = time.monotonic()
        response = await coro
        await response.read()
        slowest = max(slowest, time.monotonic() - started)
        statuses.append(response.status)
        return response

    async def load(worker: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            minted = await timed(client.get(SEED, headers=MANAGER))
            if minted.status != 200:
                await asyncio.sleep(0.01)
                continue
            body = await minted.json(content_type=None)
            if n % 2:
                held.append(body["owner_token"])
                continue
            link = f"/?user_email={body['owner_email']}&user_token={body['owner_token']}"
            if (await timed(client.get(link))).status == 200:
                redeemed.append(body["owner_token"])

    async def outage() -> tuple[int, int]:
        await asyncio.sleep(1.0)
        server.stop()
        await asyncio.sleep(0.3)
        ready, health = (await client.get("/readyz")).status, (await client.get("/healthz")).status
        await asyncio.sleep(0.7)
        server.start()
        return ready, health

    try:
        *_, (ready_during, health_during) = await asyncio.gather(*(load(i) for i in range(6)), outage())
        assert (ready_during, health_during) == (503, 200)
        assert set(statuses) <= {200, 401, 503}, set(statuses)
        assert 503 in statuses and statuses[-1] == 200  # the outage was seen, and healed by itself
        assert slowest < 2.0, f"a request took {slowest:.2f} s"
        assert (await client.get("/readyz")).status == 200
        assert len(redeemed) == len(set(redeemed)) > 0
        store = Store(redis, prefix)
        missing = [t for t in held if not await redis.exists(store.grant_key(grant_id(t)))]
        assert held and missing == [], f"{len(missing)} of {len(held)} grants handed out were not stored"
        jtis = [upstream.claims(i)["jti"] for i in range(len(upstream.requests))]
        assert len(jtis) == len(set(jtis)) == len(redeemed)
    finally:
        server.stop()
        await redis.aclose()


async def test_a_hung_redis_costs_at_most_the_timeout(
    aiohttp_client: Any, upstream: Upstream, prefix: str, tmp_path: Path
) -> None:
    server = start_redis(tmp_path)
    redis = aioredis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
    config = make_config(prefix, upstream.url, apps=APPS, store={"timeout_seconds": 0.5})
    client = await aiohttp_client(create_app(config, redis=redis, key=KEY))
    try:
        assert (await client.get(SEED, headers=MANAGER)).status == 200
        server.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
        started = time.monotonic()
        responses = await asyncio.gather(*(client.get(SEED, headers=MANAGER) for _ in range(10)))
        assert [r.status for r in responses] == [503] * 10
        assert time.monotonic() - started < 2.0
        server.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 5
        while (await client.get(SEED, headers=MANAGER)).status != 200:
            assert time.monotonic() < deadline, "did not recover after Redis answered again"
            await asyncio.sleep(0.05)
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()
        await redis.aclose()
