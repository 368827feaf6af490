"""The admin listener: its own address (``admin.host``, ``admin.port``), serving the same gateway.

Every request needs ``Authorization: Bearer <token>`` of one of ``admin.tokens`` (kept as SHA-256 hashes, like
every credential): a missing or unknown token is 401, a token without the scope the path needs 403, in SCIM's
error shape. Paths: ``/scim/v2/{app}/...`` (scope ``scim``, :mod:`gateway.scim`).
"""

from __future__ import annotations

import hashlib
import time

import structlog
from aiohttp import web

from .config import Config
from .core import Gateway
from .dialects import bearer
from .logging import log_request
from .scim import Handler, Users, error_response, scim_errors

log = structlog.get_logger("gateway")

SCOPES = (("/scim/", "scim"),)  # path prefix -> the scope it needs


def create_admin_app(config: Config, gateway: Gateway) -> web.Application:
    tokens = {t.token_sha256: t for t in config.admin.tokens}

    @web.middleware
    async def authorised(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        response = await _authorised(request, handler)
        log_request({"listener": "admin", "method": request.method, "path": request.path, "status": response.status,
                     "duration_ms": round((time.perf_counter() - started) * 1000, 2)})  # fmt: skip
        return response

    async def _authorised(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = bearer(request.headers.get("Authorization"))
        entry = tokens.get(hashlib.sha256(token.encode()).hexdigest()) if token else None
        if entry is None:
            response = error_response(401, "an admin bearer token is needed (Authorization: Bearer <token>)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="impersonation-gateway admin"'
            return response
        needed = next((scope for prefix, scope in SCOPES if request.path.startswith(prefix)), None)
        if needed is not None and needed not in entry.scopes:
            log.info("admin_forbidden", token=entry.id, scope=needed, path=request.path)
            return error_response(403, f"the token {entry.id!r} lacks the {needed!r} scope")
        return await handler(request)

    app = web.Application(middlewares=[authorised, scim_errors], client_max_size=1_000_000)
    app.add_routes(Users(config, gateway).routes())
    return app
