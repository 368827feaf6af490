"""The soak's judgement on made-up data (``make soak`` itself runs for an hour): whose answer a 5xx is, which fault
explains it, which grants were redeemed twice or lost, the growth of RSS and fds, the schedule, the verdict."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

import soak.faults
from soak.driver import Answer, Driver, redemption_outcome, shape_of
from soak.faults import BESIDE, CLIENT, SERIAL, Faults, Plan, plan
from soak.ledger import Failure, FaultWindow, Ledger, explain, growth, growth_results, percentile
from soak.report import MUST_BE_ZERO, build, failed, summary


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


def test_an_app_fault_explains_the_apps_own_500_503_and_the_gateways_502_504_never_a_gateway_500() -> None:
    app = [FaultWindow("app:error_burst", "app", 20.0, frozenset({"app"}), end=25.0)]
    redis = [FaultWindow("redis:stop", "redis", 20.0, frozenset({"redis"}), end=25.0)]
    expected = "app text activeplatform"
    assert explain(failure(21.0, 500, "app", "app", expected), app) == "app:error_burst"
    assert explain(failure(21.0, 503, "app", "app", expected), app) == "app:error_burst"
    assert explain(failure(21.0, 500, "text", "app", expected), app) is None  # the gateway's catch-all 500
    assert explain(failure(21.0, 500, "activeplatform", "app", expected), app) is None
    assert explain(failure(21.0, 503, "text", "app", expected), app) is None  # an app fault: no 503 of the gateway's
    assert explain(failure(21.0, 502, "text", "app", expected), app) == "app:error_burst"
    assert explain(failure(21.0, 504, "activeplatform", "app", expected), app) == "app:error_burst"
    assert explain(failure(21.0, 502, "app", "app", expected), app) is None  # the app never answers 502 itself
    assert explain(failure(21.0, 503, "app", "redis app", expected), redis) is None  # Redis makes no app answer
    assert explain(failure(21.0, 503, "text", "redis app", expected), redis) == "redis:stop"
    # garbage: every shape expected, app and Redis touched; still no 500 but the app's own
    garbage = "activeplatform text denovolab btcdirect problem scim app html other"
    assert explain(failure(21.0, 500, "text", "redis app", garbage), app + redis) is None
    assert explain(failure(21.0, 500, "other", "redis app", garbage), app + redis) is None
    cut = failure(21.0, None, None, "gw:B")
    gateway = [FaultWindow("gateway:sigterm", "gateway", 20.0, frozenset({"gw:B"}), end=25.0)]
    assert explain(cut, gateway) == "gateway:sigterm"
    cut.unexcused = "in flight at the SIGTERM"
    assert explain(cut, gateway) is None


def test_requests_in_flight_at_a_sigterm_that_failed_are_never_explained() -> None:
    ledger = Ledger(window_seconds=60)
    ledger.fault("gateway:sigterm", "gateway", 10.0, frozenset({"gw:B", "gw:any"})).end = 14.0
    ledger.drain(10.0, frozenset({"B", "nginx"}))
    for via, start, status in [("B", 9.0, None), ("nginx", 9.5, 502), ("B", 10.5, None), ("A", 9.0, None)]:
        ledger.request("pass.small", start, 11.0, status, "x", via=via, layers=frozenset({"gw:B", "gw:any", "app"}),
                       shapes=frozenset({"text", "nginx"}), shape="nginx" if status else None)  # fmt: skip
    ledger.request("pass.websocket", 9.0, 11.0, None, "error", via="B", layers=frozenset({"gw:B"}))
    cut = ledger.cut_by_drain(10.0, frozenset({"B", "nginx"}))
    assert [(f.via, f.start) for f in cut] == [("B", 9.0), ("nginx", 9.5)]
    results = ledger.failure_results()
    assert [f["via"] for f in results["unexplained_5xx"]] == ["nginx"]
    assert [f["via"] for f in results["unexplained_connection_errors"]] == ["B"]
    assert results["unexplained_connection_errors"][0]["unexcused"].startswith("in flight at the SIGTERM")
    # begun after the signal (B no longer listens), A's, a WebSocket (a drain closes it): the fault's
    assert results["connection_errors_by_cause"] == {"gateway": 3}


def test_a_session_step_without_an_answer_is_a_fault_s_or_a_defect() -> None:
    driver = Driver.__new__(Driver)
    driver.ledger = Ledger(window_seconds=60)
    driver.t0 = __import__("time").monotonic() - 50.0  # now: 50 s into the run
    assert Driver.live(Answer(502, {}), "s1") is None
    assert Driver.live(Answer(200, {"X-Soak-App": "1"}, b'{"sid": "s2"}'), "s1") is False
    assert Driver.live(Answer(200, {"X-Soak-App": "1"}, b'{"sid": "s1"}'), "s1") is True
    layers = frozenset({"redis", "app", "directory", "gw:A"})
    assert driver.disturbed(40.0, "after idle", layers) == "unexplained: after idle"
    assert driver.judge_live(False, 40.0, "first request", layers) == (
        "first request: the app answered outside the session"
    )
    driver.ledger.fault("app:slow", "app", 45.0, frozenset({"app"}))
    assert driver.disturbed(40.0, "after idle", layers) == "disturbed (after idle; app:slow)"
    assert driver.judge_live(False, 40.0, "x", layers) == "x: the app answered outside the session"  # no app fault
    assert driver.judge_live(True, 40.0, "x", layers) is None
    driver.ledger.fault("redis:restart_empty", "redis", 46.0, frozenset({"redis"}))
    assert driver.judge_live(False, 40.0, "x", layers).startswith("disturbed (x: ")


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


def test_a_redemption_is_judged_by_the_gateways_answer() -> None:
    app = {"X-Soak-App": "1", "X-Soak-Jti": "g1"}
    assert redemption_outcome(Answer(200, app), "g1") == "success"
    assert redemption_outcome(Answer(200, {**app, "X-Soak-Jti": "g2"}), "g1") == "wrong_jti"
    assert redemption_outcome(Answer(200, {**app, "X-Soak-Jti": "-"}), "g1") == "wrong_jti"  # no assertion at all
    # the gateway's own answer under 400 is a success whatever the app saw: the app's count decides if it was lost
    assert redemption_outcome(Answer(303, {"Location": "/"}), "g1") == "success"
    assert redemption_outcome(Answer(200, {"Content-Type": "text/html"}, b"<form method=post>"), "g1") == (
        "confirmation_page"
    )
    assert redemption_outcome(Answer(401, {}), "g1") == "refused"
    assert redemption_outcome(Answer(502, {}), "g1") == "502"
    assert redemption_outcome(Answer(None), "g1") == "error"


def test_a_redemption_is_lost_when_the_gateway_said_success_or_spent_it_and_the_app_never_saw_it() -> None:
    ledger = Ledger(window_seconds=60)
    names = ("seen", "unseen", "wrong", "spent", "spent-seen", "race", "retried-ok", "unanswered")
    for gid in names:
        ledger.minted(gid, "mint.native", 1.0)
    for gid, outcome, kind in [
        ("seen", "success", "redeem.link"),
        ("unseen", "success", "redeem.cookie"),  # a success the app never saw
        ("wrong", "wrong_jti", "redeem.header"),  # the app answered with another jti
        ("spent", "502", "redeem.link"), ("spent", "refused", "redeem.retry"),  # spent, never delivered
        ("spent-seen", "502", "redeem.link"), ("spent-seen", "refused", "redeem.retry"),  # the app read it: by design
        ("race", "502", "redeem.race"), ("race", "refused", "redeem.race"),  # a racer's refusal is no retry
        ("retried-ok", "504", "redeem.body"), ("retried-ok", "success", "redeem.retry"),
        ("unanswered", "error", "redeem.link"),
    ]:  # fmt: skip
        ledger.redeemed(gid, outcome, at=2.0, kind=kind, jti="other" if gid == "wrong" else "")
    seen = {"seen": 1, "wrong": 1, "spent-seen": 1, "retried-ok": 1}
    results = ledger.grant_results(seen)
    assert results["lost_why"] == {"spent": "spent_undelivered", "unseen": "unseen", "wrong": "wrong_jti"}
    assert results["wrong_jti"] == ["wrong"]
    assert results["retried_after_502_504"] == 4
    details = ledger.grant_details(["spent"], seen, {}, 0.0)
    assert details[0]["answers"] == [[2.0, "redeem.link", "502"], [2.0, "redeem.retry", "refused"]]


def test_readings_take_the_median_rss_and_the_fewest_fds_of_each_interval() -> None:
    ledger = Ledger(window_seconds=60)
    for at, rss, fds in [(1, 1024, 30), (3, 2048, 20), (5, 3072, 25), (11, 1024, 40)]:
        ledger.sample("A", at, rss, fds)
    assert ledger.readings(10)["A"] == [{"at": 10, "rss_mib": 2.0, "fds": 20}, {"at": 11, "rss_mib": 1.0, "fds": 40}]


def test_growth_is_the_last_reading_over_the_first_after_warmup() -> None:
    readings = [{"at": float(t), "rss_mib": 100.0 + t, "fds": 20.0} for t in range(0, 130, 10)]
    # 110 readings 20..120 after the warm-up: the median of 140, 150, 160 and of 200, 210, 220
    assert growth(readings, "rss_mib", warmup=20, min_span=20) == round(210 / 130, 3)
    assert growth(readings, "fds", warmup=20, min_span=20) == 1.0
    assert growth(readings, "rss_mib", warmup=100, min_span=30) is None  # 100..120: too short to say
    assert growth(readings[:5], "rss_mib", warmup=20, min_span=20) == round(140 / 120, 3)  # few: single readings
    assert growth([], "fds", warmup=0, min_span=0) is None


def test_a_steady_leak_is_not_hidden_and_one_noisy_reading_is_smoothed() -> None:
    # fds that come and go with the load (20..24) over a leak of one fd every other reading: it grows by 30 %
    leak = [{"at": float(t), "fds": 40.0 + t / 20 + (t % 30) / 5} for t in range(0, 1210, 10)]
    assert growth(leak, "fds", warmup=100, min_span=100) > 1.1
    spike = [{"at": float(t), "fds": 40.0} for t in range(0, 1210, 10)]
    spike[-2]["fds"] = 80.0  # one reading caught a burst of connections
    assert growth(spike, "fds", warmup=100, min_span=100) == 1.0


def test_every_series_long_enough_is_judged_restarted_ones_after_a_shorter_warmup() -> None:
    steady = [{"at": float(t), "rss_mib": 100.0, "fds": 20.0} for t in range(0, 1300, 10)]
    first_b = [{"at": float(t), "rss_mib": 100.0, "fds": 22.0} for t in range(0, 650, 10)]  # killed at 650 s
    short_b = [{"at": float(t), "rss_mib": 80.0 + t, "fds": 20.0} for t in range(650, 700, 10)]
    leaking_b = [  # ten minutes
        {"at": float(t), "rss_mib": 100.0 + (t - 700) / 20, "fds": 20.0} for t in range(700, 1310, 10)
    ]
    readings = {"A": steady, "B": first_b, "B#2": short_b, "B#3": leaking_b}
    results = growth_results(readings, warmup=600, min_span=480, restart_warmup=120)
    assert results["judged_series"] == ["A", "B#3"]  # B ran 50 s past the warm-up, B#2 50 s in all: too short
    assert results["rss_growth_ratio"] == results["growth_by_series"]["B#3"]["rss"] > 1.1  # B#3's leak counts
    assert results["fd_growth_ratio"] == 1.0


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
    good = {key: 0 for key in MUST_BE_ZERO} | {"rss_growth_ratio": 1.02, "fd_growth_ratio": 1.1}
    assert failed(good) == []
    for key in MUST_BE_ZERO:
        assert failed({**good, key: 2}) == [f"{key} = 2"]
    assert failed({**good, "rss_growth_ratio": 1.2}) == ["rss_growth_ratio = 1.2 > 1.1"]
    assert failed({**good, "fd_growth_ratio": None}) == ["fd_growth_ratio: no series long enough to say"]


def test_the_results_hold_every_must_be_zero_key_and_count_what_went_wrong() -> None:
    ledger = Ledger(window_seconds=60)
    ledger.minted("lost", "mint.native", 1.0)
    ledger.redeemed("lost", "success")
    ledger.minted("revoked", "mint.native", 1.0, expect_refusal="revoked")
    ledger.redeemed("revoked", "success")
    ledger.minted("wrong", "mint.native", 1.0)
    ledger.redeemed("wrong", "wrong_jti", jti="x")
    ledger.request("pass.small", 30.0, 30.1, 500, "5xx", via="A", layers=frozenset({"app"}),
                   shapes=frozenset({"app", "text"}), shape="text")  # fmt: skip
    ledger.request("pass.small", 31.0, 31.1, None, "error", via="A", layers=frozenset({"app"}))
    ledger.session_defects.append({"flavor": "idle", "at": 5.0, "until": 17.0, "verdict": "live after idle limit"})
    ledger.checks.append({"fault": "app:slow", "at": 20.0, "ok": False, "expected": "504", "observed": "200"})
    for at in range(0, 200, 10):
        ledger.sample("A", float(at), 100 * 1024, 20)
    app = {"jtis": {"revoked": 1, "wrong": 1}, "dupes": {}, "stats": {}, "t0_wall": 0.0}
    logs = {"gateway-A.out.log": {"count": 3, "by_kind": {"unhandled_error KeyError at x": 3}, "first": []}}
    meta = {"duration_seconds": 200.0, "started_at": "2026-01-01T00:00:00Z"}
    results = build(ledger, app, meta, interval=10.0, warmup=20.0, log_problems=logs)
    assert {key: results[key] for key in MUST_BE_ZERO} == {
        "grants_redeemed_twice": 0, "redemptions_lost": 2, "wrong_jti": 1,
        "redeemed_though_revoked_or_deactivated": 1, "unexplained_5xx": 1, "unexplained_connection_errors": 1,
        "session_defects": 1, "gateway_log_errors": 3, "fault_checks_failed": 1,
    }  # fmt: skip
    assert results["grants"]["lost"] == {"lost": "unseen", "wrong": "wrong_jti"}
    assert results["rss_growth_ratio"] == 1.0 and results["growth_judged_series"] == ["A"]
    assert len(failed(results)) == 8
    text = summary(results)
    assert "FAIL" in text and "live after idle limit" in text and "lost unseen" in text
    json.dumps(results)


async def test_the_lanes_play_one_fault_at_a_time_slow_loris_headers_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client fault played while an app fault refused connections judged the refusal: the lanes take turns."""
    started = time.monotonic()

    class Clock:
        def now(self) -> float:
            return time.monotonic() - started

    spans: list[tuple[float, float, str]] = []
    faults = Faults(Clock(), None, None, Plan(0.0, 0.0, (0.0,), (0.01,), 0.0))  # type: ignore[arg-type]

    async def play(name: str) -> None:
        began = faults.now()
        await asyncio.sleep(0.05)
        spans.append((began, faults.now(), name))

    monkeypatch.setattr(faults, "play", play)
    monkeypatch.setattr(soak.faults, "nominal", lambda name: 0.0)
    await asyncio.gather(faults.serial_lane(), faults.client_lane())
    played = sorted(s for s in spans if s[2] not in BESIDE)
    assert {name for _, _, name in played} == {*SERIAL, *CLIENT} - BESIDE
    assert all(one[1] <= other[0] for one, other in itertools.pairwise(played)), played
