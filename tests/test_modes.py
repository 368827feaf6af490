"""What an impersonation may do: ``X-Impersonation-Mode`` on every dialect's mint and ``mode`` in the native API,
the app's ``session.mode`` as default and most, ``read_only`` refused where no session would hold it to it; the
mode kept in the stored grant (only when it is not ``full``), and every refusal in the caller's own shape."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.config import config_from_dict
from gateway.core import MODE_HEADER, MODES, Grant, ImpersonationCommand, SubjectRef, grant_id, parse_mode
from gateway.errors import Forbidden, Invalid
from gateway.policy import grant_mode
from gateway.store import Store
from tests.conftest import GatewayFactory
from tests.fixtures import DEMO_APPS, DEMO_MINTS, DIRECTORY


@dataclass(frozen=True)
class Mint:
    """One dialect's demo mint request, and where its answer holds the grant's token."""

    app: str
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes | None = None

    async def send(self, client: TestClient[Any, Any], *modes: str) -> Any:
        headers = [*self.headers.items(), *((MODE_HEADER, mode) for mode in modes)]
        return await client.request(self.method, self.path, headers=headers, data=self.body)

    async def token(self, response: Any) -> str:
        text = await response.text()
        if self.app == "analytics":
            return text
        body = json.loads(text)
        return str(body["owner_token"] if self.app == "control-panel" else body["token"])


MINTS = {dialect: Mint(*request) for dialect, request in DEMO_MINTS.items()}

# Each dialect's answer to a mode above the app's, and to a bad mode (another value, or several headers).
FORBIDDEN = {
    "activeplatform": (403, {"errors": [{"status": "403", "code": "forbidden", "title": "Forbidden",
                                         "detail": "The X-Impersonation-Mode header asks for a mode not allowed for "
                                                   "this app."}]}),
    "pyramid": (403, "Not allowed: the X-Impersonation-Mode is not allowed for this app"),
    "denovolab": (403, {"error_type": "forbidden_error", "success": False,
                        "error": {"message": "The X-Impersonation-Mode is not allowed for this app", "code": 121,
                                  "reason": "mode_not_allowed"}}),
    "btcdirect": (403, {"errors": {"ER926": {
        "code": "ER926", "message": "Impersonation mode not allowed.",
        "solution": "Ask for the app's mode or a lesser one in the X-Impersonation-Mode header, or leave the header "
                    "out."}}}),
}  # fmt: skip
BAD = {
    "activeplatform": (400, {"errors": [{"status": "400", "code": "invalid_parameter", "title": "Bad Request",
                                         "detail": "The X-Impersonation-Mode header must be one of: full, "
                                                   "read_only."}]}),
    "pyramid": (400, "X-Impersonation-Mode must be one of: full, read_only"),
    "denovolab": (400, {"error_type": "validation_error", "success": False,
                        "errors": [{"X-Impersonation-Mode": ["Must be one of: full, read_only."]}]}),
    "btcdirect": (400, {"errors": {"ER927": {"code": "ER927", "message": "Impersonation mode is invalid.",
                                             "solution": "Send one X-Impersonation-Mode header: full or "
                                                         "read_only."}}}),
}  # fmt: skip


def apps(session: Any = "absent") -> dict[str, Any]:
    """The demo apps, each with ``session`` (left out when "absent")."""
    return {name: {**app, **({} if session == "absent" else {"session": session})} for name, app in DEMO_APPS.items()}


async def answer(response: Any) -> tuple[int, Any]:
    text = await response.text()
    return response.status, text if response.content_type == "text/plain" else json.loads(text)


async def stored(redis_client: Any, prefix: str, token: str) -> dict[str, Any]:
    """The grant of ``token`` as the store keeps it (its JSON)."""
    (data,) = await Store(redis_client, prefix).grants([grant_id(token)])
    assert data is not None
    found: dict[str, Any] = orjson.loads(data)
    return found


async def no_grants(redis_client: Any, prefix: str) -> bool:
    return [k async for k in redis_client.scan_iter(match=f"{prefix}grant:*")] == []


# -- every dialect, over a socket ---------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", MINTS)
@pytest.mark.parametrize(
    ("session", "modes", "kept"),
    [
        ("absent", (), None),  # a hand-off app: its grants are as before, with no mode stored
        ("absent", ("full",), None),
        ({}, (), None),  # session: {} holds sessions in full mode
        ({}, ("full",), None),
        ({}, (" read_only ",), "read_only"),  # blanks around the value aside
        ({"mode": "read_only"}, (), "read_only"),  # the app's mode is the default
        ({"mode": "read_only"}, ("read_only",), "read_only"),
    ],
    ids=["hand-off", "hand-off-full", "session", "session-full", "session-read-only", "read-only-app", "asked"],
)
async def test_a_mode_within_the_apps_is_minted_and_kept_in_the_grant(
    gateway: GatewayFactory, redis_client: Any, prefix: str, dialect: str, session: Any, modes: tuple[str, ...],
    kept: str | None,
) -> None:  # fmt: skip
    mint = MINTS[dialect]
    client = await gateway(apps=apps(session), directory=DIRECTORY)
    response = await mint.send(client, *modes)
    assert response.status == 200, await response.text()
    grant = await stored(redis_client, prefix, await mint.token(response))
    assert grant.get("mode") == kept
    assert ("mode" in grant) == (kept is not None)  # a full grant's JSON is as small as before


@pytest.mark.parametrize("dialect", MINTS)
@pytest.mark.parametrize(("session", "mode"), [("absent", "read_only"), ({"mode": "read_only"}, "full")],
                         ids=["hand-off-read-only", "read-only-app-full"])  # fmt: skip
async def test_a_mode_above_the_apps_is_a_403_in_the_dialects_shape(
    gateway: GatewayFactory, redis_client: Any, prefix: str, dialect: str, session: Any, mode: str
) -> None:
    mint = MINTS[dialect]
    client = await gateway(apps=apps(session), directory=DIRECTORY)
    assert await answer(await mint.send(client, mode)) == FORBIDDEN[dialect]
    assert await no_grants(redis_client, prefix)


@pytest.mark.parametrize("dialect", MINTS)
@pytest.mark.parametrize(
    "modes", [("write",), ("",), ("FULL",), ("read-only",), ("full", "full"), ("full", "read_only")],
    ids=["other", "empty", "upper", "dash", "twice", "two"],
)  # fmt: skip
async def test_a_bad_mode_is_a_400_in_the_dialects_shape(
    gateway: GatewayFactory, redis_client: Any, prefix: str, dialect: str, modes: tuple[str, ...]
) -> None:
    mint = MINTS[dialect]
    client = await gateway(apps=apps({}), directory=DIRECTORY)
    assert await answer(await mint.send(client, *modes)) == BAD[dialect]
    assert await no_grants(redis_client, prefix)


async def test_the_mode_is_checked_after_the_actors_credential(gateway: GatewayFactory) -> None:
    """A stranger learns nothing of an app's modes: an unknown credential is refused as before."""
    client = await gateway(apps=apps("absent"), directory=DIRECTORY)
    mint = MINTS["activeplatform"]
    response = await client.get(mint.path, headers={"X-Api-Token": "guess", MODE_HEADER: "read_only"})
    assert response.status == 401


