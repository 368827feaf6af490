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
import os
import sys
import time
import traceback
from typing import Any

import orjson
import structlog
from aiohttp import web

FLUSH_SECONDS = 0.2
REQUEST_ID = web.RequestKey("request_id", str)
_BOUND = web.RequestKey("log_context_bound", bool)


def bind_request(request: web.Request) -> None:
    """Give every event logged from here on in this request its ``request_id``.

    Only requests that log more than their request line (mints, redemptions, failures) pay for it: the
    request middleware logs the id itself and unbinds it afterwards (aiohttp runs a connection's requests in
    one task, so a binding would otherwise outlive its request).
    """
    if not request.get(_BOUND):
        structlog.contextvars.bind_contextvars(request_id=request[REQUEST_ID])
        request[_BOUND] = True


def unexpected(exc: BaseException) -> dict[str, str]:
    """What to log of an unexpected exception: its class and where it was raised (file, line and function of the
    innermost frames), never its message nor a traceback's text, which may quote request or answer bytes."""
    frames = reversed(traceback.extract_tb(exc.__traceback__)[-6:])
    where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in frames)
    return {"error": type(exc).__name__, "at": where}


def unbind_request(request: web.Request) -> None:
    if request.get(_BOUND):
        structlog.contextvars.clear_contextvars()


class _Timestamp:
    """ISO 8601 UTC with microseconds, like structlog's TimeStamper(fmt="iso", utc=True), formatting the
    date and time only once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, name: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


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


_production: tuple[list[structlog.typing.Processor], _Timestamp] | None = None  # set by configure_logging(json=True)
_log = structlog.get_logger("gateway")


def log_event(event: str, fields: dict[str, Any]) -> None:
    """An info event of every request (its ``request`` line) or of every mint and redemption (their audit
    events). While structlog writes JSON lines as :func:`configure_logging` set it up, the line is rendered
    straight to them (the same fields, without structlog's per-event machinery); otherwise (development, a
    test capturing logs) it goes through structlog."""
    if _production is not None and _writer is not None:
        processors, timestamp = _production
        if structlog.get_config()["processors"] is processors:
            fields["event"] = event
            fields["level"] = "info"
            timestamp(None, "info", fields)
            _writer.write(orjson.dumps(fields) + b"\n")
            return
    _log.info(event, **fields)


def loggable_path(path: str) -> str:
    """A request's (decoded) path as its log line shows it: never a query string, nor what follows a ``?`` that was
    sent encoded (``/x%3Ftoken=...``): either may hold a grant."""
    return path.partition("?")[0]


def log_request(fields: dict[str, Any]) -> None:
    """The one ``request`` line of a request (see :func:`log_event`)."""
    log_event("request", fields)


def configure_logging(*, json: bool = True, level: int = logging.INFO) -> None:
    """Configure structlog once for the process; request ids travel in contextvars (see :func:`bind_request`)."""
    global _production, _writer
    timestamp = _Timestamp()
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        timestamp,
        structlog.processors.format_exc_info,
    ]
    _production = None
    if json:
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        if level <= logging.INFO:
            _production = processors, timestamp
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
