"""Throughput of the real clients against the local providers running in a separate process.

    python -m scripts.dev.local_providers.loadtest --provider apns -n 20000 -c 1000
    python -m scripts.dev.local_providers.loadtest --provider fcm -n 5000 -c 100 [--fcm-http2]

One client process (this one) sends `n` messages with `c` in flight; the servers run in a child
process, as in a benchmark. Prints requests/s and CPU seconds per 1,000 requests on each side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import string
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from scripts.dev.local_providers.clients import apns_client, firebase_app
from scripts.dev.local_providers.runner import (
    ProvidersInfo,
    ProvidersProcess,
    spawn_local_providers,
)

_FCM_ALPHABET = string.ascii_letters + string.digits + "-_"


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def apns_token(i: int) -> str:
    """A 64-hex device token, distinct per i."""
    return f"{i:064x}"


def fcm_token(rng: random.Random) -> str:
    """A registration token's shape: instance id, colon, long base64url body."""
    head = "".join(rng.choices(_FCM_ALPHABET, k=22))
    return f"{head}:APA91b{''.join(rng.choices(_FCM_ALPHABET, k=140))}"


async def run_apns(info: ProvidersInfo, n: int, concurrency: int, max_connections: int) -> int:
    """Send n notifications with `concurrency` in flight; returns how many got 200."""
    from aioapns import NotificationRequest, PushType

    client = apns_client(info, max_connections=max_connections)
    await client.send_notification(NotificationRequest(apns_token(0), {"aps": {}}))  # connect
    next_i, ok = 0, 0

    async def worker() -> None:
        nonlocal next_i, ok
        while next_i < n:
            i = next_i
            next_i += 1
            request = NotificationRequest(
                device_token=apns_token(i),
                message={
                    "aps": {"alert": {"title": "New post", "body": f"post {i}"}},
                    "notification_id": f"post-1:user-{i}",
                    "device_id": f"dev-{i}",
                },
                notification_id=str(uuid.uuid4()),
                time_to_live=3600,
                priority=10,
                collapse_key="post-1",
                push_type=PushType.ALERT,
            )
            result = await asyncio.wait_for(client.send_notification(request), 60)
            ok += result.is_successful

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    client.pool.close()
    return ok


async def run_fcm(info: ProvidersInfo, n: int, concurrency: int, http2: bool = False) -> int:
    """Send n messages through send_each_async, `concurrency` in flight (at most 500 a call)."""
    import firebase_admin
    from firebase_admin import messaging

    app = firebase_app(info, f"loadtest-{uuid.uuid4().hex[:8]}", http2=http2)
    rng = random.Random(1)
    tokens = [fcm_token(rng) for _ in range(min(n, 10_000))]
    next_i, ok = 0, 0
    batch = min(500, concurrency)

    async def worker() -> None:
        nonlocal next_i, ok
        while next_i < n:
            start = next_i
            next_i = min(n, next_i + batch)
            messages = [
                messaging.Message(
                    fid=tokens[i % len(tokens)],
                    notification=messaging.Notification(title="New post", body=f"post {i}"),
                    data={"notification_id": f"post-1:user-{i}", "device_id": f"dev-{i}"},
                    android=messaging.AndroidConfig(collapse_key="post-1", priority="high"),
                )
                for i in range(start, next_i)
            ]
            sent: Any = await messaging.send_each_async(messages, app=app)
            ok += sent.success_count

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency // batch))))
    finally:
        # delete_app closes the client with asyncio.run(), which fails inside a running loop:
        # close it here, on its own loop, and let delete_app find it closed.
        await messaging._get_messaging_service(app)._async_client.aclose()
        await asyncio.get_running_loop().run_in_executor(None, firebase_admin.delete_app, app)
    return ok


def measure(provider: str, providers: ProvidersProcess, args: argparse.Namespace) -> None:
    """Run one provider's load and print the figures."""
    control = providers.control()
    control.reset(provider)
    server_cpu0, client_cpu0 = _cpu_s(providers.proc.pid), time.process_time()
    started = time.perf_counter()
    if provider == "apns":
        ok = asyncio.run(run_apns(providers.info, args.n, args.c, args.max_connections))
    else:
        ok = asyncio.run(run_fcm(providers.info, args.n, args.c, args.fcm_http2))
    elapsed = time.perf_counter() - started
    server_cpu = _cpu_s(providers.proc.pid) - server_cpu0
    client_cpu = time.process_time() - client_cpu0
    stats = control.stats()[provider]
    per_k = 1000 / args.n
    label = f"{provider} (HTTP/{'2' if provider == 'apns' or args.fcm_http2 else '1.1'})"
    print(
        f"{label}: {args.n} sends, {args.c} in flight: {elapsed:.2f}s = "
        f"{args.n / elapsed:,.0f}/s; ok {ok}, server accepted {stats['accepted']}, "
        f"connections {stats['connections_total']}; CPU s per 1k: client "
        f"{client_cpu * per_k:.3f}, server {server_cpu * per_k:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start the servers in a child process, measure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--provider", choices=("apns", "fcm", "both"), default="both")
    parser.add_argument("-n", type=int, default=20_000, help="sends per provider")
    parser.add_argument("-c", type=int, default=1000, help="sends in flight")
    parser.add_argument("--max-connections", type=int, default=10, help="aioapns pool size")
    parser.add_argument("--fcm-http2", action="store_true", help="FCM over TLS and HTTP/2")
    parser.add_argument("--dir", type=Path, default=None, help="providers' dir (default: temp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fanfare-providers-") as tmp:
        providers = spawn_local_providers(args.dir or Path(tmp))
        try:
            for provider in ("apns", "fcm") if args.provider == "both" else (args.provider,):
                measure(provider, providers, args)
        finally:
            providers.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
