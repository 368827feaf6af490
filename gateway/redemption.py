"""Requests to an app's paths: redeemed, refused, confirmed first, or passed to the app as they came.

A request holding grant-shaped values in its route's carriers (:mod:`gateway.carriers`) offers them for
redemption; any other request is the app's business and goes to the first app of its route untouched.

Which methods may use which carrier:

- a link (query carrier) is redeemed by a GET when the app has ``redeem_on_get``, else by the POST of the
  confirmation page a GET answers (link scanners only GET); HEAD gets that page too; any other method with a
  link is refused without consuming it;
- a cookie or header carrier is redeemed by any method but HEAD and OPTIONS, which consume nothing and reach
  the app without any live grant they carry;
- a body carrier's endpoint redeems whatever its body holds;
- a WebSocket handshake redeems directly (no confirmation page).

A redeemed request reaches the app with its carriers removed and the signed assertion added. No grant ever
reaches an app: a live one is removed wherever it sits, a spent or unknown one is refused.

On a route with an app that holds sessions (DESIGN §13, :mod:`gateway.sessions`), a redemption of that app
starts one, and a request carrying the session cookie (and no grant) is a request of the session: checked
against its mode, and forwarded with a fresh assertion and the app's kept cookies. The session cookie never
reaches an app. ``/_impersonation/end`` and ``/_impersonation/session`` are the gateway's on such routes.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

import structlog
from aiohttp import StreamReader, web
from multidict import CIMultiDict
from yarl import URL

from . import body as bodies
from .carriers import Carriers, Found, query_pairs, strip_body, strip_cookies, strip_headers, strip_query
from .config import AppConfig, Config
from .core import Gateway, Grant
from .dialects import Dialect, Where
from .errors import GatewayError, GrantRefused, RequestTimeout, StoreUnavailable
from .logging import REQUEST_ID, bind_request, unexpected
from .native import problem
from .proxy import ASSERTION_HEADER, CookieFilter, Liveness, Proxy, Slot, Upstream
from .routing import Route, Target
from .session_rules import permitted
from .sessions import END_PATH, INFO_PATH, Session, cookie_name, expire_cookie, set_cookie
from .upstream import Held

log = structlog.get_logger("gateway")

KIND = web.RequestKey("kind", str)  # mint, info, redeem, pass or ops: the latency histogram's label
CONFIRM_FIELD = "impersonation_confirm"
_CONFIRM_SCRIPT = "document.forms[0].submit();"
_CONFIRM_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_CONFIRM_SCRIPT.encode()).digest()).decode()
_CONFIRM_CSP = (
    f"default-src 'none'; form-action 'self'; script-src 'sha256-{_CONFIRM_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'"
)
_STYLE = (
    "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:32em;margin:4em auto;padding:0 1em;color:#222}"
    "h1{font-size:1.4em}button{font:inherit;padding:.4em 1.2em}</style>"
)
# No action: the form posts back to the very URL the browser shows, whatever the request target looked like.
_CONFIRM_PAGE = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
    f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>Continue sign-in</title>{_STYLE}'
    "</head><body><h1>Continue sign-in</h1>"
    f'<form method="post"><input type="hidden" name="{CONFIRM_FIELD}" value="1">'
    '<p>Press continue to sign in.</p><button type="submit">Continue</button></form>'
    f"<script>{_CONFIRM_SCRIPT}</script></body></html>"
)
_SAFE = ("HEAD", "OPTIONS")  # never consume a grant


@dataclass(frozen=True)
class SessionRoute:
    """A request on a route with apps that hold sessions: those apps, the session cookie names they use, and the
    session cookie the request carries (its name and value), if any."""

    apps: tuple[AppConfig, ...]
    names: frozenset[str]
    cookie: tuple[str, str] | None


SESSION_ROUTE = web.RequestKey("session_route", SessionRoute)


class Redeemer:
    """Handles every request to an app path that is not a mint or info endpoint."""

    def __init__(self, config: Config, gateway: Gateway, proxy: Proxy, dialects: dict[str, Dialect]) -> None:
        self.config = config
        self.gateway = gateway
        self.proxy = proxy
        self.dialects = dialects
        self.upstreams = {app.name: Upstream.of(app) for app in config.apps}
        self._carriers: dict[tuple[str, ...], Carriers] = {}
        self.sessions = gateway.sessions
        self._cookie_names = {app.name: cookie_name(config.public_url_of(app)) for app in config.apps}

    def carriers(self, apps: Sequence[AppConfig]) -> Carriers:
        """The carriers a request on a route with ``apps`` is searched for: those apps' own, and every other app's
        query, cookie and header carriers as passive ones (the route's app may use such a name for itself, but a
        live grant there is another app's: refused, and never passed on)."""
        key = tuple(a.name for a in apps)
        found = self._carriers.get(key)
        if found is None:
            own = [(a.name, self.dialects[a.dialect].carriers) for a in apps]
            names = {(c.where, c.name.lower()) for _, carriers in own for c in carriers}
            foreign = {
                (c.where, c.name.lower()): replace(c, passive=True)
                for other in self.config.apps
                if other.name not in key
                for c in self.dialects[other.dialect].carriers
                if c.where is not Where.BODY and (c.where, c.name.lower()) not in names
            }
            found = self._carriers[key] = Carriers([*own, (key[0], tuple(foreign.values()))])
        return found

    async def handle(self, request: web.Request, target: Target, route: Route, client: str) -> web.StreamResponse:
        if _is_websocket(request) and request.body_exists:  # the app would wait for a body no handshake has
            response = web.Response(status=400, text="Bad Request: a WebSocket handshake has no body.\n")
            response.force_close()
            return response
        held_apps = tuple(a for a in route.apps if a.session is not None)
        if held_apps:  # a route with apps that hold sessions: their cookie, and the gateway's own two paths
            names = frozenset(self._cookie_names[a.name] for a in held_apps)
            cookie = next(((n, request.cookies[n]) for n in sorted(names) if n in request.cookies), None)
            request[SESSION_ROUTE] = session_route = SessionRoute(held_apps, names, cookie)
            if route.path(target) in (END_PATH, INFO_PATH):
                request[KIND] = "session"
                return await self._session_endpoint(request, route.path(target), session_route)
        carriers = self.carriers(route.apps)
        method, path = request.method, route.path(target)
        server = self.config.server
        raw_body: bytes | None = None
        decoded: bytes | None = None
        body_app = carriers.body_app(method, path)
        if body_app is not None:  # a carrier's endpoint: its body is read whole, and decoded
            try:
                raw_body, decoded = await bodies.read(request, server.body_limit_bytes, server.body_timeout_seconds)
            except GatewayError as exc:
                return self.dialects[self.config.app(body_app).dialect].error_response(exc)
        found = carriers.find(target.query, request.headers, method, path, decoded)
        if not found:
            request[KIND] = "pass"
            if held_apps and session_route.cookie is not None:
                return await self._in_session(request, target, route, raw_body, session_route)
            return await self._forward(request, target, route, route.apps[0], raw_body, self.proxy.headers(request))
        request[KIND] = "redeem"
        request_id = request[REQUEST_ID]
        first = self.config.app(found[0].offer.app)
        dialect = self.dialects[first.dialect]
        links = [f for f in found if f.carrier.where is Where.QUERY and not f.carrier.passive]
        scanner_safe = any(not self.config.app(f.offer.app).redeem_on_get for f in links)
        if links and method in ("GET", "HEAD") and (method == "HEAD" or scanner_safe) and not _is_websocket(request):
            return confirmation_page()
        cross_site = bool(links) and method == "POST" and self._cross_site(request, first)
        if method in _SAFE or (links and method not in ("GET", "POST")) or cross_site:
            if links:  # a link is for following and confirming (on the gateway's own page), nothing else
                try:
                    self.gateway.refuse(first.name, "cross_site" if cross_site else "method", client, request_id)
                except GatewayError as exc:
                    return _refusal(request, dialect, exc, first)
            try:
                live = await self.gateway.live(f.offer.token for f in found)
            except Exception as exc:
                return _refusal(request, dialect, exc, first)
            headers = self.proxy.headers(request)
            query = _strip(headers, target.query, found, live)
            return await self._forward(request, target, route, route.apps[0], raw_body, headers, query=query)
        confirm = False
        if links and method == "POST" and raw_body is None and request.content_type == _FORM:
            try:  # perhaps the POST of a confirmation page
                raw_body, decoded = await bodies.read(request, server.body_limit_bytes, server.body_timeout_seconds)
            except GatewayError as exc:
                return dialect.error_response(exc)
            confirm = any(name == CONFIRM_FIELD for name, _ in query_pairs(decoded.decode("latin-1")))
        # The grant is spent only once its request can go: the body is in hand (up to the body limit) and a
        # connection to the app is open (DESIGN §7); a slow body or an unreachable app leaves it usable.
        body: bytes | StreamReader | None = raw_body
        prefix = b""
        if body is None and not confirm and request.body_exists:
            read = await self._read_body(request)
            if isinstance(read, web.Response):
                return read
            body, prefix = read
        held: dict[Upstream, Held | Slot] = {}
        try:
            try:
                for upstream in dict.fromkeys(self.upstreams[f.offer.app] for f in found):
                    held[upstream] = await self.proxy.hold(request, upstream, websocket=_is_websocket(request))
            except GatewayError as unreachable:
                # Only a live grant is kept for later: anything else is refused (or passed on) as with the app up.
                try:
                    live = await self.gateway.live(f.offer.token for f in found)
                except Exception as exc:
                    return _refusal(request, dialect, exc, first)
                if live:
                    return dialect.error_response(unreachable)
            return await self._redeem(request, target, route, client, found, (body, prefix, decoded), confirm, held)
        finally:
            _release(held)

    async def _redeem(
        self,
        request: web.Request,
        target: Target,
        route: Route,
        client: str,
        found: Sequence[Found],
        payload: tuple[bytes | StreamReader | None, bytes, bytes | None],
        confirm: bool,
        held: dict[Upstream, Held | Slot],
    ) -> web.StreamResponse:
        """Spend the grant ``found`` offers and forward the request with its assertion, on the connection ``held``
        for its app (taken out of ``held``; the caller releases the others). ``payload`` is the body to forward,
        the part of it already read when it streams, and the body decoded when a carrier was looked for in it."""
        body, prefix, decoded = payload
        request_id = request[REQUEST_ID]
        first = self.config.app(found[0].offer.app)
        try:
            redemption = await self.gateway.redeem([f.offer for f in found], client, request_id)
        except Exception as exc:
            response = _refusal(request, self.dialects[first.dialect], exc, first)
            for name in {f.carrier.name for f in found if f.carrier.where is Where.COOKIE}:
                response.del_cookie(name, path="/")
            return response
        if redemption is None:  # passive carriers holding no grant: the app's own credentials
            request[KIND] = "pass"
            app = route.apps[0]
            return await self._forward(request, target, route, app, body, self.proxy.headers(request), prefix=prefix,
                                       held=held.pop(self.upstreams[app.name], None))  # fmt: skip
        tokens = {redemption.token}
        headers = self.proxy.headers(request)
        query = _strip(headers, target.query, found, tokens)
        headers[ASSERTION_HEADER] = redemption.assertion
        app = self.config.app(redemption.app)
        cookies: CookieFilter | None = None
        banner: str | None = None
        if app.session is not None:  # the redemption starts a session: its first request
            try:
                cookies, banner = await self._start(request, app, redemption.grant, client, headers)
            except StoreUnavailable as exc:
                return self.dialects[app.dialect].error_response(exc)
        connection = held.pop(self.upstreams[app.name], None)
        body_fields = {n for f in found if f.carrier.where is Where.BODY for n in f.carrier.fields}
        if confirm:  # the original GET of the link, not the confirming POST
            for name in ("Content-Type", "Content-Length", "Content-Encoding"):
                headers.popall(name, None)
            return await self._forward(request, target, route, app, None, headers, query=query, method="GET",
                                       held=connection, cookies=cookies, banner=banner)  # fmt: skip
        if body_fields and decoded is not None:  # the body loses its carrier (and is sent decoded)
            body = strip_body(decoded, body_fields)
            for name in ("Content-Length", "Content-Encoding"):
                headers.popall(name, None)
        expire = {f.carrier.name for f in found if f.carrier.where is Where.COOKIE and f.offer.token in tokens}
        return await self._forward(request, target, route, app, body, headers, query=query, expire=expire,
                                   prefix=prefix, held=connection, cookies=cookies, banner=banner)  # fmt: skip

    def _cross_site(self, request: web.Request, app: AppConfig) -> bool:
        """Whether a POST says it comes from another site: a login link posted by someone else's page would log
        the browser in as the link's subject (login CSRF). The confirmation page's own POST is same-origin; its
        no-referrer policy makes browsers send ``Origin: null``, so null is not taken for another site."""
        if request.headers.get("Sec-Fetch-Site", "").strip().lower() in ("cross-site", "same-site"):
            return True
        origins = request.headers.getall("Origin", [])
        if not origins:
            return False
        own = {f"{request.scheme}://{request.host}".lower(), _origin(self.config.public_url_of(app))}
        return any(o.strip().lower() not in own and o.strip() != "null" for o in origins)

    async def _read_body(self, request: web.Request) -> tuple[bytes | StreamReader, bytes] | web.Response:
        """The request's body to forward: whole when it is within the body limit, else the StreamReader and the
        part of it already read. Up to the limit is read before an upstream connection is taken: a slow client
        holds none. A body that does not arrive in time is a 408."""
        server = self.config.server
        try:
            prefix, complete = await bodies.buffer(request.content, server.body_limit_bytes,
                                                   server.body_timeout_seconds)  # fmt: skip
        except RequestTimeout:
            response = web.Response(status=408, text="Request Timeout: the request body did not arrive.\n")
            response.force_close()
            return response
        return (prefix, b"") if complete else (request.content, prefix)

    async def _forward(
        self,
        request: web.Request,
        target: Target,
        route: Route,
        app: AppConfig,
        body: bytes | StreamReader | None,
        headers: CIMultiDict[str],
        *,
        query: str | None = None,
        method: str | None = None,
        expire: Collection[str] = (),
        prefix: bytes = b"",
        held: Held | Slot | None = None,
        cookies: CookieFilter | None = None,
        alive: Liveness | None = None,
        banner: str | None = None,
        resign: Callable[[], str] | None = None,
    ) -> web.StreamResponse:
        upstream = self.upstreams[app.name]
        raw_path, query = route.raw_path(target), target.query if query is None else query
        session_route = request.get(SESSION_ROUTE)
        if session_route is not None and session_route.cookie is not None:  # the session cookie never reaches an app
            _drop_cookies(headers, session_route.names)
        if _is_websocket(request):
            slot = held if isinstance(held, Slot) else None
            return await self.proxy.bridge(request, upstream, raw_path, query, headers, slot, cookies, alive)
        if body is None and method is None and request.body_exists:
            read = await self._read_body(request)
            if isinstance(read, web.Response):
                return read
            body, prefix = read
        return await self.proxy.forward(request, upstream, raw_path, query, headers, body, method=method,
                                        expire_cookies=expire, prefix=prefix,
                                        held=held if isinstance(held, Held) else None, cookies=cookies,
                                        banner=banner, resign=resign)  # fmt: skip

    # -- sessions -------------------------------------------------------------------------------------
    async def _start(
        self, request: web.Request, app: AppConfig, grant: Grant, client: str, headers: CIMultiDict[str]
    ) -> tuple[CookieFilter, str | None]:
        """Start a session of ``grant`` (ending the one the request carries: ``replaced``); ``headers`` get its
        assertion and lose the session cookie; the answer's cookies filter keeps the app's and sets the session's;
        with it, the banner for the answer (see :meth:`_banner`). Raises StoreUnavailable."""
        session_route = request.get(SESSION_ROUTE)
        if session_route is not None and session_route.cookie is not None:
            await self.sessions.end_cookie(session_route.cookie[1], "replaced")
        value, session = await self.sessions.start(app, grant, grant.mode or "full", client, request[REQUEST_ID])
        headers[ASSERTION_HEADER] = self.sessions.assertion(session, jti=grant.id)
        name = self._cookie_names[app.name]
        keeper = self._keeper(session, [set_cookie(name, value, secure=name.startswith("__Host-"))])
        return keeper, self._banner(request, app, session, headers)

    def _banner(self, request: web.Request, app: AppConfig, session: Session, headers: CIMultiDict[str]) -> str | None:
        """The banner for a request of ``session`` (None when the app has ``banner: false``); a request whose
        Accept prefers HTML asks the app for an unencoded answer, so that its page can take the banner."""
        if app.session is None or not app.session.banner:
            return None
        if prefers_html(request.headers.get("Accept", "")):
            headers["Accept-Encoding"] = "identity"
        return session.banner(app.mount)

    def _keeper(self, session: Session, extra: Sequence[str] = ()) -> CookieFilter:
        """The filter of a session's answer: its HttpOnly cookies kept in the session, ``extra`` added."""

        async def keep(values: list[str]) -> list[str]:
            return [*await self.sessions.keep(session, values), *extra]

        return keep

    def _alive(self, session: Session) -> Liveness:
        """Whether ``session`` is still there (a WebSocket of it is closed once it is not)."""

        async def alive(active: bool) -> bool:
            return await self.sessions.alive(session, active)

        return alive

    async def _in_session(
        self, request: web.Request, target: Target, route: Route, raw_body: bytes | None, session_route: SessionRoute
    ) -> web.StreamResponse:
        """A request carrying a session cookie and no grant: a request of its session when that is live and of one
        of the route's apps; else a plain request (whose answer clears a cookie naming no live session)."""
        assert session_route.cookie is not None
        name, value = session_route.cookie
        try:
            resumed = await self.sessions.resume(value, [a.name for a in session_route.apps])
        except StoreUnavailable:
            return web.Response(status=503, text="Service Unavailable: the session store does not answer.\n")
        if resumed.state == "live" and resumed.session is not None:
            request[KIND] = "session"
            return await self._session_request(request, target, route, raw_body, resumed.session, session_route)
        headers = self.proxy.headers(request)
        cookies = None
        if resumed.state != "other_app":  # a session of another app is left alone
            clear = set_cookie(name, "", secure=name.startswith("__Host-"), clear=True)

            async def cookies(values: list[str]) -> list[str]:
                return [*values, clear]

        return await self._forward(request, target, route, route.apps[0], raw_body, headers, cookies=cookies)

    async def _session_request(
        self, request: web.Request, target: Target, route: Route, raw_body: bytes | None, session: Session,
        session_route: SessionRoute,
    ) -> web.StreamResponse:  # fmt: skip
        """A request of a live ``session``: refused when its mode or the app's deny patterns say so, else forwarded
        to the session's app with a fresh assertion and the kept cookies."""
        app = self.config.app(session.app)
        assert app.session is not None
        method, path = request.method, route.path(target)
        request_id = request[REQUEST_ID]
        refusal = permitted(app.session, session.mode, method, path, _is_websocket(request))
        if refusal is not None:
            self.gateway.audit.session_request_refused(session.who, method, path, refusal, request_id)
            return session_refusal(request, refusal)
        started = time.perf_counter()
        headers = self.proxy.headers(request)
        cookie = self.sessions.cookie_header(session, headers.popall("Cookie", ()), session_route.names)
        if cookie is not None:
            headers["Cookie"] = cookie
        headers[ASSERTION_HEADER] = self.sessions.assertion(session)
        banner = None if _is_websocket(request) else self._banner(request, app, session, headers)
        status = 500
        try:
            response = await self._forward(request, target, route, app, raw_body, headers,
                                           cookies=self._keeper(session), alive=self._alive(session),
                                           banner=banner, resign=lambda: self.sessions.assertion(session))  # fmt: skip
            status = response.status
            return response
        finally:
            duration = round((time.perf_counter() - started) * 1000, 2)
            self.gateway.audit.session_request(session.who, method, path, status, duration, request_id)

    async def _session_endpoint(self, request: web.Request, path: str, session_route: SessionRoute) -> web.Response:
        """``GET /_impersonation/session`` (the live session, or 401) and ``POST /_impersonation/end``."""
        allowed = ("GET", "HEAD") if path == INFO_PATH else ("POST",)
        if request.method not in allowed:
            return problem(405, "method-not-allowed", "Method not allowed", "see Allow", Allow=", ".join(allowed))
        if path == END_PATH and not self._same_origin(request, session_route):
            return problem(403, "forbidden", "Forbidden", "ending a session takes a POST from the app's own origin")
        session = None
        state = "unknown"
        if session_route.cookie is not None:
            try:
                resumed = await self.sessions.resume(session_route.cookie[1], [a.name for a in session_route.apps])
                state, session = resumed.state, resumed.session if resumed.state == "live" else None
                if path == END_PATH and session is not None:
                    await self.sessions.end(session.id, "ended")
            except StoreUnavailable:
                return problem(503, "unavailable", "Service unavailable", "the session store does not answer")
        if path == INFO_PATH:
            if session is not None:
                return web.json_response(session.describe(), headers={"Cache-Control": "no-store"})
            response = problem(401, "unauthenticated", "Unauthenticated", "no live impersonation session")
        else:
            app = self.config.app(session.app) if session is not None else session_route.apps[0]
            assert app.session is not None
            response = _ended_page(app.session.end_url)
            for name, cookie_path, domain in session.passed if session is not None else ():
                response.headers.add("Set-Cookie", expire_cookie(name, cookie_path, domain))
        if session_route.cookie is not None and state != "other_app":
            name = session_route.cookie[0]
            response.headers.add("Set-Cookie", set_cookie(name, "", secure=name.startswith("__Host-"), clear=True))
        return response

    def _same_origin(self, request: web.Request, session_route: SessionRoute) -> bool:
        """Whether a POST to end a session has no Origin, or the request's own or one of the apps' public URL's."""
        origins = request.headers.getall("Origin", [])
        own = {f"{request.scheme}://{request.host}".lower()}
        own |= {_origin(self.config.public_url_of(a)) for a in session_route.apps}
        return all(o.strip().lower() in own for o in origins)


def _drop_cookies(headers: CIMultiDict[str], names: Collection[str]) -> None:
    """Remove the cookies ``names`` from the ``Cookie`` headers (left as they are when they hold none)."""
    values = headers.getall("Cookie", [])
    pairs = [p.strip() for v in values for p in v.split(";") if p.strip()]
    kept = [p for p in pairs if p.partition("=")[0].strip() not in names]
    if len(kept) != len(pairs):
        headers.popall("Cookie")
        if kept:
            headers["Cookie"] = "; ".join(kept)


_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def _page(status: int, title: str, text: str) -> web.Response:
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"{_STYLE}</head><body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    )
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS)


