"""Keep a Bytewax cluster running: restart it whole when a member dies, stop it cleanly.

A Bytewax cluster fails together (a member that loses a peer panics), and only a fresh start
of every member resumes it, from the recovery directory. So when a member exits non-zero or is
killed, the supervisor stops the others (SIGINT, then SIGKILL after a short grace), waits an
exponential backoff and starts them all again, up to `max_restarts` failures within
`window_s` seconds; past that it gives up and exits 1. SIGTERM or SIGINT stop it: the members
get SIGINT (Bytewax shuts down when every member gets it), SIGKILL after `stop_grace_s`, and
the supervisor exits 0; it never restarts anything while stopping. A second signal kills the
members at once.

For a member of a multi-host cluster (`fanfare run --process-id`), the supervisor owns one
process: it restarts that one, and the peers' own supervisors (or Kubernetes) restart theirs;
the new members find each other again (Bytewax retries connecting to its peers).

On Linux every member is started with PR_SET_PDEATHSIG, so it dies with the supervisor even
when the supervisor is killed with SIGKILL (no orphaned cluster members).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

from flows.runtime.logs import log_started

log = logging.getLogger("fanfare.supervisor")

# Seconds members get to stop after SIGINT before SIGKILL (Kubernetes' default
# terminationGracePeriodSeconds is 30).
STOP_GRACE_S = 10.0
# Seconds the survivors of a failed member get before SIGKILL (they usually panic within 1 s).
FAIL_GRACE_S = 5.0
POLL_S = 0.1

EXIT_CONFIGURATION = 2
"""A member's exit code for a setting it cannot use: restarting cannot fix it."""
EXIT_CANNOT_START = 3
"""A member's (or `fanfare run`'s) exit code when something it needs is missing or taken at
start (the broker, Redis, a topic, a port): restarting cannot fix it either."""
PERMANENT_FAILURES = {
    EXIT_CONFIGURATION: "a setting it cannot use",
    EXIT_CANNOT_START: "something it needs is missing or taken",
}


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff, and a cap on failures within a sliding window."""

    max_restarts: int = 10
    window_s: float = 600.0
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0


def restart_delay(policy: RestartPolicy, earlier: Sequence[float], now: float) -> float | None:
    """Seconds to wait before restarting after a failure at `now`, or None to give up.

    `earlier` are the times of the previous failures. Only failures within the window count:
    the n-th of them waits base * 2**(n-1) seconds (capped at max_delay_s), so a cluster that
    ran well for a window starts over at the base delay; more than max_restarts failures
    within the window means the fault will not go away by itself.
    """
    recent = 1 + sum(1 for t in earlier if now - t < policy.window_s)
    if recent > policy.max_restarts:
        return None
    return float(min(policy.max_delay_s, policy.base_delay_s * 2 ** (recent - 1)))


def describe_exit(code: int) -> str:
    """`exited with code 1` or `was killed by SIGKILL` (Popen's negative return codes)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


@dataclass(frozen=True)
class Member:
    """One process of the cluster as this supervisor starts it."""

    process_id: int
    command: list[str]
    env: dict[str, str] = field(repr=False)
    metrics_url: str


# Runs before the member's program: ask the kernel to SIGKILL it when the supervisor dies,
# then check the supervisor did not die before that, then exec the real command.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(70)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def spawn_member(member: Member) -> subprocess.Popen[bytes]:
    """Start a member; on Linux it dies with this process (PR_SET_PDEATHSIG survives exec).

    Its stderr comes through a pipe, which the supervisor forwards (see `StopNoiseFilter`).
    """
    cmd = member.command
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *cmd]
    return subprocess.Popen(cmd, env=member.env, stderr=subprocess.PIPE)


_PANIC = re.compile(rb"^thread '[^']*' panicked at ")
_PANIC_DETAIL = re.compile(rb"^(\s|Box<dyn Any>|stack backtrace:|note: )")


