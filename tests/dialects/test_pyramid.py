"""Pyramid: the seed request, userIdentity matching, every error path, and redemption through each carrier."""

from __future__ import annotations

import re
from typing import Any

import fakeredis
import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.config import config_from_dict
from gateway.core import ImpersonationCommand
from gateway.dialects import HttpRequest
from gateway.dialects.pyramid import dialect
from gateway.directory import parse_directory
from gateway.errors import (
    Forbidden,
    GatewayError,
    GrantRefused,
    Invalid,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    StoreUnavailable,
    Unauthenticated,
)
from gateway.store import Store
from tests.conftest import KEY, GatewayFactory, Upstream, make_config

EA = "ea-token-Wq8s1Zr0"  # enterprise_admin
DA = "da-token-Kp3m9Lx2"  # domain_admin of sales.example.com
VIEWER = "viewer-token-Tn5b"  # a role that may not mint
APP = "analytics"
APPS: dict[str, Any] = {APP: {"dialect": "pyramid", "redeem_on_get": True}}
SCANNER_SAFE: dict[str, Any] = {APP: {"dialect": "pyramid"}}
DIRECTORY: dict[str, Any] = {
    "apps": {
        APP: {
            "principals": [
                {"id": "ea-1", "token": EA, "role": "enterprise_admin"},
                {"id": "da-1", "token": DA, "role": "domain_admin", "domain": "sales.example.com"},
                {"id": "viewer-1", "token": VIEWER, "role": "viewer"},
            ],
            "subjects": [
                {"id": "jdoe", "domain": "sales.example.com", "email": "jdoe@example.com"},
                {"id": "asmith", "domain": "hr.example.com", "email": "asmith@example.com"},
                # one e-mail in two domains: ambiguous without a domain
                {"id": "jsmith-sales", "domain": "sales.example.com", "email": "jsmith@example.com"},
                {"id": "jsmith-hr", "domain": "hr.example.com", "email": "jsmith@example.com"},
                {"id": "svc", "email": "svc@example.com"},  # in no domain
            ],
        }
    }
}

API3 = "/API3/authentication/authenticateUserByToken"
API2 = "/API2/auth/authenticateUserByToken"
SEED_HEADERS = {"Accept": "text/plain,text/plain;charset=utf-8", "Content-Type": "application/json"}
TEXT = "text/plain; charset=utf-8"
GRANT = re.compile(r"[A-Za-z0-9_-]{32}")  # 24 random bytes, base64url


async def start(gateway: GatewayFactory, apps: dict[str, Any] = APPS, **sections: Any) -> TestClient[Any, Any]:
    return await gateway(apps=apps, directory=DIRECTORY, **sections)


async def mint(client: TestClient[Any, Any], fields: Any = None, *, path: str = API3, raw: bytes | None = None) -> Any:
    """POST ``fields`` (wrapped in ``data`` on API2) or the ``raw`` body to a mint endpoint."""
    if raw is None:
        raw = orjson.dumps({"data": fields} if path == API2 else fields)
    return await client.post(path, data=raw, headers=SEED_HEADERS)


async def grant_for(client: TestClient[Any, Any], **fields: Any) -> str:
    response = await mint(client, {"token": EA, **fields})
    assert response.status == 200, await response.text()
    return str(await response.text())


# -- minting ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [API3, API2, API3.lower(), API3 + "/"])
async def test_seed_request_answers_a_bare_base64_grant(gateway: GatewayFactory, path: str) -> None:
    client = await start(gateway)
    fields = {"domain": "sales.example.com", "customData": "customData", "userIdentity": "jdoe", "token": EA}
    response = await mint(client, fields, path=path)
    assert response.status == 200
    assert response.headers["Content-Type"] == TEXT
    assert response.headers["Cache-Control"] == "no-store"
    assert GRANT.fullmatch(await response.text())  # no JSON quoting, no newline


