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

SMOOTHING_READINGS = 3  # growth: the median of the first three readings after the warm-up, and of the last three
GRACE_SECONDS = 3.0  # a failure this long after a fault's end is still the fault's
LEAD_SECONDS = 0.5  # ... or this long before its start (the fault's clock and the request's differ a little)

# What each family of faults may answer. An app fault's 500/503 must be the app's own answer (it marks them); its
# 502/504, like every other family's status, must be the gateway's (or nginx's) in the request's shapes. No fault
# explains a 500 that is not the app's: the gateway's own 500 is its catch-all, a defect whatever else went on.
FAMILY_STATUSES = {"app": {500, 502, 503, 504}, "redis": {503}, "gateway": {502, 503, 504}, "client": set[int]()}
APP_OWN_STATUSES = {500, 503}  # what the app answers itself during app:error_burst
GATEWAY_STATUSES_FOR_APP_FAULTS = {502, 504}  # what the gateway answers for an app that failed it


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
    unexcused: str = ""  # why no fault may explain it (a request in flight cut by a SIGTERM drain)


def may_answer(fault: FaultWindow, status: int, shape: str | None, shapes: frozenset[str]) -> bool:
    """Whether ``fault`` can make an answer of ``status`` in ``shape`` to a request expecting ``shapes``."""
    if status not in FAMILY_STATUSES.get(fault.family, set()):
        return False
    if shape == "app":  # the app's own answer: only while the app was told to fail
        return fault.family == "app" and status in APP_OWN_STATUSES and "app" in shapes
    if status == 500 or shape not in shapes:  # a 500 not the app's is the gateway's catch-all: never explained
        return False
    return fault.family != "app" or status in GATEWAY_STATUSES_FOR_APP_FAULTS


def explain(failure: Failure, faults: list[FaultWindow]) -> str | None:
    """The name of the fault that explains ``failure``, or None: one that covers its time, touches what it needed
    and may answer its status in its shape (:func:`may_answer`); a failure marked ``unexcused`` never is."""
    if failure.unexcused:
        return None
    for fault in faults:
        if not fault.covers(failure.start, failure.end) or not (fault.layers & failure.layers):
            continue
        if failure.status is None:
            return fault.name
        if may_answer(fault, failure.status, failure.shape, failure.shapes):
            return fault.name
    return None


