"""The soak's judgement on made-up data (``make soak`` itself runs for an hour): whose answer a 5xx is, which fault
explains it, which grants were redeemed twice or lost, the growth of RSS and fds, the schedule, the verdict."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from soak.driver import shape_of
from soak.faults import CLIENT, SERIAL, plan
from soak.ledger import Failure, FaultWindow, Ledger, explain, growth, growth_results, longest, percentile
from soak.report import failed


def headers(content_type: str, **extra: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({"Content-Type": content_type, **extra}))


@pytest.mark.parametrize(
    ("status", "content_type", "body", "extra", "shape"),
    [
        (503, "application/vnd.api+json", {"errors": [{"status": "503", "code": "x", "title": "t", "detail": "d"}]},
         {}, "activeplatform"),
        (503, "application/vnd.api+json", {"errors": [{"status": "500"}]}, {}, "other"),  # the status must agree
        (503, "text/plain; charset=utf-8", "Service unavailable", {}, "text"),
        (503, "application/json", {"error_type": "service_unavailable", "success": False}, {}, "denovolab"),
        (503, "application/json", {"errors": {"ER999": {"code": "ER999", "message": "m", "solution": "s"}}}, {},
         "btcdirect"),
        (503, "application/problem+json", {"type": "t", "title": "t", "status": 503, "detail": "d"}, {}, "problem"),
        (503, "application/scim+json", {"status": "503"}, {}, "scim"),
        (502, "text/html", "<html><center>nginx</center></html>", {}, "nginx"),
        (500, "text/plain", "the app is having a bad moment", {"X-Soak-App": "1"}, "app"),
        (500, "application/json", {"anything": 1}, {}, "other"),
    ],
)  # fmt: skip
def test_a_5xx_is_told_by_its_shape(
    status: int, content_type: str, body: object, extra: dict[str, str], shape: str
) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    assert shape_of(status, headers(content_type, **extra), raw) == shape


def failure(start: float, status: int | None = 503, shape: str | None = "problem", layers: str = "redis",
            shapes: str = "problem") -> Failure:  # fmt: skip
    return Failure("mint.native", start, start + 0.2, status, shape, "A", frozenset(layers.split()),
                   frozenset(shapes.split()))  # fmt: skip


def test_a_failure_is_explained_by_a_fault_that_covers_it_touches_what_it_needed_and_may_answer_so() -> None:
    faults = [FaultWindow("redis:stop", "redis", 10.0, frozenset({"redis"}), end=13.0),
              FaultWindow("app:slow", "app", 20.0, frozenset({"app"}), end=25.0)]  # fmt: skip
    assert explain(failure(11.0), faults) == "redis:stop"
    assert explain(failure(15.5), faults) == "redis:stop"  # within the grace window after its end
    assert explain(failure(9.6), faults) == "redis:stop"  # just before its start
    assert explain(failure(17.0), faults) is None  # past the grace window
    assert explain(failure(21.0), faults) is None  # an app fault explains nothing a mint needed
    assert explain(failure(11.0, status=500), faults) is None  # Redis down is a 503, never a 500
    assert explain(failure(11.0, shape="text"), faults) is None  # not in the request's dialect's shape
    assert explain(failure(21.0, 504, "text", "app", "app text"), faults) == "app:slow"
    assert explain(failure(21.0, None, None, "app"), faults) == "app:slow"  # a broken connection: any status
    assert explain(failure(30.0, None, None, "app"), faults) is None
    assert explain(failure(11.0), [FaultWindow("redis:kill_primary", "redis", 10.0, frozenset({"redis"}))]) == (
        "redis:kill_primary"
    )  # a fault still going on covers everything after its start


def test_the_ledger_sorts_failures_into_explained_and_not() -> None:
    ledger = Ledger(window_seconds=20)
    ledger.fault("redis:stop", "redis", 10.0, frozenset({"redis"})).end = 13.0
    for start in (11.0, 12.0, 40.0):
        ledger.request("mint.native", start, start + 0.1, 503, "503", via="A", layers=frozenset({"redis"}),
                       shapes=frozenset({"problem"}), shape="problem")  # fmt: skip
    ledger.request("pass.small", 41.0, 41.1, None, "error", via="B", layers=frozenset({"app"}))
    ledger.request("pass.small", 41.0, 41.05, 200, "2xx")
    results = ledger.failure_results()
    assert results["fivexx_by_cause"] == {"redis": 2}
    assert [f["at"] for f in results["unexplained_5xx"]] == [40.0]
    assert len(results["unexplained_connection_errors"]) == 1
    assert ledger.outcomes["mint.native"]["503"] == 3
    assert [w["kinds"]["pass.small"]["count"] for w in ledger.latency_windows() if "pass.small" in w["kinds"]] == [1]


def test_grants_redeemed_twice_or_lost() -> None:
    ledger = Ledger(window_seconds=60)
    for gid in ("once", "two-successes", "app-saw-twice", "lost", "refused", "revoked-but-redeemed"):
        ledger.minted(gid, "mint.native", 1.0, expect_refusal="revoked" if gid.startswith("revoked") else None)
    for gid, outcome in [("once", "success"), ("two-successes", "success"), ("two-successes", "success"),
                         ("app-saw-twice", "success"), ("lost", "success"), ("refused", "refused"),
                         ("revoked-but-redeemed", "success")]:  # fmt: skip
        ledger.redeemed(gid, outcome)
    seen = {"once": 1, "two-successes": 1, "app-saw-twice": 2, "revoked-but-redeemed": 1, "session-request-jti": 2}
    results = ledger.grant_results(seen)
    assert results["redeemed_twice"] == ["app-saw-twice", "session-request-jti", "two-successes"]
    assert results["lost"] == ["lost"]
    assert results["redeemed_though_refusal_expected"] == ["revoked-but-redeemed"]
    assert (results["minted"], results["redeemed"], results["refused"]) == (6, 5, 1)


def test_readings_take_the_median_rss_and_the_fewest_fds_of_each_interval() -> None:
    ledger = Ledger(window_seconds=60)
    for at, rss, fds in [(1, 1024, 30), (3, 2048, 20), (5, 3072, 25), (11, 1024, 40)]:
        ledger.sample("A", at, rss, fds)
    assert ledger.readings(10)["A"] == [{"at": 10, "rss_mib": 2.0, "fds": 20}, {"at": 11, "rss_mib": 1.0, "fds": 40}]


def test_growth_is_the_last_reading_over_the_first_after_warmup() -> None:
    readings = [{"at": float(t), "rss_mib": 100.0 + t, "fds": 20.0} for t in range(0, 130, 10)]
    assert growth(readings, "rss_mib", warmup=20, min_span=20) == round(220 / 120, 3)
    assert growth(readings, "fds", warmup=20, min_span=20) == 1.0
    assert growth(readings, "rss_mib", warmup=100, min_span=30) is None  # 100..120: too short to say
    assert growth([], "fds", warmup=0, min_span=0) is None
    noisy = [{"at": float(t), "fds": 20.0 + (t % 30) / 5} for t in range(0, 130, 10)]  # 20, 22, 24, 20, ...
    assert growth(noisy, "fds", warmup=20, min_span=20) == round(20 / 24, 3)  # one reading each side
    assert growth(noisy, "fds", warmup=20, min_span=20, floor=3) == 1.0  # the floors: 20 and 20


def test_each_process_is_judged_by_its_longest_series() -> None:
    steady = [{"at": float(t), "rss_mib": 100.0, "fds": 20.0} for t in range(0, 130, 10)]
    young = [{"at": float(t), "rss_mib": 80.0 + t, "fds": 20.0 + t} for t in range(60, 130, 10)]
    old_b = [{"at": float(t), "rss_mib": 100.0, "fds": 22.0} for t in range(0, 90, 10)]
    readings = {"A": steady, "B": old_b, "B#2": young}
    assert longest(readings) == {"A": "A", "B": "B"}
    results = growth_results(readings, warmup=20, min_span=20)
    assert results["rss_growth_ratio"] == 1.0 and results["fd_growth_ratio"] == 1.0  # B#2's young growth ignored
    assert results["growth_by_series"]["B#2"]["fds"] is not None  # but reported


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("seconds", [120, 600, 3600])
def test_every_fault_plays_at_least_once_between_the_warmup_and_the_tail(seconds: int) -> None:
    schedule = plan(seconds)
    assert schedule.warmup == min(600, max(15, seconds / 6))
    assert schedule.serial_starts[0] == schedule.warmup and schedule.client_starts[0] == schedule.warmup
    assert all(start < seconds - schedule.tail for start in schedule.serial_starts + schedule.client_starts)
    assert len(set(SERIAL)) == len(SERIAL) and len(set(CLIENT)) == len(CLIENT)
    families = {name.split(":")[0] for name in SERIAL + CLIENT}
    assert families == {"app", "redis", "gateway", "client", "directory"}
    if seconds == 3600:  # an hour repeats them, a serial cycle every ten minutes at most
        assert 1 < len(schedule.serial_starts) <= 5 and len(schedule.client_starts) > len(schedule.serial_starts)


def test_the_verdict() -> None:
    good = {"grants_redeemed_twice": 0, "redemptions_lost": 0, "unexplained_5xx": 0, "fault_checks_failed": 0,
            "rss_growth_ratio": 1.02, "fd_growth_ratio": 1.1}  # fmt: skip
    assert failed(good) == []
    assert failed({**good, "grants_redeemed_twice": 1}) == ["grants_redeemed_twice = 1"]
    assert failed({**good, "rss_growth_ratio": 1.2}) == ["rss_growth_ratio = 1.2 > 1.1"]
    assert failed({**good, "fd_growth_ratio": None}) == ["fd_growth_ratio: no series long enough to say"]
