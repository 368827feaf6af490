"""Request bodies: decoding (the limit applies to the decoded bytes), and reading bounded in size, time and pace,
against a StreamReader each test feeds itself."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast
from unittest import mock

import pytest
from aiohttp import StreamReader, web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway import body
from gateway.errors import PayloadTooLarge, RequestTimeout, UnsupportedEncoding

TEXT = b'{"account_id": 505, "reason": "ticket 42"}'


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def reader(*chunks: bytes, eof: bool = True) -> StreamReader:
    """A StreamReader holding ``chunks``, ended unless ``eof`` is false."""
    stream = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    for chunk in chunks:
        stream.feed_data(chunk)
    if eof:
        stream.feed_eof()
    return stream


def request(stream: StreamReader, **headers: str) -> web.Request:
    return make_mocked_request("POST", "/mint", headers=CIMultiDict(headers), payload=stream)


async def collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in chunks]


# -- decode ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "encodings"),
    [
        pytest.param(gzip.compress(TEXT), ["gzip"], id="gzip"),
        pytest.param(gzip.compress(TEXT), ["x-gzip"], id="x-gzip"),
        pytest.param(gzip.compress(TEXT), [" GZip "], id="case-and-blanks"),
        pytest.param(zlib.compress(TEXT), ["deflate"], id="deflate-zlib"),
        pytest.param(raw_deflate(TEXT), ["deflate"], id="deflate-raw"),
        pytest.param(TEXT, ["identity"], id="identity"),
        pytest.param(TEXT, [], id="none"),
        pytest.param(gzip.compress(zlib.compress(TEXT)), ["deflate, gzip"], id="two-in-one-header"),
        pytest.param(gzip.compress(zlib.compress(TEXT)), ["deflate", "gzip"], id="two-headers"),
        pytest.param(zlib.compress(gzip.compress(TEXT)), ["gzip", "identity", "deflate"], id="with-identity"),
        pytest.param(gzip.compress(TEXT[:10]) + gzip.compress(TEXT[10:]), ["gzip"], id="two-gzip-members"),
    ],
)
def test_decode_undoes_encodings_in_order(data: bytes, encodings: list[str]) -> None:
    assert body.decode(data, encodings, 1000) == TEXT


@pytest.mark.parametrize(
    ("data", "encodings", "named"),
    [
        pytest.param(gzip.compress(TEXT)[:-4], ["gzip"], "gzip", id="gzip-cut-short"),
        pytest.param(zlib.compress(TEXT)[:-6], ["deflate"], "deflate", id="deflate-cut-short"),
        pytest.param(b"plain text, not gzip", ["gzip"], "gzip", id="not-gzip"),
        pytest.param(b"", ["gzip"], "gzip", id="empty"),
        pytest.param(zlib.compress(TEXT) + b"junk", ["deflate"], "deflate", id="bytes-after-deflate"),
        pytest.param(gzip.compress(TEXT) + b"junk", ["gzip"], "gzip", id="bytes-after-gzip"),
        pytest.param(TEXT, ["br"], "br", id="unknown"),
        pytest.param(TEXT, ["gzip, compress"], "compress", id="last-applied-first"),
        pytest.param(TEXT, ["x" * 60], "x" * 40, id="long-name-cut"),
    ],
)
def test_decode_refuses_what_does_not_decode(data: bytes, encodings: list[str], named: str) -> None:
    with pytest.raises(UnsupportedEncoding) as refused:
        body.decode(data, encodings, 1000)
    assert refused.value.encoding == named


@pytest.mark.parametrize(
    ("data", "encodings"),
    [
        pytest.param(gzip.compress(b"a" * 1001), ["gzip"], id="gzip"),
        pytest.param(zlib.compress(b"a" * 1001), ["deflate"], id="deflate-zlib"),
        pytest.param(raw_deflate(b"a" * 1001), ["deflate"], id="deflate-raw"),
        pytest.param(gzip.compress(b"a" * 600) * 2, ["gzip"], id="members-together"),
        pytest.param(gzip.compress(b"a" * 10_000_000), ["gzip"], id="bomb"),  # 10 MB from about 10 kB
    ],
)
def test_decode_refuses_output_over_the_limit(data: bytes, encodings: list[str]) -> None:
    with pytest.raises(PayloadTooLarge) as refused:
        body.decode(data, encodings, 1000)
    assert refused.value.limit == 1000


def test_decode_allows_output_of_exactly_the_limit() -> None:
    assert body.decode(gzip.compress(b"a" * 1000), ["gzip"], 1000) == b"a" * 1000


def test_decode_applies_the_limit_to_every_step() -> None:
    """A short text grows when compressed: its first decoding step is already over a limit it fits in."""
    data = gzip.compress(zlib.compress(TEXT))
    assert len(zlib.compress(TEXT)) > len(TEXT)
    with pytest.raises(PayloadTooLarge):
        body.decode(data, ["deflate", "gzip"], len(TEXT))


# -- read_raw and read ---------------------------------------------------------------------------------------------
async def test_read_raw_joins_the_chunks() -> None:
    assert await body.read_raw(request(reader(b"ab", b"cd", b"e")), 5, 10) == b"abcde"


async def test_read_raw_refuses_a_declared_length_over_the_limit_without_reading() -> None:
    stream = reader(eof=False)  # nothing ever arrives: reading would time out instead
    with pytest.raises(PayloadTooLarge) as refused:
        await body.read_raw(request(stream, **{"Content-Length": "6"}), 5, 10)
    assert refused.value.limit == 5


async def test_read_raw_refuses_chunks_over_the_limit() -> None:
    with pytest.raises(PayloadTooLarge) as refused:
        await body.read_raw(request(reader(b"abc", b"def", eof=False)), 5, 10)
    assert refused.value.limit == 5


async def test_read_raw_refuses_a_body_that_does_not_arrive_in_time() -> None:
    with pytest.raises(RequestTimeout) as refused:
        await body.read_raw(request(reader(b"ab", eof=False)), 5, 0.01)
    assert refused.value.seconds == 0.01


@pytest.mark.parametrize(
    ("sent", "headers", "decoded"),
    [
        (TEXT, {}, TEXT),
        (gzip.compress(TEXT), {"Content-Encoding": "gzip"}, TEXT),
        (zlib.compress(TEXT), {"Content-Encoding": "deflate"}, TEXT),
        (b"", {"Content-Encoding": "gzip"}, b""),  # an empty body needs no decoding
    ],
)
async def test_read_returns_the_body_as_sent_and_decoded(sent: bytes, headers: dict[str, str], decoded: bytes) -> None:
    assert await body.read(request(reader(sent), **headers), 100, 10) == (sent, decoded)


async def test_read_applies_the_limit_to_the_decoded_body() -> None:
    sent = gzip.compress(b"a" * 101)
    assert len(sent) < 100
    with pytest.raises(PayloadTooLarge):
        await body.read(request(reader(sent), **{"Content-Encoding": "gzip"}), 100, 10)


async def test_read_refuses_an_unknown_encoding() -> None:
    with pytest.raises(UnsupportedEncoding) as refused:
        await body.read(request(reader(TEXT), **{"Content-Encoding": "zstd"}), 100, 10)
    assert refused.value.encoding == "zstd"


# -- buffer --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("chunks", "eof", "expected"),
    [
        ((b"ab", b"cd"), True, (b"abcd", True)),
        ((b"abcd",), True, (b"abcd", True)),  # exactly the limit, then the end
        ((), True, (b"", True)),
        ((b"ab", b"cde"), False, (b"abcde", False)),  # past the limit: no waiting for the rest
        ((b"abcde",), False, (b"abcde", False)),
    ],
)
async def test_buffer_reads_up_to_the_limit(chunks: tuple[bytes, ...], eof: bool, expected: tuple[bytes, bool]) -> None:
    assert await body.buffer(reader(*chunks, eof=eof), 4, 10) == expected


async def test_buffer_refuses_a_body_that_does_not_arrive_in_time() -> None:
    with pytest.raises(RequestTimeout) as refused:
        await body.buffer(reader(b"ab", eof=False), 4, 0.01)
    assert refused.value.seconds == 0.01


# -- stream --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prefix", "chunks", "expected"),
    [
        (b"pre", (b"ab", b"cd"), [b"pre", b"abcd"]),  # what has arrived is read at once
        (b"", (b"ab",), [b"ab"]),
        (b"pre", (), [b"pre"]),
    ],
)
async def test_stream_yields_the_prefix_then_the_rest(
    prefix: bytes, chunks: tuple[bytes, ...], expected: list[bytes]
) -> None:
    stalled = [False]
    assert await collect(body.stream(reader(*chunks), 10, stalled, prefix)) == expected
    assert stalled == [False]


async def test_stream_ends_after_a_pause_longer_than_idle() -> None:
    stalled = [False]
    got: list[bytes] = []
    with pytest.raises(TimeoutError):
        async for chunk in body.stream(reader(b"ab", eof=False), 0.01, stalled):
            got.append(chunk)
    assert (got, stalled) == ([b"ab"], [True])


class Clock:
    """The event loop's clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("elapsed", "stalls"), [(10 + 2 - 0.5, False), (10 + 2 + 0.5, True)])
async def test_stream_must_keep_the_least_average_pace(
    monkeypatch: pytest.MonkeyPatch, elapsed: float, stalls: bool
) -> None:
    """Pauses shorter than ``idle`` are not enough: the body must be whole by idle + bytes / MIN_RATE seconds."""
    loop = asyncio.get_running_loop()
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    stream, stalled = reader(b"x" * (2 * body.MIN_RATE), eof=False), [False]
    chunks = cast(AsyncGenerator[bytes, None], body.stream(stream, 10, stalled))
    assert await anext(chunks) == b"x" * (2 * body.MIN_RATE)  # allowed until 10 + 2 seconds from the start
    clock.now += elapsed  # then the client pauses, for less than idle each time
    loop.call_soon(stream.feed_data, b"y")  # arrives on the clock's next turn, if the deadline has not passed
    if stalls:
        with pytest.raises(TimeoutError):
            await anext(chunks)
    else:
        assert await anext(chunks) == b"y"
    assert stalled == [stalls]
    await chunks.aclose()