def covering(faults: list[FaultWindow], start: float, end: float, layers: frozenset[str]) -> FaultWindow | None:
    """The last fault that covers ``start``..``end`` and touches one of ``layers``, or None."""
    for fault in reversed(faults):
        if fault.covers(start, end) and fault.layers & layers:
            return fault
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
    wrong_jti: list[str] = field(default_factory=list)  # a success whose answer came from the app with another jti
    unreached: int = 0  # 502/504 answers: the gateway says the app failed it
    retry_refused: bool = False  # a retry after a 502/504 was refused
    answers: list[tuple[float, str, str]] = field(default_factory=list)  # (when, kind, outcome) of each answer


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
    session_defects: list[dict[str, Any]] = field(default_factory=list)
    drains: list[tuple[float, frozenset[str]]] = field(default_factory=list)  # SIGTERMs: when, and the vias it hit

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

    def redeemed(self, grant_id: str, outcome: str, *, at: float = 0.0, kind: str = "", jti: str = "") -> None:
        """A redemption answer for ``grant_id``, judged by the gateway's answer: ``success`` (a status under 400 of
        what the carrier expects), ``wrong_jti`` (a success whose app answer carried ``jti``, not the grant's),
        ``refused`` (401) or anything else (``502``, ``504``, another status, ``error``). A ``refused`` answer of a
        ``redeem.retry`` after a 502/504 is kept: if the app never saw the grant, it was spent and not delivered."""
        grant = self.grants.get(grant_id)
        if grant is None:
            return
        grant.answers.append((round(at, 2), kind, outcome if outcome != "wrong_jti" else f"wrong_jti {jti}"))
        if outcome in ("success", "wrong_jti"):
            grant.successes += 1
            if outcome == "wrong_jti":
                grant.wrong_jti.append(jti)
        elif outcome == "refused":
            grant.refusals += 1
            if kind == "redeem.retry" and grant.unreached:
                grant.retry_refused = True
        else:
            grant.failures += 1
            if outcome in ("502", "504"):
                grant.unreached += 1

    def lost(self, seen: dict[str, int]) -> dict[str, str]:
        """Grants whose redemption was lost, with why: a success the app never saw (``unseen``), a success whose
        answer carried another jti (``wrong_jti``), a 502/504 whose retry was refused although the app never saw
        the grant (``spent_undelivered``: the gateway spent it without delivering it)."""
        out: dict[str, str] = {}
        for g in self.grants.values():
            if g.wrong_jti:
                out[g.id] = "wrong_jti"
            elif g.successes and not seen.get(g.id):
                out[g.id] = "unseen"
            elif g.retry_refused and not seen.get(g.id):
                out[g.id] = "spent_undelivered"
        return out

    def grant_results(self, seen: dict[str, int]) -> dict[str, Any]:
        """Grants minted, redeemed, refused; redeemed twice (two successes, or the app saw its jti twice: any jti
        the app saw twice counts); lost (:meth:`lost`); with a wrong jti; redeemed although revoked or deactivated
        (a success, or the app saw it)."""
        twice = {g.id for g in self.grants.values() if g.successes > 1 or seen.get(g.id, 0) > 1}
        twice |= {jti for jti, count in seen.items() if count > 1}
        lost = self.lost(seen)
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
            "lost_why": dict(sorted(lost.items())),
            "wrong_jti": sorted(g.id for g in self.grants.values() if g.wrong_jti),
            "retried_after_502_504": sum(1 for g in self.grants.values() if g.unreached),
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
                    "expect_refusal": grant.expect_refusal if grant else None,
                    "answers": [list(a) for a in grant.answers] if grant else None,
                    "app_saw": seen.get(gid, 0),
                    "arrivals": [[round(a[0] - t0_wall, 3), *a[1:]] for a in arrivals.get(gid, [])],
                }
            )
        return out

    # -- 5xx and failed connections ------------------------------------------------------------------------------
    def drain(self, at: float, vias: frozenset[str]) -> None:
        """A SIGTERM at ``at`` of the gateway that ``vias`` reach: what was in flight through them must finish."""
        self.drains.append((at, vias))

    def cut_by_drain(self, at: float, vias: frozenset[str]) -> list[Failure]:
        """The requests through ``vias`` in flight at ``at`` (begun 50 ms before at least) that got a 5xx or no
        answer; WebSockets excepted (a drain closes them)."""
        return [
            f
            for f in self.failures
            if f.via in vias and f.start < at - 0.05 and f.end >= at and f.kind not in ("pass.websocket",)
        ]

    def failure_results(self) -> dict[str, Any]:
        for at, vias in self.drains:
            for f in self.cut_by_drain(at, vias):
                f.unexcused = f"in flight at the SIGTERM at {at:.1f} s"
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


def growth(readings: list[dict[str, float]], key: str, warmup: float, min_span: float) -> float | None:
    """The last reading of ``key`` over the first one at least ``warmup`` seconds into the series; None when the
    series goes on for less than ``min_span`` seconds after that reading (too short to say). With six readings or
    more after the warm-up, each side is the median of three (the first three after it, the last three): one
    reading's noise smoothed, a steady leak not hidden."""
    if not readings:
        return None
    start = readings[0]["at"]
    after = [r for r in readings if r["at"] >= start + warmup]
    if not after or after[-1]["at"] - after[0]["at"] < min_span:
        return None
    width = SMOOTHING_READINGS if len(after) >= 2 * SMOOTHING_READINGS else 1
    first = statistics.median(r[key] for r in after[:width])
    last = statistics.median(r[key] for r in after[-width:])
    return round(last / first, 3) if first else None


def growth_results(
    readings: dict[str, list[dict[str, float]]], warmup: float, min_span: float, restart_warmup: float | None = None
) -> dict[str, Any]:
    """Per series (a process's incarnation: ``A``, ``B``, ``B#2``...), the growth of RSS and fds; the worst over
    every series long enough to say (``min_span`` after its own warm-up: ``warmup`` for a process started with the
    run, ``restart_warmup`` for a restarted one, ``B#2``...)."""
    per: dict[str, dict[str, float | None]] = {}
    for series, values in readings.items():
        own = warmup if "#" not in series or restart_warmup is None else restart_warmup
        per[series] = {
            "rss": growth(values, "rss_mib", own, min_span),
            "fds": growth(values, "fds", own, min_span),
        }
    judged = sorted(s for s, g in per.items() if g["rss"] is not None or g["fds"] is not None)
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
        **({"unexcused": failure.unexcused} if failure.unexcused else {}),
    }
