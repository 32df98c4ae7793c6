"""Pure-Python twin of the compiled core ``agentpool._core`` (same API, same behaviour)."""

from __future__ import annotations

from ._framing_py import MAX_MESSAGE_SIZE, FrameDecoder, encode_frame
from ._metrics_py import *  # noqa: F403
from ._protocol_py import *  # noqa: F403
from ._selection_py import *  # noqa: F403

COMPILED = False
