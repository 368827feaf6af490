"""The soak's traffic: lanes of asyncio tasks, each a kind of request at a steady rate, each answer judged and
written to the :class:`~soak.ledger.Ledger`.

Each request goes to gateway A, gateway B or nginx in turn (nginx sends what is the gateway's business to one of
the two, and the rest straight to the app). What a request needed (``layers``: ``app``, ``redis``, ``gw:A``,
``gw:B``, ``gw:any`` behind nginx, ``nginx``) and the shapes its 5xx may take are recorded with it, so that each
failure can be explained by a fault at the end, or not.

Lanes: mints in the four dialects and native, each grant then redeemed by one of its carriers (link, cookie,
header, body, WebSocket; some raced through two gateways at once, some replayed); sessions (started by a
redemption, then requests with the cookie, ended by End, idle, cap, revocation or admin, read-only refusals);
pass-through (small, 20 MB uploads, SSE, WebSockets, HTML pages); revocations; SCIM writes; directory loads; and a
trickle of garbage, which must never get a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import string
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from gateway.core import grant_id

from .cluster import PYTHON, REVOKE_TOKEN, ROOT, SCIM_TOKEN, Cluster, _die_with_parent
from .ledger import Ledger, covering

UPLOAD_BYTES = 20 * 1024 * 1024
SESSION_COOKIE = "impersonation_session"
CONFIRM = "impersonation_confirm=1"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
MANAGER = "vY5fwetestK3gJXZH5uHCw"  # control-panel's mgr-1 (reseller 1)
PYRAMID_ADMIN = "pyramid-enterprise-admin-token"
DENOVOLAB_ADMIN = "denovolab-demo-admin-token"
BTC_PARTNER = "btcdirect-partner-demo-token"
BTC_USER = "7c3f9a1e2b4d6f8091a3c5e7f9b1d3e5a7c9e1f3"
BTC_UUID = "45b9313b-fa47-4786-baf1-62969dec31f2"
DIALECT_SHAPE = {
    "activeplatform": "activeplatform",
    "pyramid": "text",
    "denovolab": "denovolab",
    "btcdirect": "btcdirect",
    "native": "problem",
}
APP_DIALECT = {
    "control-panel": "activeplatform",
    "analytics": "pyramid",
    "switch": "denovolab",
    "exchange": "btcdirect",
}


def shape_of(status: int, headers: CIMultiDictProxy[str] | dict[str, str], body: bytes) -> str:
    """Whose answer this is, by its headers and body: ``app``, a dialect's error shape (``activeplatform``,
    ``text`` — Pyramid's, and any plain text —, ``denovolab``, ``btcdirect``), ``problem``, ``scim``, ``nginx``,
    ``html`` or ``other``."""
    if "X-Soak-App" in headers:
        return "app"
    media = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if media == "application/problem+json":
        return "problem"
    if media == "application/scim+json":
        return "scim"
    if media == "text/plain":
        return "text"
    if media == "text/html":
        return "nginx" if b"nginx" in body else "html"
    try:
        data = json.loads(body)
    except ValueError:
        return "other"
    if not isinstance(data, dict):
        return "other"
    if media == "application/vnd.api+json" and isinstance(data.get("errors"), list):
        return "activeplatform" if all(e.get("status") == str(status) for e in data["errors"]) else "other"
    if isinstance(data.get("errors"), dict) and all(k.startswith("ER") for k in data["errors"]):
        return "btcdirect"
    if data.get("success") is False and "error_type" in data:
        return "denovolab"
    return "other"


def redemption_outcome(answer: Answer, gid: str) -> str:
    """The gateway's answer to a redemption of grant ``gid``, judged by what the gateway said, not by what the app
    saw (that is compared at the end: a success the app never saw is lost): ``success`` (under 400, the confirmation
    page of a link excepted), ``wrong_jti`` (a success whose answer is the app's, carrying another jti or none),
    ``confirmation_page``, ``refused`` (401), or the status (``error``: no answer)."""
    if answer.status is None:
        return "error"
    if answer.status < 400:
        if "X-Soak-App" in answer.headers:
            return "success" if answer.headers.get("X-Soak-Jti") == gid else "wrong_jti"
        if answer.status == 200 and b"<form" in answer.body:
            return "confirmation_page"
        return "success"
    return "refused" if answer.status == 401 else str(answer.status)


@dataclass
class Target:
    name: str  # A, B or nginx
    url: str
    layers: frozenset[str]  # what a request of the gateway's business needs besides Redis and the app


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""
    cookies: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass
class Rates:
    """Requests per second of each lane (``SOAK_RATE`` multiplies them all)."""

    mint_per_dialect: float = 1.5
    small: float = 8.0
    html: float = 1.5
    upload: float = 0.2
    sse: float = 0.5
    websocket: float = 0.8
    revocation: float = 0.4
    scim: float = 0.3
    garbage: float = 2.0
    session_workers: int = 3

    def scaled(self, factor: float) -> Rates:
        values = {k: v * factor if isinstance(v, float) else max(1, round(v * factor)) for k, v in vars(self).items()}
        return Rates(**values)


class Driver:
    def __init__(self, cluster: Cluster, ledger: Ledger, t0: float, seed: int, rates: Rates) -> None:
        self.cluster = cluster
        self.ledger = ledger
        self.t0 = t0
        self.random = random.Random(seed)
        self.rates = rates
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.http: aiohttp.ClientSession | None = None
        self.upload = os.urandom(UPLOAD_BYTES)
        self.upload_sha = hashlib.sha256(self.upload).hexdigest()
        self._rotation = itertools.cycle(["A", "B", "nginx"])
        self._subjects = itertools.cycle([str(4100 + i) for i in range(1, 41)])
        self._revoke_subjects = itertools.cycle([str(6000 + i) for i in range(1, 41)])
        self._scim_serial = itertools.count(1)

    # -- plumbing ------------------------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    async def __aenter__(self) -> Driver:
        connector = aiohttp.TCPConnector(limit=200, force_close=False, enable_cleanup_closed=True)
        self.http = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
        if self.http is not None:
            await self.http.close()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.ledger.notes.append(f"driver task failed at {self.now():.1f} s: {exc!r}")
            print(f"soak: driver task failed: {exc!r}", file=sys.stderr)

    async def shutdown(self, grace: float = 10.0) -> None:
        self.stopping.set()
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def target(self, name: str | None = None) -> Target:
        name = name or next(self._rotation)
        if name == "nginx":
            return Target("nginx", self.cluster.nginx_url, frozenset({"nginx", "gw:any"}))
        gateway = self.cluster.gateways[name]
        return Target(name, gateway.url, frozenset({f"gw:{name}"}))

    def admin(self) -> Target:
        name = self.random.choice(["A", "B"])
        gateway = self.cluster.gateways[name]
        return Target(name, gateway.admin_url, frozenset({f"gw:{name}"}))

    async def every(self, rate: float, make: Callable[[], Awaitable[Any]], limit: int = 20) -> None:
        """Start ``make()`` ``rate`` times a second (jittered) until the run stops; at most ``limit`` at once (a
        lane whose requests pile up during an outage skips rather than grows)."""
        running: set[asyncio.Task[Any]] = set()
        while not self.stopping.is_set():
            if len(running) < limit:
                task = self.spawn(make())
                running.add(task)
                task.add_done_callback(running.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.random.expovariate(rate))

    async def sleep(self, seconds: float) -> bool:
        """Sleep, or stop early when the run stops; whether the run goes on."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return not self.stopping.is_set()

    async def call(
        self,
        kind: str,
        method: str,
        target: Target,
        path: str,
        *,
        layers: Sequence[str] = (),
        shapes: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        data: Any = None,
        timeout: float = 30.0,
        judge: Callable[[Answer], str] | None = None,
        record: bool = True,
    ) -> Answer:
        """One request; recorded under ``kind`` with the outcome ``judge`` gives (by default its status class)."""
        assert self.http is not None
        start = self.now()
        url = target.url + path
        try:
            async with self.http.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                body = await response.read()
                answer = Answer(
                    response.status,
                    dict(response.headers),
                    body,
                    cookies={k: m.value for k, m in response.cookies.items()},
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            answer = Answer(None, error=f"{type(exc).__name__}: {exc}")
        if record:
            self.record(kind, start, answer, target, layers, shapes, judge)
        return answer

    def record(
        self,
        kind: str,
        start: float,
        answer: Answer,
        target: Target,
        layers: Sequence[str],
        shapes: Sequence[str],
        judge: Callable[[Answer], str] | None = None,
    ) -> str:
        if answer.status is None:
            outcome = "error"
        elif judge is not None:
            outcome = judge(answer)
        else:
            outcome = f"{answer.status // 100}xx"
        shape = shape_of(answer.status, answer.headers, answer.body) if answer.status else None
        # nginx's own error pages (a WebSocket handshake's has no body to tell it by)
        all_shapes = set(shapes) | ({"nginx", "html"} if target.name == "nginx" else set())
        self.ledger.request(
            kind,
            start,
            self.now(),
            answer.status,
            outcome,
            via=target.name,
            layers=frozenset(layers) | target.layers,
            shapes=frozenset(all_shapes),
            shape=shape,
            detail=answer.error or answer.body[:200].decode("utf-8", "replace"),
        )
        return outcome

    # -- lanes ---------------------------------------------------------------------------------------------------
    def lanes(self) -> list[Awaitable[Any]]:
        r = self.rates
        lanes: list[Awaitable[Any]] = [
            self.every(r.mint_per_dialect, lambda d=d: self.mint_and_redeem(d))  # type: ignore[misc]
            for d in ("activeplatform", "pyramid", "denovolab", "btcdirect", "native")
        ]
        lanes += [
            self.every(r.small, self.small),
            self.every(r.html, self.html),
            self.every(r.upload, self.upload_20mb, limit=3),
            self.every(r.sse, self.sse, limit=5),
            self.every(r.websocket, self.websocket, limit=5),
            self.every(r.revocation, self.revocation, limit=5),
            self.every(r.scim, self.scim, limit=5),
            self.every(r.garbage, self.garbage),
        ]
        flavors = ["end", "idle", "read_only", "cap", "revoked", "admin_delete"]
        for i in range(r.session_workers):
            lanes.append(self.session_worker(flavors[i * 2 % len(flavors) :] + flavors[: i * 2 % len(flavors)]))
        return lanes

    # -- mints and redemptions -----------------------------------------------------------------------------------
    async def mint_native(
        self, kind: str, target: Target, body: dict[str, Any], credential: str
    ) -> dict[str, Any] | None:
        """``POST /v1/grants`` of ``body`` as ``credential``, recorded under ``kind``: the grant's JSON, or None."""
        answer = await self.call(
            kind,
            "POST",
            target,
            "/v1/grants",
            data=json.dumps(body),
            headers={"Authorization": f"Bearer {credential}", "Content-Type": "application/json"},
            layers=["redis"],
            shapes=["problem"],
            judge=lambda a: "minted" if a.status == 201 else str(a.status),
        )
        data: dict[str, Any] | None = answer.json() if answer.status == 201 else None
        return data or None

    async def mint(self, dialect: str, target: Target) -> tuple[str, str, str] | None:
        """Mint one grant in ``dialect``: (token, the login path, the app), or None when it was not minted."""
        kind = f"mint.{dialect}"
        shapes = [DIALECT_SHAPE[dialect]]
        ok = lambda a: "minted" if a.status in (200, 201) else f"{a.status}"  # noqa: E731
        if dialect == "activeplatform":
            answer = await self.call(
                kind,
                "GET",
                target,
                "/api/v3/resellers/1/user_authentication/token?account_id=505",
                headers={"X-Api-Token": MANAGER},
                layers=["redis"],
                shapes=shapes,
                judge=ok,
            )
            data = answer.json() if answer.status == 200 else None
            if not data:
                return None
            token = data["owner_token"]
            return token, "/?" + urlencode({"user_email": data["owner_email"], "user_token": token}), "control-panel"
        if dialect == "pyramid":
            body = json.dumps({"token": PYRAMID_ADMIN, "userIdentity": "jdoe"})
            answer = await self.call(
                kind,
                "POST",
                target,
                "/API3/authentication/authenticateUserByToken",
                data=body,
                headers={"Content-Type": "application/json"},
                layers=["redis"],
                shapes=shapes,
                judge=ok,
            )
            if answer.status != 200:
                return None
            token = answer.body.decode().strip()
            return token, f"/?token={token}", "analytics"
        if dialect == "denovolab":
            answer = await self.call(
                kind,
                "POST",
                target,
                "/v1/auth/as_client",
                data=b'{"client_id": 41}',
                headers={"X-Auth-Token": DENOVOLAB_ADMIN},
                layers=["redis"],
                shapes=shapes,
                judge=ok,
            )
            data = answer.json() if answer.status == 200 else None
            if not data:
                return None
            return data["token"], f"/routing/rate_table?token={data['token']}", "switch"
        if dialect == "btcdirect":
            answer = await self.call(
                kind,
                "GET",
                target,
                "/api/v1/user/login-token",
                headers={"Authorization": f"Bearer {BTC_PARTNER}", "User-Identifier": BTC_USER},
                layers=["redis"],
                shapes=shapes,
                judge=ok,
            )
            data = answer.json() if answer.status == 200 else None
            if not data:
                return None
            return data["token"], f"/kyc?token={data['token']}&uuid={data['uuid']}", "exchange"
        app = self.random.choice(["control-panel", "analytics"])
        credential = MANAGER if app == "control-panel" else PYRAMID_ADMIN
        subject = "505" if app == "control-panel" else "jdoe"
        data = await self.mint_native(kind, target, {"app": app, "subject": subject}, credential)
        if not data:
            return None
        parts = urlsplit(data["login_url"])
        return data["token"], f"{parts.path}?{parts.query}", app

    async def mint_and_redeem(self, dialect: str) -> None:
        minted = await self.mint(dialect, self.target())
        if minted is None:
            return
        token, link, app = minted
        gid = grant_id(token)
        self.ledger.minted(gid, f"mint.{dialect}", self.now())
        carrier = self.random.choice(
            {
                "control-panel": ["link"],
                "analytics": ["cookie", "cookie", "link", "websocket"],
                "switch": ["header", "link"],
                "exchange": ["body", "link"],
            }[app]
        )
        roll = self.random.random()
        if roll < 0.1:  # the same grant through two places at once: exactly one may win
            first, second = self.random.sample(["A", "B", "nginx"], 2)
            outcomes = await asyncio.gather(
                self.redeem(gid, token, link, app, carrier, self.target(first), "redeem.race"),
                self.redeem(gid, token, link, app, carrier, self.target(second), "redeem.race"),
            )
            if outcomes.count("success") > 1:
                self.ledger.notes.append(f"grant {gid} redeemed by both racers at {self.now():.1f} s ({carrier})")
            return
        if carrier == "link" and roll < 0.2:  # a mail scanner's GET: a confirmation page, nothing spent
            await self.preview(gid, link, app)
        outcome = await self.redeem(gid, token, link, app, carrier, self.target(), f"redeem.{carrier}")
        if outcome in ("502", "504"):  # the grant must still work, unless the app got it (it then saw its jti)
            await asyncio.sleep(0.5)
            await self.redeem(gid, token, link, app, carrier, self.target(), "redeem.retry")
        elif outcome == "success" and self.random.random() < 0.1:
            await self.redeem(gid, token, link, app, carrier, self.target(), "redeem.replay")

    async def preview(self, gid: str, link: str, app: str) -> None:
        def judge(a: Answer) -> str:
            if a.status == 200 and "X-Soak-App" not in a.headers and b"<form" in a.body:
                return "confirmation_page"
            return "consumed" if "X-Soak-App" in a.headers else f"{a.status}"

        answer = await self.call(
            "redeem.preview",
            "GET",
            self.target(),
            link,
            layers=["redis"],
            shapes=[DIALECT_SHAPE[APP_DIALECT[app]]],
            headers={"Accept": "text/html"},
            judge=judge,
        )
        if answer.status and "X-Soak-App" in answer.headers:
            self.ledger.redeemed(gid, "success", at=self.now(), kind="redeem.preview")
            self.ledger.notes.append(f"a GET of a link consumed grant {gid} (no redeem_on_get)")

    async def redeem(self, gid: str, token: str, link: str, app: str, carrier: str, target: Target, kind: str) -> str:
        """Present the grant by ``carrier``; the outcome (:func:`redemption_outcome`): ``success``, ``wrong_jti``,
        ``refused``, or the status."""
        # the dialect's shape until the grant is spent; the app's own answer, or the data path's text/plain 502/504
        # once it is (docs: "an application that fails to answer is a text/plain 502")
        shapes = [DIALECT_SHAPE[APP_DIALECT[app]], "app", "text"]
        layers = ["redis", "app"]

        def judge(a: Answer) -> str:
            return redemption_outcome(a, gid)

        if carrier == "websocket":
            return await self.redeem_websocket(gid, token, target, kind)
        if carrier == "link":
            answer = await self.call(
                kind, "POST", target, link, data=CONFIRM, headers=FORM, layers=layers, shapes=shapes, judge=judge
            )
        elif carrier == "cookie":
            answer = await self.call(
                kind,
                "GET",
                target,
                "/reports",
                headers={"Cookie": f"PyramidAuth={token}"},
                layers=layers,
                shapes=shapes,
                judge=judge,
            )
        elif carrier == "header":
            answer = await self.call(
                kind,
                "GET",
                target,
                "/routing/rate_table",
                headers={"X-Auth-Token": token},
                layers=layers,
                shapes=shapes,
                judge=judge,
            )
        else:  # body
            body = json.dumps({"uuid": BTC_UUID, "token": token})
            answer = await self.call(
                kind,
                "POST",
                target,
                "/api/v2/user/login-with-token",
                data=body,
                headers={"Content-Type": "application/json"},
                layers=layers,
                shapes=shapes,
                judge=judge,
            )
        outcome = judge(answer)
        jti = answer.headers.get("X-Soak-Jti", "")
        self.ledger.redeemed(gid, outcome, at=self.now(), kind=kind, jti=jti)
        if outcome == "wrong_jti":
            self.ledger.notes.append(f"grant {gid}: the app answered with jti {answer.headers.get('X-Soak-Jti')}")
        return outcome

    async def redeem_websocket(self, gid: str, token: str, target: Target, kind: str) -> str:
        assert self.http is not None
        start = self.now()
        outcome = "error"  # the grant's: the gateway's 101 is a success, whatever came after it
        answer = Answer(None)
        jti = ""
        upgraded = False
        try:
            async with self.http.ws_connect(
                target.url.replace("http", "ws", 1) + f"/ws?token={token}", timeout=aiohttp.ClientWSTimeout(ws_close=10)
            ) as ws:
                upgraded, outcome = True, "success"
                first = await ws.receive(timeout=10)
                claims = json.loads(first.data) if first.type is aiohttp.WSMsgType.TEXT else {}
                jti = str(claims.get("jti", "-"))
                if claims and claims.get("jti") != gid:
                    outcome = "wrong_jti"
                await ws.send_str("ping")
                echoed = await ws.receive(timeout=10)
                answer = Answer(101, {"X-Soak-App": "1"})
                if echoed.data != "ping":
                    answer = Answer(None, error=f"echo garbled: {echoed.type} {str(echoed.data)[:50]}")
        except aiohttp.WSServerHandshakeError as exc:  # no 101: not a success, whatever its status
            answer = Answer(exc.status, dict(exc.headers or {}))
            outcome = "refused" if exc.status == 401 else str(exc.status)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            answer = Answer(None, error=f"{type(exc).__name__}: {exc}" + (" (after the 101)" if upgraded else ""))
        self.record(kind, start, answer, target, ["redis", "app"], ["text", "app"], lambda a: outcome)
        self.ledger.redeemed(gid, outcome, at=self.now(), kind=kind, jti=jti)
        if outcome == "wrong_jti":
            self.ledger.notes.append(f"grant {gid}: the app's WebSocket said jti {jti}")
        return outcome

    # -- pass-through --------------------------------------------------------------------------------------------
    def _pass_shapes(self) -> list[str]:
        return ["app", "text"]  # the app's own answer, or the data path's text/plain 502/504

    async def small(self) -> None:
        await self.call(
            "pass.small",
            "GET",
            self.target(),
            f"/small?i={self.random.randrange(10**6)}",
            layers=["app"],
            shapes=self._pass_shapes(),
        )

    async def html(self) -> None:
        def judge(a: Answer) -> str:
            if a.status == 200 and b"_impersonation/end" in a.body:
                return "banner_without_session"
            return f"{a.status // 100}xx" if a.status else "error"

        await self.call(
            "pass.html",
            "GET",
            self.target(),
            "/page",
            headers={"Accept": "text/html"},
            layers=["app"],
            shapes=self._pass_shapes(),
            judge=judge,
        )

    async def upload_20mb(self) -> None:
        def judge(a: Answer) -> str:
            data = a.json() if a.status == 200 else None
            if data is None:
                return f"{a.status // 100}xx" if a.status else "error"
            return "intact" if data.get("sha256") == self.upload_sha else "corrupted"

        await self.call(
            "pass.upload",
            "POST",
            self.target(),
            "/echo",
            data=self.upload,
            timeout=120,
            headers={"Content-Type": "application/octet-stream"},
            layers=["app"],
            shapes=self._pass_shapes(),
            judge=judge,
        )

    async def sse(self) -> None:
        def judge(a: Answer) -> str:
            if a.status != 200:
                return f"{a.status // 100}xx" if a.status else "error"
            return "complete" if a.body.count(b"data: event") == 4 else "incomplete"

        await self.call(
            "pass.sse",
            "GET",
            self.target(),
            "/sse?n=4&every=0.5",
            layers=["app"],
            headers={"Accept": "text/event-stream"},
            shapes=self._pass_shapes(),
            judge=judge,
        )

    async def websocket(self) -> None:
        assert self.http is not None
        target = self.target()
        start = self.now()
        outcome, answer = "error", Answer(None)
        try:
            async with self.http.ws_connect(
                target.url.replace("http", "ws", 1) + "/ws", timeout=aiohttp.ClientWSTimeout(ws_close=10)
            ) as ws:
                await ws.receive(timeout=10)
                good = 0
                for i in range(5):
                    message = os.urandom(1024 * (i + 1))
                    await ws.send_bytes(message)
                    echoed = await ws.receive(timeout=10)
                    good += echoed.data == message
                outcome = "echoed" if good == 5 else "garbled"
                answer = Answer(101, {"X-Soak-App": "1"})
        except aiohttp.WSServerHandshakeError as exc:
            answer = Answer(exc.status, dict(exc.headers or {}))
            outcome = str(exc.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            answer = Answer(None, error=f"{type(exc).__name__}: {exc}")
        self.record("pass.websocket", start, answer, target, ["app"], self._pass_shapes(), lambda a: outcome)

    # -- sessions ------------------------------------------------------------------------------------------------
    async def start_session(self, target: Target, subject: str, mode: str = "full") -> tuple[str, str, float] | None:
        """Mint (native, for ``switch``) and redeem: the session cookie, the session id and when it started."""
        data = await self.mint_native(
            "session.mint", target, {"app": "switch", "subject": subject, "mode": mode}, DENOVOLAB_ADMIN
        )
        if not data:
            return None
        gid = data["grant_id"]
        self.ledger.minted(gid, "session.mint", self.now())
        parts = urlsplit(data["login_url"])
        started = self.now()
        answer = await self.call(
            "session.start",
            "POST",
            target,
            f"{parts.path}?{parts.query}",
            data=CONFIRM,
            headers=FORM,
            layers=["redis", "app"],
            shapes=["denovolab", "app", "text"],
            judge=lambda a: "started" if SESSION_COOKIE in a.cookies else str(a.status),
        )
        outcome = redemption_outcome(answer, gid)
        self.ledger.redeemed(
            gid, outcome, at=self.now(), kind="session.start", jti=answer.headers.get("X-Soak-Jti", "")
        )
        success = outcome == "success"
        claims = answer.json() or {}
        if not success or SESSION_COOKIE not in answer.cookies or not claims.get("sid"):
            return None
        self.ledger.sessions["started"] += 1
        return answer.cookies[SESSION_COOKIE], claims["sid"], started

    async def in_session(
        self, target: Target, cookie: str, path: str = "/whoami", method: str = "GET", accept: str = "application/json"
    ) -> Answer:
        return await self.call(
            "session.request",
            method,
            target,
            path,
            layers=["redis", "app"],
            headers={"Cookie": f"{SESSION_COOKIE}={cookie}", "Accept": accept},
            shapes=["app", "text", "denovolab", "problem", "activeplatform"],
        )

    @staticmethod
    def live(answer: Answer, sid: str) -> bool | None:
        """Whether the answer came from a request of session ``sid``: True; False when the app answered a request
        that was not the session's (a defect, unless a fault ended the session); None when no usable answer came
        (a 5xx, no answer, not the app's: a fault may explain it)."""
        if answer.status is None or answer.status >= 500 or "X-Soak-App" not in answer.headers:
            return None
        data = answer.json() or {}
        return data.get("sid") == sid

    def session_layers(self, *targets: Target) -> frozenset[str]:
        """What a session's requests need: Redis, the app, the directory, and the gateway(s) they went to."""
        return frozenset({"redis", "app", "directory"}).union(*(t.layers for t in targets))

    def disturbed(self, began: float, what: str, layers: frozenset[str]) -> str:
        """A session step that got no usable answer: ``disturbed (what; fault)`` when a fault touching ``layers``
        covered the session's time, else a defect (``unexplained: what``)."""
        fault = covering(self.ledger.faults, began, self.now(), layers)
        if fault is not None:
            return f"disturbed ({what}; {fault.name})"
        return f"unexplained: {what}"

    def judge_live(self, value: bool | None, began: float, what: str, layers: frozenset[str]) -> str | None:
        """None when ``value`` (from :meth:`live`) is True; else the verdict: a missing answer is
        :meth:`disturbed`, an answer outside the session :meth:`early` (only a fault that can end sessions
        explains it)."""
        if value is True:
            return None
        if value is None:
            return self.disturbed(began, what, layers)
        return self.early(began, f"{what}: the app answered outside the session")

    async def session_worker(self, flavors: list[str]) -> None:
        for flavor in itertools.cycle(flavors):
            if self.stopping.is_set():
                return
            target = self.target()
            began = self.now()
            try:
                verdict = await self.session_flavor(flavor, target, next(self._subjects))
            except (aiohttp.ClientError, TimeoutError, OSError, KeyError, TypeError) as exc:
                verdict = self.disturbed(began, type(exc).__name__, self.session_layers(target, self.admin()))
            self.ledger.sessions[f"{flavor}: {verdict}"] += 1
            if verdict != "ok" and verdict != "cut short" and not verdict.startswith("disturbed ("):
                self.ledger.session_defects.append(
                    {"flavor": flavor, "at": round(began, 1), "until": round(self.now(), 1), "verdict": verdict}
                )
            if not await self.sleep(0.5):
                return

    async def session_flavor(self, flavor: str, target: Target, subject: str) -> str:
        """One session from start to end the ``flavor`` way; the verdict: ``ok``, ``disturbed (...; fault)`` by a
        failure that a fault covering the session explains, ``cut short`` by the run's end, or what went wrong."""
        s = self.cluster.settings
        flavor_began = self.now()
        layers = self.session_layers(target)
        started = await self.start_session(target, subject, "read_only" if flavor == "read_only" else "full")
        if started is None:
            return self.disturbed(flavor_began, "no session", layers)
        cookie, sid, began = started
        first = await self.in_session(target, cookie)
        if (verdict := self.judge_live(self.live(first, sid), began, "first request", layers)) is not None:
            return verdict
        if flavor == "end":
            kept = await self.in_session(target, cookie, "/cookie")
            if "app_login" in kept.cookies:
                return "app cookie reached the browser"
            again = await self.in_session(target, cookie)
            if (verdict := self.judge_live(self.live(again, sid), began, "cookie sent back", layers)) is not None:
                return verdict
            if "app_login" not in (again.json() or {}).get("cookies", []):
                return "kept cookie not sent back"
            page = await self.in_session(target, cookie, "/page", accept="text/html")
            if page.status is None or page.status >= 500:
                return self.disturbed(began, "page", layers)
            if page.status == 200 and b"_impersonation/end" not in page.body:
                return self.early(began, "no banner")
            ended = await self.call(
                "session.end",
                "POST",
                target,
                "/_impersonation/end",
                layers=["redis"],
                headers={"Cookie": f"{SESSION_COOKIE}={cookie}"},
                shapes=["problem"],
            )
            if ended.status not in (200, 303):
                return self.disturbed(began, f"end {ended.status}", layers)
            self.ledger.sessions["ended_by_end"] += 1
            after = self.live(await self.in_session(target, cookie), sid)
            if after is None:
                return self.disturbed(began, "after end", layers)
            return "ok" if after is False else "live after end"
        if flavor == "idle":
            if not await self.sleep(s.session_idle + 1.5):
                return "cut short"
            after = self.live(await self.in_session(target, cookie), sid)
            if after is None:
                return self.disturbed(began, "after idle", layers)
            self.ledger.sessions["ended_idle"] += 1
            self.ledger.sessions["ended_on_time" if after is False else "ended_late"] += 1
            return "ok" if after is False else "live after idle limit"
        if flavor == "cap":
            while self.now() - began < s.session_max - 1.0:  # activity keeps it from going idle: only the cap ends it
                if not await self.sleep(s.session_idle / 3):
                    return "cut short"
                if (
                    self.live(await self.in_session(target, cookie), sid) is False
                    and self.now() - began < s.session_max
                ):
                    return self.early(began, f"ended {self.now() - began:.1f} s after its start, before its cap")
            await self.sleep(max(0.0, began + s.session_max + 1.0 - self.now()))
            after = self.live(await self.in_session(target, cookie), sid)
            if after is None:
                return self.disturbed(began, "after cap", layers)
            self.ledger.sessions["ended_cap"] += 1
            self.ledger.sessions["ended_on_time" if after is False else "ended_late"] += 1
            return "ok" if after is False else "live after cap"
        if flavor in ("revoked", "admin_delete"):
            admin = self.admin()
            both = self.session_layers(target, admin)
            auth = {"Authorization": f"Bearer {REVOKE_TOKEN}", "Content-Type": "application/json"}
            if flavor == "revoked":
                answer = await self.call(
                    "admin.revocation",
                    "POST",
                    admin,
                    "/v1/revocations",
                    headers=auth,
                    data=json.dumps({"app": "switch", "subject": subject}),
                    layers=["redis"],
                    shapes=["problem"],
                )
                if answer.status != 200:
                    return self.disturbed(began, f"revocation {answer.status}", both)
                if (answer.json() or {}).get("sessions_ended", 0) < 1:
                    return self.early(began, "revocation ended no session")
            else:
                answer = await self.call(
                    "admin.sessions",
                    "DELETE",
                    admin,
                    f"/v1/sessions/{sid}",
                    headers=auth,
                    layers=["redis"],
                    shapes=["problem"],
                )
                if answer.status == 404:
                    return self.early(began, "admin DELETE found no session (404)")
                if answer.status != 204:
                    return self.disturbed(began, f"delete {answer.status}", both)
            after = self.live(await self.in_session(target, cookie), sid)
            if after is None:
                return self.disturbed(began, "after revocation", both)
            self.ledger.sessions["refused_after_revocation" if after is False else "live_after_revocation"] += 1
            return "ok" if after is False else "live after revocation"
        if flavor == "read_only":
            for method, path in (("POST", "/notes"), ("GET", "/billing/invoices")):
                marker = "".join(self.random.choices(string.ascii_lowercase, k=16))
                refused = await self.in_session(target, cookie, f"{path}?m={marker}", method)
                if refused.status is None or refused.status >= 500:
                    return self.disturbed(began, f"read_only {method}", layers)
                seen = await self.control("GET", f"/marker/{marker}")
                if refused.status != 403 or seen.get("seen"):
                    if seen.get("seen") and not seen.get("assertion"):  # no session's assertion: the session was gone
                        return self.early(began, f"{method} {path} reached the app without the session")
                    self.ledger.sessions["read_only_leaks"] += 1
                    return f"{method} {path} in a read_only session: {refused.status}, app saw it: {seen.get('seen')}"
                self.ledger.sessions["read_only_refusals"] += 1
            verdict = self.judge_live(
                self.live(await self.in_session(target, cookie), sid), began, "after refusals", layers
            )
            return verdict or "ok"
        return "unknown flavor"

    def early(self, began: float, what: str) -> str:
        """The verdict on a session that ended too soon, or a request the app answered outside it: ``disturbed``
        when a fault that can end sessions (Redis restarted empty or failed over, losing writes; a directory load)
        happened during it, else ``what`` (a defect)."""
        for fault in reversed(self.ledger.faults):
            if fault.name.startswith(("redis:", "directory:")) and fault.covers(began, self.now()):
                return f"disturbed ({what}; {fault.name})"
        self.ledger.notes.append(f"session started at {began:.1f} s: {what}")
        return what

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        assert self.http is not None
        async with self.http.request(
            method, self.cluster.control_url + path, json=body, timeout=aiohttp.ClientTimeout(total=30)
        ) as response:
            return await response.json()

    # -- admin: revocations, SCIM, directory loads ---------------------------------------------------------------
    async def revocation(self) -> None:
        """A grant minted then revoked (by subject, or by id) must be refused at redemption."""
        subject = next(self._revoke_subjects)
        target = self.target()
        body = json.dumps({"app": "control-panel", "subject": subject})
        data = await self.mint_native("mint.native", target, {"app": "control-panel", "subject": subject}, MANAGER)
        if not data:
            return
        gid = data["grant_id"]
        admin = self.admin()
        auth = {"Authorization": f"Bearer {REVOKE_TOKEN}", "Content-Type": "application/json"}
        if self.random.random() < 0.5:
            revoked = await self.call(
                "admin.revocation",
                "POST",
                admin,
                "/v1/revocations",
                headers=auth,
                data=body,
                layers=["redis"],
                shapes=["problem"],
            )
            ok = revoked.status == 200 and (revoked.json() or {}).get("revoked", 0) >= 1
        else:
            revoked = await self.call(
                "admin.revoke_grant",
                "DELETE",
                admin,
                f"/v1/grants/{gid}",
                headers=auth,
                layers=["redis"],
                shapes=["problem"],
            )
            ok = revoked.status == 204
        self.ledger.minted(gid, "mint.native", self.now(), expect_refusal="revoked" if ok else None)
        parts = urlsplit(data["login_url"])
        await self.redeem(
            gid,
            data["token"],
            f"{parts.path}?{parts.query}",
            "control-panel",
            "link",
            self.target(),
            "redeem.revoked" if ok else "redeem.link",
        )

    async def scim(self) -> None:
        """A user created, a grant minted for it, the user deactivated: the grant must be refused; then deleted."""
        admin = self.admin()
        auth = {"Authorization": f"Bearer {SCIM_TOKEN}", "Content-Type": "application/scim+json"}
        name = f"scim-{os.getpid()}-{next(self._scim_serial)}"
        user = {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": name,
            "displayName": name,
            "emails": [{"value": f"{name}@example.com", "primary": True}],
            "active": True,
        }
        created = await self.call(
            "scim.create",
            "POST",
            admin,
            "/scim/v2/analytics/Users",
            headers=auth,
            data=json.dumps(user),
            layers=["redis"],
            shapes=["scim"],
        )
        uid = (created.json() or {}).get("id") if created.status == 201 else None
        if uid is None:
            return
        target = self.target()
        data = await self.mint_native("mint.native", target, {"app": "analytics", "subject": name}, PYRAMID_ADMIN)
        patch = {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "path": "displayName", "value": name + " renamed"}],
        }
        await self.call(
            "scim.patch",
            "PATCH",
            admin,
            f"/scim/v2/analytics/Users/{uid}",
            headers=auth,
            data=json.dumps(patch),
            layers=["redis"],
            shapes=["scim"],
        )
        patch["Operations"] = [{"op": "replace", "path": "active", "value": False}]
        deactivated = await self.call(
            "scim.deactivate",
            "PATCH",
            admin,
            f"/scim/v2/analytics/Users/{uid}",
            headers=auth,
            data=json.dumps(patch),
            layers=["redis"],
            shapes=["scim"],
        )
        if data:
            gid = data["grant_id"]
            expect = "deactivated" if deactivated.status == 200 else None
            self.ledger.minted(gid, "mint.native", self.now(), expect_refusal=expect)
            await self.redeem(
                gid,
                data["token"],
                f"/?token={data['token']}",
                "analytics",
                "cookie",
                self.target(),
                "redeem.deactivated" if expect else "redeem.cookie",
            )
        await self.call(
            "scim.delete",
            "DELETE",
            admin,
            f"/scim/v2/analytics/Users/{uid}",
            headers=auth,
            layers=["redis"],
            shapes=["scim"],
        )

    async def directory_load(self) -> str:
        """``directory load`` of the run's directory file, as an operator runs it; its outcome."""
        start = self.now()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "gateway",
            "directory",
            "load",
            str(self.cluster.directory_file),
            "--config",
            str(self.cluster.config_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=env,
            preexec_fn=_die_with_parent,
        )
        out, err = await proc.communicate()
        outcome = "loaded" if proc.returncode == 0 else f"exit {proc.returncode}"
        answer = Answer(200 if proc.returncode == 0 else 599, error=(err or out).decode()[-300:])
        self.record("directory.load", start, answer, Target("cli", "", frozenset()), ["redis"], [], lambda a: outcome)
        if proc.returncode != 0:
            self.ledger.notes.append(f"directory load at {start:.0f} s: {outcome}: {(err or out).decode()[-300:]}")
        return outcome

    # -- garbage -------------------------------------------------------------------------------------------------
    async def garbage(self) -> None:
        """A malformed request of some sort: any answer but a 5xx (unless a fault explains it) will do."""
        target = self.target(self.random.choice(["A", "B"]))  # the gateway's own parser, not nginx's
        choice = self.random.randrange(12)
        junk = os.urandom(self.random.randrange(1, 2000))
        shapes = ["activeplatform", "text", "denovolab", "btcdirect", "problem", "scim", "app", "html"]
        layers = ["redis", "app"]
        headers: dict[str, str] = {}
        if choice == 0:
            method, path, data = "POST", "/API3/authentication/authenticateUserByToken", junk
            headers = {"Content-Type": "application/json"}
        elif choice == 1:
            method, path, data = "POST", "/v1/auth/as_client", b'{"client_id": [1, {"x": null}]}'
            headers = {"X-Auth-Token": "".join(self.random.choices(string.printable[:62], k=40))}
        elif choice == 2:
            method, data = "GET", None
            reseller, account = quote(junk[:8].hex()), quote(junk[:20], safe="")
            path = f"/api/v3/resellers/{reseller}/user_authentication/token?account_id={account}"
            headers = {"X-Api-Token": junk[:10].hex()}
        elif choice == 3:
            method, data = self.random.choice(["GET", "POST", "PUT", "DELETE", "PATCH"]), junk
            path = "/" + quote(junk[:30], safe="/") + "?" + quote(junk[30:60], safe="=&")
        elif choice == 4:
            method, path, data = "GET", self.random.choice(["/a/..%2F..%2Fetc/passwd", "/..;/x", "/%2e%2e/x"]), None
        elif choice == 5:
            method, path, data = "POST", "/v1/grants", json.dumps({"app": 5, "subject": None, "ttl_seconds": "x"})
            headers = {"Authorization": f"Bearer {MANAGER}", "Content-Type": "application/json"}
        elif choice == 6:
            method, path, data = "GET", "/small", None
            headers = {"X-Big": "x" * self.random.choice([9000, 20000, 70000])}
        elif choice == 7:
            method, path, data = "POST", "/api/v2/user/login-with-token", junk
            headers = {"Content-Type": "application/json"}
        elif choice == 8:
            method, path, data = "POST", "/API3/authentication/authenticateUserByToken", junk
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        elif choice == 9:
            fake = "".join(self.random.choices(string.ascii_letters + string.digits, k=32))
            method, path, data = "GET", "/reports", None
            headers = {"Cookie": f"PyramidAuth={fake}", "X-Auth-Token": fake}
        elif choice == 10:
            admin = self.admin()
            await self.call(
                "garbage",
                "POST",
                admin,
                "/scim/v2/analytics/Users",
                data=junk,
                layers=layers,
                shapes=shapes,
                headers={"Authorization": f"Bearer {SCIM_TOKEN}", "Content-Type": "application/scim+json"},
                judge=self._garbage_judge,
            )
            return
        else:
            await self.raw_garbage(target)
            return
        await self.call(
            "garbage",
            method,
            target,
            path,
            data=data,
            headers=headers,
            layers=layers,
            shapes=shapes,
            judge=self._garbage_judge,
        )

    @staticmethod
    def _garbage_judge(answer: Answer) -> str:
        return "5xx" if answer.status and answer.status >= 500 else f"{answer.status}"

    async def raw_garbage(self, target: Target) -> None:
        """Bytes no client library would send."""
        port = int(target.url.rsplit(":", 1)[1])
        request = self.random.choice(
            [
                b"GET /\x00x HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                b"BREW /pot HTCPCP/1.0\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
            ]
        )
        start = self.now()
        status: int | None = None
        detail = ""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            try:
                writer.write(request)
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 10)
                parts = line.split()
                status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                detail = line.decode("latin-1").strip()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        except TimeoutError:
            detail = "no answer within 10 s"
            status = 0
        except OSError as exc:
            detail = repr(exc)
        answer = Answer(status if status else None, error=detail)
        if status == 0:  # closed without an answer: fine for garbage; no answer in time: record
            self.ledger.request(
                "garbage.raw", start, self.now(), 0, "closed" if detail != "no answer within 10 s" else "no_answer"
            )
            return
        self.record(
            "garbage.raw",
            start,
            answer,
            target,
            ["redis", "app"],
            ["activeplatform", "text", "other"],
            self._garbage_judge,
        )
