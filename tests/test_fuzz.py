"""Any bytes in, a 4xx in the dialect's shape out: never an exception, never a 5xx.

Each dialect's ``parse`` and the carrier search are driven directly with arbitrary bodies, headers (including what
aiohttp makes of non-UTF-8 header bytes), query strings and cookies; then the same hostile input goes over
the wire, as raw HTTP bytes, to the whole app on fakeredis. Every refusal must fit the OpenAPI description.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlencode

import fakeredis
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from gateway.app import create_app
from gateway.carriers import Carriers
from gateway.config import AppConfig
from gateway.core import TOKEN_SHAPE, ImpersonationCommand, Offer
from gateway.dialects import Dialect, Endpoint, HttpRequest, Where, all_dialects
from gateway.directory import parse_directory
from gateway.errors import GatewayError
from gateway.store import Store
from tests.conftest import KEY, Upstream, make_config
from tests.fixtures import DEMO_APPS, DIRECTORY, assert_conforms, described_template

DIALECTS = all_dialects()
APP_OF = {settings_["dialect"]: AppConfig(name, settings_["dialect"], "http://upstream.invalid")
          for name, settings_ in DEMO_APPS.items()}  # fmt: skip
FUZZ = settings(max_examples=200, deadline=None)

# Values that get a request past the first checks: the demo directory's credentials and identifiers.
KNOWN = [
    "vY5fwetestK3gJXZH5uHCw",
    "marketing-manager-token",
    "pyramid-enterprise-admin-token",
    "pyramid-sales-domain-admin-token",
    "denovolab-demo-admin-token",
    "btcdirect-partner-demo-token",
    "btcdirect-user-demo-token",
    "7c3f9a1e2b4d6f8091a3c5e7f9b1d3e5a7c9e1f3",
    "45b9313b-fa47-4786-baf1-62969dec31f2",
    "505",
    "41",
    "jdoe",
    "SALES\\jdoe",
    "jdoe@example.com",
    "sales.example.com",
]
HEADER_NAMES = [
    "X-Api-Token", "X-Auth-Token", "Authorization", "X-Api-Key", "User-Identifier", "User-Authorization",
    "Content-Type", "Cookie", "X-Forwarded-For", "X-Request-ID", "Accept",
]  # fmt: skip
QUERY_NAMES = ["account_id", "token", "user_email", "user_token", "uuid", "client_id"]
BODY_FIELDS = ["token", "userIdentity", "domain", "customData", "data", "client_id", "uuid", "other"]
COOKIE_NAMES = ["PyramidAuth", "PyramidEmbeddedAuth", "session"]

ALNUM = string.ascii_letters + string.digits
grant_like = st.text(alphabet=ALNUM + "_-", min_size=32, max_size=32)  # a grant's shape, never a live one
known = st.sampled_from(KNOWN) | grant_like
text = st.text(max_size=120)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text | known,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
objects = st.dictionaries(st.sampled_from(BODY_FIELDS), json_values, max_size=5) | st.fixed_dictionaries(
    {"token": known, "userIdentity": text | known},  # a Pyramid login that gets as far as the directory
    optional={"domain": text | known, "customData": json_values},
)
# json.dumps also writes NaN, Infinity and integers of any size, as a careless client would.
bodies = st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda v: json.dumps(v).encode()),
    objects.map(lambda v: json.dumps(v).encode()),
    objects.map(lambda v: json.dumps({"data": v}).encode()),
)
header_values = st.one_of(
    text,
    known,
    st.builds("{} {}".format, st.sampled_from(["Bearer", "bearer", "Basic", "", "Bearer "]), text | known),
    st.text(alphabet=ALNUM, min_size=30, max_size=260),
    # aiohttp hands non-UTF-8 header bytes over as surrogate escapes
    st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
headers = st.lists(st.tuples(st.sampled_from(HEADER_NAMES) | st.text(min_size=1, max_size=12), header_values),
                   max_size=6).map(lambda pairs: CIMultiDictProxy(CIMultiDict(pairs)))  # fmt: skip
queries = st.lists(st.tuples(st.sampled_from(QUERY_NAMES) | st.text(max_size=8), text | known),
                   max_size=5).map(lambda pairs: MultiDictProxy(MultiDict(pairs)))  # fmt: skip
cookies = st.dictionaries(st.sampled_from(COOKIE_NAMES) | st.text(min_size=1, max_size=8),
                          text | st.text(alphabet=ALNUM + "_-", min_size=22, max_size=64), max_size=3)  # fmt: skip
url_text = st.characters(codec="utf-8")  # what a decoded URL path can hold


def mint_paths(
    dialect: Dialect, alphabet: st.SearchStrategy[str] = url_text
) -> st.SearchStrategy[tuple[Endpoint, str]]:
    """An endpoint of ``dialect`` and a path it matches (trailing slashes, any case where allowed)."""
    return st.sampled_from([e for e in dialect.endpoints if e.kind == "mint"]).flatmap(
        lambda e: st.tuples(st.just(e), st.from_regex(e.pattern, fullmatch=True, alphabet=alphabet))
    )


def check_refusal(dialect: Dialect, endpoint: Endpoint, params: dict[str, str], exc: GatewayError) -> None:
    response = dialect.render_error(exc)
    assert 400 <= response.status < 500, f"{type(exc).__name__}{exc.args} -> {response.status}"
    assert isinstance(response.body, bytes)
    template = described_template(dialect, endpoint, params)
    assert_conforms(endpoint.method, template, response.status, response.headers, response.body)


@pytest.mark.parametrize("name", list(DIALECTS))
@FUZZ
@given(data=st.data(), query=queries, headers=headers, cookies=cookies, body=bodies)
def test_parse_gives_a_command_or_a_4xx_in_the_dialects_shape(
    name: str, data: st.DataObject, query: Any, headers: Any, cookies: dict[str, str], body: bytes
) -> None:
    dialect, app = DIALECTS[name], APP_OF[name]
    endpoint, path = data.draw(mint_paths(dialect))
    matched = dialect.match(endpoint.method, path)
    assert matched is not None, path
    endpoint, params = matched
    request = HttpRequest(endpoint.method, path, query, headers, body, "198.51.100.7", endpoint, params)
    try:
        command = dialect.parse(request, app)
    except GatewayError as exc:
        check_refusal(dialect, endpoint, params, exc)
    else:
        assert isinstance(command, ImpersonationCommand)
        assert (command.app, command.dialect, command.client) == (app.name, name, "198.51.100.7")
        assert command.credential is None or isinstance(command.credential, str)


@pytest.mark.parametrize("name", list(DIALECTS))
@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE"]),
    path=st.sampled_from(["/", "/kyc", "/api/v2/user/login-with-token", "/routing/rate_table"])
    | st.text(alphabet=url_text, max_size=40).map(lambda p: "/" + p),
    query=queries,
    headers=headers,
    cookies=cookies,
    body=bodies,
)
def test_carriers_are_found_without_fail(
    name: str, method: str, path: str, query: Any, headers: Any, cookies: dict[str, str], body: bytes
) -> None:
    carriers = Carriers([(name, DIALECTS[name].carriers)])
    all_headers = CIMultiDict(headers)
    for cookie, value in cookies.items():
        all_headers.add("Cookie", f"{cookie}={value}")
    reads_body = carriers.body_app(method, path) is not None
    for found in carriers.find(urlencode(list(query.items())), all_headers, method, path, body if reads_body else None):
        assert isinstance(found.offer, Offer) and found.offer.app == name
        assert found.carrier in DIALECTS[name].carriers
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in found.offer.bound.items())
        # Only a grant-shaped value is offered, except on a body carrier's endpoint, where every request redeems.
        assert TOKEN_SHAPE.fullmatch(found.offer.token) or found.carrier.where is Where.BODY


# -- over the wire ----------------------------------------------------------------------------------------
# Header bytes the HTTP parser takes (it answers control characters with its own 400 before any handler).
HEADER_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
raw_header_values = st.one_of(
    st.binary(max_size=80).map(lambda b: bytes(c for c in b if c in HEADER_BYTES)),
    header_values.map(lambda v: v.encode("utf-8", "surrogateescape")).filter(
        lambda b: all(c in HEADER_BYTES for c in b)
    ),
)
# The HTTP parser refuses a second Content-Type (a singleton header) with its own 400, before any handler.
raw_headers = st.lists(
    st.tuples(st.sampled_from(HEADER_NAMES) | st.text(ALNUM + "-", min_size=1, max_size=12).map("X-{}".format),
              raw_header_values),
    max_size=6,
    unique_by=lambda pair: pair[0].lower() if pair[0].lower() == "content-type" else pair,
)  # fmt: skip


CREDENTIALS = {
    "activeplatform": [("X-Api-Token", b"vY5fwetestK3gJXZH5uHCw")],
    "denovolab": [("X-Auth-Token", b"denovolab-demo-admin-token")],
    "btcdirect": [("Authorization", b"Bearer btcdirect-partner-demo-token")],
}  # pyramid's travels in the body, where `objects` draws it


async def raw_request(
    host: str, port: int, method: str, target: str, headers: list[tuple[str, bytes]], body: bytes
) -> tuple[int, CIMultiDict[str], bytes]:
    """One request as raw bytes on a new connection; the answer's status, headers and (unchunked) body."""
    reader, writer = await asyncio.open_connection(host, port)
    head = f"{method} {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"".join(n.encode() + b": " + v + b"\r\n" for n, v in headers) + b"\r\n" + body)
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    return int(status_line.split(" ")[1]), CIMultiDict(line.split(": ", 1) for line in lines), payload


