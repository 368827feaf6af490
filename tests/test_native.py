"""The native API: ``POST /v1/grants`` mints with the dialects' policy and answers the dialect's own login URL; every
error is RFC 9457 problem details."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.core import REASON_HEADER, REASON_MAX, Gateway
from tests.conftest import PUBLIC_URL, GatewayFactory, Upstream
from tests.fixtures import DEMO_APPS, DIRECTORY

APPS = {name: {**app, "redeem_on_get": True} for name, app in DEMO_APPS.items()}
AP = "vY5fwetestK3gJXZH5uHCw"  # ActivePlatform manager of reseller 1 (its subjects: 505, 707 below 7, ...)
PROBLEM = "application/problem+json"
BAD_REASON = f"reason: at most {REASON_MAX} printable characters"

# Per dialect's demo app: an actor's credential, a subject, and the login link's shape.
CASES = {
    "control-panel": (AP, "505", "/?user_email=example%40activeplatform.com&user_token="),
    "analytics": ("pyramid-enterprise-admin-token", "jdoe", "/?token="),
    "switch": ("denovolab-demo-admin-token", "41", "/?token="),
    "exchange": ("btcdirect-partner-demo-token", "u-1", "/?uuid=45b9313b-fa47-4786-baf1-62969dec31f2&token="),
}


async def native(client: TestClient[Any, Any], body: Any, credential: str | None = AP, **headers: str) -> Any:
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    return await client.post("/v1/grants", json=body, headers=headers)


async def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM
    body: dict[str, Any] = await response.json(content_type=PROBLEM)
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status and body["type"].startswith("urn:impersonation-gateway:problem:")
    return body


@pytest.mark.parametrize("app", CASES)
async def test_a_native_grant_logs_in_through_the_dialects_own_link(
    gateway: GatewayFactory, upstream: Upstream, app: str
) -> None:
    credential, subject, link = CASES[app]
    client = await gateway(apps=APPS, directory=DIRECTORY)
    before = int(time.time())
    response = await native(client, {"app": app, "subject": subject, "reason": "ticket 9", "custom_data": {"t": 9}},
                            credential)  # fmt: skip
    assert response.status == 201, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert list(body) == ["grant_id", "token", "login_url", "expires_at"]
    assert body["login_url"] == f"{PUBLIC_URL}{link}{body['token']}"
    expires = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    assert before + 60 <= expires <= time.time() + 60
    parts = urlsplit(body["login_url"])
    redeemed = await client.get(f"{parts.path}?{parts.query}")
    assert redeemed.status == 200
    claims = upstream.claims(audience=app)
    assert (claims["sub"], claims["jti"], claims["reason"], claims["custom_data"]) == (
        subject,
        body["grant_id"],
        "ticket 9",
        {"t": 9},
    )
    assert (await client.get(f"{parts.path}?{parts.query}")).status == 401  # once


async def test_ttl_seconds_shortens_the_grant_and_is_bounded_by_the_apps(gateway: GatewayFactory) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    response = await native(client, {"app": "control-panel", "subject": 505, "ttl_seconds": 5})
    assert response.status == 201
    expires = datetime.strptime((await response.json())["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert expires.timestamp() <= time.time() + 5
    for ttl in (0, -1, 61, 1.5, True, "5"):
        body = await problem(await native(client, {"app": "control-panel", "subject": "505", "ttl_seconds": ttl}), 400)
        assert body["detail"].startswith("ttl_seconds:")


async def test_the_same_policy_as_the_dialects(gateway: GatewayFactory) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    # a manager of reseller 7 cannot reach an account of reseller 1 (the ActivePlatform dialect says 404 too)
    assert (await native(client, {"app": "control-panel", "subject": "505"}, "reseller7-manager-token")).status == 404
    assert (await native(client, {"app": "control-panel", "subject": "707"}, "reseller7-manager-token")).status == 201
    marketing = await native(client, {"app": "control-panel", "subject": "505"}, "marketing-manager-token")
    body = await problem(marketing, 403)
    assert body["detail"] == "this actor's role may not impersonate in this app"
    # a Pyramid domain admin only reaches its own domain's users
    body = await problem(
        await native(client, {"app": "analytics", "subject": "asmith"}, "pyramid-sales-domain-admin-token"), 403
    )
    assert body["detail"] == "the subject is outside this actor's reach"
    # a credential of another app is no credential here
    await problem(await native(client, {"app": "analytics", "subject": "jdoe"}, AP), 401)


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"subject": "505"}, 400, "app: required"),
        ({"app": "nope", "subject": "505"}, 400, "app: no app of that name"),
        ({"app": 7, "subject": "505"}, 400, "app: no app of that name"),
        ({"app": "control-panel"}, 400, "subject: required"),
        ({"app": "control-panel", "subject": ""}, 400, "subject: not a valid value"),
        ({"app": "control-panel", "subject": ["505"]}, 400, "subject: not a valid value"),
        ({"app": "control-panel", "subject": True}, 400, "subject: not a valid value"),
        ({"app": "control-panel", "subject": "505", "reason": 7}, 400, BAD_REASON),
        ({"app": "control-panel", "subject": "505", "reason": "x" * 201}, 400, BAD_REASON),
        ({"app": "control-panel", "subject": "505", "reason": "a\nb"}, 400, BAD_REASON),
        ({"app": "control-panel", "subject": "505", "ttl": 5}, 400, "ttl: not a field of this request"),
        ({"app": "control-panel", "subject": "404"}, 404, "no active subject has that id"),
        ({"app": "control-panel", "subject": "505", "custom_data": "x" * 1025}, 400, "custom_data: at most 1024 bytes"),
        (
            {"app": "control-panel", "subject": "505", "custom_data": {"k": "x" * 1017}},
            400,
            "custom_data: at most 1024 bytes",
        ),
        ([1, 2], 400, "the body must be a JSON object"),
        ("505", 400, "the body must be a JSON object"),
    ],
)
async def test_bad_requests_are_problems(gateway: GatewayFactory, body: Any, status: int, detail: str) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    assert (await problem(await native(client, body), status))["detail"] == detail


async def test_credentials_and_methods(gateway: GatewayFactory) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    body = {"app": "control-panel", "subject": "505"}
    missing = await native(client, body, None)
    assert (await problem(missing, 401))["detail"] == "Authorization: Bearer <credential> is required"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = await native(client, body, "guess")
    assert (await problem(wrong, 401))["detail"] == "the credential is not valid for this app"
    assert wrong.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    basic = await client.post("/v1/grants", json=body, headers={"Authorization": f"Basic {AP}"})
    assert (await problem(basic, 401))["detail"] == "Authorization: Bearer <credential> is required"
    assert basic.headers["WWW-Authenticate"] == "Bearer"
    twice = await client.post("/v1/grants", json=body, headers=[("Authorization", f"Bearer {AP}")] * 2)
    await problem(twice, 401)
    raw = await client.post("/v1/grants", data=b"{not json", headers={"Authorization": f"Bearer {AP}"})
    assert (await problem(raw, 400))["detail"] == "the body must be a JSON object"
    get = await client.get("/v1/grants", headers={"Authorization": f"Bearer {AP}"})
    await problem(get, 405)
    assert get.headers["Allow"] == "POST"


async def test_failed_credentials_are_rate_limited(gateway: GatewayFactory) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY, rate_limit={"failures": 2, "window_seconds": 60})
    body = {"app": "control-panel", "subject": "505"}
    for _ in range(2):
        await problem(await native(client, body, "guess"), 401)
    limited = await native(client, body, AP)
    await problem(limited, 429)
    assert int(limited.headers["Retry-After"]) > 0


async def test_require_reason_applies(gateway: GatewayFactory) -> None:
    apps = {**APPS, "control-panel": {**APPS["control-panel"], "require_reason": True}}
    client = await gateway(apps=apps, directory=DIRECTORY)
    body = await problem(await native(client, {"app": "control-panel", "subject": "505"}), 400)
    assert body["type"].endswith(":reason-required")
    assert (await native(client, {"app": "control-panel", "subject": "505", "reason": "ticket 1"})).status == 201


async def test_a_body_over_the_limit_and_a_store_outage(aiohttp_client: Any, upstream: Upstream, prefix: str) -> None:
    import fakeredis

    from gateway.app import create_app
    from gateway.directory import parse_directory
    from gateway.store import Store
    from tests.conftest import KEY, make_config

    server = fakeredis.FakeServer()  # a Redis of this test's own, to take away
    redis = fakeredis.FakeAsyncRedis(server=server)
    await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
    config = make_config(prefix, upstream.url, APPS, server={"body_limit_bytes": 256})
    client = await aiohttp_client(create_app(config, redis=redis, key=KEY))
    big = {"app": "control-panel", "subject": "505", "custom_data": "x" * 512}
    await problem(await native(client, big), 413)
    server.connected = False  # from here every command fails with a connection error
    await problem(await native(client, {"app": "control-panel", "subject": "505"}), 503)
    await redis.aclose()


async def test_on_an_apps_own_host_the_path_is_the_apps(gateway: GatewayFactory, upstream: Upstream) -> None:
    apps = {**APPS, "control-panel": {**APPS["control-panel"], "hosts": ["panel.test"]}}
    client = await gateway(apps=apps, directory=DIRECTORY)
    response = await native(client, {"app": "control-panel", "subject": "505"}, Host="panel.test")
    assert response.status == 200 and upstream.requests[-1].path == "/v1/grants"  # passed to the app
    assert (await native(client, {"app": "control-panel", "subject": "505"})).status == 201  # the gateway's host


async def test_custom_data_up_to_one_kib_rides_in_the_assertion(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    largest = {"k": "x" * 1016}  # 1024 bytes of JSON
    response = await native(client, {"app": "control-panel", "subject": "505", "custom_data": largest})
    assert response.status == 201, await response.text()
    link = (await response.json())["login_url"].split("/", 3)[3]
    assert (await client.get("/" + link)).status == 200
    (seen,) = upstream.requests
    assert upstream.claims()["custom_data"] == largest
    assert len(seen.headers["X-Impersonation-Assertion"]) < 2500


async def test_an_unexpected_error_in_the_one_mint_flow_is_logged_and_answered_in_shape(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("text that may quote request bytes")

    monkeypatch.setattr(Gateway, "mint", boom)
    client = await gateway(apps=APPS, directory=DIRECTORY)
    pyramid = {"token": "pyramid-enterprise-admin-token", "userIdentity": "jdoe"}
    with capture_logs() as logs:
        by_native = await native(client, {"app": "control-panel", "subject": "505"})
        by_dialect = await client.post("/API3/authentication/authenticateUserByToken", json=pyramid)
    assert (await problem(by_native, 500))["detail"] == "an unexpected error; it is logged"
    assert (by_dialect.status, await by_dialect.text()) == (500, "Internal server error")
    errors = [e for e in logs if e["event"] == "unhandled_error"]
    assert [(e.get("api"), e.get("app"), e.get("dialect"), e["error"]) for e in errors] == [
        ("native", None, None, "RuntimeError"),
        (None, "analytics", "pyramid", "RuntimeError"),
    ]
    assert "request bytes" not in str(logs)


async def test_the_native_reason_is_its_field_not_the_header(gateway: GatewayFactory) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    response = await native(client, {"app": "control-panel", "subject": "505"}, **{REASON_HEADER: "x" * 500})
    assert response.status == 201, await response.text()
    refused = await native(client, {"app": "control-panel", "subject": "505", "reason": "x" * 500})
    assert (await problem(refused, 400))["detail"] == BAD_REASON
