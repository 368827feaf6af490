"""Security properties: revocation at redemption, reuse alarms, failed-credential limits, audit fails closed."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.app import GATEWAY
from gateway.directory import parse_directory
from gateway.store import Store
from tests.conftest import DIRECTORY, GatewayFactory, Upstream

SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
MEDIA = "application/vnd.api+json"
APPS = {"control-panel": {"dialect": "activeplatform", "redeem_on_get": True}}


async def mint(client: Any) -> str:
    response = await client.get(SEED, headers=MANAGER)
    assert response.status == 200
    body = await response.json(content_type=MEDIA)
    return f"/?user_email={body['owner_email']}&user_token={body['owner_token']}"


def edited(change: str) -> dict[str, Any]:
    directory = copy.deepcopy(DIRECTORY)
    app = directory["apps"]["control-panel"]
    if change == "credential rotated":
        app["principals"][0]["token"] = "a-brand-new-token"
    elif change == "actor removed":
        app["principals"] = app["principals"][1:]
    elif change == "role changed":
        app["principals"][0]["role"] = "marketing"
    elif change == "subject removed":
        app["subjects"] = app["subjects"][1:]
    return directory


@pytest.mark.parametrize("change", ["credential rotated", "actor removed", "role changed", "subject removed"])
async def test_policy_is_checked_again_at_redemption(
    gateway: GatewayFactory, upstream: Upstream, redis_client: Any, prefix: str, change: str
) -> None:
    client = await gateway(apps=APPS)
    link = await mint(client)
    await Store(redis_client, prefix).load_directory(parse_directory(edited(change)))
    await client.app[GATEWAY].directory.refresh()
    with capture_logs() as logs:
        assert (await client.get(link)).status == 401
    assert [e["reason"] for e in logs if e["event"] == "grant_refused"] == ["revoked"]
    assert upstream.requests == []


async def test_an_unchanged_directory_reload_keeps_grants_valid(
    gateway: GatewayFactory, upstream: Upstream, redis_client: Any, prefix: str
) -> None:
    client = await gateway(apps=APPS)
    link = await mint(client)
    await Store(redis_client, prefix).load_directory(parse_directory(edited("nothing")))
    await client.app[GATEWAY].directory.refresh()
    assert (await client.get(link)).status == 200


async def test_reuse_is_an_alarm_but_looks_like_any_refusal(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=APPS)
    link = await mint(client)
    assert (await client.get(link)).status == 200
    with capture_logs() as logs:
        reused = await client.get(link)
        unknown = await client.get(link.split("user_token=")[0] + "user_token=" + "A" * 32)  # grant-shaped, unknown
    assert reused.status == unknown.status == 401
    assert await reused.read() == await unknown.read()
    (alarm,) = [e for e in logs if e["event"] == "grant_reused"]
    assert (alarm["actor"], alarm["subject"], alarm["app"], alarm["log_level"]) == (
        "mgr-1", "505", "control-panel", "warning"
    )  # fmt: skip
    metrics = await (await client.get("/metrics")).text()
    assert 'gateway_grants_reused_total{app="control-panel"} 1.0' in metrics


async def test_failed_credentials_are_rate_limited(gateway: GatewayFactory) -> None:
    client = await gateway(rate_limit={"failures": 3, "window_seconds": 60})
    for _ in range(3):
        assert (await client.get(SEED, headers={"X-Api-Token": "guess"})).status == 401
    limited = await client.get(SEED, headers={"X-Api-Token": "guess"})
    assert limited.status == 429
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    (error,) = (await limited.json(content_type=MEDIA))["errors"]
    assert (error["status"], error["code"]) == ("429", "too_many_requests")
    # the client address is blocked, good credential or not
    assert (await client.get(SEED, headers=MANAGER)).status == 429


async def test_failed_credential_is_limited_across_client_addresses(gateway: GatewayFactory) -> None:
    client = await gateway(
        rate_limit={"failures": 2, "window_seconds": 60}, server={"trusted_proxies": ["127.0.0.1/32"]}
    )
    for i in range(2):
        headers = {"X-Api-Token": "guess", "X-Forwarded-For": f"198.51.100.{i}"}
        assert (await client.get(SEED, headers=headers)).status == 401
    headers = {"X-Api-Token": "guess", "X-Forwarded-For": "198.51.100.77"}
    assert (await client.get(SEED, headers=headers)).status == 429
    assert (await client.get(SEED, headers={**MANAGER, "X-Forwarded-For": "198.51.100.78"})).status == 200


async def test_audit_fails_closed(gateway: GatewayFactory, redis_client: Any, prefix: str) -> None:
    client = await gateway(apps=APPS)
    await redis_client.set(f"{prefix}audit", "not a stream")  # every XADD now fails
    response = await client.get(SEED, headers=MANAGER)
    assert response.status == 503
    assert (await response.json(content_type=MEDIA))["errors"][0]["status"] == "503"
    assert [k async for k in redis_client.scan_iter(match=f"{prefix}grant:*")] == []


async def test_audit_stream_records_mints_and_redemptions(
    gateway: GatewayFactory, redis_client: Any, prefix: str
) -> None:
    client = await gateway(apps=APPS)
    assert (await client.get(await mint(client))).status == 200
    entries = await redis_client.xrange(f"{prefix}audit")
    events = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
    assert [e["event"] for e in events] == ["grant_minted", "grant_redeemed"]
    assert events[0]["grant_id"] == events[1]["grant_id"]
    assert {e["actor"] for e in events} == {"mgr-1"} and {e["subject"] for e in events} == {"505"}
