"""The OpenAPI description of the main listener, generated from the declarations (``impersonation-gateway openapi``).

What the code declares is read, never restated:

- each dialect's endpoints (method, path template and its parameters) and carriers, and the ``405`` with ``Allow``
  that another method on a mint or info path gets;
- the operations endpoints (:data:`gateway.app.OPERATIONS`), each on the hosts it answers on, and the native API;
- every error answer, obtained by rendering the errors an endpoint meets (:data:`MINT_ERRORS`, :data:`REDEEM_ERRORS`)
  with its dialect: status, media type, headers, an example body, and a schema fitted to the rendered bodies;
- BTC Direct's error catalogue and the metrics' names.

The rest (vendor request and success schemas, summaries, descriptions) is prose in :mod:`gateway.openapi_prose`.
The document does not depend on the config: paths are relative to an app's mount; ``--config`` only narrows it
to the dialects the config's apps speak. The session endpoints (``/_impersonation/end`` and ``/_impersonation/session``,
:mod:`gateway.sessions`) are always described: they exist on the route of any app with ``session``, and their
descriptions say so. ``gateway/openapi.yaml`` is this module's output for every dialect,
served as ``/openapi.json`` and pinned by a golden test.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import orjson
import yaml
from aiohttp import web
from prometheus_client import Counter

from . import native
from .app import OPERATIONS
from .config import DIALECTS
from .dialects import Carrier, Dialect, Endpoint, all_dialects
from .dialects.btcdirect import CATALOGUE
from .errors import (
    Forbidden,
    GatewayError,
    GrantRefused,
    Invalid,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    StoreUnavailable,
    Unauthenticated,
    UnsupportedEncoding,
    UpstreamUnavailable,
)
from .metrics import Metrics
from .native import problem
from .openapi_prose import PROSE
from .redemption import _ended_page, refusal_page, session_refusal
from .sessions import END_PATH, INFO_PATH

VERSION = "3.1.0"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_REASON = {"$ref": "#/components/parameters/ImpersonationReason"}
_MODE = {"$ref": "#/components/parameters/ImpersonationMode"}  # a dialect's mint (the native API has a field)

# The errors a mint meets, as core and each dialect's ``parse`` raise them; every request body is bounded (408, 413),
# and a body that is read is decoded (415). Each is rendered with the dialect: the answers are the description.
_CORE = (Forbidden("role"), Forbidden("scope"), Forbidden("mode"), Invalid("reason", "missing"),
         Invalid("reason", "value"), Invalid("mode", "value"))  # fmt: skip
_LAST = (RateLimited(7), StoreUnavailable(), GatewayError())
_BOUNDED = (RequestTimeout(5.0), PayloadTooLarge(1024))
_DECODED = (UnsupportedEncoding("br"),)
_TOKEN = (Unauthenticated("missing"), Unauthenticated("unknown"))
MINT_ERRORS: dict[str, tuple[GatewayError, ...]] = {
    "activeplatform": (
        *_TOKEN, *_CORE, Invalid("account_id", "missing"), Invalid("account_id", "value"),
        NotFound("reseller"), NotFound("subject"), NotFound("subject", "email"), *_BOUNDED, *_LAST,
    ),
    "pyramid": (
        *_TOKEN, *_CORE, Invalid("body", "missing"), Invalid("body", "value"), Invalid("data", "missing"),
        Invalid("data", "type"), *(Invalid(name, reason) for name in ("userIdentity", "domain", "customData")
                                   for reason in ("missing", "type", "value")),
        Invalid("token", "type"), Invalid("customData", "too_large"), Invalid("domain", "mismatch"),
        Invalid("identity", "ambiguous"), NotFound("subject", "identity"), *_BOUNDED, *_DECODED, *_LAST,
    ),
    "denovolab": (
        *_TOKEN, *_CORE, Invalid("json", "malformed"), Invalid("_schema", "not_object"),
        *(Invalid("client_id", reason) for reason in ("missing", "null", "type", "too_large")),
        NotFound("subject"), *_BOUNDED, *_DECODED, *_LAST,
    ),
    "btcdirect": (
        Unauthenticated("ambiguous", "partner"), Unauthenticated("missing", "authorization"),
        Unauthenticated("missing", "api_key"), Unauthenticated("unknown", "authorization"),
        Unauthenticated("unknown", "api_key"), *_CORE, Invalid("subject", "missing"),
        Invalid("identifier", "mismatch"), Invalid("user_identifier", "value"),
        Invalid("user_authorization", "missing"), Invalid("user_authorization", "value"),
        NotFound("subject", "identifier"), NotFound("subject", "token"), *_BOUNDED, *_LAST,
    ),
    "native": (
        *_TOKEN, *_CORE, Invalid("body", "value"), Invalid("field", "unknown"), Invalid("app", "missing"),
        Invalid("app", "value"), Invalid("subject", "missing"), Invalid("subject", "value"),
        Invalid("ttl_seconds", "value"), Invalid("custom_data", "too_large"), NotFound("reseller"),
        NotFound("subject"), NotFound("subject", "email"), *_BOUNDED, *_DECODED, *_LAST,
    ),
}  # fmt: skip
INFO_ERRORS = (GatewayError(),)
_UNKNOWN: tuple[Any, ...] = ("unknown",)  # a refused grant's reason is never shown: any one renders the same
# A redemption: a refused grant, too many refused ones, the store or the app out of reach; a body carrier's body is
# bounded and decoded like a mint's.
REDEEM_ERRORS = (
    GrantRefused(*_UNKNOWN), RateLimited(7), StoreUnavailable(), UpstreamUnavailable(),
    UpstreamUnavailable(timeout=True), GatewayError(),
)  # fmt: skip
_VARIED: dict[type[GatewayError], Callable[[GatewayError], GatewayError]] = {
    PayloadTooLarge: lambda e: PayloadTooLarge(65536),
    RateLimited: lambda e: RateLimited(60),
    UnsupportedEncoding: lambda e: UnsupportedEncoding("zstd"),
    RequestTimeout: lambda e: RequestTimeout(30.0),
    Invalid: lambda e: Invalid("", "unknown") if getattr(e, "reason", "") == "unknown" else e,  # the client's name
}


def document(dialects: Iterable[str] = DIALECTS) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``dialects`` (default: every dialect), as plain data."""
    prose = copy.deepcopy(PROSE)
    found = all_dialects(dialects)
    components = prose["components"]
    responses: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for dialect in found.values():
        for template, endpoints in _by_template(dialect).items():
            paths[template] = _dialect_path(dialect, template, endpoints, prose["operations"][dialect.name], responses)
    paths[native.PATH] = _native_path(prose["operations"]["native"], responses)
    for path, operation in OPERATIONS.items():
        paths[path] = _ops_path(path, operation.every_host, prose["operations"]["gateway"][f"GET {path}"])
    paths.update(_session_paths(prose["operations"]["sessions"], responses))
    responses["SessionRefused"] = _session_refused()
    for dialect in found.values():
        for status, response in _responses(dialect.name, REDEEM_ERRORS, dialect.error_response, redemption=True):
            responses[f"{dialect.name}Redeem{status}"] = response
    return {
        "openapi": VERSION,
        "info": prose["info"],
        "tags": _tags(prose["tags"], found, responses),
        "paths": paths,
        "components": {**components, "responses": {**components["responses"], **dict(sorted(responses.items()))}},
    }


