"""A person's first minutes, in a real browser: Debian's Chromium, driven by Playwright, against the demo — the
gateway and the demo app as real processes on a real Redis, with the demo's config and directory.

Mint through a dialect (ActivePlatform, with a reason), open the login link (the confirmation page a browser
without script sees), sign in (the demo app names the customer and who acts as them), open the link again (the
refusal page). Then, with the app holding impersonation sessions: the gateway's banner on the app's pages, and
its End button signing the browser out. Each step is a screenshot: in a temporary folder, or in
``$SCREENSHOTS_DIR`` (``make screenshots`` writes the README's, in ``docs/``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
import yaml
from playwright.async_api import Browser, Page, async_playwright

from gateway.assertion import generate_key_file
from tests import processes
from tests.conftest import RedisServer, free_port

ROOT = Path(__file__).parent.parent
REASON = "ticket 4711: customer cannot see last month's invoices"


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "chromium is not installed (apt-get install chromium; make test installs it): the browser test needs it"
    )


@dataclass
class Demo:
    gateway: str
    shots: Path


@asynccontextmanager
async def running_demo(tmp_path: Path, redis_server: RedisServer, session_app: str | None) -> AsyncIterator[Demo]:
    """``make run``'s demo on a real Redis: the gateway with config.yaml's apps and directory.yaml, the demo app.
    Only ``session_app`` (if any) holds impersonation sessions, whatever config.yaml says of the others."""
    gateway_port, demo_port = free_port(), free_port()
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    apps = {
        name: {**{k: v for k, v in app.items() if k != "session"}, "upstream": f"http://127.0.0.1:{demo_port}"}
        for name, app in config["apps"].items()
    }
    if session_app is not None:
        apps[session_app]["session"] = {}  # the defaults: a banner, the gateway's own end page
    key = tmp_path / "signing.pem"
    generate_key_file(key)
    directory = yaml.safe_load((ROOT / "directory.yaml").read_text())
    path = processes.write_config(
        tmp_path, redis_server.url, gateway_port, apps=apps, directory=directory, prefix=f"browser{gateway_port}:",
        assertion={"private_key_file": str(key)},
    )  # fmt: skip
    gateway = f"http://127.0.0.1:{gateway_port}"
    app = subprocess.Popen(
        [sys.executable, str(ROOT / "demo" / "downstream.py"), "--port", str(demo_port), "--gateway", gateway],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc = processes.start(path)
    shots = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with processes.running(proc, app):
        await processes.wait_ready(gateway, proc)
        yield Demo(gateway, shots)


@pytest.fixture
async def demo(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Demo]:
    """The demo with no app holding sessions: the login hands the customer's session to the app."""
    async with running_demo(tmp_path, redis_server, None) as running:
        yield running


@pytest.fixture
async def session_demo(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Demo]:
    """The demo with control-panel holding impersonation sessions (DESIGN §13)."""
    async with running_demo(tmp_path, redis_server, "control-panel") as running:
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium())
        try:
            yield launched
        finally:
            await launched.close()


async def login_link(demo: Demo) -> str:
    """The ActivePlatform portal's request, as its vendor documents it (plus a reason), and the link it builds."""
    headers = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw", "Accept": "application/vnd.api+json",
               "X-Impersonation-Reason": REASON}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        url = demo.gateway + "/api/v3/resellers/1/user_authentication/token?account_id=505"
        async with http.get(url, headers=headers) as response:
            assert response.status == 200, await response.text()
            body = await response.json(content_type=None)
    return f"{demo.gateway}/?{urlencode({'user_email': body['owner_email'], 'user_token': body['owner_token']})}"


async def shot(page: Page, demo: Demo, name: str) -> None:
    await page.screenshot(path=str(demo.shots / name), full_page=True)


async def test_a_support_agent_signs_in_as_a_customer_once(demo: Demo, browser: Browser) -> None:
    link = await login_link(demo)

    # 1. A browser without script (or a mail scanner) sees the confirmation page: nothing is spent yet.
    plain = await browser.new_context(java_script_enabled=False, viewport={"width": 900, "height": 420})
    page = await plain.new_page()
    response = await page.goto(link)
    assert response is not None and response.status == 200
    assert await page.inner_text("p") == "Press continue to sign in."
    await shot(page, demo, "1-confirmation.png")
    await plain.close()

    # 2. A browser passes it (its script submits the form): the demo app shows the customer and who acts.
    context = await browser.new_context(viewport={"width": 900, "height": 420})
    page = await context.new_page()
    async with page.expect_response(lambda r: r.request.method == "POST") as posted:
        await page.goto(link)
    assert (await posted.value).status == 200
    assert await page.inner_text("h1") == "signed in as 505 — impersonated by mgr-1"
    text = await page.inner_text("body")
    assert "role: admin" in text and f"reason: {REASON}" in text and "email: example@activeplatform.com" in text
    await shot(page, demo, "2-signed-in.png")

    # The demo app keeps its own session: another page of it, no grant needed.
    await page.goto(demo.gateway + "/invoices")
    assert await page.inner_text("h1") == "signed in as 505 — impersonated by mgr-1"

    # 3. The same link again: the refusal page, with the dialect's status.
    fresh = await browser.new_context(viewport={"width": 900, "height": 420})
    page = await fresh.new_page()
    async with page.expect_response(lambda r: r.request.method == "POST") as refused:
        await page.goto(link)
    assert (await refused.value).status == 401
    assert await page.inner_text("h1") == "This sign-in link cannot be used"
    assert "already been used, or it has expired" in await page.inner_text("body")
    await shot(page, demo, "3-refused.png")
    await fresh.close()
    await context.close()
    assert {"1-confirmation.png", "2-signed-in.png", "3-refused.png"} <= {p.name for p in demo.shots.iterdir()}


async def test_a_session_shows_the_banner_and_its_end_button_signs_out(session_demo: Demo, browser: Browser) -> None:
    demo = session_demo
    link = await login_link(demo)
    # Tall enough that the notice, fixed at the bottom of the window, covers none of the page.
    context = await browser.new_context(viewport={"width": 900, "height": 560})
    page = await context.new_page()
    async with page.expect_response(lambda r: r.request.method == "POST") as posted:
        await page.goto(link)
    assert (await posted.value).status == 200
    assert await page.inner_text("h1") == "signed in as 505 — impersonated by mgr-1"
    # The gateway's notice: who acts as whom, until when, and an End button.
    notice = page.locator("#impersonation-banner")
    await notice.wait_for(state="visible")
    assert re.fullmatch(r"Impersonation: mgr-1 is acting as 505 until \d\d:\d\d UTC\s*End impersonation",
                        (await notice.inner_text()).strip())  # fmt: skip
    await shot(page, demo, "4-banner.png")
    # The app's own login cookie stays in the gateway; the browser holds only the gateway's session cookie.
    assert {c["name"] for c in await context.cookies()} == {"impersonation_session"}

    # Another page of the app: still the session, still the notice.
    await page.goto(demo.gateway + "/invoices")
    assert await page.inner_text("h1") == "signed in as 505 — impersonated by mgr-1"
    assert await page.locator("#impersonation-banner").count() == 1

    # End: the gateway's end page, and the app no longer knows the browser.
    async with page.expect_navigation():
        await page.get_by_role("button", name="End impersonation").click()
    assert await page.inner_text("h1") == "Impersonation ended"
    assert await context.cookies() == []
    await page.goto(demo.gateway + "/invoices")
    assert await page.inner_text("h1") == "not signed in"
    assert await page.locator("#impersonation-banner").count() == 0
    await context.close()
