"""The OpenAPI description kept true: ``gateway/openapi.yaml`` is what ``impersonation-gateway openapi`` generates
from the declarations (a golden file), it is valid OpenAPI 3.1, it names every route the dialects and the app define
and nothing else, and real answers to real requests (every documented status of every operation) fit it.

``tests.fixtures.assert_conforms`` is the one place that judges an answer against the description.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import importlib.metadata
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jsonschema_rs
import pytest
import redis.asyncio as aioredis
import schemathesis
import yaml
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from gateway import openapi
from gateway.app import OPERATIONS, Operation, create_app
from gateway.cli import main
from gateway.core import Gateway
from gateway.dialects import all_dialects
from gateway.dialects.btcdirect import CATALOGUE, BtcDirect
from gateway.errors import UpstreamUnavailable
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.sessions import COOKIE, END_PATH, INFO_PATH, expire_cookie, session_id, set_cookie
from tests.conftest import KEY, PUBLIC_URL, GatewayFactory, Upstream, free_port, make_config
from tests.fixtures import (
    DEMO_APPS,
    DIRECTORY,
    ROOT,
    SPEC,
    assert_answer_conforms,
    assert_conforms,
    documented_statuses,
    find_operation,
    operations,
    resolve,
    sample_path,
)

GOLDEN = Path(openapi.__file__).with_name("openapi.yaml")
DIALECT_TAGS = frozenset(all_dialects())
TAGS = {tag["name"]: tag["description"] for tag in SPEC["tags"]}


# -- the description itself ---------------------------------------------------------------------------------
def test_the_description_is_the_generated_one() -> None:
    """Regenerate with ``.venv/bin/impersonation-gateway openapi --config config.yaml > gateway/openapi.yaml`` (or
    ``python -c 'from tests.test_openapi import write_golden; write_golden()'``) after a change, and review the diff."""
    assert openapi.render() == GOLDEN.read_text(encoding="utf-8"), (
        "gateway/openapi.yaml is not what the declarations generate: review the change and regenerate it"
    )
    assert yaml.safe_load(openapi.render()) == openapi.document() == SPEC


def test_the_command_prints_the_committed_description(capsys: pytest.CaptureFixture[str]) -> None:
    """``impersonation-gateway openapi`` for the repository's config (an app per dialect) is the committed file."""
    assert main(["openapi", "--config", str(ROOT / "config.yaml")]) == 0
    assert capsys.readouterr().out == GOLDEN.read_text(encoding="utf-8")


def write_golden() -> None:
    GOLDEN.write_text(openapi.render(), encoding="utf-8")


