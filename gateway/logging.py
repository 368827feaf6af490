"""structlog set-up: JSON lines (rendered with orjson) in production, a console renderer in development.

Libraries log through the standard library (aiohttp's HTTP parser, asyncio); their records become structlog
events too, carrying the record's message template and the exception's type but never its arguments, its
exception message or a traceback: for a request the parser refused, those quote the request's bytes, and
with them any grant or credential it held.
"""

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


class LibraryRecords(logging.Handler):
    """Standard-library log records as structlog events, with nothing of the request in them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._log = structlog.get_logger("gateway")

    def emit(self, record: logging.LogRecord) -> None:
        error = type(record.exc_info[1]).__name__ if record.exc_info and record.exc_info[1] else None
        template = str(record.msg)
        if record.name == "aiohttp.server" and template.startswith("Error handling request"):
            # The HTTP parser refused a request (its message quotes the offending line: never logged).
            client = record.args[0] if isinstance(record.args, tuple) and record.args else None
            self._log.warning("bad_request", client=str(client), error=error)
            return
        level = "error" if record.levelno >= logging.ERROR else "warning"
        getattr(self._log, level)("library_log", logger=record.name, message=template[:200], error=error)


def route_library_logs() -> None:
    """Send every standard-library log record of WARNING and above through :class:`LibraryRecords`."""
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, LibraryRecords)]
    root.addHandler(LibraryRecords())
    root.setLevel(min(root.level or logging.WARNING, logging.WARNING))


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
    route_library_logs()
