"""Pure-Python twin of ``_metrics.pxi``."""

from __future__ import annotations

__all__: list[str] = []
