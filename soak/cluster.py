"""The soak's processes, all on 127.0.0.1 on free ports, each with its logs in the run's folder:

- Redis: a primary and a replica (no persistence) and three Sentinels (quorum 2) watching them;
- two gateway processes (``python -m gateway serve``) sharing that Redis through the Sentinels, one key and one
  config (``--port`` and ``GATEWAY_ADMIN_PORT`` apart): ``A`` runs the whole soak, ``B`` is the one the faults kill
  and restart (a restart starts a new series of readings);
- nginx in edge mode in front of both (``proxy-config nginx``'s output, with ``B`` added to the gateway's upstream);
- the downstream app (:mod:`soak.app`).

Every child is started from the main thread with ``PR_SET_PDEATHSIG``: if the soak dies, even by SIGKILL, its
children get SIGTERM (Redis and the Sentinels SIGKILL: a SIGSTOPped Redis would never act on a SIGTERM), so none
is left behind. :meth:`Cluster.stop` stops them all, in reverse order.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as sync_redis
import yaml

from bench.nginx import main_conf, nginx_binary
from gateway.assertion import generate_key_file

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SERVICE = "mymaster"
PREFIX = "soak:"
DOWN_AFTER_MS = 5000  # a Redis stop shorter than this is a stop, not a failover
SCIM_TOKEN = "soak-scim-token"
REVOKE_TOKEN = "soak-revoke-token"
APPS = ("control-panel", "analytics", "switch", "exchange")


class ClusterError(Exception):
    """A process did not start or did not become ready; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(sig: int = signal.SIGTERM) -> None:  # pragma: no cover - runs in the child, before exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def _killed_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Redis and the Sentinels: SIGKILL, which a stopped process (``redis:stop``'s SIGSTOP) cannot ignore; SIGTERM
    would wait for a SIGCONT that never comes. They keep nothing that needs a clean exit."""
    _die_with_parent(signal.SIGKILL)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Child:
    """A child process; stdout and stderr go to files under the run's ``logs`` folder."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, chars: int = 2000) -> str:
        text = ""
        for path in sorted(self.log.parent.glob(self.log.name.replace(".log", "*"))):
            text += path.read_text(errors="replace")[-chars:]
        return text


def spawn(
    name: str,
    args: list[str],
    logs: Path,
    env: dict[str, str] | None = None,
    split: bool = False,
    death_signal: int = signal.SIGTERM,
) -> Child:
    """Start ``args`` (``split``: stdout and stderr to two files, ``NAME.out.log`` and ``NAME.log``); it gets
    ``death_signal`` if the soak dies."""
    preexec = _killed_with_parent if death_signal == signal.SIGKILL else _die_with_parent
    log = logs / f"{name}.log"
    with log.open("ab") as err, (logs / f"{name}.out.log").open("ab") if split else contextlib.nullcontext() as out:
        proc = subprocess.Popen(args, stdout=out if split else err, stderr=err, env=env, cwd=ROOT, preexec_fn=preexec)
    return Child(name, proc, log)


