"""The session holds the gateway's and the demo's default ports, so no test can come to depend on them."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import DEFAULT_PORTS


def taken(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (a connection is accepted) or holds it (a bind fails)."""
    with socket.socket() as client:
        client.settimeout(5)
        if client.connect_ex(("127.0.0.1", port)) == 0:
            return True
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.parametrize("port", DEFAULT_PORTS)
def test_a_default_port_is_held_for_the_whole_session(port: int, default_ports_held: list[socket.socket]) -> None:
    """Each default port the session found free, it holds still (one another program held at the start is that
    program's to keep or to let go: another test run on the same machine, say)."""
    if port in {sock.getsockname()[1] for sock in default_ports_held}:
        assert taken(port), f"127.0.0.1:{port} is free: a test could bind it and pass only where nothing else does"


def test_the_fixture_listens_on_the_ports_it_holds(default_ports_held: list[socket.socket]) -> None:
    for sock in default_ports_held:
        host, port = sock.getsockname()
        assert (host, sock.fileno() >= 0) == ("127.0.0.1", True)
        assert port in DEFAULT_PORTS
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