@pytest.fixture
async def wire(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], upstream: Upstream
) -> TestClient[Any, Any]:
    """The demo apps on fakeredis, with a small body limit and a failed-credential limit out of the way."""
    redis = fakeredis.FakeAsyncRedis()
    await Store(redis, "fuzz:").load_directory(parse_directory(DIRECTORY))
    config = make_config("fuzz:", upstream.url, DEMO_APPS, server={"body_limit_bytes": 256},
                         rate_limit={"failures": 1_000_000})  # fmt: skip
    return await aiohttp_client(create_app(config, redis=redis, key=KEY))


@pytest.mark.parametrize("name", list(DIALECTS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), headers=raw_headers, body=st.binary(max_size=300) | bodies)
async def test_any_bytes_over_the_wire_get_a_described_4xx(
    name: str, wire: TestClient[Any, Any], data: st.DataObject, headers: list[tuple[str, bytes]], body: bytes
) -> None:
    dialect = DIALECTS[name]
    endpoint, path = data.draw(mint_paths(dialect, url_text))
    assume(not {".", ".."} & set(path.split("/")))  # dot segments name another path
    query = data.draw(st.lists(st.tuples(st.sampled_from(QUERY_NAMES) | text, text | known), max_size=4))
    target = quote(path, safe="/") + ("?" + urlencode(query) if query else "")
    if data.draw(st.booleans()):  # half the time, a real actor's credential: into policy and look-ups
        headers = [*CREDENTIALS.get(name, []), *headers]
    status, answer_headers, payload = await raw_request(wire.host, wire.port, endpoint.method, target, headers, body)
    assert status < 500, (status, payload[:300])
    assert "chunked" not in answer_headers.get("Transfer-Encoding", ""), "a mint answer is never the app's"
    matched = dialect.match(endpoint.method, path)
    assert matched is not None
    template = described_template(dialect, *matched)
    assert_conforms(endpoint.method, template, status, answer_headers, payload)