def _ended_page(end_url: str | None) -> web.Response:
    """The answer to ``POST /_impersonation/end``: 303 to the app's ``end_url``, else a small page."""
    if end_url:
        return web.Response(status=303, headers={"Location": end_url, "Cache-Control": "no-store"})
    return _page(200, "Impersonation ended", "The impersonation session has ended. You can close this tab.")


_SESSION_REFUSALS = {
    "read_only": "This impersonation session is read-only: it may not change anything here.",
    "denied": "Impersonation sessions may not use this page.",
}


def session_refusal(request: web.Request, reason: str) -> web.Response:
    """A request of a session its mode (``read_only``) or a deny pattern (``denied``) refuses: 403, a page for a
    browser, else problem details."""
    text = _SESSION_REFUSALS.get(reason, "This impersonation session may not do this.")
    if prefers_html(request.headers.get("Accept", "")):
        return _page(403, "Not allowed while impersonating", text)
    kind = "session-read-only" if reason == "read_only" else "session-denied"
    return problem(403, kind, "Forbidden", text)


def _release(held: dict[Upstream, Held | Slot]) -> None:
    for connection in held.values():
        connection.release()
    held.clear()


def _origin(url: str) -> str:
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.raw_authority}".lower()


_FORM = "application/x-www-form-urlencoded"


