"""Forwarding to an app's upstream: the request goes out as given, the answer streams back as it comes."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

log = structlog.get_logger("gateway")

STREAMING = web.RequestKey("streaming", bool)  # the relayed answer's status line is already sent
BUFFER_LIMIT = 64 * 1024  # upstream answers up to this size (with a Content-Length) are relayed in one piece

# RFC 9110 §7.6.1: these describe one connection, not the message, and are never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip


def upstream_session() -> aiohttp.ClientSession:
    """A client that relays answers untouched: no redirects followed, no decompression, no cookie jar."""
    return aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=60),
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
    )


def forward_headers(request: web.Request, client: str) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones and Host, plus X-Forwarded-*."""
    connection_tokens = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_tokens or lower == "host":
            continue
        headers.add(name, value)
    # The client's own wish, or none: the answer is relayed as it comes, never decompressed, so the
    # upstream must not compress for a client that did not ask (aiohttp would ask for gzip by default).
    headers.setdefault("Accept-Encoding", "identity")
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    return headers


async def forward(
    session: aiohttp.ClientSession,
    request: web.Request,
    upstream: str,
    *,
    method: str,
    path_qs: str,
    headers: CIMultiDict[str],
    body: bytes | aiohttp.StreamReader | None,
    extra_headers: Mapping[str, str] | None = None,
    expire_cookies: tuple[str, ...] = (),
) -> web.StreamResponse:
    """Send the request to ``upstream`` + ``path_qs`` and stream the answer back (502 if it cannot be reached)."""
    url = URL(upstream.rstrip("/") + path_qs, encoded=True)
    try:
        async with session.request(
            method, url, headers=headers, data=body, allow_redirects=False, compress=None
        ) as upstream_response:
            length = upstream_response.content_length
            small = length is not None and length <= BUFFER_LIMIT and request.method != "HEAD"
            # A small answer of known length goes back in one write; anything else streams as it comes.
            response = web.Response(status=upstream_response.status, reason=upstream_response.reason) if small \
                else web.StreamResponse(status=upstream_response.status, reason=upstream_response.reason)  # fmt: skip
            for name, value in upstream_response.headers.items():
                if name.lower() not in HOP_BY_HOP and not (small and name.lower() == "content-length"):
                    response.headers.add(name, value)
            for name, value in (extra_headers or {}).items():
                response.headers[name] = value
            for cookie in expire_cookies:
                response.del_cookie(cookie, path="/")
            if isinstance(response, web.Response):
                response.body = await upstream_response.read()
                return response
            await response.prepare(request)
            request[STREAMING] = True
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("upstream_unreachable", upstream=upstream, error=type(exc).__name__)
        if request.get(STREAMING):  # the answer has begun: all that is left is to cut the connection
            raise
        return web.Response(status=502, text="Bad Gateway: the upstream application did not answer.\n")
