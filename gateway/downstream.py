"""For the apps behind the gateway: verify its ``X-Impersonation-Assertion``.

A :class:`Verifier` checks an assertion against the gateway's JWKS URL (keys cached; fetched again for a
``kid`` it does not know, at most once per ``refetch_seconds``, so forged ``kid`` values cannot make it hammer
the gateway), the audience, the issuer when given, the expiry, and that its ``jti`` is seen once only (a small
replay cache, bounded in size). It answers an :class:`Impersonation` or raises :class:`InvalidAssertion`.

Use it as a plain function (``verifier.verify(token)``, any framework, thread-safe) or, in aiohttp, as a
middleware (:func:`middleware`) that puts the :class:`Impersonation` on the request. Only PyJWT (and
``cryptography``) and the standard library are needed for the function; aiohttp for the middleware.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

HEADER = "X-Impersonation-Assertion"
REQUIRED = ["iss", "aud", "sub", "act", "iat", "exp", "jti"]


class InvalidAssertion(Exception):
    """The assertion cannot be trusted; the message says why (safe to log, never holds the token)."""


@dataclass(frozen=True)
class Impersonation:
    """Who the user is (``subject``) and who acts as them (``actor``, with ``role``), from a verified assertion."""

    subject: str
    actor: str
    role: str | None
    app: str
    grant_id: str
    email: str | None = None
    reason: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)


class ReplayCache:
    """The ``jti`` values seen, each until its assertion expires; at most ``size`` (the oldest go first)."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, jti: str, expires_at: float, now: float) -> bool:
        """Record ``jti``; False when it was already seen (and has not expired)."""
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)  # expired: insertion order is close to expiry order
            if jti in self._seen:
                return False
            self._seen[jti] = expires_at
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)
            return True


class Verifier:
    """Verifies the gateway's assertions for one app (``audience``: its name in the gateway's config, or several).

    ``fetch`` replaces the HTTP GET of the JWKS (it returns the document's bytes); ``verify_async`` uses
    ``fetch_async`` when given, else runs ``fetch`` in a thread.
    """

    def __init__(
        self,
        jwks_url: str,
        audience: str | Collection[str],
        *,
        issuer: str | None = None,
        leeway: float = 5.0,
        cache_seconds: float = 300.0,
        refetch_seconds: float = 10.0,
        replay: ReplayCache | None = None,
        fetch: Callable[[str], bytes] | None = None,
        fetch_async: Callable[[str], Awaitable[bytes]] | None = None,
    ) -> None:
        self.jwks_url = jwks_url
        self.audience = [audience] if isinstance(audience, str) else list(audience)
        self.issuer = issuer
        self.leeway = leeway
        self.cache_seconds = cache_seconds
        self.refetch_seconds = refetch_seconds
        self.replay = replay if replay is not None else ReplayCache()
        self._fetch = fetch or _http_get
        self._fetch_async = fetch_async
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    # -- the plain function ------------------------------------------------------------------------------
    def verify(self, token: str) -> Impersonation:
        """The impersonation an assertion states; InvalidAssertion when it is forged, expired, for another app,
        or seen before. May fetch the JWKS (blocking)."""
        kid = _kid(token)
        self._ensure_keys(kid)
        return self._check(token, kid)

    async def verify_async(self, token: str) -> Impersonation:
        """:meth:`verify` without blocking the event loop."""
        kid = _kid(token)
        if self._needs_fetch(kid):
            if self._fetch_async is not None:
                self._load(await self._get_async(self._fetch_async))
            else:
                await asyncio.to_thread(self._ensure_keys, kid)
        return self._check(token, kid)

    def _ensure_keys(self, kid: str) -> None:
        if self._needs_fetch(kid):
            with self._lock:  # one fetch at a time, however many threads ask
                if self._needs_fetch(kid):
                    self._load(self._get(self._fetch))

    # -- keys --------------------------------------------------------------------------------------------
    def _needs_fetch(self, kid: str) -> bool:
        age = time.monotonic() - self._fetched_at
        if age >= self.cache_seconds:
            return True
        return kid not in self._keys and age >= self.refetch_seconds

    def _get(self, fetch: Callable[[str], bytes]) -> bytes:
        self._fetched_at = time.monotonic()  # a failure waits refetch_seconds too: a dead gateway is not hammered
        try:
            return fetch(self.jwks_url)
        except Exception as exc:
            raise InvalidAssertion(f"cannot fetch the gateway's keys from {self.jwks_url}: {exc}") from None

    async def _get_async(self, fetch: Callable[[str], Awaitable[bytes]]) -> bytes:
        self._fetched_at = time.monotonic()
        try:
            return await fetch(self.jwks_url)
        except Exception as exc:
            raise InvalidAssertion(f"cannot fetch the gateway's keys from {self.jwks_url}: {exc}") from None

    def _load(self, document: bytes) -> None:
        try:
            keys = jwt.PyJWKSet.from_json(document.decode()).keys
        except (jwt.PyJWTError, ValueError, UnicodeDecodeError) as exc:
            raise InvalidAssertion(f"the gateway's JWKS is not valid: {exc}") from None
        self._keys = {k.key_id: k for k in keys if k.key_id}

    # -- claims ------------------------------------------------------------------------------------------
    def _check(self, token: str, kid: str) -> Impersonation:
        key = self._keys.get(kid)
        if key is None:
            raise InvalidAssertion("signed with a key the gateway does not publish")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=["EdDSA"], audience=self.audience, issuer=self.issuer, leeway=self.leeway,
                options={"require": REQUIRED},
            )  # fmt: skip
        except jwt.PyJWTError as exc:
            raise InvalidAssertion(f"not a valid assertion: {exc}") from None
        act = claims.get("act")
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str):
            raise InvalidAssertion("not a valid assertion: no act.sub claim")
        jti = claims["jti"]
        if not isinstance(jti, str) or not self.replay.first_time(jti, float(claims["exp"]) + self.leeway, time.time()):
            raise InvalidAssertion("replayed: this assertion was already used")
        return Impersonation(
            subject=str(claims["sub"]), actor=act["sub"], role=act.get("role"), app=str(claims["aud"]), grant_id=jti,
            email=claims.get("email"), reason=claims.get("reason"), claims=claims,
        )  # fmt: skip


def _kid(token: str) -> str:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as exc:
        raise InvalidAssertion(f"not a valid assertion: {exc}") from None
    if not isinstance(kid, str) or not kid:
        raise InvalidAssertion("not a valid assertion: no kid in its header")
    return kid


def _http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read(1_000_000)
        return body


# -- aiohttp -------------------------------------------------------------------------------------------------
IMPERSONATION = web.RequestKey("impersonation", Impersonation)


def middleware(verifier: Verifier, *, required: bool = False) -> Any:
    """An aiohttp middleware: a request with a valid assertion carries its :class:`Impersonation` (read it with
    :func:`impersonation`); an invalid one is answered 401; without one the request goes on (401 when
    ``required``)."""

    @web.middleware
    async def verify(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        token = request.headers.get(HEADER)
        if token:
            try:
                request[IMPERSONATION] = await verifier.verify_async(token)
            except InvalidAssertion as exc:
                return web.Response(status=401, text=f"Invalid impersonation assertion: {exc}\n")
        elif required:
            return web.Response(status=401, text=f"Missing {HEADER}\n")
        return await handler(request)

    return verify


def impersonation(request: web.Request) -> Impersonation | None:
    """What :func:`middleware` found on ``request``, if anything."""
    return request.get(IMPERSONATION)
