"""Edge mode: the generated nginx configuration, its routing rule against the gateway's own, and a real nginx.

- A golden file pins what ``proxy-config nginx`` prints for a config with hosts, mounts, base paths, https
  and timeouts, and a real ``nginx -t`` accepts it.
- The maps nginx routes on are checked against :class:`gateway.carriers.Carriers`: whatever the gateway would
  take for a grant, nginx sends to the gateway (hypothesis, plus a table of spellings).
- A real nginx (Debian's) in front of a real gateway process and an app: every dialect mints and redeems
  through nginx; ordinary requests, uploads and WebSockets reach the app without touching the gateway; a
  forged assertion reaches the app on neither path; a live grant spelt as frameworks read a carrier goes to
  the gateway; the access log holds no grant, not even one in a path (``/x%3Ftoken=G``).
- Sessions: an app that holds them adds its cookie's map, an ``if`` on its route and ``/_impersonation/`` to the
  configuration, nothing else; the map's regex finds the cookie wherever the gateway's parser does, under its
  exact name only; a real nginx sends to a recording gateway exactly the requests carrying that app's cookie and
  its ``/_impersonation/`` paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from bench.nginx import main_conf, nginx_binary
from gateway.carriers import Carriers
from gateway.cli import main as cli
from gateway.config import config_from_dict
from gateway.dialects import Where, all_dialects
from gateway.nginx import LOWERED_TO, carrier_map, render, session_map
from tests import processes
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "nginx.conf"
DIALECTS = all_dialects()
GRANT = "AbCdEfGhIjKlMnOpQrStUvWxYz012-_9"  # a grant's shape (32 characters of base64url)

GOLDEN_CONFIG: dict[str, Any] = {
    "server": {"port": 8081, "public_url": "https://portal.example.com", "body_timeout_seconds": 20},
    "apps": {
        "control-panel": {"dialect": "activeplatform", "upstream": "http://127.0.0.1:9001"},
        "analytics": {"dialect": "pyramid", "upstream": "http://127.0.0.1:9002/base/", "mount": "/bi"},
        "switch": {"dialect": "denovolab", "upstream": "https://localhost", "hosts": ["switch.example.com"],
                   "read_timeout_seconds": 0, "connect_timeout_seconds": 2.5},
        "exchange": {"dialect": "btcdirect", "upstream": "http://[::1]:9004", "hosts": ["switch.example.com:443"],
                     "mount": "/x"},
    },
}  # fmt: skip


# -- the configuration --------------------------------------------------------------------------------------
def golden_text() -> str:
    config = config_from_dict(GOLDEN_CONFIG)
    return render(config, DIALECTS, listen="0.0.0.0:8080", gateway="127.0.0.1:8081", source="config.yaml")


def test_generated_configuration_is_the_golden_file() -> None:
    """Regenerate with ``python -c 'from tests.test_nginx import write_golden; write_golden()'`` after a change."""
    assert golden_text() == GOLDEN.read_text(), "the nginx configuration changed: review it and regenerate"


def write_golden() -> None:
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(golden_text())


@pytest.mark.parametrize("text", [golden_text, lambda: session_text()], ids=["golden", "with-sessions"])
def test_real_nginx_accepts_the_configuration(tmp_path: Path, text: Callable[[], str]) -> None:
    include = tmp_path / "gateway.conf"
    include.write_text(text().replace("/var/log/nginx/access.log", str(tmp_path / "access.log")))
    done = subprocess.run([nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(main_conf(tmp_path, include))],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_cli_prints_it_and_refuses_to_share_the_gateways_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(GOLDEN_CONFIG, sort_keys=False))
    assert cli(["proxy-config", "nginx", "--config", str(path), "--listen", "0.0.0.0:8080"]) == 0
    printed = capsys.readouterr().out
    assert printed == golden_text().replace("from config.yaml", f"from {path}")
    same = {**GOLDEN_CONFIG, "server": {**GOLDEN_CONFIG["server"], "port": 8080}}
    path.write_text(yaml.safe_dump(same, sort_keys=False))
    assert cli(["proxy-config", "nginx", "--config", str(path), "--listen", "127.0.0.1:8080"]) == 2
    assert "nginx would listen where the gateway does" in capsys.readouterr().err
    assert cli(["proxy-config", "nginx", "--config", str(path), "--listen", "nowhere"]) == 2
    assert "--listen: expected HOST:PORT" in capsys.readouterr().err


# -- nginx's routing rule against the gateway's ----------------------------------------------------------------
@dataclass
class Maps:
    """The generated maps, evaluated as nginx would (``~*`` is case-insensitive)."""

    patterns: dict[str, tuple[str, re.Pattern[str]]] = field(default_factory=dict)  # variable -> (source, regex)

    @classmethod
    def of(cls, carriers: Any) -> Maps:
        maps = cls()
        for carrier in carriers:
            text = carrier_map(carrier)
            if text is None:
                continue
            source, variable = text.split()[1:3]
            regex = re.search(r"'~\*(.*)' 1;", text)
            assert regex is not None
            maps.patterns[variable] = (source, re.compile(regex.group(1), re.IGNORECASE))
        return maps

    def routes(self, query: str, cookies: list[str], headers: dict[str, str]) -> bool:
        """Whether nginx sends the request to the gateway: ``$http_cookie`` joins every Cookie header with "; ",
        ``$http_<name>`` is a header's first line; nginx matches bytes (UTF-8 here), one character each."""
        values = {"$args": query, "$http_cookie": "; ".join(cookies)}
        values |= {"$http_" + k.lower().replace("-", "_"): v for k, v in headers.items()}
        values = {k: v.encode().decode("latin-1") for k, v in values.items()}
        return any(p.search(values.get(source, "")) for source, p in self.patterns.values())


