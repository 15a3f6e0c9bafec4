"""Drive fanfare on the embedded stack for fault scenarios.

`scripts/harness/chaos.py` and the reliability tests (`tests/reliability/`) share this, so CI checks
what the runner measures.

A `ChaosStack` is one Kafka-protocol broker (Tansu, memory only) with fanfare's topics, a
`FANFARE_HOME`, a Redis key prefix and the local APNs and FCM servers. `create` starts and owns
all of it (the runner); `adopt` wraps what the test fixtures started and owns only the flows.
Flows run as users run them, `python -m scripts.cli run FLOW`, each in its own session with its
own /metrics and /ready ports, so a kill -9 of one member or of the whole group is possible.

What the scenarios measure comes from outside fanfare: the provider servers' records of what
they accepted (`ProviderControl.accepted`), the topics, and the flows' /metrics and /ready.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from flows.runtime.metrics_scrape import Sample, fetch_text, parse
from flows.runtime.ports import free_port, free_port_run
from flows.runtime.readiness import fetch_ready
from operators.adapters.kafka.admin import create_topics
from operators.adapters.kafka.probes import read_partition_to_end, topic_partitions
from operators.adapters.kafka.writer import produce_all
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.config import Settings, load_settings
from operators.delivery.model import HELD_PREFIX, TERMINAL_STATES
from schemas.codecs import format_timestamp
from schemas.topics import CHANNEL_TOPICS, DELIVERY_EVENTS
from scripts.dev import devstack
from scripts.dev.local_providers.control import AcceptedRecord, ProviderControl
from scripts.harness.spawn import start_fanfare

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The caller's own fanfare and Bytewax settings never reach a chaos flow (a real
# FANFARE_APNS_KEY_FILE would send to Apple): each stack sets what its flows see.
_CALLER_PREFIXES = ("FANFARE_", "BYTEWAX_")
# The same base as the test session's `stack` fixture (tests/conftest.py), so the runner's
# small scale and CI run the same configuration.
BASE_ENV = {
    "FANFARE_TOPIC_PARTITIONS": "2",
    "FANFARE_SHARDS": "4",
    "FANFARE_SNAPSHOT_INTERVAL_S": "1",
    "FANFARE_CELEBRITY_THRESHOLD": "1000",
}
STOP_GRACE_S = 40.0  # the supervisor SIGKILLs its members 10 s after SIGTERM

Key = tuple[str, str, str]  # (provider, notification_id, device_id): one push to one device
NEVER_SENT = frozenset({"circuit_open", "rate_limited"})
"""The engine's holds: retries of sends that never left (docs/operations.md)."""


def answer_lost(status: object, reason: object) -> bool:
    """A retry's cause says its send may have reached the provider, with no answer back.

    A timeout, a broken connection, a client error (firebase-admin names some of them with
    Google's codes, DEADLINE_EXCEEDED, UNAVAILABLE): no status. The engine's holds and a
    sender's own pacing (`held: ...`) never left; an answer with a status is no loss.
    """
    text = str(reason)
    return status is None and text not in NEVER_SENT and not text.startswith(HELD_PREFIX)


class ChaosError(RuntimeError):
    """A scenario could not be run as designed (not a finding about fanfare)."""


def void(_result: object) -> None:
    """Drop a result (lets a lambda that returns something serve as a closer)."""


def say(message: str) -> None:
    """A progress line on stderr (the runner's; pytest captures it)."""
    print(f"{time.strftime('%H:%M:%S')} chaos: {message}", file=sys.stderr, flush=True)


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    *,
    every_s: float = 0.25,
    progress: Callable[[], str] | None = None,
    progress_every_s: float = 15.0,
) -> bool:
    """Poll `check` until it is true (True) or `timeout_s` passed (False)."""
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + progress_every_s
    while True:
        if check():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        if progress is not None and now >= next_note:
            say(progress())
            next_note = now + progress_every_s
        time.sleep(min(every_s, max(0.0, deadline - now)))


def apns_token(name: str) -> str:
    """A valid APNs device token (64 hex digits), stable for a name."""
    return hashlib.sha256(name.encode()).hexdigest()


