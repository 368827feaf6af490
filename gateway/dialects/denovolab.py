"""Denovolab Class4 portal: ``POST /v1/auth/as_client`` with the admin's ``X-Auth-Token``.

The body ``{"client_id": N}`` (a number or a numeric string) names the client. The answer carries two
single-use grants for that client: ``token`` (the portal login) and ``cdr_api_token`` (scope ``cdr_api``),
plus the client's public attributes as ``payload.user``. Errors use the portal's envelope::

    400 {"error_type": "validation_error", "success": false, "errors": [{field: [message]}]}
    404 {"error_type": "Object not found error", "success": false}
    4xx/5xx {"error_type": ..., "success": false, "error": {"message": ..., "code": N, "reason": ...}}

Either grant is redeemed by opening a URL with ``?token=<grant>``, or by an API call with the grant in
``X-Auth-Token`` (where an admin token is the portal's own credential and passes through untouched).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from ..config import AppConfig
from ..core import ImpersonationCommand, MintResult, SubjectRef
from ..directory import Subject
from ..errors import Invalid, Unauthenticated
from . import Carrier, Dialect, Endpoint, HttpRequest, Where, json_response, on

HEADER = "X-Auth-Token"
CDR_SCOPE = "cdr_api"
_INTEGER = re.compile(r"[+-]?[0-9]+")
_MAX_ID = 2**63 - 1  # a bigint column: anything larger cannot name a client


class Denovolab(Dialect):
    name = "denovolab"
    endpoints = (Endpoint("POST", "/v1/auth/as_client"),)
    # The header usually holds an admin's own API token: only a live grant there makes a redemption.
    carriers = (Carrier(Where.QUERY, "token"), Carrier(Where.HEADER, HEADER, passive=True))

    def parse(self, req: HttpRequest, app: AppConfig) -> ImpersonationCommand:
        credential = req.headers.get(HEADER, "").strip()
        if not credential:
            raise Unauthenticated("missing", HEADER)
        return ImpersonationCommand(
            app=app.name,
            dialect=self.name,
            credential=credential,
            target=SubjectRef(id=_client_id(req.body)),
            client=req.client,
            extra_scopes=(CDR_SCOPE,),
            credential_name=HEADER,
        )

    def render(self, result: MintResult, app: AppConfig, public_url: str) -> web.Response:
        cdr_token, cdr_grant = result.extra[CDR_SCOPE]
        payload = {
            "user": _user(result.subject),
            "token": result.token,
            "cdr_api_token": cdr_token,
            # The seed prints the expiry (epoch seconds) as a string.
            "cdr_api_token_expiration": str(cdr_grant.expires_at),
        }
        return json_response({"success": True, "payload": payload, "token": result.token, "cdr_api_token": cdr_token})

    # error_type, then: field and message (marshmallow's words) of a validation error; nothing (not found); or
    # message, code and reason of the portal's "error" object
    errors = (
        on("invalid", "validation_error", "{reason_header}", "Missing data for required field.",
           field="reason", reason="missing"),
        on("invalid", "validation_error", "{reason_header}", "Invalid value.", field="reason"),
        on("invalid", "validation_error", "{mode_header}", "Must be one of: {modes}.", field="mode"),
        on("invalid", "validation_error", "{field}", "Missing data for required field.", reason="missing"),
        on("invalid", "validation_error", "{field}", "Field may not be null.", reason="null"),
        on("invalid", "validation_error", "{field}", "Not a valid integer.", reason="type"),
        on("invalid", "validation_error", "{field}", "Number too large.", reason="too_large"),
        on("invalid", "validation_error", "{field}", "Invalid JSON body.", reason="malformed"),
        on("invalid", "validation_error", "{field}", "Invalid input type.", reason="not_object"),
        on("invalid", "validation_error", "{field}", "Invalid value."),
        on("not_found", "Object not found error"),
        on("unauthenticated", "unauthenticated_error", f"No header {HEADER} present", 110, "auth_token_not_provided",
           reason="missing"),
        on("unauthenticated", "unauthenticated_error", f"Invalid {HEADER}", 111, "auth_token_invalid"),
        on("grant_refused", "unauthenticated_error", "The login token is invalid or has expired", 112,
           "login_token_invalid"),
        on("forbidden", "forbidden_error", "The {mode_header} is not allowed for this app", 121, "mode_not_allowed",
           reason="mode"),
        on("forbidden", "forbidden_error", "You are not allowed to log in as this client", 120, "permission_denied"),
        on("method_not_allowed", "method_not_allowed_error", "Method not allowed; use {allowed}", 133,
           "method_not_allowed"),
        on("payload_too_large", "payload_too_large_error", "Request body exceeds {limit} bytes", 130,
           "payload_too_large"),
        on("unsupported_encoding", "unsupported_media_type_error",
           "Cannot decode a request body with Content-Encoding {encoding}", 131, "unsupported_content_encoding"),
        on("request_timeout", "request_timeout_error", "Request body not received in time", 132, "request_timeout"),
        on("rate_limited", "rate_limit_error", "Too many failed attempts; retry in {retry_after} s", 140,
           "too_many_requests"),
        on("store_unavailable", "service_unavailable_error", "Service temporarily unavailable", 150,
           "service_unavailable"),
        on("upstream_unavailable", "gateway_timeout_error", "The application did not answer in time", 152,
           "upstream_timeout", timeout=True),
        on("upstream_unavailable", "bad_gateway_error", "The application cannot be reached", 151,
           "upstream_unavailable"),
        on("internal", "internal_server_error", "Internal server error", 100, "internal_error"),
    )  # fmt: skip

    def envelope(self, status: int, parts: tuple[str | int, ...]) -> web.Response:
        error_type, *detail = parts
        body: dict[str, Any] = {"error_type": error_type, "success": False}
        if error_type == "validation_error":
            field, message = detail
            body["errors"] = [{field: [message]}]
        elif detail:
            message, code, reason = detail
            body["error"] = {"message": message, "code": code, "reason": reason}
        return json_response(body, status=status)


def _client_id(body: bytes) -> str:
    """The body's ``client_id`` as a directory id; raises Invalid with marshmallow's reasons."""
    if not body.strip():
        raise Invalid("client_id", "missing")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Invalid("json", "malformed") from None
    if not isinstance(data, dict):
        raise Invalid("_schema", "not_object")
    if "client_id" not in data:
        raise Invalid("client_id", "missing")
    value = data["client_id"]
    if value is None:
        raise Invalid("client_id", "null")
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        value = value.strip()
        if len(value.lstrip("+-0")) > 19:  # too long for any id (and for int() on a huge string)
            raise Invalid("client_id", "too_large")
        value = int(value)
    elif isinstance(value, float) and value.is_integer():  # 41.0, or a huge number orjson made a float
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("client_id", "type")
    if abs(value) > _MAX_ID:
        raise Invalid("client_id", "too_large")
    return str(value)


def _user(subject: Subject) -> dict[str, Any]:
    """The seed's ``user`` object from the subject's public attributes (never a credential or hash)."""
    public = subject.public()
    subject_id, name = public.pop("id"), public.pop("name")
    user = {
        "client_id": int(subject_id) if _INTEGER.fullmatch(subject_id) else subject_id,
        "email": public.pop("email"),
        "name": name,
        "fullname": public.pop("fullname", name),
    }
    return {**user, **{k: v for k, v in public.items() if k not in user}}


dialect = Denovolab()