def test_description_is_valid_openapi_3_1() -> None:
    assert SPEC["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(copy.deepcopy(SPEC)).validate()  # against the OpenAPI 3.1 meta-schema
    assert SPEC["info"]["version"] == importlib.metadata.version("impersonation-gateway")
    for method, template, operation in operations():
        assert set(operation["tags"]) & (DIALECT_TAGS | {"operations", "native", "sessions"}), (
            f"{method} {template}: no tag"
        )
        assert operation["operationId"]


def test_every_dialect_endpoint_is_described_and_nothing_else() -> None:
    """The description is checked against the dialects' own declarations: endpoints and body carriers."""
    for dialect in all_dialects().values():
        declared = {(e.method, e.template) for e in dialect.endpoints}
        declared |= {(c.endpoint.method, c.endpoint.template) for c in dialect.carriers if c.endpoint is not None}
        described = {(m, t) for m, t, op in operations() if dialect.name in op["tags"] and not _refused(op)}
        assert described == declared, dialect.name
        for method, template, operation in operations():
            if dialect.name not in operation["tags"]:
                continue
            if _refused(operation):  # another method on a mint or info path: 405, with Allow
                assert dialect.match(method, sample_path(template)) is None
                assert dialect.methods_at(sample_path(template)), f"{method} {template}"
                continue
            if "redemption" in operation["tags"]:  # a body carrier's endpoint, not a mint endpoint
                assert dialect.match(method, sample_path(template)) is None
                continue
            matched = dialect.match(method, sample_path(template))
            assert matched is not None and matched[0].template == template, f"{method} {template}"
            declared_params = {
                p["name"] for p in (resolve(p, "")[0] for p in operation.get("parameters", [])) if p["in"] == "path"
            }
            assert declared_params == set(matched[1]), f"{method} {template}: path parameters"


def _refused(operation: dict[str, Any]) -> bool:
    return set(operation["responses"]) == {"405"}


def test_every_operations_route_is_described_and_nothing_else() -> None:
    assert {("GET", path) for path in OPERATIONS} == {(m, t) for m, t, op in operations() if "operations" in op["tags"]}


def test_operations_answer_on_the_hosts_the_table_says() -> None:
    for path, operation in OPERATIONS.items():
        description = SPEC["paths"][path]["get"]["description"]
        assert ("every host" in description) is operation.every_host, path
        assert ("own host names only" in description) is not operation.every_host, path


def test_every_metric_is_described() -> None:
    described = SPEC["paths"]["/metrics"]["get"]["description"]
    names = {m.name for m in Metrics().registry.collect()}
    assert names >= {"gateway_grants_revoked", "gateway_request_duration_seconds"}
    for name in names:
        assert name in described, name


def test_another_method_on_a_mint_path_is_405_with_allow() -> None:
    for method, template, operation in operations():
        if _refused(operation):
            response, _ = resolve(operation["responses"]["405"], "")
            assert response["headers"]["Allow"]["required"], f"{method} {template}"
            assert method not in response["headers"]["Allow"]["schema"]["const"].split(", ")


def test_redemptions_document_429_502_and_504() -> None:
    responses = SPEC["paths"]["/api/v2/user/login-with-token"]["post"]["responses"]
    assert {"401", "429", "502", "503", "504", "default"} <= set(responses)
    for dialect in DIALECT_TAGS:
        assert {f"{dialect}Redeem{s}" for s in (401, 429, 500, 502, 503, 504)} <= set(SPEC["components"]["responses"])


def test_btcdirect_error_codes_are_the_catalogue() -> None:
    def codes(status: str, template: str = "/api/v1/user/login-token", method: str = "get") -> set[str]:
        response, _ = resolve(SPEC["paths"][template][method]["responses"][status], "")
        schema = response["content"]["application/json"]["schema"]
        return {code for one in schema.get("anyOf", [schema]) for code in one["properties"]["errors"]["properties"]}

    by_status = {s: {c for c, e in CATALOGUE.items() if e.status == s} for s in (400, 408, 413, 415, 429, 500)}
    assert codes("400") <= by_status[400]  # the codes the dialect answers with, every one in the catalogue
    assert {"ER700", "ER702", "ER703", "ER704", "ER705", "ER707", "ER800", "ER802", "ER803", "ER805"} <= codes("400")
    assert all(f"| {code} | {e.status} |" in TAGS["btcdirect"] for code, e in CATALOGUE.items())
    assert codes("408") == by_status[408] == {"ER923"}
    assert codes("413") == by_status[413] == {"ER921"}
    assert codes("415", "/api/v2/user/login-with-token", "post") == by_status[415] == {"ER922"}
    assert codes("429") == by_status[429] == {"ER920"}
    assert codes("500") == codes("503") == by_status[500] == {"ER999"}


async def test_openapi_json_is_the_yaml(gateway: GatewayFactory) -> None:
    client = await gateway()
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == SPEC
    await assert_answer_conforms(response, "GET", "/openapi.json")


BODY_LIMIT = 1024
TOO_LARGE = b"x" * (2 * BODY_LIMIT)
GZIP_BOMB = gzip.compress(b"{" + b" " * (64 * BODY_LIMIT) + b"}")  # small on the wire, over the limit decoded

AP = "/api/v3/resellers/{}/user_authentication/token"
AP_TOKEN = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
P3, P2 = "/API3/authentication/authenticateUserByToken", "/API2/auth/authenticateUserByToken"
EA, DA = "pyramid-enterprise-admin-token", "pyramid-sales-domain-admin-token"
DN = "/v1/auth/as_client"
DN_TOKEN = {"X-Auth-Token": "denovolab-demo-admin-token"}
BTC, INFO, WITH_TOKEN = "/api/v1/user/login-token", "/api/v1/system/info", "/api/v2/user/login-with-token"
PARTNER = {"Authorization": "Bearer btcdirect-partner-demo-token"}
USER_ID = {"User-Identifier": "7c3f9a1e2b4d6f8091a3c5e7f9b1d3e5a7c9e1f3"}
LONG_REASON = {"X-Impersonation-Reason": "x" * 201}
# The demo apps, the Denovolab one holding sessions (whatever config.yaml says): the session endpoints are the
# gateway's on its route.
SESSION_APPS: dict[str, Any] = {
    name: {**{k: v for k, v in app.items() if k != "session"}, **({"session": {}} if name == "switch" else {})}
    for name, app in DEMO_APPS.items()
}
NO_SESSION = {"Cookie": f"{COOKIE}={'A' * 32}"}  # a well-formed cookie naming no session


@dataclass(frozen=True)
class Scenario:
    status: int
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    # demo | limited (one failed credential, limit 1) | down (no store) | broken | slow | session (SESSION_APPS)
    setup: str = "demo"

    @property
    def path(self) -> str:
        return unquote(self.url.partition("?")[0])


def pyramid(
    status: int, fields: Any, path: str = P3, setup: str = "demo", reason: Mapping[str, str] | None = None
) -> Scenario:
    body = fields if isinstance(fields, bytes) else json.dumps({"data": fields} if path == P2 else fields).encode()
    return Scenario(status, "POST", path, {"Content-Type": "application/json", **(reason or {})}, body, setup)


def denovolab(status: int, body: Any, headers: Mapping[str, str] = DN_TOKEN, setup: str = "demo") -> Scenario:
    return Scenario(status, "POST", DN, headers, body if isinstance(body, bytes) else json.dumps(body).encode(), setup)


NATIVE_AUTH = {"Authorization": "Bearer vY5fwetestK3gJXZH5uHCw"}


def native(status: int, body: Any, credential: str | None = "vY5fwetestK3gJXZH5uHCw", setup: str = "demo") -> Scenario:
    headers = {"Content-Type": "application/json"}
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Scenario(status, "POST", "/v1/grants", headers, data, setup)


SCENARIOS: dict[str, Scenario] = {
    # activeplatform, both forms
    "ap-200": Scenario(200, "GET", AP.format(1) + "?account_id=505", AP_TOKEN),
    "ap-200-downstream": Scenario(200, "GET", AP.format(7) + "?account_id=707", AP_TOKEN),
    "ap-400-missing": Scenario(400, "GET", AP.format(1), AP_TOKEN),
    "ap-400-value": Scenario(400, "GET", AP.format(1) + "?account_id=five", AP_TOKEN),
    "ap-400-reason": Scenario(400, "GET", AP.format(1) + "?account_id=505", {**AP_TOKEN, **LONG_REASON}),
    "ap-401-missing": Scenario(401, "GET", AP.format(1) + "?account_id=505"),
    "ap-401-unknown": Scenario(401, "GET", AP.format(1) + "?account_id=505", {"X-Api-Token": "guess"}),
    "ap-403-role": Scenario(403, "GET", AP.format(1) + "?account_id=505", {"X-Api-Token": "marketing-manager-token"}),
    "ap-403-scope": Scenario(403, "GET", AP.format(1) + "?account_id=505", {"X-Api-Token": "reseller7-manager-token"}),
    "ap-404-reseller": Scenario(404, "GET", AP.format(2) + "?account_id=505", AP_TOKEN),
    "ap-404-reseller-name": Scenario(404, "GET", AP.format("one") + "?account_id=505", AP_TOKEN),
    "ap-404-account": Scenario(404, "GET", AP.format(1) + "?account_id=909", AP_TOKEN),
    "ap-404-newline": Scenario(404, "GET", AP.format("%0A") + "?account_id=505", AP_TOKEN),
    "ap-413": Scenario(413, "GET", AP.format(1) + "?account_id=505", AP_TOKEN, TOO_LARGE),
    "ap-408": Scenario(408, "GET", AP.format(1) + "?account_id=505", AP_TOKEN, b"{}", setup="slow"),
    "ap-429": Scenario(429, "GET", AP.format(1) + "?account_id=505", AP_TOKEN, setup="limited"),
    "ap-500": Scenario(500, "GET", AP.format(1) + "?account_id=505", AP_TOKEN, setup="broken"),
    "ap-503": Scenario(503, "GET", AP.format(1) + "?account_id=505", AP_TOKEN, setup="down"),
    "ap-path-200": Scenario(200, "GET", AP.format(1) + "/505", AP_TOKEN),
    "ap-path-400": Scenario(400, "GET", AP.format(1) + "/five", AP_TOKEN),
    "ap-path-401": Scenario(401, "GET", AP.format(1) + "/505"),
    "ap-path-403": Scenario(403, "GET", AP.format(1) + "/505", {"X-Api-Token": "marketing-manager-token"}),
    "ap-path-404": Scenario(404, "GET", AP.format(1) + "/404", AP_TOKEN),
    "ap-path-413": Scenario(413, "GET", AP.format(1) + "/505", AP_TOKEN, TOO_LARGE),
    "ap-path-408": Scenario(408, "GET", AP.format(1) + "/505", AP_TOKEN, b"{}", setup="slow"),
    "ap-path-429": Scenario(429, "GET", AP.format(1) + "/505", AP_TOKEN, setup="limited"),
    "ap-path-500": Scenario(500, "GET", AP.format(1) + "/505", AP_TOKEN, setup="broken"),
    "ap-path-503": Scenario(503, "GET", AP.format(1) + "/505", AP_TOKEN, setup="down"),
    # pyramid, API3 and API2
    "p3-200": pyramid(200, {"token": EA, "userIdentity": "jdoe", "customData": "ticket=4711"}),
    "p3-200-windows": pyramid(200, {"token": DA, "userIdentity": "SALES\\jdoe", "domain": "sales.example.com"}),
    "p3-400-empty": pyramid(400, b""),
    "p3-400-json": pyramid(400, b"{not json"),
    "p3-400-array": pyramid(400, b"[]"),
    "p3-400-missing": pyramid(400, {"token": EA}),
    "p3-400-type": pyramid(400, {"token": EA, "userIdentity": 7}),
    "p3-400-long": pyramid(400, {"token": EA, "userIdentity": "j" * 600}),
    "p3-400-mismatch": pyramid(400, {"token": EA, "userIdentity": "HR\\jdoe", "domain": "sales.example.com"}),
    "p3-400-unknown": pyramid(400, {"token": EA, "userIdentity": "nobody"}),
    "p3-400-reason": pyramid(400, {"token": EA, "userIdentity": "jdoe"}, reason=LONG_REASON),
    "p3-401-missing": pyramid(401, {"userIdentity": "jdoe"}),
    "p3-401-unknown": pyramid(401, {"token": "guess", "userIdentity": "jdoe"}),
    "p3-403-domain": pyramid(403, {"token": DA, "userIdentity": "asmith"}),
    "p3-413": Scenario(413, "POST", P3, {}, TOO_LARGE),
    "p3-408": pyramid(408, {"token": EA, "userIdentity": "jdoe"}, setup="slow"),
    "p3-413-gzip-bomb": Scenario(413, "POST", P3, {"Content-Encoding": "gzip"}, GZIP_BOMB),
    "p3-415": Scenario(415, "POST", P3, {"Content-Encoding": "br"}, b"\x1b\x00"),
    "p3-415-corrupt": Scenario(415, "POST", P3, {"Content-Encoding": "gzip"}, b"not gzip at all"),
    "p3-429": pyramid(429, {"token": EA, "userIdentity": "jdoe"}, setup="limited"),
    "p3-500": pyramid(500, {"token": EA, "userIdentity": "jdoe"}, setup="broken"),
    "p3-503": pyramid(503, {"token": EA, "userIdentity": "jdoe"}, setup="down"),
    "p2-200": pyramid(200, {"token": EA, "userIdentity": "jdoe@example.com"}, P2),
    "p2-400-data": pyramid(400, b'{"token": "x"}', P2),
    "p2-400-type": pyramid(400, b'{"data": "jdoe"}', P2),
    "p2-401": pyramid(401, {"token": "guess", "userIdentity": "jdoe"}, P2),
    "p2-403": pyramid(403, {"token": DA, "userIdentity": "asmith"}, P2),
    "p2-413": Scenario(413, "POST", P2, {}, TOO_LARGE),
    "p2-408": pyramid(408, {"token": EA, "userIdentity": "jdoe"}, P2, setup="slow"),
    "p2-415": Scenario(415, "POST", P2, {"Content-Encoding": "zstd"}, b"x"),
    "p2-429": pyramid(429, {"token": EA, "userIdentity": "jdoe"}, P2, setup="limited"),
    "p2-500": pyramid(500, {"token": EA, "userIdentity": "jdoe"}, P2, setup="broken"),
    "p2-503": pyramid(503, {"token": EA, "userIdentity": "jdoe"}, P2, setup="down"),
    # denovolab
    "dn-200": denovolab(200, {"client_id": "41"}),
    "dn-200-number": denovolab(200, {"client_id": 41}),
    "dn-400-missing": denovolab(400, {}),
    "dn-400-reason": denovolab(400, {"client_id": 41}, {**DN_TOKEN, **LONG_REASON}),
    "dn-400-empty": denovolab(400, b""),
    "dn-400-json": denovolab(400, b"{"),
    "dn-400-array": denovolab(400, [41]),
    "dn-400-null": denovolab(400, {"client_id": None}),
    "dn-400-type": denovolab(400, {"client_id": "forty-one"}),
    "dn-400-large": denovolab(400, {"client_id": 10**30}),
    "dn-401-missing": denovolab(401, {"client_id": 41}, {}),
    "dn-401-unknown": denovolab(401, {"client_id": 41}, {"X-Auth-Token": "guess"}),
    "dn-403": denovolab(403, {"client_id": 41}, {"X-Auth-Token": "denovolab-viewer-token"}),
    "dn-404": denovolab(404, {"client_id": 42}),
    "dn-413": Scenario(413, "POST", DN, DN_TOKEN, TOO_LARGE),
    "dn-408": denovolab(408, {"client_id": 41}, setup="slow"),
    "dn-415": Scenario(415, "POST", DN, {**DN_TOKEN, "Content-Encoding": "deflate"}, b"not deflate"),
    "dn-429": denovolab(429, {"client_id": 41}, setup="limited"),
    "dn-500": denovolab(500, {"client_id": 41}, setup="broken"),
    "dn-503": denovolab(503, {"client_id": 41}, setup="down"),
    # btcdirect
    "btc-200": Scenario(200, "GET", BTC, {**PARTNER, **USER_ID}),
    "btc-200-key-user-token": Scenario(
        200,
        "GET",
        BTC,
        {"X-Api-Key": "btcdirect-partner-demo-token", "User-Authorization": "Bearer btcdirect-user-demo-token"},
    ),
    "btc-400-ER802": Scenario(400, "GET", BTC, USER_ID),
    "btc-400-ER925": Scenario(400, "GET", BTC, {**PARTNER, **USER_ID, **LONG_REASON}),
    "btc-400-ER927": Scenario(400, "GET", BTC, {**PARTNER, **USER_ID, "X-Impersonation-Mode": "write"}),
    "btc-403-ER926": Scenario(403, "GET", BTC, {**PARTNER, **USER_ID, "X-Impersonation-Mode": "read_only"}),
    "btc-400-ER800": Scenario(400, "GET", BTC, {"Authorization": "Bearer guess", **USER_ID}),
    "btc-400-ER805": Scenario(400, "GET", BTC, {"X-Api-Key": "guess", **USER_ID}),
    "btc-400-ER803": Scenario(400, "GET", BTC, {**PARTNER, "X-Api-Key": "k", **USER_ID}),
    "btc-400-ER704": Scenario(400, "GET", BTC, PARTNER),
    "btc-400-ER707": Scenario(400, "GET", BTC, {**PARTNER, "User-Identifier": "short"}),
    "btc-400-ER705": Scenario(400, "GET", BTC, {**PARTNER, "User-Identifier": "a" * 40}),
    "btc-400-ER702": Scenario(400, "GET", BTC, {**PARTNER, "User-Authorization": "Bearer guess"}),
    "btc-400-ER700": Scenario(400, "GET", BTC, {**PARTNER, "User-Authorization": "Bearer"}),
    "btc-413": Scenario(413, "GET", BTC, {**PARTNER, **USER_ID}, TOO_LARGE),
    "btc-408": Scenario(408, "GET", BTC, {**PARTNER, **USER_ID}, b"{}", setup="slow"),
    "btc-429": Scenario(429, "GET", BTC, {**PARTNER, **USER_ID}, setup="limited"),
    "btc-500": Scenario(500, "GET", BTC, {**PARTNER, **USER_ID}, setup="broken"),
    "btc-503": Scenario(503, "GET", BTC, {**PARTNER, **USER_ID}, setup="down"),
    "info-200": Scenario(200, "GET", INFO),
    "info-500": Scenario(500, "GET", INFO, setup="broken"),
    "with-token-401": Scenario(
        401, "POST", WITH_TOKEN, {}, b'{"uuid": "45b9313b-fa47-4786-baf1-62969dec31f2", "token": "x"}'
    ),
    "with-token-401-garbage": Scenario(401, "POST", WITH_TOKEN, {}, b"\xff\x00"),
    "with-token-413": Scenario(413, "POST", WITH_TOKEN, {}, TOO_LARGE),
    "with-token-408": Scenario(408, "POST", WITH_TOKEN, {}, b'{"uuid": "u", "token": "t"}', setup="slow"),
    "with-token-415": Scenario(415, "POST", WITH_TOKEN, {"Content-Encoding": "compress"}, b"x"),
    "with-token-500": Scenario(500, "POST", WITH_TOKEN, {}, b'{"uuid": "u", "token": "t"}', setup="broken"),
    "with-token-503": Scenario(503, "POST", WITH_TOKEN, {}, b'{"uuid": "u", "token": "t"}', setup="down"),
    # native
    "native-201": native(201, {"app": "control-panel", "subject": "505", "reason": "ticket 1", "custom_data": [1]}),
    "native-201-ttl": native(
        201, {"app": "exchange", "subject": "u-1", "ttl_seconds": 5}, "btcdirect-partner-demo-token"
    ),
    "native-400-body": native(400, b"[1]"),
    "native-400-field": native(400, {"app": "control-panel", "subject": "505", "ttl": 5}),
    "native-400-app": native(400, {"app": "nope", "subject": "505"}),
    "native-400-ttl": native(400, {"app": "control-panel", "subject": "505", "ttl_seconds": 3600}),
    "native-401-missing": native(401, {"app": "control-panel", "subject": "505"}, None),
    "native-401-unknown": native(401, {"app": "control-panel", "subject": "505"}, "guess"),
    "native-403": native(403, {"app": "control-panel", "subject": "505"}, "marketing-manager-token"),
    "native-404": native(404, {"app": "control-panel", "subject": "909"}),
    "native-408": native(408, {"app": "control-panel", "subject": "505"}, setup="slow"),
    "native-413": native(413, TOO_LARGE),
    "native-415": Scenario(415, "POST", "/v1/grants", {**NATIVE_AUTH, "Content-Encoding": "br"}, b"\x1b\x00"),
    "native-429": native(429, {"app": "control-panel", "subject": "505"}, setup="limited"),
    "native-500": native(500, {"app": "control-panel", "subject": "505"}, setup="broken"),
    "native-503": native(503, {"app": "control-panel", "subject": "505"}, setup="down"),
    # operations
    "healthz-200": Scenario(200, "GET", "/healthz"),
    "healthz-500": Scenario(500, "GET", "/healthz", setup="broken"),
    "readyz-200": Scenario(200, "GET", "/readyz"),
    "readyz-503": Scenario(503, "GET", "/readyz", setup="down"),
    "readyz-500": Scenario(500, "GET", "/readyz", setup="broken"),
    "metrics-200": Scenario(200, "GET", "/metrics"),
    "metrics-500": Scenario(500, "GET", "/metrics", setup="broken"),
    "jwks-200": Scenario(200, "GET", "/.well-known/jwks.json"),
    "jwks-500": Scenario(500, "GET", "/.well-known/jwks.json", setup="broken"),
    "openapi-200": Scenario(200, "GET", "/openapi.json"),
    "openapi-500": Scenario(500, "GET", "/openapi.json", setup="broken"),
    # the session endpoints, on a route with an app that holds sessions (a live session's: test_a_session_s_answers)
    "end-200": Scenario(200, "POST", END_PATH, setup="session"),
    "end-200-no-session": Scenario(200, "POST", END_PATH, NO_SESSION, setup="session"),
    "end-200-own-origin": Scenario(200, "POST", END_PATH, {"Origin": PUBLIC_URL, **NO_SESSION}, setup="session"),
    "end-403": Scenario(403, "POST", END_PATH, {"Origin": "https://elsewhere.example", **NO_SESSION}, setup="session"),
    "end-503": Scenario(503, "POST", END_PATH, NO_SESSION, setup="down"),
    "session-401": Scenario(401, "GET", INFO_PATH, setup="session"),
    "session-401-no-session": Scenario(401, "GET", INFO_PATH, NO_SESSION, setup="session"),
    "session-head-401": Scenario(401, "HEAD", INFO_PATH, NO_SESSION, setup="session"),
    "session-503": Scenario(503, "GET", INFO_PATH, NO_SESSION, setup="down"),
}


# Another method on a mint, info or native path: 405 with Allow, for every method the description names.
SCENARIOS.update(
    {
        f"{method.lower()}-{template}-405": Scenario(
            405, method, sample_path(template), setup="session" if "sessions" in operation["tags"] else "demo"
        )
        for method, template, operation in operations()
        if set(operation["responses"]) == {"405"}
    }
)
# Exercised by their own tests, which need a live grant: the app's own answer (test_a_redemption_is_the_apps_answer),
# the app out of reach (test_a_redemption_the_app_cannot_take) and too many refused grants
# (test_too_many_refused_redemptions); a live session's answers (test_a_session_s_answers_fit_the_description).
ELSEWHERE = {("POST", WITH_TOKEN, status) for status in ("default", "502", "504", "429")}
ELSEWHERE |= {("POST", END_PATH, "303"), ("GET", INFO_PATH, "200"), ("HEAD", INFO_PATH, "200")}


def test_the_scenarios_reach_every_documented_status() -> None:
    reached = {(s.method, find_operation(s.method, s.path)[0], str(s.status)) for s in SCENARIOS.values()}
    missing = documented_statuses() - reached - ELSEWHERE
    assert not missing, f"documented but never exercised: {sorted(missing)}"
    assert reached <= documented_statuses()


def _break(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every handler meet an unexpected exception."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unexpected")

    async def async_boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unexpected")

    for owner, name in ((BtcDirect, "info"), (Metrics, "render")):
        monkeypatch.setattr(owner, name, boom)
    for owner, name in ((Gateway, "mint"), (Gateway, "redeem")):
        monkeypatch.setattr(owner, name, async_boom)
    for path in ("/healthz", "/readyz", "/.well-known/jwks.json", "/openapi.json"):
        monkeypatch.setitem(OPERATIONS, path, Operation(async_boom, OPERATIONS[path].every_host))


@pytest.fixture
async def client_for(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], Awaitable[TestClient[Any, Any]]]:
    """``await client_for(setup)``: the demo apps and directory, as the scenario's setup wants them."""

    async def make(setup: str) -> TestClient[Any, Any]:
        server: dict[str, Any] = {"body_limit_bytes": BODY_LIMIT}
        if setup == "slow":  # the body stops after its first byte
            server["body_timeout_seconds"] = 0.2
        if setup == "broken":
            _break(monkeypatch)
        if setup == "limited":
            client = await gateway(DEMO_APPS, DIRECTORY, server=server, rate_limit={"failures": 1})
            assert (await client.get(AP.format(1) + "?account_id=505", headers={"X-Api-Token": "guess"})).status == 401
            return client
        return await gateway(SESSION_APPS if setup == "session" else DEMO_APPS, DIRECTORY, server=server)

    return make


