"""Running wrk with one of bench/wrk/*.lua and reading the JSON line its ``done()`` prints."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from .processes import BenchError

LUA = Path(__file__).parent / "wrk"
CONNECTIONS = 32
THREADS = 2


@dataclass(frozen=True)
class Load:
    """What one wrk run measured; latencies in milliseconds."""

    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    status_errors: int  # answers with a status of 400 or more
    socket_errors: int  # connect, read and write errors and timeouts
    exhausted: int  # requests that found no fresh token left

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def failed(self) -> int:
        return self.status_errors + self.socket_errors + self.exhausted

    @property
    def clean(self) -> bool:
        return not self.failed


def wrk(
    url: str,
    seconds: int,
    *,
    script: str = "report.lua",
    args: Sequence[str] = (),
    headers: Sequence[str] = (),
) -> Load:
    """Load ``url`` for ``seconds`` with :data:`CONNECTIONS` connections; ``args`` go to the script's init."""
    binary = shutil.which("wrk")
    if binary is None:
        raise BenchError("wrk is not installed (Debian: apt-get install wrk)")
    command = [binary, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s", "-s", str(LUA / script)]
    for header in headers:
        command += ["-H", header]
    command += [url, "--", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    raw = orjson.loads(lines[-1])
    return Load(
        requests=raw["requests"],
        duration_s=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        status_errors=raw["status_errors"],
        socket_errors=raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        exhausted=raw["exhausted"],
    )
