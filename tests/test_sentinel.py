"""Two gateway processes behind real Sentinels survive a ``SENTINEL FAILOVER``: they follow the new master, and
a grant minted before the failover is still redeemable exactly once after it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import redis as sync_redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from gateway.assertion import generate_key_file
from gateway.core import grant_id
from gateway.store import Store
from tests import processes
from tests.conftest import free_port
from tests.redis_topologies import SERVICE, SentinelSetup, poll, start_sentinel_setup
from tests.test_multiprocess import recording_upstream

SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
ATTEMPTS = 8  # split across both processes, fired together
PREFIX = "sentinel:"


def no_gateway_clients(port: int) -> bool | None:
    """True when the server at ``port`` has no ordinary client connection open but the sentinels' and this one
    (so none of a gateway's); None while it has."""
    client = sync_redis.Redis(port=port, socket_timeout=2, decode_responses=True)
    try:
        me = client.client_id()
        others = [
            c["addr"]
            for c in client.client_list(_type="normal")
            if int(c["id"]) != me and not c["name"].startswith("sentinel-")
        ]
        return None if others else True
    finally:
        client.close()


async def test_gateways_follow_a_sentinel_failover(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    setup: SentinelSetup = start_sentinel_setup(tmp_path / "redis", sentinels=2)
    try:
        await run_failover(tmp_path, setup, aiohttp_server)
    finally:
        setup.stop()


async def run_failover(
    tmp_path: Path, setup: SentinelSetup, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    old, new = (s.port for s in setup.servers)
    assert setup.master_ports() == {old}
    upstream, seen = await recording_upstream(aiohttp_server)
    key = tmp_path / "signing.pem"
    generate_key_file(key)
    ports = [free_port(), free_port()]
    apps = {"control-panel": {"dialect": "activeplatform", "upstream": upstream, "redeem_on_get": True}}
    configs = [
        processes.write_config(tmp_path, setup.url, port, apps=apps, prefix=PREFIX,
                               assertion={"private_key_file": str(key)}, rate_limit=processes.NO_REFUSAL_LIMIT)
        for port in ports
    ]  # fmt: skip
    procs = [processes.start(c) for c in configs]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with processes.running(*procs):
        for url, proc in zip(urls, procs, strict=True):
            await processes.wait_ready(url, proc)
        async with aiohttp.ClientSession() as session:

            async def mint(url: str) -> tuple[str, str]:
                async with session.get(url + SEED, headers=MANAGER) as response:
                    assert response.status == 200, await response.text()
                    body = await response.json(content_type=None)
                token = body["owner_token"]
                return token, f"/?user_email={body['owner_email']}&user_token={token}"

            async def attempt(url: str) -> int:
                async with session.get(url) as response:
                    await response.read()
                    return response.status

            async def race(link: str) -> list[int]:
                return sorted(await asyncio.gather(*(attempt(urls[i % 2] + link) for i in range(ATTEMPTS))))

            # Before: a grant from each process, and one redeemed, all on the replica too.
            before = [await mint(urls[0]), await mint(urls[1])]
            used_before = await mint(urls[0])
            assert await attempt(urls[1] + used_before[1]) == 200
            master = sync_redis.Redis(port=old, socket_timeout=15)
            # WAIT returns as soon as the replica acknowledges: the 10 s only bound a failure.
            assert master.wait(1, 10_000) == 1, "the replica acknowledged every write"
            master.close()

            sentinel = setup.sentinel(setup.sentinel_ports[0])
            assert sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE) == "OK"
            sentinel.close()
            poll(
                "every sentinel to report the new master",
                lambda: setup.master_ports() == {new} or None,
                explain=setup.explain,
            )
            # The old master stays a writable master until the sentinels demote it, seconds later: the
            # gateways must leave it by themselves (they ask the sentinels again at most once a second).
            poll("the gateways to leave the old master", lambda: no_gateway_clients(old), explain=setup.explain)

            # After: mint and redeem work, across processes, in both directions.
            after = []
            for minter, redeemer in ((0, 1), (1, 0)):
                token, link = await mint(urls[minter])
                assert await attempt(urls[redeemer] + link) == 200
                assert await attempt(urls[minter] + link) == 401
                after.append(token)
            # The grants minted before: each exactly once, raced by both processes; the one used before stays used.
            for token, link in before:
                assert await race(link) == [200] + [401] * (ATTEMPTS - 1)
                after.append(token)
            assert await race(used_before[1]) == [401] * ATTEMPTS
    assert [processes.stop(p) for p in procs] == [0, 0]
    assert len(seen) == 1 + len(after) and all(seen)

    # Every redemption since the failover happened on the new master: its tombstones are there.
    client = aioredis.Redis(port=new, socket_timeout=2)
    try:
        store = Store(client, PREFIX)
        for token in [used_before[0], *after]:
            assert await client.exists(store.tombstone_key(grant_id(token))) == 1
            assert await client.exists(store.grant_key(grant_id(token))) == 0
        events = [entry[1][b"event"] for entry in await store.read_audit(count=100)]
        assert events.count(b"grant_redeemed") == 1 + len(after)
        assert (await client.execute_command("ROLE"))[0] == b"master"
    finally:
        await client.aclose()
