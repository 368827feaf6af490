"""The floors: bare aiohttp servers doing only what a gateway request cannot avoid, under uvloop.

hello   GET /            a small JSON body
mint    GET /mint        one redis-py ``SET NX PX`` of a random token
redeem  GET /redeem?token=T
                         one ``GETDEL`` of the key ``floor:T``, then the request forwarded to the
                         upstream's ``/`` with an aiohttp ``ClientSession`` (401 when the key is gone)
proxy   * /{path}        the request forwarded to the upstream as it came

python -m bench.floors mint --port 8081 --redis redis://127.0.0.1:6379/0 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import AsyncIterator, Callable

import aiohttp
import redis.asyncio as aioredis
import uvloop
from aiohttp import web
from yarl import URL

REDIS = web.AppKey("redis", aioredis.Redis)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)

KEY_PREFIX = "floor:"
GRANT = b'{"app":"control-panel","subject":"505","actor":"mgr-1"}'
TTL_MS = 60_000


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def mint(request: web.Request) -> web.Response:
    token = secrets.token_urlsafe(24)
    await request.app[REDIS].set(KEY_PREFIX + token, GRANT, nx=True, px=TTL_MS)
    return web.json_response({"token": token})


async def redeem(request: web.Request) -> web.Response:
    grant = await request.app[REDIS].getdel(KEY_PREFIX + request.query.get("token", ""))
    if grant is None:
        return web.json_response({"error": "unknown token"}, status=401)
    async with request.app[SESSION].get(request.app[UPSTREAM] + "/") as upstream:
        return web.Response(body=await upstream.read(), status=upstream.status, content_type=upstream.content_type)


async def proxy(request: web.Request) -> web.Response:
    headers = {name: value for name, value in request.headers.items() if name.lower() != "host"}
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    body = await request.read() if request.body_exists else None
    async with request.app[SESSION].request(request.method, url, headers=headers, data=body) as upstream:
        return web.Response(body=await upstream.read(), status=upstream.status, content_type=upstream.content_type)


def redis_ctx(url: str) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[REDIS] = client = aioredis.Redis.from_url(url)
        yield
        await client.aclose()

    return ctx


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = session = aiohttp.ClientSession()
    yield
    await session.close()


def create_floor(name: str, redis_url: str, upstream: str) -> web.Application:
    """The floor server ``name``; it opens only the clients it uses."""
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    if name in ("mint", "redeem"):
        app.cleanup_ctx.append(redis_ctx(redis_url))
    if name in ("redeem", "proxy"):
        app.cleanup_ctx.append(session_ctx)
    match name:
        case "hello":
            app.router.add_get("/", hello)
        case "mint":
            app.router.add_get("/mint", mint)
        case "redeem":
            app.router.add_get("/redeem", redeem)
        case "proxy":
            app.router.add_route("*", "/{tail:.*}", proxy)
    return app


FLOORS = ("hello", "mint", "redeem", "proxy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("floor", choices=FLOORS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="for mint and redeem")
    parser.add_argument("--upstream", default="http://127.0.0.1:9001", help="for redeem and proxy")
    args = parser.parse_args()
    app = create_floor(args.floor, args.redis, args.upstream)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
