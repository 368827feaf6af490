"""``make run``'s pieces, on free ports (never its own 8080, 8081 and 9001): the demo app and scripts/run-demo.sh say
in one line that a port is taken, run-demo.sh starts both processes and stops both, the demo's session app
(``switch``) holds its impersonations as sessions, and the Makefile installs the dev extras for the tests only."""

from __future__ import annotations

import asyncio
import html
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import aiohttp
import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv running the tests: its python and impersonation-gateway
TAKEN = "something else is already listening there"


def env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}, **extra}


@contextmanager
def listening(port: int) -> Iterator[None]:
    """Something else on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def wait_answering(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
    """Poll ``url`` until it answers 200 and return the body; fail if ``proc`` stops or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return await response.text()
            except aiohttp.ClientError:
                pass
            assert proc.poll() is None, f"stopped with {proc.returncode} before {url} answered"
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout} s"
            await asyncio.sleep(0.05)


def demo(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / "python"), "demo/downstream.py", "--port", str(port)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the demo app ---------------------------------------------------------------------------------------------
async def test_a_second_demo_app_on_the_same_port_says_so_in_one_line() -> None:
    port = free_port()
    first = demo(port)
    try:
        assert "not signed in" in await wait_answering(f"http://127.0.0.1:{port}/", first)
        second = demo(port)
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 2
        assert out.decode().splitlines() == [
            f"demo/downstream.py: error: cannot listen on 127.0.0.1:{port} (--port): {TAKEN}"
        ]
    finally:
        stop(first)
        if first.stdout is not None:
            first.stdout.close()


# -- scripts/run-demo.sh --------------------------------------------------------------------------------------
def demo_config(tmp_path: Path, gateway: int, admin: int, app: int, *, tokens: bool = True) -> Path:
    """config.yaml as make run serves it, on the given ports."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["server"].update(port=gateway, public_url=f"http://127.0.0.1:{gateway}")
    config["admin"]["port"] = admin
    if not tokens:
        config["admin"]["tokens"] = []
    config["directory"]["file"] = str(ROOT / "directory.yaml")
    for settings in config["apps"].values():
        settings["upstream"] = f"http://127.0.0.1:{app}"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(config: Path, app: int, out: int | IO[bytes] = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """scripts/run-demo.sh in a process group of its own, its output (both streams) to ``out``."""
    return subprocess.Popen(["bash", "scripts/run-demo.sh"], cwd=ROOT, start_new_session=True, stdout=out,
                            stderr=subprocess.STDOUT, env=env(VENV=str(BIN.parent), CONFIG=str(config),
                                                              DEMO_PORT=str(app)))  # fmt: skip


def end(proc: subprocess.Popen[bytes]) -> None:
    """Whatever happened, nothing of the run is left behind (the script's process group is its own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize(
    ("taken", "what"),
    [
        ("gateway", "the gateway's server.port"),
        ("admin", "the gateway's admin.port"),
        ("app", "the demo app's port, DEMO_PORT"),
    ],
)
def test_run_demo_says_in_one_line_that_a_port_is_taken(tmp_path: Path, taken: str, what: str) -> None:
    ports = {"gateway": free_port(), "admin": free_port(), "app": free_port()}
    config = demo_config(tmp_path, ports["gateway"], ports["admin"], ports["app"])
    with listening(ports[taken]):
        proc = run_demo(config, ports["app"])
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            end(proc)
    assert proc.returncode == 1
    assert out.decode().splitlines() == [
        f"make run: something is already listening on 127.0.0.1:{ports[taken]} ({what}) — is make run already running?"
    ]


def test_without_admin_tokens_the_admin_port_is_not_needed(tmp_path: Path) -> None:
    """No admin.tokens, no admin listener: its port may be taken (the run then fails on the next one, the app's)."""
    gateway, admin, app = free_port(), free_port(), free_port()
    config = demo_config(tmp_path, gateway, admin, app, tokens=False)
    with listening(admin), listening(app):
        proc = run_demo(config, app)
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            end(proc)
    assert proc.returncode == 1
    assert f"127.0.0.1:{app} (the demo app's port" in out.decode() and len(out.splitlines()) == 1


async def test_run_demo_starts_the_gateway_and_the_demo_app_and_stops_both(tmp_path: Path) -> None:
    gateway, admin, app = free_port(), free_port(), free_port()
    config = demo_config(tmp_path, gateway, admin, app)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = run_demo(config, app, out)
    try:
        await wait_answering(f"http://127.0.0.1:{gateway}/readyz", proc)
        assert "not signed in" in await wait_answering(f"http://127.0.0.1:{app}/", proc)
        first = log.read_text().splitlines()[0]
        assert first == (f"make run: the CLI is {BIN.parent}/bin/impersonation-gateway "
                         f"(or '. {BIN.parent}/bin/activate' first); Ctrl-C stops all")  # fmt: skip
        # the README's first command, and the demo app behind the gateway
        url = f"http://127.0.0.1:{gateway}/api/v3/resellers/1/user_authentication/token?account_id=505"
        headers = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
            assert response.status == 200
            assert list(await response.json(content_type=None)) == ["owner_email", "owner_token"]
        proc.send_signal(signal.SIGTERM)  # as `kill` of make run: the script stops both before it exits
        assert proc.wait(30) == 143
    finally:
        end(proc)
    assert all(bindable(port) for port in (gateway, admin, app)), log.read_text()[-2000:]


