"""Credentials come from files only: Kafka secrets and the Redis password."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.runtime import readiness
from operators.config import ConfigError, load_settings, redact_url
from scripts.dev import devstack


def secret(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_kafka_secrets_file_is_merged_over_the_options(tmp_path: Path) -> None:
    path = secret(
        tmp_path,
        "kafka",
        "# SASL\nsasl.password = s3cr=t\n\nssl.key.password=k3y\n",
    )
    settings = load_settings(
        {
            "FANFARE_KAFKA_OPTIONS": "security.protocol=SASL_SSL,sasl.username=fanfare",
            "FANFARE_KAFKA_SECRETS_FILE": path,
        }
    )
    conf = settings.kafka_config()
    assert conf["sasl.password"] == "s3cr=t" and conf["ssl.key.password"] == "k3y"
    assert conf["sasl.username"] == "fanfare"
    assert "s3cr" not in repr(settings)  # the settings hold the path, not the secret


@pytest.mark.parametrize("option", ["sasl.password", "ssl.key.password"])
def test_a_kafka_credential_in_the_environment_is_refused(option: str) -> None:
    with pytest.raises(ConfigError, match="FANFARE_KAFKA_SECRETS_FILE") as err:
        load_settings({"FANFARE_KAFKA_OPTIONS": f"{option}=hunter2"})
    assert "hunter2" not in str(err.value)


def test_a_bad_secrets_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings({"FANFARE_KAFKA_SECRETS_FILE": str(tmp_path / "missing")})
    path = secret(tmp_path, "kafka", "hunter2\n")
    with pytest.raises(ConfigError, match="line 1 is not key=value") as err:
        load_settings({"FANFARE_KAFKA_SECRETS_FILE": path})
    assert "hunter2" not in str(err.value)


def test_redis_password_file_goes_into_the_clients_url_only(tmp_path: Path) -> None:
    path = secret(tmp_path, "redis", "p@ss:w/rd\n")
    settings = load_settings(
        {"FANFARE_REDIS_URL": "rediss://default@cache:6380/2", "FANFARE_REDIS_PASSWORD_FILE": path}
    )
    assert settings.redis_url == "rediss://default:p%40ss%3Aw%2Frd@cache:6380/2"
    plain = load_settings(
        {"FANFARE_REDIS_URL": "redis://cache:6379/0", "FANFARE_REDIS_PASSWORD_FILE": path}
    )
    assert plain.redis_url == "redis://:p%40ss%3Aw%2Frd@cache:6379/0"


def test_a_redis_password_in_the_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="FANFARE_REDIS_PASSWORD_FILE") as err:
        load_settings({"FANFARE_REDIS_URL": "redis://:hunter2@cache:6379/0"})
    assert "hunter2" not in str(err.value)


def test_every_printed_redis_url_hides_the_password_file_s_password(tmp_path: Path) -> None:
    # Regression: a unix:// URL carries the password in its query, which the reports' redaction
    # (netloc only) printed as it was.
    path = secret(tmp_path, "redis", "s3cr3t-value\n")
    unix = load_settings(
        {
            "FANFARE_REDIS_URL": f"unix://{tmp_path}/no-redis.sock?db=3",
            "FANFARE_REDIS_PASSWORD_FILE": path,
        }
    )
    assert "s3cr3t-value" in unix.redis_url  # the clients need it
    assert redact_url(unix.redis_url) == f"unix://{tmp_path}/no-redis.sock?db=3&password=***"
    tcp = load_settings(
        {"FANFARE_REDIS_URL": "redis://u@127.0.0.1:1/0", "FANFARE_REDIS_PASSWORD_FILE": path}
    )
    assert redact_url(tcp.redis_url) == "redis://u:***@127.0.0.1:1/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    # What `fanfare dev status` and /ready say when Redis does not answer.
    for settings in (unix, tcp):
        problem = devstack.redis_reachable(settings)
        check = readiness.probe_redis(settings, timeout_s=1)
        assert problem is not None and not check.ok
        assert "s3cr3t-value" not in problem + check.detail
        assert "***" in problem + check.detail


def test_placeholder_secrets_for_compose_are_well_formed_and_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from scripts.dev import secrets as dev_secrets

    assert dev_secrets.main([str(tmp_path)]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines()[1:])
    key = tmp_path / Path(lines["FANFARE_APNS_KEY_FILE"]).name
    assert lines["FANFARE_APNS_KEY_FILE"] == f"/run/fanfare-secrets/{key.name}"
    assert key.name == f"AuthKey_{lines['FANFARE_APNS_KEY_ID']}.p8"
    load_pem_private_key(key.read_bytes(), None)  # a real EC key, as Apple's .p8
    account = json.loads((tmp_path / "service-account.json").read_text())
    assert account["type"] == "service_account" and account["project_id"]
    assert dev_secrets.main([str(tmp_path)]) == 1  # never overwritten
    assert "already holds credentials" in capsys.readouterr().err
