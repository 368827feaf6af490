"""SCIM 2.0 provisioning of subjects (RFC 7643, RFC 7644), one base per app: ``/scim/v2/{app}/``.

A User is a subject: ``userName`` is the subject's id (the account the gateway logs into; it can't change, and
the schema published here says ``immutable``), the primary e-mail its ``email``, ``displayName`` its ``name``,
and ``active: false`` (or DELETE) makes it impossible to impersonate: its live grants are refused at
redemption. The extension ``urn:impersonation-gateway:params:scim:schemas:extension:subject:2.0:User`` holds
``reseller``, ``domain``, ``uuid``, ``identifiers`` and ``attributes`` (name/value pairs). Models, validation,
filters, PATCH and the discovery documents come from scim2-models. A User written through SCIM is kept as
written and given back as such; subjects loaded from a directory file are shown through the same mapping.

A deactivated User stays deactivated until a write says ``active: true``: a PUT without ``active``, or a PATCH
that removes it, leaves it as it was (a new User is active unless it says otherwise). Creating a User, and
reactivating one, starts a new incarnation of its subject: grants minted before are never honoured.

Writes go to the generation of the app's directory in use, one subject at a time, atomically with its index
entries, if the subject is still what the write read: one that meets another writer in between reads and tries
again, five times, then answers 409 (:meth:`gateway.store.directory.DirectoryStore.change`). A directory load
replaces all subjects, including what SCIM wrote while it ran.

Bounds, so that no request holds the gateway up: a body of at most :data:`MAX_BODY` bytes arriving within
``server.body_timeout_seconds`` (408 after), at most :data:`MAX_ITEMS` entries in any list of it (a PATCH's
operations, a User's e-mails: ``400 tooMany``), a filter of at most :data:`MAX_FILTER` characters
(``400 invalidFilter``). The models' validation and PATCH are plain Python whose cost grows with the User, so
they run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import quote

import orjson
import structlog
from aiohttp import web
from pydantic import ValidationError
from scim2_models import (
    URN,
    ComplexAttribute,
    Context,
    Error,
    Extension,
    Mutability,
    PatchOp,
    Required,
    ResourceType,
    ResponseParameters,
    SCIMException,
    ScimFilter,
    Uniqueness,
)
from scim2_models import User as ScimUser
from scim2_models.path.expressions import AttrPath, Comparison, LogicalExpr, LogicalOperator

from . import body as bodies
from .config import Config
from .core import Gateway
from .directory import DirectoryError, Subject, new_incarnation, parse_subject
from .errors import GatewayError, PayloadTooLarge, RequestTimeout, StoreUnavailable, UnsupportedEncoding
from .logging import loggable_path, unexpected
from .store import Contended

log = structlog.get_logger("gateway")

MEDIA_TYPE = "application/scim+json"
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
EXTENSION = "urn:impersonation-gateway:params:scim:schemas:extension:subject:2.0:User"
MAX_RESULTS = 200
MAX_BODY = 64 * 1024  # a User, a PatchOp or a SearchRequest: a few kB in practice
MAX_ITEMS = 100  # entries of any list in a body (a PATCH's operations) or in a User (its e-mails)
MAX_FILTER = 1024  # characters of a filter
MAX_START = 2**53  # a startIndex past any directory's size (Redis takes 64-bit integers only)
_DROPPED = ("id", "meta", "password")  # never kept: assigned, computed, or a secret the gateway has no use for
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SubjectAttribute(ComplexAttribute):
    """One attribute of the subject's own, shown to the app (Denovolab's ``payload.user``)."""

    name: str | None = None
    value: str | None = None


class SubjectFields(Extension):
    """The subject's fields beyond the core User's."""

    __schema__ = URN(EXTENSION)

    reseller: str | None = None
    """The reseller the account belongs to (ActivePlatform)."""

    domain: str | None = None
    """The domain of the user (Pyramid)."""

    uuid: str | None = None
    """The user's uuid (BTC Direct)."""

    identifiers: list[str] | None = None
    """A partner's identifiers for the user (BTC Direct)."""

    attributes: list[SubjectAttribute] | None = None
    """The subject's own attributes, as name/value pairs."""