GRANT_SHAPED = st.text(alphabet=ALNUM + "_-", min_size=22, max_size=64)
carrier_queries = st.lists(
    st.tuples(st.sampled_from(["token", "user_token", "user_email", "uuid", "impersonation_confirm"]) | text,
              text | known | GRANT_SHAPED),
    max_size=4,
)  # fmt: skip
carrier_headers = st.lists(
    st.tuples(st.sampled_from(["Cookie", "X-Auth-Token", "Content-Type", "X-Impersonation-Assertion"]),
              st.one_of(GRANT_SHAPED.map(lambda t: f"PyramidAuth={t}"), GRANT_SHAPED,
                        st.sampled_from(["application/x-www-form-urlencoded", "application/json"]))
              .map(str.encode) | raw_header_values),
    max_size=4,
    unique_by=lambda pair: pair[0].lower() if pair[0].lower() == "content-type" else pair,
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]),
    path=st.sampled_from(["/", "/kyc", "/routing/rate_table", "/api/v2/user/login-with-token", "/cdr"])
    | st.text(alphabet=url_text, max_size=30).map(lambda p: "/" + p),
    query=carrier_queries,
    headers=carrier_headers,
    body=bodies | st.builds(lambda q: urlencode(q).encode(), carrier_queries),
)
async def test_redemption_attempts_over_the_wire_never_fail(
    wire: TestClient[Any, Any], method: str, path: str, query: list[tuple[str, str]],
    headers: list[tuple[str, bytes]], body: bytes,
) -> None:  # fmt: skip
    """Carriers (or what looks like them) on any path: a refusal, a confirmation page or the app's own answer."""
    assume(not {".", ".."} & set(path.split("/")))
    target = quote(path, safe="/") + ("?" + urlencode(query) if query else "")
    status, _, payload = await raw_request(wire.host, wire.port, method, target, headers, body)
    assert status < 500, (status, payload[:300])
