"""Failure limits (``rate_limit``): how many unknown credentials a client, or a credential, may present, and how
many refused redemptions a client may make, per window, before it is turned away with RateLimited."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .audit import Audit
from .config import RateLimitConfig
from .directory import credential_hash
from .errors import RateLimited
from .store import Store

FailureKey = tuple[str, str]  # (kind, value): ("client", address), ("credential", fingerprint), ("redeem", address)


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a token or credential, safe to log."""
    return credential_hash(secret)[:12]


def credential_keys(client: str, credential: str | None) -> list[FailureKey]:
    """What an unknown credential counts against: the client's address, and the credential itself."""
    keys = [("client", client)]
    if credential:
        keys.append(("credential", fingerprint(credential)))
    return keys


def redemption_keys(client: str) -> list[FailureKey]:
    """What a refused redemption counts against: the client's address."""
    return [("redeem", client)]


class FailureLimits:
    """Failures counted in the store (shared by every process), blocks kept in this process.

    Only failures cost a round trip: each process learns of a block at the next failure it sees, and a good
    credential never waits on Redis for this.
    """

    def __init__(self, config: RateLimitConfig, store: Store, audit: Audit) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self._blocked: dict[str, float] = {}  # failure key -> monotonic time its block ends

    def check(self, keys: Sequence[FailureKey]) -> None:
        """RateLimited (with the seconds left) when any of ``keys`` is blocked."""
        now = time.monotonic()
        for kind, value in keys:
            until = self._blocked.get(f"{kind}:{value}")
            if until is not None:
                if until > now:
                    raise RateLimited(max(1, int(until - now + 0.999)))
                del self._blocked[f"{kind}:{value}"]

    async def record(self, keys: Sequence[FailureKey], client: str, app: str, request_id: str = "") -> None:
        """Count a failure against each of ``keys``; one over the limit is blocked here for a window (and audited).
        Raises StoreUnavailable when the count cannot be made."""
        counts = await self.store.record_failure(keys, self.config.window_seconds)
        for (kind, value), count in zip(keys, counts, strict=True):
            if count >= self.config.failures:
                self._blocked[f"{kind}:{value}"] = time.monotonic() + self.config.window_seconds
                self.audit.credential_rate_limited(kind, client, app, request_id)
