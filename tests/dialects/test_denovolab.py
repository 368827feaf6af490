"""Denovolab: the seed request, every error shape, and redemption of both grants through both carriers."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.dialects.denovolab import dialect
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
from tests.conftest import GatewayFactory, Upstream

ADMIN_TOKEN = "dn-admin-token-Kq3"
VIEWER_TOKEN = "dn-viewer-token-7Ls"
PASSWD = "$2a$12$.vfsbhghghjfgfghdfdghhh7iyoz/euRq6r6"
STORED_CDR_TOKEN = "eHC0hakjsdhjhjqeweqweq32njkasdjSSt"
NESTED_KEY = "nested-api-key-Zt9"
CLIENT_OWN_TOKEN = "client-41-own-token"
SECRETS = (ADMIN_TOKEN, VIEWER_TOKEN, PASSWD, STORED_CDR_TOKEN, NESTED_KEY, CLIENT_OWN_TOKEN)

DIRECTORY: dict[str, Any] = {
    "apps": {
        "switch": {
            "principals": [
                {"id": "admin-1", "token": ADMIN_TOKEN, "role": "admin"},
                {"id": "viewer-1", "token": VIEWER_TOKEN, "role": "viewer"},
            ],
            "subjects": [
                {
                    "id": "41",
                    "email": "dn@example.com",
                    "name": "DN Nguyen",
                    "token": CLIENT_OWN_TOKEN,
                    "attributes": {
                        "landing_page": "/routing/rate_table",
                        "first_name": "DN",
                        "last_name": "nguyen",
                        "passwd": PASSWD,
                        "cdr_api_token": STORED_CDR_TOKEN,
                        "client_limits": [{"client_id": 2916}, {"client_id": 2917}],
                        "settings": {"theme": "dark", "api_key": NESTED_KEY},
                    },
                },
                {"id": "42", "email": "ops@example.com"},
            ],
        }
    }
}
APPS: dict[str, Any] = {"switch": {"dialect": "denovolab", "redeem_on_get": True}}
SCANNER_SAFE: dict[str, Any] = {"switch": {"dialect": "denovolab"}}

USER_41 = {
    "client_id": 41,
    "email": "dn@example.com",
    "name": "DN Nguyen",
    "fullname": "DN Nguyen",
    "landing_page": "/routing/rate_table",
    "first_name": "DN",
    "last_name": "nguyen",
    "client_limits": [{"client_id": 2916}, {"client_id": 2917}],
    "settings": {"theme": "dark"},
}
PATH = "/v1/auth/as_client"
# The seed's curl -d sends the JSON with curl's default form content type.
SEED_BODY = b'{ "client_id": "41"}'
SEED_HEADERS = {"accept": "application/json", "X-Auth-Token": ADMIN_TOKEN}


def validation(field: str, message: str) -> dict[str, Any]:
    return {"error_type": "validation_error", "success": False, "errors": [{field: [message]}]}


def unauthenticated(message: str, code: int, reason: str) -> dict[str, Any]:
    return {
        "error_type": "unauthenticated_error",
        "success": False,
        "error": {"message": message, "code": code, "reason": reason},
    }


NOT_PROVIDED = unauthenticated("No header X-Auth-Token present", 110, "auth_token_not_provided")
INVALID_TOKEN = unauthenticated("Invalid X-Auth-Token", 111, "auth_token_invalid")
GRANT_REFUSED = unauthenticated("The login token is invalid or has expired", 112, "login_token_invalid")
NOT_FOUND = {"error_type": "Object not found error", "success": False}


async def mint(client: TestClient[Any, Any], body: bytes = SEED_BODY, headers: dict[str, str] | None = None) -> Any:
    headers = SEED_HEADERS if headers is None else headers
    return await client.post(PATH, data=body, headers={"Content-Type": "application/x-www-form-urlencoded", **headers})


async def minted(client: TestClient[Any, Any]) -> dict[str, Any]:
    response = await mint(client)
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def assert_json(response: Any, status: int, body: Any) -> None:
    assert response.status == status
    assert response.headers["Content-Type"] == "application/json"
    assert orjson.loads(await response.read()) == body


# -- minting ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body", [SEED_BODY, b'{"client_id": 41}', b'{"client_id": "041"}', b'{"client_id": 41.0, "x": 1}']
)
async def test_seed_request_mints_two_grants(gateway: GatewayFactory, body: bytes) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    before = int(time.time())
    response = await mint(client, body)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    data = await response.json()
    assert list(data) == ["success", "payload", "token", "cdr_api_token"]
    assert data["success"] is True
    payload = data["payload"]
    assert list(payload) == ["user", "token", "cdr_api_token", "cdr_api_token_expiration"]
    assert payload["user"] == USER_41
    assert payload["token"] == data["token"] and payload["cdr_api_token"] == data["cdr_api_token"]
    assert data["token"] != data["cdr_api_token"]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", data[k]) for k in ("token", "cdr_api_token"))
    expiration = payload["cdr_api_token_expiration"]
    assert isinstance(expiration, str) and before + 60 <= int(expiration) <= int(time.time()) + 60


def walk(value: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) in a JSON document; list items share their list's path."""
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in [((*path, k), v), *walk(v, (*path, k))]]
    if isinstance(value, list):
        return [item for v in value for item in walk(v, path)]
    return []


