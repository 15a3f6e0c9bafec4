"""The flows fanfare runs: the one list of their names, each with its `bytewax.run` import path.

`fanfare run FLOW`, the flow process, recovery rebuild and the command line's choices read it.
"""

from __future__ import annotations

FLOWS = {
    "fanout": "flows.fanout:get_flow",
    "delivery": "flows.delivery:get_flow",
    "acks": "flows.acks:get_flow",
}
"""Flow name -> the `module:factory` that `python -m bytewax.run` runs."""

FLOW_PROCESS_MODULE = "flows.runtime.flow_process"
"""What `fanfare run` starts each flow process as (`python -m FLOW_PROCESS_MODULE FLOW ...`).

Here, not only in that module, so that `fanfare run` need not import it (it imports Bytewax's
operators and the metrics server, which the runner itself never uses: a restart is that much
sooner)."""
