"""`fanfare run`: cluster arguments, the restart policy, the supervisor, readiness aggregation."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flows.runtime import readiness, runner
from flows.runtime.readiness import CheckResult, ReadinessChecker, Scrape, aggregate, flow_check
from flows.runtime.recovery_marker import RECOVERY_MARKER, read_marker, recovery_lineage
from flows.runtime.runner import ClusterSpec, UsageError, resolve_cluster
from flows.runtime.supervisor import (
    Member,
    RestartPolicy,
    StopNoiseFilter,
    Supervisor,
    describe_exit,
    restart_delay,
)
from operators import metrics
from operators.config import Settings
from operators.events import CaughtUp
from operators.fanout.logic import ExpandFollowerShardLogic
from operators.fanout.shard import FollowerShard
from scripts import cli

NO_ENV: dict[str, str] = {}


def run_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["run", "fanout", *argv])


def resolve(*argv: str, env: dict[str, str] | None = None) -> ClusterSpec:
    return resolve_cluster(run_args(*argv), NO_ENV if env is None else env)


def usage_error(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(UsageError) as caught:
        resolve(*argv, env=env)
    return str(caught.value)


# --- arguments -----------------------------------------------------------------------------------


def test_local_cluster_shapes() -> None:
    assert resolve() == ClusterSpec(processes=1, workers=1)
    assert resolve("--processes", "3", "--workers", "2") == ClusterSpec(3, 2)
    assert not resolve("--processes", "3").is_member


def test_one_member_of_a_multi_host_cluster() -> None:
    spec = resolve("--process-id", "1", "--addresses", "h1:2101; h2:2101;h3:2101;")
    assert spec == ClusterSpec(3, 1, 1, ("h1:2101", "h2:2101", "h3:2101"))
    assert spec.is_member
    # --processes may be given when it agrees with the addresses
    assert resolve("--processes", "2", "--process-id", "0", "--addresses", "a:1;b:1").processes == 2
    assert resolve("--process-id", "0", "--addresses", "[::1]:2101;[::1]:2102").addresses == (
        "[::1]:2101",
        "[::1]:2102",
    )


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--process-id", "2", "--addresses", "a:1;b:1"], ["out of range", "0 to 1"]),
        (["--process-id", "-1", "--addresses", "a:1;b:1"], ["start at 0"]),
        (["--process-id", "0"], ["--addresses", "--processes alone"]),
        (["--addresses", "a:1;b:1"], ["--process-id"]),
        (["--processes", "3", "--process-id", "0", "--addresses", "a:1;b:1"], ["disagrees", "2"]),
        (["--process-id", "0", "--addresses", "a;b:1"], ["'a' is not host:port"]),
        (["--process-id", "0", "--addresses", "a:x"], ["'a:x' needs a port"]),
        (["--process-id", "0", "--addresses", "a:0"], ["needs a port between 1 and 65535"]),
        (["--process-id", "0", "--addresses", "a:65536"], ["needs a port"]),
        (["--process-id", "0", "--addresses", ":2101"], ["is not host:port"]),
        (["--process-id", "0", "--addresses", "::1:2101"], ["is not host:port"]),
        (["--process-id", "0", "--addresses", "a:1;a:1"], ["more than once"]),
        (["--process-id", "0", "--addresses", " ; "], ["empty"]),
    ],
)
def test_bad_cluster_arguments_say_what_is_wrong(argv: list[str], fragments: list[str]) -> None:
    message = usage_error(*argv)
    for fragment in fragments:
        assert fragment in message, message


def test_identity_from_the_variables_bytewax_reads(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile.txt"
    hostfile.write_text("ff-0.ff:2101\n\nff-1.ff:2101\nff-2.ff:2101\n")
    env = {
        "BYTEWAX_POD_NAME": "ff-2",
        "BYTEWAX_STATEFULSET_NAME": "ff",
        "BYTEWAX_HOSTFILE_PATH": str(hostfile),
        "BYTEWAX_WORKERS_PER_PROCESS": "4",
    }
    assert resolve(env=env) == ClusterSpec(
        3, 4, 2, ("ff-0.ff:2101", "ff-1.ff:2101", "ff-2.ff:2101")
    )
    # flags win over the variables
    assert resolve("--workers", "1", "--process-id", "0", env=env).process_id == 0
    assert resolve("--workers", "1", "--process-id", "0", env=env).workers == 1
    env2 = {"BYTEWAX_PROCESS_ID": "1", "BYTEWAX_ADDRESSES": "a:1;b:1"}
    assert resolve(env=env2) == ClusterSpec(2, 1, 1, ("a:1", "b:1"))
    # --processes alone means a cluster on this host, whatever the environment says
    assert resolve("--processes", "2", env=env2) == ClusterSpec(2, 1)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"BYTEWAX_POD_NAME": "web-0", "BYTEWAX_STATEFULSET_NAME": "ff"}, "<ordinal>"),
        ({"BYTEWAX_PROCESS_ID": "one", "BYTEWAX_ADDRESSES": "a:1"}, "not a whole number"),
        ({"BYTEWAX_PROCESS_ID": "0", "BYTEWAX_HOSTFILE_PATH": "/nonexistent/h"}, "No such file"),
        ({"BYTEWAX_PROCESS_ID": "3", "BYTEWAX_ADDRESSES": "a:1;b:1"}, "BYTEWAX_PROCESS_ID=3"),
        ({"BYTEWAX_PROCESS_ID": "0"}, "BYTEWAX_HOSTFILE_PATH"),
        ({"BYTEWAX_WORKERS_PER_PROCESS": "0"}, "at least 1"),
    ],
)
def test_bad_cluster_variables(env: dict[str, str], fragment: str) -> None:
    assert fragment in usage_error(env=env)


def test_argparse_refuses_bad_numbers() -> None:
    for argv in (
        ["--max-restarts", "-1"],
        ["--restart-window", "0"],
        ["--processes", "0"],
        ["--process-id", "x"],
    ):
        with pytest.raises(SystemExit) as caught:
            run_args(*argv)
        assert caught.value.code == 2
    args = run_args("--max-restarts", "0", "--restart-window", "30")
    assert (args.max_restarts, args.restart_window) == (0, 30.0)


def test_cli_exits_2_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in runner.BYTEWAX_IDENTITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FANFARE_HOME", str(tmp_path))
    code = cli.main(["run", "fanout", "--process-id", "4", "--addresses", "a:2101;b:2101"])
    assert code == 2
    err = capsys.readouterr().err
    assert "fanfare run: error: --process-id=4 is out of range" in err
    assert not (tmp_path / "recovery").exists()  # nothing started or created


def test_ports_collide_with_readiness() -> None:
    settings = Settings(metrics_port=3030, ready_port=3032)
    runner.check_ports(settings, ClusterSpec(2, 1))
    with pytest.raises(UsageError, match="FANFARE_READY_PORT=3032 is one of the /metrics ports"):
        runner.check_ports(settings, ClusterSpec(3, 1))
    with pytest.raises(UsageError, match="no room"):
        runner.check_ports(Settings(metrics_port=65_535), ClusterSpec(2, 1))
    runner.check_ports(Settings(metrics_port=3032, ready_port=0), ClusterSpec(1, 1))


def test_plans_a_local_cluster_with_fresh_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BYTEWAX_POD_NAME", "ff-0")
    monkeypatch.setenv("BYTEWAX_ADDRESSES", "x:1")
    settings = Settings(home=Path("/h"), metrics_port=5000)
    members = runner.plan_members(settings, "fanout", ClusterSpec(2, 3))
    assert [m.process_id for m in members] == [0, 1]
    assert [m.metrics_url for m in members] == [
        "http://127.0.0.1:5000/metrics",
        "http://127.0.0.1:5001/metrics",
    ]
    a0 = members[0].command[members[0].command.index("-a") + 1]
    assert a0 == members[1].command[members[1].command.index("-a") + 1]
    assert len(set(a0.split(";"))) == 2
    for m in members:
        assert m.command[m.command.index("-w") + 1] == "3"
        assert m.command[m.command.index("-i") + 1] == str(m.process_id)
        assert m.command[m.command.index("-r") + 1] == "/h/recovery/fanout"
        assert "BYTEWAX_POD_NAME" not in m.env and "BYTEWAX_ADDRESSES" not in m.env
        assert m.env["FANFARE_METRICS_PORT"] == str(5000 + m.process_id)
        assert "BYTEWAX_DATAFLOW_API_ENABLED" not in m.env  # Bytewax's server binds 0.0.0.0
        assert m.command[1:4] == ["-m", "flows.runtime.flow_process", "fanout"]
    single = runner.plan_members(settings, "acks", ClusterSpec(1, 1))
    assert "-i" not in single[0].command and single[0].command[3] == "acks"


def test_bytewax_metrics_server_is_chosen_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    # A shell's BYTEWAX_DATAFLOW_API_ENABLED would start a server on every interface.
    monkeypatch.setenv("BYTEWAX_DATAFLOW_API_ENABLED", "1")
    monkeypatch.setenv("BYTEWAX_DATAFLOW_API_PORT", "9999")
    (own,) = runner.plan_members(Settings(metrics_port=5000), "fanout", ClusterSpec(1, 1))
    assert "BYTEWAX_DATAFLOW_API_ENABLED" not in own.env
    assert "BYTEWAX_DATAFLOW_API_PORT" not in own.env
    assert own.metrics_url == "http://127.0.0.1:5000/metrics"
    settings = Settings(metrics_port=5000, metrics_server="bytewax")
    (bytewax,) = runner.plan_members(settings, "fanout", ClusterSpec(1, 1))
    assert bytewax.env["BYTEWAX_DATAFLOW_API_ENABLED"] == "1"
    assert bytewax.env["BYTEWAX_DATAFLOW_API_PORT"] == "5000"
    there = Settings(metrics_port=5000, metrics_host="10.1.2.3")
    assert runner.plan_members(there, "acks", ClusterSpec(1, 1))[0].metrics_url == (
        "http://10.1.2.3:5000/metrics"
    )
    v6 = Settings(metrics_port=5000, metrics_host="::")
    assert runner.plan_members(v6, "acks", ClusterSpec(1, 1))[0].metrics_url == (
        "http://[::1]:5000/metrics"
    )


def test_a_member_on_the_loopback_is_refused_when_peers_are_elsewhere() -> None:
    remote = ClusterSpec(2, 1, 0, ("10.0.0.1:2101", "10.0.0.2:2101"))
    with pytest.raises(UsageError, match="FANFARE_METRICS_HOST") as err:
        runner.check_peers_reach_metrics(Settings(), remote)
    assert "10.0.0.2:2101" in str(err.value) and "10.0.0.1" not in str(err.value)  # not itself
    # Reachable: an address of this host, every interface, Bytewax's server, or local peers.
    runner.check_peers_reach_metrics(Settings(metrics_host="10.0.0.1"), remote)
    runner.check_peers_reach_metrics(Settings(metrics_host="0.0.0.0"), remote)
    runner.check_peers_reach_metrics(Settings(metrics_server="bytewax"), remote)
    local = ClusterSpec(2, 1, 1, ("127.0.0.1:2101", "localhost:2102"))
    runner.check_peers_reach_metrics(Settings(), local)
    runner.check_peers_reach_metrics(Settings(), ClusterSpec(2, 1))  # the whole cluster here


def test_plans_one_member_and_its_peers() -> None:
    settings = Settings(metrics_port=3030)
    spec = ClusterSpec(3, 1, 1, ("ff-0.ff:2101", "ff-1.ff:2101", "[fd00::2]:2101"))
    (member,) = runner.plan_members(settings, "fanout", spec)
    assert member.process_id == 1
    assert member.command[-4:] == ["-i", "1", "-a", "ff-0.ff:2101;ff-1.ff:2101;[fd00::2]:2101"]
    assert member.env["FANFARE_METRICS_PORT"] == "3030"
    assert runner.peer_metrics_urls(settings, spec) == [
        "http://ff-0.ff:3030/metrics",
        "http://[fd00::2]:3030/metrics",
    ]


def test_member_recovery_dir_keeps_its_share(tmp_path: Path) -> None:
    path = tmp_path / "recovery"
    assert runner.ensure_recovery_dir(path, 5, member=(1, 2))
    assert sorted(p.name for p in path.glob("part-*")) == ["part-1.sqlite3", "part-3.sqlite3"]
    assert not runner.ensure_recovery_dir(path, 5, member=(1, 2))  # made once
    with pytest.raises(UsageError, match="split over 2 members, but the cluster now has 3"):
        runner.ensure_recovery_dir(path, 5, member=(1, 3))
    local = tmp_path / "local"
    assert runner.ensure_recovery_dir(local, 3)
    assert len(list(local.glob("part-*.sqlite3"))) == 3


def test_recovery_dirs_have_a_lineage_kept_until_the_directory_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "recovery"
    assert runner.ensure_recovery_dir(path, 2)
    lineage = recovery_lineage(path)
    assert len(lineage) == 16
    assert not runner.ensure_recovery_dir(path, 2)
    assert recovery_lineage(path) == lineage  # every execution from it: one lineage
    other = tmp_path / "other"
    assert runner.ensure_recovery_dir(other, 2)
    assert recovery_lineage(other) not in ("", lineage)
    continued = tmp_path / "continued"
    assert runner.ensure_recovery_dir(continued, 2, lineage=lineage)  # a rebuild
    assert recovery_lineage(continued) == lineage
    # A directory from before lineage ids (or made by Bytewax's own tool) is given one.
    (path / RECOVERY_MARKER).write_text(json.dumps({"partitions": 2}))
    assert not runner.ensure_recovery_dir(path, 2)
    assert recovery_lineage(path) not in ("", lineage)
    assert read_marker(path)["partitions"] == 2
    (path / RECOVERY_MARKER).unlink()
    assert not runner.ensure_recovery_dir(path, 2)
    assert recovery_lineage(path)


# --- the restart policy --------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(max_restarts=10, window_s=600, base_delay_s=1, max_delay_s=30)
    failures: list[float] = []
    delays = []
    for i in range(11):
        now = float(i)
        delays.append(restart_delay(policy, failures, now))
        failures.append(now)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30, None]


def test_failures_outside_the_window_are_forgotten() -> None:
    policy = RestartPolicy(max_restarts=2, window_s=100, base_delay_s=0.5, max_delay_s=60)
    assert restart_delay(policy, [], 0) == 0.5
    assert restart_delay(policy, [0], 10) == 1.0
    assert restart_delay(policy, [0, 10], 20) is None  # a third failure within 100 s
    assert restart_delay(policy, [0, 10], 105) == 1.0  # the one at 0 has left the window
    assert restart_delay(policy, [0, 10], 500) == 0.5
    assert restart_delay(RestartPolicy(max_restarts=0), [], 0) is None  # never restart


def test_exit_descriptions() -> None:
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-15) == "was killed by SIGTERM"


# --- the supervisor, with tiny real processes ----------------------------------------------------


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def supervise(
    plan: Any, policy: RestartPolicy, **kwargs: Any
) -> tuple[Supervisor, threading.Thread, list[int]]:
    sup = Supervisor("test", plan, policy, **kwargs)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(sup.run()), daemon=True)
    thread.start()
    return sup, thread, result


def wait_until(check: Any, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_gives_up_after_max_restarts(caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[int] = []

    def plan(attempt: int) -> list[Member]:
        attempts.append(attempt)
        return [
            Member(0, py("import time; time.sleep(30)"), {}, "u0"),
            Member(1, py("import sys; sys.exit(1)"), {}, "u1"),
        ]

    policy = RestartPolicy(max_restarts=2, window_s=60, base_delay_s=0.05, max_delay_s=0.1)
    caplog.set_level("INFO", "fanfare.supervisor")
    sup = Supervisor("test", plan, policy, fail_grace_s=2)
    started = time.monotonic()
    assert sup.run() == 1
    assert time.monotonic() - started < 15
    assert attempts == [0, 1, 2]
    assert sup.restarts == 2 and sup.state == "stopped"
    text = caplog.text
    assert "process 1 (pid" in text and "exited with code 1" in text
    assert "restarting in 0.05 s" in text and "restarting in 0.1 s" in text
    assert "giving up: 3 failures within 60 s (--max-restarts 2)" in text


@pytest.mark.parametrize(
    ("code", "why"),
    [(2, "a setting it cannot use"), (3, "something it needs is missing or taken")],
)
def test_a_failure_a_restart_cannot_fix_stops_the_cluster_at_once(
    code: int, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[int] = []

    def plan(attempt: int) -> list[Member]:
        attempts.append(attempt)
        return [
            Member(0, py("import time; time.sleep(30)"), {}, "u0"),
            Member(1, py(f"import sys; sys.exit({code})"), {}, "u1"),
        ]

    caplog.set_level("INFO", "fanfare.supervisor")
    sup = Supervisor("test", plan, RestartPolicy(base_delay_s=0.05), fail_grace_s=2)
    started = time.monotonic()
    assert sup.run() == code
    assert attempts == [0] and sup.restarts == 0  # no restart loop
    assert time.monotonic() - started < 10
    assert why in caplog.text and "a restart cannot fix that" in caplog.text
    assert "restarting in" not in caplog.text


def test_a_bad_setting_found_a_moment_after_a_peer_failed_still_stops_the_cluster(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts: list[int] = []
    late_config_error = (
        "import signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "time.sleep(1.0); sys.exit(2)"
    )

    def plan(attempt: int) -> list[Member]:
        attempts.append(attempt)
        return [
            # Lost its peer, say; after its peer has started (and ignores the SIGINT it gets).
            Member(0, py("import sys, time; time.sleep(0.5); sys.exit(1)"), {}, "u0"),
            Member(1, py(late_config_error), {}, "u1"),
        ]

    caplog.set_level("INFO", "fanfare.supervisor")
    sup = Supervisor("test", plan, RestartPolicy(base_delay_s=0.05), fail_grace_s=3)
    assert sup.run() == 2
    assert attempts == [0] and "restarting in" not in caplog.text


def test_a_stopped_members_panic_report_is_dropped_and_a_failures_kept() -> None:
    report = [
        b"thread '<unnamed>' panicked at src/run.rs:133:25:\n",
        b"Box<dyn Any>\n",
        b"stack backtrace:\n",
        b"   0: std::panicking::begin_panic\n",
        b"             at /rustc/library/std/src/panicking.rs:1:1\n",
        b"note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.\n",
    ]
    after = b"2026-12-06 10:00:00 INFO fanfare.supervisor: stopped\n"
    stopped = StopNoiseFilter()
    assert [line for line in [*report, after] if stopped.keep(line, asked_to_stop=True)] == [after]
    failed = StopNoiseFilter()  # not asked to stop: a real panic, every line kept
    assert [line for line in report if failed.keep(line, asked_to_stop=False)] == report


def test_a_killed_member_restarts_the_whole_cluster() -> None:
    procs: list[Any] = []

    def plan(attempt: int) -> list[Member]:
        return [Member(i, py("import time; time.sleep(60)"), {}, f"u{i}") for i in range(2)]

    import subprocess

    def spawn(m: Member) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(m.command)
        procs.append(p)
        return p

    policy = RestartPolicy(max_restarts=5, base_delay_s=0.05)
    sup, thread, result = supervise(plan, policy, spawn=spawn, fail_grace_s=0.5)
    wait_until(lambda: len(sup.running_members()) == 2)
    first = list(procs)
    first[1].send_signal(signal.SIGKILL)
    wait_until(lambda: len(procs) == 4 and len(sup.running_members()) == 2)
    assert [p.poll() for p in first] == [-signal.SIGINT, -signal.SIGKILL]  # survivor stopped
    assert sup.restarts == 1 and "process 1" in (sup.last_failure or "")
    assert "was killed by SIGKILL" in (sup.last_failure or "")
    sup.request_stop(signal.SIGTERM)
    thread.join(20)
    assert result == [0]
    assert all(p.poll() is not None for p in procs)  # nothing left running


def test_stop_escalates_to_sigkill_and_never_restarts() -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    starts: list[int] = []

    def plan(attempt: int) -> list[Member]:
        starts.append(attempt)
        return [Member(0, py(stubborn), {}, "u0")]

    sup, thread, result = supervise(plan, RestartPolicy(base_delay_s=0.01), stop_grace_s=0.5)
    wait_until(lambda: sup.running_members() != [])
    time.sleep(0.3)  # let the child install its handler
    began = time.monotonic()
    sup.request_stop(signal.SIGTERM)
    thread.join(20)
    assert result == [0]
    assert 0.4 < time.monotonic() - began < 5
    assert starts == [0]
    assert sup.status()["pids"] == []


def test_members_die_with_the_supervisor(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a supervisor killed with SIGKILL leaves no member behind."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    import os
    import subprocess

    pid_file = tmp_path / "child.pid"
    script = f"""
