"""The policy on its own: who may mint for whom (role, reason, ttl, reseller subtree, domain, subject), and whether
a grant minted then is still allowed at redemption once the directory changed."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest

from gateway.audit import Audit
from gateway.config import AppConfig, Config
from gateway.core import Grant, ImpersonationCommand, SubjectRef
from gateway.directory import parse_directory, same_domain
from gateway.directory_reader import DirectoryReader
from gateway.errors import Forbidden, GatewayError, Invalid, NotFound, Refusal, Unauthenticated
from gateway.limits import FailureLimits
from gateway.metrics import Metrics
from gateway.policy import Policy, actor_key
from gateway.store import Store
from tests.conftest import make_config

PANEL: dict[str, Any] = {
    "resellers": [{"id": 1}, {"id": 7, "parent": 1}, {"id": 9}],
    "principals": [
        {"id": "mgr-1", "token": "mgr-1-token", "role": "admin", "reseller": 1},
        {"id": "mgr-7", "token": "mgr-7-token", "role": "admin", "reseller": 7},
        {"id": "mkt-1", "token": "mkt-1-token", "role": "marketing", "reseller": 1},
    ],
    "subjects": [
        {"id": "505", "email": "a@example.com", "reseller": 1},
        {"id": "707", "email": "b@example.com", "reseller": 7},
        {"id": "909", "reseller": 9},
        {"id": "606", "email": "c@example.com", "reseller": 1, "active": False},
    ],
}
PORTAL: dict[str, Any] = {
    "principals": [
        {"id": "ea", "token": "ea-token", "role": "enterprise_admin"},
        {"id": "da", "token": "da-token", "role": "domain_admin", "domain": "sales.example.com"},
        {"id": "short", "token": "short-token", "role": "domain_admin", "domain": "SALES"},
    ],
    "subjects": [
        {"id": "jdoe", "email": "jdoe@example.com", "domain": "sales.example.com"},
        {"id": "rroe", "email": "rroe@example.com", "domain": "ops.example.com"},
    ],
}
DIRECTORY: dict[str, Any] = {"apps": {"control-panel": PANEL, "portal": PORTAL}}
APPS = {
    "control-panel": {"dialect": "activeplatform", "grant_ttl_seconds": 60, "require_reason": True},
    "portal": {"dialect": "pyramid"},
}


class Fixture:
    def __init__(self, store: Store, config: Config) -> None:
        self.store, self.config = store, config
        self.directory = DirectoryReader(store, [a.name for a in config.apps], None)
        limits = FailureLimits(config.rate_limit, store, Audit(store, Metrics()))
        self.policy = Policy(self.directory, store, limits)

    async def load(self, directory: dict[str, Any]) -> None:
        await self.store.load_directory(parse_directory(directory))
        await self.directory.refresh()


@pytest.fixture
async def policy() -> AsyncIterator[Fixture]:
    redis = fakeredis.FakeAsyncRedis()
    config = make_config("p:", "http://upstream.invalid", APPS)
    fixture = Fixture(Store(redis, "p:"), config)
    await fixture.load(DIRECTORY)
    yield fixture
    await fixture.directory.close()
    await redis.aclose()


def command(app: str, credential: str | None, target: SubjectRef, **fields: Any) -> ImpersonationCommand:
    fields.setdefault("reason", "ticket 1" if app == "control-panel" else None)
    return ImpersonationCommand(app=app, dialect="x", credential=credential, target=target, client="c", **fields)


@pytest.mark.parametrize(
    ("app", "credential", "target", "fields", "expected"),
    [
        ("control-panel", "mgr-1-token", SubjectRef(id="505"), {}, ("mgr-1", "505")),
        ("control-panel", "mgr-1-token", SubjectRef(id="707"), {}, ("mgr-1", "707")),  # downstream reseller
        ("control-panel", "mgr-1-token", SubjectRef(id="707"), {"reseller": "7"}, ("mgr-1", "707")),
        ("control-panel", "mgr-7-token", SubjectRef(id="707"), {}, ("mgr-7", "707")),
        ("control-panel", "mgr-7-token", SubjectRef(id="505"), {}, NotFound("subject")),  # upstream of its subtree
        ("control-panel", "mgr-7-token", SubjectRef(id="707"), {"reseller": "1"}, Forbidden("scope")),
        ("control-panel", "mgr-1-token", SubjectRef(id="909"), {}, NotFound("subject")),  # another subtree
        ("control-panel", "mgr-1-token", SubjectRef(id="505"), {"reseller": "42"}, NotFound("reseller")),
        ("control-panel", "mkt-1-token", SubjectRef(id="505"), {}, Forbidden("role")),
        ("control-panel", None, SubjectRef(id="505"), {}, Unauthenticated("missing")),
        ("control-panel", "nobody's-token", SubjectRef(id="505"), {}, Unauthenticated("unknown")),
        ("control-panel", "mgr-1-token", SubjectRef(id="505"), {"reason": None}, Invalid("reason", "missing")),
        ("control-panel", "mgr-1-token", SubjectRef(id="505"), {"ttl_seconds": 60}, ("mgr-1", "505")),
        ("control-panel", "mgr-1-token", SubjectRef(id="505"), {"ttl_seconds": 61}, Invalid("ttl_seconds", "value")),
        ("control-panel", "mgr-1-token", SubjectRef(id="505"), {"ttl_seconds": 0}, Invalid("ttl_seconds", "value")),
        ("control-panel", "mgr-1-token", SubjectRef(id="606"), {}, NotFound("subject", "id")),  # inactive
        ("control-panel", "mgr-1-token", SubjectRef(id="404"), {}, NotFound("subject", "id")),
        ("control-panel", "mgr-1-token", SubjectRef(id="909"), {"bind": ("email",)}, NotFound("subject", "email")),
        ("control-panel", "mgr-1-token", SubjectRef(), {}, Invalid("subject", "missing")),
        ("portal", "ea-token", SubjectRef(identity="rroe@example.com"), {}, ("ea", "rroe")),
        ("portal", "da-token", SubjectRef(identity="jdoe@example.com"), {}, ("da", "jdoe")),
        ("portal", "da-token", SubjectRef(identity="rroe@example.com"), {}, Forbidden("scope")),
        # a principal's domain is matched in full: "SALES" is not sales.example.com, as before the split
        ("portal", "short-token", SubjectRef(identity="jdoe@example.com"), {}, Forbidden("scope")),
        ("portal", "ea-token", SubjectRef(identity="jdoe", domain="SALES"), {}, ("ea", "jdoe")),
        ("portal", "ea-token", SubjectRef(identity="jdoe", domain="OPS"), {}, NotFound("subject", "identity")),
    ],
)  # fmt: skip
async def test_authorise(
    policy: Fixture, app: str, credential: str | None, target: SubjectRef, fields: dict[str, Any], expected: Any
) -> None:
    cmd = command(app, credential, target, **fields)
    if isinstance(expected, GatewayError):
        with pytest.raises(type(expected)) as raised:
            await policy.policy.authorise(policy.config.app(app), cmd)
        assert raised.value.args == expected.args
    else:
        principal, subject = await policy.policy.authorise(policy.config.app(app), cmd)
        assert (principal.id, subject.id) == expected


@pytest.mark.parametrize(
    ("held", "asked", "by_first_label", "same"),
    [
        ("sales.example.com", "SALES.example.com", False, True),
        ("sales.example.com", "sales", False, False),
        ("sales.example.com", "SALES", True, True),
        ("sales.example.com", "example", True, False),
        (None, "sales", True, False),
    ],
)
def test_one_domain_check(held: str | None, asked: str, by_first_label: bool, same: bool) -> None:
    assert same_domain(held, asked, by_first_label=by_first_label) is same


def edited(change: str) -> dict[str, Any]:
    directory = copy.deepcopy(DIRECTORY)
    panel = directory["apps"]["control-panel"]
    mgr_1, subject_505 = panel["principals"][0], panel["subjects"][0]
    match change:
        case "nothing":
            pass
        case "actor removed":
            panel["principals"].remove(mgr_1)
        case "credential rotated":
            mgr_1["token"] = "a-new-token"
        case "role changed":
            mgr_1["role"] = "marketing"
        case "actor moved":  # its reseller scope is not checked again: the grant was within it when minted
            mgr_1["reseller"] = 9
        case "subject removed":
            panel["subjects"].remove(subject_505)
        case "subject inactive":
            subject_505["active"] = False
    return directory


async def minted(policy: Fixture) -> Grant:
    app = policy.config.app("control-panel")
    principal, subject = await policy.policy.authorise(app, command("control-panel", "mgr-1-token", SubjectRef("505")))
    return Grant(id="g" * 16, app=app.name, dialect=app.dialect, subject=subject.id, actor=principal.id,
                 role=principal.role, actor_key=actor_key(principal), issued_at=0, expires_at=60,
                 inc=subject.incarnation)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ("nothing", None),
        ("actor moved", None),
        ("actor removed", Refusal.REVOKED),
        ("credential rotated", Refusal.REVOKED),
        ("role changed", Refusal.REVOKED),
        ("subject removed", Refusal.REVOKED),
        ("subject inactive", Refusal.REVOKED),
    ],
)
async def test_still_allowed_after_a_directory_change(policy: Fixture, change: str, refusal: Refusal | None) -> None:
    grant = await minted(policy)
    await policy.load(edited(change))
    assert await policy.policy.still_allowed(policy.config.app("control-panel"), grant) == refusal


@pytest.mark.parametrize("change", ["subject removed", "subject inactive"])
async def test_a_subject_back_is_another_incarnation(policy: Fixture, change: str) -> None:
    grant = await minted(policy)
    await policy.load(edited(change))
    await policy.load(DIRECTORY)
    assert await policy.policy.still_allowed(policy.config.app("control-panel"), grant) == Refusal.SUBJECT_CHANGED


async def test_still_allowed_reads_the_grant_not_the_app_defaults(policy: Fixture) -> None:
    grant = await minted(policy)
    app: AppConfig = policy.config.app("control-panel")
    assert await policy.policy.still_allowed(app, grant) is None
    other_life = Grant(**{**grant.__dict__, "inc": "another"})
    assert await policy.policy.still_allowed(app, other_life) == Refusal.SUBJECT_CHANGED
