"""BTC Direct: the seed's login-token answer, every ER code path, system/info, and both redemption carriers."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import fakeredis
import orjson
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.app import create_app
from gateway.config import AppConfig
from gateway.dialects import HttpRequest
from gateway.dialects.btcdirect import CATALOGUE, dialect
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
from tests.conftest import KEY, PUBLIC_URL, GatewayFactory, Upstream, make_config

JSON = "application/json"
LOGIN_TOKEN = "/api/v1/user/login-token"
LOGIN_WITH_TOKEN = "/api/v2/user/login-with-token"
PARTNER = "partner-1-bearer-token-7QxZ"
API_KEY = "partner-2-api-key-9KdW"
UUID_1 = "45b9313b-fa47-4786-baf1-62969dec31f2"
UUID_2 = "0f6b8c2e-3d1a-4c5b-9e7f-a1b2c3d4e5f6"
ID_1 = "a1B2c3D4e5F6a7B8c9D0e1F2a3B4c5D6e7F8a9B0"  # 40 alphanumeric characters
ID_2_SHORTEST = "0123456789" * 3 + "abcdef"  # 36
ID_2_LONGEST = "x" * 255
USER_1_TOKEN = "user-1-own-token"
USER_2_TOKEN = "user-2-own-token"

DIRECTORY: dict[str, Any] = {
    "apps": {
        "exchange": {
            "principals": [
                {"id": "partner-1", "token": PARTNER, "role": "partner"},
                {"id": "partner-2", "token": API_KEY, "role": "partner"},
                {"id": "viewer-1", "token": "viewer-1-token", "role": "viewer"},
            ],
            "subjects": [
                {"id": "u-1", "uuid": UUID_1, "identifiers": [ID_1], "token": USER_1_TOKEN, "email": "a@example.com"},
                {
                    "id": "u-2",
                    "uuid": UUID_2,
                    "identifiers": [ID_2_SHORTEST, ID_2_LONGEST],
                    "token": USER_2_TOKEN,
                    "email": "b@example.com",
                },
                {"id": "u-3", "identifiers": ["n" * 40], "email": "c@example.com"},  # no uuid
            ],
        }
    }
}
SCANNER_SAFE = {"exchange": {"dialect": "btcdirect"}}
REDEEM_ON_GET = {"exchange": {"dialect": "btcdirect", "redeem_on_get": True}}

# The seed page's codes, messages and solutions, word for word.
SEED = {
    "ER700": ("User authorization token not found.", "Provide a user authorization token."),
    "ER701": ("User authorization token has expired.", "Request a new authorization token, or refresh the token."),
    "ER702": ("User authorization token is invalid.", "Provide a valid user authorization token."),
    "ER703": (
        "User identifier does not belong to the user in the user authorization token.",
        "Provide a valid user identifier, or remove the user identifier header.",
    ),
    "ER704": (
        "No user identifier found in headers.",
        "Provide a valid user identifier, or use the user/password authentication mechanism to request a user "
        "token and send that.",
    ),
    "ER705": (
        "User identifier is not linked to a user.",
        "Provide a valid user identifier, link this user identifier to a user account, or use the user/password "
        "authentication mechanism.",
    ),
    "ER706": (
        "User identifier is invalid.",
        "Provide a valid user identifier, a unique identifier string for the user account that is not already in use.",
    ),
    "ER707": (
        "User identifier is invalid.",
        "Please provide an identifier, consisting of 36 - 255 characters, numeric or alphanumeric only.",
    ),
    "ER708": ("There is a pending document for this side.", "Wait for the pending document to be reviewed."),
    "ER709": ("User not found, or user has been deleted.", "Provide a valid user identifier."),
    "ER800": ("Authorization token is invalid.", "Provide a valid authorization token."),
    "ER801": ("Authorization token has expired.", "Request a new authorization token."),
    "ER802": ("Authorization token not found.", "Provide an authorization token."),
    "ER803": ("Multiple authorization methods used.", "Use exactly one authorization method."),
    "ER805": ("API key is invalid.", "Provide a valid API key."),
    "ER806": ("API key not found.", "Provide an API key."),
    "ER999": ("A general error has occurred. Please contact our support team.", "Contact our support team."),
}


def error_body(code: str) -> dict[str, Any]:
    entry = CATALOGUE[code]
    return {"errors": {code: {"code": code, "message": entry.message, "solution": entry.solution}}}


async def mint(client: TestClient[Any, Any], *headers: tuple[str, str], path: str = LOGIN_TOKEN) -> Any:
    return await client.get(path, headers=CIMultiDict(headers))


async def minted(client: TestClient[Any, Any], *headers: tuple[str, str]) -> dict[str, str]:
    response = await mint(client, ("Authorization", f"Bearer {PARTNER}"), *headers)
    assert response.status == 200
    body: dict[str, str] = await response.json()
    return body


async def assert_error(response: Any, code: str, status: int = 400) -> None:
    assert response.status == status
    assert response.headers["Content-Type"] == JSON
    assert await response.json() == error_body(code)


def test_catalogue_holds_every_seed_code_verbatim() -> None:
    for code, (message, solution) in SEED.items():
        entry = CATALOGUE[code]
        assert (entry.message, entry.solution) == (message, solution)
        assert entry.status == (500 if code == "ER999" else 400)
    assert set(CATALOGUE) - set(SEED) == {f"ER{n}" for n in range(920, 929)}
    assert (CATALOGUE["ER920"].status, CATALOGUE["ER921"].status) == (429, 413)


# -- minting ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "uuid", "path"),
    [
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", ID_1)), UUID_1, LOGIN_TOKEN),
        ((("X-Api-Key", API_KEY), ("User-Authorization", f"Bearer {USER_1_TOKEN}")), UUID_1, LOGIN_TOKEN),
        (
            (
                ("Authorization", f"bearer {PARTNER}"),
                ("User-Identifier", ID_1),
                ("User-Authorization", f"Bearer {USER_1_TOKEN}"),
            ),
            UUID_1,
            LOGIN_TOKEN + "/",
        ),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", ID_2_SHORTEST)), UUID_2, LOGIN_TOKEN),
        ((("X-Api-Key", API_KEY), ("User-Identifier", ID_2_LONGEST)), UUID_2, LOGIN_TOKEN),
    ],
)
async def test_login_token_answers_uuid_token_and_expiry(
    gateway: GatewayFactory, headers: tuple[tuple[str, str], ...], uuid: str, path: str
) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY)
    before = time.time()
    response = await mint(client, *headers, path=path)
    assert response.status == 200
    assert response.headers["Content-Type"] == JSON
    body = await response.json()
    assert list(body) == ["uuid", "token", "expiryDate"]
    assert body["uuid"] == uuid
    assert isinstance(body["token"], str) and len(body["token"]) >= 22  # 128+ bits, base64url
    expiry = datetime.strptime(body["expiryDate"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    assert len(body["expiryDate"]) == 20  # 2019-06-06T16:16:16Z: UTC, no fraction
    assert before + 59 <= expiry <= time.time() + 61


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        # the partner
        ((("User-Identifier", ID_1),), "ER802"),
        ((("Authorization", "Bearer"), ("User-Identifier", ID_1)), "ER802"),
        ((("Authorization", ""), ("User-Identifier", ID_1)), "ER802"),
        ((("Authorization", "Bearer not-a-partner"), ("User-Identifier", ID_1)), "ER800"),
        ((("Authorization", f"Basic {PARTNER}"), ("User-Identifier", ID_1)), "ER800"),
        ((("Authorization", PARTNER), ("User-Identifier", ID_1)), "ER800"),  # no scheme
        ((("Authorization", "Bearer " + "A" * 4000), ("User-Identifier", ID_1)), "ER800"),
        ((("X-Api-Key", "not-a-key"), ("User-Identifier", ID_1)), "ER805"),
        ((("X-Api-Key", ""), ("User-Identifier", ID_1)), "ER806"),
        ((("Authorization", f"Bearer {PARTNER}"), ("X-Api-Key", API_KEY), ("User-Identifier", ID_1)), "ER803"),
        ((("X-Api-Key", API_KEY), ("X-Api-Key", API_KEY), ("User-Identifier", ID_1)), "ER803"),
        ((("Authorization", "Bearer viewer-1-token"), ("User-Identifier", ID_1)), "ER800"),  # role may not mint
        ((("User-Identifier", "too-short"),), "ER802"),  # partner errors come first
        # the user
        ((("Authorization", f"Bearer {PARTNER}"),), "ER704"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", "a" * 35)), "ER707"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", "a" * 256)), "ER707"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", "a" * 4000)), "ER707"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", ID_1[:-1] + "-")), "ER707"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", "")), "ER707"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", ID_1), ("User-Identifier", ID_1)), "ER707"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", "b" * 36)), "ER705"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", ID_1.lower())), "ER705"),  # exact match
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Authorization", "Bearer someone-else")), "ER702"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Authorization", USER_1_TOKEN)), "ER702"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Authorization", "Bearer")), "ER700"),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Authorization", "")), "ER700"),
        (
            (
                ("Authorization", f"Bearer {PARTNER}"),
                ("User-Identifier", ID_1),
                ("User-Authorization", f"Bearer {USER_2_TOKEN}"),
            ),
            "ER703",
        ),
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", "n" * 40)), "ER709"),  # subject has no uuid
    ],
)
async def test_login_token_errors(gateway: GatewayFactory, headers: tuple[tuple[str, str], ...], code: str) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY)
    await assert_error(await mint(client, *headers), code)


async def test_failed_credentials_are_rate_limited(gateway: GatewayFactory) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY, rate_limit={"failures": 2, "window_seconds": 60})
    for _ in range(2):
        await assert_error(await mint(client, ("Authorization", "Bearer guess"), ("User-Identifier", ID_1)), "ER800")
    response = await mint(client, ("Authorization", "Bearer guess"), ("User-Identifier", ID_1))
    await assert_error(response, "ER920", status=429)
    assert 1 <= int(response.headers["Retry-After"]) <= 60


async def test_oversized_bodies_are_413(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY, server={"body_limit_bytes": 1024})
    big = b"x" * 2048
    headers = {"Authorization": f"Bearer {PARTNER}", "User-Identifier": ID_1}
    await assert_error(await client.get(LOGIN_TOKEN, data=big, headers=headers), "ER921", status=413)
    response = await client.post(LOGIN_WITH_TOKEN, data=big, headers={"Content-Type": JSON})
    await assert_error(response, "ER921", status=413)
    assert upstream.requests == []


async def test_store_unavailable_is_503(aiohttp_client: Any, upstream: Upstream, prefix: str) -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server)
    await Store(redis, prefix).load_directory(parse_directory(DIRECTORY))
    client = await aiohttp_client(create_app(make_config(prefix, upstream.url, REDEEM_ON_GET), redis=redis, key=KEY))
    server.connected = False
    try:
        await assert_error(
            await mint(client, ("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", ID_1)), "ER999", 503
        )
        await assert_error(await client.get(f"/kyc?token={'A' * 32}&uuid={UUID_1}"), "ER999", 503)
    finally:
        server.connected = True
        await redis.aclose()
    assert upstream.requests == []


def _request(*headers: tuple[str, str]) -> HttpRequest:
    return HttpRequest(method="GET", path=LOGIN_TOKEN, headers=CIMultiDictProxy(CIMultiDict(headers)))


APP = AppConfig(name="exchange", dialect="btcdirect", upstream="http://upstream.invalid")


@pytest.mark.parametrize(
    ("headers", "credential", "credential_name", "identifier", "token"),
    [
        ((("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", ID_1)), PARTNER, "authorization", ID_1, None),
        (
            (("X-Api-Key", f" {API_KEY} "), ("User-Authorization", "Bearer ü-token")),
            API_KEY,
            "api_key",
            None,
            "ü-token",
        ),
        ((("Authorization", "Bearer ü"),), "ü", "authorization", None, None),
    ],
)
def test_parse_builds_the_command(
    headers: tuple[tuple[str, str], ...],
    credential: str,
    credential_name: str,
    identifier: str | None,
    token: str | None,
) -> None:
    command = dialect.parse(_request(*headers), APP)
    assert (command.app, command.dialect, command.credential, command.credential_name) == (
        "exchange",
        "btcdirect",
        credential,
        credential_name,
    )
    assert (command.target.identifier, command.target.token, command.target.id) == (identifier, token, None)
    assert command.bind == ("uuid",)


@pytest.mark.parametrize(
    "identifier",
    [
        "é" * 40,  # letters, but not ASCII alphanumerics
        "\uff11" * 40,  # fullwidth digits
        "a" * 39 + "\u0301",
        "a" * 20 + " " + "a" * 20,
        "a" * 39 + "\x00",
    ],
)
def test_parse_refuses_unicode_identifiers(identifier: str) -> None:
    with pytest.raises(Invalid) as caught:
        dialect.parse(_request(("Authorization", f"Bearer {PARTNER}"), ("User-Identifier", identifier)), APP)
    assert orjson.loads(dialect.render_error(caught.value).body) == error_body("ER707")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (Unauthenticated("missing", "authorization"), 400, "ER802"),
        (Unauthenticated("unknown", "authorization"), 400, "ER800"),
        (Unauthenticated("missing", "api_key"), 400, "ER806"),
        (Unauthenticated("unknown", "api_key"), 400, "ER805"),
        (Unauthenticated("ambiguous", "partner"), 400, "ER803"),
        (Forbidden("role"), 400, "ER800"),
        (Forbidden("scope"), 400, "ER800"),
        (Invalid("subject", "missing"), 400, "ER704"),
        (Invalid("identifier", "mismatch"), 400, "ER703"),
        (Invalid("user_identifier", "value"), 400, "ER707"),
        (Invalid("user_authorization", "missing"), 400, "ER700"),
        (Invalid("user_authorization", "value"), 400, "ER702"),
        (NotFound("subject", "identifier"), 400, "ER705"),
        (NotFound("subject", "token"), 400, "ER702"),
        (NotFound("subject", "id"), 400, "ER709"),
        (GrantRefused("reused"), 401, "ER702"),
        (PayloadTooLarge(65536), 413, "ER921"),
        (RateLimited(7), 429, "ER920"),
        (StoreUnavailable(), 503, "ER999"),
        (GatewayError(), 500, "ER999"),
    ],
)
def test_render_error_covers_every_gateway_error(error: GatewayError, status: int, code: str) -> None:
    response = dialect.render_error(error)
    assert response.status == status
    assert response.content_type == JSON
    assert orjson.loads(response.body) == error_body(code)  # type: ignore[arg-type]
    assert response.headers.get("Retry-After") == ("7" if isinstance(error, RateLimited) else None)


# -- system/info and redemption ---------------------------------------------------------------------------
async def test_system_info_lists_private_urls(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY)
    response = await client.get("/api/v1/system/info")
    assert response.status == 200
    assert response.headers["Content-Type"] == JSON
    assert await response.json() == {
        "privateUrls": {
            "kyc": f"{PUBLIC_URL}/kyc",
            "upgrade": f"{PUBLIC_URL}/upgrade",
            "support": f"{PUBLIC_URL}/support",
        }
    }
    assert upstream.requests == []


def private_path(url: str, body: dict[str, str], extra: str = "") -> str:
    assert url.startswith(PUBLIC_URL + "/")
    return f"{url[len(PUBLIC_URL) :]}?{extra}token={quote(body['token'])}&uuid={quote(body['uuid'])}"


async def test_private_url_redeems_once_with_an_assertion(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=REDEEM_ON_GET, directory=DIRECTORY)
    urls = (await (await client.get("/api/v1/system/info")).json())["privateUrls"]
    body = await minted(client, ("User-Identifier", ID_1))
    path = private_path(urls["kyc"], body, extra="lang=en&")

    assert (await client.head(path)).status == 200  # HEAD never consumes
    response = await client.get(path, headers={"X-Impersonation-Assertion": "forged"})
    assert response.status == 200
    assert response.headers["Location"] == "/dashboard"
    assert "app_session=s1" in response.headers["Set-Cookie"]
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query) == ("GET", "/kyc", {"lang": "en"})  # carrier stripped
    claims = upstream.claims(audience="exchange")
    assert claims["sub"] == "u-1" and claims["aud"] == "exchange"
    assert claims["act"] == {"sub": "partner-1", "role": "partner"}
    assert claims["email"] == "a@example.com" and claims["dialect"] == "btcdirect" and claims["jti"]

    await assert_error(await client.get(path), "ER702", 401)
    assert len(upstream.requests) == 1


async def test_query_carrier_uuid_must_match_and_a_miss_burns_the_grant(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    client = await gateway(apps=REDEEM_ON_GET, directory=DIRECTORY)
    body = await minted(client, ("User-Identifier", ID_1))
    wrong = await client.get(private_path(f"{PUBLIC_URL}/support", {**body, "uuid": UUID_2}))
    unknown = await client.get(private_path(f"{PUBLIC_URL}/support", {**body, "token": "A" * 32}))
    await assert_error(wrong, "ER702", 401)
    await assert_error(unknown, "ER702", 401)
    assert await wrong.read() == await unknown.read()  # no oracle
    await assert_error(await client.get(private_path(f"{PUBLIC_URL}/support", body)), "ER702", 401)
    assert upstream.requests == []


async def test_scanner_safe_link_needs_the_confirming_post(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY)
    body = await minted(client, ("User-Authorization", f"Bearer {USER_2_TOKEN}"))
    path = private_path(f"{PUBLIC_URL}/upgrade", body)

    page = await client.get(path)
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "impersonation_confirm" in await page.text()
    assert upstream.requests == []

    response = await client.post(path, data={"impersonation_confirm": "1"})
    assert response.status == 200
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query, seen.body) == ("GET", "/upgrade", {}, b"")
    assert upstream.claims(audience="exchange")["sub"] == "u-2"

    await assert_error(await client.post(path, data={"impersonation_confirm": "1"}), "ER702", 401)
    assert len(upstream.requests) == 1


async def test_login_with_token_redeems_once_and_strips_the_body(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY)
    body = await minted(client, ("User-Identifier", ID_1))
    payload = {"uuid": body["uuid"], "token": body["token"], "remember": True}

    response = await client.post(LOGIN_WITH_TOKEN, json=payload)
    assert response.status == 200
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query) == ("POST", LOGIN_WITH_TOKEN, {})
    assert orjson.loads(seen.body) == {"remember": True}
    assert body["token"] not in str(seen.headers)
    claims = upstream.claims(audience="exchange")
    assert (claims["sub"], claims["act"]["sub"], claims["dialect"]) == ("u-1", "partner-1", "btcdirect")

    await assert_error(await client.post(LOGIN_WITH_TOKEN, json=payload), "ER702", 401)
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{not json",
        b"[]",
        b'"token"',
        b"1",
        b"null",
        b'\xff\xfe{"token": "x"}',
        orjson.dumps({"uuid": UUID_1}),
        orjson.dumps({"uuid": UUID_1, "token": 123}),
        orjson.dumps({"uuid": UUID_1, "token": None}),
        orjson.dumps({"uuid": UUID_1, "token": ["a"]}),
        orjson.dumps({"uuid": UUID_1, "token": "A" * 20000}),
        orjson.dumps({"uuid": "ü" * 50, "token": "ü" * 50}),
        orjson.dumps({"uuid": UUID_1, "token": ""}),
    ],
)
async def test_login_with_token_bad_bodies_are_refused(gateway: GatewayFactory, upstream: Upstream, raw: bytes) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY)
    await assert_error(await client.post(LOGIN_WITH_TOKEN, data=raw, headers={"Content-Type": JSON}), "ER702", 401)
    assert upstream.requests == []


@pytest.mark.parametrize("uuid", [UUID_2, None, 42, ""])
async def test_login_with_token_wrong_uuid_burns_the_grant(
    gateway: GatewayFactory, upstream: Upstream, uuid: Any
) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY)
    body = await minted(client, ("User-Identifier", ID_1))
    payload = {"token": body["token"]} if uuid is None else {"token": body["token"], "uuid": uuid}
    await assert_error(await client.post(LOGIN_WITH_TOKEN, json=payload), "ER702", 401)
    await assert_error(await client.post(LOGIN_WITH_TOKEN, json={"uuid": UUID_1, "token": body["token"]}), "ER702", 401)
    assert upstream.requests == []


async def test_requests_without_a_carrier_pass_through(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=REDEEM_ON_GET, directory=DIRECTORY)
    assert (await client.get("/kyc?token=abc")).status == 200  # not a grant's shape: the app's own parameter
    assert (await client.get(f"/kyc?uuid={UUID_1}")).status == 200
    assert (await client.get(LOGIN_WITH_TOKEN)).status == 200  # only a POST there is a redemption
    assert [(r.method, r.path, r.query) for r in upstream.requests] == [
        ("GET", "/kyc", {"token": "abc"}),
        ("GET", "/kyc", {"uuid": UUID_1}),
        ("GET", LOGIN_WITH_TOKEN, {}),
    ]


async def test_a_grant_without_its_uuid_is_refused_and_spent(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=REDEEM_ON_GET, directory=DIRECTORY)
    body = await minted(client, ("User-Identifier", ID_1))
    await assert_error(await client.get(f"/kyc?token={body['token']}"), "ER702", 401)  # never to the app
    await assert_error(await client.get(f"/kyc?token={body['token']}&uuid={UUID_1}"), "ER702", 401)
    assert upstream.requests == []
