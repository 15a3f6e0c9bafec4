"""Benchmark of the channel senders against their local servers, and of the live stream (SSE).

    python -m scripts.bench.channels                         # every channel, then 10,000 SSE
    python -m scripts.bench.channels --channels email,chat --items 1000 --sse-clients 0
    python -m scripts.bench.channels --channels none --sse-clients 10000 --browser

Everything runs on this machine and shares its cores: the local channel servers (one process,
`python -m scripts.dev.local_providers`, with the APNs/FCM servers idle beside them), Redis,
and this script, which plays one delivery worker: the senders are built by
`build_channel_senders` on an event loop thread, as `flows/delivery.py` would, and called the
way the engine calls them (`render` each request, then one `send` per --batch requests). No
rate limiter binds (the per-domain and per-webhook pacers are off, the SMS budgets are raised):
the figures are the send path's own speed.

Per channel: `sends/s` = accepted / wall seconds of the sending; `client CPU us/send` = this
process's CPU time (every thread: the senders' event loop, rendering, encryption) / sends;
`server CPU us/send` = the local servers' process's CPU / sends (what the stand-in cost, for
context: a real provider's is not on this machine).

SSE: the embedded broker (`fanfare api` checks its topics) and one `fanfare api` process
(FANFARE_DEV_MODE, FANFARE_SSE_MAX_CLIENTS raised); --sse-clients idle clients (one connection
and one user each, authenticated with stream tokens) connect and wait for `event: ready`; then
--sse-samples in-app notifications are published (through the same Lua call the in-app sender
makes), --sse-rate a second, and each one's latency is publish -> the client parsed its event
(one clock: this process). Reported:
clients held, connect time, the API's RSS per client, its CPU while they idle, p50/p99/max.
The idle clients live in child processes (`--hold`, 5,000 each) and the samples go to
--sse-samplers clients of this process, so the load generator's own loop, busy with thousands
of sockets and their heartbeats, does not add to the latency it measures.
With --browser, the same again with a headless Chromium on the dev inbox page: publish -> the
event's `li` in the page's DOM (the page records Date.now() on receipt).

Every process it starts is stopped at the end and its Redis keys (a prefix of its own) deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from flows.runtime.ports import free_port
from operators.adapters.catalog_files import load_catalog
from operators.adapters.channels.factory import build_channel_senders
from operators.adapters.providers.event_loop import EventLoopThread
from operators.config import Settings, load_settings
from operators.delivery.model import RetryPolicy, SendRequest
from operators.events import MessageOrigin
from operators.notify.links import stream_token
from schemas.addresses import check_subscription
from schemas.records import ChannelMessage
from scripts.dev.local_channels.control import ChannelControl
from scripts.dev.local_channels.runner import channel_settings
from scripts.dev.local_providers.runner import ProvidersProcess, spawn_local_providers
from scripts.harness.procfs import cpu_seconds

CHANNELS = ("email", "sms", "webpush", "chat", "inapp")
DEFAULT_ITEMS = {"email": 3000, "sms": 5000, "webpush": 3000, "chat": 5000, "inapp": 50000}
RECEIPT = ChannelMessage(
    category="receipt",
    template_id="receipt",
    tier="transactional",
    data={"order_id": "1234", "amount": "59.90", "currency": "EUR"},
)
LOGIN = ChannelMessage(
    category="login_code",
    template_id="login_code",
    tier="transactional",
    data={"code": "482913", "minutes": 10},
)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def addresses(channel: str, n: int, info: dict[str, Any], control: ChannelControl) -> list[str]:
    """Addresses to send to: spread over domains, numbers, subscriptions, webhooks, users."""
    if channel == "email":
        return [f"user{i}@domain{i % 50}.example" for i in range(n)]
    if channel == "sms":
        return [f"+1415555{i % 10000:04d}" for i in range(n)]
    if channel == "webpush":
        subs = [
            check_subscription(
                json.dumps(control.mint_subscription()["subscription"]), allow_dev=True
            )
            for _ in range(20)
        ]
        return [subs[i % len(subs)] for i in range(n)]
    if channel == "chat":
        origin = info["chat"]["origin"]
        return [f"{origin}/services/T{i % 20}/B0/X{i % 20}" for i in range(n)]
    return [f"user-{i % 1000}" for i in range(n)]


def make_requests(channel: str, tokens: list[str]) -> list[SendRequest]:
    """One request per address (an API notification: template and data)."""
    message = LOGIN if channel == "sms" else RECEIPT
    out = []
    for i, token in enumerate(tokens):
        user = token if channel == "inapp" else f"u{i}"
        out.append(
            SendRequest(
                provider=channel,  # type: ignore[arg-type]
                lane="normal",
                post_id=f"n_bench{i}",
                author_id="api:bench",
                created_at="2026-12-06T10:00:00Z",
                created_ts=time.time(),
                item={
                    "notification_id": f"n_bench{i}:{user}",
                    "user_id": user,
                    "device_id": "inapp" if channel == "inapp" else f"{channel}-{i}",
                    "token": token,
                },
                origin=MessageOrigin(f"{channel}.transactional", 0, i),
                message=message,
            )
        )
    return out


def bench_senders(
    args: argparse.Namespace,
    settings: Settings,
    providers: ProvidersProcess,
    report: dict[str, Any],
) -> None:
    """Each channel's sends/s and CPU per send against its local server."""
    info: dict[str, Any] = dict(providers.info["channels"])
    control = ChannelControl(info["control_url"])
    loop = EventLoopThread("bench-channels")
    catalog = load_catalog(settings.categories_file, settings.templates_dir)
    senders = loop.run(build_channel_senders(settings, catalog, False, RetryPolicy()))
    try:
        for channel in args.channels:
            control.reset()
            n = args.items or DEFAULT_ITEMS[channel]
            requests = make_requests(channel, addresses(channel, n, info, control))
            sender = senders[channel]
            loop.run(sender.warm_up())
            server_cpu0, cpu0, t0 = (
                cpu_seconds(providers.proc.pid),
                time.process_time(),
                time.perf_counter(),
            )
            statuses: dict[str, int] = {}
            for start in range(0, n, args.batch):
                batch = requests[start : start + args.batch]
                payloads = [sender.render(r) for r in batch]
                for answer in loop.run(sender.send(batch, payloads)):
                    key = str(answer.status if answer.status is not None else answer.reason)
                    statuses[key] = statuses.get(key, 0) + 1
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            server_cpu = cpu_seconds(providers.proc.pid) - server_cpu0
            accepted = sum(v for k, v in statuses.items() if k.isdigit() and 200 <= int(k) < 300)
            row = {
                "items": n,
                "accepted": accepted,
                "answers": statuses,
                "wall_s": round(wall, 3),
                "sends_per_s": round(accepted / wall, 1),
                "client_cpu_us_per_send": round(cpu / n * 1e6, 1),
                "client_cores": round(cpu / wall, 2),
                "server_cpu_us_per_send": round(server_cpu / n * 1e6, 1),
            }
            report["senders"][channel] = row
            print(
                f"{channel:8} {n:>6} sends  {row['sends_per_s']:>8,.0f}/s  client CPU "
                f"{row['client_cpu_us_per_send']:>6.0f} us/send ({row['client_cores']} cores)  "
                f"server CPU {row['server_cpu_us_per_send']:>6.0f} us/send  answers {statuses}",
                flush=True,
            )
    finally:
        for sender in senders.values():
            with contextlib.suppress(Exception):
                loop.run(sender.close())
        loop.stop()


