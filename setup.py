"""Build the compiled core: ``agentpool._core`` and the pure-Python-mode modules it cimports.

``agentpool/_selection_c.py`` and ``agentpool/_metrics_c.py`` are links to the plain-Python
sources ``_selection_py.py`` and ``_metrics_py.py``; Cython compiles them with the C types of
the ``.pxd`` next to them (pure-Python mode), and the same files run interpreted as the
pure-Python core.
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
                f"agentpool.{name}",
                [f"agentpool/{name}.{ext}"],
                define_macros=macros,
                extra_compile_args=compile_args,
                extra_link_args=link_args,
            )
            # the pure-Python-mode modules first: _core cimports them
            for name, ext in (("_selection_c", "py"), ("_metrics_c", "py"), ("_core", "pyx"))
        ],
        compiler_directives=directives,
        annotate=DEBUG,
    )

setup(ext_modules=ext_modules)
