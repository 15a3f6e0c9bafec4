"""`fanfare topics create|list`: every topic of the contract, made once (safe to run twice)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from operators.adapters.kafka.admin import (
    CREATED,
    BrokerUnavailable,
    TopicAdminError,
    create_topics,
    list_topics,
)
from operators.config import ConfigError, Settings
from schemas.topics import ALL_TOPICS
from scripts.commands.arguments import positive_int


def add_parser(sub: Any) -> None:
    """Register `fanfare topics`."""
    topics = sub.add_parser("topics", help="manage fanfare's topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = topics_sub.add_parser("create", help="create every topic (safe to run twice)")
    create.add_argument(
        "--partitions",
        type=positive_int,
        default=None,
        help="partitions per topic (default: FANFARE_TOPIC_PARTITIONS)",
    )
    topics_sub.add_parser("list", help="list fanfare's topics and their partitions")
    topics.set_defaults(func=command)


def topics_summary(results: dict[str, str]) -> str:
    """One line: how many topics were created and how many were there already."""
    created = sum(1 for outcome in results.values() if outcome == CREATED)
    existed = len(results) - created
    return f"{created} created, {existed} already there ({len(results)} fanfare topics)"


def command(args: argparse.Namespace, settings: Settings) -> int:
    """`fanfare topics create [--partitions N]|list`."""
    try:
        if args.topics_command == "create":
            results = create_topics(settings, getattr(args, "partitions", None))
            for topic, outcome in results.items():
                print(f"  {topic:<20} {outcome}")
            print(topics_summary(results))
            return 0
        present = list_topics(settings)
        for topic in ALL_TOPICS:
            shown = f"{present[topic]} partitions" if topic in present else "missing"
            print(f"  {topic:<20} {shown}")
        if len(present) < len(ALL_TOPICS):
            print("Some topics are missing: `fanfare topics create` makes them.")
        return 0
    except (BrokerUnavailable, TopicAdminError, ConfigError) as exc:
        print(f"fanfare topics {args.topics_command}: {exc}", file=sys.stderr)
        return 1