import sys
from flows.runtime.supervisor import Member, spawn_member
p = spawn_member(Member(0, [sys.executable, "-c",
    "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"], {{}}, "u"))
p.wait()
"""
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=root)
    wait_until(lambda: pid_file.exists() and pid_file.read_text() != "")
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()

    def gone() -> bool:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    wait_until(gone, 10)
    assert not os.path.exists(f"/proc/{child}") or gone()


# --- readiness -----------------------------------------------------------------------------------


def test_flow_check_counts_shards_over_every_member() -> None:
    ok = flow_check("fanout", [Scrape("a", 3.0), Scrape("b", 1.0)], 4)
    assert ok == CheckResult(True, "changelogs caught up: 4 of 4 follower shards (2 process(es))")
    behind = flow_check("fanout", [Scrape("a", 3.0), Scrape("b", 0.0)], 4)
    assert not behind.ok and "3 of 4" in behind.detail
    # a process that hosts no shard (absent or 0) is fine once the others cover all of them
    assert flow_check("fanout", [Scrape("a", 4.0), Scrape("b", None)], 4).ok
    down = flow_check("fanout", [Scrape("a", 4.0), Scrape("b", error="refused")], 4)
    assert not down.ok and "1 of 2 process(es) not answering: b: refused" in down.detail
    assert not flow_check("fanout", [], 4).ok
    assert "restarting" in flow_check("delivery", [], 4).detail
    # delivery and acks: ready when their processes answer (their sources run)
    assert flow_check("delivery", [Scrape("a", None)], 4) == CheckResult(
        True, "1 process(es) running"
    )
    assert not flow_check("acks", [Scrape("a", error="timed out")], 4).ok


def test_aggregate_is_503_when_any_check_fails() -> None:
    good = CheckResult(True, "fine")
    status, body = aggregate({"broker": good, "redis": good, "flow": good}, flow="fanout")
    assert status == 200 and body["ready"] is True and body["flow"] == "fanout"
    status, body = aggregate({"broker": good, "redis": CheckResult(False, "refused")})
    assert status == 503 and body["ready"] is False
    assert body["checks"]["redis"] == {"ok": False, "detail": "refused"}
    assert body["checks"]["broker"] == {"ok": True, "detail": "fine"}


class Fakes:
    def __init__(self) -> None:
        self.broker = CheckResult(True, "up")
        self.redis = CheckResult(True, "up")
        self.members = ["m0", "m1"]
        self.shards = {"m0": 2.0, "m1": 1.0}

    def checker(self, flow: str = "fanout") -> ReadinessChecker:
        return ReadinessChecker(
            Settings(shard_count=3),
            flow,
            lambda: self.members,
            broker=lambda _s: self.broker,
            redis_probe=lambda _s: self.redis,
            scrape=lambda url: Scrape(url, self.shards.get(url)),
        )


def test_checker_aggregates_its_probes() -> None:
    fakes = Fakes()
    checker = fakes.checker()
    try:
        status, body = checker.check()
        assert status == 200, body
        assert set(body["checks"]) == {"broker", "redis", "flow"}
        fakes.shards["m1"] = 0.0
        assert checker.check()[0] == 503
        fakes.shards["m1"] = 1.0
        fakes.redis = CheckResult(False, "PING failed")
        status, body = checker.check()
        assert status == 503 and body["checks"]["redis"]["detail"] == "PING failed"
        fakes.redis = CheckResult(True, "up")
        fakes.members = []  # restarting
        assert checker.check()[0] == 503
    finally:
        checker.close()


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_server_routes() -> None:
    fakes = Fakes()
    checker = fakes.checker()
    server = readiness.HealthServer(
        "127.0.0.1", 0, checker.check, lambda: (200, {"live": True, "state": "running"})
    )
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert get(base + "/ready")[0] == 200
        fakes.broker = CheckResult(False, "no answer")
        status, body = get(base + "/ready")
        assert status == 503 and body["checks"]["broker"] == {"ok": False, "detail": "no answer"}
        assert get(base + "/live") == (200, {"live": True, "state": "running"})
        assert get(base + "/nope")[0] == 404
        assert readiness.fetch_ready(base + "/ready")[0] == 503
        assert readiness.ready_url("0.0.0.0", server.port) == base + "/ready"
    finally:
        server.close()
        checker.close()
    assert readiness.fetch_ready(base + "/ready", 1)[0] is None  # closed


def test_health_server_binds_an_ipv6_address() -> None:
    # FANFARE_READY_HOST=:: (or ::1) must bind, as ready_url already assumed it could.
    server = readiness.HealthServer("::1", 0, lambda: (200, {}), lambda: (200, {"live": True}))
    server.start()
    try:
        assert server.address[0] == "::1"
        assert get(readiness.local_url("::1", server.port, "/live")) == (200, {"live": True})
    finally:
        server.close()


def test_real_probes_report_a_closed_port() -> None:
    from flows.runtime.ports import free_port

    port = free_port()
    settings = Settings(kafka_brokers=f"127.0.0.1:{port}", redis_url=f"redis://127.0.0.1:{port}/0")
    broker = readiness.probe_broker(settings, timeout_s=0.5)
    assert not broker.ok and f"127.0.0.1:{port}" in broker.detail
    redis_result = readiness.probe_redis(settings, timeout_s=0.5)
    assert not redis_result.ok and "PING" in redis_result.detail
    scrape = readiness.scrape_member(f"http://127.0.0.1:{port}/metrics", timeout_s=0.5)
    assert scrape.error is not None


def test_run_files_list_live_supervisors_only(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    path = readiness.write_run_file(settings, {"flow": "fanout", "ready_url": "http://x/ready"})
    (readiness.run_dir(settings) / "acks-999999999.json").write_text(
        json.dumps({"flow": "acks", "pid": 999_999_999})
    )
    flows = readiness.running_flows(settings)
    assert [f["flow"] for f in flows] == ["fanout"]
    assert not (readiness.run_dir(settings) / "acks-999999999.json").exists()  # stale: removed
    path.unlink()
    assert readiness.running_flows(settings) == []


# --- the gauge the fan-out sets ------------------------------------------------------------------


def test_a_shard_counts_itself_caught_up_once() -> None:
    gauge = metrics.CHANGELOGS_CAUGHT_UP_SHARDS
    before = gauge._value.get()
    shard = FollowerShard(["follow_changes/0", "device_changes/0"])
    logic = ExpandFollowerShardLogic(shard, lambda: None, 100, lambda: None)  # type: ignore[arg-type,return-value]
    logic._work = lambda now, tally, notified: []  # type: ignore[method-assign]
    from datetime import UTC, datetime

    logic._clock = lambda: datetime.now(UTC)
    logic.on_batch([CaughtUp("follow_changes/0", 1.0)])
    assert gauge._value.get() == before
    logic.on_batch([CaughtUp("device_changes/0", 2.0)])
    assert gauge._value.get() == before + 1
    logic.on_batch([CaughtUp("device_changes/0", 3.0), CaughtUp("follow_changes/0", 3.0)])
    assert gauge._value.get() == before + 1  # once per shard
    ExpandFollowerShardLogic(FollowerShard([]), lambda: None, 1, lambda: None)  # type: ignore[arg-type,return-value]
    assert gauge._value.get() == before + 2  # no changelog: caught up at once
