"""The HTTP/1.1 client for the apps, against raw servers that do exactly what each test needs.

Keep-alive reuse, the bound on open connections, the check before reuse, a retry only where it is safe,
request framing (a known length, chunked, never past a declared length) and answers llhttp frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import ServerDisconnectedError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from gateway.upstream import Client, Pool, UpstreamTimeout
from tests.conftest import until

Handler = Callable[["Connection", bytes], Awaitable[bool]]  # -> keep the connection open


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    number: int


@dataclass
class Server:
    """A raw HTTP/1.1 server: reads each request head (and a Content-Length body), hands it to ``handler``."""

    handler: Handler
    port: int = 0
    connections: int = 0
    closed: int = 0  # connections this server has closed (their sockets shut)
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (connection number, head + body)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = Connection(reader, writer, self.connections)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        body = await reader.readexactly(int(line.split(b":")[1]))
                if b"transfer-encoding: chunked" in head.lower():
                    body = await _read_chunked(reader)
                self.requests.append((connection.number, head + body))
                if not await self.handler(connection, head + body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.closed += 1


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if not size:
            return out
        out += chunk[:-2]


async def answer(connection: Connection, body: bytes = b"ok", extra: bytes = b"") -> bool:
    connection.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))
    await connection.writer.drain()
    return True


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Server:
        server = Server(handler)
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        server.port = listening.sockets[0].getsockname()[1]
        servers.append(listening)
        return server

    yield start
    for listening in servers:
        listening.close()
        await listening.wait_closed()


async def fetch(
    client: Client, pool: Pool, method: str = "GET", body: object = None, *, read_timeout: float = 2, **headers: str
) -> bytes:
    exchange = await client.request(pool, method, "/x", "app", CIMultiDict(headers), body,  # type: ignore[arg-type]
                                    connect_timeout=1, read_timeout=read_timeout)  # fmt: skip
    async with exchange as got:
        return await got.body.read()


async def test_connections_are_kept_alive_and_bounded(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    async def slow(connection: Connection, request: bytes) -> bool:
        await asyncio.sleep(0.05)
        return await answer(connection)

    server = await serve(slow)
    client = Client(limit=2)
    pool = client.pool("127.0.0.1", server.port, False)
    assert await asyncio.gather(*(fetch(client, pool) for _ in range(6))) == [b"ok"] * 6
    assert server.connections == 2  # six requests, never more than two connections, reused
    client.close()


async def test_a_full_pool_waits_only_the_connect_timeout(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    async def stuck(connection: Connection, request: bytes) -> bool:
        await connection.reader.read()  # never answers; done when the client lets go
        return False

    server = await serve(stuck)
    client = Client(limit=1)
    pool = client.pool("127.0.0.1", server.port, False)
    first = asyncio.create_task(fetch(client, pool, read_timeout=60))  # holds the only connection throughout

    async def first_arrived() -> bool:
        return len(server.requests) == 1

    await until("the app to receive the first request", first_arrived)
    with pytest.raises(UpstreamTimeout):
        await fetch(client, pool)  # connect_timeout=1: the only connection stays busy
    assert server.connections == 1 and not first.done()  # it waited for the pool, never opened a second one
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    client.close()


async def test_a_connection_the_app_closed_while_idle_is_not_reused(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def once(connection: Connection, request: bytes) -> bool:
        await answer(connection)
        return False  # closes after answering, without saying so

    server = await serve(once)
    client = Client(limit=4)
    pool = client.pool("127.0.0.1", server.port, False)
    assert await fetch(client, pool) == b"ok"

    async def app_closed() -> bool:
        return server.closed == 1

    await until("the app to close the first connection", app_closed)
    assert await fetch(client, pool, "POST", b"x") == b"ok"  # sent once, on a new connection
    assert [n for n, _ in server.requests] == [1, 2]


@pytest.mark.parametrize(("method", "streamed"), [("GET", False), ("PUT", False), ("POST", False), ("POST", True)])
async def test_a_connection_closed_as_it_is_reused_is_retried_when_the_body_is_held(
    serve: Callable[[Handler], Awaitable[Server]], method: str, streamed: bool
) -> None:
    """The app never read a request its reused connection dropped before any byte of an answer: it goes again on a
    new connection, whatever its method, unless its body was a stream (no longer held)."""

    async def drop_the_second(connection: Connection, request: bytes) -> bool:
        if sum(n == connection.number for n, _ in server.requests) == 2:
            return False  # the app closes just as the second request arrives: no answer
        return await answer(connection)

    async def stream() -> AsyncIterator[bytes]:
        yield b"body"

    server = await serve(drop_the_second)
    client = Client(limit=4)
    pool = client.pool("127.0.0.1", server.port, False)
    assert await fetch(client, pool) == b"ok"
    if not streamed:
        assert await fetch(client, pool, method, b"body") == b"ok"
        assert [n for n, _ in server.requests] == [1, 1, 2]
    else:
        with pytest.raises((ServerDisconnectedError, ConnectionError)):
            await fetch(client, pool, method, stream())
        assert [n for n, _ in server.requests] == [1, 1]
    client.close()


@pytest.mark.parametrize("again", [False, True])
async def test_resend_decides_whether_and_with_what_headers_a_request_goes_again(
    serve: Callable[[Handler], Awaitable[Server]], again: bool
) -> None:
    """``resend`` is asked before a dropped request goes once more: False keeps it from the app a second time (a
    single-use assertion), True sends it with the headers as ``resend`` left them."""

    async def drop_the_second(connection: Connection, request: bytes) -> bool:
        if sum(n == connection.number for n, _ in server.requests) == 2:
            return False
        return await answer(connection)

    def resend(headers: CIMultiDict[str]) -> bool:
        headers["X-Try"] = "2"
        return again

    server = await serve(drop_the_second)
    client = Client(limit=4)
    pool = client.pool("127.0.0.1", server.port, False)
    assert await fetch(client, pool) == b"ok"
    headers = CIMultiDict({"X-Try": "1"})
    if again:
        exchange = await client.request(pool, "GET", "/x", "app", headers, None, connect_timeout=1, read_timeout=2,
                                        resend=resend)  # fmt: skip
        async with exchange as got:
            assert await got.body.read() == b"ok"
        assert [n for n, _ in server.requests] == [1, 1, 2] and b"X-Try: 2" in server.requests[-1][1]
    else:
        with pytest.raises((ServerDisconnectedError, ConnectionError)):
            await client.request(pool, "GET", "/x", "app", headers, None, connect_timeout=1, read_timeout=2,
                                 resend=resend)  # fmt: skip
        assert [n for n, _ in server.requests] == [1, 1]
    client.close()


async def test_a_request_whose_answer_began_is_never_retried(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    """A reused connection that breaks after part of an answer came fails: the app may have acted on it."""

    async def half_the_second(connection: Connection, request: bytes) -> bool:
        if sum(n == connection.number for n, _ in server.requests) == 2:
            connection.writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            await connection.writer.drain()
            return False
        return await answer(connection)

    server = await serve(half_the_second)
    client = Client(limit=4)
    pool = client.pool("127.0.0.1", server.port, False)
    assert await fetch(client, pool) == b"ok"
    with pytest.raises((ServerDisconnectedError, ConnectionError)):
        await fetch(client, pool, "GET")
    assert [n for n, _ in server.requests] == [1, 1]
    client.close()


async def test_request_framing(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    server = await serve(lambda connection, request: answer(connection))
    client = Client(limit=1)
    pool = client.pool("127.0.0.1", server.port, False)

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"ab", b"cd", b"ef"):
            yield part

    assert await fetch(client, pool, "GET") == b"ok"
    assert await fetch(client, pool, "POST") == b"ok"
    assert await fetch(client, pool, "POST", b"hello", **{"Content-Length": "99"}) == b"ok"  # ours, not theirs
    assert await fetch(client, pool, "PUT", chunks()) == b"ok"
    assert await fetch(client, pool, "PUT", chunks(), **{"Content-Length": "4"}) == b"ok"  # never past it
    get, post, sized, chunked, clipped = (request for _, request in server.requests)
    assert get.startswith(b"GET /x HTTP/1.1\r\nHost: app\r\n") and b"content-length" not in get.lower()
    assert post.endswith(b"Content-Length: 0\r\n\r\n")
    assert sized.endswith(b"Content-Length: 5\r\n\r\nhello") and b"99" not in sized
    assert b"Transfer-Encoding: chunked" in chunked and chunked.endswith(b"abcdef")
    assert clipped.endswith(b"Content-Length: 4\r\n\r\nabcd")
    client.close()


async def test_a_header_with_a_line_break_is_never_sent(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    server = await serve(lambda connection, request: answer(connection))
    client = Client(limit=1)
    pool = client.pool("127.0.0.1", server.port, False)
    with pytest.raises(ValueError, match="line break"):
        await fetch(client, pool, **{"X-Evil": "a\r\nX-Impersonation-Assertion: forged"})
    assert server.requests == []
    client.close()


async def test_answers_are_framed_by_llhttp(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    async def chunked(connection: Connection, request: bytes) -> bool:
        body = b"" if request.startswith(b"HEAD") else b"3\r\nabc\r\n0\r\n\r\n"  # a HEAD answer has none
        connection.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        await connection.writer.drain()
        return True

    server = await serve(chunked)
    client = Client(limit=1)
    pool = client.pool("127.0.0.1", server.port, False)
    assert await fetch(client, pool) == b"abc"
    assert await fetch(client, pool, "HEAD") == b""
    assert server.connections == 1  # both on one kept-alive connection
    client.close()


async def test_an_https_upstream_is_verified_by_name(tmp_path: Path) -> None:
    """TLS to the app: the certificate must name the upstream's host (here signed by a CA the client trusts)."""
    ca_key, cert_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(ca_name).public_key(cert_key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=True)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    pem = serialization.Encoding.PEM
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "key.pem").write_bytes(
        cert_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    app = Server(lambda connection, request: answer(connection))
    listening = await asyncio.start_server(app.serve, "127.0.0.1", 0, ssl=server_tls)
    port = listening.sockets[0].getsockname()[1]
    client = Client(limit=1)
    client._tls = ssl.create_default_context(cadata=ca.public_bytes(pem).decode())  # the test CA, not the system's
    try:
        assert await fetch(client, client.pool("localhost", port, True)) == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError):  # the certificate does not name 127.0.0.1
            await fetch(client, client.pool("127.0.0.1", port, True))
    finally:
        client.close()
        listening.close()
        await listening.wait_closed()
