"""Forwarding to an app's upstream, the way a careful reverse proxy does.

- The upstream URL is built from the app's own scheme, host, port and base path plus the request's routed
  path and raw query: nothing a client sends can change where a request goes.
- Bodies go out byte for byte (the server does not decode them), with their own ``Content-Length``; a body
  of unknown or large size streams, and a client that pauses longer than ``server.body_timeout_seconds``
  gets 408.
- Headers: hop-by-hop ones, ``Host``, ``Expect``, any name with an underscore (CGI-style apps read
  ``X_Foo`` as ``X-Foo``) and ``X-Impersonation-Assertion`` never pass. Forwarding headers
  (``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``, ``Via``, ...) and method overrides pass only from a
  trusted proxy, which gets the peer appended to ``X-Forwarded-For``; anyone else's are dropped, and
  ``X-Forwarded-For``/``-Proto``/``-Host`` replaced by the gateway's own.
- Answers stream back as written (status, headers, body); upstream connections are pooled, bounded per
  upstream, checked before reuse, and timed out per app. An answer the upstream garbles (a HEAD answered
  with a body, a bad status line) is a 502, logged by its error class only: its bytes may quote the request.
- An answer to a redemption never gives the client the assertion back: a small answer that holds it is
  replaced by a short text (same status), a streamed one is cut where it would appear.
- WebSockets are bridged message by message: the app's handshake first (bounded in time, and a handshake
  with a body is refused: the app would wait for it), then its subprotocol mirrored, every message type
  relayed both ways with the close code and reason, without a size cap. WebSocket connections count against
  ``server.upstream_connections`` per upstream address, apart from the HTTP ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import StreamReader, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import body as bodies
from . import upstream as upstream_client
from .config import AppConfig, ServerConfig
from .errors import GatewayError, UpstreamUnavailable
from .logging import bind_request
from .routing import is_trusted
from .upstream import Answer, Held

log = structlog.get_logger("gateway")

STREAMING = web.RequestKey("streaming", bool)  # the relayed answer's status line is already sent
BUFFER_LIMIT = 64 * 1024  # upstream answers up to this size (with a Content-Length) are relayed in one piece
ASSERTION_HEADER = "X-Impersonation-Assertion"
HANDSHAKE_SECONDS = 30.0  # the longest wait for an app's answer to a WebSocket handshake, whatever read_timeout
WITHHELD = "The application's answer held the sign-in assertion; it is withheld.\n"
BANNER_LIMIT = 2 * 1024 * 1024  # a session's HTML page up to this size gets the banner (DESIGN §13); larger ones stream
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_CHANGED_DROPS = ("ETag", "Content-MD5", "Digest", "Content-Digest", "Repr-Digest")  # they describe the app's bytes

# RFC 9110 §7.6.1: these describe one connection, not the message, and are never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
_NEVER = HOP_BY_HOP | {"host", "expect", ASSERTION_HEADER.lower()}
# Who the client is and how it reached us: believed only from a trusted proxy (as is any X-Forwarded-*).
FORWARDING = (
    "Forwarded", "X-Real-IP", "True-Client-IP", "X-Client-IP", "X-Cluster-Client-IP", "CF-Connecting-IP",
    "Fastly-Client-IP", "X-Original-URL", "X-Original-URI", "X-Rewrite-URL", "X-Original-Host", "X-Host",
    "Client-IP", "X-ProxyUser-Ip", "X-Original-Forwarded-For", "Via",
    # What method the app runs: a client that may not send a DELETE must not make a POST one.
    "X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method",
)  # fmt: skip
_FORWARDING = frozenset(name.lower() for name in FORWARDING)
_REFUSAL_DROPS = HOP_BY_HOP | {"content-length", "content-encoding"}  # the relayed refusal has no body
_WS_HANDSHAKE = ("sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions")
# What becomes of an answer's Set-Cookie headers (an impersonation session keeps the app's HttpOnly ones, and sets or
# clears its own): given the answer's values, the values the client gets. It runs before any of the answer is relayed.
CookieFilter = Callable[[list[str]], Awaitable[list[str]]]
# Whether what a WebSocket belongs to (an impersonation session) still holds; asked every WATCH_SECONDS, so a session
# ended anywhere closes its WebSockets on every process within that (DESIGN §13: within 5 s). Its argument says
# whether the client sent a message since it was last asked (activity, for the session's idle limit).
Liveness = Callable[[bool], Awaitable[bool]]
WATCH_SECONDS = 2.0
_UNSENDABLE_CLOSE = {0: 1000, 1005: 1000, 1006: 1011, 1015: 1011}  # close codes no close frame may carry


class AnswerCut(ConnectionResetError):
    """An answer already begun that cannot be finished (the app broke it, or it held the assertion): all that is left
    is to cut the client's connection, so that what it got does not look whole."""


