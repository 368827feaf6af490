"""What a soak run leaves: ``soak-results.json`` (a check reads its keys), ``soak-results.txt`` (the summary it also
prints) and the plots in ``docs/soak/`` (throughput, p99, RSS and fds over time, the faults shaded)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .ledger import Ledger, growth_results

GROWTH_LIMIT = 1.1
MUST_BE_ZERO = (
    "grants_redeemed_twice",
    "redemptions_lost",
    "wrong_jti",
    "redeemed_though_revoked_or_deactivated",
    "unexplained_5xx",
    "unexplained_connection_errors",
    "session_defects",
    "gateway_log_errors",
    "fault_checks_failed",
)


def min_spans(readings: dict[str, list[dict[str, float]]], interval: float, warmup: float) -> tuple[float, float]:
    """How long a series must go on after its warm-up to be judged, and a restarted process's warm-up: an
    incarnation of B that lived ten minutes (two readings' warm-up, then eight) is judged, as A always is; in a
    short run, a series covering 40 % of the run after the warm-up."""
    restart_warmup = min(warmup, 2 * interval)
    span = max((r[-1]["at"] for r in readings.values() if r), default=0.0) - warmup
    return min(600.0 - restart_warmup, max(2 * interval, 0.4 * span)), restart_warmup


def build(
    ledger: Ledger,
    app: dict[str, Any],
    meta: dict[str, Any],
    interval: float,
    warmup: float,
    log_problems: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The results: the must-be-zero counts and growth ratios first, then everything they come from. ``app`` is
    what the app says it saw: ``jtis`` (counts), ``dupes`` (arrivals of those seen twice), ``stats``, ``t0_wall``;
    ``log_problems`` the error lines of the gateways' logs (:func:`soak.__main__.log_problems`)."""
    seen = app["jtis"]
    grants = ledger.grant_results(seen)
    wrongly = grants["redeemed_though_refusal_expected"]
    ids = list(dict.fromkeys(grants["redeemed_twice"] + grants["lost"] + grants["wrong_jti"] + wrongly))
    details = ledger.grant_details(ids, seen, app["dupes"], app["t0_wall"])
    for detail in details:
        detail["lost"] = grants["lost_why"].get(detail["id"])
    failures = ledger.failure_results()
    readings = ledger.readings(interval)
    min_span, restart_warmup = min_spans(readings, interval, warmup)
    growth = growth_results(readings, warmup, min_span=min_span, restart_warmup=restart_warmup)
    requests = {kind: dict(sorted(c.items())) for kind, c in sorted(ledger.outcomes.items())}
    failed_checks = [c for c in ledger.checks if not c["ok"]]
    log_problems = log_problems or {}
    return {
        "grants_redeemed_twice": len(grants["redeemed_twice"]),
        "redemptions_lost": len(grants["lost"]),
        "wrong_jti": len(grants["wrong_jti"]),
        "redeemed_though_revoked_or_deactivated": len(wrongly),
        "unexplained_5xx": len(failures["unexplained_5xx"]),
        "unexplained_connection_errors": len(failures["unexplained_connection_errors"]),
        "session_defects": len(ledger.session_defects),
        "gateway_log_errors": sum(p["count"] for p in log_problems.values()),
        "fault_checks_failed": len(failed_checks),
        "rss_growth_ratio": growth["rss_growth_ratio"],
        "fd_growth_ratio": growth["fd_growth_ratio"],
        **meta,
        "requests_total": sum(sum(c.values()) for c in ledger.outcomes.values()),
        "requests_by_kind": requests,
        "grants": {
            "minted": grants["minted"],
            "redeemed": grants["redeemed"],
            "refused": grants["refused"],
            "failed_only": grants["failed_only"],
            "never_presented": grants["never_presented"],
            "seen_by_app": grants["seen_by_app"],
            "redeemed_twice": grants["redeemed_twice"],
            "lost": grants["lost_why"],
            "wrong_jti": grants["wrong_jti"],
            "retried_after_502_504": grants["retried_after_502_504"],
            "redeemed_though_revoked_or_deactivated": wrongly,
            "twice_or_lost_details": details[:100],
        },
        "fivexx_by_cause": failures["fivexx_by_cause"],
        "unexplained_5xx_details": failures["unexplained_5xx"][:200],
        "connection_errors_by_cause": failures["connection_errors_by_cause"],
        "unexplained_connection_error_details": failures["unexplained_connection_errors"][:200],
        "latency_window_seconds": ledger.window_seconds,
        "latency_windows": ledger.latency_windows(),
        "redis_faults": ledger.redis_faults,
        "faults": [
            {"fault": f.name, "start": round(f.start, 1), "end": None if f.end is None else round(f.end, 1)}
            for f in ledger.faults
        ],
        "fault_checks": ledger.checks,
        "sessions": dict(sorted(ledger.sessions.items())),
        "session_defect_details": ledger.session_defects[:200],
        "reading_interval_seconds": interval,
        "warmup_seconds": warmup,
        "growth_by_series": growth["growth_by_series"],
        "growth_judged_series": growth["judged_series"],
        "growth_min_span_seconds": round(min_span, 1),
        "growth_restart_warmup_seconds": restart_warmup,
        "readings": readings,
        "app": app["stats"],
        "gateway_log_problems": log_problems,
        "notes": ledger.notes,
    }


def failed(results: dict[str, Any]) -> list[str]:
    """Why the run fails (empty when it passes)."""
    reasons = [f"{key} = {results[key]}" for key in MUST_BE_ZERO if results.get(key)]
    for key in ("rss_growth_ratio", "fd_growth_ratio"):
        value = results.get(key)
        if value is None:
            reasons.append(f"{key}: no series long enough to say")
        elif value > GROWTH_LIMIT:
            reasons.append(f"{key} = {value} > {GROWTH_LIMIT}")
    return reasons


def summary(results: dict[str, Any]) -> str:
    g = results["grants"]
    lines = [
        f"soak: {results['duration_seconds']:.0f} s from {results['started_at']}, {results['requests_total']} requests",
        f"grants: {g['minted']} minted, {g['redeemed']} redeemed, {g['refused']} refused, "
        f"{g['retried_after_502_504']} retried after a 502/504; "
        f"redeemed twice {results['grants_redeemed_twice']}, lost {results['redemptions_lost']}, "
        f"wrong jti {results['wrong_jti']}, "
        f"redeemed though revoked/deactivated {results['redeemed_though_revoked_or_deactivated']}",
        f"5xx by cause: {results['fivexx_by_cause']}; unexplained 5xx: {results['unexplained_5xx']}",
        f"connection errors by cause: {results['connection_errors_by_cause']}; "
        f"unexplained: {results['unexplained_connection_errors']}",
        f"growth (last / after warm-up, worst process): RSS {results['rss_growth_ratio']}, "
        f"fds {results['fd_growth_ratio']}",
    ]
    for fault in results["redis_faults"]:
        lines.append(
            f"redis {fault['fault']} at {fault['at']} s: 503 after {fault['time_to_503']} s, "
            f"recovered after {fault['time_to_recovery']} s"
        )
    checks = results["fault_checks"]
    lines.append(f"fault checks: {sum(c['ok'] for c in checks)} of {len(checks)} ok")
    lines += [
        f"  FAILED {c['fault']} at {c['at']} s: expected {c['expected']}; saw {c['observed']}"
        for c in checks
        if not c["ok"]
    ]
    for detail in g["twice_or_lost_details"][:10]:
        lines.append(
            f"  grant {detail['id']} ({detail['kind']}): lost {detail.get('lost')}, app saw {detail['app_saw']}, "
            f"answers {detail['answers']}"
        )
    for failure in results["unexplained_5xx_details"][:10] + results["unexplained_connection_error_details"][:10]:
        lines.append(
            f"  unexplained {failure['status'] or 'no answer'} {failure['kind']} via {failure['via']} at "
            f"{failure['at']} s ({failure['shape']}): {failure['detail'][:100]!r}"
            + (f" [{failure['unexcused']}]" if failure.get("unexcused") else "")
        )
    s = results["sessions"]
    lines.append(
        f"sessions: {s.get('started', 0)} started; ended on time {s.get('ended_on_time', 0)} "
        f"(late {s.get('ended_late', 0)}); refused after revocation {s.get('refused_after_revocation', 0)} "
        f"(live after {s.get('live_after_revocation', 0)}); read-only refusals {s.get('read_only_refusals', 0)} "
        f"(leaks {s.get('read_only_leaks', 0)}); defects {results['session_defects']}"
    )
    lines += [f"  session defect: {d}" for d in results["session_defect_details"][:10]]
    kinds = Counter({k: sum(v.values()) for k, v in results["requests_by_kind"].items()})
    lines.append("requests: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    problems = results.get("gateway_log_problems", {})
    lines.append(
        f"gateway logs ({results.get('logs', '?')}): "
        + ("; ".join(f"{name}: {p['count']} error lines" for name, p in problems.items()) or "no error lines")
    )
    for name, p in problems.items():
        lines += [f"  {name}: {n} x {kind}" for kind, n in list(p["by_kind"].items())[:5]]
    reasons = failed(results)
    lines.append("RESULT: " + ("pass" if not reasons else "FAIL: " + "; ".join(reasons)))
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], root: Path) -> None:
    (root / "soak-results.json").write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    (root / "soak-results.txt").write_text(summary(results))


