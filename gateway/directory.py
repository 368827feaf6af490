"""The directory: who may impersonate whom, per app (DESIGN §5).

Parsed from ``directory.yaml`` into frozen values; plain ``token`` credentials are hashed here, so only
SHA-256 hex digests ever reach the store. One app's data travels as one JSON document, which is what
lets ``directory load`` replace it atomically.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson
import yaml

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Attribute names never shown as a subject's public data, whatever the directory holds.
_SECRET_NAMES = re.compile(r"pass|pwd|secret|token|credential|hash|api_?key", re.IGNORECASE)


class DirectoryError(ValueError):
    """A problem in a directory file; ``str()`` names the entry."""


def credential_hash(credential: str) -> str:
    """SHA-256 hex of a credential or grant token: the only form in which either is stored."""
    return hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An actor allowed to ask for grants: an API credential with a role and a scope."""

    id: str
    role: str
    credential_sha256: str
    reseller: str | None = None
    domain: str | None = None


@dataclass(frozen=True)
class Subject:
    """Someone an actor can become inside one app."""

    id: str
    email: str | None = None
    name: str | None = None
    reseller: str | None = None
    domain: str | None = None
    uuid: str | None = None
    identifiers: tuple[str, ...] = ()
    token_sha256: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The subject's public attributes: never a credential, hash or anything named like one."""
        data: dict[str, Any] = {k: v for k, v in _scrub(dict(self.attributes)).items()}
        data.update({"id": self.id, "email": self.email, "name": self.name})
        for key in ("reseller", "domain", "uuid"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not _SECRET_NAMES.search(str(k))}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


@dataclass(frozen=True)
class AppDirectory:
    """One app's resellers, principals and subjects, with the look-ups core needs."""

    app: str
    resellers: Mapping[str, str | None] = field(default_factory=dict)  # id -> parent id
    principals: tuple[Principal, ...] = ()
    subjects: tuple[Subject, ...] = ()

    @cached_property
    def _by_credential(self) -> dict[str, Principal]:
        return {p.credential_sha256: p for p in self.principals}

    @cached_property
    def _by_id(self) -> dict[str, Subject]:
        return {s.id: s for s in self.subjects}

    @cached_property
    def _by_identifier(self) -> dict[str, Subject]:
        return {i: s for s in self.subjects for i in s.identifiers}

    @cached_property
    def _by_token(self) -> dict[str, Subject]:
        return {s.token_sha256: s for s in self.subjects if s.token_sha256}

    @cached_property
    def _principal_by_id(self) -> dict[str, Principal]:
        return {p.id: p for p in self.principals}

    def principal(self, credential_sha256: str) -> Principal | None:
        return self._by_credential.get(credential_sha256)

    def principal_by_id(self, principal_id: str) -> Principal | None:
        return self._principal_by_id.get(principal_id)

    def subject(self, subject_id: str) -> Subject | None:
        return self._by_id.get(subject_id)

    def subject_by_identifier(self, identifier: str) -> Subject | None:
        return self._by_identifier.get(identifier)

    def subject_by_token(self, token_sha256: str) -> Subject | None:
        return self._by_token.get(token_sha256)

    def subjects_by_identity(self, user: str, domain: str | None) -> list[Subject]:
        """Subjects whose id or email is ``user`` (case-insensitive), in ``domain`` when one is given.

        A UPN that is no subject's id or e-mail (``jdoe@sales.example.com``) names the subject ``jdoe`` of
        that domain. A domain matches a subject's domain in full (``sales.example.com``) or by its first
        label, as a Windows ``SALES\\jdoe`` names it.
        """
        user = user.casefold()
        found = [s for s in self.subjects if user in (s.id.casefold(), (s.email or "").casefold())]
        name, at, upn_domain = user.rpartition("@")
        if not found and at and name and upn_domain:
            found = [s for s in self.subjects if s.id.casefold() == name and _same_domain(s.domain, upn_domain)]
        if domain:
            found = [s for s in found if _same_domain(s.domain, domain)]
        return found

    def reseller_exists(self, reseller: str) -> bool:
        return reseller in self.resellers

    def within(self, reseller: str | None, ancestor: str) -> bool:
        """True when ``reseller`` is ``ancestor`` or downstream of it (cycles end the walk)."""
        seen: set[str] = set()
        while reseller is not None and reseller not in seen:
            if reseller == ancestor:
                return True
            seen.add(reseller)
            reseller = self.resellers.get(reseller)
        return False

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "app": self.app,
                "resellers": dict(self.resellers),
                "principals": [p.__dict__ for p in self.principals],
                "subjects": [{**s.__dict__, "attributes": dict(s.attributes)} for s in self.subjects],
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> AppDirectory:
        raw = orjson.loads(data)
        return cls(
            app=raw["app"],
            resellers=raw["resellers"],
            principals=tuple(Principal(**p) for p in raw["principals"]),
            subjects=tuple(Subject(**{**s, "identifiers": tuple(s["identifiers"])}) for s in raw["subjects"]),
        )


