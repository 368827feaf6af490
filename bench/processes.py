"""Starting the benchmark's processes, waiting until they serve, and stopping them (by their own pid)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

PYTHON = sys.executable


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> int:
    """How many sockets listen on ``port`` (several with SO_REUSEPORT), from /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return orjson.loads(response.read())


def get_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


@dataclass
class Process:
    """A child process; its stderr goes to ``log`` so that a failure can say what happened."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}\n{tail}")

    def wait_until(self, ready: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.check()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} was not ready within {timeout:.0f} s")
            time.sleep(0.05)

    def wait_listening(self, port: int, sockets: int = 1) -> None:
        self.wait_until(lambda: listening(port) >= sockets)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(name: str, args: Sequence[str], logs: Path, cwd: Path | None = None) -> Process:
    """Start ``args``; stdout (the gateway's request log, for one) is thrown away, stderr kept in ``logs``."""
    log = logs / f"{name}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(list(args), stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
    return Process(name, proc, log)


def run(args: Sequence[str], cwd: Path | None = None) -> None:
    """Run a command to its end; BenchError with its output when it fails."""
    done = subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")


def ready_url(url: str) -> Callable[[], bool]:
    """A check that ``url`` answers 200."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return check


def start_redis(workdir: Path, logs: Path) -> tuple[Process, int]:
    """A redis-server on a free port, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]  # fmt: skip
    redis = start("redis-server", args, logs)
    redis.wait_listening(port)
    return redis, port
