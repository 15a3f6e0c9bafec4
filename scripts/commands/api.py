"""`fanfare api`: the notification API server, its keys and its campaign scheduler.

- `fanfare api [--host H] [--port P]` serves the API (uvicorn, one process; run several behind
  a load balancer: they share everything through Redis and Kafka);
- `fanfare api keys create|list|revoke` manages callers' keys (only hashes are stored);
- `fanfare api scheduler` emits campaigns at their rates (see `operators/notify/scheduler.py`).

The scheduler is a command of its own, not a task inside each API process: API processes stay
request handlers that scale with traffic (a request never waits behind a campaign's follower
pages and produces on the same interpreter), and a campaign's pace does not depend on how many
API processes run. Campaign leases in Redis keep several schedulers safe (one emits a campaign
at a time; another takes over FANFARE_API_CAMPAIGN_LEASE_S after one dies).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis

from flows.runtime.ports import port_free
from flows.runtime.readiness import probe_broker, probe_redis
from flows.runtime.supervisor import EXIT_CANNOT_START, EXIT_CONFIGURATION
from operators.adapters.catalog_files import load_catalog
from operators.adapters.kafka.publisher import KafkaPublisher
from operators.adapters.kafka.segment_feed import ChangelogTail
from operators.adapters.providers.config import ProviderConfigError
from operators.adapters.redis.api_store import (
    AudienceRecipients,
    RedisAcceptedLog,
    RedisAudienceStore,
    RedisIdempotencyStore,
    RedisKeyStore,
    RedisRequestLimiter,
    api_redis,
)
from operators.adapters.redis.campaigns import RedisCampaignStore
from operators.adapters.redis.client import REDIS_DOWN_ERRORS, PerThreadRedis
from operators.adapters.redis.segments import RedisSegmentIndex
from operators.adapters.stores.by_url import open_follower_store, open_notification_store
from operators.adapters.stores.campaign_sources import FollowerRecipients
from operators.config import (
    ConfigError,
    Settings,
    cassandra_credentials,
    read_secret_file,
    redact_url,
)
from operators.fanout.ports import FollowerStore
from operators.notify.campaigns import MAX_CHUNK, Target
from operators.notify.catalog import Catalog, catalog_summary
from operators.notify.categories import CatalogError
from operators.notify.keys import ENDPOINT_SCOPES, ApiKey, new_key, parse_scope_list
from operators.notify.ports import PublishFailed, RecipientSource
from operators.notify.scheduler import MARKETING_TOPIC, CampaignScheduler
from operators.notify.segment_indexer import SEGMENT_TOPICS, SegmentIndexer
from operators.notify.service import NotifyService
from schemas.topics import DEVICE_CHANGES, NOTIFICATION_ACKS, PREFERENCE_CHANGES, TIER_TOPICS
from scripts.commands.arguments import number_in, positive_int, whole_number

if TYPE_CHECKING:  # FastAPI is imported by `fanfare api` only, not by every `fanfare` command
    from operators.adapters.http.app import CountingPublisher
    from operators.adapters.http.channels import ChannelApi

log = logging.getLogger("fanfare.api")

API_TOPICS = (*TIER_TOPICS, PREFERENCE_CHANGES, DEVICE_CHANGES, NOTIFICATION_ACKS)
"""The topics the API publishes to."""
TICK_S = 0.1
"""How often the scheduler steps its campaigns."""


def add_parser(sub: Any) -> None:
    """Register `fanfare api`, `fanfare api keys ...` and `fanfare api scheduler`."""
    api = sub.add_parser(
        "api",
        help="the notification API server (and its keys and campaign scheduler)",
        description="Serve the notification API (OpenAPI docs at /docs).",
    )
    api.add_argument("--host", default=None, help="address to bind (default: FANFARE_API_HOST)")
    api.add_argument(
        "--port",
        type=whole_number(1, 65_535),
        default=None,
        help="port (default: FANFARE_API_PORT)",
    )
    api.set_defaults(func=serve_command)
    api_sub = api.add_subparsers(dest="api_command", metavar="ACTION")

    keys = api_sub.add_parser("keys", help="callers' API keys (only their hashes are stored)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a key; it is shown once")
    create.add_argument("--name", required=True, help="who uses it (e.g. orders-service)")
    create.add_argument(
        "--endpoints",
        default="send,status",
        help=f"endpoint scopes, comma separated, or * ({', '.join(ENDPOINT_SCOPES)}; "
        "default send,status)",
    )
    create.add_argument(
        "--categories",
        required=True,
        help="categories it may send, comma separated, or * (checked against the categories file)",
    )
    create.add_argument(
        "--rate", type=number_in(0.001, 1_000_000), default=10.0, help="requests a second (10)"
    )
    create.add_argument(
        "--burst", type=positive_int, default=20, help="requests at once above the rate (20)"
    )
    create.add_argument("--json", action="store_true", help="print the key and record as JSON")
    create.set_defaults(func=keys_create_command)
    listing = keys_sub.add_parser("list", help="every key (never the key itself)")
    listing.add_argument("--json", action="store_true", help="print them as JSON")
    listing.set_defaults(func=keys_list_command)
    revoke = keys_sub.add_parser("revoke", help="revoke a key (its requests get 401 at once)")
    revoke.add_argument("key_id", help="the key's id (`fanfare api keys list`)")
    revoke.set_defaults(func=keys_revoke_command)

    scheduler = api_sub.add_parser(
        "scheduler", help="emit campaigns' per-user notifications at their rates"
    )
    scheduler.add_argument(
        "--heartbeat-file",
        default=None,
        help="touch this file after every pass that reached Redis (a container health check "
        "reads its age)",
    )
    scheduler.set_defaults(func=scheduler_command)


# --- wiring -------------------------------------------------------------------------------------


def _catalog(settings: Settings, command: str) -> Catalog | None:
    try:
        return load_catalog(settings.categories_file, settings.templates_dir)
    except CatalogError as exc:
        print(f"fanfare {command}: cannot start: {exc}", file=sys.stderr)
        return None


def _problems(settings: Settings, topics: Sequence[str]) -> list[str]:
    """What keeps the API or the scheduler from starting (one line each)."""
    problems = []
    redis_check = probe_redis(settings, 2.0)
    if not redis_check.ok:
        problems.append(
            f"Redis does not answer at {redact_url(settings.redis_url)} (FANFARE_REDIS_URL; "
            f"{redis_check.detail}): start it or point FANFARE_REDIS_URL at yours"
        )
    broker = probe_broker(settings, 5.0)
    if not broker.ok:
        problems.append(
            f"no Kafka broker answers at {settings.kafka_brokers} (FANFARE_KAFKA_BROKERS; "
            f"{broker.detail}): start it (`fanfare dev up`) or point FANFARE_KAFKA_BROKERS at yours"
        )
        return problems
    from operators.adapters.kafka.admin import list_topics

    missing = [t for t in topics if t not in list_topics(settings)]
    if missing:
        problems.append(
            f"topics missing on {settings.kafka_brokers}: {', '.join(missing)}: run "
            "`fanfare topics create`"
        )
    return problems


class _Lazy:
    """The follower store, opened on first use (most API requests never need it)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._store: FollowerStore | None = None

    def __call__(self) -> FollowerStore:
        with self._lock:
            if self._store is None:
                s = self._settings
                self._store = open_follower_store(
                    s.resolved_store_url, s.shard_count, **cassandra_credentials(s)
                )
            return self._store