class User(ScimUser[SubjectFields]):
    """A subject of the app, as a SCIM User."""

    user_name: Annotated[str | None, Mutability.immutable, Required.true, Uniqueness.server] = None
    """The subject's id: the account the gateway logs into. It can't change."""


_PATCH = PatchOp[User]


class ScimError(Exception):
    """An answer in SCIM's error shape: ``status``, an optional ``scimType`` and a ``detail``."""

    def __init__(self, status: int, detail: str, scim_type: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.scim_type = status, detail, scim_type

    @classmethod
    def of(cls, exc: SCIMException) -> ScimError:
        return cls(int(exc.status), str(exc.detail), exc.scim_type)


def error_response(status: int, detail: str, scim_type: str | None = None) -> web.Response:
    body = Error(status=status, detail=detail, scim_type=scim_type).model_dump(mode="json", exclude_none=True)
    return web.Response(body=orjson.dumps(body), status=status, content_type=MEDIA_TYPE)


def gateway_error_response(error: GatewayError) -> web.Response:
    """A gateway error met on SCIM's paths (a body that is too big, too slow, undecodable; the store down)."""
    match error:
        case RequestTimeout():
            response = error_response(408, "the request body did not arrive in time")
            response.force_close()  # what is left of the body may still be on its way
            return response
        case PayloadTooLarge(limit=limit):
            return error_response(413, f"the request body is over {limit} bytes")
        case UnsupportedEncoding(encoding=encoding):
            return error_response(415, f"a body with Content-Encoding {encoding} cannot be decoded")
        case StoreUnavailable():
            return error_response(503, "the store is unavailable")
    return error_response(500, "an unexpected error; it is logged")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=MEDIA_TYPE, headers=headers)


# -- subjects as Users ------------------------------------------------------------------------------------
def user_of(subject: Subject) -> dict[str, Any]:
    """The User a subject is (without ``id`` and ``meta``, added when it is shown)."""
    if subject.scim is not None:
        return {k: v for k, v in subject.scim.items() if k != "meta"}
    doc: dict[str, Any] = {"schemas": [USER_SCHEMA], "userName": subject.id, "active": subject.active}
    if subject.external_id:
        doc["externalId"] = subject.external_id
    if subject.name:
        doc["displayName"] = subject.name
    if subject.email:
        doc["emails"] = [{"value": subject.email, "primary": True}]
    fields: dict[str, Any] = {k: getattr(subject, k) for k in ("reseller", "domain", "uuid") if getattr(subject, k)}
    if subject.identifiers:
        fields["identifiers"] = list(subject.identifiers)
    if subject.attributes:
        fields["attributes"] = [{"name": k, "value": v if isinstance(v, str) else orjson.dumps(v).decode()}
                                for k, v in subject.attributes.items()]  # fmt: skip
    if fields:
        doc["schemas"].append(EXTENSION)
        doc[EXTENSION] = fields
    return doc


def subject_of(user: User, was: Subject | None, now: str) -> Subject:
    """The subject a (validated) User describes, written over ``was`` (None: a new one). Its own user token
    (BTC Direct), which SCIM does not carry, is kept from what it was; so is its activity when the User leaves
    ``active`` out (a deactivated subject is reactivated only by ``active: true``). A new subject, or one
    reactivated, gets a new incarnation; any other write keeps the one it had. 400 ``tooMany`` for a User
    holding more than :data:`MAX_ITEMS` values of an attribute."""
    emails = user.emails or []
    primary = next((e for e in emails if e.primary), emails[0] if emails else None)
    fields = user[SubjectFields] or SubjectFields()
    raw: dict[str, Any] = {
        "id": user.user_name,
        "email": str(primary.value) if primary is not None and primary.value else None,
        "name": user.display_name,
        "external_id": user.external_id,
        "active": (was is None or was.active) if user.active is None else user.active,
        "reseller": fields.reseller,
        "domain": fields.domain,
        "uuid": fields.uuid,
        "identifiers": fields.identifiers,
        "attributes": {a.name: a.value for a in fields.attributes or () if a.name and a.value is not None},
    }
    if was is not None and was.token_sha256:
        raw["token_sha256"] = was.token_sha256
    try:
        subject = parse_subject({k: v for k, v in raw.items() if v not in (None, "")}, "User")
    except DirectoryError as exc:
        raise ScimError(400, str(exc), "invalidValue") from None
    doc = user.model_dump(mode="json", exclude_none=True, by_alias=True, scim_ctx=Context.RESOURCE_QUERY_RESPONSE)
    _bounded(doc, "a user")
    for name in _DROPPED:
        doc.pop(name, None)
    if user.active is None and not subject.active:
        doc["active"] = False  # shown as it is: still deactivated
    created = ((was.scim or {}).get("meta") or {}).get("created") if was is not None else None
    doc["meta"] = {"created": created or now, "lastModified": now}
    kept = was is not None and (was.active or not subject.active)
    incarnation = was.incarnation if was is not None and kept else new_incarnation()
    return dataclasses.replace(subject, scim=doc, incarnation=incarnation)


