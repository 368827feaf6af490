"""Impersonation sessions held by the gateway (DESIGN §13): the values and flows, without aiohttp.

A redemption on an app with ``session`` starts one: a random cookie value (192 bits) goes to the browser, the
store keeps only what its id is derived from it by (:func:`session_id`: the first 96 bits of its SHA-256, as a
grant's id is derived from its token), and every later request carrying the cookie is resumed with one script
(:meth:`Sessions.resume`). The app's HttpOnly cookies are kept in the session (:meth:`Sessions.keep`) and sent back
to the app (:meth:`Sessions.cookie_header`); the others pass to the browser and are remembered, to be expired when
the session ends. Sessions end by the browser (``/_impersonation/end``), by an admin, by a new redemption in the
same browser, at their cap or idle limit, or when their subject or actor is no longer allowed (:meth:`sweep`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import html
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from yarl import URL

from .assertion import Signer
from .audit import Audit
from .config import AppConfig, Config
from .errors import StoreUnavailable
from .policy import actor_key, may_mint
from .store import Store
from .store.sessions import IDLE_GRACE_MS

if TYPE_CHECKING:
    from .core import Grant
    from .directory_reader import DirectoryReader

log = structlog.get_logger("gateway")

COOKIE = "impersonation_session"
END_PATH = "/_impersonation/end"
INFO_PATH = "/_impersonation/session"
COOKIE_BYTES = 24
COOKIE_SHAPE = re.compile(r"[A-Za-z0-9_-]{32}")
SESSION_ID_SHAPE = re.compile(r"[A-Za-z0-9_-]{16}")
KEPT = "k:"  # a kept cookie's field in the session's hash
PASSED = "b:"  # a cookie that passed to the browser


def cookie_name(public_url: str) -> str:
    """The session cookie's name for an app at ``public_url``: ``__Host-`` prefixed when it is https."""
    return f"__Host-{COOKIE}" if URL(public_url).scheme == "https" else COOKIE


def set_cookie(name: str, value: str, *, secure: bool, clear: bool = False) -> str:
    """The ``Set-Cookie`` value that gives the browser the session cookie (or, with ``clear``, takes it away)."""
    attributes = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
    return f"{name}={'' if clear else value}{attributes}" + ("; Max-Age=0" if clear else "")


def expire_cookie(name: str, path: str, domain: str) -> str:
    """The ``Set-Cookie`` value that expires a cookie of the app that passed to the browser during a session."""
    return (
        f"{name}=; Path={path or '/'}"
        + (f"; Domain={domain}" if domain else "")
        + ("; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0")
    )


def session_id(cookie: str) -> str:
    """A session's id: the first 96 bits of its cookie's SHA-256, base64url; the cookie cannot be found from it."""
    return base64.urlsafe_b64encode(hashlib.sha256(cookie.encode()).digest()[:12]).decode()


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_BANNER_STYLE = (
    "position:fixed;left:0;right:0;bottom:0;z-index:2147483647;display:flex;flex-wrap:wrap;gap:12px;"
    "align-items:center;justify-content:center;margin:0;padding:8px 12px;background:#8a1c1c;color:#fff;"
    "font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;box-shadow:0 -2px 6px rgba(0,0,0,.25)"
)
_BUTTON_STYLE = (
    "margin:0;padding:4px 12px;border:1px solid #fff;border-radius:4px;background:#fff;color:#8a1c1c;"
    "font:inherit;font-weight:600;cursor:pointer"
)