def build_service(
    settings: Settings, catalog: Catalog, redis: PerThreadRedis, publisher: CountingPublisher
) -> NotifyService:
    """The notification service over the real adapters."""
    prefix = settings.redis_prefix
    return NotifyService(
        catalog,
        keys=RedisKeyStore(redis, prefix),
        idempotency=RedisIdempotencyStore(redis, prefix, settings.api_idempotency_ttl_s),
        limiter=RedisRequestLimiter(redis, prefix),
        publisher=publisher,
        accepted=RedisAcceptedLog(redis, prefix, settings.store_ttl_s),
        campaigns=RedisCampaignStore(redis, prefix, settings.api_campaign_ttl_s),
        audiences=RedisAudienceStore(redis, prefix, settings.api_campaign_ttl_s),
        segments=RedisSegmentIndex(redis, prefix),
        followers=_Lazy(settings),
        max_campaign_rate=float(settings.api_campaign_max_rate),
        clock=time.time,
    )


def channel_api(settings: Settings, catalog: Catalog) -> ChannelApi:
    """The channels' endpoints' settings: link key, live hub, SMS token, VAPID public key."""
    from operators.adapters.channels.factory import read_link_secret
    from operators.adapters.channels.webpush import vapid_public_key
    from operators.adapters.http.channels import ChannelApi
    from operators.adapters.redis.live import LiveHub
    from operators.adapters.redis.sms_numbers import RedisSmsNumbers

    sms_token = None
    if settings.sms_account_sid:
        sms_token = read_secret_file(
            "FANFARE_SMS_AUTH_TOKEN_FILE", settings.sms_auth_token_file
        ).strip()
    vapid = None
    if settings.webpush_vapid_key_file:
        vapid = vapid_public_key(Path(settings.webpush_vapid_key_file))
    return ChannelApi(
        catalog=catalog,
        link_secret=read_link_secret(settings),
        unsubscribe_ttl_s=settings.unsubscribe_ttl_s,
        stream_token_ttl_s=settings.stream_token_ttl_s,
        dev_mode=settings.dev_mode,
        public_url=settings.resolved_public_url,
        hub=LiveHub(
            settings.redis_url,
            settings.redis_prefix,
            settings.sse_max_clients,
            settings.sse_heartbeat_s,
        ),
        sms_auth_token=sms_token,
        vapid_public_key=vapid,
        sms_numbers=RedisSmsNumbers(api_redis(settings.redis_url), settings.redis_prefix),
    )


