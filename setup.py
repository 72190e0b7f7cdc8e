"""Build script: compiles hotproxy's Cython core.

Cython runs here (not from a pre-generated .c file), so ``pip install .``
works from a bare checkout; it runs when the extension is built, not when
an sdist is made, so the sdist holds the ``.pyx``/``.pxd`` sources and no
generated C.  Build switches are environment variables:

* ``HOTPROXY_DEBUG=1``   -- a debug build: ``-O0 -g``; C asserts on
  (``-UNDEBUG``: CPython's own inline checks too); Cython's run-time checks
  all on, whatever the source turns off: ``boundscheck``, ``wraparound``,
  ``initializedcheck``, plus ``nonecheck`` (a ``None`` where an object is
  typed raises instead of crashing) and ``overflowcheck`` (C integer
  overflow raises).  Cython ``assert`` statements are compiled in either way.
* (default) release: ``-O3``, Cython's default checks (bounds and negative
  indices checked; no None or overflow checks).
* ``HOTPROXY_ANNOTATE=1`` -- write Cython's HTML annotation next to the .pyx
  (a debug build writes its C and annotation under ``build/cython-debug/``)
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

DEBUG = os.environ.get("HOTPROXY_DEBUG") == "1"
ANNOTATE = os.environ.get("HOTPROXY_ANNOTATE") == "1"

#: Cython directives of a debug build (a release build uses Cython's defaults)
DEBUG_DIRECTIVES = {
    "boundscheck": True,
    "wraparound": True,
    "initializedcheck": True,
    "nonecheck": True,
    "overflowcheck": True,
}


def extensions():
    cflags = ["-Wall", "-Wno-unused-function"]
    cflags += ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]
    return [
        # the I/O-free state machine and timer wheel: a .py that the
        # pure-Python core runs as it is, typed by _core_machine.pxd here
        Extension("hotproxy._core_machine", ["src/hotproxy/_core_machine.py"], extra_compile_args=cflags),
        # the consistent-hash table of balance = "hash": a .py too (_balance.pxd)
        Extension("hotproxy._balance", ["src/hotproxy/_balance.py"], extra_compile_args=cflags),
        # the TLS ClientHello parser of sni routing: a .py too (clienthello.pxd)
        Extension("hotproxy.clienthello", ["src/hotproxy/clienthello.py"], extra_compile_args=cflags),
        # the core: _core.pyx includes its parts (_core_*.pxi)
        Extension("hotproxy._core", ["src/hotproxy/_core.pyx"], extra_compile_args=cflags),
    ]


def cythonize(exts):
    from Cython.Build import cythonize as _cythonize

    directives = {
        "embedsignature": True,
        "freethreading_compatible": False,
    }
    if DEBUG:
        directives.update(DEBUG_DIRECTIVES)
    return _cythonize(
        exts,
        language_level=3,
        annotate=ANNOTATE,
        compiler_directives=directives,
        # a debug build's C (and annotation) under build/, so that C of one
        # kind is never taken, as up to date, for the other
        build_dir="build/cython-debug" if DEBUG else None,
    )


class build_ext(_build_ext):
    """Run Cython when the extension is built (as uvloop and asyncpg do)."""

    def finalize_options(self):
        self.distribution.ext_modules[:] = cythonize(self.distribution.ext_modules)
        super().finalize_options()


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext})
