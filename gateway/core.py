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
from pathlib import Path
from typing import Any, NoReturn

import orjson
import structlog

from .assertion import Signer
from .config import AppConfig, Config
from .directory import (
    Actors,
    AppDirectory,
    Principal,
    Subject,
    credential_hash,
    identity_candidates,
    load_directory_file,
    same_domain,
    source_digest,
)
from .errors import Forbidden, GrantRefused, Invalid, NotFound, RateLimited, StoreUnavailable, Unauthenticated
from .logging import log_event
from .metrics import Metrics
from .store import LoadSummary, LoadUnderWay, Pair, Store

log = structlog.get_logger("gateway")


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
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{32}")


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


class Directory:
    """The directory as this process reads it.

    Each app's actors (principals and resellers: few) are cached with the generation they come from, and
    followed within ``directory.refresh_seconds`` of a load made by any process. Subjects (possibly
    millions) are looked up in the store, in the generation this process follows, one request at a time:
    the process's memory does not grow with them, and a load never stops it (the new generation is written
    beside the one in use, then switched to).

    When the store has no directory for an app (Redis restarted empty, a flush) and a directory file is
    configured, the file is loaded again, so the gateway heals without a restart.
    """

    def __init__(self, store: Store, apps: Sequence[str], file: Path | None, refresh_seconds: float = 1.0) -> None:
        self.store = store
        self.apps = list(apps)
        self.file = file
        self.grace_seconds = 2 * refresh_seconds + 1  # before a replaced generation is dropped
        self._current: dict[str, tuple[str, Actors, str]] = {}  # app -> (generation, actors, source digest)
        self._read = False
        self._lock = asyncio.Lock()
        self._drops: set[asyncio.Task[None]] = set()

    def actors(self, app: str) -> Actors:
        """The app's principals and resellers (none if it has no directory); StoreUnavailable until read once."""
        if not self._read:
            raise StoreUnavailable()
        found = self._current.get(app)
        return _NO_ACTORS if found is None else found[1]

    async def subject(self, app: str, subject_id: str) -> Subject | None:
        generation = self._generation(app)
        found = None if generation is None else await self.store.subject(app, generation, subject_id)
        if found is None and await self._moved(app, generation):  # a load this process has not followed yet
            return await self.subject(app, subject_id)
        return found

    async def subjects_by(self, app: str, *lookups: tuple[str, str]) -> list[Subject]:
        generation = self._generation(app)
        found = [] if generation is None else await self.store.subjects_by(app, generation, lookups)
        if not found and await self._moved(app, generation):
            return await self.subjects_by(app, *lookups)
        return found

    async def _moved(self, app: str, generation: str | None) -> bool:
        """After a miss: whether the app's generation moved since this process last looked (it then follows it)."""
        current = (await self.store.generations([app]))[app]
        if current is None or current == generation:
            return False
        found = await self.store.actors(app, current)
        if found is None:
            return False
        self._current[app] = (current, *found)
        return True

    def _generation(self, app: str) -> str | None:
        if not self._read:
            raise StoreUnavailable()
        found = self._current.get(app)
        return None if found is None else found[0]

    async def refresh(self, *, load_file: bool = False) -> None:
        """Follow the generation each app's directory is in; ``load_file`` (start-up) loads the directory file
        first, for the apps whose store content did not come from the same file."""
        async with self._lock:
            generations = await self.store.generations(self.apps)
            if self.file is not None and (load_file or any(g is None for g in generations.values())):
                await self._load_file(generations)
                generations = await self.store.generations(self.apps)
            for app, generation in generations.items():
                if generation is None:
                    self._current.pop(app, None)
                elif self._current.get(app, ("",))[0] != generation:
                    found = await self.store.actors(app, generation)
                    if found is not None:
                        self._current[app] = (generation, *found)
            self._read = True

    async def _load_file(self, generations: Mapping[str, str | None]) -> None:
        assert self.file is not None
        for name, directory in load_directory_file(self.file).items():
            if name not in generations:
                log.warning("directory_app_unknown", app=name, file=str(self.file))
                continue
            source = source_digest(directory)
            generation = generations[name]
            found = None if generation is None else await self.store.actors(name, generation)
            if found is not None and found[1] == source:
                continue  # already loaded from this very file
            summary = await self._load_app(directory, source, generation)
            if summary is None:
                continue
            log.info("directory_loaded", file=str(self.file), app=name, generation=summary.generation,
                     subjects=summary.subjects, added=summary.added, changed=summary.changed,
                     removed=summary.removed, seconds=round(summary.seconds, 2))  # fmt: skip
            task = asyncio.create_task(self._drop_later(name))
            self._drops.add(task)
            task.add_done_callback(self._drops.discard)

    async def _load_app(self, directory: AppDirectory, source: str, generation: str | None) -> LoadSummary | None:
        """Load one app from the file, unless another process is loading it: then follow that load (once it is
        done, when the app had no directory yet, so this process never answers as if it had no actors)."""
        app = directory.app
        while True:
            try:  # small batches: this process serves requests between them
                return await self.store.load_app(directory, source=source, batch=200)
            except LoadUnderWay:
                if generation is not None:
                    log.info("directory_load_skipped", file=str(self.file), app=app, reason="another load under way")
                    return None
            await asyncio.sleep(0.1)
            if (await self.store.generations([app]))[app] is not None:
                return None  # the other process's load is done

    async def _drop_later(self, app: str) -> None:
        """Drop the replaced generation once every process has had time to follow the new one."""
        await asyncio.sleep(self.grace_seconds)
        try:
            await self.store.drop_generations(app)
        except StoreUnavailable:
            log.warning("directory_drop_failed", app=app, reason="store unavailable")  # the next load drops it

    async def close(self) -> None:
        for task in list(self._drops):
            task.cancel()
        await asyncio.gather(*self._drops, return_exceptions=True)