# --- SSE ------------------------------------------------------------------------------------------


class SseClient:
    """One raw HTTP/1.1 connection reading a chunked text/event-stream."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.ready = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, port: int, path: str, on_event: Callable[[str, float], None]) -> None:
        """Connect, then call `on_event(notification_id, perf_counter)` for each event."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer = writer
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        buffer = b""
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return
            buffer += chunk[:-2]
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                if frame.startswith(b"event: ready") or b"\nevent: ready" in frame:
                    self.ready.set()
                elif b"event: notification" in frame:
                    data = frame.rsplit(b"data: ", 1)[1]
                    on_event(json.loads(data)["notification_id"], time.perf_counter())

    def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()


async def hold_idle(port: int, secret: bytes, first: int, count: int, ready_file: Path) -> None:
    """The idle clients (a child process of their own: their loop must not delay the samples).

    Connects `count` clients 250 at a time, writes how many are ready to `ready_file`, then
    holds them until killed.
    """
    clients = [SseClient(f"sse-{first + i}") for i in range(count)]
    tasks = []
    for start in range(0, len(clients), 250):
        group = clients[start : start + 250]
        for c in group:
            token = stream_token(secret, c.user, time.time())
            path = f"/v1/users/{c.user}/notifications/stream?access_token={token}"
            tasks.append(asyncio.create_task(c.run(port, path, lambda _n, _t: None)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in group)), 60)
    ready = sum(c.ready.is_set() for c in clients)
    ready_file.write_text(f"{ready}\n")
    await asyncio.gather(*tasks, return_exceptions=True)


