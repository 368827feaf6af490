"""``gateway.downstream``: what an app behind the gateway uses to verify its assertion — against the JWKS URL (keys
cached, fetched again for an unknown ``kid`` at most once per interval), audience, expiry, one use per ``jti``
(remembered until the assertion expires, in memory or in a Redis every process of the app shares) — as a plain
function, an aiohttp middleware, in a WSGI app; and the demo app, which uses it."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.app import create_app
from gateway.assertion import Signer
from gateway.directory import parse_directory
from gateway.downstream import (
    HEADER,
    InvalidAssertion,
    RedisReplayCache,
    ReplayCache,
    Verifier,
    impersonation,
    middleware,
)
from gateway.store import Store
from tests.conftest import DIRECTORY, KEY, PUBLIC_URL, free_port, make_config

ROOT = Path(__file__).parent.parent
JWKS_URL = "http://gateway.test/.well-known/jwks.json"
CLAIMS = {"aud": "control-panel", "sub": "505", "act": {"sub": "mgr-1", "role": "admin"}, "dialect": "activeplatform"}


class Keys:
    """A gateway's keys as a JWKS endpoint that counts its fetches."""

    def __init__(self, *signers: Signer) -> None:
        self.signers = list(signers)
        self.fetches = 0

    def fetch(self, url: str) -> bytes:
        assert url == JWKS_URL
        self.fetches += 1
        keys = [k for s in self.signers for k in s.jwks()["keys"]]
        return json.dumps({"keys": keys}).encode()


