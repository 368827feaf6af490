"""``make bench``: start redis-server and the upstream, then load each case in turn and report.

The machine's throughput drifts (by up to 2x from one minute to the next), so a case and the floor it is
compared with are measured alternately, ``BENCH_ROUNDS`` rounds (default 3) of: the floor, then the case,
back to back. A ratio is the median of the rounds' ratios, reported with their spread (min and max); a
case's absolute figures are the medians of its rounds (report.py).

Each measurement gets a fresh server process and an empty Redis (the gateway loads the demo directory at
start-up), a warm-up of ``BENCH_WARMUP`` seconds (default 2) and a measured run of ``BENCH_DURATION``
seconds (default 5: three rounds of 5 s instead of one run of 10). The session case (requests of one live
impersonation session) is measured in the pass-through group, pass-through its floor. Then, once each, a fresh
gateway mints 100k and 200k grants while its RSS is read, the directory case, and the session memory case (a
session's bytes in Redis; the gateway's RSS over 100k sessions started and ended). Results: a table on stdout
and ``bench-results.json``.

``BENCH_CASES`` (comma-separated case labels, as printed while running) runs only those cases, for a quick
look while working; a case brings the case it is compared with (floor-mint and mint each other, mint on 2
workers brings mint, session brings pass-through, and so on), and the redeem cases use the rates of mint and
floor-redeem when measured.

    python -m bench.run
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import redis
import yaml

from . import floors, processes, sessions
from .directory import Probe, write_directory
from .load import THREADS, Load, wrk
from .nginx import main_conf, nginx_binary, plain_proxy
from .processes import PYTHON, BenchError, Process, free_port, get_json, get_text, ready_url, start
from .report import Figures, GatewayRun, write_results

ROOT = Path(__file__).resolve().parent.parent

# The seed request of the ActivePlatform dialect, and the demo data it relies on (config.yaml, directory.yaml).
APP = "control-panel"
MINT_PATH = "/api/v3/resellers/1/user_authentication/token?account_id=505"
MINT_HEADERS = ("X-Api-Token: vY5fwetestK3gJXZH5uHCw",)
REDEEM_PREFIX = "/?user_email=example%40activeplatform.com&user_token="
PASS_PATH = "/app/dashboard?tab=overview"
FLOOR_REDEEM_PREFIX = "/redeem?token="
RSS_MARKS = (100_000, 200_000)
# The session cases: the app's sessions outlive any run; the memory case keeps LIVE_SESSIONS live to weigh their
# keys, then starts and ends sessions up to each of SESSION_MARKS, reading the gateway's RSS at each.
SESSION = {"max_seconds": 86_400, "idle_seconds": 86_400}
LIVE_SESSIONS = 1_000
SESSION_MARKS = (50_000, 100_000)  # 100k take 2.5-4 min (mint, redeem, end: 400-700 sessions a second)
TOKEN_MARGIN = 1.5  # a redeem run gets fresh tokens for 1.5 times the rate it is expected to reach


def _whole(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < 1:
        raise BenchError(f"{name}: expected a whole number of at least 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Workload:
    """One wrk load: ``args`` go to the script's ``init``."""

    url: str
    script: str = "report.lua"
    headers: Sequence[str] = ()
    args: Sequence[str] = ()

    def run(self, seconds: int) -> Load:
        return wrk(self.url, seconds, script=self.script, args=self.args, headers=self.headers)