def render(dialects: Iterable[str] = DIALECTS) -> str:
    """:func:`document` as the YAML of ``gateway/openapi.yaml``."""
    return yaml.dump(document(dialects), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as blocks, and no aliases (each node written where it is)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    block = "\n" in value and not value.endswith((" ", "\n\n")) and "\t" not in value
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if block else None)


_Dumper.add_representer(str, _str)


# -- paths --------------------------------------------------------------------------------------------------
def _by_template(dialect: Dialect) -> dict[str, list[Endpoint]]:
    found: dict[str, list[Endpoint]] = {}
    for endpoint in (*dialect.endpoints, *(c.endpoint for c in dialect.carriers if c.endpoint is not None)):
        found.setdefault(endpoint.template, []).append(endpoint)
    return found


def _dialect_path(
    dialect: Dialect, template: str, endpoints: list[Endpoint], prose: dict[str, Any], responses: dict[str, Any]
) -> dict[str, Any]:
    item: dict[str, Any] = {}
    for endpoint in endpoints:
        key = f"{endpoint.method} {template}"
        if key not in prose:
            raise LookupError(f"{dialect.name}: no prose for {key} in gateway/openapi_prose.py")
        operation = prose.pop(key)
        operation["tags"] = [dialect.name, *(["redemption"] if endpoint.kind == "redeem" else [])]
        headers = [_REASON, _MODE] if endpoint.kind == "mint" else []
        operation["parameters"] = _parameters(template, operation.get("parameters", []), headers)
        if endpoint.kind == "mint":
            errors = MINT_ERRORS[dialect.name]
            if endpoint.method not in ("GET", "HEAD"):
                errors = (*errors, *_DECODED)
        else:
            errors = REDEEM_ERRORS + _BOUNDED + _DECODED if endpoint.kind == "redeem" else INFO_ERRORS
        group = {"mint": "Mint", "info": "Info", "redeem": "Redeem"}[endpoint.kind]
        refs = _refs(dialect.name, group, errors, dialect.error_response, responses, endpoint.kind == "redeem")
        operation["responses"] = _merge(operation.get("responses", {}), refs)
        if endpoint.kind == "redeem":
            operation["responses"]["default"] = PROSE["redeemed"]
        item[endpoint.method.lower()] = _ordered(operation)
    allowed = dialect.methods_at(re.sub(r"\{[^}]+\}", "1", template))
    if allowed:
        _not_allowed(item, dialect.name, allowed, dialect.error_response, responses)
    return item


