"""The native API: ``POST /v1/grants`` for portals that speak none of the vendors' dialects.

``Authorization: Bearer <principal credential>`` and a JSON body ``{"app", "subject", "ttl_seconds"?, "reason"?,
"custom_data"?}`` become the same :class:`~gateway.core.ImpersonationCommand` as a dialect's request (same policy:
role, reseller subtree, domain), answered ``201 {"grant_id", "token", "login_url", "expires_at"}`` where
``login_url`` is the app's dialect's own login link. Every error is RFC 9457 problem details
(``application/problem+json``), here and on the admin listener's revocation endpoints.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aiohttp import web

from . import body as bodies
from .config import AppConfig, Config
from .core import CUSTOM_DATA_MAX, Gateway, ImpersonationCommand, SubjectRef, check_custom_data, parse_reason
from .dialects import Dialect, bearer, load_json_object
from .errors import (
    Forbidden,
    GatewayError,
    GrantRefused,
    Invalid,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    StoreUnavailable,
    Unauthenticated,
    UnsupportedEncoding,
    UpstreamUnavailable,
)
from .logging import bind_request, unexpected

log = structlog.get_logger("gateway")

PATH = "/v1/grants"
PROBLEM = "application/problem+json"
FIELDS = ("app", "subject", "ttl_seconds", "reason", "custom_data")
_TYPE = "urn:impersonation-gateway:problem:"


def problem(status: int, kind: str, title: str, detail: str, **headers: str) -> web.Response:
    """An RFC 9457 problem details answer."""
    body = {"type": _TYPE + kind, "title": title, "status": status, "detail": detail}
    return web.Response(body=orjson.dumps(body), status=status, content_type=PROBLEM, headers=headers)


def error_problem(error: GatewayError) -> web.Response:
    """Every gateway error as problem details."""
    match error:
        case Invalid(field=field, reason="unknown"):  # a typo should not pass silently
            return problem(400, "invalid-request", "Invalid request", f"{field}: not a field of this request")
        case Invalid(field="body"):
            return problem(400, "invalid-request", "Invalid request", "the body must be a JSON object")
        case Invalid(field="reason", reason="missing"):
            return problem(400, "reason-required", "Reason required", "this app requires a reason")
        case Invalid(field="reason"):
            return problem(400, "invalid-request", "Invalid request", "reason: at most 200 printable characters")
        case Invalid(field="ttl_seconds"):
            return problem(400, "invalid-request", "Invalid request",
                           "ttl_seconds: a whole number of seconds from 1 to the app's grant_ttl_seconds")  # fmt: skip
        case Invalid(field="app", reason="value"):
            return problem(400, "invalid-request", "Invalid request", "app: no app of that name")
        case Invalid(field=field, reason="missing"):
            return problem(400, "invalid-request", "Invalid request", f"{field}: required")
        case Invalid(field=field, reason="too_large"):
            return problem(400, "invalid-request", "Invalid request", f"{field}: at most {CUSTOM_DATA_MAX} bytes")
        case Invalid(field=field):
            return problem(400, "invalid-request", "Invalid request", f"{field}: not a valid value")
        case Unauthenticated(reason="missing"):
            return problem(401, "unauthenticated", "Unauthenticated", "Authorization: Bearer <credential> is required",
                           **{"WWW-Authenticate": "Bearer"})  # fmt: skip
        case Unauthenticated():
            return problem(401, "unauthenticated", "Unauthenticated", "the credential is not valid for this app",
                           **{"WWW-Authenticate": 'Bearer error="invalid_token"'})  # fmt: skip
        case Forbidden(reason="role"):
            return problem(403, "forbidden", "Forbidden", "this actor's role may not impersonate in this app")
        case Forbidden():
            return problem(403, "forbidden", "Forbidden", "the subject is outside this actor's reach")
        case NotFound(what="reseller"):
            return problem(404, "not-found", "Not found", "the actor's reseller does not exist")
        case NotFound(by="id"):
            return problem(404, "not-found", "Not found", "no active subject has that id")
        case NotFound(by=field):
            return problem(404, "not-found", "Not found", f"the subject has no {field}, which its login link needs")
        case GrantRefused():
            return problem(401, "grant-refused", "Grant refused", "the grant is unknown, expired or already used")
        case MethodNotAllowed(allowed=allowed):
            return problem(405, "method-not-allowed", "Method not allowed", f"use {', '.join(allowed)}",
                           Allow=", ".join(allowed))  # fmt: skip
        case RequestTimeout():
            response = problem(408, "request-timeout", "Request timeout", "the request body did not arrive in time")
            response.force_close()
            return response
        case PayloadTooLarge(limit=limit):
            return problem(413, "payload-too-large", "Payload too large", f"the body is over {limit} bytes")
        case UnsupportedEncoding(encoding=encoding):
            return problem(415, "unsupported-encoding", "Unsupported encoding",
                           f"a body with Content-Encoding {encoding} cannot be decoded")  # fmt: skip
        case RateLimited(retry_after=seconds):
            detail = f"too many failed credentials; retry in {seconds} s"
            return problem(429, "rate-limited", "Too many requests", detail, **{"Retry-After": str(seconds)})
        case StoreUnavailable():
            return problem(503, "unavailable", "Service unavailable", "the store is not answering; retry shortly")
        case UpstreamUnavailable(status=status):
            return problem(status, "upstream-unavailable", "Upstream unavailable", "the application cannot be reached")
    return problem(500, "internal", "Internal error", "an unexpected error; it is logged")


async def read_json(request: web.Request, config: Config) -> dict[str, Any]:
    """The request's body as a JSON object (bounded in size and time like every body the gateway reads)."""
    _, decoded = await bodies.read(request, config.server.body_limit_bytes, config.server.body_timeout_seconds)
    data = load_json_object(decoded)
    if data is None:
        raise Invalid("body", "value")
    return data


