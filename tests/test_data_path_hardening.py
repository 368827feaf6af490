"""The data path under a failing, slow or odd app, and against cross-site and spoofing clients (security probe of
2026-12-03, and issue 13). Every test talks to the gateway over a real socket, and the app is a real server.

1. a grant is spent only once a connection to the app is open: an unreachable app is a 502 (a full pool a 504) in
   the dialect's shape and the grant stays usable;
2. trickled bodies hold no upstream connection, and a streamed body is bounded by a least average pace;
3. a WebSocket handshake with a body is refused; WebSocket connections are bounded per upstream, and a
   handshake in time even with read_timeout 0;
4. no request fails because an earlier answer left its connection closing;
5. an app answering HEAD with a body is a 502, and the process logs none of its bytes;
6. an app's answer never hands the assertion back to the client;
7. forwarding headers and method overrides from untrusted clients are dropped;
8. a cross-site POST of a link is refused without spending the grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bench.nginx import main_conf, nginx_binary
from gateway import proxy
from tests import test_data_path_security as security
from tests.conftest import free_port, until
from tests.processes import stop, wait_ready, write_config
from tests.test_data_path_security import (
    AP_MANAGER,
    CONFIRM,
    DIRECTORY,
    FORM,
    GatewayMaker,
    Sink,
    ask,
    claims,
    demo_apps,
    link,
    message,
    mint_btc,
    mint_denovolab,
    mint_link,
    port_of,
    read_answer,
    send,
    wait_until,
)

AP_TYPE = "application/vnd.api+json"
# How soon a request waiting for room among the upstream's connections gets its 504 when its app's
# connect_timeout_seconds is 0.5: far above that, so that a loaded machine passes, and below the 5 s default, so
# that a pass shows the configured timeout fired.
POOL_WAIT_WITHIN = 4
gw, sink = security.gw, security.sink  # the fixtures: a gateway on fakeredis, a raw recording upstream


# -- an app on a port of our choosing, so that it can be down first and up later ---------------------------------
class App:
    """An aiohttp app on ``port`` (started by :meth:`up`) that records what it is asked and answers with ``handler``
    (by default: 200 and the request's method and target as JSON)."""

    def __init__(self, port: int, handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None):
        self.port = port
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        self._handler = handler
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.raw_path, dict(request.headers)))
        if self._handler is not None:
            return await self._handler(request)
        await request.read()
        return web.json_response({"method": request.method, "target": request.raw_path})

    async def up(self) -> App:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def app_port() -> AsyncIterator[App]:
    """An app on a free port, not started yet."""
    app = App(free_port())
    yield app
    await app.down()


def ap_error(answer: Any, status: int, code: str) -> None:
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"] == AP_TYPE
    (error,) = answer.json()["errors"]
    assert (error["status"], error["code"]) == (str(status), code)


# == 1. A grant is spent only once the app can be reached ========================================================
async def test_an_unreachable_app_spends_no_grant(gw: GatewayMaker, app_port: App) -> None:
    """With the app down, a link, a header carrier, a BTC Direct body carrier and a WebSocket handshake each get
    502 in their dialect's shape; once the app is up, the very same grants redeem."""
    client = await gw(demo_apps(app_port.url, **{"control-panel": {"redeem_on_get": True}}))
    port = port_of(client)
    token = await mint_link(client)
    _, cdr = await mint_denovolab(client)
    portal, _ = await mint_denovolab(client)
    btc = await mint_btc(client)
    btc_body = orjson.dumps({"uuid": "45b9313b-fa47-4786-baf1-62969dec31f2", "token": btc})
    ws = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
          ("Sec-WebSocket-Version", "13"), ("X-Auth-Token", portal)]  # fmt: skip
    requests = {
        "link": message("GET", link(token)),
        "header": message("GET", "/cdr/calls", [("X-Auth-Token", cdr)]),
        "btc": message("POST", "/api/v2/user/login-with-token", [("Content-Type", "application/json")], btc_body),
        "websocket": message("GET", "/socket", ws),
    }
    down = {name: await ask(port, data) for name, data in requests.items()}
    ap_error(down["link"], 502, "bad_gateway")
    assert down["header"].status == 502
    assert down["header"].json() == {"error_type": "bad_gateway_error", "success": False,
                                     "error": {"message": "The application cannot be reached", "code": 151,
                                               "reason": "upstream_unavailable"}}  # fmt: skip
    assert down["btc"].status == 502 and list(down["btc"].json()["errors"]) == ["ER999"]
    assert down["websocket"].status == 502
    assert app_port.seen == []

    await app_port.up()
    up = {name: await ask(port, data) for name, data in requests.items() if name != "websocket"}
    assert {name: a.status for name, a in up.items()} == {"link": 200, "header": 200, "btc": 200}
    assert [target for _, target, _ in app_port.seen] == ["/welcome", "/cdr/calls", "/api/v2/user/login-with-token"]
    for (_, _, headers), audience in zip(app_port.seen, ("control-panel", "switch", "exchange"), strict=True):
        assert claims(security.Seen(0, "", "", list(headers.items()), b""), audience)["jti"]
    again = await ask(port, requests["header"])  # spent now: refused
    assert again.status == 401


