"""fanfare's settings: read from ``FANFARE_*`` environment variables here, and only here.

Everything else receives a :class:`Settings` (or the few values it needs) as an argument, so the
pure logic never reads the environment and tests build settings explicitly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from operators.outbox.model import TableName
from schemas.topics import ALL_TOPICS, MAX_DISPATCH_BATCH

METRICS_SERVERS = ("fanfare", "bytewax")
APNS_CLIENTS = ("curl", "aioapns")
FCM_CLIENTS = ("curl", "firebase-admin")


class ConfigError(ValueError):
    """A setting has a value fanfare cannot use; the message says which and what to do."""


@dataclass(frozen=True)
class Settings:
    """fanfare's configuration. Field docs are the README's configuration table."""

    home: Path = Path(".fanfare")
    """FANFARE_HOME: folder for the embedded stack's state, logs, store and recovery data."""
    settings_file: str = ""
    """FANFARE_SETTINGS_FILE: more settings, one `FANFARE_NAME=value` a line (`#` comments); by
    default `$FANFARE_HOME/settings.env` when it exists. The environment wins; `fanfare dev up`
    writes the local APNs and FCM servers' settings there."""
    kafka_brokers: str = "127.0.0.1:9092"
    """FANFARE_KAFKA_BROKERS: bootstrap servers, comma separated."""
    kafka_options: Mapping[str, str] = field(default_factory=dict)
    """FANFARE_KAFKA_OPTIONS: extra librdkafka settings, `key=value` comma separated
    (e.g. `security.protocol=SASL_SSL,sasl.mechanism=PLAIN`)."""
    kafka_secrets_file: str = ""
    """FANFARE_KAFKA_SECRETS_FILE: file of secret librdkafka settings, one `key=value` a line
    (`sasl.password`, `ssl.key.password`, ...), merged over FANFARE_KAFKA_OPTIONS; never logged."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """FANFARE_REDIS_URL: Redis for claims and rate limits (no password here: see below)."""
    redis_password_file: str = ""
    """FANFARE_REDIS_PASSWORD_FILE: file holding the Redis password (AUTH); never logged."""
    redis_prefix: str = "fanfare:"
    """FANFARE_REDIS_PREFIX: prefix of every Redis key fanfare writes."""
    store_url: str = ""
    """FANFARE_STORE_URL: follower store; default `sqlite:///$FANFARE_HOME/store.db`."""
    topic_partitions: int = 4
    """FANFARE_TOPIC_PARTITIONS: partitions of each topic `fanfare topics create` makes."""
    topic_partition_overrides: Mapping[str, int] = field(default_factory=dict)
    """FANFARE_TOPIC_PARTITIONS_OVERRIDES: per topic, `push.fcm.bulk=8,post_created=2`."""
    replication_factor: int = 1
    """FANFARE_REPLICATION_FACTOR: replication of created topics (1 on the embedded broker)."""
    shard_count: int = 32
    """FANFARE_SHARDS: follower shards; users are bucketed by shard, fixed per deployment."""
    celebrity_threshold: int = 10_000
    """FANFARE_CELEBRITY_THRESHOLD: authors with more followers go to the `.bulk` lanes."""
    dispatch_batch_size: int = MAX_DISPATCH_BATCH
    """FANFARE_DISPATCH_BATCH_SIZE: items per dispatch batch, 1 to 500."""
    follower_page_size: int = 1_000
    """FANFARE_FOLLOWER_PAGE_SIZE: followers read per page from the follower store."""
    expand_budget: int = 2_000
    """FANFARE_EXPAND_BUDGET: followers one shard expands before yielding to other work."""
    bulk_expand_budget: int = 100_000
    """FANFARE_BULK_EXPAND_BUDGET: followers of celebrity posts one shard expands per activation
    (a whole shard's portion when it fits), within FANFARE_BULK_EXPAND_MS."""
    bulk_expand_ms: int = 40
    """FANFARE_BULK_EXPAND_MS: time one shard spends on celebrity posts per activation before
    normal posts get their turn."""
    step_budget_ms: int = 100
    """FANFARE_STEP_BUDGET_MS: time all the shards of one worker together spend per step on work
    that can wait (celebrity posts, social and marketing notifications) before the sources are
    read again, so a login code or a normal post waits at most about that long behind them."""
    checkpoint_interval_s: int = 300
    """FANFARE_CHECKPOINT_INTERVAL_S: how often a follower shard checkpoints its users (and at
    once when it first catches up after a start)."""
    changelog_retention_hours: int = 168
    """FANFARE_CHANGELOG_RETENTION_HOURS: retention `fanfare topics create` sets on
    preference_changes and device_changes (0: keep forever); must exceed the checkpoint
    interval plus the longest time the fan-out may stay down."""
    post_claim_ttl_s: int = 86_400
    """FANFARE_POST_CLAIM_TTL_S: how long a post_id is remembered for dedupe."""
    post_cap: int = 10
    """FANFARE_POST_CAP: post pushes per user per FANFARE_CAP_WINDOW_S, counted across authors
    (0: no cap); the rest join the user's bundle, one summary push when the window ends."""
    cap_window_s: int = 3_600
    """FANFARE_CAP_WINDOW_S: the cap's window in seconds, fixed and aligned on the Unix epoch in
    UTC (0: no cap)."""
    notify_cap: int = 5
    """FANFARE_NOTIFY_CAP: API notifications per user per FANFARE_NOTIFY_CAP_WINDOW_S of each
    category with caps on (marketing, social; never transactional), counted per category
    (0: no cap); the ones over it are dropped, counted as `capped`."""
    notify_cap_window_s: int = 86_400
    """FANFARE_NOTIFY_CAP_WINDOW_S: that cap's window in seconds, fixed and aligned on the Unix
    epoch in UTC (0: no cap)."""
    changelog_settle_ms: int = 100
    """FANFARE_CHANGELOG_SETTLE_MS: margin subtracted from a changelog's caught-up time."""
    snapshot_interval_s: int = 5
    """FANFARE_SNAPSHOT_INTERVAL_S: Bytewax epoch / recovery snapshot interval."""
    recovery_partitions: int = 4
    """FANFARE_RECOVERY_PARTITIONS: partitions of a new recovery directory."""
    metrics_port: int = 3030
    """FANFARE_METRICS_PORT: first /metrics port (one per process)."""
    metrics_host: str = "127.0.0.1"
    """FANFARE_METRICS_HOST: address fanfare's /metrics server binds (`0.0.0.0` for a scraper on
    another host)."""
    metrics_server: str = "fanfare"
    """FANFARE_METRICS_SERVER: `fanfare` (fanfare's own /metrics on FANFARE_METRICS_HOST) or
    `bytewax` (Bytewax's API server: adds its `bytewax_*` step metrics and /dataflow, but binds
    every interface, with no setting in bytewax 0.21)."""
    ready_port: int = 3040
    """FANFARE_READY_PORT: `fanfare run`'s `/ready` and `/live` endpoints (0: not served)."""
    ready_host: str = "127.0.0.1"
    """FANFARE_READY_HOST: address the `/ready` endpoint binds (`0.0.0.0` for a kubelet probe)."""
    log_level: str = "INFO"
    """FANFARE_LOG_LEVEL: DEBUG, INFO (one line per notable event: starts, stops, restarts,
    outages), WARNING or ERROR; the client libraries log warnings only unless DEBUG."""
    notification_store_url: str = ""
    """FANFARE_NOTIFICATION_STORE_URL: notification store; default
    `sqlite:///$FANFARE_HOME/notifications.db`."""
    store_ttl_s: int = 604_800
    """FANFARE_STORE_TTL_S: how long notifications, device rows and attempts are kept."""
    cassandra_username: str = ""
    """FANFARE_CASSANDRA_USERNAME: Cassandra user for `cassandra://` stores (none: no auth)."""
    cassandra_password_file: str = ""
    """FANFARE_CASSANDRA_PASSWORD_FILE: file holding that user's password (never logged)."""
    apns_key_file: str = ""
    """FANFARE_APNS_KEY_FILE: APNs token-auth key (.p8). Empty: no APNs (`fanfare dev up` sets
    the local APNs server's in the settings file)."""
    apns_key_id: str = ""
    """FANFARE_APNS_KEY_ID: the key's id (10 characters, from Apple)."""
    apns_team_id: str = ""
    """FANFARE_APNS_TEAM_ID: the Apple developer team id."""
    apns_topic: str = ""
    """FANFARE_APNS_TOPIC: the app's bundle id (apns-topic)."""
    apns_host: str = "api.push.apple.com"
    """FANFARE_APNS_HOST: APNs host (api.sandbox.push.apple.com for development builds)."""
    apns_port: int = 443
    """FANFARE_APNS_PORT: APNs port."""
    apns_ca_file: str = ""
    """FANFARE_APNS_CA_FILE: extra CA bundle to trust (the local APNs server's CA)."""
    fcm_credentials_file: str = ""
    """FANFARE_FCM_CREDENTIALS_FILE: Google service-account JSON. Empty: no FCM (`fanfare dev
    up` sets the local FCM server's in the settings file)."""
    fcm_url: str = "https://fcm.googleapis.com"
    """FANFARE_FCM_URL: FCM HTTP v1 base URL."""
    fcm_ca_file: str = ""
    """FANFARE_FCM_CA_FILE: extra CA bundle to trust for FANFARE_FCM_URL (the local FCM's CA)."""
    apns_client: str = "curl"
    """FANFARE_APNS_CLIENT: `curl` (HTTP/2 on libcurl through pycurl) or `aioapns`."""
    fcm_client: str = "curl"
    """FANFARE_FCM_CLIENT: `curl` (HTTP/2 on libcurl through pycurl) or `firebase-admin`."""
    apns_connections: int = 4
    """FANFARE_APNS_CONNECTIONS: HTTP/2 connections to APNs per delivery worker, at most."""
    fcm_connections: int = 4
    """FANFARE_FCM_CONNECTIONS: HTTP/2 connections to FCM per delivery worker, at most."""
    delivery_in_flight: int = 2_000
    """FANFARE_DELIVERY_IN_FLIGHT: pushes a delivery worker has sent (or queued for a rate-limit
    token) without an answer, at most."""
    apns_rate_per_min: int = 6_000_000
    """FANFARE_APNS_RATE_PER_MIN: APNs sends per minute, all workers together."""
    fcm_rate_per_min: int = 600_000
    """FANFARE_FCM_RATE_PER_MIN: FCM sends per minute per project (FCM's default quota)."""
    rate_burst_ms: int = 1_000
    """FANFARE_RATE_BURST_MS: bucket size, in milliseconds of the rate."""
    rate_send_slack_ms: int = 200
    """FANFARE_RATE_SEND_SLACK_MS: milliseconds of the rate kept out of the bucket for sends that
    reach the provider late (at most half of FANFARE_RATE_BURST_MS)."""
    bulk_reserve_pct: int = 20
    """FANFARE_BULK_RESERVE_PCT: share of each bucket the bulk lane leaves to normal posts."""
    rate_wait_max_ms: int = 500
    """FANFARE_RATE_WAIT_MAX_MS: longest a push waits for its rate-limit token before it is held
    for later."""
    retry_max_attempts: int = 8
    """FANFARE_RETRY_MAX_ATTEMPTS: provider sends per device before dead-lettering."""
    retry_base_ms: int = 1_000
    """FANFARE_RETRY_BASE_MS: first backoff ceiling (doubles per attempt, full jitter)."""
    retry_max_backoff_s: int = 300
    """FANFARE_RETRY_MAX_BACKOFF_S: largest backoff ceiling."""
    notification_max_age_s: int = 3_600
    """FANFARE_NOTIFICATION_MAX_AGE_S: a notification older than this is `expired`, not sent."""
    breaker_failures: int = 20
    """FANFARE_BREAKER_FAILURES: consecutive transient failures that open a provider's circuit."""
    breaker_cooldown_s: int = 5
    """FANFARE_BREAKER_COOLDOWN_S: how long an open circuit holds sends before probing."""
    send_timeout_ms: int = 10_000
    """FANFARE_SEND_TIMEOUT_MS: a send without an answer by then is retried."""
    edge_claim_ttl_s: int = 604_800
    """FANFARE_EDGE_CLAIM_TTL_S: how long a (notification, device) claim stays in Redis."""
    bulk_items_per_poll: int = 100
    """FANFARE_BULK_ITEMS_PER_POLL: bulk pushes a delivery worker takes per poll (all lanes)."""
    delivery_providers: str = ""
    """FANFARE_DELIVERY_PROVIDERS: the providers whose lane topics a delivery process reads,
    comma-separated (apns,fcm,email,sms,webpush,chat,inapp); empty: all of them."""
    push_title: str = "{author_id} posted"
    """FANFARE_PUSH_TITLE: notification title; fields {author_id} and {post_id}."""
    push_body: str = "Tap to read the new post"
    """FANFARE_PUSH_BODY: notification body; same fields."""
    push_link: str = "fanfare://posts/{post_id}"
    """FANFARE_PUSH_LINK: deep link to the post; same fields."""
    api_host: str = "127.0.0.1"
    """FANFARE_API_HOST: address `fanfare api` binds (`0.0.0.0` in a container or behind a load
    balancer on another host)."""
    api_port: int = 8080
    """FANFARE_API_PORT: port of `fanfare api`: the API, `/docs`, `/health` and its `/metrics`."""
    api_max_body_bytes: int = 262_144
    """FANFARE_API_MAX_BODY_BYTES: largest request body; a larger one gets 413 before it is
    read or parsed."""
    api_upload_max_bytes: int = 16_777_216
    """FANFARE_API_UPLOAD_MAX_BYTES: largest audience upload (a list of user ids for a
    campaign)."""
    api_idempotency_ttl_s: int = 86_400
    """FANFARE_API_IDEMPOTENCY_TTL_S: how long an idempotency key's first answer is kept."""
    api_campaign_max_rate: int = 1_000
    """FANFARE_API_CAMPAIGN_MAX_RATE: the highest `rate_per_s` (users a second) a campaign may
    ask for."""
    api_campaign_ttl_s: int = 2_592_000
    """FANFARE_API_CAMPAIGN_TTL_S: how long a finished campaign's record and an uploaded audience
    are kept."""
    api_campaign_lease_s: int = 15
    """FANFARE_API_CAMPAIGN_LEASE_S: a scheduler's lease on a campaign: another scheduler takes a
    campaign over this long after its scheduler died."""
    categories_file: str = ""
    """FANFARE_CATEGORIES_FILE: the categories file (TOML); empty: the shipped one
    (`operators/notify/defaults/categories.toml`)."""
    templates_dir: str = ""
    """FANFARE_TEMPLATES_DIR: the templates directory; empty: the shipped templates
    (`operators/notify/defaults/templates/`)."""
    outbox_url: str = ""
    """FANFARE_OUTBOX_URL: the post service's PostgreSQL, where the outbox table is
    (`postgresql://USER@HOST:5432/DB`; no password here: see below). `fanfare outbox` needs it."""
    outbox_password_file: str = ""
    """FANFARE_OUTBOX_PASSWORD_FILE: file holding that user's password; never logged."""
    outbox_table: str = "fanfare_outbox"
    """FANFARE_OUTBOX_TABLE: the outbox table, `NAME` or `SCHEMA.NAME`; its NOTIFY channel has
    the same name."""
    outbox_batch_size: int = 500
    """FANFARE_OUTBOX_BATCH_SIZE: rows a relay claims, publishes and deletes per transaction."""
    outbox_poll_ms: int = 1_000
    """FANFARE_OUTBOX_POLL_MS: longest an idle relay waits for a notification before looking
    for rows anyway (a notification lost with a broken session)."""
    outbox_metrics_port: int = 3050
    """FANFARE_OUTBOX_METRICS_PORT: `fanfare outbox relay`'s /metrics, on FANFARE_METRICS_HOST
    (0: not served)."""
    dev_mode: bool = False
    """FANFARE_DEV_MODE: the development stack's allowances: http and loopback or private hosts
    for chat webhooks, web push endpoints and FANFARE_PUBLIC_URL, SMTP without TLS, and the live
    inbox page `/dev/inbox` on `fanfare api`. `fanfare dev up` sets it in the settings file;
    never set it in production."""
    public_url: str = ""
    """FANFARE_PUBLIC_URL: the API's public base URL, for the links fanfare puts in messages
    (one-click unsubscribe, SMS status callbacks); empty: `http://FANFARE_API_HOST:PORT`, which
    only FANFARE_DEV_MODE accepts (it must be https otherwise)."""
    link_secret_file: str = ""
    """FANFARE_LINK_SECRET_FILE: file holding the key (32 bytes or more) that signs unsubscribe
    links and live-stream tokens; never logged. Email and the browser's live stream need it."""
    unsubscribe_ttl_s: int = 31_536_000
    """FANFARE_UNSUBSCRIBE_TTL_S: how long an unsubscribe link works after its message left."""
    stream_token_ttl_s: int = 3_600
    """FANFARE_STREAM_TOKEN_TTL_S: how long a browser's live-stream token works."""
    smtp_host: str = ""
    """FANFARE_SMTP_HOST: the SMTP relay (a submission server). Empty: no email."""
    smtp_port: int = 587
    """FANFARE_SMTP_PORT: its port (587 with STARTTLS, 465 with implicit TLS)."""
    smtp_tls: str = "starttls"
    """FANFARE_SMTP_TLS: `starttls` (required, not opportunistic), `tls` (implicit, port 465) or
    `none` (FANFARE_DEV_MODE only)."""
    smtp_username: str = ""
    """FANFARE_SMTP_USERNAME: the relay's user (empty: no AUTH)."""
    smtp_password_file: str = ""
    """FANFARE_SMTP_PASSWORD_FILE: file holding that user's password; never logged."""
    smtp_ca_file: str = ""
    """FANFARE_SMTP_CA_FILE: extra CA bundle to trust for the relay (the local SMTP server's)."""
    smtp_connections: int = 4
    """FANFARE_SMTP_CONNECTIONS: SMTP connections per delivery worker (one message at a time
    each)."""
    email_from: str = ""
    """FANFARE_EMAIL_FROM: the From address (`Name <addr@domain>` or `addr@domain`); required
    with FANFARE_SMTP_HOST."""
    email_rate_per_min: int = 6_000
    """FANFARE_EMAIL_RATE_PER_MIN: messages per minute to the relay, all workers together."""
    email_domain_rate_per_min: int = 600
    """FANFARE_EMAIL_DOMAIN_RATE_PER_MIN: messages per minute to one recipient domain (a bucket
    per domain, shared by every worker)."""
    sms_account_sid: str = ""
    """FANFARE_SMS_ACCOUNT_SID: the SMS provider's account id (Twilio's `AC...`). Empty: no SMS."""
    sms_auth_token_file: str = ""
    """FANFARE_SMS_AUTH_TOKEN_FILE: file holding the account's auth token (basic auth, and the
    key that signs status callbacks); never logged."""
    sms_api_url: str = "https://api.twilio.com"
    """FANFARE_SMS_API_URL: the Messages API's base URL (Twilio's, or a compatible one)."""
    sms_from: str = ""
    """FANFARE_SMS_FROM: the sender, an E.164 number or a messaging service id (`MG...`)."""
    sms_rate_per_min: int = 600
    """FANFARE_SMS_RATE_PER_MIN: messages per minute to the SMS provider, all workers together."""
    sms_user_daily_limit: int = 10
    """FANFARE_SMS_USER_DAILY_LIMIT: messages one user may get a UTC day; past it, `failed`."""
    sms_daily_limit: int = 10_000
    """FANFARE_SMS_DAILY_LIMIT: messages all users together may get a UTC day."""
    sms_cost_micros: int = 7_900
    """FANFARE_SMS_COST_MICROS: the price of one SMS segment in millionths of the currency,
    counted in `fanfare_sms_cost_micros_total` per message sent."""
    sms_currency: str = "USD"
    """FANFARE_SMS_CURRENCY: the currency of FANFARE_SMS_COST_MICROS (ISO 4217)."""
    webpush_vapid_key_file: str = ""
    """FANFARE_WEBPUSH_VAPID_KEY_FILE: the VAPID private key (PEM, P-256) web pushes are signed
    with; its public key is what browsers subscribe with. Empty: no web push."""
    webpush_subject: str = ""
    """FANFARE_WEBPUSH_SUBJECT: the VAPID `sub`, a `mailto:` or `https:` contact for push services;
    required with FANFARE_WEBPUSH_VAPID_KEY_FILE."""
    webpush_rate_per_min: int = 600_000
    """FANFARE_WEBPUSH_RATE_PER_MIN: web pushes per minute, all workers together."""
    chat_rate_per_min: int = 6_000
    """FANFARE_CHAT_RATE_PER_MIN: chat webhook posts per minute, all workers together."""
    chat_webhook_rate_per_min: int = 60
    """FANFARE_CHAT_WEBHOOK_RATE_PER_MIN: posts per minute to one webhook (Slack allows about one
    a second)."""
    channel_ca_file: str = ""
    """FANFARE_CHANNEL_CA_FILE: extra CA bundle the HTTP channel senders (SMS, web push, chat)
    trust (the local servers' CA)."""
    inapp_stream_length: int = 100
    """FANFARE_INAPP_STREAM_LENGTH: in-app notifications kept per user for a live stream that
    reconnects (`Last-Event-ID`)."""
    inapp_stream_ttl_s: int = 604_800
    """FANFARE_INAPP_STREAM_TTL_S: how long a user's kept in-app notifications live in Redis."""
    sse_heartbeat_s: int = 15
    """FANFARE_SSE_HEARTBEAT_S: seconds between keep-alive comments on an idle live stream."""
    sse_max_clients: int = 20_000
    """FANFARE_SSE_MAX_CLIENTS: live streams one `fanfare api` process holds at most (503 past
    it)."""

    @property
    def resolved_public_url(self) -> str:
        """FANFARE_PUBLIC_URL without its trailing slash, else the API's own address."""
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def metrics_listen_host(self) -> str:
        """The address /metrics listens on.

        FANFARE_METRICS_HOST, or every interface for Bytewax's API server (no address setting).
        """
        return "0.0.0.0" if self.metrics_server == "bytewax" else self.metrics_host

    @property
    def resolved_store_url(self) -> str:
        """The follower store URL, defaulting to SQLite inside FANFARE_HOME."""
        return self.store_url or f"sqlite:///{self.home / 'store.db'}"

    @property
    def resolved_notification_store_url(self) -> str:
        """The notification store URL, defaulting to SQLite inside FANFARE_HOME."""
        return self.notification_store_url or f"sqlite:///{self.home / 'notifications.db'}"

    @property
    def settings_path(self) -> Path:
        """The settings file: FANFARE_SETTINGS_FILE, else `$FANFARE_HOME/settings.env`."""
        return Path(self.settings_file) if self.settings_file else self.home / SETTINGS_FILE_NAME

    def recovery_dir(self, flow_name: str) -> Path:
        """Where a flow's recovery partitions live."""
        return self.home / "recovery" / flow_name

    @property
    def shard_state_dir(self) -> Path:
        """Where follower shards checkpoint their users (kept by `--fresh`: see the README)."""
        return self.home / "state" / "fanout"

    def partitions_for(self, topic: str) -> int:
        """Partition count for a topic (override, else the default)."""
        return self.topic_partition_overrides.get(topic, self.topic_partitions)

    def kafka_config(self, **extra: object) -> dict[str, object]:
        """Librdkafka configuration: brokers, pass-through options, then per-use settings."""
        conf: dict[str, object] = {"bootstrap.servers": self.kafka_brokers}
        conf.update(self.kafka_options)
        if self.kafka_secrets_file:
            conf.update(read_kafka_secrets(self.kafka_secrets_file))
        conf.update(extra)
        return conf

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests and CLI flags)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def _env_name(field_name: str) -> str:
    special = {
        "shard_count": "FANFARE_SHARDS",
        "topic_partition_overrides": "FANFARE_TOPIC_PARTITIONS_OVERRIDES",
    }
    return special.get(field_name, "FANFARE_" + field_name.upper())


