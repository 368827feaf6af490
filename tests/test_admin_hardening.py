"""The admin listener under bad or heavy input, over real sockets: no request holds the event loop up, ids are
decoded once, every error is in SCIM's or RFC 9457's shape and logged, a grant belongs to one incarnation of its
subject, and ids that only look alike are refused."""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs
from yarl import URL

from gateway.app import create_app
from gateway.directory import DirectoryError, parse_directory, parse_subject
from gateway.scim import EXTENSION, MAX_FILTER, MAX_ITEMS, USER_SCHEMA
from gateway.store import Store
from tests.conftest import DIRECTORY, KEY, Upstream, free_port, make_config

TOKEN = "scim-and-revoke-token"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
SCIM = "application/scim+json"
PROBLEM = "application/problem+json"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
APPS = {"control-panel": {"dialect": "activeplatform", "redeem_on_get": True}}
BODY_TIMEOUT = 0.3


@dataclass
class Admin:
    """The gateway: a test client on its main listener, and its admin listener's address."""

    client: TestClient[Any, Any]
    port: int
    http: aiohttp.ClientSession
    store: Store

    @property
    def scim(self) -> str:
        return f"http://127.0.0.1:{self.port}/scim/v2/control-panel"

    async def send(
        self,
        method: str,
        url: str,
        body: Any = None,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, Any]:
        """Status, media type and JSON of an admin answer (``url`` sent as given, already encoded)."""
        if body is not None:
            data = orjson.dumps(body)
        sent = {"Authorization": f"Bearer {TOKEN}", "Content-Type": SCIM, **(headers or {})}
        async with self.http.request(method, URL(url, encoded=True), data=data, headers=sent) as response:
            raw = await response.read()
            return response.status, response.content_type, orjson.loads(raw) if raw else None

    async def mint(self, account: str) -> dict[str, Any] | None:
        """A grant for ``account`` (its login link's query), or None when the mint is refused."""
        response = await self.client.get(
            f"/api/v3/resellers/1/user_authentication/token?account_id={account}", headers=MANAGER
        )
        if response.status != 200:
            return None
        data: dict[str, Any] = await response.json(content_type=None)
        return data

    async def redeem(self, minted: dict[str, Any]) -> int:
        link = f"/?user_email={quote(minted['owner_email'])}&user_token={minted['owner_token']}"
        return (await self.client.get(link, allow_redirects=False)).status


@pytest.fixture
async def admin(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], redis_client: Any, upstream: Upstream, prefix: str
) -> AsyncIterator[Admin]:
    port = free_port()
    tokens = [{"id": "idp", "token": TOKEN, "scopes": ["scim", "revoke"]}]
    config = make_config(prefix, upstream.url, APPS, admin={"port": port, "tokens": tokens},
                         server={"body_timeout_seconds": BODY_TIMEOUT})  # fmt: skip
    store = Store(redis_client, prefix)
    await store.load_directory(parse_directory(DIRECTORY))
    client = await aiohttp_client(create_app(config, redis=redis_client, key=KEY))
    async with aiohttp.ClientSession() as http:
        yield Admin(client, port, http, store)


def user(name: str, **extra: Any) -> dict[str, Any]:
    return {"schemas": [USER_SCHEMA, EXTENSION], "userName": name, EXTENSION: {"reseller": "1"}, **extra}


def operations(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH], "Operations": list(ops)}


def admin_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "request" and e.get("listener") == "admin"]