@dataclass(frozen=True)
class Upstream:
    """An app's upstream, parsed once: where its requests go and how long they may take."""

    scheme: str
    host: str
    port: int
    authority: str  # its Host header
    base: str  # the upstream URL's path, without a trailing slash
    connect_timeout: float
    read_timeout: float | None

    @classmethod
    def of(cls, app: AppConfig) -> Upstream:
        url = URL(app.upstream)
        assert url.raw_host is not None and url.port is not None  # config checked it is an absolute http(s) URL
        return cls(url.scheme, url.raw_host, url.port, url.raw_authority, url.raw_path.rstrip("/"),
                   app.connect_timeout_seconds, app.read_timeout_seconds or None)  # fmt: skip

    def url(self, raw_path: str, query: str) -> URL:
        return URL.build(scheme=self.scheme, authority=self.authority, path=self.base + raw_path,
                         query_string=query, encoded=True)  # fmt: skip

    def target(self, raw_path: str, query: str) -> str:
        """The request target for the app: its base path, the routed path and the raw query."""
        return self.base + raw_path + ("?" + query if query else "")


def request_headers(request: web.Request, trusted: tuple[str, ...]) -> CIMultiDict[str]:
    """The client's headers as the upstream may see them (see the module docstring), plus X-Forwarded-*."""
    headers = request.headers
    peer = request.remote or "unknown"
    from_proxy = is_trusted(peer, trusted)
    drop = _NEVER
    if "Connection" in headers:
        drop = drop | {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or "_" in lower:
            continue
        if not from_proxy and (lower in _FORWARDING or lower.startswith("x-forwarded-")):
            continue
        out.add(name, value)
    prior = ", ".join(out.popall("X-Forwarded-For", ()))
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    if "X-Forwarded-Proto" not in out:
        out["X-Forwarded-Proto"] = request.scheme
    if "X-Forwarded-Host" not in out:
        out["X-Forwarded-Host"] = request.host
    return out


class Proxy:
    """The upstream clients (:mod:`gateway.upstream` for HTTP, pooled and bounded per upstream address; aiohttp's
    for WebSockets, which hold a connection for as long as they live) and forwarding."""

    def __init__(self, server: ServerConfig) -> None:
        self.body_timeout = server.body_timeout_seconds
        self.trusted = server.trusted_proxies
        # At most upstream_connections WebSockets per upstream address: a handshake waits for room, within the
        # app's connect timeout (aiohttp's own limit would wait for its session's timeout instead).
        self.ws_limit = server.upstream_connections
        self._ws_slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self.http = upstream_client.Client(server.upstream_connections)
        # No redirects followed, no decompression, no cookie jar, no header the client did not send.
        self.ws = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=None),
        )
        # aiohttp sends a GET once more when the app drops its connection before answering: a handshake's assertion
        # is single-use, and the app may have read it (the soak saw apps get one twice).
        self.ws._retry_connection = False

    async def close(self) -> None:
        self.http.close()
        await self.ws.close()

    def headers(self, request: web.Request) -> CIMultiDict[str]:
        return request_headers(request, self.trusted)

    async def hold(self, request: web.Request, upstream: Upstream, *, websocket: bool = False) -> Held | Slot:
        """A connection to ``upstream`` for a request to send once its grant is spent; for a WebSocket, whose
        client opens its own, room for one among the upstream's WebSockets, and a connection opened and closed
        to know the app can be reached. Raises UpstreamUnavailable (``timeout`` when nothing came within the
        app's connect timeout)."""
        slot = None
        try:
            if not websocket:
                pool = self.http.pool(upstream.host, upstream.port, upstream.scheme == "https")
                return await self.http.hold(pool, upstream.connect_timeout)
            async with asyncio.timeout(upstream.connect_timeout):
                slot = await self._slot(upstream)
                _, writer = await asyncio.open_connection(upstream.host, upstream.port)
            writer.close()
            return slot
        except (OSError, aiohttp.ClientError) as exc:  # TimeoutError is an OSError
            if slot is not None:
                slot.release()
            bind_request(request)
            log.warning("upstream_unreachable", upstream=upstream.authority, error=type(exc).__name__)
            raise UpstreamUnavailable(timeout=isinstance(exc, TimeoutError)) from None

    async def _slot(self, upstream: Upstream) -> Slot:
        """Room for one more WebSocket to ``upstream``, waiting for it (the caller bounds the wait)."""
        slots = self._ws_slots.setdefault((upstream.host, upstream.port), asyncio.Semaphore(self.ws_limit))
        await slots.acquire()
        return Slot(slots)

    async def forward(
        self,
        request: web.Request,
        upstream: Upstream,
        raw_path: str,
        query: str,
        headers: CIMultiDict[str],
        body: bytes | StreamReader | None,
        *,
        method: str | None = None,
        expire_cookies: Iterable[str] = (),
        prefix: bytes = b"",
        held: Held | None = None,
        cookies: CookieFilter | None = None,
        banner: str | None = None,
        resign: Callable[[], str] | None = None,
    ) -> web.StreamResponse:
        """Send the request to ``upstream`` (on ``held`` first, when given) and stream its answer back (502
        unreachable or garbled, 504 too slow). A StreamReader ``body`` streams after ``prefix``, the part of it
        already read. A request carrying the assertion never has it echoed back (see the module docstring).
        ``cookies`` decides which Set-Cookie headers of the answer the client gets; ``banner`` (an impersonation
        session's notice, HTML) goes before the last ``</body>`` of an unencoded ``text/html`` answer of up to
        :data:`BANNER_LIMIT` bytes (see :func:`with_banner`).

        A request that a reused connection drops before any byte of its answer goes again on a new one (see
        :mod:`gateway.upstream`), but an assertion is single-use: the app never gets one twice. A request carrying
        one goes again only with a new one, from ``resign`` (a session's; a redemption's has none: 502)."""
        stalled = [False]
        resend = None
        if ASSERTION_HEADER in headers:

            def resend(again: CIMultiDict[str]) -> bool:
                if resign is not None:
                    again[ASSERTION_HEADER] = resign()
                return resign is not None

        data = bodies.stream(body, self.body_timeout, stalled, prefix) if isinstance(body, StreamReader) else body
        pool = self.http.pool(upstream.host, upstream.port, upstream.scheme == "https")
        try:
            async with await self.http.request(
                pool, method or request.method, upstream.target(raw_path, query), upstream.authority, headers, data,
                connect_timeout=upstream.connect_timeout, read_timeout=upstream.read_timeout, held=held, resend=resend,
            ) as answer:  # fmt: skip
                return await _relay(request, answer, expire_cookies, headers.get(ASSERTION_HEADER), cookies, banner)
        except AnswerCut:
            raise
        except (aiohttp.ClientError, OSError, ValueError, HttpProcessingError) as exc:  # TimeoutError is an OSError
            if request.get(STREAMING):  # the answer has begun: all that is left is to cut the connection
                if request.transport is not None and not request.transport.is_closing():  # the app broke it
                    bind_request(request)
                    log.warning("upstream_broke_answer", upstream=upstream.authority, error=type(exc).__name__)
                    raise AnswerCut() from exc
                raise ConnectionResetError("the client went away") from exc
            if stalled[0]:
                return _plain(408, "Request Timeout: the request body stopped arriving.\n", close=True)
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client went away") from exc
            bind_request(request)
            log.warning("upstream_unreachable", upstream=upstream.authority, error=type(exc).__name__)
            if isinstance(exc, TimeoutError):
                return _plain(504, "Gateway Timeout: the upstream application did not answer in time.\n")
            return _plain(502, "Bad Gateway: the upstream application did not answer.\n")

    async def bridge(
        self,
        request: web.Request,
        upstream: Upstream,
        raw_path: str,
        query: str,
        headers: CIMultiDict[str],
        slot: Slot | None = None,
        cookies: CookieFilter | None = None,
        alive: Liveness | None = None,
    ) -> web.StreamResponse:
        """Bridge a WebSocket (in ``slot``, when one was held for it): the app's handshake first (its refusal is
        relayed as is), then every message. ``cookies`` filters the handshake answer's Set-Cookie headers; once
        ``alive`` says no, the WebSocket is closed (1008)."""
        if slot is None:
            try:
                async with asyncio.timeout(upstream.connect_timeout):
                    slot = await self._slot(upstream)
            except TimeoutError:
                bind_request(request)
                log.warning("upstream_unreachable", upstream=upstream.authority, error="UpstreamTimeout")
                return _plain(504, "The upstream application did not accept the WebSocket.\n")
        try:
            return await self._bridge(request, upstream, raw_path, query, headers, cookies, alive)
        finally:
            slot.release()

    async def _bridge(
        self, request: web.Request, upstream: Upstream, raw_path: str, query: str, headers: CIMultiDict[str],
        cookies: CookieFilter | None, alive: Liveness | None,
    ) -> web.StreamResponse:  # fmt: skip
        protocols = [p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ()) for p in v.split(",")]
        for name in _WS_HANDSHAKE:
            headers.popall(name, None)
        # Bounded even with read_timeout 0 (none, for long polls): an app answers a handshake at once or not at all.
        limit = upstream.connect_timeout + min(upstream.read_timeout or HANDSHAKE_SECONDS, HANDSHAKE_SECONDS)
        try:
            async with asyncio.timeout(limit):
                app_ws = await self.ws.ws_connect(
                    upstream.url(raw_path, query), headers=headers, protocols=[p for p in protocols if p],
                    autoclose=False, autoping=False, max_msg_size=0, compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
                )  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:
            # The app's refusal, status and headers: aiohttp's client does not keep its body.
            response = web.Response(status=exc.status if exc.status >= 200 and exc.status != 101 else 502)
            for name, value in (exc.headers or {}).items():
                lower = name.lower()
                if lower not in _REFUSAL_DROPS and not lower.startswith("sec-websocket-"):
                    response.headers.add(name, value)
            return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            bind_request(request)
            log.warning("upstream_unreachable", upstream=upstream.authority, error=type(exc).__name__)
            status = 504 if isinstance(exc, TimeoutError) else 502
            return _plain(status, "The upstream application did not accept the WebSocket.\n")
        client_ws = web.WebSocketResponse(
            protocols=(app_ws.protocol,) if app_ws.protocol else (), autoclose=False, autoping=False,
            max_msg_size=0, compress=False,
        )  # fmt: skip
        answer: CIMultiDictProxy[str] | None = getattr(getattr(app_ws, "_response", None), "headers", None)
        set_cookies = list(answer.getall("Set-Cookie", ())) if answer is not None else []
        if cookies is not None:
            set_cookies = await cookies(set_cookies)
        for value in set_cookies:
            client_ws.headers.add("Set-Cookie", value)
        try:
            await client_ws.prepare(request)
        except BaseException:
            await app_ws.close(code=1001)
            raise
        request[STREAMING] = True
        await _bridge(client_ws, app_ws, alive)
        return client_ws


