"""`fanfare run FLOW`: run a dataflow as a Bytewax cluster under a supervisor.

Two shapes:

- the whole cluster on this host: `--processes P --workers W` starts P `python -m bytewax.run`
  processes, each behind flows/runtime/flow_process.py (process i serves /metrics on
  FANFARE_METRICS_PORT + i; the cluster's own ports are picked free at every start);
- one member of a multi-host cluster: `--process-id I --addresses "h1:2101;h2:2101"` (or the
  environment variables `python -m bytewax.run` reads: BYTEWAX_PROCESS_ID, or BYTEWAX_POD_NAME
  with BYTEWAX_STATEFULSET_NAME; BYTEWAX_ADDRESSES or BYTEWAX_HOSTFILE_PATH). The cluster has
  one process per address; this one serves /metrics on FANFARE_METRICS_PORT.

Either way a supervisor (flows/runtime/supervisor.py) restarts failed members from the recovery
directory with backoff, and `GET /ready` / `GET /live` answer on FANFARE_READY_PORT
(flows/runtime/readiness.py). A restart resumes where the last snapshot left off; `--fresh`
starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from flows.registry import FLOW_PROCESS_MODULE, FLOWS
from flows.runtime import readiness
from flows.runtime.logs import log_started
from flows.runtime.ports import free_ports
from flows.runtime.preflight import exit_code, startup_problems
from flows.runtime.recovery_marker import (
    RECOVERY_MARKER,
    read_marker,
    recovery_lineage,
    write_marker,
)
from flows.runtime.supervisor import Member, RestartPolicy, Supervisor
from operators.config import Settings

log = logging.getLogger("fanfare.runner")

# What `python -m bytewax.run` reads for a cluster member's identity. `fanfare run` reads them
# itself, passes -w/-i/-a explicitly and keeps them from the children, so that a process never
# derives another identity than the one the supervisor gave it.
BYTEWAX_IDENTITY_VARIABLES = (
    "BYTEWAX_PROCESS_ID",
    "BYTEWAX_ADDRESSES",
    "BYTEWAX_POD_NAME",
    "BYTEWAX_STATEFULSET_NAME",
    "BYTEWAX_HOSTFILE_PATH",
    "BYTEWAX_WORKERS_PER_PROCESS",
)


class UsageError(ValueError):
    """A bad `fanfare run` argument or cluster variable; the message says which and why."""


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster this command runs: all of it here, or one member of a multi-host one."""

    processes: int
    workers: int
    process_id: int | None = None  # None: every process on this host
    addresses: tuple[str, ...] = ()

    @property
    def is_member(self) -> bool:
        """True for one member of a multi-host cluster."""
        return self.process_id is not None


# --- arguments -----------------------------------------------------------------------------------


