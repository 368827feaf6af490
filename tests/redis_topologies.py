"""Real Redis topologies for integration tests: a Redis Cluster of masters, and a master with a replica
watched by Sentinels. Everything listens on 127.0.0.1, lives in a temp folder, waits for readiness by
polling, and stops every process it started."""

from __future__ import annotations

import functools
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis as sync_redis

from tests.conftest import RedisServer, free_port, start_redis, wait_for_redis

T = TypeVar("T")


def binary(name: str, package: str) -> str:
    """The path of ``name``, or a loud test failure naming the Debian package that provides it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install {package}): the integration tests need it")
    return path


def poll(
    what: str,
    check: Callable[[], T | None],
    timeout: float = 15.0,
    every: float = 0.02,
    explain: Callable[[], str] | None = None,
) -> T:
    """Call ``check`` until it returns something other than None (errors count as "not yet"); on timeout, fail
    with ``explain()`` appended."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result is not None:
                return result
        except (sync_redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            message = f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last!r})" if last else "")
            raise AssertionError(message + (f"\n{explain()}" if explain else ""))
        time.sleep(every)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- Redis Cluster ------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """A Redis Cluster of masters without replicas."""

    ports: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A ``store.url`` naming one node: the client discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> sync_redis.Redis:
        return sync_redis.Redis(port=port, socket_timeout=2)

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


def start_cluster(tmp: Path, masters: int = 3) -> Cluster:
    """``masters`` cluster-enabled redis-servers joined by ``redis-cli --cluster create``, each owning a third
    of the slots; returns once every node reports ``cluster_state:ok`` and agrees on who owns all 16384 slots.

    Each node gets an explicit bus port (``cluster-port``): the default, port + 10000, can fall outside the
    port range or on a port in use when the data port is an ephemeral one.
    """
    server, cli = binary("redis-server", "redis-server"), binary("redis-cli", "redis-tools")
    cluster = Cluster([free_port() for _ in range(masters)])
    try:
        for port in cluster.ports:
            folder = tmp / f"node-{port}"
            folder.mkdir()
            args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", str(folder), "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                    "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]  # fmt: skip
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cluster.procs.append(proc)
            wait_for_redis(port, proc)
        create = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise AssertionError(f"redis-cli --cluster create failed: {create.stdout.decode()[-2000:]}")
        for port in cluster.ports:
            poll(f"cluster node {port} to be ready", lambda port=port: _cluster_ready(cluster.node(port), masters))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _cluster_ready(node: sync_redis.Redis, masters: int) -> bool | None:
    try:
        info: dict[str, Any] = node.cluster("INFO")
        ok = (
            info.get("cluster_state") == "ok"
            and int(info.get("cluster_slots_ok", 0)) == 16384
            and int(info.get("cluster_known_nodes", 0)) == masters
        )
        return True if ok else None
    finally:
        node.close()


# -- Sentinel -----------------------------------------------------------------------------------------
SERVICE = "mymaster"


@dataclass
class SentinelSetup:
    """One master, one replica and ``len(sentinel_ports)`` sentinels (quorum 1) watching them."""

    folder: Path
    servers: list[RedisServer]
    sentinel_ports: list[int]
    sentinel_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}?db=0"

    def sentinel(self, port: int) -> sync_redis.Redis:
        return sync_redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def master_ports(self) -> set[int]:
        """The master port each sentinel reports now."""
        ports = set()
        for port in self.sentinel_ports:
            client = self.sentinel(port)
            try:
                _, master_port = client.sentinel_get_master_addr_by_name(SERVICE)
                ports.add(int(master_port))
            finally:
                client.close()
        return ports

    def replica_ready(self, sentinel_port: int, replica_port: int) -> bool | None:
        """Whether the sentinel sees ``replica_port`` as a healthy replica it could promote."""
        client = self.sentinel(sentinel_port)
        try:
            for replica in client.sentinel_slaves(SERVICE):
                if (
                    int(replica["port"]) == replica_port
                    and replica["flags"] == "slave"
                    and replica.get("master-link-status") == "ok"
                ):
                    return True
            return None
        finally:
            client.close()

    def explain(self) -> str:
        """What each server says it is, and the end of each sentinel's log: for a failure message."""
        lines = []
        for server in self.servers:
            client = sync_redis.Redis(port=server.port, socket_timeout=2)
            try:
                lines.append(f"server {server.port}: ROLE {client.execute_command('ROLE')!r}")
            except sync_redis.RedisError as exc:
                lines.append(f"server {server.port}: {exc!r}")
            finally:
                client.close()
        for log in sorted(self.folder.glob("sentinel-*/sentinel.log")):
            lines.append(f"{log.parent.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(lines)

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            stop_process(proc)
        for server in self.servers:
            stop_process(server.proc)


def start_sentinel_setup(tmp: Path, sentinels: int = 2) -> SentinelSetup:
    """A master, a replica of it, and ``sentinels`` redis-sentinel processes monitoring ``mymaster`` with
    quorum 1; returns once the replica is in sync and every sentinel could promote it."""
    sentinel_binary = binary("redis-sentinel", "redis-sentinel")
    # Diskless sync waits 5 s by default for more replicas to join; one replica need not wait.
    tuning = ("--repl-diskless-sync-delay", "0")
    master = start_redis(_folder(tmp / "master"), *tuning)
    setup = SentinelSetup(tmp, [master], [free_port() for _ in range(sentinels)])
    try:
        replica = start_redis(_folder(tmp / "replica"), *tuning, "--replicaof", "127.0.0.1", str(master.port))
        setup.servers.append(replica)
        poll("the replica to sync", lambda: _in_sync(replica.port), explain=setup.explain)
        for port in setup.sentinel_ports:
            folder = _folder(tmp / f"sentinel-{port}")
            conf = folder / "sentinel.conf"  # a sentinel rewrites its config file: each needs its own
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 1\n"
                # Only SENTINEL FAILOVER moves the master here: a busy machine must not look like a dead master
                # (with two sentinels, an automatic failover could split the vote and stall for a minute).
                f"sentinel down-after-milliseconds {SERVICE} 30000\n"
                f"sentinel failover-timeout {SERVICE} 30000\n"
            )
            proc = subprocess.Popen([sentinel_binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            setup.sentinel_procs.append(proc)
            wait_for_redis(port, proc)
        for port in setup.sentinel_ports:
            ready = functools.partial(setup.replica_ready, port, replica.port)
            poll(f"sentinel {port} to see the replica", ready, explain=setup.explain)
    except BaseException:
        setup.stop()
        raise
    return setup


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _in_sync(port: int) -> bool | None:
    client = sync_redis.Redis(port=port, socket_timeout=2, decode_responses=True)
    try:
        return True if client.info("replication").get("master_link_status") == "up" else None
    finally:
        client.close()
