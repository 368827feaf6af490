"""The session banner (DESIGN §13): a session's HTML pages get a notice with an End button before their last
``</body>``, every value escaped, with a fixed length and no ETag; every other answer passes unchanged."""

from __future__ import annotations

import copy
import gzip
import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.directory import parse_directory
from gateway.proxy import BANNER_LIMIT, with_banner
from gateway.sessions import banner
from gateway.store import Store
from tests.conftest import DIRECTORY, KEY, make_config

MANAGER = "vY5fwetestK3gJXZH5uHCw"  # control-panel's mgr-1, reseller 1
ODD_TOKEN = "odd-actor-token-0123456789"
ODD_ACTOR = "<script>alert('x')</script>\"&"
ODD_SUBJECT = 'a<b"c'
COOKIE = "impersonation_session"
HTML_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
SESSION = {"max_seconds": 3600, "idle_seconds": 600}
APPS: dict[str, Any] = {
    "control-panel": {"dialect": "activeplatform", "redeem_on_get": True, "grant_ttl_seconds": 60, "session": SESSION},
}

# The last </body> is the page's own: an earlier one sits in a script's string.
PAGE = (
    '<!doctype html><html><head><meta charset="utf-8"><title>Orders</title></head><body><h1>Orders</h1>'
    '<script>var s = "</BODY>";</script><p>naïve café</p></Body >\n</html>\n'
)
BIG = "<!doctype html><html><body><p>" + "x" * BANNER_LIMIT + "</p></body></html>"


def _directory() -> dict[str, Any]:
    directory = copy.deepcopy(DIRECTORY)
    apps = directory["apps"]["control-panel"]
    apps["principals"].append({"id": ODD_ACTOR, "token": ODD_TOKEN, "role": "admin", "reseller": 1})
    apps["subjects"].append({"id": ODD_SUBJECT, "email": "odd@example.com", "reseller": 1})
    return directory


@dataclass
class App:
    """A programmable app: each path answers a different kind of page; it records the headers it was sent."""

    url: str = ""
    headers: list[dict[str, str]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, str]:
        return self.headers[-1]


async def _answer(request: web.Request) -> web.StreamResponse:
    path = request.path.removeprefix("/crm")
    page_headers = {"ETag": '"v1"', "Content-MD5": "c29tZXRoaW5n", "Cache-Control": "private"}
    if path == "/json":
        return web.json_response({"html": "</body>"}, headers={"ETag": '"j1"'})
    if path == "/big":
        return web.Response(text=BIG, content_type="text/html", headers={"ETag": '"b1"'})
    if path in ("/chunked", "/big-chunked"):
        response = web.StreamResponse(headers={"Content-Type": "text/html; charset=utf-8", "ETag": '"c1"'})
        response.enable_chunked_encoding()
        await response.prepare(request)
        text = PAGE if path == "/chunked" else BIG
        for i in range(0, len(text), 65536):
            await response.write(text[i : i + 65536].encode())
        await response.write_eof()
        return response
    if path == "/fragment":
        return web.Response(text="<p>no end of body here</p>", content_type="text/html", headers=page_headers)
    if path == "/gzip":
        return web.Response(body=gzip.compress(PAGE.encode()), content_type="text/html", charset="utf-8",
                            headers={**page_headers, "Content-Encoding": "gzip"})  # fmt: skip
    if path == "/latin1":
        body = PAGE.replace('charset="utf-8"', 'charset="iso-8859-1"').encode("latin-1")
        return web.Response(body=body, headers={**page_headers, "Content-Type": "text/html; charset=ISO-8859-1"})
    if path == "/bad-utf8":
        return web.Response(body=b"<html><body>\xff\xfe</body></html>", content_type="text/html",
                            headers=page_headers)  # fmt: skip
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8", headers=page_headers)


