"""An app's ``session`` section (DESIGN §13): its defaults, every bad value named by its key, and the ``allow`` and
``deny`` patterns — :class:`gateway.session_rules.Rule` and :func:`gateway.session_rules.permitted`."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, SessionConfig, config_from_dict
from gateway.session_rules import Rule, permitted, rules_of

APP = {"dialect": "activeplatform", "upstream": "http://app.test"}


def session_of(session: Any = "absent") -> SessionConfig | None:
    settings = {**APP, **({} if session == "absent" else {"session": session})}
    return config_from_dict({"apps": {"cp": settings}}).app("cp").session


# -- the section --------------------------------------------------------------------------------------------
def test_absent_or_null_is_hand_off_and_empty_is_every_default() -> None:
    assert session_of() is None
    assert session_of(None) is None
    assert session_of({}) == SessionConfig()
    assert SessionConfig() == SessionConfig(3600, 900, "full", (), (), True, None)


def test_every_key_is_read() -> None:
    session = {"max_seconds": 600, "idle_seconds": 1200, "mode": "read_only", "allow": ["POST /search"],
               "deny": ["* /billing/*"], "banner": False, "end_url": "https://portal.example.com/done"}  # fmt: skip
    assert session_of(session) == SessionConfig(600, 1200, "read_only", ("POST /search",), ("* /billing/*",), False,
                                                "https://portal.example.com/done")  # fmt: skip
    assert session_of({"end_url": "/bye?from=session"}) == SessionConfig(end_url="/bye?from=session")
    assert session_of({"end_url": "http://127.0.0.1:8080/"}) == SessionConfig(end_url="http://127.0.0.1:8080/")


@pytest.mark.parametrize(
    ("session", "message"),
    [
        ("yes", "apps.cp.session: expected a mapping, got 'yes'"),
        ({"max_age": 5}, "apps.cp.session.max_age: unknown key"),
        ({"max_seconds": 0}, "apps.cp.session.max_seconds: must be greater than 0, got 0"),
        ({"max_seconds": "1h"}, "apps.cp.session.max_seconds: expected an integer, got '1h'"),
        ({"max_seconds": 1.5}, "apps.cp.session.max_seconds: expected an integer, got 1.5"),
        ({"idle_seconds": -1}, "apps.cp.session.idle_seconds: must be greater than 0, got -1"),
        ({"idle_seconds": True}, "apps.cp.session.idle_seconds: expected an integer, got True"),
        ({"mode": "write"}, "apps.cp.session.mode: expected one of full, read_only, got 'write'"),
        ({"mode": "READ_ONLY"}, "apps.cp.session.mode: expected one of full, read_only, got 'READ_ONLY'"),
        ({"mode": None}, "apps.cp.session.mode: expected a string, got None"),
        ({"allow": "POST /search"}, "apps.cp.session.allow: expected a list, got 'POST /search'"),
        ({"allow": ["POST /search", 7]}, "apps.cp.session.allow[1]: expected a string, got 7"),
        ({"allow": ["GET /", "POST search"]}, "apps.cp.session.allow[1]: the path must start with '/', in "
                                              "'POST search'"),
        ({"deny": ["/billing"]}, "apps.cp.session.deny[0]: expected 'METHOD /path' (e.g. 'POST /search' or "
                                 "'* /billing/*'), got '/billing'"),
        ({"deny": ["GET /a", "POST /a b"]}, "apps.cp.session.deny[1]: expected 'METHOD /path' (e.g. 'POST /search' "
                                            "or '* /billing/*'), got 'POST /a b'"),
        ({"deny": ["GE(T /a"]}, "apps.cp.session.deny[0]: 'GE(T' is not an HTTP method (nor '*'), in 'GE(T /a'"),
        ({"deny": ["GET /a?b=1"]}, "apps.cp.session.deny[0]: the path is matched without its query: no '?' or '#', "
                                   "in 'GET /a?b=1'"),
        ({"deny": ["GET /a/../b"]}, "apps.cp.session.deny[0]: the path must be normalised (no '//', '.' or '..' "
                                    "segments), in 'GET /a/../b'"),
        ({"deny": ["GET /a//b"]}, "apps.cp.session.deny[0]: the path must be normalised (no '//', '.' or '..' "
                                  "segments), in 'GET /a//b'"),
        ({"banner": "yes"}, "apps.cp.session.banner: expected true or false, got 'yes'"),
        ({"end_url": "done"}, "apps.cp.session.end_url: expected an absolute http(s) URL or a path starting with "
                              "'/' (not '//'), got 'done'"),
        ({"end_url": "//evil.example"}, "apps.cp.session.end_url: expected an absolute http(s) URL or a path "
                                        "starting with '/' (not '//'), got '//evil.example'"),
        ({"end_url": "javascript:alert(1)"}, "apps.cp.session.end_url: expected an absolute http(s) URL or a path "
                                             "starting with '/' (not '//'), got 'javascript:alert(1)'"),
        ({"end_url": "https://"}, "apps.cp.session.end_url: expected an absolute http(s) URL or a path starting "
                                  "with '/' (not '//'), got 'https://'"),
        ({"end_url": "/a b"}, "apps.cp.session.end_url: expected an absolute http(s) URL or a path starting with "
                              "'/' (not '//'), got '/a b'"),
        ({"end_url": "/a\r\nSet-Cookie: x=1"}, "apps.cp.session.end_url: expected an absolute http(s) URL or a path "
                                               "starting with '/' (not '//'), got '/a\\r\\nSet-Cookie: x=1'"),
        ({"end_url": ""}, "apps.cp.session.end_url: expected an absolute http(s) URL or a path starting with '/' "
                          "(not '//'), got ''"),
    ],
)  # fmt: skip
def test_a_bad_value_is_named_by_its_key(session: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        session_of(session)
    assert str(caught.value) == message


def test_the_other_settings_are_untouched() -> None:
    """Environment overrides still name their variable; an app without a session is configured as before."""
    config = config_from_dict({"apps": {"cp": {**APP, "session": {}}}}, env={"GATEWAY_PORT": "9000"})
    assert config.setting("server.port") == "GATEWAY_PORT"
    assert config.overrides == (("server.port", "GATEWAY_PORT"),)
    assert config.app("cp").session == SessionConfig()


# -- patterns -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("POST /search", Rule("POST", "/search")),
        ("post /search", Rule("POST", "/search")),  # a pattern's method is uppercased; a request's is compared as is
        ("* /api/reports/*", Rule("*", "/api/reports/*")),
        ("  PUT\t/account/password  ", Rule("PUT", "/account/password")),
        ("GET /billing/", Rule("GET", "/billing")),  # a trailing slash is dropped, as in the paths compared
        ("GET /", Rule("GET", "/")),
        ("GET /*", Rule("GET", "/*")),
        ("PROPFIND /dav/*", Rule("PROPFIND", "/dav/*")),
    ],
)
def test_rule_parse(text: str, rule: Rule) -> None:
    assert Rule.parse(text) == rule
    assert Rule.parse(str(rule)) == rule


@pytest.mark.parametrize(
    "text",
    ["", "POST", "/search", "POST search", "POST /a /b", "GE:T /a", "GET /a?x", "GET /a#x", "GET /a/./b", "GET /..",
     "GET //a"],
)  # fmt: skip
def test_rule_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        Rule.parse(text)


# (pattern, method, path, matches)
MATCHES = [
    # DESIGN §13's examples
    ("POST /search", "POST", "/search", True),
    ("POST /search", "GET", "/search", False),
    ("POST /search", "POST", "/search/", True),  # a trailing slash is removed from the path compared
    ("POST /search", "POST", "/search/saved", False),
    ("POST /search", "POST", "/Search", False),  # paths are compared case-sensitively
    ("POST /search", "post", "/search", False),  # and methods exactly, as HTTP does
    ("* /api/reports/*", "GET", "/api/reports", True),  # a trailing /* is the path itself...
    ("* /api/reports/*", "DELETE", "/api/reports/7", True),  # ...and everything below it
    ("* /api/reports/*", "POST", "/api/reports/7/rows/9", True),
    ("* /api/reports/*", "GET", "/api/reportsx", False),
    ("* /api/reports/*", "GET", "/api/report", False),
    ("* /api/reports/*", "GET", "/API/reports/7", False),
    ("POST /account/password", "POST", "/account/password", True),
    ("POST /account/password", "PUT", "/account/password", False),
    ("POST /account/password", "POST", "/account/password/reset", False),
    ("* /billing/*", "GET", "/billing", True),
    ("* /billing/*", "GET", "/billing/", True),
    ("* /billing/*", "PATCH", "/billing/invoices/2026-11", True),
    ("* /billing/*", "GET", "/billing-history", False),
    ("* /billing/*", "GET", "/", False),
    # * within one segment
    ("GET /users/*/orders", "GET", "/users/42/orders", True),
    ("GET /users/*/orders", "GET", "/users//orders", True),  # an empty segment (never one of a normalised path)
    ("GET /users/*/orders", "GET", "/users/42/7/orders", False),
    ("GET /users/*/orders", "GET", "/users/42/orders/1", False),
    ("GET /files/*.pdf", "GET", "/files/invoice.pdf", True),
    ("GET /files/*.pdf", "GET", "/files/a/invoice.pdf", False),
    ("GET /files/*.pdf", "GET", "/files/invoiceXpdf", False),  # the rest is literal, not a regular expression
    ("GET /a*", "GET", "/a", True),
    ("GET /a*", "GET", "/abc", True),
    ("GET /a*", "GET", "/abc/d", False),
    ("GET /*/edit", "GET", "/7/edit", True),
    # the root
    ("GET /", "GET", "/", True),
    ("GET /", "GET", "/a", False),
    ("* /*", "DELETE", "/", True),
    ("* /*", "DELETE", "/any/thing", True),
    # no special characters but *
    ("GET /a.b", "GET", "/axb", False),
    ("GET /(a)", "GET", "/(a)", True),
    ("GET /caf%C3%A9", "GET", "/café", False),  # the path compared is percent-decoded: so must a pattern be
    ("GET /café", "GET", "/café", True),
]


@pytest.mark.parametrize(("pattern", "method", "path", "expected"), MATCHES)
def test_rule_matches(pattern: str, method: str, path: str, expected: bool) -> None:
    assert Rule.parse(pattern).matches(method, path) is expected


SESSION = SessionConfig(mode="read_only", allow=("POST /search", "* /api/reports/*", "GET /ws/feed"),
                        deny=("POST /account/password", "* /billing/*"))  # fmt: skip

# (mode, method, path, websocket, refusal)
DECISIONS = [
    ("full", "GET", "/dashboard", False, None),
    ("full", "POST", "/orders", False, None),
    ("full", "POST", "/account/password", False, "denied"),
    ("full", "GET", "/billing", False, "denied"),  # deny patterns hold in every mode, reads included
    ("full", "DELETE", "/billing/cards/1", False, "denied"),
    ("full", "GET", "/ws/chat", True, None),
    ("read_only", "GET", "/dashboard", False, None),
    ("read_only", "HEAD", "/dashboard", False, None),
    ("read_only", "OPTIONS", "/orders", False, None),
    ("read_only", "POST", "/orders", False, "read_only"),
    ("read_only", "PUT", "/orders/1", False, "read_only"),
    ("read_only", "PATCH", "/orders/1", False, "read_only"),
    ("read_only", "DELETE", "/orders/1", False, "read_only"),
    ("read_only", "get", "/dashboard", False, "read_only"),  # not GET: methods are case-sensitive
    ("read_only", "POST", "/search", False, None),  # allowed
    ("read_only", "POST", "/search/", False, None),
    ("read_only", "POST", "/Search", False, "read_only"),
    ("read_only", "DELETE", "/api/reports/3", False, None),
    ("read_only", "POST", "/api/reports", False, None),
    ("read_only", "POST", "/account/password", False, "denied"),  # deny before allow, in every mode
    ("read_only", "GET", "/billing/invoices", False, "denied"),
    ("read_only", "GET", "/ws/chat", True, "read_only"),  # a handshake is a GET, yet refused unless allowed
    ("read_only", "GET", "/ws/feed", True, None),
    ("read_only", "GET", "/api/reports/live", True, None),
]


@pytest.mark.parametrize(("mode", "method", "path", "websocket", "refusal"), DECISIONS)
def test_permitted(mode: str, method: str, path: str, websocket: bool, refusal: str | None) -> None:
    assert permitted(SESSION, mode, method, path, websocket=websocket) == refusal


def test_a_deny_pattern_that_names_an_allowed_one_wins() -> None:
    session = SessionConfig(mode="read_only", allow=("* /api/*",), deny=("DELETE /api/*",))
    assert permitted(session, "read_only", "POST", "/api/x") is None
    assert permitted(session, "read_only", "DELETE", "/api/x") == "denied"
    assert permitted(session, "full", "DELETE", "/api/x") == "denied"


def test_without_patterns_full_passes_everything_and_read_only_only_reads() -> None:
    session = SessionConfig()
    assert permitted(session, "full", "DELETE", "/anything") is None
    assert permitted(session, "read_only", "GET", "/anything") is None
    assert permitted(session, "read_only", "POST", "/anything") == "read_only"
    assert permitted(session, "read_only", "GET", "/socket", websocket=True) == "read_only"


def test_patterns_are_parsed_once_per_section() -> None:
    assert rules_of(SESSION) is rules_of(SessionConfig(**vars(SESSION)))
    assert rules_of(SESSION).deny == (Rule("POST", "/account/password"), Rule("*", "/billing/*"))
