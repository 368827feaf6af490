"""ActivePlatform reseller API v3: ``GET /api/v3/resellers/{reseller_id}/user_authentication/token``.

The manager's ``X-Api-Token`` authenticates; the answer is ``{"owner_email", "owner_token"}`` and the
customer panel is opened at ``{public_url}/?user_email=..&user_token=..``. Errors are JSON:API.
"""

from __future__ import annotations

import re

from aiohttp import web

from ..config import AppConfig
from ..core import REASON_HEADER, REASON_MAX, ImpersonationCommand, MintResult, SubjectRef
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
from . import Carrier, Dialect, Endpoint, HttpRequest, Where, json_response

MEDIA_TYPE = "application/vnd.api+json"
_NUMBER = re.compile(r"[0-9]{1,18}")


class ActivePlatform(Dialect):
    name = "activeplatform"
    endpoints = (
        Endpoint("GET", "/api/v3/resellers/{reseller_id}/user_authentication/token"),
        Endpoint("GET", "/api/v3/resellers/{reseller_id}/user_authentication/token/{account_id}"),
    )
    carriers = (Carrier(Where.QUERY, "user_token", bound=(("email", "user_email"),)),)

    def parse(self, req: HttpRequest, app: AppConfig) -> ImpersonationCommand:
        credential = req.headers.get("X-Api-Token", "").strip()
        if not credential:
            raise Unauthenticated("missing")
        reseller = req.params["reseller_id"]
        if not _NUMBER.fullmatch(reseller):
            raise NotFound("reseller")
        accounts = req.query.getall("account_id", [])
        if "account_id" in req.params:
            accounts.append(req.params["account_id"])
        if not accounts or not accounts[0].strip():
            raise Invalid("account_id", "missing")
        if len(set(accounts)) > 1 or not _NUMBER.fullmatch(accounts[0].strip()):
            raise Invalid("account_id", "value")
        return ImpersonationCommand(
            app=app.name,
            dialect=self.name,
            credential=credential,
            target=SubjectRef(id=str(int(accounts[0]))),
            client=req.client,
            reseller=str(int(reseller)),
            bind=("email",),
        )

    def render(self, result: MintResult, app: AppConfig, public_url: str) -> web.Response:
        return json_response(
            {"owner_email": result.subject.email, "owner_token": result.token}, content_type=MEDIA_TYPE
        )

    def render_error(self, error: GatewayError) -> web.Response:
        code, title, detail = _describe(error)
        body = {"errors": [{"status": str(error.status), "code": code, "title": title, "detail": detail}]}
        return json_response(body, status=error.status, content_type=MEDIA_TYPE, error=error)


def _describe(error: GatewayError) -> tuple[str, str, str]:
    match error:
        case Unauthenticated(reason="missing"):
            return "unauthorized", "Unauthorized", "The X-Api-Token header is missing."
        case Unauthenticated():
            return "unauthorized", "Unauthorized", "The API token is not valid."
        case Forbidden(reason="role"):
            return "forbidden", "Forbidden", "The manager's role does not allow this method."
        case Forbidden():
            return (
                "forbidden",
                "Forbidden",
                "The reseller is not the manager's reseller or one of its downstream resellers.",
            )
        case NotFound(what="reseller"):
            return "not_found", "Not Found", "Reseller not found."
        case NotFound():
            return "not_found", "Not Found", "Account not found."
        case Invalid(field="reason", reason="missing"):
            return "invalid_parameter", "Bad Request", f"The {REASON_HEADER} header is required."
        case Invalid(field="reason"):
            return (
                "invalid_parameter",
                "Bad Request",
                f"The {REASON_HEADER} header must be {REASON_MAX} printable characters at most.",
            )
        case Invalid(field=field, reason="missing"):
            return "invalid_parameter", "Bad Request", f"The {field} parameter is required."
        case Invalid(field=field):
            return "invalid_parameter", "Bad Request", f"The {field} parameter must be a number."
        case GrantRefused():
            return "unauthorized", "Unauthorized", "The login token is invalid or has expired."
        case MethodNotAllowed(allowed=allowed):
            return "method_not_allowed", "Method Not Allowed", f"This endpoint accepts {', '.join(allowed)} only."
        case PayloadTooLarge(limit=limit):
            return "payload_too_large", "Payload Too Large", f"The request body exceeds {limit} bytes."
        case UnsupportedEncoding(encoding=encoding):
            return (
                "unsupported_media_type",
                "Unsupported Media Type",
                f"The request body's Content-Encoding ({encoding}) cannot be decoded.",
            )
        case RequestTimeout():
            return "request_timeout", "Request Timeout", "The request body did not arrive in time."
        case RateLimited(retry_after=seconds):
            return "too_many_requests", "Too Many Requests", f"Too many failed attempts; retry in {seconds} s."
        case StoreUnavailable():
            return "service_unavailable", "Service Unavailable", "The service is temporarily unavailable."
        case UpstreamUnavailable(timeout=True):
            return "gateway_timeout", "Gateway Timeout", "The application did not accept a connection in time."
        case UpstreamUnavailable():
            return "bad_gateway", "Bad Gateway", "The application cannot be reached."
    return "internal_error", "Internal Server Error", "An unexpected error occurred."


dialect = ActivePlatform()