# -- the native API -----------------------------------------------------------------------------------------
AP = "vY5fwetestK3gJXZH5uHCw"
PROBLEM = "application/problem+json"


async def native(client: TestClient[Any, Any], **fields: Any) -> Any:
    body = {"app": "control-panel", "subject": "505", **fields}
    return await client.post("/v1/grants", json=body, headers={"Authorization": f"Bearer {AP}"})


@pytest.mark.parametrize(
    ("session", "fields", "kept"),
    [
        ("absent", {}, None),
        ("absent", {"mode": "full"}, None),
        ("absent", {"mode": None}, None),
        ({}, {"mode": "read_only"}, "read_only"),
        ({"mode": "read_only"}, {}, "read_only"),
    ],
    ids=["hand-off", "hand-off-full", "null", "session-read-only", "read-only-app"],
)
async def test_native_mode_is_minted_and_kept_in_the_grant(
    gateway: GatewayFactory, redis_client: Any, prefix: str, session: Any, fields: dict[str, Any], kept: str | None
) -> None:
    client = await gateway(apps=apps(session), directory=DIRECTORY)
    response = await native(client, **fields)
    assert response.status == 201, await response.text()
    body = await response.json()
    (data,) = await Store(redis_client, prefix).grants([body["grant_id"]])
    assert data is not None
    assert Grant.from_json(body["grant_id"], data).mode == kept


