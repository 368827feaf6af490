"""The figures of one run: the ratios and targets, the table on stdout and ``bench-results.json``."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .load import CONNECTIONS, THREADS, Load

# Case ids (the JSON keys) and their labels, in the order of the table.
CASES = {
    "floor_hello": "floor-hello",
    "floor_mint": "floor-mint",
    "mint": "mint",
    "mint_workers2": "mint on 2 workers",
    "floor_redeem": "floor-redeem",
    "redeem": "redeem",
    "floor_proxy": "floor-proxy",
    "passthrough": "pass-through",
    "nginx_proxy": "nginx alone",
    "edge_passthrough": "edge pass",
    "edge_redeem": "edge redeem",
    "mint_1m_subjects": "mint 1M subj.",
}
INVALID_SHARE = 0.01  # a case with more failed requests than this measured something else: exit status 1


@dataclass(frozen=True)
class GatewayRun:
    """A measured gateway run and what the gateway did meanwhile (by its own count of requests)."""

    load: Load
    served: int
    round_trips: dict[str, int]  # by first command, and "total"
    commands: dict[str, int]  # by name, from INFO commandstats (commands run by scripts included)
    upstream_requests: int
    upstream_assertions: int

    def per_request(self, count: int) -> float | None:
        return round(count / self.served, 4) if self.served else None


@dataclass(frozen=True)
class Target:
    figure: str
    text: str
    met: Callable[[float], bool]


def _at_most_one(value: float) -> bool:
    # To two decimals: the directory refresher's GET a second is not a round trip of any one request.
    return round(value, 2) <= 1


TARGETS = (
    Target("mint_ratio", ">= 0.8", lambda v: v >= 0.8),
    Target("redeem_ratio", ">= 0.8", lambda v: v >= 0.8),
    Target("passthrough_ratio", ">= 0.9", lambda v: v >= 0.9),
    Target("edge_passthrough_ratio", ">= 0.95 (edge pass / nginx alone)", lambda v: v >= 0.95),
    Target("edge_passthrough_gateway_requests", "0 (nginx alone carries them)", lambda v: v == 0),
    Target("workers2_scaling", ">= 1.6", lambda v: v >= 1.6),
    Target("mint_p99_ratio", "<= 2 (p99 / floor-mint's)", lambda v: v <= 2),
    Target("redeem_p99_ratio", "<= 2 (p99 / floor-redeem's)", lambda v: v <= 2),
    Target("redis_round_trips_per_mint", "<= 1 (to 2 decimals)", _at_most_one),
    Target("redis_round_trips_per_redeem", "<= 1 (to 2 decimals)", _at_most_one),
    Target("redis_bytes_per_grant", "<= 512 (the grant, and its entry in the live index)", lambda v: v <= 512),
    Target("rss_growth_ratio", "1 +- 0.1 (100k -> 200k mints)", lambda v: abs(v - 1) <= 0.1),
    Target("directory_load_1m_seconds", "<= 60", lambda v: v <= 60),
    Target("rss_1m_vs_1k_subjects", "1 +- 0.1 (RSS with 1M subjects / with 1k)", lambda v: abs(v - 1) <= 0.1),
    Target("max_stall_ms_during_load", "<= 50 (a mint every 10 ms, 1M load)", lambda v: v <= 50),
)


def _version(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return "missing"
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).splitlines()[0].strip() if (done.stdout or done.stderr) else "unknown"


@dataclass
class Figures:
    duration_s: int
    warmup_s: int
    date: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    loads: dict[str, Load] = field(default_factory=dict)
    gateway_runs: dict[str, GatewayRun] = field(default_factory=dict)
    redis_bytes_per_grant: float | None = None
    redis_bytes_per_tombstone: float | None = None
    redis_bytes_per_index_entry: float | None = None  # included in redis_bytes_per_grant
    rss_mb_at_start: float | None = None
    rss_marks: dict[int, tuple[int, float]] = field(default_factory=dict)  # mark -> (mints served, RSS MB)
    edge_passthrough_gateway_requests: int | None = None  # what the gateway counted of the edge pass-through run
    directory: dict[str, float] = field(default_factory=dict)  # the directory case's figures, by name

    def add(self, case: str, load: Load) -> Load:
        self.loads[case] = load
        return load

    def add_gateway(self, case: str, run: GatewayRun) -> None:
        self.add(case, run.load)
        self.gateway_runs[case] = run

    # What a case not chosen in this run (BENCH_CASES) is taken to reach, where another case sizes its load by it.
    UNMEASURED_RPS = 10_000.0

    def rps(self, case: str) -> float:
        return self.loads[case].rps if case in self.loads else self.UNMEASURED_RPS

    # -- derived figures ----------------------------------------------------------------------------
    def _ratio(self, case: str, floor: str, value: Callable[[Load], float]) -> float | None:
        if case not in self.loads or floor not in self.loads or not value(self.loads[floor]):
            return None
        return round(value(self.loads[case]) / value(self.loads[floor]), 3)

    def summary(self) -> dict[str, Any]:
        """The flat figures of ``bench-results.json``."""
        out: dict[str, Any] = {f"{case}_rps": round(load.rps, 1) for case, load in self.loads.items()}

        def rps(load: Load) -> float:
            return load.rps

        def p99(load: Load) -> float:
            return load.p99_ms

        out["mint_ratio"] = self._ratio("mint", "floor_mint", rps)
        out["redeem_ratio"] = self._ratio("redeem", "floor_redeem", rps)
        out["passthrough_ratio"] = self._ratio("passthrough", "floor_proxy", rps)
        out["edge_passthrough_ratio"] = self._ratio("edge_passthrough", "nginx_proxy", rps)
        out["edge_passthrough_gateway_requests"] = self.edge_passthrough_gateway_requests
        out["workers2_scaling"] = self._ratio("mint_workers2", "mint", rps)
        out["mint_p99_ratio"] = self._ratio("mint", "floor_mint", p99)
        out["redeem_p99_ratio"] = self._ratio("redeem", "floor_redeem", p99)
        out["passthrough_p99_ratio"] = self._ratio("passthrough", "floor_proxy", p99)
        out["edge_passthrough_p99_ratio"] = self._ratio("edge_passthrough", "nginx_proxy", p99)
        out["p50_ms"] = {case: round(load.p50_ms, 3) for case, load in self.loads.items()}
        out["p99_ms"] = {case: round(load.p99_ms, 3) for case, load in self.loads.items()}
        for case, run in self.gateway_runs.items():
            out[f"redis_round_trips_per_{case}"] = run.per_request(run.round_trips.get("total", 0))
            out[f"redis_commands_per_{case}"] = run.per_request(sum(run.commands.values()))
        runs = self.gateway_runs.items()
        out["redis_round_trips_by_first_command"] = {
            case: {name: run.per_request(n) for name, n in sorted(run.round_trips.items()) if name != "total"}
            for case, run in runs
        }
        out["redis_commands_by_name"] = {
            case: {name: run.per_request(n) for name, n in sorted(run.commands.items())} for case, run in runs
        }
        out["upstream_requests_per_request"] = {case: run.per_request(run.upstream_requests) for case, run in runs}
        out["upstream_assertions_per_request"] = {case: run.per_request(run.upstream_assertions) for case, run in runs}
        out["redis_bytes_per_grant"] = self.redis_bytes_per_grant
        out["redis_bytes_per_tombstone"] = self.redis_bytes_per_tombstone
        out["redis_bytes_per_index_entry"] = self.redis_bytes_per_index_entry
        out["rss_mb_at_start"] = None if self.rss_mb_at_start is None else round(self.rss_mb_at_start, 1)
        for mark, (served, rss) in self.rss_marks.items():
            out[f"rss_mb_after_{mark // 1000}k_mints"] = round(rss, 1)
            out[f"mints_served_at_{mark // 1000}k_mark"] = served
        out.update(self.directory)
        if self.directory.get("rss_mb_1k_subjects") and "rss_mb_1m_subjects" in self.directory:
            out["rss_1m_vs_1k_subjects"] = round(
                self.directory["rss_mb_1m_subjects"] / self.directory["rss_mb_1k_subjects"], 3
            )
        out["mint_1m_subjects_ratio"] = self._ratio("mint_1m_subjects", "mint", rps)
        marks = sorted(self.rss_marks)
        if len(marks) >= 2 and self.rss_marks[marks[0]][1]:
            out["rss_growth_ratio"] = round(self.rss_marks[marks[-1]][1] / self.rss_marks[marks[0]][1], 3)
        return out

    def warnings(self) -> list[str]:
        return [
            f"{CASES.get(case, case)}: {load.status_errors} error answers, {load.socket_errors} socket errors, "
            f"{load.exhausted} requests without a fresh token"
            for case, load in self.loads.items()
            if not load.clean
        ]

    def invalid(self) -> list[str]:
        """The cases with too many failed requests to compare."""
        return [case for case, load in self.loads.items() if load.failed > INVALID_SHARE * max(load.requests, 1)]

    def document(self) -> dict[str, Any]:
        summary = self.summary()
        return {
            **summary,
            "targets": {
                t.figure: {"target": t.text, "met": None if summary.get(t.figure) is None else t.met(summary[t.figure])}
                for t in TARGETS
            },
            "warnings": self.warnings(),
            "invalid_cases": self.invalid(),
            "date": self.date,
            "machine": {
                "nproc": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                "wrk": _version(["wrk", "-v"]),
                "redis_server": _version(["redis-server", "--version"]),
            },
            "settings": {
                "connections": CONNECTIONS,
                "wrk_threads": THREADS,
                "warmup_s": self.warmup_s,
                "duration_s": self.duration_s,
            },
            "wrk_duration_s": {case: round(load.duration_s, 3) for case, load in self.loads.items()},
            "cases": {
                case: {**asdict(load), "rps": round(load.rps, 1)}
                | ({"gateway_served": self.gateway_runs[case].served} if case in self.gateway_runs else {})
                for case, load in self.loads.items()
            },
        }

    # -- the table ----------------------------------------------------------------------------------
    def table(self) -> str:
        summary = self.summary()
        lines = [f"{'case':<16} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'rt/req':>7} {'cmd/req':>8}"]
        for case, label in CASES.items():
            load = self.loads.get(case)
            if load is None:
                continue
            trips = summary.get(f"redis_round_trips_per_{case}")
            commands = summary.get(f"redis_commands_per_{case}")
            lines.append(
                f"{label:<16} {load.rps:>9.0f} {load.p50_ms:>8.2f} {load.p99_ms:>8.2f} {load.requests:>9}"
                f" {'' if trips is None else f'{trips:.3f}':>7} {'' if commands is None else f'{commands:.3f}':>8}"
            )
        lines.append("")
        width = max(len(t.figure) for t in TARGETS)
        for target in TARGETS:
            value = summary.get(target.figure)
            verdict = "n/a" if value is None else ("met" if target.met(value) else "MISSED")
            shown = "-" if value is None else f"{value:g}"
            lines.append(f"{target.figure:<{width}}  {shown:>10}  target {target.text:<32} {verdict}")
        extra_keys = (
            "passthrough_p99_ratio",
            "edge_passthrough_p99_ratio",
            "redis_bytes_per_tombstone",
            "redis_bytes_per_index_entry",
            "rss_mb_at_start",
        )
        extra = {k: summary.get(k) for k in extra_keys}
        for mark in sorted(self.rss_marks):
            extra[f"rss_mb_after_{mark // 1000}k_mints"] = summary.get(f"rss_mb_after_{mark // 1000}k_mints")
        for key, value in extra.items():
            if value is not None:
                lines.append(f"{key:<{width}}  {value:>10g}")
        lines.append("")
        for case in self.gateway_runs:
            for title, key in (
                ("round trips", "redis_round_trips_by_first_command"),
                ("commands", "redis_commands_by_name"),
            ):
                per = summary[key][case]
                lines.append(f"{case}: redis {title} per request: " + ", ".join(f"{n} {v:g}" for n, v in per.items()))
            lines.append(
                f"{case}: upstream requests per request {summary['upstream_requests_per_request'][case]:g}, "
                f"with an assertion {summary['upstream_assertions_per_request'][case]:g}"
            )
        lines.extend(f"WARNING: {w}" for w in self.warnings())
        lines.extend(f"INVALID: {CASES.get(c, c)} failed too many requests to compare" for c in self.invalid())
        return "\n".join(lines)


def write_results(figures: Figures, path: Path) -> None:
    """Print the table and write ``path`` (JSON)."""
    print(figures.table())
    path.write_bytes(orjson.dumps(figures.document(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
    print(f"\nwrote {path.name}")
