"""Every Redis key and command the gateway uses.

Keys (all under ``store.prefix``; ``{...}`` is a Redis Cluster hash tag)::

    grant:{<grant id>}                  a live grant, JSON, PX = grant TTL          SET NX PX / GETDEL
    used:{<grant id>}                   tombstone of a redeemed grant (reuse alarm)  SET PX, in the redeem script
    {grants:<app>}:live                 the app's grant ids by expiry (revocation)   ZADD (shared), ZSCAN, trimmed
    {grants:<app>}:pair:<h>             the newest grant of an actor and a subject   SET PX (apps that supersede)
    {dir:<app>}:current                 the app's directory generation in use        SET (a load's last step), GET
    {dir:<app>}:loading                 the generation a load is writing (its lease)  SET NX PX, renewed per batch
    {dir:<app>}:<gen>:actors            principals and resellers, JSON, small        SET, GET
    {dir:<app>}:<gen>:s:<id>            one subject, JSON                            SET, GET / MGET
    {dir:<app>}:<gen>:ids               every subject id (sorted set, score 0)       ZADD, ZRANGE, ZCARD
    {dir:<app>}:<gen>:x:<kind>:<value>  ids of the subjects a look-up finds (set)    SADD, SUNION
    audit                               bounded stream of mint/redeem events         XADD MAXLEN ~
    fail:<kind>:<fingerprint>           failed-credential counters                   INCR + EXPIRE

A grant's id is derived from its token (the first 96 bits of the token's SHA-256, base64url): the store never
holds a token, and a grant can be found, and revoked, by its id. A grant and its tombstone share a hash tag,
so the redeem script touches one slot. All of an app's
directory keys share the app's tag: a subject and its index entries change together in one transaction,
and a look-up's index and subjects sit on one node, even on a Cluster. A load writes a new generation
beside the one in use and switches ``current`` to it last, so a reader sees all of the old directory or
all of the new; the old generation is dropped a little later (processes follow ``current`` within
``directory.refresh_seconds``). One load per app runs at a time (``loading``), and dropping spares its keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from .directory import Actors, AppDirectory, DirectoryError, Subject, new_incarnation
from .errors import StoreUnavailable

AUDIT_MAXLEN = 100_000
TOMBSTONE_MS = 24 * 3600 * 1000  # a reused link is worth an alarm for a day after its redemption
LEASE_MS = 30_000  # a directory load's hold on its app, renewed by each batch: one that died lets go this late


class LoadUnderWay(DirectoryError):
    """Another load of the same app holds its lease."""


# GETDEL the grant and, in the same atomic step, leave a tombstone holding it; on a miss, return the
# tombstone so the caller can tell "reused" from "unknown or expired" (for logs only).
_REDEEM = """
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
"""
_REDEEM_SHA = hashlib.sha1(_REDEEM.encode()).hexdigest()

# Revoke: GETDEL the grant and leave a tombstone marked '!' (a grant's JSON never starts so), so that its later
# presentation is told apart as "revoked" (for logs and metrics only: the answer is the same).
_REVOKE = """
local grant = redis.call('GETDEL', KEYS[1])
if grant then redis.call('SET', KEYS[2], '!' .. grant, 'PX', ARGV[1]) end
return grant
"""
_REVOKE_SHA = hashlib.sha1(_REVOKE.encode()).hexdigest()

# A mint's bookkeeping, for an app that supersedes, in its app's grant slot (KEYS[1]: the live index): index the new
# grants (ARGV[3...]: expiry and id pairs, as ZADD takes them) and name the first the newest of its actor and subject
# (ARGV[1] the pair key, ARGV[2] its PX). Other apps' mints only ZADD.
_INDEX = """
redis.call('ZADD', KEYS[1], unpack(ARGV, 3))
redis.call('SET', ARGV[1], ARGV[4], 'PX', ARGV[2])
return 1
"""
_INDEX_SHA = hashlib.sha1(_INDEX.encode()).hexdigest()

# Write a batch of subjects into a new generation and count, against the previous one, the added, changed and
# kept. ARGV: the app's key tag, the new generation, the previous one ("" when none), the lease's milliseconds,
# then per subject its id, JSON (without an incarnation), "1" if active ("" if not), a fresh incarnation, and the
# number of its index entries followed by each entry's kind and value. A subject keeps the incarnation it had in
# the previous generation unless it was absent there or comes back active from inactive (then the fresh one): a
# reload does not end live grants, a removal or a deactivation does for good. The incarnation is appended as the
# JSON's last key, where Subject.to_json puts it, so an unchanged subject's JSON is the same bytes.
# The load must still hold the app's lease (``loading`` = its generation; renewed here): {-2} when it lost it,
# {-1, id} for an id given twice. Every key is in the app's slot (KEYS[1]'s).
_LOAD = """
local tag, gen, old = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', tag .. 'loading') ~= gen then return {-2} end
redis.call('PEXPIRE', tag .. 'loading', ARGV[4])
local new = tag .. gen .. ':'
if old ~= '' then old = tag .. old .. ':' end
local added, changed, kept = 0, 0, 0
local i = 5
while i <= #ARGV do
  local id, json, active, incarnation, entries = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
  if redis.call('ZADD', new .. 'ids', 0, id) == 0 then return {-1, id} end
  local before = old ~= '' and redis.call('GET', old .. 's:' .. id)
  if before then
    local was = cjson.decode(before)
    if was.active ~= false or active == '' then incarnation = was.incarnation or '' end
  end
  if incarnation ~= '' then json = string.sub(json, 1, -2) .. ',"incarnation":"' .. incarnation .. '"}' end
  redis.call('SET', new .. 's:' .. id, json)
  for j = i + 5, i + 3 + 2 * entries, 2 do
    redis.call('SADD', new .. 'x:' .. ARGV[j] .. ':' .. ARGV[j + 1], id)
  end
  i = i + 5 + 2 * entries
  if before then
    kept = kept + 1
    if before ~= json then changed = changed + 1 end
  else
    added = added + 1
  end