@pytest.mark.parametrize(
    ("session", "fields", "status", "detail"),
    [
        ("absent", {"mode": "read_only"}, 403, "mode: more than this app allows (its session's mode; read_only only "
                                               "in an app holding sessions)"),
        ({"mode": "read_only"}, {"mode": "full"}, 403, "mode: more than this app allows (its session's mode; "
                                                       "read_only only in an app holding sessions)"),
        ({}, {"mode": "write"}, 400, "mode: one of full, read_only"),
        ({}, {"mode": 1}, 400, "mode: one of full, read_only"),
        ({}, {"mode": ["full"]}, 400, "mode: one of full, read_only"),
    ],
    ids=["hand-off-read-only", "read-only-app-full", "other", "number", "list"],
)  # fmt: skip
async def test_native_mode_refusals_are_problem_details(
    gateway: GatewayFactory, redis_client: Any, prefix: str, session: Any, fields: dict[str, Any], status: int,
    detail: str,
) -> None:  # fmt: skip
    client = await gateway(apps=apps(session), directory=DIRECTORY)
    response = await native(client, **fields)
    assert response.status == status
    assert response.content_type == PROBLEM
    kind, title = ("mode-not-allowed", "Mode not allowed") if status == 403 else ("invalid-request", "Invalid request")
    assert await response.json() == {"type": f"urn:impersonation-gateway:problem:{kind}", "title": title,
                                     "status": status, "detail": detail}  # fmt: skip
    assert await no_grants(redis_client, prefix)


async def test_native_ignores_the_mode_header(gateway: GatewayFactory, redis_client: Any, prefix: str) -> None:
    """The native API takes its mode in the body: the dialects' header means nothing there."""
    client = await gateway(apps=apps("absent"), directory=DIRECTORY)
    response = await client.post("/v1/grants", json={"app": "control-panel", "subject": "505"},
                                 headers={"Authorization": f"Bearer {AP}", MODE_HEADER: "read_only"})  # fmt: skip
    assert response.status == 201


# -- the rules themselves -----------------------------------------------------------------------------------
def _app(session: Any = "absent") -> Any:
    settings = {"dialect": "activeplatform", "upstream": "http://app.test"}
    if session != "absent":
        settings["session"] = session
    return config_from_dict({"apps": {"a": settings}}).app("a")


@pytest.mark.parametrize(
    ("session", "asked", "expected"),
    [
        ("absent", None, "full"),
        ("absent", "full", "full"),
        ("absent", "read_only", Forbidden),
        ({}, None, "full"),
        ({}, "full", "full"),
        ({}, "read_only", "read_only"),
        ({"mode": "read_only"}, None, "read_only"),
        ({"mode": "read_only"}, "read_only", "read_only"),
        ({"mode": "read_only"}, "full", Forbidden),
        ({}, "write", Invalid),
    ],
)
def test_grant_mode(session: Any, asked: str | None, expected: str | type[Exception]) -> None:
    app = _app(session)
    if isinstance(expected, str):
        assert grant_mode(app, asked) == expected
        return
    with pytest.raises(expected) as caught:
        grant_mode(app, asked)
    assert vars(caught.value) == ({"reason": "mode"} if expected is Forbidden else {"field": "mode", "reason": "value"})


def test_parse_mode() -> None:
    assert MODES == ("full", "read_only")
    assert parse_mode([]) is None
    assert parse_mode(["full"]) == "full"
    assert parse_mode([" read_only\t"]) == "read_only"
    for bad in (["write"], [""], ["Full"], ["full", "full"], ["read_only", "full"]):
        with pytest.raises(Invalid) as caught:
            parse_mode(bad)
        assert (caught.value.field, caught.value.reason) == ("mode", "value")


def test_a_full_grant_stores_no_mode() -> None:
    grant = Grant("g" * 16, "a", "activeplatform", "s", "x", "admin", "k", 1, 2)
    assert b"mode" not in grant.to_json()
    read_only = Grant("g" * 16, "a", "activeplatform", "s", "x", "admin", "k", 1, 2, mode="read_only")
    assert orjson.loads(read_only.to_json())["mode"] == "read_only"
    assert Grant.from_json("g" * 16, read_only.to_json()) == read_only
    assert ImpersonationCommand("a", "activeplatform", None, SubjectRef(), "c").mode is None