class Slot:
    """Room for one WebSocket among its upstream's ``server.upstream_connections``."""

    __slots__ = ("_slots",)

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


async def _relay(
    request: web.Request, answer: Answer, expire_cookies: Iterable[str], assertion: str | None,
    cookies: CookieFilter | None = None, banner: str | None = None,
) -> web.StreamResponse:  # fmt: skip
    length = answer.content_length
    small = length is not None and length <= BUFFER_LIMIT and request.method != "HEAD"
    # A page that may get the banner is read first (up to BANNER_LIMIT, then what came streams on unchanged).
    read: bytes | None = None
    if banner is not None and request.method != "HEAD" and _takes_banner(answer):
        if length is not None:
            if length <= BANNER_LIMIT:
                read, small = await answer.body.read(), True
        else:
            read = await _read_up_to(answer.body, BANNER_LIMIT + 1)
            small = len(read) <= BANNER_LIMIT
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in answer.headers.items():
        lower = name.lower()
        kept_back = cookies is not None and lower == "set-cookie"  # the filter's values are added below
        if lower not in HOP_BY_HOP and not (small and lower == "content-length") and not kept_back:
            headers.add(name, value)
    if cookies is not None:
        for value in await cookies(list(answer.headers.getall("Set-Cookie", ()))):
            headers.add("Set-Cookie", value)
    # The assertion's signature is what makes it a credential: an answer must not hand it to the client.
    secret = assertion.rpartition(".")[2].encode() if assertion else None
    # A small answer of known length goes back in one write; anything else streams as it comes.
    if small:
        body = read if read is not None else await answer.body.read()
        if secret is not None and _holds(body, secret, answer.headers):
            _withheld(request, answer.status)
            headers = CIMultiDict((n, v) for n, v in headers.items() if not n.lower().startswith(_ABOUT_BODY))
            body = WITHHELD.encode()
            headers["Content-Type"] = "text/plain; charset=utf-8"
        elif read is not None and banner is not None:
            changed = with_banner(body, banner, answer.headers.get("Content-Type", ""))
            if changed is not None:
                body = changed
                for name in _CHANGED_DROPS:
                    headers.popall(name, None)
        response = web.Response(status=answer.status, reason=answer.reason, headers=headers)
        _expire(response, expire_cookies)
        response.body = body
        return response
    streamed = web.StreamResponse(status=answer.status, reason=answer.reason, headers=headers)
    _expire(streamed, expire_cookies)
    await streamed.prepare(request)
    request[STREAMING] = True
    if secret is None:
        if read:
            await streamed.write(read)
        async for chunk in answer.body.iter_any():
            await streamed.write(chunk)
    else:  # the last bytes of each chunk wait for the next: the signature may straddle two
        keep, tail = len(secret) - 1, b""
        async for chunk in _chained(read, answer.body):
            chunk = tail + chunk
            if secret in chunk:
                _withheld(request, answer.status)
                raise AnswerCut("the answer held the assertion")
            tail = chunk[-keep:]
            await streamed.write(chunk[:-keep])
        await streamed.write(tail)
    await streamed.write_eof()
    return streamed


