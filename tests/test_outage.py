"""A real redis-server killed and restarted under load: bounded 503s, readiness, self-healing, and no grant
handed out unstored or redeemed twice."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from gateway.app import create_app
from gateway.core import grant_id
from gateway.directory import parse_directory
from gateway.store import Store, connect
from tests.conftest import DIRECTORY, KEY, Upstream, make_config, start_redis, until

SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
APPS = {"control-panel": {"dialect": "activeplatform", "redeem_on_get": True, "grant_ttl_seconds": 300}}
ANSWER_BOUND = 5.0  # seconds: ten times the store timeout (0.5 s), far below "as long as Redis is down"


async def test_redis_killed_and_restarted_under_load(
    aiohttp_client: Any, upstream: Upstream, prefix: str, tmp_path: Path
) -> None:
    # appendfsync always: a write Redis acknowledged survives its restart, so "stored" can be checked after.
    server = start_redis(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    redis = connect(server.url, 0.5)  # as the gateway makes its client: bounded timeouts, no retries
    await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
    config = make_config(prefix, upstream.url, apps=APPS, store={"timeout_seconds": 0.5})
    client = await aiohttp_client(create_app(config, redis=redis, key=KEY))

    held: list[str] = []  # tokens handed out and never redeemed: must all be stored
    redeemed: list[str] = []  # tokens whose redemption got a 200: each at most once
    statuses: list[int] = []
    slowest = 0.0
    done = asyncio.Event()

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
        while not done.is_set():
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

    async def answered(count: int, since: int = 0, status: int | None = None) -> bool:
        return sum(status in (None, s) for s in statuses[since:]) >= count

    async def healed(since: int) -> bool:
        """Enough answers since the restart, the last dozen (two a worker) all 200."""
        return len(statuses) >= since + 24 and set(statuses[-12:]) == {200}

    async def outage() -> tuple[int, int]:
        # Counted in answers, not seconds: the load runs as long as each phase needs, however busy the machine.
        try:
            await until("answers before the outage", lambda: answered(60))
            server.stop()
            stopped = len(statuses)
            await until("a 503 during the outage", lambda: answered(1, stopped, 503))
            ready, health = (await client.get("/readyz")).status, (await client.get("/healthz")).status
            await until("answers during the outage", lambda: answered(60, stopped))
            server.start()
            restarted = len(statuses)
            await until("the gateway to heal by itself", lambda: healed(restarted))
            return ready, health
        finally:
            done.set()

    try:
        *_, (ready_during, health_during) = await asyncio.gather(*(load(i) for i in range(6)), outage())
        assert (ready_during, health_during) == (503, 200)
        assert set(statuses) <= {200, 401, 503}, set(statuses)
        assert 503 in statuses and statuses[-1] == 200  # the outage was seen, and healed by itself
        # Each answer is bounded by the store timeout (0.5 s); the bound is loose so that only a hang fails it.
        assert slowest < ANSWER_BOUND, f"a request took {slowest:.2f} s"
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
    redis = connect(server.url, 0.5)  # as the gateway makes its client: bounded timeouts, no retries
    await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
    config = make_config(prefix, upstream.url, apps=APPS, store={"timeout_seconds": 0.5})
    client = await aiohttp_client(create_app(config, redis=redis, key=KEY))
    try:
        assert (await client.get(SEED, headers=MANAGER)).status == 200
        server.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
        # Without a timeout these would wait for as long as Redis is stopped: the bound tells that from 0.5 s.
        async with asyncio.timeout(ANSWER_BOUND):
            responses = await asyncio.gather(*(client.get(SEED, headers=MANAGER) for _ in range(10)))
        assert [r.status for r in responses] == [503] * 10
        server.proc.send_signal(signal.SIGCONT)
        await until("a mint to work again after Redis answers again", lambda: minted(client))
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()
        await redis.aclose()


async def minted(client: Any) -> bool:
    return (await client.get(SEED, headers=MANAGER)).status == 200
