"""`fanfare run` supervised: a killed member restarts the cluster, SIGTERM stops it, /ready."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flows.runtime.ports import free_port, free_port_run
from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from schemas.topics import CHANNEL_TOPICS
from scripts.dev import devstack
from tests.conftest import METRICS_PORTS, Stack, wait_for
from tests.integration.test_fanout_e2e import device, follow, post, publish
from tests.unit.test_redis_outage import OwnRedis

pytestmark = pytest.mark.integration


class Run:
    """`python -m scripts.cli run FLOW ...` in its own session, logged like Stack.start_flow."""

    def __init__(self, stack: Stack, *argv: str, env: dict[str, str] | None = None) -> None:
        self.ready_port = free_port()
        self.env = {
            **os.environ,
            **stack.env,
            "FANFARE_READY_PORT": str(self.ready_port),
            **(env or {}),
        }
        if stack.flows:
            self.env["FANFARE_METRICS_PORT"] = str(free_port_run(METRICS_PORTS))
        self.log = Path(stack.env["FANFARE_HOME"]) / f"flow-{len(stack.flows)}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scripts.cli", "run", *argv],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.flows.append(self.proc)  # the fixture stops it if a test fails

    def get(self, path: str) -> tuple[int | None, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.ready_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError:
            return None, {}

    def pids(self) -> list[int]:
        status, body = self.get("/live")
        return list(body.get("pids", [])) if status == 200 else []

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def sigterm_and_check_clean_exit(run: Run, pids: list[int]) -> float:
    started = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)  # the supervisor only: it forwards to its members
    assert run.proc.wait(timeout=30) == 0, run.text()[-3000:]
    took = time.monotonic() - started
    assert pids and not [p for p in pids if alive(p)], "orphaned members"
    # its run file (for `fanfare dev status`) is gone
    assert not list((Path(run.env["FANFARE_HOME"]) / "run").glob(f"*-{run.proc.pid}.json"))
    return took


def test_killed_member_restarts_cluster_and_output_set_is_unchanged(stack: Stack) -> None:
    followers = [f"fan{i:05d}" for i in range(50_000)]
    store = SQLiteFollowerStore(
        stack.settings.resolved_store_url.removeprefix("sqlite:///"), stack.settings.shard_count
    )
    store.bulk_load(("celeb", f, 1) for f in followers)
    store.close()
    publish(
        stack,
        "device_changes",
        [(f, device(f, f + "-d", "apns" if i % 2 else "fcm")) for i, f in enumerate(followers)],
    )
    publish(stack, "post_created", [("celeb", post("big", "celeb"))])
    # Small pages and budgets slow the fan-out so that the kill lands in the middle of it (the
    # celebrity post's bulk expansion has its own budget).
    slow = {
        "FANFARE_EXPAND_BUDGET": "10",
        "FANFARE_BULK_EXPAND_BUDGET": "10",
        "FANFARE_FOLLOWER_PAGE_SIZE": "10",
    }
    watcher = stack.watch(CHANNEL_TOPICS)
    run = Run(stack, "fanout", "--processes", "2", env=slow)
    wait_for(lambda: len(run.pids()) == 2, 60, "two members", stack)
    first = run.pids()
    wait_for(lambda: watcher.poll() >= 4_000, 180, "the first pushes", stack, 0.01)
    os.kill(first[1], signal.SIGKILL)  # kill -9 one member, mid-shard
    seen_at_kill = watcher.poll()
    watcher.close()
    print(f"killed member 1 after at least {seen_at_kill} of {len(followers)} pushes")
    assert seen_at_kill < len(followers), "the fan-out finished before the kill; make it slower"
    wait_for(
        lambda: "restarting in" in run.text() and len(run.pids()) == 2, 60, "the restart", stack
    )
    second = run.pids()
    assert not set(second) & set(first)
    assert not [p for p in first if alive(p)]
    wait_for(
        lambda: len(stack.dispatch_items()) >= len(followers), 240, "the resumed fan-out", stack
    )
    time.sleep(3)  # anything extra (a duplicate) would show up now
    items = stack.dispatch_items()
    counts = Counter((i[1], i[2], i[3]) for i in items)
    dupes = [k for k, n in counts.items() if n > 1]
    assert not dupes, f"{len(dupes)} duplicate pushes, e.g. {dupes[:3]}"
    assert set(counts) == {("big", f, f + "-d") for f in followers}
    assert {i[0] for i in items} == {"push.apns.bulk", "push.fcm.bulk"}
    log = run.text()
    assert f"process 1 (pid {first[1]}) was killed by SIGKILL" in log
    assert "restarting in 1 s from the recovery directory (restart 1;" in log
    assert run.get("/live")[1]["restarts"] == 1
    took = sigterm_and_check_clean_exit(run, second)
    print(f"SIGTERM to exit 0: {took:.2f} s")


def test_ready_is_503_until_changelogs_are_caught_up_then_200(stack: Stack) -> None:
    users = [f"u{i:06d}" for i in range(60_000)]
    publish(stack, "follow_changes", [("author", follow("author", u)) for u in users[:100]])
    publish(stack, "device_changes", [(u, device(u, u + "-d")) for u in users])
    run = Run(stack, "fanout", "--processes", "2")
    seen: list[tuple[int | None, dict[str, Any]]] = []

    def ready() -> bool:
        seen.append(run.get("/ready"))
        return seen[-1][0] == 200

    wait_for(ready, 120, "/ready to answer 200", stack, 0.05)
    statuses = [s for s, _ in seen]
    first_200 = statuses.index(200)
    assert first_200 > 0 and set(statuses[:first_200]) <= {None, 503}, statuses
    behind = [
        body
        for status, body in seen[:first_200]
        if status == 503 and body["checks"]["flow"]["detail"].startswith("changelogs not caught up")
    ]
    assert behind, f"never saw the members answer before catching up: {seen[:first_200]}"
    print(
        f"/ready: {Counter(statuses[:first_200])} before the first 200; first behind: {behind[0]}"
    )
    assert behind[0]["checks"]["broker"]["ok"] and behind[0]["checks"]["redis"]["ok"]
    body = seen[-1][1]
    assert body["ready"] is True and body["flow"] == "fanout"
    assert body["checks"]["flow"] == {
        "ok": True,
        "detail": "changelogs caught up: 4 of 4 follower shards (2 process(es))",
    }
    assert run.get("/live")[0] == 200
    # `fanfare dev status` finds it through the run file and reports its readiness
    status = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "dev", "status"],
        env=run.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert f"fanout (pid {run.proc.pid}): ready at http://127.0.0.1:{run.ready_port}/ready" in (
        status.stdout
    ), status.stdout
    assert "4 of 4 follower shards" in status.stdout
    assert status.returncode == 0, status.stdout + status.stderr
    sigterm_and_check_clean_exit(run, run.pids())


def test_ready_is_503_when_redis_or_the_broker_goes_away(stack: Stack, tmp_path: Path) -> None:
    own_redis = OwnRedis(free_port(), tmp_path / "redis")
    own_redis.start()
    try:
        fanout = Run(stack, "fanout", env={"FANFARE_REDIS_URL": own_redis.url})
        wait_for(lambda: fanout.get("/ready")[0] == 200, 60, "the fan-out ready", stack)
        own_redis.kill()
        wait_for(lambda: fanout.get("/ready")[0] == 503, 30, "/ready 503 without Redis", stack)
        body = fanout.get("/ready")[1]
        assert body["ready"] is False and body["checks"]["broker"]["ok"] is True
        assert body["checks"]["redis"]["ok"] is False
        assert str(own_redis.port) in body["checks"]["redis"]["detail"]
        assert fanout.get("/live")[0] == 200
        sigterm_and_check_clean_exit(fanout, fanout.pids() or [fanout.proc.pid])
    finally:
        own_redis.kill()
    acks = Run(stack, "acks")
    wait_for(lambda: acks.get("/ready")[0] == 200, 60, "the acks flow ready", stack)
    devstack.stop_broker(stack.settings)
    wait_for(lambda: acks.get("/ready")[0] == 503, 30, "/ready 503 without the broker", stack)
    body = acks.get("/ready")[1]
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["redis"]["ok"] is True
    assert stack.settings.kafka_brokers in body["checks"]["broker"]["detail"]
    assert acks.get("/live")[0] == 200
    sigterm_and_check_clean_exit(acks, acks.pids())
    assert "stopped on request; every process has exited" in acks.text()


def cannot_start(stack: Stack, flow: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`fanfare run FLOW` expected to refuse to start: it must say why and exit at once."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "run", flow],
        env={**os.environ, **stack.env, "FANFARE_READY_PORT": str(free_port()), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 20, "it waited instead of saying what is wrong"
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "%3|" not in done.stderr, done.stderr
    assert "restarting" not in done.stdout + done.stderr  # nothing was started to restart
    assert not list((Path(stack.env["FANFARE_HOME"]) / "recovery").glob(f"{flow}*")), "started"
    problems = [line for line in done.stderr.splitlines() if "cannot start:" in line]
    assert len(problems) == 1, done.stderr
    return done


def test_run_says_once_what_is_missing_or_taken_and_starts_nothing(stack: Stack) -> None:
    closed = free_port()
    no_broker = cannot_start(stack, "fanout", FANFARE_KAFKA_BROKERS=f"127.0.0.1:{closed}")
    assert f"no Kafka broker answers at 127.0.0.1:{closed} (FANFARE_KAFKA_BROKERS" in (
        no_broker.stderr
    )
    assert "fanfare dev up" in no_broker.stderr
    no_redis = cannot_start(stack, "fanout", FANFARE_REDIS_URL=f"redis://127.0.0.1:{closed}/0")
    assert f"Redis does not answer at redis://127.0.0.1:{closed}/0 (FANFARE_REDIS_URL" in (
        no_redis.stderr
    )
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        port = cannot_start(stack, "acks", FANFARE_METRICS_PORT=str(taken))
        assert f"port {taken} (FANFARE_METRICS_PORT" in port.stderr
        ready = cannot_start(stack, "acks", FANFARE_READY_PORT=str(taken))
        assert f"port {taken} (FANFARE_READY_PORT" in ready.stderr


def run_answers(run: Run) -> Any:
    return lambda: run.get("/ready")[0] is not None


def test_multi_host_members_restart_their_own_process(stack: Stack, tmp_path: Path) -> None:
    """Two members (as on two hosts: own FANFARE_HOME and recovery directory, shared store)."""
    fans = [f"f{i:03d}" for i in range(50)]
    publish(stack, "follow_changes", [("a", follow("a", f)) for f in fans])
    publish(stack, "device_changes", [(f, device(f, f + "-d")) for f in fans])
    publish(stack, "post_created", [("a", post("p1", "a"))])
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    members = [
        Run(
            stack,
            "fanout",
            "--process-id",
            str(i),
            "--addresses",
            addresses,
            env={
                "FANFARE_HOME": str(tmp_path / f"host{i}"),
                "FANFARE_STORE_URL": f"sqlite:///{tmp_path}/store.db",
                "FANFARE_METRICS_PORT": str(free_port()),
            },
        )
        for i in range(2)
    ]
    wait_for(lambda: len(stack.dispatch_items()) >= len(fans), 90, "p1", stack)
    # each member holds its share of the recovery partitions (k mod 2)
    parts = [
        sorted(p.name for p in (tmp_path / f"host{i}/recovery/fanout").glob("part-*.sqlite3"))
        for i in range(2)
    ]
    assert parts == [["part-0.sqlite3", "part-2.sqlite3"], ["part-1.sqlite3", "part-3.sqlite3"]]
    (killed,) = members[1].pids()
    os.kill(killed, signal.SIGKILL)
    wait_for(
        lambda: all("restarting in" in m.text() and len(m.pids()) == 1 for m in members),
        60,
        "both members to restart their own process",
        stack,
    )
    assert f"process 1 (pid {killed}) was killed by SIGKILL" in members[1].text()
    assert "process 0 (pid" in members[0].text()  # its process failed with the cluster
    publish(stack, "post_created", [("a", post("p2", "a"))])  # the re-formed cluster runs
    wait_for(lambda: len(stack.dispatch_items()) >= 2 * len(fans), 120, "p2", stack)
    time.sleep(2)
    counts = Counter((i[1], i[2], i[3]) for i in stack.dispatch_items())
    assert max(counts.values()) == 1
    assert set(counts) == {(p, f, f + "-d") for p in ("p1", "p2") for f in fans}
    for m in members:
        sigterm_and_check_clean_exit(m, m.pids())
