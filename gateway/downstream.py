"""For the apps behind the gateway: verify its ``X-Impersonation-Assertion``.

A :class:`Verifier` checks an assertion against the gateway's JWKS URL (keys cached; fetched again for a
``kid`` it does not know, at most once per ``refetch_seconds``, so forged ``kid`` values cannot make it hammer
the gateway), the audience, the issuer when given, the expiry, and that its ``jti`` is seen once only. It
answers an :class:`Impersonation` or raises :class:`InvalidAssertion`.

Use it as a plain function (``verifier.verify(token)``, any framework, thread-safe) or, in aiohttp, as a
middleware (:func:`middleware`) that puts the :class:`Impersonation` on the request. Only PyJWT (and
``cryptography``) and the standard library are needed for the function; aiohttp for the middleware.

Replays. By default a Verifier remembers the ``jti`` of each assertion it accepted in its own memory
(:class:`ReplayCache`), each until that assertion expires (``exp`` plus ``leeway``), whatever came after it.
Memory stays bounded: at most ``size`` unexpired ids are held, and while that many are, a new assertion is
refused (it fails closed rather than forget an id that could still be replayed). An app that runs more than
one process or host needs one memory for all of them, or an assertion used on one is accepted on another:
pass the app's Redis (a ``redis.asyncio`` client) as ``Verifier(..., replay=RedisReplayCache(redis))``. Each
``jti`` is then stored with ``SET <prefix><jti> 1 NX PX <ms until exp plus leeway>``, so the first Verifier
to see an assertion takes it and every other refuses it; keys expire on their own. Use it with
:meth:`Verifier.verify_async` or the middleware (:meth:`Verifier.verify` refuses to, it would block). A
Redis error refuses the assertion. The ``redis`` package is needed only by whoever builds the client.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt
from aiohttp import web

if TYPE_CHECKING:  # only for the type: apps without Redis never import it
    from redis.asyncio import Redis

HEADER = "X-Impersonation-Assertion"
REQUIRED = ["iss", "aud", "sub", "act", "iat", "exp", "jti"]


class InvalidAssertion(Exception):
    """The assertion cannot be trusted; the message says why (safe to log, never holds the token)."""


@dataclass(frozen=True)
class Impersonation:
    """Who the user is (``subject``) and who acts as them (``actor``, with ``role``), from a verified assertion.

    ``grant_id`` is the assertion's ``jti``: the grant's id for a hand-off, unique per request in a session held by
    the gateway. ``sid`` (the session id, as the gateway's audit and admin endpoints name it) and ``mode``
    (``"full"`` or ``"read_only"``) are set for a request of such a session, None for a hand-off."""

    subject: str
    actor: str
    role: str | None
    app: str
    grant_id: str
    email: str | None = None
    reason: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    sid: str | None = None
    mode: str | None = None


class ReplayCache:
    """The ``jti`` values seen by this process, each until its assertion expires; at most ``size`` unexpired at
    once. None is forgotten before it expires: when ``size`` are held, a new one is refused instead."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._seen: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []  # a heap: the next to expire first
        self._lock = threading.Lock()

    def first_time(self, jti: str, expires_at: float, now: float) -> bool:
        """Record ``jti`` until ``expires_at``; False when it was seen already (and has not expired). Raises
        InvalidAssertion when ``size`` unexpired ids are held."""
        with self._lock:
            while self._expiries and self._expiries[0][0] < now:
                del self._seen[heapq.heappop(self._expiries)[1]]
            if jti in self._seen:
                return False
            if len(self._seen) >= self.size:
                raise InvalidAssertion(f"refused: {self.size} unexpired assertions are held for replay checks")
            self._seen[jti] = expires_at
            heapq.heappush(self._expiries, (expires_at, jti))
            return True


class RedisReplayCache:
    """The ``jti`` values seen by every Verifier that shares ``redis`` (the app's ``redis.asyncio`` client), each
    kept until its assertion expires: ``SET <prefix><jti> 1 NX PX <ms>``, one round trip per assertion."""

    def __init__(self, redis: Redis, *, prefix: str = "impersonation:jti:") -> None:
        self.redis = redis
        self.prefix = prefix

    async def first_time(self, jti: str, expires_at: float, now: float) -> bool:
        """Record ``jti`` until ``expires_at``; False when some Verifier recorded it already. Raises
        InvalidAssertion when Redis fails (the assertion cannot be known to be new)."""
        milliseconds = max(1, math.ceil((expires_at - now) * 1000))
        try:
            stored = await self.redis.set(self.prefix + jti, b"1", nx=True, px=milliseconds)
        except Exception as exc:  # whatever the client raises (connection, timeout, READONLY, ...): fail closed
            raise InvalidAssertion(f"cannot check for a replay: Redis failed ({type(exc).__name__})") from None
        return bool(stored)


class Verifier:
    """Verifies the gateway's assertions for one app (``audience``: its name in the gateway's config, or several).

    ``fetch`` replaces the HTTP GET of the JWKS (it returns the document's bytes); ``verify_async`` uses
    ``fetch_async`` when given, else runs ``fetch`` in a thread. ``clock`` (seconds, monotonic) times the key
    cache's ``cache_seconds`` and ``refetch_seconds``.
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
        replay: ReplayCache | RedisReplayCache | None = None,
        fetch: Callable[[str], bytes] | None = None,
        fetch_async: Callable[[str], Awaitable[bytes]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jwks_url = jwks_url
        self.audience = [audience] if isinstance(audience, str) else list(audience)
        self.issuer = issuer
        self.leeway = leeway
        self.cache_seconds = cache_seconds
        self.refetch_seconds = refetch_seconds
        self.replay: ReplayCache | RedisReplayCache = replay if replay is not None else ReplayCache()
        self._fetch = fetch or _http_get
        self._fetch_async = fetch_async
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    # -- the plain function ------------------------------------------------------------------------------
    def verify(self, token: str) -> Impersonation:
        """The impersonation an assertion states; InvalidAssertion when it is forged, expired, for another app,
        or seen before. May fetch the JWKS (blocking). Not with a :class:`RedisReplayCache` (TypeError)."""
        if isinstance(self.replay, RedisReplayCache):
            raise TypeError("a Verifier with a RedisReplayCache verifies with verify_async (or the middleware)")
        kid = _kid(token)
        self._ensure_keys(kid)
        who, expires_at = self._check(token, kid)
        if not self.replay.first_time(who.grant_id, expires_at, time.time()):
            raise InvalidAssertion("replayed: this assertion was already used")
        return who

    async def verify_async(self, token: str) -> Impersonation:
        """:meth:`verify` without blocking the event loop."""
        kid = _kid(token)
        if self._needs_fetch(kid):
            if self._fetch_async is not None:
                self._load(await self._get_async(self._fetch_async))
            else:
                await asyncio.to_thread(self._ensure_keys, kid)
        who, expires_at = self._check(token, kid)
        if isinstance(self.replay, RedisReplayCache):
            first = await self.replay.first_time(who.grant_id, expires_at, time.time())
        else:
            first = self.replay.first_time(who.grant_id, expires_at, time.time())
        if not first:
            raise InvalidAssertion("replayed: this assertion was already used")
        return who

    def _ensure_keys(self, kid: str) -> None:
        if self._needs_fetch(kid):
            with self._lock:  # one fetch at a time, however many threads ask
                if self._needs_fetch(kid):
                    self._load(self._get(self._fetch))

    # -- keys --------------------------------------------------------------------------------------------
    def _needs_fetch(self, kid: str) -> bool:
        age = self._clock() - self._fetched_at
        if age >= self.cache_seconds:
            return True
        return kid not in self._keys and age >= self.refetch_seconds

    def _get(self, fetch: Callable[[str], bytes]) -> bytes:
        self._fetched_at = self._clock()  # a failure waits refetch_seconds too: a dead gateway is not hammered
        try:
            return fetch(self.jwks_url)
        except Exception as exc:
            raise InvalidAssertion(f"cannot fetch the gateway's keys from {self.jwks_url}: {exc}") from None

    async def _get_async(self, fetch: Callable[[str], Awaitable[bytes]]) -> bytes:
        self._fetched_at = self._clock()
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
    def _check(self, token: str, kid: str) -> tuple[Impersonation, float]:
        """The impersonation a genuine assertion states, and until when its ``jti`` must be remembered."""
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
        if not isinstance(jti, str) or not jti:
            raise InvalidAssertion("not a valid assertion: its jti is not a string")
        who = Impersonation(
            subject=str(claims["sub"]), actor=act["sub"], role=act.get("role"), app=str(claims["aud"]), grant_id=jti,
            email=claims.get("email"), reason=claims.get("reason"), claims=claims,
            sid=_text_claim(claims, "sid"), mode=_text_claim(claims, "mode"),
        )  # fmt: skip
        return who, float(claims["exp"]) + self.leeway


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


def _text_claim(claims: Mapping[str, Any], name: str) -> str | None:
    """A claim that is a string when present (``sid``, ``mode``); None when absent or not a string."""
    value = claims.get(name)
    return value if isinstance(value, str) else None