def _refusal(request: web.Request, dialect: Dialect, exc: Exception, app: AppConfig) -> web.Response:
    """The dialect's answer for ``exc`` (a page for a browser when a grant is refused); anything but a GatewayError
    is logged and answered as the dialect's 500."""
    if not isinstance(exc, GatewayError):
        bind_request(request)
        log.error("unhandled_error", app=app.name, dialect=app.dialect, **unexpected(exc))
        exc = GatewayError()
    if isinstance(exc, GrantRefused) and prefers_html(request.headers.get("Accept", "")):
        return refusal_page(exc.status)
    return dialect.error_response(exc)


_HTML_TYPES = ("text/html", "application/xhtml+xml")


def prefers_html(accept: str) -> bool:
    """Whether an ``Accept`` header names HTML with a quality no lower than any other type it names (wildcards
    are not a preference: ``*/*`` from an API client keeps the dialect's answer)."""
    html = other = 0.0
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        media = media.lower()
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    quality = 0.0
        if media in _HTML_TYPES:
            html = max(html, quality)
        elif media and "*" not in media:
            other = max(other, quality)
    return html > 0 and html >= other


_REFUSAL_PAGE = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    f"<title>This sign-in link cannot be used</title>{_STYLE}</head><body>"
    "<h1>This sign-in link cannot be used</h1>"
    "<p>It has already been used, or it has expired. Sign-in links work once, for a short time.</p>"
    "<p>Ask for a new link where you got this one.</p></body></html>"
)