ALL_CARRIERS = [c for d in DIALECTS.values() for c in d.carriers]
SEARCH = Carriers((d.name, d.carriers) for d in DIALECTS.values())
MAPS = Maps.of(ALL_CARRIERS)


def gateway_finds(query: str, cookies: list[str], headers: dict[str, str]) -> bool:
    all_headers: CIMultiDict[str] = CIMultiDict(headers)
    for cookie in cookies:
        all_headers.add("Cookie", cookie)
    return any(f.carrier.where is not Where.BODY for f in SEARCH.find(query, all_headers, "GET", "/"))


SPELLINGS = [
    (f"user_email=a%40b.c&user_token={GRANT}", [], {}),
    (f"USER_TOKEN={GRANT}&user_email=x", [], {}),
    (f"user%5Ftoken={GRANT}", [], {}),
    (f"u%73er_token={GRANT}", [], {}),
    (f"x=1;user_token={GRANT}", [], {}),
    (f"user_token=short&user_token={GRANT}", [], {}),
    (f"token={GRANT[:5]}%{ord(GRANT[5]):02X}{GRANT[6:]}", [], {}),  # the value percent-encoded
    (f"TOKEN={GRANT}&uuid=u", [], {}),
    ("", [f"PyramidAuth={GRANT}"], {}),
    ("", [f"pyramidauth={GRANT}"], {}),
    ("", [f'x="a;PyramidAuth={GRANT}"'], {}),
    ("", ["session=1", f"PyramidEmbeddedAuth={GRANT}"], {}),
    ("", [f"a=1, PyramidAuth = {GRANT} ; b=2"], {}),
    ("", [], {"X-Auth-Token": GRANT}),
    ("", [], {"x-auth-token": f"admin-token, {GRANT}"}),
    # as frameworks read a carrier (PHP, Rack, qs; URL parsers; schemes, quotes, padding, encoding)
    (f"user.token={GRANT}", [], {}),
    (f"user+token={GRANT}&user%2Eemail=x", [], {}),
    (f"user%20token={GRANT}", [], {}),
    (f"user[token={GRANT}", [], {}),
    (f"user_token[]={GRANT}", [], {}),
    (f"user_token%5B0%5D={GRANT}", [], {}),
    (f"token[]={GRANT}", [], {}),
    (f"token={GRANT}#f", [], {}),
    (f"a=1#token={GRANT}", [], {}),
    (f"token={GRANT}=", [], {}),
    (f"token={GRANT}%3D%3D", [], {}),
    (f"token=Bearer+{GRANT}", [], {}),
    (f"to%E2%84%AAen={GRANT}", [], {}),
    (f"to\u212aen={GRANT}", [], {}),
    ("", ["PyramidAuth=" + "".join(f"%{ord(c):02X}" for c in GRANT)], {}),
    ("", [f'PyramidAuth="{GRANT}=="'], {}),
    ("", [f"PyramidAuth={GRANT}%3D"], {}),
    ("", [], {"X-Auth-Token": f"Bearer {GRANT}"}),
    ("", [], {"X-Auth-Token": f"{GRANT}=="}),
    ("", [], {"X-Auth-Token": f'"{GRANT}"'}),
]


@pytest.mark.parametrize(("query", "cookies", "headers"), SPELLINGS)
def test_nginx_sends_every_spelling_of_a_grant_to_the_gateway(
    query: str, cookies: list[str], headers: dict[str, str]
) -> None:
    assert gateway_finds(query, cookies, headers)
    assert MAPS.routes(query, cookies, headers)


@pytest.mark.parametrize(
    ("query", "cookies", "headers"),
    [
        ("page=2&sort=name", ["session=abc"], {"Accept": "text/html"}),
        ("token=short", ["PyramidAuth=the-apps-own-session"], {"X-Auth-Token": "admin-token"}),
        (f"other={GRANT}", [f"other={GRANT}"], {"X-Other": GRANT}),
    ],
)
def test_ordinary_requests_go_straight_to_the_app(query: str, cookies: list[str], headers: dict[str, str]) -> None:
    assert not gateway_finds(query, cookies, headers)
    assert not MAPS.routes(query, cookies, headers)


def test_nginx_knows_every_character_python_lower_cases_into_ascii() -> None:
    """The gateway lower-cases decoded names with ``str.lower()``; nginx's maps spell out what that turns into an
    ASCII letter besides the ASCII capitals."""
    lowered = {c.lower(): c for c in map(chr, range(0x80, 0x110000)) if len(c.lower()) == 1 and c.lower().isascii()}
    assert lowered == LOWERED_TO


