"""The marker `fanfare run` keeps in a flow's recovery directory, and its lineage id.

A lineage is one recovery directory's life: it begins when the directory is created and ends
when it is removed (`fanfare run --fresh`, or by hand). Every execution resumed from the same
directory belongs to it. Channel writers key their start marks by it (see
`RedisWriterStartMarks`): a mark must outlive every execution of its lineage, since Bytewax may
resume from before a writer's first snapshot long after that snapshot was taken, and must not
be read by a later lineage, which starts over.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

RECOVERY_MARKER = "fanfare-recovery.json"


def read_marker(recovery_dir: Path) -> dict[str, Any]:
    """The marker's fields; empty when there is none or it is unreadable."""
    try:
        made = json.loads((recovery_dir / RECOVERY_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return made if isinstance(made, dict) else {}


def write_marker(recovery_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write the marker, with a new lineage id unless `info` carries one; returns what it wrote."""
    info = {**info}
    if not isinstance(info.get("lineage"), str) or not info["lineage"]:
        info["lineage"] = uuid.uuid4().hex[:16]
    (recovery_dir / RECOVERY_MARKER).write_text(json.dumps(info))
    return info


def recovery_lineage(recovery_dir: Path) -> str:
    """The directory's lineage id; "" for a directory `fanfare run` did not set up."""
    lineage = read_marker(recovery_dir).get("lineage")
    return lineage if isinstance(lineage, str) else ""
