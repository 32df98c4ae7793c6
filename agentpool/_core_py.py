"""Pure-Python twin of the compiled core ``agentpool._core`` (same API, same behaviour)."""

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
