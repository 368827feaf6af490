"""``impersonation-gateway check-config``: everything start-up would refuse, found before start-up, and the
routes the gateway will serve.

:func:`check` reads the config, the assertion keys and the directory file (subjects files streamed, every line
checked) and returns the problems, one line each, and a description of the routes: per app its hosts, mount,
upstream, endpoints and carriers, then the gateway's own endpoints and the admin listener.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .app import OPERATIONS
from .assertion import load_keys
from .config import Config, ConfigError, load_config
from .dialects import Carrier, all_dialects
from .directory import DirectoryError, load_directory_file
from .native import PATH as NATIVE_PATH
from .store import Store, redacted, unreachable


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)


def check(path: Path | None) -> Report:
    report = Report()
    try:
        config = load_config(path)
    except ConfigError as exc:
        report.problems.append(str(exc))
        return report
    _keys(config, report)
    _listeners(config, report)
    _store(config, report)
    subjects = _directory(config, report)
    report.routes = routes(config, subjects)
    return report


def _keys(config: Config, report: Report) -> None:
    report.problems.extend(load_keys(config.assertion).problems)


def _listeners(config: Config, report: Report) -> None:
    admin = config.admin
    if admin.listens and admin.port == config.server.port and admin.port != 0:
        report.problems.append(f"admin.port: {admin.port} is server.port too; give the admin listener its own port")
    seen: dict[tuple[str, str], str] = {}
    for app in config.apps:
        for host in app.hosts or ("",):
            other = seen.setdefault((host.lower(), app.mount), app.name)
            if other != app.name and config.app(other).dialect == app.dialect:
                where = f"host {host!r}" if host else "no host"
                report.problems.append(
                    f"apps.{app.name}: same {where} and mount {app.mount or '/'!r} as apps.{other}, and the same "
                    "dialect: its mint endpoints are unreachable (the first listed answers)"
                )


def _store(config: Config, report: Report) -> None:
    """Whether the store answers a PING (the embedded one always does: it lives in the serving process)."""
    url = config.store.url
    if url == "embedded":
        return

    async def ping() -> None:
        store = Store.open(config.store)
        try:
            await store.ping(raising=True)
        finally:
            await store.close()

    try:
        asyncio.run(ping())
    except Exception as exc:
        report.problems.append(f"store.url: {unreachable(url, exc)}")


def _directory(config: Config, report: Report) -> dict[str, str]:
    """Check the directory file; per app, what it holds (for the routes)."""
    file = config.directory.file
    if file is None:
        return {}
    try:
        apps = load_directory_file(file)
    except DirectoryError as exc:
        report.problems.append(f"directory.file: {str(exc).removeprefix('directory: ')}")
        return {}
    known = {a.name for a in config.apps}
    held = {}
    for name, directory in apps.items():
        if name not in known:
            report.problems.append(f"directory.file: apps.{name} is not an app of the config")
            continue
        try:
            ids = Counter(subject.id for subject in directory.subjects)  # a subjects file is read line by line
        except DirectoryError as exc:
            report.problems.append(f"directory.file: {str(exc).removeprefix('directory: ')}")
            continue
        twice = [i for i, n in ids.items() if n > 1]
        if twice:
            report.problems.append(f"directory.file: apps.{name}: subject {twice[0]!r} is given twice")
        actors = directory.actors
        held[name] = (f"{len(actors.principals)} principals, {len(actors.resellers)} resellers, "
                      f"{sum(ids.values())} subjects")  # fmt: skip
    return held


def routes(config: Config, directory: dict[str, str]) -> list[str]:
    dialects = all_dialects(a.dialect for a in config.apps)
    lines = [f"listening on {config.server.host}:{config.server.port}, public URL {config.server.public_url}",
             f"store: {redacted(config.store.url)} (prefix {config.store.prefix!r})"]  # fmt: skip
    for app in config.apps:
        dialect = dialects[app.dialect]
        hosts = ", ".join(app.hosts) if app.hosts else "any host no app lists"
        lines += [
            "",
            f"app {app.name} ({app.dialect}) -> {app.upstream}",
            f"  hosts: {hosts}; mount: {app.mount or '/'}; login URLs: {config.public_url_of(app)}{app.mount}/",
            f"  directory: {directory.get(app.name, 'none in directory.file (SCIM or a later load)')}",
            *(f"  {e.kind:<6} {e.method:<6} {app.mount}{e.template}" for e in dialect.endpoints),
            *(f"  carrier {_carrier(c)}" for c in dialect.carriers),
            f"  grants: {app.grant_ttl_seconds} s; redeem_on_get: {_yes(app.redeem_on_get)}; "
            f"require_reason: {_yes(app.require_reason)}; supersede: {_yes(app.supersede)}; "
            f"mint roles: {', '.join(app.roles_allowed_to_mint)}",
        ]
    lines += [
        "",
        f"gateway, on every host: {', '.join(f'GET {p}' for p, op in OPERATIONS.items() if op.every_host)}",
        f"gateway, on hosts no app lists: POST {NATIVE_PATH}, "
        f"{', '.join(f'GET {p}' for p, op in OPERATIONS.items() if not op.every_host)}",
    ]
    admin = config.admin
    if admin.port is None:
        lines.append("admin listener: none (admin.port: null)")
    elif not admin.listens:
        lines.append("admin listener: none (no admin.tokens)")
    else:
        tokens = ", ".join(f"{t.id} ({', '.join(t.scopes) or 'no scope'})" for t in admin.tokens) or "none"
        lines.append(f"admin listener on {admin.host}:{admin.port}: SCIM /scim/v2/{{app}}/, revocation /v1/; "
                     f"tokens: {tokens}")  # fmt: skip
    return lines


def _carrier(carrier: Carrier) -> str:
    text = f"{carrier.where.value} {carrier.name}"
    for grant_field, name in carrier.bound:
        text += f" + {name} (the grant's {grant_field})"
    if carrier.endpoint is not None:
        text += f" on {carrier.endpoint.method} {carrier.endpoint.template}"
    if carrier.passive:
        text += " (or the app's own credential)"
    return text


def _yes(value: bool) -> str:
    return "yes" if value else "no"
