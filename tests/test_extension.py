"""The compiled core is the one loaded unless AGENTPOOL_NO_EXTENSIONS asks for the twin."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import pathlib
import urllib.parse

import agentpool
import agentpool.framing
from agentpool import _impl


def test_expected_core_is_loaded() -> None:
    if os.environ.get("AGENTPOOL_NO_EXTENSIONS"):
        assert not agentpool.framing.HAS_EXTENSIONS
        assert _impl.core.__name__ == "agentpool._core_py"
        assert _impl.core.ConnState.__module__ == "agentpool._selection_py"
        assert _impl.core.ProtocolMetrics.__module__ == "agentpool._metrics_py"
    else:
        assert agentpool.framing.HAS_EXTENSIONS
        assert _impl.core.__name__ == "agentpool._core"
        assert pathlib.Path(_impl.core.__file__).suffix in {".so", ".pyd"}
        # the pure-Python-mode modules of the core: compiled, not their .py source imported
        for name, cls in (("_selection_c", "ConnState"), ("_metrics_c", "ProtocolMetrics")):
            module = importlib.import_module(f"agentpool.{name}")
            assert module.COMPILED, name
            assert pathlib.Path(module.__file__ or "").suffix in {".so", ".pyd"}, name
            assert getattr(_impl.core, cls) is getattr(module, cls)


def test_compiled_and_interpreted_builds_share_one_source() -> None:
    """``_selection_c`` / ``_metrics_c`` are compiled from the very file that runs interpreted."""
    here = pathlib.Path(_impl.__file__).parent
    for plain, compiled in (("_selection_py", "_selection_c"), ("_metrics_py", "_metrics_c")):
        source = here / f"{plain}.py"
        assert source.is_file(), source
        link = here / f"{compiled}.py"
        if link.exists():  # in the source tree (a link) and in wheels (a copy)
            assert link.read_bytes() == source.read_bytes(), link


def test_tests_run_against_installed_package() -> None:
    """The imported package is the installed distribution's, never a stray source tree.

    A regular install imports the copy in site-packages; an editable install (``pip install
    -e .``) imports the checkout it was made from.
    """
    dist = importlib.metadata.distribution("agentpool")
    here = pathlib.Path(agentpool.__file__).resolve()
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        root = pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(direct["url"]).path))
        assert here.is_relative_to(root.resolve()), (here, root)
    else:
        installed = pathlib.Path(str(dist.locate_file("agentpool/__init__.py"))).resolve()
        assert here == installed
