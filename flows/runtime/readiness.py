"""Readiness and liveness of `fanfare run`: `GET /ready` and `GET /live` on FANFARE_READY_PORT.

`/ready` answers 200 with a JSON body of its checks when all pass, 503 when any fails:

- broker: a metadata request to FANFARE_KAFKA_BROKERS answers (short timeout);
- redis: PING at FANFARE_REDIS_URL answers;
- flow: every cluster member's `/metrics` answers (so its sources run), and for the fan-out
  the changelogs are caught up: the sum of `fanfare_changelogs_caught_up_shards` over the
  members equals FANFARE_SHARDS (each follower shard counts itself once every changelog
  partition has been read to its end since its process started).

`/live` answers 200 while the supervisor runs (it restarts failed members itself, so a liveness
probe should not restart the pod for a member's failure). The checks are plain functions over
probe results, so tests aggregate fakes; the probes themselves are small and real.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from flows.runtime.http_endpoint import BackgroundHTTPServer, QuietHandler
from flows.runtime.metrics_scrape import fetch_text, parse
from operators.config import Settings, redact_url

CAUGHT_UP_METRIC = "fanfare_changelogs_caught_up_shards"  # operators.metrics sets it
# Seconds each probe may take; the checks run in parallel, so /ready answers within about this.
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict and what it saw."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Scrape:
    """One member's /metrics: the caught-up shard count it reports, or why it did not answer."""

    url: str
    caught_up_shards: float | None = None
    error: str | None = None


# --- aggregation (pure) --------------------------------------------------------------------------


def flow_check(flow: str, scrapes: Sequence[Scrape], shard_count: int) -> CheckResult:
    """The flow's verdict from its members' /metrics.

    No member (starting, or restarting after a failure) or one that does not answer: not ready.
    The fan-out is ready once the members together count every follower shard as caught up;
    the delivery and acks flows once every member answers (their sources run).
    """
    if not scrapes:
        return CheckResult(False, "no worker process running (starting or restarting)")
    down = [s for s in scrapes if s.error is not None]
    if down:
        where = "; ".join(f"{s.url}: {s.error}" for s in down)
        return CheckResult(
            False, f"{len(down)} of {len(scrapes)} process(es) not answering: {where}"
        )
    if flow != "fanout":
        return CheckResult(True, f"{len(scrapes)} process(es) running")
    caught = int(sum(s.caught_up_shards or 0.0 for s in scrapes))
    if caught >= shard_count:
        return CheckResult(
            True,
            f"changelogs caught up: {caught} of {shard_count} follower shards "
            f"({len(scrapes)} process(es))",
        )
    return CheckResult(
        False,
        f"changelogs not caught up: {caught} of {shard_count} follower shards "
        f"({len(scrapes)} process(es))",
    )


def aggregate(checks: Mapping[str, CheckResult], **extra: Any) -> tuple[int, dict[str, Any]]:
    """HTTP status (200 all ok, 503 otherwise) and the JSON body listing every check."""
    ready = all(c.ok for c in checks.values())
    body: dict[str, Any] = {
        "ready": ready,
        **extra,
        "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
    }
    return (200 if ready else 503), body


# --- probes (real I/O) ---------------------------------------------------------------------------