def scenarios(*setups: str) -> list[Any]:
    return [pytest.param(name, id=name) for name, s in SCENARIOS.items() if s.setup in setups]


async def answer(client: TestClient[Any, Any], scenario: Scenario) -> None:
    if scenario.setup == "slow":
        status, headers, body = await _send_slowly(client, scenario)
        assert status == scenario.status, body
        assert_conforms(scenario.method, scenario.path, status, headers, body)
        return
    response = await client.request(scenario.method, scenario.url, headers=scenario.headers, data=scenario.body)
    assert response.status == scenario.status, await response.text()
    await assert_answer_conforms(response, scenario.method, scenario.path)


async def _send_slowly(client: TestClient[Any, Any], scenario: Scenario) -> tuple[int, Any, bytes]:
    """Send the scenario's head and the first byte of its body, then wait for the answer (raw: the gateway answers
    and closes before the body is done)."""
    assert scenario.body
    head = (
        f"{scenario.method} {scenario.url} HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: {len(scenario.body)}\r\n"
    )
    head += "".join(f"{k}: {v}\r\n" for k, v in scenario.headers.items()) + "Connection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head.encode() + scenario.body[:1])
        await writer.drain()
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status_line, _, header_block = raw_head.strip().partition(b"\r\n")
        headers = CIMultiDict(line.decode().split(": ", 1) for line in header_block.split(b"\r\n") if line)
        assert headers["Connection"] == "close"
        body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("name", scenarios("demo", "limited", "broken", "slow", "session"))
