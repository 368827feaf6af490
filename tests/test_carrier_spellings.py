"""Spellings of a carrier that frameworks read as the carrier itself (security probe finding L5).

PHP reads ``user.token``, ``user token`` and ``user[token`` as ``user_token``; PHP, Rack and qs read ``token[]``
and ``token[0]`` as ``token``; a URL parser ends the query at a ``#`` a broken client sent; apps drop a scheme
(``Bearer G``), quotes, base64 padding or percent-encoding from a value. The gateway's search must find the
grant in each (or at least keep it from the app), and a real gateway on a socket must redeem it without the
app ever receiving the grant.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.app import create_app
from gateway.carriers import Carriers, field_name, grant_in, strip_cookies, strip_headers, strip_query
from gateway.core import grant_id
from gateway.dialects import all_dialects
from gateway.directory import parse_directory
from gateway.store import Store
from tests.conftest import KEY, make_config

ROOT = Path(__file__).resolve().parent.parent
GRANT = "AbCdEfGhIjKlMnOpQrStUvWxYz012-_9"


def encoded(value: str) -> str:
    """Every character percent-encoded."""
    return "".join(f"%{ord(c):02X}" for c in value)


ENCODED = encoded(GRANT)
EMAIL = "example@activeplatform.com"


# -- the search ----------------------------------------------------------------------------------------------
SEARCH = Carriers((d.name, d.carriers) for d in all_dialects().values())


def found(query: str = "", headers: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """``(carrier, token)`` of every grant the gateway's search finds, each once."""
    return sorted({(f.carrier.name, f.offer.token) for f in SEARCH.find(query, CIMultiDict(headers), "GET", "/")})


@pytest.mark.parametrize(
    ("query", "carrier"),
    [
        (f"user.token={GRANT}", "user_token"),
        (f"user+token={GRANT}", "user_token"),
        (f"user%20token={GRANT}", "user_token"),
        (f"user%2Etoken={GRANT}", "user_token"),
        (f"user[token={GRANT}", "user_token"),  # PHP: an unclosed bracket is an underscore
        (f"user_token[]={GRANT}", "user_token"),
        (f"user_token%5B%5D={GRANT}", "user_token"),
        (f"user_token[0]={GRANT}", "user_token"),
        (f"token[]={GRANT}", "token"),
        (f"token={GRANT}#f", "token"),
        (f"x=1#token={GRANT}", "token"),
        (f"token={GRANT}=", "token"),
        (f"token={GRANT}%3D%3D", "token"),
        (f"token=%22{GRANT}%22", "token"),
        (f"to%E2%84%AAen={GRANT}", "token"),  # the Kelvin sign lower-cases to "k"
    ],
)
def test_query_spellings_are_found(query: str, carrier: str) -> None:
    assert found(query) == [(carrier, GRANT)]


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Auth-Token", f"Bearer {GRANT}")],
        [("X-Auth-Token", f"{GRANT}==")],
        [("X-Auth-Token", f'"{GRANT}"')],
        [("X-Auth-Token", f"admin-token, Token {GRANT}=")],
        [("Cookie", f"PyramidAuth={ENCODED}")],
        [("Cookie", f'PyramidAuth="{GRANT}"')],
        [("Cookie", f"a=1; PyramidAuth={GRANT}%3D")],
        [("Cookie", f'PyramidAuth="{GRANT}=="')],
    ],
)
def test_header_and_cookie_spellings_are_found(headers: list[tuple[str, str]]) -> None:
    ((_, token),) = found(headers=headers)
    assert token == GRANT


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        (f"usertoken={GRANT}&user-token={GRANT}&user_token_x={GRANT}&my.token={GRANT}", []),
        (f"token={GRANT}x&token=x{GRANT}&token=a.{GRANT}", []),  # longer values: the app's own
        ("token=Bearer+short", [("X-Auth-Token", "Bearer short"), ("Cookie", 'PyramidAuth="own"')]),
        ("", [("X-Auth-Token", f"{GRANT}=x"), ("Cookie", f"PyramidAuth={GRANT}%3Dx")]),
    ],
)
def test_what_an_app_would_not_read_as_a_grant_is_not_found(query: str, headers: list[tuple[str, str]]) -> None:
    assert found(query, headers) == []


def test_names_and_values_as_apps_read_them() -> None:
    assert [field_name(n) for n in ("User.Token", "user token", "user[token", "user_token[a][b]", "a[b]c")] == [
        "user_token", "user_token", "user_token", "user_token", "a"
    ]  # fmt: skip
    assert [grant_in(v) for v in (f"Bearer {GRANT}", f' "{GRANT}==" ', f"{GRANT}\t", "a b c")] == [GRANT] * 3 + ["c"]


def test_each_spelling_is_removed_with_its_grant() -> None:
    query = f"a=1&user.token={GRANT}&user_token[0]={GRANT}=&user%20email=x;token[]=%22{GRANT}%22#f&token=own"
    assert strip_query(query, {"user_token", "user_email"}) == "a=1;token[]=%22" + GRANT + "%22#f&token=own"
    assert (
        strip_query(query, {"token"}, {GRANT})
        == f"a=1&user.token={GRANT}&user_token[0]={GRANT}=&user%20email=x#f&token=own"
    )
    headers = CIMultiDict([("Cookie", f'a=1; PyramidAuth="{GRANT}"; b=2'), ("Cookie", f"PyramidAuth={ENCODED}"),
                           ("X-Auth-Token", f"Bearer {GRANT}"), ("X-Auth-Token", "Bearer admin-token")])  # fmt: skip
    strip_cookies(headers, {"pyramidauth"}, {GRANT})
    strip_headers(headers, ["X-Auth-Token"], {GRANT})
    assert headers.getall("Cookie") == ["a=1; b=2"]
    assert headers.getall("X-Auth-Token") == ["Bearer admin-token"]


