"""A few thousand malformed requests, over raw sockets, at every listener of a real gateway process (the main one
and the admin one): none gets a 5xx it caused, none hangs, and no secret it carried reaches a log line.

The requests are drawn from a seeded generator (reproducible: the seed is in the failure message) around the
places the gateway reads: every dialect's mint endpoints, the native API, grant carriers, SCIM and revocation,
with real and broken credentials, bodies that are not what they say (bad JSON, bad gzip, bad deflate, lengths
that lie) and request lines and headers that are not HTTP at all. The app behind it answers every request it
gets, so a 5xx can only come from the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.conftest import free_port

SEED = 20261203
REQUESTS = 2400  # over both listeners
CONCURRENCY = 16
DEADLINE = 20.0  # seconds one request may take before it counts as a hang

# Secrets the requests carry: none may appear in the gateway's output.
CREDENTIALS = [
    "vY5fwetestK3gJXZH5uHCw", "marketing-manager-token", "pyramid-enterprise-admin-token",
    "pyramid-sales-domain-admin-token", "denovolab-demo-admin-token", "btcdirect-partner-demo-token",
    "btcdirect-user-demo-token",
]  # fmt: skip
ADMIN_TOKENS = ["fuzz-scim-token-9f2c", "fuzz-revoke-token-4b7e"]
SCIM_TYPE = "application/scim+json"
MINT_PATHS = [
    "/api/v3/resellers/1/user_authentication/token?account_id=505",
    "/api/v3/resellers/7/user_authentication/token?account_id=707",
    "/API3/authentication/authenticateUserByToken",
    "/API2/auth/authenticateUserByToken",
    "/v1/auth/as_client",
    "/api/v1/user/login-token",
    "/api/v1/system/info",
    "/api/v2/user/login-with-token",
    "/v1/grants",
]
MAIN_PATHS = [*MINT_PATHS, "/", "/dashboard", "/?user_email=example%40activeplatform.com&user_token={grant}",
              "/?token={grant}", "/?token={grant}&uuid=45b9313b-fa47-4786-baf1-62969dec31f2", "/x%3Ftoken={grant}",
              "/%2e%2e/%2e%2e/etc/passwd", "/..;/admin", "//x", "/healthz", "/readyz", "/metrics",
              "/.well-known/jwks.json", "/openapi.json", "/_impersonation/end"]  # fmt: skip
ADMIN_PATHS = ["/scim/v2/control-panel/Users", "/scim/v2/control-panel/Users/505", "/scim/v2/control-panel/Users/%2541",
               "/scim/v2/control-panel/Users/.search", "/scim/v2/nope/Users", "/scim/v2/control-panel/Schemas",
               "/scim/v2/control-panel/ServiceProviderConfig", "/scim/v2/control-panel/Users?filter={junk}",
               "/scim/v2/control-panel/Users?startIndex=9223372036854775808&count=-1", "/v1/revocations",
               "/v1/grants/{grant_id}", "/v1/grants/..%2f..", "/v1/sessions", "/"]  # fmt: skip
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "G\x01T", "get"]
JUNK = ["", "\x00", "'\"<script>", "%", "%zz", "\u202e", "a" * 5000, "userName eq", "(((((", "\\", "🙂", "\r"]


def config(tmp: Path, upstream: int, port: int, admin: int) -> Path:
    root = Path(__file__).resolve().parent.parent
    (tmp / "directory.yaml").write_text((root / "directory.yaml").read_text())
    apps = yaml.safe_load((root / "config.yaml").read_text())["apps"]
    for app in apps.values():
        app["upstream"] = f"http://127.0.0.1:{upstream}"
    raw = {
        "server": {"port": port, "public_url": f"http://127.0.0.1:{port}", "body_timeout_seconds": 2},
        "store": {"url": "embedded"},
        "directory": {"file": "directory.yaml"},
        "admin": {"port": admin, "tokens": [{"id": "idp", "token": ADMIN_TOKENS[0], "scopes": ["scim"]},
                                            {"id": "ops", "token": ADMIN_TOKENS[1], "scopes": ["revoke"]}]},
        # the fuzz sends many refused credentials from one address: a limit would answer them all 429
        "rate_limit": {"failures": 1_000_000, "window_seconds": 1},
        "apps": apps,
    }  # fmt: skip
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Draw:
    """One malformed request, drawn from ``rng``."""

    def __init__(self, rng: random.Random, grants: list[str]) -> None:
        self.rng = rng
        self.grants = grants

    def pick(self, items: list[Any]) -> Any:
        return self.rng.choice(items)

    def secret(self) -> str:
        return self.pick([*CREDENTIALS, *ADMIN_TOKENS, *self.grants, "wrong-token"])

    def body(self) -> tuple[bytes, list[tuple[str, str]]]:
        choice = self.rng.randrange(9)
        secret = self.secret()
        if choice == 0:
            return b"", []
        if choice == 1:
            return f'{{"token": "{secret}", "userIdentity": "jdoe"'.encode(), [("Content-Type", "application/json")]
        if choice == 2:
            return b"not gzip at all", [("Content-Encoding", "gzip"), ("Content-Type", "application/json")]
        if choice == 3:
            return b"\x78\x9c garbage", [("Content-Encoding", "deflate"), ("Content-Type", SCIM_TYPE)]
        if choice == 4:
            data = gzip.compress(f'{{"app": "control-panel", "token": "{secret}"}}'.encode())
            return data, [("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")]
        if choice == 5:
            ops = [{"op": self.pick(["add", "replace", "remove", "bogus"]), "path": self.pick(["active", "userName",
                    "emails[type eq \"work\"].value", "", "x" * 300]), "value": self.pick([1, None, [], "x", {}])}
                   for _ in range(self.rng.randrange(1, 40))]  # fmt: skip
            payload = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops}
            return json.dumps(payload).encode(), [("Content-Type", SCIM_TYPE)]
        if choice == 6:
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 300))), []
        if choice == 7:
            return f'{{"client_id": "{self.pick(JUNK)}", "token": "{secret}"}}'.encode(), [
                ("Content-Type", "text/plain")
            ]
        return f"token={secret}&uuid=45b9313b-fa47-4786-baf1-62969dec31f2".encode(), [
            ("Content-Type", "application/x-www-form-urlencoded")
        ]

    def request(self, paths: list[str]) -> bytes:
        rng = self.rng
        grant = self.pick(self.grants) if self.grants else "A" * 32
        path = self.pick(paths).format(grant=grant, grant_id=grant[:16], junk=self.pick(JUNK))
        if rng.random() < 0.1:
            path += "?" + self.pick(JUNK)
        method = self.pick(METHODS)
        body, headers = self.body()
        secret = self.secret()
        headers += self.rng.sample(
            [("X-Api-Token", secret), ("X-Auth-Token", secret), ("Authorization", f"Bearer {secret}"),
             ("Authorization", f"Basic {secret}"), ("X-Api-Key", secret), ("User-Authorization", f"Bearer {secret}"),
             ("Cookie", f"PyramidAuth={secret}; PyramidAuth={grant}"), ("User-Identifier", self.pick(JUNK)),
             ("X-Impersonation-Reason", self.pick(JUNK)), ("X-Impersonation-Mode", self.pick(["read_only", "x"])),
             ("Accept", "text/html"), ("Origin", "http://evil.example"), ("Upgrade", "websocket"),
             ("Transfer-Encoding", "chunked"), ("Expect", "100-continue"), ("X_Api_Token", secret),
             ("X-Forwarded-For", self.pick(JUNK))],
            rng.randrange(0, 5),
        )  # fmt: skip
        length = len(body) if rng.random() < 0.9 else len(body) + rng.randrange(-3, 4)
        if not any(n == "Transfer-Encoding" for n, _ in headers):
            headers.append(("Content-Length", str(max(length, 0))))
        headers.append(("Connection", "close"))
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        head += "".join(f"{n}: {v}\r\n" for n, v in headers if "\r" not in v and "\n" not in v) + "\r\n"
        raw = head.encode("utf-8", "surrogatepass") + body
        if rng.random() < 0.03:  # not HTTP at all
            raw = self.pick([b"GET /\r\n\r\n", b"\x16\x03\x01\x00\xa5", b"GET / HTTP/2.0\r\n\r\n", b"\r\n\r\n",
                             b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"])  # fmt: skip
        return raw


async def send(port: int, raw: bytes) -> tuple[int | None, bytes]:
    """The status of the answer to ``raw`` (None when the connection closed without one) and its bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # a body shorter than its Content-Length ends here
        answer = await reader.read()
    except (ConnectionResetError, BrokenPipeError):
        return None, b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await writer.wait_closed()
    if not answer.startswith(b"HTTP/1."):
        return None, answer
    return int(answer.split(b" ", 2)[1]), answer


