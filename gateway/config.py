"""Configuration: ``config.yaml`` plus environment overrides, loaded once into frozen dataclasses.

Every key is checked at start-up; an unknown key or a bad value raises :class:`ConfigError` with a
message that names the key (``store.timeout_seconds: expected a number, got 'soon'``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .session_rules import MODES, Rule

DIALECTS = ("activeplatform", "pyramid", "denovolab", "btcdirect")

# Roles that may mint when an app does not say (DESIGN §5).
DEFAULT_MINT_ROLES: dict[str, tuple[str, ...]] = {
    "activeplatform": ("admin", "owner"),
    "pyramid": ("enterprise_admin", "domain_admin"),
    "denovolab": ("admin",),
    "btcdirect": ("partner",),
}


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is one line naming the key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    trusted_proxies: tuple[str, ...] = ()
    body_limit_bytes: int = 65536
    body_timeout_seconds: float = 30.0  # a body the gateway reads whole, or a pause in one it streams
    upstream_connections: int = 256  # open connections per upstream address, at most
    drain_seconds: float = 10.0
    # A client connection with no request in progress (idle between requests, or its request's head still
    # arriving: a slow-loris) is closed after this long; above nginx's upstream keepalive_timeout (60 s).
    keepalive_seconds: float = 75.0


@dataclass(frozen=True)
class StoreConfig:
    url: str = "embedded"
    prefix: str = "igw:"
    timeout_seconds: float = 1.0


@dataclass(frozen=True)
class DirectoryConfig:
    file: Path | None = None
    refresh_seconds: float = 1.0


@dataclass(frozen=True)
class AssertionConfig:
    private_key_file: Path | None = None
    ttl_seconds: int = 30
    previous_key_files: tuple[Path, ...] = ()  # published in the JWKS after the signing key (a rotation)


@dataclass(frozen=True)
class RateLimitConfig:
    """Failed credentials allowed per window, per client address and per credential fingerprint."""

    failures: int = 20
    window_seconds: int = 60


ADMIN_SCOPES = ("scim", "revoke")


@dataclass(frozen=True)
class AdminToken:
    """A bearer token of the admin listener; only its SHA-256 is kept once the config is loaded."""

    id: str
    scopes: tuple[str, ...] = ()
    token: str | None = None
    token_sha256: str | None = None


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener (SCIM provisioning, revocation): its own address, bearer tokens with scopes."""

    host: str = "127.0.0.1"
    port: int | None = 8081  # None: no admin listener; without tokens there is none either
    tokens: tuple[AdminToken, ...] = ()

    @property
    def listens(self) -> bool:
        """Whether the admin listener opens: it has a port and tokens (with none it could only refuse)."""
        return self.port is not None and bool(self.tokens)


@dataclass(frozen=True)
class SessionConfig:
    """An app whose impersonations the gateway holds as sessions (DESIGN §13); absent: hand-off, as before."""

    max_seconds: int = 3600  # hard cap from redemption; never extended
    idle_seconds: int = 900  # ends after this long without a request of the session
    mode: str = "full"  # the most a grant of this app may get, and its default
    allow: tuple[str, ...] = ()  # "METHOD /path" patterns a read_only session may still use
    deny: tuple[str, ...] = ()  # "METHOD /path" patterns refused in every session
    banner: bool = True  # a notice with an End button in the app's HTML pages
    end_url: str | None = None  # where ending a session sends the browser; None: the gateway's own page


