"""The aiohttp application: wiring. Routing lives in :mod:`gateway.routing`, the redemption flow in
:mod:`gateway.redemption`, forwarding in :mod:`gateway.proxy`; here a request is sent to the mint or info
endpoint it names, or to the redemption flow, and the operations endpoints are served.

``create_app(config, *, redis=None)`` is synchronous and starts nothing; the Redis client, the upstream
clients and the directory refresher live in cleanup contexts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib.resources
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import NamedTuple

import orjson
import structlog
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import minting, native
from .admin import create_admin_app
from .assertion import Signer, load_keys
from .config import AppConfig, Config
from .core import Gateway
from .dialects import Dialect, HttpRequest, all_dialects
from .errors import MethodNotAllowed, StoreUnavailable
from .logging import (
    FLUSH_SECONDS,
    REQUEST_ID,
    bind_request,
    flush_logs,
    log_request,
    loggable_path,
    unbind_request,
    unexpected,
)
from .metrics import Metrics
from .proxy import STREAMING, AnswerCut, Proxy
from .redemption import KIND, Redeemer
from .routing import BadTarget, Router, client_address, parse_target
from .store import AnyRedis, Store, connect, redacted, unreachable

log = structlog.get_logger("gateway")

CONFIG = web.AppKey("config", Config)
DIALECTS = web.AppKey("dialects", dict[str, Dialect])
METRICS = web.AppKey("metrics", Metrics)
SIGNER = web.AppKey("signer", Signer)
ROUTER = web.AppKey("router", Router)
GATEWAY = web.AppKey("gateway", Gateway)
REDEEMER = web.AppKey("redeemer", Redeemer)
OPENAPI = web.AppKey("openapi", bytes)  # gateway/openapi.yaml as JSON


def create_app(
    config: Config,
    *,
    redis: AnyRedis | None = None,
    key: Ed25519PrivateKey | None = None,
    admin_reuse_port: bool = False,
) -> web.Application:
    """Build the gateway application. ``redis`` replaces the client ``store.url`` would open (tests pass a
    fakeredis); ``key`` replaces ``assertion.private_key_file``. When it starts, it also starts the admin
    listener (``admin.port``; ``admin_reuse_port`` lets several worker processes share it)."""
    # Bodies are never decoded by the server: a pass-through body reaches the app byte for byte, and the
    # gateway decodes (bounded) only the bodies it reads itself.
    app = web.Application(client_max_size=config.server.body_limit_bytes, handler_args={"auto_decompress": False})
    app[CONFIG] = config
    app[DIALECTS] = all_dialects(app.dialect for app in config.apps)
    app[METRICS] = Metrics()
    app[ROUTER] = Router(config.apps)
    keys = load_keys(config.assertion)
    if keys.problems:
        raise ValueError(keys.problems[0])
    key = key or keys.signing
    if key is None:
        log.warning("assertion_key_ephemeral", detail="no assertion.private_key_file: a new key for this process")
        key = Ed25519PrivateKey.generate()
    app[SIGNER] = Signer(key, config.server.public_url.rstrip("/"), config.assertion.ttl_seconds, keys.previous)
    app[OPENAPI] = openapi_document()
    app.cleanup_ctx.append(_store_ctx(redis))
    app.cleanup_ctx.append(_proxy_ctx)
    app.cleanup_ctx.append(_admin_ctx(admin_reuse_port))
    app.cleanup_ctx.append(_log_flush_ctx)
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle)  # any path, newlines included
    return app


def _store_ctx(redis: AnyRedis | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        client = redis if redis is not None else connect(config.store.url, config.store.timeout_seconds)
        store = Store(client, config.store.prefix, config.store.timeout_seconds)
        gateway = Gateway(config, store, app[SIGNER], app[METRICS])
        app[GATEWAY] = gateway
        failing = False
        try:
            await gateway.directory.refresh(load_file=True)
        except StoreUnavailable as exc:  # serve anyway (503 where the store is needed); the refresher keeps trying
            log.warning("store_unavailable", detail=unreachable(config.store.url, exc),
                        consequence="mints and redemptions answer 503 until it answers")  # fmt: skip
            failing = True
        refresher = asyncio.create_task(_refresh_directory(gateway, config, failing))
        yield
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await gateway.directory.close()
        if redis is None:  # close only what we opened
            await store.close()

    return ctx


async def _refresh_directory(gateway: Gateway, config: Config, failing: bool) -> None:
    """Follow directory loads made by any process, reload the file if the store comes back empty, trim the apps'
    live grant indexes, and sweep the sessions (:meth:`~gateway.sessions.Sessions.sweep`). A store that stops or
    starts answering is logged once each time."""
    while True:
        await asyncio.sleep(config.directory.refresh_seconds)
        try:
            await gateway.directory.refresh()
            await gateway.store.trim_live(gateway.directory.apps)  # expired grants out of the live indexes
            await gateway.sessions.sweep()  # expired sessions audited; those of removed subjects and actors ended
            if failing:
                log.info("store_available", store=redacted(config.store.url))
            failing = False
        except StoreUnavailable as exc:
            if not failing:
                log.warning("store_unavailable", detail=unreachable(config.store.url, exc),
                            consequence="mints and redemptions answer 503 until it answers")  # fmt: skip
            failing = True
        except Exception:  # a bad directory file must not stop the refresher
            log.exception("directory_refresh_failed")


async def _proxy_ctx(app: web.Application) -> AsyncIterator[None]:
    proxy = Proxy(app[CONFIG].server)
    app[REDEEMER] = Redeemer(app[CONFIG], app[GATEWAY], proxy, app[DIALECTS])
    yield
    await proxy.close()


def _admin_ctx(reuse_port: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        admin = config.admin
        if admin.port is None or not admin.listens:  # no tokens: nothing it could serve, so no second port
            yield
            return
        runner = web.AppRunner(create_admin_app(config, app[GATEWAY]), access_log=None,
                               keepalive_timeout=config.server.keepalive_seconds)  # fmt: skip
        await runner.setup()
        try:
            site = web.TCPSite(runner, admin.host, admin.port, reuse_port=reuse_port or None)
            try:
                await site.start()
            except OSError as exc:
                raise ListenError(admin.host, admin.port, config.setting("admin.port"), exc) from None
            log.info("admin_listening", url=site.name, tokens=len(admin.tokens))
            yield
        finally:
            await runner.cleanup()

    return ctx


class ListenError(Exception):
    """A listener could not open its address (taken, or not this host's); ``str()`` is one line naming the
    address and the setting that chose it."""

    def __init__(self, host: str, port: int, setting: str, error: OSError) -> None:
        why = {errno.EADDRINUSE: "something else is already listening there",
               errno.EADDRNOTAVAIL: "that address is not one of this host's",
               errno.EACCES: "permission denied"}.get(error.errno or 0, error.strerror or "cannot listen")  # fmt: skip
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"cannot listen on {address} ({setting}): {why}")


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


# -- every request -----------------------------------------------------------------------------------
async def handle(request: web.Request) -> web.StreamResponse:
    """Every request: its one log line (never the query string: it may hold a grant) and its latency, around an
    operations endpoint or :func:`dispatch`. (One handler and no middleware: every request pays for what aiohttp's
    router and middleware chain would add.)"""
    request_id = request.headers.get("X-Request-ID", "")
    if not (0 < len(request_id) <= 64 and request_id.isascii() and request_id.replace("-", "").isalnum()):
        request_id = f"{random.getrandbits(64):016x}"  # an id, not a secret
    request[REQUEST_ID] = request_id
    start = time.perf_counter()
    status = 500
    try:
        operation = OPERATIONS.get(request.path) if request.method in ("GET", "HEAD") else None
        if operation is not None and (operation.every_host or request.app[ROUTER].host_apps(request.host) is None):
            request[KIND] = "ops"
            response = await operation.handler(request)
        elif request.path == native.PATH and request.app[ROUTER].host_apps(request.host) is None:
            request[KIND] = "mint"
            response = await native.mint(request, request.app[CONFIG], request.app[GATEWAY], request.app[DIALECTS],
                                         _client(request), request_id)  # fmt: skip
        else:
            response = await dispatch(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except AnswerCut:  # logged where it was cut
        status = 502
        return _cut(request)
    except ConnectionResetError:  # the client went away mid-request: nobody to answer, nothing wrong here
        status = 499
        log.info("client_disconnected", request_id=request_id)
        return _cut(request)
    except Exception as exc:
        bind_request(request)
        log.error("unhandled_error", **unexpected(exc))  # never its text: it may quote request or answer bytes
        if request.get(STREAMING):  # too late for a status: aiohttp drops the connection
            raise
        return web.Response(status=500, text="Internal Server Error\n")
    finally:
        unbind_request(request)
        duration = time.perf_counter() - start
        request.app[METRICS].observe(request.get(KIND, "other"), duration)
        log_request({"request_id": request_id, "method": request.method, "path": loggable_path(request.path),
                     "status": status, "duration_ms": round(duration * 1000, 2)})  # fmt: skip


def _cut(request: web.Request) -> web.Response:
    """Abort the client's connection (a begun answer must not be ended as if whole: aiohttp would send the last
    chunk); aiohttp then finds nothing to write the returned answer to, and says nothing of it."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=499)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready = await request.app[GATEWAY].store.ping()
    return web.json_response({"status": "ready" if ready else "store unavailable"}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def jwks(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[SIGNER].jwks_json(),
        content_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


class Operation(NamedTuple):
    """One of the gateway's own GET (and HEAD) endpoints: its handler, and whether it answers on every host or only
    on the gateway's own host names (health and metrics are for operators: on a host an app lists, those paths are
    the app's). The runtime, check-config, the nginx configuration and the OpenAPI document read this table."""

    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    every_host: bool


OPERATIONS: dict[str, Operation] = {
    "/healthz": Operation(healthz, every_host=False),
    "/readyz": Operation(readyz, every_host=False),
    "/metrics": Operation(metrics, every_host=False),
    "/.well-known/jwks.json": Operation(jwks, every_host=True),
    "/openapi.json": Operation(openapi, every_host=True),
}


@functools.cache
def openapi_document() -> bytes:
    """The package's ``openapi.yaml`` (generated by :mod:`gateway.openapi`, and the same for every config) as JSON,
    read once per process (tests build many apps)."""
    text = importlib.resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")
    return orjson.dumps(yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def _client(request: web.Request) -> str:
    """The client's address: the peer's, or what a trusted proxy's X-Forwarded-For says."""
    trusted = request.app[CONFIG].server.trusted_proxies
    return client_address(request.remote or "unknown", request.headers.getall("X-Forwarded-For", ()), trusted)


# -- dispatch -----------------------------------------------------------------------------------------
async def dispatch(request: web.Request) -> web.StreamResponse:
    """A mint or info endpoint of one of the request's apps, else the redemption flow."""
    try:
        target = parse_target(request.raw_path, request.host)
    except BadTarget as exc:
        return web.Response(status=400, text=f"Bad Request: {exc}.\n")
    route = request.app[ROUTER].select(target)
    if route is None:
        return web.Response(status=404, text="No application is configured for this host and path.\n")
    client = _client(request)
    path = route.path(target)
    dialects = request.app[DIALECTS]
    for app in route.apps:
        dialect = dialects[app.dialect]
        if not dialect.owns(path):  # most requests: on to the app
            continue
        matched = dialect.match(request.method, path)
        if matched is None or matched[0].kind not in ("mint", "info"):
            allowed = dialect.methods_at(path)
            if allowed:  # the path of a mint or info endpoint, another method: never the app's (nor its credential)
                request[KIND] = "mint"
                return dialect.error_response(MethodNotAllowed(allowed))
            continue
        endpoint, params = matched
        request[KIND] = endpoint.kind
        view = HttpRequest(request.method, path, request.query, request.headers, client=client,
                           endpoint=endpoint, params=params)  # fmt: skip
        return await _answer(request, dialect, app, view, endpoint.kind)
    return await request.app[REDEEMER].handle(request, target, route, client)


async def _answer(request: web.Request, dialect: Dialect, app: AppConfig, view: HttpRequest, kind: str) -> web.Response:
    """A dialect's info endpoint, or its mint endpoint: the one mint flow with the dialect's parse and shapes."""
    config = request.app[CONFIG]
    if kind == "info":

        async def info() -> web.Response:
            return dialect.info(view, app, config.public_url_of(app))

        return await minting.answer(request, dialect.error_response, info, app=app.name, dialect=app.dialect)
    return await minting.mint(request, request.app[GATEWAY], config.server, request[REQUEST_ID],
                              lambda body: dialect.parse(replace(view, body=body), app),
                              lambda _, result: dialect.render(result, app, config.public_url_of(app)),
                              dialect.error_response, read_body=request.method not in ("GET", "HEAD"),
                              app=app.name, dialect=app.dialect)  # fmt: skip
