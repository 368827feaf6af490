"""Request bodies, as the gateway reads them: bounded in size and in time, and decoded only for its own use.

The server never decodes a body itself (``auto_decompress`` is off), so a pass-through body reaches the app
byte for byte. A body the gateway must read — a mint request, a carrier in a body, a confirmation — is read
whole within ``server.body_timeout_seconds`` and decoded here, with the size limit applied to the decoded
bytes: a gzip bomb is a 413 like any other oversize body, an unknown or corrupt encoding a 415.

A body the gateway forwards is first read up to the body limit within the same time (:func:`buffer`), so a
slow client holds no connection to the app; the rest of a larger one streams (:func:`stream`), bounded by its
pauses and by a least average pace (MIN_RATE), so that a trickle cannot hold the app's connections either.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

from aiohttp import StreamReader, web

from .errors import PayloadTooLarge, RequestTimeout, UnsupportedEncoding

MIN_RATE = 1024  # bytes a second: a streamed body's least average pace, after its first body_timeout seconds
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def read_raw(request: web.Request, limit: int, timeout: float) -> bytes:
    """The body as sent, refusing more than ``limit`` bytes (PayloadTooLarge, without reading past it) and a
    body that takes longer than ``timeout`` seconds to arrive (RequestTimeout)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(timeout) from None
    return b"".join(chunks)


async def read(request: web.Request, limit: int, timeout: float) -> tuple[bytes, bytes]:
    """The body as sent, and decoded from its ``Content-Encoding`` (at most ``limit`` bytes either way)."""
    raw = await read_raw(request, limit, timeout)
    encodings = request.headers.getall("Content-Encoding", [])
    return raw, decode(raw, encodings, limit) if encodings and raw else raw


def decode(data: bytes, encodings: list[str], limit: int) -> bytes:
    """Undo ``encodings`` (header values, applied in order) on ``data``; the result is at most ``limit`` bytes.

    gzip and deflate (zlib or raw) are decoded; identity is nothing; anything else, or data that does not
    decode, raises UnsupportedEncoding. Decompression stops as soon as the output passes ``limit``.
    """
    names = [e.strip().lower() for value in encodings for e in value.split(",") if e.strip()]
    for name in reversed(names):
        if name == "identity":
            continue
        if name not in _DECODERS:
            raise UnsupportedEncoding(name[:40])
        data = _inflate(data, name, limit)
    return data


def _inflate(data: bytes, name: str, limit: int) -> bytes:
    wbits = _DECODERS[name]
    for attempt in (wbits, -zlib.MAX_WBITS) if name == "deflate" else (wbits,):  # deflate is often sent raw
        out, rest = b"", data
        try:
            while True:  # gzip may hold several members, one after the other
                inflater = zlib.decompressobj(attempt)
                out += inflater.decompress(rest, limit + 1 - len(out))
                if len(out) > limit:
                    raise PayloadTooLarge(limit)
                rest = inflater.unused_data
                if not inflater.eof:  # cut short
                    break
                if not rest:
                    return out
                if name == "deflate":  # bytes after the end of the stream
                    break
        except zlib.error:
            continue
    raise UnsupportedEncoding(name)


async def buffer(reader: StreamReader, limit: int, timeout: float) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a body, within ``timeout`` seconds (RequestTimeout), and whether that was all."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while size <= limit:
                chunk = await reader.readany()
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)
                size += len(chunk)
    except TimeoutError:
        raise RequestTimeout(timeout) from None
    return b"".join(chunks), False


async def stream(reader: StreamReader, idle: float, stalled: list[bool], prefix: bytes = b"") -> AsyncIterator[bytes]:
    """``prefix``, then the rest of the body as it arrives; a pause longer than ``idle`` seconds ends it, and so
    does a body slower than MIN_RATE on average once ``idle`` seconds have passed (it must be whole by ``idle``
    seconds plus a second per MIN_RATE bytes), after setting ``stalled[0]`` so that the caller can tell a stalled
    client from a failing upstream."""
    if prefix:
        yield prefix
    loop = asyncio.get_running_loop()
    # One byte a second never pauses for long, yet holds the app's connection for as long as the client likes.
    deadline = loop.time() + idle
    while True:
        try:
            async with asyncio.timeout(min(idle, deadline - loop.time())):
                chunk = await reader.readany()
        except TimeoutError:
            stalled[0] = True
            raise
        if not chunk:
            return
        deadline += len(chunk) / MIN_RATE
        yield chunk
