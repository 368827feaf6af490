"""The application around the dialects: routing, scanner-safe redemption, proxying, logs, metrics, JWKS."""

from __future__ import annotations

from typing import Any

import aiohttp
import fakeredis
import jwt
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.app import create_app
from tests.conftest import KEY, GatewayFactory, Upstream, free_port, make_config, until

SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"
MANAGER_TOKEN = "vY5fwetestK3gJXZH5uHCw"
MEDIA = "application/vnd.api+json"
CP = {"dialect": "activeplatform"}


async def mint(client: Any, path: str = SEED) -> dict[str, str]:
    response = await client.get(path, headers={"X-Api-Token": MANAGER_TOKEN})
    assert response.status == 200, await response.text()
    body: dict[str, str] = await response.json(content_type=MEDIA)
    return body


def login(body: dict[str, str], mount: str = "") -> str:
    return f"{mount}/welcome?user_email={body['owner_email']}&user_token={body['owner_token']}"


async def test_scanner_safe_get_does_not_consume(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway()  # redeem_on_get defaults to false
    body = await mint(client)
    for method in ("GET", "HEAD", "GET"):  # link previewers and mail scanners
        page = await client.request(method, login(body))
        assert page.status == 200
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.headers["Cache-Control"] == "no-store"
        assert page.headers["Referrer-Policy"] == "no-referrer"
    html = await (await client.get(login(body))).text()
    assert 'method="post"' in html and "<button" in html and "<script>" in html
    assert upstream.requests == []
    confirmed = await client.post(login(body), data={"impersonation_confirm": "1"})
    assert confirmed.status == 200
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query, seen.body) == ("GET", "/welcome", {}, b"")
    assert "Content-Type" not in seen.headers
    assert upstream.claims()["sub"] == "505"
    assert (await client.post(login(body), data={"impersonation_confirm": "1"})).status == 401


async def test_head_never_consumes_even_when_get_redeems(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps={"control-panel": {**CP, "redeem_on_get": True}})
    body = await mint(client)
    assert (await client.head(login(body))).status == 200
    assert upstream.requests == []
    assert (await client.get(login(body))).status == 200
    assert len(upstream.requests) == 1


async def test_jwks_verifies_the_assertion(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps={"control-panel": {**CP, "redeem_on_get": True}})
    await client.get(login(await mint(client)))
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    (key,) = jwks["keys"]
    assert (key["kty"], key["crv"], key["alg"]) == ("OKP", "Ed25519", "EdDSA")
    token = upstream.requests[0].headers["X-Impersonation-Assertion"]
    assert jwt.get_unverified_header(token)["kid"] == key["kid"]
    claims = jwt.decode(token, jwt.PyJWK(key).key, algorithms=["EdDSA"], audience="control-panel")
    assert claims["sub"] == "505"
    other = jwt.encode({"sub": "505", "aud": "control-panel"}, KEY, algorithm="EdDSA")
    assert jwt.decode(other, jwt.PyJWK(key).key, algorithms=["EdDSA"], audience="control-panel")["sub"] == "505"


async def test_routing_by_host_and_mount(gateway: GatewayFactory, upstream: Upstream) -> None:
    apps = {
        "by-host": {**CP, "hosts": ["cp.example.com"], "redeem_on_get": True},
        "mounted": {**CP, "mount": "/cp", "redeem_on_get": True},
        "control-panel": {**CP, "redeem_on_get": True},
    }
    directory = {"apps": {name: {
        "resellers": [{"id": 1}],
        "principals": [{"id": f"m-{name}", "token": MANAGER_TOKEN, "role": "admin", "reseller": 1}],
        "subjects": [{"id": "505", "email": "example@activeplatform.com", "reseller": 1}],
    } for name in apps}}  # fmt: skip
    client = await gateway(apps=apps, directory=directory)
    by_host = await client.get(SEED, headers={"X-Api-Token": MANAGER_TOKEN, "Host": "cp.example.com:8080"})
    mounted = await mint(client, "/cp" + SEED)
    default = await mint(client)
    await client.get(login(await by_host.json(content_type=MEDIA)), headers={"Host": "cp.example.com"})
    await client.get(login(mounted, "/cp"))
    await client.get(login(default))
    assert [r.path for r in upstream.requests] == ["/welcome", "/welcome", "/welcome"]  # the mount is stripped
    assert [upstream.claims(i, audience=a)["act"]["sub"] for i, a in enumerate(apps)] == [
        "m-by-host", "m-mounted", "m-control-panel"
    ]  # fmt: skip
    # A grant of one app is refused on another app's route, and burnt.
    other = await mint(client, "/cp" + SEED)
    assert (await client.get(login(other))).status == 401
    assert (await client.get(login(other, "/cp"))).status == 401


