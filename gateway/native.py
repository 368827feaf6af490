"""The native API: ``POST /v1/grants`` for portals that speak none of the vendors' dialects.

``Authorization: Bearer <principal credential>`` and a JSON body ``{"app", "subject", "ttl_seconds"?, "reason"?,
"custom_data"?, "mode"?}`` become the same :class:`~gateway.core.ImpersonationCommand` as a dialect's request
(same policy: role, reseller subtree, domain, mode), answered ``201 {"grant_id", "token", "login_url",
"expires_at"}`` where ``login_url`` is the app's dialect's own login link. Every error is RFC 9457 problem details
(``application/problem+json``), here and on the admin listener's revocation endpoints.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from . import body as bodies
from . import minting
from .config import AppConfig, Config
from .core import Gateway, ImpersonationCommand, MintResult, SubjectRef, check_custom_data, parse_mode, parse_reason
from .dialects import Dialect, bearer, load_json_object, on, render
from .errors import GatewayError, Invalid, MethodNotAllowed

PATH = "/v1/grants"
PROBLEM = "application/problem+json"
FIELDS = ("app", "subject", "ttl_seconds", "reason", "custom_data", "mode")
_TYPE = "urn:impersonation-gateway:problem:"


def problem(status: int, kind: str, title: str, detail: str, **headers: str) -> web.Response:
    """An RFC 9457 problem details answer."""
    body = {"type": _TYPE + kind, "title": title, "status": status, "detail": detail}
    return web.Response(body=orjson.dumps(body), status=status, content_type=PROBLEM, headers=headers)


# kind (the end of its type URI), title and detail of each error's problem details
ERRORS = (
    on("invalid", "invalid-request", "Invalid request", "{field}: not a field of this request", reason="unknown"),
    on("invalid", "invalid-request", "Invalid request", "the body must be a JSON object", field="body"),
    on("invalid", "reason-required", "Reason required", "this app requires a reason", field="reason", reason="missing"),
    on("invalid", "invalid-request", "Invalid request", "reason: at most {reason_max} printable characters",
       field="reason"),
    on("invalid", "invalid-request", "Invalid request",
       "ttl_seconds: a whole number of seconds from 1 to the app's grant_ttl_seconds", field="ttl_seconds"),
    on("invalid", "invalid-request", "Invalid request", "mode: one of {modes}", field="mode"),
    on("invalid", "invalid-request", "Invalid request", "app: no app of that name", field="app", reason="value"),
    on("invalid", "invalid-request", "Invalid request", "{field}: required", reason="missing"),
    on("invalid", "invalid-request", "Invalid request", "{field}: at most {custom_data_max} bytes", reason="too_large"),
    on("invalid", "invalid-request", "Invalid request", "{field}: not a valid value"),
    on("unauthenticated", "unauthenticated", "Unauthenticated", "Authorization: Bearer <credential> is required",
       reason="missing", headers=(("WWW-Authenticate", "Bearer"),)),
    on("unauthenticated", "unauthenticated", "Unauthenticated", "the credential is not valid for this app",
       headers=(("WWW-Authenticate", 'Bearer error="invalid_token"'),)),
    on("forbidden", "forbidden", "Forbidden", "this actor's role may not impersonate in this app", reason="role"),
    on("forbidden", "mode-not-allowed", "Mode not allowed",
       "mode: more than this app allows (its session's mode; read_only only in an app holding sessions)",
       reason="mode"),
    on("forbidden", "forbidden", "Forbidden", "the subject is outside this actor's reach"),
    on("not_found", "not-found", "Not found", "the actor's reseller does not exist", what="reseller"),
    on("not_found", "not-found", "Not found", "no active subject has that id", by="id"),
    on("not_found", "not-found", "Not found", "the subject has no {by}, which its login link needs"),
    on("grant_refused", "grant-refused", "Grant refused", "the grant is unknown, expired or already used"),
    on("method_not_allowed", "method-not-allowed", "Method not allowed", "use {allowed}"),
    on("request_timeout", "request-timeout", "Request timeout", "the request body did not arrive in time"),
    on("payload_too_large", "payload-too-large", "Payload too large", "the body is over {limit} bytes"),
    on("unsupported_encoding", "unsupported-encoding", "Unsupported encoding",
       "a body with Content-Encoding {encoding} cannot be decoded"),
    on("rate_limited", "rate-limited", "Too many requests", "too many failed credentials; retry in {retry_after} s"),
    on("store_unavailable", "unavailable", "Service unavailable", "the store is not answering; retry shortly"),
    on("upstream_unavailable", "upstream-unavailable", "Upstream unavailable", "the application cannot be reached"),
    on("internal", "internal", "Internal error", "an unexpected error; it is logged", status=500),
)  # fmt: skip


def error_problem(error: GatewayError) -> web.Response:
    """Every gateway error as problem details, by :data:`ERRORS`."""
    return render(ERRORS, error, lambda status, parts: problem(status, *map(str, parts)))


async def read_json(request: web.Request, config: Config) -> dict[str, Any]:
    """The request's body as a JSON object (bounded in size and time like every body the gateway reads)."""
    _, decoded = await bodies.read(request, config.server.body_limit_bytes, config.server.body_timeout_seconds)
    return json_object(decoded)


def json_object(body: bytes) -> dict[str, Any]:
    """``body`` as a JSON object; Invalid when it is not one."""
    data = load_json_object(body)
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
    mode = data.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise Invalid("mode", "value")
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
        mode=parse_mode([mode] if mode is not None else []),
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
    """``POST /v1/grants``: 201 with the grant, or problem details (the one mint flow; the reason and the mode are
    fields)."""
    if request.method != "POST":
        return error_problem(MethodNotAllowed(("POST",)))

    def parse(body: bytes) -> ImpersonationCommand:
        return command(json_object(body), credential_of(request), config, dialects, client)

    def render(cmd: ImpersonationCommand, result: MintResult) -> web.Response:
        app = config.app(cmd.app)
        url = dialects[app.dialect].login_url(result, app, config.public_url_of(app))
        return created(result.grant.id, result.token, url, result.grant.expires_at)

    return await minting.mint(request, gateway, config.server, request_id, parse, render, error_problem,
                              reason_header=False, mode_header=False, api="native")  # fmt: skip
