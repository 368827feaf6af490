"""Impersonation sessions in Redis: starting, resuming (read and touch), keeping the app's cookies, ending.

A session lives in one hash, ``session:{<session id>}`` (its own hash slot), whose fields are:

- ``app``, ``grant`` (the redeemed grant's JSON, which says who acts as whom), ``gid`` (its id), ``mode``;
- ``started``, ``cap``, ``idle``, ``last``: milliseconds since the epoch (``idle`` a duration);
- ``k:<name>``: a cookie of the app kept in the gateway (JSON: value and expiry);
- ``b:<name, path, domain>``: a cookie of the app that passed to the browser (to expire it at the end).

Its TTL is never past the cap: the key goes at the cap, or a minute after the idle limit, whichever is first.
Resuming is one script on that key alone (read, check the app, the cap and the idle limit, touch ``last`` when
it is a second old), so a session's request costs one round trip and touches no shared key. Each app's sessions
are also named in its index, ``{sessions:<app>}:index`` (a hash: session id -> who and when), written when a
session starts and read only by the admin endpoints and the sweep that audits sessions Redis expired. Every call raises
:class:`~gateway.errors.StoreUnavailable` when Redis fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from ..errors import StoreUnavailable
from .connection import Connection, Script
from .events import EventStore
from .keys import Keys

IDLE_GRACE_MS = 60_000  # a session past its idle limit stays readable this long, so its end is audited as idle
# ``last`` is rewritten only once it is this old: a session's requests within a second write (and replicate)
# nothing. It may lag the last request by as much, so a session is idle this much past its idle limit (never early).
TOUCH_MS = 1000

# Resume: ARGV[1] now (ms), ARGV[2] "1" to touch it (a request) or "0" (a WebSocket's check with no message since
# the last), ARGV[3...] the apps the request may go to. {1, fields} live (touched when ``last`` is TOUCH_MS old),
# {2, fields} past the cap, {3, fields} idle (both deleted), {4} another app's (untouched), {0} none.
_RESUME = Script(
    """
local v = redis.call('HGETALL', KEYS[1])
if #v == 0 then return {0} end
local h = {}
for i = 1, #v, 2 do h[v[i]] = v[i + 1] end
local ours = false
for i = 3, #ARGV do if ARGV[i] == h['app'] then ours = true end end
if not ours then return {4} end
local now, cap, idle = tonumber(ARGV[1]), tonumber(h['cap']), tonumber(h['idle'])
if now >= cap then redis.call('DEL', KEYS[1]); return {2, v} end
local last = tonumber(h['last'])
if now - last >= idle + TOUCH then redis.call('DEL', KEYS[1]); return {3, v} end
if ARGV[2] == '1' and now - last >= TOUCH then
  redis.call('HSET', KEYS[1], 'last', ARGV[1])
  redis.call('PEXPIREAT', KEYS[1], math.min(cap, now + idle + GRACE))
end
return {1, v}
""".replace("GRACE", str(IDLE_GRACE_MS)).replace("TOUCH", str(TOUCH_MS))
)

# End: take the session (HGETALL + DEL), its fields or an empty list.
_END = Script("""
local v = redis.call('HGETALL', KEYS[1])
if #v > 0 then redis.call('DEL', KEYS[1]) end
return v
""")

# Keep cookies: only in a session still there (a write never brings back an ended one). ARGV[1] = n, then n field
# and value pairs to set, then the fields to delete.
_KEEP = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
for i = 2, 1 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 2 + 2 * n, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
return 1
""")


