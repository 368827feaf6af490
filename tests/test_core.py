"""The gateway's flows on a fakeredis store: mint, redeem once, refuse with the right reason, revoke."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import jwt
import pytest
from structlog.testing import capture_logs

from gateway.assertion import Signer
from gateway.core import Gateway, ImpersonationCommand, MintResult, Offer, SubjectRef
from gateway.directory import parse_directory
from gateway.errors import GrantRefused, Refusal
from gateway.metrics import Metrics
from gateway.store import Store
from tests.conftest import KEY, PUBLIC_URL, make_config

DIRECTORY: dict[str, Any] = {
    "apps": {
        "control-panel": {
            "resellers": [{"id": 1}],
            "principals": [{"id": "mgr-1", "token": "mgr-1-token", "role": "admin", "reseller": 1}],
            "subjects": [
                {"id": "505", "email": "a@example.com", "reseller": 1},
                {"id": "707", "email": "b@example.com", "reseller": 1},
            ],
        },
        "other": {
            "principals": [{"id": "adm", "token": "adm-token", "role": "admin"}],
            "subjects": [{"id": "505"}],
        },
    }
}
APPS = {
    "control-panel": {"dialect": "activeplatform", "grant_ttl_seconds": 60},
    "other": {"dialect": "denovolab"},
}


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    redis = fakeredis.FakeAsyncRedis()
    config = make_config("c:", "http://upstream.invalid", APPS)
    store = Store(redis, "c:")
    await store.load_directory(parse_directory(DIRECTORY))
    gateway = Gateway(config, store, Signer(KEY, PUBLIC_URL, 30), Metrics())
    await gateway.directory.refresh()
    yield gateway
    await gateway.directory.close()
    await redis.aclose()


async def mint(gateway: Gateway, subject: str = "505", app: str = "control-panel", **fields: Any) -> MintResult:
    credential = "mgr-1-token" if app == "control-panel" else "adm-token"
    cmd = ImpersonationCommand(app=app, dialect="x", credential=credential, target=SubjectRef(id=subject),
                               client="198.51.100.7", **fields)  # fmt: skip
    return await gateway.mint(cmd, "req-1")


async def refusal(gateway: Gateway, offers: list[Offer]) -> tuple[str, list[dict[str, Any]]]:
    with capture_logs() as logs, pytest.raises(GrantRefused) as raised:
        await gateway.redeem(offers, "198.51.100.7", "req-2")
    return raised.value.reason, [e for e in logs if e["event"] == "grant_refused"]


async def stream(gateway: Gateway) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in await gateway.store.read_audit()]


async def test_mint_then_redeem_once(gateway: Gateway) -> None:
    minted = await mint(gateway, reason="ticket 42")
    redemption = await gateway.redeem([Offer(minted.token, "control-panel")], "198.51.100.7", "req-2")
    assert redemption is not None and redemption.grant == minted.grant
    claims = jwt.decode(redemption.assertion, KEY.public_key(), algorithms=["EdDSA"], audience="control-panel")
    assert (claims["sub"], claims["act"], claims["jti"], claims["reason"]) == (
        "505", {"sub": "mgr-1", "role": "admin"}, minted.grant.id, "ticket 42"
    )  # fmt: skip
    reason, refused = await refusal(gateway, [Offer(minted.token, "control-panel")])
    assert reason == Refusal.REUSED
    assert refused == [
        {"event": "grant_refused", "log_level": "info", "audit": True, "app": "control-panel",
         "dialect": "activeplatform", "reason": "reused", "client": "198.51.100.7", "grant_id": minted.grant.id,
         "actor": "mgr-1", "subject": "505", "request_id": "req-2"}
    ]  # fmt: skip
    base = {"grant_id": minted.grant.id, "app": "control-panel", "dialect": "activeplatform", "actor": "mgr-1",
            "subject": "505", "client": "198.51.100.7", "reason": "ticket 42"}  # fmt: skip
    assert await stream(gateway) == [{"event": "grant_minted", **base}, {"event": "grant_redeemed", **base}]


async def test_an_unknown_token_is_refused_and_a_passive_one_is_no_redemption(gateway: Gateway) -> None:
    assert (await refusal(gateway, [Offer("A" * 32, "control-panel")]))[0] == Refusal.UNKNOWN
    assert await gateway.redeem([Offer("A" * 32, "control-panel", passive=True)], "198.51.100.7") is None


async def test_several_live_grants_spend_all_and_log_each(gateway: Gateway) -> None:
    first, second = await mint(gateway), await mint(gateway, "707")
    offers = [Offer(first.token, "control-panel"), Offer(second.token, "control-panel")]
    reason, refused = await refusal(gateway, offers)
    assert reason == Refusal.SEVERAL
    assert [(e["reason"], e["grant_id"]) for e in refused] == [("several", g.grant.id) for g in (second, first)]
    assert await gateway.live([first.token, second.token]) == set()


async def test_a_grant_offered_to_another_app_is_refused(gateway: Gateway) -> None:
    minted = await mint(gateway)
    reason, (event,) = await refusal(gateway, [Offer(minted.token, "other")])
    assert (reason, event["app"], event["dialect"]) == (Refusal.WRONG_APP, "other", "denovolab")


async def test_a_bound_value_must_come_back(gateway: Gateway) -> None:
    minted = await mint(gateway, bind=("email",))
    reason, _ = await refusal(gateway, [Offer(minted.token, "control-panel", {"email": "x@example.com"})])
    assert reason == Refusal.MISMATCH


async def test_a_revoked_grant_is_refused_as_revoked(gateway: Gateway) -> None:
    minted = await mint(gateway)
    with capture_logs() as logs:
        assert await gateway.revoke("control-panel", by="ops") == 1
    assert [e["event"] for e in logs] == ["grant_revoked", "grants_revoked"]
    assert (await refusal(gateway, [Offer(minted.token, "control-panel")]))[0] == Refusal.REVOKED
    assert (await stream(gateway))[-1] == {"event": "grant_revoked", "grant_id": minted.grant.id,
                                           "app": "control-panel", "dialect": "activeplatform", "actor": "mgr-1",
                                           "subject": "505", "by": "ops"}  # fmt: skip


async def test_refuse_without_consuming(gateway: Gateway) -> None:
    minted = await mint(gateway)
    with capture_logs() as logs, pytest.raises(GrantRefused) as raised:
        gateway.refuse("control-panel", "method", "198.51.100.7")
    assert raised.value.reason == Refusal.METHOD and logs[0]["reason"] == "method"
    assert await gateway.live([minted.token]) == {minted.token}
    with pytest.raises(ValueError):
        gateway.refuse("control-panel", "no such reason", "198.51.100.7")


async def test_refusals_are_counted_by_reason(gateway: Gateway) -> None:
    minted = await mint(gateway)
    await gateway.redeem([Offer(minted.token, "control-panel")], "198.51.100.7")
    await refusal(gateway, [Offer(minted.token, "control-panel")])
    text = gateway.metrics.render().decode()
    assert 'gateway_grants_refused_total{app="control-panel",dialect="activeplatform",reason="reused"} 1.0' in text
    assert 'gateway_grants_reused_total{app="control-panel"} 1.0' in text
    assert 'gateway_grants_redeemed_total{app="control-panel",dialect="activeplatform"} 1.0' in text