# -- M2: bounded work, bounded bodies, a free event loop ------------------------------------------------------
async def test_a_patch_at_the_limit_and_a_longest_filter_leave_the_loop_free(admin: Admin) -> None:
    """While the heaviest PATCH and filters the limits allow run, /healthz on the main listener answers at once."""
    adds = [{"op": "add", "path": "emails", "value": [{"value": f"u{i}@example.com"}]} for i in range(MAX_ITEMS - 1)]
    heavy = operations(*adds, {"op": "replace", "path": "displayName", "value": "Five"})
    longest = 'userName eq "505"' + ' or userName eq "505"' * ((MAX_FILTER - 17) // 21)
    longest += " " * (MAX_FILTER - len(longest))
    assert len(longest) == MAX_FILTER
    stalls: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            started = time.perf_counter()
            assert (await admin.client.get("/healthz")).status == 200
            stalls.append(time.perf_counter() - started)

    # And what the probe sent (5,500 operations; a filter of thousands of terms), refused before any work.
    flood = operations(*[{"op": "add", "path": "emails", "value": [{"value": f"u{i}@example.com"}]}
                         for i in range(5500)])  # fmt: skip
    terms = 'userName eq "505"' + ' and userName eq "505"' * 2500

    async def work() -> list[tuple[int, str, Any]]:
        try:
            return [
                await admin.send("PATCH", admin.scim + "/Users/505", heavy),
                await admin.send("POST", admin.scim + "/Users/.search", {"filter": longest}),
                await admin.send("GET", admin.scim + "/Users?filter=" + quote(longest)),
                await admin.send("PATCH", admin.scim + "/Users/505", flood),
                await admin.send("POST", admin.scim + "/Users/.search", {"filter": terms}),
            ]
        finally:
            done.set()

    answers, _ = await asyncio.gather(work(), probe())
    (status, _, patched), (found, _, page), (listed, _, same), (flooded, _, _), (many, _, error) = answers
    assert (status, len(patched["emails"]), patched["displayName"]) == (200, MAX_ITEMS, "Five")
    assert (found, [u["id"] for u in page["Resources"]], listed, same["totalResults"]) == (200, ["505"], 200, 1)
    assert (flooded, many, error.get("scimType")) == (413, 400, "invalidFilter"), error
    # Loose enough for a loaded machine; a request that held the loop stalled /healthz for 50 s and more.
    worst = max(stalls)
    assert worst < 2.0, (
        f"/healthz waited {worst * 1000:.1f} ms during the heaviest admin requests ({len(stalls)} probes)"
    )


async def test_over_the_limits_is_a_scim_error(admin: Admin) -> None:
    many = operations(*[{"op": "replace", "path": "displayName", "value": f"n{i}"} for i in range(MAX_ITEMS + 1)])
    assert (await admin.send("PATCH", admin.scim + "/Users/505", many))[::2] == (
        400, {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "400", "scimType": "tooMany",
              "detail": f"the body holds a list of more than {MAX_ITEMS} entries"},
    )  # fmt: skip
    emails = [{"value": f"u{i}@example.com"} for i in range(MAX_ITEMS)]
    adds = operations({"op": "add", "path": "emails", "value": emails})  # 100 new, beside the one it has
    status, media, error = await admin.send("PATCH", admin.scim + "/Users/505", adds)
    assert (status, media, error["scimType"], error["detail"]) == (
        400, SCIM, "tooMany", f"a user holds a list of more than {MAX_ITEMS} entries"
    )  # fmt: skip
    too_long = 'userName eq "505"'.ljust(MAX_FILTER + 1)
    for method, url, body in (
        ("POST", admin.scim + "/Users/.search", {"filter": too_long}),
        ("GET", admin.scim + "/Users?filter=" + quote(too_long), None),
    ):
        status, media, error = await admin.send(method, url, body)
        assert (status, media, error["scimType"], error["detail"]) == (
            400, SCIM, "invalidFilter", f"a filter is at most {MAX_FILTER} characters"
        )  # fmt: skip
    huge = operations(*[{"op": "add", "path": "emails", "value": [{"value": f"u{i}@example.com"}]}
                        for i in range(5500)])  # fmt: skip
    status, media, error = await admin.send("PATCH", admin.scim + "/Users/505", huge)
    assert (status, media, error["detail"]) == (413, SCIM, "the request body is over 65536 bytes")


async def test_a_body_that_does_not_arrive_in_time_is_a_408(admin: Admin) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    try:
        head = f"PATCH /scim/v2/control-panel/Users/505 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n"
        writer.write(head.encode() + b'Content-Type: application/scim+json\r\nContent-Length: 100\r\n\r\n{"schemas"')
        await writer.drain()
        async with asyncio.timeout(15):  # the answer comes (the socket closes later: lingering)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line for line in head.split(b"\r\n") if line.startswith(b"Content-Length:"))[15:])
            body = await reader.readexactly(length)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408 ") and b"Content-Type: application/scim+json" in head
    assert b"Connection: close" in head
    assert orjson.loads(body)["detail"] == "the request body did not arrive in time"


# -- M3: ids decoded once ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["%41", "a/b", "two words", "%2541", "50%"])
async def test_a_users_location_names_that_user(admin: Admin, name: str) -> None:
    assert (await admin.send("POST", admin.scim + "/Users", user("A")))[0] == 201
    status, _, created = await admin.send("POST", admin.scim + "/Users", user(name))
    assert (status, created["id"], created["userName"]) == (201, name, name)
    location = created["meta"]["location"]
    assert location == f"{admin.scim}/Users/{quote(name, safe='')}"
    status, _, shown = await admin.send("GET", location)
    assert (status, shown["userName"]) == (200, name)
    status, _, patched = await admin.send("PATCH", location, operations({"op": "replace", "path": "active",
                                                                         "value": False}))  # fmt: skip
    assert (status, patched["userName"], patched["active"]) == (200, name, False)
    assert (await admin.send("DELETE", location))[0] == 204
    assert (await admin.send("GET", location))[0] == 404
    status, _, other = await admin.send("GET", admin.scim + "/Users/A")
    assert (status, other["userName"], other.get("active", True)) == (200, "A", True)  # untouched


# -- L1: bad input is a 4xx in the listener's shape, and one log line ----------------------------------------
def deflated(data: bytes) -> bytes:
    return zlib.compress(data)


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "media", "says"),
    [
        ("PATCH", "/scim/v2/control-panel/Users/505",
         orjson.dumps(operations({"op": "replace", "path": "displayName", "value": {"a": 1}})), {}, 400, SCIM,
         "invalidValue"),
        ("PATCH", "/scim/v2/control-panel/Users/505",
         orjson.dumps(operations({"op": "replace", "path": "active", "value": "maybe"})), {}, 400, SCIM,
         "invalidValue"),
        ("PATCH", "/scim/v2/control-panel/Users/505",
         orjson.dumps(operations({"op": "replace", "path": "userName", "value": "506"})), {}, 400, SCIM,
         "mutability"),
        ("PATCH", "/scim/v2/control-panel/Users/505",
         orjson.dumps(operations({"op": "replace", "value": {"userName": "506"}})), {}, 400, SCIM, "mutability"),
        ("POST", "/scim/v2/control-panel/Users/.search", b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"}, 415,
         SCIM, "a body with Content-Encoding gzip cannot be decoded"),
        ("GET", "/scim/v2/control-panel/Users?startIndex=9223372036854775808", None, {}, 200, SCIM, None),
        ("POST", "/scim/v2/control-panel/Users/.search", b'{"startIndex": 9223372036854775808}', {}, 200, SCIM,
         None),
        ("POST", "/v1/revocations", b"x\x9c not deflate", {"Content-Encoding": "deflate"}, 415, PROBLEM,
         "a body with Content-Encoding deflate cannot be decoded"),
        ("POST", "/v1/revocations", gzip.compress(b'{"app": "control-panel"}'), {"Content-Encoding": "gzip"}, 200,
         "application/json", None),
        ("POST", "/v1/revocations", deflated(b'{"app": "control-panel"}'), {"Content-Encoding": "deflate"}, 200,
         "application/json", None),
    ],
)  # fmt: skip
async def test_bad_admin_input_is_a_4xx_in_shape_and_logged(
    admin: Admin, method: str, path: str, body: bytes | None, headers: dict[str, str], status: int, media: str,
    says: str | None,
) -> None:  # fmt: skip
    with capture_logs() as logs:
        got, got_media, answer = await admin.send(method, f"http://127.0.0.1:{admin.port}{path}", data=body,
                                                  headers=headers)  # fmt: skip
    assert (got, got_media) == (status, media), answer
    if says is not None:
        assert says in (answer.get("scimType"), answer.get("detail")), answer
    if status == 200 and media == SCIM:
        assert (answer["totalResults"], answer["Resources"]) == (4, [])  # past the end: an empty page
    assert [(e["method"], e["path"], e["status"]) for e in admin_lines(logs)] == [(method, path.split("?")[0], status)]
    assert not [e for e in logs if e["event"] == "unhandled_error"]


