"""Pure-Python twin of ``_protocol.pxi``."""

from __future__ import annotations

__all__: list[str] = []
