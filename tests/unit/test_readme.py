"""The README is the front door: keep its tables true to the code."""

import re
from pathlib import Path

from operators.config import ENV_VARIABLES, Settings
from schemas.topics import ALL_TOPICS
from scripts.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(FANFARE_[A-Z_]+)` \| ([^|]+) \|", README, re.M))
    assert set(rows) == set(ENV_VARIABLES.values())
    defaults = Settings()
    for field, var in ENV_VARIABLES.items():
        value = getattr(defaults, field)
        if isinstance(value, bool):
            assert f"`{str(value).lower()}`" == rows[var].strip(), var
        elif isinstance(value, (int, str)) and value != "" and field != "home":
            assert f"`{value}`" == rows[var].strip(), var


def test_every_topic_and_schema_is_documented() -> None:
    for topic in ALL_TOPICS:
        assert f"`{topic}`" in README, topic
    for schema in (ROOT / "schemas").glob("*.schema.json"):
        assert f"schemas/{schema.name}" in README, schema.name


def test_the_two_commands_exist() -> None:
    assert ".venv/bin/fanfare demo" in README
    assert "bash scripts/test.sh" in README
    assert (ROOT / "scripts/test.sh").exists()
    ci = (ROOT / ".ci/run").read_text()
    assert "bash scripts/test.sh" in ci


def test_documented_subcommands_parse() -> None:
    parser = build_parser()
    for argv in (
        ["dev", "up"],
        ["dev", "down"],
        ["dev", "status"],
        ["topics", "create"],
        ["topics", "list"],
        ["run", "fanout", "--workers", "2", "--processes", "2"],
        ["demo", "--users", "100"],
    ):
        assert parser.parse_args(argv).func


# --- the README says what is true: no stale promises, every command and option documented ----

STALE = re.compile(r"next milestones?|coming soon|not (yet )?implemented|\bTODO\b|\bTBD\b", re.I)


def test_no_statement_promises_what_already_exists() -> None:
    for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        stale = [line for line in path.read_text().splitlines() if STALE.search(line)]
        assert stale == [], f"{path.name}: {stale}"


def commands_table() -> str:
    section = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("| `fanfare"))


def command_paths() -> dict[str, set[str]]:
    """`fanfare X [Y]` -> its long options, from the real parser."""
    import argparse

    out: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        options = {
            o
            for a in parser._actions
            for o in a.option_strings
            if o.startswith("--") and o != "--help"
        }
        if not subs:
            out[path] = options
            return
        for action in subs:
            for name, child in action.choices.items():
                walk(child, f"{path} {name}")

    walk(build_parser(), "fanfare")
    return out


def test_every_command_and_option_is_in_the_commands_table() -> None:
    table = commands_table()
    rows = table.splitlines()
    missing = []
    for path, options in command_paths().items():
        words = path.split()
        # A row documents `fanfare a b` when it names it (`fanfare a b`, or `fanfare a x|b`).
        mine = [
            r
            for r in rows
            if f"`{path}" in r
            or (len(words) == 3 and f"`fanfare {words[1]} " in r and words[2] in r.split("|")[1])
        ]
        if not mine:
            missing.append(path)
            continue
        missing += [f"{path} {o}" for o in sorted(options) if not any(o in r for r in mine)]
    assert missing == []