async def test_with_the_app_down_a_grant_that_is_not_live_is_refused_as_ever(gw: GatewayMaker, app_port: App) -> None:
    """An unknown grant, or one already spent, gets the dialect's refusal (401), not the 502: nothing is kept."""
    client = await gw(demo_apps(app_port.url, **{"control-panel": {"redeem_on_get": True}}))
    port = port_of(client)
    ap_error(await ask(port, message("GET", link("A" * 32))), 401, "unauthorized")
    token = await mint_link(client)
    await app_port.up()
    assert (await ask(port, message("GET", link(token)))).status == 200
    await app_port.down()
    ap_error(await ask(port, message("GET", link(token))), 401, "unauthorized")
    assert len(app_port.seen) == 1


async def test_the_confirmation_post_spends_no_grant_while_the_app_is_down(gw: GatewayMaker, app_port: App) -> None:
    """redeem_on_get false: the page's POST gets ActivePlatform's 502 while the app is down; later the same POST
    redeems, and the app gets the GET of the link's path."""
    client = await gw(demo_apps(app_port.url, **{"control-panel": {"redeem_on_get": False}}))
    port = port_of(client)
    target = link(await mint_link(client))
    page = await ask(port, message("GET", target))
    assert page.status == 200 and b"<form" in page.body
    confirm = message("POST", target, [("Content-Type", FORM), ("Origin", "null"), ("Sec-Fetch-Site", "same-origin")],
                      CONFIRM)  # fmt: skip
    ap_error(await ask(port, confirm), 502, "bad_gateway")
    await app_port.up()
    answer = await ask(port, confirm)
    assert answer.status == 200 and answer.json() == {"method": "GET", "target": "/welcome"}
    ((method, path, headers),) = app_port.seen
    assert (method, path) == ("GET", "/welcome")
    assert "Content-Type" not in headers and headers["X-Impersonation-Assertion"]