def fcm_token(name: str) -> str:
    """An FCM registration token of the usual shape, stable for a name."""
    body = (hashlib.sha256(name.encode()).hexdigest() * 3)[:140]
    return f"{body[:22]}:APA91b{body[22:]}"


def token_for(provider: str, name: str) -> str:
    """A token of the provider's shape."""
    return apns_token(name) if provider == "apns" else fcm_token(name)


def iso(ts: float) -> str:
    """RFC 3339 in UTC with milliseconds."""
    return format_timestamp(ts, "milliseconds")


# --- flows ----------------------------------------------------------------------------------------


class FlowRun:
    """One `fanfare run FLOW` (the supervisor) in its own session, with its ports and log."""

    def __init__(
        self,
        flow: str,
        argv: Sequence[str],
        env: dict[str, str],
        log_path: Path,
        processes: int,
    ) -> None:
        self.flow = flow
        self.processes = processes
        self.ready_port = free_port()
        self.metrics_port = free_port_run(processes)
        self.env = {
            **env,
            "FANFARE_READY_PORT": str(self.ready_port),
            "FANFARE_METRICS_PORT": str(self.metrics_port),
            # Scraped on the loopback (metrics_urls), whatever the caller's shell says.
            "FANFARE_METRICS_HOST": "127.0.0.1",
            "FANFARE_METRICS_SERVER": "fanfare",
        }
        self.log_path = log_path
        self.proc = start_fanfare(["run", flow, *argv], self.env, log_path)
        self.started_at = time.time()

    def _get(self, path: str) -> tuple[int | None, dict[str, Any]]:
        status, body = fetch_ready(f"http://127.0.0.1:{self.ready_port}{path}", timeout_s=5.0)
        return status, body if isinstance(body, dict) else {}

    def live(self) -> dict[str, Any]:
        """The supervisor's /live body ({} when it does not answer)."""
        status, body = self._get("/live")
        return body if status == 200 else {}

    def pids(self) -> list[int]:
        """Pids of the running `bytewax.run` members, in process-id order."""
        return [int(p) for p in self.live().get("pids", [])]

    def is_ready(self) -> bool:
        """True when /ready answers 200."""
        return self._get("/ready")[0] == 200

    def running(self) -> bool:
        """True while the supervisor runs."""
        return self.proc.poll() is None

    def metrics_urls(self) -> list[str]:
        """Every member's /metrics."""
        return [f"http://127.0.0.1:{self.metrics_port + i}/metrics" for i in range(self.processes)]

    def metrics(self) -> dict[Sample, float]:
        """Fanfare's samples, summed over the members that answer."""
        out: dict[Sample, float] = defaultdict(float)
        for url in self.metrics_urls():
            try:
                samples = parse(fetch_text(url, timeout_s=2.0))
            except (OSError, ValueError):
                continue
            for key, value in samples.items():
                out[key] += value
        return dict(out)

    def kill_member(self, index: int = 0) -> int:
        """Send SIGKILL to member `index` (the supervisor restarts the cluster); its pid."""
        pids = self.pids()
        if len(pids) <= index:
            raise ChaosError(f"{self.flow}: no member {index} to kill (pids {pids})")
        os.kill(pids[index], signal.SIGKILL)
        return pids[index]

    def wait_restarted(self, killed: int, timeout_s: float) -> bool:
        """True once the supervisor runs a full set of new members and /ready answers 200."""

        def up() -> bool:
            pids = self.pids()
            return len(pids) == self.processes and killed not in pids and self.is_ready()

        return wait_until(up, timeout_s, every_s=0.1)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the supervisor (it stops its members), SIGKILL the group if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill_group()
        # Members die with the supervisor (PR_SET_PDEATHSIG); anything left in the session goes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def kill_group(self) -> None:
        """Send SIGKILL to the supervisor and its members at once."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)

    def log_tail(self, lines: int = 25) -> str:
        """The end of the flow's log."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text[-lines:])


