"""The session cases' small client (aiohttp): starting impersonation sessions and ending them.

A session starts as a browser's does: a grant minted through the native API (``POST /v1/grants``, as the
demo's reseller manager), then its login link followed once; the redeeming answer's ``Set-Cookie`` holds the
session cookie. ``POST /_impersonation/end`` with that cookie ends it. :func:`churn` starts and ends sessions,
``concurrency`` at a time, as fast as this one process can, and calls back at each mark.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import aiohttp
import uvloop

from .processes import BenchError

COOKIE = "impersonation_session"
END_PATH = "/_impersonation/end"
MANAGER_TOKEN = "vY5fwetestK3gJXZH5uHCw"  # the demo's manager of reseller 1, which holds account 505
SUBJECT = "505"


def cookie_header(value: str) -> str:
    return f"Cookie: {COOKIE}={value}"


def _client() -> aiohttp.ClientSession:
    # No cookie jar: every session's cookie is sent by hand, so one client holds any number of sessions.
    connector = aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


async def start(http: aiohttp.ClientSession, url: str, app: str) -> str:
    """Mint a grant for ``app`` and redeem its login link; the session cookie's value."""
    headers = {"Authorization": f"Bearer {MANAGER_TOKEN}"}
    async with http.post(url + "/v1/grants", json={"app": app, "subject": SUBJECT}, headers=headers) as response:
        if response.status != 201:
            raise BenchError(f"minting for a session: {response.status} {await response.text()}")
        login_url = (await response.json())["login_url"]
    path = "/" + login_url.split("/", 3)[3]  # the link names the public URL; the bench's gateway is elsewhere
    async with http.get(url + path, allow_redirects=False) as response:
        await response.read()
        morsel = response.cookies.get(COOKIE)
        if response.status >= 400 or morsel is None or not morsel.value:
            raise BenchError(f"redeeming for a session: {response.status}, no {COOKIE} cookie set")
        return morsel.value


async def end(http: aiohttp.ClientSession, url: str, cookie: str) -> None:
    async with http.post(url + END_PATH, headers={"Cookie": f"{COOKIE}={cookie}"}, allow_redirects=False) as response:
        await response.read()
        if response.status not in (200, 303):
            raise BenchError(f"ending a session: {response.status}")


def start_one(url: str, app: str) -> str:
    """One session's cookie (a live session the caller keeps)."""

    async def go() -> str:
        async with _client() as http:
            return await start(http, url, app)

    return uvloop.run(go())


def start_many(url: str, app: str, count: int, concurrency: int = 16) -> list[str]:
    """``count`` live sessions' cookies."""

    async def go() -> list[str]:
        cookies: list[str] = []
        async with _client() as http:

            async def worker(n: int) -> None:
                for _ in range(n):
                    cookies.append(await start(http, url, app))

            await asyncio.gather(*(worker(len(range(i, count, concurrency))) for i in range(concurrency)))
        return cookies

    return uvloop.run(go())


def end_many(url: str, cookies: Sequence[str], concurrency: int = 16) -> None:
    async def go() -> None:
        async with _client() as http:

            async def worker(mine: Sequence[str]) -> None:
                for cookie in mine:
                    await end(http, url, cookie)

            await asyncio.gather(*(worker(cookies[i::concurrency]) for i in range(concurrency)))

    uvloop.run(go())


def churn(
    url: str, app: str, marks: Sequence[int], at_mark: Callable[[int, float], None], concurrency: int = 32
) -> None:
    """Start and end sessions (mint, redeem, end), ``concurrency`` at a time, until each of ``marks`` (a count of
    sessions ended, in order) is reached; there, with nothing in flight, ``at_mark(mark, seconds so far)``."""

    async def go() -> None:
        claimed = 0
        started = time.monotonic()
        async with _client() as http:

            async def worker(mark: int) -> None:
                nonlocal claimed
                while claimed < mark:
                    claimed += 1
                    await end(http, url, await start(http, url, app))

            for mark in sorted(marks):
                await asyncio.gather(*(worker(mark) for _ in range(concurrency)))
                at_mark(mark, time.monotonic() - started)

    uvloop.run(go())
