"""The two cores expose the same API and do the same on a scripted conversation.

The compiled core (``hotproxy._core``) and the pure-Python twin
(``hotproxy._core_py``) share the relay's logic (``_core_machine.py``, one
source: the state machines, the timer wheel, the connection's decisions);
the rest -- the system calls, the engine, the listener, the shared
counters -- is written twice.  This file is the check that the two halves
stay twins: every public class, function, method,
property and attribute of one is in the other with the same parameters
(names, kinds, defaults) and vice versa, and one scripted run of
connections -- a round trip and half-close each way, the upstream's EOF
first, no upstream at all, an idle timeout, back-pressure -- leaves the
same transcript (states, ends, byte counts, counters) on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import mmap
import os
import socket
from types import ModuleType
from typing import Any

import pytest

from conftest import eventually, free_port, run
from hotproxy import _core_py, core, listeners
from hotproxy.proxy import ProxyFactory
from test_proxy import (Backend, close, connect, connect_not_reading, drained, proxy_site, service,
                        site_address)

pytestmark = pytest.mark.skipif(not core.COMPILED_AVAILABLE, reason="extension not built")


def public(module: ModuleType) -> dict[str, Any]:
    """The module's own public classes and functions."""
    out = {}
    for name in dir(module):
        obj = getattr(module, name)
        if name.startswith("_") or not (inspect.isclass(obj) or callable(obj)):
            continue
        if not str(getattr(obj, "__module__", "")).startswith("hotproxy._core"):
            continue   # imported (typing, asyncio, ...); the core's own or _core_machine's
        out[name] = obj
    return out


def params(fn: Any) -> list[tuple[str, Any, Any]]:
    """(name, kind, default) of each parameter; annotations left out (Cython
    keeps none)."""
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def members(cls: type) -> dict[str, Any]:
    return {n: inspect.getattr_static(cls, n) for n in dir(cls) if not n.startswith("_")}


def is_method(obj: Any) -> bool:
    return inspect.isfunction(obj) or type(obj).__name__ in ("cython_function_or_method",
                                                               "method_descriptor")


def test_same_classes_and_functions() -> None:
    compiled, python = public(core.module("compiled")), public(_core_py)
    assert sorted(compiled) == sorted(python)


@pytest.mark.parametrize("name", sorted(public(_core_py)))
def test_same_members_and_signatures(name: str) -> None:
    c_obj, p_obj = getattr(core.module("compiled"), name), getattr(_core_py, name)
    if not inspect.isclass(p_obj):
        assert params(c_obj) == params(p_obj)
        return
    c_members, p_members = members(c_obj), members(p_obj)
    # the twin's fields are instance attributes: take them from an instance
    p_args = sample(_core_py, name)
    try:
        inst = p_obj(**p_args)
        p_members.update((n, v) for n, v in getattr(inst, "__dict__", {}).items()
                         if not n.startswith("_"))
    finally:
        if "sock" in p_args:
            p_args["sock"].close()
    for attr, c_m in c_members.items():
        # everything the compiled class shows, the twin has: a method with the
        # same parameters, a property, or a field
        assert attr in p_members, f"{name}.{attr} is not in the pure-Python core"
        p_m = p_members[attr]
        if is_method(c_m):
            assert is_method(p_m), f"{name}.{attr}: a method in one core only"
            assert params(c_m) == params(p_m), f"{name}.{attr}"
        elif isinstance(c_m, property):
            assert isinstance(p_m, property), f"{name}.{attr}: a property in one core only"
    for attr, p_m in p_members.items():
        # the twin's methods and properties are all in the compiled class (its
        # other fields are cdef attributes there: not visible from Python)
        if is_method(p_m) or isinstance(p_m, property):
            assert attr in c_members, f"{name}.{attr} is not in the compiled core"


# Constructors: the compiled classes are built by __cinit__, which inspect
# cannot read; both must accept the same keywords (the twin's names).

def sample(m: ModuleType, name: str) -> dict[str, Any]:
    """Values for the required parameters of *name*'s constructor."""
    counters = m.ProxyCounters()
    if name == "CounterTable":
        return {"buffer": mmap.mmap(-1, m.table_size(1, 1)), "slots": 1, "workers": 1}
    if name == "SharedCounter":
        return {"table": m.CounterTable(mmap.mmap(-1, m.table_size(1, 1)), 1, 1, 0), "slot": 0}
    if name == "Acceptor":
        return {"slot": m.Slot(), "conns": m.ConnectionSet()}
    if name == "UpstreamState":
        return {"address": "127.0.0.1:1"}
    if name == "Target":
        return {"state": m.UpstreamState("127.0.0.1:1"), "up": None, "family": socket.AF_INET,
                "sockaddr": b"\x02\x00" + bytes(14), "address": ("127.0.0.1", 1)}
    if name == "RelayConfig":
        return {"counters": counters}
    if name == "Connection":
        return {"cfg": m.RelayConfig(counters), "conns": m.ConnectionSet()}
    if name == "Listener":
        return {"acceptor": m.Acceptor(m.Slot(), m.ConnectionSet()), "sock": socket.socket()}
    return {}