def start_holders(args: argparse.Namespace, port: int, home: Path) -> list[tuple[Any, Path]]:
    """`--hold` child processes sharing the idle clients (at most 5,000 each)."""
    import subprocess

    holders = []
    per = 5_000
    for first in range(0, args.sse_clients, per):
        count = min(per, args.sse_clients - first)
        ready = home / f"holder-{first}.ready"
        argv = [sys.executable, "-m", "scripts.bench.channels", "--hold", str(count)]
        argv += ["--hold-first", str(first), "--hold-port", str(port), "--hold-ready", str(ready)]
        argv += ["--hold-secret-file", str(home / "link-secret")]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        holders.append((proc, ready))
    return holders


async def sse_phase(
    args: argparse.Namespace,
    settings: Settings,
    port: int,
    api_pid: int,
    secret: bytes,
    home: Path,
    report: dict[str, Any],
) -> None:
    """Connect the idle clients (children), then measure on sample clients of this process."""
    import redis.asyncio as aioredis

    from operators.adapters.redis.live import LivePublisher

    (home / "link-secret").write_bytes(secret)
    rss0 = rss_mb(api_pid)
    t0 = time.perf_counter()
    holders = start_holders(args, port, home)
    try:
        deadline = time.monotonic() + 60 + args.sse_clients / 50
        while not all(ready.exists() for _, ready in holders) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        connected = sum(int(r.read_text() or 0) for _, r in holders if r.exists())
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(args.settle_s)  # after a ramp of connections the collector catches up
        rss1 = rss_mb(api_pid)
        idle_cpu0 = cpu_seconds(api_pid)
        await asyncio.sleep(args.idle_s)
        idle_cpu = (cpu_seconds(api_pid) - idle_cpu0) / args.idle_s
        print(
            f"SSE      {connected:,} of {args.sse_clients:,} idle clients ready in "
            f"{connect_s:.1f} s ({len(holders)} holder processes); "
            f"API RSS {rss0:.0f} -> {rss1:.0f} MB "
            f"({(rss1 - rss0) * 1024 / max(connected, 1):.1f} KB/client); idle API CPU "
            f"{idle_cpu:.3f} cores",
            flush=True,
        )
        arrivals: dict[str, float] = {}

        def seen(nid: str, at: float) -> None:
            arrivals[nid] = at

        samplers = [SseClient(f"sample-{i}") for i in range(args.sse_samplers)]
        tasks = []
        for c in samplers:
            token = stream_token(secret, c.user, time.time())
            path = f"/v1/users/{c.user}/notifications/stream?access_token={token}"
            tasks.append(asyncio.create_task(c.run(port, path, seen)))
        await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in samplers)), 60)
        client = aioredis.Redis.from_url(settings.redis_url)
        publisher = LivePublisher(client, settings.redis_prefix, settings.inapp_stream_length, 3600)
        published: dict[str, float] = {}
        for i in range(args.sse_samples):
            c = samplers[i % len(samplers)]
            nid = f"n_sse{i}:{c.user}"
            body = {"notification_id": nid, "user_id": c.user, "title": "t", "body": "b"}
            published[nid] = time.perf_counter()
            await publisher.publish([(c.user, nid, json.dumps(body).encode())])
            await asyncio.sleep(1 / args.sse_rate)
        await asyncio.sleep(3)
        latencies = sorted((arrivals[n] - t) * 1000 for n, t in published.items() if n in arrivals)
        missing = len(published) - len(latencies)
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        report["sse"] = {
            "clients": args.sse_clients,
            "connected": connected,
            "connect_s": round(connect_s, 2),
            "api_rss_mb_before": round(rss0, 1),
            "api_rss_mb_with_clients": round(rss1, 1),
            "api_kb_per_client": round((rss1 - rss0) * 1024 / max(connected, 1), 1),
            "api_idle_cores": round(idle_cpu, 3),
            "samplers": args.sse_samplers,
            "samples": len(published),
            "missing": missing,
            "latency_ms": {
                "p50": round(q[49], 2),
                "p99": round(q[98], 2),
                "max": round(latencies[-1], 2),
            },
        }
        print(
            f"SSE      publish -> client event, {len(latencies)} samples at {args.sse_rate}/s to "
            f"{len(samplers)} measuring clients beside the idle ones: p50 {q[49]:.1f} ms, "
            f"p99 {q[98]:.1f} ms, max {latencies[-1]:.1f} ms; missing {missing}",
            flush=True,
        )
        if args.browser:
            await browser_phase(args, port, publisher, report)
        for c in samplers:
            c.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
    finally:
        for proc, _ in holders:
            proc.kill()
            proc.wait()