@functools.lru_cache(maxsize=256)  # a session's pages all carry the same one (the busiest sessions' banners)
def banner(actor: str, subject: str, until_ms: int, mount: str = "") -> str:
    """The notice put into a session's HTML pages (DESIGN §13): who acts as whom, until when (the cap, ``HH:MM
    UTC``), and an End button, a form posting to ``/_impersonation/end`` below the app's ``mount`` (no script
    needed). Every value is HTML-escaped."""

    def e(value: str) -> str:
        return html.escape(value, quote=True)

    until = datetime.fromtimestamp(until_ms / 1000, UTC).strftime("%H:%M UTC")
    return (
        f'<div id="impersonation-banner" role="status" style="{_BANNER_STYLE}">'
        f"<span>Impersonation: <strong>{e(actor)}</strong> is acting as <strong>{e(subject)}</strong> until "
        f"{e(until)}</span>"
        f'<form method="post" action="{e(mount + END_PATH)}" style="margin:0">'
        f'<button type="submit" style="{_BUTTON_STYLE}">End impersonation</button></form></div>'
    )


@dataclass(frozen=True)
class KeptCookie:
    value: str
    expires: float | None = None  # seconds since the epoch; None: until the session ends


@dataclass(frozen=True)
class SetCookie:
    """What the gateway reads of a ``Set-Cookie`` header."""

    name: str
    value: str
    http_only: bool
    path: str
    domain: str
    expires: float | None  # from Max-Age (first) or Expires

    def deleted(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now


def parse_set_cookie(header: str, now: float) -> SetCookie | None:
    """A ``Set-Cookie`` header's parts (RFC 6265 §5.2, leniently); None when it names no cookie."""
    first, *attributes = header.split(";")
    name, eq, value = first.partition("=")
    name, value = name.strip(), value.strip()
    if not eq or not name:
        return None
    http_only, path, domain = False, "", ""
    max_age: float | None = None
    expires: float | None = None
    for attribute in attributes:
        key, _, val = attribute.partition("=")
        key, val = key.strip().lower(), val.strip()
        if key == "httponly":
            http_only = True
        elif key == "path":
            path = val
        elif key == "domain":
            domain = val
        elif key == "max-age":
            with contextlib.suppress(ValueError):
                max_age = now + int(val) if int(val) > 0 else 0.0
        elif key == "expires":
            with contextlib.suppress(TypeError, ValueError, IndexError):
                expires = parsedate_to_datetime(val).timestamp()
    return SetCookie(name, value, http_only, path, domain, max_age if max_age is not None else expires)


@functools.lru_cache(maxsize=256)  # a session's every request reads the same grant (an entry weighs ~5 KB)
def _grant(grant_id: str, data: bytes) -> Grant:
    from .core import Grant

    return Grant.from_json(grant_id, data)


@dataclass(frozen=True)
class Session:
    """A live session: who acts as whom (``grant``), in which ``mode``, since and until when (ms)."""

    id: str
    app: str
    grant: Grant
    mode: str
    started_ms: int
    cap_ms: int
    last_ms: int
    kept: Mapping[str, KeptCookie] = field(default_factory=dict)
    passed: tuple[tuple[str, str, str], ...] = ()  # name, path, domain

    @classmethod
    def from_fields(cls, sid: str, fields: Mapping[str, bytes]) -> Session:
        kept = {}
        passed = []
        for name, value in fields.items():
            if name.startswith(KEPT):
                data = orjson.loads(value)
                kept[name[len(KEPT) :]] = KeptCookie(data["v"], data.get("e"))
            elif name.startswith(PASSED):
                n, p, d = orjson.loads(name[len(PASSED) :])
                passed.append((str(n), str(p), str(d)))
        return cls(
            id=sid, app=fields["app"].decode(), grant=_grant(fields["gid"].decode(), fields["grant"]),
            mode=fields["mode"].decode(), started_ms=int(fields["started"]), cap_ms=int(fields["cap"]),
            last_ms=int(fields["last"]), kept=kept, passed=tuple(sorted(passed)),
        )  # fmt: skip

    @property
    def who(self) -> dict[str, str]:
        """What the audit records of the session."""
        return {"session_id": self.id, "app": self.app, "actor": self.grant.actor, "subject": self.grant.subject}

    def banner(self, mount: str = "") -> str:
        """The notice for this session's HTML pages (see :func:`banner`)."""
        return banner(self.grant.actor, self.grant.subject, self.cap_ms, mount)

    def describe(self) -> dict[str, Any]:
        """The session as ``GET /_impersonation/session`` and the admin list show it."""
        return {
            "session_id": self.id,
            "app": self.app,
            "subject": self.grant.subject,
            "actor": self.grant.actor,
            "mode": self.mode,
            "started_at": rfc3339(self.started_ms),
            "expires_at": rfc3339(self.cap_ms),
        }


@dataclass(frozen=True)
class Resumption:
    """What a request's session cookie came to: ``session`` when live (``state`` ``"live"``); else ``state`` is
    ``"ended"`` (it was, just now: ``why``), ``"unknown"`` (ended before, forged, purged) or ``"other_app"``."""

    state: str
    session: Session | None = None
    why: str | None = None


class Sessions:
    """Starts, resumes and ends sessions; one per :class:`~gateway.core.Gateway`. ``clock`` (seconds) times their
    caps and idle limits (tests move it)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        signer: Signer,
        audit: Audit,
        directory: DirectoryReader,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.signer = signer
        self.audit = audit
        self.directory = directory
        self.clock = clock
        self._missing: set[tuple[str, str]] = set()  # (app, session id) the last sweep found indexed but gone

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- start ----------------------------------------------------------------------------------------
    async def start(
        self, app: AppConfig, grant: Grant, mode: str, client: str, request_id: str = ""
    ) -> tuple[str, Session]:
        """A new session of ``grant`` in ``app``: its cookie value and the session. Stores it, names it in the app's
        index and appends its audit entry, in one round trip; raises StoreUnavailable."""
        assert app.session is not None
        cookie = base64.urlsafe_b64encode(secrets.token_bytes(COOKIE_BYTES)).decode()
        sid = session_id(cookie)
        now = self._now_ms()
        cap = now + app.session.max_seconds * 1000
        idle = app.session.idle_seconds * 1000
        session = Session(sid, app.name, grant, mode, now, cap, now)
        fields: dict[str, str | bytes] = {
            "app": app.name,
            "grant": grant.to_json(),
            "gid": grant.id,
            "mode": mode,
            "started": str(now),
            "cap": str(cap),
            "idle": str(idle),
            "last": str(now),
        }
        summary = {"subject": grant.subject, "actor": grant.actor, "mode": mode, "started": now, "cap": cap}
        expire_at = min(cap, now + idle + IDLE_GRACE_MS)
        entry = self.audit.session_started_entry(session.who, mode, client)
        await self.store.session_store.start(sid, app.name, fields, expire_at, orjson.dumps(summary), entry)
        self.audit.session_started(session.who, mode, client, request_id)
        return cookie, session

    def assertion(self, session: Session, jti: str | None = None) -> str:
        """A fresh assertion for a request of ``session``: the claims of DESIGN §7 plus ``sid`` and ``mode``, and a
        ``jti`` unique to the request (``jti``: the redeeming request's, the grant's id)."""
        from .core import session_claims

        jti = jti or base64.urlsafe_b64encode(secrets.token_bytes(12)).decode()
        return self.signer.sign(session_claims(session.grant, session.id, session.mode, jti), int(time.time()))

    # -- every request --------------------------------------------------------------------------------
    async def resume(self, cookie: str, apps: Sequence[str]) -> Resumption:
        """The session ``cookie`` names, touched, when it is live and of one of ``apps``; one round trip. A session
        found past its cap or idle limit is ended here (and audited). Raises StoreUnavailable."""
        if not COOKIE_SHAPE.fullmatch(cookie):
            return Resumption("unknown")
        sid = session_id(cookie)
        found = await self.store.session_store.resume(sid, apps, self._now_ms())
        if found.state in ("unknown", "other_app"):
            return Resumption(found.state)
        session = Session.from_fields(sid, found.fields)
        if found.state != "live":
            await self._ended(session, found.state)
            return Resumption("ended", session, found.state)
        why = self._no_longer_allowed(session)
        if why is not None:  # the actor's removal, seen before the sweep ended the session
            await self.end(sid, why)
            return Resumption("ended", session, why)
        return Resumption("live", session)

    async def alive(self, session: Session, active: bool) -> bool:
        """Whether ``session`` is still live (a WebSocket of it asks every few seconds); one found past its cap or
        idle limit is ended. ``active`` (the client sent messages since it last asked) counts as activity for its
        idle limit, as a request does."""
        found = await self.store.session_store.resume(session.id, [session.app], self._now_ms(), touch=active)
        if found.state in ("max_age", "idle"):
            await self._ended(Session.from_fields(session.id, found.fields), found.state)
        return found.state == "live"

    def _no_longer_allowed(self, session: Session) -> str | None:
        """``actor_removed`` when the session's actor is no longer one of its app's principals with the same
        credential and a role that may mint (read from memory: no round trip); else None."""
        app = self.config.app(session.app)
        principal = self.directory.actors(app.name).principal_by_id(session.grant.actor)
        if principal is None or actor_key(principal) != session.grant.actor_key or not may_mint(app, principal):
            return "actor_removed"
        return None

    def cookie_header(self, session: Session | None, values: Iterable[str], drop: Iterable[str]) -> str | None:
        """The ``Cookie`` header for the app: the browser's cookies without those named ``drop`` (the session
        cookie) and, with ``session``, with its kept cookies in place of the browser's of the same names. None
        when no cookie is left."""
        now = self.clock()
        kept = {n: c for n, c in (session.kept if session else {}).items() if c.expires is None or c.expires > now}
        dropped = {*drop, *kept}
        pairs = [p.strip() for v in values for p in v.split(";") if p.strip()]
        pairs = [p for p in pairs if p.partition("=")[0].strip() not in dropped]
        pairs += [f"{n}={c.value}" for n, c in kept.items()]
        return "; ".join(pairs) or None

    async def keep(self, session: Session, set_cookies: Sequence[str]) -> list[str]:
        """Keep the HttpOnly cookies among an answer's ``set_cookies`` in ``session`` (one write, before the answer
        is relayed) and return the others, which pass to the browser (and are remembered, to be expired at the
        end). A name set without HttpOnly leaves the kept ones."""
        now = self.clock()
        set_fields: dict[str, str] = {}
        delete: list[str] = []
        passing = []
        for header in set_cookies:
            cookie = parse_set_cookie(header, now)
            if cookie is None:
                passing.append(header)
                continue
            if cookie.http_only:
                if cookie.deleted(now):
                    set_fields.pop(KEPT + cookie.name, None)
                    delete.append(KEPT + cookie.name)
                else:
                    set_fields[KEPT + cookie.name] = orjson.dumps({"v": cookie.value, "e": cookie.expires}).decode()
                continue
            passing.append(header)
            if cookie.name in session.kept or KEPT + cookie.name in set_fields:
                set_fields.pop(KEPT + cookie.name, None)
                delete.append(KEPT + cookie.name)
            set_fields[PASSED + orjson.dumps([cookie.name, cookie.path, cookie.domain]).decode()] = "1"
        if set_fields or delete:
            try:
                await self.store.session_store.keep(session.id, set_fields, delete)
            except StoreUnavailable:  # the app's cookies are not kept; they never go to the browser either
                log.warning("session_cookies_not_kept", session_id=session.id)
        return passing

    # -- ending ---------------------------------------------------------------------------------------
    async def end(self, sid: str, why: str, by: str | None = None) -> Session | None:
        """End the session ``sid`` (every process sees it at its next request); the session, or None when none was
        live. Audited with ``why``."""
        fields = await self.store.session_store.end(sid)
        if fields is None:
            return None
        session = Session.from_fields(sid, fields)
        await self._ended(session, why, by)
        return session

    async def end_cookie(self, cookie: str, why: str) -> Session | None:
        """End the session a request's ``cookie`` names (a new redemption replaces it, the browser ends it)."""
        return await self.end(session_id(cookie), why) if COOKIE_SHAPE.fullmatch(cookie) else None

    async def _ended(self, session: Session, why: str, by: str | None = None) -> None:
        """Audit an end unless another process did (the index entry is dropped by one process only)."""
        with_entry = await self.store.session_store.unindex(session.app, [session.id])
        if with_entry and with_entry[0]:
            await self.audit.session_ended(session.who, why, by)

    # -- the admin's view -----------------------------------------------------------------------------
    async def listed(
        self, app: str | None = None, actor: str | None = None, subject: str | None = None
    ) -> list[dict[str, Any]]:
        """The live sessions (of one app, actor, subject), as the admin endpoint lists them."""
        found = []
        for name in [app] if app is not None else [a.name for a in self.config.apps if a.session is not None]:
            entries = [(s, orjson.loads(v)) for s, v in await self.store.session_store.indexed(name)]
            entries = [(s, e) for s, e in entries if (actor is None or e["actor"] == actor)
                       and (subject is None or e["subject"] == subject)]  # fmt: skip
            lasts = await self.store.session_store.last_requests([s for s, _ in entries])
            for (sid, entry), last in zip(entries, lasts, strict=True):
                if last is None:
                    continue
                found.append({"session_id": sid, "app": name, "subject": entry["subject"], "actor": entry["actor"],
                              "mode": entry["mode"], "started_at": rfc3339(entry["started"]),
                              "expires_at": rfc3339(entry["cap"]), "last_request_at": rfc3339(int(last))})  # fmt: skip
        return sorted(found, key=lambda s: (s["started_at"], s["session_id"]))

    async def end_matching(
        self, app: str, why: str, by: str | None = None, actor: str | None = None, subject: str | None = None
    ) -> int:
        """End every live session of ``app`` (of one actor, one subject, or both); how many there were."""
        ended = 0
        for sid, entry in await self.store.session_store.indexed(app):
            summary = orjson.loads(entry)
            if (actor is None or summary["actor"] == actor) and (subject is None or summary["subject"] == subject):
                ended += await self.end(sid, why, by) is not None
        return ended

    async def sweep(self) -> None:
        """Audit the sessions Redis expired (``max_age`` or ``idle``), and end those whose subject is no longer
        active in the same incarnation (``subject_inactive``) or whose actor is gone (``actor_removed``): every
        process runs it once a directory refresh, so such an end is seen within ``directory.refresh_seconds``.

        A session is taken for expired only when two sweeps in a row find it gone from Redis and still indexed: an
        end in progress (its key deleted, its index entry not yet) is audited by whoever ended it."""
        now = self._now_ms()
        missing: set[tuple[str, str]] = set()
        for app in (a for a in self.config.apps if a.session is not None):
            entries = await self.store.session_store.indexed(app.name)
            if not entries:
                continue
            live = await self.store.session_store.exist([s for s, _ in entries])
            missing |= {(app.name, s) for (s, _), here in zip(entries, live, strict=True) if not here}
            gone = [(s, orjson.loads(e)) for (s, e), here in zip(entries, live, strict=True)
                    if not here and (app.name, s) in self._missing]  # fmt: skip
            dropped = await self.store.session_store.unindex(app.name, [s for s, _ in gone])
            for (sid, summary), mine in zip(gone, dropped, strict=True):
                if mine:
                    who = {"session_id": sid, "app": app.name, "actor": summary["actor"], "subject": summary["subject"]}
                    await self.audit.session_ended(who, "max_age" if now >= summary["cap"] else "idle")
            await asyncio.gather(*(self._check(s, app) for (s, _), here in zip(entries, live, strict=True) if here))
        self._missing = missing

    async def _check(self, sid: str, app: AppConfig) -> None:
        fields = await self.store.session_store.peek(sid)
        if fields is None:
            return
        session = Session.from_fields(sid, fields)
        why = self._no_longer_allowed(session)
        if why is None:
            subject = await self.directory.subject(app.name, session.grant.subject)
            if subject is None or not subject.active or subject.incarnation != session.grant.inc:
                why = "subject_inactive"
        if why is not None:
            await self.end(sid, why)