_ABOUT_BODY = ("content-", "etag", "digest", "last-modified")


def _takes_banner(answer: Answer) -> bool:
    """Whether an answer may get a session's banner: a ``text/html`` body, not encoded (nor a status without a
    body)."""
    if answer.status < 200 or answer.status in (204, 304):
        return False
    if any(e.strip().lower() not in ("", "identity") for v in answer.headers.getall("Content-Encoding", ())
           for e in v.split(",")):  # fmt: skip
        return False
    media = answer.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    return media == "text/html"


def with_banner(body: bytes, banner: str, content_type: str) -> bytes | None:
    """``body`` (an HTML page of ``content_type``) with ``banner`` put before its last ``</body>``, in the page's
    charset (utf-8 unless the Content-Type names another); None when the page stays as it is: it has no
    ``</body>``, or does not decode (or encode back) in its charset."""
    charset = "utf-8"
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"'):
            charset = value.strip().strip('"')
    try:
        text = body.decode(charset)
        ends = [match.start() for match in _BODY_END.finditer(text)]
        if not ends:
            return None
        return (text[: ends[-1]] + banner + text[ends[-1] :]).encode(charset, errors="xmlcharrefreplace")
    except (LookupError, UnicodeError):
        return None


async def _read_up_to(body: StreamReader, limit: int) -> bytes:
    """Read ``body`` until its end or ``limit`` bytes, whichever comes first."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await body.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


async def _chained(first: bytes | None, body: StreamReader) -> AsyncIterator[bytes]:
    """``first`` (what was already read of ``body``, if anything), then the rest of ``body`` as it comes."""
    if first:
        yield first
    async for chunk in body.iter_any():
        yield chunk


def _holds(body: bytes, secret: bytes, headers: CIMultiDictProxy[str]) -> bool:
    """Whether ``body`` holds ``secret``, as sent or once decoded from its Content-Encoding (when it decodes)."""
    if secret in body:
        return True
    encodings = headers.getall("Content-Encoding", [])
    if not encodings:
        return False
    try:
        return secret in bodies.decode(body, encodings, 16 * BUFFER_LIMIT)
    except GatewayError:  # not one the gateway decodes, or too large: nor would a client see it plainly
        return False


def _withheld(request: web.Request, status: int) -> None:
    bind_request(request)
    log.warning("assertion_withheld", status=status)


def _expire(response: web.StreamResponse, cookies: Iterable[str]) -> None:
    for cookie in cookies:
        response.del_cookie(cookie, path="/")


def _plain(status: int, text: str, *, close: bool = False) -> web.Response:
    response = web.Response(status=status, text=text)
    if close:
        response.force_close()
    return response


async def _bridge(
    client: web.WebSocketResponse, app: aiohttp.ClientWebSocketResponse, alive: Liveness | None = None
) -> None:
    """Relay messages both ways until one side closes or goes away; then close the other side the same way. With
    ``alive``, asked every :data:`WATCH_SECONDS`: once it says no, both sides are closed with 1008."""
    activity = [
        False
    ]  # set at each of the client's messages (the app's are not the user's activity), cleared by the watcher
    to_app = asyncio.create_task(_pump(client, app, activity))
    to_client = asyncio.create_task(_pump(app, client, [False]))
    watcher = asyncio.create_task(_watch(alive, activity)) if alive is not None else None
    tasks = (to_app, to_client) if watcher is None else (to_app, to_client, watcher)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    first = to_app if to_app in done else to_client
    closed = None if first.cancelled() or first.exception() is not None else first.result()
    if watcher is not None and watcher in done and not watcher.cancelled() and watcher.exception() is None:
        code, reason = 1008, "impersonation session ended"
    elif closed is None:  # a side went away without a close frame
        code, reason = (1001, "") if first is to_app else (1011, "")
    else:
        code, reason = _UNSENDABLE_CLOSE.get(closed[0], closed[0]), closed[1]
    # Both at once: the side that closed waits for our answer while the other is told.
    await asyncio.gather(
        client.close(code=code, message=reason.encode()), app.close(code=code, message=reason.encode()),
        return_exceptions=True,
    )  # fmt: skip


async def _watch(alive: Liveness, activity: list[bool]) -> None:
    """Return once ``alive()`` says no (a failing check counts as yes: a store hiccup closes nothing); it is told
    whether messages went since the last time."""
    while True:
        await asyncio.sleep(WATCH_SECONDS)
        active, activity[0] = activity[0], False
        try:
            if not await alive(active):
                return
        except Exception:  # StoreUnavailable, a cancelled batch: ask again next time
            continue


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    target: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    activity: list[bool],
) -> tuple[int, str] | None:
    """Relay ``source``'s messages to ``target`` (each send waits for the target to take it: backpressure); the
    close code and reason when ``source`` sends a close frame, None when it goes away."""
    while True:
        message = await source.receive()
        kind = message.type
        activity[0] = True
        if kind is WSMsgType.TEXT:
            await target.send_str(message.data)
        elif kind is WSMsgType.BINARY:
            await target.send_bytes(message.data)
        elif kind is WSMsgType.PING:
            await target.ping(message.data)
        elif kind is WSMsgType.PONG:
            await target.pong(message.data)
        elif kind is WSMsgType.CLOSE:
            return int(message.data or 0), str(message.extra or "")
        else:  # CLOSING, CLOSED, ERROR
            return None
