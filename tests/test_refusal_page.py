"""A refused redemption: a browser (``Accept`` preferring HTML) gets a small page with the same status; every other
client gets the dialect's answer byte for byte."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.redemption import prefers_html
from tests.conftest import GatewayFactory, Upstream
from tests.fixtures import DEMO_APPS, DIRECTORY
from tests.test_reasons import MINTS

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
APPS = {name: {**app, "redeem_on_get": True} for name, app in DEMO_APPS.items()}


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER, True),
        ("text/html", True),
        ("application/xhtml+xml", True),
        ("TEXT/HTML; q=1", True),
        ("text/html;q=0.8, application/json;q=0.8", True),
        ("", False),
        ("*/*", False),
        ("text/*", False),
        ("application/json", False),
        ("application/json, text/html;q=0.9", False),
        ("text/html;q=0", False),
        ("text/html;q=zero", False),
        ("text/plain, text/html;q=0.5", False),
        (",,;;q=1,", False),
    ],
)
def test_prefers_html(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


@pytest.mark.parametrize("dialect", MINTS)
async def test_a_spent_link_in_a_browser_is_a_page_and_for_others_the_dialects_bytes(
    gateway: GatewayFactory, upstream: Upstream, dialect: str
) -> None:
    mint = MINTS[dialect]
    client = await gateway(apps=APPS, directory=DIRECTORY)
    link = await mint.link(await mint.send(client))
    assert (await client.get(link, headers={"Accept": BROWSER})).status == 200  # redeemed: the app's answer
    page = await client.get(link, headers={"Accept": BROWSER})
    assert page.status == 401
    assert page.content_type == "text/html"
    text = await page.text()
    assert "already been used, or it has expired" in text and "Ask for a new link" in text
    assert page.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    answers = []
    for accept in (None, "*/*", "application/json", "text/html;q=0.1, application/json"):
        response = await client.get(link, headers={} if accept is None else {"Accept": accept})
        answers.append((response.status, response.content_type, await response.read()))
    assert answers[0][0] == 401 and answers[0][1] != "text/html"
    assert all(a == answers[0] for a in answers), answers  # byte for byte, whatever the Accept
    assert len(upstream.requests) == 1


async def test_a_spent_grant_in_a_cookie_in_a_browser_is_a_page_that_expires_the_cookie(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    mint = MINTS["pyramid"]
    client = await gateway(apps=APPS, directory=DIRECTORY)
    token = (await mint.link(await mint.send(client))).removeprefix("/?token=")
    assert (await client.get("/", headers={"Cookie": f"PyramidAuth={token}"})).status == 200
    page = await client.get("/", headers={"Cookie": f"PyramidAuth={token}", "Accept": BROWSER})
    assert (page.status, page.content_type) == (401, "text/html")
    assert "PyramidAuth=" in page.headers["Set-Cookie"] and "Max-Age=0" in page.headers["Set-Cookie"]


async def test_an_unknown_link_in_a_browser_is_the_same_page(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    page = await client.get("/?token=" + "A" * 32, headers={"Accept": BROWSER})
    assert (page.status, page.content_type) == (401, "text/html")
    assert upstream.requests == []


async def test_a_store_outage_is_not_dressed_as_a_refusal(aiohttp_client: Any, upstream: Upstream, prefix: str) -> None:
    """Only a refused grant becomes the page: a 503 stays the dialect's, so nobody is told to ask for a new link
    when theirs is fine."""
    import fakeredis

    from gateway.app import create_app
    from gateway.directory import parse_directory
    from gateway.store import Store
    from tests.conftest import KEY, make_config

    server = fakeredis.FakeServer()  # a Redis of this test's own, to take away
    redis = fakeredis.FakeAsyncRedis(server=server)
    await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
    client = await aiohttp_client(create_app(make_config(prefix, upstream.url, APPS), redis=redis, key=KEY))
    server.connected = False  # every command fails with a connection error
    response = await client.get("/?token=" + "A" * 32, headers={"Accept": BROWSER})
    assert response.status == 503 and response.content_type != "text/html"
    await redis.aclose()
