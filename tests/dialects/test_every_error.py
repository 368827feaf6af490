"""Every error of the hierarchy, in every dialect: none falls through to the dialect's generic 500.

A new error class that a dialect does not know would otherwise reach a client as "Internal Server Error";
this test lists every subclass of GatewayError and fails until each dialect renders it.
"""

from __future__ import annotations

import pytest

from gateway.dialects import Dialect, all_dialects
from gateway.errors import (
    Forbidden,
    GatewayError,
    GrantRefused,
    Invalid,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    StoreUnavailable,
    Unauthenticated,
    UnsupportedEncoding,
    UpstreamUnavailable,
)

ERRORS: list[GatewayError] = [
    Invalid("client_id", "missing"),
    Unauthenticated("missing"),
    Forbidden("role"),
    NotFound("subject"),
    GrantRefused("unknown"),
    MethodNotAllowed(("GET",)),
    RequestTimeout(30.0),
    PayloadTooLarge(65536),
    UnsupportedEncoding("br"),
    RateLimited(60),
    StoreUnavailable(),
    UpstreamUnavailable(),
]


def _subclasses(cls: type[GatewayError]) -> set[type[GatewayError]]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *_subclasses(direct)}}


def test_the_list_holds_every_error_class() -> None:
    assert {type(e) for e in ERRORS} == _subclasses(GatewayError)


@pytest.mark.parametrize("dialect", all_dialects().values(), ids=lambda d: d.name)
@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_has_its_own_answer_in_every_dialect(dialect: Dialect, error: GatewayError) -> None:
    generic = dialect.render_error(GatewayError())
    response = dialect.render_error(error)
    assert generic.status == 500
    if isinstance(error, StoreUnavailable | UpstreamUnavailable):
        assert response.status == error.status and dialect.render_error(UpstreamUnavailable(timeout=True)).status == 504
    else:
        assert response.status < 500, response.body
    assert (response.status, response.body) != (generic.status, generic.body)
    if isinstance(error, RequestTimeout):
        assert response.status == 408 and not dialect.error_response(error).keep_alive
    if isinstance(error, UnsupportedEncoding):
        assert response.status == 415
    if isinstance(error, MethodNotAllowed):
        assert response.status == 405 and dialect.error_response(error).headers["Allow"] == "GET"