async def test_a_full_pool_is_a_504_before_the_grant_is_spent(gw: GatewayMaker, app_port: App) -> None:
    """upstream_connections: 1, held by a slow request: a redemption meanwhile gets ActivePlatform's 504 within the
    connect timeout and its grant redeems once the connection is free."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await release.wait()
        return web.json_response({"target": request.raw_path})

    app = App(app_port.port, slow)
    await app.up()
    try:
        settings = {"connect_timeout_seconds": 0.5, "redeem_on_get": True}
        client = await gw(demo_apps(app.url, **{"control-panel": settings}), server={"upstream_connections": 1})
        port = port_of(client)
        token = await mint_link(client)
        busy = asyncio.create_task(ask(port, message("GET", "/slow")))
        await wait_until("the slow request to reach the app", lambda: len(app.seen) == 1)
        start = time.monotonic()
        ap_error(await ask(port, message("GET", link(token))), 504, "gateway_timeout")
        assert time.monotonic() - start < POOL_WAIT_WITHIN
        release.set()
        assert (await busy).status == 200
        answer = await ask(port, message("GET", link(token)))
        assert (answer.status, answer.json()) == (200, {"target": "/welcome"})
    finally:
        await app.down()


# == 2. Trickled bodies ===========================================================================================
async def test_trickled_bodies_hold_no_upstream_connection(gw: GatewayMaker, sink: Sink) -> None:
    """Four clients trickling bodies larger than the body limit on a pool of two: none takes an upstream
    connection (each is a 408 at the body timeout), plain requests and a redemption meanwhile get 200."""
    client = await gw(demo_apps(sink.url), server={"upstream_connections": 2, "body_timeout_seconds": 3,
                                                   "body_limit_bytes": 1000})  # fmt: skip
    port = port_of(client)
    _, cdr = await mint_denovolab(client)
    sent = [0] * 4  # bytes of body each trickler has sent

    async def trickle(n: int) -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(message("POST", "/upload", [("Content-Length", "100000")], close=False))
        try:
            for _ in range(300):  # a byte every 0.1 s until the answer (the 3 s body timeout); 30 s at most
                writer.write(b"x")
                await writer.drain()
                sent[n] += 1
                await asyncio.sleep(0.1)
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break
            return await asyncio.wait_for(read_answer(reader), 15)
        except ConnectionError:
            return None
        finally:
            writer.close()

    tricklers = [asyncio.create_task(trickle(n)) for n in range(4)]

    async def all_trickling() -> bool:
        return all(count >= 2 for count in sent)

    await until("every trickler to be sending its body", all_trickling)
    plain = [await ask(port, message("GET", f"/plain/{i}")) for i in range(3)]
    redeemed = await ask(port, message("GET", "/cdr", [("X-Auth-Token", cdr)]))
    assert [a.status for a in plain] == [200, 200, 200] and redeemed.status == 200
    assert not any(t.done() for t in tricklers), "the tricklers were done before the other requests"
    answers = await asyncio.gather(*tricklers)
    assert all(a is None or a.status == 408 for a in answers), answers
    assert [s.target for s in sink.requests] == ["/plain/0", "/plain/1", "/plain/2", "/cdr"]


async def test_a_streamed_body_slower_than_the_least_pace_is_cut(gw: GatewayMaker, sink: Sink) -> None:
    """A body that sends more than the body limit at once and then 50 bytes a second (never pausing for a whole
    body timeout) is cut soon after the body timeout: 408, and its upstream connection closed."""
    client = await gw(demo_apps(sink.url), server={"body_timeout_seconds": 1, "body_limit_bytes": 1000})
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(client))
    start = time.monotonic()
    writer.write(message("POST", "/upload", [("Content-Length", "1000000")], close=False) + b"a" * 2000)
    answering = asyncio.create_task(read_answer(reader))
    # The client would go on for 30 s (and much longer to send it all); the pace bound cuts it within about 2 s. A
    # bound of 10 s passes on a loaded machine and still fails a gateway that lets the trickle go on.
    try:
        while not answering.done() and time.monotonic() - start < 30:
            writer.write(b"b" * 10)
            await writer.drain()
            await asyncio.wait([answering], timeout=0.2)
    except ConnectionError:
        pass
    elapsed = time.monotonic() - start
    writer.close()
    try:
        answer = await asyncio.wait_for(answering, 15)
    except ConnectionError:
        answer = None
    assert elapsed < 10, elapsed
    assert answer is None or answer.status == 408
    await wait_until("the upstream connection to close", lambda: sink.open == 0)
    ((seen),) = sink.requests
    assert not seen.complete and seen.body.startswith(b"a" * 2000)


# == 3. WebSockets ================================================================================================
WS_HANDSHAKE = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13")]  # fmt: skip


async def test_a_websocket_handshake_with_a_body_is_refused(gw: GatewayMaker, sink: Sink) -> None:
    client = await gw(demo_apps(sink.url))
    _, cdr = await mint_denovolab(client)
    for extra in ([], [("X-Auth-Token", cdr)]):
        answer = await ask(port_of(client), message("GET", "/socket", [*WS_HANDSHAKE, *extra], b"0123456789"))
        assert answer.status == 400 and answer.headers["Connection"] == "close"
    assert sink.accepted == 0
    assert (await ask(port_of(client), message("GET", "/cdr", [("X-Auth-Token", cdr)]))).status == 200  # unspent


async def test_websocket_connections_are_bounded_per_upstream(gw: GatewayMaker, app_port: App) -> None:
    """upstream_connections: 2: two WebSockets bridge, a third waits and gets 504 within the connect timeout; once
    one closes, another bridges."""

    async def socket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    app = App(app_port.port, socket)
    await app.up()
    try:
        quick = {name: {"connect_timeout_seconds": 0.5} for name in ("control-panel", "switch")}
        client = await gw(demo_apps(app.url, **quick), server={"upstream_connections": 2})
        url = f"http://127.0.0.1:{port_of(client)}/socket"
        async with aiohttp.ClientSession() as session:
            first, second = await session.ws_connect(url), await session.ws_connect(url)
            for ws in (first, second):
                await ws.send_str("hi")
                assert await ws.receive_str() == "hi"
            start = time.monotonic()
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url)
            assert refused.value.status == 504 and time.monotonic() - start < POOL_WAIT_WITHIN
            portal, _ = await mint_denovolab(client)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # a redemption waits as long, spends nothing
                await session.ws_connect(url, headers={"X-Auth-Token": portal})
            assert refused.value.status == 504
            assert len(app.seen) == 2
            await first.close()
            third = await session.ws_connect(url, headers={"X-Auth-Token": portal})
            await third.send_str("again")
            assert await third.receive_str() == "again"
            await asyncio.gather(second.close(), third.close())
            assert claims(security.Seen(0, "", "", list(app.seen[-1][2].items()), b""), "switch")["sub"] == "41"
    finally:
        await app.down()


async def test_a_websocket_handshake_is_bounded_with_read_timeout_zero(
    gw: GatewayMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app that never answers a handshake: 504 after connect timeout + HANDSHAKE_SECONDS, read_timeout 0 or not.
    HANDSHAKE_SECONDS is 0.5 here (30 s in earnest); with no bound the request would wait for ever."""
    monkeypatch.setattr(proxy, "HANDSHAKE_SECONDS", 0.5)
    held: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = await gw(
            demo_apps(url, **{"control-panel": {"read_timeout_seconds": 0, "connect_timeout_seconds": 1}})
        )
        start = time.monotonic()
        answer = await send(port_of(client), message("GET", "/socket", WS_HANDSHAKE), timeout=20)
        assert answer is not None and answer.status == 504
        assert 0.4 < time.monotonic() - start < 10  # it waited, and not for the 30 s of the real bound
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


