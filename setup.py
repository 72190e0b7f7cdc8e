"""Build script: compiles hotproxy's Cython core.

Cython runs here (not from a pre-generated .c file), so ``pip install .``
works from a bare checkout.  Build switches are environment variables:

* ``HOTPROXY_DEBUG=1``   -- keep asserts and bounds checks, no -O3
* ``HOTPROXY_ANNOTATE=1`` -- write Cython's HTML annotation next to the .pyx
"""

import os

from setuptools import Extension, setup

DEBUG = os.environ.get("HOTPROXY_DEBUG") == "1"
ANNOTATE = os.environ.get("HOTPROXY_ANNOTATE") == "1"


def extensions():
    from Cython.Build import cythonize

    cflags = ["-Wall", "-Wno-unused-function"]
    cflags += ["-O0", "-g"] if DEBUG else ["-O3"]
    exts = [
        # the I/O-free state machine and timer wheel: a .py that the
        # pure-Python core runs as it is, typed by _core_machine.pxd here
        Extension("hotproxy._core_machine", ["src/hotproxy/_core_machine.py"],
                  extra_compile_args=cflags),
        # the core: _core.pyx includes its parts (_core_*.pxi)
        Extension("hotproxy._core", ["src/hotproxy/_core.pyx"], extra_compile_args=cflags),
    ]
    return cythonize(
        exts,
        language_level=3,
        annotate=ANNOTATE,
        compiler_directives={
            "embedsignature": True,
            "freethreading_compatible": False,
        },
        compile_time_env={"DEBUG": DEBUG},
    )


setup(ext_modules=extensions())