class StopNoiseFilter:
    """Drops the Rust panic report a member prints when it is stopped on purpose.

    Bytewax ends a run on SIGINT by panicking its worker thread, and Rust's panic hook prints
    the panic (and, with RUST_BACKTRACE set, a 40-frame backtrace) although nothing failed.
    After the supervisor sent SIGINT, such a report is dropped: from its `thread '...' panicked
    at` line through its detail lines. Everything else, and every report of a member that was
    not asked to stop, is forwarded as it came.
    """

    def __init__(self) -> None:
        self._dropping = False

    def keep(self, line: bytes, asked_to_stop: bool) -> bool:
        """Whether to forward this stderr line."""
        if self._dropping and _PANIC_DETAIL.match(line):
            return False
        self._dropping = asked_to_stop and bool(_PANIC.match(line))
        return not self._dropping


def forward_stderr(source: IO[bytes], asked_to_stop: Callable[[], bool]) -> None:
    """Copy a member's stderr lines to ours until it closes, minus a stop's panic report."""
    noise = StopNoiseFilter()
    out = sys.stderr.buffer
    for line in iter(source.readline, b""):
        if noise.keep(line, asked_to_stop()):
            with contextlib.suppress(OSError, ValueError):
                out.write(line)
                out.flush()
    source.close()


