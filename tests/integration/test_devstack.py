"""`fanfare dev` and `fanfare topics` against a real Tansu broker and the machine's Redis.

Every test gets its own FANFARE_HOME and a free port, runs the CLI as a subprocess with an exact
environment, and stops whatever broker it started even when an assertion fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.runtime.ports import free_port
from flows.runtime.readiness import write_run_file
from operators.adapters.kafka.admin import list_topics
from operators.config import Settings, load_settings
from schemas.topics import ALL_TOPICS
from scripts.dev import devstack

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 2


def stack_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    # Drop the caller's FANFARE_* so only what the test sets is in effect.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANFARE_")}
    env.update(
        FANFARE_HOME=str(home),
        FANFARE_KAFKA_BROKERS=f"127.0.0.1:{port}",
        FANFARE_TOPIC_PARTITIONS=str(PARTITIONS),
        FANFARE_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


def fanfare(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.cli", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def alive(pid: int) -> bool:
    """True if pid runs; a zombie waiting for init to reap it counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Stack:
    """One FANFARE_HOME + port; `stop()` in teardown is a no-op if `dev down` already ran."""

    def __init__(self, root: Path, port: int | None = None, **extra: str) -> None:
        self.port = port or free_port()
        self.env = stack_env(root, self.port, **extra)
        self.settings: Settings = load_settings(self.env)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return fanfare(self.env, *args)

    def stop(self) -> None:
        devstack.stop_broker(self.settings)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "home")
    yield s
    s.stop()


