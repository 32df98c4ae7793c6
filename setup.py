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
    # Release builds carry no debug info and no symbol table (2.9 MB -> ~0.5 MB).
    compile_args = ["-O2", "-g0"]
    link_args = ["-s"]
    if DEBUG:
        directives["linetrace"] = True
        macros.append(("CYTHON_TRACE", "1"))
        compile_args = ["-O2", "-g"]
        link_args = []
    ext_modules = cythonize(
        [
            Extension(
                "agentpool._core",
                ["agentpool/_core.pyx"],
                define_macros=macros,
                extra_compile_args=compile_args,
                extra_link_args=link_args,
            )
        ],
        compiler_directives=directives,
        annotate=DEBUG,
    )

setup(ext_modules=ext_modules)