@dataclass
class Bench:
    """One run: its scratch folder, Redis, upstream and gateway config, and the figures so far."""

    tmp: Path
    duration: int
    warmup: int
    redis: redis.Redis
    redis_url: str
    upstream_url: str
    config: Path
    prefix: str
    figures: Figures
    session_config: Path  # the config with APP holding sessions (SESSION)

    def measure(self, workload: Workload) -> Load:
        workload.run(self.warmup)
        return workload.run(self.duration)

    # -- servers ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def floor(self, name: str) -> Iterator[str]:
        self.redis.flushall()
        port = free_port()
        args = [PYTHON, "-m", "bench.floors", name, "--port", str(port), "--redis", self.redis_url,
                "--upstream", self.upstream_url]  # fmt: skip
        process = start(f"floor-{name}", args, self.tmp, cwd=ROOT)
        try:
            process.wait_listening(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.stop()

    @contextlib.contextmanager
    def gateway(self, config: Path | None = None, port: int | None = None) -> Iterator[Gateway]:
        """One gateway worker (bench/server.py) on an empty Redis."""
        self.redis.flushall()
        port, stats_port = port or free_port(), free_port()
        args = [PYTHON, "-m", "bench.server", "--config", str(config or self.config), "--port", str(port),
                "--stats-port", str(stats_port)]  # fmt: skip
        process = start("gateway", args, self.tmp, cwd=ROOT)
        try:
            gateway = Gateway(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}", self)
            process.wait_until(ready_url(gateway.url + "/readyz"))
            yield gateway
        finally:
            process.stop()

    @contextlib.contextmanager
    def nginx(self, name: str, port: int, include: str) -> Iterator[str]:
        """nginx on ``port`` with ``include`` in its http context, as main_conf runs it."""
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        (folder / "include.conf").write_text(include)
        conf = main_conf(folder, folder / "include.conf")
        process = start(name, [nginx_binary(), "-p", str(folder), "-c", str(conf)], self.tmp)
        try:
            process.wait_listening(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.stop()

    @contextlib.contextmanager
    def edge(self) -> Iterator[tuple[str, Gateway]]:
        """nginx with the configuration ``proxy-config nginx`` generates, in front of one gateway worker."""
        nginx_port, gateway_port = free_port(), free_port()
        raw = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        raw["server"] = {**(raw.get("server") or {}), "port": gateway_port, "trusted_proxies": ["127.0.0.1/32"],
                         "public_url": f"http://127.0.0.1:{nginx_port}"}  # fmt: skip
        config = self.tmp / "edge.yaml"
        config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        command = [PYTHON, "-m", "gateway", "proxy-config", "nginx", "--config", str(config),
                   "--listen", f"127.0.0.1:{nginx_port}", "--access-log", "off"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if done.returncode != 0:
            raise BenchError(f"proxy-config nginx failed: {done.stderr.strip()}")
        with self.gateway(config, gateway_port) as gateway, self.nginx("nginx-edge", nginx_port, done.stdout) as url:
            yield url, gateway

    @contextlib.contextmanager
    def gateway_workers(self, workers: int) -> Iterator[str]:
        """``impersonation-gateway serve --workers N``, every worker listening on the same port."""
        self.redis.flushall()
        port = free_port()
        script = Path(PYTHON).parent / "impersonation-gateway"
        command = [str(script)] if script.exists() else [PYTHON, "-m", "gateway"]
        args = [*command, "serve", "--config", str(self.config), "--port", str(port), "--workers", str(workers)]
        process = start(f"gateway-{workers}-workers", args, self.tmp, cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{port}"
            process.wait_listening(port, sockets=workers)
            process.wait_until(ready_url(url + "/readyz"))
            yield url
        finally:
            process.stop()

    # -- Redis figures ------------------------------------------------------------------------------
    def commandstats(self) -> dict[str, int]:
        info = self.redis.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items() if k != "cmdstat_info"}

    def mean_key_bytes(self, pattern: str, sample: int = 200) -> float | None:
        """The mean ``MEMORY USAGE`` of up to ``sample`` keys under the store prefix matching ``pattern``."""
        keys = list(itertools.islice(self.redis.scan_iter(match=self.prefix + pattern, count=1000), sample))
        sizes = [self.redis.memory_usage(k, samples=0) for k in keys]
        known = [s for s in sizes if s is not None]
        return sum(known) / len(known) if known else None

    def index_bytes_per_grant(self, app: str) -> float | None:
        """What one live grant costs in its app's live index (the sorted set's ``MEMORY USAGE`` per member)."""
        key = f"{self.prefix}{{grants:{app}}}:live"
        members = self.redis.zcard(key)
        size = self.redis.memory_usage(key, samples=0)
        return round(size / members, 1) if members and size else None

    def index_bytes_per_session(self, app: str) -> float | None:
        """What one live session costs in its app's session index (the hash's ``MEMORY USAGE`` per field)."""
        key = f"{self.prefix}{{sessions:{app}}}:index"
        fields = self.redis.hlen(key)
        size = self.redis.memory_usage(key, samples=0)
        return round(size / fields, 1) if fields and size else None

    # -- fresh tokens -------------------------------------------------------------------------------
    def warm_redeem(self, url: str, prefix: str, supply: Callable[[int], list[str]], bound_rps: float) -> Workload:
        """Warm up a redeem load with enough fresh tokens for ``bound_rps`` (a rate it cannot beat), then get
        enough for the measured run at the warm-up's rate (with a margin) and return that run's load.

        ``supply(n)`` makes at least ``n`` grants and returns their tokens; wrk sends GET ``prefix``+token.
        """
        warm = self.redeem_load(url, prefix, "warm", supply(_tokens_needed(bound_rps, self.warmup)))
        rate = min(bound_rps, warm.run(self.warmup).rps * TOKEN_MARGIN)
        return self.redeem_load(url, prefix, "measure", supply(_tokens_needed(rate, self.duration)))

    def redeem_load(self, url: str, prefix: str, name: str, tokens: Sequence[str]) -> Workload:
        """A redeem.lua load on ``tokens``, dealt to one file per wrk thread (``<name>.<thread id>``)."""
        path = self.tmp / f"tokens-{name}"
        for thread in range(THREADS):
            Path(f"{path}.{thread}").write_text("".join(t + "\n" for t in tokens[thread::THREADS]))
        return Workload(url, "redeem.lua", args=[str(path), prefix])

    def mint_tokens(self, url: str, needed: int, rate: float) -> list[str]:
        """Mint at least ``needed`` grants through the gateway's HTTP API and return their tokens."""
        out = self.tmp / "minted"
        tokens: list[str] = []
        while len(tokens) < needed:
            seconds = max(1, math.ceil((needed - len(tokens)) / max(rate, 1.0) * 1.1))
            load = Workload(url + MINT_PATH, "collect.lua", MINT_HEADERS, [str(out), "owner_token"]).run(seconds)
            got = [t for i in range(THREADS) for t in Path(f"{out}.{i}").read_text().split()]
            if not got:
                raise BenchError(f"minting returned no tokens ({load.status_errors} error answers)")
            tokens += got
            rate = load.rps
        return tokens

    def set_floor_tokens(self, needed: int) -> list[str]:
        """Store ``needed`` keys for the redeem floor directly, pipelined."""
        tokens = [secrets.token_urlsafe(24) for _ in range(needed)]
        for first in range(0, needed, 10_000):
            pipe = self.redis.pipeline(transaction=False)
            for token in tokens[first : first + 10_000]:
                pipe.set(floors.KEY_PREFIX + token, floors.GRANT, px=600_000)
            pipe.execute()
        return tokens


def _tokens_needed(rps: float, seconds: int) -> int:
    return math.ceil(rps * seconds * TOKEN_MARGIN) + 1000


@dataclass
class Gateway:
    """A running bench/server.py: its address, its counters and its memory."""

    process: Process
    url: str
    stats_url: str
    bench: Bench

    def served(self, kind: str) -> int:
        """Requests of ``kind`` (mint, redeem, pass, ...) the gateway counted in its latency histogram."""
        prefix = f'gateway_request_duration_seconds_count{{kind="{kind}"}} '
        for line in get_text(self.url + "/metrics").splitlines():
            if line.startswith(prefix):
                return int(float(line[len(prefix) :]))
        return 0

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise BenchError("no VmRSS in /proc")

    def measure(self, kind: str, workload: Workload, *, warm: bool = True) -> GatewayRun:
        """Warm up (unless done already), then measure, counting the gateway's requests of ``kind``, its Redis
        round trips, the commands Redis ran and the requests the upstream saw in between."""
        if warm:
            workload.run(self.bench.warmup)
        before = self.counters(kind)
        load = workload.run(self.bench.duration)
        after = self.counters(kind)
        return GatewayRun(
            load=load,
            served=after.served - before.served,
            round_trips=_delta(after.round_trips, before.round_trips),
            commands=_delta(after.commands, before.commands),
            upstream_requests=after.upstream_requests - before.upstream_requests,
            upstream_assertions=after.upstream_assertions - before.upstream_assertions,
        )

    def counters(self, kind: str) -> Counters:
        stats = get_json(self.stats_url + "/stats")
        upstream = get_json(self.bench.upstream_url + "/upstream-stats")
        return Counters(
            served=self.served(kind),
            round_trips={**stats["by_command"], "total": stats["round_trips"]},
            commands=self.bench.commandstats(),
            upstream_requests=upstream["requests"],
            upstream_assertions=upstream["assertions"],
        )


class Counters(NamedTuple):
    """What the gateway, Redis and the upstream have counted so far."""

    served: int  # the gateway's requests of one kind
    round_trips: dict[str, int]  # the gateway's, by first command, and "total"
    commands: dict[str, int]  # Redis's, by name
    upstream_requests: int
    upstream_assertions: int  # requests that reached the upstream with an assertion


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def write_config(tmp: Path, redis_url: str, upstream_url: str, grant_ttl: int) -> tuple[Path, str]:
    """The demo config (config.yaml) pointed at the bench's Redis and upstream, with a shared signing key and
    the ActivePlatform app redeeming on GET; returns its path and the store prefix."""
    raw: dict[str, Any] = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    key = tmp / "assertion.pem"
    processes.run([PYTHON, "-m", "gateway", "keys", "generate", str(key)], cwd=ROOT)
    raw["store"] = {**(raw.get("store") or {}), "url": redis_url}
    raw["admin"] = {"port": None}
    raw["assertion"] = {**(raw.get("assertion") or {}), "private_key_file": str(key)}
    directory = raw.get("directory") or {}
    if directory.get("file"):
        raw["directory"] = {**directory, "file": str((ROOT / directory["file"]).resolve())}
    for name, app in raw["apps"].items():
        app["upstream"] = upstream_url
        if name == APP:
            # Pre-minted grants must outlive the warm-up and the measured run of the redeem case.
            app.update(redeem_on_get=True, grant_ttl_seconds=max(int(app.get("grant_ttl_seconds", 60)), grant_ttl))
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path, str((raw.get("store") or {}).get("prefix", "igw:"))


def write_session_config(config: Path) -> Path:
    """``config`` with :data:`APP` holding sessions (:data:`SESSION`: they outlive any run)."""
    raw: dict[str, Any] = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["apps"][APP]["session"] = dict(SESSION)
    path = config.with_name("bench-session.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# -- the cases ----------------------------------------------------------------------------------------
def floor_case(bench: Bench, name: str, path: str) -> None:
    with bench.floor(name) as url:
        bench.figures.add(f"floor_{name}", bench.measure(Workload(url + path)))


def mint_case(bench: Bench) -> None:
    with bench.gateway() as gateway:
        bench.figures.add_gateway(
            "mint", gateway.measure("mint", Workload(gateway.url + MINT_PATH, headers=MINT_HEADERS))
        )
        grant = bench.mean_key_bytes("grant:*")
        index = bench.index_bytes_per_grant("control-panel")
        bench.figures.redis_bytes_per_grant = None if grant is None else round(grant + (index or 0), 1)
        bench.figures.redis_bytes_per_index_entry = index


def floor_redeem_case(bench: Bench) -> None:
    """Keys are stored with SET beforehand; hello's rate bounds how many a run can redeem."""
    with bench.floor("redeem") as url:
        load = bench.warm_redeem(url, FLOOR_REDEEM_PREFIX, bench.set_floor_tokens, bench.figures.rps("floor_hello"))
        bench.figures.add("floor_redeem", load.run(bench.duration))


def redeem_case(bench: Bench) -> None:
    """Grants are minted beforehand through the gateway's own API; floor-redeem's rate bounds how many a run
    can redeem."""
    with bench.gateway() as gateway:

        def supply(needed: int) -> list[str]:
            return bench.mint_tokens(gateway.url, needed, bench.figures.rps("mint"))

        load = bench.warm_redeem(gateway.url, REDEEM_PREFIX, supply, bench.figures.rps("floor_redeem"))
        bench.figures.add_gateway("redeem", gateway.measure("redeem", load, warm=False))
        bench.figures.redis_bytes_per_tombstone = bench.mean_key_bytes("used:*")


def passthrough_case(bench: Bench) -> None:
    with bench.gateway() as gateway:
        bench.figures.add_gateway("passthrough", gateway.measure("pass", Workload(gateway.url + PASS_PATH)))


def session_case(bench: Bench) -> None:
    """Requests of one live session: its cookie on pass-through's path, on a gateway whose app holds sessions.
    The session is started once (mint, redeem, the cookie the answer sets); every measured request must reach
    the upstream with an assertion, or the session was not live throughout."""
    with bench.gateway(bench.session_config) as gateway:
        cookie = sessions.start_one(gateway.url, APP)
        load = Workload(gateway.url + PASS_PATH, headers=(sessions.cookie_header(cookie),))
        run = gateway.measure("session", load)
        if run.upstream_assertions < run.upstream_requests or not run.served:
            raise BenchError(
                f"session: {run.upstream_requests - run.upstream_assertions} of {run.upstream_requests} requests "
                "reached the upstream without an assertion (the session ended during the run)"
            )
        bench.figures.add_gateway("session", run)


def session_memory_case(bench: Bench) -> None:
    """A fresh gateway whose app holds sessions: :data:`LIVE_SESSIONS` live at once weigh a session's keys in
    Redis (its hash and its entry in the app's index); then sessions are started and ended (mint, redeem, end),
    32 at a time, up to each of :data:`SESSION_MARKS`, the gateway's RSS read at each."""
    figures = bench.figures
    with bench.gateway(bench.session_config) as gateway:
        figures.session_rss_mb_at_start = gateway.rss_mb()
        cookies = sessions.start_many(gateway.url, APP, LIVE_SESSIONS)
        key = bench.mean_key_bytes("session:*")
        index = bench.index_bytes_per_session(APP)
        figures.redis_bytes_per_session = None if key is None else round(key + (index or 0), 1)
        figures.redis_bytes_per_session_index_entry = index
        sessions.end_many(gateway.url, cookies)

        def at_mark(mark: int, seconds: float) -> None:
            figures.session_rss_marks[mark] = (seconds, gateway.rss_mb())

        sessions.churn(gateway.url, APP, SESSION_MARKS, at_mark)
        figures.sessions_live_after_churn = bench.redis.hlen(f"{bench.prefix}{{sessions:{APP}}}:index") + sum(
            1 for _ in bench.redis.scan_iter(match=bench.prefix + "session:*", count=1000)
        )


def nginx_case(bench: Bench) -> None:
    """nginx alone, proxying to the same upstream: what every ordinary request costs without the gateway."""
    port = free_port()
    upstream = bench.upstream_url.removeprefix("http://")
    with bench.nginx("nginx-alone", port, plain_proxy(f"127.0.0.1:{port}", upstream)) as url:
        bench.figures.add("nginx_proxy", bench.measure(Workload(url + PASS_PATH)))


def edge_cases(bench: Bench) -> None:
    """The generated nginx configuration in front of the gateway: ordinary requests (which must not reach the
    gateway: its count of them is reported) and redemptions (routed to it by the carrier maps)."""
    with bench.edge() as (url, gateway):
        run = gateway.measure("pass", Workload(url + PASS_PATH))
        bench.figures.add("edge_passthrough", run.load)
        bench.figures.edge_passthrough_gateway_requests = (
            bench.figures.edge_passthrough_gateway_requests or 0
        ) + run.served

        def supply(needed: int) -> list[str]:
            return bench.mint_tokens(gateway.url, needed, bench.figures.rps("mint"))

        load = bench.warm_redeem(url, REDEEM_PREFIX, supply, bench.figures.rps("floor_redeem"))
        bench.figures.add_gateway("edge_redeem", gateway.measure("redeem", load, warm=False))


def workers_case(bench: Bench, workers: int = 2) -> None:
    with bench.gateway_workers(workers) as url:
        bench.figures.add(f"mint_workers{workers}", bench.measure(Workload(url + MINT_PATH, headers=MINT_HEADERS)))


def rss_case(bench: Bench) -> None:
    """A fresh gateway mints until it has served each of :data:`RSS_MARKS`; its RSS is read at each."""
    with bench.gateway() as gateway:
        bench.figures.rss_mb_at_start = gateway.rss_mb()
        mint = Workload(gateway.url + MINT_PATH, headers=MINT_HEADERS)
        rate = bench.figures.rps("mint")
        served = 0
        for mark in RSS_MARKS:
            while served < mark:
                rate = mint.run(max(1, math.ceil((mark - served) / max(rate, 1.0)))).rps or rate
                served = gateway.served("mint")
            bench.figures.rss_marks[mark] = (served, gateway.rss_mb())


def directory_case(bench: Bench) -> None:
    """One gateway serves mints while its app's directory grows from 1,000 subjects to 1,000,000: the load's
    time (``directory load``, run as a user would), the longest answer of a mint sent every 10 ms meanwhile,
    and the gateway's RSS after minting with each size."""
    small = write_directory(bench.tmp, ROOT / "directory.yaml", 1_000)
    large = write_directory(bench.tmp, ROOT / "directory.yaml", 1_000_000)
    script = Path(PYTHON).parent / "impersonation-gateway"
    command = [str(script)] if script.exists() else [PYTHON, "-m", "gateway"]

    def load(path: Path) -> tuple[float, float]:
        started = time.monotonic()
        done = subprocess.run([*command, "directory", "load", str(path), "--config", str(bench.config)],
                              capture_output=True, text=True, cwd=ROOT, check=False)  # fmt: skip
        if done.returncode != 0:
            raise BenchError(f"directory load failed: {done.stderr.strip()}")
        found = re.search(r" in ([0-9.]+) s", done.stdout)
        if found is None:
            raise BenchError(f"directory load said no time: {done.stdout.strip()}")
        return float(found.group(1)), time.monotonic() - started

    with bench.gateway() as gateway:
        mint = Workload(gateway.url + MINT_PATH, headers=MINT_HEADERS)
        load(small)
        bench.figures.add("mint_1k_subjects", mint.run(bench.duration))
        bench.figures.directory["rss_mb_1k_subjects"] = round(gateway.rss_mb(), 1)
        header = dict(h.split(": ", 1) for h in MINT_HEADERS)
        with Probe(gateway.url + MINT_PATH, header) as probe:
            seconds, wall = load(large)
        bench.figures.directory["directory_load_1m_seconds"] = round(seconds, 1)
        bench.figures.directory["directory_load_1m_wall_seconds"] = round(wall, 1)
        bench.figures.directory["max_stall_ms_during_load"] = round(max(probe.latencies_ms), 1)
        bench.figures.directory["probes_during_load"] = len(probe.latencies_ms)
        bench.figures.directory["probe_failures_during_load"] = probe.failures
        bench.figures.add("mint_1m_subjects", mint.run(bench.duration))
        bench.figures.directory["rss_mb_1m_subjects"] = round(gateway.rss_mb(), 1)


Step = tuple[str, Callable[[], None]]  # a label (as BENCH_CASES names it) and what measures it
EDGE = "edge: pass-through and redeem"
SESSION_MEMORY = f"sessions: RSS over {SESSION_MARKS[-1] // 1000}k started and ended"

# What a case is compared with (report.RATIOS): BENCH_CASES runs them along with it.
PARTNERS: dict[str, tuple[str, ...]] = {
    "floor-mint": ("mint",),
    "mint": ("floor-mint",),
    "mint on 2 workers": ("mint",),
    "floor-redeem": ("redeem",),
    "redeem": ("floor-redeem",),
    "floor-proxy": ("pass-through",),
    "pass-through": ("floor-proxy",),
    "session": ("pass-through",),
    "nginx alone": (EDGE,),
    EDGE: ("nginx alone",),
}


def with_partners(chosen: set[str]) -> set[str]:
    """``chosen`` and, transitively, the cases they are compared with."""
    out, todo = set(chosen), list(chosen)
    while todo:
        for other in PARTNERS.get(todo.pop(), ()):
            if other not in out:
                out.add(other)
                todo.append(other)
    return out


def paired(steps: Sequence[Step], rounds: int) -> None:
    """Run ``steps`` (a floor first, then the cases compared with it) in turn, ``rounds`` times: A B A B A B.

    Each step starts its servers fresh and adds one measurement of each of its cases to the figures, so that
    every case of the group has one per round, in order, and round i of a case and round i of its floor were
    measured back to back: report.py divides them round by round and takes the median.
    """
    for i in range(1, rounds + 1):
        for label, step in steps:
            print(f"bench: {label} (round {i} of {rounds})", file=sys.stderr, flush=True)
            step()


def run(duration: int, warmup: int, rounds: int) -> Figures:
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch, contextlib.ExitStack() as stack:
        tmp = Path(scratch)
        redis_server, redis_port = processes.start_redis(tmp, tmp)
        stack.callback(redis_server.stop)
        upstream_port = free_port()
        upstream = start("upstream", [PYTHON, "-m", "bench.upstream", "--port", str(upstream_port)], tmp, ROOT)
        stack.callback(upstream.stop)
        upstream.wait_listening(upstream_port)
        redis_url, upstream_url = f"redis://127.0.0.1:{redis_port}/0", f"http://127.0.0.1:{upstream_port}"
        config, prefix = write_config(tmp, redis_url, upstream_url, grant_ttl=120 + 4 * (warmup + duration))
        client = stack.enter_context(redis.Redis(port=redis_port))
        figures = Figures(duration, warmup, rounds)
        session_config = write_session_config(config)
        bench = Bench(tmp, duration, warmup, client, redis_url, upstream_url, config, prefix, figures, session_config)
        # Groups measured in rounds: a floor, then the cases compared with it (mint on 2 workers with mint).
        groups: list[list[Step]] = [
            [("floor-hello", lambda: floor_case(bench, "hello", "/"))],
            [
                ("floor-mint", lambda: floor_case(bench, "mint", "/mint")),
                ("mint", lambda: mint_case(bench)),
                ("mint on 2 workers", lambda: workers_case(bench)),
            ],
            [("floor-redeem", lambda: floor_redeem_case(bench)), ("redeem", lambda: redeem_case(bench))],
            [
                ("floor-proxy", lambda: floor_case(bench, "proxy", PASS_PATH)),
                ("pass-through", lambda: passthrough_case(bench)),
                ("session", lambda: session_case(bench)),
            ],
            [("nginx alone", lambda: nginx_case(bench)), (EDGE, lambda: edge_cases(bench))],
        ]
        # Run once each: their figures are not ratios between cases (the directory case's one ratio, mint with
        # 1M subjects / with 1k, compares two runs of one gateway, before and after the 1M load: one round).
        once: list[Step] = [
            ("RSS after 100k and 200k mints", lambda: rss_case(bench)),
            ("directory: 1k then 1M subjects", lambda: directory_case(bench)),
            (SESSION_MEMORY, lambda: session_memory_case(bench)),
        ]
        labels = [label for group in [*groups, once] for label, _ in group]
        chosen = {c.strip() for c in os.environ.get("BENCH_CASES", "").split(",") if c.strip()}
        unknown = chosen - set(labels)
        if unknown:
            raise BenchError(f"BENCH_CASES: no case {', '.join(sorted(unknown))}; the cases: " + ", ".join(labels))
        chosen = with_partners(chosen)
        for group in groups:
            steps = [(label, step) for label, step in group if not chosen or label in chosen]
            if steps:
                paired(steps, rounds)
        for label, step in once:
            if not chosen or label in chosen:
                print(f"bench: {label}", file=sys.stderr, flush=True)
                step()
        return figures


def main() -> int:
    try:
        figures = run(_whole("BENCH_DURATION", 5), _whole("BENCH_WARMUP", 2), _whole("BENCH_ROUNDS", 3))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every process started has been stopped on the way out
        return 130
    write_results(figures, ROOT / "bench-results.json")
    return 1 if figures.invalid() else 0


if __name__ == "__main__":
    sys.exit(main())