@dataclass(frozen=True)
class AppConfig:
    name: str
    dialect: str
    upstream: str
    grant_ttl_seconds: int = 60
    mount: str = ""
    hosts: tuple[str, ...] = ()
    public_url: str | None = None
    mint_roles: tuple[str, ...] = ()
    redeem_on_get: bool = False
    require_reason: bool = False  # a mint without X-Impersonation-Reason (native: reason) is refused
    supersede: bool = False  # a new grant for an actor and a subject revokes their earlier live ones
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 300.0  # the longest pause in the upstream's answer; 0 = none
    session: SessionConfig | None = None  # None: a redemption hands the login to the app (no session)

    @property
    def roles_allowed_to_mint(self) -> tuple[str, ...]:
        return self.mint_roles or DEFAULT_MINT_ROLES[self.dialect]


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    assertion: AssertionConfig = field(default_factory=AssertionConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    apps: tuple[AppConfig, ...] = ()
    # The environment variables that set a key ("server.port" -> "GATEWAY_PORT"), so that a message about a value
    # names the setting the user actually gave.
    overrides: tuple[tuple[str, str], ...] = ()

    def setting(self, key: str) -> str:
        """The name of the setting that chose ``key``'s value: its environment variable, or the key itself."""
        return dict(self.overrides).get(key, key)

    def app(self, name: str) -> AppConfig:
        return self._apps_by_name[name]

    @functools.cached_property
    def _apps_by_name(self) -> dict[str, AppConfig]:
        return {app.name: app for app in self.apps}

    def public_url_of(self, app: AppConfig) -> str:
        return (app.public_url or self.server.public_url).rstrip("/")


ENV_OVERRIDES = {
    "GATEWAY_REDIS_URL": ("store", "url"),
    "GATEWAY_HOST": ("server", "host"),
    "GATEWAY_PORT": ("server", "port"),
    "GATEWAY_PUBLIC_URL": ("server", "public_url"),
    "GATEWAY_ADMIN_PORT": ("admin", "port"),
}


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the config file (``path``, else ``$GATEWAY_CONFIG``, else ``./config.yaml``) and apply env overrides."""
    env = os.environ if env is None else env
    path = Path(path or env.get("GATEWAY_CONFIG") or "config.yaml")
    raw = read_yaml(path, "config", ConfigError)
    return config_from_dict(raw or {}, base_dir=path.resolve().parent, env=env)


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """The YAML document in ``path``; ``error`` with one line naming the file, and for a syntax error its line and
    column (``config: config.yaml:7:3: not valid YAML: mapping values are not allowed here``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{what}: {path} is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None)
        context = getattr(exc, "context", None)
        detail = f": {problem}" + (f" ({context})" if context else "") if problem else ""
        raise error(f"{what}: {where}: not valid YAML{detail}".replace("\n", " ")) from None


def config_from_dict(raw: Any, *, base_dir: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build and validate a :class:`Config` from plain data (as parsed from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping at the top level")
    raw = {**raw}
    overrides = []
    for var, (section, key) in ENV_OVERRIDES.items():
        if env and var in env:
            section_data = raw.get(section) or {}
            if not isinstance(section_data, dict):
                raise ConfigError(f"{section}: expected a mapping")
            value: Any = env[var]
            if key == "port":
                value = _env_int(var, value)
            raw[section] = {**section_data, key: value}
            overrides.append((f"{section}.{key}", var))
    if "overrides" in raw:
        raise ConfigError("overrides: unknown key")
    apps_raw = raw.pop("apps", None) or {}
    if not isinstance(apps_raw, dict):
        raise ConfigError("apps: expected a mapping of app name to settings")
    base = _build(Config, raw, "")
    apps = []
    for name, settings in apps_raw.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"apps.{name}: expected a mapping")
        apps.append(_build(AppConfig, {**settings, "name": str(name)}, f"apps.{name}."))
    config: Config = dataclasses.replace(base, apps=tuple(apps), overrides=tuple(overrides))
    config = dataclasses.replace(config, admin=_hash_admin_tokens(config.admin))
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    _validate(config)
    return config


def _hash_admin_tokens(admin: AdminConfig) -> AdminConfig:
    """Each admin token with its SHA-256 only (a plain ``token`` is for development, like the directory's)."""
    hashed = []
    for i, entry in enumerate(admin.tokens):
        key = f"admin.tokens[{i}]"
        if (entry.token is None) == (entry.token_sha256 is None):
            raise ConfigError(f"{key}: give token or token_sha256 (one of them)")
        if entry.token is not None:
            if not entry.token:
                raise ConfigError(f"{key}.token: must not be empty")
            digest = hashlib.sha256(entry.token.encode()).hexdigest()
        else:
            digest = (entry.token_sha256 or "").lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ConfigError(f"{key}.token_sha256: expected 64 hex digits")
        for scope in entry.scopes:
            if scope not in ADMIN_SCOPES:
                raise ConfigError(f"{key}.scopes: expected some of {', '.join(ADMIN_SCOPES)}, got {scope!r}")
        hashed.append(AdminToken(entry.id, entry.scopes, None, digest))
    _unique_ids = {t.id for t in hashed}
    if len(_unique_ids) != len(hashed):
        raise ConfigError("admin.tokens: two tokens share an id")
    return dataclasses.replace(admin, tokens=tuple(hashed))


def _env_int(var: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{var}: expected an integer, got {value!r}") from None


def _build(cls: type[Any], data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _coerce(hints[f.name], data[f.name], f"{prefix}{f.name}")
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(hint, value, f"{key}.")
    if origin is tuple:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a file path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{key}: unsupported setting")  # pragma: no cover - a bug in the dataclasses above


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    def resolve(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base_dir / p)

    return dataclasses.replace(
        config,
        directory=dataclasses.replace(config.directory, file=resolve(config.directory.file)),
        assertion=dataclasses.replace(
            config.assertion,
            private_key_file=resolve(config.assertion.private_key_file),
            previous_key_files=tuple(
                p if p.is_absolute() else base_dir / p for p in config.assertion.previous_key_files
            ),
        ),
    )


_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # it names store keys and nginx upstreams
_MOUNT = re.compile(r"(?:/[A-Za-z0-9._~-]+)+")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _check_url(key: str, url: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(f"{key}: expected an absolute {'/'.join(schemes)} URL, got {url!r}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value!r}")


def _validate(config: Config) -> None:
    s = config.server
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"server.port: expected 0-65535, got {s.port}")
    _check_url("server.public_url", s.public_url, ("http", "https"))
    for i, cidr in enumerate(s.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies[{i}]: not a CIDR: {cidr!r}") from None
    _positive("server.body_limit_bytes", s.body_limit_bytes)
    _positive("server.body_timeout_seconds", s.body_timeout_seconds)
    _positive("server.upstream_connections", s.upstream_connections)
    _positive("server.drain_seconds", s.drain_seconds)
    _positive("server.keepalive_seconds", s.keepalive_seconds)
    if config.admin.port is not None and not 0 <= config.admin.port <= 65535:
        raise ConfigError(f"admin.port: expected 0-65535 or null, got {config.admin.port}")
    url = config.store.url
    schemes = ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")
    if url != "embedded" and urlsplit(url).scheme not in schemes:
        raise ConfigError(
            f"store.url: expected 'embedded' or a redis://, rediss://, redis+sentinel:// or redis+cluster:// URL, "
            f"got {url!r}"
        )
    if not config.store.prefix:
        raise ConfigError("store.prefix: must not be empty")
    _positive("store.timeout_seconds", config.store.timeout_seconds)
    _positive("directory.refresh_seconds", config.directory.refresh_seconds)
    _positive("assertion.ttl_seconds", config.assertion.ttl_seconds)
    _positive("rate_limit.failures", config.rate_limit.failures)
    _positive("rate_limit.window_seconds", config.rate_limit.window_seconds)
    for app in config.apps:
        key = f"apps.{app.name}"
        if not _APP_NAME.fullmatch(app.name):
            raise ConfigError(f"{key}: an app's name is letters, digits, '.', '_' and '-' (at most 64), starting "
                              "with a letter or digit")  # fmt: skip
        if app.dialect not in DIALECTS:
            raise ConfigError(f"{key}.dialect: expected one of {', '.join(DIALECTS)}, got {app.dialect!r}")
        _check_url(f"{key}.upstream", app.upstream, ("http", "https"))
        _positive(f"{key}.grant_ttl_seconds", app.grant_ttl_seconds)
        _positive(f"{key}.connect_timeout_seconds", app.connect_timeout_seconds)
        if app.read_timeout_seconds < 0:
            raise ConfigError(f"{key}.read_timeout_seconds: expected 0 (none) or more, got {app.read_timeout_seconds}")
        if app.mount and (not _MOUNT.fullmatch(app.mount) or {".", ".."} & set(app.mount.split("/"))):
            raise ConfigError(
                f"{key}.mount: expected '' or a path like '/crm' (letters, digits, '.', '_', '~', '-'; no trailing "
                f"slash), got {app.mount!r}"
            )
        for i, host in enumerate(app.hosts):
            if not _HOST.fullmatch(host):
                raise ConfigError(f"{key}.hosts[{i}]: expected a host name, optionally with ':port', got {host!r}")
        parts = urlsplit(app.upstream)
        if parts.query or parts.fragment or parts.username is not None:
            raise ConfigError(f"{key}.upstream: expected scheme://host[:port][/base/path], got {app.upstream!r}")
        if app.public_url is not None:
            _check_url(f"{key}.public_url", app.public_url, ("http", "https"))
        if app.session is not None:
            _validate_session(f"{key}.session", app.session)


def _validate_session(key: str, session: SessionConfig) -> None:
    _positive(f"{key}.max_seconds", session.max_seconds)
    _positive(f"{key}.idle_seconds", session.idle_seconds)
    if session.mode not in MODES:
        raise ConfigError(f"{key}.mode: expected one of {', '.join(MODES)}, got {session.mode!r}")
    for name, patterns in (("allow", session.allow), ("deny", session.deny)):
        for i, pattern in enumerate(patterns):
            try:
                Rule.parse(pattern)
            except ValueError as exc:
                raise ConfigError(f"{key}.{name}[{i}]: {exc}") from None
    url = session.end_url
    if url is not None:
        # A path of the app's host, or an absolute URL; never "//host" (another host, in a path's clothes).
        parts = urlsplit(url) if url.isprintable() and not any(c.isspace() for c in url) else None
        path = parts is not None and url.startswith("/") and not url.startswith("//")
        absolute = parts is not None and parts.scheme in ("http", "https") and bool(parts.netloc)
        if not (path or absolute):
            raise ConfigError(f"{key}.end_url: expected an absolute http(s) URL or a path starting with '/' (not "
                              f"'//'), got {url!r}")  # fmt: skip
