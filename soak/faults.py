"""The faults, on a schedule scaled to the run, and the check of each one's outcome.

Two lanes run beside the traffic. The **serial lane** plays the faults that make 5xx — the app's, Redis's, the
gateway processes' — one after another, so that each 5xx has one fault to answer for it; the **client lane**
plays the clients' faults (disconnects, slow-loris), which must make none. A cycle of each lane plays every one
of its faults once; a run plays as many cycles as fit between the warm-up and a quiet tail, at least one (a short
run gets shorter faults; it runs on until its first cycle is over).

Every fault is a window in the ledger (what it touches, from when to when) and a check (``ok``, what was
expected, what was seen); every Redis fault also gets its time to the first 503 and to recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .cluster import Cluster, listening
from .driver import CONFIRM, FORM, MANAGER, Answer, Driver, redemption_outcome, shape_of
from .ledger import Ledger

SERIAL = (
    "app:slow",
    "app:reset",
    "redis:stop",
    "app:half_close",
    "app:refuse",
    "gateway:sigkill",
    "app:error_burst",
    "app:body_stall",
    "redis:kill_primary",
    "directory:load",
    "gateway:sigterm",
    "redis:restart_empty",
)
CLIENT = ("client:slowloris_headers", "client:disconnect_upload", "client:slowloris_body", "client:disconnect_answer")
BESIDE = frozenset({"client:slowloris_headers"})  # lasts the gateway's keepalive_seconds: played beside the others
NO_FAULT = b"X-Soak-No-Fault: 1\r\n"  # the client faults' requests are spared the app's faults
NOMINAL_SECONDS = {
    "app": 7.0,
    "redis:stop": 8.0,
    "redis:kill_primary": 25.0,
    "redis:restart_empty": 10.0,
    "gateway": 8.0,
    "directory": 4.0,
    "client": 12.0,
}


def nominal(name: str) -> float:
    return NOMINAL_SECONDS.get(name, NOMINAL_SECONDS.get(name.split(":")[0], 8.0))


@dataclass(frozen=True)
class Plan:
    """When each lane's cycles start, and how long an app fault lasts."""

    warmup: float
    tail: float
    serial_starts: tuple[float, ...]
    client_starts: tuple[float, ...]
    app_fault_seconds: float