NAMES = sorted({c.name for c in ALL_CARRIERS} | {n for c in ALL_CARRIERS for _, n in c.bound} | {"x", "session"})
_shape = st.text(alphabet="AbZz09_-", min_size=30, max_size=34)
_values = _shape | st.just(GRANT) | st.text(max_size=8)
# How an app may find a value: as is, after a scheme, quoted, padded, with spaces about it.
_dressed = st.tuples(_values, st.sampled_from(["{}", "Bearer {}", '"{}"', "{}=", "{}==", " {} ", "\t{}"])).map(
    lambda pair: pair[1].format(pair[0])
)


def _spell(name: str, how: int) -> str:
    return [
        name, name.upper(), quote(name, safe=""), "".join(f"%{ord(c):02x}" for c in name),
        name.replace("_", "."), name.replace("_", "+"), name.replace("_", "%20"), name.replace("_", "["),
        name + "[]", name + "%5B0%5D", name.replace("k", "%E2%84%AA"), name.replace("k", "\u212a"),
    ][how]  # fmt: skip


def _cookie_value(value: str, encoded: bool) -> str:
    return "".join(f"%{ord(c):02X}" for c in value) if encoded else value


@settings(max_examples=500, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.sampled_from(NAMES), st.integers(0, 11), _dressed, st.sampled_from("&;#")), max_size=4),
    cookies=st.lists(
        st.lists(
            st.tuples(st.sampled_from(NAMES), _dressed, st.booleans(), st.sampled_from(["; ", ";", ", "])), max_size=3
        ),
        max_size=2,
    ),
    header=st.none() | _dressed,
)
def test_whatever_the_gateway_takes_for_a_grant_nginx_sends_to_it(
    pairs: list[tuple[str, int, str, str]], cookies: list[list[tuple[str, str, bool, str]]], header: str | None
) -> None:
    query = "".join(f"{sep if i else ''}{_spell(n, how)}={quote(v)}" for i, (n, how, v, sep) in enumerate(pairs))
    cookie_headers = [
        "".join(f"{sep if i else ''}{n}={_cookie_value(v, enc)}" for i, (n, v, enc, sep) in enumerate(c))
        for c in cookies
    ]
    headers = {} if header is None else {"X-Auth-Token": header}
    if gateway_finds(query, [c for c in cookie_headers if c], headers):
        assert MAPS.routes(query, [c for c in cookie_headers if c], headers), (query, cookie_headers, headers)


# -- a real nginx in front of a real gateway -----------------------------------------------------------------
@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]
    cookies: list[str]
    body_sha256: str
    body: bytes


@dataclass
class Edge:
    """nginx on ``url``, the gateway behind it on ``gateway``, the app on ``app_url``; what the app saw."""

    url: str
    gateway: str
    app_url: str
    seen: list[Seen]
    access_log: Path
    public_key: Any

    def counts(self) -> dict[str, float]:
        """The gateway's own count of the requests it served, by kind."""
        with socket.create_connection(("127.0.0.1", int(self.gateway.rsplit(":", 1)[1]))) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
        found = re.findall(r'gateway_request_duration_seconds_count\{kind="(\w+)"\} ([0-9.e+]+)', text)
        return {kind: float(n) for kind, n in found}

    def claims(self, seen: Seen, audience: str) -> dict[str, Any]:
        token = seen.headers["x-impersonation-assertion"]
        claims: dict[str, Any] = jwt.decode(token, self.public_key, algorithms=["EdDSA"], audience=audience)
        return claims


async def app_recorder(seen: list[Seen]) -> web.Application:
    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append(Seen(request.method, request.raw_path, {k.lower(): v for k, v in request.headers.items()},
                         request.headers.getall("Cookie", []), hashlib.sha256(body).hexdigest(), body))  # fmt: skip
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse(protocols=("chat",))
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str("echo:" + message.data)
            return ws
        return web.json_response({"path": request.raw_path, "n": len(seen)})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", record)
    return app


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what} did not start on {port}") from None
            time.sleep(0.02)


@dataclass
class EdgeProcesses:
    app_port: int
    gateway_port: int
    nginx_port: int
    access_log: Path
    key: Path
    gateway: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def edge_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeProcesses]:
    """nginx and a gateway (embedded store) for an app on a port the module's event loop will serve."""
    with start_edge(tmp_path_factory.mktemp("edge")) as started:
        yield started


