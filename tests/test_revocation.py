"""Revocation on the admin listener (scope ``revoke``): one grant by id, every live grant of an app, an actor or a
subject; ``supersede`` per app. A revoked or superseded grant gets the ordinary refusal at redemption."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.directory import parse_directory
from gateway.store import Store
from tests.conftest import KEY, Upstream, free_port, make_config, until
from tests.fixtures import DEMO_APPS
from tests.fixtures import DIRECTORY as DEMO_DIRECTORY

REVOKER, PROVISIONER = "ops-revoke-token", "idp-scim-token"
MANAGER = "vY5fwetestK3gJXZH5uHCw"  # control-panel, reseller 1 (505)
OWNER = "owner-1-token"  # control-panel, another actor of reseller 1
PROBLEM = "application/problem+json"
# The demo directory, and a second actor for ActivePlatform's reseller 1.
DIRECTORY = copy.deepcopy(DEMO_DIRECTORY)
DIRECTORY["apps"]["control-panel"]["principals"].append({"id": "own-1", "token": OWNER, "role": "owner", "reseller": 1})


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    admin: str
    http: aiohttp.ClientSession
    redis: Any
    prefix: str

    async def mint(self, subject: str = "505", credential: str = MANAGER, app: str = "control-panel") -> dict[str, Any]:
        response = await self.client.post("/v1/grants", json={"app": app, "subject": subject},
                                          headers={"Authorization": f"Bearer {credential}"})  # fmt: skip
        assert response.status == 201, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    async def redeem(self, grant: dict[str, Any]) -> int:
        path = grant["login_url"].split("/", 3)[3]
        return (await self.client.get("/" + path)).status

    async def call(self, method: str, path: str, body: Any = None, token: str | None = REVOKER) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.admin + path, json=body, headers=headers) as response:
            if response.status == 204:
                return 204, None
            assert response.content_type in (PROBLEM, "application/json"), await response.text()
            return response.status, await response.json(content_type=None)

    async def revoke(self, **body: Any) -> int:
        status, answer = await self.call("POST", "/v1/revocations", body)
        assert status == 200, answer
        revoked: int = answer["revoked"]
        return revoked


def apps(**settings: Any) -> dict[str, Any]:
    return {name: {**app, "redeem_on_get": True, **settings} for name, app in DEMO_APPS.items()}


Start = Callable[..., Awaitable["Gateway"]]


@pytest.fixture
async def start(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], redis_client: Any, upstream: Upstream, prefix: str
) -> AsyncIterator[Start]:
    """``await start(**app settings)``: a gateway on the demo apps and directory, with an admin listener."""
    async with aiohttp.ClientSession() as http:

        async def make(**settings: Any) -> Gateway:
            port = free_port()
            tokens = [{"id": "ops", "token": REVOKER, "scopes": ["revoke"]},
                      {"id": "idp", "token": PROVISIONER, "scopes": ["scim"]}]  # fmt: skip
            config = make_config(prefix, upstream.url, apps(**settings), admin={"port": port, "tokens": tokens})
            await Store(redis_client, prefix).load_directory(parse_directory(DIRECTORY))
            client = await aiohttp_client(create_app(config, redis=redis_client, key=KEY))
            return Gateway(client, f"http://127.0.0.1:{port}", http, redis_client, prefix)

        yield make


@pytest.fixture
async def gw(start: Start) -> Gateway:
    return await start()


async def audit(gateway: Gateway, event: str) -> list[dict[str, str]]:
    entries = await gateway.redis.xrange(f"{gateway.prefix}audit")
    decoded = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
    return [e for e in decoded if e["event"] == event]


async def test_one_grant_by_id(gw: Gateway, upstream: Upstream) -> None:
    kept, revoked = await gw.mint(), await gw.mint()
    assert await gw.call("DELETE", f"/v1/grants/{revoked['grant_id']}") == (204, None)
    status, body = await gw.call("DELETE", f"/v1/grants/{revoked['grant_id']}")
    assert (status, body["detail"]) == (404, "no live grant has that id")
    with capture_logs() as logs:
        assert await gw.redeem(revoked) == 401  # the ordinary refusal, logged and counted as revoked
    (refused,) = [e for e in logs if e["event"] == "grant_refused"]
    assert (refused["reason"], refused["grant_id"]) == ("revoked", revoked["grant_id"])
    assert 'gateway_grants_refused_total{app="control-panel",dialect="activeplatform",reason="revoked"} 1.0' in (
        await (await gw.client.get("/metrics")).text()
    )
    assert await gw.redeem(kept) == 200
    assert (await gw.call("DELETE", f"/v1/grants/{kept['grant_id']}"))[0] == 404  # redeemed: no longer live
    for bad in ("short", "x" * 17, "%2F..%2F"):
        assert (await gw.call("DELETE", f"/v1/grants/{bad}"))[0] == 404
    (event,) = await audit(gw, "grant_revoked")
    assert (event["grant_id"], event["actor"], event["subject"], event["by"]) == (revoked["grant_id"], "mgr-1",
                                                                                  "505", "ops")  # fmt: skip


async def test_every_live_grant_of_an_actor_a_subject_or_an_app(gw: Gateway) -> None:
    mgr_505 = [await gw.mint("505") for _ in range(3)]
    mgr_707 = await gw.mint("707")
    owner_505 = await gw.mint("505", OWNER)
    other_app = await gw.mint("jdoe", "pyramid-enterprise-admin-token", "analytics")
    assert await gw.redeem(mgr_505[0]) == 200  # redeemed: not live, not counted
    assert await gw.revoke(app="control-panel", actor="mgr-1", subject="505") == 2
    assert [await gw.redeem(g) for g in mgr_505[1:]] == [401, 401]
    assert await gw.revoke(app="control-panel", subject="505") == 1  # the owner's
    assert await gw.redeem(owner_505) == 401
    assert await gw.revoke(app="control-panel", actor="mgr-1") == 1  # 707's
    assert await gw.redeem(mgr_707) == 401
    assert await gw.revoke(app="control-panel") == 0
    assert await gw.redeem(other_app) == 200  # another app's grants are not touched
    fresh = await gw.mint("505")
    assert await gw.revoke(app="control-panel") == 1
    assert await gw.redeem(fresh) == 401
    assert len(await audit(gw, "grant_revoked")) == 5


async def test_an_apps_revocation_reaches_thousands_of_grants(gw: Gateway) -> None:
    store = Store(gw.redis, gw.prefix)
    grants = await asyncio.gather(*(gw.mint() for _ in range(300)))
    assert await gw.redis.zcard(store.live_key("control-panel")) == 300
    assert await gw.revoke(app="control-panel") == 300
    assert await gw.redis.zcard(store.live_key("control-panel")) == 0
    assert await gw.redeem(grants[123]) == 401


async def test_expired_ids_leave_the_index_within_a_refresh(start: Start, upstream: Upstream) -> None:
    gateway = await start(grant_ttl_seconds=1)
    store = Store(gateway.redis, gateway.prefix)
    grants = [store.grant_key((await gateway.mint())["grant_id"]) for _ in range(2)]

    async def expired() -> bool:
        return not await gateway.redis.exists(*grants)

    async def trimmed() -> bool:
        return not await gateway.redis.zcard(store.live_key("control-panel"))

    await until("the grants to expire", expired)
    assert await gateway.revoke(app="control-panel") == 0  # expired: nothing live to revoke
    # each process trims the indexes once per directory.refresh_seconds (1 s)
    await until("the expired ids to leave the live index", trimmed)


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({}, 400, "app: required"),
        ({"app": "nope"}, 400, "app: no app of that name"),
        ({"app": "control-panel", "actor": ""}, 400, "actor: not a valid value"),
        ({"app": "control-panel", "subject": ["505"]}, 400, "subject: not a valid value"),
        ({"app": "control-panel", "who": "x"}, 400, "who: not a field of this request"),
        ([1], 400, "the body must be a JSON object"),
    ],
)
async def test_bad_revocations_are_problems(gw: Gateway, body: Any, status: int, detail: str) -> None:
    answer = await gw.call("POST", "/v1/revocations", body)
    assert (answer[0], answer[1]["detail"], answer[1]["status"]) == (status, detail, status)


async def test_tokens_and_scopes(gw: Gateway) -> None:
    grant = await gw.mint()
    details = {None: "an admin bearer token is needed (Authorization: Bearer <token>)",
               "guess": "the admin bearer token is not valid"}  # fmt: skip
    for token, detail in details.items():
        status, body = await gw.call("DELETE", f"/v1/grants/{grant['grant_id']}", token=token)
        assert (status, body["type"], body["detail"]) == (401, "urn:impersonation-gateway:problem:unauthenticated",
                                                          detail)  # fmt: skip
    status, body = await gw.call("POST", "/v1/revocations", {"app": "control-panel"}, token=PROVISIONER)
    assert (status, body["detail"]) == (403, "the token 'idp' lacks the 'revoke' scope")
    status, body = await gw.call("GET", "/v1/revocations")
    assert (status, body["type"]) == (405, "urn:impersonation-gateway:problem:method-not-allowed")
    assert (await gw.call("GET", "/v1/nothing"))[0] == 404
    assert await gw.redeem(grant) == 200  # none of that revoked it


async def test_supersede_leaves_one_live_link_per_actor_and_subject(start: Start) -> None:
    gateway = await start(supersede=True)
    first, second, third = await gateway.mint(), await gateway.mint(), await gateway.mint()
    other_subject, other_actor = await gateway.mint("707"), await gateway.mint("505", OWNER)
    assert [await gateway.redeem(g) for g in (first, second)] == [401, 401]
    assert await gateway.redeem(third) == 200
    assert await gateway.redeem(other_subject) == 200 and await gateway.redeem(other_actor) == 200


async def test_supersede_covers_every_grant_of_a_mint(start: Start) -> None:
    """Denovolab mints two grants at once (the login and the CDR API token): a newer mint supersedes both, and
    both of the newest work."""
    gateway = await start(supersede=True)

    async def as_client() -> dict[str, Any]:
        response = await gateway.client.post("/v1/auth/as_client", json={"client_id": 41},
                                             headers={"X-Auth-Token": "denovolab-demo-admin-token"})  # fmt: skip
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body

    old, new = await as_client(), await as_client()
    assert (await gateway.client.get("/cdr", headers={"X-Auth-Token": old["cdr_api_token"]})).status == 401
    assert (await gateway.client.get(f"/?token={old['token']}")).status == 401
    assert (await gateway.client.get("/cdr", headers={"X-Auth-Token": new["cdr_api_token"]})).status == 200
    assert (await gateway.client.get(f"/?token={new['token']}")).status == 200


async def test_without_supersede_every_link_works(gw: Gateway) -> None:
    first, second = await gw.mint(), await gw.mint()
    assert [await gw.redeem(first), await gw.redeem(second)] == [200, 200]
