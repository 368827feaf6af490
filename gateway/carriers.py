"""Grant carriers in a request: found leniently, removed before the request goes on.

An app behind the gateway may read a query, cookie or header in more ways than one: names in any case or
percent-encoded, ``;`` as well as ``&`` between query pairs, the last duplicate rather than the first, a
second ``Cookie`` header, a quoted cookie, a comma-joined header. Frameworks go further: PHP reads
``user.token``, ``user token`` and ``user[token`` as ``user_token``; PHP, Rack and ``qs`` read ``token[]`` and
``token[0]`` as ``token``; a URL parser ends the query at ``#``; an app may drop a scheme (``Bearer G``),
quotes, base64 padding (``G==``) or percent-encoding from a value. So the gateway looks for grants every one
of those ways (:func:`field_name`, :func:`grant_in`): any grant-shaped value (:data:`gateway.core.TOKEN_SHAPE`)
in any spelling of a carrier's field is offered for redemption, and removed from what the app receives. The
nginx configuration routes on the same rule (:mod:`gateway.nginx`), so both paths agree on what holds a grant.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import orjson
from multidict import CIMultiDict, MultiMapping

from .core import TOKEN_SHAPE, Offer
from .dialects import Carrier, Where

_PAIRS = re.compile(r"([&;#])")  # "#": a client that sends the fragment; an app's URL parser ends the query there
_COOKIE_PIECES = re.compile(r"([;,])")
_BLANK = " \t"


@dataclass(frozen=True)
class Found:
    """One carrier of one app holding a token in this request."""

    carrier: Carrier
    offer: Offer


def shaped(value: str) -> bool:
    return TOKEN_SHAPE.fullmatch(value) is not None


def _decoded(raw: str) -> str:
    return unquote_plus(raw) if "%" in raw or "+" in raw else raw


def field_name(raw: str) -> str:
    """A query or form field's name as some app reads it: percent-decoded and lower-cased; ``.``, `` `` and an
    unclosed ``[`` read as ``_`` (PHP); an array suffix dropped (``token[]``, ``token[0]``: PHP, Rack, qs)."""
    name, bracket, rest = _decoded(raw).partition("[")
    if bracket and "]" not in rest:
        name = f"{name}_{rest}"
    return name.replace(".", "_").replace(" ", "_").lower()


def grant_in(value: str) -> str:
    """The grant a carrier's (decoded) value may hold for an app: its last space-separated word (``Bearer G``),
    unquoted (``"G"``), without base64 padding (``G==``). Only a grant-shaped one is offered."""
    word = value.strip(_BLANK + '"').replace("\t", " ").rpartition(" ")[2]
    return word.strip('"').rstrip("=")


def query_pairs(query: str) -> list[tuple[str, str]]:
    """``(name, value)`` of every pair of a raw query string or form body: names as :func:`field_name` reads
    them, values decoded; pairs split on ``&``, ``;`` and ``#``."""
    pairs = []
    for raw in _PAIRS.split(query)[::2]:
        if raw:
            name, _, value = raw.partition("=")
            pairs.append((field_name(name), _decoded(value)))
    return pairs


def cookie_pairs(headers: MultiMapping[str]) -> list[tuple[str, str]]:
    """``(name, value)`` of every cookie in every ``Cookie`` header: names lower-cased, values percent-decoded;
    split on ``;`` and ``,``, so that a cookie hidden in another's quoted value is seen as an app might see it."""
    pairs = []
    for header in headers.getall("Cookie", ()):
        for piece in _COOKIE_PIECES.split(header)[::2]:
            name, sep, value = piece.partition("=")
            if sep:
                pairs.append((name.strip(_BLANK).lower(), _decoded(value.strip(_BLANK))))
    return pairs


def header_values(headers: MultiMapping[str], name: str) -> list[str]:
    """Every comma-separated value of every ``name`` header, percent-decoded."""
    return [_decoded(v.strip(_BLANK)) for line in headers.getall(name, ()) for v in line.split(",")]


class Carriers:
    """The carriers of the apps that share a route, indexed by where they look."""

    def __init__(self, apps: Iterable[tuple[str, Sequence[Carrier]]]) -> None:
        self._by_where: dict[Where, dict[str, list[tuple[str, Carrier]]]] = {w: {} for w in Where}
        for app, carriers in apps:
            for carrier in carriers:
                self._by_where[carrier.where].setdefault(_index_name(carrier), []).append((app, carrier))
        self.query = self._by_where[Where.QUERY]
        self.cookie = self._by_where[Where.COOKIE]
        self.header = self._by_where[Where.HEADER]
        self.body = [c for carriers in self._by_where[Where.BODY].values() for c in carriers]

    def body_app(self, method: str, path: str) -> str | None:
        """The app whose body carrier's endpoint serves ``method`` at ``path`` (its body must be read first)."""
        for app, carrier in self.body:
            if carrier.endpoint is not None and carrier.endpoint.match(method, path) is not None:
                return app
        return None

    def find(
        self, query: str, headers: MultiMapping[str], method: str, path: str, body: bytes | None = None
    ) -> list[Found]:
        """Every carrier holding a grant-shaped value (a body carrier's endpoint: whatever its body holds)."""
        found: list[Found] = []
        if query and self.query:
            pairs = query_pairs(query)
            for name, value in pairs:
                if name in self.query and shaped(grant := grant_in(value)):
                    for app, carrier in self.query[name]:
                        found.append(Found(carrier, Offer(grant, app, _bound(carrier, pairs), False)))
        if self.cookie and "Cookie" in headers:
            for name, value in cookie_pairs(headers):
                if name in self.cookie and shaped(grant := grant_in(value)):
                    found.extend(Found(c, Offer(grant, app, {}, c.passive)) for app, c in self.cookie[name])
        for name, carriers in self.header.items():
            for value in header_values(headers, name) if name in headers else ():
                if shaped(grant := grant_in(value)):
                    found.extend(Found(c, Offer(grant, app, {}, c.passive)) for app, c in carriers)
        if body is not None:
            for app, carrier in self.body:
                if carrier.endpoint is not None and carrier.endpoint.match(method, path) is not None:
                    fields = body_fields(body)
                    token = fields.get(carrier.name)
                    bound = {k: v if isinstance(v := fields.get(n), str) else "" for k, n in carrier.bound}
                    offer = Offer(token if isinstance(token, str) else "", app, bound, carrier.passive)
                    found.append(Found(carrier, offer))
        return found


def _index_name(carrier: Carrier) -> str:
    return field_name(carrier.name) if carrier.where in (Where.QUERY, Where.BODY) else carrier.name.lower()


def _bound(carrier: Carrier, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The values beside a query carrier that must match the grant's: "" when absent or given twice differently."""
    bound = {}
    for key, name in carrier.bound:
        values = {v for n, v in pairs if n == field_name(name)}
        bound[key] = values.pop() if len(values) == 1 else ""
    return bound


def body_fields(body: bytes) -> Mapping[str, Any]:
    """A body's fields: a JSON object's (whatever the Content-Type says), else a form's (the last of a name)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        return data
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return {}
    return dict(query_pairs(text))


# -- removal ----------------------------------------------------------------------------------------------
def strip_query(query: str, names: Collection[str], tokens: Collection[str] | None = None) -> str:
    """``query`` without the pairs named (in any spelling :func:`field_name` reads) in ``names`` (lower-case) —
    only those holding one of ``tokens`` (as :func:`grant_in` reads them) when given; the others untouched."""
    parts = _PAIRS.split(query)
    kept: list[str] = []
    for i in range(0, len(parts), 2):
        pair = parts[i]
        name, _, value = pair.partition("=")
        if not pair or (field_name(name) in names and (tokens is None or grant_in(_decoded(value)) in tokens)):
            continue
        if kept:
            kept.append(parts[i - 1])
        kept.append(pair)
    return "".join(kept)


def strip_cookies(headers: CIMultiDict[str], names: Collection[str], tokens: Collection[str]) -> None:
    """Remove from every ``Cookie`` header the cookies named in ``names`` (lower-case) that hold one of ``tokens``."""
    values = headers.popall("Cookie", [])
    for header in values:
        parts = _COOKIE_PIECES.split(header)
        kept: list[str] = []
        for i in range(0, len(parts), 2):
            name, _, value = parts[i].partition("=")
            if name.strip(_BLANK).lower() in names and grant_in(_decoded(value)) in tokens:
                continue
            if kept:
                kept.append(parts[i - 1])
            kept.append(parts[i])
        if "".join(kept).strip():
            headers.add("Cookie", "".join(kept).strip().lstrip(";,").strip())


def strip_headers(headers: CIMultiDict[str], names: Iterable[str], tokens: Collection[str]) -> None:
    """Remove every ``names`` header line holding one of ``tokens``."""
    for name in names:
        lines = headers.popall(name, [])
        for line in lines:
            if not any(grant_in(_decoded(v)) in tokens for v in line.split(",")):
                headers.add(name, line)


def strip_body(body: bytes, names: Collection[str]) -> bytes:
    """``body`` without the fields in ``names``: a JSON object re-encoded, a form re-joined."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        return orjson.dumps({k: v for k, v in data.items() if k not in names})
    return strip_query(body.decode("utf-8", "replace"), {field_name(n) for n in names}).encode()
