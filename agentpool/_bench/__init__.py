"""Round-trip benchmark: the agentpool pool vs a raw uvloop client vs grpcio aio streaming.

Private: the harness behind ``agentpool bench`` (and ``benchmarks/``), shipped so that an
installed package can run it; not part of the API. ``agentpool bench`` starts a benchmark
agent in a subprocess, then measures in one process and one run, with interleaved
repetitions, the clients of :mod:`.clients` over the scenarios of :mod:`.scenarios`.

Results are medians with min-max over the repetitions; ratios are taken per repetition (the
scenarios of one repetition run back to back) and then summarised the same way. Only Unix
sockets under /tmp are used and every process started here is stopped at the end.

Modules: ``workload`` (the event, its bytes, the Allow reply), ``agent`` (the built-in agent
and the grpcio server), ``clients``, ``scenarios`` (the measurement loop), ``report``,
``memory`` (``--memory``), ``process`` (start/stop of the servers), ``runner`` (the command),
``loadtest`` (``agentpool loadtest``, the HTTP load test).
"""

from __future__ import annotations

from .runner import run
from .scenarios import build_scenarios

__all__ = ["build_scenarios", "run"]
