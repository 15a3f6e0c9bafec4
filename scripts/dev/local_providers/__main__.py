"""`python -m scripts.dev.local_providers --dir DIR`: the local APNs, FCM and control API.

Writes DIR/providers.json once listening (see runner.py for its shape), and with
`--settings-file` the settings that point fanfare at them; SIGTERM or SIGINT stops the servers
cleanly and removes both.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
from pathlib import Path

from scripts.dev.local_providers.runner import serve


async def _run(args: argparse.Namespace) -> None:
    running = await serve(
        Path(args.dir),
        apns_port=args.apns_port,
        fcm_port=args.fcm_port,
        control_port=args.control_port,
        fcm_tls_port=args.fcm_tls_port,
        strict_tokens=not args.loose_tokens,
        fcm_access_token=args.fcm_access_token,
        settings_file=Path(args.settings_file) if args.settings_file else None,
        only=None if args.serve == "both" else args.serve,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    info = running.info
    summary = {
        "apns_port": info["apns"]["port"],
        "fcm_url": info["fcm"]["url"],
        "fcm_https_url": info["fcm"]["https_url"],
        "control_url": info["control_url"],
        "pid": info["pid"],
    }
    print(f"local providers listening: {json.dumps(summary)}", file=sys.stderr, flush=True)
    # Long-lived startup objects (keys, h2 tables, modules) need not be scanned again and again.
    gc.freeze()
    await stop.wait()
    await running.close()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve until signalled."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.dev.local_providers", description=__doc__
    )
    parser.add_argument("--dir", required=True, help="credentials and providers.json live here")
    parser.add_argument("--apns-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--fcm-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--control-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--fcm-tls-port", type=int, default=0, help="FCM over TLS (HTTP/2); 0 picks a free port"
    )
    parser.add_argument(
        "--loose-tokens",
        action="store_true",
        help="accept any device token shape (default: APNs 64 hex, FCM registration-token shape)",
    )
    parser.add_argument(
        "--fcm-access-token", default=None, help="a fixed FCM bearer to accept (default: random)"
    )
    parser.add_argument(
        "--settings-file",
        default=None,
        metavar="PATH",
        help="also write fanfare's FANFARE_APNS_*/FANFARE_FCM_* settings for these servers into "
        "this settings file (fanfare's FANFARE_SETTINGS_FILE), and take them out on stop",
    )
    parser.add_argument(
        "--serve",
        choices=("both", "apns", "fcm"),
        default="both",
        help="serve both providers, or one (a process per provider gets a core each)",
    )
    args = parser.parse_args(argv)
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