@pytest.mark.parametrize(
    ("token", "identity", "domain", "subject"),
    [
        (EA, "jdoe", None, "jdoe"),
        (EA, "  JDoe ", "", "jdoe"),  # case-insensitive, trimmed; an empty domain is no domain
        (EA, "jdoe@example.com", None, "jdoe"),  # UPN = the subject's e-mail
        (EA, "JDOE@EXAMPLE.COM", "sales", "jdoe"),
        (EA, "SALES\\jdoe", None, "jdoe"),  # DOMAIN\user: the first label of the domain
        (EA, "sales.example.com\\jdoe", None, "jdoe"),
        (EA, "sales\\jdoe", "sales.example.com", "jdoe"),  # prefix and domain agree
        (EA, "jsmith@example.com", "hr", "jsmith-hr"),  # the domain narrows an ambiguous e-mail
        (EA, "jsmith@example.com", "sales.example.com", "jsmith-sales"),
        (EA, "HR\\jsmith@example.com", None, "jsmith-hr"),
        (EA, "asmith", None, "asmith"),  # enterprise_admin: any domain
        (EA, "svc", None, "svc"),  # ... and subjects in none
        (DA, "jdoe", None, "jdoe"),  # domain_admin: its own domain
        (DA, "jsmith@example.com", "sales", "jsmith-sales"),
    ],
)
async def test_user_identity_forms_resolve_the_subject(
    gateway: GatewayFactory, upstream: Upstream, token: str, identity: str, domain: str | None, subject: str
) -> None:
    client = await start(gateway)
    response = await mint(client, {"token": token, "userIdentity": identity, "domain": domain})
    assert response.status == 200, await response.text()
    assert (await client.get("/", params={"token": await response.text()})).status == 200
    claims = upstream.claims(audience=APP)
    assert claims["sub"] == subject
    actor = {"sub": "ea-1", "role": "enterprise_admin"} if token == EA else {"sub": "da-1", "role": "domain_admin"}
    assert claims["act"] == actor


