"""``impersonation-gateway``: serve, load the directory, generate a signing key, read the audit stream, and
print an nginx configuration for edge mode."""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import signal
import sys
from collections.abc import Sequence, Sized
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import structlog
from tqdm import tqdm

from .assertion import generate_key_file
from .config import Config, ConfigError, load_config
from .directory import AppDirectory, DirectoryError, SubjectsFile, load_directory_file, source_digest
from .logging import configure_logging
from .store import Store, unreachable


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2 (the status of every such problem, of every
    command: a bad config, a taken port, a store that does not answer)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ConfigError, DirectoryError) as exc:
        print(f"impersonation-gateway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="impersonation-gateway", description="A 'log in as customer' gateway.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    _config_arg(serve)
    serve.add_argument("--host", help="listen address (default: server.host)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port)")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--dev", action="store_true", help="console log lines instead of JSON")
    serve.set_defaults(func=_serve)

    directory = sub.add_parser("directory", help="manage the directory in the store")
    dsub = directory.add_subparsers(dest="action", required=True, metavar="ACTION")
    load = dsub.add_parser("load", help="replace the apps in FILE with its data, atomically per app")
    load.add_argument("file", metavar="FILE", type=Path)
    _config_arg(load)
    load.set_defaults(func=_directory_load)

    check = sub.add_parser(
        "check-config",
        help="check the config, its keys and its directory file; print the routes it will serve",
        description="Exit 0 and print the routes (apps, hosts, mounts, endpoints, carriers), or exit 2 with one "
        "line per problem on stderr (as serve exits for the same config).",
    )
    _config_arg(check)
    check.set_defaults(func=_check_config)

    keys = sub.add_parser("keys", help="manage assertion signing keys")
    ksub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = ksub.add_parser("generate", help="write a new Ed25519 private key (PEM, PKCS#8) to FILE")
    generate.add_argument("file", metavar="FILE", type=Path)
    generate.set_defaults(func=_keys_generate)

    audit = sub.add_parser("audit", help="read the audit stream")
    asub = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    tail = asub.add_parser("tail", help="print the latest audit events as JSON lines")
    _config_arg(tail)
    tail.add_argument("-n", type=int, default=20, help="how many past events (default 20)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    tail.set_defaults(func=_audit_tail)

    proxy_config = sub.add_parser("proxy-config", help="print a configuration for a proxy in front of the gateway")
    psub = proxy_config.add_subparsers(dest="proxy", required=True, metavar="PROXY")
    nginx = psub.add_parser(
        "nginx",
        help="nginx (1.22+) routes only the gateway's own traffic to it and everything else straight to the apps",
        description="Prints, for nginx's http {} context, upstream blocks, maps and server blocks listening on "
        "--listen: the apps' mint endpoints, the JWKS, the OpenAPI document and requests holding a grant go to "
        "the gateway (server.host:server.port), everything else to the apps.",
    )
    _config_arg(nginx)
    nginx.add_argument("--listen", metavar="HOST:PORT", help="where nginx listens (default: server.public_url's)")
    nginx.add_argument(
        "--access-log", metavar="PATH", default="/var/log/nginx/access.log",
        help="nginx's access log, written without query strings (default: %(default)s; 'off' for none)",
    )  # fmt: skip
    nginx.set_defaults(func=_proxy_config_nginx)

    openapi = sub.add_parser(
        "openapi",
        help="print the OpenAPI 3.1 description (YAML) generated from the dialects' declarations",
        description="Prints what GET /openapi.json serves (as YAML), for the dialects the config's apps speak; "
        "the repository's gateway/openapi.yaml is this command's output for its config.yaml.",
    )
    _config_arg(openapi)
    openapi.set_defaults(func=_openapi)
    return parser


def _openapi(args: argparse.Namespace) -> int:
    from .openapi import render

    config = load_config(args.config)
    print(render(app.dialect for app in config.apps), end="")
    return 0


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config file (default: $GATEWAY_CONFIG or ./config.yaml)")


# -- check-config -------------------------------------------------------------------------------------
def _check_config(args: argparse.Namespace) -> int:
    from .check import check

    report = check(args.config)
    for problem in report.problems:
        print(f"impersonation-gateway: error: {problem}", file=sys.stderr)
    if report.problems:
        return 2  # as every command for a problem the user can fix (serve, for the same config)
    print("\n".join(report.routes))
    return 0


# -- serve --------------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    if args.workers < 1:
        raise CliError("--workers: must be 1 or more")
    if args.workers > 1 and config.store.url == "embedded":
        raise CliError(
            "store.url is 'embedded', which lives inside one process: --workers > 1 needs a shared Redis "
            "(set store.url or GATEWAY_REDIS_URL to a redis:// URL)"
        )
    if args.workers > 1 and config.assertion.private_key_file is None:
        raise CliError("--workers > 1 needs assertion.private_key_file: every worker must sign with the same key")
    _check_key(config)
    from_args = args.port is not None
    if args.workers == 1:
        run_worker(config, host, port, False, args.dev, from_args)
        return 0
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_worker, args=(config, host, port, args.dev, from_args))
               for _ in range(args.workers)]  # fmt: skip
    for worker in workers:
        worker.start()

    def stop(signum: int, frame: Any) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                worker.terminate()  # SIGTERM: each worker drains its own requests

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.join()
    return max((w.exitcode or 0) for w in workers)


