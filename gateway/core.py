"""The one impersonation path every dialect goes through.

A dialect turns a vendor request into an :class:`ImpersonationCommand`; :class:`Gateway` authenticates
the actor against the directory, applies policy, and mints a grant through the store. A browser coming
back with the grant (an :class:`Offer`) is redeemed here too: the grant is consumed atomically, the
policy checked again, and a signed assertion made for the downstream app. Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson

from .assertion import Signer
from .audit import Audit
from .config import AppConfig, Config
from .directory import Principal, Subject
from .directory_reader import DirectoryReader
from .errors import Forbidden, GrantRefused, Invalid, NotFound, Refusal, StoreUnavailable, Unauthenticated
from .limits import FailureLimits, redemption_keys
from .metrics import Metrics
from .policy import Policy, actor_key, grant_mode
from .session_rules import MODES as MODES
from .sessions import Sessions
from .store import Pair, Store


@dataclass(frozen=True)
class SubjectRef:
    """How a command names its subject; a dialect fills the keys its vendor uses."""

    id: str | None = None  # account_id, client_id
    identity: str | None = None  # a user name, UPN or e-mail
    domain: str | None = None  # narrows ``identity``
    identifier: str | None = None  # a partner's identifier for the user
    token: str | None = None  # the user's own token


@dataclass(frozen=True)
class ImpersonationCommand:
    """One request to mint a grant, whatever dialect it came in."""

    app: str
    dialect: str
    credential: str | None  # the actor's credential as presented; None when it was missing
    target: SubjectRef
    client: str
    reseller: str | None = None  # the reseller the request acts through (ActivePlatform's path)
    custom_data: Any = None
    bind: tuple[str, ...] = ()  # subject fields that must come back with the grant (e.g. "email")
    extra_scopes: tuple[str, ...] = ()  # further grants for the same subject, each with its own scope
    credential_name: str = "actor"  # which header or field held the credential, for the dialect's errors
    reason: str | None = None  # why the actor impersonates (a ticket, a sentence): audit events and the assertion
    ttl_seconds: int | None = None  # a shorter grant than the app's grant_ttl_seconds (the native API)
    mode: str | None = None  # one of MODES, asked for by the actor; None: the app's default (its session.mode)


@dataclass(frozen=True)
class Grant:
    """A single-use right to act as ``subject`` in ``app``; stored as JSON under its id (derived from its token)."""

    id: str
    app: str
    dialect: str
    subject: str
    actor: str
    role: str
    actor_key: str  # a prefix of the actor's credential hash: rotation or removal revokes the grant
    issued_at: int
    expires_at: int
    email: str | None = None
    uuid: str | None = None  # kept when a carrier must bring it back (BTC Direct's links)
    custom_data: Any = None
    scope: str | None = None
    bound: tuple[str, ...] = ()  # the fields of this grant (email, uuid) its carrier must bring back
    reason: str | None = None
    family: str | None = None  # the id of the mint's first grant, for the further grants of the same mint
    inc: str | None = None  # the incarnation of the subject it was minted for (short: stored with every grant)
    mode: str | None = None  # the session's mode when not "full" (None: full, and nothing stored)

    def bound_values(self) -> dict[str, str]:
        return {name: str(getattr(self, name, None)) for name in self.bound}

    def to_json(self) -> bytes:
        """The stored form: without the id, which is the key's, nor empty fields (every byte counts a million
        times)."""
        return orjson.dumps({k: v for k, v in self.__dict__.items() if v is not None and v != () and k != "id"})

    @classmethod
    def from_json(cls, grant_id: str, data: bytes) -> Grant:
        fields = orjson.loads(data)
        return cls(id=grant_id, **{**fields, "bound": tuple(fields.get("bound", ()))})


@dataclass(frozen=True)
class MintResult:
    token: str
    grant: Grant
    subject: Subject
    extra: Mapping[str, tuple[str, Grant]] = field(default_factory=dict)  # scope -> (token, grant)


# Why an actor impersonates: every dialect's mint request may say it in this header (the native API in a field).
REASON_HEADER = "X-Impersonation-Reason"
REASON_MAX = 200


# What an impersonation may do (DESIGN §13): every dialect's mint request may ask in this header (the native API in a
# field) for one of MODES; the app's session.mode is the default and the most it may get.
MODE_HEADER = "X-Impersonation-Mode"


def parse_mode(values: Sequence[str]) -> str | None:
    """The mode among a request's ``values`` (its mode headers or field): None when absent; Invalid("mode",
    "value") for several, or for one that is not one of :data:`MODES` (surrounding blanks aside)."""
    if not values:
        return None
    if len(values) > 1 or values[0].strip() not in MODES:
        raise Invalid("mode", "value")
    return values[0].strip()


def parse_reason(values: Sequence[str]) -> str | None:
    """The reason among a request's ``values`` (its reason headers or field): None when absent or blank;
    Invalid("reason", "value") for several, or for one over :data:`REASON_MAX` or not printable."""
    if not values:
        return None
    if len(values) > 1:
        raise Invalid("reason", "value")
    reason = values[0].strip()
    if len(reason) > REASON_MAX or not reason.isprintable():
        raise Invalid("reason", "value")
    return reason or None


# custom_data (Pyramid's customData, the native API's custom_data) rides in the assertion header: 1 KiB keeps an
# assertion far below what any app's header parser takes (8 KiB is common), so an app never refuses it.
CUSTOM_DATA_MAX = 1024


def check_custom_data(value: Any, name: str) -> Any:
    """``value`` when its size (a string's UTF-8 bytes, else its compact JSON) is at most :data:`CUSTOM_DATA_MAX`;
    Invalid(name, "too_large") otherwise."""
    size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(orjson.dumps(value))
    if size > CUSTOM_DATA_MAX:
        raise Invalid(name, "too_large")
    return value


def grant_id(token: str) -> str:
    """A grant's id: the first 96 bits of its token's SHA-256, base64url (16 characters). It names the grant in
    the store, the logs and the assertion (``jti``); the token cannot be found from it."""
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()[:12]).decode()


GRANT_ID_SHAPE = re.compile(r"[A-Za-z0-9_-]{16}")


# What a grant token looks like: 24 random bytes, base64url without padding. Only such a value in a carrier
# is offered for redemption (and the nginx configuration routes on the same shape).
TOKEN_BYTES = 24
TOKEN_LENGTH = (TOKEN_BYTES * 4 + 2) // 3  # base64url without padding: 32 characters
TOKEN_SHAPE = re.compile(rf"[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}")


@dataclass(frozen=True)
class Offer:
    """A grant token found in one of ``app``'s carriers of a request.

    ``bound`` holds the values found beside it that must equal the grant's (its e-mail, its uuid). A
    ``passive`` carrier may hold the app's own credential instead: a token there that is no grant is not
    a redemption.
    """

    token: str
    app: str
    bound: Mapping[str, str] = field(default_factory=dict)
    passive: bool = False


@dataclass(frozen=True)
class Redemption:
    app: str
    grant: Grant
    token: str  # the offered token that held the grant
    assertion: str


class Gateway:
    """Mints, redeems and revokes grants. One per process; every method is safe to call concurrently.

    Who may act as whom is the :class:`~gateway.policy.Policy`'s to say, what is recorded the
    :class:`~gateway.audit.Audit`'s; the flows here put them together with the store.
    """

    def __init__(self, config: Config, store: Store, signer: Signer, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.signer = signer
        self.metrics = metrics
        self.directory = DirectoryReader(
            store, [a.name for a in config.apps], config.directory.file, config.directory.refresh_seconds
        )
        self.audit = Audit(store, metrics)
        self.limits = FailureLimits(config.rate_limit, store, self.audit)
        self.policy = Policy(self.directory, store, self.limits)
        self.sessions = Sessions(config, store, signer, self.audit, self.directory)

    # -- minting ------------------------------------------------------------------------------------
    async def mint(self, cmd: ImpersonationCommand, request_id: str = "") -> MintResult:
        """Authenticate, authorise and store a grant (plus one per extra scope) in one round trip.

        Raises Unauthenticated, Forbidden, NotFound, Invalid, RateLimited or StoreUnavailable.
        """
        app = self.config.app(cmd.app)
        try:
            principal, subject = await self.policy.authorise(app, cmd, request_id)
        except (Unauthenticated, Forbidden, NotFound, Invalid) as exc:
            self.audit.mint_refused(app, cmd.client, exc, request_id)
            raise
        now = int(time.time())
        ttl = cmd.ttl_seconds or app.grant_ttl_seconds
        token, grant = _new_grant(app, cmd, principal, subject, now, ttl, scope=None)
        extra = {scope: _new_grant(app, cmd, principal, subject, now, ttl, scope=scope, family=grant.id)
                 for scope in cmd.extra_scopes}  # fmt: skip
        pair = None
        if app.supersede:  # this grant becomes the only one of its actor and subject that redeems
            pair = Pair(self.store.pair_key(app.name, principal.id, subject.id), app.grant_ttl_seconds * 1000)
        await self.store.put_grants(
            app.name, [(g.id, g.to_json(), ttl * 1000) for g in [grant, *(g for _, g in extra.values())]],
            self.audit.minted_entry(grant, cmd.client), pair,
        )  # fmt: skip
        self.audit.minted(grant, cmd.client, 1 + len(extra), request_id)
        return MintResult(token=token, grant=grant, subject=subject, extra=extra)

    # -- redemption ---------------------------------------------------------------------------------
    async def redeem(self, offers: Sequence[Offer], client: str, request_id: str = "") -> Redemption | None:
        """Consume every token offered (one atomic script each, sharing a round trip) and sign an assertion for
        the one grant among them.

        Unknown, expired, reused, mismatched or revoked grants all raise the same GrantRefused (its reason is for
        logs and metrics), and so does a request holding more than one live grant (each is spent). When only
        passive carriers were offered and none held a grant, this is no redemption: None.

        Refusals are counted per client like failed credentials (``rate_limit``): past the limit, the client's
        redemptions raise RateLimited, consuming nothing, so guessing grants costs a window per few tries.
        """
        keys = redemption_keys(client)
        self.limits.check(keys)
        try:
            return await self._redeem(offers, client, request_id)
        except GrantRefused:
            with contextlib.suppress(StoreUnavailable):  # the refusal stands; its count is best effort
                await self.limits.record(keys, client, offers[0].app, request_id)
            raise

    async def _redeem(self, offers: Sequence[Offer], client: str, request_id: str) -> Redemption | None:
        found = await self._consume(offers, client, request_id)
        if found is None:
            return None
        token, grant = found
        offer = next((o for o in offers if o.token == token and o.app == grant.app), None)
        app = self.config.app(grant.app) if offer is not None else self.config.app(offers[0].app)
        if offer is None or app.dialect != grant.dialect:
            self._refuse(app, Refusal.WRONG_APP, client, grant, request_id)
        if dict(offer.bound) != grant.bound_values():
            self._refuse(app, Refusal.MISMATCH, client, grant, request_id)
        now = int(time.time())
        if grant.expires_at < now:
            self._refuse(app, Refusal.EXPIRED, client, grant, request_id)
        refusal = await self.policy.still_allowed(app, grant)
        if refusal is not None:
            self._refuse(app, refusal, client, grant, request_id)
        assertion = self.signer.sign(assertion_claims(grant), now)
        await self.audit.redeemed(grant, client, request_id)  # fails closed: no audit, no hand-off
        return Redemption(app=app.name, grant=grant, token=token, assertion=assertion)

    async def _consume(self, offers: Sequence[Offer], client: str, request_id: str) -> tuple[str, Grant] | None:
        """Spend every grant offered; the one live grant among them, None for none. Refuses an unknown token in an
        active carrier, a revoked or reused grant, and several live grants."""
        tokens = list(dict.fromkeys(o.token for o in offers))
        consumed = await asyncio.gather(*(self.store.consume(grant_id(t)) for t in tokens))
        first = self.config.app(offers[0].app)
        grants: list[tuple[str, Grant]] = []
        for token, found in zip(tokens, consumed, strict=True):
            if found.grant is None:
                if not all(o.passive for o in offers if o.token == token):
                    self._refuse(first, Refusal.UNKNOWN, client, request_id=request_id)
                continue
            grant = Grant.from_json(grant_id(token), found.grant)
            if found.state == "revoked":
                self._refuse(first, Refusal.REVOKED, client, grant, request_id)
            if found.state == "reused":
                self.audit.reused(grant, client, request_id)
                self._refuse(first, Refusal.REUSED, client, grant, request_id)
            grants.append((token, grant))
        if len(grants) > 1:
            for _, grant in grants[1:]:
                self.audit.also_refused(grant, Refusal.SEVERAL, client, request_id)
            self._refuse(first, Refusal.SEVERAL, client, grants[0][1], request_id)
        return grants[0] if grants else None

    def refuse(self, app_name: str, reason: Refusal | str, client: str, request_id: str = "") -> NoReturn:
        """Refuse a redemption without consuming anything (a link presented with a method that may not use it).
        A ``reason`` given as a string must be a :class:`Refusal`'s value."""
        self._refuse(self.config.app(app_name), Refusal(reason), client, request_id=request_id)

    def _refuse(
        self, app: AppConfig, reason: Refusal, client: str, grant: Grant | None = None, request_id: str = ""
    ) -> NoReturn:
        self.audit.refused(app, reason, client, grant, request_id)
        raise GrantRefused(reason)

    async def live(self, tokens: Iterable[str]) -> set[str]:
        """The tokens among ``tokens`` that hold a live grant, without consuming any (one round trip)."""
        tokens = list(dict.fromkeys(tokens))
        found = await self.store.live([grant_id(t) for t in tokens])
        return {t for t, is_live in zip(tokens, found, strict=True) if is_live}

    # -- revocation ---------------------------------------------------------------------------------
    async def revoke_grant(self, grant_id: str, by: str) -> Grant | None:
        """Revoke the live grant ``grant_id`` (its redemption gets the ordinary refusal); None when no live grant
        has that id. ``by`` names who revoked it, for the audit."""
        data = await self.store.revoke(grant_id) if GRANT_ID_SHAPE.fullmatch(grant_id) else None
        if data is None:
            return None
        grant = Grant.from_json(grant_id, data)
        await self.store.unindex(grant.app, [grant.id])
        await self.audit.revoked([grant], by)
        return grant

    async def revoke(self, app: str, by: str, actor: str | None = None, subject: str | None = None) -> int:
        """Revoke every live grant of ``app`` (of one actor, one subject, or both); how many were live."""
        revoked = 0
        async for ids in self.store.live_grants(app):
            grants = [Grant.from_json(i, v) for i, v in zip(ids, await self.store.grants(ids), strict=True) if v]
            chosen = [
                g for g in grants if (actor is None or g.actor == actor) and (subject is None or g.subject == subject)
            ]
            deleted = await self.store.delete_grants(app, [g.id for g in chosen])
            gone = [g for g, was_live in zip(chosen, deleted, strict=True) if was_live]
            await self.audit.revoked(gone, by)
            revoked += len(gone)
        self.audit.revoked_by_filter(app, actor, subject, revoked, by)
        return revoked


def _new_grant(
    app: AppConfig, cmd: ImpersonationCommand, principal: Principal, subject: Subject, now: int, ttl: int,
    scope: str | None, family: str | None = None,
) -> tuple[str, Grant]:  # fmt: skip
    bound = tuple(name for name in cmd.bind if getattr(subject, name) is not None)
    token = base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).decode()
    grant = Grant(
        id=grant_id(token),
        app=app.name,
        dialect=app.dialect,
        subject=subject.id,
        actor=principal.id,
        role=principal.role,
        actor_key=actor_key(principal),
        issued_at=now,
        expires_at=now + ttl,
        email=subject.email,
        uuid=subject.uuid if "uuid" in bound else None,
        custom_data=cmd.custom_data,
        scope=scope,
        bound=bound,
        reason=cmd.reason,
        family=family,
        inc=subject.incarnation,
        mode=_stored_mode(grant_mode(app, cmd.mode)),
    )
    return token, grant


def _stored_mode(mode: str) -> str | None:
    """What a grant keeps of its mode: nothing for "full" (most grants), so their stored JSON stays as it was."""
    return None if mode == "full" else mode


def assertion_claims(grant: Grant) -> dict[str, Any]:
    """The claims of the assertion a redemption of ``grant`` hands to its app (DESIGN §7; the signer adds ``iss``,
    ``iat`` and ``exp``)."""
    found: dict[str, Any] = {
        "aud": grant.app,
        "sub": grant.subject,
        "act": {"sub": grant.actor, "role": grant.role},
        "jti": grant.id,
        "dialect": grant.dialect,
    }
    optional = (("email", grant.email), ("custom_data", grant.custom_data), ("scope", grant.scope),
                ("reason", grant.reason))  # fmt: skip
    for key, value in optional:
        if value is not None:
            found[key] = value
    return found


def session_claims(grant: Grant, session_id: str, mode: str, jti: str) -> dict[str, Any]:
    """The claims of the assertion a request of a session carries (DESIGN §13): those of :func:`assertion_claims`
    plus ``sid`` and ``mode``, with the request's own ``jti``."""
    return {**assertion_claims(grant), "jti": jti, "sid": session_id, "mode": mode}
