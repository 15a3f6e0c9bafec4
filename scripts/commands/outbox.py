"""`fanfare outbox migrate|relay|status`: the transactional outbox in the post service's PostgreSQL.

`migrate` creates the outbox table (FANFARE_OUTBOX_TABLE), its (key, id) index and the trigger
that NOTIFYs relays when rows are committed; safe to run twice (it also refreshes the list of
topics the table accepts). `relay` publishes the rows to their topics until SIGTERM or SIGINT;
run several for more throughput or availability (see operators/outbox/model.py for how they
keep each key in order). `status` prints what waits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any

import psycopg

from flows.runtime.flow_process import MetricsServer
from operators.adapters.kafka.outbox_publisher import KafkaRowPublisher
from operators.adapters.postgres.outbox import OutboxTable, PostgresOutbox, connect, migrate
from operators.adapters.postgres.outbox import table_exists as outbox_table_exists
from operators.config import ConfigError, Settings, outbox_password, redact_url
from operators.outbox.model import TableName
from operators.outbox.ports import OutboxUnavailable
from operators.outbox.relay import OutboxRelay, RelaySettings
from schemas.topics import ALL_TOPICS
from scripts.commands.arguments import positive_int, whole_number

log = logging.getLogger("fanfare.outbox")


def add_parser(sub: Any) -> None:
    """Register `fanfare outbox`."""
    outbox = sub.add_parser(
        "outbox", help="the transactional outbox in PostgreSQL (FANFARE_OUTBOX_URL)"
    )
    actions = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    actions.add_parser(
        "migrate",
        help="create the outbox table, its index and its NOTIFY trigger (safe to run twice)",
    )
    relay = actions.add_parser(
        "relay", help="publish the outbox's rows to their topics until stopped (SIGTERM)"
    )
    relay.add_argument(
        "--batch-size",
        type=whole_number(1, 10_000),
        default=None,
        help="rows per transaction (default: FANFARE_OUTBOX_BATCH_SIZE)",
    )
    relay.add_argument(
        "--poll-ms",
        type=whole_number(10, 600_000),
        default=None,
        help="longest wait for a notification before looking anyway (default: "
        "FANFARE_OUTBOX_POLL_MS)",
    )
    relay.add_argument(
        "--metrics-port",
        type=whole_number(0, 65_535),
        default=None,
        help="/metrics port, 0 for none (default: FANFARE_OUTBOX_METRICS_PORT)",
    )
    status = actions.add_parser("status", help="rows pending and the oldest one's age")
    status.add_argument(
        "--limit", type=positive_int, default=5, help="oldest rows to show (default 5)"
    )
    outbox.set_defaults(func=command)


@dataclass
class Relay:
    """A relay and the adapters it runs on (built by `build_relay`; tests and benchmarks too)."""

    relay: OutboxRelay
    outbox: PostgresOutbox
    publisher: KafkaRowPublisher

    def close(self) -> None:
        """Close the producer and the sessions."""
        self.publisher.close()
        self.outbox.close()


def outbox_table(settings: Settings) -> OutboxTable:
    """The configured table (validated when settings load)."""
    return OutboxTable.of(TableName.parse(settings.outbox_table))


def build_relay(
    settings: Settings,
    stop: threading.Event,
    batch_size: int | None = None,
    poll_ms: int | None = None,
) -> Relay:
    """The relay on PostgreSQL and Kafka, from settings."""
    outbox = PostgresOutbox(
        settings.outbox_url, outbox_table(settings), password=outbox_password(settings)
    )
    publisher = KafkaRowPublisher(settings.kafka_config(), stop=stop)
    relay = OutboxRelay(
        outbox,
        publisher,
        RelaySettings(
            batch_size=batch_size or settings.outbox_batch_size,
            poll_s=(poll_ms or settings.outbox_poll_ms) / 1000,
            table=settings.outbox_table,
        ),
    )
    return Relay(relay, outbox, publisher)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """Exit codes: 0 done (or stopped), 1 the database failed, 2 usage or configuration."""
    if not settings.outbox_url:
        print(
            f"fanfare outbox {args.outbox_command}: FANFARE_OUTBOX_URL is not set: point it at "
            "the post service's PostgreSQL, e.g. postgresql://fanfare@127.0.0.1:5432/posts "
            "(a password goes in the file named by FANFARE_OUTBOX_PASSWORD_FILE)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.outbox_command == "migrate":
            return _migrate(settings)
        if args.outbox_command == "status":
            return _status(settings, args.limit)
        return _relay(settings, args)
    except ConfigError as exc:
        print(f"fanfare outbox {args.outbox_command}: {exc}", file=sys.stderr)
        return 2


def _where(settings: Settings) -> str:
    return f"{settings.outbox_table} at {redact_url(settings.outbox_url)}"


def _session(settings: Settings) -> psycopg.Connection[tuple[object, ...]] | None:
    try:
        return connect(
            settings.outbox_url, outbox_password(settings), autocommit=False, purpose="outbox"
        )
    except psycopg.Error as exc:
        print(
            f"fanfare outbox: cannot connect to {redact_url(settings.outbox_url)}: "
            f"{str(exc).strip()}",
            file=sys.stderr,
        )
        return None


def _migrate(settings: Settings) -> int:
    conn = _session(settings)
    if conn is None:
        return 1
    try:
        created = migrate(conn, outbox_table(settings), ALL_TOPICS)
    except psycopg.Error as exc:
        print(f"fanfare outbox migrate: {_where(settings)}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    done = "created" if created else "up to date"
    print(
        f"outbox {_where(settings)}: {done} (index on (key, id), NOTIFY trigger on channel "
        f"{outbox_table(settings).channel!r}, {len(ALL_TOPICS)} topics accepted)"
    )
    return 0


def _status(settings: Settings, limit: int) -> int:
    conn = _session(settings)
    if conn is None:
        return 1
    table = outbox_table(settings)
    try:
        if not outbox_table_exists(conn, table):
            print(
                f"fanfare outbox status: no table {_where(settings)}: run `fanfare outbox migrate`",
                file=sys.stderr,
            )
            return 2
        outbox = PostgresOutbox(settings.outbox_url, table, password=outbox_password(settings))
        try:
            backlog = outbox.backlog()
            oldest = outbox.oldest(limit)
        finally:
            outbox.close()
        print(
            f"outbox {_where(settings)}: {backlog.pending:,} row(s) pending, the oldest "
            f"{backlog.oldest_age_s:.1f} s old"
        )
        for row_id, topic, key, created_at in oldest:
            print(f"  {row_id:>10}  {topic:<22} {key[:40]:<40} {created_at}")
        return 0
    except (psycopg.Error, OutboxUnavailable) as exc:
        print(f"fanfare outbox status: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def _relay(settings: Settings, args: argparse.Namespace) -> int:
    conn = _session(settings)
    if conn is None:
        return 1
    try:
        if not outbox_table_exists(conn, outbox_table(settings)):
            print(
                f"fanfare outbox relay: no table {_where(settings)}: run `fanfare outbox migrate`",
                file=sys.stderr,
            )
            return 2
    finally:
        conn.close()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("outbox relay: %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port = settings.outbox_metrics_port if args.metrics_port is None else args.metrics_port
    server: MetricsServer | None = None
    if port:
        try:
            server = MetricsServer(settings.metrics_host, port)
        except OSError as exc:
            print(
                f"fanfare outbox relay: cannot serve /metrics on {settings.metrics_host}:{port} "
                f"({exc.strerror or exc}): set FANFARE_OUTBOX_METRICS_PORT (0: none)",
                file=sys.stderr,
            )
            return 2
        server.start()
    built = build_relay(settings, stop, args.batch_size, args.poll_ms)
    log.info(
        "outbox relay: publishing %s to %s; /metrics %s",
        _where(settings),
        settings.kafka_brokers,
        f"on {settings.metrics_host}:{server.port}" if server else "off",
    )
    try:
        try:
            built.outbox.listen()
        except OutboxUnavailable as exc:
            log.warning("outbox relay: %s; polling until it answers", exc)
        built.relay.run(stop)
    finally:
        built.close()
        if server is not None:
            server.close()
    log.info("outbox relay: stopped after %d row(s)", built.relay.published)
    return 0
