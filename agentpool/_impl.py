"""Select the compiled core or its pure-Python twin.

``AGENTPOOL_NO_EXTENSIONS=1`` (or a non-CPython interpreter) selects the twin. Otherwise the
compiled core must import: a broken build is an error, never a silent fallback.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

NO_EXTENSIONS = bool(os.environ.get("AGENTPOOL_NO_EXTENSIONS")) or (
    sys.implementation.name != "cpython"
)

if TYPE_CHECKING or NO_EXTENSIONS:
    from . import _core_py as core
else:
    try:
        from . import _core as core  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - exercised by a broken install only
        raise ImportError(
            "agentpool's compiled core (agentpool._core) failed to import; rebuild the "
            "package or set AGENTPOOL_NO_EXTENSIONS=1 to use the pure-Python core"
        ) from exc

HAS_EXTENSIONS: bool = bool(getattr(core, "COMPILED", False))

__all__ = ["HAS_EXTENSIONS", "NO_EXTENSIONS", "core"]
