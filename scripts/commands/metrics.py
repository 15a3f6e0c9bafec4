"""`fanfare metrics [URL...]`: a readable summary of running workers' /metrics endpoints.

Each process of `fanfare run FLOW` serves Prometheus metrics on its own port. With no URL the
command finds the flows running from this `$FANFARE_HOME` (the run files `fanfare run` keeps in
`$FANFARE_HOME/run`): each supervisor's FANFARE_METRICS_PORT (read from its environment in
/proc, else this shell's) plus i for each of its processes. With no run file it tries 127.0.0.1
on `FANFARE_METRICS_PORT` and the next ports (`--scan`, 8 in all); ports of a scan that do not
answer are listed on one line. A URL may be `http://host:port/...`, `host:port` or a port.
Every endpoint that answers is summed: counters and histograms add up across processes, a
circuit's state is the worst any process reports, lag adds up per partition.

It prints the fan-out funnel, delivery (sends, outcomes, provider errors, holds, invalid tokens,
rate-limit waits, circuit states), acks, dead letters, latency percentiles estimated from the
histograms (as PromQL's histogram_quantile does) and consumer lag. `--watch N` samples every N
seconds and adds a per-second rate to each count, the percentiles then covering the last
interval. Exit codes: 0 when at least one endpoint answered, 1 when none did.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flows.runtime.metrics_scrape import (
    Sample,
    buckets,
    by_label,
    by_labels,
    fetch_text,
    histogram_quantile,
    parse,
    total,
)
from flows.runtime.readiness import local_url
from operators.config import Settings
from operators.fanout.eligibility import Suppressed
from scripts.commands.arguments import positive_int

DEFAULT_SCAN = 8  # ports tried from FANFARE_METRICS_PORT (`--scan`)
POST_REASONS = (Suppressed.PRIVATE.value, Suppressed.NOTIFY_FOLLOWERS_OFF.value)
CANDIDATE_REASONS = tuple(s.value for s in Suppressed if s.value not in POST_REASONS)
OUTCOMES = ("accepted", "invalid_token", "failed", "expired", "dead_lettered", "retry_scheduled")
CIRCUIT = {0: "closed", 1: "half-open", 2: "open"}
MAX_MERGED = frozenset({"fanfare_circuit_state"})  # gauges where the worst process wins
QUANTILES = (0.5, 0.9, 0.99)
# The flow a process runs: fanfare's own gauge, or the step ids of Bytewax's step metrics.
_FLOW = re.compile(
    r'^fanfare_flow_info\{flow="([A-Za-z0-9_-]+)"\} 1|step_id="([A-Za-z0-9_-]+)\.', re.M
)

Samples = dict[Sample, float]


@dataclass
class Endpoint:
    """One /metrics URL and what it answered."""

    url: str
    samples: Samples | None = None
    flows: list[str] = field(default_factory=list)
    error: str | None = None
    started_at: float | None = None  # the process's start (epoch s): its counters count since

    @property
    def name(self) -> str:
        """host:port."""
        return urlsplit(self.url).netloc or self.url


def normalize(target: str) -> str:
    """`3031`, `host:3031` or a URL, as a /metrics URL."""
    target = target.strip()
    if target.isdigit():
        return f"http://127.0.0.1:{target}/metrics"
    if "://" not in target:
        target = "http://" + target
    parts = urlsplit(target)
    return target if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}/metrics"


def default_urls(settings: Settings, scan: int) -> list[str]:
    """FANFARE_METRICS_HOST, as a local client reaches it, on FANFARE_METRICS_PORT and on."""
    first, host = settings.metrics_port, settings.metrics_listen_host
    return [local_url(host, p, "/metrics") for p in range(first, min(first + scan, 65_536))]


def _environ_metrics(pid: int, settings: Settings) -> Settings:
    """`settings` with a running process's /metrics settings, where set in its environment.

    FANFARE_METRICS_PORT, _HOST and _SERVER, read from Linux /proc.
    """
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return settings
    env = dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)
    raw_port = env.get("FANFARE_METRICS_PORT", "")
    return replace(
        settings,
        metrics_port=int(raw_port) if raw_port.isdigit() else settings.metrics_port,
        metrics_host=env.get("FANFARE_METRICS_HOST") or settings.metrics_host,
        metrics_server=env.get("FANFARE_METRICS_SERVER") or settings.metrics_server,
    )


def discovered_urls(settings: Settings) -> list[str]:
    """/metrics of every `fanfare run` running from this FANFARE_HOME (its run files)."""
    from flows.runtime import readiness

    urls: list[str] = []
    for info in readiness.running_flows(settings):
        try:
            pid = int(info["pid"])
            processes = 1 if info.get("process_id") is not None else int(info["processes"] or 1)
        except (KeyError, TypeError, ValueError):
            continue
        its = _environ_metrics(pid, settings)
        host, port = its.metrics_listen_host, its.metrics_port
        urls += [local_url(host, port + i, "/metrics") for i in range(processes)]
    return list(dict.fromkeys(urls))


def scrape_endpoints(urls: Iterable[str], timeout_s: float) -> list[Endpoint]:
    """Every URL, answered or not."""
    out = []
    for url in urls:
        ep = Endpoint(url)
        try:
            text = fetch_text(url, timeout_s)
            ep.samples = parse(text)
            started = parse(text, prefixes=(PROCESS_START,)).get((PROCESS_START, ()))
        except (OSError, ValueError) as exc:  # no answer, or not a Prometheus exposition
            ep.error = _why(exc)
        else:
            ep.flows = sorted({a or b for a, b in _FLOW.findall(text)})
            ep.started_at = started
        out.append(ep)
    return out


def _why(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc) or type(exc).__name__


def merge(endpoints: Iterable[Endpoint]) -> Samples:
    """The samples of every endpoint that answered: summed, or the maximum for circuit states."""
    out: Samples = defaultdict(float)
    for ep in endpoints:
        for key, value in (ep.samples or {}).items():
            if key[0] in MAX_MERGED:
                out[key] = max(out.get(key, value), value)
            else:
                out[key] += value
    return dict(out)


# --- the report ---------------------------------------------------------------------------------


PROCESS_START = "process_start_time_seconds"
MIN_FOR_PERCENTILES = 20
"""Below this many observations a latency shows its bucket bound, not percentiles."""


def _n(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s" if value < 100 else f"{value:,.0f} s"


class Report:
    """Lines of the summary; counts get a rate column when an earlier sample is known."""

    def __init__(self, cur: Samples, prev: Samples | None, interval_s: float) -> None:
        self.cur, self.prev, self.interval = cur, prev, interval_s
        self.lines: list[str] = []

    def section(self, title: str) -> None:
        """A heading (with the rate column's title when watching)."""
        if self.lines:
            self.lines.append("")
        self.lines.append(f"{title:<44}{'total':>12}" + (f"{'/s':>11}" if self.prev else ""))

    def count(self, indent: int, label: str, name: str, note: str = "", **labels: str) -> None:
        """A metric's total over the matching label sets, its rate when watching, a note."""
        now = total(self.cur, name, **labels)
        line = f"{'  ' * indent + label:<44}{_n(now):>12}"
        if self.prev is not None:
            delta = now - total(self.prev, name, **labels)
            line += f"{delta / self.interval:>11,.1f}" if delta >= 0 else f"{'reset':>11}"
        self.lines.append(line + (f"  {note}" if note else ""))

    def text(self, indent: int, label: str, text: str) -> None:
        """A row with text in place of a count."""
        self.lines.append(f"{'  ' * indent + label:<44}{text}")

    def latency(self, indent: int, label: str, name: str, **labels: str) -> None:
        """Percentiles of a histogram (over the last interval when watching and it moved)."""
        cum = buckets(self.cur, name, **labels)
        scope = "since start"
        if self.prev is not None:
            before = dict(buckets(self.prev, name, **labels))
            delta = [(le, c - before.get(le, 0.0)) for le, c in cum]
            if delta and delta[-1][1] > 0:
                cum, scope = delta, f"last {self.interval:.0f} s"
        count = cum[-1][1] if cum else 0.0
        if count <= 0:
            self.text(indent, label, "no observations")
            return
        if count < MIN_FOR_PERCENTILES:  # a percentile of a handful of items says nothing
            bound = next((le for le, c in cum if c >= count), math.inf)
            within = f"all within {_secs(bound)}" if math.isfinite(bound) else "some very slow"
            self.text(indent, label, f"{_n(count)} item{'' if count == 1 else 's'}: {within}")
            return
        parts = [f"p{q * 100:g} {_secs(histogram_quantile(q, cum))}" for q in QUANTILES]
        self.text(
            indent,
            label,
            "  ".join(parts) + f"   ({_n(count)} item{'' if count == 1 else 's'}, {scope})",
        )


def _labels(samples: Samples, name: str, label: str, known: Iterable[str] = ()) -> list[str]:
    seen = set(by_label(samples, name, label))
    return [*known, *sorted(seen - set(known))]


def _pairs(samples: Samples, name: str, labels: tuple[str, str]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, b in by_labels(samples, name, labels))


def _any(samples: Samples, prefix: str) -> bool:
    return any(v for (n, _), v in samples.items() if n.startswith(prefix))


def _fanout(r: Report, flows: set[str]) -> None:
    m = r.cur
    if "fanout" not in flows and not _any(m, "fanfare_posts_") and not _any(m, "fanfare_cand"):
        return
    r.section("fan-out funnel")
    r.count(1, "posts read (valid)", "fanfare_posts_read_total")
    for lane in _labels(m, "fanfare_posts_fanned_out_total", "lane", ("normal", "bulk")):
        r.count(2, f"fanned out, {lane}", "fanfare_posts_fanned_out_total", lane=lane)
    for reason in _labels(m, "fanfare_posts_suppressed_total", "reason", POST_REASONS):
        r.count(2, f"suppressed, {reason}", "fanfare_posts_suppressed_total", reason=reason)
    r.count(2, "duplicate posts dropped", "fanfare_deduped_total", stage="post_claim")
    r.count(1, "candidates (follow edges)", "fanfare_candidates_total")
    for reason in _labels(m, "fanfare_suppressed_total", "reason", CANDIDATE_REASONS):
        r.count(2, f"suppressed, {reason}", "fanfare_suppressed_total", reason=reason)
    r.count(2, "deferred (quiet hours)", "fanfare_deferred_total")
    r.count(2, "released after quiet hours", "fanfare_released_total")
    if _any(m, "fanfare_bundle"):  # frequency caps: summaries of the capped notifications
        note = f"for {_n(total(m, 'fanfare_bundled_total'))} capped notifications"
        r.count(2, "bundle summaries sent", "fanfare_bundle_summaries_total", note)
    r.count(2, "duplicate jobs dropped", "fanfare_deduped_total", stage="shard_job")
    r.count(2, "replayed items dropped", "fanfare_deduped_total", stage="replay")
    r.count(1, "dispatched (device pushes)", "fanfare_dispatched_total")
    for provider, lane in _pairs(m, "fanfare_dispatched_total", ("provider", "lane")):
        batches = total(m, "fanfare_dispatch_batches_total", provider=provider, lane=lane)
        note = f"in {_n(batches)} batches"
        r.count(
            2, f"{provider} {lane}", "fanfare_dispatched_total", note, provider=provider, lane=lane
        )
    pairs = _pairs(m, "fanfare_post_to_dispatched_seconds_count", ("provider", "lane"))
    if pairs:
        r.text(1, "post created -> dispatched", "")
    for provider, lane in pairs:
        name = "fanfare_post_to_dispatched_seconds"
        r.latency(2, f"{provider} {lane}", name, provider=provider, lane=lane)
    for topic in _labels(m, "fanfare_changes_applied_total", "topic"):
        r.count(1, f"applied from {topic}", "fanfare_changes_applied_total", topic=topic)


def _delivery(r: Report, flows: set[str]) -> None:
    m = r.cur
    if "delivery" not in flows and not _any(m, "fanfare_delivery_outcomes"):
        return
    r.section("delivery")
    r.count(1, "sends to providers", "fanfare_provider_sends_total")
    for provider, lane in _pairs(m, "fanfare_provider_sends_total", ("provider", "lane")):
        r.count(
            2, f"{provider} {lane}", "fanfare_provider_sends_total", provider=provider, lane=lane
        )
    providers = sorted(
        set(by_label(m, "fanfare_delivery_outcomes_total", "provider"))
        | set(by_label(m, "fanfare_provider_sends_total", "provider"))
    )
    for provider in providers:
        r.text(1, f"{provider} outcomes", "")
        for outcome in _labels(m, "fanfare_delivery_outcomes_total", "outcome", OUTCOMES):
            name = "fanfare_delivery_outcomes_total"
            r.count(2, outcome, name, provider=provider, outcome=outcome)
    errors = _pairs(m, "fanfare_provider_errors_total", ("provider", "reason"))
    if errors:
        r.text(1, "provider errors", "")
    for provider, reason in errors:
        name = "fanfare_provider_errors_total"
        r.count(2, f"{provider} {reason}", name, provider=provider, reason=reason)
    for provider, cause in _pairs(m, "fanfare_delivery_held_total", ("provider", "cause")):
        name = "fanfare_delivery_held_total"
        r.count(1, f"held for later, {provider} {cause}", name, provider=provider, cause=cause)
    r.count(1, "invalid tokens deactivated", "fanfare_tokens_deactivated_total")
    for provider in _labels(m, "fanfare_rate_limit_wait_seconds_total", "provider"):
        name = "fanfare_rate_limit_wait_seconds_total"
        r.count(1, f"rate-limit wait (s), {provider}", name, provider=provider)
    r.count(1, "duplicate sends skipped", "fanfare_delivery_deduped_total")
    r.count(1, "resends after a restart", "fanfare_delivery_resends_total")
    states = by_label(m, "fanfare_circuit_state", "provider")
    if states:
        shown = (f"{p} {CIRCUIT.get(int(v), str(v))}" for p, v in sorted(states.items()))
        r.text(1, "circuit", "  ".join(shown))
    pairs = _pairs(m, "fanfare_post_to_accepted_seconds_count", ("provider", "lane"))
    if pairs:
        r.text(1, "post created -> provider accepted", "")
    for provider, lane in pairs:
        name = "fanfare_post_to_accepted_seconds"
        r.latency(2, f"{provider} {lane}", name, provider=provider, lane=lane)


def _acks(r: Report, flows: set[str]) -> None:
    m = r.cur
    if "acks" not in flows and not _any(m, "fanfare_acks_total"):
        return
    r.section("acks")
    for event, outcome in _pairs(m, "fanfare_acks_total", ("event", "outcome")):
        r.count(1, f"{event} {outcome}", "fanfare_acks_total", event=event, outcome=outcome)


def _dead_letters(r: Report) -> None:
    name = "fanfare_dead_letters_written_total"
    pairs = _pairs(r.cur, name, ("source_topic", "reason"))
    if not pairs:
        return
    r.section("dead letters written")
    for topic, reason in pairs:
        r.count(1, f"{topic} {reason}", name, source_topic=topic, reason=reason)


def _lag(r: Report) -> None:
    name = "fanfare_consumer_lag_messages"
    lag = by_labels(r.cur, name, ("topic", "partition"))
    if not lag:
        return
    per_topic: dict[str, list[float]] = defaultdict(list)
    for (topic, _), value in lag.items():
        per_topic[topic].append(value)
    r.section("consumer lag (messages)")
    for topic, values in sorted(per_topic.items()):
        note = f"{len(values)} partition(s), largest {_n(max(values))}"
        r.count(1, topic, name, note, topic=topic)


def render(endpoints: list[Endpoint], prev: Samples | None, interval_s: float) -> list[str]:
    """The whole summary for the endpoints that answered (and which did not)."""
    up = [ep for ep in endpoints if ep.samples is not None]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    lines = [f"fanfare metrics at {stamp}: {len(up)} endpoint(s)"]
    for ep in up:
        since = ""
        if ep.started_at is not None:
            since = datetime.fromtimestamp(ep.started_at, UTC).strftime("%H:%M:%SZ")
            since = f"  (process started {since})"
        lines.append(f"  {ep.name:<24}{', '.join(ep.flows) or '(no flow steps seen)'}{since}")
    lines.append(
        "counts are since each process started: a restart (`fanfare run` restarts a failed "
        "cluster) starts them at 0 again"
    )
    report = Report(merge(up), prev, interval_s)
    flows = {f for ep in up for f in ep.flows}
    _fanout(report, flows)
    _delivery(report, flows)
    _acks(report, flows)
    _dead_letters(report)
    _lag(report)
    return [*lines, "", *report.lines]


def unreachable_lines(endpoints: list[Endpoint], scanned: bool) -> list[str]:
    """Which endpoints did not answer: each with why, or one line for a port scan."""
    down = [ep for ep in endpoints if ep.samples is None]
    if not down:
        return []
    if scanned:
        return ["no answer on " + ", ".join(ep.name for ep in down)]
    return [f"unreachable: {ep.url} ({ep.error})" for ep in down]


def _show(lines: list[str], watching: bool, first: bool) -> None:
    if watching and sys.stdout.isatty():
        print("\033[H\033[J", end="")  # redraw in place
    elif not first:
        print()
    print("\n".join(lines), flush=True)


def add_parser(sub: Any) -> None:
    """Register `fanfare metrics`."""
    metrics = sub.add_parser(
        "metrics",
        help="summarise running workers' /metrics: funnel, latencies, circuits, lag",
        description="Summarise running workers' Prometheus /metrics endpoints. With no URL: "
        "the flows running from $FANFARE_HOME (its run files), else 127.0.0.1 on "
        "FANFARE_METRICS_PORT and the next ports (--scan).",
    )
    metrics.add_argument(
        "urls",
        nargs="*",
        metavar="URL",
        help="a /metrics URL, host:port or a port (default: the running flows' endpoints)",
    )
    metrics.add_argument(
        "--scan",
        type=positive_int,
        default=8,
        help="ports tried from FANFARE_METRICS_PORT when no URL is given and no flow is found (8)",
    )
    metrics.add_argument(
        "--watch",
        type=float,
        default=None,
        metavar="N",
        help="a summary every N seconds, with rates over the last N seconds (Ctrl-C stops)",
    )
    metrics.add_argument(
        "--count", type=positive_int, default=None, metavar="K", help="with --watch: stop after K"
    )
    metrics.add_argument("--timeout", type=float, default=2.0, help="seconds per endpoint (2)")
    metrics.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """Print the summary once, or every `--watch` seconds with rates; 1 when none answered."""
    watch: float | None = args.watch
    if (watch is not None and watch <= 0) or args.timeout <= 0:
        print("fanfare metrics: --watch and --timeout take seconds above 0", file=sys.stderr)
        return 2
    urls = [normalize(u) for u in args.urls] or discovered_urls(settings)
    scanned = not urls
    if scanned:
        urls = default_urls(settings, args.scan)
    prev: Samples | None = None
    prev_at = 0.0
    shown = 0
    while True:
        at = time.monotonic()
        endpoints = scrape_endpoints(urls, args.timeout)
        up = [ep for ep in endpoints if ep.samples is not None]
        if up:
            lines = render(endpoints, prev, at - prev_at)
            _show(
                [*lines[:1], *unreachable_lines(endpoints, scanned), *lines[1:]],
                watch is not None,
                shown == 0,
            )
            shown += 1
            prev, prev_at = merge(up), at
        else:
            tried = ", ".join(ep.name for ep in endpoints)
            print(
                f"fanfare metrics: no endpoint answered (tried {tried}); start a flow with "
                "`fanfare run FLOW`, or pass the URLs of its /metrics",
                file=sys.stderr,
            )
            if shown == 0:
                return 1
            prev = None  # the workers went away: rates start over when they are back
        if watch is None or (args.count is not None and shown >= args.count):
            return 0
        time.sleep(watch)