class RedisServer:
    """A redis-server of the scenario's own, without persistence: a restart comes back empty.

    Never the shared Redis: killing that would hit everyone using it.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        """Start it (empty: no RDB, no AOF) and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ChaosError("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        with (self.directory / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, *args, "no", "--dir", str(self.directory)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:

            def answers() -> bool:
                if self.proc is None or self.proc.poll() is not None:
                    raise ChaosError(f"redis-server exited: {self.log_tail()}")
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    return False

            if not wait_until(answers, timeout_s, every_s=0.02):
                raise ChaosError(f"redis-server did not answer within {timeout_s} s")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash: its data goes with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self) -> str:
        """The end of its log."""
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return "(no log)"


# --- the stack ------------------------------------------------------------------------------------


class ChaosStack:
    """A broker, topics, home, Redis prefix and provider servers, and the flows started on them."""

    def __init__(
        self, env: dict[str, str], control: ProviderControl, *, owned: bool, root: Path | None
    ) -> None:
        self.env = env
        self.settings: Settings = load_settings(env)
        self.control = control
        self.flows: list[FlowRun] = []
        self._owned = owned
        self._root = root
        self._closers: list[Callable[[], None]] = []

    @classmethod
    def create(
        cls,
        *,
        redis_url: str,
        env: Mapping[str, str] | None = None,
        name: str = "chaos",
        providers: bool = True,
    ) -> ChaosStack:
        """Start a broker on a free port, create the topics, start the provider servers."""
        root = Path(tempfile.mkdtemp(prefix=f"fanfare-{name}-"))
        full_env = {
            "FANFARE_HOME": str(root / "home"),
            "FANFARE_KAFKA_BROKERS": f"127.0.0.1:{free_port()}",
            "FANFARE_REDIS_URL": redis_url,
            "FANFARE_REDIS_PREFIX": f"fanfare-chaos-{uuid.uuid4().hex[:10]}:",
            "FANFARE_METRICS_PORT": str(free_port()),
            **BASE_ENV,
            **(env or {}),
        }
        settings = load_settings(full_env)
        started: list[Callable[[], None]] = []
        try:
            devstack.start_broker(settings)
            started.append(lambda: void(devstack.stop_broker(settings)))
            create_topics(settings)
            control_url = ""
            if providers:
                devstack.start_providers(settings)
                started.append(lambda: void(devstack.stop_providers(settings)))
                info = devstack.providers_info(settings)
                if info is None:
                    raise ChaosError("the local provider servers wrote no providers.json")
                control_url = info["control_url"]
        except BaseException:
            for stop in reversed(started):
                with contextlib.suppress(Exception):
                    stop()
            _delete_redis_keys(redis_url, full_env["FANFARE_REDIS_PREFIX"])
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cls(full_env, ProviderControl(control_url, timeout_s=120), owned=True, root=root)

    @classmethod
    def adopt(cls, env: Mapping[str, str], control_url: str) -> ChaosStack:
        """Wrap a broker, topics and provider servers someone else started (and will stop)."""
        return cls(dict(env), ProviderControl(control_url, timeout_s=120), owned=False, root=None)

    def sibling(self, name: str, *, providers: bool = False) -> ChaosStack:
        """A second owned stack configured like this one (its own broker, home and prefix).

        Closed with this one. For comparing two runs of one scenario: a flow writing into
        channel topics that already hold the same items would drop them (its first read-back
        starts at the high watermark, which trails on the embedded broker).
        """
        own = (
            "FANFARE_HOME",
            "FANFARE_KAFKA_BROKERS",
            "FANFARE_REDIS_PREFIX",
            "FANFARE_METRICS_PORT",
        )
        env = {k: v for k, v in self.env.items() if k not in own}
        other = ChaosStack.create(
            redis_url=self.settings.redis_url, env=env, name=name, providers=providers
        )
        self.on_close(other.close)
        return other

    def __enter__(self) -> ChaosStack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def home(self) -> Path:
        """FANFARE_HOME of the stack."""
        return Path(self.env["FANFARE_HOME"])

    @property
    def kafka(self) -> dict[str, object]:
        """The librdkafka settings of the broker."""
        return self.settings.kafka_config()

    def flow_env(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """A flow's environment: the caller's minus FANFARE_*/BYTEWAX_*, the stack's, overrides."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CALLER_PREFIXES)}
        env.update(self.env)
        env.update(overrides or {})
        env.setdefault("FANFARE_LOG_LEVEL", "WARNING")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_flow(
        self,
        flow: str,
        *argv: str,
        env: Mapping[str, str] | None = None,
        processes: int = 1,
    ) -> FlowRun:
        """`fanfare run FLOW [argv]` with `processes` processes (--processes is added)."""
        full_env = self.flow_env(env)
        log_path = Path(full_env["FANFARE_HOME"]) / "logs" / f"{flow}-{len(self.flows)}.log"
        run = FlowRun(
            flow,
            [*argv, "--processes", str(processes)],
            full_env,
            log_path,
            processes,
        )
        self.flows.append(run)
        return run

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run `closer` when the stack closes (consumers, threads)."""
        self._closers.append(closer)

    def close(self) -> None:
        """Stop every flow and helper; an owned stack also stops its servers and cleans up."""
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
        for run in self.flows:
            with contextlib.suppress(Exception):
                run.stop()
        if not self._owned:
            return
        with contextlib.suppress(Exception):
            devstack.stop_providers(self.settings)
        with contextlib.suppress(Exception):
            devstack.stop_broker(self.settings)
        _delete_redis_keys(self.settings.redis_url, self.settings.redis_prefix)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    # --- data in ----------------------------------------------------------------------------------

    def publish(self, topic: str, messages: Iterable[tuple[str, bytes]]) -> int:
        """Publish (key, value) messages and wait for every acknowledgement."""
        return produce_all(self.kafka, topic, ((k.encode(), v) for k, v in messages))

    def publish_dispatch(
        self,
        provider: str,
        post_id: str,
        items: Sequence[tuple[str, str, str]],
        *,
        lane: str = "normal",
        created_at: float | None = None,
    ) -> None:
        """Dispatch batches of up to 500 (user, device, token) items, as the fan-out writes them."""
        self.publish(
            f"push.{provider}" if lane == "normal" else f"push.{provider}.bulk",
            dispatch_messages(provider, post_id, items, created_at or time.time()),
        )

    def load_followers(self, edges: Iterable[tuple[str, str, int]]) -> int:
        """Bulk-load (author, follower, flags) edges into the stack's SQLite follower store."""
        url = self.settings.resolved_store_url
        if not url.startswith("sqlite:///"):
            raise ChaosError(f"the chaos stack needs a SQLite follower store, not {url}")
        store = SQLiteFollowerStore(url.removeprefix("sqlite:///"), self.settings.shard_count)
        try:
            return store.bulk_load(edges)
        finally:
            store.close()

    # --- data out ---------------------------------------------------------------------------------

    def read_topic(self, topic: str) -> list[tuple[int, int, bytes | None]]:
        """(partition, offset, value) of every message on a topic, to its true end."""
        out: list[tuple[int, int, bytes | None]] = []
        for part in topic_partitions(self.kafka, [topic]):
            p = int(part.rsplit("/", 1)[1])
            out += [(p, off, v) for off, v in read_partition_to_end(self.kafka, topic, p, 0)]
        return out

    def dispatch_items(self) -> list[DispatchedItem]:
        """Every item on the channel topics, where it is."""
        items: list[DispatchedItem] = []
        for topic in CHANNEL_TOPICS:
            for p, off, value in self.read_topic(topic):
                batch = orjson.loads(value or b"{}")
                items += [
                    DispatchedItem(topic, p, off, batch["post_id"], i["user_id"], i["device_id"])
                    for i in batch.get("items", [])
                ]
        return items

    def tail(self, topics: Sequence[str]) -> TopicTail:
        """A consumer of the topics from their beginning, closed with the stack."""
        tail = TopicTail(self.kafka, topics)
        self.on_close(tail.close)
        return tail

    def accepted(self) -> list[AcceptedRecord]:
        """What both provider servers accepted, in their order."""
        return [r for p in ("apns", "fcm") for r in self.control.accepted(p)]

    def accepted_count(self) -> int:
        """Messages both provider servers accepted (cheap: their counters)."""
        stats = self.control.stats()
        return sum(int(stats[p].get("accepted", 0)) for p in ("apns", "fcm"))


def _delete_redis_keys(url: str, prefix: str) -> int:
    try:
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
            return len(keys)
        finally:
            client.close()
    except redis.RedisError:
        return 0


def dispatch_messages(
    provider: str, post_id: str, items: Sequence[tuple[str, str, str]], created_at: float
) -> list[tuple[str, bytes]]:
    """(key, value) dispatch batches of at most 500 items for one post."""
    out = []
    for start in range(0, len(items), 500):
        body = {
            "schema": "dispatch_batch/v1",
            "post_id": post_id,
            "author_id": "chaos-author",
            "provider": provider,
            "created_at": iso(created_at),
            "items": [
                {"notification_id": f"{post_id}:{u}", "user_id": u, "device_id": d, "token": t}
                for u, d, t in items[start : start + 500]
            ],
        }
        out.append((post_id, orjson.dumps(body)))
    return out


@dataclass(frozen=True, slots=True)
class DispatchedItem:
    """One device push on a channel topic."""

    topic: str
    partition: int
    offset: int
    post_id: str
    user_id: str
    device_id: str


class TopicTail:
    """Reads topics from their beginning, a little more at each poll."""

    def __init__(self, kafka: Mapping[str, object], topics: Sequence[str]) -> None:
        conf = {**kafka, "group.id": f"chaos-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
        self._consumer = Consumer(conf)
        parts = [p.rsplit("/", 1) for p in topic_partitions(dict(kafka), list(topics))]
        self._consumer.assign([TopicPartition(t, int(p), 0) for t, p in parts])
        self._lock = threading.Lock()

    def poll(
        self, max_s: float = 5.0, wait_s: float = 0.2
    ) -> list[tuple[str, int, int, bytes | None]]:
        """Messages that arrived since the last poll, (topic, partition, offset, value).

        Reads until a read waits `wait_s` for nothing, or for `max_s` at most.
        """
        out: list[tuple[str, int, int, bytes | None]] = []
        deadline = time.monotonic() + max_s
        with self._lock:
            while time.monotonic() < deadline:
                batch = self._consumer.consume(10_000, wait_s)
                got = [m for m in batch if m.error() is None]
                out += [
                    (str(m.topic()), int(m.partition() or 0), int(m.offset() or 0), m.value())
                    for m in got
                ]
                if not batch:
                    break
        return out

    def close(self) -> None:
        """Close the consumer."""
        with self._lock:
            self._consumer.close()


class DispatchCounter:
    """Counts dispatch items as the fan-out writes them (to time a kill)."""

    def __init__(self, stack: ChaosStack) -> None:
        self._tail = stack.tail(CHANNEL_TOPICS)
        self.items = 0

    def poll(self) -> int:
        """Items seen so far (returns quickly: a kill is timed on it)."""
        for _, _, _, value in self._tail.poll(0.5, wait_s=0.005):
            self.items += len(orjson.loads(value or b"{}").get("items", []))
        return self.items


class Outcomes:
    """delivery_events folded as they arrive: terminal outcomes per push, retries scheduled."""

    def __init__(self, stack: ChaosStack) -> None:
        self._tail = stack.tail((DELIVERY_EVENTS,))
        self.terminal: dict[tuple[str, str], list[str]] = {}
        self.retries: list[dict[str, Any]] = []

    def poll(self) -> int:
        """Pushes with a terminal outcome so far."""
        for _, _, _, value in self._tail.poll():
            e = orjson.loads(value or b"{}")
            key = (e.get("notification_id", ""), e.get("device_id", ""))
            if e.get("outcome") in TERMINAL_STATES:
                self.terminal.setdefault(key, []).append(e["outcome"])
            elif e.get("outcome") == "retry_scheduled":
                self.retries.append(
                    {
                        "provider": e.get("provider"),
                        "status": e.get("status"),
                        "reason": e.get("reason"),
                        "ts": e.get("ts"),
                        "retry_at": e.get("retry_at"),
                        "key": (e.get("provider", ""), *key),
                    }
                )
        return len(self.terminal)

    def done(self, keys: Iterable[Key]) -> bool:
        """True when every push of `keys` has a terminal outcome."""
        self.poll()
        return all((nid, dev) in self.terminal for _, nid, dev in keys)

    def missing(self, keys: Iterable[Key]) -> int:
        """Pushes of `keys` without a terminal outcome yet."""
        return sum(1 for _, nid, dev in keys if (nid, dev) not in self.terminal)

    def summary(self) -> dict[str, int]:
        """Terminal outcomes by kind (a push with two is counted twice)."""
        return dict(Counter(o for v in self.terminal.values() for o in v))

    def retry_reasons(self) -> dict[str, int]:
        """Retries scheduled, by reason."""
        return dict(Counter(str(r["reason"]) for r in self.retries))

    def answers_lost(self, provider: str) -> Counter[Key]:
        """A provider's pushes with sends that may have left and got no answer, and how many.

        A timeout, a broken connection, a client error: the provider may have accepted it.
        Holds (circuit_open, rate_limited) never left.
        """
        return Counter(
            r["key"]
            for r in self.retries
            if r["provider"] == provider and answer_lost(r["status"], r["reason"])
        )


# --- what the providers got -----------------------------------------------------------------------


@dataclass
class Tally:
    """Pushes the provider servers accepted, against the pushes that were due.

    `delivered` counts due pushes accepted at least once, `lost` the due ones never accepted,
    `unexpected` accepted pushes nobody was due. Every acceptance beyond a push's first is a
    repeat, sorted by what allows it:
    - `apns_resends`: every copy carried the same apns-id, which APNs' protocol allows for a
      send whose answer was lost (the device shows one notification: same apns-id, same
      collapse id);
    - `fcm_resends`: an FCM push accepted again after an answer was lost (a crash mid-send, a
      GOAWAY, a timeout): FCM's HTTP v1 API has no idempotency key, so a client cannot tell
      "accepted, answer lost" from "never arrived". Counted here where the scenario cut
      answers off (`fcm_resends_allowed`), or for a push delivery reported a lost answer for
      (`fcm_answers_lost`, from `Outcomes.answers_lost`); elsewhere they are `duplicated`;
    - `duplicated`: every other repeat. Always a failure.
    """

    expected: int
    delivered: int
    lost: int
    unexpected: int
    duplicated: int
    apns_resends: int
    fcm_resends: int
    first_accepted: dict[Key, float] = field(default_factory=dict, repr=False)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def row(self) -> dict[str, int]:
        """The counts, for a report."""
        return {
            "expected": self.expected,
            "delivered": self.delivered,
            "lost": self.lost,
            "unexpected": self.unexpected,
            "duplicated": self.duplicated,
            "apns_resends": self.apns_resends,
            "fcm_resends": self.fcm_resends,
        }


def tally(
    expected: Iterable[Key],
    records: Iterable[AcceptedRecord],
    *,
    fcm_resends_allowed: bool,
    fcm_answers_lost: Collection[Key] = frozenset(),
) -> Tally:
    """Compare what the providers accepted with what was due (see `Tally`)."""
    due = set(expected)
    copies: dict[Key, list[AcceptedRecord]] = defaultdict(list)
    for r in records:
        copies[(r.provider, r.notification_id or "", r.device_id or "")].append(r)
    delivered = sum(1 for k in due if k in copies)
    unexpected = [k for k in copies if k not in due]
    duplicated = apns_resends = fcm_resends = 0
    dup_examples: list[str] = []
    for key, recs in copies.items():
        extra = len(recs) - 1
        if extra <= 0:
            continue
        if key[0] == "apns" and len({r.message_id for r in recs}) == 1:
            apns_resends += extra
        elif key[0] == "fcm" and (fcm_resends_allowed or key in fcm_answers_lost):
            fcm_resends += extra
        else:
            duplicated += extra
            dup_examples.append(f"{key} x{len(recs)}")
    lost = sorted(k for k in due if k not in copies)
    return Tally(
        expected=len(due),
        delivered=delivered,
        lost=len(lost),
        unexpected=len(unexpected),
        duplicated=duplicated,
        apns_resends=apns_resends,
        fcm_resends=fcm_resends,
        first_accepted={k: min(r.time for r in recs) for k, recs in copies.items()},
        examples={
            "lost": [str(k) for k in lost[:5]],
            "unexpected": [str(k) for k in unexpected[:5]],
            "duplicated": dup_examples[:5],
        },
    )


def last_delivery(t: Tally, keys: Iterable[Key]) -> float | None:
    """When the last of `keys` was first accepted (None if one never was)."""
    latest = 0.0
    for k in keys:
        at = t.first_accepted.get(k)
        if at is None:
            return None
        latest = max(latest, at)
    return latest or None


# --- load and observation while a fault runs ------------------------------------------------------


class Traffic(threading.Thread):
    """Publishes dispatch batches at a steady rate: a new post every `period_s` per provider.

    `due` maps each push published to its publish time (every item of a post is due).
    """

    def __init__(
        self,
        stack: ChaosStack,
        rates: Mapping[str, int],
        *,
        period_s: float = 0.25,
        name: str = "t",
    ) -> None:
        super().__init__(name=f"chaos-traffic-{name}", daemon=True)
        self._kafka = stack.kafka
        self._per_tick = {p: max(1, round(r * period_s)) for p, r in rates.items() if r > 0}
        self._period = period_s
        self._prefix = name
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.due: dict[Key, float] = {}
        self.error: BaseException | None = None
        stack.on_close(self.stop)

    def run(self) -> None:
        """Publish until stopped."""
        producer = Producer({**self._kafka, "linger.ms": 5, "acks": "all"})
        tick = 0
        next_at = time.monotonic()
        try:
            while not self._halt.is_set():
                now = time.time()
                new: dict[Key, float] = {}
                for provider, n in self._per_tick.items():
                    post = f"{self._prefix}-{provider}-{tick:05d}"
                    items = [
                        (f"u{i:04d}", f"d{i:04d}-{provider}", token_for(provider, f"{post}/{i}"))
                        for i in range(n)
                    ]
                    for key, value in dispatch_messages(provider, post, items, now):
                        producer.produce(f"push.{provider}", value=value, key=key.encode())
                    new.update({(provider, f"{post}:{u}", d): now for u, d, _ in items})
                if producer.flush(30):
                    raise ChaosError("the traffic publisher could not flush within 30 s")
                with self._lock:
                    self.due.update(new)
                tick += 1
                next_at += self._period
                self._halt.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # reported by the scenario
            self.error = exc

    def stop(self) -> None:
        """Stop publishing (returns once the last tick is out)."""
        self._halt.set()
        if self.is_alive():
            self.join(60)

    def snapshot(self) -> dict[Key, float]:
        """The pushes published so far."""
        with self._lock:
            return dict(self.due)


class CircuitSampler(threading.Thread):
    """Samples each provider's `fanfare_circuit_state` (0 closed, 1 half-open, 2 open)."""

    STATES: ClassVar[dict[int, str]] = {0: "closed", 1: "half-open", 2: "open"}

    def __init__(self, stack: ChaosStack, run: FlowRun, every_s: float = 0.2) -> None:
        super().__init__(name="chaos-circuit-sampler", daemon=True)
        self._run = run
        self._every = every_s
        self._halt = threading.Event()
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.held: dict[str, float] = {}
        stack.on_close(self.stop)

    def run(self) -> None:
        """Sample until stopped."""
        while not self._halt.is_set():
            snap = self._run.metrics()
            states = {
                dict(labels).get("provider", ""): int(v)
                for (name, labels), v in snap.items()
                if name == "fanfare_circuit_state"
            }
            if states:
                self.samples.append((time.time(), states))
            for (name, labels), v in snap.items():
                lab = dict(labels)
                if name == "fanfare_delivery_held_total" and lab.get("cause") == "circuit_open":
                    self.held[lab.get("provider", "")] = v
            self._halt.wait(self._every)

    def stop(self) -> None:
        """Stop sampling."""
        self._halt.set()
        if self.is_alive():
            self.join(10)

    def transitions(self, provider: str) -> list[tuple[float, str]]:
        """(time, state) each time the sampled state changed."""
        out: list[tuple[float, str]] = []
        for t, states in self.samples:
            if provider not in states:
                continue
            name = self.STATES.get(states[provider], str(states[provider]))
            if not out or out[-1][1] != name:
                out.append((t, name))
        return out

    def closed_after(self, provider: str, t0: float) -> float | None:
        """The first sample at or after `t0` with the provider's circuit closed."""
        for t, states in self.samples:
            if t >= t0 and states.get(provider, 0) == 0:
                return t
        return None