def plan(seconds: float) -> Plan:
    """The schedule for a run of ``seconds``: a warm-up of min(600, seconds/6) without faults (the reading of RSS
    and fds after it is the base of their growth), a quiet tail, and between them as many cycles of each lane as
    fit (at least one; at most one serial cycle per ten minutes, one client cycle per five), evenly spread."""
    warmup = min(600.0, max(15.0, seconds / 6))
    tail = min(120.0, max(10.0, seconds / 12))
    span = max(0.0, seconds - warmup - tail)
    app_fault = 3.0 if seconds < 600 else 6.0
    serial_cycle = sum(nominal(n) for n in SERIAL) + (app_fault - 3.0) * 6
    client_cycle = sum(nominal(n) for n in CLIENT)
    # mostly steady load: a cycle of the serial lane every ten minutes at most, of the client lane every five
    serial = max(1, min(int(span // serial_cycle), int(span // 600)))
    clients = max(1, min(int(span // client_cycle), int(span // 300)))
    return Plan(
        warmup,
        tail,
        tuple(round(warmup + i * span / serial, 1) for i in range(serial)),
        tuple(round(warmup + i * span / clients, 1) for i in range(clients)),
        app_fault,
    )


class Faults:
    def __init__(self, driver: Driver, cluster: Cluster, ledger: Ledger, plan: Plan) -> None:
        self.driver = driver
        self.cluster = cluster
        self.ledger = ledger
        self.plan = plan
        # One fault at a time across the lanes (slow-loris headers aside, which reach no app): a client fault played
        # while the app refused connections judged the refusal (the hour's run had two such failed checks).
        self.one_at_a_time = asyncio.Lock()

    def now(self) -> float:
        return self.driver.now()

    def check(self, fault: str, at: float, ok: bool, expected: str, observed: str) -> None:
        self.ledger.checks.append(
            {"fault": fault, "at": round(at, 1), "ok": ok, "expected": expected, "observed": observed}
        )
        print(f"soak: {self.now():7.1f} s  {'ok  ' if ok else 'FAIL'} {fault}: {observed}", flush=True)

    async def serial_lane(self) -> None:
        await self._lane(self.plan.serial_starts, SERIAL)

    async def client_lane(self) -> None:
        await self._lane(self.plan.client_starts, CLIENT)

    async def _lane(self, starts: tuple[float, ...], names: tuple[str, ...]) -> None:
        for start in starts:
            await asyncio.sleep(max(0.0, start - self.now()))
            span = (starts[1] - starts[0]) if len(starts) > 1 else sum(nominal(n) for n in names)
            gap = max(0.0, (span - sum(nominal(n) for n in names)) / len(names))
            beside: list[asyncio.Future[None]] = []
            for name in names:
                if name in BESIDE:
                    beside.append(asyncio.ensure_future(self._played(name)))
                    continue
                async with self.one_at_a_time:
                    began = self.now()
                    try:
                        await self.play(name)
                    except Exception as exc:  # a fault that cannot be played is a failed check, not a dead run
                        self.check(name, began, False, "the fault played", f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(max(1.0, began + nominal(name) + gap - self.now()))
            await asyncio.gather(*beside)

    async def _played(self, name: str) -> None:
        began = self.now()
        try:
            await self.play(name)
        except Exception as exc:
            self.check(name, began, False, "the fault played", f"{type(exc).__name__}: {exc}")

    async def play(self, name: str) -> None:
        family, _, what = name.partition(":")
        plays: dict[str, Callable[[str], Awaitable[None]]] = {
            "app": self.app_fault,
            "redis": self.redis_fault,
            "gateway": self.gateway_fault,
            "client": self.client_fault,
            "directory": self.directory_reload,
        }
        await plays[family](what)

    # -- the app -------------------------------------------------------------------------------------------------
    async def app_fault(self, what: str) -> None:
        s = self.cluster.settings
        seconds = self.plan.app_fault_seconds
        param = s.read_timeout + 2.0 if what in ("slow", "body_stall") else 0.0
        name = f"app:{what}"
        start = self.now()
        window = self.ledger.fault(name, "app", start, frozenset({"app"}))
        grant = await self._mint_for_probe() if what == "refuse" else None
        await self.driver.control("POST", "/fault", {"name": what, "seconds": seconds, "param": param})
        await asyncio.sleep(0.5)  # the gateway's pool has seen the app's connections close
        if grant is not None:
            gid, link = grant
            first = await self._probe("POST", link, data=CONFIRM, headers=FORM)
            await asyncio.sleep(max(0.0, start + seconds + 0.5 - self.now()))
            again = await self._probe("POST", link, data=CONFIRM, headers=FORM)
            window.end = self.now()
            self.ledger.minted(gid, "probe.refuse", start)
            for kind, answer in (("probe.refuse", first), ("redeem.retry", again)):
                outcome = redemption_outcome(answer, gid) if answer.status is not None else "error"
                self.ledger.redeemed(gid, outcome, at=self.now(), kind=kind, jti=answer.headers.get("X-Soak-Jti", ""))
            ok = (
                first.status == 502
                and shape_of(502, first.headers, first.body) == "activeplatform"
                and (again.headers.get("X-Soak-Jti") == gid)
            )
            self.check(
                name,
                start,
                ok,
                "502 in the dialect's shape, then the same grant redeems once the app is back",
                f"{first.status} then {again.status} (app saw jti: {again.headers.get('X-Soak-Jti') == gid})",
            )
            return
        began = self.now()
        answer = await self._probe("GET", "/small")
        took = self.now() - began
        await asyncio.sleep(max(0.0, start + seconds - self.now()))
        window.end = self.now() + param  # a request let in at the last moment plays the fault for param seconds
        expected, ok = {
            "slow": (
                f"504 within the read timeout ({s.read_timeout:g} s) + 1.5 s",
                answer.status == 504 and took <= s.read_timeout + 1.5,
            ),
            "reset": ("502, or an answer cut short", answer.status == 502 or "Payload" in answer.error),
            "half_close": ("502 within 2 s", answer.status == 502 and took <= 2.0),
            "error_burst": (
                "the app's own 500/503, relayed",
                answer.status in (500, 503) and "X-Soak-App" in answer.headers,
            ),
            "body_stall": (
                "the answer cut within the read timeout + 2 s",
                answer.status == 200 and bool(answer.error) and took <= s.read_timeout + 2.0,
            ),
        }[what]
        self.check(name, start, ok, expected, f"{answer.status} after {took:.2f} s {answer.error[:80]}".strip())

    async def _mint_for_probe(self) -> tuple[str, str]:
        from gateway.core import grant_id

        gateway = self.cluster.gateways["A"]
        assert self.driver.http is not None
        async with self.driver.http.post(
            gateway.url + "/v1/grants",
            json={"app": "control-panel", "subject": "505"},
            headers={"Authorization": f"Bearer {MANAGER}"},
        ) as response:
            data = await response.json()
        parts = urlsplit(data["login_url"])
        return grant_id(data["token"]), f"{parts.path}?{parts.query}"

    async def _probe(self, method: str, path: str, **kwargs: Any) -> Answer:
        """A request to gateway A, read to its end; a broken body is in ``error``, with the status kept."""
        assert self.driver.http is not None
        url = self.cluster.gateways["A"].url + path
        status: int | None = None
        headers: dict[str, str] = {}
        try:
            async with self.driver.http.request(
                method, url, timeout=aiohttp.ClientTimeout(total=30), allow_redirects=False, **kwargs
            ) as response:
                status, headers = response.status, dict(response.headers)
                body = await response.read()
                return Answer(status, headers, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Answer(status, headers, error=f"{type(exc).__name__}: {exc}")

    # -- Redis ---------------------------------------------------------------------------------------------------
    async def redis_fault(self, what: str) -> None:
        name = f"redis:{what}"
        primary = self.cluster.primary()
        start = self.now()
        window = self.ledger.fault(name, "redis", start, frozenset({"redis"}))
        outage: dict[str, float | None] = {"first_503": None, "recovered": None, "failed": None}
        done = asyncio.Event()
        prober = asyncio.ensure_future(self._probe_mints(start, outage, done))
        assert primary.child is not None
        failover = False
        if what == "stop":
            primary.child.send(signal.SIGSTOP)
            try:
                await asyncio.sleep(3.0)
            finally:  # even when the run is interrupted meanwhile: a stopped Redis acts on no signal but SIGKILL
                primary.child.send(signal.SIGCONT)
        elif what == "kill_primary":
            primary.child.send(signal.SIGKILL)
            await asyncio.to_thread(primary.child.proc.wait)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and await asyncio.to_thread(self._primary_port) == primary.port:
                await asyncio.sleep(0.2)
            new = self.cluster.primary()
            failover = new is not primary
            # the old primary comes back as a replica of the new one (as itself if no failover happened)
            primary.launch(self.cluster.logs, replica_of=new.port if failover else None)
            await self._until(primary.answers, 30)
        else:  # restart_empty: no persistence, so it comes back with nothing; the replica follows it
            primary.child.send(signal.SIGKILL)
            await asyncio.to_thread(primary.child.proc.wait)
            primary.launch(self.cluster.logs)
            await self._until(primary.answers, 30)
        await self._until(lambda: outage["recovered"] is not None, 60)
        done.set()
        await prober
        window.end = self.now()
        await self._until(self.cluster.replica_in_sync, 60)
        to_503 = None if outage["first_503"] is None else round(outage["first_503"] - start, 2)
        to_recovery = None if outage["recovered"] is None else round(outage["recovered"] - start, 2)
        self.ledger.redis_faults.append(
            {"fault": what, "at": round(start, 1), "time_to_503": to_503, "time_to_recovery": to_recovery}
        )
        bound = {"stop": 3.0 + 3.0, "kill_primary": 30.0, "restart_empty": 15.0}[what]
        ok = to_recovery is not None and to_recovery <= bound and (failover or what != "kill_primary")
        if what == "stop":
            ok = ok and to_503 is not None and to_503 <= 2.5 and self.cluster.primary() is primary
        observed = f"503 after {to_503} s, recovered after {to_recovery} s" + (
            f", failover {'done' if failover else 'NOT done'}" if what == "kill_primary" else ""
        )
        self.check(name, start, ok, f"503s (stop: within 2.5 s), then recovery within {bound:g} s", observed)

    def _primary_port(self) -> int | None:
        with contextlib.suppress(Exception):
            return self.cluster.primary().port
        return None

    async def _probe_mints(self, start: float, outage: dict[str, float | None], done: asyncio.Event) -> None:
        """Native mints on gateway A every 0.1 s: the first 503, and the first success after a failure."""
        target = self.driver.target("A")
        body = json.dumps({"app": "control-panel", "subject": "505"})
        headers = {"Authorization": f"Bearer {MANAGER}", "Content-Type": "application/json"}
        while not done.is_set():
            answer = await self.driver.call(
                "probe.mint",
                "POST",
                target,
                "/v1/grants",
                data=body,
                headers=headers,
                layers=["redis"],
                shapes=["problem"],
                timeout=5,
            )
            if answer.status == 503 and outage["first_503"] is None:
                outage["first_503"] = self.now()
            if answer.status != 201 and outage["failed"] is None:
                outage["failed"] = self.now()
            if answer.status == 201 and outage["failed"] is not None and outage["recovered"] is None:
                outage["recovered"] = self.now()
            if answer.status == 201 and outage["failed"] is None and self.now() - start > 8:
                outage["recovered"] = start  # no outage seen at all
            await asyncio.sleep(0.1)

    async def _until(self, check: Callable[[], Any], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if check():
                    return True
            await asyncio.sleep(0.1)
        return False

    # -- the gateway processes -----------------------------------------------------------------------------------
    async def gateway_fault(self, what: str) -> None:
        name = f"gateway:{what}"
        gateway = self.cluster.gateways["B"]
        assert gateway.child is not None
        start = self.now()
        window = self.ledger.fault(name, "gateway", start, frozenset({"gw:B", "gw:any"}))
        child = gateway.child
        if what == "sigterm":  # what is in flight through B, or through nginx (it may be on B), must finish
            self.ledger.drain(start, frozenset({"B", "nginx"}))
        child.send(signal.SIGKILL if what == "sigkill" else signal.SIGTERM)
        code = await asyncio.to_thread(child.proc.wait)
        exited = self.now() - start
        await asyncio.sleep(1.0)
        self.cluster.start_gateway("B")
        ready = await self._until(lambda: listening(gateway.port), 60)
        if ready:
            ready = await self._until_ready(gateway.url)
        window.end = self.now()
        drain = self.cluster.settings.drain_seconds
        if what == "sigkill":
            self.check(
                name,
                start,
                ready,
                "B back and ready after a restart",
                f"exit {code}, ready again {self.now() - start:.1f} s after the kill",
            )
            return
        # every request in flight at the signal through B or nginx that got a 5xx or no answer (the verdict counts
        # them as unexplained too: the fault's window does not excuse them); those still running are waited for
        await asyncio.sleep(max(0.0, start + drain + 1.0 - self.now()))
        cut = self.ledger.cut_by_drain(start, frozenset({"B", "nginx"}))
        ok = ready and code == 0 and exited <= drain + 3.0 and not cut
        shown = ", ".join(f"{f.kind} via {f.via} {f.status or 'no answer'}" for f in cut[:5])
        self.check(
            name,
            start,
            ok,
            f"exit 0 within drain_seconds ({drain:g} s) + 3 s, requests in flight through B or nginx finished",
            f"exit {code} after {exited:.1f} s, {len(cut)} request(s) in flight cut{': ' + shown if shown else ''}, "
            f"ready again: {ready}",
        )

    async def _until_ready(self, url: str) -> bool:
        assert self.driver.http is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with self.driver.http.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return True
            await asyncio.sleep(0.1)
        return False

    async def directory_reload(self, _: str) -> None:
        start = self.now()
        window = self.ledger.fault("directory:load", "directory", start, frozenset({"directory"}))
        outcome = await self.driver.directory_load()
        window.end = self.now()
        self.check("directory:load", start, outcome == "loaded", "directory load exits 0", outcome)

    # -- the clients ---------------------------------------------------------------------------------------------
    async def client_fault(self, what: str) -> None:
        name = f"client:{what}"
        start = self.now()
        port = self.cluster.gateways["A"].port
        if what in ("disconnect_upload", "disconnect_answer"):
            counter = "aborted_uploads" if what == "disconnect_upload" else "aborted_streams"
            before = (await self.driver.control("GET", "/stats"))[counter]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if what == "disconnect_upload":
                writer.write(b"POST /echo HTTP/1.1\r\nHost: soak\r\n" + NO_FAULT + b"Content-Length: 20971520\r\n\r\n")
                for _ in range(16):
                    writer.write(b"u" * 131072)
                    await writer.drain()
                    await asyncio.sleep(0.05)
            else:
                writer.write(b"GET /stream HTTP/1.1\r\nHost: soak\r\n" + NO_FAULT + b"\r\n")
                await writer.drain()
                got = 0
                while got < 20000:
                    chunk = await asyncio.wait_for(reader.read(65536), 20)
                    if not chunk:
                        break
                    got += len(chunk)
            writer.close()
            left = self.now()
            seen = await self._until_async(lambda: self._counter_above(counter, before), 10)
            self.check(
                name,
                start,
                seen,
                "the gateway lets the app know (its connection closed) within 10 s",
                f"app saw the {'upload' if 'upload' in what else 'answer'} end "
                f"{'after %.1f s' % (self.now() - left) if seen else 'NOT within 10 s'}",
            )
            return
        s = self.cluster.settings
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if what == "slowloris_body":
            length = 100_000 if int(start) % 2 else 10_000
            writer.write(b"POST /echo HTTP/1.1\r\nHost: soak\r\n" + NO_FAULT + b"Content-Length: %d\r\n\r\n" % length)
            limit = s.body_timeout + 3.0
            trickle = b"b" * 10
        else:
            writer.write(b"GET /small HTTP/1.1\r\nHost: soak\r\n" + NO_FAULT)
            limit = s.keepalive_seconds + 5.0
            trickle = b"X-Slow: y\r\n"
        answer = b""
        while self.now() - start < limit + 5:
            with contextlib.suppress(ConnectionError):
                writer.write(trickle)
                await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(4096), 1.0)
                break  # an answer, or b"": closed
            except TimeoutError:
                continue
            except ConnectionError:
                break
        took = self.now() - start
        writer.close()
        status = (
            answer.split(b" ", 2)[1].decode()
            if answer.startswith(b"HTTP/")
            else ("closed" if took < limit + 5 else "open")
        )
        if what == "slowloris_body":
            ok = status == "408" and took <= limit
            expected = f"408 within body_timeout_seconds ({s.body_timeout:g} s) + 3 s"
        else:
            ok = status != "open" and took <= limit
            expected = f"the connection closed within keepalive_seconds ({s.keepalive_seconds:g} s) + 5 s"
        self.check(name, start, ok, expected, f"{status} after {took:.1f} s")

    async def _counter_above(self, counter: str, before: int) -> bool:
        return bool((await self.driver.control("GET", "/stats"))[counter] > before)

    async def _until_async(self, check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if await check():
                    return True
            await asyncio.sleep(0.2)
        return False
