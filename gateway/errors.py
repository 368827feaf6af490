"""The gateway's error hierarchy.

Core raises these; each dialect renders every one of them in its vendor's shape::

    GatewayError
    ├── Invalid            400  a request field is missing or malformed
    ├── Unauthenticated    401  the actor's credential is missing or unknown
    ├── Forbidden          403  the actor may not mint this grant
    ├── NotFound           404  the subject (or the reseller in the path) does not exist
    ├── GrantRefused       401  a redemption failed (unknown, expired, used, mismatched: one answer)
    ├── MethodNotAllowed   405  another method on a mint or info path (never passed to the app)
    ├── RequestTimeout     408  the client stopped sending its request body
    ├── PayloadTooLarge    413  the request body is over the configured limit
    ├── UnsupportedEncoding 415 the body's Content-Encoding is unknown, or its data does not decode
    ├── RateLimited        429  too many failed credentials from this client or for this credential
    ├── UpstreamUnavailable 502 the app's upstream cannot be reached (504: no connection in time)
    └── StoreUnavailable   503  Redis did not answer in time

Exceptions carry fields, not prose: a dialect turns them into its own texts. Each class has a stable ``code``
(``invalid``, ``not_found``...; ``internal`` for a bare GatewayError, an unexpected failure).
"""

from __future__ import annotations

from enum import StrEnum


class GatewayError(Exception):
    """Base of every error a dialect knows how to render."""

    status = 500
    code = "internal"


class Invalid(GatewayError):
    """``field`` is missing (``reason="missing"``), has a bad value (``reason="type"`` / ``"value"``), or is no field
    of the request (``"unknown"``)."""

    status = 400
    code = "invalid"

    def __init__(self, field: str, reason: str = "missing") -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


class Unauthenticated(GatewayError):
    """The credential named ``credential`` is ``"missing"``, ``"unknown"`` or ``"ambiguous"``."""

    status = 401
    code = "unauthenticated"

    def __init__(self, reason: str = "unknown", credential: str = "actor") -> None:
        super().__init__(reason, credential)
        self.reason = reason
        self.credential = credential


class Forbidden(GatewayError):
    """The actor is known but ``reason`` (``"role"`` or ``"scope"``) forbids this grant."""

    status = 403
    code = "forbidden"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotFound(GatewayError):
    """``what`` (``"subject"`` or ``"reseller"``) looked up ``by`` one of its keys does not exist."""

    status = 404
    code = "not_found"

    def __init__(self, what: str, by: str = "id") -> None:
        super().__init__(what, by)
        self.what = what
        self.by = by


class Refusal(StrEnum):
    """Why a redemption was refused: the ``reason`` of ``grant_refused`` events and of the refused metric."""

    UNKNOWN = "unknown"  # no live grant has the offered token (never minted, expired out of the store)
    REUSED = "reused"  # already redeemed
    EXPIRED = "expired"
    MISMATCH = "mismatch"  # a value bound to the grant (its e-mail, its uuid) did not come back with it
    REVOKED = "revoked"  # revoked on the admin listener, or its actor or subject is no longer allowed
    SUBJECT_CHANGED = "subject_changed"  # the subject was re-created or reactivated since the mint
    SUPERSEDED = "superseded"  # a newer grant of the same actor and subject was minted (``supersede``)
    SEVERAL = "several"  # one request offered more than one live grant
    WRONG_APP = "wrong_app"  # offered to another app than its own
    METHOD = "method"  # offered with a method that may not redeem it
    CROSS_SITE = "cross_site"  # a cross-site POST offered it


class GrantRefused(GatewayError):
    """A redemption failed. ``reason`` is for logs and metrics only, never shown to the caller."""

    status = 401
    code = "grant_refused"

    def __init__(self, reason: Refusal) -> None:
        super().__init__(reason)
        self.reason = reason


class MethodNotAllowed(GatewayError):
    """A mint or info path asked with a method it does not serve; ``allowed`` goes in the ``Allow`` header."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__(allowed)
        self.allowed = allowed


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class RequestTimeout(GatewayError):
    """The body did not arrive within ``seconds``."""

    status = 408
    code = "request_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class UnsupportedEncoding(GatewayError):
    """A mint or carrier body sent with a ``Content-Encoding`` the gateway cannot (or could not) decode."""

    status = 415
    code = "unsupported_encoding"

    def __init__(self, encoding: str) -> None:
        super().__init__(encoding)
        self.encoding = encoding


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class StoreUnavailable(GatewayError):
    status = 503
    code = "store_unavailable"


class UpstreamUnavailable(GatewayError):
    """No connection to the app's upstream: refused or failed (502), or none within its connect timeout, all
    of them busy or the app slow to accept (``timeout``, 504). A redemption meeting it spends no grant."""

    status = 502
    code = "upstream_unavailable"

    def __init__(self, timeout: bool = False) -> None:
        super().__init__(timeout)
        self.timeout = timeout
        if timeout:
            self.status = 504