@pytest.mark.integration
def test_dev_lifecycle(stack: Stack) -> None:
    before = stack.run("dev", "status")
    assert before.returncode == 1, before.stdout + before.stderr
    assert "NOT reachable" in before.stdout

    up = stack.run("dev", "up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "started (pid" in up.stdout
    pid = devstack.broker_running(stack.settings)
    assert pid is not None and f"pid {pid}" in up.stdout
    assert devstack.pid_file(stack.settings).read_text().strip() == str(pid)
    assert devstack.log_file(stack.settings).exists()
    assert f"{len(ALL_TOPICS)} created" in up.stdout
    providers = devstack.providers_info(stack.settings)
    assert providers is not None and f"providers running (pid {providers['pid']})" in up.stdout
    assert alive(providers["pid"])

    again = stack.run("dev", "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"already running (pid {pid})" in again.stdout
    assert "0 created" in again.stdout
    assert devstack.broker_running(stack.settings) == pid

    listed = stack.run("topics", "list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    for topic in ALL_TOPICS:
        assert f"{topic} " in listed.stdout
    assert listed.stdout.count(f"{PARTITIONS} partitions") == len(ALL_TOPICS)
    assert list_topics(stack.settings) == dict.fromkeys(ALL_TOPICS, PARTITIONS)

    status = stack.run("dev", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"running (pid {pid})" in status.stdout
    assert f"all {len(ALL_TOPICS)} present" in status.stdout
    assert f"running (pid {providers['pid']}): APNs at localhost:" in status.stdout
    # The local providers' settings are in the settings file, which every flow reads.
    written = load_settings(stack.env)
    assert written.apns_port == providers["apns"]["port"]
    assert written.fcm_url == providers["fcm"]["https_url"]

    # A flow running from this FANFARE_HOME (this test's own pid stands in for its supervisor).
    run_file = write_run_file(stack.settings, {"flow": "fanout", "ready_url": None})
    refused = stack.run("dev", "down")
    assert refused.returncode == 1 and "refused: flows started from" in refused.stderr
    assert f"fanout (pid {os.getpid()})" in refused.stderr and "--force" in refused.stderr
    assert devstack.broker_running(stack.settings) == pid  # nothing was stopped
    run_file.unlink()

    down = stack.run("dev", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"Stopped the local provider servers (pid {providers['pid']})" in down.stdout
    assert not alive(providers["pid"])
    assert devstack.providers_info(stack.settings) is None
    assert f"Stopped the broker (pid {pid})" in down.stdout
    assert "memory" in down.stdout
    assert not devstack.pid_file(stack.settings).exists()
    assert not alive(pid)
    assert load_settings(stack.env).apns_key_file == ""  # the settings went with the servers

    after = stack.run("dev", "status")
    assert after.returncode == 1, after.stdout + after.stderr
    assert "status: NOT ready" in after.stdout

    twice = stack.run("dev", "down")
    assert twice.returncode == 0
    assert "No broker started by `fanfare dev up` is running" in twice.stdout


@pytest.mark.integration
def test_topics_create_twice(stack: Stack) -> None:
    # The importable start function (what the test session and the demo use).
    pid = devstack.start_broker(stack.settings)
    assert devstack.broker_running(stack.settings) == pid
    assert devstack.start_broker(stack.settings) == pid  # idempotent

    first = stack.run("topics", "create")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(" created\n") == len(ALL_TOPICS)
    assert f"{len(ALL_TOPICS)} created, 0 already there" in first.stdout

    second = stack.run("topics", "create")
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count(" exists\n") == len(ALL_TOPICS)
    assert f"0 created, {len(ALL_TOPICS)} already there" in second.stdout

    # Asking for more partitions than the topics have is reported, not an error.
    bigger = stack.run("topics", "create", "--partitions", "3")
    assert bigger.returncode == 0, bigger.stdout + bigger.stderr
    assert bigger.stdout.count("fewer than the 3 asked") == len(ALL_TOPICS)
    assert list_topics(stack.settings) == dict.fromkeys(ALL_TOPICS, PARTITIONS)

    # stop_broker from the process that started it (reaps its own child).
    assert devstack.stop_broker(stack.settings) is True
    assert not alive(pid)
    assert devstack.stop_broker(stack.settings) is False


@pytest.mark.integration
def test_topics_without_broker_say_how_to_start_one(stack: Stack) -> None:
    listed = stack.run("topics", "list")
    assert listed.returncode == 1
    assert "FANFARE_KAFKA_BROKERS" in listed.stderr
    assert "fanfare dev up" in listed.stderr


@pytest.mark.integration
def test_dev_up_without_redis(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "home", FANFARE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        up = stack.run("dev", "up")
        assert up.returncode != 0, up.stdout + up.stderr
        assert "apt-get install redis-server" in up.stderr
        assert "redis-server --daemonize yes" in up.stderr
        assert "FANFARE_REDIS_URL" in up.stderr
        # The broker is left running (and its topics made) so fixing Redis is the only step left.
        pid = devstack.broker_running(stack.settings)
        assert pid is not None
        assert list_topics(stack.settings) == dict.fromkeys(ALL_TOPICS, PARTITIONS)

        status = stack.run("dev", "status")
        assert status.returncode == 1
        assert "did not answer PING" in status.stdout

        down = stack.run("dev", "down")
        assert down.returncode == 0
        assert f"Stopped the broker (pid {pid})" in down.stdout
        assert not alive(pid)
    finally:
        stack.stop()


@pytest.mark.integration
def test_dev_up_reuses_a_broker_it_did_not_start(tmp_path: Path) -> None:
    owner = Stack(tmp_path / "owner")
    guest = Stack(tmp_path / "guest", port=owner.port)
    try:
        pid = devstack.start_broker(owner.settings)

        up = guest.run("dev", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "reusing it" in up.stdout
        assert devstack.broker_running(guest.settings) is None

        down = guest.run("dev", "down")
        assert down.returncode == 0
        assert "left alone" in down.stdout
        assert devstack.broker_running(owner.settings) == pid
    finally:
        owner.stop()


@pytest.mark.integration
def test_dev_down_never_signals_a_process_it_did_not_start(stack: Stack) -> None:
    # A stale pid file pointing at some other live process (as after a pid is recycled).
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = devstack.pid_file(stack.settings)
        pid_file.parent.mkdir(parents=True)
        pid_file.write_text(f"{other.pid}\n")
        assert devstack.broker_running(stack.settings) is None

        down = stack.run("dev", "down")
        assert down.returncode == 0
        assert "removed a stale pid file" in down.stdout
        assert other.poll() is None
        assert not pid_file.exists()
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()


@pytest.mark.integration
def test_dev_up_refuses_a_port_taken_by_something_else(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        stack = Stack(tmp_path / "home", port=int(squatter.getsockname()[1]))
        up = stack.run("dev", "up")
    assert up.returncode == 1, up.stdout + up.stderr
    assert "already taken by another process" in up.stderr
    assert not devstack.pid_file(stack.settings).exists()


@pytest.mark.parametrize(
    ("brokers", "expected"),
    [
        ("127.0.0.1:9093", ("127.0.0.1", 9093)),
        ("localhost:9092,other:9092", ("localhost", 9092)),
        ("PLAINTEXT://broker-1:19092", ("broker-1", 19092)),
        ("[::1]:9094", ("::1", 9094)),
        ("kafka", ("kafka", 9092)),
    ],
)
def test_broker_address(brokers: str, expected: tuple[str, int]) -> None:
    assert devstack.broker_address(Settings(kafka_brokers=brokers)) == expected
