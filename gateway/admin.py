"""The admin listener: its own address (``admin.host``, ``admin.port``), serving the same gateway.

Every request needs ``Authorization: Bearer <token>`` of one of ``admin.tokens`` (kept as SHA-256 hashes, like
every credential): a missing or unknown token is 401, a token without the scope the path needs 403. Paths:

- ``/scim/v2/{app}/...`` (scope ``scim``, :mod:`gateway.scim`), answering errors in SCIM's shape;
- ``DELETE /v1/grants/{grant_id}`` and ``POST /v1/revocations`` (scope ``revoke``), answering errors as RFC 9457
  problem details: a revoked grant gets the ordinary refusal at redemption; a revocation also ends the matching
  impersonation sessions;
- ``GET /v1/sessions?app=&actor=&subject=`` and ``DELETE /v1/sessions/{session_id}`` (scope ``revoke``): the live
  impersonation sessions, and ending one (its next request, on any process, is a plain one).

Every answer, an error too, is in one of those two shapes, and every request gets one ``request`` log line. Bodies
are read like the data path's (:mod:`gateway.body`): bounded in size and in time, decoded once, by the gateway.
"""

from __future__ import annotations

import hashlib
import time

import orjson
import structlog
from aiohttp import web

from .config import Config
from .core import Gateway
from .dialects import bearer
from .errors import GatewayError
from .logging import log_request, loggable_path, unexpected
from .native import an_id, app_of, error_problem, only, problem, read_json
from .scim import Handler, Users, error_response, scim_errors
from .sessions import SESSION_ID_SHAPE

log = structlog.get_logger("gateway")

SCOPES = (("/scim/", "scim"), ("/v1/", "revoke"))  # path prefix -> the scope it needs
TOKEN = web.RequestKey("admin_token", str)  # the id of the admin token a request came with, for the audit


def create_admin_app(config: Config, gateway: Gateway) -> web.Application:
    tokens = {t.token_sha256: t for t in config.admin.tokens}

    @web.middleware
    async def authorised(request: web.Request, handler: Handler) -> web.StreamResponse:
        started, status = time.perf_counter(), 500
        try:
            response = await _authorised(request, handler)
            status = response.status
            return response
        finally:  # one line per request, whatever became of it
            duration = round((time.perf_counter() - started) * 1000, 2)
            log_request({"listener": "admin", "method": request.method, "path": loggable_path(request.path),
                         "status": status, "duration_ms": duration})  # fmt: skip

    async def _authorised(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = bearer(request.headers.get("Authorization"))
        entry = tokens.get(hashlib.sha256(token.encode()).hexdigest()) if token else None
        native = request.path.startswith("/v1/")
        if entry is None:
            detail = (
                "the admin bearer token is not valid"
                if token
                else "an admin bearer token is needed (Authorization: Bearer <token>)"
            )
            response = (
                problem(401, "unauthenticated", "Unauthenticated", detail) if native else error_response(401, detail)
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="impersonation-gateway admin"'
            return response
        needed = next((scope for prefix, scope in SCOPES if request.path.startswith(prefix)), None)
        if needed is not None and needed not in entry.scopes:
            log.info("admin_forbidden", token=entry.id, scope=needed, path=loggable_path(request.path))
            detail = f"the token {entry.id!r} lacks the {needed!r} scope"
            return problem(403, "forbidden", "Forbidden", detail) if native else error_response(403, detail)
        request[TOKEN] = entry.id
        return await handler(request)

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """SCIM's error shape on SCIM's paths, problem details on the others."""
        if not request.path.startswith("/v1/"):
            return await scim_errors(request, handler)
        try:
            return await handler(request)
        except GatewayError as exc:
            return error_problem(exc)
        except web.HTTPNotFound:
            return problem(404, "not-found", "Not found", "no such endpoint")
        except web.HTTPMethodNotAllowed as exc:
            return problem(
                405, "method-not-allowed", "Method not allowed", "see Allow", Allow=",".join(exc.allowed_methods)
            )
        except web.HTTPException as exc:
            return problem(exc.status, "http-error", exc.reason, exc.reason)
        except Exception as exc:  # its class and place only: its text may quote the request's bytes
            log.error("unhandled_error", listener="admin", method=request.method, path=loggable_path(request.path),
                      **unexpected(exc))  # fmt: skip
            return error_problem(GatewayError())

    # The server must not decode bodies (Content-Encoding) itself: gateway.body does, once, within its bounds.
    app = web.Application(middlewares=[authorised, errors], handler_args={"auto_decompress": False})
    app.add_routes(Users(config, gateway).routes())
    app.add_routes(Revocations(config, gateway).routes())
    app.add_routes(Sessions(config, gateway).routes())
    return app


class Revocations:
    """``DELETE /v1/grants/{grant_id}``: one grant. ``POST /v1/revocations`` ``{"app", "actor"?, "subject"?}``: every
    live grant of an app, of one of its actors, of one of its subjects, or of one actor and one subject."""

    def __init__(self, config: Config, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway

    def routes(self) -> list[web.RouteDef]:
        return [web.delete("/v1/grants/{grant_id}", self.revoke_grant), web.post("/v1/revocations", self.revoke)]

    async def revoke_grant(self, request: web.Request) -> web.Response:
        grant = await self.gateway.revoke_grant(request.match_info["grant_id"], by=request[TOKEN])
        if grant is None:
            return problem(404, "not-found", "Not found", "no live grant has that id")
        return web.Response(status=204)

    async def revoke(self, request: web.Request) -> web.Response:
        data = await read_json(request, self.config)
        only(data, ("app", "actor", "subject"))
        app = app_of(data, self.config)
        actor, subject = an_id(data, "actor"), an_id(data, "subject")
        revoked = await self.gateway.revoke(app.name, request[TOKEN], actor=actor, subject=subject)
        body = {"revoked": revoked}
        if app.session is not None:  # an app without sessions answers as it always has
            body["sessions_ended"] = await self.gateway.sessions.end_matching(app.name, "revoked", request[TOKEN],
                                                                              actor, subject)  # fmt: skip
        return web.Response(body=orjson.dumps(body), content_type="application/json")


class Sessions:
    """``GET /v1/sessions?app=&actor=&subject=`` (every filter optional): the live sessions. ``DELETE
    /v1/sessions/{session_id}``: end one (204; 404 when none is live)."""

    def __init__(self, config: Config, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/sessions", self.list), web.delete("/v1/sessions/{session_id}", self.end)]

    async def list(self, request: web.Request) -> web.Response:
        query = request.query
        unknown = sorted(set(query) - {"app", "actor", "subject"})
        if unknown:
            return problem(400, "invalid-request", "Invalid request", f"{unknown[0]}: not a filter of this list")
        app = query.get("app")
        if app is not None and app not in {a.name for a in self.config.apps}:
            return problem(404, "not-found", "Not found", "no such app")
        found = await self.gateway.sessions.listed(app, query.get("actor"), query.get("subject"))
        return web.Response(body=orjson.dumps({"sessions": found}), content_type="application/json")

    async def end(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        ended = None
        if SESSION_ID_SHAPE.fullmatch(session_id):
            ended = await self.gateway.sessions.end(session_id, "revoked", by=request[TOKEN])
        if ended is None:
            return problem(404, "not-found", "Not found", "no live session has that id")
        return web.Response(status=204)