async def test_response_never_holds_a_credential_or_hash(gateway: GatewayFactory) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    response = await mint(client)
    raw = (await response.read()).decode()
    issued = {
        ("token",),
        ("cdr_api_token",),
        ("payload", "token"),
        ("payload", "cdr_api_token"),
        ("payload", "cdr_api_token_expiration"),
    }
    for path, _ in walk(orjson.loads(raw)):
        if path not in issued:
            assert not re.search(r"pass|pwd|secret|token|credential|hash|api_?key", path[-1], re.I), path
    for secret in SECRETS:
        assert secret not in raw
        assert hashlib.sha256(secret.encode()).hexdigest()[:16] not in raw


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", validation("client_id", "Missing data for required field.")),
        (b"  \n", validation("client_id", "Missing data for required field.")),
        (b"{}", validation("client_id", "Missing data for required field.")),
        (b'{"clientId": 41}', validation("client_id", "Missing data for required field.")),
        (b'{"client_id": null}', validation("client_id", "Field may not be null.")),
        (b'{"client_id": "abc"}', validation("client_id", "Not a valid integer.")),
        (b'{"client_id": ""}', validation("client_id", "Not a valid integer.")),
        (b'{"client_id": "4 1"}', validation("client_id", "Not a valid integer.")),
        (b'{"client_id": "41.0"}', validation("client_id", "Not a valid integer.")),
        ('{"client_id": "٤١"}'.encode(), validation("client_id", "Not a valid integer.")),  # Arabic-Indic digits
        (b'{"client_id": true}', validation("client_id", "Not a valid integer.")),
        (b'{"client_id": 41.5}', validation("client_id", "Not a valid integer.")),
        (b'{"client_id": [41]}', validation("client_id", "Not a valid integer.")),
        (b'{"client_id": {"id": 41}}', validation("client_id", "Not a valid integer.")),
        (b'{"client_id": 9223372036854775808}', validation("client_id", "Number too large.")),
        (b'{"client_id": 1' + b"0" * 30 + b"}", validation("client_id", "Number too large.")),  # a float to orjson
        (b'{"client_id": "' + b"9" * 5000 + b'"}', validation("client_id", "Number too large.")),
        (b'{"client_id": 41', validation("json", "Invalid JSON body.")),
        (b"client_id=41", validation("json", "Invalid JSON body.")),
        (b'{"client_id": 1e999}', validation("json", "Invalid JSON body.")),  # beyond a double: orjson refuses
        (b'{"client_id": 1' + b"0" * 400 + b"}", validation("json", "Invalid JSON body.")),
        (b"\xff\xfe{}", validation("json", "Invalid JSON body.")),
        (b"[41]", validation("_schema", "Invalid input type.")),
        (b'"41"', validation("_schema", "Invalid input type.")),
        (b"41", validation("_schema", "Invalid input type.")),
        (b"null", validation("_schema", "Invalid input type.")),
    ],
)
async def test_bad_bodies_are_validation_errors(gateway: GatewayFactory, body: bytes, expected: Any) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    await assert_json(await mint(client, body), 400, expected)


