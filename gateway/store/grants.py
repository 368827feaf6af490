"""Grants in Redis: storing, redeeming, reading and revoking them, and each app's live index.

A grant's id is derived from its token (the first 96 bits of the token's SHA-256, base64url): the store never
holds a token, and a grant can be found, and revoked, by its id. A grant lives in ``grant:{<id>}`` for its TTL;
redeeming or revoking it is one script that takes it (GETDEL) and leaves a tombstone (``used:{<id>}``, a day)
in the same slot, so a later presentation is told apart as reused or revoked (for logs and metrics only). Each
app's live index (``{grants:<app>}:live``, scored by expiry) lets revocation find an app's grants; an app that
supersedes also names the newest grant of each actor and subject. Mints, redemptions and existence checks are
one auto-pipelined round trip each. Every call raises :class:`~gateway.errors.StoreUnavailable` when Redis fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from ..errors import StoreUnavailable
from .connection import Connection, Script
from .events import EventStore
from .keys import Keys

TOMBSTONE_MS = 24 * 3600 * 1000  # a reused link is worth an alarm for a day after its redemption

# GETDEL the grant and, in the same atomic step, leave a tombstone holding it; on a miss, return the
# tombstone so the caller can tell "reused" from "unknown or expired" (for logs only).
_REDEEM = Script("""
local grant = redis.call('GETDEL', KEYS[1])
if grant then
  redis.call('SET', KEYS[2], grant, 'PX', ARGV[1])
  return {1, grant}
end
local tomb = redis.call('GET', KEYS[2])
if tomb then
  if string.sub(tomb, 1, 1) == '!' then return {3, string.sub(tomb, 2)} end
  return {2, tomb}
