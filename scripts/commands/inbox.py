"""`fanfare inbox USER` and `fanfare status NOTIFICATION_ID`: read the notification store."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from operators.adapters.stores.by_url import open_notification_store
from operators.config import Settings, cassandra_credentials
from operators.delivery.ledger import InvalidCursor
from operators.delivery.ports import NotificationStore
from scripts.commands.arguments import positive_int
from scripts.commands.hints import fanfare_command


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def attempt_answer(status: int | None, reason: str | None) -> str:
    """`503 ServiceUnavailable`: the status once, though a reason may start with it already."""
    reason = reason or ""
    if status is not None and not reason.startswith(str(status)):
        reason = f"{status} {reason}"
    return reason.strip() or "-"


def open_store(settings: Settings) -> NotificationStore | None:
    """The configured store; None (with a message) when an embedded one was never created."""
    url = settings.resolved_notification_store_url
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            print(
                f"fanfare: no notification store at {path} yet: it is created by the delivery "
                "flow (`fanfare run delivery`, or `fanfare demo`); or set "
                "FANFARE_NOTIFICATION_STORE_URL",
                file=sys.stderr,
            )
            return None
    return open_notification_store(url, settings.store_ttl_s, **cassandra_credentials(settings))


def add_parser(sub: Any) -> None:
    """Register `fanfare inbox` and `fanfare status`."""
    inbox = sub.add_parser("inbox", help="a user's notifications, newest first, a page at a time")
    inbox.add_argument("user", help="the user_id")
    inbox.add_argument("--cursor", default=None, help="the cursor a previous page printed")
    inbox.add_argument(
        "--limit", type=positive_int, default=20, help="notifications per page (default 20)"
    )
    inbox.add_argument("--json", action="store_true", help="print the page as JSON")
    inbox.set_defaults(func=inbox_command)

    status = sub.add_parser(
        "status", help="a notification's aggregated status, its devices and attempts"
    )
    status.add_argument("notification_id", help="post_id:user_id")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.set_defaults(func=status_command)


def inbox_command(args: argparse.Namespace, settings: Settings) -> int:
    """Print one page of a user's notifications, newest first, and the next page's cursor."""
    store = open_store(settings)
    if store is None:
        return 1
    try:
        page = store.inbox(args.user, args.cursor, args.limit)
    except InvalidCursor as exc:
        print(f"fanfare: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "user_id": args.user,
                    "notifications": [asdict(n) for n in page.notifications],
                    "next_cursor": page.next_cursor,
                }
            )
        )
        return 0
    if not page.notifications:
        print(f"no notifications for {args.user}" + (" after this cursor" if args.cursor else ""))
        return 0
    print(f"inbox of {args.user}, newest first")
    print(f"  {'post created':<21} {'status':<11} {'author':<16} notification")
    for n in page.notifications:
        print(
            f"  {_when(n.created_ms / 1000):<21} {n.status:<11} {n.author_id:<16} "
            f"{n.notification_id}"
        )
    if page.next_cursor is not None:
        more = [args.user, "--cursor", page.next_cursor]
        if args.limit != 20:
            more += ["--limit", str(args.limit)]
        print(f"next page: {fanfare_command(['inbox', *more])}")
    return 0


def status_command(args: argparse.Namespace, settings: Settings) -> int:
    """Print a notification's aggregated status, its devices and every attempt."""
    store = open_store(settings)
    if store is None:
        return 1
    try:
        note = store.notification(args.notification_id)
        devices = store.devices(args.notification_id) if note else []
        attempts = store.attempts(args.notification_id) if note else []
    finally:
        store.close()
    if note is None:
        print(
            f"fanfare: no notification {args.notification_id!r} in the store (ids are "
            "post_id:user_id; rows expire after FANFARE_STORE_TTL_S)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    **asdict(note),
                    "devices": [asdict(d) for d in devices],
                    "attempts": [asdict(a) for a in attempts],
                }
            )
        )
        return 0
    print(f"notification {note.notification_id}: {note.status}")
    print(
        f"  user {note.user_id}; post {note.post_id} by {note.author_id}, created "
        f"{_when(note.created_ms / 1000)}; template {note.template}"
    )
    print("  devices")
    for d in devices:
        print(
            f"    {d.device_id:<20} {d.provider:<5} {d.state:<16} attempts {d.attempts:<3} "
            f"ack {d.ack or '-':<9} updated {_when(d.updated_at)}"
        )
    print("  attempts")
    if not attempts:
        print("    none yet")
    for a in attempts:
        answer = attempt_answer(a.status, a.reason)
        print(f"    {_when(a.at)}  {a.device_id:<20} #{a.attempt:<3} {a.state:<16} {answer}")
    return 0
