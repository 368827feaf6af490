"""Why someone impersonated: ``X-Impersonation-Reason`` on every dialect's mint, ``require_reason`` per app, the
reason in the audit events and in the assertion; bad reasons answered in each dialect's shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.core import parse_reason
from gateway.errors import Invalid
from tests.conftest import GatewayFactory, Upstream
from tests.fixtures import DEMO_APPS, DEMO_MINTS, DIRECTORY

REASON = "ticket 4711: the customer cannot see last month's invoices"


@dataclass(frozen=True)
class Mint:
    """One dialect's demo mint request, and how its answer becomes a login link."""

    app: str
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes | None = None

    async def send(self, client: TestClient[Any, Any], reason: str | None = None, *more: str) -> Any:
        headers = [*self.headers.items(), *(("X-Impersonation-Reason", r) for r in ((reason, *more) if reason else ()))]
        return await client.request(self.method, self.path, headers=headers, data=self.body)

    async def send_raw(self, client: TestClient[Any, Any], *reasons: bytes) -> tuple[int, Any]:
        """The request as bytes on a socket, reason headers as given (HTTP clients refuse control characters)."""
        lines = [f"{self.method} {self.path} HTTP/1.1".encode(), b"Host: gateway.test", b"Connection: close"]
        lines += [f"{k}: {v}".encode() for k, v in self.headers.items()]
        lines += [b"X-Impersonation-Reason: " + r for r in reasons]
        lines.append(f"Content-Length: {len(self.body or b'')}".encode())
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + (self.body or b""))
        head, _, body = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
        status = int(head.split(b" ")[1])
        return status, body.decode() if b"text/plain" in head else json.loads(body)

    async def link(self, response: Any) -> str:
        text = await response.text()
        if self.app == "control-panel":
            body = json.loads(text)
            return f"/?user_email={body['owner_email']}&user_token={body['owner_token']}"
        if self.app == "analytics":
            return f"/?token={text}"
        if self.app == "switch":
            return f"/?token={json.loads(text)['token']}"
        body = json.loads(text)
        return f"/kyc?token={body['token']}&uuid={body['uuid']}"


MINTS = {dialect: Mint(*request) for dialect, request in DEMO_MINTS.items()}

# Each dialect's answer to a mint without a reason where one is required, and to a bad reason.
MISSING = {
    "activeplatform": (400, {"errors": [{"status": "400", "code": "invalid_parameter", "title": "Bad Request",
                                         "detail": "The X-Impersonation-Reason header is required."}]}),
    "pyramid": (400, "Missing X-Impersonation-Reason header"),
    "denovolab": (400, {"error_type": "validation_error", "success": False,
                        "errors": [{"X-Impersonation-Reason": ["Missing data for required field."]}]}),
    "btcdirect": (400, {"errors": {"ER924": {"code": "ER924", "message": "Impersonation reason not found.",
                                             "solution": "Say why in the X-Impersonation-Reason header."}}}),
}  # fmt: skip
BAD = {
    "activeplatform": (400, {"errors": [{"status": "400", "code": "invalid_parameter", "title": "Bad Request",
                                         "detail": "The X-Impersonation-Reason header must be 200 printable "
                                                   "characters at most."}]}),
    "pyramid": (400, "X-Impersonation-Reason must be 200 printable characters at most"),
    "denovolab": (400, {"error_type": "validation_error", "success": False,
                        "errors": [{"X-Impersonation-Reason": ["Invalid value."]}]}),
    "btcdirect": (400, {"errors": {"ER925": {"code": "ER925", "message": "Impersonation reason is invalid.",
                                             "solution": "Send one X-Impersonation-Reason of 200 printable "
                                                         "characters at most."}}}),
}  # fmt: skip


def apps(require_reason: bool) -> dict[str, Any]:
    return {name: {**app, "redeem_on_get": True, "require_reason": require_reason} for name, app in DEMO_APPS.items()}


async def answer(response: Any) -> tuple[int, Any]:
    text = await response.text()
    return response.status, text if response.content_type == "text/plain" else json.loads(text)


@pytest.mark.parametrize("dialect", MINTS)
async def test_the_reason_reaches_the_audit_and_the_assertion(
    gateway: GatewayFactory, upstream: Upstream, redis_client: Any, prefix: str, dialect: str
) -> None:
    mint = MINTS[dialect]
    client = await gateway(apps=apps(require_reason=True), directory=DIRECTORY)
    response = await mint.send(client, f"  {REASON}  ")
    assert response.status == 200, await response.text()
    redeemed = await client.get(await mint.link(response))
    assert redeemed.status == 200
    assert upstream.claims(audience=mint.app)["reason"] == REASON  # surrounding blanks dropped
    events = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in
              await redis_client.xrange(f"{prefix}audit")]  # fmt: skip
    assert [e["event"] for e in events if e["app"] == mint.app][:1] == ["grant_minted"]
    assert {e["event"]: e.get("reason") for e in events} == {"grant_minted": REASON, "grant_redeemed": REASON}


@pytest.mark.parametrize("dialect", MINTS)
async def test_a_required_reason_missing_or_blank_is_a_400_in_the_dialects_shape(
    gateway: GatewayFactory, redis_client: Any, prefix: str, dialect: str
) -> None:
    mint = MINTS[dialect]
    client = await gateway(apps=apps(require_reason=True), directory=DIRECTORY)
    assert await answer(await mint.send(client)) == MISSING[dialect]
    assert await answer(await mint.send(client, "   ")) == MISSING[dialect]
    assert [k async for k in redis_client.scan_iter(match=f"{prefix}grant:*")] == []


@pytest.mark.parametrize("dialect", MINTS)
@pytest.mark.parametrize(
    "reasons",
    [(b"x" * 201,), (b"del\x7fhere",), (b"tab\there",), (b"nul\x00here",), (b"\xff\xfe",), (b"one", b"two")],
    ids=["long", "del", "tab", "nul", "not-utf8", "two"],
)
async def test_a_bad_reason_is_a_400_in_the_dialects_shape(
    gateway: GatewayFactory, dialect: str, reasons: tuple[bytes, ...]
) -> None:
    mint = MINTS[dialect]
    client = await gateway(apps=apps(require_reason=False), directory=DIRECTORY)
    status, body = await mint.send_raw(client, *reasons)
    if b"\x00" in reasons[0] or b"\x7f" in reasons[0]:  # the HTTP parser refuses these before any dialect
        assert status == 400
        return
    assert (status, body) == BAD[dialect]


async def test_without_require_reason_a_mint_needs_none_and_the_assertion_has_no_reason_claim(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    mint = MINTS["activeplatform"]
    client = await gateway(apps=apps(require_reason=False), directory=DIRECTORY)
    response = await mint.send(client)
    assert response.status == 200
    assert (await client.get(await mint.link(response))).status == 200
    assert "reason" not in upstream.claims()


def test_parse_reason() -> None:
    assert parse_reason([]) is None
    assert parse_reason(["  "]) is None
    assert parse_reason(["x" * 200]) == "x" * 200
    assert parse_reason(["Ticket #4711 — customer can't log in"]) == "Ticket #4711 — customer can't log in"
    for bad in (["x" * 201], ["a\x00b"], ["a\rb"], ["a", "b"], ["\udcff"]):
        with pytest.raises(Invalid) as caught:
            parse_reason(bad)
        assert (caught.value.field, caught.value.reason) == ("reason", "value")
