"""Dialects: translators between a vendor's API style and the one core command.

A dialect parses an :class:`HttpRequest` into an ``ImpersonationCommand``, finds grant carriers in
requests, and renders results and every ``GatewayError`` in its vendor's shape. It never talks to Redis.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy, MultiMapping

from ..config import DIALECTS, AppConfig
from ..core import Carrier, ImpersonationCommand, MintResult
from ..errors import GatewayError, RateLimited


@dataclass(frozen=True)
class HttpRequest:
    """What a dialect may read of a request (``path`` is relative to the app's mount)."""

    method: str
    path: str
    query: MultiMapping[str] = field(default_factory=lambda: MultiDictProxy(MultiDict()))
    headers: MultiMapping[str] = field(default_factory=lambda: CIMultiDictProxy(CIMultiDict()))
    cookies: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    client: str = "127.0.0.1"
    params: Mapping[str, str] = field(default_factory=dict)  # named groups of the matched endpoint


@dataclass(frozen=True)
class Endpoint:
    method: str
    pattern: re.Pattern[str]
    kind: str = "mint"  # "mint" or "info"


class Dialect(ABC):
    name: ClassVar[str]
    endpoints: ClassVar[tuple[Endpoint, ...]]

    def match(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]] | None:
        for endpoint in self.endpoints:
            m = endpoint.pattern.fullmatch(path)
            if m and method == endpoint.method:
                return endpoint, {k: v for k, v in m.groupdict().items() if v is not None}
        return None

    @abstractmethod
    def parse(self, req: HttpRequest, app: AppConfig) -> ImpersonationCommand:
        """The command in a mint request; raises a GatewayError for bad input."""

    @abstractmethod
    def render(self, result: MintResult, app: AppConfig, public_url: str) -> web.Response:
        """The vendor's success answer for a minted grant."""

    @abstractmethod
    def render_error(self, error: GatewayError) -> web.Response:
        """The vendor's answer for ``error`` (a bare GatewayError is an unexpected failure)."""

    @abstractmethod
    def carriers(self, req: HttpRequest) -> list[Carrier]:
        """Grant carriers this request holds (none for an ordinary request)."""

    def reads_body(self, req: HttpRequest) -> bool:
        """Whether a carrier may sit in this request's body (the body is then read before carriers)."""
        return False

    def info(self, req: HttpRequest, app: AppConfig, public_url: str) -> web.Response:
        raise NotImplementedError


def json_response(
    data: Any, status: int = 200, content_type: str = "application/json", error: Any = None
) -> web.Response:
    """A JSON answer; a RateLimited ``error`` adds ``Retry-After``."""
    return with_retry_after(web.Response(body=orjson.dumps(data), status=status, content_type=content_type), error)


def text_response(text: str, status: int = 200, error: Any = None) -> web.Response:
    return with_retry_after(web.Response(text=text, status=status, content_type="text/plain", charset="utf-8"), error)


def with_retry_after(response: web.Response, error: Any) -> web.Response:
    if isinstance(error, RateLimited):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


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