def _native_path(prose: dict[str, Any], responses: dict[str, Any]) -> dict[str, Any]:
    operation = prose.pop(f"POST {native.PATH}")
    operation["tags"] = ["native"]
    operation["parameters"] = _parameters(native.PATH, operation.get("parameters", []), [_REASON])
    refs = _refs("native", "", MINT_ERRORS["native"], native.error_problem, responses, False)
    operation["responses"] = _merge(operation["responses"], refs)
    item = {"post": _ordered(operation)}
    _not_allowed(item, "native", ("POST",), native.error_problem, responses)
    return item


def _ops_path(path: str, every_host: bool, prose: dict[str, Any]) -> dict[str, Any]:
    operation = {**prose, "tags": ["operations"]}
    where = PROSE["hosts"]["every" if every_host else "gateway"]
    description = _metrics() if path == "/metrics" else operation.get("description", "")
    operation["description"] = f"{description}\n\n{where}".strip() + "\n"
    operation["responses"] = {**operation["responses"], "500": {"$ref": "#/components/responses/InternalError"}}
    return {"get": _ordered(operation)}


def _session_paths(prose: dict[str, Any], responses: dict[str, Any]) -> dict[str, Any]:
    """``POST /_impersonation/end`` and ``GET``/``HEAD /_impersonation/session``, on the route of any app with
    ``session``; any other method there is 405 with ``Allow``."""
    end, info, head = (prose.pop(key) for key in (f"POST {END_PATH}", f"GET {INFO_PATH}", f"HEAD {INFO_PATH}"))
    if prose:
        raise LookupError(f"sessions: prose for {sorted(prose)} but no such endpoint")
    for operation in (end, info, head):
        operation["tags"] = ["sessions"]
    end["responses"]["200"]["content"]["text/html"]["example"] = _body(_ended_page(None))
    ended = {"post": _ordered(end)}
    _not_allowed(ended, "sessions", ("POST",), _session_not_allowed, responses)
    described = {"get": _ordered(info), "head": _ordered(head)}
    _not_allowed(described, "sessions", ("GET", "HEAD"), _session_not_allowed, responses)
    return {END_PATH: ended, INFO_PATH: described}


def _session_not_allowed(error: MethodNotAllowed) -> web.Response:
    """The 405 of another method on a session endpoint (as :class:`gateway.redemption.Redeemer` answers it)."""
    return problem(405, "method-not-allowed", "Method not allowed", "see Allow", Allow=", ".join(error.allowed))


class _Asking:
    """A request as :func:`gateway.redemption.session_refusal` reads it: only its ``Accept``."""

    def __init__(self, accept: str) -> None:
        self.headers = {"Accept": accept}


def _session_refused() -> dict[str, Any]:
    """The 403 of a session's request its mode or a deny pattern refuses, rendered by the code for each reason."""
    answers = [session_refusal(cast(web.Request, _Asking("application/json")), r) for r in ("read_only", "denied")]
    page = session_refusal(cast(web.Request, _Asking("text/html")), "read_only")
    schemas = [_fit(_body(a), _body(a)) for a in answers]
    return {
        "description": PROSE["session_refused"],
        "content": {
            answers[0].content_type: {"schema": {"anyOf": schemas}, "example": _body(answers[0])},
            page.content_type: {"schema": {"type": "string"}, "example": _body(page)},
        },
    }


def _parameters(template: str, declared: list[dict[str, Any]], headers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``headers`` of the caller's kind (a mint's reason and mode), then the template's path parameters (as the
    prose gives them, else strings), then the prose's other parameters."""
    names = re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template)
    by_name = {str(_resolve(p).get("name")): p for p in declared if _resolve(p).get("in") == "path"}
    if set(by_name) - set(names):
        raise LookupError(f"{template}: prose path parameters {sorted(set(by_name) - set(names))} not in the template")
    path = [by_name.get(n, {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}) for n in names]
    rest = [p for p in declared if _resolve(p).get("in") != "path"]
    return [*headers, *path, *rest]


