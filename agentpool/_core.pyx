# cython: language_level=3, embedsignature=True
"""Compiled core of agentpool: framing, the connection protocol and the C codec parts.

Selection and metrics are compiled from their plain-Python sources as the extension modules
``agentpool._selection_c`` and ``agentpool._metrics_c``; this module cimports their types
and re-exports them, so ``agentpool._core`` is the whole compiled core.
Pure-Python twin: ``agentpool._core_py`` (selected with ``AGENTPOOL_NO_EXTENSIONS=1``).
"""

from agentpool import _metrics_c, _selection_c

include "_framing.pxi"
include "_protocol.pxi"
include "_codec.pxi"

globals().update({name: getattr(_selection_c, name) for name in _selection_c.__all__})
globals().update({name: getattr(_metrics_c, name) for name in _metrics_c.__all__})
COMPILED = True
