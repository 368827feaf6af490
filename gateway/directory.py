"""The directory: who may impersonate whom, per app (DESIGN §5 and §11).

Parsed from ``directory.yaml`` into frozen values; plain ``token`` credentials are hashed here, so only
SHA-256 hex digests ever reach the store. An app's few principals and resellers (its :class:`Actors`)
travel as one document that every process caches; its subjects, possibly millions, are one store key each
and are never all in memory: a ``subjects_file`` (JSON Lines) is read a line at a time by
:class:`SubjectsFile`, and the gateway looks subjects up one at a time.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from .config import read_yaml

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Attribute names never shown as a subject's public data, whatever the directory holds.
_SECRET_NAMES = re.compile(r"pass|pwd|secret|token|credential|hash|api_?key", re.IGNORECASE)
SUBJECT_FIELDS = frozenset(
    {"id", "email", "name", "reseller", "domain", "uuid", "identifiers", "token", "token_sha256", "attributes",
     "active", "external_id"}
)  # fmt: skip


class DirectoryError(ValueError):
    """A problem in a directory file; ``str()`` names the entry."""


def new_incarnation() -> str:
    """A fresh incarnation stamp: short (every grant holds one), random (two lives of a subject never share one)."""
    return secrets.token_urlsafe(6)


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
    """Someone an actor can become inside one app; an inactive one (SCIM ``active: false``) can't be."""

    id: str
    email: str | None = None
    name: str | None = None
    reseller: str | None = None
    domain: str | None = None
    uuid: str | None = None
    identifiers: tuple[str, ...] = ()
    token_sha256: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    active: bool = True
    external_id: str | None = None
    scim: Mapping[str, Any] | None = None  # the SCIM User it was last written as, if it was (round-tripped as is)
    # Which life of the subject this is: new when it is created, re-created after a removal, or reactivated; a
    # grant is honoured only by the incarnation it was minted for. None for a subject stored before there were
    # incarnations (and its grants). Last, so that its JSON ends with it (see the load script in the store).
    incarnation: str | None = None

    def public(self) -> dict[str, Any]:
        """The subject's public attributes: never a credential, hash or anything named like one."""
        data: dict[str, Any] = {k: v for k, v in _scrub(dict(self.attributes)).items()}
        data.update({"id": self.id, "email": self.email, "name": self.name})
        for key in ("reseller", "domain", "uuid"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    def to_json(self) -> bytes:
        data = {k: v for k, v in self.__dict__.items() if v is not None and v != () and v != {}}
        if self.active:
            del data["active"]
        return orjson.dumps(data)

    @classmethod
    def from_json(cls, data: bytes) -> Subject:
        raw = orjson.loads(data)
        if "identifiers" in raw:
            raw["identifiers"] = tuple(raw["identifiers"])
        return cls(**raw)

    def index(self) -> list[tuple[str, str]]:
        """The look-ups that find this subject, as ``(kind, value)``: ``id`` and ``email`` (casefolded, and
        shared: several subjects may answer one), ``identifier``, ``token`` and ``external`` (unique)."""
        entries = [("id", self.id.casefold())]
        emails = {self.email.casefold()} if self.email else set()
        for entry in (self.scim or {}).get("emails") or ():  # a SCIM user is found by any of its e-mails
            if isinstance(entry, dict) and isinstance(entry.get("value"), str):
                emails.add(entry["value"].casefold())
        entries.extend(("email", e) for e in sorted(emails))
        entries.extend(("identifier", i) for i in self.identifiers)
        if self.token_sha256:
            entries.append(("token", self.token_sha256))
        if self.external_id:
            entries.append(("external", self.external_id))
        return entries

    def answers_to(self, user: str, domain: str | None) -> bool:
        """Whether the (casefolded) identity ``user`` names this subject, in ``domain`` when one is given:
        ``user`` is its id or e-mail (see :func:`identity_candidates` for the UPN form)."""
        return user in (self.id.casefold(), (self.email or "").casefold()) and (not domain or same_domain(
            self.domain, domain))  # fmt: skip


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not _SECRET_NAMES.search(str(k))}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def same_domain(held: str | None, asked: str, *, by_first_label: bool = True) -> bool:
    """Whether the domain ``held`` (a subject's, or None) is the domain ``asked``, in any case: named in full
    (``sales.example.com``) or, when ``by_first_label``, by its first label (``SALES``) as a request may name it.
    A principal's domain scopes it in full only (``by_first_label=False``): a first label would reach every
    domain that begins with it."""
    if held is None:
        return False
    held, asked = held.casefold(), asked.casefold()
    return held == asked or (by_first_label and held.split(".", 1)[0] == asked)