def parse_addresses(text: str, source: str = "--addresses") -> tuple[str, ...]:
    """`h1:2101;h2:2101` into ('h1:2101', 'h2:2101'); every entry needs a host and a port."""
    entries = [a.strip() for a in text.split(";") if a.strip()]
    if not entries:
        raise UsageError(f'{source} is empty: give every member as "host:port;host:port"')
    for entry in entries:
        if entry.startswith("["):  # [::1]:2101
            host, _, rest = entry[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = entry.rpartition(":")
        bare_ipv6 = ":" in host and not entry.startswith("[")
        if not host or bare_ipv6 or any(c.isspace() for c in entry):
            raise UsageError(f"{source}: {entry!r} is not host:port")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65_535:
            raise UsageError(f"{source}: {entry!r} needs a port between 1 and 65535")
    dupes = sorted({e for e in entries if entries.count(e) > 1})
    if dupes:
        raise UsageError(f"{source} names {', '.join(dupes)} more than once")
    return tuple(entries)


def _int_from(text: str, source: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(f"{source}={text!r} is not a whole number") from None
    if value < minimum:
        raise UsageError(f"{source}={value} must be at least {minimum}")
    return value


def _process_id_from_env(env: Mapping[str, str]) -> tuple[int | None, str]:
    if env.get("BYTEWAX_PROCESS_ID", "").strip():
        return _int_from(env["BYTEWAX_PROCESS_ID"], "BYTEWAX_PROCESS_ID", 0), "BYTEWAX_PROCESS_ID"
    pod, statefulset = env.get("BYTEWAX_POD_NAME"), env.get("BYTEWAX_STATEFULSET_NAME")
    if pod and statefulset:
        # As bytewax.run: the pod's ordinal is its name without "<statefulset>-".
        prefix = statefulset + "-"
        ordinal = pod[len(prefix) :] if pod.startswith(prefix) else ""
        if not ordinal.isdigit():
            raise UsageError(
                f"BYTEWAX_POD_NAME={pod!r} is not <BYTEWAX_STATEFULSET_NAME>-<ordinal> "
                f"(BYTEWAX_STATEFULSET_NAME={statefulset!r})"
            )
        return int(ordinal), "BYTEWAX_POD_NAME"
    return None, ""


def _addresses_from_env(env: Mapping[str, str]) -> tuple[tuple[str, ...] | None, str]:
    if env.get("BYTEWAX_ADDRESSES", "").strip():
        return parse_addresses(env["BYTEWAX_ADDRESSES"], "BYTEWAX_ADDRESSES"), "BYTEWAX_ADDRESSES"
    hostfile = env.get("BYTEWAX_HOSTFILE_PATH", "").strip()
    if hostfile:
        try:
            text = Path(hostfile).read_text()
        except OSError as exc:
            raise UsageError(f"BYTEWAX_HOSTFILE_PATH={hostfile!r}: {exc.strerror}") from None
        # As bytewax.run: one address per line, blank lines ignored.
        joined = ";".join(line.strip() for line in text.splitlines() if line.strip())
        source = f"BYTEWAX_HOSTFILE_PATH ({hostfile})"
        return parse_addresses(joined, source), source
    return None, ""


def resolve_cluster(args: argparse.Namespace, env: Mapping[str, str]) -> ClusterSpec:
    """Check the cluster arguments (flags first, then the BYTEWAX_* variables)."""
    workers: int | None = getattr(args, "workers", None)
    if workers is None:
        raw = env.get("BYTEWAX_WORKERS_PER_PROCESS", "").strip()
        workers = _int_from(raw, "BYTEWAX_WORKERS_PER_PROCESS", 1) if raw else 1
    processes: int | None = getattr(args, "processes", None)
    process_id: int | None = getattr(args, "process_id", None)
    id_source = "--process-id"
    addresses_text: str | None = getattr(args, "addresses", None)
    if process_id is None and addresses_text is None and processes is not None:
        return ClusterSpec(processes, workers)  # --processes alone: all of it on this host
    if process_id is None:
        process_id, id_source = _process_id_from_env(env)
    if addresses_text is not None:
        addresses: tuple[str, ...] | None = parse_addresses(addresses_text)
        addr_source = "--addresses"
    elif process_id is not None:
        addresses, addr_source = _addresses_from_env(env)
    else:
        addresses, addr_source = None, ""
    if process_id is None and addresses is None:
        return ClusterSpec(processes or 1, workers)
    if process_id is None:
        raise UsageError(
            f"{addr_source} names the cluster's members, but not which one this is: "
            "add --process-id I (0 for the first address)"
        )
    if addresses is None:
        raise UsageError(
            f"{id_source} makes this one member of a multi-host cluster: give every member "
            'with --addresses "host:port;host:port" (or BYTEWAX_ADDRESSES / '
            "BYTEWAX_HOSTFILE_PATH); for a cluster on this host use --processes alone"
        )
    if process_id < 0:
        raise UsageError(f"{id_source}={process_id}: process ids start at 0")
    if processes is not None and processes != len(addresses):
        raise UsageError(
            f"--processes {processes} disagrees with the {len(addresses)} address(es) in "
            f"{addr_source}: a multi-host cluster has one process per address "
            "(leave --processes out)"
        )
    if process_id >= len(addresses):
        raise UsageError(
            f"{id_source}={process_id} is out of range: {addr_source} has "
            f"{len(addresses)} member(s), so use 0 to {len(addresses) - 1}"
        )
    return ClusterSpec(len(addresses), workers, process_id, addresses)


def metrics_ports(settings: Settings, spec: ClusterSpec) -> list[int]:
    """The /metrics port of each process this command starts."""
    if spec.is_member:
        return [settings.metrics_port]
    return [settings.metrics_port + i for i in range(spec.processes)]


def check_ports(settings: Settings, spec: ClusterSpec) -> None:
    """The metrics ports fit and do not collide with the readiness port."""
    ports = metrics_ports(settings, spec)
    if ports[-1] > 65_535:
        raise UsageError(
            f"FANFARE_METRICS_PORT={settings.metrics_port} leaves no room for "
            f"{spec.processes} /metrics ports (one per process)"
        )
    if settings.ready_port and settings.ready_port in ports:
        raise UsageError(
            f"FANFARE_READY_PORT={settings.ready_port} is one of the /metrics ports "
            f"({ports[0]}-{ports[-1]}); choose another for FANFARE_READY_PORT or "
            "FANFARE_METRICS_PORT"
        )


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_peers_reach_metrics(settings: Settings, spec: ClusterSpec) -> None:
    """A member of a multi-host cluster serves /metrics where its peers can read it.

    Each member's /ready counts the follower shards caught up across the cluster from its
    peers' /metrics; on the loopback no peer on another host could ever read them.
    """
    if not spec.is_member or not _is_loopback(settings.metrics_listen_host):
        return
    remote = [
        a
        for i, a in enumerate(spec.addresses)
        if i != spec.process_id and not _is_loopback(a.rpartition(":")[0])
    ]
    if remote:
        raise UsageError(
            f"this member serves /metrics on {settings.metrics_host}, which its peers on other "
            f"hosts ({', '.join(remote)}) cannot reach for /ready: set FANFARE_METRICS_HOST to "
            "this host's address in the cluster (or 0.0.0.0)"
        )


# --- recovery ------------------------------------------------------------------------------------


def ensure_recovery_dir(
    path: Path, partitions: int, member: tuple[int, int] | None = None, lineage: str = ""
) -> bool:
    """Create the recovery partitions once; returns True when it made them.

    For a member (process_id, processes) of a multi-host cluster, the directory keeps only its
    share, partitions k with k % processes == process_id: the cluster as a whole must hold every
    partition exactly once, and each member's directory is its own (a volume per pod). A marker
    records the split and the directory's lineage id (see `recovery_marker`); a member whose
    cluster size changed refuses to start. A directory from before lineage ids gets one; a
    new one gets `lineage` when given (a rebuild continues the old directory's), else a new id.
    """
    marker = path / RECOVERY_MARKER
    if marker.exists():
        made = read_marker(path)
        if member is not None and made.get("processes") not in (None, member[1]):
            raise UsageError(
                f"{path} holds this member's share of recovery partitions split over "
                f"{made.get('processes')} members, but the cluster now has {member[1]}: "
                "run every member with --fresh (start over), or move the part-* files so that "
                f"each partition is on exactly one member and delete {marker}"
            )
        if not recovery_lineage(path):
            write_marker(path, made)
        return False
    if any(path.glob("part-*.sqlite3")):
        write_marker(path, {})  # partitions made by hand or by Bytewax's tool: adopted
        return False
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "bytewax.recovery", str(path), str(partitions)], check=True
    )
    info: dict[str, Any] = {"partitions": partitions, "lineage": lineage}
    if member is not None:
        process_id, processes = member
        for k in range(partitions):
            if k % processes != process_id:
                for f in path.glob(f"part-{k}.sqlite3*"):
                    f.unlink()
        info.update(processes=processes, process_id=process_id)
    write_marker(path, info)
    return True