# -- a real gateway on a socket --------------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Demo:
    """The demo's apps and directory behind a gateway on ``port``; what the app received."""

    port: int
    seen: list[Seen]

    async def send(self, method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> bytes:
        """The answer to a request written byte for byte (aiohttp's client would normalise the target)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        lines = [f"{method} {target} HTTP/1.1", "Host: app.test", "Connection: close",
                 *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}"]  # fmt: skip
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer


@pytest.fixture
async def demo(aiohttp_server: Callable[..., Awaitable[TestServer]], redis_client: Any, prefix: str) -> Demo:
    seen: list[Seen] = []

    async def record(request: web.Request) -> web.Response:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        seen.append(Seen(request.method, request.raw_path, headers, await request.read()))
        return web.Response(text="app")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    upstream = await aiohttp_server(app)
    apps = yaml.safe_load((ROOT / "config.yaml").read_text())["apps"]
    config = make_config(prefix, str(upstream.make_url("")).rstrip("/"), apps)
    await Store(redis_client, prefix).load_directory(
        parse_directory(yaml.safe_load((ROOT / "directory.yaml").read_text()))
    )
    server = await aiohttp_server(create_app(config, redis=redis_client, key=KEY))
    return Demo(server.port, seen)


async def mint(demo: Demo, kind: str) -> str:
    """A live grant of the demo: an ActivePlatform link, a Pyramid cookie or query grant, a Denovolab header one."""
    if kind == "link":
        answer = await demo.send("GET", "/api/v3/resellers/1/user_authentication/token?account_id=505",
                                 [("X-Api-Token", "vY5fwetestK3gJXZH5uHCw")])  # fmt: skip
        field = "owner_token"
    elif kind in ("cookie", "pyramid-link"):
        body = b'{"token": "pyramid-enterprise-admin-token", "userIdentity": "jdoe"}'
        answer = await demo.send("POST", "/API3/authentication/authenticateUserByToken",
                                 [("Content-Type", "application/json")], body)  # fmt: skip
        return answer.partition(b"\r\n\r\n")[2].decode()
    else:
        answer = await demo.send("POST", "/v1/auth/as_client", [("X-Auth-Token", "denovolab-demo-admin-token"),
                                 ("Content-Type", "application/json")], b'{"client_id": 41}')  # fmt: skip
        field = "cdr_api_token"
    assert answer.startswith(b"HTTP/1.1 200"), answer
    token = json.loads(answer.partition(b"\r\n\r\n")[2])[field]
    assert isinstance(token, str)
    return token


LINK = f"/welcome?user_email={EMAIL}&"
SPELLINGS = [
    pytest.param("link", lambda g: (LINK + f"user.token={g}", []), id="user.token"),
    pytest.param("link", lambda g: (LINK + f"user+token={g}", []), id="user+token"),
    pytest.param("link", lambda g: (LINK + f"user%20token={g}", []), id="user%20token"),
    pytest.param("link", lambda g: (LINK + f"user_token[]={g}", []), id="user_token[]"),
    pytest.param("link", lambda g: (LINK + f"user_token[0]={g}", []), id="user_token[0]"),
    pytest.param("link", lambda g: (LINK + f"user_token={g}%3D%3D", []), id="padded-link"),
    pytest.param("pyramid-link", lambda g: (f"/reports?token[]={g}", []), id="token[]"),
    pytest.param("pyramid-link", lambda g: (f"/reports?token={g}#f", []), id="fragment"),
    pytest.param("pyramid-link", lambda g: (f"/reports?token={g}=", []), id="padded-query"),
    pytest.param("header", lambda g: ("/cdr", [("X-Auth-Token", f"Bearer {g}")]), id="bearer"),
    pytest.param("header", lambda g: ("/cdr", [("X-Auth-Token", f"{g}==")]), id="padded-header"),
    pytest.param("cookie", lambda g: ("/reports", [("Cookie", "PyramidAuth=" + encoded(g))]), id="encoded-cookie"),
    pytest.param("cookie", lambda g: ("/reports", [("Cookie", f'theme=dark; PyramidAuth="{g}"')]), id="quoted-cookie"),
]


@pytest.mark.parametrize(("kind", "spell"), SPELLINGS)
async def test_a_spelt_grant_is_redeemed_and_never_reaches_the_app(
    demo: Demo, kind: str, spell: Callable[[str], tuple[str, list[tuple[str, str]]]]
) -> None:
    grant = await mint(demo, kind)
    target, headers = spell(grant)
    answer = await demo.send("GET", target, headers)
    if kind.endswith("link"):  # a link: the confirmation page first, and its POST redeems
        assert answer.startswith(b"HTTP/1.1 200") and b"Continue sign-in" in answer and not demo.seen
        form = ("Content-Type", "application/x-www-form-urlencoded")
        answer = await demo.send("POST", target, [*headers, form], b"impersonation_confirm=1")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\napp"), answer
    (seen,) = demo.seen
    assertion = dict((k.lower(), v) for k, v in seen.headers)["x-impersonation-assertion"]
    claims = jwt.decode(assertion, KEY.public_key(), algorithms=["EdDSA"], options={"verify_aud": False})
    assert claims["jti"] == grant_id(grant)
    assert grant not in repr(seen) and encoded(grant) not in repr(seen)
