"""Dialects: translators between a vendor's API style and the one core command.

A dialect declares its endpoints and grant carriers as data, parses an :class:`HttpRequest` into an
``ImpersonationCommand``, and renders results and every ``GatewayError`` in its vendor's shape: a table of
:class:`Rule` (error class, field values, answer) read by one method, :meth:`Dialect.render_error`. It never
talks to Redis.
"""

from __future__ import annotations

import functools
import importlib
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar
from urllib.parse import urlencode

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy, MultiMapping

from ..config import DIALECTS, AppConfig
from ..core import CUSTOM_DATA_MAX, MODE_HEADER, MODES, REASON_HEADER, REASON_MAX, ImpersonationCommand, MintResult
from ..errors import GatewayError, MethodNotAllowed, RateLimited, RequestTimeout


@dataclass(frozen=True)
class Endpoint:
    """One of a vendor's own endpoints: ``template`` is its path (relative to the app's mount) with ``{name}``
    parameters of one segment each; a trailing slash is allowed, and ``ignore_case`` matches any case."""

    method: str
    template: str
    kind: str = "mint"  # "mint", "info", or "redeem" (a body carrier's endpoint)
    ignore_case: bool = False

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        """The template as a regular expression with a named group per parameter."""
        return re.compile(template_regex(self.template, named=True), re.IGNORECASE if self.ignore_case else 0)

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """The parameters of ``path`` when this endpoint serves ``method`` there, else None."""
        if method != self.method:
            return None
        found = self.pattern.fullmatch(path)
        return None if found is None else found.groupdict()


def template_regex(template: str, *, named: bool) -> str:
    """``/a/{id}/b`` -> ``/a/(?P<id>[^/]+)/b/?`` (plain groups unless ``named``): one syntax for Python and PCRE."""
    parts = re.split(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"(?P<{part}>[^/]+)" if named else "[^/]+")
        else:
            out.append(re.escape(part))
    return "".join(out).rstrip("/") + "/?"


class Where(StrEnum):
    QUERY = "query"  # a link: the browser follows it, and so may a scanner
    COOKIE = "cookie"
    HEADER = "header"
    BODY = "body"  # a JSON (or form) field of the requests to one endpoint


@dataclass(frozen=True)
class Carrier:
    """Where a dialect's grants come back: the field ``name`` in ``where``.

    ``bound`` pairs a grant field with the field beside ``name`` that must hold the grant's value (the e-mail
    of an ActivePlatform link). A ``passive`` carrier may hold the app's own credential instead: a value that
    is no live grant passes through. A body carrier lives on ``endpoint``, where every request is a redemption.
    """

    where: Where
    name: str
    bound: tuple[tuple[str, str], ...] = ()
    passive: bool = False
    endpoint: Endpoint | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """Every field name this carrier uses: removed together before a request goes on."""
        return (self.name, *(name for _, name in self.bound))


@dataclass(frozen=True)
class HttpRequest:
    """What a dialect may read of a mint request (``path`` is relative to the app's mount)."""

    method: str
    path: str
    query: MultiMapping[str] = field(default_factory=lambda: MultiDictProxy(MultiDict()))
    headers: MultiMapping[str] = field(default_factory=lambda: CIMultiDictProxy(CIMultiDict()))
    body: bytes = b""
    client: str = "127.0.0.1"
    endpoint: Endpoint | None = None  # the endpoint matched
    params: Mapping[str, str] = field(default_factory=dict)  # its path parameters


# Names every answer's template may use beside the error's own fields.
CONSTANTS: Mapping[str, str | int] = {
    "reason_header": REASON_HEADER,
    "reason_max": REASON_MAX,
    "custom_data_max": CUSTOM_DATA_MAX,
    "mode_header": MODE_HEADER,
    "modes": ", ".join(MODES),
}


@dataclass(frozen=True)
class Rule:
    """One row of an error table: errors of class ``error`` whose fields have the values in ``when`` get
    ``status`` (None: the error's own) and the answer ``parts`` that the table's envelope puts in its shape.
    A string part is a template of the error's fields (``{field}``, ``{limit}``, ``{allowed}``, a tuple joined
    by ", ") and of :data:`CONSTANTS`. ``headers`` are added to the answer."""

    error: type[GatewayError]
    parts: tuple[str | int, ...]
    when: tuple[tuple[str, object], ...] = ()
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def matches(self, error: GatewayError) -> bool:
        return isinstance(error, self.error) and all(getattr(error, k, None) == v for k, v in self.when)

    def names(self) -> set[str]:
        """The names its templates use."""
        return {name for part in self.parts if isinstance(part, str)
                for _, name, _, _ in string.Formatter().parse(part) if name}  # fmt: skip


def error_class(code: str) -> type[GatewayError]:
    """The class of the GatewayError with stable code ``code`` (KeyError for none)."""
    classes, found = [GatewayError], {}
    while classes:
        cls = classes.pop()
        found[cls.code] = cls
        classes += cls.__subclasses__()
    return found[code]


def on(code: str, *parts: str | int, status: int | None = None,
       headers: tuple[tuple[str, str], ...] = (), **when: object) -> Rule:  # fmt: skip
    """``on("invalid", "Missing {field}", reason="missing")``: a :class:`Rule` for the error of that code, its
    conditions as keywords."""
    return Rule(error_class(code), parts, tuple(when.items()), status, headers)