class Clock:
    """A monotonic clock for a Verifier's key cache that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def signer(key: Ed25519PrivateKey | None = None, ttl: int = 30) -> Signer:
    return Signer(key or Ed25519PrivateKey.generate(), PUBLIC_URL, ttl)


def assertion(sign: Signer, jti: str = "grant-1", now: int | None = None, **claims: Any) -> str:
    return sign.sign({**CLAIMS, "jti": jti, **claims}, int(time.time()) if now is None else now)


def test_a_valid_assertion_names_subject_actor_and_reason() -> None:
    s = signer()
    keys = Keys(s)
    verifier = Verifier(JWKS_URL, "control-panel", issuer=PUBLIC_URL, fetch=keys.fetch)
    who = verifier.verify(assertion(s, reason="ticket 7", email="a@example.com"))
    assert (who.subject, who.actor, who.role, who.app, who.grant_id) == ("505", "mgr-1", "admin", "control-panel",
                                                                           "grant-1")  # fmt: skip
    assert (who.email, who.reason, who.claims["dialect"]) == ("a@example.com", "ticket 7", "activeplatform")
    assert keys.fetches == 1
    verifier.verify(assertion(s, jti="grant-2"))
    assert keys.fetches == 1  # cached


def test_each_assertion_verifies_once() -> None:
    s = signer()
    verifier = Verifier(JWKS_URL, "control-panel", fetch=Keys(s).fetch)
    token = assertion(s)
    verifier.verify(token)
    with pytest.raises(InvalidAssertion, match="replayed"):
        verifier.verify(token)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s: assertion(s, aud="other-app"), "Audience doesn't match"),
        (lambda s: assertion(s, now=int(time.time()) - 100), "expired"),
        (lambda s: assertion(s, act="mgr-1"), "no act.sub"),
        (lambda s: assertion(s, iss="http://elsewhere"), "Invalid issuer"),
        (lambda s: assertion(signer(), jti="x"), "does not publish"),  # another key: its kid is unknown
        (lambda s: "not.a.jwt", "not a valid assertion"),
        (lambda s: assertion(s)[:-4] + "AAAA", "Signature verification failed"),
    ],
)
def test_what_is_refused(make: Callable[[Signer], str], reason: str) -> None:
    s = signer()
    verifier = Verifier(JWKS_URL, "control-panel", issuer=PUBLIC_URL, fetch=Keys(s).fetch, refetch_seconds=0)
    with pytest.raises(InvalidAssertion, match=reason):
        verifier.verify(make(s))


def test_a_forged_key_with_the_gateways_kid_is_refused() -> None:
    s, forger = signer(), signer()
    token = forger.sign({**CLAIMS, "jti": "j"}, int(time.time()))
    _, payload, signature = token.split(".")
    genuine_header = assertion(s).split(".")[0]  # the same kid as the gateway's key
    verifier = Verifier(JWKS_URL, "control-panel", fetch=Keys(s).fetch)
    with pytest.raises(InvalidAssertion, match="Signature verification failed"):
        verifier.verify(f"{genuine_header}.{payload}.{signature}")


def test_an_unknown_kid_fetches_again_but_not_more_than_once_per_interval() -> None:
    old, new = signer(), signer()
    keys, clock = Keys(old), Clock()
    verifier = Verifier(JWKS_URL, "control-panel", fetch=keys.fetch, refetch_seconds=10, clock=clock)
    verifier.verify(assertion(old, jti="a"))
    keys.signers.append(new)  # the gateway rotated: the new key is published
    clock.now += 9
    with pytest.raises(InvalidAssertion, match="does not publish"):
        verifier.verify(assertion(new, jti="b"))  # unknown kid, but fetched less than an interval ago
    assert keys.fetches == 1
    clock.now += 1
    verifier.verify(assertion(new, jti="b"))  # unknown kid, an interval later: fetched again
    assert keys.fetches == 2
    for n in range(5):  # forged kids cannot make it fetch on every request
        with pytest.raises(InvalidAssertion, match="does not publish"):
            verifier.verify(assertion(signer(), jti=f"f{n}"))
    assert keys.fetches == 2
    verifier.verify(assertion(old, jti="c"))  # both keys known
    assert keys.fetches == 2
    clock.now += 10
    for n in range(5):  # an interval later: one fetch for all of them
        with pytest.raises(InvalidAssertion, match="does not publish"):
            verifier.verify(assertion(signer(), jti=f"g{n}"))
    assert keys.fetches == 3


def test_the_keys_are_fetched_again_when_the_cache_is_old() -> None:
    s = signer()
    keys, clock = Keys(s), Clock()
    verifier = Verifier(JWKS_URL, "control-panel", fetch=keys.fetch, cache_seconds=60, clock=clock)
    verifier.verify(assertion(s, jti="a"))
    clock.now += 59
    verifier.verify(assertion(s, jti="b"))
    assert keys.fetches == 1
    clock.now += 1
    verifier.verify(assertion(s, jti="c"))
    assert keys.fetches == 2


def test_an_unreachable_jwks_is_an_invalid_assertion_not_a_crash() -> None:
    def down(url: str) -> bytes:
        raise OSError("connection refused")

    verifier = Verifier(JWKS_URL, "control-panel", fetch=down)
    with pytest.raises(InvalidAssertion, match="cannot fetch the gateway's keys"):
        verifier.verify(assertion(signer()))
    bad = Verifier(JWKS_URL, "control-panel", fetch=lambda url: b"<html>")
    with pytest.raises(InvalidAssertion, match="JWKS is not valid"):
        bad.verify(assertion(signer()))


def test_the_replay_cache_keeps_each_id_until_it_expires_and_refuses_new_ones_when_full() -> None:
    cache = ReplayCache(size=3)
    now = time.time()
    assert cache.first_time("a", now + 10, now) and cache.first_time("b", now + 30, now)
    assert cache.first_time("c", now + 20, now)
    assert not cache.first_time("a", now + 10, now)
    with pytest.raises(InvalidAssertion, match="3 unexpired assertions are held"):
        cache.first_time("d", now + 30, now)  # full: no unexpired id is forgotten to make room
    assert not cache.first_time("a", now + 10, now + 10)  # still valid at its expiry
    assert cache.first_time("d", now + 30, now + 11)  # "a" expired: room for one
    with pytest.raises(InvalidAssertion, match="unexpired"):
        cache.first_time("e", now + 40, now + 11)
    assert cache.first_time("e", now + 40, now + 21)  # "c" expired too (the order of expiry, not of arrival)
    assert not cache.first_time("b", now + 30, now + 21) and not cache.first_time("d", now + 30, now + 21)
    assert cache.first_time("a", now + 40, now + 31)  # an expired id is forgotten


def test_a_replay_is_refused_after_more_than_size_other_assertions() -> None:
    """Security probe L7: ReplayCache(size=100) forgot an id after 100 others, and its replay was accepted."""
    s = signer()
    verifier = Verifier(JWKS_URL, "control-panel", fetch=Keys(s).fetch, replay=ReplayCache(size=100))
    token = assertion(s, jti="first")
    verifier.verify(token)
    for n in range(99):
        verifier.verify(assertion(s, jti=f"other-{n}"))
    for n in range(50):  # full: refused rather than making room by forgetting one still valid
        with pytest.raises(InvalidAssertion, match="100 unexpired assertions are held"):
            verifier.verify(assertion(s, jti=f"more-{n}"))
    with pytest.raises(InvalidAssertion, match="replayed"):
        verifier.verify(token)


async def test_verifiers_sharing_a_redis_refuse_a_replay(redis_client: Any, prefix: str) -> None:
    """Security probe L7: a second Verifier (another process of the app) accepted an assertion the first had used."""
    s = signer()
    first, second = (
        Verifier(JWKS_URL, "control-panel", fetch=Keys(s).fetch, replay=RedisReplayCache(redis_client, prefix=prefix))
        for _ in range(2)
    )
    now = int(time.time())
    token = assertion(s, jti="shared", now=now)  # exp = now + 30, leeway 5
    assert (await first.verify_async(token)).grant_id == "shared"
    with pytest.raises(InvalidAssertion, match="replayed"):
        await second.verify_async(token)
    with pytest.raises(InvalidAssertion, match="replayed"):
        await first.verify_async(token)
    ttl = await redis_client.pttl(f"{prefix}shared")
    assert (now + 35 - time.time()) * 1000 - 1000 < ttl <= 35_000  # kept until exp plus leeway, not by count
    await second.verify_async(assertion(s, jti="another"))


async def test_the_middleware_of_two_app_processes_sharing_a_redis(
    aiohttp_client: Any, redis_client: Any, prefix: str
) -> None:
    s = signer()

    async def whoami(request: web.Request) -> web.Response:
        who = impersonation(request)
        return web.Response(text="anonymous" if who is None else who.subject)

    clients = []
    for _ in range(2):
        replay = RedisReplayCache(redis_client, prefix=prefix)
        app = web.Application(middlewares=[middleware(Verifier(JWKS_URL, "control-panel", fetch=Keys(s).fetch,
                                                               replay=replay))])  # fmt: skip
        app.router.add_get("/", whoami)
        clients.append(await aiohttp_client(app))
    token = assertion(s)
    used = await clients[0].get("/", headers={HEADER: token})
    assert (used.status, await used.text()) == (200, "505")
    replayed = await clients[1].get("/", headers={HEADER: token})
    assert replayed.status == 401 and "replayed" in await replayed.text()


async def test_a_redis_that_fails_refuses_the_assertion() -> None:
    s = signer()
    down = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    verifier = Verifier(JWKS_URL, "control-panel", fetch=Keys(s).fetch, replay=RedisReplayCache(down))
    try:
        with pytest.raises(InvalidAssertion, match=r"cannot check for a replay: Redis failed \(ConnectionError\)"):
            await verifier.verify_async(assertion(s))
        with pytest.raises(TypeError, match="verify_async"):
            verifier.verify(assertion(s))  # a blocking call cannot wait for Redis
    finally:
        await down.aclose()


def test_apps_import_it_without_the_gateway_or_redis() -> None:
    code = "import sys, gateway.downstream; print(sorted(m for m in sys.modules if m.startswith(('gateway', 'redis'))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "['gateway', 'gateway.downstream']"


async def test_the_aiohttp_middleware(aiohttp_client: Any) -> None:
    s = signer()
    verifier = Verifier(JWKS_URL, "control-panel", fetch=Keys(s).fetch)

    async def whoami(request: web.Request) -> web.Response:
        who = impersonation(request)
        return web.Response(text="anonymous" if who is None else f"{who.subject} by {who.actor}")

    optional = web.Application(middlewares=[middleware(verifier)])
    optional.router.add_get("/", whoami)
    client: TestClient[Any, Any] = await aiohttp_client(optional)
    assert await (await client.get("/")).text() == "anonymous"
    token = assertion(s)
    assert await (await client.get("/", headers={HEADER: token})).text() == "505 by mgr-1"
    replayed = await client.get("/", headers={HEADER: token})
    assert replayed.status == 401 and "replayed" in await replayed.text()

    required = web.Application(middlewares=[middleware(verifier, required=True)])
    required.router.add_get("/", whoami)
    client = await aiohttp_client(required)
    assert (await client.get("/")).status == 401
    assert (await client.get("/", headers={HEADER: assertion(s, jti="j2")})).status == 200


def test_in_a_wsgi_app_as_the_readme_shows() -> None:
    s = signer()
    verifier = Verifier(JWKS_URL, "control-panel", fetch=Keys(s).fetch)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        token = environ.get("HTTP_X_IMPERSONATION_ASSERTION")
        try:
            who = verifier.verify(token) if token else None
        except InvalidAssertion:
            start_response("401 Unauthorized", [("Content-Type", "text/plain")])
            return [b"invalid assertion\n"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{who.subject} by {who.actor}\n".encode() if who else b"anonymous\n"]

    def call(token: str | None) -> tuple[str, bytes]:
        environ: dict[str, Any] = {"wsgi.input": io.BytesIO()}
        setup_testing_defaults(environ)
        if token:
            environ["HTTP_X_IMPERSONATION_ASSERTION"] = token
        status: list[str] = []
        body = b"".join(app(environ, lambda s, h: status.append(s)))
        return status[0], body

    assert call(None) == ("200 OK", b"anonymous\n")
    token = assertion(s)
    assert call(token) == ("200 OK", b"505 by mgr-1\n")
    assert call(token)[0] == "401 Unauthorized"


def _demo() -> Any:
    spec = importlib.util.spec_from_file_location("demo_downstream", ROOT / "demo" / "downstream.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_downstream"] = module
    spec.loader.exec_module(module)
    return module


async def test_the_demo_app_signs_in_through_a_real_gateway(
    aiohttp_server: Any, redis_client: Any, prefix: str
) -> None:
    """Gateway and demo on real sockets: the demo fetches the gateway's JWKS over HTTP and shows who is who."""
    demo = _demo()
    gateway_port = free_port()
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    demo_server = await aiohttp_server(
        demo.create_app(demo.Settings(gateway=gateway_url, audiences=("control-panel",), issuer=PUBLIC_URL))
    )
    config = make_config(prefix, str(demo_server.make_url("")).rstrip("/"),
                         {"control-panel": {"dialect": "activeplatform", "redeem_on_get": True}})  # fmt: skip
    await Store(redis_client, prefix).load_directory(parse_directory(DIRECTORY))
    await aiohttp_server(create_app(config, redis=redis_client, key=KEY), port=gateway_port)
    async with aiohttp.ClientSession(gateway_url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        headers = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw", "X-Impersonation-Reason": "ticket 12"}
        async with http.get("/api/v3/resellers/1/user_authentication/token?account_id=505", headers=headers) as r:
            body = await r.json(content_type=None)
        async with http.get(f"/welcome?user_email={body['owner_email']}&user_token={body['owner_token']}") as r:
            page = await r.text()
            assert r.status == 200, page
        assert "signed in as 505 — impersonated by mgr-1" in page and "reason: ticket 12" in page
        async with http.get("/later") as r:  # the demo's own session cookie
            assert "signed in as 505 — impersonated by mgr-1" in await r.text()
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway_url + "/", headers={HEADER: "forged.token.here"}) as r:
            assert (r.status, "not signed in" in await r.text()) == (200, True)  # the gateway drops the header
        async with http.get(demo_server.make_url("/"), headers={HEADER: "forged.token.here"}) as r:
            assert r.status == 401  # sent to the app directly: its verifier refuses it


async def test_in_an_asgi_app_as_the_readme_shows() -> None:
    s = signer()
    verifier = Verifier(JWKS_URL, "control-panel", fetch=Keys(s).fetch)  # fetched in a thread: never blocks

    async def app(scope: dict[str, Any], receive: Any, send: Callable[[dict[str, Any]], Any]) -> None:
        token = dict(scope["headers"]).get(b"x-impersonation-assertion")
        try:
            who = await verifier.verify_async(token.decode()) if token else None
        except InvalidAssertion:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"invalid assertion\n"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": f"{who.subject}\n".encode() if who else b"anonymous\n"})

    async def call(token: str | None) -> list[Any]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(b"x-impersonation-assertion", token.encode())] if token else []
        await app({"type": "http", "headers": headers}, None, send)
        return [sent[0]["status"], sent[1]["body"]]

    token = assertion(s)
    assert await call(None) == [200, b"anonymous\n"]
    assert await call(token) == [200, b"505\n"]
    assert (await call(token))[0] == 401
