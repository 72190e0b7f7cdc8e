"""Choose the compiled core or its pure-Python twin.

``HOTPROXY_NO_EXTENSIONS=1`` (read at import) or a missing extension selects
the twin.  Code elsewhere reads ``core.impl`` when it builds something, never
at import time, so tests can run the same code on both with ``select``.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

from . import _core_py

_compiled: Optional[ModuleType]
try:
    from . import _core as _compiled  # type: ignore[attr-defined, no-redef]
except ImportError:  # pragma: no cover - exercised on installs without a compiler
    _compiled = None

#: True when the compiled extension could be imported at all.
COMPILED_AVAILABLE: bool = _compiled is not None


def _default() -> ModuleType:
    if os.environ.get("HOTPROXY_NO_EXTENSIONS", "") not in ("", "0") or _compiled is None:
        return _core_py
    return _compiled


#: The core in use: ``hotproxy._core`` or ``hotproxy._core_py``.
impl: ModuleType = _default()


def module(name: str) -> ModuleType:
    """The ``"compiled"`` or the ``"python"`` core, without selecting it."""
    if name == "compiled":
        if _compiled is None:
            raise ImportError("hotproxy._core is not built (pip install . compiles it)")
        return _compiled
    if name == "python":
        return _core_py
    raise ValueError(f"unknown core {name!r}: expected 'compiled' or 'python'")


def select(name: str) -> ModuleType:
    """Use the ``"compiled"`` or the ``"python"`` core from now on; return it."""
    global impl
    impl = module(name)
    return impl


def name() -> str:
    """``"compiled"`` or ``"python"``: the core in use."""
    return "python" if impl is _core_py else "compiled"
