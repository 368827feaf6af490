"""ActivePlatform: the seed request byte for byte, every error path, and redemption through its carrier."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import GatewayFactory, Upstream

MEDIA = "application/vnd.api+json"
SEED_HEADERS = {
    "Host": "test.activeplatform.com",
    "Content-Type": MEDIA,
    "X-Api-Token": "vY5fwetestK3gJXZH5uHCw",
    "Accept": MEDIA,
}
SEED_PATH = "/api/v3/resellers/1/user_authentication/token?account_id=505"


async def mint(
    client: TestClient[Any, Any], path: str = SEED_PATH, token: str | None = "vY5fwetestK3gJXZH5uHCw"
) -> Any:
    headers = {**SEED_HEADERS}
    if token is None:
        del headers["X-Api-Token"]
    else:
        headers["X-Api-Token"] = token
    return await client.get(path, headers=headers)


async def test_seed_request_mints_a_grant(gateway: GatewayFactory) -> None:
    client = await gateway()
    response = await mint(client)
    assert response.status == 200
    assert response.headers["Content-Type"] == MEDIA
    body = await response.json(content_type=MEDIA)
    assert set(body) == {"owner_email", "owner_token"}
    assert body["owner_email"] == "example@activeplatform.com"
    assert len(body["owner_token"]) >= 22  # 128+ bits, base64url


@pytest.mark.parametrize(
    ("path", "token", "status", "code"),
    [
        (SEED_PATH, None, 401, "unauthorized"),
        (SEED_PATH, "not-a-known-token", 401, "unauthorized"),
        (SEED_PATH, "marketing-1-token", 403, "forbidden"),  # role may not mint
        ("/api/v3/resellers/1/user_authentication/token", "vY5fwetestK3gJXZH5uHCw", 400, "invalid_parameter"),
        (
            "/api/v3/resellers/1/user_authentication/token?account_id=abc",
            "vY5fwetestK3gJXZH5uHCw",
            400,
            "invalid_parameter",
        ),
        (
            "/api/v3/resellers/1/user_authentication/token?account_id=",
            "vY5fwetestK3gJXZH5uHCw",
            400,
            "invalid_parameter",
        ),
        (
            "/api/v3/resellers/1/user_authentication/token?account_id=1&account_id=2",
            "vY5fwetestK3gJXZH5uHCw",
            400,
            "invalid_parameter",
        ),
        ("/api/v3/resellers/1/user_authentication/token?account_id=404", "vY5fwetestK3gJXZH5uHCw", 404, "not_found"),
        ("/api/v3/resellers/66/user_authentication/token?account_id=505", "vY5fwetestK3gJXZH5uHCw", 404, "not_found"),
        ("/api/v3/resellers/x/user_authentication/token?account_id=505", "vY5fwetestK3gJXZH5uHCw", 404, "not_found"),
        # reseller 9 is not downstream of reseller 1: outside the manager's subtree
        ("/api/v3/resellers/9/user_authentication/token?account_id=909", "vY5fwetestK3gJXZH5uHCw", 403, "forbidden"),
        # account 909 belongs to reseller 9, not to reseller 1's subtree
        ("/api/v3/resellers/1/user_authentication/token?account_id=909", "vY5fwetestK3gJXZH5uHCw", 404, "not_found"),
        # a manager of reseller 7 may not act through its upstream reseller 1, nor on its accounts
        ("/api/v3/resellers/1/user_authentication/token?account_id=707", "manager-7-token", 403, "forbidden"),
        ("/api/v3/resellers/7/user_authentication/token?account_id=505", "manager-7-token", 404, "not_found"),
    ],
)
async def test_errors_are_json_api(
    gateway: GatewayFactory, path: str, token: str | None, status: int, code: str
) -> None:
    client = await gateway()
    response = await mint(client, path, token)
    assert response.status == status
    assert response.headers["Content-Type"] == MEDIA
    body = await response.json(content_type=MEDIA)
    assert list(body) == ["errors"]
    (error,) = body["errors"]
    assert set(error) == {"status", "code", "title", "detail"}
    assert error["status"] == str(status)
    assert error["code"] == code


@pytest.mark.parametrize(
    ("path", "token", "email"),
    [
        # downstream resellers: 7 is below 1, 8 below 7
        (
            "/api/v3/resellers/7/user_authentication/token?account_id=707",
            "vY5fwetestK3gJXZH5uHCw",
            "owner707@example.com",
        ),
        (
            "/api/v3/resellers/1/user_authentication/token?account_id=808",
            "vY5fwetestK3gJXZH5uHCw",
            "owner808@example.com",
        ),
        ("/api/v3/resellers/7/user_authentication/token?account_id=808", "manager-7-token", "owner808@example.com"),
        ("/api/v3/resellers/1/user_authentication/token/505", "owner-1-token", "example@activeplatform.com"),
    ],
)
async def test_reseller_subtree_allows_downstream(gateway: GatewayFactory, path: str, token: str, email: str) -> None:
    client = await gateway()
    response = await mint(client, path, token)
    assert response.status == 200
    assert (await response.json(content_type=MEDIA))["owner_email"] == email


def login_path(body: dict[str, str]) -> str:
    return f"/?user_email={quote(body['owner_email'])}&user_token={quote(body['owner_token'])}&tab=billing"


async def test_redemption_works_once_and_reaches_upstream_with_assertion(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    client = await gateway(apps={"control-panel": {"dialect": "activeplatform", "redeem_on_get": True}})
    body = await (await mint(client)).json(content_type=MEDIA)
    response = await client.get(login_path(body), headers={"X-Impersonation-Assertion": "forged"})
    assert response.status == 200
    assert len(upstream.requests) == 1
    seen = upstream.requests[0]
    assert seen.path == "/" and seen.query == {"tab": "billing"}  # carrier stripped, the rest kept
    claims = upstream.claims()
    assert claims["sub"] == "505" and claims["aud"] == "control-panel"
    assert claims["act"] == {"sub": "mgr-1", "role": "admin"}
    assert claims["email"] == "example@activeplatform.com" and claims["dialect"] == "activeplatform"
    assert claims["exp"] - claims["iat"] == 30 and claims["jti"]
    assert "app_session=s1" in response.headers["Set-Cookie"]
    assert response.headers["Location"] == "/dashboard"

    again = await client.get(login_path(body))
    assert again.status == 401
    assert (await again.json(content_type=MEDIA))["errors"][0]["code"] == "unauthorized"
    assert len(upstream.requests) == 1


async def test_mismatched_email_is_refused_and_burns_the_grant(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(apps={"control-panel": {"dialect": "activeplatform", "redeem_on_get": True}})
    body = await (await mint(client)).json(content_type=MEDIA)
    wrong = await client.get(login_path({**body, "owner_email": "someone@else.com"}))
    unknown = await client.get(login_path({**body, "owner_token": "A" * 32}))
    assert wrong.status == unknown.status == 401
    assert await wrong.read() == await unknown.read()  # no oracle
    assert (await client.get(login_path(body))).status == 401
    assert upstream.requests == []


async def test_pass_through_strips_client_assertion(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway()
    response = await client.post("/orders?x=1", data=b"hello", headers={"X-Impersonation-Assertion": "forged"})
    assert response.status == 200
    (seen,) = upstream.requests
    assert (seen.method, seen.path, seen.query, seen.body) == ("POST", "/orders", {"x": "1"}, b"hello")
    assert "X-Impersonation-Assertion" not in seen.headers


async def test_another_method_on_the_mint_path_is_405_and_never_reaches_the_app(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    """The manager's X-Api-Token belongs to the gateway: a POST, PUT, HEAD or OPTIONS there is no request for the
    app (it would carry the token to it)."""
    client = await gateway()
    for method in ("POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"):
        response = await client.request(method, SEED_PATH, headers=SEED_HEADERS, data=b"{}")
        assert (response.status, response.headers["Allow"]) == (405, "GET"), method
        if method != "HEAD":
            assert await response.json(content_type=MEDIA) == {"errors": [{
                "status": "405", "code": "method_not_allowed", "title": "Method Not Allowed",
                "detail": "This endpoint accepts GET only.",
            }]}  # fmt: skip
    assert upstream.requests == []
    assert (await mint(client)).status == 200  # the GET still mints
