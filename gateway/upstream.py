"""HTTP/1.1 to the apps: a small client made for forwarding.

aiohttp's ClientSession does much that a proxy has no use for (cookies, redirects, authentication, proxies,
middlewares, traces, its own headers) and, per request, costs more than all the rest of a pass-through.
This client keeps only what forwarding needs and builds it from aiohttp's own parts: its client protocol
and llhttp response parser (``ResponseHandler``), and its ``StreamWriter`` for bodies.

- One :class:`Pool` of keep-alive connections per upstream address, at most ``limit`` open; a request that
  finds them all busy waits for one (within the connect timeout). An idle connection is looked at before it
  is reused: one the app closed meanwhile, or that holds bytes nobody asked for, is dropped and the request
  takes another, so nothing of it was sent on a dead connection. A connection may be taken before its request
  is ready (:meth:`Client.hold`): a redemption spends its grant only once the app can be reached.
- A reused connection that the app drops before any byte of the answer (it closed it just as it was reused:
  the app never read the request) sends the request once more on a new connection, whatever its method, when
  its body is still held (bytes, not a stream); browsers do the same. The caller may veto it or change the
  headers first (``resend``): the app may have read the request after all, and an assertion is single-use.
- The request goes out as given: the head in one write, a body of known size with it, a stream after it
  (chunked when its size is unknown, never more than a declared ``Content-Length``, with backpressure).
- The answer is parsed by llhttp as aiohttp's client does; its body is a flow-controlled StreamReader, and
  ``read_timeout`` bounds every pause of the upstream's (sock_read). A connection goes back to the pool only
  when its answer was read to the end, neither side asked to close it and the app has not closed it since.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import ssl
from collections import deque
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientOSError, ServerDisconnectedError, StreamReader
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

KEEPALIVE_SECONDS = 15.0  # an idle connection older than this is not reused (apps often close at 5-75 s)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # a request without a body still says Content-Length: 0


class UpstreamTimeout(TimeoutError):
    """No connection within the connect timeout."""


class Connection(ResponseHandler):
    """aiohttp's client protocol, noting whether any byte of the current answer came: a request that a reused
    connection drops before that was never read by the app, and may go again."""

    answered = False

    def data_received(self, data: bytes) -> None:
        self.answered = True
        super().data_received(data)


@dataclass
class Answer:
    """The upstream's answer: status line, headers and a body to read (see :meth:`Client.request`)."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: StreamReader

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None


class Pool:
    """Keep-alive connections to one address; at most ``limit`` open at once."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, limit: int) -> None:
        self.host, self.port, self.tls, self.limit = host, port, tls, limit
        self._idle: deque[tuple[Connection, float]] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, *, fresh: bool = False) -> Connection:
        """An idle connection (unless ``fresh``) or a new one; waits while ``limit`` are open and busy."""
        loop = asyncio.get_running_loop()
        while True:
            connection = None if fresh else self.take_idle(loop.time())
            if connection is not None:
                return connection
            if self._open < self.limit:
                break
            if fresh and self._idle:  # make room: an idle connection gives way to a new one
                self._idle.popleft()[0].close()
                self._open -= 1
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self._open += 1
        try:
            _, connection = await loop.create_connection(
                lambda: Connection(loop), self.host, self.port, ssl=self.tls,
                server_hostname=self.host if self.tls else None,
            )  # fmt: skip
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        return connection

    def release(self, connection: Connection, reuse: bool) -> None:
        # An app may close a connection right after an answer that did not say so (aiohttp does after a body it
        # could not decode): take_idle looks at it again before it is given to another request.
        if reuse and connection.is_connected() and not connection.should_close:
            self._idle.append((connection, asyncio.get_running_loop().time()))
        else:
            connection.close()
            self._open -= 1
        self._wake()

    def close(self) -> None:
        while self._idle:
            self._idle.pop()[0].close()
            self._open -= 1

    def take_idle(self, now: float) -> Connection | None:
        """An idle connection still fit for use, if there is one."""
        while self._idle:
            connection, since = self._idle.pop()  # the most recently used first: the least likely closed
            if now - since < KEEPALIVE_SECONDS and connection.is_connected() and not _readable(connection):
                return connection
            connection.close()
            self._open -= 1
        return None

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _readable(connection: ResponseHandler) -> bool:
    """Whether an idle connection's socket can be read: end of file or unsolicited bytes, so it is done with."""
    transport = connection.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


@dataclass
class Held:
    """A connection taken for a request that is not ready yet; ``reused`` when it was an idle one."""

    pool: Pool
    connection: Connection
    reused: bool

    def release(self) -> None:
        """Give it back unused."""
        self.pool.release(self.connection, reuse=True)


