"""structlog set-up: JSON lines (rendered with orjson) in production, a console renderer in development."""

from __future__ import annotations

import atexit
import io
import logging
import sys
from typing import Any

import orjson
import structlog

FLUSH_SECONDS = 0.2


class _BlockWriter:
    """stdout for JSON lines, written in blocks: one system call per many lines instead of one per line.

    ``flush_logs()`` empties it (the app does so every FLUSH_SECONDS and at shutdown; atexit too), so a
    line reaches the output within a fraction of a second.
    """

    def __init__(self, fileno: int) -> None:
        self._out = io.BufferedWriter(io.FileIO(fileno, "wb", closefd=False), 1 << 16)
        self.write = self._out.write

    def flush(self) -> None:  # structlog flushes after every line: keep the block instead
        pass

    def flush_now(self) -> None:
        self._out.flush()


_writer: _BlockWriter | None = None


def flush_logs() -> None:
    """Write out buffered log lines (a no-op unless JSON logging to stdout is configured)."""
    if _writer is not None:
        _writer.flush_now()


def configure_logging(*, json: bool = True, level: int = logging.INFO) -> None:
    """Configure structlog once for the process; request ids travel in contextvars."""
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if json:
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        global _writer
        sys.stdout.flush()
        _writer = _BlockWriter(sys.stdout.fileno())
        atexit.register(_writer.flush_now)
        factory: Any = structlog.BytesLoggerFactory(_writer)  # type: ignore[arg-type]
    else:
        processors.append(structlog.dev.ConsoleRenderer())
        factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
