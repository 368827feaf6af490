"""Signed assertions for the downstream app: EdDSA (Ed25519) JWTs, and the JWKS that verifies them."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


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


class Signer:
    """Signs assertions with one Ed25519 key; ``kid`` is derived from the public key."""

    def __init__(self, key: Ed25519PrivateKey, issuer: str, ttl_seconds: int) -> None:
        self._key = key
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._public_x = _b64url(raw)
        self.kid = _b64url(hashlib.sha256(raw).digest()[:12])

    def sign(self, claims: dict[str, Any], now: int) -> str:
        """A JWT with ``claims`` plus ``iss``, ``iat`` and ``exp`` (``now`` + the assertion TTL)."""
        payload = {"iss": self.issuer, **claims, "iat": now, "exp": now + self.ttl_seconds}
        return jwt.encode(payload, self._key, algorithm="EdDSA", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {"kty": "OKP", "crv": "Ed25519", "x": self._public_x, "kid": self.kid, "alg": "EdDSA", "use": "sig"}
            ]
        }

    def jwks_json(self) -> bytes:
        return json.dumps(self.jwks()).encode()
