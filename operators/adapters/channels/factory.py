"""The channel senders from settings: what a delivery worker adds to its sender table.

`build_channel_senders` runs on the worker's event loop (the async clients bind to it) and
returns the configured senders by provider name: `email` with FANFARE_SMTP_HOST, `sms` with
FANFARE_SMS_ACCOUNT_SID, `webpush` with FANFARE_WEBPUSH_VAPID_KEY_FILE; `chat` (no credential:
the address is the webhook) and `inapp` (Redis) always. Each has its own rate-limit bucket,
named like the push ones (`email:<relay>`, `sms:<account>`, `webpush`, `chat`, `inapp`).
"""

from __future__ import annotations

from pathlib import Path

from operators.adapters.channels.chat import ChatConfig, WebhookChatSender
from operators.adapters.channels.content import ChannelRenderer
from operators.adapters.channels.email import EmailConfig, SmtpEmailSender
from operators.adapters.channels.inapp import RedisInAppSender
from operators.adapters.channels.sms import SmsConfig, TwilioSmsSender
from operators.adapters.channels.webpush import VapidWebPushSender, WebPushConfig
from operators.adapters.providers.config import ProviderConfigError
from operators.adapters.redis.client import fail_fast_options
from operators.adapters.redis.live import LivePublisher
from operators.adapters.redis.rate_limiter import AsyncRedisRateLimiter
from operators.adapters.redis.sms_budget import RedisSmsBudget
from operators.config import ConfigError, Settings, read_secret_file
from operators.delivery.model import RetryPolicy
from operators.delivery.payloads import PushTemplate
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec
from operators.notify.catalog import Catalog
from operators.notify.links import MIN_SECRET_BYTES

REDIS_CONNECTIONS = 100
"""The channel senders' Redis connections per worker (SMS budgets, in-app streams)."""


def _path(value: str) -> Path | None:
    return Path(value) if value else None


def read_link_secret(settings: Settings) -> bytes | None:
    """The key of FANFARE_LINK_SECRET_FILE (None when unset); ConfigError when too short."""
    if not settings.link_secret_file:
        return None
    secret = read_secret_file("FANFARE_LINK_SECRET_FILE", settings.link_secret_file).encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"FANFARE_LINK_SECRET_FILE={settings.link_secret_file}: the key must be at least "
            f"{MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32 > FILE`)"
        )
    return secret


def email_config(settings: Settings) -> EmailConfig | None:
    """Email from the FANFARE_SMTP_* settings; None without FANFARE_SMTP_HOST."""
    if not settings.smtp_host:
        return None
    return EmailConfig(
        host=settings.smtp_host,
        port=settings.smtp_port,
        tls=settings.smtp_tls,
        username=settings.smtp_username or None,
        password_file=_path(settings.smtp_password_file),
        ca_file=_path(settings.smtp_ca_file),
        sender=settings.email_from,
        connections=settings.smtp_connections,
        public_url=settings.resolved_public_url,
        link_secret=read_link_secret(settings),
        domain_rate_per_min=settings.email_domain_rate_per_min,
    )


def sms_config(settings: Settings) -> SmsConfig | None:
    """SMS from the FANFARE_SMS_* settings; None without FANFARE_SMS_ACCOUNT_SID."""
    if not settings.sms_account_sid:
        return None
    return SmsConfig(
        api_url=settings.sms_api_url,
        account_sid=settings.sms_account_sid,
        auth_token_file=Path(settings.sms_auth_token_file),
        sender=settings.sms_from,
        ca_file=_path(settings.channel_ca_file),
        public_url=settings.resolved_public_url,
        cost_micros=settings.sms_cost_micros,
        currency=settings.sms_currency,
    )


def webpush_config(settings: Settings) -> WebPushConfig | None:
    """Web push from the FANFARE_WEBPUSH_* settings; None without a VAPID key."""
    if not settings.webpush_vapid_key_file:
        return None
    return WebPushConfig(
        vapid_key_file=Path(settings.webpush_vapid_key_file),
        subject=settings.webpush_subject,
        ca_file=_path(settings.channel_ca_file),
        allow_dev=settings.dev_mode,
    )


async def build_channel_senders(
    settings: Settings,
    catalog: Catalog | None,
    pace_destinations: bool,
    policy: RetryPolicy,
) -> dict[str, PushSender]:
    """The configured channel senders of one worker (call on its event loop).

    With `pace_destinations`, email and chat also take from a Redis bucket per recipient domain
    and per webhook (`pacing.py`); without, only the engine's buckets pace them (benchmarks).
    """
    import redis.asyncio as aioredis

    timeout = settings.send_timeout_ms / 1000
    burst = settings.rate_burst_ms / 1000
    reserve = settings.bulk_reserve_pct / 100
    slack = settings.rate_send_slack_ms / 1000
    template = PushTemplate(settings.push_title, settings.push_body, settings.push_link)
    renderer = ChannelRenderer(catalog, template)

    def bucket(name: str, per_minute: int) -> BucketSpec:
        return BucketSpec(name, per_minute, burst, reserve, slack)

    senders: dict[str, PushSender] = {}
    # A blocking pool: with 100 connections in use, a budget check or an in-app publish waits
    # for one (2 s at most) instead of failing at once (MaxConnectionsError) while the SMS
    # sender has more sends under way than that.
    redis_client = aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=REDIS_CONNECTIONS,
            timeout=2,
            socket_connect_timeout=2,
        )
    )
    limiter = None
    if pace_destinations:
        # Its own fail-fast client: a send must not wait long on a pacing aid.
        pacing_client = aioredis.Redis.from_url(settings.redis_url, **fail_fast_options())
        limiter = AsyncRedisRateLimiter(pacing_client, settings.redis_prefix)
    email = email_config(settings)
    if email is not None:
        if email.link_secret is None:
            raise ProviderConfigError(
                "email needs FANFARE_LINK_SECRET_FILE: its messages carry signed one-click "
                "unsubscribe links (RFC 8058)"
            )
        senders["email"] = SmtpEmailSender(
            email,
            renderer,
            bucket(f"email:{email.host}", settings.email_rate_per_min),
            limiter,
            timeout,
        )
    sms = sms_config(settings)
    if sms is not None:
        budget = RedisSmsBudget(
            redis_client,
            settings.redis_prefix,
            settings.sms_user_daily_limit,
            settings.sms_daily_limit,
        )
        senders["sms"] = TwilioSmsSender(
            sms,
            renderer,
            bucket(f"sms:{sms.account_sid}", settings.sms_rate_per_min),
            budget,
            timeout,
        )
    web = webpush_config(settings)
    if web is not None:
        senders["webpush"] = VapidWebPushSender(
            web, renderer, bucket("webpush", settings.webpush_rate_per_min), policy, timeout
        )
    chat = ChatConfig(
        _path(settings.channel_ca_file), settings.dev_mode, settings.chat_webhook_rate_per_min
    )
    senders["chat"] = WebhookChatSender(
        chat, renderer, bucket("chat", settings.chat_rate_per_min), limiter, timeout
    )
    publisher = LivePublisher(
        redis_client,
        settings.redis_prefix,
        settings.inapp_stream_length,
        settings.inapp_stream_ttl_s,
    )
    senders["inapp"] = RedisInAppSender(publisher, renderer, bucket("inapp", 6_000_000))
    return senders
