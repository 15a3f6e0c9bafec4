"""Settings from FANFARE_* variables: defaults, every variable, errors naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from operators.config import ENV_VARIABLES, ConfigError, Settings, load_settings
from schemas.topics import ALL_TOPICS, MAX_DISPATCH_BATCH
from scripts import cli

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# One non-default value per variable, and the field value it must become.
EVERY_VARIABLE: dict[str, tuple[str, object]] = {
    "FANFARE_HOME": ("/var/lib/fanfare", Path("/var/lib/fanfare")),
    "FANFARE_SETTINGS_FILE": ("SETTINGS", "SETTINGS"),
    "FANFARE_KAFKA_BROKERS": ("k1:9092,k2:9092", "k1:9092,k2:9092"),
    "FANFARE_KAFKA_OPTIONS": (
        "security.protocol=SASL_SSL, sasl.mechanism=PLAIN",
        {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"},
    ),
    "FANFARE_REDIS_URL": ("redis://cache:6380/2", "redis://cache:6380/2"),
    "FANFARE_REDIS_PREFIX": ("ff-test:", "ff-test:"),
    "FANFARE_STORE_URL": ("sqlite:////data/store.db", "sqlite:////data/store.db"),
    "FANFARE_TOPIC_PARTITIONS": ("12", 12),
    "FANFARE_TOPIC_PARTITIONS_OVERRIDES": (
        "push.fcm.bulk=8,post_created=2",
        {"push.fcm.bulk": 8, "post_created": 2},
    ),
    "FANFARE_REPLICATION_FACTOR": ("3", 3),
    "FANFARE_SHARDS": ("64", 64),
    "FANFARE_CELEBRITY_THRESHOLD": ("50000", 50_000),
    "FANFARE_DISPATCH_BATCH_SIZE": ("250", 250),
    "FANFARE_FOLLOWER_PAGE_SIZE": ("750", 750),
    "FANFARE_EXPAND_BUDGET": ("5000", 5_000),
    "FANFARE_BULK_EXPAND_BUDGET": ("60000", 60_000),
    "FANFARE_BULK_EXPAND_MS": ("25", 25),
    "FANFARE_STEP_BUDGET_MS": ("50", 50),
    "FANFARE_CHECKPOINT_INTERVAL_S": ("60", 60),
    "FANFARE_CHANGELOG_RETENTION_HOURS": ("0", 0),
    "FANFARE_POST_CLAIM_TTL_S": ("3600", 3_600),
    "FANFARE_CHANGELOG_SETTLE_MS": ("0", 0),
    "FANFARE_POST_CAP": ("0", 0),
    "FANFARE_CAP_WINDOW_S": ("86400", 86_400),
    "FANFARE_NOTIFY_CAP": ("3", 3),
    "FANFARE_NOTIFY_CAP_WINDOW_S": ("3600", 3_600),
    "FANFARE_SNAPSHOT_INTERVAL_S": ("2", 2),
    "FANFARE_RECOVERY_PARTITIONS": ("8", 8),
    "FANFARE_METRICS_PORT": ("4040", 4_040),
    "FANFARE_METRICS_HOST": ("0.0.0.0", "0.0.0.0"),
    "FANFARE_METRICS_SERVER": ("bytewax", "bytewax"),
    "FANFARE_READY_PORT": ("0", 0),
    "FANFARE_READY_HOST": ("0.0.0.0", "0.0.0.0"),
    "FANFARE_LOG_LEVEL": ("debug", "DEBUG"),
    "FANFARE_NOTIFICATION_STORE_URL": ("sqlite:////srv/n.db", "sqlite:////srv/n.db"),
    "FANFARE_APNS_KEY_FILE": ("/run/secrets/apns.p8", "/run/secrets/apns.p8"),
    "FANFARE_CASSANDRA_USERNAME": ("fanfare", "fanfare"),
    "FANFARE_CASSANDRA_PASSWORD_FILE": ("/run/secrets/cassandra", "/run/secrets/cassandra"),
    # Read at load: the test writes these files (the Redis one's password lands in the URL).
    "FANFARE_KAFKA_SECRETS_FILE": ("KAFKA_SECRETS", "KAFKA_SECRETS"),
    "FANFARE_REDIS_PASSWORD_FILE": ("REDIS_PASSWORD", "REDIS_PASSWORD"),
    "FANFARE_APNS_KEY_ID": ("ABC123DEFG", "ABC123DEFG"),
    "FANFARE_APNS_TEAM_ID": ("TEAM123456", "TEAM123456"),
    "FANFARE_APNS_TOPIC": ("com.example.app", "com.example.app"),
    "FANFARE_APNS_HOST": ("api.sandbox.push.apple.com", "api.sandbox.push.apple.com"),
    "FANFARE_APNS_PORT": ("2197", 2_197),
    "FANFARE_APNS_CA_FILE": ("/etc/ca.pem", "/etc/ca.pem"),
    "FANFARE_FCM_CREDENTIALS_FILE": ("/run/secrets/fcm.json", "/run/secrets/fcm.json"),
    "FANFARE_FCM_URL": ("http://127.0.0.1:9999", "http://127.0.0.1:9999"),
    "FANFARE_FCM_CA_FILE": ("/etc/ssl/fcm-ca.pem", "/etc/ssl/fcm-ca.pem"),
    "FANFARE_APNS_CLIENT": ("aioapns", "aioapns"),
    "FANFARE_FCM_CLIENT": ("firebase-admin", "firebase-admin"),
    "FANFARE_APNS_CONNECTIONS": ("2", 2),
    "FANFARE_FCM_CONNECTIONS": ("8", 8),
    "FANFARE_DELIVERY_IN_FLIGHT": ("500", 500),
    "FANFARE_APNS_RATE_PER_MIN": ("120000", 120_000),
    "FANFARE_FCM_RATE_PER_MIN": ("300000", 300_000),
    "FANFARE_RATE_BURST_MS": ("250", 250),
    "FANFARE_RATE_SEND_SLACK_MS": ("50", 50),
    "FANFARE_BULK_RESERVE_PCT": ("50", 50),
    "FANFARE_RATE_WAIT_MAX_MS": ("0", 0),
    "FANFARE_RETRY_MAX_ATTEMPTS": ("3", 3),
    "FANFARE_RETRY_BASE_MS": ("200", 200),
    "FANFARE_RETRY_MAX_BACKOFF_S": ("60", 60),
    "FANFARE_NOTIFICATION_MAX_AGE_S": ("600", 600),
    "FANFARE_BREAKER_FAILURES": ("5", 5),
    "FANFARE_BREAKER_COOLDOWN_S": ("2", 2),
    "FANFARE_SEND_TIMEOUT_MS": ("2000", 2_000),
    "FANFARE_EDGE_CLAIM_TTL_S": ("3600", 3_600),
    "FANFARE_STORE_TTL_S": ("86400", 86_400),
    "FANFARE_BULK_ITEMS_PER_POLL": ("400", 400),
    "FANFARE_DELIVERY_PROVIDERS": ("apns, fcm", "apns, fcm"),
    "FANFARE_PUSH_TITLE": ("New from {author_id}", "New from {author_id}"),
    "FANFARE_PUSH_BODY": ("Post {post_id}", "Post {post_id}"),
    "FANFARE_PUSH_LINK": ("https://x.test/p/{post_id}", "https://x.test/p/{post_id}"),
    "FANFARE_API_HOST": ("0.0.0.0", "0.0.0.0"),
    "FANFARE_API_PORT": ("9080", 9_080),
    "FANFARE_API_MAX_BODY_BYTES": ("65536", 65_536),
    "FANFARE_API_UPLOAD_MAX_BYTES": ("1048576", 1_048_576),
    "FANFARE_API_IDEMPOTENCY_TTL_S": ("3600", 3_600),
    "FANFARE_API_CAMPAIGN_MAX_RATE": ("50", 50),
    "FANFARE_API_CAMPAIGN_TTL_S": ("86400", 86_400),
    "FANFARE_API_CAMPAIGN_LEASE_S": ("5", 5),
    "FANFARE_CATEGORIES_FILE": ("/etc/fanfare/categories.toml", "/etc/fanfare/categories.toml"),
    "FANFARE_TEMPLATES_DIR": ("/etc/fanfare/templates", "/etc/fanfare/templates"),
    "FANFARE_OUTBOX_URL": ("postgresql://posts@db:5432/posts", "postgresql://posts@db:5432/posts"),
    "FANFARE_OUTBOX_PASSWORD_FILE": ("/run/secrets/pg", "/run/secrets/pg"),
    "FANFARE_OUTBOX_TABLE": ("posts.outbox", "posts.outbox"),
    "FANFARE_OUTBOX_BATCH_SIZE": ("100", 100),
    "FANFARE_OUTBOX_POLL_MS": ("250", 250),
    "FANFARE_OUTBOX_METRICS_PORT": ("0", 0),
    "FANFARE_DEV_MODE": ("true", True),
    "FANFARE_PUBLIC_URL": ("https://notify.example.com", "https://notify.example.com"),
    "FANFARE_LINK_SECRET_FILE": ("/run/secrets/links", "/run/secrets/links"),
    "FANFARE_UNSUBSCRIBE_TTL_S": ("2592000", 2_592_000),
    "FANFARE_STREAM_TOKEN_TTL_S": ("600", 600),
    "FANFARE_SMTP_HOST": ("smtp.example.com", "smtp.example.com"),
    "FANFARE_SMTP_PORT": ("465", 465),
    "FANFARE_SMTP_TLS": ("tls", "tls"),
    "FANFARE_SMTP_USERNAME": ("fanfare", "fanfare"),
    "FANFARE_SMTP_PASSWORD_FILE": ("/run/secrets/smtp", "/run/secrets/smtp"),
    "FANFARE_SMTP_CA_FILE": ("/etc/ssl/smtp-ca.pem", "/etc/ssl/smtp-ca.pem"),
    "FANFARE_SMTP_CONNECTIONS": ("8", 8),
    "FANFARE_EMAIL_FROM": ("Fanfare <no-reply@example.com>", "Fanfare <no-reply@example.com>"),
    "FANFARE_EMAIL_RATE_PER_MIN": ("1200", 1_200),
    "FANFARE_EMAIL_DOMAIN_RATE_PER_MIN": ("120", 120),
    "FANFARE_SMS_ACCOUNT_SID": ("AC0123", "AC0123"),
    "FANFARE_SMS_AUTH_TOKEN_FILE": ("/run/secrets/sms", "/run/secrets/sms"),
    "FANFARE_SMS_API_URL": ("https://sms.example.com", "https://sms.example.com"),
    "FANFARE_SMS_FROM": ("+14155550100", "+14155550100"),
    "FANFARE_SMS_RATE_PER_MIN": ("60", 60),
    "FANFARE_SMS_USER_DAILY_LIMIT": ("3", 3),
    "FANFARE_SMS_DAILY_LIMIT": ("500", 500),
    "FANFARE_SMS_COST_MICROS": ("8300", 8_300),
    "FANFARE_SMS_CURRENCY": ("EUR", "EUR"),
    "FANFARE_WEBPUSH_VAPID_KEY_FILE": ("/run/secrets/vapid.pem", "/run/secrets/vapid.pem"),
    "FANFARE_WEBPUSH_SUBJECT": ("mailto:ops@example.com", "mailto:ops@example.com"),
    "FANFARE_WEBPUSH_RATE_PER_MIN": ("60000", 60_000),
    "FANFARE_CHAT_RATE_PER_MIN": ("600", 600),
    "FANFARE_CHAT_WEBHOOK_RATE_PER_MIN": ("30", 30),
    "FANFARE_CHANNEL_CA_FILE": ("/etc/ssl/channels-ca.pem", "/etc/ssl/channels-ca.pem"),
    "FANFARE_INAPP_STREAM_LENGTH": ("20", 20),
    "FANFARE_INAPP_STREAM_TTL_S": ("3600", 3_600),
    "FANFARE_SSE_HEARTBEAT_S": ("30", 30),
    "FANFARE_SSE_MAX_CLIENTS": ("5000", 5_000),
}


def test_defaults() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.home == Path(".fanfare")
    assert settings.kafka_brokers == "127.0.0.1:9092"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.topic_partitions == 4
    assert settings.shard_count == 32
    assert settings.dispatch_batch_size == MAX_DISPATCH_BATCH == 500
    assert settings.resolved_store_url == "sqlite:///.fanfare/store.db"
    assert settings.partitions_for("push.fcm") == 4
    assert settings.kafka_config() == {"bootstrap.servers": "127.0.0.1:9092"}


def test_empty_values_mean_default() -> None:
    assert load_settings(dict.fromkeys(ENV_VARIABLES.values(), "")) == Settings()


def test_unrelated_variables_are_ignored() -> None:
    assert load_settings({"FANFARE_NOT_A_SETTING": "x", "HOME": "/root"}) == Settings()


def test_every_variable_is_parsed(tmp_path: Path) -> None:
    # The table above must cover every setting, so a new field cannot go untested.
    assert set(EVERY_VARIABLE) == set(ENV_VARIABLES.values())
    files = {"KAFKA_SECRETS": "sasl.password=pw\n", "REDIS_PASSWORD": "pw\n", "SETTINGS": ""}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    table = {
        var: (str(tmp_path / raw), str(tmp_path / raw)) if raw in files else (raw, value)
        for var, (raw, value) in EVERY_VARIABLE.items()
    }
    table["FANFARE_REDIS_URL"] = ("redis://cache:6380/2", "redis://:pw@cache:6380/2")
    env = {var: raw for var, (raw, _) in table.items()}
    settings = load_settings(env)
    for field_name, var in ENV_VARIABLES.items():
        expected = table[var][1]
        assert getattr(settings, field_name) == expected, var
        assert expected != getattr(Settings(), field_name), f"{var} test value is the default"


def test_derived_values() -> None:
    settings = load_settings(
        {
            "FANFARE_HOME": "/srv/ff",
            "FANFARE_TOPIC_PARTITIONS": "6",
            "FANFARE_TOPIC_PARTITIONS_OVERRIDES": "push.fcm.bulk=8",
            "FANFARE_KAFKA_OPTIONS": "security.protocol=SASL_SSL",
        }
    )
    assert settings.resolved_store_url == "sqlite:////srv/ff/store.db"
    assert settings.recovery_dir("fanout") == Path("/srv/ff/recovery/fanout")
    assert settings.partitions_for("push.fcm.bulk") == 8
    assert settings.partitions_for("post_created") == 6
    # Per-use settings come last so a caller's choice wins over pass-through options.
    assert settings.kafka_config(**{"group.id": "g"}) == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "SASL_SSL",
        "group.id": "g",
    }
    assert settings.with_overrides(shard_count=4).shard_count == 4
    assert settings.shard_count == 32


@pytest.mark.parametrize(
    ("var", "raw", "fragment"),
    [
        ("FANFARE_SHARDS", "abc", "not a whole number"),
        ("FANFARE_SHARDS", "0", "out of range"),
        ("FANFARE_DISPATCH_BATCH_SIZE", "501", "between 1 and 500"),
        ("FANFARE_DISPATCH_BATCH_SIZE", "0", "out of range"),
        ("FANFARE_TOPIC_PARTITIONS", "-1", "out of range"),
        ("FANFARE_TOPIC_PARTITIONS", "2.5", "not a whole number"),
        ("FANFARE_REPLICATION_FACTOR", "17", "between 1 and 16"),
        ("FANFARE_METRICS_PORT", "70000", "between 1 and 65535"),
        ("FANFARE_READY_PORT", "65536", "between 0 and 65535"),
        ("FANFARE_READY_PORT", "-1", "out of range"),
        ("FANFARE_READY_HOST", "127.0.0.1 ::1", "one address"),
        ("FANFARE_METRICS_HOST", "127.0.0.1 ::1", "one address"),
        ("FANFARE_METRICS_SERVER", "prometheus", "use fanfare"),
        ("FANFARE_CHANGELOG_SETTLE_MS", "-5", "out of range"),
        ("FANFARE_POST_CAP", "70000", "out of range"),
        ("FANFARE_POST_CAP", "ten", "not a whole number"),
        ("FANFARE_CAP_WINDOW_S", "-1", "out of range"),
        ("FANFARE_NOTIFY_CAP", "70000", "out of range"),
        ("FANFARE_NOTIFY_CAP_WINDOW_S", "700000", "out of range"),
        ("FANFARE_TOPIC_PARTITIONS_OVERRIDES", "nope=3", "unknown topics"),
        ("FANFARE_TOPIC_PARTITIONS_OVERRIDES", "post_created", "key=value"),
        ("FANFARE_TOPIC_PARTITIONS_OVERRIDES", "post_created=zero", "not a whole number"),
        ("FANFARE_TOPIC_PARTITIONS_OVERRIDES", "post_created=0", "out of range"),
        ("FANFARE_KAFKA_OPTIONS", "acks", "key=value"),
        ("FANFARE_KAFKA_OPTIONS", "=1", "key=value"),
        ("FANFARE_LOG_LEVEL", "verbose", "DEBUG, INFO, WARNING or ERROR"),
        ("FANFARE_REDIS_URL", "http://127.0.0.1:6379", "redis://"),
        ("FANFARE_STORE_URL", "postgres://db/fanfare", "sqlite:///"),
        ("FANFARE_API_HOST", "0.0.0.0 ::", "one address"),
        ("FANFARE_API_PORT", "0", "out of range"),
        ("FANFARE_API_MAX_BODY_BYTES", "100", "out of range"),
        ("FANFARE_API_CAMPAIGN_LEASE_S", "0", "out of range"),
        ("FANFARE_DEV_MODE", "maybe", "true or false"),
        ("FANFARE_PUBLIC_URL", "http://notify.example.com", "https"),
        ("FANFARE_PUBLIC_URL", "https://10.0.0.5", "private"),
        ("FANFARE_SMTP_TLS", "ssl", "starttls, tls or none"),
        ("FANFARE_SMTP_TLS", "none", "FANFARE_DEV_MODE"),
        ("FANFARE_SMTP_HOST", "smtp.example.com", "FANFARE_EMAIL_FROM"),
        ("FANFARE_SMS_ACCOUNT_SID", "AC1", "FANFARE_SMS_FROM"),
        ("FANFARE_EMAIL_FROM", "not an address", "not an email address"),
        ("FANFARE_SMS_FROM", "555-0100", "E.164"),
        ("FANFARE_SMS_ACCOUNT_SID", "AC1", "FANFARE_SMS_FROM"),
        ("FANFARE_SMS_API_URL", "http://api.twilio.com", "https"),
        ("FANFARE_SMS_CURRENCY", "dollars", "ISO 4217"),
        ("FANFARE_WEBPUSH_VAPID_KEY_FILE", "/k.pem", "FANFARE_WEBPUSH_SUBJECT"),
        ("FANFARE_SSE_MAX_CLIENTS", "0", "out of range"),
        ("FANFARE_APNS_CLIENT", "httpx", "use curl"),
        ("FANFARE_FCM_CLIENT", "requests", "firebase-admin"),
        ("FANFARE_APNS_CONNECTIONS", "0", "out of range"),
        ("FANFARE_DELIVERY_IN_FLIGHT", "0", "out of range"),
        ("FANFARE_DELIVERY_PROVIDERS", "apns,pager", "unknown providers ['pager']"),
    ],
)
def test_bad_values_name_the_variable(var: str, raw: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({var: raw})
    message = str(caught.value)
    assert var in message
    assert fragment in message


def test_a_metrics_host_bytewax_s_server_would_ignore_is_refused() -> None:
    # Bytewax 0.21's API server binds 0.0.0.0 whatever is asked: say so rather than ignore it.
    with pytest.raises(ConfigError, match=r"FANFARE_METRICS_HOST=10\.0\.0\.5") as caught:
        load_settings({"FANFARE_METRICS_SERVER": "bytewax", "FANFARE_METRICS_HOST": "10.0.0.5"})
    assert "FANFARE_METRICS_SERVER=fanfare" in str(caught.value)
    for host in ("0.0.0.0", "::"):
        env = {"FANFARE_METRICS_SERVER": "bytewax", "FANFARE_METRICS_HOST": host}
        assert load_settings(env).metrics_host == host
    assert load_settings({}).metrics_host == "127.0.0.1"
    assert load_settings({}).metrics_server == "fanfare"


def test_unknown_override_lists_known_topics() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"FANFARE_TOPIC_PARTITIONS_OVERRIDES": "nope=3"})
    assert "nope" in str(caught.value)
    assert all(topic in str(caught.value) for topic in ALL_TOPICS)


def test_cli_exits_2_on_bad_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FANFARE_SHARDS", "abc")
    assert cli.main(["dev", "status"]) == 2
    captured = capsys.readouterr()
    assert "configuration error" in captured.err
    assert "FANFARE_SHARDS" in captured.err
    assert captured.out == ""


def test_fanfare_command_exits_2_on_bad_env() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANFARE_")}
    env["FANFARE_DISPATCH_BATCH_SIZE"] = "501"
    done = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "topics", "list"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "FANFARE_DISPATCH_BATCH_SIZE" in done.stderr
    assert "between 1 and 500" in done.stderr
    assert done.stdout == ""


def test_template_with_unknown_field_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"FANFARE_PUSH_TITLE.*\{user_name\}.*author_id, post_id"):
        load_settings({"FANFARE_PUSH_TITLE": "hi {user_name}"})


def test_rate_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="FANFARE_FCM_RATE_PER_MIN=0 is out of range"):
        load_settings({"FANFARE_FCM_RATE_PER_MIN": "0"})


# --- the settings file -----------------------------------------------------------------------


def test_the_settings_file_fills_in_what_the_environment_does_not_set(tmp_path: Path) -> None:
    (tmp_path / "settings.env").write_text(
        "# written by hand\nFANFARE_SHARDS=8\nexport FANFARE_LOG_LEVEL=DEBUG\n\n"
        "FANFARE_TOPIC_PARTITIONS = 6\n"
    )
    settings = load_settings(
        {"FANFARE_HOME": str(tmp_path), "FANFARE_SHARDS": "16", "FANFARE_TOPIC_PARTITIONS": ""}
    )
    assert settings.shard_count == 16  # the environment wins
    assert settings.log_level == "DEBUG"
    assert settings.topic_partitions == 6  # an empty variable is not set
    assert settings.settings_path == tmp_path / "settings.env"


def test_a_named_settings_file_is_read_and_must_exist(tmp_path: Path) -> None:
    named = tmp_path / "elsewhere.env"
    named.write_text("FANFARE_SHARDS=8\n")
    env = {"FANFARE_HOME": str(tmp_path / "home"), "FANFARE_SETTINGS_FILE": str(named)}
    assert load_settings(env).shard_count == 8
    named.unlink()
    with pytest.raises(ConfigError, match=r"FANFARE_SETTINGS_FILE=.*no such file"):
        load_settings(env)


@pytest.mark.parametrize(
    "line",
    [
        "FANFARE_SHARDZ=8",
        "SHARDS=8",
        "FANFARE_SHARDS",
        "FANFARE_HOME=/x",
        "FANFARE_SETTINGS_FILE=y",
    ],
)
def test_a_line_the_settings_file_cannot_use_is_named(tmp_path: Path, line: str) -> None:
    (tmp_path / "settings.env").write_text(f"FANFARE_LOG_LEVEL=INFO\n{line}\n")
    with pytest.raises(ConfigError, match=r"settings.env, line 2: .* FANFARE_NAME=value"):
        load_settings({"FANFARE_HOME": str(tmp_path)})


def test_a_bad_value_in_the_settings_file_names_the_variable(tmp_path: Path) -> None:
    (tmp_path / "settings.env").write_text("FANFARE_SHARDS=many\n")
    with pytest.raises(ConfigError, match="FANFARE_SHARDS"):
        load_settings({"FANFARE_HOME": str(tmp_path)})


def test_a_provider_configured_in_the_environment_takes_nothing_from_the_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "settings.env").write_text(
        "FANFARE_APNS_KEY_FILE=/local/key.p8\nFANFARE_APNS_HOST=localhost\n"
        "FANFARE_APNS_PORT=8443\nFANFARE_FCM_CREDENTIALS_FILE=/local/sa.json\n"
        "FANFARE_FCM_URL=https://localhost:9443\n"
    )
    settings = load_settings(
        {"FANFARE_HOME": str(tmp_path), "FANFARE_APNS_KEY_FILE": "/real/AuthKey.p8"}
    )
    # APNs is configured in the environment: its real key never goes to the local host.
    assert (settings.apns_key_file, settings.apns_host, settings.apns_port) == (
        "/real/AuthKey.p8",
        "api.push.apple.com",
        443,
    )
    # FCM is not: the file's settings are used whole.
    assert settings.fcm_credentials_file == "/local/sa.json"
    assert settings.fcm_url == "https://localhost:9443"


def test_local_provider_settings_are_written_and_taken_out_keeping_other_lines(
    tmp_path: Path,
) -> None:
    from scripts.dev.local_providers.settings_file import (
        remove_provider_settings,
        write_provider_settings,
    )

    def info(port: int) -> dict[str, Any]:
        apns = {"key_file": "/p/k.p8", "key_id": "K", "team_id": "T", "topic": "app"}
        fcm = {"credentials_file": "/p/sa.json", "ca_file": "/p/ca.pem"}
        return {
            "apns": {**apns, "host": "localhost", "port": port, "ca_file": "/p/ca.pem"},
            "fcm": {**fcm, "https_url": f"https://localhost:{port + 1}"},
        }

    path = tmp_path / "settings.env"
    path.write_text("FANFARE_SHARDS=8\n")
    write_provider_settings(path, info(9000))
    write_provider_settings(path, info(9100))  # a restart replaces, never appends
    settings = load_settings({"FANFARE_HOME": str(tmp_path)})
    assert (settings.shard_count, settings.apns_port) == (8, 9100)
    assert (settings.fcm_url, settings.fcm_ca_file) == ("https://localhost:9101", "/p/ca.pem")
    assert path.read_text().count("FANFARE_APNS_PORT") == 1
    remove_provider_settings(path, info(9100))
    assert path.read_text() == "FANFARE_SHARDS=8\n"
    write_provider_settings(path, info(9200))
    path.write_text(path.read_text().replace("FANFARE_APNS_PORT=9200", "FANFARE_APNS_PORT=1"))
    remove_provider_settings(path, info(9200))  # a line changed since is not ours to remove
    assert path.read_text() == "FANFARE_SHARDS=8\nFANFARE_APNS_PORT=1\n"
    path.write_text("")
    write_provider_settings(path, info(9300))
    remove_provider_settings(path, info(9300))
    assert not path.exists()  # nothing else was in it
