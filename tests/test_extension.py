"""The compiled core is the one loaded unless AGENTPOOL_NO_EXTENSIONS asks for the twin."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import urllib.parse

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
