"""The OpenAPI description against a live gateway: schemathesis drives every documented operation of a real
``python -m gateway serve`` process on a real redis-server, and every answer must be a documented status with
a documented content type and a body that fits the documented schema, and never a 5xx.

Bounded and reproducible: a fixed seed, derandomized generation, a few dozen cases per operation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.config import DIALECTS
from tests import processes
from tests.conftest import RedisServer, free_port
from tests.fixtures import DEMO_APPS, DIRECTORY, SPEC

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 60

# The demo directory's credentials: with them the fuzzer gets past authentication to the deeper answers.
CREDENTIALS = {
    "activeplatformToken": {"api_key": "vY5fwetestK3gJXZH5uHCw"},
    "denovolabToken": {"api_key": "denovolab-demo-admin-token"},
    "btcdirectBearer": {"bearer": "btcdirect-partner-demo-token"},
    "nativeBearer": {"bearer": "vY5fwetestK3gJXZH5uHCw"},
}


def load_schema(auth: dict[str, Any] | None) -> Any:
    config: dict[str, Any] = {
        "seed": 20240611,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {
            "examples": {"enabled": True},
            # Methods the description does not name reach the app's own routes (the gateway proxies them).
            "coverage": {"enabled": True, "unexpected-methods": []},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
        "request-timeout": 10,
    }
    if auth is not None:
        config["auth"] = {"openapi": auth}
    loaded = schemathesis.openapi.from_dict(SPEC, config=schemathesis.Config.from_dict(config))
    loaded.hook(filter_path_parameters)
    return loaded


def filter_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> bool:
    """A path parameter holding ``/`` (or a dot segment, or nothing) names another URL: an app's own path, which
    the gateway proxies, not this operation."""
    return all(str(v) not in ("", ".", "..") and "/" not in str(v) for v in (path_parameters or {}).values())


anonymous = load_schema(auth=None)
authenticated = load_schema(auth=CREDENTIALS)
HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def live_gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway process on the real redis-server, serving the demo apps (one per dialect, on one host, the
    Denovolab one holding sessions) and the demo directory, whose credentials the description's examples name;
    yields its base URL."""
    assert {app["dialect"] for app in DEMO_APPS.values()} == set(DIALECTS)
    tmp = tmp_path_factory.mktemp("schemathesis")
    port = free_port()
    # Nothing listens upstream: a documented operation must never fall through to the app (it would be a 502).
    upstream = f"http://127.0.0.1:{free_port()}"
    config = processes.write_config(
        tmp, redis_server.url, port,
        # The Denovolab app holds sessions (whatever config.yaml says): the session endpoints are the gateway's.
        apps={name: {**app, "upstream": upstream, **({"session": {}} if name == "switch" else {})}
              for name, app in DEMO_APPS.items()},
        directory=DIRECTORY,
        prefix=f"schemathesis{port}:",
        # Failed credentials are the fuzzer's daily bread: a limit would turn every later case into a 429.
        rate_limit={"failures": 1_000_000, "window_seconds": 1},
    )  # fmt: skip
    proc = processes.start(config)
    url = f"http://127.0.0.1:{port}"
    with processes.running(proc):
        asyncio.run(processes.wait_ready(url, proc))
        yield url


@anonymous.parametrize()
@HYPOTHESIS
def test_any_caller(case: schemathesis.Case, live_gateway: str) -> None:
    """Random and missing credentials, malformed and hostile input: documented refusals only."""
    case.call_and_validate(base_url=live_gateway, checks=CHECKS)


@authenticated.parametrize()
@HYPOTHESIS
def test_a_known_caller(case: schemathesis.Case, live_gateway: str) -> None:
    """The demo's own actors: past authentication, into policy, look-ups and minting."""
    case.call_and_validate(base_url=live_gateway, checks=CHECKS)