@pytest.mark.parametrize(
    ("headers", "body", "status", "expected"),
    [
        ({}, SEED_BODY, 401, NOT_PROVIDED),
        ({}, b"", 401, NOT_PROVIDED),  # the header is checked before the body
        ({"X-Auth-Token": ""}, SEED_BODY, 401, NOT_PROVIDED),
        ({"X-Auth-Token": "   "}, SEED_BODY, 401, NOT_PROVIDED),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, SEED_BODY, 401, NOT_PROVIDED),
        ({"X-Auth-Token": "not-a-known-token"}, SEED_BODY, 401, INVALID_TOKEN),
        ({"X-Auth-Token": "jeton-é-ü-漢字"}, SEED_BODY, 401, INVALID_TOKEN),
        ({"X-Auth-Token": "x" * 4000}, SEED_BODY, 401, INVALID_TOKEN),
        ({"X-Auth-Token": CLIENT_OWN_TOKEN}, SEED_BODY, 401, INVALID_TOKEN),  # a client is not an admin
        (
            {"X-Auth-Token": VIEWER_TOKEN},
            SEED_BODY,
            403,
            {
                "error_type": "forbidden_error",
                "success": False,
                "error": {
                    "message": "You are not allowed to log in as this client",
                    "code": 120,
                    "reason": "permission_denied",
                },
            },
        ),
        (SEED_HEADERS, b'{"client_id": 404}', 404, NOT_FOUND),
        (SEED_HEADERS, b'{"client_id": "0"}', 404, NOT_FOUND),
        (SEED_HEADERS, b'{"client_id": -41}', 404, NOT_FOUND),
        (SEED_HEADERS, b'{"client_id": 9223372036854775807}', 404, NOT_FOUND),
    ],
)
async def test_credential_and_subject_errors(
    gateway: GatewayFactory, headers: dict[str, str], body: bytes, status: int, expected: Any
) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    await assert_json(await mint(client, body, headers), status, expected)


async def test_a_grant_is_not_an_admin_token(gateway: GatewayFactory) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    grant = (await minted(client))["token"]
    await assert_json(await mint(client, headers={"X-Auth-Token": grant}), 401, INVALID_TOKEN)


async def test_oversized_body_is_413(gateway: GatewayFactory) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY, server={"body_limit_bytes": 1024})
    body = b'{"client_id": 41, "pad": "' + b"x" * 2048 + b'"}'
    expected = {
        "error_type": "payload_too_large_error",
        "success": False,
        "error": {"message": "Request body exceeds 1024 bytes", "code": 130, "reason": "payload_too_large"},
    }
    await assert_json(await mint(client, body), 413, expected)


async def test_repeated_bad_tokens_are_rate_limited(gateway: GatewayFactory) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY, rate_limit={"failures": 2, "window_seconds": 60})
    for _ in range(2):
        await assert_json(await mint(client, headers={"X-Auth-Token": "wrong"}), 401, INVALID_TOKEN)
    response = await mint(client, headers={"X-Auth-Token": "wrong"})
    assert response.status == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    body = await response.json()
    assert body["error_type"] == "rate_limit_error" and body["success"] is False
    assert set(body["error"]) == {"message", "code", "reason"}
    assert (body["error"]["code"], body["error"]["reason"]) == (140, "too_many_requests")


@pytest.mark.parametrize(
    ("error", "status", "body"),
    [
        (Invalid("client_id", "missing"), 400, validation("client_id", "Missing data for required field.")),
        (Invalid("identity", "ambiguous"), 400, validation("identity", "Invalid value.")),
        (Unauthenticated("missing", "X-Auth-Token"), 401, NOT_PROVIDED),
        (Unauthenticated("unknown", "X-Auth-Token"), 401, INVALID_TOKEN),
        (GrantRefused("reused"), 401, GRANT_REFUSED),
        (GrantRefused("expired"), 401, GRANT_REFUSED),
        (
            Forbidden("role"),
            403,
            {
                "error_type": "forbidden_error",
                "success": False,
                "error": {
                    "message": "You are not allowed to log in as this client",
                    "code": 120,
                    "reason": "permission_denied",
                },
            },
        ),
        (NotFound("subject"), 404, NOT_FOUND),
        (
            PayloadTooLarge(65536),
            413,
            {
                "error_type": "payload_too_large_error",
                "success": False,
                "error": {"message": "Request body exceeds 65536 bytes", "code": 130, "reason": "payload_too_large"},
            },
        ),
        (
            RateLimited(7),
            429,
            {
                "error_type": "rate_limit_error",
                "success": False,
                "error": {
                    "message": "Too many failed attempts; retry in 7 s",
                    "code": 140,
                    "reason": "too_many_requests",
                },
            },
        ),
        (
            StoreUnavailable(),
            503,
            {
                "error_type": "service_unavailable_error",
                "success": False,
                "error": {"message": "Service temporarily unavailable", "code": 150, "reason": "service_unavailable"},
            },
        ),
        (
            GatewayError(),
            500,
            {
                "error_type": "internal_server_error",
                "success": False,
                "error": {"message": "Internal server error", "code": 100, "reason": "internal_error"},
            },
        ),
    ],
)
def test_render_error_covers_every_gateway_error(error: GatewayError, status: int, body: Any) -> None:
    response = dialect.render_error(error)
    assert response.status == status
    assert response.content_type == "application/json"
    assert isinstance(response.body, bytes) and orjson.loads(response.body) == body
    assert response.headers.get("Retry-After") == ("7" if isinstance(error, RateLimited) else None)


