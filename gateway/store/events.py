"""What the gateway records as it goes: the audit stream and the failed-credential counters.

The audit stream (``audit``) is bounded (``XADD MAXLEN ~`` :data:`AUDIT_MAXLEN`); its entries are flat
``field: value`` maps. :meth:`EventStore.append_command` is the XADD a grant's mint sends in its own pipeline
(:meth:`gateway.store.grants.GrantStore.put_grants`), so that no grant is stored unaudited. A failed credential
counts against each of its ``(kind, fingerprint)`` keys for a window that starts at the first failure.
Every call raises :class:`~gateway.errors.StoreUnavailable` when Redis fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .connection import Connection
from .keys import Keys

AUDIT_MAXLEN = 100_000


class EventStore:
    """The audit stream and the failure counters."""

    def __init__(self, connection: Connection, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys

    # -- audit ----------------------------------------------------------------------------------------
    def append_command(self, event: Mapping[str, str]) -> tuple[Any, ...]:
        """The XADD that appends ``event`` (for a caller that pipelines it with its own commands)."""
        fields = (x for kv in event.items() for x in kv)
        return ("XADD", self.keys.audit, "MAXLEN", "~", AUDIT_MAXLEN, "*", *fields)

    async def append_audit(self, event: Mapping[str, str]) -> None:
        """Append one event (auto-pipelined)."""
        await self.connection.one(*self.append_command(event))

    async def append_audits(self, events: Iterable[Mapping[str, str]]) -> None:
        """Append several events, in order, in one round trip."""
        await self.connection.many(self.append_command(e) for e in events)

    async def latest_audit(self, count: int) -> list[Any]:
        """The latest ``count`` audit entries, oldest first, as ``[(id, {field: value})]`` (XREVRANGE)."""
        async with self.connection.call():
            entries = await self.connection.redis.xrevrange(self.keys.audit, count=count) if count else []
        return list(reversed(entries or []))

    async def read_audit(self, last_id: str = "0", count: int = 100, block_ms: int | None = None) -> list[Any]:
        """Audit entries after ``last_id`` as ``[(id, {field: value})]`` (XREAD; ``block_ms`` waits for new ones,
        unbounded by the store timeout: a Redis error is raised as it is)."""
        result: Any = await self.connection.redis.xread({self.keys.audit: last_id}, count=count, block=block_ms)
        return list(result[0][1]) if result else []

    # -- failed credentials ---------------------------------------------------------------------------
    async def record_failure(self, keys: Iterable[tuple[str, str]], window_s: int) -> list[int]:
        """Count one failed credential against each ``(kind, fingerprint)``; the window starts at the first
        (INCR each, then EXPIRE NX each, in one round trip); each counter's value."""
        names = [self.keys.failure(k, f) for k, f in keys]
        commands = [*(("INCR", name) for name in names), *(("EXPIRE", name, window_s, "NX") for name in names)]
        return [int(v) for v in (await self.connection.many(commands))[: len(names)]]
