"""The compiled core is the one loaded unless AGENTPOOL_NO_EXTENSIONS asks for the twin."""

from __future__ import annotations

import os
import pathlib

import agentpool
from agentpool import _impl


def test_expected_core_is_loaded() -> None:
    if os.environ.get("AGENTPOOL_NO_EXTENSIONS"):
        assert not agentpool.HAS_EXTENSIONS
        assert _impl.core.__name__ == "agentpool._core_py"
    else:
        assert agentpool.HAS_EXTENSIONS
        assert _impl.core.__name__ == "agentpool._core"
        assert pathlib.Path(_impl.core.__file__).suffix in {".so", ".pyd"}


def test_tests_run_against_installed_package() -> None:
    if os.environ.get("AGENTPOOL_ALLOW_SOURCE_TREE"):
        return
    assert "site-packages" in agentpool.__file__, agentpool.__file__
