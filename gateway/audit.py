"""What the gateway records of each mint, redemption, refusal and revocation.

Every such event is written in up to three places — a log line (``audit: true``), a Prometheus counter and an
entry of the store's audit stream — and :class:`Audit` is the one place that knows which, with what fields:

- ``grant_minted``: ``gateway_grants_minted``; a stream entry, stored with the grants in one round trip.
- ``mint_refused``: ``gateway_grants_refused``.
- ``grant_redeemed``: ``gateway_grants_redeemed``; a stream entry, written before the hand-off (fails closed).
- ``grant_refused``: ``gateway_grants_refused`` (by :class:`~gateway.errors.Refusal`).
- ``grant_reused`` (a warning): ``gateway_grants_reused``.
- ``grant_revoked``: ``gateway_grants_revoked``; a stream entry. ``grants_revoked``: the summary of a revocation.
- ``credential_rate_limited`` (a warning): a client or credential reached its failure limit.
- ``session_started`` and ``session_ended`` (with ``why``): a stream entry each. ``session_request`` (method, path
  without its query, status, duration) and ``session_request_refused``: log lines only (a session's request
  costs no audit write).

Fields are the actor, subject, app, dialect, client address, grant id (or session id) and, when given, the reason:
never a token, credential, cookie or query value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from .config import AppConfig
from .errors import GatewayError, Refusal
from .logging import log_event
from .metrics import Metrics
from .store import Store

if TYPE_CHECKING:
    from .core import Grant

log = structlog.get_logger("gateway")


class Audit:
    """Records the gateway's audit events (see the module's table); one per :class:`~gateway.core.Gateway`."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics

    # -- mints ----------------------------------------------------------------------------------------
    def minted_entry(self, grant: Grant, client: str) -> dict[str, str]:
        """The audit stream entry of a mint, which the store writes in the same round trip as the grants."""
        return {"event": "grant_minted", **_grant_fields(grant, client)}

    def minted(self, grant: Grant, client: str, grants: int, request_id: str = "") -> None:
        """A mint of ``grants`` grants (``grant`` and its further scopes) is stored: its metric and log line."""
        self.metrics.count_minted(grant.app, grant.dialect, grants)
        log_event("grant_minted", {"audit": True, "role": grant.role, "expires_at": grant.expires_at,
                                   **_grant_fields(grant, client), **_request(request_id)})  # fmt: skip

    def mint_refused(self, app: AppConfig, client: str, error: GatewayError, request_id: str = "") -> None:
        """A mint refused with ``error`` (Unauthenticated, Forbidden, NotFound or Invalid)."""
        self.metrics.refused.labels(app.name, app.dialect, mint_refusal_label(error)).inc()
        log_event("mint_refused", {"audit": True, "app": app.name, "dialect": app.dialect, "client": client,
                                   "error": type(error).__name__, "reason": error_reason(error),
                                   **_request(request_id)})  # fmt: skip

    def credential_rate_limited(self, kind: str, client: str, app: str, request_id: str = "") -> None:
        """A client (``kind`` ``client`` or ``redeem``) or a credential reached its failure limit."""
        log.warning("credential_rate_limited", audit=True, kind=kind, client=client, app=app, **_request(request_id))

    # -- redemptions ----------------------------------------------------------------------------------
    async def redeemed(self, grant: Grant, client: str, request_id: str = "") -> None:
        """A grant is redeemed. The stream entry is written first and may raise StoreUnavailable: no audit, no
        hand-off."""
        fields = _grant_fields(grant, client)
        await self.store.append_audit({"event": "grant_redeemed", **fields})
        self.metrics.redeemed.labels(grant.app, grant.dialect).inc()
        log_event("grant_redeemed", {"audit": True, **fields, **_request(request_id)})

    def refused(
        self, app: AppConfig, reason: Refusal, client: str, grant: Grant | None = None, request_id: str = ""
    ) -> None:
        """A redemption in ``app`` refused for ``reason`` (``grant``: the grant it spent or offered, if any)."""
        self.metrics.refused.labels(app.name, app.dialect, reason).inc()
        self._refused_line(app.name, app.dialect, reason, client, grant, request_id)

    def also_refused(self, grant: Grant, reason: Refusal, client: str, request_id: str = "") -> None:
        """A further grant spent by a refused redemption (one that offered several): its log line only, as the
        redemption is counted once."""
        self._refused_line(grant.app, grant.dialect, reason, client, grant, request_id)

    def reused(self, grant: Grant, client: str, request_id: str = "") -> None:
        """An already redeemed grant offered again: an alarm (its refusal is recorded apart)."""
        self.metrics.reused.labels(grant.app).inc()
        log.warning("grant_reused", audit=True, grant_id=grant.id, app=grant.app, actor=grant.actor,
                    subject=grant.subject, dialect=grant.dialect, client=client, **_request(request_id))  # fmt: skip

    def _refused_line(
        self, app: str, dialect: str, reason: Refusal, client: str, grant: Grant | None, request_id: str
    ) -> None:
        details = {} if grant is None else {"grant_id": grant.id, "actor": grant.actor, "subject": grant.subject}
        log_event("grant_refused", {"audit": True, "app": app, "dialect": dialect, "reason": str(reason),
                                    "client": client, **details, **_request(request_id)})  # fmt: skip

    # -- revocations ----------------------------------------------------------------------------------
    async def revoked(self, grants: Sequence[Grant], by: str) -> None:
        """``grants`` were revoked by the admin token ``by``: one stream entry each (one round trip), then their
        metric and log lines."""
        events = [_revoked_fields(g, by) for g in grants]
        await self.store.append_audits({"event": "grant_revoked", **e} for e in events)
        for event, grant in zip(events, grants, strict=True):
            self.metrics.revoked.labels(grant.app).inc()
            log_event("grant_revoked", {"audit": True, **event})

    def revoked_by_filter(self, app: str, actor: str | None, subject: str | None, revoked: int, by: str) -> None:
        """The summary of a revocation of every live grant of ``app`` (of one actor, one subject, or both)."""
        log_event("grants_revoked", {"audit": True, "app": app, "actor": actor, "subject": subject,
                                     "revoked": revoked, "by": by})  # fmt: skip

    # -- sessions ---------------------------------------------------------------------------------------
    def session_started_entry(self, who: Mapping[str, str], mode: str, client: str) -> dict[str, str]:
        """The stream entry of a session's start (``who``: its session id, app, actor and subject), which the store
        writes with the session in one round trip."""
        return {"event": "session_started", **who, "mode": mode, "client": client}

    def session_started(self, who: Mapping[str, str], mode: str, client: str, request_id: str = "") -> None:
        log_event("session_started", {"audit": True, **who, "mode": mode, "client": client, **_request(request_id)})

    async def session_ended(self, who: Mapping[str, str], why: str, by: str | None = None) -> None:
        """A session ended (``why``: ended, max_age, idle, revoked, replaced, subject_inactive, actor_removed);
        ``by`` names the admin token that ended it. Its stream entry, then its log line; a failed append is logged
        only (the session has ended either way)."""
        fields = {**who, "why": why, **({"by": by} if by else {})}
        try:
            await self.store.append_audit({"event": "session_ended", **fields})
        except GatewayError:
            log.warning("audit_append_failed", event="session_ended", session_id=who.get("session_id"))
        log_event("session_ended", {"audit": True, **fields})

    def session_request(
        self, who: Mapping[str, str], method: str, path: str, status: int, duration_ms: float, request_id: str
    ) -> None:
        """A request of a session answered (``path`` without its query)."""
        log_event("session_request", {"audit": True, **who, "method": method,
                                      "path": path, "status": status, "duration_ms": duration_ms,
                                      **_request(request_id)})  # fmt: skip

    def session_request_refused(
        self, who: Mapping[str, str], method: str, path: str, reason: str, request_id: str
    ) -> None:
        """A request of a session its mode or the app's ``deny`` patterns refused (it never reached the app)."""
        log_event("session_request_refused", {"audit": True, **who, "method": method,
                                              "path": path, "reason": reason, **_request(request_id)})  # fmt: skip