async def test_upn_names_the_user_id_in_its_domain(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await start(gateway)
    token = await grant_for(client, userIdentity="jdoe@sales.example.com")
    assert (await client.get("/", params={"token": token})).status == 200
    assert upstream.claims(audience=APP)["sub"] == "jdoe"


BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    # (endpoint, body (bytes are sent raw), status, exact text)
    (API3, b"", 400, "Request body is empty"),
    (API3, b"  \n", 400, "Request body is empty"),
    (API3, b"{", 400, "Request body is not a JSON object"),
    (API3, b"{'token': 'x'}", 400, "Request body is not a JSON object"),
    (API3, b"[]", 400, "Request body is not a JSON object"),
    (API3, b'"jdoe"', 400, "Request body is not a JSON object"),
    (API3, b"null", 400, "Request body is not a JSON object"),
    (API3, b"\xff\xfe{}", 400, "Request body is not a JSON object"),
    (API3, b'{"token": "x", "userIdentity": "\\ud800"}', 400, "Request body is not a JSON object"),
    (API3, {"token": EA}, 400, "Missing userIdentity"),
    (API3, {"token": EA, "userIdentity": None}, 400, "Missing userIdentity"),
    (API3, {"token": EA, "userIdentity": "   "}, 400, "Missing userIdentity"),
    (API3, {"token": EA, "userIdentity": 5}, 400, "userIdentity must be a string"),
    (API3, {"token": EA, "userIdentity": ["jdoe"]}, 400, "userIdentity must be a string"),
    (API3, {"token": 123, "userIdentity": "jdoe"}, 400, "token must be a string"),
    (API3, {"token": EA, "userIdentity": "jdoe", "domain": []}, 400, "domain must be a string"),
    (API3, {"token": EA, "userIdentity": "jdoe", "domain": True}, 400, "domain must be a string"),
    (API3, {"token": EA, "userIdentity": "jdoe", "customData": {"a": 1}}, 400, "customData must be a string"),
    (API3, {"token": EA, "userIdentity": "j" * 513}, 400, "Invalid userIdentity"),
    (API3, {"token": EA, "userIdentity": "jdoe", "domain": "d" * 256}, 400, "Invalid domain"),
    (
        API3,
        {"token": EA, "userIdentity": "jdoe", "customData": "c" * 1025},
        400,
        "customData must be 1024 bytes at most",
    ),
    (
        API3,
        {"token": EA, "userIdentity": "jdoe", "customData": "\u00e9" * 513},
        400,
        "customData must be 1024 bytes at most",
    ),
    (API3, {"token": EA, "userIdentity": "\\jdoe"}, 400, "Invalid userIdentity"),
    (API3, {"token": EA, "userIdentity": "SALES\\"}, 400, "Invalid userIdentity"),
    (
        API3,
        {"token": EA, "userIdentity": "HR\\jdoe", "domain": "sales.example.com"},
        400,
        "domain does not match the domain in userIdentity",
    ),
    (API3, {"token": EA, "userIdentity": "nobody"}, 400, "Unknown user"),
    (API3, {"token": EA, "userIdentity": "j\u00f6hn \U0001f600 \u202e"}, 400, "Unknown user"),
    (API3, {"token": EA, "userIdentity": "jdoe", "domain": "hr"}, 400, "Unknown user"),
    (API3, {"token": EA, "userIdentity": "HR\\jdoe"}, 400, "Unknown user"),
    (API3, {"token": EA, "userIdentity": "jdoe@hr.example.com"}, 400, "Unknown user"),  # jdoe is in sales
    (
        API3,
        {"token": EA, "userIdentity": "jsmith@example.com"},
        400,
        "userIdentity matches more than one user; give the domain",
    ),
    (API3, {"userIdentity": "jdoe"}, 401, "Missing admin token"),
    (API3, {"token": None, "userIdentity": "jdoe"}, 401, "Missing admin token"),
    (API3, {"token": "  ", "userIdentity": "jdoe"}, 401, "Missing admin token"),
    (API3, {"token": "not-a-token", "userIdentity": "jdoe"}, 401, "Invalid admin token"),
    (API3, {"token": "t" * 10_000, "userIdentity": "jdoe"}, 401, "Invalid admin token"),
    (API3, {"token": EA.upper(), "userIdentity": "jdoe"}, 401, "Invalid admin token"),
    (API3, {"token": VIEWER, "userIdentity": "jdoe"}, 403, "Not allowed: this admin cannot log in as users"),
    (API3, {"token": DA, "userIdentity": "asmith"}, 403, "Not allowed: the user is outside this admin's domain"),
    (
        API3,
        {"token": DA, "userIdentity": "HR\\jsmith@example.com"},
        403,
        "Not allowed: the user is outside this admin's domain",
    ),
    (API3, {"token": DA, "userIdentity": "svc"}, 403, "Not allowed: the user is outside this admin's domain"),
    (API2, b'{"token": "' + EA.encode() + b'", "userIdentity": "jdoe"}', 400, "Missing data"),
    (API2, b'{"data": null}', 400, "Missing data"),
    (API2, b'{"data": "jdoe"}', 400, "data must be an object"),
    (API2, b'{"data": []}', 400, "data must be an object"),
    (API2, b"[{}]", 400, "Request body is not a JSON object"),
    (API2, {"token": EA}, 400, "Missing userIdentity"),
    (API2, {"token": EA, "userIdentity": 1.5}, 400, "userIdentity must be a string"),
    (API2, {"token": "nope", "userIdentity": "jdoe"}, 401, "Invalid admin token"),
    (API2, {"token": DA, "userIdentity": "asmith"}, 403, "Not allowed: the user is outside this admin's domain"),
]


@pytest.mark.parametrize(("path", "body", "status", "text"), BAD_REQUESTS)
async def test_errors_are_short_plain_text(
    gateway: GatewayFactory, upstream: Upstream, path: str, body: Any, status: int, text: str
) -> None:
    client = await start(gateway)
    response = await mint(client, body, path=path, raw=body if isinstance(body, bytes) else None)
    assert (response.status, await response.text()) == (status, text)
    assert response.headers["Content-Type"] == TEXT
    assert upstream.requests == []


async def test_oversized_body_is_413(gateway: GatewayFactory) -> None:
    client = await start(gateway, server={"body_limit_bytes": 1024})
    response = await mint(client, {"token": EA, "userIdentity": "jdoe", "customData": "x" * 2000})
    assert (response.status, await response.text()) == (413, "Request body is larger than 1024 bytes")
    assert response.headers["Content-Type"] == TEXT


