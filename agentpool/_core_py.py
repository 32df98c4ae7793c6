"""Pure-Python core: the same API and behaviour as the compiled ``agentpool._core``.

Selection and metrics (``_selection_py``, ``_metrics_py``) are the very sources the compiled
core is built from (Cython pure-Python mode, as ``_selection_c`` / ``_metrics_c``); framing,
the protocol and the codec helpers are hand-kept twins of their ``.pxi``.
"""

from __future__ import annotations

from . import _codec_py, _framing_py, _metrics_py, _protocol_py, _selection_py
from ._codec_py import *  # noqa: F403
from ._framing_py import MAX_MESSAGE_SIZE, FrameDecoder, encode_frame
from ._metrics_py import *  # noqa: F403
from ._protocol_py import *  # noqa: F403
from ._selection_py import *  # noqa: F403

COMPILED = False

__all__ = [
    "COMPILED",
    "MAX_MESSAGE_SIZE",
    "FrameDecoder",
    "encode_frame",
    *_codec_py.__all__,
    *_metrics_py.__all__,
    *_protocol_py.__all__,
    *_selection_py.__all__,
]
del _framing_py