def error_reason(error: GatewayError) -> str:
    """A mint refusal's reason as its log line gives it: the error's ``reason`` (``role``, ``unknown``, ``missing``...)
    or, for NotFound, what was not found."""
    return str(getattr(error, "reason", None) or getattr(error, "what", ""))


def mint_refusal_label(error: GatewayError) -> str:
    """The refused metric's ``reason`` label of a refused mint: the error's class and its reason, lowercased
    (``forbidden_role``, ``unauthenticated_unknown``, ``notfound_subject``), so no mint's label is a redemption's
    :class:`~gateway.errors.Refusal`."""
    return f"{type(error).__name__}_{error_reason(error)}".lower()


def _grant_fields(grant: Grant, client: str) -> dict[str, str]:
    fields = {"grant_id": grant.id, "app": grant.app, "dialect": grant.dialect, "actor": grant.actor,
              "subject": grant.subject, "client": client}  # fmt: skip
    if grant.reason is not None:
        fields["reason"] = grant.reason
    return fields


def _revoked_fields(grant: Grant, by: str) -> dict[str, str]:
    return {"grant_id": grant.id, "app": grant.app, "dialect": grant.dialect, "actor": grant.actor,
            "subject": grant.subject, "by": by}  # fmt: skip


def _request(request_id: str) -> dict[str, Any]:
    return {"request_id": request_id} if request_id else {}
