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
        if isinstance(value, (int, str)) and value != "" and field != "home":
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