@contextlib.contextmanager
def start_edge(tmp: Path, dress: Callable[[dict[str, Any]], None] = lambda apps: None) -> Iterator[EdgeProcesses]:
    """nginx (``proxy-config nginx``'s output) in front of a gateway process (embedded store) for the demo's apps,
    ``dress``ed first, all sent to an app port the caller serves; stopped on the way out."""
    app_port, gateway_port, nginx_port = free_port(), free_port(), free_port()
    key = tmp / "assertion.pem"
    assert cli(["keys", "generate", str(key)]) == 0
    apps = yaml.safe_load((ROOT / "config.yaml").read_text())["apps"]
    for settings_ in apps.values():
        settings_["upstream"] = f"http://127.0.0.1:{app_port}"
    dress(apps)
    directory = yaml.safe_load((ROOT / "directory.yaml").read_text())
    config = processes.write_config(
        tmp, "embedded", gateway_port, apps=apps, directory=directory,
        server={"port": gateway_port, "public_url": f"http://127.0.0.1:{nginx_port}",
                "trusted_proxies": ["127.0.0.1/32"]},
        assertion={"private_key_file": str(key)},
    )  # fmt: skip
    include, access_log = tmp / "gateway.conf", tmp / "access.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    command = [sys.executable, "-m", "gateway", "proxy-config", "nginx", "--config", str(config),
               "--listen", f"127.0.0.1:{nginx_port}", "--access-log", str(access_log)]  # fmt: skip
    with include.open("w") as out:
        subprocess.run(command, stdout=out, check=True, env=env)
    gateway = processes.start(config)
    nginx = subprocess.Popen([nginx_binary(), "-p", str(tmp), "-c", str(main_conf(tmp, include))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_listening(nginx_port, nginx, "nginx")
        _wait_listening(gateway_port, gateway, "the gateway")
        yield EdgeProcesses(app_port, gateway_port, nginx_port, access_log, key, gateway)
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
async def edge(edge_processes: EdgeProcesses) -> AsyncIterator[Edge]:
    """The app, served by this test's event loop on the port nginx and the gateway send it to."""
    p = edge_processes
    seen: list[Seen] = []
    runner = web.AppRunner(await app_recorder(seen), auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", p.app_port).start()
    await processes.wait_ready(f"http://127.0.0.1:{p.gateway_port}", p.gateway)
    key = serialization.load_pem_private_key(p.key.read_bytes(), password=None)
    try:
        yield Edge(f"http://127.0.0.1:{p.nginx_port}", f"127.0.0.1:{p.gateway_port}",
                   f"http://127.0.0.1:{p.app_port}", seen, p.access_log, key.public_key())  # fmt: skip
    finally:
        await runner.cleanup()


async def test_every_dialect_mints_and_redeems_through_nginx(edge: Edge) -> None:
    before = edge.counts()
    async with aiohttp.ClientSession(edge.url) as http:
        # ActivePlatform: a link, its confirmation page and the confirming POST
        async with http.get("/api/v3/resellers/1/user_authentication/token?account_id=505",
                            headers={"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}) as r:  # fmt: skip
            assert r.status == 200, await r.text()
            ap = await r.json(content_type="application/vnd.api+json")
        link = f"/welcome?user_email={quote(ap['owner_email'])}&user_token={ap['owner_token']}"
        async with http.get(link) as r:
            assert r.status == 200 and "Continue sign-in" in await r.text()
        async with http.post(link, data={"impersonation_confirm": "1"}) as r:
            assert r.status == 200
        # Pyramid: the cookie
        login = {"token": "pyramid-enterprise-admin-token", "userIdentity": "jdoe"}
        async with http.post("/API3/authentication/authenticateUserByToken", json=login) as r:
            assert r.status == 200
            pyramid = await r.text()
        async with http.get("/reports", headers={"Cookie": f"theme=dark; PyramidAuth={pyramid}"}) as r:
            assert r.status == 200
        # Denovolab: the API grant in X-Auth-Token
        async with http.post("/v1/auth/as_client", json={"client_id": 41},
                             headers={"X-Auth-Token": "denovolab-demo-admin-token"}) as r:  # fmt: skip
            assert r.status == 200
            cdr = (await r.json())["cdr_api_token"]
        async with http.get("/cdr?day=1", headers={"X-Auth-Token": cdr}) as r:
            assert r.status == 200
        # BTC Direct: login-with-token, a body carrier
        async with http.get("/api/v1/user/login-token", headers={"Authorization": "Bearer btcdirect-partner-demo-token",
                            "User-Identifier": "7c3f9a1e2b4d6f8091a3c5e7f9b1d3e5a7c9e1f3"}) as r:  # fmt: skip
            assert r.status == 200
            btc = await r.json()
        async with http.post(
            "/api/v2/user/login-with-token", json={"uuid": btc["uuid"], "token": btc["token"], "x": 1}
        ) as r:
            assert r.status == 200
    welcome, reports, cdr_seen, login = edge.seen
    assert (welcome.method, welcome.raw_path) == ("GET", "/welcome")
    assert edge.claims(welcome, "control-panel")["sub"] == "505"
    assert (reports.raw_path, reports.cookies) == ("/reports", ["theme=dark"])
    assert edge.claims(reports, "analytics")["sub"] == "jdoe"
    assert cdr_seen.raw_path == "/cdr?day=1" and "x-auth-token" not in cdr_seen.headers
    assert edge.claims(cdr_seen, "switch")["scope"] == "cdr_api"
    assert (login.raw_path, login.body) == ("/api/v2/user/login-with-token", b'{"x":1}')
    assert edge.claims(login, "exchange")["sub"] == "u-1"
    after = edge.counts()
    assert after.get("mint", 0) - before.get("mint", 0) == 4
    assert after.get("redeem", 0) - before.get("redeem", 0) == 5  # the link's page, then 4 redemptions
    log = edge.access_log.read_text()
    for secret in (ap["owner_token"], pyramid, cdr, btc["token"]):
        assert secret not in log


async def test_the_native_api_through_nginx(edge: Edge) -> None:
    before = edge.counts()
    async with aiohttp.ClientSession(edge.url) as http:
        async with http.post("/v1/grants", json={"app": "control-panel", "subject": "505"},
                             headers={"Authorization": "Bearer vY5fwetestK3gJXZH5uHCw"}) as r:  # fmt: skip
            assert r.status == 201, await r.text()
            grant = await r.json()
        link = grant["login_url"].split("/", 3)[3]
        async with http.post("/" + link, data={"impersonation_confirm": "1"}) as r:
            assert r.status == 200
    assert edge.claims(edge.seen[-1], "control-panel")["jti"] == grant["grant_id"]
    after = edge.counts()
    assert after.get("mint", 0) - before.get("mint", 0) == 1
    assert grant["token"] not in edge.access_log.read_text()


async def test_ordinary_traffic_never_touches_the_gateway(edge: Edge) -> None:
    before = edge.counts()
    upload = os.urandom(3 * 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(upload), 65536):
            yield upload[i : i + 65536]

    async with aiohttp.ClientSession(edge.url) as http:
        async with http.get("/dashboard?tab=1&token=short", headers={"Cookie": "PyramidAuth=own-session"}) as r:
            assert r.status == 200
        async with http.post("/upload", data=chunks(), headers={"Content-Type": "application/octet-stream"}) as r:
            assert r.status == 200
        async with http.ws_connect("/live", protocols=("chat",)) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("hello")
            assert (await ws.receive()).data == "echo:hello"
        async with http.get("/healthz") as r:  # an app's own path, in edge mode
            assert r.status == 200 and await r.json() == {"path": "/healthz", "n": 4}
    page, upload_seen, live, health = edge.seen
    assert (page.raw_path, page.cookies) == ("/dashboard?tab=1&token=short", ["PyramidAuth=own-session"])
    assert upload_seen.body_sha256 == hashlib.sha256(upload).hexdigest()
    assert live.raw_path == "/live" and health.raw_path == "/healthz"
    after = edge.counts()
    assert [after.get(k, 0) - before.get(k, 0) for k in ("pass", "redeem", "mint", "info")] == [0, 0, 0, 0]


async def test_a_forged_assertion_reaches_the_app_on_neither_path(edge: Edge) -> None:
    forged = {"X-Impersonation-Assertion": "forged.jwt.value"}
    async with aiohttp.ClientSession(edge.url) as http:
        async with http.get("/plain", headers=forged) as r:
            assert r.status == 200
        async with http.post("/v1/auth/as_client", json={"client_id": 41},
                             headers={"X-Auth-Token": "denovolab-demo-admin-token"}) as r:  # fmt: skip
            cdr = (await r.json())["cdr_api_token"]
        async with http.get("/cdr", headers={**forged, "X-Auth-Token": cdr}) as r:
            assert r.status == 200
    # nginx drops header names with underscores; aiohttp's client would not send one, so raw bytes here
    reader, writer = await asyncio.open_connection("127.0.0.1", int(edge.url.rsplit(":", 1)[1]))
    writer.write(b"GET /under HTTP/1.1\r\nHost: x\r\nX_Impersonation_Assertion: forged\r\nConnection: close\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
    plain, redeemed, under = edge.seen
    assert "x-impersonation-assertion" not in plain.headers
    assert edge.claims(redeemed, "switch")["sub"] == "41"  # the gateway's own, verified
    assert not any("impersonation" in name for name in under.headers)


async def test_misspelt_carriers_still_reach_the_gateway(edge: Edge) -> None:
    """A case-variant carrier name goes to the gateway, which takes it for what it is: the app never sees it."""
    async with aiohttp.ClientSession(edge.url) as http:
        async with http.get("/api/v3/resellers/1/user_authentication/token?account_id=505",
                            headers={"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}) as r:  # fmt: skip
            ap = await r.json(content_type="application/vnd.api+json")
        link = f"/page?User_Email={quote(ap['owner_email'])}&USER_TOKEN={ap['owner_token']}"
        async with http.get(link) as r:
            assert "Continue sign-in" in await r.text()
        async with http.put(link) as r:  # a link is for GET and POST only
            assert r.status == 401
        async with http.post(link, data={"impersonation_confirm": "1"}) as r:
            assert r.status == 200
    (seen,) = edge.seen
    assert seen.raw_path == "/page" and edge.claims(seen, "control-panel")["sub"] == "505"


async def raw_request(edge: Edge, target: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A GET written byte for byte to nginx (aiohttp's client would drop a fragment or re-encode the target); its
    whole answer, once nginx closed the connection (after writing the access log line)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(edge.url.rsplit(":", 1)[1]))
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def live_grants(edge: Edge) -> dict[str, str]:
    """One live grant per carrier kind of the demo: an ActivePlatform link, a Pyramid cookie, a Denovolab header."""
    async with aiohttp.ClientSession(edge.url) as http:
        async with http.get("/api/v3/resellers/1/user_authentication/token?account_id=505",
                            headers={"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}) as r:  # fmt: skip
            link = (await r.json(content_type="application/vnd.api+json"))["owner_token"]
        login = {"token": "pyramid-enterprise-admin-token", "userIdentity": "jdoe"}
        async with http.post("/API3/authentication/authenticateUserByToken", json=login) as r:
            cookie = await r.text()
        async with http.post("/v1/auth/as_client", json={"client_id": 41},
                             headers={"X-Auth-Token": "denovolab-demo-admin-token"}) as r:  # fmt: skip
            header = (await r.json())["cdr_api_token"]
    return {"link": link, "cookie": cookie, "header": header}


EMAIL = "user_email=example%40activeplatform.com"
EDGE_SPELLINGS = [
    pytest.param("link", lambda g: (f"/p?{EMAIL}&user.token={g}", []), id="user.token"),
    pytest.param("link", lambda g: (f"/p?{EMAIL}&user+token={g}", []), id="user+token"),
    pytest.param("link", lambda g: (f"/p?{EMAIL}&user%20token={g}", []), id="user%20token"),
    pytest.param("link", lambda g: (f"/p?{EMAIL}&user_token[]={g}", []), id="user_token[]"),
    pytest.param("link", lambda g: (f"/p?{EMAIL}&user_token[0]={g}", []), id="user_token[0]"),
    pytest.param("link", lambda g: (f"/p?{EMAIL}&user_token={g}==", []), id="padded"),
    pytest.param("link", lambda g: (f"/p?{EMAIL}&user_token={g}#f", []), id="fragment"),
    pytest.param("cookie", lambda g: (f"/p?token[]={g}", []), id="token[]"),
    pytest.param("cookie", lambda g: (f"/p?to%E2%84%AAen={g}", []), id="kelvin"),
    pytest.param("header", lambda g: ("/p", [("X-Auth-Token", f"Bearer {g}")]), id="bearer"),
    pytest.param("header", lambda g: ("/p", [("X-Auth-Token", f"{g}=")]), id="padded-header"),
    pytest.param(
        "cookie",
        lambda g: ("/p", [("Cookie", "PyramidAuth=" + "".join(f"%{ord(c):02X}" for c in g))]),
        id="encoded-cookie",
    ),
    pytest.param("cookie", lambda g: ("/p", [("Cookie", f'PyramidAuth="{g}"')]), id="quoted-cookie"),
]


@pytest.mark.parametrize(("kind", "spell"), EDGE_SPELLINGS)
async def test_a_live_grant_spelt_as_frameworks_read_it_goes_to_the_gateway(
    edge: Edge, kind: str, spell: Callable[[str], tuple[str, list[tuple[str, str]]]]
) -> None:
    """nginx sends it to the gateway, which answers with a link's confirmation page or redeems it: the app never
    receives the grant."""
    grant = (await live_grants(edge))[kind]
    target, headers = spell(grant)
    before = edge.counts()
    answer = await raw_request(edge, target, headers)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert edge.counts().get("redeem", 0) - before.get("redeem", 0) == 1
    if "?" in target:  # a link: the gateway's page, whose POST would redeem it
        assert b"Continue sign-in" in answer and edge.seen == []
    else:  # redeemed: the app got the gateway's assertion instead
        (seen,) = edge.seen
        assert edge.claims(seen, "analytics" if kind == "cookie" else "switch")["sub"] in ("jdoe", "41")
        assert grant not in repr(seen)


async def test_a_grant_in_the_path_stays_out_of_the_access_log(edge: Edge) -> None:
    """``$uri`` would decode ``/x%3Ftoken=G`` into the log; the raw path is logged, and "-" for one holding a
    grant-shaped run."""
    grant = (await live_grants(edge))["link"]
    spelt = "".join(f"%{ord(c):02x}" for c in grant[:8]) + grant[8:]
    for target in (f"/x%3Ftoken={grant}", f"/x%3Fuser_token%3D{spelt}", f"/x/{grant}", "/plain%3Fpage=2?q=secret"):
        assert (await raw_request(edge, target)).startswith(b"HTTP/1.1 200")
    log = edge.access_log.read_text()
    assert grant not in log and grant[8:] not in log and "secret" not in log
    paths = [re.search(r'"GET (\S+) HTTP/1.1" 200 ', line) for line in log.splitlines()[-4:]]
    assert [m.group(1) if m else None for m in paths] == ["-", "-", "-", "/plain%3Fpage=2"], log


# -- impersonation sessions ------------------------------------------------------------------------------------
COOKIE, HOST_COOKIE = "impersonation_session", "__Host-impersonation_session"
# The golden config with two apps holding sessions: control-panel on the https public URL (the __Host- name),
# exchange on an http one of its own (the plain name); analytics and switch, which share their routes, do not.
SESSION_CONFIG: dict[str, Any] = {
    **GOLDEN_CONFIG,
    "apps": {
        **GOLDEN_CONFIG["apps"],
        "control-panel": {**GOLDEN_CONFIG["apps"]["control-panel"], "session": {}},
        "exchange": {**GOLDEN_CONFIG["apps"]["exchange"], "session": {"mode": "read_only"},
                     "public_url": "http://switch.example.com"},
    },
}  # fmt: skip


def session_text() -> str:
    config = config_from_dict(SESSION_CONFIG)
    return render(config, DIALECTS, listen="0.0.0.0:8080", gateway="127.0.0.1:8081", source="config.yaml")


def _without_sessions(text: str) -> str:
    """``text`` without what sessions add: the cookie maps, the ``/_impersonation/`` locations and the ``if``s."""
    text = re.sub(r"map \$http_cookie \$igw_session_\w+ \{\n.*?\n\}\n\n", "", text, flags=re.S)
    text = re.sub(r"    location \^~ \S*/_impersonation/ \{\n.*?\n    \}\n", "", text, flags=re.S)
    return re.sub(r"        if \(\$igw_session_\w+\) .*\n", "", text)


def _locations(text: str) -> dict[tuple[str, str], str]:
    """Each location's body, by its server's ``server_name`` and its own argument."""
    found: dict[tuple[str, str], str] = {}
    for server in text.split("\nserver {\n")[1:]:
        name = re.search(r"server_name ([^;]*);", server)
        assert name is not None
        for where, body in re.findall(r"\n    location ([^\n]*?) \{[^\n]*\n(.*?)\n    \}", server, re.S):
            found[(name.group(1), where)] = body
    return found


def test_sessions_add_their_cookie_and_paths_and_nothing_else() -> None:
    text = session_text()
    assert _without_sessions(text) == golden_text()
    assert text.count("map $http_cookie $igw_session_") == 2
    locations = _locations(text)
    variables = {where: re.findall(r"\$igw_session_\w+", body) for where, body in locations.items()}
    host, plain = "$igw_session___host_impersonation_session", "$igw_session_impersonation_session"
    assert variables[("_", "/")] == [host]  # control-panel
    assert variables[("_", "= /bi")] == variables[("_", "/bi/")] == []  # analytics: no session
    assert variables[("switch.example.com", "= /x")] == variables[("switch.example.com", "/x/")] == [plain]
    assert variables[("switch.example.com", "/")] == []  # switch: no session
    paths = [where for where in locations if "_impersonation" in where[1]]
    assert paths == [("switch.example.com", "^~ /x/_impersonation/"), ("_", "^~ /_impersonation/")]
    assert all("proxy_pass http://igw_gateway;" in locations[where] for where in paths)


def gateway_reads(name: str, cookie: str) -> bool:
    """Whether the gateway finds the session cookie ``name`` in a request's ``Cookie`` header (``request.cookies``)."""
    return name in make_mocked_request("GET", "/", headers=CIMultiDict({"Cookie": cookie})).cookies


def nginx_routes(name: str, cookies: list[str]) -> bool:
    """Whether the generated map sets its variable: ``$http_cookie`` joins the Cookie headers with "; "; nginx
    matches bytes (UTF-8 here), one character each, case-sensitively (``~``)."""
    regex = re.search(r"'~(.*)' 1;", session_map(name))
    assert regex is not None
    return re.search(regex.group(1), "; ".join(cookies).encode().decode("latin-1")) is not None


SESSION_COOKIES = [
    (COOKIE, "impersonation_session=v", True),
    (COOKIE, "a=1; impersonation_session=v", True),
    (COOKIE, "a=1;impersonation_session=v", True),
    (COOKIE, "a=1, impersonation_session=v", True),  # a pair also begins after white space
    (COOKIE, "a=1;\u00a0impersonation_session=v", True),  # aiohttp strips Unicode's white space too
    (COOKIE, "a=1;\x1cimpersonation_session\u3000=v", True),
    (COOKIE, " impersonation_session = v ; b=2", True),
    (COOKIE, "impersonation_session", True),
    (COOKIE, "ximpersonation_session=1", False),
    (COOKIE, "impersonation_sessionx=1", False),
    (COOKIE, "x_impersonation_session=1; impersonation_session_x=2", False),
    (COOKIE, "a=1,impersonation_session=v", False),  # one value, "1,impersonation_session=v"
    (COOKIE, "Impersonation_Session=v", False),
    (COOKIE, "__Host-impersonation_session=v", False),
    (HOST_COOKIE, "__Host-impersonation_session=v", True),
    (HOST_COOKIE, "a=1; __Host-impersonation_session=v", True),
    (HOST_COOKIE, "impersonation_session=v", False),
    (HOST_COOKIE, "__host-impersonation_session=v", False),
    (HOST_COOKIE, "x__Host-impersonation_session=v; __Host-impersonation_sessions=v", False),
]


@pytest.mark.parametrize(("name", "cookie", "found"), SESSION_COOKIES)
def test_nginx_finds_the_session_cookie_by_its_exact_name(name: str, cookie: str, found: bool) -> None:
    assert gateway_reads(name, cookie) is found
    assert nginx_routes(name, [cookie]) is found
    assert nginx_routes(name, ["theme=dark", cookie]) is found  # in a second Cookie header


_PIECES = [COOKIE, HOST_COOKIE, "x", "ximpersonation_session", "impersonation_sessionx", "=", "v", '"', ";", " ",
           ",", "\t", "\u00a0", "\u3000", "\x1c", "\u00e9", "Mon, 01-Jan-2024 00:00:00 GMT"]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(cookie=st.lists(st.sampled_from(_PIECES), max_size=10).map("".join))
def test_whenever_the_gateway_reads_a_session_cookie_nginx_sends_it_the_request(cookie: str) -> None:
    for name in (COOKIE, HOST_COOKIE):
        if gateway_reads(name, cookie):
            assert nginx_routes(name, [cookie]), (name, cookie)


@dataclass
class SessionEdge:
    """nginx on ``port`` in front of two recorders: one standing in for the gateway, one for every app."""

    port: int
    gateway: list[Seen]
    app: list[Seen]


@pytest.fixture
async def session_edge(tmp_path: Path) -> AsyncIterator[SessionEdge]:
    app_port, gateway_port, nginx_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{app_port}"
    config = config_from_dict({
        "server": {"port": gateway_port, "public_url": f"http://127.0.0.1:{nginx_port}"},
        "apps": {
            "held": {"dialect": "activeplatform", "upstream": upstream, "session": {}},
            "plain": {"dialect": "pyramid", "upstream": upstream, "mount": "/plain"},
            "secure": {"dialect": "denovolab", "upstream": upstream, "hosts": ["secure.example"],
                       "public_url": "https://secure.example", "session": {}},
        },
    })  # fmt: skip
    include = tmp_path / "gateway.conf"
    include.write_text(render(config, DIALECTS, listen=f"127.0.0.1:{nginx_port}",
                              gateway=f"127.0.0.1:{gateway_port}", access_log="off"))  # fmt: skip
    edge = SessionEdge(nginx_port, [], [])
    runners = []
    for seen, port in ((edge.gateway, gateway_port), (edge.app, app_port)):
        runner = web.AppRunner(await app_recorder(seen))
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()
    nginx = subprocess.Popen([nginx_binary(), "-p", str(tmp_path), "-c", str(main_conf(tmp_path, include, 1))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_listening(nginx_port, nginx, "nginx")
        yield edge
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
        for runner in runners:
            await runner.cleanup()


async def send(port: int, method: str, target: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """A request written byte for byte (repeated headers stay repeated); the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = [*headers, *([] if any(k == "Host" for k, _ in headers) else [("Host", "127.0.0.1")])]
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in sent), "Content-Length: 0", "Connection: close"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


SECURE = ("Host", "secure.example")
SESSION_ROUTING = [
    pytest.param("GET", "/page", [("Cookie", f"{COOKIE}=s")], "gateway", id="session-cookie"),
    pytest.param("GET", "/page", [("Cookie", f"theme=dark; {COOKIE}=s")], "gateway", id="second-cookie"),
    pytest.param("GET", "/page", [("Cookie", "theme=dark"), ("Cookie", f"{COOKIE}=s")], "gateway", id="second-line"),
    pytest.param("GET", "/page", [("Cookie", f"x{COOKIE}=1")], "app", id="longer-name"),
    pytest.param("GET", "/page", [("Cookie", f"{COOKIE}x=1; {HOST_COOKIE}=s")], "app", id="others-names"),
    pytest.param("POST", "/_impersonation/end", [], "gateway", id="end"),
    pytest.param("GET", "/_impersonation/session", [], "gateway", id="session-info"),
    pytest.param("GET", "/%5Fimpersonation/session", [], "gateway", id="encoded-path"),
    pytest.param("GET", "/page?a=1", [("Cookie", "theme=dark")], "app", id="ordinary"),
    pytest.param("GET", "/plain/page", [("Cookie", f"{COOKIE}=s")], "app", id="app-without-session"),
    pytest.param("POST", "/plain/_impersonation/end", [], "app", id="app-without-session-end"),
    pytest.param("GET", "/page", [SECURE, ("Cookie", f"{HOST_COOKIE}=s")], "gateway", id="host-prefixed"),
    pytest.param("GET", "/page", [SECURE, ("Cookie", f"{COOKIE}=s")], "app", id="https-app-plain-name"),
    pytest.param("POST", "/_impersonation/end", [SECURE], "gateway", id="https-app-end"),
]


@pytest.mark.parametrize(("method", "target", "headers", "to"), SESSION_ROUTING)
async def test_real_nginx_sends_sessions_to_the_gateway(
    session_edge: SessionEdge, method: str, target: str, headers: list[tuple[str, str]], to: str
) -> None:
    answer = await send(session_edge.port, method, target, headers)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    (seen,) = session_edge.gateway if to == "gateway" else session_edge.app
    assert (session_edge.app if to == "gateway" else session_edge.gateway) == []
    assert seen.method == method
    if to == "gateway":  # the gateway sees the request as sent
        assert seen.raw_path == target
        assert seen.cookies == [v for k, v in headers if k == "Cookie"]


def test_nginx_waits_for_the_gateway_longer_than_the_gateway_waits_for_an_app() -> None:
    """The gateway answers a slow app itself (504 in the dialect's shape) before nginx gives up on the gateway;
    requests nginx sends to an app directly wait just as long as the gateway would."""
    apps = {"control-panel": {"dialect": "activeplatform", "upstream": "http://127.0.0.1:9001",
                              "read_timeout_seconds": 30, "connect_timeout_seconds": 2},
            "analytics": {"dialect": "pyramid", "upstream": "http://127.0.0.1:9002", "mount": "/bi",
                          "read_timeout_seconds": 10, "connect_timeout_seconds": 1}}  # fmt: skip
    text = render(config_from_dict({"server": {"port": 8081}, "apps": apps}), DIALECTS, listen="0.0.0.0:8080",
                  gateway="127.0.0.1:8081", source="config.yaml")  # fmt: skip
    blocks = [b for b in text.split("\n    location ")[1:] if "proxy_read_timeout" in b]
    to_gateway = {b.split("proxy_read_timeout ")[1].split(";")[0] for b in blocks if "http://igw_gateway;" in b}
    to_apps = {b.split("proxy_read_timeout ")[1].split(";")[0] for b in blocks if "http://igw_gateway;" not in b}
    assert to_gateway == {"37s"}  # the longest wait for an app (2 + 30 s) and 5 s more
    assert to_apps == {"30s", "10s"}
