"""Every Redis key and command the gateway uses.

Keys (all under ``store.prefix``; ``{...}`` is a Redis Cluster hash tag)::

    grant:{<sha256 of token>}     a live grant, JSON, PX = grant TTL          SET NX PX / GETDEL
    used:{<sha256 of token>}      tombstone of a redeemed grant (reuse alarm)  SET PX, in the redeem script
    {directory}:app:<app>         one app's directory, JSON                    SET in MULTI, MGET
    {directory}:generation        a new random id on every directory load      SET in MULTI, GET
    audit                         bounded stream of mint/redeem events         XADD MAXLEN ~
    fail:<kind>:<fingerprint>     failed-credential counters                   INCR + EXPIRE

A grant and its tombstone share a hash tag, so the redeem script touches one slot; the directory keys
share another, so a load is one transaction even on a Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from .directory import AppDirectory
from .errors import StoreUnavailable

AUDIT_MAXLEN = 100_000
TOMBSTONE_MS = 24 * 3600 * 1000  # a reused link is worth an alarm for a day after its redemption

# GETDEL the grant and, in the same atomic step, leave a tombstone holding it; on a miss, return the
# tombstone so the caller can tell "reused" from "unknown or expired" (for logs only).
_REDEEM = """
local grant = redis.call('GETDEL', KEYS[1])
if grant then
  redis.call('SET', KEYS[2], grant, 'PX', ARGV[1])
  return {1, grant}
