"""Round-trip benchmark harness: agentpool pool vs a raw uvloop client vs grpcio aio.

Same as ``python -m agentpool bench``; the harness lives in :mod:`agentpool._bench` so that the
installed package can run it. Run ``python benchmarks/roundtrip.py --help`` for the options.
``python benchmarks/roundtrip.py --agent PATH`` serves only the built-in benchmark agent on the
Unix socket PATH (a minimal uvloop v2 agent answering every event with an Allow).
"""

from __future__ import annotations

import sys

from agentpool._bench.agent import run_agent
from agentpool.cli import main


def _entry(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--agent" and argv[1] not in ("auto", "builtin", "example"):
        return run_agent(argv[1])
    return main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(_entry(sys.argv[1:]))
