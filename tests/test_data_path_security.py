"""Security regressions on the data path: one test (or a few) per finding of the black-box security probe.

Each test drives the gateway the way the probe did (raw bytes on a socket wherever aiohttp's client would
normalise what is sent) and asserts exactly what the app behind it received, using :class:`Sink`, a raw
asyncio HTTP/1.1 upstream that records the bytes and the requests it parses and, like many non-aiohttp
servers, neither decodes request bodies nor waits for the body of ``/__early*`` requests before answering.

1. request smuggling through ``Content-Encoding`` (and the gzip amplification of the same cause);
2. no grant or credential in any output of a real gateway process fed malformed requests;
3. unfinished bodies are bounded in time and hold no upstream connection while they trickle;
4. the upstream URL comes from parsed parts (absolute-form targets, encoded mounts, dot-segments);
5. underscore header spellings and forwarding headers, from untrusted clients and from a trusted proxy;
6. carrier corner cases where a live grant must never reach an app;
7. link grants and unusual methods, the confirmation page's form, operations paths on an app's host.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import fakeredis
import jwt
import orjson
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from gateway.app import create_app
from gateway.config import config_from_dict
from gateway.directory import parse_directory
from gateway.store import Store
from tests.conftest import KEY, PUBLIC_URL, free_port, until
from tests.processes import stop, wait_ready, write_config

# -- the directory: one app per dialect, as in the demo ------------------------------------------------------
AP_MANAGER = "vY5fwetestK3gJXZH5uHCw"
AP_EMAIL = "example@activeplatform.com"
AP_SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"
PY_ADMIN = "pyramid-enterprise-admin-token"
PY_MINT = "/API3/authentication/authenticateUserByToken"
DN_ADMIN = "denovolab-demo-admin-token"
BTC_PARTNER = "btcdirect-partner-demo-token"
BTC_IDENTIFIER = "7c3f9a1e2b4d6f8091a3c5e7f9b1d3e5a7c9e1f3"
BTC_UUID = "45b9313b-fa47-4786-baf1-62969dec31f2"
BTC_LOGIN = "/api/v2/user/login-with-token"
FORM = "application/x-www-form-urlencoded"
CONFIRM = b"impersonation_confirm=1"

DIRECTORY: dict[str, Any] = {
    "apps": {
        "control-panel": {
            "resellers": [{"id": 1}],
            "principals": [{"id": "mgr-1", "token": AP_MANAGER, "role": "admin", "reseller": 1}],
            "subjects": [{"id": "505", "email": AP_EMAIL, "reseller": 1}],
        },
        "analytics": {
            "principals": [{"id": "ea-1", "token": PY_ADMIN, "role": "enterprise_admin"}],
            "subjects": [{"id": "jdoe", "domain": "sales.example.com", "email": "jdoe@example.com"}],
        },
        "switch": {
            "principals": [{"id": "admin-1", "token": DN_ADMIN, "role": "admin"}],
            "subjects": [{"id": "41", "email": "dn@example.com", "name": "DN Nguyen"}],
        },
        "exchange": {
            "principals": [{"id": "partner-1", "token": BTC_PARTNER, "role": "partner"}],
            "subjects": [{"id": "u-1", "uuid": BTC_UUID, "identifiers": [BTC_IDENTIFIER], "email": "a@example.com"}],
        },
    }
}
DIALECTS = {"control-panel": "activeplatform", "analytics": "pyramid", "switch": "denovolab", "exchange": "btcdirect"}
SHAPED = re.compile(r"[A-Za-z0-9_-]{32}")


def demo_apps(upstream: str, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The demo's four apps on one route (no hosts, no mounts), all on ``upstream``."""
    return {name: {"dialect": d, "upstream": upstream, **overrides.get(name, {})} for name, d in DIALECTS.items()}


