"""The `fanfare` command: one entry point; each command module registers its own subcommand.

The commands of the development stack (`dev`, `demo`, `chaos`) live in `scripts/dev` and
`scripts/harness`, which only a source checkout has (the wheel and the image leave them out):
where they are missing, `fanfare` offers the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence

from flows.runtime.logs import configure_logging
from operators.config import ConfigError, Settings, load_settings

Command = Callable[[argparse.Namespace, Settings], int]

COMMANDS = (
    "scripts.dev.devstack",
    "scripts.commands.topics",
    "scripts.commands.run",
    "scripts.commands.store",
    "scripts.commands.inbox",
    "scripts.commands.api",
    "scripts.dev.demo",
    "scripts.commands.followers_import",
    "scripts.commands.metrics",
    "scripts.commands.replay",
    "scripts.commands.dlq",
    "scripts.commands.recovery",
    "scripts.commands.outbox",
    "scripts.harness.chaos",
)
"""Each module's `add_parser(subparsers)` adds its command; the order is `fanfare --help`'s."""
SOURCE_CHECKOUT_ONLY = {
    "scripts.dev.devstack": "dev",
    "scripts.dev.demo": "demo",
    "scripts.harness.chaos": "chaos",
}
"""The development commands, by module: an installed wheel has none of these modules."""


def _source_checkout_only(sub: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    """A command of the development stack, where it is not installed: say where it is."""
    parser = sub.add_parser(name, help="(in a source checkout of fanfare only)", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def explain(args: argparse.Namespace, settings: Settings) -> int:
        print(
            f"fanfare {name}: the development stack is not installed here (a wheel or image "
            "ships without it); run it from a source checkout: "
            "`pip install -e '.[devstack]'` in the clone",
            file=sys.stderr,
        )
        return 2

    parser.set_defaults(func=explain)


ALONE = {"run": "scripts.commands.run"}
"""Commands parsed with their own module only: `fanfare run` starts (and restarts) the flows,
and importing every command (the stores' drivers, the API, templates, numpy) cost it ~0.6 s of
CPU before its start-up checks."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets `func`.

    With `command` one of `ALONE`, only that command's module is imported (and parsed).
    """
    parser = argparse.ArgumentParser(
        prog="fanfare",
        description="Notification fan-out engine. Configuration comes from FANFARE_* "
        "environment variables (see the README's configuration table).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    alone = ALONE.get(command) if command is not None else None
    for name in COMMANDS if alone is None else (alone,):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only the development package itself may be missing; any other import is a bug.
            if name in SOURCE_CHECKOUT_ONLY and name.startswith(f"{exc.name}."):
                _source_checkout_only(sub, SOURCE_CHECKOUT_ONLY[name])
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load settings, run the subcommand; exit codes: 0 ok, 1 failed, 2 usage."""
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(words[0] if words else None)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"fanfare: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    func: Command = args.func
    try:
        return func(args, settings)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`fanfare metrics | head`): stop quietly, as `yes | head` does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
