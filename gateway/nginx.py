"""Edge mode: an nginx configuration that sends the gateway only its own business.

:func:`render` turns the config and the dialects' declarations into text for nginx's ``http {}`` context:
``upstream`` blocks, ``map``s and ``server`` blocks. nginx then routes by ``hosts`` and ``mount`` as the
gateway does, and sends to the gateway

- each app's mint, info and body-carrier endpoints, ``/.well-known/jwks.json`` and ``/openapi.json``, and on
  the gateway's own host names the native API (``/v1/grants``);
- any request holding a grant-shaped value in one of its route's carriers, spelled any way the gateway
  would read it (:mod:`gateway.carriers`: names in any case or percent-encoded, ``user.token``, ``user token``,
  ``token[]``, ``&``, ``;`` or ``#``, every cookie, quoted, padded or percent-encoded values, ``Bearer G``);
- on the routes of apps that hold sessions (``session``), any request carrying the session cookie (that app's
  name for it, in any ``Cookie`` header, named exactly as the gateway reads it: :func:`session_cookie_regex`) and
  the paths below ``<mount>/_impersonation/``;

and everything else straight to the app, with no limit of nginx's own the app would not have had. Misrouting
can only ever cost a login: nginx removes ``X-Impersonation-Assertion`` on every path (and drops header names
with underscores), so only the gateway's assertion ever reaches an app. nginx 1.22 reads only the first line
of a repeated header (``$http_x_auth_token``): a grant in a second line goes to the app; 1.23 joins them.

The access log holds no query and no grant: it logs the path as the client sent it (``$request_uri`` up to
its ``?``, still percent-encoded, where ``$uri`` would decode ``/x%3Ftoken=G`` into what looks like a query),
and ``-`` instead when that path holds a run of 32 token characters, percent-encoded ones included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from yarl import URL

from . import native
from .app import OPERATIONS
from .config import AppConfig, Config
from .core import TOKEN_LENGTH
from .dialects import Carrier, Dialect, Endpoint, Where, template_regex
from .proxy import ASSERTION_HEADER, FORWARDING
from .sessions import cookie_name

GATEWAY = "igw_gateway"
GRANT = "$igw_grant"  # 1 when a request holds a grant-shaped value in any carrier
SESSION_PATH = "/_impersonation/"  # below an app's mount: the gateway's own paths on routes that hold sessions
GATEWAY_MARGIN = 5.0  # seconds nginx waits for the gateway beyond what the gateway waits for an app
# A run that decodes to a grant: each character as itself or percent-encoded.
_GRANT_RUN = f"(?:[A-Za-z0-9_-]|%[0-9A-Fa-f]{{2}}){{{TOKEN_LENGTH}}}"
_SPACES = r"\s|\+|%20|%09"  # "+" too: the gateway decodes values as a form would
_QUOTES = '"|%22'
# What str.isspace() takes for white space, as bytes (nginx's regexes do not read UTF-8): ASCII's, the separators
# \x1c-\x1f, and any non-ASCII byte (the rest, nbsp and the like, are made of them); PCRE reads the \xNN escapes.
_COOKIE_SPACE = r"\x09-\x0d\x1c-\x20\x80-\xff"
# Characters other than an ASCII capital that Python's str.lower() turns into an ASCII letter (the gateway
# lower-cases decoded names that way): the Kelvin sign.
LOWERED_TO = {"k": "\u212a"}
_TLS = "        proxy_ssl_server_name on;\n        proxy_ssl_name {host};"
_FOREVER = "24d"  # nginx's longest safe timer: "no timeout"
# Client-sent headers nginx must not pass on; the gateway drops every X-Forwarded-* it does not set itself.
_BLANKED = (
    ASSERTION_HEADER, "X-Forwarded-Port", "X-Forwarded-Prefix", "X-Forwarded-Server", "X-Forwarded-Ssl",
    "X-Forwarded-Scheme", "X-Forwarded-Uri", *FORWARDING,
)  # fmt: skip


@dataclass(frozen=True)
class _Group:
    """The apps of one server block that share a mount: the first listed takes ordinary requests."""

    mount: str
    apps: tuple[AppConfig, ...]


def _spellings(char: str) -> str:
    """Every way ``char`` of a carrier's field name may be written in a query for
    :func:`gateway.carriers.field_name` to read it back (``~*`` takes care of ASCII case)."""
    decoded = sorted({char, *LOWERED_TO.get(char, "")} | ({".", " ", "["} if char == "_" else set()))
    raw = [re.escape(c) if c.isascii() else "".join(f"\\x{b:02x}" for b in c.encode()) for c in decoded]
    encoded = ["".join(f"%{b:02x}" for b in c.encode()) for c in decoded]
    return "(?:" + "|".join(raw + encoded + ([r"\+"] if " " in decoded else [])) + ")"


def _value_regex(separators: str) -> str:
    """A value holding a grant as :func:`gateway.carriers.grant_in` reads it, up to one of ``separators`` (or
    the end): perhaps after a word and a space (``Bearer G``), perhaps quoted or padded, perhaps encoded."""
    return (f"(?:[^{separators}]*(?:{_SPACES}))?(?:{_QUOTES})*{_GRANT_RUN}(?:=|%3d)*(?:{_SPACES}|{_QUOTES})*"
            f"(?:[{separators}]|$)")  # fmt: skip


def query_regex(name: str) -> str:
    """A case-insensitive (``~*``) regex on ``$args``: ``name`` in any spelling (an array suffix ``[]`` or
    ``[0]`` too) holding a grant."""
    spelled = "".join(_spellings(c) for c in name.lower())
    return f"(?:^|[&;#]){spelled}(?:(?:\\[|%5b)[^=&;#]*)?={_value_regex('&;#')}"


def cookie_regex(name: str) -> str:
    """A case-insensitive regex on ``$http_cookie`` (every Cookie header): cookie ``name`` holding a grant."""
    return rf"(?:^|[;,])\s*{re.escape(name.lower())}\s*={_value_regex(';,')}"


def header_regex() -> str:
    """A regex on ``$http_<name>``: one of its comma-separated values holds a grant."""
    return rf"(?:^|,){_value_regex(',')}"


def session_cookie_regex(name: str) -> str:
    """A case-sensitive regex on ``$http_cookie`` (every Cookie header): a cookie named exactly ``name`` wherever the
    gateway may find one, never a longer name that merely contains it (``ximpersonation_session``). The gateway's
    parser (aiohttp's) starts a name at the start, after ``;`` or after white space (Unicode's too, which it strips
    from a pair it reads leniently) and ends it at ``=``, ``;``, white space or the end; nginx matches bytes, so any
    non-ASCII byte counts as white space here."""
    return rf"(?:^|[{_COOKIE_SPACE};]){re.escape(name)}(?:[{_COOKIE_SPACE};=]|$)"


def session_variable(name: str) -> str:
    """The variable that is 1 when a request carries the session cookie ``name``."""
    return "$igw_session_" + re.sub(r"[^a-z0-9]", "_", name.lower())


def session_map(name: str) -> str:
    return f"map $http_cookie {session_variable(name)} {{\n    default 0;\n    '~{session_cookie_regex(name)}' 1;\n}}\n"


def carrier_variable(carrier: Carrier) -> str:
    return "$igw_" + carrier.where.value[0] + "_" + re.sub(r"[^a-z0-9]", "_", carrier.name.lower())


def carrier_map(carrier: Carrier) -> str | None:
    """The ``map`` that sets :func:`carrier_variable` to 1 when a request holds a grant in ``carrier``."""
    match carrier.where:
        case Where.QUERY:
            source, regex = "$args", query_regex(carrier.name)
        case Where.COOKIE:
            source, regex = "$http_cookie", cookie_regex(carrier.name)
        case Where.HEADER:
            source, regex = "$http_" + carrier.name.lower().replace("-", "_"), header_regex()
        case Where.BODY:
            return None  # nginx cannot see bodies: the carrier's endpoint goes to the gateway by path
    return f"map {source} {carrier_variable(carrier)} {{\n    default 0;\n    '~*{regex}' 1;\n}}\n"


def endpoint_regex(mount: str, endpoint: Endpoint) -> str:
    """A location regex for ``endpoint`` below ``mount`` (the mount's case kept, the template's ignored if it says)."""
    template = template_regex(endpoint.template, named=False)
    return f"^{re.escape(mount)}" + (f"(?i:{template})$" if endpoint.ignore_case else f"{template}$")


def render(
    config: Config,
    dialects: Mapping[str, Dialect],
    *,
    listen: str,
    gateway: str,
    access_log: str = "/var/log/nginx/access.log",
    source: str = "config.yaml",
) -> str:
    """The nginx configuration for ``config``: nginx listens on ``listen``, the gateway on ``gateway``."""
    apps = config.apps
    out = [
        f"# Generated by `impersonation-gateway proxy-config nginx` from {source}: edit that file, not this one.\n"
        "# Include it in nginx's http {} context; the gateway must list nginx's address in server.trusted_proxies.\n",
        "log_format igw_no_query '$remote_addr [$time_local] \"$request_method $igw_log_path $server_protocol\" '\n"
        "                        '$status $body_bytes_sent $request_time \"$http_user_agent\"';  # links hold grants\n",
        # The path as sent, without its query; "-" when it holds what could be a grant (see the docstring).
        f"map $request_uri $igw_log_path {{\n    '~*^[^?]*{_GRANT_RUN}' -;\n"
        "    '~^(?<igw_raw_path>[^?]*)' $igw_raw_path;\n}\n",
        'map $http_upgrade $igw_connection {\n    default upgrade;\n    "" "";\n}\n',
        f"upstream {GATEWAY} {{\n    server {gateway};\n    keepalive 16;\n}}\n",
    ]
    upstream_names = {app.name: f"igw_app_{i}_{re.sub(r'[^a-z0-9]+', '_', app.name.lower())}" for i, app in
                      enumerate(apps)}  # fmt: skip
    for app in apps:
        url = URL(app.upstream)
        host = f"[{url.raw_host}]" if ":" in (url.raw_host or "") else url.raw_host
        out.append(f"upstream {upstream_names[app.name]} {{\n    server {host}:{url.port};\n    keepalive 32;\n}}\n")
    # Every app's carriers on every route, as the gateway searches them: a grant is the gateway's business
    # wherever it sits (it refuses one presented on another app's route).
    carriers = {carrier_variable(c): c for app in apps for c in dialects[app.dialect].carriers}
    maps = [m for c in carriers.values() if (m := carrier_map(c)) is not None]
    out.extend(maps)
    variables = "".join(v for v, c in carriers.items() if c.where is not Where.BODY)
    out.append(f'map "{variables}" {GRANT} {{\n    default 0;\n    "~1" 1;\n}}\n')
    # The session cookie of each app that holds sessions (its name depends on the app's public URL).
    out.extend(session_map(name) for name in sorted({_session_cookie(config, a) for a in apps if a.session}))
    servers = _servers(apps)
    for hosts, groups in servers:
        out.append(_server(config, dialects, hosts, groups, listen, access_log, upstream_names))
    return "\n".join(out)


def _servers(apps: Sequence[AppConfig]) -> list[tuple[tuple[str, ...], list[_Group]]]:
    """Server blocks as the gateway routes: host names listed by apps (each with the apps listing it), then the
    default server with the apps that list none."""
    by_host: dict[str, list[AppConfig]] = {}
    for app in apps:
        for host in app.hosts:
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            by_host.setdefault(name.lower(), [])
            if app not in by_host[name.lower()]:
                by_host[name.lower()].append(app)
    blocks: dict[tuple[str, ...], list[str]] = {}
    for host, listed in by_host.items():
        blocks.setdefault(tuple(a.name for a in listed), []).append(host)
    named = {a.name: a for a in apps}
    servers = [(tuple(hosts), _groups([named[n] for n in key])) for key, hosts in blocks.items()]
    servers.append(((), _groups([a for a in apps if not a.hosts])))
    return servers


def _session_cookie(config: Config, app: AppConfig) -> str:
    return cookie_name(config.public_url_of(app))


def _groups(apps: Iterable[AppConfig]) -> list[_Group]:
    by_mount: dict[str, list[AppConfig]] = {}
    for app in apps:
        by_mount.setdefault(app.mount, []).append(app)
    return [_Group(mount, tuple(listed)) for mount, listed in sorted(by_mount.items())]


def _server(
    config: Config,
    dialects: Mapping[str, Dialect],
    hosts: tuple[str, ...],
    groups: list[_Group],
    listen: str,
    access_log: str,
    upstream_names: Mapping[str, str],
) -> str:
    # The gateway waits for an app up to its connect timeout, then each pause of its answer up to its read timeout,
    # and then answers itself (504, in the dialect's shape): nginx waits a little longer for the gateway, so that it
    # is the gateway's answer that the client gets (with several gateways listed, nginx would also take them all for
    # failed at once, and answer 502 to everything bound for them for a while).
    gateway_timeout = max(
        (_timeout(a.read_timeout_seconds and a.read_timeout_seconds + a.connect_timeout_seconds + GATEWAY_MARGIN)
         for a in config.apps),
        key=_seconds, default="300s",
    )  # fmt: skip
    lines = [
        "server {",
        f"    listen {listen}{'' if hosts else ' default_server'};",
        f"    server_name {' '.join(hosts) if hosts else '_'};",
        f"    access_log {access_log}{'' if access_log == 'off' else ' igw_no_query'};",
        "    # Nothing nginx alone would limit: bodies of any size, streamed both ways, the path as sent.",
        "    client_max_body_size 0;",
        f"    client_body_timeout {_timeout(config.server.body_timeout_seconds)};",
        "    proxy_request_buffering off;",
        "    proxy_buffering off;",
        "    proxy_http_version 1.1;",
        "    # A kept-alive connection the app closed just as it was reused fails before any answer: the request goes",
        "    # again (to a one-server upstream, only then), whatever its method. The gateway's locations say off.",
        "    proxy_next_upstream error non_idempotent;",
        "    merge_slashes off;",
        "    underscores_in_headers off;  # X_Impersonation_Assertion and its like never pass",
        "    error_page 418 = @igw_gateway;",
        "    # Every location sets $igw_host: the app's own authority, or the client's Host for the gateway.",
        "    proxy_set_header Host $igw_host;",
        "    proxy_set_header X-Forwarded-For $remote_addr;",
        "    proxy_set_header X-Forwarded-Proto $scheme;",
        "    proxy_set_header X-Forwarded-Host $http_host;",
        "    proxy_set_header Upgrade $http_upgrade;",
        "    proxy_set_header Connection $igw_connection;",
        *(f'    proxy_set_header {name} "";' for name in _BLANKED),
        "",
    ]
    gateway_block = _gateway_headers(gateway_timeout)
    # The native API answers on the gateway's own host names: on a host an app lists, the path is the app's.
    every_host = (path for path, operation in OPERATIONS.items() if operation.every_host)
    for path in (*every_host, *(() if hosts else (native.PATH,))):
        lines += [f"    location = {path} {{", *gateway_block, "    }"]
    for group in groups:
        endpoints = {e for app in group.apps for e in dialects[app.dialect].endpoints}
        endpoints |= {c.endpoint for app in group.apps for c in dialects[app.dialect].carriers if c.endpoint}
        for endpoint in sorted(endpoints, key=lambda e: (e.template, e.method)):
            regex = endpoint_regex(group.mount, endpoint)
            lines += [f'    location ~ "{regex}" {{  # {endpoint.method} {endpoint.template}', *gateway_block, "    }"]
    mounts = {g.mount for g in groups}
    for group in groups:
        # On a route with an app that holds sessions, /_impersonation/ is the gateway's (unless an app is mounted
        # there: the gateway routes that path to it, and so does the location of that mount).
        if any(a.session for a in group.apps) and group.mount + SESSION_PATH.rstrip("/") not in mounts:
            lines += [f"    location ^~ {group.mount}{SESSION_PATH} {{", *gateway_block, "    }"]
    for group in groups:
        first = group.apps[0]
        cookies = sorted({_session_cookie(config, a) for a in group.apps if a.session})
        body = _app_block(first, upstream_names[first.name], [session_variable(c) for c in cookies])
        if group.mount:
            lines += [f"    location = {group.mount} {{", *body, "    }"]
            lines += [f"    location {group.mount}/ {{", *body, "    }"]
        else:
            lines += ["    location / {", *body, "    }"]
    if "" not in mounts:  # no app without a mount: the gateway answers (404) as it would
        lines += ["    location / {", *gateway_block, "    }"]
    lines += ["    location @igw_gateway {", *gateway_block, "    }", "}", ""]
    return "\n".join(lines)


def _gateway_headers(read_timeout: str) -> list[str]:
    """The gateway sees the request as the client sent it (Host included) and routes it itself."""
    return [
        "        set $igw_host $http_host;",
        f"        proxy_pass http://{GATEWAY};",
        "        proxy_next_upstream off;  # a retried redemption would spend the grant",
        f"        proxy_read_timeout {read_timeout};",
        f"        proxy_send_timeout {read_timeout};",
    ]


def _app_block(app: AppConfig, upstream: str, sessions: Sequence[str] = ()) -> list[str]:
    url = URL(app.upstream)
    base = url.raw_path.rstrip("/")
    # With a URI part nginx replaces the location's prefix (the mount) with it, as the gateway strips it.
    target = f"{url.scheme}://{upstream}" + (f"{base}/" if app.mount or base else "")
    return [
        f"        if ({GRANT}) {{ return 418; }}  # a grant: to the gateway",
        *(f"        if ({v}) {{ return 418; }}  # a session's cookie: to the gateway" for v in sessions),
        f'        set $igw_host "{url.raw_authority}";',
        f"        proxy_pass {target};",
        f"        proxy_connect_timeout {_timeout(app.connect_timeout_seconds)};",
        f"        proxy_read_timeout {_timeout(app.read_timeout_seconds)};",
        f"        proxy_send_timeout {_timeout(app.read_timeout_seconds)};",
        *(
            ["        proxy_ssl_server_name on;", f"        proxy_ssl_name {url.raw_host};"]
            if url.scheme == "https"
            else []
        ),
    ]


def _timeout(seconds: float) -> str:
    if not seconds:
        return _FOREVER
    return f"{round(seconds * 1000)}ms" if seconds != int(seconds) else f"{int(seconds)}s"


def _seconds(value: str) -> float:
    if value == _FOREVER:
        return float("inf")
    return float(value[:-2]) / 1000 if value.endswith("ms") else float(value[:-1])
