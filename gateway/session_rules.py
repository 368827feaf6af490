"""What a session may do (DESIGN §13): the modes a grant may carry, the ``allow`` and ``deny`` patterns of an app's
``session`` section, and the one decision made from them, :func:`permitted`.

A pattern is ``METHOD PATH``: METHOD an HTTP method (compared exactly, as HTTP does; the pattern's is uppercased) or
``*`` for any; PATH a glob compared case-sensitively with the normalised path the gateway routes by, where ``*``
matches within one segment and a trailing ``/*`` matches the path itself and everything below it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SessionConfig

# The modes a grant may carry, from the most a session may do to the least.
MODES = ("full", "read_only")
# What a read_only session may always do: the methods that change nothing.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)


@dataclass(frozen=True)
class Rule:
    """One ``METHOD /path`` pattern: ``method`` uppercased (or ``*``), ``glob`` without a trailing slash."""

    method: str
    glob: str

    @classmethod
    def parse(cls, text: str) -> Rule:
        """The rule ``text`` spells; ValueError saying what is wrong with it otherwise."""
        parts = text.split()
        if len(parts) != 2:
            raise ValueError(f"expected 'METHOD /path' (e.g. 'POST /search' or '* /billing/*'), got {text!r}")
        method, glob = parts
        if not _METHOD.fullmatch(method):
            raise ValueError(f"{method!r} is not an HTTP method (nor '*'), in {text!r}")
        if not glob.startswith("/"):
            raise ValueError(f"the path must start with '/', in {text!r}")
        if "?" in glob or "#" in glob:
            raise ValueError(f"the path is matched without its query: no '?' or '#', in {text!r}")
        glob = _without_trailing_slash(glob)
        # The path compared is normalised: a pattern naming an empty or a dot segment could never match.
        if "//" in glob or {".", ".."} & set(glob.split("/")):
            raise ValueError(f"the path must be normalised (no '//', '.' or '..' segments), in {text!r}")
        return cls("*" if method == "*" else method.upper(), glob)

    @functools.cached_property
    def _pattern(self) -> re.Pattern[str]:
        if self.glob == "/*" or self.glob.endswith("/*"):  # the path itself and everything below it
            return re.compile(_segments(self.glob[:-2]) + "(?:/.*)?", re.DOTALL)
        return re.compile(_segments(self.glob), re.DOTALL)

    def matches(self, method: str, path: str) -> bool:
        """Whether a request of ``method`` to the normalised ``path`` is this rule's (a trailing slash is ignored)."""
        if self.method != "*" and self.method != method:
            return False
        return self._pattern.fullmatch(_without_trailing_slash(path) or "/") is not None

    def __str__(self) -> str:
        return f"{self.method} {self.glob}"


def _segments(glob: str) -> str:
    """``glob`` as a regular expression: ``*`` is any run of characters within one segment."""
    return "[^/]*".join(re.escape(piece) for piece in glob.split("*"))


def _without_trailing_slash(path: str) -> str:
    return path.rstrip("/") or "/"


@dataclass(frozen=True)
class Rules:
    """The parsed ``allow`` and ``deny`` patterns of a ``session`` section."""

    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]


@functools.lru_cache(maxsize=1024)
def rules_of(session: SessionConfig) -> Rules:
    """``session``'s patterns, parsed once (the config has checked that each parses)."""
    return Rules(tuple(map(Rule.parse, session.allow)), tuple(map(Rule.parse, session.deny)))


def permitted(session: SessionConfig, mode: str, method: str, path: str, websocket: bool = False) -> str | None:
    """None when a request of a session in ``mode`` of an app with ``session`` may reach the app, else why not:
    ``"denied"`` (a ``deny`` pattern matches it, in any mode) or ``"read_only"`` (a read_only session, and the
    method changes something, or the request is a WebSocket handshake, and no ``allow`` pattern matches it).
    ``path`` is the normalised path the gateway routes by."""
    rules = rules_of(session)
    if any(rule.matches(method, path) for rule in rules.deny):
        return "denied"
    changes = websocket or method not in SAFE_METHODS
    if mode == "read_only" and changes and not any(rule.matches(method, path) for rule in rules.allow):
        return "read_only"
    return None
