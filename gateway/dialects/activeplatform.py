"""ActivePlatform reseller API v3: ``GET /api/v3/resellers/{reseller_id}/user_authentication/token``.

The manager's ``X-Api-Token`` authenticates; the answer is ``{"owner_email", "owner_token"}`` and the
customer panel is opened at ``{public_url}/?user_email=..&user_token=..``. Errors are JSON:API.
"""

from __future__ import annotations

import re

from aiohttp import web

from ..config import AppConfig
from ..core import ImpersonationCommand, MintResult, SubjectRef
from ..errors import Invalid, NotFound, Unauthenticated
from . import Carrier, Dialect, Endpoint, HttpRequest, Where, json_response, on

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

    # code, title and detail of each error's JSON:API object
    errors = (
        on("unauthenticated", "unauthorized", "Unauthorized", "The X-Api-Token header is missing.", reason="missing"),
        on("unauthenticated", "unauthorized", "Unauthorized", "The API token is not valid."),
        on("forbidden", "forbidden", "Forbidden", "The manager's role does not allow this method.", reason="role"),
        on("forbidden", "forbidden", "Forbidden", "The {mode_header} header asks for a mode not allowed for this app.",
           reason="mode"),
        on("forbidden", "forbidden", "Forbidden",
           "The reseller is not the manager's reseller or one of its downstream resellers."),
        on("not_found", "not_found", "Not Found", "Reseller not found.", what="reseller"),
        on("not_found", "not_found", "Not Found", "Account not found."),
        on("invalid", "invalid_parameter", "Bad Request", "The {reason_header} header is required.",
           field="reason", reason="missing"),
        on("invalid", "invalid_parameter", "Bad Request",
           "The {reason_header} header must be {reason_max} printable characters at most.", field="reason"),
        on("invalid", "invalid_parameter", "Bad Request", "The {mode_header} header must be one of: {modes}.",
           field="mode"),
        on("invalid", "invalid_parameter", "Bad Request", "The {field} parameter is required.", reason="missing"),
        on("invalid", "invalid_parameter", "Bad Request", "The {field} parameter must be a number."),
        on("grant_refused", "unauthorized", "Unauthorized", "The login token is invalid or has expired."),
        on("method_not_allowed", "method_not_allowed", "Method Not Allowed", "This endpoint accepts {allowed} only."),
        on("payload_too_large", "payload_too_large", "Payload Too Large", "The request body exceeds {limit} bytes."),
        on("unsupported_encoding", "unsupported_media_type", "Unsupported Media Type",
           "The request body's Content-Encoding ({encoding}) cannot be decoded."),
        on("request_timeout", "request_timeout", "Request Timeout", "The request body did not arrive in time."),
        on("rate_limited", "too_many_requests", "Too Many Requests",
           "Too many failed attempts; retry in {retry_after} s."),
        on("store_unavailable", "service_unavailable", "Service Unavailable",
           "The service is temporarily unavailable."),
        on("upstream_unavailable", "gateway_timeout", "Gateway Timeout",
           "The application did not accept a connection in time.", timeout=True),
        on("upstream_unavailable", "bad_gateway", "Bad Gateway", "The application cannot be reached."),
        on("internal", "internal_error", "Internal Server Error", "An unexpected error occurred."),
    )  # fmt: skip

    def envelope(self, status: int, parts: tuple[str | int, ...]) -> web.Response:
        code, title, detail = parts
        body = {"errors": [{"status": str(status), "code": code, "title": title, "detail": detail}]}
        return json_response(body, status=status, content_type=MEDIA_TYPE)


dialect = ActivePlatform()
