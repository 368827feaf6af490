"""The aiohttp application: routing by host and mount, minting, redemption, pass-through, operations.

``create_app(config, *, redis=None)`` is synchronous and starts nothing; the Redis client, the upstream
client session and the directory refresher live in cleanup contexts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import html
import importlib.resources
import ipaddress
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, unquote_plus, urlencode

import aiohttp
import orjson
import structlog
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from multidict import CIMultiDict

from . import proxy
from .assertion import Signer, load_key
from .config import AppConfig, Config
from .core import Carrier, Gateway
from .dialects import Dialect, HttpRequest, all_dialects
from .errors import GatewayError, PayloadTooLarge, StoreUnavailable
from .logging import FLUSH_SECONDS, flush_logs
from .metrics import Metrics
from .store import AnyRedis, Store, connect

log = structlog.get_logger("gateway")

CONFIG = web.AppKey("config", Config)
DIALECTS = web.AppKey("dialects", dict[str, Dialect])
METRICS = web.AppKey("metrics", Metrics)
SIGNER = web.AppKey("signer", Signer)
GATEWAY = web.AppKey("gateway", Gateway)
SESSION = web.AppKey("session", aiohttp.ClientSession)
OPENAPI = web.AppKey("openapi", bytes)  # gateway/openapi.yaml as JSON
KIND = web.RequestKey("kind", str)  # mint, info, redeem, pass or ops: the latency histogram's label

ASSERTION_HEADER = "X-Impersonation-Assertion"
CONFIRM_FIELD = "impersonation_confirm"
_CONFIRM_SCRIPT = "document.forms[0].submit();"
_CONFIRM_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_CONFIRM_SCRIPT.encode()).digest()).decode()
_CONFIRM_CSP = f"default-src 'none'; form-action 'self'; script-src 'sha256-{_CONFIRM_SCRIPT_HASH}'"


def create_app(
    config: Config, *, redis: AnyRedis | None = None, key: Ed25519PrivateKey | None = None
) -> web.Application:
    """Build the gateway application. ``redis`` replaces the client ``store.url`` would open (tests pass a
    fakeredis); ``key`` replaces ``assertion.private_key_file``."""
    app = web.Application(middlewares=[request_middleware], client_max_size=config.server.body_limit_bytes)
    app[CONFIG] = config
    app[DIALECTS] = all_dialects(app.dialect for app in config.apps)
    app[METRICS] = Metrics()
    if key is None:
        if config.assertion.private_key_file is not None:
            key = load_key(config.assertion.private_key_file)
        else:
            log.warning("assertion_key_ephemeral", detail="no assertion.private_key_file: a new key for this process")
            key = Ed25519PrivateKey.generate()
    app[SIGNER] = Signer(key, config.server.public_url.rstrip("/"), config.assertion.ttl_seconds)
    app[OPENAPI] = openapi_document()
    app.cleanup_ctx.append(_store_ctx(redis))
    app.cleanup_ctx.append(_session_ctx)
    app.cleanup_ctx.append(_log_flush_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_route("*", r"/{tail:[\s\S]*}", dispatch)  # any path, newlines included
    return app


def _store_ctx(redis: AnyRedis | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        client = redis if redis is not None else connect(config.store.url, config.store.timeout_seconds)
        store = Store(client, config.store.prefix, config.store.timeout_seconds)
        gateway = Gateway(config, store, app[SIGNER], app[METRICS])
        app[GATEWAY] = gateway
        with contextlib.suppress(StoreUnavailable):  # the refresher keeps trying
            await gateway.directory.refresh(load_file=True)
        refresher = asyncio.create_task(_refresh_directory(gateway, config.directory.refresh_seconds))
        yield
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        if redis is None:  # close only what we opened
            await store.close()

    return ctx


async def _refresh_directory(gateway: Gateway, every: float) -> None:
    """Follow directory loads made by any process, and reload the file if the store comes back empty."""
    failing = False
    while True:
        await asyncio.sleep(every)
        try:
            await gateway.directory.refresh()
            if failing:
                log.info("directory_refresh_recovered")
            failing = False
        except StoreUnavailable:
            if not failing:
                log.warning("directory_refresh_failed", reason="store unavailable")
            failing = True
        except Exception:  # a bad directory file must not stop the refresher
            log.exception("directory_refresh_failed")


async def _log_flush_ctx(app: web.Application) -> AsyncIterator[None]:
    async def flush_every() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            flush_logs()

    flusher = asyncio.create_task(flush_every())
    yield
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    flush_logs()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = session = proxy.upstream_session()
    yield
    await session.close()


# -- middleware and operations ------------------------------------------------------------------------
@web.middleware
async def request_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One log line per request (never the query string: it may hold a grant) and the latency histogram."""
    request_id = request.headers.get("X-Request-ID", "")
    if not (0 < len(request_id) <= 64 and request_id.isascii() and request_id.replace("-", "").isalnum()):
        request_id = f"{random.getrandbits(64):016x}"  # an id, not a secret
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:
        log.exception("unhandled_error")
        if request.get(proxy.STREAMING):  # too late for a status: aiohttp drops the connection
            raise
        return web.Response(status=500, text="Internal Server Error\n")
    finally:
        duration = time.perf_counter() - start
        request.app[METRICS].observe(request.get(KIND, "other"), duration)
        log.info("request", method=request.method, path=request.path, status=status,
                 duration_ms=round(duration * 1000, 2))  # fmt: skip


