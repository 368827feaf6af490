"""Config: defaults, env overrides, relative paths, and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, config_from_dict, load_config

APP = {"dialect": "activeplatform", "upstream": "http://127.0.0.1:9001"}


def test_demo_config_loads() -> None:
    config = load_config(Path(__file__).parent.parent / "config.yaml", env={})
    assert config.store.url == "embedded"
    assert config.directory.file is not None and config.directory.file.is_file()
    assert config.app("control-panel").roles_allowed_to_mint == ("admin", "owner")
    assert {a.dialect for a in config.apps} <= {"activeplatform", "pyramid", "denovolab", "btcdirect"}


def test_env_overrides_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("directory: {file: dir.yaml}\nassertion: {private_key_file: keys/k.pem}\n")
    env = {
        "GATEWAY_CONFIG": str(tmp_path / "config.yaml"),
        "GATEWAY_REDIS_URL": "redis://10.0.0.5:6380/2",
        "GATEWAY_HOST": "0.0.0.0",
        "GATEWAY_PORT": "9999",
        "GATEWAY_PUBLIC_URL": "https://login.example.com",
    }
    config = load_config(env=env)
    assert (config.store.url, config.server.host, config.server.port) == ("redis://10.0.0.5:6380/2", "0.0.0.0", 9999)
    assert config.server.public_url == "https://login.example.com"
    assert config.directory.file == tmp_path / "dir.yaml"
    assert config.assertion.private_key_file == tmp_path / "keys/k.pem"


def test_app_public_url_overrides_server_public_url() -> None:
    config = config_from_dict({"apps": {"a": {**APP, "public_url": "https://a.example.com/"}, "b": APP}})
    assert config.public_url_of(config.app("a")) == "https://a.example.com"
    assert config.public_url_of(config.app("b")) == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"store": {"urll": "x"}}, "store.urll: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"store": {"timeout_seconds": "soon"}}, "store.timeout_seconds: expected a number, got 'soon'"),
        ({"store": {"timeout_seconds": 0}}, "store.timeout_seconds: must be greater than 0"),
        ({"store": {"url": "http://x"}}, "store.url: expected 'embedded' or a redis://"),
        ({"server": {"port": "80"}}, "server.port: expected an integer, got '80'"),
        ({"server": {"port": 70000}}, "server.port: expected 0-65535"),
        ({"server": {"public_url": "example.com"}}, "server.public_url: expected an absolute"),
        ({"server": {"trusted_proxies": ["10.0.0.0/33"]}}, "server.trusted_proxies[0]: not a CIDR"),
        ({"server": {"trusted_proxies": "10.0.0.0/8"}}, "server.trusted_proxies: expected a list"),
        ({"server": []}, "server: expected a mapping"),
        ({"apps": {"a": {**APP, "dialect": "saml"}}}, "apps.a.dialect: expected one of"),
        ({"apps": {"a": {**APP, "upstream": "ftp://x"}}}, "apps.a.upstream: expected an absolute"),
        ({"apps": {"a": {**APP, "grant_ttl": 5}}}, "apps.a.grant_ttl: unknown key"),
        ({"apps": {"a": {**APP, "grant_ttl_seconds": True}}}, "apps.a.grant_ttl_seconds: expected an integer"),
        ({"apps": {"a": {**APP, "mount": "crm/"}}}, "apps.a.mount: expected"),
        ({"apps": {"a": {"dialect": "pyramid"}}}, "apps.a: "),
        ({"apps": {"a": "pyramid"}}, "apps.a: expected a mapping"),
        ({"assertion": {"ttl_seconds": -1}}, "assertion.ttl_seconds: must be greater than 0"),
    ],
)
def test_bad_config_names_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_PORT: expected an integer"):
        config_from_dict({}, env={"GATEWAY_PORT": "eighty"})


def test_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", env={})
    (tmp_path / "bad.yaml").write_text("server: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml", env={})
    (tmp_path / "bad.yaml").write_text("server:\n  port: 8080\n  host: a: b\n")
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "bad.yaml", env={})
    assert str(raised.value) == (
        f"config: {tmp_path / 'bad.yaml'}:3:10: not valid YAML: mapping values are not allowed here"
    )
