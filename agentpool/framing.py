"""v2 framing: a 4-byte big-endian length, a type byte, the payload (docs/protocol.md).

These are the active core's (compiled, or its pure-Python twin under
``AGENTPOOL_NO_EXTENSIONS=1``); ``HAS_EXTENSIONS`` says which one was loaded.
"""

from __future__ import annotations

from ._impl import HAS_EXTENSIONS, core

FrameDecoder = core.FrameDecoder
encode_frame = core.encode_frame
MAX_MESSAGE_SIZE: int = core.MAX_MESSAGE_SIZE

__all__ = ["HAS_EXTENSIONS", "MAX_MESSAGE_SIZE", "FrameDecoder", "encode_frame"]
