"""SCIM 2.0 on the admin listener: bearer tokens with scopes, Users as subjects, what that does to impersonation,
filters and pages, errors in SCIM's shape, and the public scim2-tester conformance checks against a live gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
import pytest
from aiohttp.test_utils import TestClient
from scim2_client.engines.httpx2 import SyncSCIMClient
from scim2_tester import Status, check_server

from gateway.app import create_app
from gateway.directory import parse_directory
from gateway.scim import EXTENSION, USER_SCHEMA
from gateway.store import Store
from tests.conftest import DIRECTORY, KEY, Upstream, free_port, make_config

ADMIN = "scim-admin-token"
REVOKER = "revoke-only-token"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
MEDIA = "application/vnd.api+json"
SCIM = "application/scim+json"
APPS = {"control-panel": {"dialect": "activeplatform", "redeem_on_get": True}}


@dataclass
class Admin:
    """The gateway (a test client on its main listener) and its admin listener's base URL for an app."""

    client: TestClient[Any, Any]
    base: str
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None, token: str | None = ADMIN) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.base + path, json=body, headers=headers) as response:
            data = await response.json(content_type=None) if response.status != 204 else None
            if response.status != 204:
                assert response.content_type == SCIM, (response.status, data)
            return response.status, data

    async def mint(self, account: str) -> tuple[int, dict[str, Any]]:
        path = f"/api/v3/resellers/1/user_authentication/token?account_id={account}"
        response = await self.client.get(path, headers=MANAGER)
        return response.status, await response.json(content_type=MEDIA)


@pytest.fixture
async def admin(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], redis_client: Any, upstream: Upstream, prefix: str
) -> AsyncIterator[Admin]:
    port = free_port()
    tokens = [{"id": "idp", "token": ADMIN, "scopes": ["scim"]}, {"id": "ops", "token": REVOKER, "scopes": ["revoke"]}]
    config = make_config(prefix, upstream.url, APPS, admin={"port": port, "tokens": tokens})
    await Store(redis_client, prefix).load_directory(parse_directory(DIRECTORY))
    client = await aiohttp_client(create_app(config, redis=redis_client, key=KEY))
    async with aiohttp.ClientSession() as http:
        yield Admin(client, f"http://127.0.0.1:{port}/scim/v2/control-panel", http)


def user(name: str, **extra: Any) -> dict[str, Any]:
    return {"schemas": [USER_SCHEMA, EXTENSION], "userName": name, EXTENSION: {"reseller": "1"}, **extra}


async def test_tokens_and_scopes(admin: Admin) -> None:
    for token in (None, "not-a-token"):
        status, body = await admin.call("GET", "/Users", token=token)
        assert (status, body["status"], body["schemas"]) == (
            401,
            "401",
            ["urn:ietf:params:scim:api:messages:2.0:Error"],
        )
    status, body = await admin.call("GET", "/Users", token=REVOKER)
    assert (status, body["detail"]) == (403, "the token 'ops' lacks the 'scim' scope")
    assert (await admin.call("GET", "/Users/505"))[0] == 200


async def test_a_user_is_a_subject_until_deactivated_or_deleted(admin: Admin, upstream: Upstream) -> None:
    """Created by SCIM, a user can be impersonated; deactivated, not (and its live grant is refused) until a write
    says ``active: true``; deleted, gone."""
    status, created = await admin.call(
        "POST", "/Users", user("606", emails=[{"value": "six@example.com", "primary": True}], displayName="Six")
    )
    assert status == 201 and created["id"] == "606" and created["meta"]["resourceType"] == "User"
    assert created["meta"]["location"].endswith("/scim/v2/control-panel/Users/606")
    status, minted = await admin.mint("606")
    assert (status, minted["owner_email"]) == (200, "six@example.com")
    status, patched = await admin.call(
        "PATCH", "/Users/606",
        {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
         "Operations": [{"op": "replace", "path": "active", "value": False}]},
    )  # fmt: skip
    assert (status, patched["active"]) == (200, False)
    assert (await admin.mint("606"))[0] == 404
    link = f"/?user_email=six%40example.com&user_token={minted['owner_token']}"
    assert (await admin.client.get(link)).status == 401  # the grant minted before: refused at redemption
    assert upstream.requests == []
    status, replaced = await admin.call("PUT", "/Users/606", user("606", emails=[{"value": "six@example.com"}]))
    assert (status, replaced["active"]) == (200, False)  # a PUT that leaves active out leaves it deactivated
    assert (await admin.mint("606"))[0] == 404
    again = user("606", emails=[{"value": "six@example.com"}], active=True)
    assert (await admin.call("PUT", "/Users/606", again))[1]["active"] is True  # only active: true reactivates
    assert (await admin.mint("606"))[0] == 200
    assert (await admin.call("DELETE", "/Users/606"))[0] == 204
    assert (await admin.mint("606"))[0] == 404
    assert (await admin.call("GET", "/Users/606"))[0] == 404