async def test_every_listener_survives_thousands_of_malformed_requests(tmp_path: Path) -> None:
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="app", headers={"Set-Cookie": "app_session=1; HttpOnly; Path=/"})

    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    upstream = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream).start()
    port, admin = free_port(), free_port()
    out, err = (tmp_path / "stdout.log").open("wb"), (tmp_path / "stderr.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config(tmp_path, upstream, port,
                            admin))], stdout=out, stderr=err, env=env)  # fmt: skip
    out.close()
    err.close()
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.log").read_text()
                await asyncio.sleep(0.05)
            grants = []
            native = f"http://127.0.0.1:{port}/v1/grants"
            actor = {"Authorization": "Bearer denovolab-demo-admin-token"}
            for _ in range(5):  # live grants for the requests to carry
                async with session.post(native, json={"app": "switch", "subject": "41"}, headers=actor) as minted:
                    assert minted.status == 201
                    grants.append((await minted.json())["token"])
        rng = random.Random(SEED)
        draw = Draw(rng, grants)
        work = [(port if i % 2 else admin, draw.request(MAIN_PATHS if i % 2 else ADMIN_PATHS)) for i in range(REQUESTS)]
        failures: list[str] = []
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int, target: int, raw: bytes) -> None:
            async with gate:
                try:
                    status, answer = await asyncio.wait_for(send(target, raw), DEADLINE)
                except TimeoutError:
                    failures.append(f"#{i} hung: {raw[:200]!r}")
                    return
                if status is not None and status >= 500:
                    failures.append(f"#{i} {status}: {raw[:300]!r} -> {answer[:300]!r}")

        started = time.monotonic()
        await asyncio.gather(*(one(i, target, raw) for i, (target, raw) in enumerate(work)))
        elapsed = time.monotonic() - started
        assert proc.poll() is None, "the gateway died"
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as health:
            assert health.status == 200
    finally:
        proc.terminate()
        proc.wait(30)
        await runner.cleanup()
    assert not failures, f"seed {SEED}, {len(failures)} of {REQUESTS} in {elapsed:.1f} s:\n" + "\n".join(failures[:20])
    logs = (tmp_path / "stdout.log").read_text(errors="replace") + (tmp_path / "stderr.log").read_text(errors="replace")
    assert "Traceback" not in logs
    leaked = [s for s in [*CREDENTIALS, *ADMIN_TOKENS, *grants] if s in logs]
    assert not leaked, f"secrets in the logs: {leaked}"
