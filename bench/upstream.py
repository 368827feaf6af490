"""The minimal upstream: a keep-alive HTTP/1.1 responder on a bare asyncio protocol (uvloop).

It answers every request with the same small JSON body, so that the proxying cases spend as little of
the machine as possible on the far side of the hop. It counts the requests it saw and those that carried
the gateway's assertion; ``GET /upstream-stats`` returns both. Request bodies are read by
Content-Length (the benchmark sends none, and never a chunked one).

    python -m bench.upstream --port 9001
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import orjson
import uvloop

BODY = b'{"app":"bench-upstream","status":"ok"}'
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
STATS_REQUEST = b"get /upstream-stats "
ASSERTION_HEADER = b"\r\nx-impersonation-assertion:"
CONTENT_LENGTH = b"\r\ncontent-length:"


class Counters:
    requests = 0
    assertions = 0


class Responder(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of asyncio's

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).lower()
            total = end + 4 + _content_length(head)
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            if head.startswith(STATS_REQUEST):
                self.transport.write(_stats_response())
                continue
            Counters.requests += 1
            if ASSERTION_HEADER in head:
                Counters.assertions += 1
            self.transport.write(RESPONSE)


def _content_length(head: bytes) -> int:
    start = head.find(CONTENT_LENGTH)
    if start < 0:
        return 0
    start += len(CONTENT_LENGTH)
    end = head.find(b"\r\n", start)
    return int(head[start : end if end >= 0 else len(head)].strip() or 0)


def _stats_response() -> bytes:
    body = orjson.dumps({"requests": Counters.requests, "assertions": Counters.assertions})
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Responder, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
