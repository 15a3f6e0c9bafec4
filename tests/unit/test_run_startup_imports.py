"""`fanfare run` starts (and restarts) the flows: it imports no more than it uses before them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scripts import cli

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
from scripts import cli
args = cli.build_parser("run").parse_args(["run", "fanout", "--processes", "1"])
import flows.runtime.runner
print(json.dumps({"func": args.func.__module__, "flow": args.flow, "modules": sorted(sys.modules)}))
"""


def test_fanfare_run_imports_neither_the_other_commands_nor_the_flow_process() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    found = json.loads(out.stdout)
    assert (found["func"], found["flow"]) == ("scripts.commands.run", "fanout")
    loaded = set(found["modules"])
    # Another command's module, the flow process (and Bytewax), the stores' drivers, numpy.
    for heavy in (
        "scripts.commands.recovery",
        "flows.runtime.flow_process",
        "bytewax",
        "numpy",
        "psycopg",
    ):
        assert heavy not in loaded, heavy


def test_every_command_is_still_parsed_without_alone() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["dlq", "list", "--source-topic", "push.apns"])
    assert args.command == "dlq"
    assert cli.build_parser("run").parse_args(["run", "fanout"]).flow == "fanout"