async def test_answers_fit_the_description(
    name: str, client_for: Callable[[str], Awaitable[TestClient[Any, Any]]]
) -> None:
    scenario = SCENARIOS[name]
    await answer(await client_for(scenario.setup), scenario)


@pytest.mark.parametrize("name", scenarios("down"))
async def test_outage_answers_fit_the_description(
    name: str, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], upstream: Upstream, prefix: str
) -> None:
    redis = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)  # nothing listens
    config = make_config(prefix, upstream.url, SESSION_APPS, store={"timeout_seconds": 0.1})
    try:
        await answer(await aiohttp_client(create_app(config, redis=redis, key=KEY)), SCENARIOS[name])
    finally:
        await redis.aclose()


async def test_an_account_without_an_email_is_not_found(gateway: GatewayFactory) -> None:
    """The login URL carries the owner's e-mail: a grant for an account without one could never be used."""
    directory = copy.deepcopy(DIRECTORY)
    directory["apps"]["control-panel"]["subjects"].append({"id": "506", "reseller": 1})
    client = await gateway(DEMO_APPS, directory)
    response = await client.get(AP.format(1) + "?account_id=506", headers=AP_TOKEN)
    assert response.status == 404
    body = await assert_answer_conforms(response, "GET", AP.format(1))
    assert json.loads(body)["errors"][0]["detail"] == "Account not found."


