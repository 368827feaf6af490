"""An impersonation session through a real nginx in edge mode, in front of a real gateway process and an app.

The session is started by a redemption that nginx sends to the gateway; its later requests carry the session
cookie, so nginx sends them to the gateway too, which forwards them with the session's assertion; ``/_impersonation/``
paths are the gateway's; once the session has ended, a request is the app's own again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from tests import processes
from tests.test_nginx import EdgeProcesses, Seen, app_recorder, start_edge

ROOT = Path(__file__).resolve().parent.parent
APP = "switch"  # Denovolab: its link carrier is the query's token
ADMIN = {"X-Auth-Token": "denovolab-demo-admin-token"}


@pytest.fixture(scope="module")
def edge_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeProcesses]:
    def dress(apps: dict[str, Any]) -> None:  # every link redeems on GET; only APP holds sessions
        for name, settings in apps.items():
            settings["redeem_on_get"] = True
            settings.pop("session", None)
            if name == APP:
                settings["session"] = {}

    with start_edge(tmp_path_factory.mktemp("edge-sessions"), dress) as started:
        yield started


@pytest.fixture
async def edge(edge_processes: EdgeProcesses) -> AsyncIterator[tuple[EdgeProcesses, list[Seen]]]:
    seen: list[Seen] = []
    runner = web.AppRunner(await app_recorder(seen), auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", edge_processes.app_port).start()
    await processes.wait_ready(f"http://127.0.0.1:{edge_processes.gateway_port}", edge_processes.gateway)
    try:
        yield edge_processes, seen
    finally:
        await runner.cleanup()


async def test_a_session_through_nginx(edge: tuple[EdgeProcesses, list[Seen]]) -> None:
    proxy, seen = edge
    key = serialization.load_pem_private_key(proxy.key.read_bytes(), password=None).public_key()
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(f"http://127.0.0.1:{proxy.nginx_port}", cookie_jar=jar) as http:
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
    claims: dict[str, Any] = jwt.decode(dashboard.headers["x-impersonation-assertion"], key,
                                        algorithms=["EdDSA"], audience=APP)  # fmt: skip
    first = jwt.decode(welcome.headers["x-impersonation-assertion"], key, algorithms=["EdDSA"], audience=APP)
    assert (claims["sub"], claims["sid"], claims["mode"]) == ("41", described["session_id"], "full")
    assert claims["sid"] == first["sid"] and claims["jti"] != first["jti"]
    assert not any("impersonation_session" in c for c in dashboard.cookies)  # never the session cookie
    assert "x-impersonation-assertion" not in after.headers  # ended: the app's own request again