# == 4. A connection an answer left closing is not reused =========================================================
# An aiohttp app of its own process (in this one, it would close before the gateway even read the answer): it
# answers without reading the body, and aiohttp, draining a gzip body it cannot decode, then closes the connection
# without having said so.
CLOSING_APP = """
import asyncio, sys
from aiohttp import web

async def ok(request):
    return web.Response(text="ok")

async def main():
    app = web.Application()
    app.router.add_post("/submit", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def closing_app() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-c", CLOSING_APP], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else b""
        assert line, "the app printed no port"
        yield f"http://127.0.0.1:{int(line)}"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


async def post_load(url: str) -> dict[int, int]:
    """400 POSTs to ``url``, one in four with a body that says gzip and is not, ten at a time (each sending its next
    as soon as one is answered): how many got each status."""
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=10)) as session:

        async def worker(first: int) -> None:
            for i in range(first, 400, 10):
                if i % 4 == 0:
                    data, headers = b"this is not gzip" * 4, {"Content-Encoding": "gzip"}
                else:
                    data, headers = b"plain body %d" % i, {}
                async with session.post(url, data=data, headers=headers) as response:
                    await response.read()
                    statuses.append(response.status)

        await asyncio.gather(*(worker(n) for n in range(10)))
    return {s: statuses.count(s) for s in set(statuses)}


async def test_an_app_closing_after_a_bad_body_fails_no_other_request(gw: GatewayMaker, closing_app: str) -> None:
    """All 400 get the app's 200: none a 502 on a connection the app closed after an earlier answer."""
    client = await gw(demo_apps(closing_app))
    assert await post_load(f"http://127.0.0.1:{port_of(client)}/submit") == {200: 400}