end
local tomb = redis.call('GET', KEYS[2])
if tomb then return {2, tomb} end
return {0, false}
"""
_REDEEM_SHA = hashlib.sha1(_REDEEM.encode()).hexdigest()

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


@dataclass(frozen=True)
class Consumed:
    """What the redeem script found: ``state`` is ``"redeemed"``, ``"reused"`` or ``"unknown"``."""

    state: str
    grant: bytes | None = None


class AutoPipeline:
    """Sends the commands that concurrent requests issue in the same moment to Redis as one pipeline.

    Commands queue while a batch is in flight and go out together as the next one, so under load many
    requests share each round trip (and its system calls and timeout bookkeeping), and when idle a
    command waits for nothing but the next turn of the event loop. Replies are matched back in order;
    a failed command fails only its own caller, a failed batch every caller in it.
    """

    def __init__(self, redis: AnyRedis) -> None:
        self._redis = redis
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (``"SET", key, value, ...``); the future holds its reply or its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if self._sender is None:
            self._sender = loop.create_task(self._send())
        return future

    async def _send(self) -> None:
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                pipe = self._redis.pipeline(transaction=False)
                for args, _ in batch:
                    pipe.execute_command(*args)
                try:
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
            self._queue = []
            self._sender = None


class Store:
    """The gateway's Redis operations. The hot ones (mint, redeem, audit, failure counters) share
    auto-pipelined round trips with concurrent requests; each is one round trip at most."""

    def __init__(self, redis: AnyRedis, prefix: str, timeout: float = 1.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.timeout = timeout
        self._pipeline = AutoPipeline(redis)

    # -- keys ---------------------------------------------------------------------------------------
    def grant_key(self, token_hash: str) -> str:
        return f"{self.prefix}grant:{{{token_hash}}}"

    def tombstone_key(self, token_hash: str) -> str:
        return f"{self.prefix}used:{{{token_hash}}}"

    def directory_key(self, app: str) -> str:
        return f"{self.prefix}{{directory}}:app:{app}"

    @property
    def generation_key(self) -> str:
        return f"{self.prefix}{{directory}}:generation"

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

    async def ping(self) -> bool:
        try:
            async with self._call():
                return bool(await self.redis.ping())
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self.redis.aclose()

    # -- grants -------------------------------------------------------------------------------------
    async def put_grants(self, grants: Iterable[tuple[str, bytes, int]], audit: Mapping[str, str]) -> None:
        """Store each ``(token_hash, grant_json, ttl_ms)`` with ``SET NX PX`` and append ``audit`` to the stream,
        all in one pipeline (one round trip).

        Audit fails closed: if the append fails, the grants just stored are deleted and the call raises
        :class:`StoreUnavailable`, so no grant is handed out unaudited.
        """
        grants = list(grants)
        submit = self._pipeline.submit
        async with self._call():
            futures = [submit("SET", self.grant_key(h), value, "NX", "PX", ttl_ms) for h, value, ttl_ms in grants]
            futures.append(submit(*self._xadd(audit)))
            results = await asyncio.gather(*futures, return_exceptions=True)
            if any(r not in (True, b"OK", "OK") for r in results[:-1]) or isinstance(results[-1], BaseException):
                # A collision of 192 random bits is not going to happen; a failed audit append can.
                await asyncio.gather(*(submit("DEL", self.grant_key(h)) for h, _, _ in grants))  # one slot each
                raise StoreUnavailable()

    async def consume(self, token_hash: str) -> Consumed:
        """Atomically take the grant (GETDEL) and leave its tombstone: one script, one round trip."""
        keys = (self.grant_key(token_hash), self.tombstone_key(token_hash))
        async with self._call():
            try:
                state, value = await self._pipeline.submit("EVALSHA", _REDEEM_SHA, 2, *keys, TOMBSTONE_MS)
            except NoScriptError:  # a restarted or flushed Redis: EVAL caches the script again
                state, value = await self._pipeline.submit("EVAL", _REDEEM, 2, *keys, TOMBSTONE_MS)
        return Consumed({1: "redeemed", 2: "reused"}.get(int(state), "unknown"), value or None)

    async def live(self, token_hashes: Iterable[str]) -> list[bool]:
        """Whether each grant is live, consuming nothing (EXISTS each, auto-pipelined: one round trip)."""
        async with self._call():
            found = await asyncio.gather(*(self._pipeline.submit("EXISTS", self.grant_key(h)) for h in token_hashes))
        return [bool(n) for n in found]

    async def append_audit(self, event: Mapping[str, str]) -> None:
        async with self._call():
            await self._pipeline.submit(*self._xadd(event))

    def _xadd(self, event: Mapping[str, str]) -> tuple[Any, ...]:
        return ("XADD", self.audit_key, "MAXLEN", "~", AUDIT_MAXLEN, "*", *(x for kv in event.items() for x in kv))

    async def read_audit(self, last_id: str = "0", count: int = 100, block_ms: int | None = None) -> list[Any]:
        """Audit entries after ``last_id`` as ``[(id, {field: value})]`` (``block_ms`` waits for new ones)."""
        result: Any = await self.redis.xread({self.audit_key: last_id}, count=count, block=block_ms)
        return list(result[0][1]) if result else []

    # -- failed credentials -------------------------------------------------------------------------
    async def record_failure(self, keys: Iterable[tuple[str, str]], window_s: int) -> list[int]:
        """Count one failed credential against each ``(kind, fingerprint)``; the window starts at the first."""
        names = [self.failure_key(k, f) for k, f in keys]
        submit = self._pipeline.submit
        async with self._call():
            counts = [submit("INCR", name) for name in names]
            expiries = [submit("EXPIRE", name, window_s, "NX") for name in names]
            results = await asyncio.gather(*counts, *expiries)
        return [int(v) for v in results[: len(names)]]

    # -- directory ----------------------------------------------------------------------------------
    async def load_directory(self, apps: Mapping[str, AppDirectory]) -> str:
        """Replace each app's directory in one MULTI/EXEC (a reader sees all of it or none) under a new
        generation, and return it. Generations are random, not counted: a flushed store that counts
        again from 1 could otherwise look unchanged to a process that read generation 1 before."""
        generation = secrets.token_hex(8)
        async with self._call():
            pipe = self.redis.pipeline(transaction=True)
            for name, directory in apps.items():
                pipe.set(self.directory_key(name), directory.to_json())
            pipe.set(self.generation_key, generation)
            await pipe.execute()
        return generation

    async def generation(self) -> str | None:
        async with self._call():
            value: Any = await self.redis.get(self.generation_key)
        return None if value is None else bytes(value).decode()

    async def read_directory(self, apps: Iterable[str]) -> tuple[str | None, dict[str, AppDirectory]]:
        """The generation and the directories of ``apps`` that exist, read together in one MGET."""
        names = list(apps)
        async with self._call():
            values: list[Any] = await self.redis.mget([self.generation_key, *(self.directory_key(n) for n in names)])
        generation = None if values[0] is None else bytes(values[0]).decode()
        return generation, {n: AppDirectory.from_json(v) for n, v in zip(names, values[1:], strict=True) if v}