# -- a raw upstream --------------------------------------------------------------------------------------------
@dataclass
class Seen:
    """One request as the upstream parsed it: its exact head bytes and the body bytes it took for it."""

    conn: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    head: bytes
    body: bytes = b""
    complete: bool = True

    def get(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def one(self, name: str) -> str:
        values = self.get(name)
        assert len(values) == 1, f"{self.method} {self.target}: {name} {values}, headers {self.headers}"
        return values[0]

    @property
    def raw(self) -> bytes:
        return self.head + self.body


@dataclass
class Sink:
    """An HTTP/1.1 upstream on a raw socket. It never decodes a body; it answers ``/__early*`` requests before
    reading their body (then reads and discards it on the kept-alive connection); it records every request it
    parses, and how many connections it accepted and still has open."""

    requests: list[Seen] = field(default_factory=list)
    accepted: int = 0
    open: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> Sink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def close(self) -> None:
        """Stop listening and close every connection; each handler then ends on its own (end of file)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.accepted += 1
        self.open += 1
        conn = self.accepted
        try:
            while await self._one(conn, reader, writer):
                pass
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def _one(self, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        line, *lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = line.split(" ", 2)
        headers = [(n.strip(), v.strip()) for n, _, v in (h.partition(":") for h in lines)]
        seen = Seen(conn, method, target, headers, head)
        early = target.startswith("/__early")
        if early:
            await self._answer(writer, seen, len(self.requests))
        try:
            if any("chunked" in v.lower() for v in seen.get("Transfer-Encoding")):
                seen.body = await _read_chunked(reader)
            elif seen.get("Content-Length"):
                seen.body = await reader.readexactly(int(seen.get("Content-Length")[0]))
        except asyncio.IncompleteReadError as exc:
            seen.body, seen.complete = exc.partial, False
            self.requests.append(seen)
            return False
        self.requests.append(seen)
        if not early:
            await self._answer(writer, seen, len(self.requests) - 1)
        return True

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, seen: Seen, index: int) -> None:
        body = orjson.dumps({"n": index, "target": seen.target})
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + (b"" if seen.method == "HEAD" else body))
        await writer.drain()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server = await Sink().start()
    yield server
    await server.close()


# -- a gateway in this process, and raw requests to it -----------------------------------------------------------
GatewayMaker = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def gw(aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], prefix: str) -> GatewayMaker:
    """``await gw(apps, **config sections)`` -> a test client on a gateway with DIRECTORY on fakeredis."""

    async def make(apps: dict[str, dict[str, Any]], **sections: Any) -> TestClient[Any, Any]:
        raw = {
            "server": {"public_url": PUBLIC_URL, **sections.pop("server", {})},
            "store": {"url": "embedded", "prefix": prefix},
            "apps": apps,
            **sections,
        }
        redis = fakeredis.FakeAsyncRedis()
        await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
        return await aiohttp_client(create_app(config_from_dict(raw), redis=redis, key=KEY))

    return make


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def message(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    host: str = "gateway.test",
    close: bool = True,
) -> bytes:
    """A request's bytes, exactly as given (a Content-Length is added when there is a body and none was given)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{n}: {v}" for n, v in headers)]
    if body and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> Answer | None:
    """One response (framed by Content-Length, chunks or end of file); None when the connection closed first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise AssertionError(f"a partial response: {exc.partial!r}") from None
        return None
    line, *lines = head[:-4].decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict((n.strip(), v.strip()) for n, _, v in (h.partition(":") for h in lines))
    status = int(line.split(" ", 2)[1])
    if head_only or status in (204, 304):
        body = b""
    elif "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = await _read_chunked(reader)
    elif "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    else:
        body = await reader.read()
    return Answer(status, headers, body)


async def send(port: int, data: bytes, *, head_only: bool = False, timeout: float = 15) -> Answer | None:
    """Send ``data`` on a new connection and read one response (``timeout`` bounds a failure, not a passing run)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_answer(reader, head_only=head_only), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def ask(port: int, data: bytes, *, head_only: bool = False) -> Answer:
    answer = await send(port, data, head_only=head_only)
    assert answer is not None, "the gateway closed the connection without an answer"
    return answer


def port_of(client: TestClient[Any, Any]) -> int:
    assert client.port is not None
    return client.port


# -- minting ----------------------------------------------------------------------------------------------------
async def mint_link(client: Any) -> str:
    """An ActivePlatform grant (its link carries ``user_email`` beside it)."""
    response = await client.get(AP_SEED, headers={"X-Api-Token": AP_MANAGER})
    assert response.status == 200, await response.text()
    body = await response.json(content_type=None)
    assert body["owner_email"] == AP_EMAIL
    return str(body["owner_token"])


async def mint_pyramid(client: Any) -> str:
    response = await client.post(PY_MINT, json={"token": PY_ADMIN, "userIdentity": "jdoe"})
    assert response.status == 200, await response.text()
    return str(await response.text())


async def mint_denovolab(client: Any) -> tuple[str, str]:
    """The portal token and the cdr API token of client 41."""
    response = await client.post("/v1/auth/as_client", json={"client_id": "41"}, headers={"X-Auth-Token": DN_ADMIN})
    assert response.status == 200, await response.text()
    body = await response.json()
    return str(body["token"]), str(body["cdr_api_token"])


async def mint_btc(client: Any) -> str:
    headers = {"Authorization": f"Bearer {BTC_PARTNER}", "User-Identifier": BTC_IDENTIFIER}
    response = await client.get("/api/v1/user/login-token", headers=headers)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["uuid"] == BTC_UUID
    return str(body["token"])


def claims(seen: Seen, audience: str) -> dict[str, Any]:
    """The verified claims of the one assertion ``seen`` carries."""
    decoded: dict[str, Any] = jwt.decode(
        seen.one("X-Impersonation-Assertion"), KEY.public_key(), algorithms=["EdDSA"], audience=audience,
        issuer=PUBLIC_URL,
    )  # fmt: skip
    return decoded


def assert_never_upstream(sink: Sink, *tokens: str) -> None:
    for seen in sink.requests:
        for token in tokens:
            assert token.encode() not in seen.raw, f"a grant reached the app in {seen.method} {seen.target}"


def link(token: str, path: str = "/welcome", *, name: str = "user_token", sep: str = "&") -> str:
    return f"{path}?user_email=example%40activeplatform.com{sep}{name}={token}"


# == 1. Request smuggling through Content-Encoding ===============================================================
def gzip_with_gap(payload: bytes, total: int) -> bytes:
    """A gzip member of ``total`` bytes that inflates to ``payload`` (padded with an FEXTRA field)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = compressor.compress(payload) + compressor.flush()
    trailer = struct.pack("<II", zlib.crc32(payload), len(payload))
    extra = total - (12 + len(deflated) + len(trailer))
    return b"\x1f\x8b\x08\x04\0\0\0\0\x00\xff" + struct.pack("<H", extra) + b"X" * extra + deflated + trailer


SMUGGLED = (
    b"GET /__smuggled HTTP/1.1\r\nHost: internal-admin.example\r\nX-Impersonation-Assertion: forged.assertion.value\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nContent-Length: 0\r\n\r\n"
)
CAPTURE = b"POST /__early/capture HTTP/1.1\r\nHost: internal-admin.example\r\nContent-Length: 700\r\n\r\n"


async def test_content_encoding_cannot_smuggle_a_request_to_the_upstream(gw: GatewayMaker, sink: Sink) -> None:
    """A gzip body that inflates short reaches the app as sent, so the next request on the connection stays whole."""
    client = await gw({"switch": {"dialect": "denovolab", "upstream": sink.url}},
                      server={"trusted_proxies": ["127.0.0.1/32"]})  # fmt: skip
    port = port_of(client)

    def carrier(inner: bytes) -> bytes:  # request B: its body is a raw request
        return message("POST", "/normal", [("Content-Type", "text/plain")], inner)

    # Dry runs measure B's header block as the gateway forwards it: the gap the old gateway left in A's body.
    gaps = {}
    for inner in (SMUGGLED, CAPTURE):
        assert (await ask(port, carrier(inner))).status == 200
        gaps[inner] = len(sink.requests[-1].head)
    sent: list[bytes] = []
    for inner in (SMUGGLED, CAPTURE):
        body = gzip_with_gap(b"x", 1 + gaps[inner])
        sent.append(body)
        answer_a = await ask(port, message("POST", "/__early/A", [("Content-Encoding", "gzip")], body))
        assert answer_a.status == 200 and answer_a.json()["target"] == "/__early/A"
        answer_b = await ask(port, carrier(inner))
        assert answer_b.status == 200 and answer_b.json()["target"] == "/normal"
    # A victim's redemption next: its assertion must go out as its own request, never as another's body.
    _, cdr = await mint_denovolab(client)
    victim = await ask(port, message("GET", "/cdr/victim-data", [("X-Auth-Token", cdr)]))
    assert victim.status == 200 and victim.json()["target"] == "/cdr/victim-data"

    targets = [s.target for s in sink.requests]
    assert targets == ["/normal", "/normal", "/__early/A", "/normal", "/__early/A", "/normal", "/cdr/victim-data"]
    assert all(s.complete for s in sink.requests)
    for seen, body in zip([s for s in sink.requests if s.target == "/__early/A"], sent, strict=True):
        assert seen.body == body  # byte for byte, still compressed
        assert (seen.one("Content-Length"), seen.one("Content-Encoding")) == (str(len(body)), "gzip")
    for seen in sink.requests:
        if seen.target == "/normal":
            assert seen.body in (SMUGGLED, CAPTURE)
            assert seen.one("Content-Length") == str(len(seen.body))
    redeemed = sink.requests[-1]
    assert claims(redeemed, "switch")["sub"] == "41"
    assertion = redeemed.one("X-Impersonation-Assertion").encode()
    assert all(assertion not in s.body for s in sink.requests)
    assert all(b"forged.assertion.value" not in s.head for s in sink.requests)


async def test_chunked_gzip_body_is_not_inflated_on_the_way(gw: GatewayMaker, sink: Sink) -> None:
    """A chunked gzip body (a small bomb) reaches the app compressed, as sent, not inflated by the gateway."""
    client = await gw({"switch": {"dialect": "denovolab", "upstream": sink.url}})
    body = gzip.compress(b"\0" * (8 << 20))
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096]) for i in range(0, len(body), 4096)
    )
    headers = [("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")]
    answer = await ask(port_of(client), message("POST", "/upload", headers, chunks + b"0\r\n\r\n"))
    assert answer.status == 200
    (seen,) = sink.requests
    assert seen.body == body
    assert seen.one("Content-Encoding") == "gzip"


# == 2. No secret in any output ==================================================================================
async def test_malformed_requests_put_no_secret_in_any_output(tmp_path: Path, sink: Sink) -> None:
    """A real gateway process refusing malformed requests that hold grants and credentials logs none of them."""
    port = free_port()
    config = write_config(tmp_path, "embedded", port, apps=demo_apps(sink.url), directory=DIRECTORY)
    out_path, err_path = tmp_path / "gateway.out", tmp_path / "gateway.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                                stdout=out, stderr=err)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc)
        async with aiohttp.ClientSession(base_url=url) as session:
            ap_1, ap_2 = await mint_link(session), await mint_link(session)
            pyramid = await mint_pyramid(session)
            _, cdr = await mint_denovolab(session)
        email = "example%40activeplatform.com"
        malformed = [
            f"GET {AP_SEED} HTTP/1.1\r\nHost: x\r\nX-Api-Token: {AP_MANAGER}\x01\r\n\r\n",
            f"GET /?user_email={email}&user_token={ap_1} HTTP/1.2\r\nHost: x\r\n\r\n",
            f"GET /?user_email={email}&user_token={ap_2}\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
            f"GET /reports HTTP/1.1\r\nHost: x\r\nCookie: PyramidAuth={pyramid}; a=\x00\r\n\r\n",
            f"GET /cdr HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {cdr}\x01\r\n\r\n",
            f"GET /cdr HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {DN_ADMIN}\rX: y\r\n\r\n",
            f"GET /api/v1/user/login-token HTTP/1.1\r\nHost: x\r\nUser-Identifier: {BTC_IDENTIFIER}\r\n"
            f"Authorization: Bearer {BTC_PARTNER} {'A' * 9000}\r\n\r\n",
        ]
        for raw in malformed:
            answer = await ask(port, raw.encode("latin-1"))
            assert answer.status == 400, raw[:60]
    finally:
        stop(proc)
    assert sink.requests == []
    stdout, stderr = out_path.read_bytes(), err_path.read_bytes()
    for secret in (ap_1, ap_2, pyramid, cdr, AP_MANAGER, DN_ADMIN, BTC_PARTNER):
        for piece in (secret, secret[:12]):
            assert piece.encode() not in stdout, f"{piece} in stdout"
            assert piece.encode() not in stderr, f"{piece} in stderr: {stderr[-3000:]!r}"
    events = [orjson.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
    assert sum(e.get("event") == "bad_request" for e in events) == len(malformed)  # one each
    assert proc.returncode == 0


# == 3. Unfinished bodies are bounded ============================================================================
async def wait_until(what: str, condition: Callable[[], bool]) -> None:
    """:func:`tests.conftest.until` for a plain condition."""

    async def check() -> bool:
        return condition()

    await until(what, check)


# How soon a stalled body is cut: far above the body timeouts these tests set (1 or 2 s), so that a loaded machine
# passes, and far below the 30 s default, so that a pass shows the configured timeout fired.
CUT_WITHIN = 10


async def test_an_unfinished_pass_through_body_is_cut_and_its_upstream_connection_released(
    gw: GatewayMaker, sink: Sink
) -> None:
    """A pass-through POST that promises 100 kB and sends 10 bytes gets a 408 within seconds; its upstream
    connection is closed."""
    client = await gw(demo_apps(sink.url), server={"body_timeout_seconds": 1})
    start = time.monotonic()
    data = message("POST", "/__discard", [("Content-Length", "100000")], close=False) + b"0123456789"
    answer = await send(port_of(client), data)
    assert time.monotonic() - start < CUT_WITHIN
    assert answer is None or answer.status == 408
    await wait_until("the upstream connection to close", lambda: sink.open == 0)
    assert sink.accepted <= 1
    assert [(s.target, s.body, s.complete) for s in sink.requests] in ([], [("/__discard", b"0123456789", False)])


async def test_an_unfinished_mint_body_is_a_408_in_the_dialect_shape(gw: GatewayMaker, sink: Sink) -> None:
    """A Pyramid mint POST that promises 1000 bytes and sends 10 gets Pyramid's text/plain 408 within seconds."""
    client = await gw(demo_apps(sink.url), server={"body_timeout_seconds": 1})
    start = time.monotonic()
    headers = [("Content-Type", "application/json"), ("Content-Length", "1000")]
    answer = await ask(port_of(client), message("POST", PY_MINT, headers, close=False) + b'{"token": ')
    assert time.monotonic() - start < CUT_WITHIN
    assert answer.status == 408
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert answer.body == b"Request body not received in time"
    assert sink.accepted == 0


async def test_a_small_slow_body_holds_no_upstream_connection(gw: GatewayMaker, sink: Sink) -> None:
    """A small body trickling in takes no upstream connection until it is whole; one that stalls never takes one."""
    # 2 s: the trickle (about 0.5 s) must arrive whole within the body timeout, on a loaded machine too.
    client = await gw(demo_apps(sink.url), server={"body_timeout_seconds": 2})
    port = port_of(client)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(message("POST", "/upload", [("Content-Length", "40")]))
        for piece in (b"a" * 10, b"b" * 10, b"c" * 10):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.15)
            assert sink.accepted == 0, "an upstream connection was taken before the body arrived"
        writer.write(b"d" * 10)
        answer = await asyncio.wait_for(read_answer(reader), 15)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer is not None and answer.status == 200
    (seen,) = sink.requests
    assert (seen.target, seen.body) == ("/upload", b"a" * 10 + b"b" * 10 + b"c" * 10 + b"d" * 10)
    start = time.monotonic()
    stalled = await send(port, message("POST", "/upload", [("Content-Length", "40")], close=False) + b"a" * 10)
    assert time.monotonic() - start < CUT_WITHIN
    assert stalled is None or stalled.status == 408
    assert sink.accepted == 1 and len(sink.requests) == 1