@pytest.fixture
async def app(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> App:
    found = App()

    async def record(request: web.Request) -> web.StreamResponse:
        found.headers.append(dict(request.headers))
        return await _answer(request)

    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(web_app)
    found.url = str(server.make_url("")).rstrip("/")
    return found


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    mount: str = ""

    async def start(self, subject: str = "505", token: str = MANAGER) -> tuple[str, aiohttp.ClientResponse]:
        """Mint and redeem (as a browser would): the session cookie and the redeeming request's answer."""
        minted = await self.client.post("/v1/grants", json={"app": "control-panel", "subject": subject},
                                        headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert minted.status == 201, await minted.text()
        link = "/" + (await minted.json())["login_url"].split("/", 3)[3]
        response = await self.client.get(link, headers={"Accept": HTML_ACCEPT})
        assert response.status == 200, await response.text()
        cookie = next(v for v in response.headers.getall("Set-Cookie") if v.startswith(f"{COOKIE}="))
        return cookie.split(";")[0].split("=", 1)[1], response

    async def get(self, path: str, cookie: str | None, accept: str = HTML_ACCEPT) -> aiohttp.ClientResponse:
        headers = {"Accept": accept}
        if cookie is not None:
            headers["Cookie"] = f"{COOKIE}={cookie}"
        return await self.client.get(self.mount + path, headers=headers)


Factory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], redis_client: Any, app: App, prefix: str
) -> Factory:
    async def make(session: dict[str, Any] | None = None, mount: str = "") -> Gateway:
        settings = {**APPS["control-panel"], "session": {**SESSION, **(session or {})}}
        if mount:
            settings["mount"] = mount
        config = make_config(prefix, app.url, {"control-panel": settings})
        await Store(redis_client, prefix).load_directory(parse_directory(_directory()))
        client = await aiohttp_client(create_app(config, redis=redis_client, key=KEY),
                                      cookie_jar=aiohttp.DummyCookieJar())  # fmt: skip
        return Gateway(client, mount)

    return make


@pytest.fixture
async def gw(start: Factory) -> Gateway:
    return await start()


def notice(response_text: str) -> str:
    """The banner in a page (it is the only element with its id)."""
    start = response_text.index('<div id="impersonation-banner"')
    return response_text[start : response_text.index("</div>", start) + len("</div>")]


# -- the helpers --------------------------------------------------------------------------------------------------
def test_every_value_of_the_banner_is_escaped() -> None:
    text = banner(ODD_ACTOR, ODD_SUBJECT, 1_700_000_000_000, '/c"r')
    assert "<script>" not in text and 'a<b"c' not in text and '/c"r' not in text
    assert html.escape(ODD_ACTOR, quote=True) in text and "a&lt;b&quot;c" in text
    assert 'action="/c&quot;r/_impersonation/end"' in text
    assert "until 22:13 UTC" in text  # 2023-11-14T22:13:20Z


def test_the_banner_goes_before_the_last_end_of_body_in_the_pages_charset() -> None:
    assert with_banner(PAGE.encode(), "<b>!</b>", "text/html") == PAGE.replace("</Body >", "<b>!</b></Body >").encode()
    latin = "<html><body>café</body></html>"
    changed = with_banner(latin.encode("latin-1"), "<b>é€</b>", "text/html; charset=ISO-8859-1")
    assert changed == "<html><body>café<b>é&#8364;</b></body></html>".encode("latin-1")
    assert with_banner(b"<p>fragment</p>", "<b>!</b>", "text/html") is None
    assert with_banner(b"<body>\xff</body>", "<b>!</b>", "text/html; charset=utf-8") is None
    assert with_banner(b"<body></body>", "<b>!</b>", "text/html; charset=no-such-charset") is None


# -- pages of a session -------------------------------------------------------------------------------------------
async def test_a_sessions_page_gets_the_banner_with_its_length_fixed_and_no_etag(gw: Gateway, app: App) -> None:
    cookie, redeemed = await gw.start()
    assert '<div id="impersonation-banner"' in await redeemed.text()  # the redeeming request is the session's first
    response = await gw.get("/orders", cookie)
    assert response.status == 200
    body = await response.read()
    text = body.decode()
    assert text.count('id="impersonation-banner"') == 1
    before, _, after = text.rpartition(notice(text))
    assert after == "</Body >\n</html>\n" and before.endswith("<p>naïve café</p>")
    assert int(response.headers["Content-Length"]) == len(body)
    assert "ETag" not in response.headers and "Content-MD5" not in response.headers
    assert response.headers["Cache-Control"] == "private"  # other headers stay
    banner_text = notice(text)
    assert "<strong>mgr-1</strong> is acting as <strong>505</strong> until " in banner_text
    assert banner_text.count(" UTC") == 1
    assert '<form method="post" action="/_impersonation/end"' in banner_text and 'type="submit"' in banner_text
    assert app.last["Accept-Encoding"] == "identity"


