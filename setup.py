"""Build the compiled core ``agentpool._core``.

``AGENTPOOL_NO_EXTENSIONS=1`` at build time skips the extension (pure-Python install);
``AGENTPOOL_DEBUG=1`` builds with line tracing and an annotated HTML report.
"""

import os

from setuptools import Extension, setup

NO_EXTENSIONS = bool(os.environ.get("AGENTPOOL_NO_EXTENSIONS"))
DEBUG = bool(os.environ.get("AGENTPOOL_DEBUG"))

ext_modules = []
if not NO_EXTENSIONS:
    from Cython.Build import cythonize

    directives = {"language_level": "3", "embedsignature": True}
    macros = []
    if DEBUG:
        directives["linetrace"] = True
        macros.append(("CYTHON_TRACE", "1"))
    ext_modules = cythonize(
        [
            Extension(
                "agentpool._core",
                ["agentpool/_core.pyx"],
                define_macros=macros,
                extra_compile_args=["-O2"],
            )
        ],
        compiler_directives=directives,
        annotate=DEBUG,
    )

setup(ext_modules=ext_modules)
