"""The soak's downstream app, run as its own process: ``python -m soak.app KEY_FILE``.

It prints one JSON line on stdout, ``{"http": N, "control": M}``: the port the gateway's apps point at, and a
control port of its own (so that the app can be told to misbehave, and asked what it saw, even while it refuses
connections on the first).

On ``http`` every path answers; what it answers depends on the path:

- ``/echo`` (any method): reads the body and answers its length and SHA-256 (20 MB uploads);
- ``/sse``: an event stream of ``?n=`` events (default 4), one every ``?every=`` seconds (default 0.5);
- ``/ws``: a WebSocket that first says which assertion came with its handshake, then echoes;
- ``/stream``: an endless stream, a piece every 0.1 s, until the client goes away (counted);
- ``/page``: an HTML page (a session's banner goes into it);
- ``/cookie``: sets an HttpOnly cookie (a session keeps it in the gateway);
- anything else: JSON naming the assertion's ``jti``, ``sid``, ``sub`` and ``mode`` (None without one), and the
  cookies' names.

Every answer has ``X-Soak-App: 1`` (so a 5xx of the app's own is told from the gateway's) and ``X-Soak-Jti``.
Every assertion is verified (Ed25519, the key of ``KEY_FILE``) and its ``jti`` counted: a grant the app saw
twice, or never although the gateway answered success, is what the soak looks for.

On ``control``: ``POST /fault`` ``{"name", "seconds", "param"?}`` starts a fault (``slow``, ``reset``,
``half_close``, ``refuse``, ``error_burst``, ``body_stall``), ``GET /stats`` the counters, ``GET /seen`` every
``jti`` with its count (and each arrival of those that came more than once), ``GET /marker/{m}`` whether a
request with ``?m={m}`` arrived (and with an assertion).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import jwt
from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives import serialization

ASSERTION = "X-Impersonation-Assertion"
FAULTS = ("slow", "reset", "half_close", "refuse", "error_burst", "body_stall")


class State:
    """What the app has seen, and the fault it is told to play."""

    def __init__(self, public_key: Any) -> None:
        self.public_key = public_key
        self.jtis: dict[str, int] = {}
        self.markers: dict[str, dict[str, Any]] = {}
        self.first: dict[str, list[Any]] = {}  # jti -> [wall time, method, path, client port] of its first arrival
        self.dupes: dict[str, list[list[Any]]] = {}
        self.counters = {
            "requests": 0,
            "assertions": 0,
            "invalid_assertions": 0,
            "aborted_uploads": 0,
            "aborted_streams": 0,
            "faulted": 0,
        }
        self.fault: str | None = None
        self.fault_until = 0.0
        self.param = 0.0
        self.site: web.TCPSite | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    def active(self) -> str | None:
        if self.fault is not None and time.monotonic() < self.fault_until:
            return self.fault
        return None

    def record(self, request: web.Request) -> dict[str, Any]:
        """The request's verified claims ({} without an assertion), its jti counted."""
        self.counters["requests"] += 1
        token = request.headers.get(ASSERTION)
        claims: dict[str, Any] = {}
        if token:
            try:
                claims = jwt.decode(token, self.public_key, algorithms=["EdDSA"], options={"verify_aud": False})
            except jwt.PyJWTError:
                self.counters["invalid_assertions"] += 1
            else:
                self.counters["assertions"] += 1
                jti = str(claims.get("jti"))
                self.jtis[jti] = self.jtis.get(jti, 0) + 1
                peer = request.transport.get_extra_info("peername") if request.transport else None
                arrival = [round(time.time(), 3), request.method, request.path, peer[1] if peer else None]
                if self.jtis[jti] == 1:
                    self.first[jti] = arrival
                else:  # a second arrival of one assertion: keep both, for the report
                    self.dupes.setdefault(jti, [self.first[jti]]).append(arrival)
        marker = request.query.get("m")
        if marker:
            self.markers[marker] = {"assertion": bool(claims), "method": request.method}
        return claims


STATE = web.AppKey("state", State)
CLAIMS = web.RequestKey("claims", dict)


def _headers(claims: dict[str, Any]) -> dict[str, str]:
    return {"X-Soak-App": "1", "X-Soak-Jti": str(claims.get("jti", "-"))}