async def browser_phase(
    args: argparse.Namespace, port: int, publisher: Any, report: dict[str, Any]
) -> None:
    """Publish -> the dev page's DOM in a headless Chromium, with the idle clients held."""
    from scripts.dev.browser import HeadlessChromium

    loop = asyncio.get_running_loop()
    browser = await loop.run_in_executor(None, HeadlessChromium)
    try:
        user = f"browser-{uuid.uuid4().hex[:6]}"
        await loop.run_in_executor(
            None, browser.navigate, f"http://127.0.0.1:{port}/dev/inbox?user={user}"
        )
        await loop.run_in_executor(
            None, browser.wait_for, "document.body.dataset.live === 'ready'", 30
        )
        latencies = []
        for i in range(args.browser_samples):
            nid = f"n_browser{i}:{user}"
            payload = json.dumps(
                {"notification_id": nid, "user_id": user, "title": f"t{i}", "body": "b"}
            )
            sent_ms = time.time() * 1000
            await publisher.publish([(user, nid, payload.encode())])
            expr = f"document.querySelector('li[data-id=\"{nid}\"]')?.dataset.received"
            received = await loop.run_in_executor(None, browser.wait_for, expr, 10, 0.002)
            latencies.append(float(received) - sent_ms)
            await asyncio.sleep(0.05)
    finally:
        await loop.run_in_executor(None, browser.close)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    report["sse"]["browser_latency_ms"] = {
        "samples": len(latencies),
        "p50": round(q[49], 2),
        "p99": round(q[98], 2),
        "max": round(latencies[-1], 2),
    }
    print(
        f"browser  publish -> DOM over {len(latencies)} samples: p50 {q[49]:.1f} ms, "
        f"p99 {q[98]:.1f} ms, max {latencies[-1]:.1f} ms",
        flush=True,
    )


def bench_sse(
    args: argparse.Namespace,
    settings: Settings,
    env: dict[str, str],
    home: Path,
    report: dict[str, Any],
) -> None:
    """Start a broker and `fanfare api`, then the SSE phase."""
    from operators.adapters.kafka.admin import create_topics
    from scripts.dev import devstack
    from scripts.harness.spawn import start_fanfare, stop_fanfare

    devstack.start_broker(settings)
    api = None
    try:
        create_topics(settings)
        port = settings.api_port
        api_env = {**os.environ, **env, "FANFARE_SSE_MAX_CLIENTS": str(args.sse_clients + 100)}
        api = start_fanfare(["api"], api_env, home / "api.log")
        import httpx

        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((home / "api.log").read_text()[-3000:])
            time.sleep(0.2)
        secret = Path(settings.link_secret_file).read_text().strip().encode()
        asyncio.run(sse_phase(args, settings, port, api.pid, secret, home, report))
    finally:
        if api is not None:
            stop_fanfare(api)
        devstack.stop_broker(settings)


