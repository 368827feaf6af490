"""The data path as a faithful reverse proxy (DESIGN §7 and §10), proven on real processes over real sockets.

One downstream app process (:mod:`tests.downstream_app`: an aiohttp app that never decodes request bodies,
plus a raw keep-alive server that closes idle connections) and one ``python -m gateway serve`` process on the
session's real redis-server serve the whole module. The gateway routes four apps to them:

- ``switch`` (Denovolab, no mount): the aiohttp app, default timeouts;
- ``hasty`` (mount ``/hasty``): the same app with ``read_timeout_seconds: 0.5``;
- ``patient`` (mount ``/patient``): the same app with ``read_timeout_seconds: 0`` (no read timeout);
- ``raw`` (mount ``/raw``): the raw server.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import random
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from multidict import CIMultiDict

from gateway.assertion import generate_key_file, load_key
from tests import processes
from tests.conftest import RedisServer, free_port, until

ADMIN_TOKEN = "passthrough-admin-token"
DIRECTORY: dict[str, Any] = {
    "apps": {
        "switch": {
            "principals": [{"id": "admin-1", "token": ADMIN_TOKEN, "role": "admin"}],
            "subjects": [{"id": "41", "email": "dn@example.com"}],
        }
    }
}
GRANT_REFUSED = {
    "error_type": "unauthenticated_error",
    "success": False,
    "error": {"message": "The login token is invalid or has expired", "code": 112, "reason": "login_token_invalid"},
}
# What a browser sends to open a WebSocket (for requests made without aiohttp's WebSocket client).
WS_HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}
FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass(frozen=True)
class Stack:
    """The processes of this module: where the gateway and the app listen, and the assertion key."""

    gateway: str  # http://127.0.0.1:port
    gateway_port: int
    app: str  # the downstream aiohttp app, for the test's own control requests
    app_port: int
    public_key: Ed25519PublicKey


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _poll_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Poll ``url`` until it answers 200 (fail with the process's stderr if it dies or the time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"{url} did not become ready: {err[-2000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def downstream() -> Iterator[dict[str, int]]:
    """The downstream app process; its ports, as it printed them."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.downstream_app"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else b""
        assert line, "the downstream app printed no ports"
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, downstream: dict[str, int]
) -> Iterator[Stack]:
    """A real gateway process on the session's redis-server, in front of the downstream app."""
    tmp = tmp_path_factory.mktemp("passthrough")
    key = tmp / "signing.pem"
    generate_key_file(key)
    app = f"http://127.0.0.1:{downstream['http']}"
    apps = {
        "switch": {"dialect": "denovolab", "upstream": app},
        "hasty": {"dialect": "denovolab", "upstream": app, "mount": "/hasty", "read_timeout_seconds": 0.5},
        "patient": {"dialect": "denovolab", "upstream": app, "mount": "/patient", "read_timeout_seconds": 0},
        "raw": {"dialect": "denovolab", "upstream": f"http://127.0.0.1:{downstream['raw']}", "mount": "/raw"},
    }
    port = free_port()
    config = processes.write_config(
        tmp, redis_server.url, port, apps=apps, directory=DIRECTORY, prefix=f"pt{uuid.uuid4().hex[:8]}:",
        assertion={"private_key_file": str(key)},
    )  # fmt: skip
    proc = processes.start(config)
    try:
        _poll_http_ok(f"http://127.0.0.1:{port}/readyz", proc)
        public = load_key(key).public_key()
        yield Stack(f"http://127.0.0.1:{port}", port, app, downstream["http"], public)
    finally:
        processes.stop(proc)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
        yield client


async def _mint(session: aiohttp.ClientSession, stack: Stack) -> str:
    """A Denovolab portal login grant for client 41."""
    headers = {"X-Auth-Token": ADMIN_TOKEN}
    async with session.post(stack.gateway + "/v1/auth/as_client", json={"client_id": 41}, headers=headers) as r:
        assert r.status == 200, await r.text()
        token: str = (await r.json())["token"]
    return token


async def _exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()


