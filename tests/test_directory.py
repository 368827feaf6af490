"""The directory in the store: one load per app at a time, loads that die or stall, dropping old generations
while a load runs, start-up loads from ``directory.file``, deactivated and ambiguous subjects."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.directory import AppDirectory, DirectoryError, Subject, parse_directory, parse_subject
from gateway.store import LoadUnderWay, Store
from tests.conftest import DIRECTORY, KEY, GatewayFactory, Upstream, make_config, until

APP = "control-panel"
SEED = "/api/v3/resellers/1/user_authentication/token?account_id={}"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
MEDIA = "application/vnd.api+json"


def app_directory(subjects: Any) -> AppDirectory:
    """The test directory's control-panel actors with ``subjects`` (any iterable, read once per load)."""
    (parsed,) = parse_directory({"apps": {APP: {**DIRECTORY["apps"][APP], "subjects": []}}}).values()
    return AppDirectory(APP, parsed.actors, subjects)


def numbered(count: int, *, fail_after: int | None = None) -> Iterator[Subject]:
    for n in range(count):
        if n == fail_after:
            raise RuntimeError("the load's source broke")
        yield parse_subject({"id": f"c{n}", "email": f"c{n}@example.com", "reseller": 1}, f"subjects[{n}]")


async def keys_of(store: Store, generation: str) -> list[bytes]:
    return [k async for k in store.redis.scan_iter(match=f"{store.prefix}{{dir:{APP}}}:{generation}:*")]


async def current(store: Store) -> str | None:
    return (await store.generations([APP]))[APP]


async def test_one_load_per_app_at_a_time(redis_client: Any, prefix: str) -> None:
    store = Store(redis_client, prefix)
    started = asyncio.Event()
    first = asyncio.create_task(
        store.load_app(app_directory(numbered(3000)), batch=200, progress=lambda _: started.set())
    )
    await started.wait()
    with pytest.raises(LoadUnderWay, match="another load of this app is under way"):
        await store.load_app(app_directory(numbered(10)))
    summary = await first
    assert summary.subjects == 3000 and await current(store) == summary.generation
    second = await store.load_app(app_directory(numbered(10)))  # the lease went with the first load's end
    assert (second.subjects, second.removed) == (10, 2990)


async def test_dropping_old_generations_spares_a_load_under_way(redis_client: Any, prefix: str) -> None:
    store = Store(redis_client, prefix)
    old = (await store.load_app(app_directory(numbered(5)))).generation
    first_batch = asyncio.Event()
    load = asyncio.create_task(
        store.load_app(app_directory(numbered(3000)), batch=200, progress=lambda _: first_batch.set())
    )
    await first_batch.wait()
    await store.drop_generations(APP)  # runs while the load writes: what it wrote already must stay
    summary = await load
    assert await redis_client.zcard(store.subject_ids_key(APP, summary.generation)) == 3000
    for n in (0, 199, 200, 2999):
        assert await store.subject(APP, summary.generation, f"c{n}") is not None
    assert await keys_of(store, old) != []  # it was in use while the drop ran
    await store.drop_generations(APP)
    assert await keys_of(store, old) == []


async def test_a_load_that_dies_midway_switches_nothing(redis_client: Any, prefix: str) -> None:
    store = Store(redis_client, prefix)
    in_use = (await store.load_app(app_directory(numbered(3)))).generation
    with pytest.raises(RuntimeError, match="source broke"):
        await store.load_app(app_directory(numbered(5000, fail_after=1500)), batch=500)
    assert await current(store) == in_use
    assert await store.subject(APP, in_use, "c2") is not None
    leftovers = [k async for k in redis_client.scan_iter(match=f"{prefix}{{dir:{APP}}}:*:s:c1499")]
    assert len(leftovers) == 1  # the dead load's first batches are there, unused
    # The lease went with the failure: the next load runs at once, and its drop takes the leftovers.
    summary = await store.load_app(app_directory(numbered(2)))
    await store.drop_generations(APP)
    assert [k async for k in redis_client.scan_iter(match=f"{prefix}{{dir:{APP}}}:*:s:c1499")] == []
    assert await store.subject(APP, summary.generation, "c2") is None  # removed by the load that finished
    assert {g.split(b":")[2] for g in await dump_keys(store)} == {summary.generation.encode()}


