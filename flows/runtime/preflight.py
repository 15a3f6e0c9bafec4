"""What `fanfare run` checks before it starts a flow, so a missing piece is said once, plainly.

Without it a flow started with the broker down printed a Python traceback and a stream of
librdkafka connection errors on every try, and the supervisor restarted it ten times. Each check
gives one line (what, why, what to do); `fanfare run` exits with EXIT_CANNOT_START (3), or
EXIT_CONFIGURATION (2) for a setting it cannot use, and starts nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flows.runtime.ports import port_free
from flows.runtime.readiness import CheckResult, probe_broker, probe_redis
from flows.runtime.supervisor import EXIT_CANNOT_START, EXIT_CONFIGURATION
from operators.config import Settings, redact_url
from schemas.topics import ALL_TOPICS

BROKER_WAIT_S = 5.0
"""How long a broker that is still starting gets to answer."""
NEEDS_REDIS = frozenset({"fanout", "delivery"})
"""Flows that keep claims or rate limits in Redis (the acks flow does not)."""


@dataclass(frozen=True)
class Problem:
    """Why a flow cannot start, in one line, and the exit code that says which kind."""

    code: int
    line: str


def _broker(settings: Settings, probe: Callable[[Settings, float], CheckResult]) -> list[Problem]:
    result = probe(settings, BROKER_WAIT_S)
    if not result.ok:
        return [
            Problem(
                EXIT_CANNOT_START,
                f"no Kafka broker answers at {settings.kafka_brokers} (FANFARE_KAFKA_BROKERS; "
                f"{result.detail}): start it (`fanfare dev up` starts the embedded one) or "
                "point FANFARE_KAFKA_BROKERS at yours",
            )
        ]
    return []


def _topics(settings: Settings, existing: Callable[[Settings], dict[str, int]]) -> list[Problem]:
    missing = [t for t in ALL_TOPICS if t not in existing(settings)]
    if missing:
        return [
            Problem(
                EXIT_CANNOT_START,
                f"{len(missing)} of fanfare's topics do not exist on {settings.kafka_brokers} "
                f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): run "
                "`fanfare topics create`",
            )
        ]
    return []


def _redis(settings: Settings, probe: Callable[[Settings, float], CheckResult]) -> list[Problem]:
    result = probe(settings, 2.0)
    if not result.ok:
        where = redact_url(settings.redis_url)
        return [
            Problem(
                EXIT_CANNOT_START,
                f"Redis does not answer at {where} (FANFARE_REDIS_URL; {result.detail}): start "
                "it (`redis-server`, or `apt-get install redis-server`) or point "
                "FANFARE_REDIS_URL at yours",
            )
        ]
    return []


def _ports(settings: Settings, metrics_ports: Sequence[int]) -> list[Problem]:
    problems = []
    if settings.metrics_server == "fanfare":
        for i, port in enumerate(metrics_ports):
            if not port_free(port, settings.metrics_listen_host):
                name = "FANFARE_METRICS_PORT" + (f" + {i}" if i else "")
                problems.append(
                    Problem(
                        EXIT_CANNOT_START,
                        f"port {port} ({name}, a process's /metrics) is taken on "
                        f"{settings.metrics_listen_host}: stop what holds it or choose another "
                        "FANFARE_METRICS_PORT",
                    )
                )
    if settings.ready_port and not port_free(settings.ready_port, settings.ready_host):
        problems.append(
            Problem(
                EXIT_CANNOT_START,
                f"port {settings.ready_port} (FANFARE_READY_PORT, /ready and /live) is taken on "
                f"{settings.ready_host}: another flow on this host uses it; give each flow its "
                "own FANFARE_READY_PORT (0 turns the endpoint off)",
            )
        )
    return problems


def _providers(settings: Settings) -> list[Problem]:
    from operators.adapters.providers.config import ProviderConfigError, apns_config, fcm_config

    try:
        configured = [c for c in (apns_config(settings), fcm_config(settings)) if c is not None]
    except ProviderConfigError as exc:
        return [Problem(EXIT_CONFIGURATION, str(exc))]
    if not configured:
        return [
            Problem(
                EXIT_CONFIGURATION,
                "no push provider is configured: set FANFARE_APNS_KEY_FILE (with _KEY_ID, "
                "_TEAM_ID, _TOPIC) and/or FANFARE_FCM_CREDENTIALS_FILE, or run `fanfare dev up` "
                "for the local APNs and FCM servers",
            )
        ]
    return []


def _channels(settings: Settings) -> list[Problem]:
    """What the delivery workers build their channel senders and renderers from."""
    from operators.adapters.catalog_files import load_catalog
    from operators.adapters.channels.factory import read_link_secret
    from operators.config import ConfigError
    from operators.notify.categories import CatalogError

    problems = []
    try:
        load_catalog(settings.categories_file, settings.templates_dir)
    except CatalogError as exc:
        problems.append(
            Problem(
                EXIT_CONFIGURATION,
                f"the delivery flow renders API notifications from the catalog: {exc}",
            )
        )
    if settings.smtp_host:
        try:
            secret = read_link_secret(settings)
        except ConfigError as exc:
            problems.append(Problem(EXIT_CONFIGURATION, str(exc)))
        else:
            if secret is None:
                problems.append(
                    Problem(
                        EXIT_CONFIGURATION,
                        "FANFARE_SMTP_HOST is set but FANFARE_LINK_SECRET_FILE is not: emails "
                        "carry signed one-click unsubscribe links (`openssl rand -hex 32 > FILE`)",
                    )
                )
    return problems


def startup_problems(
    settings: Settings,
    flow: str,
    metrics_ports: Sequence[int],
    *,
    broker: Callable[[Settings, float], CheckResult] = probe_broker,
    redis: Callable[[Settings, float], CheckResult] = probe_redis,
    topics: Callable[[Settings], dict[str, int]] | None = None,
) -> list[Problem]:
    """Everything that keeps `flow` from starting now (empty: it can start)."""
    if topics is None:
        from operators.adapters.kafka.admin import list_topics

        topics = list_topics
    problems = _ports(settings, metrics_ports)
    if flow == "delivery":
        problems += _providers(settings) + _channels(settings)
    broker_problems = _broker(settings, broker)
    problems += broker_problems or _topics(settings, topics)
    if flow in NEEDS_REDIS:
        problems += _redis(settings, redis)
    return problems


def exit_code(problems: Sequence[Problem]) -> int:
    """A setting it cannot use (2) first, else something missing or taken (3)."""
    return min(p.code for p in problems)
