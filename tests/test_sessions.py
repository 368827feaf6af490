"""Impersonation sessions (DESIGN §13): start and cookie, every request of the session (assertion, kept cookies, one
round trip), modes, the end and session endpoints, cap and idle, forged cookies, and two gateway processes."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import fakeredis
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from gateway import proxy
from gateway.app import GATEWAY, create_app
from gateway.assertion import Signer
from gateway.directory import parse_directory
from gateway.downstream import Verifier
from gateway.sessions import session_id
from gateway.store import Store
from tests import processes
from tests.conftest import DIRECTORY, KEY, PUBLIC_URL, Recorded, RedisServer, free_port, make_config, until

MANAGER = "vY5fwetestK3gJXZH5uHCw"  # control-panel, reseller 1 (505)
COOKIE = "impersonation_session"
SESSION = {"max_seconds": 60, "idle_seconds": 20, "deny": ["* /billing/*"], "allow": ["POST /search"]}
APPS: dict[str, Any] = {
    "control-panel": {"dialect": "activeplatform", "redeem_on_get": True, "grant_ttl_seconds": 60, "session": SESSION},
}


@dataclass
class App:
    """A recording app: it logs its visitor in with an HttpOnly cookie, and sets or deletes others on some paths."""

    url: str
    requests: list[Recorded] = field(default_factory=list)
    drop: int = 0  # how many of the next requests to read and record, then drop without an answer

    def claims(self, index: int = -1) -> dict[str, Any]:
        token = self.requests[index].headers["X-Impersonation-Assertion"]
        return jwt.decode(token, KEY.public_key(), algorithms=["EdDSA"], audience="control-panel", issuer=PUBLIC_URL)

    def cookies(self, index: int = -1) -> dict[str, str]:
        jar: SimpleCookie = SimpleCookie()
        jar.load(self.requests[index].headers.get("Cookie", ""))
        return {k: v.value for k, v in jar.items()}


@pytest.fixture
async def app(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> App:
    found = App("")

    async def record(request: web.Request) -> web.StreamResponse:
        if request.path == "/ws":
            found.requests.append(Recorded("GET", "/ws", {}, dict(request.headers), b""))
            if found.drop:
                found.drop -= 1
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            ws = web.WebSocketResponse()
            ws.set_cookie("ws_sid", "ws-secret", httponly=True)
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str(message.data)
            return ws
        found.requests.append(Recorded(request.method, request.path, dict(request.query), dict(request.headers),
                                       await request.read()))  # fmt: skip
        if found.drop:
            found.drop -= 1
            assert request.transport is not None
            request.transport.abort()  # read, perhaps acted on, never answered
            return web.Response()
        response = web.json_response({"path": request.path, "n": len(found.requests)})
        if "app_sid" not in request.cookies and "X-Impersonation-Assertion" in request.headers:
            response.set_cookie("app_sid", f"secret-{len(found.requests)}", httponly=True, path="/")
        if request.path == "/prefs":
            response.set_cookie("theme", "dark", path="/app")
        if request.path == "/two":
            response.set_cookie("first", "1", httponly=True)
            response.set_cookie("second", "2", httponly=True, max_age=30)
        if request.path == "/logout":
            response.del_cookie("app_sid", path="/")
        if request.path == "/forget":  # deletions as HttpOnly cookies: Max-Age=0 and a past Expires
            response.headers.add("Set-Cookie", "first=; HttpOnly; Max-Age=0; Path=/")
            response.headers.add("Set-Cookie", "second=; HttpOnly; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/")
        return response

    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(web_app)
    found.url = str(server.make_url("")).rstrip("/")
    return found


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    redis: Any
    prefix: str

    @property
    def sessions(self) -> Any:
        return self.client.app[GATEWAY].sessions

    async def mint(self, **body: Any) -> dict[str, Any]:
        response = await self.client.post("/v1/grants", json={"app": "control-panel", "subject": "505", **body},
                                          headers={"Authorization": f"Bearer {MANAGER}"})  # fmt: skip
        assert response.status == 201, await response.text()
        minted: dict[str, Any] = await response.json()
        return minted

    async def start(self, cookie: str | None = None, **body: Any) -> tuple[str, aiohttp.ClientResponse]:
        """Mint and redeem: the session cookie the answer sets, and the answer."""
        grant = await self.mint(**body)
        headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
        response = await self.client.get("/" + grant["login_url"].split("/", 3)[3], headers=headers)
        assert response.status == 200, await response.text()
        value = set_cookies(response)[COOKIE]["value"]
        return value, response

    async def get(self, path: str, cookie: str | None, **headers: str) -> aiohttp.ClientResponse:
        if cookie is not None:
            headers["Cookie"] = "; ".join(filter(None, [headers.get("Cookie"), f"{COOKIE}={cookie}"]))
        return await self.client.get(path, headers=headers)

    async def request(self, method: str, path: str, cookie: str, **headers: str) -> aiohttp.ClientResponse:
        return await self.client.request(method, path, headers={"Cookie": f"{COOKIE}={cookie}", **headers})


def set_cookies(response: aiohttp.ClientResponse) -> dict[str, dict[str, str]]:
    """Each Set-Cookie of ``response`` by name: its value and attributes (lowercased names; flags as "")."""
    found = {}
    for header in response.headers.getall("Set-Cookie", []):
        first, *attributes = header.split(";")
        name, _, value = first.partition("=")
        parts = {"value": value.strip()}
        for attribute in attributes:
            key, _, val = attribute.strip().partition("=")
            parts[key.lower()] = val
        found[name.strip()] = parts
    return found


Factory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], redis_client: Any, app: App, prefix: str
) -> Factory:
    async def make(apps: dict[str, Any] | None = None, **sections: Any) -> Gateway:
        config = make_config(prefix, app.url, apps or APPS, **sections)
        await Store(redis_client, prefix).load_directory(parse_directory(DIRECTORY))
        client = await aiohttp_client(create_app(config, redis=redis_client, key=KEY),
                                      cookie_jar=aiohttp.DummyCookieJar())  # fmt: skip
        return Gateway(client, redis_client, prefix)

    return make


@pytest.fixture
async def gw(start: Factory) -> Gateway:
    return await start()


async def audit(gw: Gateway, event: str) -> list[dict[str, str]]:
    entries = await gw.redis.xrange(f"{gw.prefix}audit")
    decoded = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
    return [e for e in decoded if e["event"] == event]


# -- start ---------------------------------------------------------------------------------------------------------
async def test_a_redemption_starts_a_session(gw: Gateway, app: App) -> None:
    cookie, response = await gw.start()
    attributes = set_cookies(response)[COOKIE]
    assert {k for k in attributes if k != "value"} == {"path", "httponly", "samesite"}
    assert (attributes["path"], attributes["samesite"]) == ("/", "Lax")
    assert len(base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4))) * 8 >= 128
    sid = session_id(cookie)
    assert sid != cookie
    claims = app.claims()
    assert (claims["sid"], claims["mode"], claims["sub"], claims["act"]["sub"]) == (sid, "full", "505", "mgr-1")
    # Redis holds the session under its id, never the cookie, and no longer than the cap
    keys = [k.decode() async for k in gw.redis.scan_iter(match=f"{gw.prefix}*")]
    assert f"{gw.prefix}session:{{{sid}}}" in keys
    assert not any(cookie in k for k in keys)
    for key in keys:
        value = await gw.redis.dump(key)
        assert cookie.encode() not in value
    assert 0 < await gw.redis.pttl(f"{gw.prefix}session:{{{sid}}}") <= 60_000
    (started,) = await audit(gw, "session_started")
    assert (started["session_id"], started["actor"], started["subject"], started["mode"]) == (
        sid,
        "mgr-1",
        "505",
        "full",
    )
    # the app's login cookie stayed in the gateway
    assert "app_sid" not in set_cookies(response)


async def test_a_confirmed_link_starts_a_session_too(start: Factory, app: App) -> None:
    gw = await start({"control-panel": {**APPS["control-panel"], "redeem_on_get": False}})
    grant = await gw.mint()
    link = "/" + grant["login_url"].split("/", 3)[3]
    page = await gw.client.get(link)
    assert page.status == 200 and COOKIE not in set_cookies(page) and not app.requests
    confirmed = await gw.client.post(link, data={"impersonation_confirm": "1"})
    assert confirmed.status == 200
    cookie = set_cookies(confirmed)[COOKIE]["value"]
    assert app.requests[-1].method == "GET" and app.claims()["sid"] == session_id(cookie)
    assert "app_sid" not in set_cookies(confirmed)
    await gw.get("/next", cookie)
    assert app.cookies() == {"app_sid": "secret-1"}


async def test_https_public_url_gets_a_host_prefixed_secure_cookie(start: Factory, app: App) -> None:
    gw = await start({"control-panel": {**APPS["control-panel"], "public_url": "https://panel.example.com"}})
    grant = await gw.mint()
    response = await gw.client.get("/" + grant["login_url"].split("/", 3)[3])
    attributes = set_cookies(response)["__Host-impersonation_session"]
    assert "secure" in attributes and attributes["path"] == "/" and "domain" not in attributes
    cookie = attributes["value"]
    answer = await gw.client.get("/page", headers={"Cookie": f"__Host-impersonation_session={cookie}"})
    assert answer.status == 200 and app.claims()["sid"] == session_id(cookie)


async def test_an_app_without_session_hands_off_as_before(start: Factory, app: App) -> None:
    gw = await start({"control-panel": {k: v for k, v in APPS["control-panel"].items() if k != "session"}})
    grant = await gw.mint()
    response = await gw.client.get("/" + grant["login_url"].split("/", 3)[3])
    assert COOKIE not in set_cookies(response) and "app_sid" in set_cookies(response)
    assert "sid" not in app.claims() and app.claims()["jti"] == grant["grant_id"]
    # a cookie of that name is nobody's business but the app's
    await gw.get("/x", "whatever")
    assert app.cookies() == {COOKIE: "whatever"} and "X-Impersonation-Assertion" not in app.requests[-1].headers


# -- requests of the session ---------------------------------------------------------------------------------------
async def test_requests_of_the_session_carry_a_fresh_assertion_and_never_the_cookie(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    jtis = {app.claims()["jti"]}
    for path in ("/a", "/b?q=secret-query", "/c"):
        response = await gw.get(path, cookie, Cookie="other=1")
        assert response.status == 200
        claims = app.claims()
        assert (claims["sid"], claims["mode"], claims["aud"]) == (session_id(cookie), "full", "control-panel")
        jtis.add(claims["jti"])
        assert COOKIE not in app.requests[-1].headers.get("Cookie", "")
        assert cookie not in str(app.requests[-1].headers)
        assert app.cookies() == {"other": "1", "app_sid": "secret-1"}  # the kept cookie, sent on every path
    assert len(jtis) == 4


async def test_a_session_request_is_one_round_trip(start: Factory, app: App) -> None:
    gw = await start(directory={"refresh_seconds": 3600})  # no refresh (nor sweep) sends anything meanwhile
    base = time.time()
    gw.sessions.clock = lambda: base  # started, and touched last, at base
    cookie, _ = await gw.start()
    await gw.get("/warm", cookie)  # the script is cached by Redis now
    real_server = not isinstance(gw.redis, fakeredis.FakeAsyncRedis)

    async def calls() -> dict[str, int]:
        stats = await gw.redis.info("commandstats") if real_server else {}
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}

    pipelines: list[list[str]] = []
    real = gw.redis.pipeline

    def counting(*args: Any, **kwargs: Any) -> Any:
        pipe = real(*args, **kwargs)
        execute = pipe.execute

        async def counted(*a: Any, **k: Any) -> Any:
            pipelines.append([c[0][0] for c in pipe.command_stack])
            return await execute(*a, **k)

        pipe.execute = counted
        return pipe

    # Within a second of the last touch the script only reads; a second later it touches ``last`` (and the TTL).
    for offset, writes in ((0.5, {}), (1.5, {"hset": 1, "pexpireat": 1})):
        gw.sessions.clock = lambda offset=offset: base + offset
        before = await calls()
        pipelines.clear()
        gw.redis.pipeline = counting
        try:
            with capture_logs() as logs:
                assert (await gw.get("/counted?x=1", cookie)).status == 200
        finally:
            gw.redis.pipeline = real
        assert pipelines == [["EVALSHA"]]  # read, check and touch in one script; nothing else
        if real_server:  # INFO commandstats on the real server: what that script does
            after = await calls()
            delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0) and k != "info"}
            assert delta == {"evalsha": 1, "hgetall": 1, **writes}
        (line,) = [e for e in logs if e["event"] == "session_request"]
        assert (line["method"], line["path"], line["status"], line["session_id"]) == ("GET", "/counted", 200,
                                                                                      session_id(cookie))  # fmt: skip
        assert "x=1" not in str(logs)
    touched = await gw.redis.hget(f"{gw.prefix}session:{{{session_id(cookie)}}}", "last")
    assert int(touched) == int((base + 1.5) * 1000)


async def test_unknown_forged_and_ended_cookies_are_plain_requests_that_clear_it(gw: Gateway, app: App) -> None:
    for forged in ("A" * 32, "not-a-cookie", "", "A" * 31 + "%"):
        response = await gw.get("/plain", forged)
        assert response.status == 200
        assert "X-Impersonation-Assertion" not in app.requests[-1].headers
        assert COOKIE not in app.requests[-1].headers.get("Cookie", "")
        assert set_cookies(response)[COOKIE]["value"] == "" and set_cookies(response)[COOKIE]["max-age"] == "0"


async def test_the_redeeming_request_replaces_a_live_session(gw: Gateway, app: App) -> None:
    first, _ = await gw.start()
    second, _ = await gw.start(cookie=first)
    assert first != second
    (ended,) = await audit(gw, "session_ended")
    assert (ended["session_id"], ended["why"]) == (session_id(first), "replaced")
    response = await gw.get("/after", first)
    assert "X-Impersonation-Assertion" not in app.requests[-1].headers and set_cookies(response)[COOKIE]["value"] == ""


async def test_a_session_of_another_app_is_ignored(start: Factory, app: App) -> None:
    other = {"dialect": "pyramid", "mount": "/other", "session": {}}
    gw = await start({**APPS, "analytics": other})
    cookie, _ = await gw.start()
    response = await gw.get("/other/page", cookie)
    assert response.status == 200 and COOKIE not in set_cookies(response)  # left alone
    assert "X-Impersonation-Assertion" not in app.requests[-1].headers
    assert COOKIE not in app.requests[-1].headers.get("Cookie", "")
    assert (await gw.get("/page", cookie)).status == 200 and app.claims()["sid"] == session_id(cookie)


# -- modes ---------------------------------------------------------------------------------------------------------
async def test_read_only_and_deny_refusals_never_reach_the_app(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start(mode="read_only")
    assert app.claims()["mode"] == "read_only"
    seen = len(app.requests)
    with capture_logs() as logs:
        refused = await gw.request("POST", "/account", cookie)
        assert refused.status == 403 and refused.content_type == "application/problem+json"
        page = await gw.request("DELETE", "/account", cookie, Accept="text/html")
        assert page.status == 403 and page.content_type == "text/html"
        denied = await gw.request("GET", "/billing/invoices", cookie)
        assert denied.status == 403
    assert len(app.requests) == seen
    reasons = [(e["method"], e["path"], e["reason"]) for e in logs if e["event"] == "session_request_refused"]
    assert reasons == [("POST", "/account", "read_only"), ("DELETE", "/account", "read_only"),
                       ("GET", "/billing/invoices", "denied")]  # fmt: skip
    assert (await gw.request("POST", "/search", cookie)).status == 200  # an allow pattern
    assert (await gw.request("GET", "/account", cookie)).status == 200
    assert app.claims()["mode"] == "read_only"


async def test_deny_applies_to_a_full_session_too(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    seen = len(app.requests)
    assert (await gw.request("POST", "/billing/pay", cookie)).status == 403
    assert (await gw.request("POST", "/account", cookie)).status == 200
    assert len(app.requests) == seen + 1


async def test_refused_requests_count_as_activity(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start(mode="read_only")
    base = time.time()
    gw.sessions.clock = lambda: base + 15
    assert (await gw.request("POST", "/x", cookie)).status == 403
    gw.sessions.clock = lambda: base + 30  # 15 s after the refused request: within idle_seconds (20)
    assert (await gw.get("/y", cookie)).status == 200 and app.claims()["sid"] == session_id(cookie)


# -- kept cookies --------------------------------------------------------------------------------------------------
async def test_kept_cookies_stay_in_the_gateway(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    both = await gw.get("/two", cookie)
    assert set(set_cookies(both)) == set()  # both HttpOnly: kept
    await gw.get("/next", cookie, Cookie="app_sid=from-browser; first=x")
    assert app.cookies() == {"app_sid": "secret-1", "first": "1", "second": "2"}  # the browser's are replaced
    prefs = await gw.get("/prefs", cookie)
    assert set(set_cookies(prefs)) == {"theme"}  # not HttpOnly: the browser's
    logout = await gw.get("/logout", cookie)  # a deletion without HttpOnly: it passes, and the kept one leaves
    assert set_cookies(logout)["app_sid"]["max-age"] == "0"
    await gw.get("/after", cookie)
    assert app.cookies() == {"first": "1", "second": "2"}
    # every answer of the session: never a kept value
    for response in (both, prefs, logout):
        assert "secret-" not in str(response.headers)


async def test_the_app_deletes_kept_cookies_and_expired_ones_are_not_sent(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    await gw.get("/two", cookie)
    forget = await gw.get("/forget", cookie)
    assert "Set-Cookie" not in forget.headers  # HttpOnly deletions are the gateway's too
    await gw.get("/after", cookie)
    assert app.cookies() == {"app_sid": "secret-1"}
    base = time.time()
    await gw.get("/two", cookie)  # "second" has Max-Age=30
    gw.sessions.clock = lambda: base + 15
    await gw.get("/within", cookie)
    assert app.cookies() == {"app_sid": "secret-1", "first": "1", "second": "2"}
    gw.sessions.clock = lambda: base + 31
    await gw.get("/later", cookie)
    assert app.cookies() == {"app_sid": "secret-1", "first": "1"}


# -- end and session endpoints -------------------------------------------------------------------------------------
async def test_session_endpoint_and_end(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    info = await gw.get("/_impersonation/session", cookie)
    assert info.status == 200
    body = await info.json()
    assert set(body) == {"session_id", "app", "subject", "actor", "mode", "started_at", "expires_at"}
    assert (body["session_id"], body["app"], body["subject"], body["actor"]) == (session_id(cookie), "control-panel",
                                                                                 "505", "mgr-1")  # fmt: skip
    assert body["expires_at"].endswith("Z") and body["started_at"] < body["expires_at"]
    await gw.get("/prefs", cookie)
    seen = len(app.requests)
    assert (await gw.request("GET", "/_impersonation/end", cookie)).status == 405
    cross = await gw.request("POST", "/_impersonation/end", cookie, Origin="https://evil.example")
    assert cross.status == 403
    assert (await gw.get("/_impersonation/session", cookie)).status == 200  # it lives on
    origin = str(gw.client.make_url("")).rstrip("/")
    ended = await gw.request("POST", "/_impersonation/end", cookie, Origin=origin)
    assert ended.status == 200 and ended.content_type == "text/html"
    cookies = set_cookies(ended)
    assert cookies[COOKIE]["value"] == "" and cookies[COOKIE]["max-age"] == "0"
    assert cookies["theme"]["path"] == "/app" and cookies["theme"]["max-age"] == "0"
    assert len(app.requests) == seen  # the endpoints are the gateway's
    (entry,) = await audit(gw, "session_ended")
    assert (entry["why"], entry["session_id"]) == ("ended", session_id(cookie))
    assert (await gw.get("/_impersonation/session", cookie)).status == 401
    again = await gw.request("POST", "/_impersonation/end", cookie)
    assert again.status == 200 and set_cookies(again)[COOKIE]["value"] == ""
    after = await gw.get("/page", cookie)
    assert "X-Impersonation-Assertion" not in app.requests[-1].headers and set_cookies(after)[COOKIE]["value"] == ""


async def test_end_redirects_to_end_url(start: Factory, app: App) -> None:
    gw = await start({"control-panel": {**APPS["control-panel"], "session": {**SESSION, "end_url": "/bye"}}})
    cookie, _ = await gw.start()
    response = await gw.client.post("/_impersonation/end", headers={"Cookie": f"{COOKIE}={cookie}"},
                                    allow_redirects=False)  # fmt: skip
    assert (response.status, response.headers["Location"]) == (303, "/bye")


async def test_an_assertion_never_reaches_the_app_twice_when_it_drops_the_connection(gw: Gateway, app: App) -> None:
    """A reused connection the app drops before any byte of an answer: the request goes again, but never with the
    same assertion. A session's request goes with a new one (its own jti); a redemption's is single-use: 502."""
    cookie, _ = await gw.start()  # its connection to the app is kept alive, and reused next
    app.drop = 1
    response = await gw.get("/dropped", cookie)
    assert response.status == 200
    assert [r.path for r in app.requests[-2:]] == ["/dropped", "/dropped"]
    assert app.claims(-2)["jti"] != app.claims(-1)["jti"] and app.claims(-1)["sid"] == session_id(cookie)
    grant = await gw.mint()
    seen = len(app.requests)
    app.drop = 1
    response = await gw.client.get("/" + grant["login_url"].split("/", 3)[3])
    assert response.status == 502
    assert len(app.requests) == seen + 1 and app.claims()["jti"] == grant["grant_id"]
    app.drop = 1  # a WebSocket handshake does not go again either (aiohttp's client would resend it)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gw.client.ws_connect("/ws", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert refused.value.status == 502 and len(app.requests) == seen + 2


# -- WebSockets ----------------------------------------------------------------------------------------------------
async def test_a_websocket_of_the_session_is_closed_when_it_ends(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    async with gw.client.ws_connect("/ws", headers={"Cookie": f"{COOKIE}={cookie}"}) as ws:
        assert "ws_sid" not in str(ws._response.headers)  # kept, as the 101's HttpOnly cookies are
        assert app.claims()["sid"] == session_id(cookie)
        assert COOKIE not in app.requests[-1].headers.get("Cookie", "")
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        ended = await gw.client.post("/_impersonation/end", headers={"Cookie": f"{COOKIE}={cookie}"})
        assert ended.status == 200
        started = time.monotonic()
        message = await ws.receive(timeout=10)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008
        assert time.monotonic() - started < 5
    await gw.get("/after", cookie, Cookie="x=1")
    assert "ws_sid" not in app.cookies()


async def test_a_websocket_s_messages_count_as_activity(gw: Gateway, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "WATCH_SECONDS", 0.05)
    base = time.time()
    gw.sessions.clock = lambda: base
    cookie, _ = await gw.start()
    async with gw.client.ws_connect("/ws", headers={"Cookie": f"{COOKIE}={cookie}"}) as ws:
        # A message every 10 s: 30 s past the handshake, beyond the idle limit (20 s) of a session without requests.
        for offset in (10, 20, 30):
            gw.sessions.clock = lambda offset=offset: base + offset
            await ws.send_str(f"at {offset}")
            assert (await ws.receive(timeout=5)).data == f"at {offset}"  # still bridged: the session is live
            await asyncio.sleep(0.2)  # the watcher has seen the messages, and touched the session
        gw.sessions.clock = lambda: base + 40  # 10 s of silence: still live, and the watcher's checks touch nothing
        await asyncio.sleep(0.2)
        gw.sessions.clock = lambda: base + 52  # 22 s since the last message (idle 20 s, and up to 1 s of lag): ended
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008
    (ended,) = await audit(gw, "session_ended")
    assert ended["why"] == "idle"


async def test_a_read_only_session_s_websocket_is_refused(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start(mode="read_only")
    seen = len(app.requests)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gw.client.ws_connect("/ws", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert refused.value.status == 403 and len(app.requests) == seen


# -- cap and idle --------------------------------------------------------------------------------------------------
async def test_the_cap_ends_a_session_however_busy(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    base = time.time()
    for offset in (10, 25, 40, 55):  # busy: never idle for 20 s
        gw.sessions.clock = lambda offset=offset: base + offset
        assert (await gw.get("/busy", cookie)).status == 200 and "sid" in app.claims()
    gw.sessions.clock = lambda: base + 61
    response = await gw.get("/late", cookie)
    assert "X-Impersonation-Assertion" not in app.requests[-1].headers and set_cookies(response)[COOKIE]["value"] == ""
    (ended,) = await audit(gw, "session_ended")
    assert ended["why"] == "max_age"


async def test_idle_ends_a_session(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    base = time.time()
    gw.sessions.clock = lambda: base + 21
    response = await gw.get("/late", cookie)
    assert "X-Impersonation-Assertion" not in app.requests[-1].headers and set_cookies(response)[COOKIE]["value"] == ""
    (ended,) = await audit(gw, "session_ended")
    assert ended["why"] == "idle"


async def test_a_session_redis_expired_is_audited_by_the_sweep(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    await gw.redis.delete(f"{gw.prefix}session:{{{session_id(cookie)}}}")  # as its TTL would
    await gw.sessions.sweep()  # gone: the next sweep audits it, unless whoever ended it has
    await until("the sweep to audit the expired session", lambda: audit(gw, "session_ended"))
    await gw.sessions.sweep()
    await gw.sessions.sweep()  # once only
    (ended,) = await audit(gw, "session_ended")
    assert (ended["why"], ended["session_id"]) == ("idle", session_id(cookie))


# -- two processes -------------------------------------------------------------------------------------------------
async def test_two_processes_serve_one_session(tmp_path: Path, redis_server: RedisServer, app: App) -> None:
    ports = [free_port(), free_port()]
    apps = {"control-panel": {**APPS["control-panel"], "upstream": app.url}}
    configs = [processes.write_config(tmp_path, redis_server.url, p, apps=apps, prefix=f"two{ports[0]}:")
               for p in ports]  # fmt: skip
    procs = [processes.start(c) for c in configs]
    with processes.running(*procs):
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url, proc in zip(urls, procs, strict=True):
            await processes.wait_ready(url, proc)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.post(urls[0] + "/v1/grants", json={"app": "control-panel", "subject": "505"},
                                 headers={"Authorization": f"Bearer {MANAGER}"}) as minted:  # fmt: skip
                grant = await minted.json()
            async with http.get(urls[0] + "/" + grant["login_url"].split("/", 3)[3]) as redeemed:
                cookie = set_cookies(redeemed)[COOKIE]["value"]
            headers = {"Cookie": f"{COOKIE}={cookie}"}
            async with http.get(urls[1] + "/on-second", headers=headers) as second:
                assert second.status == 200
            assert app.requests[-1].path == "/on-second" and "X-Impersonation-Assertion" in app.requests[-1].headers
            async with http.post(urls[1] + "/_impersonation/end", headers=headers) as ended:
                assert ended.status == 200
            async with http.get(urls[0] + "/on-first", headers=headers) as first:
                assert set_cookies(first)[COOKIE]["value"] == ""
            assert app.requests[-1].path == "/on-first"
            assert "X-Impersonation-Assertion" not in app.requests[-1].headers


async def _live(gw: Gateway, cookie: str) -> bool:
    return (await gw.get("/_impersonation/session", cookie)).status == 200


async def test_the_actor_s_removal_ends_the_session_at_its_next_request(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    smaller = {"apps": {"control-panel": {**DIRECTORY["apps"]["control-panel"], "principals": [
        p for p in DIRECTORY["apps"]["control-panel"]["principals"] if p["id"] != "mgr-1"]}}}  # fmt: skip
    await Store(gw.redis, gw.prefix).load_directory(parse_directory(smaller))
    await until("the actor's removal to be seen", lambda: _not(_live(gw, cookie)))
    (ended,) = await audit(gw, "session_ended")
    assert ended["why"] == "actor_removed"


async def test_the_subject_s_deactivation_ends_the_session(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    subjects = [
        {**s, "active": False} if s["id"] == "505" else s for s in DIRECTORY["apps"]["control-panel"]["subjects"]
    ]
    changed = {"apps": {"control-panel": {**DIRECTORY["apps"]["control-panel"], "subjects": subjects}}}
    await Store(gw.redis, gw.prefix).load_directory(parse_directory(changed))
    await until("the subject's deactivation to end the session", lambda: _not(_live(gw, cookie)))
    (ended,) = await audit(gw, "session_ended")
    assert ended["why"] == "subject_inactive"


async def _not(check: Awaitable[bool]) -> bool:
    return not await check


# -- gateway.downstream --------------------------------------------------------------------------------------------
async def test_downstream_exposes_sid_and_mode(gw: Gateway, app: App) -> None:
    signer = Signer(KEY, PUBLIC_URL, 30)
    verifier = Verifier("http://gateway.test/.well-known/jwks.json", "control-panel", issuer=PUBLIC_URL,
                        fetch=lambda url: signer.jwks_json())  # fmt: skip
    cookie, _ = await gw.start(mode="read_only")
    await gw.get("/next", cookie)
    first, later = (verifier.verify(r.headers["X-Impersonation-Assertion"]) for r in app.requests[-2:])
    assert (first.sid, first.mode, later.sid, later.mode) == (session_id(cookie), "read_only") * 2
    assert first.grant_id != later.grant_id  # the jti: one per request
    handed_off = verifier.verify(signer.sign({"aud": "control-panel", "sub": "505", "act": {"sub": "mgr-1"},
                                              "jti": "grant-1"}, int(time.time())))  # fmt: skip
    assert (handed_off.sid, handed_off.mode) == (None, None)
