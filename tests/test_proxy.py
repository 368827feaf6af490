"""Forwarding's pure parts: the headers an upstream may see, and where a request goes (the app's own scheme, host,
port and base path; the client's path and raw query, which change nothing else)."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.config import AppConfig
from gateway.proxy import FORWARDING, HOP_BY_HOP, Upstream, request_headers

CLIENT = "203.0.113.7"
PROXY = "10.0.0.2"
TRUSTED = ("10.0.0.0/8",)


def request(*headers: tuple[str, str], peer: str = CLIENT) -> web.Request:
    sent = CIMultiDict([("Host", "app.test"), *headers])
    return make_mocked_request("GET", "/dashboard", headers=sent).clone(remote=peer)


def forwarded(*headers: tuple[str, str], peer: str = CLIENT) -> list[tuple[str, str]]:
    return list(request_headers(request(*headers, peer=peer), TRUSTED).items())


OWN = [("X-Forwarded-For", CLIENT), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "app.test")]


# -- request_headers -----------------------------------------------------------------------------------------------
def test_the_clients_headers_pass_in_order_with_the_gateways_forwarding_headers() -> None:
    sent = [("Accept", "text/html"), ("Cookie", "a=1"), ("X-Api-Token", "t"), ("Cookie", "b=2")]
    assert forwarded(*sent) == [*sent, *OWN]


@pytest.mark.parametrize("name", [*sorted(HOP_BY_HOP), "Keep-Alive", "TE", "Expect", "Host"])
def test_hop_by_hop_headers_and_host_are_dropped(name: str) -> None:
    assert forwarded((name, "x"), ("Accept", "*/*")) == [("Accept", "*/*"), *OWN]


def test_headers_named_in_connection_are_dropped() -> None:
    sent = [("Connection", "keep-alive, X-Secret ,x-other"), ("X-Secret", "s"), ("X-Other", "o"), ("X-Kept", "k")]
    assert forwarded(*sent) == [("X-Kept", "k"), *OWN]


@pytest.mark.parametrize("name", ["X_Api_Token", "Api_Key", "X_Forwarded_For", "X-Impersonation_Assertion"])
def test_names_with_an_underscore_are_dropped(name: str) -> None:
    assert forwarded((name, "v"), ("X-Api-Token", "t")) == [("X-Api-Token", "t"), *OWN]


@pytest.mark.parametrize(
    "name", ["X-Impersonation-Assertion", "x-impersonation-assertion", "X-IMPERSONATION-ASSERTION"]
)
@pytest.mark.parametrize("peer", [CLIENT, PROXY])
def test_an_assertion_from_the_client_never_passes(name: str, peer: str) -> None:
    assert "X-Impersonation-Assertion" not in request_headers(request((name, "forged.jwt.sig"), peer=peer), TRUSTED)


UNTRUSTED = [*FORWARDING, "X-Forwarded-Port", "X-Forwarded-Prefix", "x-forwarded-server"]


@pytest.mark.parametrize("name", UNTRUSTED)
def test_forwarding_headers_from_a_client_are_dropped(name: str) -> None:
    assert forwarded((name, "198.51.100.1"), ("Accept", "*/*")) == [("Accept", "*/*"), *OWN]


@pytest.mark.parametrize(
    "name", ["X-Host", "Client-IP", "Via", "X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method"]
)
def test_the_newer_forwarding_and_method_override_headers_are_dropped(name: str) -> None:
    assert forwarded((name, "DELETE")) == OWN


def test_a_clients_forwarded_for_proto_and_host_are_replaced() -> None:
    sent = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "bank.test")]
    assert forwarded(*sent) == OWN


@pytest.mark.parametrize("name", UNTRUSTED)
def test_forwarding_headers_from_a_trusted_proxy_pass(name: str) -> None:
    assert (name, "v") in forwarded((name, "v"), peer=PROXY)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ([], PROXY),
        ([("X-Forwarded-For", "198.51.100.1")], f"198.51.100.1, {PROXY}"),
        ([("X-Forwarded-For", "198.51.100.1, 10.1.1.1")], f"198.51.100.1, 10.1.1.1, {PROXY}"),
        ([("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "10.1.1.1")], f"198.51.100.1, 10.1.1.1, {PROXY}"),
    ],
)
def test_a_trusted_proxy_gets_its_address_appended_to_forwarded_for(sent: list[tuple[str, str]], expected: str) -> None:
    out = request_headers(request(*sent, peer=PROXY), TRUSTED)
    assert out.getall("X-Forwarded-For") == [expected]


def test_a_trusted_proxys_proto_and_host_are_kept() -> None:
    sent = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "portal.example.com")]
    out = request_headers(request(*sent, peer=PROXY), TRUSTED)
    assert (out["X-Forwarded-Proto"], out["X-Forwarded-Host"]) == ("https", "portal.example.com")


@pytest.mark.parametrize(("peer", "trusted"), [(CLIENT, TRUSTED), (PROXY, ()), ("unknown", ("0.0.0.0/0",))])
def test_only_a_peer_in_the_trusted_networks_is_a_proxy(peer: str, trusted: tuple[str, ...]) -> None:
    out = request_headers(request(("X-Real-IP", "198.51.100.1"), peer=peer), trusted)
    assert list(out.items()) == [
        ("X-Forwarded-For", peer),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "app.test"),
    ]


# -- Upstream ------------------------------------------------------------------------------------------------------
def app(upstream: str, connect: float = 5.0, read: float = 300.0) -> AppConfig:
    return AppConfig(
        name="control-panel",
        dialect="activeplatform",
        upstream=upstream,
        connect_timeout_seconds=connect,
        read_timeout_seconds=read,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "http://app.internal:8000/base/",
            Upstream("http", "app.internal", 8000, "app.internal:8000", "/base", 5, 300),
        ),
        ("http://app.internal/a/b", Upstream("http", "app.internal", 80, "app.internal", "/a/b", 5, 300)),
        ("https://app.internal", Upstream("https", "app.internal", 443, "app.internal", "", 5, 300)),
        ("http://[::1]:9000/", Upstream("http", "::1", 9000, "[::1]:9000", "", 5, 300)),
    ],
)
def test_upstream_of_an_app(url: str, expected: Upstream) -> None:
    assert Upstream.of(app(url)) == expected


@pytest.mark.parametrize(("read", "expected"), [(300.0, 300.0), (0.5, 0.5), (0.0, None)])
def test_upstream_timeouts(read: float, expected: float | None) -> None:
    upstream = Upstream.of(app("http://app.internal", connect=2.5, read=read))
    assert (upstream.connect_timeout, upstream.read_timeout) == (2.5, expected)


@pytest.mark.parametrize(
    ("base", "raw_path", "query", "target"),
    [
        ("http://app.internal:8000/base/", "/api/v1", "a=1&b=%20", "/base/api/v1?a=1&b=%20"),
        ("http://app.internal:8000/base", "/api/v1", "", "/base/api/v1"),
        ("http://app.internal:8000", "/a%2Fb/%2e%2e", "q=%2F&q=x+y", "/a%2Fb/%2e%2e?q=%2F&q=x+y"),
        ("http://app.internal:8000", "/", "a;b=1&&c", "/?a;b=1&&c"),
    ],
)
def test_target_joins_the_base_path_and_keeps_the_query_raw(base: str, raw_path: str, query: str, target: str) -> None:
    upstream = Upstream.of(app(base))
    assert upstream.target(raw_path, query) == target
    assert str(upstream.url(raw_path, query)) == "http://app.internal:8000" + target


@pytest.mark.parametrize(
    ("raw_path", "query"),
    [
        ("//evil.test/x", ""),
        ("/@evil.test", ""),
        ("/x", "next=http://evil.test:666/"),
        ("/..%2f..%2fevil.test", "host=evil.test"),
    ],
)
@pytest.mark.parametrize("base", ["http://app.internal:8000/base", "http://app.internal:8000"])
def test_nothing_from_the_client_changes_where_a_request_goes(base: str, raw_path: str, query: str) -> None:
    url = Upstream.of(app(base)).url(raw_path, query)
    assert (url.scheme, url.host, url.port) == ("http", "app.internal", 8000)
    assert url.raw_path.startswith(base.removeprefix("http://app.internal:8000") + raw_path)