end
return {0, false}
""")

# Revoke: GETDEL the grant and leave a tombstone marked '!' (a grant's JSON never starts so), so that its later
# presentation is told apart as "revoked" (for logs and metrics only: the answer is the same).
_REVOKE = Script("""
local grant = redis.call('GETDEL', KEYS[1])
if grant then redis.call('SET', KEYS[2], '!' .. grant, 'PX', ARGV[1]) end
return grant
""")

# A mint's bookkeeping, for an app that supersedes, in its app's grant slot (KEYS[1]: the live index): index the new
# grants (ARGV[3...]: expiry and id pairs, as ZADD takes them) and name the first the newest of its actor and subject
# (ARGV[1] the pair key, ARGV[2] its PX). Other apps' mints only ZADD.
_INDEX = Script("""
redis.call('ZADD', KEYS[1], unpack(ARGV, 3))
redis.call('SET', ARGV[1], ARGV[4], 'PX', ARGV[2])
return 1
""")


@dataclass(frozen=True)
class Pair:
    """An app that supersedes: the key naming the newest grant of an actor and a subject, and how long it lives
    (the app's longest grant TTL: every grant it supersedes is expired by then)."""

    key: str
    ttl_ms: int


@dataclass(frozen=True)
class Consumed:
    """What the redeem script found: ``state`` is ``"redeemed"``, ``"reused"``, ``"revoked"`` or ``"unknown"``."""

    state: str
    grant: bytes | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GrantStore:
    """Grants, their tombstones and each app's live index; a mint's audit entry goes through ``events``."""

    def __init__(self, connection: Connection, keys: Keys, events: EventStore) -> None:
        self.connection = connection
        self.keys = keys
        self.events = events

    async def put_grants(
        self, app: str, grants: Iterable[tuple[str, bytes, int]], audit: Mapping[str, str], pair: Pair | None = None
    ) -> None:
        """Store each ``(grant_id, grant_json, ttl_ms)`` of ``app`` with ``SET NX PX``, index them for revocation
        (and, with ``pair``, make the first the newest of its actor and subject), and append ``audit`` to the
        stream, all in one pipeline (one round trip).

        Audit fails closed: if the append fails, the grants just stored are deleted and the call raises
        :class:`StoreUnavailable`, so no grant is handed out unaudited.
        """
        grants = list(grants)
        pipeline = self.connection.pipeline
        live = self.keys.live(app)
        now_ms = int(time.time() * 1000)
        scored: list[Any] = []  # expiry, id: ZADD's order
        for grant_id, _, ttl_ms in grants:
            scored += [now_ms + ttl_ms, grant_id]
        futures = [pipeline.submit("SET", self.keys.grant(g), value, "NX", "PX", ttl_ms) for g, value, ttl_ms in grants]
        if pair is None:  # concurrent mints of the app share one ZADD
            futures.append(pipeline.zadd(live, *scored))
        else:
            futures.append(pipeline.submit("EVALSHA", _INDEX.sha, 1, live, pair.key, pair.ttl_ms, *scored))
        futures.append(pipeline.submit(*self.events.append_command(audit)))
        results = await asyncio.gather(*futures, return_exceptions=True)
        if isinstance(results[-2], NoScriptError) and pair is not None:  # a restarted Redis: EVAL caches it again
            results[-2:-1] = await asyncio.gather(
                pipeline.submit("EVAL", _INDEX.source, 1, live, pair.key, pair.ttl_ms, *scored), return_exceptions=True
            )
        stored = all(r in (True, b"OK", "OK") for r in results[:-2])
        if not stored or any(isinstance(r, BaseException) for r in results[-2:]):
            # A collision of 96-bit ids is not going to happen; a failed index or audit append can.
            with suppress(StoreUnavailable):
                await self.connection.many(("DEL", self.keys.grant(g)) for g, _, _ in grants)  # one slot each
            raise StoreUnavailable()

    async def consume(self, grant_id: str) -> Consumed:
        """Atomically take the grant (GETDEL) and leave its tombstone: one script, one round trip."""
        keys = (self.keys.grant(grant_id), self.keys.tombstone(grant_id))
        try:
            state, value = await self.connection.pipeline.submit("EVALSHA", _REDEEM.sha, 2, *keys, TOMBSTONE_MS)
        except NoScriptError:  # a restarted or flushed Redis: EVAL caches the script again
            state, value = await self.connection.one("EVAL", _REDEEM.source, 2, *keys, TOMBSTONE_MS)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable() from exc
        return Consumed({1: "redeemed", 2: "reused", 3: "revoked"}.get(int(state), "unknown"), value or None)

    async def live(self, grant_ids: Iterable[str]) -> list[bool]:
        """Whether each grant is live, consuming nothing (EXISTS each, auto-pipelined: one round trip)."""
        return [bool(n) for n in await self.connection.many(("EXISTS", self.keys.grant(g)) for g in grant_ids)]

    async def newest(self, pair: str) -> str | None:
        """The id of the newest grant of an actor and a subject (an app that supersedes), if one is live."""
        value = await self.connection.one("GET", pair)
        return None if value is None else bytes(value).decode()

    async def grants(self, grant_ids: Sequence[str]) -> list[bytes | None]:
        """The JSON of each grant (None for one no longer live), consuming nothing: one round trip."""
        return await self.connection.many(("GET", self.keys.grant(g)) for g in grant_ids)

    # -- revocation -----------------------------------------------------------------------------------
    async def revoke(self, grant_id: str) -> bytes | None:
        """Delete the live grant ``grant_id`` and leave its tombstone (marked revoked); its JSON, or None when no
        live grant has that id."""
        return (await self._revoke([grant_id]))[0]

    async def _revoke(self, grant_ids: Sequence[str]) -> list[bytes | None]:
        """The revoke script on each grant (auto-pipelined: one round trip); each one's JSON if it was live."""
        commands = [("EVALSHA", _REVOKE.sha, 2, self.keys.grant(g), self.keys.tombstone(g), TOMBSTONE_MS)
                    for g in grant_ids]  # fmt: skip
        try:
            return await self.connection.many(commands)
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, NoScriptError):
                raise
        # a restarted Redis caches it again
        return await self.connection.many(("EVAL", _REVOKE.source, *c[2:]) for c in commands)

    async def delete_grants(self, app: str, grant_ids: Sequence[str]) -> list[bool]:
        """Delete each grant; whether each was live (a grant redeemed meanwhile was not). Drops the ids from the
        app's live index too."""
        deleted = await self._revoke(grant_ids)
        await self.unindex(app, grant_ids)
        return [n is not None for n in deleted]

    # -- the live index -------------------------------------------------------------------------------
    async def live_grants(self, app: str, batch: int = 1000) -> AsyncIterator[list[str]]:
        """The ids in ``app``'s live index that have not expired, a batch at a time (ZSCAN: a grant indexed
        before the scan began and still there at its end is seen once at least)."""
        key, cursor, now_ms = self.keys.live(app), 0, time.time() * 1000
        while True:
            async with self.connection.call():
                cursor, pairs = await self.connection.redis.zscan(key, cursor, count=batch)
            ids = [_text(member) for member, score in pairs if float(score) > now_ms]
            if ids:
                yield ids
            if cursor == 0:
                return

    async def trim_live(self, apps: Iterable[str]) -> None:
        """Drop the ids of expired grants from each app's live index (every process, once a refresh)."""
        now_ms = int(time.time() * 1000)
        await self.connection.many(("ZREMRANGEBYSCORE", self.keys.live(app), "-inf", now_ms) for app in apps)

    async def unindex(self, app: str, grant_ids: Sequence[str]) -> None:
        """Drop ``grant_ids`` from the app's live index (ZREM; nothing sent for none)."""
        if grant_ids:
            await self.connection.one("ZREM", self.keys.live(app), *grant_ids)