def _same_domain(held: str | None, asked: str) -> bool:
    if held is None:
        return False
    held, asked = held.casefold(), asked.casefold()
    return held == asked or held.split(".", 1)[0] == asked


def load_directory_file(path: str | Path) -> dict[str, AppDirectory]:
    """Parse a directory file; raises :class:`DirectoryError` naming the bad entry."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DirectoryError(f"directory: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise DirectoryError(f"directory: {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    return parse_directory(raw)


def parse_directory(raw: Any) -> dict[str, AppDirectory]:
    if not isinstance(raw, dict) or not isinstance(raw.get("apps"), dict):
        raise DirectoryError("apps: expected a mapping of app name to its directory")
    unknown = set(raw) - {"apps"}
    if unknown:
        raise DirectoryError(f"{sorted(unknown)[0]}: unknown key")
    return {str(name): _parse_app(str(name), data) for name, data in raw["apps"].items()}


def _parse_app(app: str, data: Any) -> AppDirectory:
    key = f"apps.{app}"
    data = _mapping(data or {}, key, {"resellers", "principals", "subjects"})
    resellers: dict[str, str | None] = {}
    for i, r in enumerate(_list(data.get("resellers"), f"{key}.resellers")):
        r = _mapping(r, f"{key}.resellers[{i}]", {"id", "parent"})
        rid = _id(r.get("id"), f"{key}.resellers[{i}].id")
        resellers[rid] = None if r.get("parent") is None else _id(r["parent"], f"{key}.resellers[{i}].parent")
    principals = []
    for i, p in enumerate(_list(data.get("principals"), f"{key}.principals")):
        pkey = f"{key}.principals[{i}]"
        p = _mapping(p, pkey, {"id", "role", "token", "token_sha256", "reseller", "domain"})
        credential = _credential(p, pkey)
        if credential is None:
            raise DirectoryError(f"{pkey}: needs token or token_sha256")
        principals.append(
            Principal(
                id=_id(p.get("id"), f"{pkey}.id"),
                role=_str(p.get("role"), f"{pkey}.role"),
                credential_sha256=credential,
                reseller=_opt_id(p.get("reseller"), f"{pkey}.reseller"),
                domain=_opt_str(p.get("domain"), f"{pkey}.domain"),
            )
        )
    subjects = []
    fields = {"id", "email", "name", "reseller", "domain", "uuid", "identifiers", "token", "token_sha256", "attributes"}
    for i, s in enumerate(_list(data.get("subjects"), f"{key}.subjects")):
        skey = f"{key}.subjects[{i}]"
        s = _mapping(s, skey, fields)
        attributes = s.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise DirectoryError(f"{skey}.attributes: expected a mapping")
        subjects.append(
            Subject(
                id=_id(s.get("id"), f"{skey}.id"),
                email=_opt_str(s.get("email"), f"{skey}.email"),
                name=_opt_str(s.get("name"), f"{skey}.name"),
                reseller=_opt_id(s.get("reseller"), f"{skey}.reseller"),
                domain=_opt_str(s.get("domain"), f"{skey}.domain"),
                uuid=_opt_str(s.get("uuid"), f"{skey}.uuid"),
                identifiers=tuple(_str(x, f"{skey}.identifiers") for x in _list(s.get("identifiers"), skey)),
                token_sha256=_credential(s, skey),
                attributes=attributes,
            )
        )
    _unique((p.credential_sha256 for p in principals), f"{key}.principals: two principals share a credential")
    _unique((s.id for s in subjects), f"{key}.subjects: duplicate id")
    return AppDirectory(app=app, resellers=resellers, principals=tuple(principals), subjects=tuple(subjects))


def _unique(values: Iterable[str], message: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise DirectoryError(message)
        seen.add(v)


def _mapping(value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DirectoryError(f"{key}: expected a mapping")
    for k in value:
        if k not in allowed:
            raise DirectoryError(f"{key}.{k}: unknown key")
    return value


def _list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DirectoryError(f"{key}: expected a list")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise DirectoryError(f"{key}: expected a non-empty string")
    return value


def _opt_str(value: Any, key: str) -> str | None:
    return None if value is None else _str(value, key)


def _id(value: Any, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise DirectoryError(f"{key}: expected a string or number")
    return str(value)


def _opt_id(value: Any, key: str) -> str | None:
    return None if value is None else _id(value, key)


def _credential(entry: dict[str, Any], key: str) -> str | None:
    if "token" in entry and "token_sha256" in entry:
        raise DirectoryError(f"{key}: give token or token_sha256, not both")
    if "token" in entry:
        return credential_hash(_str(entry["token"], f"{key}.token"))
    if "token_sha256" in entry:
        digest = _str(entry["token_sha256"], f"{key}.token_sha256").lower()
        if not _HEX64.fullmatch(digest):
            raise DirectoryError(f"{key}.token_sha256: expected 64 hex digits")
        return digest
    return None