@dataclass(frozen=True)
class Actors:
    """One app's principals and resellers: few, so every process keeps them in memory."""

    resellers: Mapping[str, str | None] = field(default_factory=dict)  # id -> parent id
    principals: tuple[Principal, ...] = ()

    @cached_property
    def _by_credential(self) -> dict[str, Principal]:
        return {p.credential_sha256: p for p in self.principals}

    @cached_property
    def _by_id(self) -> dict[str, Principal]:
        return {p.id: p for p in self.principals}

    def principal(self, credential_sha256: str) -> Principal | None:
        return self._by_credential.get(credential_sha256)

    def principal_by_id(self, principal_id: str) -> Principal | None:
        return self._by_id.get(principal_id)

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
        return orjson.dumps({"resellers": dict(self.resellers), "principals": [p.__dict__ for p in self.principals]})

    @classmethod
    def from_json(cls, data: bytes) -> Actors:
        raw = orjson.loads(data)
        return cls(raw["resellers"], tuple(Principal(**p) for p in raw["principals"]))


@dataclass(frozen=True)
class AppDirectory:
    """One app as a directory file gives it: its actors, and its subjects (a list, or a JSON Lines file read
    as it is iterated)."""

    app: str
    actors: Actors = field(default_factory=Actors)
    subjects: Iterable[Subject] = ()


class SubjectsFile:
    """A ``subjects_file``: JSON Lines, one subject object per line (blank lines skipped), read one line at a
    time whenever it is iterated; a bad line raises DirectoryError naming the file and line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self) -> Iterator[Subject]:
        try:
            with self.path.open("rb") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    where = f"{self.path.name}:{number}"
                    try:
                        data = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        raise DirectoryError(f"{where}: not valid JSON (a line cut short?)") from None
                    yield parse_subject(data, where)
        except OSError as exc:
            raise DirectoryError(f"directory: cannot read {self.path}: {exc.strerror}") from None

    def __repr__(self) -> str:
        return f"SubjectsFile({str(self.path)!r})"


def identity_candidates(user: str) -> tuple[str, str | None, str | None]:
    """``user`` casefolded, and for a UPN (``name@domain``) its name and domain: when nobody's id or e-mail
    is the UPN, it names the subject ``name`` of ``domain``."""
    user = user.casefold()
    name, at, upn_domain = user.rpartition("@")
    return (user, name, upn_domain) if at and name and upn_domain else (user, None, None)


def load_directory_file(path: str | Path) -> dict[str, AppDirectory]:
    """Parse a directory file; raises :class:`DirectoryError` naming the bad entry. Subjects in a
    ``subjects_file`` are not read here: they stream when the app's subjects are iterated."""
    path = Path(path)
    raw = read_yaml(path, "directory", DirectoryError)
    return parse_directory(raw, base_dir=path.resolve().parent)


def parse_directory(raw: Any, *, base_dir: Path | None = None) -> dict[str, AppDirectory]:
    if not isinstance(raw, dict) or not isinstance(raw.get("apps"), dict):
        raise DirectoryError("apps: expected a mapping of app name to its directory")
    unknown = set(raw) - {"apps"}
    if unknown:
        raise DirectoryError(f"{sorted(unknown)[0]}: unknown key")
    return {str(name): _parse_app(str(name), data, base_dir) for name, data in raw["apps"].items()}


