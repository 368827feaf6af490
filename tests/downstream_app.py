"""A downstream app for the pass-through tests, run as its own process: ``python -m tests.downstream_app``.

It serves two listeners on free ports and prints them as one JSON line on stdout (``{"http": N, "raw": M}``):

- ``http``: an aiohttp app that never decodes request bodies (``auto_decompress=False``), with endpoints that
  echo what they received, answer slowly, stream, redirect with several cookies, and a WebSocket endpoint
  that tells the client its handshake and records how the client closed;
- ``raw``: a bare asyncio server that answers one request per connection with a keep-alive HTTP/1.1 answer
  (no ``Connection: close``) and then closes the connection shortly after, as an app with a short idle
  timeout does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
from typing import Any

from aiohttp import WSMsgType, web

RAW_CLOSE_AFTER = 0.05  # seconds the raw server keeps a connection open after its answer
SSE_MAX_WAIT = 30.0  # seconds an event stream waits for the test's go-ahead before its second event

CLOSES: dict[str, dict[str, Any]] = {}  # WebSocket id -> how the client closed
RELEASES: dict[str, asyncio.Event] = {}  # event stream id -> its go-ahead
RAW_STATS = {"requests": 0, "closed": 0}


def _headers(request: web.Request) -> list[list[str]]:
    """Every header as it came on the wire: names as spelled, in order, duplicates kept."""
    return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in request.raw_headers]


async def echo(request: web.Request) -> web.Response:
    """What arrived: method, raw target, every header in order, and the body's length and sha256."""
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "target": request.raw_path,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": _headers(request),
            "length": length,
            "sha256": digest.hexdigest(),
        }
    )


async def pause(request: web.Request) -> web.Response:
    """Answers after ``?seconds=``: for read timeouts."""
    seconds = float(request.query["seconds"])
    await asyncio.sleep(seconds)
    return web.Response(text=f"slept {seconds}")


async def cookies(request: web.Request) -> web.Response:
    """A redirect with several cookies."""
    response = web.Response(status=302, text="moved", headers={"Location": "/elsewhere?from=cookies"})
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/app; HttpOnly")
    response.headers.add("Set-Cookie", "c=3; Max-Age=60; Secure; SameSite=Lax")
    return response


async def small(request: web.Request) -> web.Response:
    return web.Response(text="a small answer\n", headers={"X-App": "small"})


async def streamed(request: web.Request) -> web.StreamResponse:
    """An answer of unknown length, written in pieces."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain", "X-App": "streamed"})
    await response.prepare(request)
    for i in range(5):
        await response.write(f"piece {i}\n".encode())
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def events(request: web.Request) -> web.StreamResponse:
    """An event stream: one event, then nothing until the test says go (``POST /release/{id}``), then one more."""
    release = RELEASES.setdefault(request.query["id"], asyncio.Event())
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(b"id: 1\ndata: first\n\n")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(release.wait(), SSE_MAX_WAIT)
    await response.write(b"id: 2\ndata: second\n\n")
    await response.write_eof()
    return response


async def release(request: web.Request) -> web.Response:
    RELEASES.setdefault(request.match_info["id"], asyncio.Event()).set()
    return web.Response(text="released")


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Chooses ``v2``; first tells the client its handshake, then echoes; ``close-4404`` closes with 4404."""
    ws = web.WebSocketResponse(protocols=("v2",), max_msg_size=0, autoclose=False, autoping=True)
    await ws.prepare(request)
    await ws.send_str(
        json.dumps({"target": request.raw_path, "headers": _headers(request), "protocol": ws.ws_protocol})
    )
    ws_id = request.query.get("id", "")
    while True:
        message = await ws.receive()
        if message.type is WSMsgType.TEXT:
            if message.data == "close-4404":
                await ws.close(code=4404, message=b"document deleted")
                CLOSES[ws_id] = {"by": "app"}
                break
            await ws.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
        elif message.type is WSMsgType.CLOSE:
            CLOSES[ws_id] = {"by": "client", "code": message.data, "reason": message.extra}
            await ws.close()
            break
        else:  # the connection went away without a close frame
            CLOSES[ws_id] = {"by": "nobody", "type": message.type.name}
            break
    return ws


async def closed(request: web.Request) -> web.Response:
    """How the client of WebSocket ``{id}`` closed (404 while it is open)."""
    found = CLOSES.get(request.match_info["id"])
    if found is None:
        raise web.HTTPNotFound()
    return web.json_response(found)


async def refuse(request: web.Request) -> web.Response:
    """Refuses the WebSocket handshake."""
    return web.Response(status=403, text="no websocket for you", headers={"X-Refused": "yes"})


async def raw_stats(request: web.Request) -> web.Response:
    return web.json_response(RAW_STATS)


async def raw_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request, a keep-alive answer naming what arrived, then the connection closes."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        fields = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = b""
        if "content-length" in fields:
            body = await reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
        RAW_STATS["requests"] += 1
        answer = f"{method} {target} {len(body)} {hashlib.sha256(body).hexdigest()[:16]}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(answer))
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(RAW_CLOSE_AFTER)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        RAW_STATS["closed"] += 1


def make_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/ws-refuse", refuse)
    app.router.add_get("/ws-closed/{id}", closed)
    app.router.add_get("/sse", events)
    app.router.add_post("/release/{id}", release)
    app.router.add_get("/pause", pause)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/small", small)
    app.router.add_get("/streamed", streamed)
    app.router.add_get("/raw-stats", raw_stats)
    app.router.add_route("*", "/echo", echo)
    return app


async def main() -> None:
    runner = web.AppRunner(make_app(), auto_decompress=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    raw = await asyncio.start_server(raw_connection, "127.0.0.1", 0)
    ports = {"http": runner.addresses[0][1], "raw": raw.sockets[0].getsockname()[1]}
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        raw.close()
        await runner.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