async def test_an_unexpected_error_is_a_logged_500_in_shape(admin: Admin, redis_client: Any) -> None:
    generation = await admin.store.generation("control-panel")
    assert generation is not None
    # a subject record that does not decode: reading it raises what no handler expects
    await redis_client.set(admin.store.subject_key("control-panel", generation, "505"), b"{broken")
    with capture_logs() as logs:
        status, media, error = await admin.send("GET", admin.scim + "/Users/505")
    assert (status, media, error["detail"]) == (500, SCIM, "an unexpected error; it is logged")
    assert [e["status"] for e in admin_lines(logs)] == [500]
    assert [e["event"] for e in logs if e["event"] == "unhandled_error"] == ["unhandled_error"]


# -- L4: a grant belongs to one incarnation of its subject --------------------------------------------------
async def test_a_grant_never_outlives_its_subjects_incarnation(admin: Admin, upstream: Upstream) -> None:
    created = await admin.send("POST", admin.scim + "/Users", user("41", emails=[{"value": "first@example.com"}]))
    assert created[0] == 201
    before_delete = await admin.mint("41")
    assert before_delete is not None and before_delete["owner_email"] == "first@example.com"
    assert (await admin.send("DELETE", admin.scim + "/Users/41"))[0] == 204
    again = await admin.send("POST", admin.scim + "/Users", user("41", emails=[{"value": "first@example.com"}]))
    assert again[0] == 201  # another person, with the same id (and here even the same e-mail)
    assert await admin.redeem(before_delete) == 401
    before_deactivation = await admin.mint("41")
    assert before_deactivation is not None
    off = operations({"op": "replace", "path": "active", "value": False})
    assert (await admin.send("PATCH", admin.scim + "/Users/41", off))[0] == 200
    assert (await admin.send("PATCH", admin.scim + "/Users/41", operations({"op": "replace", "path": "active",
                                                                              "value": True})))[0] == 200  # fmt: skip
    assert await admin.redeem(before_deactivation) == 401
    assert upstream.requests == []
    current = await admin.mint("41")
    assert current is not None
    assert (await admin.send("PUT", admin.scim + "/Users/41", user("41", displayName="Renamed")))[0] == 200
    assert await admin.redeem(current) == 200  # an ordinary change keeps the incarnation
    assert upstream.claims()["sub"] == "41"