async def healthz(request: web.Request) -> web.Response:
    request[KIND] = "ops"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    request[KIND] = "ops"
    ready = await request.app[GATEWAY].store.ping()
    return web.json_response({"status": "ready" if ready else "store unavailable"}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    request[KIND] = "ops"
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def jwks(request: web.Request) -> web.Response:
    request[KIND] = "ops"
    return web.Response(
        body=request.app[SIGNER].jwks_json(),
        content_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )


async def openapi(request: web.Request) -> web.Response:
    request[KIND] = "ops"
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


@functools.cache
def openapi_document() -> bytes:
    """The package's ``openapi.yaml`` as JSON, read once per process (tests build many apps)."""
    text = importlib.resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")
    return orjson.dumps(yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


# -- routing ------------------------------------------------------------------------------------------
def select_apps(config: Config, host: str, path: str) -> tuple[list[AppConfig], str]:
    """The apps a request may be for (by Host, then the longest matching mount), and that mount."""
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    by_host = [a for a in config.apps if host in a.hosts or hostname in a.hosts]
    pool = by_host or [a for a in config.apps if not a.hosts]
    mounted = [a for a in pool if not a.mount or path == a.mount or path.startswith(a.mount + "/")]
    if not mounted:
        return [], ""
    mount = max(len(a.mount) for a in mounted)
    return [a for a in mounted if len(a.mount) == mount], next(a.mount for a in mounted if len(a.mount) == mount)


@functools.cache
def _networks(cidrs: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def client_address(request: web.Request, trusted: tuple[str, ...]) -> str:
    """The caller's address: the peer, or the nearest untrusted hop of X-Forwarded-For when the peer is a
    trusted proxy."""
    peer = request.remote or "unknown"
    if not trusted or "X-Forwarded-For" not in request.headers:
        return peer
    networks = _networks(trusted)

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in networks)

    if not is_trusted(peer):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For")).split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else peer


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes (PayloadTooLarge) without reading past it."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class _Context:
    """What dispatch learned of a request."""

    config: Config
    view: HttpRequest
    apps: list[AppConfig]
    mount: str


async def dispatch(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    apps, mount = select_apps(config, request.host, request.path)
    if not apps:
        return web.Response(status=404, text="No application is configured for this host and path.\n")
    view = HttpRequest(
        method=request.method,
        path=request.path[len(mount) :] or "/",
        query=request.query,
        headers=request.headers,
        cookies=request.cookies,
        client=client_address(request, config.server.trusted_proxies),
    )
    ctx = _Context(config, view, apps, mount)
    dialects = request.app[DIALECTS]
    for app in apps:
        dialect = dialects[app.dialect]
        matched = dialect.match(request.method, view.path)
        if matched:
            endpoint, params = matched
            request[KIND] = endpoint.kind
            try:
                if endpoint.kind == "info":
                    return dialect.info(replace(view, params=params), app, config.public_url_of(app))
                body = await read_body(request, config.server.body_limit_bytes)
                command = dialect.parse(replace(view, params=params, body=body), app)
                result = await request.app[GATEWAY].mint(command)
                return dialect.render(result, app, config.public_url_of(app))
            except GatewayError as exc:
                return dialect.render_error(exc)
            except Exception:
                log.exception("unhandled_error", app=app.name, dialect=app.dialect)
                return dialect.render_error(GatewayError())
    return await _redeem_or_pass(request, ctx)


async def _redeem_or_pass(request: web.Request, ctx: _Context) -> web.StreamResponse:
    dialects = request.app[DIALECTS]
    view = ctx.view
    body: bytes | None = None
    reader = next((a for a in ctx.apps if dialects[a.dialect].reads_body(view)), None)
    if reader is not None:  # a carrier may sit in this body
        try:
            body = await read_body(request, ctx.config.server.body_limit_bytes)
        except PayloadTooLarge as exc:
            return dialects[reader.dialect].render_error(exc)
        view = replace(view, body=body)
    offers: dict[str, dict[str, Carrier]] = {}
    for app in ctx.apps:
        for carrier in dialects[app.dialect].carriers(view):
            offers.setdefault(carrier.token, {}).setdefault(app.name, carrier)
    if not offers:  # an ordinary request: its body streams through, whatever its size
        request[KIND] = "pass"
        return await _forward(request, ctx, ctx.apps[0], body=body)
    request[KIND] = "redeem"
    token, by_app = next(iter(offers.items()))
    first = ctx.config.app(next(iter(by_app)))
    confirm = False
    if body is None and _is_confirmation(request):  # perhaps the POST of a scanner-safe confirmation page
        try:
            body = await read_body(request, ctx.config.server.body_limit_bytes)
        except PayloadTooLarge as exc:
            return dialects[first.dialect].render_error(exc)
        confirm = CONFIRM_FIELD in dict(parse_qsl(body.decode("latin-1")))
    # Links are what scanners and previewers follow; cookies and headers (passive carriers, which may also
    # hold the app's own session) are not, so only a link waits for the browser's confirming POST.
    link = any(c.browser and not c.passive for c in by_app.values())
    scanner_safe = link and any(not ctx.config.app(a).redeem_on_get for a in by_app)
    if request.method == "HEAD":  # never consumes
        if not link:
            request[KIND] = "pass"
            return await _forward(request, ctx, ctx.apps[0], body=body)
        return _confirmation_page(request)
    if request.method == "GET" and scanner_safe:
        return _confirmation_page(request)
    try:
        redemption = await request.app[GATEWAY].redeem(token, by_app, view.client)
    except GatewayError as exc:
        response = dialects[first.dialect].render_error(exc)
        for cookie in {c for carrier in by_app.values() for c in carrier.cookies}:
            response.del_cookie(cookie, path="/")
        return response
    except Exception:
        log.exception("unhandled_error", app=first.name, dialect=first.dialect)
        return dialects[first.dialect].render_error(GatewayError())
    if redemption is None:  # a passive carrier held no grant: an ordinary request
        request[KIND] = "pass"
        return await _forward(request, ctx, ctx.apps[0], body=body)
    return await _forward(
        request,
        ctx,
        ctx.config.app(redemption.app),
        body=None if confirm else body,
        carrier=redemption.carrier,
        assertion=redemption.assertion,
        method="GET" if confirm else None,
    )


def _is_confirmation(request: web.Request) -> bool:
    return request.method == "POST" and request.content_type == "application/x-www-form-urlencoded"


def _confirmation_page(request: web.Request) -> web.Response:
    """A page that POSTs the carrier back to the same URL: link scanners GET it without burning the grant."""
    action = html.escape(request.raw_path, quote=True)
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
        "<title>Continue sign-in</title></head><body>"
        f'<form method="post" action="{action}"><input type="hidden" name="{CONFIRM_FIELD}" value="1">'
        '<p>Press continue to sign in.</p><button type="submit">Continue</button></form>'
        f"<script>{_CONFIRM_SCRIPT}</script></body></html>"
    )
    return web.Response(
        text=page,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": _CONFIRM_CSP,
            "X-Content-Type-Options": "nosniff",
        },
    )


async def _forward(
    request: web.Request,
    ctx: _Context,
    app: AppConfig,
    *,
    body: bytes | None,
    carrier: Carrier | None = None,
    assertion: str | None = None,
    method: str | None = None,
) -> web.StreamResponse:
    """Send the request on to ``app``'s upstream, without ``carrier`` and with ``assertion`` when given."""
    headers = proxy.forward_headers(request, ctx.view.client)
    headers.popall(ASSERTION_HEADER, None)  # only the gateway speaks for the gateway
    path = request.raw_path[len(ctx.mount) :] or "/"
    if carrier is not None:
        path = _strip_query(path, carrier.query)
        for name in carrier.headers:
            headers.popall(name, None)
        _strip_cookies(headers, carrier.cookies)
        if body is not None and carrier.body_fields:
            body = _strip_body(body, request.content_type, carrier.body_fields)
            headers.popall("Content-Length", None)
    if assertion is not None:
        headers[ASSERTION_HEADER] = assertion
    if method == "GET":  # a confirmed scanner-safe redemption: the original GET, not the confirming POST
        for name in ("Content-Type", "Content-Length"):
            headers.popall(name, None)
    data: bytes | aiohttp.StreamReader | None = body
    if body is None and method is None and request.body_exists:
        data = request.content
    return await proxy.forward(
        request.app[SESSION],
        request,
        app.upstream,
        method=method or request.method,
        path_qs=path,
        headers=headers,
        body=data,
        expire_cookies=carrier.cookies if carrier else (),
    )


def _strip_query(path_qs: str, names: tuple[str, ...]) -> str:
    path, sep, query = path_qs.partition("?")
    if not sep or not names:
        return path_qs
    kept = [pair for pair in query.split("&") if pair and _unquote_name(pair) not in names]
    return f"{path}?{'&'.join(kept)}" if kept else path


def _unquote_name(pair: str) -> str:
    return unquote_plus(pair.partition("=")[0])


def _strip_cookies(headers: CIMultiDict[str], names: tuple[str, ...]) -> None:
    if not names:
        return
    kept = [
        part.strip()
        for value in headers.popall("Cookie", [])
        for part in value.split(";")
        if part.strip() and part.split("=", 1)[0].strip() not in names
    ]
    if kept:
        headers["Cookie"] = "; ".join(kept)


def _strip_body(body: bytes, content_type: str, names: tuple[str, ...]) -> bytes:
    if content_type == "application/x-www-form-urlencoded":
        return urlencode([(k, v) for k, v in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
                          if k not in names]).encode()  # fmt: skip
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if isinstance(data, dict):
        return orjson.dumps({k: v for k, v in data.items() if k not in names})
    return body
