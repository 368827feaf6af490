"""The figures of one run: the ratios and targets, the table on stdout and ``bench-results.json``.

Every case of a pair (a case and the floor it is compared with) is measured once per round, the floor and
the case back to back; a ratio is the median of its per-round ratios, with their min and max as its spread,
and a case's req/s, p50 and p99 are the medians of its rounds.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Callable, Sequence
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
    "session": "session",
    "nginx_proxy": "nginx alone",
    "edge_passthrough": "edge pass",
    "edge_redeem": "edge redeem",
    "mint_1k_subjects": "mint 1k subj.",
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

    @staticmethod
    def merged(runs: Sequence[GatewayRun]) -> GatewayRun:
        """The rounds' counts added up (``load`` is the last round's): per-request figures over every round."""

        def added(dicts: list[dict[str, int]]) -> dict[str, int]:
            out: dict[str, int] = {}
            for counts in dicts:
                for name, n in counts.items():
                    out[name] = out.get(name, 0) + n
            return out

        return GatewayRun(
            load=runs[-1].load,
            served=sum(r.served for r in runs),
            round_trips=added([r.round_trips for r in runs]),
            commands=added([r.commands for r in runs]),
            upstream_requests=sum(r.upstream_requests for r in runs),
            upstream_assertions=sum(r.upstream_assertions for r in runs),
        )


def _rps(load: Load) -> float:
    return load.rps


def _p99(load: Load) -> float:
    return load.p99_ms


# The ratios: name -> (case, the case it is divided by, the figure). Both cases are measured in the same
# rounds (run.py's groups), so round i of one is compared with round i of the other.
RATIOS: dict[str, tuple[str, str, Callable[[Load], float]]] = {
    "mint_ratio": ("mint", "floor_mint", _rps),
    "redeem_ratio": ("redeem", "floor_redeem", _rps),
    "passthrough_ratio": ("passthrough", "floor_proxy", _rps),
    "session_ratio": ("session", "passthrough", _rps),
    "edge_passthrough_ratio": ("edge_passthrough", "nginx_proxy", _rps),
    "workers2_scaling": ("mint_workers2", "mint", _rps),
    "mint_p99_ratio": ("mint", "floor_mint", _p99),
    "redeem_p99_ratio": ("redeem", "floor_redeem", _p99),
    "passthrough_p99_ratio": ("passthrough", "floor_proxy", _p99),
    "session_p99_ratio": ("session", "passthrough", _p99),
    "edge_passthrough_p99_ratio": ("edge_passthrough", "nginx_proxy", _p99),
    # The directory case runs once: mint with 1k subjects, then with 1M, on one gateway (one round).
    "mint_1m_subjects_ratio": ("mint_1m_subjects", "mint_1k_subjects", _rps),
}


@dataclass(frozen=True)
class Target:
    """A figure's goal (``met``) and, for some, a lower bar it must clear even when the goal is missed."""

    figure: str
    text: str
    met: Callable[[float], bool]
    bar: Callable[[float], bool] | None = None

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        if self.met(value):
            return "met"
        return "MISSED (above the bar)" if self.bar is not None and self.bar(value) else "MISSED"


def _at_most_one(value: float) -> bool:
    # To two decimals: the directory refresher's GET a second is not a round trip of any one request.
    return round(value, 2) <= 1


