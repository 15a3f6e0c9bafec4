"""The ``fanfare`` command: one entry point for the embedded stack, topics, flows and the demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from operators.config import ConfigError, Settings, load_settings

Command = Callable[[argparse.Namespace, Settings], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets `func`."""
    from flows.registry import FLOWS
    from flows.runtime import runner
    from scripts.dev import devstack

    parser = argparse.ArgumentParser(
        prog="fanfare",
        description="Notification fan-out engine. Configuration comes from FANFARE_* "
        "environment variables (see the README's configuration table).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser("dev", help="the embedded stack (Kafka-protocol broker, Redis check)")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    dev_sub.add_parser("up", help="start the broker in the background, check Redis, create topics")
    dev_sub.add_parser("down", help="stop what `dev up` started")
    dev_sub.add_parser("status", help="say what is running and reachable")
    dev.set_defaults(func=devstack.command)

    topics = sub.add_parser("topics", help="manage fanfare's topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topics_sub.add_parser("create", help="create every topic (safe to run twice)")
    create.add_argument(
        "--partitions",
        type=_positive_int,
        default=None,
        help="partitions per topic (default: FANFARE_TOPIC_PARTITIONS)",
    )
    topics_sub.add_parser("list", help="list fanfare's topics and their partitions")
    topics.set_defaults(func=devstack.topics_command)

    run = sub.add_parser(
        "run",
        help="run a dataflow as a supervised Bytewax cluster (restarts, /ready, /live)",
        description="Run a dataflow under `python -m bytewax.run`, supervised: a failed member "
        "restarts the cluster from the recovery directory (with backoff); /ready and /live "
        "answer on FANFARE_READY_PORT. SIGTERM or SIGINT stop it (exit 0).",
    )
    run.add_argument("flow", choices=list(FLOWS), help="which dataflow")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker threads per process (default 1, or BYTEWAX_WORKERS_PER_PROCESS)",
    )
    run.add_argument(
        "--processes",
        type=_positive_int,
        default=None,
        help="processes of a cluster on this host (default 1); with --addresses, implied",
    )
    run.add_argument(
        "--process-id",
        type=int,
        default=None,
        metavar="I",
        help="run only member I of a multi-host cluster (default: BYTEWAX_PROCESS_ID, or the "
        "ordinal of BYTEWAX_POD_NAME in BYTEWAX_STATEFULSET_NAME)",
    )
    run.add_argument(
        "--addresses",
        default=None,
        metavar='"H:P;H:P"',
        help="every member's host:port, in process-id order (default: BYTEWAX_ADDRESSES or "
        "the lines of BYTEWAX_HOSTFILE_PATH)",
    )
    run.add_argument(
        "--max-restarts",
        type=runner.non_negative_int,
        default=10,
        metavar="N",
        help="give up (exit 1) after more than N failures within --restart-window (10; 0: "
        "never restart)",
    )
    run.add_argument(
        "--restart-window",
        type=runner.positive_seconds,
        default=600.0,
        metavar="SECONDS",
        help="the window --max-restarts counts failures in (600)",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="discard the recovery directory first (start from the topics' beginning)",
    )
    run.set_defaults(func=runner.run_command)

    store = sub.add_parser("store", help="the follower and notification stores")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    migrate = store_sub.add_parser(
        "migrate",
        help="create or upgrade both stores' schema (SQLite or Cassandra); safe to run twice",
    )
    migrate.add_argument(
        "--replication",
        type=_positive_int,
        default=None,
        help="Cassandra replicas per datacenter when the keyspace is created (default: the "
        "URL's replication=, else 1)",
    )
    migrate.add_argument(
        "--dc", default=None, help="Cassandra datacenter for NetworkTopologyStrategy (or ?dc=)"
    )
    store.set_defaults(func=_store)

    inbox = sub.add_parser("inbox", help="a user's notifications, newest first, a page at a time")
    inbox.add_argument("user", help="the user_id")
    inbox.add_argument("--cursor", default=None, help="the cursor a previous page printed")
    inbox.add_argument(
        "--limit", type=_positive_int, default=20, help="notifications per page (default 20)"
    )
    inbox.add_argument("--json", action="store_true", help="print the page as JSON")
    inbox.set_defaults(func=_inbox)

    status = sub.add_parser(
        "status", help="a notification's aggregated status, its devices and attempts"
    )
    status.add_argument("notification_id", help="post_id:user_id")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.set_defaults(func=_status)

    demo = sub.add_parser("demo", help="seed a synthetic social graph, fan out posts, summarise")
    demo.add_argument("--users", type=_positive_int, default=5_000, help="users to seed")
    demo.add_argument("--posts", type=_positive_int, default=40, help="posts to publish")
    demo.add_argument("--seed", type=int, default=7, help="random seed of the synthetic graph")
    demo.add_argument(
        "--timeout", type=_positive_int, default=180, help="seconds to wait for the fan-out"
    )
    demo.set_defaults(func=_demo)

    followers = sub.add_parser("followers", help="manage the follower store")
    followers_sub = followers.add_subparsers(
        dest="followers_command", required=True, metavar="ACTION"
    )
    load = followers_sub.add_parser(
        "import", help="bulk-load a follower graph (CSV or JSONL, optionally .gz) into the store"
    )
    load.add_argument("file", metavar="FILE", help="the graph file, or - for stdin")
    load.add_argument(
        "--format", choices=["csv", "jsonl"], default=None, help="default: from the extension"
    )
    load.add_argument("--dry-run", action="store_true", help="validate and count; write nothing")
    load.add_argument("--quiet", action="store_true", help="no progress output")
    load.add_argument("--errors-file", metavar="PATH", help="write every bad row here")
    load.add_argument(
        "--chunk-rows", type=_positive_int, default=50_000, help="edges per store transaction"
    )
    followers.set_defaults(func=_followers)

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
        type=_positive_int,
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
        "--count", type=_positive_int, default=None, metavar="K", help="with --watch: stop after K"
    )
    metrics.add_argument("--timeout", type=float, default=2.0, help="seconds per endpoint (2)")
    metrics.set_defaults(func=_metrics)
    # Backfill, dead letters and recovery: each module adds its own subcommand.
    from scripts.commands import dlq, replay
    from scripts.commands import recovery as recovery_cli

    replay.add_parser(sub)
    dlq.add_parser(sub)
    recovery_cli.add_parser(sub)
    # Fault scenarios: the same options as `python -m scripts.harness.chaos`.
    from scripts.harness import chaos as chaos_runner

    chaos = sub.add_parser(
        "chaos",
        help="inject faults on a throwaway embedded stack; count pushes lost and repeated",
        description="Run fault scenarios (worker crashes, a cluster against one process, "
        "provider outages, 429s, GOAWAY, slow answers), each on its own embedded stack, and "
        "print per fault the pushes expected, delivered, lost and repeated, and the recovery "
        "times. Exit 0 when every scenario came back without problems.",
    )
    chaos_runner.add_arguments(chaos)
    chaos.set_defaults(func=chaos_runner.command)
    return parser


def _store(args: argparse.Namespace, settings: Settings) -> int:
    from scripts.commands import store as store_cli

    return store_cli.command(args, settings)


def _inbox(args: argparse.Namespace, settings: Settings) -> int:
    from scripts.commands import inbox as inbox_cli

    return inbox_cli.inbox_command(args, settings)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from scripts.commands import inbox as inbox_cli

    return inbox_cli.status_command(args, settings)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from scripts.dev import demo

    return demo.command(args, settings)


def _followers(args: argparse.Namespace, settings: Settings) -> int:
    from scripts.commands import followers_import

    return followers_import.command(args, settings)


def _metrics(args: argparse.Namespace, settings: Settings) -> int:
    from scripts.commands import metrics as metrics_cli

    return metrics_cli.command(args, settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load settings, run the subcommand; exit codes: 0 ok, 1 failed, 2 usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"fanfare: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    func: Command = args.func
    try:
        return func(args, settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
