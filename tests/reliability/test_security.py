"""Credentials stay secret, and what listens binds the loopback by default.

One run of the three flows (fan-out, delivery, acks) with every credential fanfare can be given,
each read from a file or a URL the way a deployment gives it: the APNs token-auth key (.p8) and
the FCM service account from files named by FANFARE_APNS_KEY_FILE / FANFARE_FCM_CREDENTIALS_FILE
(the local provider servers stand in for Apple and Google), a Cassandra password file (the
stores stay SQLite: the setting is read, never used), a Redis password file
(FANFARE_REDIS_PASSWORD_FILE; a private redis-server that requires it), and SASL/SSL passwords
in FANFARE_KAFKA_SECRETS_FILE (the embedded broker speaks PLAINTEXT, so librdkafka carries them
unused). No credential is in the flows' environment. All of it at DEBUG.

Then every file the flows wrote under FANFARE_HOME (logs, stores, recovery snapshots, run
files), every message of every topic, every process's /metrics and /dataflow and the /ready and
/live bodies are searched for the secret material: each body line of the two private keys'
PEM, the FCM bearer tokens (the fixed one in providers.json and every one the local token
endpoint issued to the flow), the APNs provider JWTs the flow signed, and the passwords. None
may appear. The run also checks who listens where: the readiness endpoint, fanfare's /metrics
servers, the broker and the local provider servers on 127.0.0.1; Bytewax's own API server, which
the acks flow runs here with FANFARE_METRICS_SERVER=bytewax, on every interface (0.0.0.0 is
hard-coded in bytewax 0.21.1's src/webserver/mod.rs, with no setting to change it: see the
docs/operations.md, "Security").
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from flows.runtime.ports import free_port
from operators.adapters.kafka.writer import produce_all
from schemas.codecs import format_timestamp
from schemas.topics import ALL_TOPICS
from scripts.dev.local_providers.control import ProviderControl
from scripts.dev.local_providers.runner import LocalProviders, Running, start_local_providers
from tests.conftest import Stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TS = "2026-06-01T12:00:00Z"


# --- helpers -------------------------------------------------------------------------------------


@dataclass
class InProcessProviders:
    """The local APNs and FCM servers on a thread of the test, so it can see what they saw."""

    providers: LocalProviders

    @property
    def running(self) -> Running:
        return self.providers.running

    @property
    def info(self) -> Any:
        return self.running.info

    def issued_fcm_tokens(self) -> set[str]:
        """Every OAuth bearer the local token endpoint handed out (to the flow)."""
        return {t.decode() for t in self.running.fcm.access_tokens}

    def apns_provider_tokens(self) -> set[str]:
        """Every APNs provider JWT a client presented (`bearer <jwt>`)."""
        return {
            v.partition(b" ")[2].decode()
            for v in self.running.apns._bearers  # what the server verified
        }

    def stop(self) -> None:
        self.providers.stop()


def serve_in_thread(home: Path, fcm_access_token: str) -> InProcessProviders:
    return InProcessProviders(start_local_providers(home, fcm_access_token=fcm_access_token))


@dataclass
class PrivateRedis:
    """A redis-server of the test's own that requires a password (the shared one has none)."""

    proc: subprocess.Popen[bytes]
    port: int
    password: str
    log: Path

    @property
    def url(self) -> str:
        return f"redis://default:{self.password}@127.0.0.1:{self.port}/0"


