"""Targets parsed once for routing and forwarding, apps selected by host and mount, the client behind proxies."""

from __future__ import annotations

import pytest

from gateway.config import config_from_dict
from gateway.routing import BadTarget, Router, client_address, parse_target

APPS = config_from_dict(
    {
        "apps": {
            "cp": {"dialect": "activeplatform", "upstream": "http://a:1", "mount": "/cp"},
            "sw": {"dialect": "denovolab", "upstream": "http://b:1", "mount": "/sw"},
            "deep": {"dialect": "denovolab", "upstream": "http://c:1", "mount": "/sw/deep"},
            "root": {"dialect": "pyramid", "upstream": "http://d:1"},
            "host": {"dialect": "btcdirect", "upstream": "http://e:1", "hosts": ["app.example.com"]},
        }
    }
).apps
ROUTER = Router(APPS)


@pytest.mark.parametrize(
    ("raw", "app", "path", "forwarded", "query"),
    [
        ("/sw/x?a=1;b=%41", "sw", "/x", "/x", "a=1;b=%41"),
        ("/%73w/x", "sw", "/x", "/x", ""),  # an encoded mount selects it, and shifts nothing
        ("/s%77/a%20b", "sw", "/a b", "/a%20b", ""),
        ("/cp/../sw/x", "sw", "/x", "/x", ""),
        ("/cp/%2e%2e/sw/x", "sw", "/x", "/x", ""),
        ("/sw/deep/y/", "deep", "/y/", "/y/", ""),
        ("/sw/deeper", "sw", "/deeper", "/deeper", ""),
        ("/sw", "sw", "/", "/", ""),
        ("/sw/a/.", "sw", "/a/", "/a/", ""),
        ("/swx", "root", "/swx", "/swx", ""),
        ("//evil.example/x", "root", "//evil.example/x", "//evil.example/x", ""),
        ("http://evil.example/sw/x?q", "sw", "/x", "/x", "q"),  # absolute-form: its path only
    ],
)
def test_targets_route_and_forward_from_one_parse(raw: str, app: str, path: str, forwarded: str, query: str) -> None:
    target = parse_target(raw, "gateway.test")
    route = ROUTER.select(target)
    assert route is not None
    assert (route.apps[0].name, route.path(target), route.raw_path(target), target.query) == (
        app, path, forwarded, query
    )  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    ["/..", "/sw/../../admin", "/sw/..%2F..%2Fadmin", "/a/..%5Cb", "/a/..;x/b", "/a/.;/b", "m://x/p", "*", "host:443"],
)
def test_targets_that_escape_or_disguise_are_refused(raw: str) -> None:
    with pytest.raises(BadTarget):
        parse_target(raw, "gateway.test")


def test_hosts_select_their_apps_with_or_without_a_port() -> None:
    for host in ("app.example.com", "APP.example.com:8443"):
        route = ROUTER.select(parse_target("/sw/x", host))
        assert (
            route is not None
            and [a.name for a in route.apps] == ["host"]
            and route.path(parse_target("/sw/x", host)) == "/sw/x"
        )


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "client"),
    [
        ("198.51.100.1", ["6.6.6.6"], (), "198.51.100.1"),  # nobody trusted: the peer
        ("198.51.100.1", ["6.6.6.6"], ("10.0.0.0/8",), "198.51.100.1"),  # an untrusted peer's XFF is ignored
        ("10.0.0.2", ["6.6.6.6, 203.0.113.9"], ("10.0.0.0/8",), "203.0.113.9"),  # the nearest untrusted hop
        ("10.0.0.2", ["203.0.113.9", "10.0.0.3"], ("10.0.0.0/8",), "203.0.113.9"),
        ("10.0.0.2", [], ("10.0.0.0/8",), "10.0.0.2"),
    ],
)
def test_client_address(peer: str, forwarded: list[str], trusted: tuple[str, ...], client: str) -> None:
    assert client_address(peer, forwarded, trusted) == client