@pytest.mark.parametrize("name", sorted(n for n, o in public(_core_py).items() if inspect.isclass(o)))
def test_same_constructors(name: str) -> None:
    c_mod, p_mod = core.module("compiled"), _core_py
    c_args, p_args = sample(c_mod, name), sample(p_mod, name)
    sig = inspect.signature(getattr(p_mod, name))
    required = {p.name for p in sig.parameters.values() if p.default is inspect.Parameter.empty}
    assert required == set(p_args), f"{name}: the sample lacks {required - set(p_args)}"
    try:
        # by keyword, every parameter the twin has (defaults included)
        for mod, args in ((c_mod, c_args), (p_mod, p_args)):
            kw = {p.name: (args[p.name] if p.name in args else p.default)
                  for p in sig.parameters.values()}
            getattr(mod, name)(**kw)
    finally:
        for args in (c_args, p_args):
            if "sock" in args:
                args["sock"].close()


# -- one scripted conversation, both cores: the same transcript --------------------------


async def conversation() -> list[Any]:
    log: list[Any] = []

    def conn_of(ex: Any) -> Any:
        (c,) = ex.sites["p"].conns.snapshot()
        return c

    # 1. round trip; the client's EOF first, the upstream's follows it
    b = await Backend(mode="echo").start()
    async with proxy_site(ProxyFactory((b.address,))) as ex:
        r, w = await connect(site_address(ex))
        w.write(b"hello")
        log.append(await r.readexactly(5))
        c = conn_of(ex)
        log.append(c.directions)
        w.write_eof()
        log.append(await r.read())
        await drained(ex)
        log.append((c.directions, c.end, c.bytes_in, c.bytes_out, c.spliced))
        await close(w)
        log.append(service(ex).counters.as_dict())
    await b.stop()

    # 2. the upstream's EOF first
    b = await Backend(mode="greet").start()
    async with proxy_site(ProxyFactory((b.address,))) as ex:
        r, w = await connect(site_address(ex))
        log.append(await r.read())
        c = conn_of(ex)
        log.append(c.directions)
        w.write(b"bye")
        w.write_eof()
        await drained(ex)
        log.append((c.directions, c.end, c.bytes_in, c.bytes_out))
        await close(w)
    await b.stop()

    # 3. no upstream: the client gets our EOF, the proxy closes after its own
    async with proxy_site(ProxyFactory((f"127.0.0.1:{free_port()}",), retries=0)) as ex:
        r, w = await connect(site_address(ex))
        log.append(await r.read())
        c = conn_of(ex)
        log.append(c.directions)
        w.write_eof()
        await drained(ex)
        log.append((c.directions, c.end, service(ex).counters.as_dict()))
        await close(w)

    # 4. an idle timeout
    b = await Backend(mode="echo").start()
    async with proxy_site(ProxyFactory((b.address,), idle_timeout=0.3)) as ex:
        r, w = await connect(site_address(ex))
        w.write(b"x")
        log.append(await r.readexactly(1))
        c = conn_of(ex)
        with contextlib.suppress(ConnectionError):
            log.append(await r.read())
        await drained(ex)
        log.append((c.directions, c.end, service(ex).counters.idle_closed))
        await close(w)
    await b.stop()

    # 5. back-pressure: a client that does not read, then reads it all
    payload = bytes(range(256)) * 65536
    b = await Backend(mode="stream", payload=payload).start()
    async with proxy_site(ProxyFactory((b.address,))) as ex:
        r, w = await connect_not_reading(ex)
        await eventually(lambda: len(ex.sites["p"].conns) == 1)
        c = conn_of(ex)
        await eventually(lambda: c.directions[2] in ("blocked", "eof_pend"))
        log.append(c.directions[:2])
        got = 0
        while chunk := await asyncio.wait_for(r.read(1 << 20), 10):
            got += len(chunk)
        log.append((got, c.directions))
        w.write_eof()
        await drained(ex)
        log.append((c.end, c.bytes_out, c.spliced))
        await close(w)
    await b.stop()
    return log


def test_scripted_conversation_same_on_both_cores() -> None:
    transcripts = {}
    previous = core.name()
    try:
        for name in ("compiled", "python"):
            core.select(name)
            transcripts[name] = run(conversation(), timeout=60)
    finally:
        core.select(previous)
    assert transcripts["compiled"] == transcripts["python"]
    t = transcripts["python"]
    assert t[0] == b"hello" and t[1] == ("open", "open", "open")
    assert t[3][:2] == (("finished", "closed", "closed"), "eof")
    # bulk moves through a pipe in both cores when the core owns the client
    # socket (it accepts it) and may splice
    splices = listeners.CORE_ACCEPT and os.environ.get("HOTPROXY_SPLICE", "1") not in ("", "0")
    assert t[-1] == ("eof", 16 << 20, "out" if splices else "")
