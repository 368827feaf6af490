"""Refused redemptions are limited per client, as failed credentials are: guessing grants costs a window per few
tries, and the answer is the dialect's own 429."""

from __future__ import annotations

import secrets
from typing import Any

from tests.conftest import GatewayFactory, Upstream

LIMITS = {"rate_limit": {"failures": 3, "window_seconds": 60}}
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
MINT = "/api/v3/resellers/1/user_authentication/token?account_id=505"


def link(token: str) -> str:
    return f"/?user_email=example%40activeplatform.com&user_token={token}"


def guess() -> str:
    return secrets.token_urlsafe(24)  # grant-shaped, and nobody's


async def test_refused_redemptions_are_limited_per_client(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps={"control-panel": {"dialect": "activeplatform", "redeem_on_get": True}}, **LIMITS)
    minted = await client.get(MINT, headers=MANAGER)
    real: dict[str, Any] = await minted.json(content_type=None)
    for _ in range(3):
        assert (await client.get(link(guess()))).status == 401
    limited = await client.get(link(real["owner_token"]))  # even a real grant: the client is limited, nothing spent
    assert limited.status == 429 and int(limited.headers["Retry-After"]) > 0
    body = await limited.json(content_type=None)
    assert body["errors"][0]["status"] == "429" and body["errors"][0]["code"] == "too_many_requests"
    assert upstream.requests == []
    other = await client.get(link(real["owner_token"]), headers={"X-Forwarded-For": "203.0.113.9"})
    assert other.status == 429  # X-Forwarded-For from an untrusted peer names no other client


async def test_a_limited_client_does_not_spend_the_grant(gateway: GatewayFactory, upstream: Upstream) -> None:
    """The grant presented while limited stays live: a gateway with a higher limit (standing for the end of the
    window) redeems it."""
    failures = 2
    apps = {"control-panel": {"dialect": "activeplatform", "redeem_on_get": True}}
    client = await gateway(apps=apps, rate_limit={"failures": failures, "window_seconds": 60})
    real = await (await client.get(MINT, headers=MANAGER)).json(content_type=None)
    for _ in range(failures):
        assert (await client.get(link(guess()))).status == 401
    assert (await client.get(link(real["owner_token"]))).status == 429
    fresh = await gateway(apps=apps, rate_limit={"failures": 100, "window_seconds": 60})
    assert (await fresh.get(link(real["owner_token"]))).status == 200
    assert len(upstream.requests) == 1
