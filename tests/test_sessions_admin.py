"""Impersonation sessions on the admin listener (scope ``revoke``): listing, ending one, and revocations that end
the matching sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.directory import parse_directory
from gateway.sessions import session_id
from gateway.store import Store
from tests.conftest import DIRECTORY, KEY, Upstream, free_port, make_config

REVOKER, PROVISIONER = "ops-revoke-token", "idp-scim-token"
MANAGER = "vY5fwetestK3gJXZH5uHCw"  # mgr-1, reseller 1
OWNER = "owner-1-token"  # own-1, reseller 1
COOKIE = "impersonation_session"
SESSION_APP = {"dialect": "activeplatform", "redeem_on_get": True, "session": {}}
APPS = {"control-panel": SESSION_APP}


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    admin: str
    http: aiohttp.ClientSession
    redis: Any
    prefix: str

    async def session(self, credential: str = MANAGER, subject: str = "505") -> str:
        """Mint and redeem: the new session's cookie."""
        response = await self.client.post("/v1/grants", json={"app": "control-panel", "subject": subject},
                                          headers={"Authorization": f"Bearer {credential}"})  # fmt: skip
        assert response.status == 201, await response.text()
        grant = await response.json()
        redeemed = await self.client.get("/" + grant["login_url"].split("/", 3)[3])
        assert redeemed.status == 200
        cookie = redeemed.cookies[COOKIE].value
        return str(cookie)

    async def live(self, cookie: str) -> bool:
        response = await self.client.get("/_impersonation/session", headers={"Cookie": f"{COOKIE}={cookie}"})
        return response.status == 200

    async def call(self, method: str, path: str, body: Any = None, token: str | None = REVOKER) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.admin + path, json=body, headers=headers) as response:
            if response.status == 204:
                return 204, None
            return response.status, await response.json(content_type=None)

    async def audit(self, event: str) -> list[dict[str, str]]:
        entries = await self.redis.xrange(f"{self.prefix}audit")
        decoded = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
        return [e for e in decoded if e["event"] == event]


@pytest.fixture
async def gw(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], redis_client: Any, upstream: Upstream, prefix: str
) -> AsyncIterator[Gateway]:
    async with aiohttp.ClientSession() as http:
        port = free_port()
        tokens = [{"id": "ops", "token": REVOKER, "scopes": ["revoke"]},
                  {"id": "idp", "token": PROVISIONER, "scopes": ["scim"]}]  # fmt: skip
        apps = {**APPS, "analytics": {"dialect": "pyramid", "mount": "/analytics"}}
        config = make_config(prefix, upstream.url, apps, admin={"port": port, "tokens": tokens})
        await Store(redis_client, prefix).load_directory(parse_directory(DIRECTORY))
        client = await aiohttp_client(create_app(config, redis=redis_client, key=KEY),
                                      cookie_jar=aiohttp.DummyCookieJar())  # fmt: skip
        yield Gateway(client, f"http://127.0.0.1:{port}", http, redis_client, prefix)


async def test_list_and_end_sessions(gw: Gateway) -> None:
    first = await gw.session()
    second = await gw.session(OWNER, "707")
    status, body = await gw.call("GET", "/v1/sessions")
    assert status == 200 and set(body) == {"sessions"}
    listed = {s["session_id"]: s for s in body["sessions"]}
    assert set(listed) == {session_id(first), session_id(second)}
    one = listed[session_id(first)]
    assert set(one) == {"session_id", "app", "subject", "actor", "mode", "started_at", "expires_at", "last_request_at"}
    assert (one["app"], one["subject"], one["actor"], one["mode"]) == ("control-panel", "505", "mgr-1", "full")
    assert all(one[k].endswith("Z") for k in ("started_at", "expires_at", "last_request_at"))
    for query, expected in (("?actor=own-1", [second]), ("?subject=505", [first]), ("?app=control-panel&actor=x", []),
                            ("?app=analytics", [])):  # fmt: skip
        status, body = await gw.call("GET", "/v1/sessions" + query)
        assert status == 200 and [s["session_id"] for s in body["sessions"]] == [session_id(c) for c in expected]
    assert (await gw.call("GET", "/v1/sessions?app=nope"))[0] == 404
    assert (await gw.call("GET", "/v1/sessions?colour=red"))[0] == 400
    assert (await gw.call("GET", "/v1/sessions", token=PROVISIONER))[0] == 403
    assert (await gw.call("GET", "/v1/sessions", token=None))[0] == 401
    assert (await gw.call("DELETE", f"/v1/sessions/{session_id(first)}")) == (204, None)
    assert not await gw.live(first) and await gw.live(second)
    assert (await gw.call("DELETE", f"/v1/sessions/{session_id(first)}"))[0] == 404
    assert (await gw.call("DELETE", "/v1/sessions/not-an-id"))[0] == 404
    (ended,) = await gw.audit("session_ended")
    assert (ended["session_id"], ended["why"], ended["by"]) == (session_id(first), "revoked", "ops")
    status, body = await gw.call("GET", "/v1/sessions")
    assert [s["session_id"] for s in body["sessions"]] == [session_id(second)]


async def test_revocations_end_the_matching_sessions(gw: Gateway) -> None:
    mine, theirs = await gw.session(), await gw.session(OWNER, "707")
    status, body = await gw.call("POST", "/v1/revocations", {"app": "control-panel", "actor": "mgr-1"})
    assert (status, body) == (200, {"revoked": 0, "sessions_ended": 1})
    assert not await gw.live(mine) and await gw.live(theirs)
    status, body = await gw.call("POST", "/v1/revocations", {"app": "control-panel"})
    assert (status, body) == (200, {"revoked": 0, "sessions_ended": 1})
    assert not await gw.live(theirs)
    # an app without sessions answers as it always has
    assert await gw.call("POST", "/v1/revocations", {"app": "analytics"}) == (200, {"revoked": 0})


async def test_scim_deactivation_and_deletion_end_the_subject_s_sessions(gw: Gateway) -> None:
    deactivated, deleted, other = await gw.session(), await gw.session(OWNER, "707"), await gw.session(subject="808")
    scim = f"{gw.admin}/scim/v2/control-panel/Users"
    headers = {"Authorization": f"Bearer {PROVISIONER}"}
    patch = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
             "Operations": [{"op": "replace", "path": "active", "value": False}]}  # fmt: skip
    async with gw.http.patch(f"{scim}/505", json=patch, headers=headers) as response:
        assert response.status == 200
    async with gw.http.delete(f"{scim}/707", headers=headers) as response:
        assert response.status == 204

    # ended by the SCIM write itself, not by the directory sweep a refresh later
    assert not await gw.live(deactivated) and not await gw.live(deleted)
    assert await gw.live(other)
    whys = {e["session_id"]: e["why"] for e in await gw.audit("session_ended")}
    assert whys == {session_id(deactivated): "subject_inactive", session_id(deleted): "subject_inactive"}
