"""The store: what reaches Redis (never a token), how many round trips, expiry, the directory, outages."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.directory import Subject, parse_directory
from gateway.store import Contended, Store
from tests.conftest import DIRECTORY, KEY, GatewayFactory, Upstream, make_config, start_redis, until

SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
MEDIA = "application/vnd.api+json"
REDEEM_ON_GET = {"control-panel": {"dialect": "activeplatform", "redeem_on_get": True, "grant_ttl_seconds": 60}}
OUTAGE_ANSWER_BOUND = 5.0  # seconds: ten times the store timeout these tests configure (0.5 s)
# The shortest grant there is, for the one test that waits for a grant to expire.
SHORT_LIVED = {"control-panel": {**REDEEM_ON_GET["control-panel"], "grant_ttl_seconds": 1}}


async def mint(client: TestClient[Any, Any]) -> dict[str, str]:
    response = await client.get(SEED, headers=MANAGER)
    assert response.status == 200
    body: dict[str, str] = await response.json(content_type=MEDIA)
    return body


async def ready(client: TestClient[Any, Any]) -> bool:
    return (await client.get("/readyz")).status == 200


def redeem_path(body: dict[str, str]) -> str:
    return f"/?user_email={body['owner_email']}&user_token={body['owner_token']}"


async def dump(redis: Any, prefix: str) -> bytes:
    """Every key under ``prefix`` and every value it holds, as one blob to search."""
    blob = b""
    async for key in redis.scan_iter(match=f"{prefix}*"):
        kind = await redis.type(key)
        blob += key + b"\n"
        if kind == b"string":
            blob += await redis.get(key) + b"\n"
        elif kind == b"set":
            blob += b" ".join(sorted(await redis.smembers(key))) + b"\n"
        elif kind == b"zset":
            blob += b" ".join(await redis.zrange(key, 0, -1)) + b"\n"
        elif kind == b"stream":
            blob += repr(await redis.xrange(key)).encode() + b"\n"
        else:
            raise AssertionError(f"unexpected key type {kind!r} at {key!r}")
    return blob


async def test_no_token_or_plain_credential_is_stored(gateway: GatewayFactory, redis_client: Any, prefix: str) -> None:
    client = await gateway()
    tokens = [(await mint(client))["owner_token"] for _ in range(3)]
    blob = await dump(redis_client, prefix)
    assert b"grant:" in blob and b"audit" in blob
    for secret in [*tokens, "vY5fwetestK3gJXZH5uHCw", "manager-7-token"]:
        assert secret.encode() not in blob


async def grant_keys(redis: Any, prefix: str) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=f"{prefix}grant:*")]


async def test_grant_expires(gateway: GatewayFactory, upstream: Upstream, redis_client: Any, prefix: str) -> None:
    client = await gateway(apps=SHORT_LIVED)
    body = await mint(client)
    (key,) = await grant_keys(redis_client, prefix)

    async def gone() -> bool:
        return await redis_client.exists(key) == 0

    await until("PX to drop the grant (its TTL is 1 s)", gone)
    assert (await client.get(redeem_path(body))).status == 401
    assert upstream.requests == []


async def test_grant_holds_until_its_ttl(
    gateway: GatewayFactory, upstream: Upstream, redis_client: Any, prefix: str
) -> None:
    client = await gateway(apps=REDEEM_ON_GET)
    await mint(client)
    (key,) = await grant_keys(redis_client, prefix)
    # The key lives as long as the grant (60 s): half of that is ample for a loaded machine to get here.
    assert 30_000 < await redis_client.pttl(key) <= 60_000
    grant = json.loads(await redis_client.get(key))
    assert grant["expires_at"] - grant["issued_at"] == 60


@pytest.mark.parametrize("redis_client", ["redis"], indirect=True)
async def test_redis_commands_per_mint_and_redemption(gateway: GatewayFactory, redis_client: Any) -> None:
    """Measured with INFO commandstats on the real server: the figures quoted in docs/benchmark.md."""
    client = await gateway(apps=REDEEM_ON_GET)

    async def calls() -> dict[str, int]:
        stats = await redis_client.info("commandstats")
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}

    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0) and k != "info"}

    start = await calls()
    body = await mint(client)
    minted = await calls()
    assert await client.get(redeem_path(body)) is not None
    redeemed = await calls()
    # the subject, then one pipeline: the grant, its entry in the app's live index (one ZADD, shared by the mints
    # of the same moment), and its audit entry
    assert delta(start, minted) == {"get": 1, "set": 1, "zadd": 1, "xadd": 1}
    # one script (GETDEL + tombstone SET, atomically), the subject (still there, still active), the audit append
    redeem = {"evalsha": 1, "getdel": 1, "set": 1, "get": 1, "xadd": 1}
    assert delta(minted, redeemed) in (redeem, {**redeem, "eval": 1})


async def test_directory_load_replaces_an_app_and_hashes_tokens(redis_client: Any, prefix: str) -> None:
    store = Store(redis_client, prefix)
    (first,) = (await store.load_directory(parse_directory(DIRECTORY))).values()
    assert (first.subjects, first.added, first.changed, first.removed) == (4, 4, 0, 0)
    smaller = {"apps": {"control-panel": {"principals": [{"id": "p", "token": "t0k3n-plain", "role": "admin"}],
                                          "subjects": [{"id": "505", "email": "new@example.com"}]}}}  # fmt: skip
    (second,) = (await store.load_directory(parse_directory(smaller))).values()
    assert (second.subjects, second.added, second.changed, second.removed) == (1, 0, 1, 3)
    generations = await store.generations(["control-panel", "absent"])
    assert generations == {"control-panel": second.generation, "absent": None}
    actors, _ = await store.actors("control-panel", second.generation) or (None, "")
    assert actors is not None and [p.id for p in actors.principals] == ["p"]
    subject = await store.subject("control-panel", second.generation, "505")
    assert subject is not None and subject.email == "new@example.com"
    assert await store.subject("control-panel", second.generation, "707") is None
    assert [
        s.id for s in await store.subjects_by("control-panel", second.generation, [("email", "new@example.com")])
    ] == ["505"]
    assert first.generation.encode() not in await dump(redis_client, prefix)  # the older generation is gone
    assert b"t0k3n-plain" not in await dump(redis_client, prefix)


async def test_a_change_reads_again_when_another_writer_came_in_between(redis_client: Any, prefix: str) -> None:
    store = Store(redis_client, prefix)
    generation = (await store.load_directory(parse_directory(DIRECTORY)))["control-panel"].generation
    seen: list[str | None] = []

    async def renamed(was: Subject | None) -> Subject | None:
        assert was is not None
        seen.append(was.name)
        if len(seen) == 1:  # another writer, between this change's read and its write
            assert await store.put_subject("control-panel", generation, was, Subject(was.id, was.email, "other"))
        return Subject(was.id, "new@example.com", f"after {was.name}")

    changed = await store.change("control-panel", "505", renamed)
    assert seen == [None, "other"]
    assert changed == await store.subject("control-panel", generation, "505")
    assert changed is not None and changed.name == "after other"
    found = await store.subjects_by("control-panel", generation, [("email", "new@example.com")])
    assert [s.id for s in found] == ["505"]  # the index moved with the subject
    assert await store.subjects_by("control-panel", generation, [("email", "example@activeplatform.com")]) == []


async def test_a_change_gives_up_on_a_subject_that_keeps_changing(redis_client: Any, prefix: str) -> None:
    store = Store(redis_client, prefix)
    generation = (await store.load_directory(parse_directory(DIRECTORY)))["control-panel"].generation
    calls = 0

    async def contended(was: Subject | None) -> Subject | None:
        nonlocal calls
        calls += 1
        assert was is not None
        assert await store.put_subject("control-panel", generation, was, Subject(was.id, name=str(calls)))
        return None  # delete it, were it still what was read

    with pytest.raises(Contended):
        await store.change("control-panel", "505", contended, attempts=3)
    assert calls == 3
    kept = await store.subject("control-panel", generation, "505")
    assert kept is not None and kept.name == "3"


async def test_a_change_of_an_absent_subject_creates_it_or_does_nothing(redis_client: Any, prefix: str) -> None:
    store = Store(redis_client, prefix)
    assert await store.change("control-panel", "41", lambda was: asyncio.sleep(0, None)) is None
    assert await store.generation("control-panel") is None  # no directory: nothing was started
    generation = await store.generation("control-panel", start=True)
    assert generation is not None and await store.generation("control-panel") == generation

    async def created(was: Subject | None) -> Subject:
        assert was is None
        return Subject("41", "41@example.com")

    assert await store.change("control-panel", "41", created) == Subject("41", "41@example.com")
    assert await store.current_subject("control-panel", "41") == Subject("41", "41@example.com")


async def test_directory_reloads_itself_when_the_store_comes_back_empty(
    aiohttp_client: Any, redis_client: Any, prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    (tmp_path / "directory.yaml").write_text(yaml.safe_dump(DIRECTORY))
    config = make_config(
        prefix, upstream.url, directory={"file": str(tmp_path / "directory.yaml"), "refresh_seconds": 0.05}
    )
    client = await aiohttp_client(create_app(config, redis=redis_client, key=KEY))
    await mint(client)
    # What a restart without persistence leaves: nothing, all at once (not key by key while the gateway reloads).
    await redis_client.delete(*[key async for key in redis_client.scan_iter(match=f"{prefix}*")])
    await until("the directory to be reloaded", lambda: redis_client.get(f"{prefix}{{dir:control-panel}}:current"))
    await mint(client)


async def test_store_outage_is_a_503_in_the_dialect_shape_and_heals(
    aiohttp_client: Any, upstream: Upstream, prefix: str, tmp_path: Path
) -> None:
    server = start_redis(tmp_path)
    redis = aioredis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
        config = make_config(prefix, upstream.url, store={"timeout_seconds": 0.5}, apps=REDEEM_ON_GET)
        client = await aiohttp_client(create_app(config, redis=redis, key=KEY))
        body = await mint(client)
        assert (await client.get("/readyz")).status == 200
        server.stop()
        for request in (client.get(SEED, headers=MANAGER), client.get(redeem_path(body))):
            # A refused connection fails at once; the bound only tells "answered" from "hung", so it is loose.
            async with asyncio.timeout(OUTAGE_ANSWER_BOUND):
                response = await request
            assert response.status == 503
            errors = (await response.json(content_type=MEDIA))["errors"]
            assert errors[0]["status"] == "503" and errors[0]["code"] == "service_unavailable"
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200
        server.start()
        await until("/readyz to answer 200 again", lambda: ready(client))
        # The grant minted before the outage was never consumed (Redis kept no data, so it is gone);
        # a new mint works again without a restart once the directory is back.
        await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
        await mint(client)
    finally:
        server.stop() if server.proc.poll() is None else None
        await redis.aclose()


async def test_no_grant_is_stored_for_a_subject_that_could_never_redeem_it(
    gateway: GatewayFactory, redis_client: Any, prefix: str
) -> None:
    directory = {"apps": {"control-panel": {
        "resellers": [{"id": 1}],
        "principals": [{"id": "mgr-1", "token": "vY5fwetestK3gJXZH5uHCw", "role": "admin", "reseller": 1}],
        "subjects": [{"id": "505", "reseller": 1}],  # no e-mail: the login URL could not carry it
    }}}  # fmt: skip
    client = await gateway(directory=directory)
    response = await client.get(SEED, headers=MANAGER)
    assert response.status == 404
    assert (await response.json(content_type=MEDIA))["errors"][0]["detail"] == "Account not found."
    assert [k async for k in redis_client.scan_iter(match=f"{prefix}grant:*")] == []
    assert await redis_client.xlen(f"{prefix}audit") == 0
