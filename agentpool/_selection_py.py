"""Pure-Python twin of ``_selection.pxi``."""

from __future__ import annotations

__all__: list[str] = []
