"""BTC Direct partner API: ``GET /api/v1/user/login-token``.

The partner authenticates with ``Authorization: Bearer <token>`` or ``X-Api-Key`` (not both) and names the
user with ``User-Identifier`` and/or ``User-Authorization: Bearer <the user's own token>``. The answer is
``{"uuid", "token", "expiryDate"}``; the user is logged in by opening one of the ``privateUrls`` of
``GET /api/v1/system/info`` with ``?token=..&uuid=..``, or by ``POST /api/v2/user/login-with-token``
with ``{"uuid", "token"}``. Errors are ``{"errors": {"ERxxx": {"code", "message", "solution"}}}``, every
code taken from :data:`CATALOGUE`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from ..config import AppConfig
from ..core import MODE_HEADER, MODES, REASON_HEADER, REASON_MAX, ImpersonationCommand, MintResult, SubjectRef
from ..errors import Invalid, Unauthenticated
from . import Carrier, Dialect, Endpoint, HttpRequest, Rule, Where, bearer, error_class, json_response, on

_IDENTIFIER = re.compile(r"[A-Za-z0-9]{36,255}")
LOGIN_WITH_TOKEN = Endpoint("POST", "/api/v2/user/login-with-token", kind="redeem")
# The secured pages the seed names (continue KYC, upgrade the account, contact support).
PRIVATE_PAGES = ("kyc", "upgrade", "support")


@dataclass(frozen=True)
class Entry:
    status: int
    message: str
    solution: str


# Every code this dialect answers with. ER700-ER999 are the seed's texts, word for word; ER920-ER928
# are the gateway's own (the seed has no rate-limit, body-size, body-encoding, timeout, reason, mode or method error).
CATALOGUE: dict[str, Entry] = {
    "ER700": Entry(400, "User authorization token not found.", "Provide a user authorization token."),
    "ER701": Entry(
        400, "User authorization token has expired.", "Request a new authorization token, or refresh the token."
    ),
    "ER702": Entry(400, "User authorization token is invalid.", "Provide a valid user authorization token."),
    "ER703": Entry(
        400,
        "User identifier does not belong to the user in the user authorization token.",
        "Provide a valid user identifier, or remove the user identifier header.",
    ),
    "ER704": Entry(
        400,
        "No user identifier found in headers.",
        "Provide a valid user identifier, or use the user/password authentication mechanism to request a user "
        "token and send that.",
    ),
    "ER705": Entry(
        400,
        "User identifier is not linked to a user.",
        "Provide a valid user identifier, link this user identifier to a user account, or use the user/password "
        "authentication mechanism.",
    ),
    "ER706": Entry(
        400,
        "User identifier is invalid.",
        "Provide a valid user identifier, a unique identifier string for the user account that is not already in use.",
    ),
    "ER707": Entry(
        400,
        "User identifier is invalid.",
        "Please provide an identifier, consisting of 36 - 255 characters, numeric or alphanumeric only.",
    ),
    "ER708": Entry(400, "There is a pending document for this side.", "Wait for the pending document to be reviewed."),
    "ER709": Entry(400, "User not found, or user has been deleted.", "Provide a valid user identifier."),
    "ER800": Entry(400, "Authorization token is invalid.", "Provide a valid authorization token."),
    "ER801": Entry(400, "Authorization token has expired.", "Request a new authorization token."),
    "ER802": Entry(400, "Authorization token not found.", "Provide an authorization token."),
    "ER803": Entry(400, "Multiple authorization methods used.", "Use exactly one authorization method."),
    "ER805": Entry(400, "API key is invalid.", "Provide a valid API key."),
    "ER806": Entry(400, "API key not found.", "Provide an API key."),
    "ER920": Entry(
        429, "Too many requests.", "Wait the number of seconds given in the Retry-After header, then try again."
    ),
    "ER921": Entry(413, "Request body is too large.", "Send a smaller request body."),
    "ER922": Entry(
        415,
        "Request body cannot be decoded.",
        "Send the body without a Content-Encoding, or with gzip or deflate.",
    ),
    "ER923": Entry(408, "Request body not received in time.", "Send the whole request body without pausing."),
    "ER924": Entry(400, "Impersonation reason not found.", f"Say why in the {REASON_HEADER} header."),
    "ER925": Entry(
        400,
        "Impersonation reason is invalid.",
        f"Send one {REASON_HEADER} of {REASON_MAX} printable characters at most.",
    ),
    "ER926": Entry(
        403,
        "Impersonation mode not allowed.",
        f"Ask for the app's mode or a lesser one in the {MODE_HEADER} header, or leave the header out.",
    ),
    "ER927": Entry(400, "Impersonation mode is invalid.", f"Send one {MODE_HEADER} header: {' or '.join(MODES)}."),
    "ER928": Entry(405, "Method not allowed.", "Use the method the Allow header names."),
    "ER999": Entry(500, "A general error has occurred. Please contact our support team.", "Contact our support team."),
}


def answer(code: str, error: str, **when: object) -> Rule:
    """A rule answering the error of code ``error`` with the catalogue's ``code`` and its status."""
    return Rule(error_class(error), (code,), tuple(when.items()), CATALOGUE[code].status)


