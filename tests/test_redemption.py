"""Redemption's pure parts: who gets a page instead of an API error, the confirmation and refusal pages, what is
stripped from a request before it goes on, and which POSTs count as cross-site."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import fakeredis
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.assertion import Signer
from gateway.core import Gateway
from gateway.dialects import all_dialects
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.redemption import CONFIRM_FIELD, Redeemer, _strip, confirmation_page, prefers_html, refusal_page
from gateway.store import Store
from tests.conftest import KEY, PUBLIC_URL, make_config

APPS = {
    "control-panel": {"dialect": "activeplatform", "hosts": ["panel.test"], "public_url": "https://panel.example.com"},
    "analytics": {"dialect": "pyramid", "hosts": ["analytics.test"]},
    "switch": {"dialect": "denovolab", "hosts": ["switch.test"]},
}
CONFIG = make_config("t:", "http://upstream.invalid", APPS)
GRANT = "G" * 16 + "rant-shaped_0123"  # 32 base64url characters
OTHER = "O" * 16 + "ther-shaped_4567"
PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


@pytest.fixture
async def redeemer() -> AsyncIterator[Redeemer]:
    redis = fakeredis.FakeAsyncRedis()
    proxy = Proxy(CONFIG.server)
    gateway = Gateway(CONFIG, Store(redis, "t:"), Signer(KEY, PUBLIC_URL, 30), Metrics())
    yield Redeemer(CONFIG, gateway, proxy, all_dialects())
    await proxy.close()
    await redis.aclose()


# -- prefers_html --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("text/html", True),
        ("TEXT/HTML", True),
        ("application/xhtml+xml", True),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),  # a browser's
        ("application/json, text/html", True),  # as good as any other: the page
        ("text/html;q=0.9, application/json;q=0.8", True),
        ("text/html ; Q=0.5, application/json;q=0.4", True),
        ("text/html;level=1;q=0.5, */*", True),  # wildcards are no preference
        ("text/html;q=2, application/json", True),  # q above 1 counts as 1
        ("application/json;q=abc, text/html;q=0.1", True),  # a malformed q counts as 0
        ("", False),
        ("*/*", False),
        ("text/*", False),
        ("application/json", False),
        ("application/json, text/html;q=0.9", False),
        ("application/xhtml+xml;q=0.5, application/json;q=0.6", False),
        ("text/html;q=0", False),
        ("text/html;q=abc", False),
        ("text/html;q=-1", False),
        ("text/plain, text/html;q=0.999", False),
    ],
)
def test_prefers_html(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


# -- the pages -----------------------------------------------------------------------------------------------------
class Page(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.tags and self.tags[-1][0] == "script":
            self.scripts.append(data)

    def attrs(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


def csp(response: web.Response) -> dict[str, str]:
    directives = (d.strip().partition(" ") for d in response.headers["Content-Security-Policy"].split(";"))
    return {name: value for name, _, value in directives}


def test_confirmation_page_headers() -> None:
    page = confirmation_page()
    assert (page.status, page.content_type, page.charset) == (200, "text/html", "utf-8")
    assert {name: page.headers[name] for name in PAGE_HEADERS} == PAGE_HEADERS


def test_confirmation_page_posts_back_to_the_same_url() -> None:
    text = confirmation_page().text
    assert text is not None
    page = Page(text)
    assert page.attrs("form") == [{"method": "post"}]  # no action: the URL the browser shows
    assert page.attrs("input") == [{"type": "hidden", "name": CONFIRM_FIELD, "value": "1"}]
    assert {"name": "referrer", "content": "no-referrer"} in page.attrs("meta")


def test_confirmation_page_csp_allows_its_own_script_only() -> None:
    response = confirmation_page()
    assert response.text is not None
    (script,) = Page(response.text).scripts
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert csp(response) == {
        "default-src": "'none'",
        "form-action": "'self'",
        "script-src": f"'sha256-{digest}'",
        "style-src": "'unsafe-inline'",
        "frame-ancestors": "'none'",
    }


@pytest.mark.parametrize("status", [401, 403])
def test_refusal_page(status: int) -> None:
    response = refusal_page(status)
    assert (response.status, response.content_type, response.charset) == (status, "text/html", "utf-8")
    assert {name: response.headers[name] for name in PAGE_HEADERS} == PAGE_HEADERS
    assert csp(response) == {"default-src": "'none'", "style-src": "'unsafe-inline'", "frame-ancestors": "'none'"}
    assert response.text is not None
    page = Page(response.text)
    assert (page.attrs("form"), page.attrs("script"), page.scripts) == ([], [], [])
    assert "<h1>This sign-in link cannot be used</h1>" in response.text


# -- carriers and stripping ----------------------------------------------------------------------------------------
def test_other_apps_carriers_are_passive_on_a_route(redeemer: Redeemer) -> None:
    carriers = redeemer.carriers((CONFIG.app("control-panel"),))
    assert [(app, c.passive) for app, c in carriers.query["user_token"]] == [("control-panel", False)]
    assert [(app, c.passive) for app, c in carriers.query["token"]] == [("control-panel", True)]
    assert [(app, c.passive) for app, c in carriers.header["x-auth-token"]] == [("control-panel", True)]
    assert sorted(carriers.cookie) == ["pyramidauth", "pyramidembeddedauth"]


@pytest.mark.parametrize(
    ("app", "query", "headers", "live", "left_query", "left_headers"),
    [
        pytest.param(
            "control-panel", f"user_token={GRANT}&user_email=a%40b.test&page=2", [], {GRANT}, "page=2", [],
            id="link-fields",
        ),
        pytest.param(
            "control-panel", f"page=1&user_token={GRANT}&user_email=a%40b.test", [], set(), "page=1", [],
            id="link-fields-even-not-live",
        ),
        pytest.param("control-panel", f"token={GRANT}&page=2", [], {GRANT}, "page=2", [], id="passive-query-live"),
        pytest.param(
            "control-panel", f"token={OTHER}&page=2", [], {GRANT}, f"token={OTHER}&page=2", [],
            id="passive-query-not-live",
        ),
        pytest.param(
            "analytics", "", [("Cookie", f"PyramidAuth={GRANT}; theme=dark")], {GRANT}, "", [("Cookie", "theme=dark")],
            id="cookie-live",
        ),
        pytest.param(
            "analytics", "", [("Cookie", f"PyramidAuth={OTHER}; theme=dark")], {GRANT}, "",
            [("Cookie", f"PyramidAuth={OTHER}; theme=dark")], id="cookie-not-live",
        ),
        pytest.param(
            "switch", "", [("X-Auth-Token", GRANT), ("Accept", "*/*")], {GRANT}, "", [("Accept", "*/*")],
            id="header-live",
        ),
        pytest.param(
            "switch", "", [("X-Auth-Token", OTHER)], {GRANT}, "", [("X-Auth-Token", OTHER)], id="header-not-live"
        ),
    ],
)  # fmt: skip
def test_strip_removes_link_fields_and_live_grants(
    redeemer: Redeemer,
    app: str,
    query: str,
    headers: list[tuple[str, str]],
    live: set[str],
    left_query: str,
    left_headers: list[tuple[str, str]],
) -> None:
    sent = CIMultiDict(headers)
    found = redeemer.carriers((CONFIG.app(app),)).find(query, sent, "GET", "/")
    assert found, "the request offers a grant"
    assert _strip(sent, query, found, live) == left_query
    assert list(sent.items()) == left_headers


# -- cross-site POSTs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("app", "headers", "cross"),
    [
        ("control-panel", [], False),
        ("control-panel", [("Sec-Fetch-Site", "same-origin")], False),
        ("control-panel", [("Sec-Fetch-Site", "none")], False),
        ("control-panel", [("Sec-Fetch-Site", "cross-site")], True),
        ("control-panel", [("Sec-Fetch-Site", " Same-Site ")], True),
        ("control-panel", [("Origin", "http://panel.test")], False),  # the request's own origin
        ("control-panel", [("Origin", "HTTP://Panel.Test")], False),
        ("control-panel", [("Origin", "https://panel.example.com")], False),  # the app's public URL
        ("control-panel", [("Origin", "null")], False),  # the confirmation page's no-referrer POST
        ("control-panel", [("Origin", PUBLIC_URL)], True),  # the server's URL is not this app's
        ("analytics", [("Origin", PUBLIC_URL)], False),  # but is for an app without its own
        ("control-panel", [("Origin", "https://evil.test")], True),
        ("control-panel", [("Origin", "https://panel.test")], True),  # another scheme
        ("control-panel", [("Origin", "http://panel.test:8080")], True),  # another port
        ("control-panel", [("Origin", "http://panel.test"), ("Origin", "https://evil.test")], True),
        ("control-panel", [("Sec-Fetch-Site", "same-origin"), ("Origin", "https://evil.test")], True),
        ("control-panel", [("Sec-Fetch-Site", "cross-site"), ("Origin", "http://panel.test")], True),
    ],
)
def test_cross_site(redeemer: Redeemer, app: str, headers: list[tuple[str, str]], cross: bool) -> None:
    sent = CIMultiDict([("Host", "panel.test"), *headers])
    request = make_mocked_request("POST", f"/login?user_token={GRANT}", headers=sent)
    assert redeemer._cross_site(request, CONFIG.app(app)) is cross