async def test_ids_are_escaped_in_a_real_page(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start(subject=ODD_SUBJECT, token=ODD_TOKEN)
    text = await (await gw.get("/orders", cookie)).text()
    banner_text = notice(text)
    assert ODD_ACTOR not in text and ODD_SUBJECT not in text
    assert f"<strong>{html.escape(ODD_ACTOR, quote=True)}</strong>" in banner_text
    assert "<strong>a&lt;b&quot;c</strong>" in banner_text


async def test_a_chunked_page_gets_it_too(gw: Gateway) -> None:
    cookie, _ = await gw.start()
    response = await gw.get("/chunked", cookie)
    body = await response.read()
    assert b'id="impersonation-banner"' in body and int(response.headers["Content-Length"]) == len(body)
    assert "ETag" not in response.headers


async def test_a_latin1_page_is_re_encoded_in_latin1(gw: Gateway) -> None:
    cookie, _ = await gw.start()
    response = await gw.get("/latin1", cookie)
    body = await response.read()
    assert b'id="impersonation-banner"' in body and "naïve café".encode("latin-1") in body
    assert int(response.headers["Content-Length"]) == len(body)


UNCHANGED = {
    "/json": (b'{"html": "</body>"}', '"j1"'),
    "/big": (BIG.encode(), '"b1"'),
    "/big-chunked": (BIG.encode(), '"c1"'),
    "/fragment": (b"<p>no end of body here</p>", '"v1"'),
    "/gzip": (PAGE.encode(), '"v1"'),  # as the client decodes it
    "/bad-utf8": (b"<html><body>\xff\xfe</body></html>", '"v1"'),
}


@pytest.mark.parametrize("path", sorted(UNCHANGED))
async def test_other_answers_of_a_session_are_unchanged(gw: Gateway, path: str) -> None:
    cookie, _ = await gw.start()
    response = await gw.get(path, cookie)
    body, etag = UNCHANGED[path]
    assert response.status == 200
    assert await response.read() == body
    assert response.headers["ETag"] == etag


async def test_a_page_without_end_of_body_keeps_its_etag(gw: Gateway) -> None:
    cookie, _ = await gw.start()
    response = await gw.get("/fragment", cookie)
    assert await response.text() == "<p>no end of body here</p>" and response.headers["ETag"] == '"v1"'


async def test_a_big_page_streams_unchanged(gw: Gateway) -> None:
    cookie, _ = await gw.start()
    for path in ("/big", "/big-chunked"):
        response = await gw.get(path, cookie)
        body = await response.read()
        assert body == BIG.encode(), path
        assert response.headers.get("ETag") in ('"b1"', '"c1"')


async def test_a_gzip_answer_is_unchanged(gw: Gateway) -> None:
    cookie, _ = await gw.start()
    response = await gw.get("/gzip", cookie)
    assert response.headers["Content-Encoding"] == "gzip" and response.headers["ETag"] == '"v1"'
    assert await response.text() == PAGE  # (the client decodes it)


# -- not a session's, or not wanted -------------------------------------------------------------------------------
async def test_a_request_without_a_session_is_unchanged(gw: Gateway, app: App) -> None:
    response = await gw.get("/orders", None)
    assert await response.text() == PAGE and response.headers["ETag"] == '"v1"'
    assert app.last.get("Accept-Encoding") != "identity"


async def test_banner_false_leaves_pages_and_accept_encoding_alone(start: Factory, app: App) -> None:
    gw = await start({"banner": False})
    cookie, redeemed = await gw.start()
    assert await redeemed.text() == PAGE
    response = await gw.get("/orders", cookie)
    assert await response.text() == PAGE and response.headers["ETag"] == '"v1"'
    assert app.last.get("Accept-Encoding") != "identity"


async def test_identity_is_asked_for_only_when_accept_prefers_html(gw: Gateway, app: App) -> None:
    cookie, _ = await gw.start()
    await gw.get("/orders", cookie, accept="application/json")
    assert app.last.get("Accept-Encoding", "") != "identity"
    await gw.get("/orders", cookie, accept="*/*")
    assert app.last.get("Accept-Encoding", "") != "identity"
    await gw.get("/orders", cookie, accept="text/html")
    assert app.last["Accept-Encoding"] == "identity"


async def test_the_end_button_posts_below_the_mount(start: Factory) -> None:
    gw = await start(mount="/crm")
    cookie, _ = await gw.start()
    text = await (await gw.get("/orders", cookie)).text()
    assert '<form method="post" action="/crm/_impersonation/end"' in notice(text)
    ended = await gw.client.post("/crm/_impersonation/end", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert ended.status == 200 and "Impersonation ended" in await ended.text()
    assert any(v.startswith(f"{COOKIE}=;") for v in ended.headers.getall("Set-Cookie"))
    after = await gw.get("/orders", cookie)
    assert await after.text() == PAGE  # a plain request now: no banner