def _parse_app(app: str, data: Any, base_dir: Path | None) -> AppDirectory:
    key = f"apps.{app}"
    data = _mapping(data or {}, key, {"resellers", "principals", "subjects", "subjects_file"})
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
    _unique((p.credential_sha256 for p in principals), f"{key}.principals: two principals share a credential")
    subjects: Iterable[Subject]
    if "subjects_file" in data:
        if "subjects" in data:
            raise DirectoryError(f"{key}: give subjects or subjects_file, not both")
        name = Path(_str(data["subjects_file"], f"{key}.subjects_file"))
        subjects = SubjectsFile(name if name.is_absolute() or base_dir is None else base_dir / name)
    else:
        listed = _list(data.get("subjects"), f"{key}.subjects")
        subjects = tuple(parse_subject(s, f"{key}.subjects[{i}]") for i, s in enumerate(listed))
        _unique((s.id for s in subjects), f"{key}.subjects: duplicate id")
    return AppDirectory(app, Actors(resellers, tuple(principals)), subjects)


def parse_subject(raw: Any, key: str) -> Subject:
    """One subject entry (a YAML list item, a JSON line, a SCIM user's fields) with the fields of DESIGN §5; its id
    as :func:`subject_id` takes it."""
    s = _mapping(raw, key, SUBJECT_FIELDS)
    attributes = s.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise DirectoryError(f"{key}.attributes: expected a mapping")
    active = s.get("active", True)
    if not isinstance(active, bool):
        raise DirectoryError(f"{key}.active: expected true or false")
    return Subject(
        id=subject_id(s.get("id"), f"{key}.id"),
        email=_opt_str(s.get("email"), f"{key}.email"),
        name=_opt_str(s.get("name"), f"{key}.name"),
        reseller=_opt_id(s.get("reseller"), f"{key}.reseller"),
        domain=_opt_str(s.get("domain"), f"{key}.domain"),
        uuid=_opt_str(s.get("uuid"), f"{key}.uuid"),
        identifiers=tuple(_str(x, f"{key}.identifiers") for x in _list(s.get("identifiers"), key)),
        token_sha256=_credential(s, key),
        attributes=attributes,
        active=active,
        external_id=_opt_str(s.get("external_id"), f"{key}.external_id"),
    )


def source_digest(directory: AppDirectory) -> str:
    """A digest of what ``directory`` holds (its subjects file read as bytes): a gateway that finds the store
    already loaded from the same source at start-up does not load it again."""
    digest = hashlib.sha256(directory.actors.to_json())
    if isinstance(directory.subjects, SubjectsFile):
        try:
            with directory.subjects.path.open("rb") as data:
                for block in iter(lambda: data.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise DirectoryError(f"directory: cannot read {directory.subjects.path}: {exc.strerror}") from None
    else:
        for subject in directory.subjects:
            digest.update(subject.to_json())
    return digest.hexdigest()


def _unique(values: Iterable[str], message: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise DirectoryError(message)
        seen.add(v)


def _mapping(value: Any, key: str, allowed: Iterable[str]) -> dict[str, Any]:
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


def subject_id(value: Any, key: str) -> str:
    """A subject's id: a string or number that reads as it is: printable, no space at either end, no invisible
    (format) character, digits only ASCII ones. So no two ids look alike (``505``, ``505 ``, Arabic-Indic or
    full-width digits, ``505`` with a zero-width space); DirectoryError says why one is refused."""
    text = _id(value, key)
    if text != text.strip():
        raise DirectoryError(f"{key}: must not begin or end with a space")
    for char in text:
        category = unicodedata.category(char)
        if category == "Cf":
            raise DirectoryError(f"{key}: must not hold an invisible character (U+{ord(char):04X})")
        if not char.isprintable():
            raise DirectoryError(f"{key}: must be printable (U+{ord(char):04X} is not)")
        if category == "Nd" and not char.isascii():
            raise DirectoryError(f"{key}: digits must be ASCII 0-9 (U+{ord(char):04X} is not)")
    return text


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
