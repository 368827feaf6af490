"""Pyramid Analytics API3: ``POST /API3/authentication/authenticateUserByToken``.

An administrator's token in the JSON body authorises a login as ``userIdentity``; the answer is the new
grant as a bare base64 string (``text/plain``), which the portal sets as the ``PyramidAuth`` (or
``PyramidEmbeddedAuth``) cookie or appends as ``?token=``. The older ``/API2/auth/authenticateUserByToken``
takes the same fields wrapped in ``{"data": {...}}``. Errors are short ``text/plain`` reasons.

``userIdentity`` is a user name (``jdoe``), a UPN or e-mail (``jdoe@example.com``) or a Windows name
(``SALES\\jdoe``, whose prefix narrows the match like the optional ``domain`` field).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..config import AppConfig
from ..core import (
    CUSTOM_DATA_MAX,
    REASON_HEADER,
    REASON_MAX,
    ImpersonationCommand,
    MintResult,
    SubjectRef,
    check_custom_data,
)
from ..errors import (
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
from . import Carrier, Dialect, Endpoint, HttpRequest, Where, load_json_object, text_response

IDENTITY_LIMIT = 512  # characters: longer than any user name, UPN or DOMAIN\user
DOMAIN_LIMIT = 255
API3 = Endpoint("POST", "/API3/authentication/authenticateUserByToken", ignore_case=True)
API2 = Endpoint("POST", "/API2/auth/authenticateUserByToken", ignore_case=True)  # fields wrapped in {"data": ...}


class Pyramid(Dialect):
    name = "pyramid"
    endpoints = (API3, API2)
    # The app sets these cookies itself once signed in: a value that is no live grant is its own.
    carriers = (
        Carrier(Where.QUERY, "token"),
        Carrier(Where.COOKIE, "PyramidAuth", passive=True),
        Carrier(Where.COOKIE, "PyramidEmbeddedAuth", passive=True),
    )

    def parse(self, req: HttpRequest, app: AppConfig) -> ImpersonationCommand:
        if not req.body.strip():
            raise Invalid("body", "missing")
        body = load_json_object(req.body)
        if body is None:
            raise Invalid("body", "value")
        if req.endpoint == API2:
            if body.get("data") is None:
                raise Invalid("data", "missing")
            if not isinstance(body["data"], dict):
                raise Invalid("data", "type")
            body = body["data"]
        token = (_optional_string(body, "token") or "").strip()
        identity = (_optional_string(body, "userIdentity") or "").strip()
        domain = (_optional_string(body, "domain") or "").strip()
        custom_data = _optional_string(body, "customData")  # passed on exactly as given
        if not identity:
            raise Invalid("userIdentity", "missing")
        if len(identity) > IDENTITY_LIMIT:
            raise Invalid("userIdentity", "value")
        if domain and len(domain) > DOMAIN_LIMIT:
            raise Invalid("domain", "value")
        if custom_data:
            check_custom_data(custom_data, "customData")
        user, user_domain = _split_identity(identity, domain or None)
        return ImpersonationCommand(
            app=app.name,
            dialect=self.name,
            credential=token or None,
            target=SubjectRef(identity=user, domain=user_domain),
            client=req.client,
            custom_data=custom_data or None,
            credential_name="token",
        )

    def render(self, result: MintResult, app: AppConfig, public_url: str) -> web.Response:
        response = text_response(result.token)
        response.headers["Cache-Control"] = "no-store"
        return response

    def render_error(self, error: GatewayError) -> web.Response:
        status, reason = _describe(error)
        return text_response(reason, status=status, error=error)


def _optional_string(body: dict[str, Any], field: str) -> str | None:
    """``body[field]``; None when absent or null; Invalid when it is not a string."""
    value = body.get(field)
    if value is None or isinstance(value, str):
        return value
    raise Invalid(field, "type")


def _split_identity(identity: str, domain: str | None) -> tuple[str, str | None]:
    """``DOMAIN\\user`` -> (user, DOMAIN); a UPN or plain name stays whole (core matches id or e-mail).

    When both the prefix and ``domain`` are given they must name the same domain (``SALES`` is the
    first label of ``sales.example.com``); the fuller of the two narrows the match.
    """
    if "\\" not in identity:
        return identity, domain
    prefix, _, user = identity.partition("\\")
    prefix, user = prefix.strip(), user.strip()
    if not prefix or not user:
        raise Invalid("userIdentity", "value")
    if domain is None:
        return user, prefix
    short, full = sorted((prefix.casefold(), domain.casefold()), key=len)
    if short != full and short != full.split(".", 1)[0]:
        raise Invalid("domain", "mismatch")
    return user, full


def _describe(error: GatewayError) -> tuple[int, str]:
    match error:
        case Invalid(field="body", reason="missing"):
            return 400, "Request body is empty"
        case Invalid(field="body"):
            return 400, "Request body is not a JSON object"
        case Invalid(field="domain", reason="mismatch"):
            return 400, "domain does not match the domain in userIdentity"
        case Invalid(field="identity", reason="ambiguous"):
            return 400, "userIdentity matches more than one user; give the domain"
        case Invalid(field="reason", reason="missing"):
            return 400, f"Missing {REASON_HEADER} header"
        case Invalid(field="reason"):
            return 400, f"{REASON_HEADER} must be {REASON_MAX} printable characters at most"
        case Invalid(field=field, reason="missing"):
            return 400, f"Missing {field}"
        case Invalid(field="data", reason="type"):
            return 400, "data must be an object"
        case Invalid(field=field, reason="type"):
            return 400, f"{field} must be a string"
        case Invalid(field=field, reason="too_large"):
            return 400, f"{field} must be {CUSTOM_DATA_MAX} bytes at most"
        case Invalid(field=field):
            return 400, f"Invalid {field}"
        case NotFound():
            return 400, "Unknown user"
        case Unauthenticated(reason="missing"):
            return 401, "Missing admin token"
        case Unauthenticated():
            return 401, "Invalid admin token"
        case Forbidden(reason="role"):
            return 403, "Not allowed: this admin cannot log in as users"
        case Forbidden():
            return 403, "Not allowed: the user is outside this admin's domain"
        case GrantRefused():
            return 401, "Invalid or expired token"
        case MethodNotAllowed(allowed=allowed):
            return 405, f"Method not allowed; use {', '.join(allowed)}"
        case PayloadTooLarge(limit=limit):
            return 413, f"Request body is larger than {limit} bytes"
        case UnsupportedEncoding(encoding=encoding):
            return 415, f"Cannot decode a request body with Content-Encoding {encoding}"
        case RequestTimeout():
            return 408, "Request body not received in time"
        case RateLimited(retry_after=seconds):
            return 429, f"Too many failed attempts; retry in {seconds} s"
        case StoreUnavailable():
            return 503, "Service unavailable"
        case UpstreamUnavailable(timeout=True):
            return 504, "Application did not answer in time"
        case UpstreamUnavailable():
            return 502, "Application unavailable"
    return 500, "Internal server error"


dialect = Pyramid()