async def dump_keys(store: Store) -> list[bytes]:
    """The app's directory keys that belong to a generation (the prefix, ``{dir:app}``, the generation, ...)."""
    keys = [k async for k in store.redis.scan_iter(match=f"{store.prefix}{{dir:{APP}}}:*:*")]
    return [k.removeprefix(store.prefix.encode()) for k in keys]


async def test_a_killed_load_holds_its_app_until_its_lease_runs_out(redis_client: Any, prefix: str) -> None:
    """What a ``kill -9`` leaves: the lease, which expires; the next load then runs."""
    store = Store(redis_client, prefix, lease_ms=300)
    lease = f"{prefix}{{dir:{APP}}}:loading"
    await redis_client.set(lease, "deadbeefdeadbeef", px=300)
    with pytest.raises(LoadUnderWay):
        await store.load_app(app_directory(numbered(1)))

    async def lease_gone() -> bool:
        return not await redis_client.exists(lease)

    await until("the dead load's lease to run out", lease_gone)
    assert (await store.load_app(app_directory(numbered(1)))).subjects == 1


async def test_a_load_that_stalled_past_its_lease_switches_nothing(redis_client: Any, prefix: str) -> None:
    store = Store(redis_client, prefix, lease_ms=200)
    in_use = (await store.load_app(app_directory(numbered(3)))).generation
    with pytest.raises(DirectoryError, match="stalled past"):
        # the progress callback blocks the loop like a paused process: the lease expires in Redis meanwhile
        await store.load_app(app_directory(numbered(300)), batch=100, progress=lambda _: time.sleep(0.3))
    assert await current(store) == in_use
    assert await redis_client.get(f"{prefix}{{dir:{APP}}}:loading") is None


async def test_a_subject_given_twice_fails_the_load_and_frees_the_app(redis_client: Any, prefix: str) -> None:
    store = Store(redis_client, prefix)
    twice = [*numbered(3), *numbered(2)]
    with pytest.raises(DirectoryError, match="subject 'c0' is given twice"):
        await store.load_app(app_directory(twice))
    assert await current(store) is None
    assert (await store.load_app(app_directory(numbered(3)))).subjects == 3


# -- through a gateway ---------------------------------------------------------------------------------------
def write_directory_file(tmp_path: Path, subjects: list[dict[str, Any]]) -> Path:
    app = {k: v for k, v in DIRECTORY["apps"][APP].items() if k != "subjects"}
    (tmp_path / "subjects.jsonl").write_text("".join(json.dumps(s) + "\n" for s in subjects))
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump({"apps": {APP: {**app, "subjects_file": "subjects.jsonl"}}}))
    return path