def _check_key(config: Config) -> None:
    from .assertion import load_keys

    problems = load_keys(config.assertion).problems
    if problems:
        raise CliError(problems[0])


def _worker(config: Config, host: str, port: int, dev: bool, port_from_args: bool) -> None:
    """One of ``--workers`` processes: its problem is one line too, and its exit status 2."""
    try:
        run_worker(config, host, port, True, dev, port_from_args)
    except CliError as exc:
        print(f"impersonation-gateway: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def collect_often() -> None:
    """Tune the collector for a serving process (and forget what start-up made).

    What is alive now (modules, config, the app) lives as long as the process: the collector need not scan it
    again (with the defaults, full collections of a large heap were the mint's p99: 38 ms against 8 without).
    Collections stay cheap then, and must come often enough that reference cycles do not pile up: the
    libraries' exceptions make them (a traceback holds its frames, which hold the exception: a Redis connection
    refused, a request head too long, an answer cut), and the threshold counts only objects that outlive their
    request. With 50,000 a young collection waited half an hour under the soak's traffic, and its cycles had
    grown RSS by 10 MiB by then, which the allocator kept."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 20, 10)


def run_worker(config: Config, host: str, port: int, reuse_port: bool, dev: bool, port_from_args: bool = False) -> None:
    """Run one gateway process until SIGTERM/SIGINT, then drain in-flight requests and exit. CliError when a
    listener cannot open its address."""
    from aiohttp import web

    from .app import ListenError, create_app

    public_url = config.server.public_url

    configure_logging(json=not dev)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        pass
    app = create_app(config, admin_reuse_port=reuse_port)
    log = structlog.get_logger("gateway")
    collect_often()
    try:
        web.run_app(
            app,
            host=host,
            port=port,
            reuse_port=reuse_port or None,
            shutdown_timeout=config.server.drain_seconds,
            keepalive_timeout=config.server.keepalive_seconds,  # also bounds a request head that trickles in
            access_log=None,
            # called once every listener is open: one line saying where the gateway is
            print=lambda _: log.info("listening", url=f"http://{_address(host, port)}", public_url=public_url),
            handle_signals=True,
        )
    except ListenError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # the main listener's bind: the only OSError run_app lets out before serving
        setting = "--port" if port_from_args else config.setting("server.port")
        raise CliError(str(ListenError(host, port, setting, exc))) from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- directory, keys, audit ---------------------------------------------------------------------------
def _store_for(config: Config, what: str, instead: str) -> Store:
    """A client of the config's store; CliError for the embedded one, which lives inside the serving process
    (``instead`` says what to do then)."""
    if config.store.url == "embedded":
        raise CliError(
            f"store.url is 'embedded' (inside the serving process): {what} needs a shared Redis "
            f"(set store.url or GATEWAY_REDIS_URL); {instead}"
        )
    return Store.open(config.store)


def _directory_load(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    apps = load_directory_file(args.file)
    known = {a.name for a in config.apps}
    for name in apps:
        if name not in known:
            raise CliError(f"{args.file}: apps.{name} is not an app of the config ({', '.join(sorted(known))})")
    store = _store_for(config, "directory load", "or set directory.file, which the gateway loads at start-up")
    # Processes follow a load within directory.refresh_seconds: until then they may read the old generation.
    grace = 2 * config.directory.refresh_seconds + 1

    async def load() -> None:
        try:
            for name, directory in apps.items():
                source = source_digest(directory)
                with _progress(name, directory) as bar:
                    summary = await store.load_app(directory, source=source, progress=bar.update)
                print(f"loaded {summary}")
            if apps:
                await asyncio.sleep(grace)
                for name in apps:
                    await store.drop_generations(name)
        finally:
            await store.close()

    try:
        asyncio.run(load())
    except (DirectoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise CliError(f"cannot reach the store: {unreachable(config.store.url, exc)}") from None
    return 0


def _progress(app: str, directory: AppDirectory) -> tqdm[Any]:
    """A progress bar on a terminal (stderr), nothing elsewhere; counted in subjects."""
    shown = sys.stderr.isatty()
    total: int | None = None
    if shown and isinstance(directory.subjects, SubjectsFile):
        with directory.subjects.path.open("rb") as lines:
            total = sum(1 for line in lines if line.strip())
    elif isinstance(directory.subjects, Sized):
        total = len(directory.subjects)
    return tqdm(total=total, desc=app, unit=" subjects", unit_scale=True, disable=not shown, leave=False)


def _keys_generate(args: argparse.Namespace) -> int:
    try:
        generate_key_file(args.file)
    except FileExistsError:
        raise CliError(f"{args.file} exists: refusing to overwrite a signing key") from None
    except OSError as exc:
        raise CliError(f"cannot write {args.file}: {exc.strerror}") from None
    print(f"wrote a new Ed25519 private key to {args.file}")
    return 0


def _audit_tail(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = _store_for(config, "audit tail", "the embedded store's audit events are in the gateway's log lines")

    async def tail() -> None:
        try:
            last: Any = "$"
            for entry_id, fields in await store.latest_audit(max(args.n, 0)):
                _print_event(entry_id, fields)
                last = entry_id
            while args.follow:
                for entry_id, fields in await store.read_audit(last, block_ms=5000):
                    _print_event(entry_id, fields)
                    last = entry_id
        finally:
            await store.close()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        raise CliError(f"cannot read the audit stream: {unreachable(config.store.url, exc)}") from None
    return 0


def _proxy_config_nginx(args: argparse.Namespace) -> int:
    from .dialects import all_dialects
    from .nginx import render

    config = load_config(args.config)
    public = urlsplit(config.server.public_url)
    listen = args.listen or f"{public.hostname}:{public.port or (443 if public.scheme == 'https' else 80)}"
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in " ;{}'\""):
        raise CliError(f"--listen: expected HOST:PORT, got {listen!r}")
    gateway_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(config.server.host, config.server.host)
    gateway = f"{gateway_host}:{config.server.port}"
    if gateway == listen or (config.server.port == int(port) and config.server.host in ("0.0.0.0", "::", "")):
        raise CliError(
            f"nginx would listen where the gateway does ({gateway}): move the gateway (server.port, or "
            "GATEWAY_PORT) to an internal port, or give nginx another --listen"
        )
    if any(c in args.access_log for c in " ;{}'\""):
        raise CliError(f"--access-log: not a plain path: {args.access_log!r}")
    source = str(args.config or "config.yaml")
    sys.stdout.write(render(config, all_dialects(), listen=listen, gateway=gateway, access_log=args.access_log,
                            source=source))  # fmt: skip
    return 0


def _print_event(entry_id: Any, fields: dict[Any, Any]) -> None:
    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    record = {"id": text(entry_id), **{text(k): text(v) for k, v in fields.items()}}
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()