# --- the processes -------------------------------------------------------------------------------


def bytewax_command(
    settings: Settings, flow: str, workers: int, process_id: int | None, addresses: list[str]
) -> list[str]:
    """The command line of one process: `python -m bytewax.run` behind fanfare's /metrics."""
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}")
    cmd = [
        sys.executable,
        "-m",
        FLOW_PROCESS_MODULE,
        flow,
        "-w",
        str(workers),
        "-r",
        str(settings.recovery_dir(flow)),
        "-s",
        str(settings.snapshot_interval_s),
        "-b",
        "0",
    ]
    if process_id is not None:
        cmd += ["-i", str(process_id), "-a", ";".join(addresses)]
    return cmd


def process_env(
    settings: Settings, metrics_port: int, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment of one process: its own /metrics port, no BYTEWAX_* identity variables.

    Bytewax's API server runs only when FANFARE_METRICS_SERVER=bytewax: it binds every
    interface, so a BYTEWAX_DATAFLOW_API_ENABLED inherited from the shell is dropped otherwise.
    """
    env = dict(os.environ if environ is None else environ)
    for name in BYTEWAX_IDENTITY_VARIABLES:
        env.pop(name, None)
    env["FANFARE_METRICS_PORT"] = str(metrics_port)
    if settings.metrics_server == "bytewax":
        env["BYTEWAX_DATAFLOW_API_ENABLED"] = "1"
        env["BYTEWAX_DATAFLOW_API_PORT"] = str(metrics_port)
    else:
        env.pop("BYTEWAX_DATAFLOW_API_ENABLED", None)
        env.pop("BYTEWAX_DATAFLOW_API_PORT", None)
    return env


def member_metrics_url(settings: Settings, port: int) -> str:
    """Where this host reaches a local process's /metrics."""
    return readiness.local_url(settings.metrics_listen_host, port, "/metrics")


def plan_members(settings: Settings, flow: str, spec: ClusterSpec) -> list[Member]:
    """The processes to start now (local cluster ports are picked afresh at each start)."""
    ports = metrics_ports(settings, spec)
    if spec.is_member:
        assert spec.process_id is not None
        cmd = bytewax_command(settings, flow, spec.workers, spec.process_id, list(spec.addresses))
        url = member_metrics_url(settings, ports[0])
        return [Member(spec.process_id, cmd, process_env(settings, ports[0]), url)]
    if spec.processes == 1:
        cmd = bytewax_command(settings, flow, spec.workers, None, [])
        url = member_metrics_url(settings, ports[0])
        return [Member(0, cmd, process_env(settings, ports[0]), url)]
    addresses = [f"127.0.0.1:{p}" for p in free_ports(spec.processes)]
    return [
        Member(
            i,
            bytewax_command(settings, flow, spec.workers, i, addresses),
            process_env(settings, port),
            member_metrics_url(settings, port),
        )
        for i, port in enumerate(ports)
    ]


def peer_metrics_urls(settings: Settings, spec: ClusterSpec) -> list[str]:
    """The other members' /metrics (same FANFARE_METRICS_PORT on every host, as documented)."""
    urls = []
    for i, address in enumerate(spec.addresses):
        if i == spec.process_id:
            continue
        host = address.rpartition(":")[0]
        urls.append(f"http://{host}:{settings.metrics_port}/metrics")
    return urls


# --- the command ---------------------------------------------------------------------------------


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """`fanfare run FLOW` until stopped.

    Exit codes: 0 stopped by a signal, 1 gave up after restarts, 2 a bad argument or setting,
    3 something it needs is missing or taken (the broker, Redis, a topic, a port).
    """
    try:
        spec = resolve_cluster(args, os.environ)
        check_ports(settings, spec)
        check_peers_reach_metrics(settings, spec)
    except UsageError as exc:
        print(f"fanfare run: error: {exc}", file=sys.stderr)
        return 2
    problems = startup_problems(settings, args.flow, metrics_ports(settings, spec))
    for problem in problems:
        print(f"fanfare run {args.flow}: cannot start: {problem.line}", file=sys.stderr)
    if problems:
        return exit_code(problems)
    log_started(log, f"fanfare {args.flow}: start-up checks passed (broker, topics, Redis, ports)")
    try:
        recovery = settings.recovery_dir(args.flow)
        if args.fresh and recovery.exists():
            shutil.rmtree(recovery)
            print(f"fanfare: removed {recovery}; the flow starts from the topics' beginning")
        member = (spec.process_id, spec.processes) if spec.process_id is not None else None
        if ensure_recovery_dir(recovery, settings.recovery_partitions, member):
            print(f"fanfare: created recovery directory {recovery}")
    except UsageError as exc:
        print(f"fanfare run: error: {exc}", file=sys.stderr)
        return 2
    policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window)
    supervisor = Supervisor(
        f"fanfare {args.flow}", lambda _attempt: plan_members(settings, args.flow, spec), policy
    )
    peers = peer_metrics_urls(settings, spec)

    def members() -> list[str]:
        running = supervisor.running_members()
        # dict.fromkeys: each endpoint once, even if a peer's address names this host
        return list(dict.fromkeys([m.metrics_url for m in running] + peers)) if running else []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        supervisor.request_stop(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    checker = readiness.ReadinessChecker(
        settings, args.flow, members, extra=lambda: {"supervisor": supervisor.status()}
    )
    server = _serve_health(settings, checker, supervisor)
    ready = readiness.ready_url(settings.ready_host, server.port) if server else None
    run_file = readiness.write_run_file(
        settings,
        {
            "flow": args.flow,
            "ready_url": ready,
            "processes": spec.processes,
            "process_id": spec.process_id,
        },
    )
    where = (
        f"member {spec.process_id} of {spec.processes} ({';'.join(spec.addresses)})"
        if spec.is_member
        else f"{spec.processes} process(es)"
    )
    ports = ", ".join(str(p) for p in metrics_ports(settings, spec))
    print(
        f"fanfare: running {args.flow} with {where} x {spec.workers} worker(s); metrics on "
        f"port(s) {ports}; readiness at {ready or 'off'}; Ctrl-C stops",
        flush=True,
    )
    try:
        return supervisor.run()
    finally:
        if server is not None:
            server.close()
        checker.close()
        with contextlib.suppress(OSError):
            run_file.unlink()


def _serve_health(
    settings: Settings, checker: readiness.ReadinessChecker, supervisor: Supervisor
) -> readiness.HealthServer | None:
    if not settings.ready_port:
        return None

    def live() -> tuple[int, dict[str, Any]]:
        return 200, {"live": True, **supervisor.status()}

    try:
        server = readiness.HealthServer(
            settings.ready_host, settings.ready_port, checker.check, live
        )
    except OSError as exc:
        # Not fatal: the flow itself is fine (two flows on one host with the default port).
        log.warning(
            "readiness endpoint NOT served: cannot bind %s:%d (%s); give each flow on a host its "
            "own FANFARE_READY_PORT (0 turns it off)",
            settings.ready_host,
            settings.ready_port,
            exc.strerror or exc,
        )
        return None
    server.start()
    return server
