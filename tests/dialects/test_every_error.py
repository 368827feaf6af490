"""Every error of the hierarchy, in every dialect: none falls through to the dialect's generic 500.

A new error class that a dialect does not know would otherwise reach a client as "Internal Server Error";
these tests read every error table (each dialect's and the native API's) and fail until each has a rule for
every subclass of GatewayError, and render every error in every dialect.
"""

from __future__ import annotations

import inspect

import pytest

from gateway import native
from gateway.dialects import CONSTANTS, Dialect, Rule, all_dialects
from gateway.errors import (
    Forbidden,
    GatewayError,
    GrantRefused,
    Invalid,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Refusal,
    RequestTimeout,
    StoreUnavailable,
    Unauthenticated,
    UnsupportedEncoding,
    UpstreamUnavailable,
)

TABLES: dict[str, tuple[Rule, ...]] = {**{d.name: d.errors for d in all_dialects().values()}, "native": native.ERRORS}

ERRORS: list[GatewayError] = [
    Invalid("client_id", "missing"),
    Unauthenticated("missing"),
    Forbidden("role"),
    NotFound("subject"),
    GrantRefused(Refusal.UNKNOWN),
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


def test_every_error_class_has_its_own_stable_code() -> None:
    classes = [GatewayError, *_subclasses(GatewayError)]
    codes = [vars(cls).get("code") for cls in classes]
    assert all(codes) and len(set(codes)) == len(classes), codes


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("error", sorted(_subclasses(GatewayError), key=lambda c: c.code), ids=lambda c: c.code)
def test_every_table_answers_every_error_class(table: str, error: type[GatewayError]) -> None:
    rules = [rule for rule in TABLES[table] if rule.error is error]
    assert rules, f"{table} has no rule for {error.__name__}"
    assert not rules[-1].when, f"{table}: some {error.__name__} would get the generic 500"


@pytest.mark.parametrize("table", TABLES)
def test_a_table_ends_with_its_answer_to_the_unexpected(table: str) -> None:
    *rules, last = TABLES[table]
    assert (last.error, last.when) == (GatewayError, ())
    assert GatewayError not in {rule.error for rule in rules}


@pytest.mark.parametrize("table", TABLES)
def test_no_rule_is_hidden_by_an_earlier_one(table: str) -> None:
    rules = TABLES[table]
    for i, rule in enumerate(rules):
        for earlier in rules[:i]:
            hidden = issubclass(rule.error, earlier.error) and set(earlier.when) <= set(rule.when)
            assert not hidden, f"{table}: {rule} never applies after {earlier}"


@pytest.mark.parametrize("table", TABLES)
def test_conditions_and_templates_name_only_the_errors_fields(table: str) -> None:
    for rule in TABLES[table]:
        fields = set(inspect.signature(rule.error.__init__).parameters) - {"self"}
        assert {name for name, _ in rule.when} <= fields, rule
        assert rule.names() <= fields | set(CONSTANTS), rule


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