def main(argv: list[str] | None = None) -> int:
    """Run the phases asked for and print (and optionally write) the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench.channels", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--channels", default=",".join(CHANNELS), help="comma separated, or none")
    parser.add_argument(
        "--items", type=int, default=0, help="sends per channel (default: per channel)"
    )
    parser.add_argument("--batch", type=int, default=100, help="requests per send call (100)")
    parser.add_argument(
        "--sse-clients", type=int, default=10_000, help="idle SSE clients (10,000; 0: no SSE phase)"
    )
    parser.add_argument(
        "--sse-samples", type=int, default=500, help="notifications published to them (500)"
    )
    parser.add_argument("--sse-rate", type=float, default=50.0, help="samples a second (50)")
    parser.add_argument(
        "--idle-s", type=float, default=10.0, help="seconds the API's idle CPU is measured (10)"
    )
    parser.add_argument(
        "--browser", action="store_true", help="also publish -> DOM in a headless Chromium"
    )
    parser.add_argument("--browser-samples", type=int, default=100)
    parser.add_argument(
        "--settle-s",
        type=float,
        default=30.0,
        help="seconds between the last connect and the samples (30)",
    )
    parser.add_argument(
        "--sse-samplers", type=int, default=50, help="measuring clients in this process (50)"
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    for hidden in ("--hold", "--hold-first", "--hold-port"):
        parser.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hold-ready", default="", help=argparse.SUPPRESS)
    parser.add_argument("--hold-secret-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold:  # a child holding idle clients (see start_holders)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.hold * 2 + 1000), hard))
        secret = Path(args.hold_secret_file).read_bytes()
        asyncio.run(
            hold_idle(args.hold_port, secret, args.hold_first, args.hold, Path(args.hold_ready))
        )
        return 0
    # SIGTERM unwinds like Ctrl-C, so the servers started here are stopped and the keys deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.channels = [] if args.channels == "none" else [c for c in args.channels.split(",") if c]
    unknown = set(args.channels) - set(CHANNELS)
    if unknown:
        parser.error(f"unknown channels {sorted(unknown)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.sse_clients + 500 > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.sse_clients * 2 + 1000), hard))
    home = Path(tempfile.mkdtemp(prefix="fanfare-bench-channels-"))
    prefix = f"fanfare-bench-channels-{uuid.uuid4().hex[:8]}:"
    redis_url = os.environ.get("FANFARE_REDIS_URL", "redis://127.0.0.1:6379/0")
    report: dict[str, Any] = {
        "senders": {},
        "cores": os.cpu_count(),
        "load_before": os.getloadavg(),
    }
    providers = spawn_local_providers(home / "providers", settings_file=home / "settings.env")
    try:
        env = {
            **channel_settings(providers.info["channels"]),
            "FANFARE_HOME": str(home),
            "FANFARE_REDIS_URL": redis_url,
            "FANFARE_REDIS_PREFIX": prefix,
            "FANFARE_KAFKA_BROKERS": f"127.0.0.1:{free_port()}",
            "FANFARE_TOPIC_PARTITIONS": "1",
            "FANFARE_API_PORT": str(free_port()),
            "FANFARE_SMS_USER_DAILY_LIMIT": "100000",
            "FANFARE_SMS_DAILY_LIMIT": "100000000",
            "FANFARE_SMTP_CONNECTIONS": "8",
            "FANFARE_LOG_LEVEL": "WARNING",
        }
        settings = load_settings(env)
        print(
            f"local channel servers: pid {providers.proc.pid}; {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        if args.channels:
            bench_senders(args, settings, providers, report)
        if args.sse_clients:
            bench_sse(args, settings, env, home, report)
    finally:
        providers.stop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=5000))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start : start + 5000])
    report["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