# -- redemption -------------------------------------------------------------------------------------------
def assert_claims(upstream: Upstream, scope: str | None = None) -> None:
    claims = upstream.claims(audience="switch")
    assert claims["sub"] == "41" and claims["aud"] == "switch"
    assert claims["act"] == {"sub": "admin-1", "role": "admin"}
    assert claims["email"] == "dn@example.com" and claims["dialect"] == "denovolab"
    assert claims.get("scope") == scope
    assert claims["exp"] - claims["iat"] == 30 and claims["jti"]


def carried(kind: str, token: str) -> tuple[str, dict[str, str]]:
    """The path and headers of a request carrying ``token`` in the query or the X-Auth-Token header."""
    if kind == "query":
        return f"/routing/rate_table?tab=2&token={token}", {}
    return "/routing/rate_table?tab=2", {"X-Auth-Token": token}


@pytest.mark.parametrize("kind", ["query", "header"])
@pytest.mark.parametrize(("field", "scope"), [("token", None), ("cdr_api_token", "cdr_api")])
async def test_each_grant_redeems_once_through_each_carrier(
    gateway: GatewayFactory, upstream: Upstream, kind: str, field: str, scope: str | None
) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    data = await minted(client)
    path, headers = carried(kind, data[field])
    response = await client.get(path, headers={**headers, "X-Impersonation-Assertion": "forged"})
    assert response.status == 200
    assert "app_session=s1" in response.headers["Set-Cookie"]
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query) == ("GET", "/routing/rate_table", {"tab": "2"})
    assert "X-Auth-Token" not in seen.headers
    assert data[field] not in str(seen.headers)
    assert_claims(upstream, scope)

    again = await client.get(path, headers=headers)
    await assert_json(again, 401, GRANT_REFUSED)
    assert len(upstream.requests) == 1


async def test_the_two_grants_are_independent(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    data = await minted(client)
    assert (await client.get(f"/?token={data['token']}")).status == 200
    assert (await client.get("/cdr", headers={"X-Auth-Token": data["cdr_api_token"]})).status == 200
    assert [upstream.claims(i, audience="switch").get("scope") for i in (0, 1)] == [None, "cdr_api"]


async def test_unknown_query_token_is_refused(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    await assert_json(await client.get("/?token=" + "A" * 32), 401, GRANT_REFUSED)
    assert upstream.requests == []


async def test_same_grant_in_query_and_header_is_stripped_from_both(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    token = (await minted(client))["token"]
    assert (await client.get(f"/?token={token}", headers={"X-Auth-Token": token})).status == 200
    (seen,) = upstream.requests
    assert seen.query == {} and "X-Auth-Token" not in seen.headers
    assert_claims(upstream)


@pytest.mark.parametrize("token", [ADMIN_TOKEN, "some-other-api-token"])
async def test_admin_token_in_header_passes_through_untouched(
    gateway: GatewayFactory, upstream: Upstream, token: str
) -> None:
    client = await gateway(apps=APPS, directory=DIRECTORY)
    response = await client.post(
        "/v1/clients?page=1", data=b'{"name": "x"}', headers={"X-Auth-Token": token, "X-Impersonation-Assertion": "f"}
    )
    assert response.status == 200
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query, seen.body) == ("POST", "/v1/clients", {"page": "1"}, b'{"name": "x"}')
    assert seen.headers["X-Auth-Token"] == token
    assert "X-Impersonation-Assertion" not in seen.headers


async def test_scanner_safe_link_waits_for_the_confirming_post(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY)
    token = (await minted(client))["token"]
    url = f"/routing/rate_table?tab=2&token={token}"
    page = await client.get(url)
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "impersonation_confirm" in await page.text()
    assert upstream.requests == []

    response = await client.post(url, data={"impersonation_confirm": "1"})
    assert response.status == 200
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query, seen.body) == ("GET", "/routing/rate_table", {"tab": "2"}, b"")
    assert_claims(upstream)
    await assert_json(await client.post(url, data={"impersonation_confirm": "1"}), 401, GRANT_REFUSED)


async def test_header_grant_is_an_api_carrier_even_when_scanner_safe(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    client = await gateway(apps=SCANNER_SAFE, directory=DIRECTORY)
    token = (await minted(client))["cdr_api_token"]
    response = await client.get("/cdr/records", headers={"X-Auth-Token": token})
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.path == "/cdr/records" and "X-Auth-Token" not in seen.headers
    assert_claims(upstream, "cdr_api")