def start_private_redis(directory: Path) -> PrivateRedis:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: cannot run a Redis that requires a password")
    directory.mkdir(parents=True, exist_ok=True)
    port, password = free_port(), "redis-pw-" + secrets.token_hex(12)
    conf = directory / "redis.conf"
    log = directory / "redis.log"
    # In a file, not on the command line (where `ps` shows it).
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nrequirepass {password}\nsave ""\nappendonly no\n'
        f"dir {directory}\nlogfile {log}\n"
    )
    conf.chmod(0o600)
    proc = subprocess.Popen(
        [binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    server = PrivateRedis(proc, port, password, log)
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"redis-server did not start: {log.read_text()}") from None
            time.sleep(0.1)
    with pytest.raises(redis.AuthenticationError):  # it really requires the password
        redis.Redis(port=port, password="wrong", socket_timeout=2).ping()
    return server


def pem_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM block (the key material itself)."""
    return [
        line.strip()
        for line in pem.strip().splitlines()
        if line.strip() and not line.startswith("-----")
    ]


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""  # not listening (yet)


def listen_addresses(port: int) -> set[str]:
    """Addresses with a TCP socket in LISTEN on `port` (this network namespace, any process)."""
    found: set[str] = set()
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, _, port_hex = fields[1].partition(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            fixed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(fixed)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            found.add(str(ip))
    return found


def metrics_ports(stack: Stack, index: int) -> list[int]:
    """The /metrics ports `fanfare run` printed for the flow started `index`-th."""
    log = (Path(stack.env["FANFARE_HOME"]) / f"flow-{index}.log").read_text(errors="replace")
    found = re.search(r"metrics on port\(s\) ([0-9, ]+);", log)
    assert found, log[-2000:]
    return [int(p) for p in found.group(1).split(",")]


def iso_now() -> str:
    return format_timestamp(time.time())


def apns_token(i: int) -> str:
    return f"{i:02x}" * 32


def fcm_token(i: int) -> str:
    return f"sec{i}:APA91b" + "x" * 140


def publish(stack: Stack, topic: str, messages: list[tuple[str | None, Any]]) -> None:
    produce_all(
        stack.settings.kafka_config(),
        topic,
        [
            (None if k is None else k.encode(), v if isinstance(v, bytes) else orjson.dumps(v))
            for k, v in messages
        ],
    )


def batch(post: str, provider: str, items: list[tuple[str, str, str]]) -> dict[str, Any]:
    return {
        "schema": "dispatch_batch/v1",
        "post_id": post,
        "author_id": "sec-direct",
        "provider": provider,
        "created_at": iso_now(),
        "items": [
            {"notification_id": f"{post}:{u}", "user_id": u, "device_id": d, "token": t}
            for u, d, t in items
        ],
    }


@pytest.fixture
def providers_in_process(tmp_path: Path) -> Iterator[InProcessProviders]:
    # Outside FANFARE_HOME: the credential files are the one place the secrets belong.
    p = serve_in_thread(tmp_path / "secrets" / "providers", "fixed-bearer-" + secrets.token_hex(16))
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = start_private_redis(tmp_path / "secrets" / "redis")
    try:
        yield server
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()


# --- the test ------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_no_secret_in_logs_topics_or_metrics_and_loopback_binds(
    stack: Stack,
    providers_in_process: InProcessProviders,
    private_redis: PrivateRedis,
    tmp_path: Path,
) -> None:
    info = providers_in_process.info
    apns, fcm = info["apns"], info["fcm"]
    cassandra_password = "cass-pw-" + secrets.token_hex(12)
    password_file = tmp_path / "secrets" / "cassandra_password"
    password_file.write_text(cassandra_password + "\n")
    password_file.chmod(0o600)
    sasl_password = "sasl-pw-" + secrets.token_hex(12)
    ssl_key_password = "sslkey-pw-" + secrets.token_hex(12)
    kafka_secrets = tmp_path / "secrets" / "kafka"
    kafka_secrets.write_text(
        f"sasl.password={sasl_password}\nssl.key.password={ssl_key_password}\n"
    )
    kafka_secrets.chmod(0o600)
    redis_password_file = tmp_path / "secrets" / "redis_password"
    redis_password_file.write_text(private_redis.password + "\n")
    redis_password_file.chmod(0o600)
    ready_ports = [free_port() for _ in range(3)]
    env = (
        ("FANFARE_LOG_LEVEL", "DEBUG"),
        # Every credential from a file: the environment holds none.
        ("FANFARE_REDIS_URL", f"redis://default@127.0.0.1:{private_redis.port}/0"),
        ("FANFARE_REDIS_PASSWORD_FILE", str(redis_password_file)),
        ("FANFARE_CASSANDRA_USERNAME", "fanfare"),
        ("FANFARE_CASSANDRA_PASSWORD_FILE", str(password_file)),
        ("FANFARE_KAFKA_OPTIONS", "sasl.username=fanfare"),
        ("FANFARE_KAFKA_SECRETS_FILE", str(kafka_secrets)),
        ("FANFARE_APNS_KEY_FILE", apns["key_file"]),
        ("FANFARE_APNS_KEY_ID", apns["key_id"]),
        ("FANFARE_APNS_TEAM_ID", apns["team_id"]),
        ("FANFARE_APNS_TOPIC", apns["topic"]),
        ("FANFARE_APNS_HOST", apns["host"]),
        ("FANFARE_APNS_PORT", str(apns["port"])),
        ("FANFARE_APNS_CA_FILE", apns["ca_file"]),
        ("FANFARE_FCM_CREDENTIALS_FILE", fcm["credentials_file"]),
        ("FANFARE_FCM_URL", fcm["url"]),
        ("FANFARE_RETRY_MAX_ATTEMPTS", "2"),
        ("FANFARE_RETRY_BASE_MS", "100"),
        ("FANFARE_RETRY_MAX_BACKOFF_S", "1"),
    )
    control = ProviderControl(info["control_url"])
    control.set_token_errors("apns", {apns_token(90): "Unregistered"})
    control.set_token_errors("fcm", {fcm_token(91): "INTERNAL"})

    # The changelogs, a post through the fan-out (and one through the backfill lane), bad input.
    fans = {"sec-fan1": [("apns", 1), ("fcm", 2)], "sec-fan2": [("apns", 3)]}
    publish(
        stack,
        "follow_changes",
        [
            ("sec-author", {"author_id": "sec-author", "follower_id": f, "op": "follow", "ts": TS})
            for f in fans
        ]
        + [("sec-author", b'{"author_id": "sec-author"}')],
    )
    publish(
        stack,
        "device_changes",
        [
            (
                f,
                {
                    "user_id": f,
                    "device_id": f"{f}-{p}",
                    "provider": p,
                    "token": apns_token(i) if p == "apns" else fcm_token(i),
                    "active": True,
                    "ts": TS,
                },
            )
            for f, devices in fans.items()
            for p, i in devices
        ],
    )
    publish(
        stack,
        "preference_changes",
        [("sec-fan1", {"user_id": "sec-fan1", "timezone": "UTC", "ts": TS})],
    )
    post = {"event_type": "post_created", "author_id": "sec-author", "visibility": "public"}
    publish(
        stack,
        "post_created",
        [
            ("sec-author", {**post, "post_id": "sec-p1", "created_at": iso_now()}),
            (None, b"not json"),
        ],
    )
    publish(
        stack,
        "post_created.backfill",
        [("sec-author", {**post, "post_id": "sec-p2", "created_at": iso_now()})],
    )
    # Straight to the channels: every lane, a stale token (-> device_changes) and a send that
    # fails twice (-> push.retry, then a dead letter).
    publish(
        stack,
        "push.apns",
        [("sec-d1", batch("sec-d1", "apns", [("gone", "gone-ios", apns_token(90))]))],
    )
    publish(
        stack,
        "push.fcm",
        [("sec-d2", batch("sec-d2", "fcm", [("broken", "broken-and", fcm_token(91))]))],
    )
    publish(
        stack,
        "push.apns.bulk",
        [("sec-d3", batch("sec-d3", "apns", [("bulk1", "bulk1-ios", apns_token(93))]))],
    )
    publish(
        stack,
        "push.fcm.bulk",
        [("sec-d4", batch("sec-d4", "fcm", [("bulk2", "bulk2-and", fcm_token(94))]))],
    )

    # The acks flow with Bytewax's own API server (/metrics with its step metrics, /dataflow):
    # searched too, and its every-interface bind checked below.
    servers = ("fanfare", "fanfare", "bytewax")
    hosts = ("127.0.0.1", "127.0.0.1", "0.0.0.0")  # what each server binds
    for i, flow in enumerate(("fanout", "delivery", "acks")):
        stack.start_flow(
            *env,
            ("FANFARE_READY_PORT", str(ready_ports[i])),
            ("FANFARE_METRICS_SERVER", servers[i]),
            ("FANFARE_METRICS_HOST", hosts[i]),
            flow=flow,
        )
    for i, flow in enumerate(("fanout", "delivery", "acks")):
        wait_for(
            lambda i=i: http_get(f"http://127.0.0.1:{ready_ports[i]}/ready")[0] == 200,
            120,
            f"{flow} to be ready",
            stack,
        )

    expected_accepted = {
        ("apns", "sec-p1:sec-fan1", "sec-fan1-apns"),
        ("fcm", "sec-p1:sec-fan1", "sec-fan1-fcm"),
        ("apns", "sec-p1:sec-fan2", "sec-fan2-apns"),
        ("apns", "sec-p2:sec-fan1", "sec-fan1-apns"),
        ("fcm", "sec-p2:sec-fan1", "sec-fan1-fcm"),
        ("apns", "sec-p2:sec-fan2", "sec-fan2-apns"),
        ("apns", "sec-d3:bulk1", "bulk1-ios"),
        ("fcm", "sec-d4:bulk2", "bulk2-and"),
    }

    def accepted() -> set[tuple[str, str, str]]:
        return {
            (p, r.notification_id, r.device_id)
            for p in ("apns", "fcm")
            for r in control.accepted(p)
        }

    def dead_sources() -> list[str]:
        return sorted(d["source_topic"] for d in stack.dead_letters())

    wait_for(lambda: accepted() >= expected_accepted, 120, "every push accepted", stack)
    wait_for(lambda: len(dead_sources()) >= 3, 90, "the dead letters", stack)
    ack = {
        "notification_id": "sec-p1:sec-fan1",
        "device_id": "sec-fan1-apns",
        "event": "opened",
        "ts": iso_now(),
    }
    publish(
        stack,
        "notification_acks",
        [("sec-p1:sec-fan1", ack), ("nope:nobody", {**ack, "notification_id": "nope:nobody"})],
    )
    wait_for(lambda: len(dead_sources()) >= 4, 90, "the acks' dead letters", stack)
    assert accepted() == expected_accepted
    print(stack.dead_letters())
    assert dead_sources() == ["follow_changes", "notification_acks", "post_created", "push.retry"]

    # The secret material.
    key_lines = pem_body_lines(Path(apns["key_file"]).read_text())
    sa = json.loads(Path(fcm["credentials_file"]).read_text())
    sa_lines = pem_body_lines(sa["private_key"])
    fcm_bearers = providers_in_process.issued_fcm_tokens()
    apns_jwts = providers_in_process.apns_provider_tokens()
    assert fcm_bearers, "the flow never fetched an FCM access token"
    assert apns_jwts, "the flow never presented an APNs provider token"
    assert len(key_lines) >= 3 and len(sa_lines) >= 20
    secrets_named: dict[str, str] = {
        **{f"APNs .p8 key line {i}": line for i, line in enumerate(key_lines)},
        **{f"FCM service-account private_key line {i}": line for i, line in enumerate(sa_lines)},
        "FCM fixed bearer (providers.json)": fcm["access_token"],
        **{f"FCM bearer {t[:14]}...": t for t in fcm_bearers},
        **{f"APNs provider JWT {t[:10]}...": t for t in apns_jwts},
        **{f"APNs JWT signature {t[:10]}...": t.rsplit(".", 1)[1] for t in apns_jwts},
        "Cassandra password": cassandra_password,
        "Redis password": private_redis.password,
        "Kafka sasl.password": sasl_password,
        "Kafka ssl.key.password": ssl_key_password,
    }

    # Where they must not be.
    home = Path(stack.env["FANFARE_HOME"])
    haystacks: dict[str, bytes] = {}
    for path in sorted(home.rglob("*")):
        if path.is_file():
            haystacks[f"file {path.relative_to(home)}"] = path.read_bytes()
    haystacks["redis-server log"] = private_redis.log.read_bytes()
    for topic in ALL_TOPICS:
        messages = stack.read_topic(topic)
        haystacks[f"topic {topic}"] = b"\n".join(v or b"" for _, _, v in messages)
    for i in range(3):
        for port in metrics_ports(stack, i):
            for path in ("/metrics", "/dataflow") if servers[i] == "bytewax" else ("/metrics",):
                status, body = http_get(f"http://127.0.0.1:{port}{path}")
                assert status == 200, (port, path)
                haystacks[f"flow {i} :{port}{path}"] = body
        for path in ("/ready", "/live"):
            haystacks[f"flow {i} {path}"] = http_get(f"http://127.0.0.1:{ready_ports[i]}{path}")[1]
    assert any(b"fanfare_delivery_outcomes_total" in h for h in haystacks.values())
    logs = b"".join(v for k, v in haystacks.items() if k.endswith(".log"))
    assert b"DEBUG" in logs, "the flows did not log at DEBUG"
    leaks = [
        f"{what} in {where}"
        for what, secret in secrets_named.items()
        for where, body in haystacks.items()
        if secret.encode() in body
    ]
    assert not leaks, "\n".join(leaks[:30])

    # Who listens where.
    for port in ready_ports:
        assert listen_addresses(port) == {"127.0.0.1"}, port
    broker_port = int(stack.env["FANFARE_KAFKA_BROKERS"].rpartition(":")[2])
    assert listen_addresses(broker_port) == {"127.0.0.1"}
    for port in (
        apns["port"],
        int(fcm["url"].rpartition(":")[2]),
        int(info["control_url"].rpartition(":")[2]),
    ):
        assert listen_addresses(port) == {"127.0.0.1"}, port
    tls_port = int(fcm["https_url"].rpartition(":")[2])
    assert listen_addresses(tls_port) == {"127.0.0.1"}
    # fanfare's /metrics server binds FANFARE_METRICS_HOST (127.0.0.1 by default). Bytewax's
    # API server, chosen with FANFARE_METRICS_SERVER=bytewax, binds every interface and nothing
    # sets it otherwise (bytewax 0.21.1): the docs/operations.md, "Security" says so. If it changes, say so.
    for i in range(3):
        for port in metrics_ports(stack, i):
            assert listen_addresses(port) == {hosts[i]}, (servers[i], port)
    with socket.create_connection(("127.0.0.1", private_redis.port), timeout=5):
        pass
