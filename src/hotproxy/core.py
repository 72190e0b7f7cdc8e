"""Choose the compiled core or its pure-Python twin.

``HOTPROXY_NO_EXTENSIONS=1`` (read at import) or a missing extension selects
the twin.  ``HOTPROXY_REQUIRE_EXTENSIONS=1`` (read at import) turns a missing
or broken extension into an ``ImportError`` naming the reason, instead of a
silent fall-back: CI sets it, so a build that lost the compiled core fails
rather than skipping its tests.  Code elsewhere reads ``core.impl`` when it
builds something, never at import time, so tests can run the same code on
both with ``select``.

``impl``, ``module()`` and ``select()`` are typed as ``Core``: the public
names of ``_core.pyi``, which both cores implement (the suite runs every core
test on both).  Type checkers check callers against the stub.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional, Protocol, cast

from . import _core_py
from .errors import describe

if TYPE_CHECKING:  # the stub: what callers of either core may rely on
    from . import _core as _stub

#: the environment switches (read once, at import)
NO_EXTENSIONS = "HOTPROXY_NO_EXTENSIONS"
REQUIRE_EXTENSIONS = "HOTPROXY_REQUIRE_EXTENSIONS"


class Core(Protocol):
    """A core module as callers see it: the names ``_core.pyi`` declares."""

    # pylint: disable=invalid-name,missing-function-docstring
    @property
    def Slot(self) -> type[_stub.Slot]: ...
    @property
    def CounterTable(self) -> type[_stub.CounterTable]: ...
    @property
    def SharedCounter(self) -> type[_stub.SharedCounter]: ...
    @property
    def ConnectionSet(self) -> type[_stub.ConnectionSet]: ...
    @property
    def Acceptor(self) -> type[_stub.Acceptor]: ...
    @property
    def ProxyCounters(self) -> type[_stub.ProxyCounters]: ...
    @property
    def UpstreamState(self) -> type[_stub.UpstreamState]: ...
    @property
    def Target(self) -> type[_stub.Target]: ...
    @property
    def RelayConfig(self) -> type[_stub.RelayConfig]: ...
    @property
    def Connection(self) -> type[_stub.Connection]: ...
    @property
    def Listener(self) -> type[_stub.Listener]: ...
    def table_size(self, slots: int, workers: int) -> int: ...
    def private_counter(self) -> _stub.SharedCounter: ...
    def proxy_networks(self, cidrs: Any) -> tuple[tuple[int, int, int], ...]: ...


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


#: the twin, seen through the stub: its classes are not the stub's, but
#: they expose the same names and behaviour (tests/ runs both on every test)
_python: Core = cast(Core, _core_py)

_compiled: Optional[Core]
#: why the extension could not be imported ("" if it could)
UNAVAILABLE_REASON = ""
try:
    from . import _core as _compiled_module
    _compiled = _compiled_module
except ImportError as exc:  # pragma: no cover - exercised on installs without a compiler
    _compiled = None
    UNAVAILABLE_REASON = describe(exc)
    if _flag(REQUIRE_EXTENSIONS):
        raise ImportError(f"hotproxy._core cannot be imported and {REQUIRE_EXTENSIONS}=1: "
                          f"{UNAVAILABLE_REASON}") from exc

#: True when the compiled extension could be imported at all.
COMPILED_AVAILABLE: bool = _compiled is not None


def _default() -> Core:
    if _flag(NO_EXTENSIONS) or _compiled is None:
        return _python
    return _compiled


#: The core in use: ``hotproxy._core`` or ``hotproxy._core_py``.
impl: Core = _default()


def module(name: str) -> Core:
    """The ``"compiled"`` or the ``"python"`` core, without selecting it."""
    if name == "compiled":
        if _compiled is None:
            raise ImportError(f"hotproxy._core is not built (pip install . compiles it): {UNAVAILABLE_REASON}")
        return _compiled
    if name == "python":
        return _python
    raise ValueError(f"unknown core {name!r}: expected 'compiled' or 'python'")


def select(name: str) -> Core:
    """Use the ``"compiled"`` or the ``"python"`` core from now on; return it."""
    global impl
    impl = module(name)
    return impl


def name() -> str:
    """``"compiled"`` or ``"python"``: the core in use."""
    return "python" if impl is _python else "compiled"


def python_source(stem: str) -> ModuleType:
    """The package's pure-Python-mode module ``STEM`` run as plain Python,
    as the pure-Python core runs it (``_balance``, ``clienthello``, ...): the
    compiled core builds the same file into an extension of that name."""
    return _core_py._load_as_python(stem)


def companion(stem: str) -> ModuleType:
    """The pure-Python-mode module ``STEM`` (``_balance``, ``clienthello``)
    as the core in use runs it: the compiled extension with the compiled
    core, the same source run as Python (``python_source``) with the twin."""
    if name() == "compiled":
        return importlib.import_module(f"{__package__}.{stem}")
    return python_source(stem)