class Supervisor:
    """Runs the members `plan` returns, restarts them together, stops them on request.

    `plan(attempt)` is called for every (re)start, so a local cluster can pick fresh ports.
    `request_stop` is safe to call from a signal handler (it only sets flags).
    """

    def __init__(
        self,
        name: str,
        plan: Callable[[int], list[Member]],
        policy: RestartPolicy,
        *,
        stop_grace_s: float = STOP_GRACE_S,
        fail_grace_s: float = FAIL_GRACE_S,
        spawn: Callable[[Member], subprocess.Popen[bytes]] = spawn_member,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._plan = plan
        self.policy = policy
        self._stop_grace_s = stop_grace_s
        self._fail_grace_s = fail_grace_s
        self._spawn = spawn
        self._clock = clock
        self._stopping = False
        self._kill_now = False
        self._procs: list[tuple[Member, subprocess.Popen[bytes]]] = []
        self._signalled: set[int] = set()  # pids this supervisor sent SIGINT to
        self._forwarders: list[threading.Thread] = []
        self.state = "starting"
        self.restarts = 0
        self.last_failure: str | None = None

    # --- called from signal handlers and the readiness thread -------------------------------

    def request_stop(self, signum: int | None = None) -> None:
        """Stop everything (the first call); a second call kills the members at once."""
        if self._stopping:
            self._kill_now = True
        self._stopping = True

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stopping

    def running_members(self) -> list[Member]:
        """The members of the current start while they all run; empty otherwise."""
        procs = list(self._procs)
        if self.state != "running" or not procs:
            return []
        if any(p.poll() is not None for _, p in procs):
            return []
        return [m for m, _ in procs]

    def status(self) -> dict[str, object]:
        """For /live: state, restarts so far, the last failure."""
        return {
            "state": self.state,
            "restarts": self.restarts,
            "last_failure": self.last_failure,
            "pids": [p.pid for _, p in self._procs if p.poll() is None],
        }

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped (0), every member ended cleanly (0) or giving up (1)."""
        failures: list[float] = []
        attempt = 0
        try:
            while not self._stopping:
                self._start(attempt)
                failed = self._watch()
                if failed is None:  # stop requested, or every member exited 0
                    if self._stopping:
                        self._shutdown(self._stop_grace_s, "stopping")
                    else:
                        log.info("%s: every process ended", self.name)
                    return 0
                what = "; ".join(
                    f"process {m.process_id} (pid {p.pid}) {describe_exit(code)}"
                    for m, p, code in failed
                )
                self.last_failure = what
                log.error("%s: %s; stopping the cluster", self.name, what)
                self.state = "restarting"
                self._shutdown(self._fail_grace_s, "failed")
                # Every member's code now: the one that found a bad setting may exit a moment
                # after a peer that only lost it.
                codes = {p.poll() for _, p in self._procs}
                permanent = sorted(c for c in codes if c in PERMANENT_FAILURES)
                if permanent:
                    code = permanent[0]
                    log.error(
                        "%s: a process exited with code %d (%s: see its message above); a "
                        "restart cannot fix that, so the cluster stays stopped. Fix it, then run "
                        "the flow again: it resumes from the recovery directory",
                        self.name,
                        code,
                        PERMANENT_FAILURES[code],
                    )
                    self.state = "failed"
                    return code
                if self._stopping:
                    return 0
                now = self._clock()
                delay = restart_delay(self.policy, failures, now)
                failures.append(now)
                if delay is None:
                    self.state = "failed"
                    log.error(
                        "%s: giving up: %d failures within %g s (--max-restarts %d); "
                        "the last: %s. Fix the cause, then run it again: it resumes from the "
                        "recovery directory",
                        self.name,
                        len(failures),
                        self.policy.window_s,
                        self.policy.max_restarts,
                        what,
                    )
                    return 1
                self.restarts += 1
                attempt += 1
                log.warning(
                    "%s: restarting in %g s from the recovery directory (restart %d; "
                    "%d failure(s) in the last window, --max-restarts %d in %g s)",
                    self.name,
                    delay,
                    self.restarts,
                    sum(1 for t in failures if now - t < self.policy.window_s),
                    self.policy.max_restarts,
                    self.policy.window_s,
                )
                if not self._sleep(delay):
                    return 0
            return 0
        finally:
            if any(p.poll() is None for _, p in self._procs):
                self._shutdown(0.0, "exiting")
            self.state = "stopped"
            if self._stopping:
                log.info("%s: stopped on request; every process has exited", self.name)

    def _start(self, attempt: int) -> None:
        members = self._plan(attempt)
        self._procs = []
        for m in members:
            proc = self._spawn(m)
            self._procs.append((m, proc))
            if proc.stderr is not None:
                pid = proc.pid
                forwarder = threading.Thread(
                    target=forward_stderr,
                    args=(proc.stderr, lambda pid=pid: pid in self._signalled),
                    name=f"stderr-{m.process_id}",
                    daemon=True,
                )
                forwarder.start()
                self._forwarders.append(forwarder)
        self.state = "running"
        pids = ", ".join(f"{m.process_id}: pid {p.pid}" for m, p in self._procs)
        log_started(log, f"{self.name}: started {len(self._procs)} process(es) ({pids})")

    def _watch(self) -> list[tuple[Member, subprocess.Popen[bytes], int]] | None:
        """The members that failed, or None when stopping or when all exited 0."""
        while not self._stopping:
            codes = [(m, p, p.poll()) for m, p in self._procs]
            failed = [(m, p, c) for m, p, c in codes if c is not None and c != 0]
            if failed:
                return failed
            if all(c == 0 for _, _, c in codes):
                return None
            time.sleep(POLL_S)
        return None

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless a stop is requested; False if it was."""
        deadline = self._clock() + seconds
        while not self._stopping:
            left = deadline - self._clock()
            if left <= 0:
                return True
            time.sleep(min(POLL_S, left))
        return False

    def _shutdown(self, grace_s: float, why: str) -> None:
        """SIGINT every live member, SIGKILL what is left after grace_s, reap them all."""
        if why == "stopping":
            self.state = "stopping"
        alive = [(m, p) for m, p in self._procs if p.poll() is None]
        if alive and grace_s > 0:
            log.info(
                "%s: %s: sending SIGINT to %d process(es), SIGKILL after %g s",
                self.name,
                why,
                len(alive),
                grace_s,
            )
            for _, p in alive:
                self._signalled.add(p.pid)
                _signal(p, signal.SIGINT)
            deadline = self._clock() + grace_s
            while self._clock() < deadline and not self._kill_now:
                if all(p.poll() is not None for _, p in alive):
                    break
                time.sleep(POLL_S)
        for m, p in alive:
            if p.poll() is None:
                log.warning("%s: process %d (pid %d): SIGKILL", self.name, m.process_id, p.pid)
                _signal(p, signal.SIGKILL)
        for _, p in alive:
            p.wait()
        for forwarder in self._forwarders:  # the members' last lines, before ours
            forwarder.join(timeout=2.0)
        self._forwarders = [f for f in self._forwarders if f.is_alive()]


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