ENV_VARIABLES = {f.name: _env_name(f.name) for f in fields(Settings)}


def _parse_pairs(name: str, raw: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{name}: expected key=value pairs separated by commas, got {part!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _parse_int(name: str, raw: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name}={value} is out of range: use a value {bound}")
    return value


_INT_BOUNDS: dict[str, tuple[int, int | None]] = {
    "topic_partitions": (1, 10_000),
    "replication_factor": (1, 16),
    "shard_count": (1, 65_536),
    "celebrity_threshold": (1, None),
    "dispatch_batch_size": (1, MAX_DISPATCH_BATCH),
    "follower_page_size": (1, 100_000),
    "expand_budget": (1, None),
    "bulk_expand_budget": (1, None),
    "bulk_expand_ms": (1, 60_000),
    "step_budget_ms": (1, 60_000),
    "checkpoint_interval_s": (1, 86_400),
    "changelog_retention_hours": (0, None),
    "post_claim_ttl_s": (1, None),
    "post_cap": (0, 65_535),
    "cap_window_s": (0, 7 * 86_400),
    "notify_cap": (0, 65_535),
    "notify_cap_window_s": (0, 7 * 86_400),
    "changelog_settle_ms": (0, 60_000),
    "snapshot_interval_s": (1, 3_600),
    "recovery_partitions": (1, 1_024),
    "metrics_port": (1, 65_535),
    "ready_port": (0, 65_535),
    "apns_port": (1, 65_535),
    "apns_rate_per_min": (1, None),
    "fcm_rate_per_min": (1, None),
    "rate_burst_ms": (1, 3_600_000),
    "rate_send_slack_ms": (0, 3_600_000),
    "bulk_reserve_pct": (0, 90),
    "rate_wait_max_ms": (0, 60_000),
    "retry_max_attempts": (1, 100),
    "retry_base_ms": (1, 3_600_000),
    "retry_max_backoff_s": (1, 86_400),
    "notification_max_age_s": (1, 30 * 86_400),
    "breaker_failures": (1, 100_000),
    "breaker_cooldown_s": (1, 3_600),
    "send_timeout_ms": (100, 600_000),
    "edge_claim_ttl_s": (1, None),
    "store_ttl_s": (60, 10 * 365 * 86_400),
    "bulk_items_per_poll": (1, 100_000),
    "apns_connections": (1, 64),
    "fcm_connections": (1, 64),
    "delivery_in_flight": (1, 1_000_000),
    "api_port": (1, 65_535),
    "api_max_body_bytes": (1_024, 64 * 1024 * 1024),
    "api_upload_max_bytes": (1_024, 1024 * 1024 * 1024),
    "api_idempotency_ttl_s": (60, 30 * 86_400),
    "api_campaign_max_rate": (1, 1_000_000),
    "api_campaign_ttl_s": (3_600, 365 * 86_400),
    "api_campaign_lease_s": (1, 600),
    "outbox_batch_size": (1, 10_000),
    "outbox_poll_ms": (10, 600_000),
    "outbox_metrics_port": (0, 65_535),
    "unsubscribe_ttl_s": (86_400, 10 * 365 * 86_400),
    "stream_token_ttl_s": (60, 30 * 86_400),
    "smtp_port": (1, 65_535),
    "smtp_connections": (1, 1_000),
    "email_rate_per_min": (1, None),
    "email_domain_rate_per_min": (1, None),
    "sms_rate_per_min": (1, None),
    "sms_user_daily_limit": (0, 100_000),
    "sms_daily_limit": (0, None),
    "sms_cost_micros": (0, 100_000_000),
    "webpush_rate_per_min": (1, None),
    "chat_rate_per_min": (1, None),
    "chat_webhook_rate_per_min": (1, None),
    "inapp_stream_length": (1, 100_000),
    "inapp_stream_ttl_s": (60, 365 * 86_400),
    "sse_heartbeat_s": (1, 3_600),
    "sse_max_clients": (1, 1_000_000),
}
_BOOLS = {"true": True, "1": True, "yes": True, "on": True}
_BOOLS.update({"false": False, "0": False, "no": False, "off": False})
SMTP_TLS_MODES = ("starttls", "tls", "none")


SETTINGS_FILE_NAME = "settings.env"
"""The settings file's name in FANFARE_HOME (unless FANFARE_SETTINGS_FILE names another)."""
PROVIDER_SETTINGS = (
    (
        "FANFARE_APNS_KEY_FILE",
        "FANFARE_APNS_KEY_ID",
        "FANFARE_APNS_TEAM_ID",
        "FANFARE_APNS_TOPIC",
        "FANFARE_APNS_HOST",
        "FANFARE_APNS_PORT",
        "FANFARE_APNS_CA_FILE",
    ),
    ("FANFARE_FCM_CREDENTIALS_FILE", "FANFARE_FCM_URL", "FANFARE_FCM_CA_FILE"),
    (
        "FANFARE_SMTP_HOST",
        "FANFARE_SMTP_PORT",
        "FANFARE_SMTP_TLS",
        "FANFARE_SMTP_USERNAME",
        "FANFARE_SMTP_PASSWORD_FILE",
        "FANFARE_SMTP_CA_FILE",
        "FANFARE_EMAIL_FROM",
    ),
    (
        "FANFARE_SMS_ACCOUNT_SID",
        "FANFARE_SMS_AUTH_TOKEN_FILE",
        "FANFARE_SMS_API_URL",
        "FANFARE_SMS_FROM",
    ),
    ("FANFARE_WEBPUSH_VAPID_KEY_FILE", "FANFARE_WEBPUSH_SUBJECT"),
)
"""Settings that only make sense together: where one comes from the environment, the settings
file's values of the others are not used (a real key is never sent to a local server's host)."""


def settings_file_path(env: Mapping[str, str]) -> Path:
    """Where the settings file is: FANFARE_SETTINGS_FILE, else `$FANFARE_HOME/settings.env`."""
    named = env.get("FANFARE_SETTINGS_FILE", "")
    if named:
        return Path(named)
    return Path(env.get("FANFARE_HOME") or Settings.home) / SETTINGS_FILE_NAME


def read_settings_file(path: Path) -> dict[str, str]:
    """`FANFARE_NAME=value` lines of a settings file; ConfigError names a line it cannot use."""
    known = set(ENV_VARIABLES.values()) - {"FANFARE_HOME", "FANFARE_SETTINGS_FILE"}
    values: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"settings file {path}: cannot read it ({exc})") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip().removeprefix("export ").strip()
        if not sep or name not in known:
            raise ConfigError(
                f"settings file {path}, line {number}: {line[:80]!r} is not a FANFARE_NAME=value "
                "setting of the README's configuration table (FANFARE_HOME and "
                "FANFARE_SETTINGS_FILE cannot be set there)"
            )
        values[name] = value.strip()
    return values


def _with_settings_file(env: Mapping[str, str]) -> Mapping[str, str]:
    """The environment over the settings file's values (a group from the environment wins whole)."""
    path = settings_file_path(env)
    if not path.exists():
        if env.get("FANFARE_SETTINGS_FILE"):
            raise ConfigError(f"FANFARE_SETTINGS_FILE={path}: no such file")
        return env
    values = read_settings_file(path)
    for group in PROVIDER_SETTINGS:
        if any(env.get(name) for name in group):
            for name in group:
                values.pop(name, None)
    return {**values, **{k: v for k, v in env.items() if v != "" or k not in values}}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every ``FANFARE_*`` variable; unknown values raise :class:`ConfigError`.

    Variables come from the environment, then from the settings file (see `settings_file`).
    """
    env = _with_settings_file(os.environ if environ is None else environ)
    values: dict[str, object] = {}
    for name, var in ENV_VARIABLES.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        if name == "home":
            values[name] = Path(raw)
        elif name == "kafka_options":
            values[name] = _parse_pairs(var, raw)
        elif name == "topic_partition_overrides":
            values[name] = {
                k: _parse_int(f"{var} ({k})", v, 1, 10_000)
                for k, v in _parse_pairs(var, raw).items()
            }
        elif name in _INT_BOUNDS:
            low, high = _INT_BOUNDS[name]
            values[name] = _parse_int(var, raw, low, high)
        elif name == "dev_mode":
            if raw.strip().lower() not in _BOOLS:
                raise ConfigError(f"{var}={raw!r}: use true or false")
            values[name] = _BOOLS[raw.strip().lower()]
        elif name == "log_level":
            level = raw.upper()
            if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
                raise ConfigError(f"{var}={raw!r}: use DEBUG, INFO, WARNING or ERROR")
            values[name] = level
        else:
            values[name] = raw
    settings = Settings(**values)  # type: ignore[arg-type]
    unknown = set(settings.topic_partition_overrides) - set(ALL_TOPICS)
    if unknown:
        raise ConfigError(
            f"FANFARE_TOPIC_PARTITIONS_OVERRIDES names unknown topics {sorted(unknown)}; "
            f"known topics: {', '.join(ALL_TOPICS)}"
        )
    if not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("FANFARE_REDIS_URL must start with redis://, rediss:// or unix://")
    settings = _with_secrets(settings)
    if not settings.resolved_notification_store_url.startswith(("sqlite:///", "cassandra://")):
        raise ConfigError(
            "FANFARE_NOTIFICATION_STORE_URL must be sqlite:///PATH or "
            "cassandra://host1,host2/keyspace[?dc=DC]"
        )
    _check_template(settings)
    if not settings.api_host.strip() or any(c.isspace() for c in settings.api_host):
        raise ConfigError(
            f"FANFARE_API_HOST={settings.api_host!r}: use one address (127.0.0.1, 0.0.0.0)"
        )
    if not settings.ready_host.strip() or any(c.isspace() for c in settings.ready_host):
        raise ConfigError(
            f"FANFARE_READY_HOST={settings.ready_host!r}: use one address (127.0.0.1, 0.0.0.0)"
        )
    _check_metrics_server(settings, env)
    _check_outbox(settings)
    _check_channels(settings)
    _check_delivery_providers(settings)
    if settings.apns_client not in APNS_CLIENTS:
        raise ConfigError(
            f"FANFARE_APNS_CLIENT={settings.apns_client!r}: use curl (libcurl, the default) or "
            "aioapns"
        )
    if settings.fcm_client not in FCM_CLIENTS:
        raise ConfigError(
            f"FANFARE_FCM_CLIENT={settings.fcm_client!r}: use curl (libcurl, the default) or "
            "firebase-admin"
        )
    if not settings.resolved_store_url.startswith(("sqlite:///", "cassandra://")):
        raise ConfigError(
            "FANFARE_STORE_URL must be sqlite:///PATH or cassandra://host1,host2/keyspace[?dc=DC]"
        )
    return settings


def delivery_providers(settings: Settings) -> tuple[str, ...]:
    """The providers a delivery process reads (FANFARE_DELIVERY_PROVIDERS; empty: all)."""
    from schemas.addresses import CHANNEL_PROVIDERS
    from schemas.topics import PROVIDERS

    every = (*PROVIDERS, *CHANNEL_PROVIDERS)
    named = [p.strip() for p in settings.delivery_providers.split(",") if p.strip()]
    return tuple(p for p in every if p in named) if named else every


def _check_delivery_providers(settings: Settings) -> None:
    from schemas.addresses import CHANNEL_PROVIDERS
    from schemas.topics import PROVIDERS

    every = (*PROVIDERS, *CHANNEL_PROVIDERS)
    unknown = sorted(
        {p.strip() for p in settings.delivery_providers.split(",") if p.strip()} - set(every)
    )
    if unknown:
        raise ConfigError(
            f"FANFARE_DELIVERY_PROVIDERS names unknown providers {unknown}; "
            f"known: {', '.join(every)}"
        )


def _check_metrics_server(settings: Settings, env: Mapping[str, str]) -> None:
    if settings.metrics_server not in METRICS_SERVERS:
        raise ConfigError(
            f"FANFARE_METRICS_SERVER={settings.metrics_server!r}: use fanfare (its own /metrics "
            "on FANFARE_METRICS_HOST, 127.0.0.1 by default) or bytewax (Bytewax's API server, "
            "on every interface)"
        )
    host = settings.metrics_host
    if not host.strip() or any(c.isspace() for c in host):
        raise ConfigError(f"FANFARE_METRICS_HOST={host!r}: use one address (127.0.0.1, 0.0.0.0)")
    # Bytewax's server has no address setting: a host asked for would be silently ignored.
    if settings.metrics_server == "bytewax" and env.get("FANFARE_METRICS_HOST", "") not in (
        "",
        "0.0.0.0",
        "::",
    ):
        raise ConfigError(
            f"FANFARE_METRICS_HOST={host}: Bytewax's API server (FANFARE_METRICS_SERVER=bytewax) "
            "binds every interface and cannot be given an address; unset FANFARE_METRICS_HOST, "
            "or use FANFARE_METRICS_SERVER=fanfare"
        )


def _check_outbox(settings: Settings) -> None:
    try:
        TableName.parse(settings.outbox_table)
    except ValueError as exc:
        raise ConfigError(f"FANFARE_OUTBOX_TABLE: {exc}") from None
    url = settings.outbox_url
    if not url:
        return
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "FANFARE_OUTBOX_URL must be postgresql://USER@HOST[:PORT]/DATABASE[?options]"
        )
    if urlsplit(url).password or re.search(r"(?i)[?&]password=", url):
        raise ConfigError(
            "FANFARE_OUTBOX_URL holds a password: credentials are read from files only; put it "
            "in a file named by FANFARE_OUTBOX_PASSWORD_FILE (the user may stay in the URL)"
        )


def outbox_password(settings: Settings) -> str | None:
    """The outbox database's password from FANFARE_OUTBOX_PASSWORD_FILE (None: none set)."""
    if not settings.outbox_password_file:
        return None
    return read_secret_file("FANFARE_OUTBOX_PASSWORD_FILE", settings.outbox_password_file)


def _check_channels(settings: Settings) -> None:
    """The channels' settings: shapes only (credential files are read by the senders)."""
    from email.utils import parseaddr

    from schemas.addresses import InvalidAddress, check_email, check_phone, check_url

    dev = settings.dev_mode
    if settings.public_url:
        try:
            check_url(settings.public_url, "FANFARE_PUBLIC_URL", allow_dev=dev)
        except InvalidAddress as exc:
            raise ConfigError(f"FANFARE_PUBLIC_URL={settings.public_url}: {exc}") from None
    if settings.smtp_tls not in SMTP_TLS_MODES:
        raise ConfigError(
            f"FANFARE_SMTP_TLS={settings.smtp_tls!r}: use starttls, tls or none (none only "
            "with FANFARE_DEV_MODE)"
        )
    if settings.smtp_tls == "none" and not dev:
        raise ConfigError(
            "FANFARE_SMTP_TLS=none sends passwords and mail in the clear: only with "
            "FANFARE_DEV_MODE=true; use starttls or tls"
        )
    if settings.email_from:
        try:
            check_email(parseaddr(settings.email_from)[1])
        except InvalidAddress as exc:
            raise ConfigError(f"FANFARE_EMAIL_FROM={settings.email_from!r}: {exc}") from None
    elif settings.smtp_host:
        raise ConfigError("FANFARE_SMTP_HOST is set but FANFARE_EMAIL_FROM is not")
    if settings.sms_from and not re.fullmatch(r"MG[0-9a-fA-F]{32}", settings.sms_from):
        try:
            check_phone(settings.sms_from)
        except InvalidAddress as exc:
            raise ConfigError(
                f"FANFARE_SMS_FROM={settings.sms_from!r}: {exc}, or a messaging service id "
                "(MG and 32 hex digits)"
            ) from None
    if settings.sms_account_sid and not (settings.sms_from and settings.sms_auth_token_file):
        raise ConfigError(
            "FANFARE_SMS_ACCOUNT_SID is set: set FANFARE_SMS_FROM and FANFARE_SMS_AUTH_TOKEN_FILE"
        )
    try:
        check_url(settings.sms_api_url, "FANFARE_SMS_API_URL", allow_dev=dev)
    except InvalidAddress as exc:
        raise ConfigError(f"FANFARE_SMS_API_URL={settings.sms_api_url}: {exc}") from None
    if not re.fullmatch(r"[A-Z]{3}", settings.sms_currency):
        raise ConfigError(f"FANFARE_SMS_CURRENCY={settings.sms_currency!r}: an ISO 4217 code")
    if (settings.smtp_host or settings.sms_account_sid) and not settings.public_url and not dev:
        raise ConfigError(
            "email and SMS put links to the API in messages (unsubscribe, status callbacks): set "
            "FANFARE_PUBLIC_URL to the API's public https address"
        )
    if settings.webpush_vapid_key_file and not settings.webpush_subject.startswith(
        ("mailto:", "https://")
    ):
        raise ConfigError(
            "FANFARE_WEBPUSH_SUBJECT must be a mailto: or https: contact for push services "
            "when FANFARE_WEBPUSH_VAPID_KEY_FILE is set"
        )


def _check_template(settings: Settings) -> None:
    from operators.delivery.payloads import PushTemplate

    try:
        PushTemplate(settings.push_title, settings.push_body, settings.push_link)
    except ValueError as exc:
        raise ConfigError(f"FANFARE_PUSH_TITLE/BODY/LINK: {exc}") from None


SECRET_KAFKA_OPTIONS = frozenset(
    {
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
    }
)
"""librdkafka settings that are credentials: only from FANFARE_KAFKA_SECRETS_FILE."""


def read_secret_file(var: str, path: str) -> str:
    """A secret from a file (one trailing newline dropped); ConfigError says what to fix."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{var}={path}: cannot read it ({exc.strerror})") from None
    return text.removesuffix("\n").removesuffix("\r")


def read_kafka_secrets(path: str) -> dict[str, str]:
    """FANFARE_KAFKA_SECRETS_FILE: `key=value` lines; blank lines and `#` comments skipped."""
    out: dict[str, str] = {}
    text = read_secret_file("FANFARE_KAFKA_SECRETS_FILE", path)
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            # Never echo the line: it may hold a secret.
            raise ConfigError(f"FANFARE_KAFKA_SECRETS_FILE={path}: line {n} is not key=value")
        out[key.strip()] = value.strip()
    return out


def redact_url(url: str) -> str:
    """A URL fit to print: a password in the authority or in a `password=` query is `***`.

    A unix:// Redis URL carries FANFARE_REDIS_PASSWORD_FILE's password in its query.
    """
    password = urlsplit(url).password
    if password is not None:
        url = url.replace(f":{password}@", ":***@", 1)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\g<1>***", url)


def _with_secrets(settings: Settings) -> Settings:
    """Refuse credentials outside files; put the Redis password file's password in the URL.

    Environment variables show in `ps e`, /proc/PID/environ, orchestrators' describe output
    and crash reports; files can be mounted read-only with their own permissions.
    """
    given = sorted(SECRET_KAFKA_OPTIONS & set(settings.kafka_options))
    if given:
        raise ConfigError(
            f"FANFARE_KAFKA_OPTIONS holds {', '.join(given)}: credentials are read from files "
            "only; put them in a file of key=value lines and name it in "
            "FANFARE_KAFKA_SECRETS_FILE"
        )
    if settings.kafka_secrets_file:
        read_kafka_secrets(settings.kafka_secrets_file)  # fail at start, not at first use
    url = urlsplit(settings.redis_url)
    if url.password:
        raise ConfigError(
            "FANFARE_REDIS_URL holds a password: credentials are read from files only; put it "
            "in a file named by FANFARE_REDIS_PASSWORD_FILE (a user name may stay in the URL)"
        )
    if not settings.redis_password_file:
        return settings
    password = read_secret_file("FANFARE_REDIS_PASSWORD_FILE", settings.redis_password_file)
    if url.scheme == "unix":
        sep = "&" if url.query else "?"
        with_pw = f"{settings.redis_url}{sep}password={quote(password, safe='')}"
    else:
        user = quote(url.username or "", safe="")
        host = url.netloc.rpartition("@")[2]
        with_pw = urlunsplit(
            (url.scheme, f"{user}:{quote(password, safe='')}@{host}", url.path, url.query, "")
        )
    # Held in memory for the clients; every report of the URL redacts the password.
    return settings.with_overrides(redis_url=with_pw)


def cassandra_credentials(settings: Settings) -> dict[str, str | None]:
    """`username` and `password_file` for the Cassandra adapters' `open` (None: no auth)."""
    return {
        "username": settings.cassandra_username or None,
        "password_file": settings.cassandra_password_file or None,
    }