async def test_a_request_head_that_trickles_in_and_an_idle_connection_are_closed(tmp_path: Path, sink: Sink) -> None:
    """A slow-loris client (a byte of its head now and then) is cut once ``server.keepalive_seconds`` have passed
    since it connected (or since its last answer), as an idle keep-alive connection is; a real process, since the
    timer belongs to the server it runs."""
    port = free_port()
    config = write_config(
        tmp_path,
        "embedded",
        port,
        apps=demo_apps(sink.url),
        directory=DIRECTORY,
        server={"port": port, "public_url": f"http://127.0.0.1:{port}", "keepalive_seconds": 1},
    )
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc)

        async def cut_after(trickle: bytes) -> float:
            """Seconds until the gateway closes a connection sending ``trickle`` a byte every 0.2 s (99: never)."""
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            try:
                for byte in trickle:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    if await _closed(reader, 0.2):
                        return time.monotonic() - started
                return time.monotonic() - started if await _closed(reader, 10) else 99.0
            finally:
                writer.close()

        head = b"GET /app/trickle HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
        assert await cut_after(head) < 3  # 40 s of trickle if nothing cut it
        assert await cut_after(b"") < 3  # idle from the start
    finally:
        stop(proc)
    assert sink.requests == []


async def _closed(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the peer closes (or resets) the connection within ``within`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


# == 4. The upstream URL comes from parsed parts =================================================================
async def test_upstream_url_is_built_from_parsed_parts(gw: GatewayMaker, sink: Sink) -> None:
    """Absolute-form targets, encoded mounts and dot-segments never change the upstream nor shift its path."""
    apps = {
        "analytics": {"dialect": "pyramid", "upstream": sink.url},
        "control-panel": {"dialect": "activeplatform", "upstream": sink.url + "/cpbase", "mount": "/cp"},
        "switch": {"dialect": "denovolab", "upstream": sink.url + "/base", "mount": "/sw"},
    }
    client = await gw(apps)
    port = port_of(client)
    cases = [
        ("m://x/p", 400, None),
        ("HTTPadmin://x/p", 400, None),
        ("http://evil.example/p?x=1", 200, "/p?x=1"),
        ("http://ignored.example/sw/x", 200, "/base/x"),
        ("/%73w/x", 200, "/base/x"),
        ("/s%77/x", 200, "/base/x"),
        ("/%63p/x", 200, "/cpbase/x"),
        ("/sw/../../admin", 400, None),
        ("/cp/../sw/x", 200, "/base/x"),
        ("/sw/a/../y", 200, "/base/y"),
    ]
    expected = []
    for target, status, upstream_target in cases:
        answer = await ask(port, message("GET", target))
        assert answer.status == status, (target, answer.status, answer.body)
        if upstream_target is not None:
            expected.append(upstream_target)
            assert answer.json()["target"] == upstream_target, target
    assert [s.target for s in sink.requests] == expected
    assert {s.one("Host") for s in sink.requests} == {sink.authority}


# == 5. Header spellings and forwarding headers ==================================================================
SPOOFED = [
    ("X_Impersonation_Assertion", "forged.jwt.value"),
    ("x_impersonation_assertion", "forged.jwt.value"),
    ("X-Impersonation_Assertion", "forged.jwt.value"),
    ("X_Forwarded_For", "6.6.6.6"),
    ("X_Forwarded_Host", "evil.example"),
    ("X_Forwarded_Proto", "gopher"),
]
FORWARDING = [
    ("Forwarded", "for=198.51.100.7;host=portal.example.com;proto=https"),
    ("X-Real-IP", "198.51.100.7"),
    ("True-Client-IP", "198.51.100.7"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "portal.example.com"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/portal"),
    ("X-Original-URL", "/admin"),
]


def normalised(seen: Seen) -> list[str]:
    return [n.lower().replace("_", "-") for n, _ in seen.headers]


def assert_no_spoofed_header(seen: Seen) -> None:
    names = normalised(seen)
    assert not any("_" in n for n, _ in seen.headers), seen.headers
    assert names.count("x-forwarded-for") == names.count("x-forwarded-host") == names.count("x-forwarded-proto") == 1
    assert names.count("x-impersonation-assertion") <= 1
    assert all(v not in ("forged.jwt.value", "6.6.6.6", "gopher", "evil.example") for _, v in seen.headers)
    assert b"forged" not in seen.raw and b"6.6.6.6" not in seen.raw and b"gopher" not in seen.raw


async def test_untrusted_clients_cannot_spoof_assertion_or_forwarding_headers(gw: GatewayMaker, sink: Sink) -> None:
    """Underscore spellings never reach the app, and an untrusted client's forwarding headers are dropped or
    replaced, on pass-through and on redemption alike."""
    client = await gw(demo_apps(sink.url))
    port = port_of(client)
    _, cdr = await mint_denovolab(client)
    headers = SPOOFED + FORWARDING
    passed = await ask(port, message("GET", "/fwd", headers, host="internal:8080"))
    redeemed = await ask(port, message("GET", "/cdr", [*headers, ("X-Auth-Token", cdr)], host="internal:8080"))
    assert (passed.status, redeemed.status) == (200, 200)
    assert [s.target for s in sink.requests] == ["/fwd", "/cdr"]
    for seen in sink.requests:
        assert_no_spoofed_header(seen)
        assert seen.one("X-Forwarded-For") == "127.0.0.1"
        assert seen.one("X-Forwarded-Proto") == "http"
        assert seen.one("X-Forwarded-Host") == "internal:8080"
        for name in ("Forwarded", "X-Real-IP", "True-Client-IP", "X-Forwarded-Port", "X-Forwarded-Prefix",
                     "X-Original-URL"):  # fmt: skip
            assert seen.get(name) == [], name
    assert sink.requests[0].get("X-Impersonation-Assertion") == []
    assert claims(sink.requests[1], "switch")["scope"] == "cdr_api"
    assert_never_upstream(sink, cdr)


async def test_a_trusted_proxy_keeps_its_forwarding_headers(gw: GatewayMaker, sink: Sink) -> None:
    """From a trusted proxy, forwarding headers pass, X-Forwarded-For gets the peer appended (once), and underscore
    spellings are still dropped."""
    client = await gw(demo_apps(sink.url), server={"trusted_proxies": ["127.0.0.1/32"]})
    answer = await ask(port_of(client), message("GET", "/fwd", SPOOFED + FORWARDING, host="internal:8080"))
    assert answer.status == 200
    (seen,) = sink.requests
    assert_no_spoofed_header(seen)
    assert seen.one("X-Forwarded-For") == "203.0.113.9, 10.0.0.1, 127.0.0.1"
    assert seen.one("X-Forwarded-Proto") == "https"
    assert seen.one("X-Forwarded-Host") == "portal.example.com"
    for name, value in FORWARDING:
        if not name.startswith("X-Forwarded-For"):
            assert seen.get(name) == [value], name
    assert seen.get("X-Impersonation-Assertion") == []


# == 6. Carrier corner cases: a live grant never reaches an app ==================================================
@pytest.mark.parametrize("carrier", ["cookie", "header"])
async def test_head_neither_consumes_nor_forwards_a_live_grant(gw: GatewayMaker, sink: Sink, carrier: str) -> None:
    """HEAD with a PyramidAuth cookie grant or an X-Auth-Token grant reaches the app without it; a GET then
    redeems it."""
    client = await gw(demo_apps(sink.url))
    port = port_of(client)
    if carrier == "cookie":
        token, audience, headers = await mint_pyramid(client), "analytics", [("Cookie", "a=1")]
        headers.append(("Cookie", f"PyramidAuth={token}"))
    else:
        token, audience = (await mint_denovolab(client))[1], "switch"
        headers = [("X-Auth-Token", token)]
    head = await ask(port, message("HEAD", "/reports", headers), head_only=True)
    assert head.status == 200
    got = await ask(port, message("GET", "/reports", headers))
    assert got.status == 200
    assert [(s.method, s.target) for s in sink.requests] == [("HEAD", "/reports"), ("GET", "/reports")]
    assert sink.requests[0].get("X-Impersonation-Assertion") == []
    assert claims(sink.requests[1], audience)["jti"]
    if carrier == "cookie":
        assert [s.get("Cookie") for s in sink.requests] == [["a=1"], ["a=1"]]
    assert_never_upstream(sink, token)
    again = await ask(port, message("GET", "/reports", headers))
    assert again.status == 401
    assert len(sink.requests) == 2


@pytest.mark.parametrize(
    ("cookies", "left"),
    [
        (["a=1", "PyramidAuth={t}"], ["a=1"]),  # a second Cookie header
        (['x="a;PyramidAuth={t}"'], ['x="a']),  # hidden in a quoted cookie
        (["x=1, PyramidAuth={t}"], ["x=1"]),  # comma-joined
        (["pyramidauth={t}; b=2"], ["b=2"]),  # another case
    ],
)
async def test_odd_cookie_spellings_redeem_and_never_forward_the_grant(
    gw: GatewayMaker, sink: Sink, cookies: list[str], left: list[str]
) -> None:
    """A Pyramid grant in a second Cookie header, a quoted cookie, a comma-joined or case-variant cookie is redeemed
    and removed."""
    client = await gw(demo_apps(sink.url))
    token = await mint_pyramid(client)
    headers = [("Cookie", c.format(t=token)) for c in cookies]
    answer = await ask(port_of(client), message("GET", "/reports", headers))
    assert answer.status == 200
    (seen,) = sink.requests
    assert claims(seen, "analytics")["sub"] == "jdoe"
    assert seen.get("Cookie") == left
    assert_never_upstream(sink, token)


@pytest.mark.parametrize(
    ("name", "sep"), [("user_token", ";"), ("USER_TOKEN", "&"), ("user%5Ftoken", "&"), ("User_Token", ";")]
)
async def test_odd_link_spellings_are_links_and_never_forwarded(
    gw: GatewayMaker, sink: Sink, name: str, sep: str
) -> None:
    """A link with ``;`` between its pairs or a case-variant or encoded carrier name is confirmed, redeemed and
    stripped like any link."""
    client = await gw(demo_apps(sink.url))
    port = port_of(client)
    token = await mint_link(client)
    target = link(token, name=name, sep=sep) + "&keep=1"
    page = await ask(port, message("GET", target))
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert sink.requests == []
    confirmed = await ask(port, message("POST", target, [("Content-Type", FORM)], CONFIRM))
    assert confirmed.status == 200
    (seen,) = sink.requests
    assert (seen.method, seen.target, seen.body) == ("GET", "/welcome?keep=1", b"")
    assert claims(seen, "control-panel")["sub"] == "505"
    assert_never_upstream(sink, token)


async def test_two_grants_in_one_request_are_refused_and_never_forwarded(gw: GatewayMaker, sink: Sink) -> None:
    """Two live grants in two carriers of one request are refused (each spent), and neither reaches the app."""
    client = await gw(demo_apps(sink.url))
    port = port_of(client)
    ap, pyramid = await mint_link(client), await mint_pyramid(client)
    both = link(ap) + f"&token={pyramid}"
    assert (await ask(port, message("GET", both))).status == 200  # the confirmation page
    refused = await ask(port, message("POST", both, [("Content-Type", FORM)], CONFIRM))
    assert refused.status == 401
    dn_token, cdr = await mint_denovolab(client)
    refused = await ask(port, message("POST", f"/cdr?token={dn_token}", [("X-Auth-Token", cdr)], b"{}"))
    assert refused.status == 401
    assert sink.requests == []
    # each grant was spent: neither redeems afterwards
    assert (await ask(port, message("GET", "/reports", [("Cookie", f"PyramidAuth={pyramid}")]))).status == 401
    assert (await ask(port, message("GET", "/cdr", [("X-Auth-Token", cdr)]))).status == 401
    assert_never_upstream(sink, ap, pyramid, dn_token, cdr)


@pytest.mark.parametrize("where", ["json body, form content type", "query and body"])
async def test_btc_login_with_token_corners_never_forward_the_grant(gw: GatewayMaker, sink: Sink, where: str) -> None:
    """BTC Direct's login-with-token with a JSON body labelled as a form, or the token in query and body, is redeemed
    and the app receives neither token nor uuid."""
    client = await gw(demo_apps(sink.url))
    token = await mint_btc(client)
    body = orjson.dumps({"uuid": BTC_UUID, "token": token, "remember": True})
    if where == "query and body":
        target, content_type = f"{BTC_LOGIN}?token={token}&uuid={BTC_UUID}&keep=1", "application/json"
    else:
        target, content_type = BTC_LOGIN + "?keep=1", FORM
    answer = await ask(port_of(client), message("POST", target, [("Content-Type", content_type)], body))
    assert answer.status == 200
    (seen,) = sink.requests
    assert (seen.method, seen.target) == ("POST", BTC_LOGIN + "?keep=1")
    assert orjson.loads(seen.body) == {"remember": True}
    assert seen.one("Content-Length") == str(len(seen.body))
    assert claims(seen, "exchange")["sub"] == "u-1"
    assert_never_upstream(sink, token)
    assert BTC_UUID.encode() not in seen.raw


@pytest.mark.parametrize("where", ["link at another mount", "cookie at another mount"])
async def test_a_grant_on_another_apps_route_never_reaches_that_app(gw: GatewayMaker, sink: Sink, where: str) -> None:
    """A live grant presented on a route whose apps do not use its carrier is refused there; that app never sees it."""
    apps = {
        "control-panel": {"dialect": "activeplatform", "upstream": sink.url + "/cpbase", "mount": "/cp"},
        "analytics": {"dialect": "pyramid", "upstream": sink.url + "/pybase", "mount": "/py"},
        "switch": {"dialect": "denovolab", "upstream": sink.url + "/base", "mount": "/sw"},
    }
    client = await gw(apps)
    if where == "link at another mount":
        response = await client.get("/cp" + AP_SEED, headers={"X-Api-Token": AP_MANAGER})
        token = str((await response.json(content_type=None))["owner_token"])
        data = message("POST", link(token, "/sw/welcome"), [("Content-Type", FORM)], CONFIRM)
    else:
        response = await client.post("/py" + PY_MINT, json={"token": PY_ADMIN, "userIdentity": "jdoe"})
        token = await response.text()
        data = message("GET", "/sw/reports", [("Cookie", f"PyramidAuth={token}")])
    assert response.status == 200 and SHAPED.fullmatch(token)
    answer = await ask(port_of(client), data)
    assert answer.status == 401
    assert sink.requests == []


# == 7. Link methods, the confirmation page, operations paths ====================================================
async def test_a_link_is_not_consumed_by_options_put_or_delete(gw: GatewayMaker, sink: Sink) -> None:
    """OPTIONS, PUT and DELETE of a link are refused without consuming the grant; the link then redeems."""
    client = await gw(demo_apps(sink.url))
    port = port_of(client)
    token = await mint_link(client)
    for method in ("OPTIONS", "PUT", "DELETE"):
        answer = await ask(port, message(method, link(token), [("Origin", "https://evil.example")], b"{}"))
        assert answer.status == 401, method
        assert answer.json()["errors"][0]["status"] == "401"
    assert sink.requests == []
    confirmed = await ask(port, message("POST", link(token), [("Content-Type", FORM)], CONFIRM))
    assert confirmed.status == 200
    (seen,) = sink.requests
    assert (seen.method, seen.target) == ("GET", "/welcome")
    assert claims(seen, "control-panel")["sub"] == "505"


@pytest.mark.parametrize("prefix_", ["//evil.example/", "http://evil.example/", "/\\evil.example/"])
async def test_the_confirmation_form_posts_back_to_the_same_url(gw: GatewayMaker, sink: Sink, prefix_: str) -> None:
    """Whatever the request target looks like, the confirmation page's form has no action: it posts to the same URL."""
    client = await gw(demo_apps(sink.url))
    answer = await ask(port_of(client), message("GET", link("A" * 32, path=prefix_)))
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    html = answer.body.decode()
    (form,) = re.findall(r"<form[^>]*>", html)
    assert form == '<form method="post">'
    assert "action" not in html.lower() and "evil" not in html
    assert "form-action 'self'" in answer.headers["Content-Security-Policy"]
    assert sink.requests == []


async def test_operations_paths_on_an_app_host_belong_to_the_app(gw: GatewayMaker, sink: Sink) -> None:
    """/healthz, /readyz and /metrics on a host an app lists reach that app; /.well-known/jwks.json is always the
    gateway's."""
    apps = {
        "analytics": {"dialect": "pyramid", "upstream": sink.url, "hosts": ["analytics.local"]},
        "control-panel": {"dialect": "activeplatform", "upstream": sink.url},
    }
    client = await gw(apps)
    port = port_of(client)
    for path in ("/healthz", "/readyz", "/metrics"):
        for host in ("analytics.local", "ANALYTICS.local:8080"):
            answer = await ask(port, message("GET", path, host=host))
            assert (answer.status, answer.json()["target"]) == (200, path), (path, host)
    assert [s.target for s in sink.requests] == ["/healthz", "/healthz", "/readyz", "/readyz", "/metrics", "/metrics"]
    jwks = await ask(port, message("GET", "/.well-known/jwks.json", host="analytics.local"))
    assert jwks.status == 200
    assert [k["kty"] for k in jwks.json()["keys"]] == ["OKP"]
    own = await ask(port, message("GET", "/healthz", host="gateway.test"))
    assert (own.status, own.json()) == (200, {"status": "ok"})
    assert len(sink.requests) == 6