async def test_gateways_starting_together_load_the_file_once_and_whole(
    aiohttp_client: Any, redis_client: Any, prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    """Several processes sharing a Redis start with the same ``directory.file`` on an empty store: one loads
    it (the others find its lease and wait for its generation), and every subject is there."""
    subjects = [{"id": str(10_000 + n), "email": f"c{n}@example.com", "reseller": 1} for n in range(3000)]
    path = write_directory_file(tmp_path, subjects)
    config = make_config(prefix, upstream.url, directory={"file": str(path), "refresh_seconds": 0.05})
    clients: list[TestClient[Any, Any]] = await asyncio.gather(
        *(aiohttp_client(create_app(config, redis=redis_client, key=KEY)) for _ in range(3))
    )
    store = Store(redis_client, prefix)
    generation = await current(store)
    assert generation is not None
    assert await redis_client.zcard(store.subject_ids_key(APP, generation)) == 3000
    for client in clients:  # each one, once started, knows the actors: none answers as if it had none
        response = await client.get(SEED.format(12_999), headers=MANAGER)
        assert response.status == 200, await response.text()


async def test_a_restart_does_not_load_the_same_file_again(
    aiohttp_client: Any, redis_client: Any, prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    path = write_directory_file(tmp_path, [{"id": "505", "email": "a@example.com", "reseller": 1}])
    config = make_config(prefix, upstream.url, directory={"file": str(path)})
    store = Store(redis_client, prefix)
    first = await aiohttp_client(create_app(config, redis=redis_client, key=KEY))
    loaded = await current(store)
    await first.close()
    await aiohttp_client(create_app(config, redis=redis_client, key=KEY))
    assert await current(store) == loaded  # same file, same digest: nothing to do
    write_directory_file(tmp_path, [{"id": "505", "email": "b@example.com", "reseller": 1}])
    await aiohttp_client(create_app(config, redis=redis_client, key=KEY))
    now = await current(store)
    assert now != loaded
    subject = await store.subject(APP, now or "", "505")
    assert subject is not None and subject.email == "b@example.com"


async def test_a_deactivated_subject_is_refused_at_mint_and_its_live_grants_at_redemption(
    gateway: GatewayFactory, redis_client: Any, prefix: str
) -> None:
    client = await gateway(apps={APP: {"dialect": "activeplatform", "redeem_on_get": True}})
    minted = await client.get(SEED.format(505), headers=MANAGER)
    assert minted.status == 200
    body = await minted.json(content_type=MEDIA)
    subjects = DIRECTORY["apps"][APP]["subjects"]
    off = {"apps": {APP: {**DIRECTORY["apps"][APP], "subjects": [
        {**s, "active": False} if s["id"] == "505" else s for s in subjects
    ]}}}  # fmt: skip
    await Store(redis_client, prefix).load_directory(parse_directory(off))
    unknown = await client.get(SEED.format(404404), headers=MANAGER)
    assert unknown.status != 200
    answer = (unknown.status, await unknown.read())

    async def refused_as_unknown() -> bool:
        refused = await client.get(SEED.format(505), headers=MANAGER)
        return (refused.status, await refused.read()) == answer

    # every process follows a load within directory.refresh_seconds (1 s)
    await until("a mint for the deactivated subject to get the unknown subject's answer", refused_as_unknown)
    redeemed = await client.get(f"/?user_email={body['owner_email']}&user_token={body['owner_token']}")
    assert redeemed.status == 401


async def test_an_identifier_two_subjects_share_finds_neither(gateway: GatewayFactory) -> None:
    shared = "s" * 40
    directory = {"apps": {"exchange": {
        "principals": [{"id": "partner-1", "token": "partner-token", "role": "partner"}],
        "subjects": [
            {"id": "u-1", "uuid": "45b9313b-fa47-4786-baf1-62969dec31f2", "identifiers": [shared, "a" * 40]},
            {"id": "u-2", "uuid": "0f6b8c2e-3d1a-4c5b-9e7f-a1b2c3d4e5f6", "identifiers": [shared]},
        ],
    }}}  # fmt: skip
    client = await gateway(apps={"exchange": {"dialect": "btcdirect"}}, directory=directory)

    async def mint(identifier: str) -> tuple[int, bytes]:
        headers = {"Authorization": "Bearer partner-token", "User-Identifier": identifier}
        response = await client.get("/api/v1/user/login-token", headers=headers)
        return response.status, await response.read()

    status, body = await mint("a" * 40)
    assert status == 200 and b"45b9313b-fa47-4786-baf1-62969dec31f2" in body
    unknown = await mint("z" * 40)
    assert unknown[0] == 400 and b"ER705" in unknown[1]
    assert await mint(shared) == unknown  # as if unknown: nobody is guessed at