def _resolve(parameter: dict[str, Any]) -> dict[str, Any]:
    ref = parameter.get("$ref")
    if ref is None:
        return parameter
    found: dict[str, Any] = PROSE["components"]["parameters"][ref.rpartition("/")[2]]
    return found


def _not_allowed(
    item: dict[str, Any], owner: str, allowed: tuple[str, ...], render: Any, responses: dict[str, Any]
) -> None:
    """An operation per other method: 405 with ``Allow`` (the path and its credentials are never the app's)."""
    first = next(iter(item.values()))
    name = f"{owner}NotAllowed{''.join(m.title() for m in allowed)}"
    ((_, response),) = _responses(owner, (MethodNotAllowed(allowed),), render)
    responses[name] = response
    responses[f"{name}Head"] = {k: v for k, v in response.items() if k != "content"}  # a HEAD answer has no body
    for method in METHODS:
        if method in item:
            continue
        item[method] = _ordered(
            {
                "operationId": f"{first['operationId']}{method.title()}",
                "tags": first["tags"][:1],
                "summary": f"Any other method than {', '.join(allowed)}: refused",
                "parameters": [p for p in first.get("parameters", []) if _resolve(p).get("in") == "path"],
                "responses": {"405": {"$ref": f"#/components/responses/{name}{'Head' if method == 'head' else ''}"}},
            }
        )


def _refs(
    owner: str, group: str, errors: Sequence[GatewayError], render: Any, responses: dict[str, Any], redemption: bool
) -> dict[str, Any]:
    refs = {}
    for status, response in _responses(owner, errors, render, redemption=redemption):
        name = f"{owner}{group}{status}"
        if name in responses and responses[name] != response:
            name = f"{name}{len([n for n in responses if n.startswith(name)])}"
        responses[name] = response
        refs[str(status)] = {"$ref": f"#/components/responses/{name}"}
    return refs


def _merge(prose: dict[str, Any], generated: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted({**generated, **prose}.items(), key=lambda kv: (kv[0] == "default", kv[0])))


def _ordered(operation: dict[str, Any]) -> dict[str, Any]:
    order = ("operationId", "tags", "summary", "description", "security", "parameters", "requestBody", "responses")
    return {k: operation[k] for k in order if k in operation and operation[k] != []}


