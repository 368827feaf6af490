"""HTTP/1.1 to the apps: a small client made for forwarding.

aiohttp's ClientSession does much that a proxy has no use for (cookies, redirects, authentication, proxies,
middlewares, traces, its own headers) and, per request, costs more than all the rest of a pass-through.
This client keeps only what forwarding needs and builds it from aiohttp's own parts: its client protocol
and llhttp response parser (``ResponseHandler``), and its ``StreamWriter`` for bodies.

- One :class:`Pool` of keep-alive connections per upstream address, at most ``limit`` open; a request that
  finds them all busy waits for one (within the connect timeout). An idle connection is looked at before it
  is reused: one the app closed meanwhile, or that holds bytes nobody asked for, is dropped and the request
  takes another, so nothing of it was sent on a dead connection.
- The request goes out as given: the head in one write, a body of known size with it, a stream after it
  (chunked when its size is unknown, never more than a declared ``Content-Length``, with backpressure).
- The answer is parsed by llhttp as aiohttp's client does; its body is a flow-controlled StreamReader, and
  ``read_timeout`` bounds every pause of the upstream's (sock_read). A connection goes back to the pool only
  when its answer was read to the end and neither side asked to close it.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import ssl
from collections import deque
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientOSError, ServerDisconnectedError, StreamReader
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

KEEPALIVE_SECONDS = 15.0  # an idle connection older than this is not reused (apps often close at 5-75 s)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # a request without a body still says Content-Length: 0
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class UpstreamTimeout(TimeoutError):
    """No connection within the connect timeout."""


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
        self._idle: deque[tuple[ResponseHandler, float]] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, *, fresh: bool = False) -> ResponseHandler:
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
                lambda: ResponseHandler(loop), self.host, self.port, ssl=self.tls,
                server_hostname=self.host if self.tls else None,
            )  # fmt: skip
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        return connection

    def release(self, connection: ResponseHandler, reuse: bool) -> None:
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

    def take_idle(self, now: float) -> ResponseHandler | None:
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
    ) -> Exchange:
        """Send ``method target`` with ``headers`` (Host is ``authority``) and ``body`` and return the exchange once
        the answer's head has come; ``async with`` it gives the answer, whose body the caller reads, and then puts
        the connection back in the pool if that was all of it. A streamed body without a Content-Length goes
        chunked. Raises UpstreamTimeout, TimeoutError (the upstream paused longer than ``read_timeout``), OSError
        or aiohttp's ClientError (connection refused or reset, a garbled answer)."""
        loop = asyncio.get_running_loop()
        connection = pool.take_idle(loop.time())
        # A connection the app closes just as we reuse it fails before any answer: an idempotent request with a
        # body we still hold is sent once more, on a new connection (RFC 9110 §9.2.2); any other fails (502).
        retry = connection is not None and method in _IDEMPOTENT and (body is None or isinstance(body, bytes))
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
                if not retry:
                    raise
            retry, fresh, connection = False, True, None

    async def _exchange(
        self,
        pool: Pool,
        connection: ResponseHandler,
        method: str,
        target: str,
        authority: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        read_timeout: float | None,
    ) -> Exchange:
        loop = asyncio.get_running_loop()
        sending: asyncio.Task[None] | None = None
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

    def __init__(
        self, pool: Pool, connection: ResponseHandler, sending: asyncio.Task[None] | None, answer: Answer
    ) -> None:
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
