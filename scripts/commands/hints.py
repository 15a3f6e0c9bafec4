"""Commands printed for the user to run next: as they would type them, so they run as printed.

A hint names `fanfare` the way this one was started (`.venv/bin/fanfare` when the virtualenv is
not on PATH) and carries the settings it needs from this environment (FANFARE_HOME, the store
URLs), quoted for a POSIX shell.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

CARRIED = ("FANFARE_HOME", "FANFARE_SETTINGS_FILE", "FANFARE_NOTIFICATION_STORE_URL")
"""Settings a hint repeats when this environment sets them (where the data it reads lives)."""


def fanfare_program(argv0: str | None = None, cwd: Path | None = None) -> list[str]:
    """How to start fanfare again, as this process was started."""
    started = argv0 if argv0 is not None else sys.argv[0]
    if started.endswith(".py"):  # `python -m scripts.cli`
        return [sys.executable, "-m", "scripts.cli"]
    if os.sep not in started:  # found on PATH
        return [started]
    program = Path(started).resolve()
    on_path = shutil.which(program.name)
    if on_path is not None and Path(on_path).resolve() == program:
        return [program.name]
    try:
        return [str(program.relative_to((cwd or Path.cwd()).resolve()))]
    except ValueError:
        return [str(program)]


def fanfare_command(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> str:
    """`FANFARE_HOME=... .venv/bin/fanfare ARGS`, ready to paste into a shell."""
    environ = os.environ if env is None else env
    settings = {name: environ[name] for name in CARRIED if environ.get(name)}
    settings.update(overrides or {})
    words = [f"{k}={shlex.quote(v)}" for k, v in settings.items()]
    words += [shlex.quote(w) for w in fanfare_program()] + [shlex.quote(a) for a in args]
    return " ".join(words)