# -- error answers ------------------------------------------------------------------------------------------
def _responses(
    owner: str, errors: Sequence[GatewayError], render: Any, *, redemption: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The response objects, by status, of ``errors`` rendered with ``render`` (a dialect's ``error_response``)."""
    answers: dict[int, list[tuple[GatewayError, web.Response, web.Response]]] = {}
    for error in errors:
        answer = render(error)
        vary = _VARIED.get(type(error))
        answers.setdefault(answer.status, []).append((error, answer, render(vary(error)) if vary else answer))
    for status in sorted(answers):
        found = answers[status]
        kinds = dict.fromkeys(type(error).__name__ for error, _, _ in found)  # what the answer means
        response: dict[str, Any] = {"description": " ".join(PROSE["errors"][kind] for kind in kinds)}
        headers = _headers([(a, b) for _, a, b in found])
        if headers:
            response["headers"] = headers
        content: dict[str, Any] = {}
        for _, a, b in found:
            media = content.setdefault(a.content_type, {"schemas": [], "example": _body(a)})
            schema = _fit(_body(a), _body(b))
            if schema not in media["schemas"]:
                media["schemas"].append(schema)
        response["content"] = {media: _content(media, c) for media, c in content.items()}
        if redemption and status == GrantRefused.status:
            page = refusal_page(status)
            response["description"] += " " + PROSE["browser"]
            response["content"]["text/html"] = {"schema": {"type": "string"}, "example": _body(page)}
        if redemption and status in (502, 504):
            response["description"] += " " + PROSE["relayed"]
            response["content"]["text/plain"] = {"schema": {"type": "string"}}
        yield status, response


def _content(media: str, found: dict[str, Any]) -> dict[str, Any]:
    schemas: list[dict[str, Any]] = found["schemas"]
    consts = [s["const"] for s in schemas if set(s) == {"const"} and isinstance(s["const"], str)]
    rest = [s for s in schemas if not (set(s) == {"const"} and isinstance(s["const"], str))]
    if len(consts) > 1:
        rest.insert(0, {"enum": consts})
    elif consts:
        rest.insert(0, {"const": consts[0]})
    schema = rest[0] if len(rest) == 1 else {"anyOf": rest}
    return {"schema": schema, "example": found["example"]}


def _headers(answers: list[tuple[web.Response, web.Response]]) -> dict[str, Any]:
    names = dict.fromkeys(str(n) for a, _ in answers for n in a.headers if n not in ("Content-Type", "Content-Length"))
    headers: dict[str, Any] = {}
    for name in names:
        if name == "Retry-After":
            headers[name] = {"$ref": "#/components/headers/RetryAfter"}
            continue
        values = [_fit(a.headers[name], b.headers[name]) for a, b in answers if name in a.headers]
        schema = values[0] if all(v == values[0] for v in values) else {"type": "string"}
        headers[name] = {"required": len(values) == len(answers), "schema": {"type": "string", **schema}}
    return headers


def _body(response: web.Response) -> Any:
    data = response.body if isinstance(response.body, bytes) else b""
    is_json = response.content_type == "application/json" or response.content_type.endswith("+json")
    return orjson.loads(data) if is_json else data.decode(response.charset or "utf-8")


def _fit(a: Any, b: Any) -> dict[str, Any]:
    """A schema for the answer ``a``, whose parts that differ in ``b`` (the same error with other numbers or names)
    are patterns: what the rendering holds fixed is a constant."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {"type": "object", "required": list(a), "additionalProperties": False,
                "properties": {k: _fit(a[k], b[k]) for k in a}}  # fmt: skip
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        items = [_fit(x, y) for x, y in zip(a, b, strict=True)]
        if all(item == items[0] for item in items):  # (an error's lists hold one item)
            return {"type": "array", "minItems": len(a), "maxItems": len(a), **({"items": items[0]} if a else {})}
        return {"type": "array"}
    if a == b and type(a) is type(b):
        return {"const": a}
    if isinstance(a, str) and isinstance(b, str):
        start = _common(a, b)
        end = min(_common(a[::-1], b[::-1]), len(a) - start, len(b) - start)
        middle = (a[start : len(a) - end], b[start : len(b) - end])
        hole = "[0-9]+" if all(m.isdigit() for m in middle) else ".*" if "" in middle else ".+"
        return {"type": "string", "pattern": f"^{_escape(a[:start])}{hole}{_escape(a[len(a) - end :])}$"}
    if isinstance(a, int) and isinstance(b, int):
        return {"type": "integer"}
    return {}


def _common(a: str, b: str) -> int:
    """The length of the prefix ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _escape(text: str) -> str:
    return re.sub(r"([.^$*+?()\[\]{}|\\/])", r"\\\1", text)


# -- tags, metrics ------------------------------------------------------------------------------------------
def _tags(prose: dict[str, str], dialects: dict[str, Dialect], responses: dict[str, Any]) -> list[dict[str, str]]:
    """The tags: each dialect's (BTC Direct's with its catalogue), then native, operations and redemption (with the
    carriers' table)."""
    tags = {name: prose[name] for name in (*dialects, "native", "operations")}
    if "btcdirect" in tags:
        rows = "\n".join(f"| {code} | {e.status} | {e.message} |" for code, e in CATALOGUE.items())
        tags["btcdirect"] += f"\n\n{prose['catalogue']}\n\n| code | status | message |\n|---|---|---|\n{rows}"
    rows = "\n".join(
        f"| {d.name} | {'; '.join(_carrier(c) for c in d.carriers)} | "
        f"{', '.join(n.removeprefix(d.name + 'Redeem') for n in responses if n.startswith(d.name + 'Redeem'))} |"
        for d in dialects.values()
    )
    tags["redemption"] = prose["redemption"].replace("{carriers}", rows)
    tags["sessions"] = prose["sessions"]
    return [{"name": name, "description": description} for name, description in tags.items()]


def _carrier(carrier: Carrier) -> str:
    where = f"`{carrier.endpoint.method} {carrier.endpoint.template}` body" if carrier.endpoint else carrier.where
    bound = "".join(f" + `{name}` (the grant's {field})" for field, name in carrier.bound)
    passive = " holding a grant" if carrier.passive else ""
    return f"{where} `{carrier.name}`{bound}{passive}"


def _metrics() -> str:
    """The metrics' names, labels and help texts, as :class:`Metrics` declares them."""
    metrics = Metrics()
    lines = [
        f"- `{counter._name}_total` (by {', '.join(counter._labelnames)}): {counter._documentation}"
        for counter in vars(metrics).values()
        if isinstance(counter, Counter)
    ]
    for family in metrics.latency.collect():
        lines.append(f"- `{family.name}`, a histogram by kind (mint, redeem, pass, info, ops): {family.documentation}")
    return "The Prometheus text exposition format:\n\n" + "\n".join(lines)