TARGETS = (
    Target("mint_ratio", ">= 0.8", lambda v: v >= 0.8),
    Target("redeem_ratio", ">= 0.8", lambda v: v >= 0.8),
    Target("passthrough_ratio", ">= 0.9", lambda v: v >= 0.9),
    Target("session_ratio", ">= 0.8, bar 0.5 (session / pass-through)", lambda v: v >= 0.8, lambda v: v >= 0.5),
    Target("edge_passthrough_ratio", ">= 0.95 (edge pass / nginx alone)", lambda v: v >= 0.95),
    Target("edge_passthrough_gateway_requests", "0 (nginx alone carries them)", lambda v: v == 0),
    Target("workers2_scaling", ">= 1.6", lambda v: v >= 1.6),
    Target("mint_p99_ratio", "<= 2 (p99 / floor-mint's)", lambda v: v <= 2),
    Target("redeem_p99_ratio", "<= 2 (p99 / floor-redeem's)", lambda v: v <= 2),
    Target("redis_round_trips_per_mint", "<= 1 (to 2 decimals)", _at_most_one),
    Target("redis_round_trips_per_redeem", "<= 1 (to 2 decimals)", _at_most_one),
    Target("redis_round_trips_per_session", "<= 1 (to 2 decimals)", _at_most_one),
    Target("redis_bytes_per_grant", "<= 512 (the grant, and its entry in the live index)", lambda v: v <= 512),
    Target("rss_growth_ratio", "1 +- 0.1 (100k -> 200k mints)", lambda v: abs(v - 1) <= 0.1),
    Target("session_rss_growth_ratio", "1 +- 0.1 (RSS after all sessions / after half)", lambda v: abs(v - 1) <= 0.1),
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
    rounds: int = 1
    date: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    loads: dict[str, list[Load]] = field(default_factory=dict)  # every round's, in order
    gateway_runs: dict[str, list[GatewayRun]] = field(default_factory=dict)
    redis_bytes_per_grant: float | None = None
    redis_bytes_per_tombstone: float | None = None
    redis_bytes_per_index_entry: float | None = None  # included in redis_bytes_per_grant
    rss_mb_at_start: float | None = None
    rss_marks: dict[int, tuple[int, float]] = field(default_factory=dict)  # mark -> (mints served, RSS MB)
    edge_passthrough_gateway_requests: int | None = None  # what the gateway counted of the edge pass-through runs
    directory: dict[str, float] = field(default_factory=dict)  # the directory case's figures, by name
    redis_bytes_per_session: float | None = None  # its hash and its entry in the app's session index
    redis_bytes_per_session_index_entry: float | None = None  # included in redis_bytes_per_session
    session_rss_mb_at_start: float | None = None
    session_rss_marks: dict[int, tuple[float, float]] = field(default_factory=dict)  # mark -> (seconds, RSS MB)
    sessions_live_after_churn: int | None = None  # session keys and index entries left once all have ended

    def add(self, case: str, load: Load) -> Load:
        self.loads.setdefault(case, []).append(load)
        return load

    def add_gateway(self, case: str, run: GatewayRun) -> None:
        self.add(case, run.load)
        self.gateway_runs.setdefault(case, []).append(run)

    # What a case not chosen in this run (BENCH_CASES) is taken to reach, where another case sizes its load by it.
    UNMEASURED_RPS = 10_000.0

    def rps(self, case: str) -> float:
        """The highest rate ``case`` reached so far: what another case sizes its load (its tokens) by."""
        return max(load.rps for load in self.loads[case]) if case in self.loads else self.UNMEASURED_RPS

    # -- derived figures ----------------------------------------------------------------------------
    def median(self, case: str, value: Callable[[Load], float]) -> float:
        return statistics.median(value(load) for load in self.loads[case])

    def per_round(self, ratio: str) -> list[float] | None:
        """``ratio`` in each round (its two cases measured back to back), or None without both cases."""
        case, floor, value = RATIOS[ratio]
        if case not in self.loads or floor not in self.loads:
            return None
        pairs = zip(self.loads[case], self.loads[floor], strict=True)
        return [value(a) / value(b) for a, b in pairs if value(b)] or None

    def summary(self) -> dict[str, Any]:
        """The flat figures of ``bench-results.json``: medians of the rounds, and each ratio's spread."""
        out: dict[str, Any] = {f"{case}_rps": round(self.median(case, _rps), 1) for case in self.loads}
        out["rounds"] = self.rounds
        by_round: dict[str, list[float]] = {}
        for name in RATIOS:
            ratios = self.per_round(name)
            out[name] = None if ratios is None else round(statistics.median(ratios), 3)
            out[f"{name}_spread"] = None if ratios is None else [round(min(ratios), 3), round(max(ratios), 3)]
            if ratios is not None:
                by_round[name] = [round(r, 3) for r in ratios]
        out["ratios_by_round"] = by_round
        out["edge_passthrough_gateway_requests"] = self.edge_passthrough_gateway_requests
        out["p50_ms"] = {case: round(self.median(case, lambda load: load.p50_ms), 3) for case in self.loads}
        out["p99_ms"] = {case: round(self.median(case, _p99), 3) for case in self.loads}
        merged = {case: GatewayRun.merged(runs) for case, runs in self.gateway_runs.items()}
        for case, run in merged.items():
            out[f"redis_round_trips_per_{case}"] = run.per_request(run.round_trips.get("total", 0))
            out[f"redis_commands_per_{case}"] = run.per_request(sum(run.commands.values()))
        runs = merged.items()
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
        marks = sorted(self.rss_marks)
        if len(marks) >= 2 and self.rss_marks[marks[0]][1]:
            out["rss_growth_ratio"] = round(self.rss_marks[marks[-1]][1] / self.rss_marks[marks[0]][1], 3)
        out.update(self._session_memory())
        return out

    def _session_memory(self) -> dict[str, Any]:
        """The session memory case's figures (none when it did not run)."""
        if self.redis_bytes_per_session is None and not self.session_rss_marks:
            return {}
        out: dict[str, Any] = {
            "redis_bytes_per_session": self.redis_bytes_per_session,
            "redis_bytes_per_session_index_entry": self.redis_bytes_per_session_index_entry,
            "session_rss_mb_at_start": None
            if self.session_rss_mb_at_start is None
            else round(self.session_rss_mb_at_start, 1),
        }
        for mark, (_, rss) in sorted(self.session_rss_marks.items()):
            out[f"session_rss_mb_after_{mark // 1000}k_sessions"] = round(rss, 1)
        marks = sorted(self.session_rss_marks)
        if marks:
            seconds = self.session_rss_marks[marks[-1]][0]
            out["session_churn_seconds"] = round(seconds, 1)
            out["sessions_per_second"] = round(marks[-1] / seconds, 1) if seconds else None
        if len(marks) >= 2 and self.session_rss_marks[marks[0]][1]:
            out["session_rss_growth_ratio"] = round(
                self.session_rss_marks[marks[-1]][1] / self.session_rss_marks[marks[0]][1], 3
            )
        out["sessions_live_after_churn"] = self.sessions_live_after_churn
        return out

    def warnings(self) -> list[str]:
        return [
            f"{CASES.get(case, case)}, round {i}: {load.status_errors} error answers, {load.socket_errors} socket "
            f"errors, {load.exhausted} requests without a fresh token"
            for case, loads in self.loads.items()
            for i, load in enumerate(loads, 1)
            if not load.clean
        ]

    def invalid(self) -> list[str]:
        """The cases with too many failed requests to compare (in any round)."""
        return [
            case
            for case, loads in self.loads.items()
            if any(load.failed > INVALID_SHARE * max(load.requests, 1) for load in loads)
        ]

    def document(self) -> dict[str, Any]:
        summary = self.summary()
        return {
            **summary,
            "targets": {t.figure: _target_entry(t, summary.get(t.figure)) for t in TARGETS},
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
                "rounds": self.rounds,
            },
            "wrk_duration_s": {
                case: [round(load.duration_s, 3) for load in loads] for case, loads in self.loads.items()
            },
            "cases": {case: self._rounds_of(case) for case in self.loads},
        }

    def _rounds_of(self, case: str) -> list[dict[str, Any]]:
        """What each round of ``case`` measured, in order."""
        runs = self.gateway_runs.get(case)
        return [
            {**asdict(load), "rps": round(load.rps, 1)} | ({"gateway_served": runs[i].served} if runs else {})
            for i, load in enumerate(self.loads[case])
        ]

    # -- the table ----------------------------------------------------------------------------------
    def table(self) -> str:
        summary = self.summary()
        lines = [
            f"medians of {self.rounds} round{'s' if self.rounds != 1 else ''} (a floor and its case back to back in "
            "each); min-max: the rounds' req/s, and each ratio's spread over its rounds",
            "",
            f"{'case':<17} {'req/s':>9} {'min-max':>13} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'rt/req':>7}"
            f" {'cmd/req':>8}",
        ]
        for case, label in CASES.items():
            loads = self.loads.get(case)
            if loads is None:
                continue
            trips = summary.get(f"redis_round_trips_per_{case}")
            commands = summary.get(f"redis_commands_per_{case}")
            spread = f"{min(x.rps for x in loads):.0f}-{max(x.rps for x in loads):.0f}"
            lines.append(
                f"{label:<17} {summary[f'{case}_rps']:>9.0f} {spread:>13} {summary['p50_ms'][case]:>8.2f}"
                f" {summary['p99_ms'][case]:>8.2f} {sum(x.requests for x in loads):>9}"
                f" {'' if trips is None else f'{trips:.3f}':>7} {'' if commands is None else f'{commands:.3f}':>8}"
            )
        lines.append("")
        width = max(len(t.figure) for t in TARGETS)

        def spread_of(figure: str) -> str:
            low_high = summary.get(f"{figure}_spread")
            return "" if low_high is None else f"{low_high[0]:g}-{low_high[1]:g}"

        for target in TARGETS:
            value = summary.get(target.figure)
            verdict = target.verdict(value)
            shown = "-" if value is None else f"{value:g}"
            lines.append(
                f"{target.figure:<{width}}  {shown:>10} {spread_of(target.figure):<13}  target {target.text:<42} "
                f"{verdict}"
            )
        shown_ratios = (
            "passthrough_p99_ratio",
            "session_p99_ratio",
            "edge_passthrough_p99_ratio",
            "mint_1m_subjects_ratio",
        )
        for figure in shown_ratios:
            if summary.get(figure) is not None:
                lines.append(f"{figure:<{width}}  {summary[figure]:>10g} {spread_of(figure)}")
        extra_keys = (
            "redis_bytes_per_tombstone",
            "redis_bytes_per_index_entry",
            "rss_mb_at_start",
        )
        extra = {k: summary.get(k) for k in extra_keys}
        for mark in sorted(self.rss_marks):
            extra[f"rss_mb_after_{mark // 1000}k_mints"] = summary.get(f"rss_mb_after_{mark // 1000}k_mints")
        session_keys = [k for k in self._session_memory() if k != "session_rss_growth_ratio"]
        extra.update({k: summary.get(k) for k in session_keys})
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


def _target_entry(target: Target, value: float | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"target": target.text, "met": None if value is None else target.met(value)}
    if target.bar is not None:
        entry["bar_met"] = None if value is None else target.bar(value)
    return entry


def write_results(figures: Figures, path: Path) -> None:
    """Print the table and write ``path`` (JSON)."""
    print(figures.table())
    path.write_bytes(orjson.dumps(figures.document(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
    print(f"\nwrote {path.name}")