_NO_ACTORS = Actors()


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a token or credential, safe to log."""
    return credential_hash(secret)[:12]


class Gateway:
    """Mints and redeems grants. One per process; every method is safe to call concurrently."""

    def __init__(self, config: Config, store: Store, signer: Signer, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.signer = signer
        self.metrics = metrics
        self.directory = Directory(
            store, [a.name for a in config.apps], config.directory.file, config.directory.refresh_seconds
        )
        self._blocked: dict[str, float] = {}  # failure key -> monotonic time its block ends

    # -- minting ------------------------------------------------------------------------------------
    async def mint(self, cmd: ImpersonationCommand, request_id: str = "") -> MintResult:
        """Authenticate, authorise and store a grant (plus one per extra scope) in one round trip.

        Raises Unauthenticated, Forbidden, NotFound, Invalid, RateLimited or StoreUnavailable.
        """
        app = self.config.app(cmd.app)
        try:
            principal, subject = await self._authorise(app, cmd, request_id)
        except (Unauthenticated, Forbidden, NotFound, Invalid) as exc:
            self.metrics.refused.labels(app.name, app.dialect, type(exc).__name__.lower()).inc()
            log_event("mint_refused", {"audit": True, "app": app.name, "dialect": app.dialect, "client": cmd.client,
                                       "error": type(exc).__name__, "reason": _reason(exc),
                                       **_request(request_id)})  # fmt: skip
            raise
        now = int(time.time())
        ttl = cmd.ttl_seconds or app.grant_ttl_seconds
        token, grant = self._new_grant(app, cmd, principal, subject, now, ttl, scope=None)
        extra = {scope: self._new_grant(app, cmd, principal, subject, now, ttl, scope=scope, family=grant.id)
                 for scope in cmd.extra_scopes}  # fmt: skip
        event = {
            "grant_id": grant.id,
            "app": app.name,
            "dialect": app.dialect,
            "actor": principal.id,
            "subject": subject.id,
            "client": cmd.client,
        }
        if cmd.reason is not None:
            event["reason"] = cmd.reason
        pair = None
        if app.supersede:  # this grant becomes the only one of its actor and subject that redeems
            pair = Pair(self.store.pair_key(app.name, principal.id, subject.id), app.grant_ttl_seconds * 1000)
        await self.store.put_grants(
            app.name, [(g.id, g.to_json(), ttl * 1000) for g in [grant, *(g for _, g in extra.values())]],
            {"event": "grant_minted", **event}, pair,
        )  # fmt: skip
        self.metrics.count_minted(app.name, app.dialect, 1 + len(extra))
        log_event("grant_minted", {"audit": True, "role": principal.role, "expires_at": grant.expires_at, **event,
                                   **_request(request_id)})  # fmt: skip
        return MintResult(token=token, grant=grant, subject=subject, extra=extra)

    def _new_grant(
        self, app: AppConfig, cmd: ImpersonationCommand, principal: Principal, subject: Subject, now: int, ttl: int,
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
            actor_key=principal.credential_sha256[:16],
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
        )
        return token, grant

    async def _authorise(self, app: AppConfig, cmd: ImpersonationCommand, request_id: str) -> tuple[Principal, Subject]:
        if cmd.credential is None:
            raise Unauthenticated("missing", cmd.credential_name)
        self._check_blocked(self._failure_keys(cmd))
        actors = self.directory.actors(app.name)
        principal = actors.principal(credential_hash(cmd.credential))
        if principal is None:
            await self._record_failure(self._failure_keys(cmd), cmd.client, cmd.app, request_id)
            raise Unauthenticated("unknown", cmd.credential_name)
        if principal.role not in app.roles_allowed_to_mint:
            raise Forbidden("role")
        if app.require_reason and cmd.reason is None:
            raise Invalid("reason", "missing")
        if cmd.ttl_seconds is not None and not 0 < cmd.ttl_seconds <= app.grant_ttl_seconds:
            raise Invalid("ttl_seconds", "value")
        reseller = cmd.reseller
        if principal.reseller is not None or reseller is not None:
            # ActivePlatform: the path reseller must be the principal's or downstream of it, and the
            # account must belong to the path reseller's subtree.
            reseller = reseller or principal.reseller
            assert reseller is not None
            if not actors.reseller_exists(reseller):
                raise NotFound("reseller")
            if principal.reseller is None or not actors.within(reseller, principal.reseller):
                raise Forbidden("scope")
        subject = await self._resolve(app.name, cmd.target)
        for name in cmd.bind:  # a grant whose carrier must bring back a value the subject lacks is unusable
            if getattr(subject, name) is None:
                raise NotFound("subject", name)
        if reseller is not None and not actors.within(subject.reseller, reseller):
            raise NotFound("subject")
        if principal.domain is not None and not _same_domain(subject.domain, principal.domain):
            raise Forbidden("scope")
        return principal, subject

    async def _resolve(self, app: str, ref: SubjectRef) -> Subject:
        """The active subject ``ref`` names; NotFound or Invalid (ambiguous, mismatched, missing) otherwise."""
        directory = self.directory
        if ref.id is not None:
            found = await directory.subject(app, ref.id)
            if found is None or not found.active:
                raise NotFound("subject", "id")
            return found
        if ref.identity is not None:
            user, name, upn_domain = identity_candidates(ref.identity)
            matches = [s for s in await directory.subjects_by(app, ("id", user), ("email", user))
                       if s.active and s.answers_to(user, ref.domain)]  # fmt: skip
            if not matches and name and upn_domain:  # a UPN that is nobody's: the user of that domain
                matches = [s for s in await directory.subjects_by(app, ("id", name)) if s.active
                           and s.id.casefold() == name and same_domain(s.domain, upn_domain)
                           and (not ref.domain or same_domain(s.domain, ref.domain))]  # fmt: skip
            if not matches:
                raise NotFound("subject", "identity")
            if len(matches) > 1:
                raise Invalid("identity", "ambiguous")
            return matches[0]
        by_token = None
        if ref.token is not None:
            by_token = _one(await directory.subjects_by(app, ("token", credential_hash(ref.token))))
            if by_token is None:
                raise NotFound("subject", "token")
        if ref.identifier is not None:
            by_identifier = _one(await directory.subjects_by(app, ("identifier", ref.identifier)))
            if by_identifier is None:
                raise NotFound("subject", "identifier")
            if by_token is not None and by_token.id != by_identifier.id:
                raise Invalid("identifier", "mismatch")
            return by_identifier
        if by_token is not None:
            return by_token
        raise Invalid("subject", "missing")

    # -- failed-credential limits -------------------------------------------------------------------
    def _failure_keys(self, cmd: ImpersonationCommand) -> list[tuple[str, str]]:
        keys = [("client", cmd.client)]
        if cmd.credential:
            keys.append(("credential", fingerprint(cmd.credential)))
        return keys

    def _check_blocked(self, keys: Sequence[tuple[str, str]]) -> None:
        now = time.monotonic()
        for kind, value in keys:
            until = self._blocked.get(f"{kind}:{value}")
            if until is not None:
                if until > now:
                    raise RateLimited(max(1, int(until - now + 0.999)))
                del self._blocked[f"{kind}:{value}"]

    async def _record_failure(self, keys: Sequence[tuple[str, str]], client: str, app: str, request_id: str) -> None:
        """Count a failed credential in Redis (shared by every process); over the limit, block locally.

        Only failures cost a round trip: the counters are shared, so each process learns of a block at
        the next failure it sees, and a good credential never waits on Redis for this.
        """
        limits = self.config.rate_limit
        counts = await self.store.record_failure(keys, limits.window_seconds)
        for (kind, value), count in zip(keys, counts, strict=True):
            if count >= limits.failures:
                self._blocked[f"{kind}:{value}"] = time.monotonic() + limits.window_seconds
                log.warning("credential_rate_limited", audit=True, kind=kind, client=client, app=app,
                            **_request(request_id))  # fmt: skip

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
        keys = [("redeem", client)]
        self._check_blocked(keys)
        try:
            return await self._redeem(offers, client, request_id)
        except GrantRefused:
            with contextlib.suppress(StoreUnavailable):  # the refusal stands; its count is best effort
                await self._record_failure(keys, client, offers[0].app, request_id)
            raise

    async def _redeem(self, offers: Sequence[Offer], client: str, request_id: str) -> Redemption | None:
        tokens = list(dict.fromkeys(o.token for o in offers))
        consumed = await asyncio.gather(*(self.store.consume(grant_id(t)) for t in tokens))
        first = self.config.app(offers[0].app)
        grants: list[tuple[str, Grant]] = []
        for token, found in zip(tokens, consumed, strict=True):
            if found.grant is None:
                if not all(o.passive for o in offers if o.token == token):
                    self._refuse(first, "unknown", client, request_id=request_id)
                continue
            grant = Grant.from_json(grant_id(token), found.grant)
            if found.state == "revoked":
                self._refuse(first, "revoked", client, grant, request_id)
            if found.state == "reused":
                self.metrics.reused.labels(grant.app).inc()
                log.warning("grant_reused", audit=True, grant_id=grant.id, app=grant.app, actor=grant.actor,
                            subject=grant.subject, dialect=grant.dialect, client=client,
                            **_request(request_id))  # fmt: skip
                self._refuse(first, "reused", client, grant, request_id)
            grants.append((token, grant))
        if not grants:
            return None
        if len(grants) > 1:
            for _, grant in grants[1:]:
                log_event("grant_refused", {"audit": True, "app": grant.app, "dialect": grant.dialect,
                                            "reason": "several", "client": client, "grant_id": grant.id,
                                            "actor": grant.actor, "subject": grant.subject,
                                            **_request(request_id)})  # fmt: skip
            self._refuse(first, "several", client, grants[0][1], request_id)
        token, grant = grants[0]
        offer = next((o for o in offers if o.token == token and o.app == grant.app), None)
        app = self.config.app(grant.app) if offer is not None else first
        if offer is None or app.dialect != grant.dialect:
            self._refuse(app, "wrong_app", client, grant, request_id)
        if dict(offer.bound) != grant.bound_values():
            self._refuse(app, "mismatch", client, grant, request_id)
        now = int(time.time())
        if grant.expires_at < now:
            self._refuse(app, "expired", client, grant, request_id)
        principal = self.directory.actors(app.name).principal_by_id(grant.actor)
        if (
            principal is None
            or principal.credential_sha256[:16] != grant.actor_key
            or principal.role not in app.roles_allowed_to_mint
        ):
            self._refuse(app, "revoked", client, grant, request_id)
        if app.supersede:  # the subject, and whether a newer grant of the same actor and subject came since
            pair = self.store.pair_key(app.name, grant.actor, grant.subject)
            subject, newest = await asyncio.gather(self.directory.subject(app.name, grant.subject),
                                                   self.store.newest(pair))  # fmt: skip
            if newest is not None and newest != (grant.family or grant.id):
                self._refuse(app, "superseded", client, grant, request_id)
        else:
            subject = await self.directory.subject(app.name, grant.subject)
        if subject is None or not subject.active:  # removed, or deactivated, since the grant was minted
            self._refuse(app, "revoked", client, grant, request_id)
        if subject.incarnation != grant.inc:  # re-created or reactivated since: another life of the subject
            self._refuse(app, "subject_changed", client, grant, request_id)
        claims: dict[str, Any] = {
            "aud": app.name,
            "sub": grant.subject,
            "act": {"sub": grant.actor, "role": grant.role},
            "jti": grant.id,
            "dialect": grant.dialect,
        }
        optional = (("email", grant.email), ("custom_data", grant.custom_data), ("scope", grant.scope),
                    ("reason", grant.reason))  # fmt: skip
        for key, value in optional:
            if value is not None:
                claims[key] = value
        assertion = self.signer.sign(claims, now)
        event = {"grant_id": grant.id, "app": app.name, "dialect": app.dialect,
                 "actor": grant.actor, "subject": grant.subject, "client": client}  # fmt: skip
        if grant.reason is not None:
            event["reason"] = grant.reason
        await self.store.append_audit({"event": "grant_redeemed", **event})  # fails closed: no audit, no hand-off
        self.metrics.redeemed.labels(app.name, app.dialect).inc()
        log_event("grant_redeemed", {"audit": True, **event, **_request(request_id)})
        return Redemption(app=app.name, grant=grant, token=token, assertion=assertion)

    # -- revocation ---------------------------------------------------------------------------------
    async def revoke_grant(self, grant_id: str, by: str) -> Grant | None:
        """Revoke the live grant ``grant_id`` (its redemption gets the ordinary refusal); None when no live grant
        has that id. ``by`` names who revoked it, for the audit."""
        data = await self.store.revoke(grant_id) if GRANT_ID_SHAPE.fullmatch(grant_id) else None
        if data is None:
            return None
        grant = Grant.from_json(grant_id, data)
        await self.store.unindex(grant.app, [grant.id])
        await self._audit_revoked([grant], by)
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
            await self._audit_revoked(gone, by)
            revoked += len(gone)
        log_event("grants_revoked", {"audit": True, "app": app, "actor": actor, "subject": subject,
                                     "revoked": revoked, "by": by})  # fmt: skip
        return revoked

    async def _audit_revoked(self, grants: Sequence[Grant], by: str) -> None:
        events = [{"grant_id": g.id, "app": g.app, "dialect": g.dialect, "actor": g.actor, "subject": g.subject,
                   "by": by} for g in grants]  # fmt: skip
        await self.store.append_audits({"event": "grant_revoked", **e} for e in events)
        for event, grant in zip(events, grants, strict=True):
            self.metrics.revoked.labels(grant.app).inc()
            log_event("grant_revoked", {"audit": True, **event})

    async def live(self, tokens: Iterable[str]) -> set[str]:
        """The tokens among ``tokens`` that hold a live grant, without consuming any (one round trip)."""
        tokens = list(dict.fromkeys(tokens))
        found = await self.store.live([grant_id(t) for t in tokens])
        return {t for t, is_live in zip(tokens, found, strict=True) if is_live}

    def refuse(self, app_name: str, reason: str, client: str, request_id: str = "") -> NoReturn:
        """Refuse a redemption without consuming anything (a link presented with a method that may not use it)."""
        self._refuse(self.config.app(app_name), reason, client, request_id=request_id)

    def _refuse(
        self, app: AppConfig, reason: str, client: str, grant: Grant | None = None, request_id: str = ""
    ) -> NoReturn:
        self.metrics.refused.labels(app.name, app.dialect, reason).inc()
        details = {} if grant is None else {"grant_id": grant.id, "actor": grant.actor, "subject": grant.subject}
        log_event("grant_refused", {"audit": True, "app": app.name, "dialect": app.dialect, "reason": reason,
                                    "client": client, **details, **_request(request_id)})  # fmt: skip
        raise GrantRefused(reason)


def _request(request_id: str) -> dict[str, str]:
    return {"request_id": request_id} if request_id else {}


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "what", ""))


def _same_domain(held: str | None, domain: str) -> bool:
    return held is not None and held.casefold() == domain.casefold()


def _one(subjects: list[Subject]) -> Subject | None:
    """The one active subject a unique look-up (identifier, token) found; None for none, or for several (bad
    data: nobody is guessed at)."""
    active = [s for s in subjects if s.active]
    return active[0] if len(active) == 1 else None
