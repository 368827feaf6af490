"""An impersonation session through a real nginx in edge mode, in front of a real gateway process and an app.

The session is started by a redemption that nginx sends to the gateway; its later requests carry the session
cookie, so nginx sends them to the gateway too, which forwards them with the session's assertion; ``/_impersonation/``
paths are the gateway's; once the session has ended, a request is the app's own again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from bench.nginx import main_conf, nginx_binary
from gateway.cli import main as cli
from tests import processes
from tests.conftest import free_port
from tests.test_nginx import Seen, _wait_listening, app_recorder

ROOT = Path(__file__).resolve().parent.parent
APP = "switch"  # Denovolab: its link carrier is the query's token
ADMIN = {"X-Auth-Token": "denovolab-demo-admin-token"}


@dataclass
class Edge:
    nginx: str
    gateway_port: int
    app_port: int
    key: Any
    gateway: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def edge_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("edge-sessions")
    app_port, gateway_port, nginx_port = free_port(), free_port(), free_port()
    key = tmp / "assertion.pem"
    assert cli(["keys", "generate", str(key)]) == 0
    apps = yaml.safe_load((ROOT / "config.yaml").read_text())["apps"]
    for name, settings in apps.items():
        settings["upstream"] = f"http://127.0.0.1:{app_port}"
        settings["redeem_on_get"] = True
        settings.pop("session", None)
        if name == APP:
            settings["session"] = {}
    config = processes.write_config(
        tmp, "embedded", gateway_port, apps=apps, directory=yaml.safe_load((ROOT / "directory.yaml").read_text()),
        server={"port": gateway_port, "public_url": f"http://127.0.0.1:{nginx_port}",
                "trusted_proxies": ["127.0.0.1/32"]},
        assertion={"private_key_file": str(key)},
    )  # fmt: skip
    include = tmp / "gateway.conf"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with include.open("w") as out:
        subprocess.run([sys.executable, "-m", "gateway", "proxy-config", "nginx", "--config", str(config),
                        "--listen", f"127.0.0.1:{nginx_port}", "--access-log", "off"],
                       stdout=out, check=True, env=env)  # fmt: skip
    gateway = processes.start(config)
    nginx = subprocess.Popen([nginx_binary(), "-p", str(tmp), "-c", str(main_conf(tmp, include))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_listening(nginx_port, nginx, "nginx")
        _wait_listening(gateway_port, gateway, "the gateway")
        public = serialization.load_pem_private_key(key.read_bytes(), password=None).public_key()
        yield Edge(f"http://127.0.0.1:{nginx_port}", gateway_port, app_port, public, gateway)
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
        if nginx.stderr is not None:
            nginx.stderr.close()
        processes.stop(gateway)


@pytest.fixture
async def edge(edge_processes: Edge) -> AsyncIterator[tuple[Edge, list[Seen]]]:
    seen: list[Seen] = []
    runner = web.AppRunner(await app_recorder(seen), auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", edge_processes.app_port).start()
    await processes.wait_ready(f"http://127.0.0.1:{edge_processes.gateway_port}", edge_processes.gateway)
    try:
        yield edge_processes, seen
    finally:
        await runner.cleanup()


async def test_a_session_through_nginx(edge: tuple[Edge, list[Seen]]) -> None:
    proxy, seen = edge
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(proxy.nginx, cookie_jar=jar) as http:
        async with http.post("/v1/auth/as_client", json={"client_id": 41}, headers=ADMIN) as r:
            assert r.status == 200, await r.text()
            token = (await r.json())["token"]
        async with http.get(f"/welcome?token={token}") as r:  # the redemption: nginx sends it to the gateway
            assert r.status == 200
            assert "impersonation_session" in {c.key for c in jar}
        async with http.get("/dashboard") as r:  # the session's cookie: to the gateway, then to the app
            assert r.status == 200
        async with http.get("/_impersonation/session") as r:
            assert r.status == 200
            described = await r.json()
        async with http.post("/_impersonation/end") as r:
            assert r.status in (200, 303)
        assert "impersonation_session" not in {c.key for c in jar}  # the end cleared it
        async with http.get("/after") as r:
            assert r.status == 200
    welcome, dashboard, after = seen
    claims: dict[str, Any] = jwt.decode(dashboard.headers["x-impersonation-assertion"], proxy.key,
                                        algorithms=["EdDSA"], audience=APP)  # fmt: skip
    first = jwt.decode(welcome.headers["x-impersonation-assertion"], proxy.key, algorithms=["EdDSA"], audience=APP)
    assert (claims["sub"], claims["sid"], claims["mode"]) == ("41", described["session_id"], "full")
    assert claims["sid"] == first["sid"] and claims["jti"] != first["jti"]
    assert not any("impersonation_session" in c for c in dashboard.cookies)  # never the session cookie
    assert "x-impersonation-assertion" not in after.headers  # ended: the app's own request again
