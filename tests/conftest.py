"""Shared fixtures: an embedded Kafka-protocol broker per test (Tansu, memory only) and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from flows.runtime.ports import free_port, free_port_run
from operators.adapters.kafka.admin import create_topics
from operators.adapters.kafka.client_log import client_config
from operators.adapters.kafka.probes import message_count, read_partition_to_end, topic_partitions
from operators.config import Settings, load_settings
from schemas.topics import CHANNEL_TOPICS
from scripts.dev import devstack
from scripts.harness.spawn import signal_fanfare, start_fanfare

REDIS_URL = os.environ.get("FANFARE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
METRICS_PORTS = 4
"""Consecutive free ports a flow's /metrics gets: one per process of a local cluster (a taken
one stops `fanfare run` at start)."""
POSTGRES_URL = os.environ.get(
    "FANFARE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


class Watcher:
    def __init__(self, kafka: dict[str, object], topics: tuple[str, ...]) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.consumer = Consumer(
            client_config(kafka, **{"group.id": "test-watcher", "enable.auto.commit": False})
        )
        parts = [p.rsplit("/", 1) for p in topic_partitions(kafka, list(topics))]
        self.consumer.assign([TopicPartition(t, int(p), 0) for t, p in parts])
        self.items = 0

    def close(self) -> None:
        self.consumer.close()

    def poll(self) -> int:
        for m in self.consumer.consume(1000, 0.005):
            if m.error() is None:
                self.items += len(orjson.loads(m.value())["items"])
        return self.items


@dataclass
class Stack:
    """A broker with fanfare's topics, a Redis key prefix and a FANFARE_HOME, for one test."""

    env: dict[str, str]
    settings: Settings
    flows: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_flow(
        self, *extra_env: tuple[str, str], flow: str = "fanout", args: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """`fanfare run FLOW ARGS` (`args`: e.g. --processes 2) with the stack's settings."""
        return self.start_command(["run", flow, *args], *extra_env)

    def start_relay(self, *extra_env: tuple[str, str]) -> subprocess.Popen[bytes]:
        """`fanfare outbox relay` (the outbox_db fixture sets its database)."""
        port = ("FANFARE_OUTBOX_METRICS_PORT", str(free_port()))
        return self.start_command(["outbox", "relay"], port, *extra_env)

    def start_command(
        self, argv: list[str], *extra_env: tuple[str, str], module: str = "scripts.cli"
    ) -> subprocess.Popen[bytes]:
        """`fanfare ARGV` (or `python -m MODULE ARGV`), stopped with the stack."""
        # Each its own /ready port (a taken one stops `fanfare run` at start).
        env = {**os.environ, **self.env, "FANFARE_READY_PORT": str(free_port())}
        if self.flows:  # a second flow in the same test needs its own /metrics port
            env["FANFARE_METRICS_PORT"] = str(free_port_run(METRICS_PORTS))
        env.update(extra_env)
        log_path = Path(self.env["FANFARE_HOME"]) / f"flow-{len(self.flows)}.log"
        proc = start_fanfare(argv, env, log_path, module=module)
        self.flows.append(proc)
        return proc

    def kill_flow(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        signal_fanfare(proc, sig)
        proc.wait(timeout=30)

    def flow_log(self) -> str:
        home = Path(self.env["FANFARE_HOME"])
        return "\n".join(
            p.read_text(errors="replace")[-4000:] for p in sorted(home.glob("flow-*.log"))
        )

    def read_topic(self, topic: str) -> list[tuple[int, int, bytes | None]]:
        kafka = self.settings.kafka_config()
        out = []
        for part in topic_partitions(kafka, [topic]):
            p = int(part.rsplit("/", 1)[1])
            out += [(p, off, v) for off, v in read_partition_to_end(kafka, topic, p, 0)]
        return out

    def watch(self, topics: tuple[str, ...]) -> Watcher:
        """A consumer that counts dispatch items as they arrive (for timing a kill)."""
        return Watcher(self.settings.kafka_config(), topics)

    def count_messages(self, topics: tuple[str, ...]) -> int:
        """Messages on the topics (the true ends, read through partition EOF)."""
        return message_count(self.settings.kafka_config(), topics)

    def dispatch_items(self) -> list[tuple[str, str, str, str, str]]:
        """(topic, post_id, user_id, device_id, notification_id) of every item on push.*."""
        items = []
        for topic in CHANNEL_TOPICS:
            for _, _, value in self.read_topic(topic):
                batch = orjson.loads(value or b"{}")
                assert 1 <= len(batch["items"]) <= 500
                items += [
                    (topic, batch["post_id"], i["user_id"], i["device_id"], i["notification_id"])
                    for i in batch["items"]
                ]
        return items

    def dead_letters(self) -> list[dict[str, Any]]:
        return [orjson.loads(v or b"{}") for _, _, v in self.read_topic("dead_letters")]


@dataclass
class Providers:
    """The local APNs and FCM servers in their own process, and their control API."""

    proc: subprocess.Popen[bytes]
    control: Any  # scripts.dev.local_providers.control.ProviderControl
    info: dict[str, Any]


def start_providers(directory: Path, settings_file: Path) -> Providers:
    """The local servers, their settings written into fanfare's settings file (as `dev up`)."""
    from scripts.dev.local_providers.control import ProviderControl

    directory.mkdir(parents=True, exist_ok=True)
    info_file = directory / "providers.json"
    info_file.unlink(missing_ok=True)
    log = (directory / "providers.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scripts.dev.local_providers",
            "--dir",
            str(directory),
            "--settings-file",
            str(settings_file),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not info_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((directory / "providers.log").read_text())
        time.sleep(0.1)
    info = orjson.loads(info_file.read_bytes())
    return Providers(proc, ProviderControl(info["control_url"]), info)


@pytest.fixture
def providers(stack: Stack) -> Iterator[Providers]:
    """Local provider servers, named in the stack's settings file as `fanfare dev up` does."""
    p = start_providers(devstack.providers_dir(stack.settings), stack.settings.settings_path)
    try:
        yield p
    finally:
        p.proc.terminate()
        try:
            p.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.proc.kill()


def wait_for(
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    stack: Stack | None = None,
    every_s: float = 0.5,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every_s)
    log = stack.flow_log() if stack else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{log}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    port = free_port()
    prefix = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    env = {
        "FANFARE_HOME": str(tmp_path / "home"),
        "FANFARE_KAFKA_BROKERS": f"127.0.0.1:{port}",
        "FANFARE_REDIS_URL": REDIS_URL,
        "FANFARE_REDIS_PREFIX": prefix,
        "FANFARE_TOPIC_PARTITIONS": "2",
        "FANFARE_SHARDS": "4",
        "FANFARE_SNAPSHOT_INTERVAL_S": "1",
        "FANFARE_METRICS_PORT": str(free_port_run(METRICS_PORTS)),
        "FANFARE_METRICS_HOST": "127.0.0.1",  # scraped there, whatever the shell says
        "FANFARE_METRICS_SERVER": "fanfare",
        "FANFARE_CELEBRITY_THRESHOLD": "1000",
    }
    settings = load_settings(env)
    devstack.start_broker(settings)
    s = Stack(env, settings)
    try:
        create_topics(settings)
        yield s
    finally:
        for proc in s.flows:
            if proc.poll() is None:
                s.kill_flow(proc, signal.SIGTERM)
        devstack.stop_broker(settings)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


@dataclass
class OutboxDb:
    """The stack's outbox: a schema of its own in the test PostgreSQL (dropped at the end)."""

    url: str
    schema: str

    @property
    def table(self) -> str:
        return f"{self.schema}.fanfare_outbox"

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.url)

    def pending(self) -> int:
        with self.connect() as conn:
            return int(conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0])

    def insert(self, rows: list[tuple[str, str, bytes | str]], *, commit: bool = True) -> list[int]:
        """(topic, key, payload) rows in one transaction, as the post service writes them."""
        with self.connect() as conn:
            ids = [
                conn.execute(
                    f"INSERT INTO {self.table} (topic, key, payload) VALUES (%s, %s, %s) "
                    "RETURNING id",
                    [topic, key, payload.decode() if isinstance(payload, bytes) else payload],
                ).fetchone()[0]
                for topic, key, payload in rows
            ]
            if commit:
                conn.commit()
            else:
                conn.rollback()
        return ids


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """A schema of its own in the test PostgreSQL, dropped at the end (its name)."""
    import psycopg

    schema = f"fanfare_test_{uuid.uuid4().hex[:10]}"
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"no PostgreSQL at {POSTGRES_URL} ({exc}); start one (.ci/run does) or set "
            "FANFARE_TEST_POSTGRES_URL"
        )
    try:
        yield schema
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def outbox_db(stack: Stack, postgres_schema: str) -> Iterator[OutboxDb]:
    """An outbox schema for the stack (FANFARE_OUTBOX_* set in its environment), not migrated."""
    db = OutboxDb(POSTGRES_URL, postgres_schema)
    stack.env.update(
        {
            "FANFARE_OUTBOX_URL": POSTGRES_URL,
            "FANFARE_OUTBOX_TABLE": db.table,
            "FANFARE_OUTBOX_POLL_MS": "500",
        }
    )
    stack.settings = load_settings(stack.env)
    yield db
    for proc in stack.flows:  # relays first: their sessions hold the schema
        if proc.poll() is None:
            stack.kill_flow(proc, signal.SIGTERM)
