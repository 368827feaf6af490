"""Carriers found the lenient way and removed without touching anything else."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.carriers import Carriers, strip_body, strip_cookies, strip_headers, strip_query
from gateway.dialects import all_dialects

GRANT = "AbCdEfGhIjKlMnOpQrStUvWxYz012-_9"
OTHER = "ZyXwVuTsRqPoNmLkJiHgFeDcBa987-_1"
DIALECTS = all_dialects()


def find(dialect: str, query: str = "", headers: list[tuple[str, str]] = (), method: str = "GET", path: str = "/",
         body: bytes | None = None) -> list[tuple[str, str, dict[str, str], bool]]:  # fmt: skip
    carriers = Carriers([(dialect, DIALECTS[dialect].carriers)])
    found = carriers.find(query, CIMultiDict(headers), method, path, body)
    return [(f.carrier.name, f.offer.token, dict(f.offer.bound), f.offer.passive) for f in found]


@pytest.mark.parametrize(
    ("query", "found"),
    [
        (f"user_email=a%40b.c&user_token={GRANT}", [("user_token", GRANT, {"email": "a@b.c"}, False)]),
        (f"x=1;USER_TOKEN={GRANT}", [("user_token", GRANT, {"email": ""}, False)]),  # no e-mail: a mismatch
        (f"user%5Ftoken={GRANT}&user_email=a&user_email=b", [("user_token", GRANT, {"email": ""}, False)]),
        ("user_token=short&user_email=a", []),  # not a grant's shape: the app's own
        (f"other={GRANT}", []),
    ],
)
def test_links_in_any_spelling(query: str, found: list[tuple[str, str, dict[str, str], bool]]) -> None:
    assert find("activeplatform", query) == found


def test_cookies_in_every_header_and_any_quoting() -> None:
    headers = [
        ("Cookie", "theme=dark"),
        ("cookie", f'x="a;PyramidAuth={GRANT}"'),
        ("Cookie", f"a=1, pyramidauth = {OTHER}"),
    ]
    assert find("pyramid", headers=headers) == [
        ("PyramidAuth", GRANT, {}, True),
        ("PyramidAuth", OTHER, {}, True),
    ]


def test_header_values_split_on_commas() -> None:
    assert find("denovolab", headers=[("X-Auth-Token", f"admin-token, {GRANT}")]) == [("X-Auth-Token", GRANT, {}, True)]


def test_a_body_carriers_endpoint_always_offers() -> None:
    path = "/api/v2/user/login-with-token"
    assert find("btcdirect", method="POST", path=path, body=f'{{"uuid":"u","token":"{GRANT}"}}'.encode()) == [
        ("token", GRANT, {"uuid": "u"}, False)
    ]
    assert find("btcdirect", method="POST", path=path, body=f"uuid=u&token={GRANT}".encode()) == [
        ("token", GRANT, {"uuid": "u"}, False)
    ]
    assert find("btcdirect", method="POST", path=path, body=b"\xff") == [("token", "", {"uuid": ""}, False)]
    assert find("btcdirect", method="POST", path="/elsewhere", body=b"{}") == []


def test_strip_query_keeps_every_other_byte() -> None:
    query = f"a=%41&user_token={GRANT};b=2&User%5FEmail=x&c"
    assert strip_query(query, {"user_token", "user_email"}) == "a=%41;b=2&c"
    assert strip_query(f"token={GRANT}&token=own&x=1", {"token"}, {GRANT}) == "token=own&x=1"


def test_strip_cookies_and_headers_only_what_holds_the_grant() -> None:
    headers = CIMultiDict([("Cookie", f"a=1; PyramidAuth={GRANT}; b=2"), ("Cookie", "PyramidAuth=own"),
                           ("X-Auth-Token", GRANT), ("X-Auth-Token", "admin-token")])  # fmt: skip
    strip_cookies(headers, {"pyramidauth"}, {GRANT})
    strip_headers(headers, ["X-Auth-Token"], {GRANT})
    assert headers.getall("Cookie") == ["a=1; b=2", "PyramidAuth=own"]
    assert headers.getall("X-Auth-Token") == ["admin-token"]


def test_strip_body() -> None:
    assert strip_body(f'{{"uuid":"u","token":"{GRANT}","x":1}}'.encode(), {"uuid", "token"}) == b'{"x":1}'
    assert strip_body(f"uuid=u&x=1&token={GRANT}".encode(), {"uuid", "token"}) == b"x=1"