end
return {added, changed, kept}
"""

# A load's last step, if it still holds the lease (ARGV: the tag, its generation, the actors' JSON, the previous
# generation or ""): its actors, then ``current``, then the lease goes. Returns the previous generation's number
# of subjects, or -1 when the lease was lost (nothing switched).
_SWITCH = """
local tag, gen, old = ARGV[1], ARGV[2], ARGV[4]
if redis.call('GET', tag .. 'loading') ~= gen then return -1 end
redis.call('SET', tag .. gen .. ':actors', ARGV[3])
redis.call('SET', KEYS[1], gen)
redis.call('DEL', tag .. 'loading')
if old == '' then return 0 end
return redis.call('ZCARD', tag .. old .. ':ids')
"""

# Delete the keys in ARGV (after the tag, ARGV[1]) except those of the generation in use and of a load under way:
# checked here, in one atomic step, so a load that starts while old generations are being dropped keeps its keys.
_DROP = """
local tag = ARGV[1]
local keep = {[redis.call('GET', KEYS[1]) or ''] = true, [redis.call('GET', tag .. 'loading') or ''] = true}
local n = 0
for i = 2, #ARGV do
  local gen = string.match(string.sub(ARGV[i], #tag + 1), '^([^:]+):')
  if gen and not keep[gen] then n = n + redis.call('UNLINK', ARGV[i]) end
end
return n
"""

# Let go of the lease if it is still this load's (ARGV[1]: the generation).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Replace one subject (KEYS[1]) and its index entries, if it still is what the caller read (ARGV[3], "" for none):
# ARGV[1] the generation's prefix, ARGV[2] the id, ARGV[4] the new JSON ("" deletes), then the count and the
# kind/value pairs of the entries to remove, then those to add. 1 done, 0 changed meanwhile (read it again).
_PUT_SUBJECT = """
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[3] then return 0 end
local prefix, id = ARGV[1], ARGV[2]
local removed = tonumber(ARGV[5])
for j = 6, 5 + 2 * removed, 2 do
  redis.call('SREM', prefix .. 'x:' .. ARGV[j] .. ':' .. ARGV[j + 1], id)
end
if ARGV[4] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', prefix .. 'ids', id)
  return 1
end
redis.call('SET', KEYS[1], ARGV[4])
redis.call('ZADD', prefix .. 'ids', 0, id)
local at = 6 + 2 * removed
for j = at + 1, at + 2 * tonumber(ARGV[at]), 2 do
  redis.call('SADD', prefix .. 'x:' .. ARGV[j] .. ':' .. ARGV[j + 1], id)
end
return 1
"""

AnyRedis = aioredis.Redis | RedisCluster


class MasterPool(SentinelConnectionPool):
    """redis-py asks the sentinels for the master only when it opens a connection, so after a failover
    pooled connections keep writing to the old master, which stays a writable master until the
    sentinels demote it many seconds later (grants minted there are lost; grants redeemed there
    stay live on the new one). This pool asks again at most once a second, when a connection is
    handed out, and moves any connection still open to another address onto the master reported."""

    recheck_at = 0.0

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        if time.monotonic() >= self.recheck_at:
            self.recheck_at = time.monotonic() + 1.0
            with suppress(MasterNotFoundError):  # no sentinel answers: keep the master we know
                await self.get_master_address()  # type: ignore[no-untyped-call]  # drops idle ones if moved
        address = (connection.host, connection.port)  # type: ignore[attr-defined]
        if connection.is_connected and self.master_address is not None and address != self.master_address:
            await connection.disconnect()
        await super().ensure_connection(connection)


def connect(url: str, timeout: float) -> AnyRedis:
    """A client for ``url``: ``embedded`` (fakeredis, this process only), ``redis[s]://``,
    ``redis[s]+sentinel://host:port[,host:port]/service`` or ``redis[s]+cluster://host:port``.

    Timeouts are bounded and retries off, so a dead Redis costs a caller at most ``timeout`` per call.
    """
    opts: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if url == "embedded":
        import fakeredis  # only the zero-setup development store needs it

        return fakeredis.FakeAsyncRedis()
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme.endswith("+cluster"):
        base = url.replace("+cluster", "", 1)
        return RedisCluster.from_url(base, socket_timeout=timeout, socket_connect_timeout=timeout)
    if scheme.endswith("+sentinel"):
        hosts = []
        for hostport in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hostport.partition(":")
            hosts.append((host, int(port or 26379)))
        service = parts.path.strip("/") or "mymaster"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        ssl = scheme.startswith("rediss")
        # Bounded and without retries, so one dead sentinel costs a lookup at most ``timeout`` before the next.
        sentinel_opts = {k: opts[k] for k in ("socket_timeout", "socket_connect_timeout", "retry")}
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_opts, ssl=ssl, **opts)  # type: ignore[no-untyped-call]
        master: aioredis.Redis = sentinel.master_for(
            service,
            connection_pool_class=MasterPool,
            password=parts.password or query.get("password"),
            db=int(query.get("db", 0)),
        )
        return master
    return aioredis.Redis.from_url(url, **opts)


def redacted(url: str) -> str:
    """``url`` without its password, fit for a log line or a message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return parts._replace(netloc=f"{(parts.username or '')}:***@{netloc[-1]}").geturl()


def unreachable(url: str, error: BaseException) -> str:
    """Why the store at ``url`` did not answer, in words: ``connection refused at redis://127.0.0.1:6390``."""
    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = " ".join(str(cause).split()).lower()
    if isinstance(cause, ConnectionRefusedError) or "refused" in text:
        why = "connection refused"
    elif isinstance(cause, TimeoutError) or "timeout" in text or "timed out" in text:
        why = "no answer in time"
    elif "name or service not known" in text or "nodename nor servname" in text or "name resolution" in text:
        why = "host name not found"
    elif "auth" in text or "password" in text:
        why = "authentication failed"
    else:
        why = " ".join(str(cause).split())[:160] or type(cause).__name__
    return f"{why} at {redacted(url)}"


@dataclass(frozen=True)
class LoadSummary:
    """What one app's directory load did: subjects added, changed (any field) and removed, and how long it took."""

    app: str
    generation: str
    added: int
    changed: int
    removed: int
    subjects: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.app}: {self.subjects} subjects ({self.added} added, {self.changed} changed, "
                f"{self.removed} removed) in {self.seconds:.1f} s")  # fmt: skip


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


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


def _copy(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


class AutoPipeline:
    """Sends the commands that concurrent requests issue in the same moment to Redis as one pipeline.

    Commands queue while a batch is in flight and go out together as the next one, so under load many
    requests share each round trip (and its system calls and timeout bookkeeping: one timer bounds a whole
    batch), and when idle a command waits for nothing but the next turn of the event loop. Replies are
    matched back in order; a failed command fails only its own caller, a failed batch every caller in it. A
    command waits at most for the batch in flight and its own: twice the timeout. Members added to one sorted
    set in the same batch (:meth:`zadd`) travel as one ``ZADD``.
    """

    def __init__(self, redis: AnyRedis, timeout: float) -> None:
        self._redis = redis
        self._timeout = timeout  # a batch that takes longer fails every command in it
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._zadds: dict[str, list[Any]] = {}  # key -> score, member, score, member, ...
        self._zadded: dict[str, asyncio.Future[Any]] = {}  # key -> the future its members' callers share
        self._sender: asyncio.Task[None] | None = None

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (``"SET", key, value, ...``); the future holds its reply or its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if self._sender is None:
            self._sender = loop.create_task(self._send())
        return future

    def zadd(self, key: str, *scored: Any) -> asyncio.Future[Any]:
        """Queue ``score, member`` pairs for the sorted set ``key``: with every other caller's for the same key in
        this batch, one ``ZADD``, whose reply (or error) each caller's future gets."""
        shared = self._zadded.get(key)
        if shared is None:
            shared = self._zadded[key] = self.submit("ZADD", key)  # its members are added when the batch goes
            self._zadds[key] = []
        self._zadds[key] += scored
        mine: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        shared.add_done_callback(lambda done: _copy(done, mine))  # a caller that gives up cancels only its own
        return mine

    async def _send(self) -> None:
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                zadds, self._zadds, self._zadded = self._zadds, {}, {}
                pipe = self._redis.pipeline(transaction=False)
                for args, _ in batch:
                    if args[0] == "ZADD" and len(args) == 2:
                        args = (*args, *zadds[args[1]])
                    pipe.execute_command(*args)
                try:
                    async with asyncio.timeout(self._timeout):
                        replies = await pipe.execute(raise_on_error=False)
                except Exception as exc:
                    replies = [exc] * len(batch)
                for (_, future), reply in zip(batch, replies, strict=True):
                    if future.done():  # its caller timed out or went away
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:  # cancelled (shutdown): nobody will answer what is still waiting
            for _, future in [*batch, *self._queue]:
                future.cancel()
            self._queue, self._zadds, self._zadded = [], {}, {}
            self._sender = None


class Store:
    """The gateway's Redis operations. The hot ones (mint, redeem, audit, failure counters) share
    auto-pipelined round trips with concurrent requests; each is one round trip at most."""

    def __init__(self, redis: AnyRedis, prefix: str, timeout: float = 1.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.timeout = timeout
        self._pipeline = AutoPipeline(redis, timeout * 1.5)

    # -- keys ---------------------------------------------------------------------------------------
    def grant_key(self, grant_id: str) -> str:
        return f"{self.prefix}grant:{{{grant_id}}}"

    def tombstone_key(self, grant_id: str) -> str:
        return f"{self.prefix}used:{{{grant_id}}}"

    def live_key(self, app: str) -> str:
        return f"{self.prefix}{{grants:{app}}}:live"

    def pair_key(self, app: str, actor: str, subject: str) -> str:
        pair = hashlib.sha256(f"{actor}\0{subject}".encode()).hexdigest()[:32]
        return f"{self.prefix}{{grants:{app}}}:pair:{pair}"

    def current_key(self, app: str) -> str:
        return f"{self.prefix}{{dir:{app}}}:current"

    def generation_prefix(self, app: str, generation: str) -> str:
        """What every key of one generation of an app's directory starts with (the load script builds its keys
        from it the same way as the methods below)."""
        return f"{self.prefix}{{dir:{app}}}:{generation}:"

    def actors_key(self, app: str, generation: str) -> str:
        return self.generation_prefix(app, generation) + "actors"

    def subject_key(self, app: str, generation: str, subject_id: str) -> str:
        return self.generation_prefix(app, generation) + "s:" + subject_id

    def subject_ids_key(self, app: str, generation: str) -> str:
        return self.generation_prefix(app, generation) + "ids"

    def index_key(self, app: str, generation: str, kind: str, value: str) -> str:
        return self.generation_prefix(app, generation) + f"x:{kind}:{value}"

    @property
    def audit_key(self) -> str:
        return f"{self.prefix}audit"

    def failure_key(self, kind: str, fingerprint: str) -> str:
        return f"{self.prefix}fail:{kind}:{fingerprint}"

    # -- plumbing -----------------------------------------------------------------------------------
    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """Bound a store call in time and turn every Redis failure into :class:`StoreUnavailable`."""
        try:
            async with asyncio.timeout(self.timeout * 1.5):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable() from exc

    async def _one(self, *command: Any) -> Any:
        """One command through the auto-pipeline (bounded there); a Redis failure is StoreUnavailable."""
        try:
            return await self._pipeline.submit(*command)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable() from exc

    async def _many(self, commands: Iterable[tuple[Any, ...]]) -> list[Any]:
        """Several commands through the auto-pipeline; their replies in order (StoreUnavailable if one fails)."""
        try:
            return list(await asyncio.gather(*(self._pipeline.submit(*c) for c in commands)))
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable() from exc

    async def ping(self, *, raising: bool = False) -> bool:
        """Whether the store answers; with ``raising``, StoreUnavailable (from the Redis error) when it does not."""
        try:
            async with self._call():
                return bool(await self.redis.ping())
        except StoreUnavailable:
            if raising:
                raise
            return False

    async def close(self) -> None:
        await self.redis.aclose()

    # -- grants -------------------------------------------------------------------------------------
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
        submit = self._pipeline.submit
        now_ms = int(time.time() * 1000)
        scored: list[Any] = []  # expiry, id: ZADD's order
        for grant_id, _, ttl_ms in grants:
            scored += [now_ms + ttl_ms, grant_id]
        futures = [submit("SET", self.grant_key(g), value, "NX", "PX", ttl_ms) for g, value, ttl_ms in grants]
        if pair is None:  # concurrent mints of the app share one ZADD
            futures.append(self._pipeline.zadd(self.live_key(app), *scored))
        else:
            futures.append(submit("EVALSHA", _INDEX_SHA, 1, self.live_key(app), pair.key, pair.ttl_ms, *scored))
        futures.append(submit(*self._xadd(audit)))
        results = await asyncio.gather(*futures, return_exceptions=True)
        if isinstance(results[-2], NoScriptError) and pair is not None:  # a restarted Redis: EVAL caches it again
            results[-2:-1] = await asyncio.gather(
                submit("EVAL", _INDEX, 1, self.live_key(app), pair.key, pair.ttl_ms, *scored), return_exceptions=True
            )
        stored = all(r in (True, b"OK", "OK") for r in results[:-2])
        if not stored or any(isinstance(r, BaseException) for r in results[-2:]):
            # A collision of 96-bit ids is not going to happen; a failed index or audit append can.
            with suppress(StoreUnavailable):
                await self._many(("DEL", self.grant_key(g)) for g, _, _ in grants)  # one slot each
            raise StoreUnavailable()

    async def consume(self, grant_id: str) -> Consumed:
        """Atomically take the grant (GETDEL) and leave its tombstone: one script, one round trip."""
        keys = (self.grant_key(grant_id), self.tombstone_key(grant_id))
        try:
            state, value = await self._pipeline.submit("EVALSHA", _REDEEM_SHA, 2, *keys, TOMBSTONE_MS)
        except NoScriptError:  # a restarted or flushed Redis: EVAL caches the script again
            state, value = await self._one("EVAL", _REDEEM, 2, *keys, TOMBSTONE_MS)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable() from exc
        return Consumed({1: "redeemed", 2: "reused", 3: "revoked"}.get(int(state), "unknown"), value or None)

    async def live(self, grant_ids: Iterable[str]) -> list[bool]:
        """Whether each grant is live, consuming nothing (EXISTS each, auto-pipelined: one round trip)."""
        return [bool(n) for n in await self._many(("EXISTS", self.grant_key(g)) for g in grant_ids)]

    async def newest(self, pair: str) -> str | None:
        """The id of the newest grant of an actor and a subject (an app that supersedes), if one is live."""
        value = await self._one("GET", pair)
        return None if value is None else bytes(value).decode()

    # -- revocation ---------------------------------------------------------------------------------
    async def revoke(self, grant_id: str) -> bytes | None:
        """Delete the live grant ``grant_id`` and leave its tombstone (marked revoked); its JSON, or None when no
        live grant has that id."""
        return (await self._revoke([grant_id]))[0]

    async def _revoke(self, grant_ids: Sequence[str]) -> list[bytes | None]:
        """The revoke script on each grant (auto-pipelined: one round trip); each one's JSON if it was live."""
        commands = [("EVALSHA", _REVOKE_SHA, 2, self.grant_key(g), self.tombstone_key(g), TOMBSTONE_MS)
                    for g in grant_ids]  # fmt: skip
        try:
            return await self._many(commands)
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, NoScriptError):
                raise
        return await self._many(("EVAL", _REVOKE, *c[2:]) for c in commands)  # a restarted Redis caches it again

    async def live_grants(self, app: str, batch: int = 1000) -> AsyncIterator[list[str]]:
        """The ids in ``app``'s live index that have not expired, a batch at a time (ZSCAN: a grant indexed
        before the scan began and still there at its end is seen once at least)."""
        key, cursor, now_ms = self.live_key(app), 0, time.time() * 1000
        while True:
            async with self._call():
                cursor, pairs = await self.redis.zscan(key, cursor, count=batch)
            ids = [_text(member) for member, score in pairs if float(score) > now_ms]
            if ids:
                yield ids
            if cursor == 0:
                return

    async def grants(self, grant_ids: Sequence[str]) -> list[bytes | None]:
        """The JSON of each grant (None for one no longer live), consuming nothing: one round trip."""
        return await self._many(("GET", self.grant_key(g)) for g in grant_ids)

    async def delete_grants(self, app: str, grant_ids: Sequence[str]) -> list[bool]:
        """Delete each grant; whether each was live (a grant redeemed meanwhile was not). Drops the ids from the
        app's live index too."""
        deleted = await self._revoke(grant_ids)
        await self.unindex(app, grant_ids)
        return [n is not None for n in deleted]

    async def trim_live(self, apps: Iterable[str]) -> None:
        """Drop the ids of expired grants from each app's live index (every process, once a refresh)."""
        now_ms = int(time.time() * 1000)
        await self._many(("ZREMRANGEBYSCORE", self.live_key(app), "-inf", now_ms) for app in apps)

    async def unindex(self, app: str, grant_ids: Sequence[str]) -> None:
        if grant_ids:
            await self._one("ZREM", self.live_key(app), *grant_ids)

    async def append_audit(self, event: Mapping[str, str]) -> None:
        await self._one(*self._xadd(event))

    async def append_audits(self, events: Iterable[Mapping[str, str]]) -> None:
        await self._many(self._xadd(e) for e in events)

    def _xadd(self, event: Mapping[str, str]) -> tuple[Any, ...]:
        return ("XADD", self.audit_key, "MAXLEN", "~", AUDIT_MAXLEN, "*", *(x for kv in event.items() for x in kv))

    async def latest_audit(self, count: int) -> list[Any]:
        """The latest ``count`` audit entries, oldest first, as ``[(id, {field: value})]``."""
        async with self._call():
            entries = await self.redis.xrevrange(self.audit_key, count=count) if count else []
        return list(reversed(entries or []))

    async def read_audit(self, last_id: str = "0", count: int = 100, block_ms: int | None = None) -> list[Any]:
        """Audit entries after ``last_id`` as ``[(id, {field: value})]`` (``block_ms`` waits for new ones)."""
        result: Any = await self.redis.xread({self.audit_key: last_id}, count=count, block=block_ms)
        return list(result[0][1]) if result else []

    # -- failed credentials -------------------------------------------------------------------------
    async def record_failure(self, keys: Iterable[tuple[str, str]], window_s: int) -> list[int]:
        """Count one failed credential against each ``(kind, fingerprint)``; the window starts at the first."""
        names = [self.failure_key(k, f) for k, f in keys]
        commands = [*(("INCR", name) for name in names), *(("EXPIRE", name, window_s, "NX") for name in names)]
        return [int(v) for v in (await self._many(commands))[: len(names)]]

    # -- directory: reading ----------------------------------------------------------------------------
    async def generations(self, apps: Iterable[str]) -> dict[str, str | None]:
        """Each app's directory generation in use (None: it has no directory), in one round trip."""
        names = list(apps)
        values = await self._many(("GET", self.current_key(n)) for n in names)
        return {n: None if v is None else bytes(v).decode() for n, v in zip(names, values, strict=True)}

    async def actors(self, app: str, generation: str) -> tuple[Actors, str] | None:
        """The app's actors in ``generation`` and the digest of the source they were loaded from."""
        value = await self._one("GET", self.actors_key(app, generation))
        if value is None:
            return None
        raw = orjson.loads(value)
        return Actors.from_json(orjson.dumps(raw["actors"])), str(raw.get("source", ""))

    async def subject(self, app: str, generation: str, subject_id: str) -> Subject | None:
        value = await self._one("GET", self.subject_key(app, generation, subject_id))
        return None if value is None else Subject.from_json(value)

    async def subjects_by(self, app: str, generation: str, lookups: Iterable[tuple[str, str]]) -> list[Subject]:
        """The subjects that any of ``lookups`` (``(kind, value)``, see :meth:`Subject.index`) finds: two round
        trips, the index's ids and then their subjects."""
        keys = [self.index_key(app, generation, kind, value) for kind, value in lookups]
        ids = await self._one("SUNION", *keys)
        if not ids:
            return []
        values = await self._one("MGET", *(self.subject_key(app, generation, bytes(i).decode()) for i in sorted(ids)))
        return [Subject.from_json(v) for v in values if v is not None]

    async def subject_page(self, app: str, generation: str, start: int, count: int) -> tuple[int, list[Subject]]:
        """How many subjects the app has, and ``count`` of them from the ``start``-th (0-based), ordered by id."""
        key = self.subject_ids_key(app, generation)
        async with self._call():
            total = self._pipeline.submit("ZCARD", key)
            ids = await self._pipeline.submit("ZRANGE", key, start, start + count - 1) if count > 0 else []
            names = (self.subject_key(app, generation, bytes(i).decode()) for i in ids)
            values = await self._pipeline.submit("MGET", *names) if ids else []
            total = await total
        return int(total), [Subject.from_json(v) for v in values if v is not None]

    async def start_generation(self, app: str) -> str:
        """The app's generation in use, starting an empty one if it has none (its first subject comes by SCIM)."""
        generation = secrets.token_hex(8)
        actors = orjson.dumps({"actors": orjson.loads(Actors().to_json()), "source": ""})
        async with self._call():
            await self.redis.set(self.actors_key(app, generation), actors)
            if await self.redis.set(self.current_key(app), generation, nx=True):
                return generation
        found = (await self.generations([app]))[app]  # another writer started one first
        assert found is not None
        return found

    # -- directory: one subject at a time ---------------------------------------------------------------
    async def put_subject(self, app: str, generation: str, was: Subject | None, subject: Subject | None) -> bool:
        """Make the subject ``was`` (None: absent) into ``subject`` (None: delete it), with its index entries, in
        one atomic step; False when it was no longer ``was`` (another writer came first: read it again)."""
        subject_id = (subject or was).id  # type: ignore[union-attr]
        removed = was.index() if was is not None else []
        added = subject.index() if subject is not None else []
        args: list[str | bytes] = [
            self.generation_prefix(app, generation), subject_id, was.to_json() if was else b"",
            subject.to_json() if subject else b"", str(len(removed)), *(x for entry in removed for x in entry),
            str(len(added)), *(x for entry in added for x in entry),
        ]  # fmt: skip
        return bool(await self._script(_PUT_SUBJECT, self.subject_key(app, generation, subject_id), *args))

    async def _script(self, script: str, key: str, *args: str | bytes) -> Any:
        """Run a script on ``key``'s node (EVALSHA; EVAL when the server does not hold it yet)."""
        async with self._call():
            try:
                return await self.redis.evalsha(hashlib.sha1(script.encode()).hexdigest(), 1, key, *args)
            except NoScriptError:
                return await self.redis.eval(script, 1, key, *args)

    # -- directory: loading ----------------------------------------------------------------------------
    def _tag(self, app: str) -> str:
        return f"{self.prefix}{{dir:{app}}}:"

    async def load_app(
        self,
        directory: AppDirectory,
        *,
        source: str = "",
        batch: int = 1000,
        progress: Callable[[int], object] | None = None,
    ) -> LoadSummary:
        """Write ``directory`` as a new generation of its app, in batches (constant memory, each batch one
        script), then make it the one in use; the previous generation stays for :meth:`drop_generations`.

        One load per app at a time: it holds the app's lease (``loading``, renewed by each batch, expiring
        :data:`LEASE_MS` after the last). A subject absent from ``directory`` is gone once this returns. A load
        that fails before the end changes nothing in use (its partial generation is dropped by the next load).
        Raises LoadUnderWay, DirectoryError (a bad or duplicate subject, a lost lease: nothing switched) or
        StoreUnavailable.
        """
        app, started = directory.app, time.monotonic()
        tag, generation = self._tag(app), secrets.token_hex(8)
        async with self._call():
            if not await self.redis.set(tag + "loading", generation, nx=True, px=LEASE_MS):
                raise LoadUnderWay(f"apps.{app}: another load of this app is under way (one that died lets go "
                                   f"within {LEASE_MS // 1000} s); nothing was loaded")  # fmt: skip
        try:
            return await self._load(directory, tag, generation, source, batch, progress, started)
        except BaseException:
            with suppress(Exception):
                await self._script(_RELEASE, tag + "loading", generation)
            raise

    async def _load(
        self,
        directory: AppDirectory,
        tag: str,
        generation: str,
        source: str,
        batch: int,
        progress: Callable[[int], object] | None,
        started: float,
    ) -> LoadSummary:
        app = directory.app
        lost = DirectoryError(f"apps.{app}: the load stalled past {LEASE_MS // 1000} s and another took over; "
                              "nothing was switched")  # fmt: skip
        previous = (await self.generations([app]))[app] or ""
        added = changed = kept = 0
        pending: list[Subject] = []

        async def flush() -> None:
            # One script per batch writes its subjects and their index entries and compares them with the
            # previous generation's: a million subjects are a thousand commands, not five million.
            nonlocal added, changed, kept
            args: list[str | bytes] = [tag, generation, previous, str(LEASE_MS)]
            for subject in pending:
                index = subject.index()
                json = dataclasses.replace(subject, incarnation=None).to_json()
                args += [subject.id, json, "1" if subject.active else "", new_incarnation(), str(len(index))]
                for kind, value in index:
                    args += [kind, value]
            result = await self._script(_LOAD, self.current_key(app), *args)
            if int(result[0]) == -2:
                raise lost
            if int(result[0]) == -1:
                raise DirectoryError(f"apps.{app}: subject {bytes(result[1]).decode()!r} is given twice")
            added, changed, kept = added + int(result[0]), changed + int(result[1]), kept + int(result[2])
            if progress is not None:
                progress(len(pending))
            pending.clear()
            await asyncio.sleep(0)  # a load inside a serving process lets requests in between batches

        for subject in directory.subjects:
            pending.append(subject)
            if len(pending) >= batch:
                await flush()
        await flush()
        actors = orjson.dumps({"actors": orjson.loads(directory.actors.to_json()), "source": source})
        before = await self._script(_SWITCH, self.current_key(app), tag, generation, actors, previous)
        if int(before) < 0:
            raise lost
        return LoadSummary(app, generation, added, changed, int(before) - kept, added + kept,
                           time.monotonic() - started)  # fmt: skip

    async def drop_generations(self, app: str) -> int:
        """Delete every generation of the app's directory but the one in use and a load's under way (old
        ones, and what loads that died midway left); returns how many keys went."""
        tag = self._tag(app)
        dropped = 0
        doomed: list[bytes] = []
        async for key in self._scan_app(app, _glob_escape(tag) + "*:*"):
            doomed.append(key)
            if len(doomed) >= 1000:
                dropped += await self._drop(app, doomed)
        return dropped + await self._drop(app, doomed)

    async def _drop(self, app: str, keys: list[bytes]) -> int:
        if not keys:
            return 0
        dropped = int(await self._script(_DROP, self.current_key(app), self._tag(app), *keys))
        keys.clear()
        return dropped

    async def load_directory(self, apps: Mapping[str, AppDirectory]) -> dict[str, LoadSummary]:
        """Load each app (:meth:`load_app`) and drop its older generations at once: for tests and set-up,
        where no process is reading the directory yet."""
        summaries = {}
        for name, directory in apps.items():
            summaries[name] = await self.load_app(directory)
            await self.drop_generations(name)
        return summaries

    async def _scan_app(self, app: str, match: str) -> AsyncIterator[bytes]:
        """The keys matching ``match`` on the node that holds the app's directory (on a Cluster, its slot's)."""
        redis: Any = self.redis
        if isinstance(redis, RedisCluster):
            node = redis.get_node_from_key(self.current_key(app))
            async for key in redis.scan_iter(match=match, count=1000, target_nodes=node):
                yield key
        else:
            async for key in redis.scan_iter(match=match, count=1000):
                yield key
