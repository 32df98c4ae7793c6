# cython: language_level=3, embedsignature=True
"""Compiled core of agentpool: framing, selection, counters and the connection protocol.

Pure-Python twin: ``agentpool._core_py`` (selected with ``AGENTPOOL_NO_EXTENSIONS=1``).
"""

include "_framing.pxi"
include "_selection.pxi"
include "_metrics.pxi"
include "_protocol.pxi"
include "_codec.pxi"
COMPILED = True