def probe_broker(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> CheckResult:
    """A metadata request answers at FANFARE_KAFKA_BROKERS."""
    from operators.adapters.kafka.admin import wait_for_broker
    from operators.config import ConfigError

    try:
        ok = wait_for_broker(settings, timeout_s)
    except ConfigError as exc:
        return CheckResult(False, str(exc))
    if ok:
        return CheckResult(True, f"answers at {settings.kafka_brokers}")
    return CheckResult(False, f"no answer at {settings.kafka_brokers} within {timeout_s:g} s")


def probe_redis(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> CheckResult:
    """PING answers at FANFARE_REDIS_URL (the URL's password is never shown)."""
    where = redact_url(settings.redis_url)
    try:
        client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return CheckResult(False, f"PING at {where} failed: {exc}")
    return CheckResult(True, f"PING answered at {where}")


def scrape_member(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> Scrape:
    """A member's /metrics, reduced to the caught-up shard count (absent: None)."""
    try:
        text = fetch_text(url, timeout_s)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return Scrape(url, error=str(reason))
    try:
        samples = parse(text, prefixes=(CAUGHT_UP_METRIC,))
    except ValueError as exc:
        return Scrape(url, error=f"unreadable /metrics: {exc}")
    caught = [v for (name, _), v in samples.items() if name == CAUGHT_UP_METRIC]
    return Scrape(url, sum(caught) if caught else None)


class ReadinessChecker:
    """Runs the three probes in parallel and aggregates them (probes injectable for tests)."""

    def __init__(
        self,
        settings: Settings,
        flow: str,
        members: Callable[[], Sequence[str]],
        *,
        broker: Callable[[Settings], CheckResult] = probe_broker,
        redis_probe: Callable[[Settings], CheckResult] = probe_redis,
        scrape: Callable[[str], Scrape] = scrape_member,
        extra: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._settings = settings
        self._flow = flow
        self._members = members
        self._broker = broker
        self._redis = redis_probe
        self._scrape = scrape
        self._extra = extra or dict
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fanfare-ready")

    def _flow_result(self) -> CheckResult:
        urls = list(self._members())
        scrapes = list(self._pool.map(self._scrape, urls)) if urls else []
        return flow_check(self._flow, scrapes, self._settings.shard_count)

    def check(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body)."""
        started = time.monotonic()
        broker = self._pool.submit(self._broker, self._settings)
        redis_result = self._pool.submit(self._redis, self._settings)
        flow = self._flow_result()
        checks = {"broker": broker.result(), "redis": redis_result.result(), "flow": flow}
        return aggregate(
            checks,
            flow=self._flow,
            **self._extra(),
            took_s=round(time.monotonic() - started, 3),
        )

    def close(self) -> None:
        """Stop the probe threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- the HTTP endpoint ---------------------------------------------------------------------------


class HealthServer(BackgroundHTTPServer):
    """`GET /ready` and `GET /live` in a background thread of the supervisor."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], tuple[int, dict[str, Any]]],
        live: Callable[[], tuple[int, dict[str, Any]]],
    ) -> None:
        routes = {"/ready": ready, "/live": live}

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0].rstrip("/") or "/")
                if route is None:
                    self._send(404, {"error": "not found: try /ready or /live"})
                    return
                try:
                    status, body = route()
                except Exception as exc:  # a probe bug must not kill the endpoint
                    status, body = 503, {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
                self._send(status, body)

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, sort_keys=False).encode() + b"\n"
                self.send_body(status, data, "application/json")

        super().__init__(host, port, Handler, "fanfare-health")


def local_url(host: str, port: int, path: str) -> str:
    """Where a local client reaches `path` of an endpoint bound at host:port."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def ready_url(host: str, port: int) -> str:
    """Where a local client reaches the /ready endpoint bound at host:port."""
    return local_url(host, port, "/ready")


def fetch_ready(url: str, timeout_s: float = 5.0) -> tuple[int | None, dict[str, Any] | str]:
    """(status, body) of a /ready endpoint; (None, reason) when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError) as exc:
        return None, str(getattr(exc, "reason", None) or exc)


# --- run files: how `fanfare dev status` finds running flows -------------------------------------


def run_dir(settings: Settings) -> Path:
    """`$FANFARE_HOME/run`: one JSON file per running `fanfare run`."""
    return settings.home / "run"


def write_run_file(settings: Settings, info: Mapping[str, Any]) -> Path:
    """Record a running supervisor (flow, pid, ready URL); removed when it exits."""
    directory = run_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{info['flow']}-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    tmp.replace(path)
    return path


def running_flows(settings: Settings) -> list[dict[str, Any]]:
    """Run files of supervisors that are still alive (stale files are removed)."""
    out: list[dict[str, Any]] = []
    directory = run_dir(settings)
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            info = json.loads(path.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not _alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        out.append(info)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