class Client:
    """One :class:`Pool` per upstream address."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pools: dict[tuple[str, int, bool], Pool] = {}
        self._tls: ssl.SSLContext | None = None

    def pool(self, host: str, port: int, tls: bool) -> Pool:
        key = (host, port, tls)
        found = self._pools.get(key)
        if found is None:
            if tls and self._tls is None:
                self._tls = ssl.create_default_context()
            found = self._pools[key] = Pool(host, port, self._tls if tls else None, self.limit)
        return found

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()

    async def hold(self, pool: Pool, connect_timeout: float) -> Held:
        """An idle connection of ``pool`` or a new one, for a request to send later with :meth:`request`. Raises
        UpstreamTimeout (none within ``connect_timeout``: all busy, or the app slow to accept), OSError (refused)."""
        connection = pool.take_idle(asyncio.get_running_loop().time())
        if connection is not None:
            return Held(pool, connection, reused=True)
        try:
            async with asyncio.timeout(connect_timeout):
                return Held(pool, await pool.acquire(), reused=False)
        except TimeoutError:
            raise UpstreamTimeout() from None

    async def request(
        self,
        pool: Pool,
        method: str,
        target: str,
        authority: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        connect_timeout: float,
        read_timeout: float | None,
        held: Held | None = None,
        resend: Callable[[CIMultiDict[str]], bool] | None = None,
    ) -> Exchange:
        """Send ``method target`` with ``headers`` (Host is ``authority``) and ``body`` and return the exchange once
        the answer's head has come; ``async with`` it gives the answer, whose body the caller reads, and then puts
        the connection back in the pool if that was all of it. A streamed body without a Content-Length goes
        chunked. ``held`` is the connection to use first (see :meth:`hold`). ``resend`` is asked before the request goes
        once more (it may change ``headers``; False: it does not go again). Raises UpstreamTimeout, TimeoutError
        (the upstream paused longer than ``read_timeout``), OSError or aiohttp's ClientError (connection refused or
        reset, a garbled answer) or HttpProcessingError (an answer llhttp refused)."""
        connection: Connection | None
        if held is not None:
            connection, reused = held.connection, held.reused
        else:
            connection = pool.take_idle(asyncio.get_running_loop().time())
            reused = connection is not None
        # A connection the app closes just as we reuse it fails before any byte of the answer: the app never read
        # the request, which goes once more on a new connection if we still hold its body; any other fails (502).
        retry = reused and (body is None or isinstance(body, bytes))
        fresh = False
        while True:
            if connection is None:
                try:
                    async with asyncio.timeout(connect_timeout):
                        connection = await pool.acquire(fresh=fresh)
                except TimeoutError:
                    raise UpstreamTimeout() from None
            try:
                return await self._exchange(pool, connection, method, target, authority, headers, body, read_timeout)
            except (ServerDisconnectedError, ClientOSError, ConnectionResetError):
                if not retry or connection.answered or (resend is not None and not resend(headers)):
                    raise
            retry, fresh, connection = False, True, None

    async def _exchange(
        self,
        pool: Pool,
        connection: Connection,
        method: str,
        target: str,
        authority: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        read_timeout: float | None,
    ) -> Exchange:
        loop = asyncio.get_running_loop()
        sending: asyncio.Task[None] | None = None
        connection.answered = False
        try:
            connection.set_response_params(
                skip_payload=method == "HEAD", read_until_eof=True, auto_decompress=False, read_timeout=read_timeout
            )
            transport = connection.transport
            if transport is None:
                raise ServerDisconnectedError()
            if body is None or isinstance(body, bytes):
                data = body or b""
                length = str(len(data)) if data or method in _BODY_METHODS else None
                transport.write(_head(method, target, authority, headers, length) + data)
            else:
                declared = headers.get("Content-Length")
                transport.write(_head(method, target, authority, headers, declared, chunked=declared is None))
                writer = StreamWriter(connection, loop)
                if declared is None:
                    writer.enable_chunking()
                else:
                    writer.length = int(declared)
                sending = asyncio.create_task(_send(writer, body, connection))
            connection.start_timeout()
            message, payload = await connection.read()
        except BaseException:
            if sending is not None:
                sending.cancel()
            pool.release(connection, reuse=False)
            raise
        return Exchange(pool, connection, sending, Answer(message.code, message.reason, message.headers, payload))


class Exchange:
    """One request and its answer on one connection: ``async with`` it to read the answer."""

    __slots__ = ("answer", "connection", "pool", "sending")

    def __init__(self, pool: Pool, connection: Connection, sending: asyncio.Task[None] | None, answer: Answer) -> None:
        self.pool, self.connection, self.sending, self.answer = pool, connection, sending, answer

    async def __aenter__(self) -> Answer:
        return self.answer

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        sending = self.sending
        if sending is not None and not sending.done():  # the app answered before taking the whole body
            sending.cancel()
            reuse = False
        else:
            sent = sending is None or (not sending.cancelled() and sending.exception() is None)
            reuse = kind is None and sent and self.answer.body.is_eof()
        self.pool.release(self.connection, reuse=reuse)


async def _send(writer: StreamWriter, body: AsyncIterable[bytes], connection: ResponseHandler) -> None:
    try:
        async for chunk in body:
            await writer.write(chunk)
        await writer.write_eof()
    except Exception:
        connection.close()  # a body that fails (the client went away or stalled) ends the exchange
        raise


def _head(
    method: str, target: str, authority: str, headers: CIMultiDict[str], length: str | None, *, chunked: bool = False
) -> bytes:
    """The request line and headers: ``Host``, then ``headers`` as given but for their framing, which is ours."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items() if name.lower() not in _FRAMING)
    if length is not None:
        lines.append(f"Content-Length: {length}")
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("a header holds a line break")  # never from a parsed request; kept from ever being sent
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")


_FRAMING = frozenset({"content-length", "transfer-encoding", "host"})