def wait_until(what: str, check: Any, timeout: float = 30.0, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if child is not None and not child.alive():
            raise ClusterError(f"{child.name} exited with {child.proc.returncode} before {what}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


# -- Redis ---------------------------------------------------------------------------------------------------
@dataclass
class RedisNode:
    """A redis-server that keeps its port and folder across restarts (no persistence: a restart is empty)."""

    name: str
    port: int
    folder: Path
    child: Child | None = None
    starts: int = 0

    def start(self, logs: Path, replica_of: int | None = None) -> None:
        self.launch(logs, replica_of)
        wait_until(f"redis {self.name} on {self.port}", self.answers, child=self.child)

    def launch(self, logs: Path, replica_of: int | None = None) -> None:
        """Start it without waiting (the caller polls :meth:`answers`)."""
        args = [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
            "--repl-diskless-sync-delay",
            "0",
        ]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.starts += 1
        self.child = spawn(f"redis-{self.name}", args, logs, death_signal=signal.SIGKILL)

    def answers(self) -> bool:
        try:
            return bool(client(self.port).ping())
        except (sync_redis.RedisError, OSError):
            return False

    def role(self) -> str:
        return str(client(self.port).execute_command("ROLE")[0])


def client(port: int) -> sync_redis.Redis:
    return sync_redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


# -- the gateways --------------------------------------------------------------------------------------------
@dataclass
class Gateway:
    name: str
    port: int
    admin_port: int
    child: Child | None = None
    incarnation: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def series(self) -> str:
        """The name of this incarnation's series of readings (``A``, ``B``, ``B#2``...)."""
        return self.name if self.incarnation <= 1 else f"{self.name}#{self.incarnation}"


@dataclass
class Settings:
    """What the run's config says, scaled to its length (shorter sessions and timeouts for short runs)."""

    read_timeout: float = 3.0
    connect_timeout: float = 2.0
    body_timeout: float = 5.0
    drain_seconds: float = 5.0
    keepalive_seconds: float = 75.0  # the gateway's default: above nginx's upstream keepalive_timeout (60 s)
    session_max: int = 30
    session_idle: int = 10


@dataclass
class Cluster:
    """Every process of the soak; :meth:`start` brings them up, :meth:`stop` takes them all down."""

    folder: Path
    settings: Settings = field(default_factory=Settings)
    redis: dict[str, RedisNode] = field(default_factory=dict)
    sentinels: list[Child] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    gateways: dict[str, Gateway] = field(default_factory=dict)
    nginx: Child | None = None
    nginx_port: int = 0
    app: Child | None = None
    app_port: int = 0
    control_port: int = 0

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def key_file(self) -> Path:
        return self.folder / "assertion.pem"

    @property
    def config_file(self) -> Path:
        return self.folder / "config.yaml"

    @property
    def directory_file(self) -> Path:
        return self.folder / "directory.yaml"

    @property
    def store_url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{SERVICE}?db=0"

    @property
    def nginx_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    # -- start and stop ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            generate_key_file(self.key_file)
            self._start_redis()
            self._start_app()
            self.nginx_port = free_port()
            self.gateways = {n: Gateway(n, free_port(), free_port()) for n in ("A", "B")}
            self._write_config()
            for gateway in self.gateways.values():
                self.start_gateway(gateway.name)
            for gateway in self.gateways.values():
                self.wait_gateway(gateway.name)
            self._start_nginx()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop(signal.SIGQUIT)
        for gateway in self.gateways.values():
            if gateway.child is not None:
                gateway.child.stop(timeout=self.settings.drain_seconds + 10)
        if self.app is not None:
            self.app.stop()
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.redis.values():
            if node.child is not None:
                node.child.stop()

    def children(self) -> list[Child]:
        found = [n.child for n in self.redis.values() if n.child] + self.sentinels
        found += [g.child for g in self.gateways.values() if g.child]
        return found + [c for c in (self.nginx, self.app) if c is not None]

    # -- Redis ------------------------------------------------------------------------------------------------
    def _start_redis(self) -> None:
        for name in ("r1", "r2"):
            folder = self.folder / f"redis-{name}"
            folder.mkdir()
            self.redis[name] = RedisNode(name, free_port(), folder)
        primary, replica = self.redis["r1"], self.redis["r2"]
        primary.start(self.logs)
        replica.start(self.logs, replica_of=primary.port)
        wait_until(
            "the replica to sync", lambda: client(replica.port).info("replication")["master_link_status"] == "up"
        )
        sentinel_binary = shutil.which("redis-sentinel") or "redis-sentinel"
        self.sentinel_ports = [free_port() for _ in range(3)]
        for i, port in enumerate(self.sentinel_ports):
            folder = self.folder / f"sentinel-{i}"
            folder.mkdir()
            conf = folder / "sentinel.conf"  # a sentinel rewrites its config: each its own
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
            )
            child = spawn(f"sentinel-{i}", [sentinel_binary, str(conf)], self.logs, death_signal=signal.SIGKILL)
            self.sentinels.append(child)
            wait_until(f"sentinel {i}", lambda port=port: client(port).ping(), child=child)
        for port in self.sentinel_ports:
            wait_until(f"sentinel on {port} to see the replica", lambda port=port: self._sees_replica(port))

    def _sees_replica(self, sentinel_port: int) -> bool:
        replicas = client(sentinel_port).sentinel_slaves(SERVICE)
        return any(r["flags"] == "slave" and r.get("master-link-status") == "ok" for r in replicas)

    def primary(self) -> RedisNode:
        """The node the sentinels name as the primary now (the first sentinel that answers)."""
        for port in self.sentinel_ports:
            with contextlib.suppress(sync_redis.RedisError, OSError):
                _, master_port = client(port).sentinel_get_master_addr_by_name(SERVICE)
                return next(n for n in self.redis.values() if n.port == int(master_port))
        raise ClusterError("no sentinel answers")

    def replica(self) -> RedisNode:
        primary = self.primary()
        return next(n for n in self.redis.values() if n is not primary)

    def replica_in_sync(self) -> bool:
        replica = self.replica()
        return client(replica.port).info("replication").get("master_link_status") == "up" and all(
            self._sees_replica(p) for p in self.sentinel_ports
        )

    # -- the app, the gateways, nginx ----------------------------------------------------------------------------
    def _start_app(self) -> None:
        self.app = spawn("app", [PYTHON, "-m", "soak.app", str(self.key_file)], self.logs, split=True)
        out = self.logs / "app.out.log"
        wait_until("the app's ports", lambda: out.read_text().strip(), child=self.app)
        ports = json.loads(out.read_text().splitlines()[0])
        self.app_port, self.control_port = ports["http"], ports["control"]

    def _write_config(self) -> None:
        s = self.settings
        directory = yaml.safe_load((ROOT / "directory.yaml").read_text())
        apps = directory["apps"]
        # Subjects of their own for the lanes that act on one subject at a time (revocations, sessions).
        apps["control-panel"]["subjects"] += [
            {"id": str(6000 + i), "email": f"s{6000 + i}@example.com", "reseller": 1} for i in range(1, 41)
        ]
        apps["switch"]["subjects"] += [{"id": str(4100 + i), "email": f"c{4100 + i}@example.com"} for i in range(1, 41)]
        self.directory_file.write_text(yaml.safe_dump(directory))
        upstream = f"http://127.0.0.1:{self.app_port}"
        app_settings = {
            "upstream": upstream,
            "read_timeout_seconds": s.read_timeout,
            "connect_timeout_seconds": s.connect_timeout,
        }
        config = {
            "server": {
                "host": "127.0.0.1",
                "port": self.gateways["A"].port,
                "public_url": self.nginx_url,
                "trusted_proxies": ["127.0.0.1/32"],
                "body_timeout_seconds": s.body_timeout,
                "drain_seconds": s.drain_seconds,
                "keepalive_seconds": s.keepalive_seconds,
            },
            "store": {"url": self.store_url, "prefix": PREFIX, "timeout_seconds": 1},
            "directory": {"file": str(self.directory_file), "refresh_seconds": 1},
            "assertion": {"private_key_file": str(self.key_file), "ttl_seconds": 30},
            # Every refusal of the run comes from one address: the failure limit must not turn them into 429s.
            "rate_limit": {"failures": 1_000_000, "window_seconds": 60},
            "admin": {
                "host": "127.0.0.1",
                "port": self.gateways["A"].admin_port,
                "tokens": [
                    {"id": "soak-provisioner", "token": SCIM_TOKEN, "scopes": ["scim"]},
                    {"id": "soak-revoker", "token": REVOKE_TOKEN, "scopes": ["revoke"]},
                ],
            },
            "apps": {
                "control-panel": {"dialect": "activeplatform", **app_settings},
                "analytics": {"dialect": "pyramid", **app_settings},
                "switch": {
                    "dialect": "denovolab",
                    **app_settings,
                    "session": {
                        "max_seconds": s.session_max,
                        "idle_seconds": s.session_idle,
                        "mode": "full",
                        "deny": ["* /billing/*"],
                    },
                },
                "exchange": {"dialect": "btcdirect", **app_settings},
            },
        }
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def start_gateway(self, name: str) -> Gateway:
        """Start (or start again) gateway ``name``; a new incarnation, a new series of readings."""
        gateway = self.gateways[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["GATEWAY_ADMIN_PORT"] = str(gateway.admin_port)
        gateway.incarnation += 1
        args = [PYTHON, "-m", "gateway", "serve", "--config", str(self.config_file), "--port", str(gateway.port)]
        gateway.child = spawn(f"gateway-{gateway.series}", args, self.logs, env=env, split=True)
        return gateway

    def wait_gateway(self, name: str, timeout: float = 60.0) -> None:
        gateway = self.gateways[name]
        wait_until(f"gateway {name} to listen", lambda: listening(gateway.port), timeout, child=gateway.child)

    def _start_nginx(self) -> None:
        include = self.folder / "edge.conf"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        command = [
            PYTHON,
            "-m",
            "gateway",
            "proxy-config",
            "nginx",
            "--config",
            str(self.config_file),
            "--listen",
            f"127.0.0.1:{self.nginx_port}",
            "--access-log",
            "off",
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        if done.returncode != 0:
            raise ClusterError(f"proxy-config nginx failed: {done.stderr}")
        a, b = self.gateways["A"], self.gateways["B"]
        # Both gateways behind nginx, as a deployment of two would have them, with nginx's defaults (max_fails 1,
        # fail_timeout 10 s: what users get). nginx waits on the gateway's locations 5 s longer than the gateway waits
        # for an app (19f3cd2), so a slow app is the gateway's 504, not a timeout that takes a gateway out.
        text, count = re.subn(
            rf"\n    server 127\.0\.0\.1:{a.port};\n",
            f"\n    server 127.0.0.1:{a.port};\n    server 127.0.0.1:{b.port};\n",
            done.stdout,
            count=1,
        )
        if count != 1:
            raise ClusterError("proxy-config nginx: the gateway's upstream block was not found")
        include.write_text(text)
        nginx_folder = self.folder / "nginx"
        nginx_folder.mkdir()
        conf = main_conf(nginx_folder, include)
        test = subprocess.run(
            [nginx_binary(), "-t", "-p", str(nginx_folder), "-c", str(conf)],
            capture_output=True,
            text=True,
            check=False,
        )
        if test.returncode != 0:
            raise ClusterError(f"nginx -t: {test.stderr}")
        self.nginx = spawn("nginx", [nginx_binary(), "-p", str(nginx_folder), "-c", str(conf)], self.logs)
        wait_until("nginx to listen", lambda: listening(self.nginx_port), child=self.nginx)


# -- readings --------------------------------------------------------------------------------------------------
def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