async def test_repeated_bad_tokens_are_rate_limited(gateway: GatewayFactory) -> None:
    client = await start(gateway, rate_limit={"failures": 2, "window_seconds": 60})
    for _ in range(2):
        assert (await mint(client, {"token": "guess", "userIdentity": "jdoe"})).status == 401
    response = await mint(client, {"token": EA, "userIdentity": "jdoe"})  # same client address
    assert response.status == 429
    assert response.headers["Content-Type"] == TEXT
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert await response.text() == f"Too many failed attempts; retry in {response.headers['Retry-After']} s"


async def test_store_outage_is_503(aiohttp_client: Any, upstream: Upstream, prefix: str) -> None:
    server = fakeredis.FakeServer()  # a Redis of this test's own, to take away
    redis = fakeredis.FakeAsyncRedis(server=server)
    await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
    client = await aiohttp_client(create_app(make_config(prefix, upstream.url, APPS), redis=redis, key=KEY))
    token = await grant_for(client, userIdentity="jdoe")
    server.connected = False  # from here every command fails with a connection error
    for response in (await mint(client, {"token": EA, "userIdentity": "jdoe"}), await client.get(f"/?token={token}")):
        assert (response.status, await response.text()) == (503, "Service unavailable")
        assert response.headers["Content-Type"] == TEXT
    assert upstream.requests == []
    await redis.aclose()


@pytest.mark.parametrize(
    ("error", "status", "text"),
    [
        (Invalid("userIdentity"), 400, "Missing userIdentity"),
        (Invalid("token", "type"), 400, "token must be a string"),
        (Invalid("userIdentity", "value"), 400, "Invalid userIdentity"),
        (Invalid("identity", "ambiguous"), 400, "userIdentity matches more than one user; give the domain"),
        (NotFound("subject", "identity"), 400, "Unknown user"),
        (Unauthenticated("missing", "token"), 401, "Missing admin token"),
        (Unauthenticated("unknown", "token"), 401, "Invalid admin token"),
        (Forbidden("role"), 403, "Not allowed: this admin cannot log in as users"),
        (Forbidden("scope"), 403, "Not allowed: the user is outside this admin's domain"),
        (GrantRefused("reused"), 401, "Invalid or expired token"),
        (PayloadTooLarge(65536), 413, "Request body is larger than 65536 bytes"),
        (RateLimited(7), 429, "Too many failed attempts; retry in 7 s"),
        (StoreUnavailable(), 503, "Service unavailable"),
        (GatewayError(), 500, "Internal server error"),
    ],
)
def test_every_error_renders_as_plain_text(error: GatewayError, status: int, text: str) -> None:
    response = dialect.render_error(error)
    assert (response.status, response.text, response.content_type, response.charset) == (
        status,
        text,
        "text/plain",
        "utf-8",
    )
    assert response.headers.get("Retry-After") == ("7" if isinstance(error, RateLimited) else None)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=600),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_APP = config_from_dict({"apps": {APP: {"dialect": "pyramid", "upstream": "http://upstream.invalid"}}}).app(APP)


@settings(max_examples=200, deadline=None)
@given(
    wrapped=st.booleans(),
    body=st.dictionaries(
        st.sampled_from(["token", "userIdentity", "domain", "customData", "data", "other"]), JSON_VALUES, max_size=5
    ),
)
def test_any_json_body_parses_or_is_invalid(wrapped: bool, body: dict[str, Any]) -> None:
    path = API2 if wrapped else API3
    matched = dialect.match("POST", path)
    assert matched is not None
    request = HttpRequest("POST", path, body=orjson.dumps({"data": body} if wrapped else body), params=matched[1])
    try:
        command = dialect.parse(request, _APP)
    except Invalid as exc:
        assert dialect.render_error(exc).status == 400
        return
    assert isinstance(command, ImpersonationCommand) and command.target.identity
    assert command.credential is None or isinstance(command.credential, str)


# -- redemption ---------------------------------------------------------------------------------------
def expired(response: Any, cookie: str) -> bool:
    """Whether ``response`` tells the browser to drop ``cookie``."""
    return any(
        value.startswith(f"{cookie}=") and "Max-Age=0" in value for value in response.headers.getall("Set-Cookie", [])
    )