def _parse(raw: bytes) -> tuple[str, CIMultiDict[str], bytes]:
    """Status line, headers and body of a raw HTTP/1.x answer (body as received, not de-chunked)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return status, headers, body


async def _closed_by_client(session: aiohttp.ClientSession, stack: Stack, ws_id: str) -> dict[str, Any]:
    """How the app saw WebSocket ``ws_id`` end (polled until it has ended)."""

    async def seen() -> dict[str, Any] | None:
        async with session.get(f"{stack.app}/ws-closed/{ws_id}") as r:
            if r.status != 200:
                return None
            found: dict[str, Any] = await r.json()
            return found

    found: dict[str, Any] = await until("the app to see the WebSocket end", seen)
    return found


# -- 1. WebSockets ------------------------------------------------------------------------------------------
async def test_websocket_mirrors_the_apps_subprotocol_and_forwards_handshake_headers(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """The client sees the subprotocol the app chose; Origin and Cookie reach the app's handshake, a client-sent
    X-Impersonation-Assertion (in any spelling) does not."""
    ws_id = uuid.uuid4().hex
    headers = {
        "Origin": "https://portal.example",
        "Cookie": "sid=abc123; theme=dark",
        "X-Impersonation-Assertion": "forged.assertion.value",
        "X_Impersonation_Assertion": "forged.assertion.value",
    }
    async with session.ws_connect(f"{stack.gateway}/ws?id={ws_id}", protocols=("v1", "v2"), headers=headers) as ws:
        assert ws.protocol == "v2"
        hello = json.loads(await ws.receive_str(timeout=5))
        await ws.close()
    assert hello["protocol"] == "v2"
    assert hello["target"] == f"/ws?id={ws_id}"
    seen: CIMultiDict[str] = CIMultiDict(hello["headers"])
    assert seen.getall("Origin") == ["https://portal.example"]
    assert seen.getall("Cookie") == ["sid=abc123; theme=dark"]
    assert [p.strip() for v in seen.getall("Sec-WebSocket-Protocol") for p in v.split(",")] == ["v1", "v2"]
    assert "X-Impersonation-Assertion" not in seen
    assert "X_Impersonation_Assertion" not in seen
    assert "forged" not in json.dumps(hello)


async def test_websocket_relays_text_binary_and_ping(stack: Stack, session: aiohttp.ClientSession) -> None:
    """Text and a binary message larger than 4 MiB come back intact; a ping's payload comes back in the pong."""
    big = random.Random(1).randbytes(5 * 1024 * 1024 + 7)
    async with session.ws_connect(f"{stack.gateway}/ws", autoping=False, max_msg_size=0) as ws:
        await ws.receive_str(timeout=5)  # the app's account of the handshake
        await ws.send_str("héllo ✓ wörld")
        assert await ws.receive_str(timeout=5) == "héllo ✓ wörld"
        await ws.send_bytes(big)
        echoed = await ws.receive(timeout=10)
        assert echoed.type is WSMsgType.BINARY
        assert len(echoed.data) == len(big)
        assert echoed.data == big
        await ws.ping(b"ping-payload-42")
        pong = await ws.receive(timeout=5)
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"ping-payload-42")
        await ws.close()


