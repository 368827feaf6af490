"""The audit events exactly: log lines, metric labels and audit stream entries, one recorder for all."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest
from structlog.testing import capture_logs

from gateway.audit import Audit
from gateway.config import RateLimitConfig
from gateway.core import Grant
from gateway.errors import Forbidden, GatewayError, Invalid, NotFound, RateLimited, Refusal, Unauthenticated
from gateway.limits import FailureLimits, credential_keys
from gateway.metrics import Metrics
from gateway.store import Store
from tests.conftest import make_config

GRANT = Grant(id="g" * 16, app="control-panel", dialect="activeplatform", subject="505", actor="mgr-1", role="admin",
              actor_key="k" * 16, issued_at=100, expires_at=160, reason="ticket 9")  # fmt: skip
APP = make_config("a:", "http://upstream.invalid").app("control-panel")


@pytest.fixture
async def audit() -> AsyncIterator[Audit]:
    redis = fakeredis.FakeAsyncRedis()
    yield Audit(Store(redis, "a:"), Metrics())
    await redis.aclose()


def metric(audit: Audit, line: str) -> bool:
    return line in audit.metrics.render().decode()


async def entries(audit: Audit) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in await audit.store.read_audit()]


async def test_minted(audit: Audit) -> None:
    with capture_logs() as logs:
        audit.minted(GRANT, "198.51.100.7", 2, "req-1")
    assert logs == [
        {"event": "grant_minted", "log_level": "info", "audit": True, "role": "admin", "expires_at": 160,
         "grant_id": GRANT.id, "app": "control-panel", "dialect": "activeplatform", "actor": "mgr-1", "subject": "505",
         "client": "198.51.100.7", "reason": "ticket 9", "request_id": "req-1"}
    ]  # fmt: skip
    assert metric(audit, 'gateway_grants_minted_total{app="control-panel",dialect="activeplatform"} 2.0')
    assert audit.minted_entry(GRANT, "198.51.100.7") == {
        "event": "grant_minted", "grant_id": GRANT.id, "app": "control-panel", "dialect": "activeplatform",
        "actor": "mgr-1", "subject": "505", "client": "198.51.100.7", "reason": "ticket 9",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("error", "label", "reason"),
    [
        (Unauthenticated("unknown"), "unauthenticated_unknown", "unknown"),
        (Unauthenticated("missing"), "unauthenticated_missing", "missing"),
        (Forbidden("role"), "forbidden_role", "role"),
        (Forbidden("scope"), "forbidden_scope", "scope"),
        (NotFound("subject", "id"), "notfound_subject", "subject"),
        (NotFound("reseller"), "notfound_reseller", "reseller"),
        (Invalid("reason", "missing"), "invalid_missing", "missing"),
    ],
)
def test_mint_refused(audit: Audit, error: GatewayError, label: str, reason: str) -> None:
    with capture_logs() as logs:
        audit.mint_refused(APP, "198.51.100.7", error)
    assert logs == [
        {"event": "mint_refused", "log_level": "info", "audit": True, "app": "control-panel",
         "dialect": "activeplatform", "client": "198.51.100.7", "error": type(error).__name__, "reason": reason}
    ]  # fmt: skip
    assert metric(
        audit, f'gateway_grants_refused_total{{app="control-panel",dialect="activeplatform",reason="{label}"}}'
    )


async def test_redeemed_and_refused(audit: Audit) -> None:
    with capture_logs() as logs:
        await audit.redeemed(GRANT, "198.51.100.7")
        audit.reused(GRANT, "198.51.100.7", "req-2")
        audit.refused(APP, Refusal.REUSED, "198.51.100.7", GRANT, "req-2")
        audit.also_refused(GRANT, Refusal.SEVERAL, "198.51.100.7")
        audit.refused(APP, Refusal.CROSS_SITE, "198.51.100.7")
    who = {"grant_id": GRANT.id, "actor": "mgr-1", "subject": "505"}
    assert [(e["event"], e.get("reason"), e["log_level"]) for e in logs] == [
        ("grant_redeemed", "ticket 9", "info"), ("grant_reused", None, "warning"), ("grant_refused", "reused", "info"),
        ("grant_refused", "several", "info"), ("grant_refused", "cross_site", "info"),
    ]  # fmt: skip
    assert logs[2] == {"event": "grant_refused", "log_level": "info", "audit": True, "app": "control-panel",
                       "dialect": "activeplatform", "reason": "reused", "client": "198.51.100.7", **who,
                       "request_id": "req-2"}  # fmt: skip
    assert "grant_id" not in logs[4]
    assert await entries(audit) == [
        {"event": "grant_redeemed", "app": "control-panel", "dialect": "activeplatform", "client": "198.51.100.7",
         "reason": "ticket 9", **who}
    ]  # fmt: skip
    for reason, count in (("reused", 1), ("cross_site", 1)):
        assert metric(audit, f'reason="{reason}"}} {count}.0')
    assert not metric(audit, 'reason="several"')  # the refusal is counted once, by its redemption
    assert metric(audit, 'gateway_grants_reused_total{app="control-panel"} 1.0')


async def test_revoked(audit: Audit) -> None:
    with capture_logs() as logs:
        await audit.revoked([GRANT], "ops")
        audit.revoked_by_filter("control-panel", "mgr-1", None, 1, "ops")
    revoked = {"grant_id": GRANT.id, "app": "control-panel", "dialect": "activeplatform", "actor": "mgr-1",
               "subject": "505", "by": "ops"}  # fmt: skip
    assert logs == [
        {"event": "grant_revoked", "log_level": "info", "audit": True, **revoked},
        {"event": "grants_revoked", "log_level": "info", "audit": True, "app": "control-panel", "actor": "mgr-1",
         "subject": None, "revoked": 1, "by": "ops"},
    ]  # fmt: skip
    assert await entries(audit) == [{"event": "grant_revoked", **revoked}]
    assert metric(audit, 'gateway_grants_revoked_total{app="control-panel"} 1.0')


async def test_a_credential_over_its_limit_is_audited_then_blocked(audit: Audit) -> None:
    limits = FailureLimits(RateLimitConfig(failures=2, window_seconds=60), audit.store, audit)
    keys = credential_keys("198.51.100.7", "a-wrong-credential")
    with capture_logs() as logs:
        await limits.record(keys, "198.51.100.7", "control-panel")
        limits.check(keys)
        await limits.record(keys, "198.51.100.7", "control-panel", "req-3")
    assert logs == [
        {"event": "credential_rate_limited", "log_level": "warning", "audit": True, "kind": kind,
         "client": "198.51.100.7", "app": "control-panel", "request_id": "req-3"} for kind in ("client", "credential")
    ]  # fmt: skip
    with pytest.raises(RateLimited):
        limits.check(keys[1:])
    assert "a-wrong-credential" not in repr(logs) + repr(keys)
