"""The gateway as ``impersonation-gateway serve`` runs one worker, with its Redis round trips counted.

redis-py sends every command, pipeline and script call with one ``send_packed_command`` and then reads
the answers, so wrapping that method counts round trips (connection handshakes included) without
touching the gateway: it runs through ``gateway.cli.run_worker`` unchanged. ``GET /stats`` on a side
port, served by a thread that sleeps between polls, returns ``{"round_trips": N, "by_command": {...}}``
(round trips by the name of their first command: ``set`` for a pipeline that starts with SET).

    python -m bench.server --config bench.yaml --port 8080 --stats-port 8090
"""

from __future__ import annotations

import argparse
import threading
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio.connection import AbstractConnection

from gateway.cli import run_worker
from gateway.config import load_config

ROUND_TRIPS: Counter[str] = Counter()  # by the name of the first command sent (a pipeline's first)


def count_round_trips() -> None:
    """Count each ``send_packed_command`` of every redis-py asyncio connection in :data:`ROUND_TRIPS`."""
    send = AbstractConnection.send_packed_command

    async def counted(
        self: AbstractConnection, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        ROUND_TRIPS[_first_command(command)] += 1
        await send(self, command, check_health)

    setattr(AbstractConnection, "send_packed_command", counted)  # noqa: B010 - mypy refuses a method assignment


def _first_command(command: bytes | str | Iterable[bytes]) -> str:
    """The name in ``*<n>\\r\\n$<len>\\r\\n<name>\\r\\n...``, the RESP array redis-py packs."""
    first = command if isinstance(command, bytes | str) else (command[0] if isinstance(command, list) else b"")
    parts = (first.encode() if isinstance(first, str) else bytes(first)).split(b"\r\n", 3)
    return parts[2].decode("ascii", "replace").lower() if len(parts) > 2 else "?"


class StatsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = orjson.dumps({"round_trips": ROUND_TRIPS.total(), "by_command": dict(ROUND_TRIPS)})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_stats(port: int) -> None:
    server = HTTPServer(("127.0.0.1", port), StatsHandler)
    threading.Thread(target=server.serve_forever, name="bench-stats", daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats-port", type=int, required=True)
    args = parser.parse_args()
    config = load_config(args.config)
    count_round_trips()
    serve_stats(args.stats_port)
    run_worker(config, args.host, args.port, False, False)


if __name__ == "__main__":
    main()
