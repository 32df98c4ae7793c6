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


# the extension modules of the compiled core (_core cimports the other two)
_COMPILED = ("_core.", "_selection_c.", "_metrics_c.")


def _core_missing(exc: ImportError) -> str:
    """Why the compiled core did not import, and what to do about it."""
    here = os.path.dirname(os.path.abspath(__file__))
    built = any(n.startswith(_COMPILED) and n.endswith((".so", ".pyd")) for n in os.listdir(here))
    if os.path.exists(os.path.join(here, "_core.pyx")) and not built:
        return (
            f"agentpool is being imported from its source tree ({here}), where the compiled "
            "core has not been built. Run from another directory (or use the `agentpool` "
            "command) to use the installed package, or build the core in place with "
            "`pip install -e .` or `python setup.py build_ext --inplace`, or set "
            "AGENTPOOL_NO_EXTENSIONS=1 to use the pure-Python core."
        )
    return (
        f"agentpool's compiled core (agentpool._core in {here}) failed to import ({exc}); "
        "reinstall or rebuild the package, or set AGENTPOOL_NO_EXTENSIONS=1 to use the "
        "pure-Python core"
    )


if TYPE_CHECKING or NO_EXTENSIONS:
    from . import _core_py as core
else:
    try:
        # _selection_c.py and _metrics_c.py are links to the plain sources: without their
        # extension modules Python would import those and _core would fail obscurely
        from . import _metrics_c, _selection_c

        for _mod in (_selection_c, _metrics_c):
            if not _mod.COMPILED:
                raise ImportError(f"{_mod.__name__} has no compiled extension module")
        from . import _core as core  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(_core_missing(exc)) from exc

HAS_EXTENSIONS: bool = bool(getattr(core, "COMPILED", False))

__all__ = ["HAS_EXTENSIONS", "NO_EXTENSIONS", "core"]
