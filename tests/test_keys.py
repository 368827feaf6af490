"""Assertion key rotation: ``assertion.previous_key_files`` are published in the JWKS after the signing key, so an
assertion signed before a rotation still verifies against the JWKS after it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.app import create_app
from gateway.assertion import Signer, generate_key_file, key_id, load_key, load_public_key
from gateway.cli import main
from gateway.directory import parse_directory
from gateway.store import Store
from tests.conftest import DIRECTORY, Upstream, make_config

SEED = "/api/v3/resellers/1/user_authentication/token?account_id=505"
MANAGER = {"X-Api-Token": "vY5fwetestK3gJXZH5uHCw"}
APPS = {"control-panel": {"dialect": "activeplatform", "redeem_on_get": True}}


def public_pem(path: Path, out: Path) -> Path:
    key = load_key(path).public_key()
    out.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return out


async def gateway_with(
    aiohttp_client: Any, redis_client: Any, prefix: str, upstream: Upstream, **assertion: Any
) -> TestClient[Any, Any]:
    config = make_config(prefix, upstream.url, APPS, assertion=assertion)
    await Store(redis_client, prefix).load_directory(parse_directory(DIRECTORY))
    client: TestClient[Any, Any] = await aiohttp_client(create_app(config, redis=redis_client))
    return client


async def assertion_from(client: TestClient[Any, Any], upstream: Upstream) -> str:
    body = await (await client.get(SEED, headers=MANAGER)).json(content_type=None)
    response = await client.get(f"/?user_email={body['owner_email']}&user_token={body['owner_token']}")
    assert response.status == 200
    return upstream.requests[-1].headers["X-Impersonation-Assertion"]


def verify_with_jwks(url: str, token: str) -> dict[str, Any]:
    """What an app does: the key named by the token's ``kid``, from the JWKS URL (PyJWT's client)."""
    key = jwt.PyJWKClient(url).get_signing_key_from_jwt(token).key
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["EdDSA"], audience="control-panel")
    return claims


async def before_rotation(
    aiohttp_client: Any, redis_client: Any, prefix: str, upstream: Upstream, tmp_path: Path
) -> tuple[Path, Path, str]:
    """An old and a new key file, and an assertion a gateway signed with the old one."""
    old, new = tmp_path / "old.pem", tmp_path / "new.pem"
    generate_key_file(old)
    generate_key_file(new)
    before = await gateway_with(aiohttp_client, redis_client, prefix, upstream, private_key_file=str(old))
    signed_before = await assertion_from(before, upstream)
    await before.close()
    return old, new, signed_before


@pytest.mark.parametrize("previous_as", ["private", "public"])
async def test_an_assertion_signed_before_a_rotation_verifies_after_it(
    aiohttp_client: Any, redis_client: Any, prefix: str, upstream: Upstream, tmp_path: Path, previous_as: str
) -> None:
    old, new, signed_before = await before_rotation(aiohttp_client, redis_client, prefix, upstream, tmp_path)
    previous = old if previous_as == "private" else public_pem(old, tmp_path / "old.pub.pem")
    after = await gateway_with(aiohttp_client, redis_client, prefix, upstream, private_key_file=str(new),
                               previous_key_files=[str(previous)])  # fmt: skip
    jwks = await (await after.get("/.well-known/jwks.json")).json()
    kids = [k["kid"] for k in jwks["keys"]]
    assert kids == [key_id(load_key(new).public_key()), key_id(load_key(old).public_key())]  # signing key first
    signed_after = await assertion_from(after, upstream)
    assert jwt.get_unverified_header(signed_after)["kid"] == kids[0]

    url = str(after.make_url("/.well-known/jwks.json"))
    for token in (signed_before, signed_after):
        assert (await asyncio.to_thread(verify_with_jwks, url, token))["sub"] == "505"


async def test_without_the_previous_key_an_old_assertion_no_longer_verifies(
    aiohttp_client: Any, redis_client: Any, prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    """The failure the rotation steps avoid: dropping the old key while its assertions may be in flight."""
    _, new, signed_before = await before_rotation(aiohttp_client, redis_client, prefix, upstream, tmp_path)
    after = await gateway_with(aiohttp_client, redis_client, prefix, upstream, private_key_file=str(new))
    url = str(after.make_url("/.well-known/jwks.json"))
    with pytest.raises(jwt.PyJWKClientError):
        await asyncio.to_thread(verify_with_jwks, url, signed_before)


def test_the_jwks_lists_each_key_once() -> None:
    key = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate().public_key()
    signer = Signer(key, "http://gw", 30, [key.public_key(), other, other])
    assert [k["kid"] for k in signer.jwks()["keys"]] == [signer.kid, key_id(other)]


def test_load_public_key_explains_a_bad_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="cannot read"):
        load_public_key(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError, match="not an unencrypted PEM key"):
        load_public_key(garbage)
    ec = tmp_path / "ec.pem"
    ec.write_bytes(
        generate_private_key(SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        load_public_key(ec)


def test_serve_names_a_bad_previous_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.yaml").write_text(
        "assertion: {previous_key_files: [keys/old.pem]}\n"
        "apps: {cp: {dialect: activeplatform, upstream: 'http://127.0.0.1:9'}}\n"
    )
    assert main(["serve", "--config", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("impersonation-gateway: error: assertion.previous_key_files[0]: cannot read ")
    assert str(tmp_path / "keys/old.pem") in err  # relative to the config file


async def test_the_jwks_of_a_test_server_is_what_the_signer_says(aiohttp_server: Any, tmp_path: Path) -> None:
    """The endpoint serves the signer's bytes as they are (one document for every process sharing the keys)."""
    key = tmp_path / "k.pem"
    generate_key_file(key)
    config = make_config("jw:", "http://127.0.0.1:9", APPS, assertion={"private_key_file": str(key)})
    server: TestServer = await aiohttp_server(create_app(config))
    async with TestClient(server) as client:
        response = await client.get("/.well-known/jwks.json")
        assert response.headers["Cache-Control"] == "public, max-age=300"
        assert [k["kid"] for k in (await response.json())["keys"]] == [key_id(load_key(key).public_key())]