async def mint_switch(session: aiohttp.ClientSession, gateway: int, mode: str | None = None) -> str:
    """dialects.md's Denovolab request (``switch``, the demo's app with ``session``): the grant it answers."""
    headers = {"X-Auth-Token": "denovolab-demo-admin-token", **({"X-Impersonation-Mode": mode} if mode else {})}
    url = f"http://127.0.0.1:{gateway}/v1/auth/as_client"
    async with session.post(url, headers=headers, data='{"client_id": "41"}') as response:
        assert response.status == 200, await response.text()
        token: str = (await response.json(content_type=None))["token"]
        return token


async def test_the_demo_session_app_holds_a_session_and_its_pages_show_the_actor_and_mode(tmp_path: Path) -> None:
    """make run's switch: a redemption sets the gateway's session cookie (the demo app's own cookie stays in the
    gateway); every page of the session then names the customer, the actor of that request, the mode and the
    session; a read_only session's POST is refused, a full one's saves a note; ending it signs the browser out."""
    gateway, admin, app = free_port(), free_port(), free_port()
    config = demo_config(tmp_path, gateway, admin, app)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = run_demo(config, app, out)
    base = f"http://127.0.0.1:{gateway}"
    page = {"Accept": "text/html"}
    try:
        await wait_answering(f"{base}/readyz", proc)
        await wait_answering(f"http://127.0.0.1:{app}/", proc)
        for mode in ("full", "read_only"):
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
                token = await mint_switch(browser, gateway, mode)
                # the grant in its header carrier: redeemed by this GET, which starts the session
                async with browser.get(f"{base}/routing/rate_table", headers={**page, "X-Auth-Token": token}) as r:
                    assert r.status == 200, await r.text()
                    set_cookies = r.headers.getall("Set-Cookie", [])
                    assert [c.split("=", 1)[0] for c in set_cookies] == ["impersonation_session"], set_cookies
                    assert "HttpOnly" in set_cookies[0] and "SameSite=Lax" in set_cookies[0]
                    assert "demo_session" not in r.headers.get("Set-Cookie", "")
                async with browser.get(f"{base}/_impersonation/session") as r:
                    assert r.status == 200
                    held = await r.json()
                assert (held["app"], held["subject"], held["actor"], held["mode"]) == ("switch", "41", "admin-1", mode)
                async with browser.get(f"{base}/invoices", headers=page) as r:  # a later page: no grant, the session
                    assert r.status == 200
                    text = html.unescape(await r.text())
                assert "signed in as 41 — impersonated by admin-1" in text
                assert "acting for this request: admin-1 (this request's assertion)" in text
                assert f"mode: {mode}" in text and f"session: {held['session_id']}" in text
                assert 'href="/_impersonation/session"' in text and 'action="/notes"' in text
                async with browser.post(f"{base}/notes", data={"note": "called <back>"}, headers=page) as r:
                    if mode == "read_only":  # refused by the gateway: the app never sees it
                        assert r.status == 403
                        assert "read-only" in await r.text()
                    else:  # the app's 303 to /notes, followed
                        assert r.status == 200 and r.url.path == "/notes"
                        assert "<li>called &lt;back&gt;</li>" in await r.text()
                async with browser.post(f"{base}/_impersonation/end") as r:
                    assert r.status == 200
                async with browser.get(f"{base}/invoices", headers=page) as r:
                    assert "not signed in" in await r.text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
    finally:
        end(proc)
    assert all(bindable(port) for port in (gateway, admin, app)), log.read_text()[-2000:]


async def test_when_the_gateway_cannot_start_the_demo_app_is_stopped_too(tmp_path: Path) -> None:
    gateway, admin, app = free_port(), free_port(), free_port()
    config = demo_config(tmp_path, gateway, admin, app)
    config.write_text(config.read_text().replace("grant_ttl_seconds: 60", "grant_ttl_seconds: -1", 1))
    proc = run_demo(config, app)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        end(proc)
    text = out.decode()
    assert proc.returncode == 2, text
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("impersonation-gateway: error: "), text
    assert "grant_ttl_seconds" in errors[0] and "Traceback" not in text
    assert bindable(app)  # the demo app was stopped


# -- the Makefile ---------------------------------------------------------------------------------------------
def make_n(venv: Path, target: str) -> str:
    """What ``make TARGET`` would run with the venv at ``venv`` (``make -n``: nothing is run)."""
    make = shutil.which("make")
    assert make is not None, "make is not installed"
    done = subprocess.run([make, "-n", "-C", str(ROOT), f"VENV={venv}", target], capture_output=True, text=True,
                          check=True, env=env())  # fmt: skip
    return done.stdout


def test_make_run_installs_no_dev_extras_and_make_test_does(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run = make_n(venv, "run")
    assert "-m venv" in run and "pip install -e .\n" in run and ".[dev]" not in run
    assert "scripts/run-demo.sh" in run
    assert "pip install -e '.[dev]'" in make_n(venv, "test")
    for target in ("lint", "bench", "screenshots"):
        assert ".[dev]" in make_n(venv, target), target


def test_each_install_has_its_stamp(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch(mode=0o755)
    (venv / ".installed-run").touch()  # after `make run`
    assert "pip install" not in make_n(venv, "run")
    assert "pip install -e '.[dev]'" in make_n(venv, "test")  # the tests still need the dev extras
    (venv / ".installed-dev").touch()  # after `make test`: it holds all that make run needs
    assert "pip install" not in make_n(venv, "test") and "pip install" not in make_n(venv, "run")
    os.utime(venv / ".installed-run", (0, 0))  # older than pyproject.toml: install again
    assert "pip install -e .\n" in make_n(venv, "run")