# --- fanfare api --------------------------------------------------------------------------------


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the API until SIGTERM or SIGINT."""
    import uvicorn

    from operators.adapters.http.app import ApiDeps, CountingPublisher, create_app
    from operators.adapters.http.middleware import ApiMetrics

    host = args.host or settings.api_host
    port = args.port or settings.api_port
    catalog = _catalog(settings, "api")
    if catalog is None:
        return EXIT_CONFIGURATION
    problems = _problems(settings, API_TOPICS)
    if not port_free(port, host):
        problems.append(
            f"port {port} (FANFARE_API_PORT) is taken on {host}: stop what holds it or choose "
            "another port"
        )
    if problems:
        for line in problems:
            print(f"fanfare api: cannot start: {line}", file=sys.stderr)
        return EXIT_CANNOT_START
    try:
        channels = channel_api(settings, catalog)
    except (ConfigError, ProviderConfigError) as exc:
        print(f"fanfare api: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    redis = api_redis(settings.redis_url)
    kafka = KafkaPublisher(settings.kafka_config())
    metrics = ApiMetrics()
    channels.registry = metrics.registry
    publisher = CountingPublisher(kafka, metrics)
    service = build_service(settings, catalog, redis, publisher)

    def redis_check() -> tuple[bool, str]:
        redis().ping()
        return True, f"PING answered at {redact_url(settings.redis_url)}"

    app = create_app(
        ApiDeps(
            service=service,
            publisher=publisher,
            metrics=metrics,
            notifications=lambda: open_notification_store(
                settings.resolved_notification_store_url,
                settings.store_ttl_s,
                **cassandra_credentials(settings),
            ),
            checks={"redis": redis_check, "kafka": lambda: kafka.check(API_TOPICS)},
            max_body_bytes=settings.api_max_body_bytes,
            upload_max_bytes=settings.api_upload_max_bytes,
            channels=channels,
        )
    )
    log.info(
        "fanfare api: serving on http://%s:%d (docs at /docs); %s from %s",
        host if ":" not in host else f"[{host}]",
        port,
        catalog_summary(catalog),
        catalog.source,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
            server_header=False,
            backlog=4096,  # live streams: thousands of clients may (re)connect at once
        )
    )
    # What was made at start-up (modules, the catalog, the app) lives as long as the process:
    # out of the collector's way, so its full collections walk only what requests made.
    gc.freeze()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again under the
    # handlers it found: let those note it, so the producer is flushed and the exit code is 0.
    stopped_by: list[int] = []
    previous = [
        (sig, signal.signal(sig, lambda signum, _frame: stopped_by.append(signum)))
        for sig in (signal.SIGTERM, signal.SIGINT)
    ]
    try:
        server.run()
    finally:
        kafka.close()
        for sig, handler in previous:
            signal.signal(sig, handler)
    log.info("fanfare api: stopped")
    return 0


# --- fanfare api keys ---------------------------------------------------------------------------


def _key_view(key: ApiKey) -> dict[str, Any]:
    def when(t: float | None) -> str | None:
        return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    return {
        "key_id": key.key_id,
        "name": key.name,
        "endpoints": sorted(key.endpoints),
        "categories": sorted(key.categories),
        "rate_per_s": key.rate_per_s,
        "burst": key.burst,
        "created_at": when(key.created_at),
        "revoked_at": when(key.revoked_at),
    }


def _keys(settings: Settings) -> RedisKeyStore:
    return RedisKeyStore(api_redis(settings.redis_url), settings.redis_prefix)


def keys_create_command(args: argparse.Namespace, settings: Settings) -> int:
    """Create a key and print it once."""
    catalog = _catalog(settings, "api keys create")
    if catalog is None:
        return EXIT_CONFIGURATION
    try:
        endpoints = parse_scope_list(args.endpoints, ENDPOINT_SCOPES, "endpoint scopes")
        categories = parse_scope_list(args.categories, catalog.categories, "categories")
    except ValueError as exc:
        print(f"fanfare api keys create: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    created = new_key(args.name, endpoints, categories, args.rate, args.burst, time.time())
    try:
        _keys(settings).add(created.record)
    except REDIS_DOWN_ERRORS as exc:
        print(f"fanfare api keys create: Redis unavailable: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    view = _key_view(created.record)
    if args.json:
        print(json.dumps({"key": created.text, **view}))
        return 0
    print(created.text)
    print(
        f"  id {view['key_id']}, name {view['name']}: endpoints {','.join(view['endpoints'])}; "
        f"categories {','.join(view['categories'])}; {view['rate_per_s']:g} requests/s, "
        f"burst {view['burst']}"
    )
    print("  (shown once: fanfare stores only its hash; `fanfare api keys revoke ID` revokes it)")
    return 0


def keys_list_command(args: argparse.Namespace, settings: Settings) -> int:
    """Every key's record."""
    try:
        keys = _keys(settings).all()
    except REDIS_DOWN_ERRORS as exc:
        print(f"fanfare api keys list: Redis unavailable: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    views = [_key_view(k) for k in keys]
    if args.json:
        print(json.dumps(views))
        return 0
    if not views:
        print("no API keys: `fanfare api keys create --name NAME --categories ...` makes one")
        return 0
    print(f"  {'id':<13} {'name':<20} {'endpoints':<24} {'categories':<28} {'rate':>8}  state")
    for v in views:
        state = f"revoked {v['revoked_at']}" if v["revoked_at"] else "active"
        print(
            f"  {v['key_id']:<13} {v['name'][:20]:<20} {','.join(v['endpoints'])[:24]:<24} "
            f"{','.join(v['categories'])[:28]:<28} {v['rate_per_s']:>6g}/s  {state}"
        )
    return 0


def keys_revoke_command(args: argparse.Namespace, settings: Settings) -> int:
    """Revoke a key."""
    try:
        key = _keys(settings).revoke(args.key_id, time.time())
    except REDIS_DOWN_ERRORS as exc:
        print(f"fanfare api keys revoke: Redis unavailable: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    if key is None:
        print(f"fanfare api keys revoke: no key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {key.key_id} ({key.name})")
    return 0


# --- fanfare api scheduler ----------------------------------------------------------------------


def build_scheduler(settings: Settings, owner: str) -> tuple[CampaignScheduler, KafkaPublisher]:
    """The scheduler over the real adapters (and its publisher, to close)."""
    redis = api_redis(settings.redis_url)
    prefix = settings.redis_prefix
    audiences = RedisAudienceStore(redis, prefix, settings.api_campaign_ttl_s)
    followers = _Lazy(settings)
    kafka = KafkaPublisher(settings.kafka_config())

    def source_for(target: Target) -> RecipientSource:
        if target.kind == "followers":
            return FollowerRecipients(followers(), target.ref)
        return AudienceRecipients(redis, audiences.key(target.ref))

    scheduler = CampaignScheduler(
        RedisCampaignStore(redis, prefix, settings.api_campaign_ttl_s),
        kafka,
        source_for,
        owner=owner,
        lease_s=settings.api_campaign_lease_s,
        clock=time.time,
    )
    return scheduler, kafka


def run_scheduler(
    scheduler: CampaignScheduler,
    stop: threading.Event,
    tick_s: float = TICK_S,
    heartbeat: Path | None = None,
) -> None:
    """Step until `stop`; an outage of Redis or the broker is logged and waited out."""
    while not stop.is_set():
        emitted = 0
        try:
            emitted = scheduler.tick()
        except (redis.ConnectionError, redis.TimeoutError, PublishFailed) as exc:
            log.warning("fanfare api scheduler: %s; retrying in 1 s", exc)
            stop.wait(1.0)
        else:
            if heartbeat is not None:
                heartbeat.touch()
        if emitted < MAX_CHUNK:  # a full chunk: a campaign is behind its rate, go on at once
            stop.wait(tick_s)


def build_segment_indexer(settings: Settings) -> tuple[SegmentIndexer, ChangelogTail]:
    """The segment index's reader of the changelogs, from the index's saved positions."""
    index = RedisSegmentIndex(api_redis(settings.redis_url), settings.redis_prefix)
    tail = ChangelogTail(settings.kafka_config(), SEGMENT_TOPICS, index.positions())
    return SegmentIndexer(tail, index), tail


def run_segment_indexer(indexer: SegmentIndexer, stop: threading.Event) -> None:
    """Keep the segment index until `stop`; an outage of Redis is logged and waited out."""
    while not stop.is_set():
        try:
            indexer.step(timeout_s=0.5)
        except REDIS_DOWN_ERRORS as exc:
            log.warning("fanfare api scheduler: segment index: %s; retrying in 1 s", exc)
            stop.wait(1.0)
        except Exception:
            # A thread that died quietly would leave the index stale with nothing said.
            log.exception("fanfare api scheduler: segment index step failed; retrying in 1 s")
            stop.wait(1.0)


def scheduler_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the campaign scheduler until SIGTERM or SIGINT (its leases are given up)."""
    problems = _problems(settings, (MARKETING_TOPIC, *SEGMENT_TOPICS))
    if problems:
        for line in problems:
            print(f"fanfare api scheduler: cannot start: {line}", file=sys.stderr)
        return EXIT_CANNOT_START
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    scheduler, kafka = build_scheduler(settings, owner)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = [(sig, signal.signal(sig, on_signal)) for sig in (signal.SIGTERM, signal.SIGINT)]
    log.info(
        "fanfare api scheduler: started as %s (lease %d s, FANFARE_API_CAMPAIGN_LEASE_S)",
        owner,
        settings.api_campaign_lease_s,
    )
    indexer, tail = build_segment_indexer(settings)
    # The index is kept beside the campaigns: a segment campaign reads it when it is created.
    keeper = threading.Thread(
        target=run_segment_indexer, args=(indexer, stop), name="segment-index", daemon=True
    )
    keeper.start()
    try:
        heartbeat = Path(args.heartbeat_file) if args.heartbeat_file else None
        run_scheduler(scheduler, stop, heartbeat=heartbeat)
    finally:
        stop.set()
        keeper.join(5)
        tail.close()
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            scheduler.release_all()
        kafka.close()
        for sig, handler in previous:
            signal.signal(sig, handler)
    log.info("fanfare api scheduler: stopped")
    return 0
