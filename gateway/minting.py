"""The one mint flow, for a dialect's mint endpoint and the native API alike: read the body (bounded, decoded),
parse it into an :class:`~gateway.core.ImpersonationCommand`, apply the reason and mode headers, mint, and answer
with the caller's own success and error shapes. Each caller brings only what differs: how a body becomes a
command, how a result and an error look, and what its log lines name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog
from aiohttp import web

from . import body as bodies
from .config import ServerConfig
from .core import MODE_HEADER, REASON_HEADER, Gateway, ImpersonationCommand, MintResult, parse_mode, parse_reason
from .errors import GatewayError
from .logging import bind_request, unexpected

log = structlog.get_logger("gateway")

Parse = Callable[[bytes], ImpersonationCommand]  # the command in a (decoded) body; raises a GatewayError
Render = Callable[[ImpersonationCommand, MintResult], web.Response]  # the success answer
Refuse = Callable[[GatewayError], web.Response]  # the answer to an error (a bare GatewayError: unexpected)


async def answer(request: web.Request, refuse: Refuse, work: Callable[[], Awaitable[web.Response]],
                 **context: str) -> web.Response:  # fmt: skip
    """``work()``'s answer; ``refuse``'s for a GatewayError it raises. Anything else is logged with ``context``
    (never its text: it may quote request or answer bytes) and refused as an unexpected failure."""
    try:
        return await work()
    except GatewayError as exc:
        return refuse(exc)
    except Exception as exc:
        bind_request(request)
        log.error("unhandled_error", **context, **unexpected(exc))
        return refuse(GatewayError())


async def mint(request: web.Request, gateway: Gateway, server: ServerConfig, request_id: str, parse: Parse,
               render: Render, refuse: Refuse, *, read_body: bool = True, reason_header: bool = True,
               mode_header: bool = True, **context: str) -> web.Response:  # fmt: skip
    """A mint request's answer. Its body is read bounded in size and time, and decoded; without ``read_body``
    (a GET) it is only bounded and ``parse`` gets b"". With ``reason_header`` (the dialects; the native API has
    a field) an ``X-Impersonation-Reason`` header gives the command its reason, and with ``mode_header`` (the
    dialects) an ``X-Impersonation-Mode`` header its mode (several, or another value than a mode: 400)."""

    async def work() -> web.Response:
        limit, timeout = server.body_limit_bytes, server.body_timeout_seconds
        body = b""
        if read_body:
            _, body = await bodies.read(request, limit, timeout)
        elif request.body_exists:  # nothing is taken from the body: it is only bounded
            await bodies.read_raw(request, limit, timeout)
        command = parse(body)
        if reason_header and REASON_HEADER in request.headers:
            command = replace(command, reason=parse_reason(request.headers.getall(REASON_HEADER)))
        if mode_header and MODE_HEADER in request.headers:
            command = replace(command, mode=parse_mode(request.headers.getall(MODE_HEADER)))
        return render(command, await gateway.mint(command, request_id))

    return await answer(request, refuse, work, **context)
