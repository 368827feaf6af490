"""A real three-master Redis Cluster: every store operation across slots and nodes, and two gateway processes
on it redeeming each grant exactly once, wherever it was minted."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio.cluster import RedisCluster

from gateway.assertion import generate_key_file
from gateway.core import grant_id
from gateway.directory import parse_directory
from gateway.errors import StoreUnavailable
from gateway.store import Pair, Store, connect
from tests import processes
from tests.conftest import DIRECTORY, free_port
from tests.redis_topologies import Cluster, start_cluster
from tests.test_multiprocess import recording_upstream

SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
GRANTS = 12
ATTEMPTS_PER_GRANT = 8  # split across both processes, fired together


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


@pytest.fixture
async def store(cluster: Cluster, prefix: str) -> AsyncIterator[Store]:
    client = connect(cluster.url, 1.0)
    assert isinstance(client, RedisCluster)
    yield Store(client, prefix)
    await client.aclose()


def node_of(store: Store, key: str) -> int:
    """The port of the master that holds ``key``."""
    assert isinstance(store.redis, RedisCluster)
    return int(store.redis.get_node_from_key(key).port)


async def commands_run(store: Store, port: int, *names: str) -> dict[str, int]:
    """How many times the node on ``port`` has run each command (INFO commandstats)."""
    assert isinstance(store.redis, RedisCluster)
    node = store.redis.get_node(host="127.0.0.1", port=port)
    assert node is not None
    stats: dict[str, Any] = await store.redis.info("commandstats", target_nodes=node)
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names}


def ids_on_distinct_nodes(store: Store, count: int) -> list[str]:
    """Random grant ids whose grant keys live on ``count`` different masters."""
    found: dict[int, str] = {}
    while len(found) < count:
        grant = grant_id(secrets.token_urlsafe(24))
        found.setdefault(node_of(store, store.grant_key(grant)), grant)
    return list(found.values())


async def test_every_store_operation_on_a_cluster(store: Store, cluster: Cluster) -> None:
    assert await store.ping()  # /readyz: every master answers

    # Directory load: every key of an app on the master of its slot, written and switched to by scripts there.
    directory_node = node_of(store, store.current_key("control-panel"))
    assert node_of(store, store.subject_key("control-panel", "g", "505")) == directory_node
    assert node_of(store, store.index_key("control-panel", "g", "email", "a@b.c")) == directory_node
    masters = {int(node.port) for node in store.redis.get_primaries()}  # type: ignore[union-attr]
    before = {port: await commands_run(store, port, "evalsha", "eval") for port in masters}
    summary = (await store.load_directory(parse_directory(DIRECTORY)))["control-panel"]
    after = {port: await commands_run(store, port, "evalsha", "eval") for port in masters}
    ran = {port: sum(after[port].values()) - sum(before[port].values()) for port in masters}
    assert ran[directory_node] >= 2 and all(n == 0 for port, n in ran.items() if port != directory_node)
    assert await store.generations(["control-panel", "absent"]) == {"control-panel": summary.generation, "absent": None}
    found = await store.actors("control-panel", summary.generation)
    assert found is not None and found[0].principal_by_id("mgr-1") is not None
    subjects = await store.subjects_by(
        "control-panel", summary.generation, [("id", "505"), ("email", "owner707@example.com")]
    )
    assert sorted(s.id for s in subjects) == ["505", "707"]  # SUNION and MGET within the app's slot

    # Mint: two grants on two different masters and the audit entry, in one pipeline across slots.
    first, second = ids_on_distinct_nodes(store, 2)
    await store.put_grants(
        "control-panel", [(first, b'{"n":1}', 60_000), (second, b'{"n":2}', 60_000)], {"event": "grant_minted"}
    )
    assert [entry[1] for entry in await store.read_audit()] == [{b"event": b"grant_minted"}]

    # Redeem: the script (EVALSHA, loaded on demand on each master) touches one slot per grant.
    assert (await store.consume(first)).state == "redeemed"
    assert (await store.consume(first)).grant == b'{"n":1}'
    assert (await store.consume(first)).state == "reused"
    assert (await store.consume(second)).grant == b'{"n":2}'
    assert (await store.consume(grant_id("never minted"))).state == "unknown"
    await store.append_audit({"event": "grant_redeemed"})
    assert len(await store.read_audit()) == 2

    # Revocation: grants on several masters, indexed in the app's slot; found, read and deleted across slots.
    live = ids_on_distinct_nodes(store, 3)
    pair = Pair(store.pair_key("control-panel", "mgr-1", "505"), 60_000)
    await store.put_grants("control-panel", [(g, b'{"n":3}', 60_000) for g in live], {"event": "grant_minted"}, pair)
    assert await store.newest(pair.key) == live[0]
    assert node_of(store, pair.key) == node_of(store, store.live_key("control-panel"))
    listed = [g async for batch in store.live_grants("control-panel", batch=2) for g in batch]
    assert set(live) <= set(listed)
    assert await store.revoke(live[0]) == b'{"n":3}' and await store.revoke(live[0]) is None
    assert await store.grants(live[1:]) == [b'{"n":3}', b'{"n":3}']
    assert await store.delete_grants("control-panel", live[1:]) == [True, True]
    assert await store.delete_grants("control-panel", live[1:]) == [False, False]

    # Failure counters: several keys on several masters, counted and read back in pipelines.
    fingerprints: dict[int, str] = {}
    while len(fingerprints) < 3:  # credential fingerprints whose counters live on three masters
        fingerprint = secrets.token_hex(6)
        fingerprints.setdefault(node_of(store, store.failure_key("credential", fingerprint)), fingerprint)
    keys = [("client", "127.0.0.1"), *(("credential", f) for f in fingerprints.values())]
    assert len({node_of(store, store.failure_key(kind, value)) for kind, value in keys}) >= 2
    assert await store.record_failure(keys, 60) == [1, 1, 1, 1]
    assert await store.record_failure(keys[:2], 60) == [2, 2]
    counts = await asyncio.gather(*(store.redis.get(store.failure_key(kind, value)) for kind, value in keys))
    assert [int(c) for c in counts] == [2, 2, 1, 1]
    ttls = await asyncio.gather(*(store.redis.ttl(store.failure_key(kind, value)) for kind, value in keys))
    assert all(0 < ttl <= 60 for ttl in ttls), ttls


def grant_id_of(link: str) -> str:
    return grant_id(parse_qs(urlsplit(link).query)["user_token"][0])


async def test_a_failed_audit_append_removes_the_grants_from_every_master(store: Store) -> None:
    await store.redis.set(store.audit_key, "not a stream")  # XADD now fails with WRONGTYPE
    hashes = ids_on_distinct_nodes(store, 3)
    with pytest.raises(StoreUnavailable):
        await store.put_grants("control-panel", [(h, b"{}", 60_000) for h in hashes], {"event": "grant_minted"})
    assert await asyncio.gather(*(store.redis.exists(store.grant_key(h)) for h in hashes)) == [0, 0, 0]


async def test_two_gateways_on_a_cluster_redeem_each_grant_exactly_once(
    tmp_path: Path, cluster: Cluster, store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream, seen = await recording_upstream(aiohttp_server)
    key = tmp_path / "signing.pem"
    generate_key_file(key)
    ports, admin_ports = [free_port(), free_port()], [free_port(), free_port()]
    apps = {"control-panel": {"dialect": "activeplatform", "upstream": upstream, "redeem_on_get": True}}
    revoker = {"id": "ops", "token": "ops-token", "scopes": ["revoke"]}
    configs = [
        processes.write_config(tmp_path, cluster.url, port, apps=apps, prefix=store.prefix,
                               assertion={"private_key_file": str(key)},
                               admin={"port": admin, "tokens": [revoker]}, rate_limit=processes.NO_REFUSAL_LIMIT)
        for port, admin in zip(ports, admin_ports, strict=True)
    ]  # fmt: skip
    procs = [processes.start(c) for c in configs]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with processes.running(*procs):
        for url, proc in zip(urls, procs, strict=True):
            await processes.wait_ready(url, proc)  # /readyz pings every master
        assert (await store.generations(["control-panel"]))["control-panel"] is not None  # loaded at start-up
        async with aiohttp.ClientSession() as session:

            async def mint(url: str) -> str:
                async with session.get(url + SEED, headers=MANAGER) as response:
                    assert response.status == 200, await response.text()
                    body = await response.json(content_type=None)
                return f"/?user_email={body['owner_email']}&user_token={body['owner_token']}"

            async def attempt(url: str) -> int:
                async with session.get(url) as response:
                    await response.read()
                    return response.status

            # Minted on one process, redeemed on the other, in both directions.
            for minter, redeemer in ((0, 1), (1, 0)):
                link = await mint(urls[minter])
                assert await attempt(urls[redeemer] + link) == 200
                assert await attempt(urls[minter] + link) == 401

            # Many grants minted on either process, each raced by both.
            links = [await mint(urls[i % 2]) for i in range(GRANTS)]
            for link in links:
                statuses = await asyncio.gather(*(attempt(urls[i % 2] + link) for i in range(ATTEMPTS_PER_GRANT)))
                assert sorted(statuses) == [200] + [401] * (ATTEMPTS_PER_GRANT - 1), statuses

            # Revoked through the other process's admin listener: one grant by id, then every one of an actor.
            admins = [f"http://127.0.0.1:{p}" for p in admin_ports]
            ops = {"Authorization": "Bearer ops-token"}
            by_id, *by_actor = [await mint(urls[0]) for _ in range(4)]
            grant_id = grant_id_of(by_id)
            async with session.delete(f"{admins[1]}/v1/grants/{grant_id}", headers=ops) as response:
                assert response.status == 204
            async with session.post(f"{admins[1]}/v1/revocations", json={"app": "control-panel", "actor": "mgr-1"},
                                    headers=ops) as response:  # fmt: skip
                assert (response.status, await response.json()) == (200, {"revoked": 3})
            for link in (by_id, *by_actor):
                assert await attempt(urls[0] + link) == 401

            # A wrong credential is counted in the cluster.
            async with session.get(urls[0] + SEED, headers={"X-Api-Token": "wrong"}) as response:
                assert response.status == 401
    assert [processes.stop(p) for p in procs] == [0, 0]
    redeemed = GRANTS + 2
    assert len(seen) == redeemed and all(seen), "each grant reached the upstream once, with an assertion"

    # The grants (now tombstones) are spread over the masters, and the audit stream holds every event.
    assert isinstance(store.redis, RedisCluster)
    tombstones = [k async for k in store.redis.scan_iter(match=f"{store.prefix}used:*")]
    assert len(tombstones) == redeemed + 4  # and the four revoked ones, marked so
    assert len({node_of(store, k.decode()) for k in tombstones}) >= 2
    events = [entry[1][b"event"] for entry in await store.read_audit(count=1000)]
    assert events.count(b"grant_minted") == redeemed + 4 and events.count(b"grant_redeemed") == redeemed
    assert events.count(b"grant_revoked") == 4
    assert [k async for k in store.redis.scan_iter(match=f"{store.prefix}fail:*")]