def render(rules: Iterable[Rule], error: GatewayError,
           envelope: Callable[[int, tuple[str | int, ...]], web.Response]) -> web.Response:  # fmt: skip
    """The answer of the first rule ``error`` matches, in ``envelope``'s shape, with the headers HTTP asks of
    its kind: ``Retry-After`` (429), ``Allow`` (405), and a closed connection after a body that stopped
    arriving (408: it may never end)."""
    rule = next(rule for rule in rules if rule.matches(error))
    values = {**CONSTANTS, **{k: ", ".join(v) if isinstance(v, tuple) else v for k, v in vars(error).items()}}
    parts = tuple(part.format_map(values) if isinstance(part, str) else part for part in rule.parts)
    response = envelope(rule.status or error.status, parts)
    response.headers.extend(rule.headers)
    if isinstance(error, RateLimited):
        response.headers["Retry-After"] = str(error.retry_after)
    elif isinstance(error, MethodNotAllowed):
        response.headers["Allow"] = ", ".join(error.allowed)
    elif isinstance(error, RequestTimeout):
        response.force_close()
    return response


class Dialect(ABC):
    """A vendor's API style: its endpoints and carriers (data, read by the runtime, the OpenAPI check and the
    nginx generator alike), how a mint request becomes a command, and how results and errors look."""

    name: ClassVar[str]
    endpoints: ClassVar[tuple[Endpoint, ...]]
    carriers: ClassVar[tuple[Carrier, ...]]
    # The error table, first match wins: a rule with no conditions for every GatewayError class (a test reads
    # it), and last the answer to anything unexpected, a rule for GatewayError itself.
    errors: ClassVar[tuple[Rule, ...]]

    def match(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]] | None:
        for endpoint in self.endpoints:
            params = endpoint.match(method, path)
            if params is not None:
                return endpoint, params
        return None

    def owns(self, path: str) -> bool:
        """Whether ``path`` is a mint or info endpoint's (whatever the method): one match, which every pass-through
        request asks."""
        return self._own_paths.fullmatch(path) is not None

    def methods_at(self, path: str) -> tuple[str, ...]:
        """The methods of the mint and info endpoints at ``path`` (any other method there is refused with 405: such a
        path and its credentials are the gateway's, never the app's)."""
        if not self.owns(path):
            return ()
        return tuple(e.method for e in self.endpoints if e.kind in ("mint", "info") and e.pattern.fullmatch(path))

    @functools.cached_property
    def _own_paths(self) -> re.Pattern[str]:
        """Every mint and info endpoint's path in one expression."""
        own = [e for e in self.endpoints if e.kind in ("mint", "info")]
        parts = [f"(?{'i' if e.ignore_case else ''}:{template_regex(e.template, named=False)})" for e in own]
        return re.compile("|".join(parts) or "(?!)")

    @abstractmethod
    def parse(self, req: HttpRequest, app: AppConfig) -> ImpersonationCommand:
        """The command in a mint request; raises a GatewayError for bad input."""

    @abstractmethod
    def render(self, result: MintResult, app: AppConfig, public_url: str) -> web.Response:
        """The vendor's success answer for a minted grant."""

    @abstractmethod
    def envelope(self, status: int, parts: tuple[str | int, ...]) -> web.Response:
        """The vendor's error shape around the ``parts`` of an answer of :attr:`errors`."""

    def render_error(self, error: GatewayError) -> web.Response:
        """The vendor's answer for ``error`` (a bare GatewayError is an unexpected failure), by :attr:`errors`."""
        return render(self.errors, error, self.envelope)

    def info(self, req: HttpRequest, app: AppConfig, public_url: str) -> web.Response:
        raise NotImplementedError

    @functools.cached_property
    def link_carrier(self) -> Carrier:
        """The carrier of this dialect's login links (its query carrier)."""
        return next(c for c in self.carriers if c.where is Where.QUERY and not c.passive)

    @property
    def link_bind(self) -> tuple[str, ...]:
        """The subject fields a login link carries beside the grant (which the grant is then bound to)."""
        return tuple(field for field, _ in self.link_carrier.bound)

    def login_url(self, result: MintResult, app: AppConfig, public_url: str) -> str:
        """The link that logs a browser in with ``result``'s grant: the app's root, with the link carrier."""
        carrier = self.link_carrier
        bound = result.grant.bound_values()
        pairs = [(name, bound[field]) for field, name in carrier.bound]
        return f"{public_url}{app.mount}/?{urlencode([*pairs, (carrier.name, result.token)])}"

    def error_response(self, error: GatewayError) -> web.Response:
        """:meth:`render_error` (the name the request flows use)."""
        return self.render_error(error)


def json_response(data: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=content_type)


def text_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/plain", charset="utf-8")


def load_json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one (malformed, not an object, bad UTF-8)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` style value ("" when the scheme is wrong)."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def all_dialects(names: Iterable[str] = DIALECTS) -> dict[str, Dialect]:
    """The dialects named (default: all) by name; ``dialects/<name>.py`` exposes its instance as ``dialect``."""
    found = {}
    for name in dict.fromkeys(names):
        dialect = importlib.import_module(f"{__name__}.{name}").dialect
        assert isinstance(dialect, Dialect) and dialect.name == name
        found[name] = dialect
    return found