def _found(subject: Subject | None, request: web.Request) -> Subject:
    """``subject``; a 404 naming the id in the path when there is none (the id is decoded once, by aiohttp: the
    Location quotes it once)."""
    if subject is None:
        raise ScimError(404, f"no user {request.match_info['id']!r}")
    return subject


class Users:
    """The SCIM endpoints of every app (``app`` in the path), over the gateway's store."""

    def __init__(self, config: Config, gateway: Gateway) -> None:
        self.apps = {a.name for a in config.apps}
        self.gateway = gateway
        self.store = gateway.store
        self.body_timeout = config.server.body_timeout_seconds

    def routes(self) -> list[web.RouteDef]:
        base = "/scim/v2/{app}"
        return [
            web.get(base + "/ServiceProviderConfig", self.service_provider_config),
            web.get(base + "/ResourceTypes", self.resource_types),
            web.get(base + "/ResourceTypes/{name}", self.resource_type),
            web.get(base + "/Schemas", self.schemas),
            web.get(base + "/Schemas/{urn}", self.schema),
            web.get(base + "/Users", self.list_users),
            web.post(base + "/Users/.search", self.search),
            web.post(base + "/.search", self.search),  # every resource type of the app: its Users
            web.post(base + "/Users", self.create),
            web.get(base + "/Users/{id}", self.read),
            web.put(base + "/Users/{id}", self.replace),
            web.patch(base + "/Users/{id}", self.patch),
            web.delete(base + "/Users/{id}", self.delete),
        ]

    # -- discovery ------------------------------------------------------------------------------------
    async def service_provider_config(self, request: web.Request) -> web.Response:
        base = self._base(request)
        return json_response({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
            "documentationUri": "https://www.rfc-editor.org/rfc/rfc7644",
            "patch": {"supported": True},  # at most MAX_ITEMS operations, in a body of at most MAX_BODY bytes
            "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
            "filter": {"supported": True, "maxResults": MAX_RESULTS},
            "changePassword": {"supported": False},
            "sort": {"supported": False},
            "etag": {"supported": False},
            "authenticationSchemes": [{
                "type": "oauthbearertoken", "name": "Bearer token", "primary": True,
                "description": "Authorization: Bearer <an admin token with the scim scope>",
            }],
            "meta": {"resourceType": "ServiceProviderConfig", "location": f"{base}/ServiceProviderConfig"},
        })  # fmt: skip

    def _resource_type(self, base: str) -> dict[str, Any]:
        doc = ResourceType.from_resource(User).model_dump(mode="json", exclude_none=True, by_alias=True)
        doc["meta"] = {"resourceType": "ResourceType", "location": f"{base}/ResourceTypes/User"}
        return doc

    async def resource_types(self, request: web.Request) -> web.Response:
        return json_response(_list([self._resource_type(self._base(request))]))

    async def resource_type(self, request: web.Request) -> web.Response:
        self._app(request)
        if request.match_info["name"] != "User":
            raise ScimError(404, f"no resource type {request.match_info['name']!r}")
        return json_response(self._resource_type(self._base(request)))

    def _schemas(self, base: str) -> list[dict[str, Any]]:
        found = []
        for model in (User, SubjectFields):
            doc = model.to_schema().model_dump(mode="json", exclude_none=True, by_alias=True)
            doc["meta"] = {"resourceType": "Schema", "location": f"{base}/Schemas/{doc['id']}"}
            found.append(doc)
        return found

    async def schemas(self, request: web.Request) -> web.Response:
        return json_response(_list(self._schemas(self._base(request))))

    async def schema(self, request: web.Request) -> web.Response:
        for doc in self._schemas(self._base(request)):
            if doc["id"] == request.match_info["urn"]:
                return json_response(doc)
        raise ScimError(404, f"no schema {request.match_info['urn']!r}")

    # -- users ----------------------------------------------------------------------------------------
    async def list_users(self, request: web.Request) -> web.Response:
        query = request.query
        start = _positive(query.get("startIndex", "1"), "startIndex", minimum=1)
        count = min(_positive(query.get("count", str(MAX_RESULTS)), "count", minimum=0), MAX_RESULTS)
        chosen = (_names(query.getall("attributes", [])), _names(query.getall("excludedAttributes", [])))
        return await self._found(request, query.get("filter"), start, count, chosen)

    async def search(self, request: web.Request) -> web.Response:
        """``POST /Users/.search``: the query of a list in a SearchRequest body (RFC 7644 §3.4.3)."""
        body = await self._json_in(request)
        if not isinstance(body, dict):
            raise ScimError(400, "the body is not a SearchRequest", "invalidSyntax")
        start = _positive(str(body.get("startIndex", 1)), "startIndex", minimum=1)
        count = min(_positive(str(body.get("count", MAX_RESULTS)), "count", minimum=0), MAX_RESULTS)
        text = body.get("filter")
        if text is not None and not isinstance(text, str):
            raise ScimError(400, "filter must be a string", "invalidFilter")
        chosen = (_names(body.get("attributes") or []), _names(body.get("excludedAttributes") or []))
        return await self._found(request, text, start, count, chosen)

    async def _found(
        self, request: web.Request, text: str | None, start: int, count: int, chosen: tuple[list[str], list[str]]
    ) -> web.Response:
        app = self._app(request)
        generation = await self.store.generation(app)
        if text is not None:
            subjects = await self._filtered(app, generation, text) if generation else []
            total, page = len(subjects), subjects[start - 1 : start - 1 + count]
        elif generation is None:
            total, page = 0, []
        else:
            total, page = await self.store.subject_page(app, generation, min(start, MAX_START) - 1, count)
        base = self._base(request)
        users = await asyncio.to_thread(lambda: [_shown(base, s, chosen) for s in page])
        return json_response(_list(users, total=total, start=start))

    async def read(self, request: web.Request) -> web.Response:
        app = self._app(request)
        return json_response(await self._shown(request, await self._existing(app, request)))

    async def create(self, request: web.Request) -> web.Response:
        app = self._app(request)
        data = await self._json_in(request)
        generation = await self.store.generation(app, start=True)
        assert generation is not None
        subject = await asyncio.to_thread(
            lambda: subject_of(_validated(data, Context.RESOURCE_CREATION_REQUEST), None, _now())
        )
        if not await self.store.put_subject(app, generation, None, subject):
            raise ScimError(409, f"userName {subject.id!r} is taken", "uniqueness")
        response = await self._shown(request, subject)
        return json_response(response, 201, {"Location": response["meta"]["location"]})

    async def replace(self, request: web.Request) -> web.Response:
        app = self._app(request)
        data = await self._json_in(request)
        user = await asyncio.to_thread(_validated, data, Context.RESOURCE_REPLACEMENT_REQUEST)
        return await self._write(request, app, lambda was: user)

    async def patch(self, request: web.Request) -> web.Response:
        """A PatchOp of at most :data:`MAX_ITEMS` operations, applied in a worker thread."""
        app = self._app(request)
        data = await self._json_in(request)
        try:
            operations = await asyncio.to_thread(_PATCH.model_validate, data, scim_ctx=Context.RESOURCE_PATCH_REQUEST)
        except ValidationError as exc:
            raise ScimError(400, _first_error(exc), "invalidSyntax") from None

        def patched(was: Subject) -> User:
            user = _validated(user_of(was), Context.RESOURCE_REPLACEMENT_REQUEST)
            try:
                operations.patch(user)
            except SCIMException as exc:
                raise ScimError.of(exc) from None
            except ValidationError as exc:
                raise ScimError(400, _first_error(exc), "invalidValue") from None
            except (ValueError, TypeError, AttributeError) as exc:  # a value the attribute can't hold
                raise ScimError(400, f"the operations can't apply: {exc}"[:300], "invalidValue") from None
            return user

        return await self._write(request, app, patched)

    async def delete(self, request: web.Request) -> web.Response:
        app = self._app(request)

        async def gone(was: Subject | None) -> None:
            _found(was, request)

        await self._change(app, request, gone)
        return web.Response(status=204)

    async def _write(self, request: web.Request, app: str, make: Callable[[Subject], User]) -> web.Response:
        """Read, change (in a worker thread: ``make`` may be slow) and write one subject; again if another writer
        came in between."""

        def changed(was: Subject) -> Subject:
            user = make(was)
            if user.user_name is not None and user.user_name != was.id:
                raise ScimError(400, "userName names the subject and can't change", "mutability")
            user.user_name = was.id
            return subject_of(user, was, _now())

        async def change(was: Subject | None) -> Subject:
            return await asyncio.to_thread(changed, _found(was, request))

        subject = await self._change(app, request, change)
        assert subject is not None
        return json_response(await self._shown(request, subject))

    async def _change(
        self, app: str, request: web.Request, fn: Callable[[Subject | None], Awaitable[Subject | None]]
    ) -> Subject | None:
        """The store's compare-and-retry write of the subject the path names (:meth:`DirectoryStore.change`); 409
        when other writers keep changing it. A subject deleted or deactivated loses its impersonation sessions at
        once (the directory sweep would end them within a refresh; an admin's change should not wait for it)."""
        try:
            subject = await self.store.change(app, request.match_info["id"], fn)
        except Contended:
            raise ScimError(409, "the user keeps changing: try again") from None
        if self.gateway.config.app(app).session is not None and (subject is None or not subject.active):
            await self.gateway.sessions.end_matching(app, "subject_inactive", subject=request.match_info["id"])
        return subject

    # -- helpers --------------------------------------------------------------------------------------
    def _app(self, request: web.Request) -> str:
        app = request.match_info["app"]
        if app not in self.apps:
            raise ScimError(404, f"no app {app!r}")
        return app

    def _base(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}/scim/v2/{quote(self._app(request), safe='')}"

    async def _existing(self, app: str, request: web.Request) -> Subject:
        return _found(await self.store.current_subject(app, request.match_info["id"]), request)

    async def _filtered(self, app: str, generation: str, text: str) -> list[Subject]:
        """The subjects a filter selects: candidates from the index (the filter must pin ``userName``,
        ``externalId`` or ``emails.value`` with ``eq``, alone, in ``or`` or in an ``and``), then checked against
        the whole filter."""
        if len(text) > MAX_FILTER:
            raise ScimError(400, f"a filter is at most {MAX_FILTER} characters", "invalidFilter")
        try:
            bound = ScimFilter[User](text)
        except SCIMException as exc:
            raise ScimError.of(exc) from None
        except ValueError as exc:
            raise ScimError(400, str(exc), "invalidFilter") from None
        lookups = _lookups(bound.ast)
        if lookups is None:
            raise ScimError(400, "filters select by userName, externalId or emails.value with eq "
                            "(alone, or joined by and/or)", "invalidFilter")  # fmt: skip
        candidates = await self.store.subjects_by(app, generation, lookups)

        def matching() -> list[Subject]:
            return [s for s in candidates if (user := _as_model(user_of(s))) is not None and bound.match(user)]

        return sorted(await asyncio.to_thread(matching), key=lambda s: s.id)

    async def _shown(self, request: web.Request, subject: Subject) -> dict[str, Any]:
        """The subject as the request asks to see it (``attributes``, ``excludedAttributes``)."""
        chosen = (
            _names(request.query.getall("attributes", [])),
            _names(request.query.getall("excludedAttributes", [])),
        )
        return await asyncio.to_thread(_shown, self._base(request), subject, chosen)

    async def _json_in(self, request: web.Request) -> Any:
        """The body as JSON: at most :data:`MAX_BODY` bytes (decoded), arriving within the body timeout, with at
        most :data:`MAX_ITEMS` entries in any of its lists."""
        _, data = await bodies.read(request, MAX_BODY, self.body_timeout)
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ScimError(400, "the body is not JSON", "invalidSyntax") from None
        _bounded(value, "the body")
        return value