async def test_nginx_in_front_fails_no_request_either(tmp_path: Path, closing_app: str) -> None:
    """The same load through the generated nginx configuration (ordinary requests go straight to the app)."""
    gateway_port, nginx_port = free_port(), free_port()
    config = write_config(tmp_path, "embedded", gateway_port, apps=demo_apps(closing_app), directory=DIRECTORY,
                          server={"port": gateway_port, "public_url": f"http://127.0.0.1:{nginx_port}"})  # fmt: skip
    include = tmp_path / "gateway.conf"
    with include.open("w") as out:
        command = [sys.executable, "-m", "gateway", "proxy-config", "nginx", "--config", str(config),
                   "--listen", f"127.0.0.1:{nginx_port}", "--access-log", "off"]  # fmt: skip
        subprocess.run(command, stdout=out, check=True)
    nginx = subprocess.Popen([nginx_binary(), "-p", str(tmp_path), "-c", str(main_conf(tmp_path, include, 1))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", nginx_port)
        except OSError:
            assert nginx.poll() is None, "nginx exited"
            return False
        writer.close()
        return True

    try:
        await until("nginx to listen", listening)
        assert await post_load(f"http://127.0.0.1:{nginx_port}/submit") == {200: 400}
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)


# == 5. No answer bytes in the logs ===============================================================================
async def _echoing_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An app that answers every request, HEAD included, with a body: the request's own head, credentials and
    all (twice, so that it reads as neither an answer nor a request)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = head * 2
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_an_app_answering_head_with_a_body_puts_none_of_it_in_the_logs(tmp_path: Path) -> None:
    """A real gateway process: HEAD requests carrying the actor's X-Api-Token to an app that answers them with a
    body echoing the request get 502; the process's stdout and stderr hold no credential, only the error class."""
    server = await asyncio.start_server(_echoing_head, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    port = free_port()
    config = write_config(tmp_path, "embedded", port, apps=demo_apps(url), directory=DIRECTORY)
    out_path, err_path = tmp_path / "gateway.out", tmp_path / "gateway.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                                stdout=out, stderr=err)  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc)
        statuses = []
        for path in ("/account", "/account/2", "/billing"):
            answer = await ask(port, message("HEAD", path, [("X-Api-Token", AP_MANAGER)]), head_only=True)
            statuses.append(answer.status)
        assert statuses == [502, 502, 502]
    finally:
        stop(proc)
        server.close()
        await server.wait_closed()
    output = out_path.read_bytes() + err_path.read_bytes()
    assert AP_MANAGER.encode() not in output
    assert b"X-Api-Token" not in output and b"Traceback" not in output
    lines = [orjson.loads(line) for line in out_path.read_bytes().splitlines() if line.startswith(b"{")]
    unreachable = [line for line in lines if line["event"] == "upstream_unreachable"]
    assert len(unreachable) == 3
    assert {line["error"] for line in unreachable} == {"HttpProcessingError"}


# == 6. The assertion never comes back to the client ==============================================================
async def _echo_assertion(request: web.Request) -> web.StreamResponse:
    """An app whose error pages quote the request's headers."""
    assertion = request.headers.get("X-Impersonation-Assertion", "none")
    text = f"400 Bad Request: header too large: X-Impersonation-Assertion: {assertion}\n"
    if request.path == "/gzip":
        return web.Response(status=400, body=gzip.compress(text.encode()), headers={"Content-Encoding": "gzip"})
    if request.path == "/stream":
        response = web.StreamResponse(status=400)
        await response.prepare(request)
        for i in range(0, len(text), 50):
            await response.write(text[i : i + 50].encode())
        await response.write_eof()
        return response
    return web.Response(status=400, text=text, headers={"Set-Cookie": "seen=1"})


@pytest.mark.parametrize("path", ["/plain", "/gzip", "/stream"])
async def test_an_answer_never_echoes_the_assertion(gw: GatewayMaker, app_port: App, path: str) -> None:
    """An app's 400 quoting the assertion: a small answer (plain or gzip) becomes a short text with the same status;
    a streamed one is cut before the assertion's signature. A pass-through answer is relayed as it is."""
    app = App(app_port.port, _echo_assertion)
    await app.up()
    try:
        client = await gw(demo_apps(app.url))
        port = port_of(client)
        _, cdr = await mint_denovolab(client)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(message("GET", path, [("X-Auth-Token", cdr)]))
        received = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        ((_, _, headers),) = app.seen
        signature = headers["X-Impersonation-Assertion"].rpartition(".")[2].encode()
        assert signature not in received and signature not in gzip_or_plain(received)
        assert received.startswith(b"HTTP/1.1 400 ")
        if path != "/stream":
            assert received.endswith(proxy.WITHHELD.encode())
            assert b"Content-Encoding" not in received
        passed = await ask(port, message("GET", "/plain"))
        assert passed.status == 400 and passed.body.endswith(b"X-Impersonation-Assertion: none\n")
    finally:
        await app.down()


def gzip_or_plain(data: bytes) -> bytes:
    body = data.partition(b"\r\n\r\n")[2]
    with contextlib.suppress(Exception):
        return gzip.decompress(body)
    return body


# == 7. Forwarding headers from untrusted clients =================================================================
SPOOFED = [
    ("X-Host", "evil.example"),
    ("Client-IP", "6.6.6.6"),
    ("X-ProxyUser-Ip", "6.6.6.6"),
    ("X-Original-Forwarded-For", "6.6.6.6"),
    ("Via", "1.1 evil.example"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
]


async def test_untrusted_forwarding_headers_and_method_overrides_are_dropped(gw: GatewayMaker, sink: Sink) -> None:
    client = await gw(demo_apps(sink.url))
    port = port_of(client)
    _, cdr = await mint_denovolab(client)
    assert (await ask(port, message("POST", "/items", SPOOFED, b"{}"))).status == 200
    assert (await ask(port, message("POST", "/cdr", [*SPOOFED, ("X-Auth-Token", cdr)], b"{}"))).status == 200
    assert [s.target for s in sink.requests] == ["/items", "/cdr"]
    for seen in sink.requests:
        for name, _ in SPOOFED:
            assert seen.get(name) == [], name
        assert b"evil" not in seen.raw and b"6.6.6.6" not in seen.raw and b"DELETE" not in seen.raw


async def test_a_trusted_proxy_keeps_them(gw: GatewayMaker, sink: Sink) -> None:
    client = await gw(demo_apps(sink.url), server={"trusted_proxies": ["127.0.0.1/32"]})
    assert (await ask(port_of(client), message("POST", "/items", SPOOFED, b"{}"))).status == 200
    (seen,) = sink.requests
    for name, value in SPOOFED:
        assert seen.get(name) == [value], name


# == 8. Login CSRF ================================================================================================
@pytest.mark.parametrize(
    ("content_type", "body", "headers"),
    [
        (FORM, CONFIRM, [("Origin", "https://evil.example")]),
        ("text/plain", b"x", [("Origin", "https://evil.example")]),
        (FORM, CONFIRM, [("Origin", "null"), ("Sec-Fetch-Site", "cross-site")]),
        (FORM, CONFIRM, [("Sec-Fetch-Site", "cross-site")]),
        (FORM, CONFIRM, [("Origin", "http://gateway.test.evil.example")]),
        (FORM, CONFIRM, [("Sec-Fetch-Site", "same-site"), ("Origin", "http://other.gateway.test")]),
    ],
)
@pytest.mark.parametrize("redeem_on_get", [True, False])
async def test_a_cross_site_post_of_a_link_is_refused_and_spends_nothing(
    gw: GatewayMaker, sink: Sink, content_type: str, body: bytes, headers: list[tuple[str, str]], redeem_on_get: bool
) -> None:
    """Another site's page posting a login link (a form, or text/plain) would log the browser in as the link's
    subject: refused (401), nothing reaches the app, and the link's own confirmation then redeems."""
    client = await gw(demo_apps(sink.url, **{"control-panel": {"redeem_on_get": redeem_on_get}}))
    port = port_of(client)
    target = link(await mint_link(client))
    refused = await ask(port, message("POST", target, [("Content-Type", content_type), *headers], body))
    ap_error(refused, 401, "unauthorized")
    assert sink.requests == []
    own = [("Content-Type", FORM), ("Origin", "http://gateway.test"), ("Sec-Fetch-Site", "same-origin")]
    answer = await ask(port, message("POST", target, own, CONFIRM))
    assert answer.status == 200
    (seen,) = sink.requests
    assert (seen.method, seen.target) == ("GET", "/welcome")
    assert claims(seen, "control-panel")["sub"] == "505"


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Origin", "null"), ("Sec-Fetch-Site", "same-origin")],
        [("Origin", "http://127.0.0.1:{port}")],
        [("Origin", "http://gateway.test")],
    ],
)
async def test_the_confirmation_pages_own_post_redeems(gw: GatewayMaker, sink: Sink, headers: Any) -> None:
    """No Origin (an older client), the page's own (null under its no-referrer policy, same-origin), the request's
    own origin, or the public URL's: the POST redeems."""
    client = await gw(demo_apps(sink.url, **{"control-panel": {"redeem_on_get": False}}))
    port = port_of(client)
    headers = [(n, v.format(port=port)) for n, v in headers]
    target = link(await mint_link(client))
    answer = await ask(port, message("POST", target, [("Content-Type", FORM), *headers], CONFIRM,
                                     host=f"127.0.0.1:{port}"))  # fmt: skip
    assert answer.status == 200
    assert [s.target for s in sink.requests] == ["/welcome"]
