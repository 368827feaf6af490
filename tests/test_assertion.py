"""Signed assertions: the claims and header a Signer puts in, the JWKS that verifies them (signing key first, then
the previous ones), key ids, and reading and writing key files."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.assertion import Keys, Signer, generate_key_file, jwk, key_id, load_key, load_keys
from gateway.config import AssertionConfig

ISSUER = "http://gateway.test"
NOW = 1_700_000_000
CLAIMS: dict[str, Any] = {
    "aud": "control-panel",
    "sub": "505",
    "act": {"sub": "mgr-1", "role": "admin"},
    "jti": "AbCdEfGhIjKlMnOp",
}
KEY = Ed25519PrivateKey.generate()
OLD = Ed25519PrivateKey.generate()
OLDER = Ed25519PrivateKey.generate()


def raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def verify(token: str, key: Any, *, verify_exp: bool = True) -> dict[str, Any]:
    found: dict[str, Any] = jwt.decode(
        token, key, algorithms=["EdDSA"], audience="control-panel", issuer=ISSUER, options={"verify_exp": verify_exp}
    )
    return found


def private_pem(key: Ed25519PrivateKey | Any, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def public_pem(key: Ed25519PublicKey, path: Path) -> Path:
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


# -- signing -------------------------------------------------------------------------------------------------------
def test_sign_adds_issuer_and_times_to_the_claims() -> None:
    token = Signer(KEY, ISSUER, 30).sign(CLAIMS, NOW)
    assert verify(token, KEY.public_key(), verify_exp=False) == {
        **CLAIMS,
        "iss": ISSUER,
        "iat": NOW,
        "exp": NOW + 30,
    }


@pytest.mark.parametrize("ttl", [1, 30, 300])
def test_exp_is_iat_plus_the_ttl(ttl: int) -> None:
    claims = verify(Signer(KEY, ISSUER, ttl).sign(CLAIMS, NOW), KEY.public_key(), verify_exp=False)
    assert (claims["iat"], claims["exp"]) == (NOW, NOW + ttl)


def test_iat_and_exp_are_the_signers_own() -> None:
    token = Signer(KEY, ISSUER, 30).sign({**CLAIMS, "iat": 1, "exp": 2**40}, NOW)
    claims = verify(token, KEY.public_key(), verify_exp=False)
    assert (claims["iat"], claims["exp"]) == (NOW, NOW + 30)


def test_header_names_the_algorithm_and_the_key() -> None:
    signer = Signer(KEY, ISSUER, 30)
    header = jwt.get_unverified_header(signer.sign(CLAIMS, NOW))
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": key_id(KEY.public_key())}
    assert signer.kid == key_id(KEY.public_key())


def test_an_assertion_verifies_until_it_expires() -> None:
    signer = Signer(KEY, ISSUER, 30)
    now = int(time.time())
    assert verify(signer.sign(CLAIMS, now - 10), KEY.public_key())["sub"] == "505"
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(signer.sign(CLAIMS, now - 60), KEY.public_key())


@pytest.mark.parametrize(
    ("key", "audience", "issuer", "error"),
    [
        (OLD.public_key(), "control-panel", ISSUER, jwt.InvalidSignatureError),
        (KEY.public_key(), "switch", ISSUER, jwt.InvalidAudienceError),
        (KEY.public_key(), "control-panel", "http://elsewhere.test", jwt.InvalidIssuerError),
    ],
)
def test_an_assertion_does_not_verify_otherwise(key: Any, audience: str, issuer: str, error: type[Exception]) -> None:
    token = Signer(KEY, ISSUER, 30).sign(CLAIMS, int(time.time()))
    with pytest.raises(error):
        jwt.decode(token, key, algorithms=["EdDSA"], audience=audience, issuer=issuer)


# -- JWKS ----------------------------------------------------------------------------------------------------------
def test_jwk_shape() -> None:
    public = KEY.public_key()
    assert jwk(public) == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url(raw(public)),
        "kid": key_id(public),
        "alg": "EdDSA",
        "use": "sig",
    }


@pytest.mark.parametrize(
    ("previous", "kids"),
    [
        ((), [KEY]),
        ((OLD,), [KEY, OLD]),
        ((OLD, OLDER), [KEY, OLD, OLDER]),
        ((OLDER, OLD), [KEY, OLDER, OLD]),
        ((OLD, KEY, OLD), [KEY, OLD]),  # each key once, the signing one first
    ],
)
def test_jwks_lists_the_signing_key_then_the_previous_ones(
    previous: tuple[Ed25519PrivateKey, ...], kids: list[Ed25519PrivateKey]
) -> None:
    signer = Signer(KEY, ISSUER, 30, [k.public_key() for k in previous])
    assert signer.jwks() == {"keys": [jwk(k.public_key()) for k in kids]}
    assert json.loads(signer.jwks_json()) == signer.jwks()


def test_jwks_holds_no_private_part() -> None:
    signer = Signer(KEY, ISSUER, 30, [OLD.public_key()])
    assert all(sorted(k) == ["alg", "crv", "kid", "kty", "use", "x"] for k in signer.jwks()["keys"])


@pytest.mark.parametrize("signing", [OLD, KEY])
def test_an_assertion_verifies_against_the_jwks_after_a_rotation(signing: Ed25519PrivateKey) -> None:
    token = Signer(signing, ISSUER, 30).sign(CLAIMS, int(time.time()))
    published = jwt.PyJWKSet.from_dict(Signer(KEY, ISSUER, 30, [OLD.public_key()]).jwks())
    key = published[jwt.get_unverified_header(token)["kid"]]
    assert verify(token, key)["jti"] == CLAIMS["jti"]


# -- key ids -------------------------------------------------------------------------------------------------------
def test_key_id_is_derived_from_the_public_key(tmp_path: Path) -> None:
    public = KEY.public_key()
    expected = b64url(hashlib.sha256(raw(public)).digest()[:12])
    assert key_id(public) == expected
    assert len(expected) == 16
    assert key_id(load_key(private_pem(KEY, tmp_path / "key.pem")).public_key()) == expected
    assert key_id(OLD.public_key()) != expected


# -- key files -----------------------------------------------------------------------------------------------------
def test_load_keys_reads_the_signing_key_and_the_previous_ones(tmp_path: Path) -> None:
    keys = load_keys(
        AssertionConfig(
            private_key_file=private_pem(KEY, tmp_path / "key.pem"),
            previous_key_files=(private_pem(OLD, tmp_path / "old.pem"), public_pem(OLDER.public_key(), tmp_path / "p")),
        )
    )
    assert keys.problems == ()
    assert keys.signing is not None and raw(keys.signing.public_key()) == raw(KEY.public_key())
    assert [raw(k) for k in keys.previous] == [raw(OLD.public_key()), raw(OLDER.public_key())]


def test_load_keys_without_key_files() -> None:
    assert load_keys(AssertionConfig()) == Keys(None, (), ())


def bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pem"
    if kind == "garbage":
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    elif kind == "ec":
        private_pem(generate_private_key(SECP256R1()), path)
    elif kind == "encrypted":
        encryption = serialization.BestAvailableEncryption(b"secret")
        path.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("missing", "cannot read {path}: No such file or directory"),
        ("garbage", "{path} is not an unencrypted PEM private key: "),
        ("encrypted", "{path} is not an unencrypted PEM private key: "),
        ("ec", "{path} holds a ECPrivateKey, not an Ed25519 key"),
    ],
)
def test_load_keys_names_the_setting_of_a_bad_signing_key(tmp_path: Path, kind: str, says: str) -> None:
    path = bad_file(tmp_path, kind)
    keys = load_keys(AssertionConfig(private_key_file=path))
    assert keys.signing is None
    assert len(keys.problems) == 1
    assert keys.problems[0].startswith("assertion.private_key_file: " + says.format(path=path))


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("missing", "cannot read {path}: No such file or directory"),
        ("garbage", "{path} is not an unencrypted PEM key: "),
        ("ec", "{path} holds a ECPublicKey, not an Ed25519 key"),
    ],
)
def test_load_keys_names_the_setting_of_a_bad_previous_key(tmp_path: Path, kind: str, says: str) -> None:
    path = bad_file(tmp_path, kind)
    good = public_pem(OLD.public_key(), tmp_path / "old.pem")
    keys = load_keys(AssertionConfig(private_key_file=private_pem(KEY, tmp_path / "key.pem"),
                                     previous_key_files=(good, path)))  # fmt: skip
    assert keys.signing is not None
    assert [raw(k) for k in keys.previous] == [raw(OLD.public_key())]
    assert len(keys.problems) == 1
    assert keys.problems[0].startswith("assertion.previous_key_files[1]: " + says.format(path=path))


def test_generate_key_file_writes_a_key_only_its_owner_reads(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert isinstance(load_key(path), Ed25519PrivateKey)


def test_generate_key_file_never_overwrites(tmp_path: Path) -> None:
    path = private_pem(KEY, tmp_path / "key.pem")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key_file(path)
    assert path.read_bytes() == before
