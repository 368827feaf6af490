"""Demo downstream app: the web application behind the gateway.

It trusts only the gateway's signed `X-Impersonation-Assertion` header: `gateway.downstream`'s
middleware checks it against the gateway's JWKS (audience, expiry, one use per `jti`). A hand-off (an app
without `session` in the gateway's config) brings it once: it is then turned into a `demo_session` cookie
so that later requests stay signed in. A session held by the gateway brings a fresh one with every
request (with `sid` and `mode`): the app then goes by that and sets no cookie of its own. Every page shows
who is signed in, who acts for this request, the mode and the session, a "Save a note" form (a POST, which
a read_only session is refused) and, in a session, a link to the gateway's `/_impersonation/session`.

    python demo/downstream.py --port 9001 --gateway http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import html
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.app import ListenError
from gateway.downstream import Verifier, impersonation, middleware

SESSION_COOKIE = "demo_session"


@dataclass(frozen=True)
class Settings:
    gateway: str
    audiences: tuple[str, ...]
    issuer: str | None


COOKIE_SECRET = web.AppKey("cookie_secret", bytes)
HTTP = web.AppKey("http", aiohttp.ClientSession)
NOTES = web.AppKey("notes", dict[tuple[str, str], list[str]])  # per app and subject, in memory


def seal(secret: bytes, claims: dict[str, Any]) -> str:
    body = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    return f"{body}.{hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()}"


def unseal(secret: bytes, value: str) -> dict[str, Any] | None:
    body, _, mac = value.rpartition(".")
    expected = hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
    if not body or not hmac.compare_digest(mac.encode(), expected.encode()):
        return None
    claims = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return claims if isinstance(claims, dict) else None


def page(title: str, lines: list[str], status: int = 200, extra: str = "") -> web.Response:
    """An HTML page: ``title``, the ``lines`` (escaped) and ``extra`` (markup, already escaped)."""
    items = "\n".join(f"  <li>{html.escape(line)}</li>" for line in lines)
    body = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f"<body>\n<h1>{html.escape(title)}</h1>\n<ul>\n{items}\n</ul>\n{extra}</body></html>\n"
    )
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8")


def signed_in_page(claims: dict[str, Any], path: str, source: str, notes: list[str]) -> web.Response:
    """Who is signed in and who acts, from the assertion of this request (``source`` says so) or from the app's own
    cookie (the assertion of an earlier request: the request itself came with none)."""
    actor = claims.get("act") or {}
    sid, mode = claims.get("sid"), claims.get("mode")
    lines = [
        f"signed in: {claims.get('sub')}",
        f"acting for this request: {actor.get('sub')} ({source})",
        f"mode: {mode}" if isinstance(mode, str) else "mode: none (a hand-off: this app keeps its own session)",
    ]
    if isinstance(sid, str):
        lines.append(f"session: {sid}")
    lines += [f"app: {claims.get('aud')}", f"role: {actor.get('role')}", f"jti: {claims.get('jti')}"]
    if claims.get("email"):
        lines.append(f"email: {claims['email']}")
    for name in ("reason", "custom_data", "scope"):
        if name in claims:
            value = claims[name]
            lines.append(f"{name}: {value if isinstance(value, str) else orjson.dumps(value).decode()}")
    lines.append(f"path: {path}")
    saved = "".join(f"  <li>{html.escape(note)}</li>\n" for note in notes)
    extra = (
        f"<h2>Notes</h2>\n<ul>\n{saved}</ul>\n"
        '<form method="post" action="/notes"><input name="note" aria-label="note" required> '
        '<button type="submit">Save a note</button></form>\n'
    )
    if isinstance(sid, str):  # the gateway answers this path itself, for the session the browser holds
        extra += '<p><a href="/_impersonation/session">This impersonation session, as the gateway holds it</a></p>\n'
    return page(f"signed in as {claims.get('sub')} — impersonated by {actor.get('sub')}", lines, extra=extra)


def signed_in(request: web.Request) -> tuple[dict[str, Any], str] | None:
    """The claims of whoever is signed in, and where they come from: this request's assertion (a session's, or a
    hand-off's) or the app's own cookie; None when nobody is."""
    who = impersonation(request)  # set by the verifying middleware when the gateway's assertion came along
    if who is not None:
        return dict(who.claims), "this request's assertion"
    cookie = request.cookies.get(SESSION_COOKIE)
    claims = unseal(request.app[COOKIE_SECRET], cookie) if cookie else None
    return (claims, "this app's cookie, from an earlier assertion") if claims is not None else None


def notes_of(request: web.Request, claims: dict[str, Any]) -> list[str]:
    return request.app[NOTES].setdefault((str(claims.get("aud")), str(claims.get("sub"))), [])


async def handle(request: web.Request) -> web.Response:
    found = signed_in(request)
    if found is None:
        return page("not signed in", [f"path: {request.path}"])
    claims, source = found
    response = signed_in_page(claims, request.path, source, notes_of(request, claims))
    who = impersonation(request)
    if who is not None and who.sid is None:  # a hand-off: later requests come without an assertion
        secret = request.app[COOKIE_SECRET]
        response.set_cookie(SESSION_COOKIE, seal(secret, dict(who.claims)), path="/", httponly=True, samesite="Lax")
    return response


async def save_note(request: web.Request) -> web.Response:
    """``POST /notes``: a change (a read_only session never gets here: the gateway refuses it)."""
    found = signed_in(request)
    if found is None:
        return page("not signed in", [f"path: {request.path}"], status=401)
    note = str((await request.post()).get("note", "")).strip()[:200]
    if note:
        notes_of(request, found[0]).append(note)
    raise web.HTTPSeeOther("/notes")


async def http_client(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        app[HTTP] = session
        yield


def create_app(settings: Settings) -> web.Application:
    async def fetch(url: str) -> bytes:
        async with app[HTTP].get(url) as response:
            response.raise_for_status()
            return await response.read()

    verifier = Verifier(f"{settings.gateway.rstrip('/')}/.well-known/jwks.json", settings.audiences,
                        issuer=settings.issuer, fetch_async=fetch)  # fmt: skip
    app = web.Application(middlewares=[middleware(verifier)])
    # A fresh secret per process: restarting the demo signs everybody out, which is fine here.
    app[COOKIE_SECRET] = secrets.token_bytes(32)
    app[NOTES] = {}
    app.cleanup_ctx.append(http_client)
    app.router.add_post("/notes", save_note)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--gateway", default="http://127.0.0.1:8080", help="base URL of the gateway (for its JWKS)")
    parser.add_argument(
        "--audience",
        default="control-panel,analytics,switch,exchange",
        help="comma-separated app names accepted as the assertion's aud",
    )
    parser.add_argument("--issuer", default=None, help="expected iss claim (default: not checked)")
    args = parser.parse_args()
    audiences = tuple(name.strip() for name in args.audience.split(",") if name.strip())
    settings = Settings(gateway=args.gateway, audiences=audiences, issuer=args.issuer)
    try:
        web.run_app(create_app(settings), host=args.host, port=args.port)
    except OSError as exc:  # the listener's bind: the only OSError run_app lets out before serving
        print(f"demo/downstream.py: error: {ListenError(args.host, args.port, '--port', exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