async def test_a_directory_reload_keeps_live_grants_and_a_comeback_does_not(admin: Admin, upstream: Upstream) -> None:
    kept = await admin.mint("505")
    assert kept is not None
    await admin.store.load_directory(parse_directory(DIRECTORY))  # the same directory again
    assert await admin.redeem(kept) == 200
    removed = await admin.mint("707")
    assert removed is not None
    without = {"apps": {"control-panel": {**DIRECTORY["apps"]["control-panel"], "subjects": [
        s for s in DIRECTORY["apps"]["control-panel"]["subjects"] if s["id"] != "707"]}}}  # fmt: skip
    await admin.store.load_directory(parse_directory(without))
    await admin.store.load_directory(parse_directory(DIRECTORY))  # back, in a later load
    assert await admin.redeem(removed) == 401
    paused = await admin.mint("808")
    assert paused is not None
    inactive = {"apps": {"control-panel": {**DIRECTORY["apps"]["control-panel"], "subjects": [
        {**s, "active": s["id"] != "808"} for s in DIRECTORY["apps"]["control-panel"]["subjects"]]}}}  # fmt: skip
    await admin.store.load_directory(parse_directory(inactive))
    await admin.store.load_directory(parse_directory(DIRECTORY))  # active again
    assert await admin.redeem(paused) == 401
    assert len(upstream.requests) == 1


async def test_a_deactivated_user_stays_so_until_active_true(admin: Admin) -> None:
    off = operations({"op": "replace", "path": "active", "value": False})
    assert (await admin.send("PATCH", admin.scim + "/Users/505", off))[0] == 200
    removed = operations({"op": "remove", "path": "active"})
    status, _, shown = await admin.send("PATCH", admin.scim + "/Users/505", removed)
    assert (status, shown["active"]) == (200, False)
    status, _, shown = await admin.send("PUT", admin.scim + "/Users/505", user("505", displayName="Five"))
    assert (status, shown["active"], shown["displayName"]) == (200, False, "Five")
    assert await admin.mint("505") is None
    status, _, shown = await admin.send(
        "PUT", admin.scim + "/Users/505", user("505", active=True, emails=[{"value": "five@example.com"}])
    )
    assert (status, shown["active"]) == (200, True)
    assert await admin.mint("505") is not None


# -- Info: ids that only look alike -------------------------------------------------------------------------
LOOKALIKES = [
    ("505 ", "must not begin or end with a space"),
    (" 505", "must not begin or end with a space"),
    ("\u0665\u0660\u0665", "digits must be ASCII 0-9 (U+0665 is not)"),
    ("\uff15\uff10\uff15", "digits must be ASCII 0-9 (U+FF15 is not)"),
    ("505\u200b", "must not hold an invisible character (U+200B)"),
    ("50\u00a05", "must be printable (U+00A0 is not)"),
    ("50\n5", "must be printable (U+000A is not)"),
]


@pytest.mark.parametrize(("name", "why"), LOOKALIKES)
async def test_ids_that_only_look_like_another_are_refused(admin: Admin, name: str, why: str) -> None:
    status, media, error = await admin.send("POST", admin.scim + "/Users", user(name))
    assert (status, media, error["scimType"], error["detail"]) == (400, SCIM, "invalidValue", f"User.id: {why}")
    _, _, found = await admin.send("GET", admin.scim + "/Users?filter=" + quote('userName eq "505"'))
    assert found["totalResults"] == 1


@pytest.mark.parametrize(("name", "why"), LOOKALIKES)
def test_a_directory_refuses_the_same_ids(name: str, why: str) -> None:
    with pytest.raises(DirectoryError) as refused:
        parse_subject({"id": name}, "apps.x.subjects[0]")
    assert str(refused.value) == f"apps.x.subjects[0].id: {why}"
    assert parse_subject({"id": "jdoe@example.com"}, "s").id == "jdoe@example.com"