async def test_websocket_apps_close_code_and_reason_reach_the_client(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """The app closes with 4404 "document deleted": the client sees exactly that code and reason."""
    async with session.ws_connect(f"{stack.gateway}/ws") as ws:
        await ws.receive_str(timeout=5)
        await ws.send_str("close-4404")
        closing = await ws.receive(timeout=5)
        assert (closing.type, closing.data, closing.extra) == (WSMsgType.CLOSE, 4404, "document deleted")
        assert ws.close_code == 4404


async def test_websocket_clients_close_code_reaches_the_app(stack: Stack, session: aiohttp.ClientSession) -> None:
    """The client closes with 4001 and a reason: the app's close frame carries both."""
    ws_id = uuid.uuid4().hex
    async with session.ws_connect(f"{stack.gateway}/ws?id={ws_id}") as ws:
        await ws.receive_str(timeout=5)
        await ws.close(code=4001, message=b"client leaving")
    assert await _closed_by_client(session, stack, ws_id) == {"by": "client", "code": 4001, "reason": "client leaving"}


async def test_websocket_refused_by_the_app_is_relayed_without_upgrade(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """The app answers the handshake 403: the client gets that 403 with the app's headers, never a 101. (aiohttp's
    client drops the refusal's body, so the relayed answer is empty, and says so.)"""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(f"{stack.gateway}/ws-refuse")
    assert refused.value.status == 403
    async with session.get(f"{stack.gateway}/ws-refuse", headers=WS_HANDSHAKE) as r:
        assert r.status == 403
        assert r.headers["X-Refused"] == "yes"
        assert "Upgrade" not in r.headers
        assert "Sec-WebSocket-Accept" not in r.headers
        assert r.headers.get("Content-Length") == "0"
        assert await asyncio.wait_for(r.read(), 10) == b""


# -- 2. A WebSocket handshake carrying a grant ---------------------------------------------------------------
async def test_websocket_handshake_with_a_grant_is_a_redemption(stack: Stack, session: aiohttp.ClientSession) -> None:
    """``?token=<grant>`` on a handshake redeems it: the app's handshake carries a valid assertion for the grant's
    subject and no token; the same grant on a second handshake gets the dialect's 401 and no upgrade."""
    grant = await _mint(session, stack)
    ws_id = uuid.uuid4().hex
    async with session.ws_connect(f"{stack.gateway}/ws?token={grant}&id={ws_id}") as ws:
        hello = json.loads(await ws.receive_str(timeout=5))
        await ws.send_str("still bridged")
        assert await ws.receive_str(timeout=5) == "still bridged"
        await ws.close()
    assert hello["target"] == f"/ws?id={ws_id}"
    assert grant not in json.dumps(hello)
    seen: CIMultiDict[str] = CIMultiDict(hello["headers"])
    assert len(seen.getall("X-Impersonation-Assertion")) == 1
    claims = jwt.decode(
        seen["X-Impersonation-Assertion"], stack.public_key, algorithms=["EdDSA"], audience="switch",
        issuer=stack.gateway,
    )  # fmt: skip
    assert claims["sub"] == "41"
    assert claims["act"] == {"sub": "admin-1", "role": "admin"}

    async with session.get(f"{stack.gateway}/ws?token={grant}&id={ws_id}", headers=WS_HANDSHAKE) as r:
        assert r.status == 401
        assert "Upgrade" not in r.headers
        assert json.loads(await r.read()) == GRANT_REFUSED
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(f"{stack.gateway}/ws?token={grant}")
    assert refused.value.status == 401


# -- 3. Server-sent events -----------------------------------------------------------------------------------
async def test_event_stream_is_relayed_as_written(stack: Stack, session: aiohttp.ClientSession) -> None:
    """The first event reaches the client while the app still holds the stream open (it waits for our go-ahead):
    nothing of the second is there yet, and the stream has not ended."""
    sse_id = uuid.uuid4().hex
    async with session.get(f"{stack.gateway}/sse?id={sse_id}") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["Cache-Control"] == "no-cache"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
        assert first == b"id: 1\ndata: first\n\n"
        assert (r.content.read_nowait(), r.content.is_eof()) == (b"", False)  # a relay that held it back fails here
        async with session.post(f"{stack.app}/release/{sse_id}") as go:
            assert go.status == 200
        assert await asyncio.wait_for(r.content.read(), 10) == b"id: 2\ndata: second\n\n"


# -- 4. Per-app timeouts -------------------------------------------------------------------------------------
async def test_read_timeout_answers_504(stack: Stack, session: aiohttp.ClientSession) -> None:
    """An app that pauses longer than its read_timeout_seconds (0.5) gets the client a 504 long before the app
    would have answered; a shorter pause is answered."""
    async with session.get(f"{stack.gateway}/hasty/pause?seconds=0.1") as r:
        assert (r.status, await r.text()) == (200, "slept 0.1")
    started = time.monotonic()
    async with session.get(f"{stack.gateway}/hasty/pause?seconds=30") as r:
        assert r.status == 504
        assert "slept" not in await r.text()
    # The bound is far above 0.5 s, so that a loaded machine passes, and far below 30 s: the timeout fired.
    assert time.monotonic() - started < 10


async def test_read_timeout_zero_waits_as_long_as_the_app_takes(stack: Stack, session: aiohttp.ClientSession) -> None:
    """read_timeout_seconds 0 is no read timeout: a 2-second pause is relayed."""
    async with session.get(f"{stack.gateway}/patient/pause?seconds=2") as r:
        assert (r.status, await r.text()) == (200, "slept 2.0")


# -- 5. Bodies byte for byte ---------------------------------------------------------------------------------
def _gzip_body(valid: bool, size: int) -> bytes:
    if valid:
        return gzip.compress(random.Random(size).randbytes(size))
    return b"\x1f\x8b\x08\x00" + b"this is not a deflate stream" * (size // 28 + 1)


@pytest.mark.parametrize("size", [2_000, 300_000], ids=["small", "large"])
@pytest.mark.parametrize("valid", [True, False], ids=["valid-gzip", "invalid-gzip"])
async def test_gzip_body_reaches_the_app_byte_for_byte(
    stack: Stack, session: aiohttp.ClientSession, valid: bool, size: int
) -> None:
    """A body sent with Content-Encoding: gzip (valid or not, below and above the body limit) reaches the app
    untouched: same bytes, same Content-Encoding, same Content-Length."""
    payload = _gzip_body(valid, size)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with session.post(f"{stack.gateway}/echo", data=payload, headers=headers) as r:
        assert r.status == 200, await r.text()
        seen = await r.json()
    received: CIMultiDict[str] = CIMultiDict(seen["headers"])
    assert (seen["length"], seen["sha256"]) == (len(payload), _sha(payload))
    assert received.getall("Content-Encoding") == ["gzip"]
    assert received.getall("Content-Length") == [str(len(payload))]
    assert received.getall("Content-Type") == ["application/json"]


async def test_chunked_upload_of_20_mb_arrives_complete(stack: Stack, session: aiohttp.ClientSession) -> None:
    """A 20 MB upload sent with Transfer-Encoding: chunked reaches the app whole."""
    data = random.Random(20).randbytes(20 * 1000 * 1000)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 256 * 1024):
            yield data[start : start + 256 * 1024]

    headers = {"Content-Type": "application/octet-stream"}
    async with session.post(f"{stack.gateway}/echo", data=chunks(), headers=headers) as r:
        assert r.status == 200, await r.text()
        seen = await r.json()
    assert (seen["length"], seen["sha256"]) == (len(data), _sha(data))


@pytest.mark.parametrize("size", [1_000, 200_000], ids=["small", "large"])
async def test_expect_100_continue(stack: Stack, size: int) -> None:
    """A client that sends Expect: 100-continue gets 100 Continue before it sends the body, then the app's
    answer; the body reaches the app whole."""
    body = random.Random(size).randbytes(size)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway_port)
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % size
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    status, headers, answer = _parse(raw)
    assert status == "HTTP/1.1 200 OK"
    assert len(answer) == int(headers["Content-Length"])
    seen = json.loads(answer)
    assert (seen["length"], seen["sha256"]) == (size, _sha(body))


@pytest.mark.parametrize(
    ("content_type", "payload"),
    [
        ("application/octet-stream", bytes(range(256)) * 64),
        ("text/csv; charset=utf-8", b"token,user_token\r\nabcdefghijklmnopqrstuvwxyz012345,x\r\n"),
        ("multipart/form-data; boundary=XyZ", b'--XyZ\r\nContent-Disposition: form-data; name="token"\r\n\r\n'
         b"abcdefghijklmnopqrstuvwxyz012345\r\n--XyZ--\r\n"),
        ("application/json", b'{"broken json": '),
        ("application/x-www-form-urlencoded", b"%%%=&&=%zz&token"),
    ],
    ids=["octet-stream", "csv", "multipart", "truncated-json", "malformed-form"],
)  # fmt: skip
async def test_opaque_bodies_reach_the_app_untouched(
    stack: Stack, session: aiohttp.ClientSession, content_type: str, payload: bytes
) -> None:
    """A body the gateway has no business reading arrives as sent, with its Content-Type and Content-Length."""
    async with session.post(f"{stack.gateway}/echo", data=payload, headers={"Content-Type": content_type}) as r:
        assert r.status == 200, await r.text()
        seen = await r.json()
    received: CIMultiDict[str] = CIMultiDict(seen["headers"])
    assert (seen["length"], seen["sha256"]) == (len(payload), _sha(payload))
    assert received.getall("Content-Type") == [content_type]
    assert received.getall("Content-Length") == [str(len(payload))]


# -- 6. Answers ----------------------------------------------------------------------------------------------
async def test_status_location_and_every_set_cookie_are_relayed(stack: Stack, session: aiohttp.ClientSession) -> None:
    """A 302 with a Location and three Set-Cookie headers reaches the client as the app sent it."""
    async with session.get(f"{stack.gateway}/cookies", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers.getall("Location") == ["/elsewhere?from=cookies"]
        assert r.headers.getall("Set-Cookie") == [
            "a=1; Path=/",
            "b=2; Path=/app; HttpOnly",
            "c=3; Max-Age=60; Secure; SameSite=Lax",
        ]
        assert await r.read() == b"moved"


@pytest.mark.parametrize(
    ("path", "body"),
    [("/small", b"a small answer\n"), ("/streamed", b"".join(b"piece %d\n" % i for i in range(5)))],
    ids=["small", "streamed"],
)
async def test_http_1_0_client_gets_a_complete_answer(stack: Stack, path: str, body: bytes) -> None:
    """An HTTP/1.0 client (no Host, no keep-alive) gets the app's status, headers and whole body, delimited by
    Content-Length or by the end of the connection, never chunked."""
    raw = await _exchange(stack.gateway_port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
    status, headers, answer = _parse(raw)
    assert status.split(" ", 2)[1:] == ["200", "OK"]
    assert status.startswith("HTTP/1.")
    assert "Transfer-Encoding" not in headers
    assert headers["X-App"] == path.strip("/")
    assert answer == body
    if "Content-Length" in headers:
        assert headers["Content-Length"] == str(len(body))


# -- 7. Idle pooled connections ------------------------------------------------------------------------------
async def test_idle_connection_the_app_closed_is_not_a_502(stack: Stack, session: aiohttp.ClientSession) -> None:
    """The raw app answers with keep-alive and then closes the connection: the next request, a POST that can't be
    retried blindly, still gets the app's answer, round after round."""

    async def closed() -> bool:
        async with session.get(f"{stack.app}/raw-stats") as r:
            stats = await r.json()
        return bool(stats["requests"] > 0 and stats["closed"] >= stats["requests"])

    for n in range(3):
        async with session.get(f"{stack.gateway}/raw/first?n={n}") as r:
            assert (r.status, await r.text()) == (200, f"GET /first?n={n} 0 {_sha(b'')[:16]}")
        await until("the raw app to close every connection", closed)
        body = f"round {n}".encode()
        async with session.post(f"{stack.gateway}/raw/second", data=body) as r:
            assert (r.status, await r.text()) == (200, f"POST /second {len(body)} {_sha(body)[:16]}")
        await until("the raw app to close every connection", closed)


# -- 8. Request headers --------------------------------------------------------------------------------------
async def test_client_headers_reach_the_app_unchanged_but_for_what_a_proxy_must_change(stack: Stack) -> None:
    """Every client header reaches the app with its value, order and repetitions, except Host (the upstream's),
    hop-by-hop headers (and those named in Connection), names with "_", X-Impersonation-Assertion; the client's
    X-Forwarded-* (not a trusted proxy) are replaced by the gateway's own."""
    passed = [
        ("User-Agent", "curl/8.5.0"),
        ("Accept", "*/*"),
        ("Accept-Encoding", "gzip, br"),
        ("X-Multi", "one"),
        ("Authorization", "Bearer abc.def"),
        ("x-lower-case", "Value With  Spaces"),
        ("X-Multi", "two"),
        ("Cookie", "a=1"),
        ("If-None-Match", '"etag-1"'),
        ("Cookie", "b=2"),
    ]
    dropped = [
        ("Connection", "close, X-Hop"),
        ("X-Hop", "named in Connection"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Sum"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Connection", "keep-alive"),
        ("X_Under", "underscore"),
        ("X-Impersonation-Assertion", "forged"),
        ("x-impersonation-assertion", "forged-again"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
    ]
    lines = [("Host", "portal.example:8443"), *passed[:5], *dropped[:7], *passed[5:], *dropped[7:]]
    head = "".join(f"{n}: {v}\r\n" for n, v in lines)
    raw = await _exchange(stack.gateway_port, f"GET /echo?q=1&x=%20y;z HTTP/1.1\r\n{head}\r\n".encode())
    status, _, answer = _parse(raw)
    assert status == "HTTP/1.1 200 OK"
    seen = json.loads(answer)
    assert seen["target"] == "/echo?q=1&x=%20y;z"
    received = [(n.lower(), v) for n, v in seen["headers"]]
    assert [h for h in received if h[0] != "host" and h[0] not in FORWARDED] == [(n.lower(), v) for n, v in passed]
    assert [v for n, v in received if n == "host"] == [f"127.0.0.1:{stack.app_port}"]
    assert [(n, v) for n, v in received if n in FORWARDED] == [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "portal.example:8443"),
    ]
