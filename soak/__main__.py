"""``python -m soak`` (``make soak``): start the processes, run the traffic and the faults for ``SOAK_SECONDS``
(default 3600), stop everything, write the results; exit 1 when a must-be-zero count is not, or memory or fds
grew by more than 10 %.

``SOAK_RATE`` (default 1) multiplies every lane's rate; ``SOAK_SEED`` (default 17) seeds the traffic's choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .cluster import ROOT, Cluster, ClusterError, Settings, open_fds, rss_kib
from .driver import Driver, Rates
from .faults import Faults, plan
from .ledger import Ledger
from .report import build, failed, plots, summary, write


async def sample(driver: Driver, cluster: Cluster, ledger: Ledger, every: float) -> None:
    """RSS and open fds of each gateway process, every ``every`` seconds, into that incarnation's series."""
    while not driver.stopping.is_set():
        for gateway in cluster.gateways.values():
            if gateway.child is None or not gateway.child.alive():
                continue
            rss, fds = rss_kib(gateway.child.pid), open_fds(gateway.child.pid)
            if rss is not None and fds is not None:
                ledger.sample(gateway.series, driver.now(), rss, fds)
        await driver.sleep(every)


async def run(cluster: Cluster, seconds: float, rates: Rates, seed: int) -> tuple[Ledger, dict[str, Any]]:
    schedule = plan(seconds)
    window = min(600.0, seconds / 6)
    interval = 60.0 if seconds >= 1200 else 10.0
    ledger = Ledger(window_seconds=window, bucket_seconds=interval)
    t0 = time.monotonic()
    async with Driver(cluster, ledger, t0, seed, rates) as driver:
        faults = Faults(driver, cluster, ledger, schedule)
        for lane in driver.lanes():
            driver.spawn(lane)
        sampler = asyncio.ensure_future(sample(driver, cluster, ledger, interval / 20))
        lanes = asyncio.gather(faults.serial_lane(), faults.client_lane())
        await asyncio.sleep(seconds)
        if not lanes.done():  # a short run goes on until its first cycle of faults is over
            print("soak: the faults' cycle is not over yet: running on until it is", flush=True)
        await lanes
        await driver.sleep(schedule.tail / 2)  # the last readings under the ordinary load
        duration = driver.now()
        await driver.shutdown()
        await sampler
        await asyncio.sleep(cluster.settings.session_idle)  # redemptions in flight reach the app, sessions expire
        app = await driver.control("GET", "/seen")
        app["stats"] = await driver.control("GET", "/stats")
        app["t0_wall"] = time.time() - driver.now()
    meta = {"duration_seconds": round(duration, 1), "interval": interval, "warmup": schedule.warmup, "app": app}
    return ledger, meta


def log_problems(logs: Path) -> dict[str, dict[str, Any]]:
    """Error-level lines, ``unhandled_error`` and tracebacks in the gateways' logs (every incarnation's stdout and
    stderr), per file: their count, by event and error, and the first few. No injected fault excuses one: an app
    that fails, Redis gone, a client that goes are each a warning of their own (``upstream_broke_answer``,
    ``store_unavailable``...), so an error line is the gateway not expecting what happened."""
    problems: dict[str, dict[str, Any]] = {}
    pattern = re.compile(r'Traceback|"level": ?"(error|critical|exception)"|unhandled_error|"unexpected')
    for path in sorted(logs.glob("gateway-*.log")):
        found = [line for line in path.read_text(errors="replace").splitlines() if pattern.search(line)]
        if not found:
            continue
        kinds: Counter[str] = Counter()
        for line in found:
            try:
                entry = json.loads(line)
                kinds[f"{entry.get('event')} {entry.get('error', '')} at {str(entry.get('at', ''))[:100]}"] += 1
            except ValueError:
                kinds[line[:120]] += 1
        problems[path.name] = {"count": len(found), "by_kind": dict(kinds.most_common()), "first": found[:3]}
    return problems


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "3600"))
    rates = Rates().scaled(float(os.environ.get("SOAK_RATE", "1")))
    seed = int(os.environ.get("SOAK_SEED", "17"))
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"soak: {seconds:.0f} s; processes' logs in {folder / 'logs'}", flush=True)

    def terminate(signum: int, frame: Any) -> None:
        # SIGTERM and Ctrl-C (SIGINT) alike: out of whatever runs, every process stopped. SIGINT gets this handler
        # too rather than asyncio.run's own, which only cancels the main task (the lanes' tasks, the faults' threads
        # and the final waits went on: the run did not stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the cleaning up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    cluster = Cluster(folder, Settings())
    try:
        cluster.start()
        print(
            f"soak: started: gateways A :{cluster.gateways['A'].port}, B :{cluster.gateways['B'].port}, "
            f"nginx :{cluster.nginx_port}, app :{cluster.app_port}, sentinels {cluster.sentinel_ports}",
            flush=True,
        )
        ledger, meta = asyncio.run(run(cluster, seconds, rates, seed))
    except ClusterError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            cluster.stop()
    head = {"duration_seconds": meta["duration_seconds"], "soak_seconds": seconds, "started_at": started_at}
    head["logs"] = str(folder / "logs")
    results = build(ledger, meta["app"], head, meta["interval"], meta["warmup"], log_problems(folder / "logs"))
    write(results, ROOT)
    for path in plots(results, ledger, ROOT / "docs" / "soak"):
        print(f"soak: wrote {path.relative_to(ROOT)}")
    print(summary(results), end="")
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
