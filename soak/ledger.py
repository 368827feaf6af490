"""The soak's accounting, kept apart from the processes and the traffic so that it can be tested on made-up data.

- every request: its kind, outcome, latency, and — when it failed with a 5xx or a broken connection — enough to
  explain it later by a fault that was active at the time (with a grace window) and touched what the request
  needed (the app, Redis, gateway B, nginx), in the shape the request's dialect answers with;
- every grant: minted, redemption answers (success, refusal, 5xx, error), and at the end what the app saw;
- each gateway process's RSS and open fds, as series (a restart starts a new one), and their growth;
- the faults: their windows, the check of each one's outcome, and for Redis faults the time to 503 and to recovery.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

FD_FLOOR_READINGS = 5  # open fds: the least of five readings on each side (pooled connections come and go)
GRACE_SECONDS = 3.0  # a failure this long after a fault's end is still the fault's
LEAD_SECONDS = 0.5  # ... or this long before its start (the fault's clock and the request's differ a little)

# What each family of faults may answer, and what it touches.
FAMILY_STATUSES = {"app": {500, 502, 503, 504}, "redis": {503}, "gateway": {502, 503, 504}, "client": set[int]()}


@dataclass
class FaultWindow:
    """An injected fault: from ``start`` until ``end`` (None while it lasts), touching ``layers``."""

    name: str
    family: str
    start: float
    layers: frozenset[str]
    end: float | None = None

    def covers(self, start: float, end: float, grace: float = GRACE_SECONDS) -> bool:
        fault_end = math.inf if self.end is None else self.end + grace
        return start <= fault_end and end >= self.start - LEAD_SECONDS


@dataclass
class Failure:
    """A request that got a 5xx, or no answer at all (``status`` None: the connection failed)."""

    kind: str
    start: float
    end: float
    status: int | None
    shape: str | None
    via: str
    layers: frozenset[str]
    shapes: frozenset[str]
    detail: str = ""


def explain(failure: Failure, faults: list[FaultWindow]) -> str | None:
    """The name of the fault that explains ``failure``, or None: one that covers its time, touches what it needed
    and may answer its status; a 5xx must also be in one of the request's expected shapes."""
    for fault in faults:
        if not fault.covers(failure.start, failure.end) or not (fault.layers & failure.layers):
            continue
        if failure.status is None:
            return fault.name
        if failure.status in FAMILY_STATUSES.get(fault.family, set()) and failure.shape in failure.shapes:
            return fault.name
    return None


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of ``values`` (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Grant:
    id: str
    kind: str
    minted_at: float
    successes: int = 0
    refusals: int = 0
    failures: int = 0
    expect_refusal: str | None = None  # "revoked", "deactivated": a success would be a defect


@dataclass
class Ledger:
    """Everything counted during a run; :meth:`results` turns it into the JSON's parts."""

    window_seconds: float
    bucket_seconds: float = 10.0
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latencies: dict[tuple[int, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    throughput: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    failures: list[Failure] = field(default_factory=list)
    faults: list[FaultWindow] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    redis_faults: list[dict[str, Any]] = field(default_factory=list)
    grants: dict[str, Grant] = field(default_factory=dict)
    sessions: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[tuple[float, int, int]]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)

    # -- requests ------------------------------------------------------------------------------------------------
    def request(
        self,
        kind: str,
        start: float,
        end: float,
        status: int | None,
        outcome: str,
        *,
        via: str = "",
        layers: frozenset[str] = frozenset(),
        shapes: frozenset[str] = frozenset(),
        shape: str | None = None,
        detail: str = "",
    ) -> None:
        """One request of ``kind`` from ``start`` to ``end`` (seconds of the run): ``status`` None when no answer came.
        A 5xx or a failed connection is kept, to be explained by a fault at the end."""
        self.outcomes[kind][outcome] += 1
        self.throughput[(int(end // self.bucket_seconds), kind)] += 1
        if status is not None and status < 500:
            self.latencies[(int(start // self.window_seconds), kind)].append(end - start)
        if status is None or status >= 500:
            self.failures.append(Failure(kind, start, end, status, shape, via, layers, shapes, detail))

    def fault(self, name: str, family: str, start: float, layers: frozenset[str]) -> FaultWindow:
        window = FaultWindow(name, family, start, layers)
        self.faults.append(window)
        return window

    # -- grants --------------------------------------------------------------------------------------------------
    def minted(self, grant_id: str, kind: str, at: float, expect_refusal: str | None = None) -> None:
        self.grants[grant_id] = Grant(grant_id, kind, at, expect_refusal=expect_refusal)

    def redeemed(self, grant_id: str, outcome: str) -> None:
        """A redemption answer for ``grant_id``: ``success``, ``refused`` or anything else (a 5xx, an error)."""
        grant = self.grants.get(grant_id)
        if grant is None:
            return
        if outcome == "success":
            grant.successes += 1
        elif outcome == "refused":
            grant.refusals += 1
        else:
            grant.failures += 1

    def grant_results(self, seen: dict[str, int]) -> dict[str, Any]:
        """Grants minted, redeemed, refused; redeemed twice (two successes, or the app saw its jti twice: any jti
        the app saw twice counts); lost (a success the app never saw); redeemed although revoked or deactivated."""
        twice = {g.id for g in self.grants.values() if g.successes > 1 or seen.get(g.id, 0) > 1}
        twice |= {jti for jti, count in seen.items() if count > 1}
        lost = [g.id for g in self.grants.values() if g.successes and not seen.get(g.id)]
        wrongly = [g.id for g in self.grants.values() if g.expect_refusal and (g.successes or seen.get(g.id))]
        return {
            "minted": len(self.grants),
            "redeemed": sum(1 for g in self.grants.values() if g.successes),
            "refused": sum(1 for g in self.grants.values() if g.refusals and not g.successes),
            "failed_only": sum(1 for g in self.grants.values() if g.failures and not g.successes and not g.refusals),
            "never_presented": sum(1 for g in self.grants.values() if not (g.successes or g.refusals or g.failures)),
            "seen_by_app": sum(1 for g in self.grants.values() if seen.get(g.id)),
            "redeemed_twice": sorted(twice),
            "lost": sorted(lost),
            "redeemed_though_refusal_expected": sorted(wrongly),
        }

    def grant_details(
        self, ids: list[str], seen: dict[str, int], arrivals: dict[str, list[list[Any]]], t0_wall: float
    ) -> list[dict[str, Any]]:
        """What is known of each of ``ids``: how it was minted, its answers, and each arrival at the app (seconds
        into the run, method, path, the gateway's client port) when it came more than once."""
        out = []
        for gid in ids:
            grant = self.grants.get(gid)
            out.append(
                {
                    "id": gid,
                    "kind": grant.kind if grant else None,
                    "minted_at": round(grant.minted_at, 2) if grant else None,
                    "successes": grant.successes if grant else None,
                    "refusals": grant.refusals if grant else None,
                    "app_saw": seen.get(gid, 0),
                    "arrivals": [[round(a[0] - t0_wall, 3), *a[1:]] for a in arrivals.get(gid, [])],
                }
            )
        return out

    # -- 5xx and failed connections ------------------------------------------------------------------------------
    def failure_results(self) -> dict[str, Any]:
        by_cause: Counter[str] = Counter()
        unexplained: list[dict[str, Any]] = []
        errors_by_cause: Counter[str] = Counter()
        unexplained_errors: list[dict[str, Any]] = []
        for failure in self.failures:
            cause = explain(failure, self.faults)
            family = cause.split(":")[0] if cause else None
            if failure.status is None:
                if cause is None:
                    unexplained_errors.append(_failure_json(failure))
                else:
                    errors_by_cause[str(family)] += 1
            elif cause is None:
                unexplained.append(_failure_json(failure))
            else:
                by_cause[str(family)] += 1
        return {
            "fivexx_by_cause": dict(sorted(by_cause.items())),
            "unexplained_5xx": unexplained,
            "connection_errors_by_cause": dict(sorted(errors_by_cause.items())),
            "unexplained_connection_errors": unexplained_errors,
        }

    # -- latency -------------------------------------------------------------------------------------------------
    def latency_windows(self) -> list[dict[str, Any]]:
        windows: dict[int, dict[str, Any]] = {}
        for (index, kind), values in sorted(self.latencies.items()):
            window = windows.setdefault(
                index, {"start": index * self.window_seconds, "end": (index + 1) * self.window_seconds, "kinds": {}}
            )
            window["kinds"][kind] = {
                "count": len(values),
                "p50_ms": round(percentile(values, 50) * 1000, 1),
                "p99_ms": round(percentile(values, 99) * 1000, 1),
            }
        return [windows[i] for i in sorted(windows)]

    # -- RSS and fds ---------------------------------------------------------------------------------------------
    def sample(self, series: str, at: float, rss_kib: int, fds: int) -> None:
        self.samples[series].append((at, rss_kib, fds))

    def readings(self, interval: float) -> dict[str, list[dict[str, float]]]:
        """Per series, one reading per ``interval``: the median RSS and the fewest open fds of its samples (the
        floor: a connection in flight at the moment of a sample is no leak)."""
        out: dict[str, list[dict[str, float]]] = {}
        for series, samples in self.samples.items():
            groups: dict[int, list[tuple[float, int, int]]] = defaultdict(list)
            for sample in samples:
                groups[int(sample[0] // interval)].append(sample)
            out[series] = [
                {
                    "at": (i + 1) * interval if len(g) > 1 else g[-1][0],
                    "rss_mib": round(statistics.median(s[1] for s in g) / 1024, 2),
                    "fds": min(s[2] for s in g),
                }
                for i, g in sorted(groups.items())
            ]
        return out


def growth(readings: list[dict[str, float]], key: str, warmup: float, min_span: float, floor: int = 1) -> float | None:
    """The last reading of ``key`` over the first one at least ``warmup`` seconds into the series; None when the
    series goes on for less than ``min_span`` seconds after that reading (too short to say). With ``floor`` > 1,
    each side is the least of ``floor`` readings (the first ones after the warm-up, the last ones): what a leak
    raises, whatever the load of the moment holds open."""
    if not readings:
        return None
    start = readings[0]["at"]
    after = [r for r in readings if r["at"] >= start + warmup]
    if not after or after[-1]["at"] - after[0]["at"] < min_span:
        return None
    width = max(1, min(floor, len(after) // 3))
    first, last = min(r[key] for r in after[:width]), min(r[key] for r in after[-width:])
    return round(last / first, 3) if first else None


def longest(readings: dict[str, list[dict[str, float]]]) -> dict[str, str]:
    """Per process (``B`` for ``B``, ``B#2``...), its longest series: a restarted process's short series would
    measure a young process's growth, not a leak."""
    best: dict[str, str] = {}
    for series, values in readings.items():
        process = series.split("#")[0]
        span = values[-1]["at"] - values[0]["at"] if values else 0.0
        current = readings.get(best.get(process, ""), [])
        if process not in best or span > current[-1]["at"] - current[0]["at"]:
            best[process] = series
    return best


def growth_results(readings: dict[str, list[dict[str, float]]], warmup: float, min_span: float) -> dict[str, Any]:
    """Per series, the growth of RSS and fds; the worst, over each process's longest series, of those long enough
    to say."""
    per: dict[str, dict[str, float | None]] = {}
    for series, values in readings.items():
        per[series] = {
            "rss": growth(values, "rss_mib", warmup, min_span),
            "fds": growth(values, "fds", warmup, min_span, floor=FD_FLOOR_READINGS),
        }
    judged = sorted(longest(readings).values())
    rss = [g for s in judged if (g := per[s]["rss"]) is not None]
    fds = [g for s in judged if (g := per[s]["fds"]) is not None]
    return {
        "rss_growth_ratio": max(rss) if rss else None,
        "fd_growth_ratio": max(fds) if fds else None,
        "growth_by_series": per,
        "judged_series": judged,
    }


def _failure_json(failure: Failure) -> dict[str, Any]:
    return {
        "kind": failure.kind,
        "at": round(failure.start, 2),
        "took": round(failure.end - failure.start, 3),
        "status": failure.status,
        "shape": failure.shape,
        "expected_shapes": sorted(failure.shapes),
        "via": failure.via,
        "detail": failure.detail[:300],
    }