def _rst(request: web.Request) -> None:
    """Reset the connection (RST, not FIN): SO_LINGER 0, then abort."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@web.middleware
async def faults(request: web.Request, handler: Any) -> web.StreamResponse:
    """Record the assertion, then play the active fault (if any) instead of the handler."""
    state = request.app[STATE]
    request[CLAIMS] = claims = state.record(request)
    fault = state.active()
    if fault is None or "X-Soak-No-Fault" in request.headers:  # the client faults' own probes
        return await handler(request)  # type: ignore[no-any-return]
    state.counters["faulted"] += 1
    if fault == "slow":  # past the gateway's read timeout, then a normal answer nobody waits for
        await asyncio.sleep(state.param)
        return await handler(request)  # type: ignore[no-any-return]
    if fault == "error_burst":
        status = 500 if state.counters["faulted"] % 2 else 503
        return web.Response(status=status, text="the app is having a bad moment\n", headers=_headers(claims))
    if fault in ("reset", "body_stall"):
        response = web.StreamResponse(headers={**_headers(claims), "Content-Type": "text/plain"})
        response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"x" * (1_000 if fault == "reset" else 10_000))
        if fault == "reset":
            await asyncio.sleep(0.05)
            _rst(request)
        else:
            await asyncio.sleep(state.param)  # the rest of the body never comes
            if request.transport is not None:
                request.transport.close()
        return response
    if fault == "half_close":  # FIN on our side, no answer; the read side stays open
        transport = request.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        for _ in range(100):
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.1)
        if transport is not None:
            transport.close()
        return web.Response(status=204)
    # refuse: the listener is closed; a request on a connection opened before gets the connection dropped
    _rst(request)
    return web.Response(status=204)


async def echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    try:
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
    except (Exception, asyncio.CancelledError):
        request.app[STATE].counters["aborted_uploads"] += 1
        raise
    claims = request[CLAIMS]
    return web.json_response(
        {"length": length, "sha256": digest.hexdigest(), "jti": claims.get("jti")}, headers=_headers(claims)
    )


async def sse(request: web.Request) -> web.StreamResponse:
    count, every = int(request.query.get("n", "4")), float(request.query.get("every", "0.5"))
    response = web.StreamResponse(headers={**_headers(request[CLAIMS]), "Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(count):
        await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
        await asyncio.sleep(every)
    await response.write_eof()
    return response


async def stream(request: web.Request) -> web.StreamResponse:
    """Until the client goes away: a piece every 0.1 s (at most 10 minutes)."""
    response = web.StreamResponse(headers={**_headers(request[CLAIMS]), "Content-Type": "application/octet-stream"})
    await response.prepare(request)
    try:
        for _ in range(6000):
            await response.write(b"p" * 4096)
            await asyncio.sleep(0.1)
    except (ConnectionError, RuntimeError, OSError, asyncio.CancelledError):
        request.app[STATE].counters["aborted_streams"] += 1
        raise
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=0)
    ws.headers.update(_headers(request[CLAIMS]))
    await ws.prepare(request)
    claims = request[CLAIMS]
    await ws.send_str(json.dumps({"jti": claims.get("jti"), "sid": claims.get("sid"), "sub": claims.get("sub")}))
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def page(request: web.Request) -> web.Response:
    html = (
        "<!doctype html><html><head><title>soak</title></head><body><h1>A page of the app</h1>"
        + ("<p>filler</p>" * 50)
        + "</body></html>"
    )
    return web.Response(text=html, content_type="text/html", headers=_headers(request[CLAIMS]))


async def cookie(request: web.Request) -> web.Response:
    response = web.json_response({"set": "app_login"}, headers=_headers(request[CLAIMS]))
    response.set_cookie("app_login", "secret-of-the-app", httponly=True, path="/")
    return response


async def anything(request: web.Request) -> web.Response:
    claims = request[CLAIMS]
    await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "jti": claims.get("jti"),
            "sid": claims.get("sid"),
            "sub": claims.get("sub"),
            "mode": claims.get("mode"),
            "cookies": sorted(request.cookies),
        },
        headers=_headers(claims),
    )


def make_app(state: State) -> web.Application:
    app = web.Application(middlewares=[faults], client_max_size=1024**3)
    app[STATE] = state
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/sse", sse)
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/page", page)
    app.router.add_get("/cookie", cookie)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


# -- control -----------------------------------------------------------------------------------------------
async def start_fault(request: web.Request) -> web.Response:
    state: State = request.app[STATE]
    body = await request.json()
    name, seconds = body["name"], float(body["seconds"])
    if name not in FAULTS:
        raise web.HTTPBadRequest(text=f"unknown fault {name}")
    state.fault, state.fault_until, state.param = name, time.monotonic() + seconds, float(body.get("param", 0))
    if name == "refuse" and state.site is not None:
        await state.site.stop()  # closes the listener: connecting is refused
        assert state.runner is not None and state.runner.server is not None
        for handler in state.runner.server.connections:  # and every connection of the app closes, as a stopped
            if handler.transport is not None:  # app's would: the gateway must find none to reuse
                handler.transport.close()
        state.site = None
        asyncio.get_running_loop().call_later(seconds, lambda: asyncio.ensure_future(_listen(state)))
    return web.json_response({"started": name, "seconds": seconds})


async def _listen(state: State) -> None:
    assert state.runner is not None
    for _ in range(50):
        try:
            site = web.TCPSite(state.runner, "127.0.0.1", state.port, reuse_address=True)
            await site.start()
        except OSError:
            await asyncio.sleep(0.1)
            continue
        state.site = site
        return


async def stats(request: web.Request) -> web.Response:
    state: State = request.app[STATE]
    return web.json_response(
        {**state.counters, "jtis": len(state.jtis), "fault": state.active(), "listening": state.site is not None}
    )


async def seen(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"jtis": state.jtis, "dupes": state.dupes})


async def marker(request: web.Request) -> web.Response:
    found = request.app[STATE].markers.get(request.match_info["m"])
    return web.json_response({"seen": found is not None, **(found or {})})


def control_app(state: State) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_post("/fault", start_fault)
    app.router.add_get("/stats", stats)
    app.router.add_get("/seen", seen)
    app.router.add_get("/marker/{m}", marker)
    return app


async def main(key_file: Path) -> None:
    logging.basicConfig(level=logging.ERROR)  # a fault's broken connection is the point, not news
    private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    state = State(private.public_key())
    state.runner = web.AppRunner(make_app(state), auto_decompress=False, access_log=None)
    await state.runner.setup()
    state.site = web.TCPSite(state.runner, "127.0.0.1", 0)
    await state.site.start()
    state.port = state.runner.addresses[0][1]
    control = web.AppRunner(control_app(state), access_log=None)
    await control.setup()
    await web.TCPSite(control, "127.0.0.1", 0).start()
    sys.stdout.write(json.dumps({"http": state.port, "control": control.addresses[0][1]}) + "\n")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        await control.cleanup()
        await state.runner.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(Path(sys.argv[1])))