def _shown(base: str, subject: Subject, chosen: tuple[list[str], list[str]]) -> dict[str, Any]:
    doc = user_of(subject)
    meta = dict((subject.scim or {}).get("meta") or {})
    location = f"{base}/Users/{quote(subject.id, safe='')}"
    user = {"id": subject.id, **doc, "meta": {"resourceType": "User", **meta, "location": location}}
    attributes, excluded = chosen
    model = _as_model(user) if attributes or excluded else None
    if model is None:
        return user
    try:
        parameters: ResponseParameters[User] = ResponseParameters[User].model_validate(
            {"attributes": attributes or None, "excludedAttributes": excluded or None}
        )
    except (ValidationError, ValueError) as exc:
        raise ScimError(400, f"attributes: {exc}", "invalidValue") from None
    return model.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE, response_parameters=parameters)


def _bounded(value: Any, what: str) -> None:
    """400 ``tooMany`` when a list in ``value`` (JSON) has more than :data:`MAX_ITEMS` entries."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            if len(item) > MAX_ITEMS:
                raise ScimError(400, f"{what} holds a list of more than {MAX_ITEMS} entries", "tooMany")
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())


def _list(resources: list[dict[str, Any]], *, total: int | None = None, start: int = 1) -> dict[str, Any]:
    return {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": len(resources) if total is None else total,
        "startIndex": start,
        "itemsPerPage": len(resources),
        "Resources": resources,
    }


def _lookups(node: Any) -> list[tuple[str, str]] | None:
    """The index look-ups that find every subject ``node`` can select, or None when it pins none."""
    if isinstance(node, Comparison) and node.op.value == "eq" and isinstance(node.value, str):
        path: AttrPath = node.attr_path
        attribute = (path.attr + ("." + path.sub_attr if path.sub_attr else "")).lower()
        kind = {"username": "id", "externalid": "external", "emails.value": "email", "emails": "email"}.get(attribute)
        if kind is None or (path.uri not in (None, USER_SCHEMA)):
            return None
        return [(kind, node.value if kind == "external" else node.value.casefold())]
    if isinstance(node, LogicalExpr):
        found = [_lookups(term) for term in node.terms]
        if node.op is LogicalOperator.or_:
            return None if any(f is None for f in found) else [x for f in found if f for x in f]
        return next((f for f in found if f is not None), None)  # and: any pinned term narrows enough
    return None


def _names(values: Any) -> list[str]:
    """Attribute names given as comma-separated strings (a query parameter) or a list (a SearchRequest)."""
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ScimError(400, "attributes must be a list of names", "invalidValue")
    return [n.strip() for value in values for n in value.split(",") if n.strip()]


def _positive(value: str, name: str, *, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ScimError(400, f"{name} must be an integer", "invalidValue") from None
    return max(number, minimum)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _validated(data: Any, context: Context) -> User:
    if not isinstance(data, dict):
        raise ScimError(400, "the body is not a JSON object", "invalidSyntax")
    try:
        return User.model_validate(data, scim_ctx=context)
    except SCIMException as exc:
        raise ScimError.of(exc) from None
    except ValidationError as exc:
        raise ScimError(400, _first_error(exc), "invalidValue") from None


def _as_model(data: dict[str, Any]) -> User | None:
    """A stored or shown User as the model (None for a subject from a directory file whose values a SCIM User
    can't hold, such as an e-mail address SCIM finds invalid: it is shown as it is, and no filter selects it)."""
    try:
        return User.model_validate(data)
    except (SCIMException, ValidationError):
        return None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ()))
    return f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid"))


@web.middleware
async def scim_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure in SCIM's error shape (RFC 7644 §3.12); an unexpected one is logged and a 500."""
    try:
        return await handler(request)
    except ScimError as exc:
        return error_response(exc.status, exc.detail, exc.scim_type)
    except GatewayError as exc:
        return gateway_error_response(exc)
    except web.HTTPNotFound:
        return error_response(404, "no such endpoint")
    except web.HTTPMethodNotAllowed:
        return error_response(405, "method not allowed")
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason)
    except Exception as exc:  # its class and place only: its text may quote the request's bytes
        log.error("unhandled_error", listener="admin", method=request.method, path=loggable_path(request.path),
                  **unexpected(exc))  # fmt: skip
        return error_response(500, "an unexpected error; it is logged")
