"""What a request is for: its target, parsed once (normalised for routing, raw for forwarding), the apps it
selects by host and mount, and the address of the client behind it.

Routing and forwarding use the same parse: ``/cp/../sw/x`` routes to the app mounted at ``/sw`` and reaches
it as ``/x``; a dot-segment that would climb above the root is refused; ``/%73w/x`` selects ``/sw`` and
the upstream gets ``/x``, never a shifted slice of the raw path. The upstream URL is built from the app's
own scheme, host and port (see :mod:`gateway.proxy`), so nothing in the target can change where it goes.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .config import AppConfig

# A segment an upstream might still take for "." or "..": around an encoded "/" or a backslash (which we do not
# split on), or with ";parameters" (which some servers cut off).
_HIDDEN_DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.{1,2}(?:[/\\;]|$)")


class BadTarget(ValueError):
    """A request target the gateway will not route (400)."""


@dataclass(frozen=True)
class Target:
    """A request target. ``segments`` are the path's raw segments after dot-segments were resolved,
    ``names`` the same decoded (what routing and endpoints compare); ``query`` is raw, without the ``?``."""

    host: str
    segments: tuple[str, ...]
    names: tuple[str, ...]
    query: str


def parse_target(raw: str, host: str) -> Target:
    """Parse an origin-form (``/p?q``) or absolute-form (``http://h/p?q``, whose authority is then the
    host) request target; raise BadTarget for any other form or a path that climbs above the root."""
    if not raw.startswith("/"):
        parts = urlsplit(raw)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise BadTarget("the request target must be a path or an http(s) URL")
        host = parts.netloc.rpartition("@")[2]
        raw = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    path, _, query = raw.partition("?")
    path = path.partition("#")[0]
    segments: list[str] = []
    names: list[str] = []
    pieces = path[1:].split("/")
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        name = unquote(piece) if "%" in piece else piece
        if name not in (".", "..") and _HIDDEN_DOT_SEGMENT.search(name):
            raise BadTarget("the path holds a disguised dot-segment")
        if name in (".", ".."):
            if name == "..":
                if not segments:
                    raise BadTarget("the path climbs above the root")
                segments.pop()
                names.pop()
            if i == last:  # "/a/b/.." is "/a/": the directory, not the file
                segments.append("")
                names.append("")
            continue
        segments.append(piece)
        names.append(name)
    return Target(host, tuple(segments), tuple(names), query)


@dataclass(frozen=True)
class Route:
    """The apps a request may be for (several when they share host and mount), and how many leading path
    segments their mount takes."""

    apps: tuple[AppConfig, ...]
    mount: int

    def path(self, target: Target) -> str:
        """The decoded path below the mount: what a dialect's endpoints match."""
        return "/" + "/".join(target.names[self.mount :])

    def raw_path(self, target: Target) -> str:
        """The raw path below the mount: what the upstream receives after its own base path."""
        return "/" + "/".join(target.segments[self.mount :])


class Router:
    """Selects apps as DESIGN section 4 says: by ``hosts``, then by the longest matching ``mount``."""

    def __init__(self, apps: Sequence[AppConfig]) -> None:
        self._by_host: dict[str, list[AppConfig]] = {}
        for app in apps:
            for host in app.hosts:
                self._by_host.setdefault(host.lower(), []).append(app)
        self._hostless = [a for a in apps if not a.hosts]
        self._mounts = {a.name: tuple(a.mount.split("/")[1:]) if a.mount else () for a in apps}

    def host_apps(self, host: str) -> list[AppConfig] | None:
        """The apps that list ``host`` (with or without its port), or None when none does."""
        host = host.lower()
        found = self._by_host.get(host)
        if found is None and ":" in host and not host.endswith("]"):
            found = self._by_host.get(host.rsplit(":", 1)[0])
        return found

    def select(self, target: Target) -> Route | None:
        pool = self.host_apps(target.host) or self._hostless
        best: list[AppConfig] = []
        depth = -1
        for app in pool:
            mount = self._mounts[app.name]
            if len(mount) >= depth and target.names[: len(mount)] == mount:
                if len(mount) > depth:
                    best, depth = [], len(mount)
                best.append(app)
        return Route(tuple(best), depth) if best else None


def client_address(peer: str, forwarded_for: Iterable[str], trusted: tuple[str, ...]) -> str:
    """The caller: the peer, or the nearest untrusted hop of X-Forwarded-For when the peer is a trusted proxy."""
    if not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def is_trusted(address: str, trusted: tuple[str, ...]) -> bool:
    """Whether ``address`` lies in one of the ``trusted`` CIDRs."""
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in _networks(trusted))


@functools.cache
def _networks(cidrs: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]