def only(data: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Invalid for a field the request does not have (a typo should not pass silently)."""
    for name in data:
        if name not in allowed:
            raise Invalid(name, "unknown")


def app_of(data: dict[str, Any], config: Config) -> AppConfig:
    """The configured app the body's ``app`` names."""
    name = data.get("app")
    if name is None:
        raise Invalid("app", "missing")
    if not isinstance(name, str) or name not in {a.name for a in config.apps}:
        raise Invalid("app", "value")
    return config.app(name)


def an_id(data: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    """The body's ``name``: an id (a non-blank string or an integer), as a string."""
    value = data.get(name)
    if value is None:
        if required:
            raise Invalid(name, "missing")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise Invalid(name, "value")
    return str(value).strip()


def command(data: dict[str, Any], credential: str | None, config: Config, dialects: dict[str, Dialect],
            client: str) -> ImpersonationCommand:  # fmt: skip
    """The impersonation command in a native request; Invalid for a bad body."""
    only(data, FIELDS)
    app = app_of(data, config)
    subject = an_id(data, "subject", required=True)
    assert subject is not None
    ttl = data.get("ttl_seconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int)):
        raise Invalid("ttl_seconds", "value")
    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise Invalid("reason", "value")
    return ImpersonationCommand(
        app=app.name,
        dialect=app.dialect,
        credential=credential,
        target=SubjectRef(id=subject),
        client=client,
        custom_data=check_custom_data(data.get("custom_data"), "custom_data"),
        bind=dialects[app.dialect].link_bind,
        credential_name="authorization",
        reason=parse_reason([reason] if reason is not None else []),
        ttl_seconds=ttl,
    )


def created(grant_id: str, token: str, login_url: str, expires_at: int) -> web.Response:
    expiry = datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"grant_id": grant_id, "token": token, "login_url": login_url, "expires_at": expiry}
    return web.Response(body=orjson.dumps(body), status=201, content_type="application/json",
                        headers={"Cache-Control": "no-store"})  # fmt: skip


def credential_of(request: web.Request) -> str | None:
    """The bearer credential: None when there is none, or it is not a Bearer one (Basic credentials are no
    credential here: the answer says a Bearer one is required); "" for several, which no actor has."""
    values = request.headers.getall("Authorization", [])
    if len(values) > 1:
        return ""
    return (bearer(values[0]) or None) if values else None


async def mint(
    request: web.Request, config: Config, gateway: Gateway, dialects: dict[str, Dialect], client: str, request_id: str
) -> web.Response:
    """``POST /v1/grants``: 201 with the grant, or problem details."""
    if request.method != "POST":
        return problem(405, "method-not-allowed", "Method not allowed", "use POST", Allow="POST")
    try:
        cmd = command(await read_json(request, config), credential_of(request), config, dialects, client)
        result = await gateway.mint(cmd, request_id)
    except GatewayError as exc:
        return error_problem(exc)
    except Exception as exc:
        bind_request(request)
        log.error("unhandled_error", api="native", **unexpected(exc))
        return error_problem(GatewayError())
    app = config.app(cmd.app)
    url = dialects[app.dialect].login_url(result, app, config.public_url_of(app))
    return created(result.grant.id, result.token, url, result.grant.expires_at)
