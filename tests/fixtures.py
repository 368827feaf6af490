"""Shared test data: the demo apps and directory, and the one judge of an answer against the OpenAPI description
(``gateway/openapi.yaml``, as the gateway serves it)."""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema_rs  # schemathesis's own JSON Schema validator
import yaml

from gateway.dialects import Dialect, Endpoint

SPEC: dict[str, Any] = yaml.safe_load(importlib.resources.files("gateway").joinpath("openapi.yaml").read_text("utf-8"))
ROOT = Path(__file__).resolve().parent.parent
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# The demo apps as hand-off apps (a test that holds sessions gives an app its own ``session``).
DEMO_APPS: dict[str, Any] = {
    name: {k: v for k, v in app.items() if k not in ("upstream", "session")}
    for name, app in yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))["apps"].items()
}
DIRECTORY: dict[str, Any] = yaml.safe_load((ROOT / "directory.yaml").read_text(encoding="utf-8"))
# The demo has no Denovolab actor whose role may not mint.
DIRECTORY["apps"]["switch"]["principals"].append(
    {"id": "viewer-1", "token": "denovolab-viewer-token", "role": "viewer"}
)


# -- judging an answer against the description -------------------------------------------------------------
def escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def resolve(node: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
    """Follow local ``$ref``s: the node and its JSON pointer in the description."""
    while "$ref" in node:
        pointer = node["$ref"]
        node = SPEC
        for token in pointer.removeprefix("#/").split("/"):
            node = node[token.replace("~1", "/").replace("~0", "~")]
    return node, pointer


@functools.cache
def _validator(pointer: str) -> Any:
    return jsonschema_rs.validator_for({**SPEC, "$ref": pointer})


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}/]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def find_operation(method: str, path: str) -> tuple[str, dict[str, Any], str]:
    """The described operation for ``method`` and a concrete ``path``: its template, object and pointer."""
    for template, item in SPEC["paths"].items():
        if method.lower() in item and _template_pattern(template).fullmatch(path):
            return template, item[method.lower()], f"#/paths/{escape(template)}/{method.lower()}"
    raise AssertionError(f"{method} {path} is not described in gateway/openapi.yaml")


def assert_conforms(method: str, path: str, status: int, headers: Mapping[str, str], body: bytes) -> None:
    """The answer is a documented status, with its documented headers, media type and body schema."""
    template, operation, pointer = find_operation(method, path)
    where = f"{method} {template} -> {status}"
    responses = operation["responses"]
    key = str(status) if str(status) in responses else "default"
    assert key in responses, f"{where}: status not documented ({body[:200]!r})"
    response, pointer = resolve(responses[key], f"{pointer}/responses/{key}")
    for name, declared in response.get("headers", {}).items():
        header, header_pointer = resolve(declared, f"{pointer}/headers/{escape(name)}")
        value = headers.get(name)
        if value is None:
            assert not header.get("required"), f"{where}: header {name} missing"
            continue
        instance: Any = int(value) if value.isdigit() and header["schema"].get("type") == "integer" else value
        errors = [e.message for e in _validator(f"{header_pointer}/schema").iter_errors(instance)]
        assert not errors, f"{where}: header {name}: {value!r}: {errors}"
    content = response.get("content")
    if not content:
        return
    media = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    assert media in content, f"{where}: media type {media!r}, documented {sorted(content)}"
    is_json = media == "application/json" or media.endswith("+json")
    data = json.loads(body) if is_json else body.decode("utf-8")
    errors = [e.message for e in _validator(f"{pointer}/content/{escape(media)}/schema").iter_errors(data)]
    assert not errors, f"{where}: body {body[:500]!r} does not fit: {errors}"


async def assert_answer_conforms(response: Any, method: str, path: str) -> bytes:
    body: bytes = await response.read()
    assert_conforms(method, path, response.status, response.headers, body)
    return body


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for template, item in SPEC["paths"].items():
        for method in METHODS:
            if method in item:
                yield method.upper(), template, item[method]


def documented_statuses() -> set[tuple[str, str, str]]:
    return {(m, t, status) for m, t, op in operations() for status in op["responses"]}


PATH_PARAMETERS = frozenset(name for template in SPEC["paths"] for name in re.findall(r"\{([^}]+)\}", template))


def sample_path(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", template)


def described_template(dialect: Dialect, endpoint: Endpoint, params: Mapping[str, str]) -> str:
    """The described path of ``endpoint`` of ``dialect``: its template, which the description must hold."""
    for method, template, operation in operations():
        if dialect.name in operation["tags"] and method == endpoint.method and template == endpoint.template:
            return template
    raise AssertionError(f"{dialect.name}: {endpoint.method} {endpoint.template} is not described")


# Each dialect's demo mint request, as (app, method, path, headers, body): the demo directory's actors and subjects.
DEMO_MINTS: dict[str, tuple[str, str, str, Mapping[str, str], bytes | None]] = {
    "activeplatform": ("control-panel", "GET", "/api/v3/resellers/1/user_authentication/token?account_id=505",
                       {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}, None),
    "pyramid": ("analytics", "POST", "/API3/authentication/authenticateUserByToken",
                {"Content-Type": "application/json"},
                json.dumps({"token": "pyramid-enterprise-admin-token", "userIdentity": "jdoe"}).encode()),
    "denovolab": ("switch", "POST", "/v1/auth/as_client", {"X-Auth-Token": "denovolab-demo-admin-token"},
                  b'{"client_id": 41}'),
    "btcdirect": ("exchange", "GET", "/api/v1/user/login-token",
                  {"Authorization": "Bearer btcdirect-partner-demo-token",
                   "User-Identifier": "7c3f9a1e2b4d6f8091a3c5e7f9b1d3e5a7c9e1f3"}, None),
}  # fmt: skip