async def test_a_redemption_is_the_apps_answer(gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await gateway(DEMO_APPS, DIRECTORY)
    minted = await client.get(BTC, headers={**PARTNER, **USER_ID})
    grant = await minted.json()
    response = await client.post(WITH_TOKEN, json={"uuid": grant["uuid"], "token": grant["token"], "amount": 1})
    assert response.status == 200  # the recording upstream's own answer, relayed
    await assert_answer_conforms(response, "POST", WITH_TOKEN)
    assert json.loads(upstream.requests[-1].body) == {"amount": 1}
    again = await client.post(WITH_TOKEN, json={"uuid": grant["uuid"], "token": grant["token"]})
    assert again.status == 401
    await assert_answer_conforms(again, "POST", WITH_TOKEN)


@pytest.mark.parametrize("status", [502, 504])
async def test_a_redemption_the_app_cannot_take(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """The app out of reach (refused, or no connection in time): the dialect's 502 or 504, and the grant is kept."""

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise UpstreamUnavailable(timeout=status == 504)

    client = await gateway(DEMO_APPS, DIRECTORY)
    grant = await (await client.get(BTC, headers={**PARTNER, **USER_ID})).json()
    monkeypatch.setattr(Proxy, "hold", unreachable)
    response = await client.post(WITH_TOKEN, json={"uuid": grant["uuid"], "token": grant["token"]})
    assert response.status == status
    body = await assert_answer_conforms(response, "POST", WITH_TOKEN)
    assert list(json.loads(body)["errors"]) == ["ER999"]


async def test_too_many_refused_redemptions(gateway: GatewayFactory) -> None:
    client = await gateway(DEMO_APPS, DIRECTORY, rate_limit={"failures": 1, "window_seconds": 60})
    unknown = {"uuid": "45b9313b-fa47-4786-baf1-62969dec31f2", "token": "x" * 32}
    assert (await client.post(WITH_TOKEN, json=unknown)).status == 401
    response = await client.post(WITH_TOKEN, json=unknown)
    assert response.status == 429 and int(response.headers["Retry-After"]) > 0
    body = await assert_answer_conforms(response, "POST", WITH_TOKEN)
    assert list(json.loads(body)["errors"]) == ["ER920"]


# -- impersonation sessions ---------------------------------------------------------------------------------
def test_the_session_endpoints_are_described_whatever_the_config() -> None:
    """They exist on the route of any app with ``session``: the description names them for any set of dialects."""
    for dialects in (["pyramid"], ["denovolab", "btcdirect"]):
        paths = openapi.document(dialects)["paths"]
        assert {"post"} <= set(paths[END_PATH]) and {"get", "head"} <= set(paths[INFO_PATH])
    for path in (END_PATH, INFO_PATH):
        assert "whatever the config" in SPEC["paths"][path][next(iter(SPEC["paths"][path]))]["description"]
    schemes = SPEC["components"]["securitySchemes"]
    assert {(s["in"], s["name"]) for s in schemes.values() if s.get("in") == "cookie"} == {
        ("cookie", COOKIE),
        ("cookie", f"__Host-{COOKIE}"),
    }


def test_the_cleared_cookie_header_fits_what_the_code_sends() -> None:
    pattern = SPEC["components"]["headers"]["SessionCookieCleared"]["schema"]["pattern"]
    validator = jsonschema_rs.validator_for({"type": "string", "pattern": pattern})
    for value in (
        set_cookie(COOKIE, "", secure=False, clear=True),
        set_cookie(f"__Host-{COOKIE}", "", secure=True, clear=True),
        expire_cookie("prefs", "/", ""),
        expire_cookie("lang", "/app", "example.com"),
    ):
        assert validator.is_valid(value), value
    assert not validator.is_valid(set_cookie(COOKIE, "A" * 32, secure=False))


def fits_component(response: str, media: str, body: bytes) -> None:
    """``body`` fits the media type ``media`` of the component response ``response``."""
    pointer = f"#/components/responses/{response}/content/{media.replace('/', '~1')}/schema"
    data = json.loads(body) if media.endswith("json") else body.decode()
    errors = [e.message for e in jsonschema_rs.validator_for({**SPEC, "$ref": pointer}).iter_errors(data)]
    assert not errors, f"{response} {media}: {body[:300]!r}: {errors}"


async def test_a_session_s_answers_fit_the_description(gateway: GatewayFactory, upstream: Upstream) -> None:
    """A real session, started by a redemption: its endpoints' answers, a refusal of its requests (mode, deny) and
    its end fit the description."""
    apps = copy.deepcopy(SESSION_APPS)
    apps["switch"]["session"] = {"end_url": "https://portal.example/done", "deny": ["* /billing/*"]}
    client = await gateway(apps, DIRECTORY)

    async def start(mode: str) -> str:
        minted = await client.post(DN, headers={**DN_TOKEN, "X-Impersonation-Mode": mode}, json={"client_id": 41})
        assert minted.status == 200, await minted.text()
        redeemed = await client.get("/cdr/calls", headers={"X-Auth-Token": (await minted.json())["cdr_api_token"]})
        assert redeemed.status == 200, await redeemed.text()
        cookies = [c for c in redeemed.headers.getall("Set-Cookie", []) if c.startswith(f"{COOKIE}=")]
        return cookies[0].split(";")[0].partition("=")[2]

    cookie = await start("full")
    with_cookie = {"Cookie": f"{COOKIE}={cookie}"}
    response = await client.get(INFO_PATH, headers=with_cookie)
    assert response.status == 200
    described = json.loads(await assert_answer_conforms(response, "GET", INFO_PATH))
    assert described["session_id"] == session_id(cookie)
    assert (described["app"], described["subject"], described["mode"]) == ("switch", "41", "full")
    response = await client.head(INFO_PATH, headers=with_cookie)
    assert response.status == 200
    await assert_answer_conforms(response, "HEAD", INFO_PATH)

    for accept, media in (("application/json", "application/problem+json"), ("text/html", "text/html")):
        refused = await client.get("/billing/invoices", headers={**with_cookie, "Accept": accept})
        assert (refused.status, refused.content_type) == (403, media)
        fits_component("SessionRefused", media, await refused.read())
    read_only = {"Cookie": f"{COOKIE}={await start('read_only')}"}
    refused = await client.post("/settings", headers={**read_only, "Accept": "application/json"}, data=b"x=1")
    assert (refused.status, refused.content_type) == (403, "application/problem+json")
    body = await refused.read()
    fits_component("SessionRefused", refused.content_type, body)
    assert json.loads(body)["type"].endswith("session-read-only")

    foreign = await client.post(END_PATH, headers={**read_only, "Origin": "https://elsewhere.example"})
    assert foreign.status == 403
    await assert_answer_conforms(foreign, "POST", END_PATH)
    ended = await client.post(END_PATH, headers=read_only, allow_redirects=False)
    assert ended.status == 303 and ended.headers["Location"] == "https://portal.example/done"
    await assert_answer_conforms(ended, "POST", END_PATH)
    assert ended.headers.getall("Set-Cookie")[-1] == set_cookie(COOKIE, "", secure=False, clear=True)
    gone = await client.get(INFO_PATH, headers=read_only)
    assert gone.status == 401
    await assert_answer_conforms(gone, "GET", INFO_PATH)
    assert gone.headers["Set-Cookie"] == set_cookie(COOKIE, "", secure=False, clear=True)
