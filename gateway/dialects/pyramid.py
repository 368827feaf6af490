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
from ..core import ImpersonationCommand, MintResult, SubjectRef, check_custom_data
from ..errors import Invalid
from . import Carrier, Dialect, Endpoint, HttpRequest, Where, load_json_object, on, text_response

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

    # the text of each error's answer
    errors = (
        on("invalid", "Request body is empty", field="body", reason="missing"),
        on("invalid", "Request body is not a JSON object", field="body"),
        on("invalid", "domain does not match the domain in userIdentity", field="domain", reason="mismatch"),
        on("invalid", "userIdentity matches more than one user; give the domain", field="identity", reason="ambiguous"),
        on("invalid", "Missing {reason_header} header", field="reason", reason="missing"),
        on("invalid", "{reason_header} must be {reason_max} printable characters at most", field="reason"),
        on("invalid", "{mode_header} must be one of: {modes}", field="mode"),
        on("invalid", "Missing {field}", reason="missing"),
        on("invalid", "data must be an object", field="data", reason="type"),
        on("invalid", "{field} must be a string", reason="type"),
        on("invalid", "{field} must be {custom_data_max} bytes at most", reason="too_large"),
        on("invalid", "Invalid {field}"),
        on("not_found", "Unknown user", status=400),
        on("unauthenticated", "Missing admin token", reason="missing"),
        on("unauthenticated", "Invalid admin token"),
        on("forbidden", "Not allowed: this admin cannot log in as users", reason="role"),
        on("forbidden", "Not allowed: the {mode_header} is not allowed for this app", reason="mode"),
        on("forbidden", "Not allowed: the user is outside this admin's domain"),
        on("grant_refused", "Invalid or expired token"),
        on("method_not_allowed", "Method not allowed; use {allowed}"),
        on("payload_too_large", "Request body is larger than {limit} bytes"),
        on("unsupported_encoding", "Cannot decode a request body with Content-Encoding {encoding}"),
        on("request_timeout", "Request body not received in time"),
        on("rate_limited", "Too many failed attempts; retry in {retry_after} s"),
        on("store_unavailable", "Service unavailable"),
        on("upstream_unavailable", "Application did not answer in time", timeout=True),
        on("upstream_unavailable", "Application unavailable"),
        on("internal", "Internal server error", status=500),
    )

    def envelope(self, status: int, parts: tuple[str | int, ...]) -> web.Response:
        (text,) = parts
        return text_response(str(text), status=status)


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


dialect = Pyramid()
