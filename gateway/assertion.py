"""Signed assertions for the downstream app: EdDSA (Ed25519) JWTs, and the JWKS that verifies them."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .config import AssertionConfig


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def generate_key_file(path: str | Path) -> None:
    """Write a new Ed25519 private key as PKCS#8 PEM, readable by its owner only. Refuses to overwrite."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = Path(path)
    with path.open("xb") as fh:  # "x": never clobber a key that processes may already share
        path.chmod(0o600)
        fh.write(pem)


def load_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 PKCS#8 PEM private key; ``ValueError`` says what is wrong with the file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM file holding either half (a previous signing key, or only its public
    part); ``ValueError`` says what is wrong with the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    key: Any
    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


@dataclass(frozen=True)
class Keys:
    """The configured assertion keys: the signing key (None when ``assertion.private_key_file`` is not set), the
    previous ones (published after it), and one line per key file that does not load, naming its setting."""

    signing: Ed25519PrivateKey | None
    previous: tuple[Ed25519PublicKey, ...]
    problems: tuple[str, ...]


def load_keys(assertion: AssertionConfig) -> Keys:
    """Every key file of ``assertion`` read, once: serve, check-config and the app factory all come here."""
    problems: list[str] = []
    signing = None
    if assertion.private_key_file is not None:
        try:
            signing = load_key(assertion.private_key_file)
        except ValueError as exc:
            problems.append(f"assertion.private_key_file: {exc}")
    previous = []
    for i, path in enumerate(assertion.previous_key_files):
        try:
            previous.append(load_public_key(path))
        except ValueError as exc:
            problems.append(f"assertion.previous_key_files[{i}]: {exc}")
    return Keys(signing, tuple(previous), tuple(problems))


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A key's ``kid``: derived from the public key, so every process that shares the key agrees on it."""
    return _b64url(hashlib.sha256(_raw(key)).digest()[:12])


def jwk(key: Ed25519PublicKey) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(_raw(key)), "kid": key_id(key), "alg": "EdDSA", "use": "sig"}


class Signer:
    """Signs assertions with one Ed25519 key; the JWKS also publishes ``previous`` keys (after the signing
    one), so assertions signed before a key rotation still verify."""

    def __init__(
        self, key: Ed25519PrivateKey, issuer: str, ttl_seconds: int, previous: Sequence[Ed25519PublicKey] = ()
    ) -> None:
        self._key = key
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds
        self.kid = key_id(key.public_key())
        keys = {self.kid: jwk(key.public_key())}
        for old in previous:
            keys.setdefault(key_id(old), jwk(old))
        self._jwks = json.dumps({"keys": list(keys.values())}).encode()
        # The header is the same for every assertion: encoded once (a session signs one per request).
        self._header = _b64url(orjson.dumps({"alg": "EdDSA", "kid": self.kid, "typ": "JWT"})).encode()

    def sign(self, claims: dict[str, Any], now: int) -> str:
        """A JWT (compact JWS, EdDSA) with ``claims`` plus ``iss``, ``iat`` and ``exp`` (``now`` + assertion TTL)."""
        payload = {"iss": self.issuer, **claims, "iat": now, "exp": now + self.ttl_seconds}
        signing_input = self._header + b"." + _b64url(orjson.dumps(payload)).encode()
        return (signing_input + b"." + _b64url(self._key.sign(signing_input)).encode()).decode()

    def jwks(self) -> dict[str, Any]:
        return dict(json.loads(self._jwks))

    def jwks_json(self) -> bytes:
        return self._jwks