@pytest.mark.parametrize("carrier", ["token", "PyramidAuth", "PyramidEmbeddedAuth"])
async def test_redemption_reaches_upstream_once_without_the_carrier(
    gateway: GatewayFactory, upstream: Upstream, carrier: str
) -> None:
    client = await start(gateway)
    token = await grant_for(client, userIdentity="jdoe", customData='{"tenant": 42, "lang": "fr"} \u2713')
    if carrier == "token":
        path, headers = f"/reports/sales?token={token}&tab=1", {"Cookie": "theme=dark"}
    else:
        path, headers = "/reports/sales?tab=1", {"Cookie": f"theme=dark; {carrier}={token}"}
    headers["X-Impersonation-Assertion"] = "forged"

    response = await client.get(path, headers=headers)
    assert response.status == 200
    assert "app_session=s1" in response.headers.getall("Set-Cookie")[0]
    assert response.headers["Location"] == "/dashboard"
    assert expired(response, carrier) is (carrier != "token")
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query) == ("GET", "/reports/sales", {"tab": "1"})
    assert seen.headers["Cookie"] == "theme=dark"
    assert token not in str(seen.headers)
    claims = upstream.claims(audience=APP)
    assert claims["sub"] == "jdoe" and claims["aud"] == APP and claims["email"] == "jdoe@example.com"
    assert claims["act"] == {"sub": "ea-1", "role": "enterprise_admin"}
    assert claims["dialect"] == "pyramid" and claims["jti"]
    assert claims["custom_data"] == '{"tenant": 42, "lang": "fr"} \u2713'

    again = await client.get(path, headers=headers)
    assert (again.status, await again.text()) == (401, "Invalid or expired token")
    assert again.headers["Content-Type"] == TEXT
    assert expired(again, carrier) is (carrier != "token")
    assert len(upstream.requests) == 1


async def test_no_custom_data_means_no_claim(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await start(gateway)
    token = await grant_for(client, userIdentity="jdoe", customData="")
    assert (await client.get(f"/?token={token}")).status == 200
    assert "custom_data" not in upstream.claims(audience=APP)


async def test_unknown_query_token_is_refused(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await start(gateway)
    response = await client.get("/?token=" + "A" * 32)
    assert (response.status, await response.text()) == (401, "Invalid or expired token")
    assert response.headers["Content-Type"] == TEXT
    assert upstream.requests == []


@pytest.mark.parametrize("value", ["A" * 32, "app.session.of-its-own", "x"])
async def test_app_own_pyramid_cookie_passes_through(gateway: GatewayFactory, upstream: Upstream, value: str) -> None:
    """Once signed in the app keeps its own session in PyramidAuth: a cookie holding no grant is not a redemption."""
    client = await start(gateway)
    response = await client.get("/home", headers={"Cookie": f"PyramidAuth={value}"})
    assert response.status == 200
    assert not expired(response, "PyramidAuth")
    (seen,) = upstream.requests
    assert seen.headers["Cookie"] == f"PyramidAuth={value}"
    assert "X-Impersonation-Assertion" not in seen.headers


async def test_scanner_safe_link_waits_for_the_browser(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await start(gateway, apps=SCANNER_SAFE)
    token = await grant_for(client, userIdentity="SALES\\jdoe")
    link = f"/reports?token={token}"
    for method in ("HEAD", "GET"):  # a link scanner or preview: nothing consumed
        page = await client.request(method, link)
        assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert upstream.requests == []

    confirmed = await client.post(link, data={"impersonation_confirm": "1"})
    assert confirmed.status == 200
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query, seen.body) == ("GET", "/reports", {}, b"")
    assert upstream.claims(audience=APP)["sub"] == "jdoe"

    again = await client.post(link, data={"impersonation_confirm": "1"})
    assert (again.status, await again.text()) == (401, "Invalid or expired token")
    assert len(upstream.requests) == 1


async def test_another_method_on_the_mint_path_is_refused_and_never_reaches_the_app(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    client = await start(gateway)
    for method in ("GET", "HEAD", "PUT", "OPTIONS"):  # a GET with a body must not carry the admin token to the app
        response = await client.request(method, API3, data=b'{"token": "' + EA.encode() + b'"}')
        assert (response.status, response.headers["Allow"]) == (405, "POST")
        if method != "HEAD":
            assert response.content_type == "text/plain"
            assert await response.text() == "Method not allowed; use POST"
    assert upstream.requests == []
