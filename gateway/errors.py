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

Exceptions carry fields, not prose: a dialect turns them into its own texts.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error a dialect knows how to render."""

    status = 500


class Invalid(GatewayError):
    """``field`` is missing (``reason="missing"``), has a bad value (``reason="type"`` / ``"value"``), or is no field
    of the request (``"unknown"``)."""

    status = 400

    def __init__(self, field: str, reason: str = "missing") -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


class Unauthenticated(GatewayError):
    """The credential named ``credential`` is ``"missing"``, ``"unknown"`` or ``"ambiguous"``."""

    status = 401

    def __init__(self, reason: str = "unknown", credential: str = "actor") -> None:
        super().__init__(reason, credential)
        self.reason = reason
        self.credential = credential


class Forbidden(GatewayError):
    """The actor is known but ``reason`` (``"role"`` or ``"scope"``) forbids this grant."""

    status = 403

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotFound(GatewayError):
    """``what`` (``"subject"`` or ``"reseller"``) looked up ``by`` one of its keys does not exist."""

    status = 404

    def __init__(self, what: str, by: str = "id") -> None:
        super().__init__(what, by)
        self.what = what
        self.by = by


class GrantRefused(GatewayError):
    """A redemption failed. ``reason`` is for logs and metrics only, never shown to the caller."""

    status = 401

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MethodNotAllowed(GatewayError):
    """A mint or info path asked with a method it does not serve; ``allowed`` goes in the ``Allow`` header."""

    status = 405

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__(allowed)
        self.allowed = allowed


class PayloadTooLarge(GatewayError):
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class RequestTimeout(GatewayError):
    """The body did not arrive within ``seconds``."""

    status = 408

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class UnsupportedEncoding(GatewayError):
    """A mint or carrier body sent with a ``Content-Encoding`` the gateway cannot (or could not) decode."""

    status = 415

    def __init__(self, encoding: str) -> None:
        super().__init__(encoding)
        self.encoding = encoding


class RateLimited(GatewayError):
    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class StoreUnavailable(GatewayError):
    status = 503


class UpstreamUnavailable(GatewayError):
    """No connection to the app's upstream: refused or failed (502), or none within its connect timeout, all
    of them busy or the app slow to accept (``timeout``, 504). A redemption meeting it spends no grant."""

    status = 502

    def __init__(self, timeout: bool = False) -> None:
        super().__init__(timeout)
        self.timeout = timeout
        if timeout:
            self.status = 504
