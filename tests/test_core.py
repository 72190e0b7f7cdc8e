"""The core's building blocks, on both cores."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from hotproxy import core

from conftest import run


class Conn:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_compiled_core_is_an_extension() -> None:
    if not core.COMPILED_AVAILABLE:
        pytest.skip("extension not built")
    import hotproxy._core as c

    assert c.__file__.endswith(".so")


def test_select_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown core"):
        core.select("fast")


def test_slot_swap_returns_old(core_name: str) -> None:
    slot = core.impl.Slot()
    assert slot.current is None
    a, b = object(), object()
    assert slot.swap(a) is None
    assert slot.current is a
    assert slot.swap(b) is a
    assert slot.current is b


def test_slot_drops_reference(core_name: str) -> None:
    class Svc:
        pass

    slot = core.impl.Slot(Svc())
    ref = weakref.ref(slot.current)
    slot.swap(None)
    gc.collect()
    assert ref() is None


def test_connection_set_parent_mirrors(core_name: str) -> None:
    site = core.impl.ConnectionSet()
    layer = core.impl.ConnectionSet(site)
    c1, c2 = Conn(), Conn()
    layer.add(c1)
    site.add(c2)
    assert len(layer) == 1 and len(site) == 2
    assert c1 in site and c2 not in layer
    layer.discard(c1)
    assert len(layer) == 0 and len(site) == 1
    layer.discard(c1)  # discarding twice is harmless
    assert len(site) == 1
    assert site.abort_all() == 1 and c2.aborted


def test_wait_empty(core_name: str) -> None:
    async def main() -> None:
        s = core.impl.ConnectionSet()
        assert (await asyncio.wait_for(s.wait_empty(), 1)) is None
        c = Conn()
        s.add(c)
        fut = s.wait_empty()
        await asyncio.sleep(0)
        assert not fut.done()
        s.discard(c)
        await asyncio.wait_for(fut, 1)

    run(main())


def test_acceptor_reads_slot_each_time(core_name: str) -> None:
    class Svc:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def new_connection(self, conns):  # type: ignore[no-untyped-def]
            return (self.tag, conns)

    slot = core.impl.Slot(Svc("a"))
    conns = core.impl.ConnectionSet()
    acc = core.impl.Acceptor(slot, conns)
    assert acc() == ("a", conns)
    slot.swap(Svc("b"))
    assert acc()[0] == "b"


def test_both_cores_have_the_same_api() -> None:
    from hotproxy import _core_py

    if not core.COMPILED_AVAILABLE:
        pytest.skip("extension not built")
    import hotproxy._core as c

    # the twin's own classes, and those it shares with the compiled core (one source)
    own = (_core_py.__name__, _core_py._machine.__name__)
    public = {n for n, v in vars(_core_py).items()
              if not n.startswith("_") and isinstance(v, type) and v.__module__ in own}
    assert {"Slot", "ConnectionSet", "Acceptor"} <= public
    for name in public:
        assert hasattr(c, name), f"compiled core lacks {name}"
        # methods and properties; slot attributes of the twin may be private C fields
        py_cls, c_cls = getattr(_core_py, name), getattr(c, name)
        py_methods = {m for m in dir(py_cls) if not m.startswith("_")
                      and (callable(getattr(py_cls, m)) or isinstance(getattr(py_cls, m), property))}
        c_methods = {m for m in dir(c_cls) if not m.startswith("_")}
        assert py_methods <= c_methods, f"{name}: compiled core lacks {py_methods - c_methods}"