def refusal_page(status: int) -> web.Response:
    """What a browser sees for a refused grant: the same status, and words instead of an API error body."""
    return web.Response(
        status=status,
        text=_REFUSAL_PAGE,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _is_websocket(request: web.Request) -> bool:
    return request.method == "GET" and "websocket" in request.headers.get("Upgrade", "").lower()


def _strip(headers: CIMultiDict[str], query: str, found: Sequence[Found], tokens: Collection[str]) -> str:
    """Remove the carriers ``found`` from what goes on: every link carrier's fields, and the other carriers that
    hold one of ``tokens``; return the query left."""
    links = {n.lower() for f in found if f.carrier.where is Where.QUERY and not f.carrier.passive
             for n in f.carrier.fields}  # fmt: skip
    if links:
        query = strip_query(query, links)
    passive = {f.carrier.name.lower() for f in found if f.carrier.where is Where.QUERY and f.carrier.passive
               and f.offer.token in tokens}  # fmt: skip
    if passive:
        query = strip_query(query, passive, tokens)
    cookies = {f.carrier.name.lower() for f in found if f.carrier.where is Where.COOKIE and f.offer.token in tokens}
    if cookies:
        strip_cookies(headers, cookies, tokens)
    named = {f.carrier.name for f in found if f.carrier.where is Where.HEADER and f.offer.token in tokens}
    if named:
        strip_headers(headers, named, tokens)
    return query


def confirmation_page() -> web.Response:
    """A page that POSTs the carrier back to the same URL: link scanners GET it without burning the grant."""
    return web.Response(
        text=_CONFIRM_PAGE,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": _CONFIRM_CSP,
            "X-Content-Type-Options": "nosniff",
        },
    )