class BtcDirect(Dialect):
    name = "btcdirect"
    endpoints = (
        Endpoint("GET", "/api/v1/user/login-token"),
        Endpoint("GET", "/api/v1/system/info", kind="info"),
    )
    # Every POST to login-with-token is a redemption: a body without a usable token is refused like an unknown one.
    carriers = (
        Carrier(Where.QUERY, "token", bound=(("uuid", "uuid"),)),
        Carrier(Where.BODY, "token", bound=(("uuid", "uuid"),), endpoint=LOGIN_WITH_TOKEN),
    )

    def parse(self, req: HttpRequest, app: AppConfig) -> ImpersonationCommand:
        credential, credential_name = _partner_credential(req)
        if credential is None:  # partner errors come before any error about the user headers
            raise Unauthenticated("missing", credential_name)
        identifiers = req.headers.getall("User-Identifier", [])
        if len(identifiers) > 1 or (identifiers and not _IDENTIFIER.fullmatch(identifiers[0])):
            raise Invalid("user_identifier", "value")
        return ImpersonationCommand(
            app=app.name,
            dialect=self.name,
            credential=credential,
            target=SubjectRef(identifier=identifiers[0] if identifiers else None, token=_user_token(req)),
            client=req.client,
            bind=("uuid",),
            credential_name=credential_name,
        )

    def render(self, result: MintResult, app: AppConfig, public_url: str) -> web.Response:
        expiry = datetime.fromtimestamp(result.grant.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json_response({"uuid": result.subject.uuid, "token": result.token, "expiryDate": expiry})

    # the catalogue code of each error
    errors = (
        answer("ER803", "unauthenticated", reason="ambiguous"),
        answer("ER806", "unauthenticated", reason="missing", credential="api_key"),
        answer("ER802", "unauthenticated", reason="missing"),
        answer("ER805", "unauthenticated", credential="api_key"),
        answer("ER800", "unauthenticated"),
        answer("ER926", "forbidden", reason="mode"),
        # A known credential whose role may not mint (or whose scope excludes the user): the seed has no
        # "forbidden" code, and to BTC Direct such a credential is simply not a valid partner token.
        answer("ER800", "forbidden"),
        answer("ER924", "invalid", field="reason", reason="missing"),
        answer("ER925", "invalid", field="reason"),
        answer("ER927", "invalid", field="mode"),
        answer("ER703", "invalid", field="identifier", reason="mismatch"),
        answer("ER707", "invalid", field="user_identifier"),
        answer("ER700", "invalid", field="user_authorization", reason="missing"),
        answer("ER702", "invalid", field="user_authorization"),
        answer("ER704", "invalid"),  # core's Invalid("subject", "missing"): neither user header was sent
        answer("ER705", "not_found", by="identifier"),
        answer("ER702", "not_found", by="token"),
        answer("ER709", "not_found"),
        # The login token (and its uuid) is a one-time user token: one answer for unknown, expired, used,
        # mismatched or revoked, so nothing tells which. A refused redemption is 401 in every dialect (no oracle).
        on("grant_refused", "ER702"),
        answer("ER928", "method_not_allowed"),
        answer("ER921", "payload_too_large"),
        answer("ER922", "unsupported_encoding"),
        answer("ER923", "request_timeout"),
        answer("ER920", "rate_limited"),
        # The seed's general error: a store outage is 503, an unreachable app 502 or 504, anything unexpected 500.
        on("store_unavailable", "ER999"),
        on("upstream_unavailable", "ER999"),
        answer("ER999", "internal"),
    )

    def envelope(self, status: int, parts: tuple[str | int, ...]) -> web.Response:
        (code,) = parts
        entry = CATALOGUE[str(code)]
        return json_response({"errors": {code: {"code": code, "message": entry.message, "solution": entry.solution}}},
                             status=status)  # fmt: skip

    def info(self, req: HttpRequest, app: AppConfig, public_url: str) -> web.Response:
        return json_response({"privateUrls": {page: f"{public_url}/{page}" for page in PRIVATE_PAGES}})


def _partner_credential(req: HttpRequest) -> tuple[str | None, str]:
    """The partner's credential (None when missing) and the header it came in: "authorization" or "api_key"."""
    authorizations = req.headers.getall("Authorization", [])
    keys = req.headers.getall("X-Api-Key", [])
    if len(authorizations) + len(keys) > 1:
        raise Unauthenticated("ambiguous", "partner")
    if keys:
        return keys[0].strip() or None, "api_key"
    if not authorizations:
        return None, "authorization"
    token = bearer(authorizations[0])
    if token:
        return token, "authorization"
    if authorizations[0].strip().lower() in ("", "bearer"):
        return None, "authorization"
    raise Unauthenticated("unknown", "authorization")  # another scheme than Bearer


def _user_token(req: HttpRequest) -> str | None:
    values = req.headers.getall("User-Authorization", [])
    if not values:
        return None
    token = bearer(values[0])
    if len(values) == 1 and token:
        return token
    if len(values) == 1 and values[0].strip().lower() in ("", "bearer"):
        raise Invalid("user_authorization", "missing")
    raise Invalid("user_authorization", "value")


dialect = BtcDirect()
