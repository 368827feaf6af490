"""The connection to Redis: topology, bounded calls, the auto-pipeline and scripts.

:func:`connect` opens a client for a ``store.url`` (embedded, plain, Sentinel or Cluster); :class:`Connection`
is what the store's parts (grants, directory, events) share: the client, the :class:`AutoPipeline` that lets
concurrent requests share round trips, and the calls that bound a Redis operation in time and turn every Redis
failure (a Redis error, a socket error, a timeout) into :class:`~gateway.errors.StoreUnavailable`. Only the store
package touches the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from ..errors import StoreUnavailable

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


class Script:
    """A Lua script and the SHA-1 that EVALSHA names it by."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


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


class Connection:
    """A Redis client with its auto-pipeline, shared by the store's parts.

    Every call here is bounded in time (``timeout`` and a half) and raises :class:`StoreUnavailable`, from the
    Redis error, when Redis fails; :attr:`pipeline` (for a caller that sends several commands of one request
    together) leaves that mapping to its caller.
    """

    def __init__(self, redis: AnyRedis, timeout: float = 1.0) -> None:
        self.redis = redis
        self.timeout = timeout
        self.pipeline = AutoPipeline(redis, timeout * 1.5)

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """Bound a store call in time and turn every Redis failure into :class:`StoreUnavailable`."""
        try:
            async with asyncio.timeout(self.timeout * 1.5):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable() from exc

    async def one(self, *command: Any) -> Any:
        """One command through the auto-pipeline (bounded there); a Redis failure is StoreUnavailable."""
        try:
            return await self.pipeline.submit(*command)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable() from exc

    async def many(self, commands: Iterable[tuple[Any, ...]]) -> list[Any]:
        """Several commands through the auto-pipeline; their replies in order (StoreUnavailable if one fails)."""
        try:
            return list(await asyncio.gather(*(self.pipeline.submit(*c) for c in commands)))
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable() from exc

    async def script(self, script: Script, key: str, *args: str | bytes) -> Any:
        """Run a script on ``key``'s node (EVALSHA; EVAL when the server does not hold it yet)."""
        async with self.call():
            try:
                return await self.redis.evalsha(script.sha, 1, key, *args)
            except NoScriptError:
                return await self.redis.eval(script.source, 1, key, *args)

    async def scan_near(self, key: str, match: str) -> AsyncIterator[bytes]:
        """The keys matching ``match`` on the node that holds ``key`` (on a Cluster, its slot's)."""
        redis: Any = self.redis
        if isinstance(redis, RedisCluster):
            node = redis.get_node_from_key(key)
            async for found in redis.scan_iter(match=match, count=1000, target_nodes=node):
                yield found
        else:
            async for found in redis.scan_iter(match=match, count=1000):
                yield found

    async def ping(self, *, raising: bool = False) -> bool:
        """Whether the store answers; with ``raising``, StoreUnavailable (from the Redis error) when it does not."""
        try:
            async with self.call():
                return bool(await self.redis.ping())
        except StoreUnavailable:
            if raising:
                raise
            return False

    async def close(self) -> None:
        await self.redis.aclose()