async def test_proxy_relays_status_headers_and_body(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway()
    payload = b"x" * 300_000  # larger than the mint body limit: pass-through streams
    response = await client.put("/files/a?b=c", data=payload, headers={"X-Custom": "1", "Connection": "close"})
    assert response.status == 200
    assert response.headers["Location"] == "/dashboard"
    assert "app_session=s1" in response.headers["Set-Cookie"]
    assert (await response.json())["path"] == "/files/a"
    (seen,) = upstream.requests
    assert (seen.method, seen.body, seen.headers["X-Custom"]) == ("PUT", payload, "1")
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen.headers["X-Forwarded-Host"].startswith("127.0.0.1:")


async def test_unreachable_upstream_is_a_502(aiohttp_client: Any, prefix: str) -> None:
    config = make_config(prefix, f"http://127.0.0.1:{free_port()}")
    client = await aiohttp_client(create_app(config, redis=fakeredis.FakeAsyncRedis(), key=KEY))
    response = await client.get("/anything")
    assert response.status == 502
    assert "upstream" in await response.text()


async def test_mint_body_limit_is_a_413_in_dialect_shape(gateway: GatewayFactory) -> None:
    client = await gateway(server={"body_limit_bytes": 1024})
    response = await client.get(SEED, headers={"X-Api-Token": MANAGER_TOKEN}, data=b"x" * 2048)
    assert response.status == 413
    assert (await response.json(content_type=MEDIA))["errors"][0]["status"] == "413"


@pytest.mark.parametrize(
    ("trusted", "forwarded", "client"),
    [([], "203.0.113.9", "127.0.0.1"), (["127.0.0.0/8"], "203.0.113.9, 10.0.0.1", "10.0.0.1"),
     (["127.0.0.0/8", "10.0.0.0/8"], "203.0.113.9, 10.0.0.1", "203.0.113.9")],
)  # fmt: skip
async def test_forwarded_for_only_from_trusted_proxies(
    gateway: GatewayFactory, trusted: list[str], forwarded: str, client: str
) -> None:
    app = await gateway(server={"trusted_proxies": trusted})
    with capture_logs() as logs:
        await app.get(SEED, headers={"X-Api-Token": MANAGER_TOKEN, "X-Forwarded-For": forwarded})
    (minted,) = [e for e in logs if e["event"] == "grant_minted"]
    assert minted["client"] == client


async def test_logs_name_who_and_never_a_secret(gateway: GatewayFactory) -> None:
    client = await gateway(apps={"control-panel": {**CP, "redeem_on_get": True}})
    with capture_logs() as logs:
        body = await mint(client)
        await client.get(login(body))
        await client.get(login(body))  # reused
        await client.get(SEED, headers={"X-Api-Token": "wrong-secret-credential"})
    events = {e["event"]: e for e in logs}
    for name in ("grant_minted", "grant_redeemed", "grant_reused", "grant_refused", "mint_refused"):
        assert events[name]["audit"] is True, name
    for name in ("grant_minted", "grant_redeemed", "grant_reused"):
        e = events[name]
        assert (e["actor"], e["subject"], e["app"], e["dialect"], e["client"]) == (
            "mgr-1", "505", "control-panel", "activeplatform", "127.0.0.1"
        ), name  # fmt: skip
    assert events["grant_minted"]["grant_id"] == events["grant_redeemed"]["grant_id"]
    assert sum(e["event"] == "request" for e in logs) == 4
    text = repr(logs)
    for secret in (body["owner_token"], MANAGER_TOKEN, "wrong-secret-credential"):
        assert secret not in text


async def test_metrics_count_by_app_dialect_and_reason(gateway: GatewayFactory) -> None:
    client = await gateway(apps={"control-panel": {**CP, "redeem_on_get": True}})
    body = await mint(client)
    await client.get(login(body))
    await client.get(login(body))
    text = await (await client.get("/metrics")).text()
    assert 'gateway_grants_minted_total{app="control-panel",dialect="activeplatform"} 1.0' in text
    assert 'gateway_grants_redeemed_total{app="control-panel",dialect="activeplatform"} 1.0' in text
    assert 'gateway_grants_refused_total{app="control-panel",dialect="activeplatform",reason="reused"} 1.0' in text
    assert 'gateway_grants_reused_total{app="control-panel"} 1.0' in text
    assert 'gateway_request_duration_seconds_count{kind="mint"} 1.0' in text


async def test_health_and_readiness(gateway: GatewayFactory) -> None:
    client = await gateway()
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_a_large_form_post_without_a_grant_streams_through(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(server={"body_limit_bytes": 1024})
    form = {"field": "x" * 5000}
    response = await client.post("/upload", data=form)
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.body == b"field=" + b"x" * 5000


PYRAMID = {"analytics": {"dialect": "pyramid"}}  # redeem_on_get: false, the default
PYRAMID_DIRECTORY = {"apps": {"analytics": {
    "principals": [{"id": "ea-1", "token": "ea-token", "role": "enterprise_admin"}],
    "subjects": [{"id": "jdoe", "domain": "sales.example.com", "email": "jdoe@example.com"}],
}}}  # fmt: skip


async def test_a_cookie_carrier_needs_no_confirmation_and_an_app_session_cookie_passes(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    client = await gateway(apps=PYRAMID, directory=PYRAMID_DIRECTORY)
    # The app's own session in the same cookie: every method reaches the app, untouched, unconfirmed.
    for method in ("GET", "HEAD"):
        response = await client.request(method, "/reports", headers={"Cookie": "PyramidAuth=app-session"})
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
    assert ["PyramidAuth=app-session" in r.headers["Cookie"] for r in upstream.requests] == [True, True]
    # A grant in the cookie is redeemed by the GET itself (no scanner sends the user's cookies).
    minted = await client.post("/API3/authentication/authenticateUserByToken",
                               json={"token": "ea-token", "userIdentity": "jdoe"})  # fmt: skip
    token = await minted.text()
    response = await client.get("/reports", headers={"Cookie": f"PyramidAuth={token}"})
    assert response.status == 200
    assert "PyramidAuth" not in upstream.requests[-1].headers.get("Cookie", "")
    assert upstream.claims(audience="analytics")["sub"] == "jdoe"


async def test_an_upstream_failing_mid_answer_cuts_the_connection(
    aiohttp_client: Any, aiohttp_server: Any, prefix: str
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first part")
        assert request.transport is not None
        request.transport.abort()  # the upstream dies half-way
        return response

    app = web.Application()
    app.router.add_get("/big", broken)
    server = await aiohttp_server(app)
    config = make_config(prefix, str(server.make_url("")).rstrip("/"))
    client = await aiohttp_client(create_app(config, redis=fakeredis.FakeAsyncRedis(), key=KEY))
    with capture_logs() as logs:
        with pytest.raises(aiohttp.ClientPayloadError):  # cut: the client never takes the part for the whole
            response = await client.get("/big")
            assert response.status == 200  # the relayed status went out before the failure
            await response.read()

        async def logged() -> bool:
            return any(e["event"] == "request" for e in logs)

        await until("the request's log line", logged)
    # The app's fault, said once as a warning: no error, no traceback (the soak saw dozens an hour).
    assert [(e["event"], e["log_level"]) for e in logs if e["log_level"] != "info"] == [
        ("upstream_broke_answer", "warning")
    ]