def plots(results: dict[str, Any], ledger: Ledger, folder: Path) -> list[Path]:
    """throughput.png, p99.png, rss.png and fds.png in ``folder``; the faults' windows shaded in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def shade(ax: Any) -> None:
        for fault in results["faults"]:
            end = fault["end"] if fault["end"] is not None else fault["start"] + 1
            color = {"app": "tab:orange", "redis": "tab:red", "gateway": "tab:purple"}.get(
                fault["fault"].split(":")[0], "tab:gray"
            )
            ax.axvspan(fault["start"], end, color=color, alpha=0.12, lw=0)

    def save(fig: Any, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    # throughput: requests per second, per family of kinds
    series: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for (bucket, kind), count in ledger.throughput.items():
        series[kind.split(".")[0]][bucket] += count
    fig, ax = plt.subplots(figsize=(10, 4))
    for family, buckets in sorted(series.items()):
        xs = sorted(buckets)
        ax.plot(
            [x * ledger.bucket_seconds for x in xs],
            [buckets[x] / ledger.bucket_seconds for x in xs],
            label=family,
            lw=1,
        )
    shade(ax)
    ax.set(xlabel="seconds into the run", ylabel="requests/s", title="Throughput by kind (faults shaded)")
    ax.legend(fontsize=7, ncol=4)
    save(fig, "throughput.png")

    # p99 per kind per window
    fig, ax = plt.subplots(figsize=(10, 4))
    by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for window in results["latency_windows"]:
        for kind, figures in window["kinds"].items():
            by_kind[kind].append(((window["start"] + window["end"]) / 2, figures["p99_ms"]))
    for kind, points in sorted(by_kind.items()):
        if kind.startswith(("probe", "garbage")):
            continue
        ax.plot(*zip(*points, strict=True), marker=".", lw=1, label=kind)
    shade(ax)
    ax.set(xlabel="seconds into the run", ylabel="p99 (ms)", title="p99 latency per kind per window", yscale="log")
    ax.legend(fontsize=6, ncol=4)
    save(fig, "p99.png")

    for key, name, label in (("rss_mib", "rss.png", "RSS (MiB)"), ("fds", "fds.png", "open fds")):
        fig, ax = plt.subplots(figsize=(10, 4))
        for series_name, readings in sorted(results["readings"].items()):
            ax.plot(
                [r["at"] for r in readings],
                [r[key] for r in readings],
                marker=".",
                lw=1,
                label=f"gateway {series_name}",
            )
        shade(ax)
        ax.axvline(results["warmup_seconds"], color="k", ls=":", lw=1)
        ax.set(
            xlabel="seconds into the run",
            ylabel=label,
            title=f"{label} of each gateway process (a restart: a new series)",
        )
        ax.legend(fontsize=7)
        save(fig, name)
    return written