async def test_subjects_from_the_directory_file_are_users(admin: Admin) -> None:
    status, shown = await admin.call("GET", "/Users/505")
    assert status == 200
    assert (shown["userName"], shown["emails"], shown[EXTENSION]) == (
        "505", [{"value": "example@activeplatform.com", "primary": True}], {"reseller": "1"}
    )  # fmt: skip
    status, page = await admin.call("GET", "/Users?startIndex=2&count=2")
    assert (status, page["totalResults"], page["startIndex"], page["itemsPerPage"]) == (200, 4, 2, 2)
    assert [u["id"] for u in page["Resources"]] == ["707", "808"]  # ordered by id


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ('userName eq "505"', ["505"]),
        ('emails.value eq "OWNER707@example.com"', ["707"]),  # e-mails are not case-exact
        ('externalId eq "ext-1"', ["909"]),
        ('userName eq "505" or emails.value eq "owner808@example.com"', ["505", "808"]),
        ('emails.value eq "owner707@example.com" and userName eq "505"', []),
        ('userName eq "nobody"', []),
    ],
)
async def test_filters(admin: Admin, query: str, found: list[str]) -> None:
    add = {"op": "add", "path": "externalId", "value": "ext-1"}
    await admin.call(
        "PATCH", "/Users/909", {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [add]}
    )
    status, page = await admin.call("GET", f"/Users?filter={query}")
    assert status == 200, page
    assert ([u["id"] for u in page["Resources"]], page["totalResults"]) == (found, len(found))


async def test_errors_in_scims_shape(admin: Admin) -> None:
    cases: list[tuple[str, str, Any, int, str | None]] = [
        ("GET", '/Users?filter=displayName sw "x"', None, 400, "invalidFilter"),
        ("GET", "/Users?filter=userName eq", None, 400, "invalidFilter"),
        ("POST", "/Users", user("505"), 409, "uniqueness"),
        ("PUT", "/Users/505", user("5050"), 400, "mutability"),
        ("POST", "/Users", {"schemas": [USER_SCHEMA]}, 400, "invalidValue"),
        ("POST", "/Users", [1, 2], 400, "invalidSyntax"),
        ("GET", "/Users/nobody", None, 404, None),
        ("DELETE", "/Users/nobody", None, 404, None),
        ("GET", "/Nothing", None, 404, None),
    ]
    for method, path, body, status, scim_type in cases:
        got, error = await admin.call(method, path, body)
        assert (got, error["status"], error.get("scimType")) == (status, str(status), scim_type), (method, path, error)
    async with admin.http.get(admin.base.replace("control-panel", "nope") + "/Users",
                              headers={"Authorization": f"Bearer {ADMIN}"}) as response:  # fmt: skip
        assert response.status == 404


# The scim2-tester checks that cannot pass as written, and why (each is also in docs/directory-and-scim.md):
KNOWN = {
    # It first adds the whole extension (which gives identifiers and attributes a value), then adds to each of
    # its multi-valued attributes and expects only the new value back; RFC 7644 §3.5.2.1 says an add appends
    # to a multi-valued attribute, which is what the gateway does.
    ("check_add_attribute", EXTENSION + ":identifiers"),
    ("check_add_attribute", EXTENSION + ":attributes"),
}
# It removes ``active`` from a user it made with a random value, and expects it gone; a deactivated subject stays
# deactivated until ``active: true`` (DESIGN §11), and is shown so: this check fails whenever the draw was false.
DRAWN = {("check_remove_attribute", "active")}


@pytest.mark.parametrize("redis_client", ["redis"], indirect=True)
async def test_scim2_tester_conformance(admin: Admin) -> None:
    """Every check of the public scim2-tester suite that applies to Users passes against a live gateway."""

    def run() -> list[Any]:
        base = admin.base + "/"
        with httpx2.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as http:
            return check_server(SyncSCIMClient(http), resource_types=["User"])

    results = await asyncio.to_thread(run)
    failed = [(r.title, (r.data or {}).get("urn", "") if isinstance(r.data, dict) else "", r.reason)
              for r in results if r.status not in (Status.SUCCESS, Status.SKIPPED)]  # fmt: skip
    assert {(title, urn) for title, urn, _ in failed} - DRAWN == KNOWN, failed
    assert sum(r.status is Status.SUCCESS for r in results) >= 100
