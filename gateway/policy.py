"""Who may act as whom: the one place the gateway decides it (DESIGN §5, §11, §12).

A mint asks :meth:`Policy.authorise`: the actor's credential names a principal of the app, whose role may mint,
with a reason when the app requires one, a mode (:func:`grant_mode`) and a lifetime within the app's, acting
within its reseller subtree and its domain, for an active subject the command names (:meth:`Policy.resolve`). A
redemption asks :meth:`Policy.still_allowed`: the grant's principal is still there with the same credential and a
role that may mint, the subject is still there, active, and in the same incarnation (and, when the app supersedes,
no newer grant of the same actor and subject was minted). Both read the rules below, so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .config import AppConfig
from .directory import Principal, Subject, credential_hash, identity_candidates, same_domain
from .directory_reader import DirectoryReader
from .errors import Forbidden, Invalid, NotFound, Refusal, Unauthenticated
from .limits import FailureLimits, credential_keys
from .session_rules import MODES
from .store import Store

if TYPE_CHECKING:
    from .core import Grant, ImpersonationCommand, SubjectRef


def actor_key(principal: Principal) -> str:
    """What a grant keeps of its principal's credential (a prefix of its hash): a grant whose principal's credential
    was rotated since, or whose principal was removed, is no longer honoured."""
    return principal.credential_sha256[:16]


def may_mint(app: AppConfig, principal: Principal) -> bool:
    """Whether ``principal``'s role may mint grants in ``app``."""
    return principal.role in app.roles_allowed_to_mint


def grant_mode(app: AppConfig, asked: str | None) -> str:
    """The mode of a grant of ``app`` asked for ``asked`` (one of :data:`~gateway.session_rules.MODES`; None: the
    app's default). The app's ``session.mode`` is the default and the most a grant may get; an app without
    ``session`` gives "full" only (nothing would hold a read_only impersonation to it). Forbidden("mode") above that;
    Invalid("mode", "value") for no mode at all.
    """
    if asked is not None and asked not in MODES:
        raise Invalid("mode", "value")
    if app.session is None:
        allowed: tuple[str, ...] = ("full",)
    else:  # MODES runs from the most a session may do to the least: the app's mode and those below it
        allowed = MODES[MODES.index(app.session.mode) :]
    mode = allowed[0] if asked is None else asked
    if mode not in allowed:
        raise Forbidden("mode")
    return mode


def in_domain(principal: Principal, subject: Subject) -> bool:
    """Whether ``subject`` is within ``principal``'s domain: any subject for a principal without one, else one of
    that very domain (named in full: a first label would reach every domain that begins with it)."""
    return principal.domain is None or same_domain(subject.domain, principal.domain, by_first_label=False)


class Policy:
    """Authorises mints and re-checks grants at redemption, against the directory as this process reads it."""

    def __init__(self, directory: DirectoryReader, store: Store, limits: FailureLimits) -> None:
        self.directory = directory
        self.store = store
        self.limits = limits

    async def authorise(
        self, app: AppConfig, cmd: ImpersonationCommand, request_id: str = ""
    ) -> tuple[Principal, Subject]:
        """The principal whose credential ``cmd`` carries, and the subject it may act as.

        Raises Unauthenticated (no credential, or an unknown one: counted against the failure limits), RateLimited
        (the client or credential is blocked), Forbidden (``role``, ``scope``; ``mode``: above the app's), Invalid
        (reason missing, ttl out of bounds, mode not a mode, or see :meth:`resolve`), NotFound (the reseller, or the
        subject: missing, outside the reseller's subtree, or lacking a value its carrier must bring back) or
        StoreUnavailable.
        """
        if cmd.credential is None:
            raise Unauthenticated("missing", cmd.credential_name)
        keys = credential_keys(cmd.client, cmd.credential)
        self.limits.check(keys)
        actors = self.directory.actors(app.name)
        principal = actors.principal(credential_hash(cmd.credential))
        if principal is None:
            await self.limits.record(keys, cmd.client, cmd.app, request_id)
            raise Unauthenticated("unknown", cmd.credential_name)
        if not may_mint(app, principal):
            raise Forbidden("role")
        if app.require_reason and cmd.reason is None:
            raise Invalid("reason", "missing")
        if cmd.ttl_seconds is not None and not 0 < cmd.ttl_seconds <= app.grant_ttl_seconds:
            raise Invalid("ttl_seconds", "value")
        grant_mode(app, cmd.mode)
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
        subject = await self.resolve(app.name, cmd.target)
        for name in cmd.bind:  # a grant whose carrier must bring back a value the subject lacks is unusable
            if getattr(subject, name) is None:
                raise NotFound("subject", name)
        if reseller is not None and not actors.within(subject.reseller, reseller):
            raise NotFound("subject")
        if not in_domain(principal, subject):
            raise Forbidden("scope")
        return principal, subject

    async def resolve(self, app: str, ref: SubjectRef) -> Subject:
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

    async def still_allowed(self, app: AppConfig, grant: Grant) -> Refusal | None:
        """Whether ``grant`` (of ``app``) may still be redeemed: None when it may, else why not —
        ``revoked`` (its principal is gone, has another credential or a role that may not mint; its subject is gone
        or inactive), ``superseded`` (``app.supersede``: a newer grant of the same actor and subject) or
        ``subject_changed`` (the subject was re-created or reactivated since the mint). One round trip; raises
        StoreUnavailable."""
        principal = self.directory.actors(app.name).principal_by_id(grant.actor)
        if principal is None or actor_key(principal) != grant.actor_key or not may_mint(app, principal):
            return Refusal.REVOKED
        if app.supersede:  # the subject, and whether a newer grant of the same actor and subject came since
            pair = self.store.pair_key(app.name, grant.actor, grant.subject)
            subject, newest = await asyncio.gather(self.directory.subject(app.name, grant.subject),
                                                   self.store.newest(pair))  # fmt: skip
            if newest is not None and newest != (grant.family or grant.id):
                return Refusal.SUPERSEDED
        else:
            subject = await self.directory.subject(app.name, grant.subject)
        if subject is None or not subject.active:  # removed, or deactivated, since the grant was minted
            return Refusal.REVOKED
        if subject.incarnation != grant.inc:  # re-created or reactivated since: another life of the subject
            return Refusal.SUBJECT_CHANGED
        return None


def _one(subjects: list[Subject]) -> Subject | None:
    """The one active subject a unique look-up (identifier, token) found; None for none, or for several (bad
    data: nobody is guessed at)."""
    active = [s for s in subjects if s.active]
    return active[0] if len(active) == 1 else None