@dataclass(frozen=True)
class Resumed:
    """What the resume script found: ``state`` is ``"live"``, ``"max_age"``, ``"idle"``, ``"other_app"`` or
    ``"unknown"``; ``fields`` the session's hash (for the first three)."""

    state: str
    fields: Mapping[str, bytes]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(flat: Sequence[Any]) -> dict[str, bytes]:
    return {_text(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}


class SessionStore:
    """Sessions and each app's session index."""

    def __init__(self, connection: Connection, keys: Keys, events: EventStore) -> None:
        self.connection = connection
        self.keys = keys
        self.events = events

    async def _eval(self, script: Script, key: str, *args: Any) -> Any:
        """One script on ``key`` through the auto-pipeline (EVAL when Redis does not hold it yet)."""
        try:
            return await self.connection.pipeline.submit("EVALSHA", script.sha, 1, key, *args)
        except NoScriptError:
            return await self.connection.one("EVAL", script.source, 1, key, *args)
        except Exception as exc:
            raise StoreUnavailable() from exc

    async def start(
        self, session_id: str, app: str, fields: Mapping[str, str | bytes], expire_at_ms: int, summary: bytes,
        audit: Mapping[str, str],
    ) -> None:  # fmt: skip
        """Store a new session's ``fields`` until ``expire_at_ms``, name it in ``app``'s index and append its
        ``audit`` entry (one round trip)."""
        key = self.keys.session(session_id)
        flat = [x for kv in fields.items() for x in kv]
        await self.connection.many(
            [("HSET", key, *flat), ("PEXPIREAT", key, expire_at_ms),
             ("HSET", self.keys.session_index(app), session_id, summary), self.events.append_command(audit)]
        )  # fmt: skip

    async def peek(self, session_id: str) -> dict[str, bytes] | None:
        """The session's fields, touching nothing; None when it is not there."""
        found: Any = await self.connection.one("HGETALL", self.keys.session(session_id))
        return {_text(k): bytes(v) for k, v in dict(found).items()} if found else None

    async def resume(self, session_id: str, apps: Iterable[str], now_ms: int, touch: bool = True) -> Resumed:
        """Read the session, and (with ``touch``) touch it when it is live and of one of ``apps``: one script, one
        round trip. One past its cap or idle limit is deleted either way."""
        found = await self._eval(_RESUME, self.keys.session(session_id), now_ms, "1" if touch else "0", *apps)
        state = {1: "live", 2: "max_age", 3: "idle", 4: "other_app"}.get(int(found[0]), "unknown")
        return Resumed(state, _fields(found[1]) if len(found) > 1 else {})

    async def end(self, session_id: str) -> dict[str, bytes] | None:
        """Delete the session; its fields, or None when it was not live (one round trip)."""
        found = await self._eval(_END, self.keys.session(session_id))
        return _fields(found) if found else None

    async def keep(self, session_id: str, set_fields: Mapping[str, str], delete: Iterable[str]) -> bool:
        """Set and delete fields of a live session (its kept and passed cookies); False when it is gone."""
        pairs = [x for kv in set_fields.items() for x in kv]
        found = await self._eval(_KEEP, self.keys.session(session_id), len(set_fields), *pairs, *delete)
        return bool(found)

    # -- the index ------------------------------------------------------------------------------------
    async def indexed(self, app: str, batch: int = 1000) -> list[tuple[str, bytes]]:
        """Every ``(session id, summary)`` in ``app``'s index (HSCAN)."""
        key, cursor, found = self.keys.session_index(app), 0, []
        while True:
            async with self.connection.call():
                reply: Any = await self.connection.redis.hscan(key, cursor, count=batch)
            cursor, page = reply
            found += [(_text(k), bytes(v)) for k, v in dict(page).items()]
            if int(cursor) == 0:
                return found

    async def exist(self, session_ids: Sequence[str]) -> list[bool]:
        """Whether each session is still there (EXISTS each, auto-pipelined)."""
        return [bool(n) for n in await self.connection.many(("EXISTS", self.keys.session(s)) for s in session_ids)]

    async def last_requests(self, session_ids: Sequence[str]) -> list[bytes | None]:
        """Each session's last request (ms), None for one no longer there."""
        return await self.connection.many(("HGET", self.keys.session(s), "last") for s in session_ids)

    async def unindex(self, app: str, session_ids: Sequence[str]) -> list[bool]:
        """Drop sessions from ``app``'s index; whether each was there (so one process alone audits its end)."""
        if not session_ids:
            return []
        key = self.keys.session_index(app)
        return [bool(n) for n in await self.connection.many(("HDEL", key, s) for s in session_ids)]
