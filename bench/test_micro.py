"""Micro-benchmarks of the control and accept paths, compiled vs pure-Python core.

Each benchmark runs on both cores (the ``core_name`` fixture), so pytest-
benchmark's table shows the compiled core's speed-up directly.  Operations
that take well under a microsecond are repeated ``N`` times inside one
measured call, so the call overhead of the harness does not swamp them; the
figure is then per ``N`` operations.

Rules of this file: no timing assertions (CI runs it with the benchmarks
disabled, just to keep it working); only correctness checks that make sure
the thing measured really happened.  The relay benchmark lives in
``bench/test_relay.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hotproxy import EchoFactory, Precommit, PrepareAndCommit, ServiceExecutor, TcpListenerFactory, Update
from hotproxy import core

#: inner repetitions for sub-microsecond operations
N = 1000


class _Proto(asyncio.Protocol):
    pass


class _Service:
    """The cheapest possible service: the accept path's cost is all that is left."""

    def __init__(self) -> None:
        self.proto = _Proto()

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        return self.proto


@pytest.mark.benchmark(group="slot read x1000")
def test_slot_read(benchmark: Any, core_name: str) -> None:
    """N reads of ``Slot.current`` (what every accepted connection does)."""
    svc = _Service()
    slot = core.impl.Slot(svc)

    def reads() -> Any:
        cur = None
        for _ in range(N):
            cur = slot.current
        return cur

    assert benchmark(reads) is svc


@pytest.mark.benchmark(group="slot swap x1000")
def test_slot_swap(benchmark: Any, core_name: str) -> None:
    """N swaps of the slot (what ``Update`` publishes with)."""
    a, b = _Service(), _Service()
    slot = core.impl.Slot(a)

    def swaps() -> Any:
        for _ in range(N // 2):
            slot.swap(b)
            slot.swap(a)
        return slot.current

    assert benchmark(swaps) is a


@pytest.mark.benchmark(group="accept path x1000")
def test_accept_path(benchmark: Any, core_name: str) -> None:
    """N calls of the ``Acceptor`` (slot read + ``new_connection``), as the
    event loop makes once per accepted connection."""
    svc = _Service()
    acceptor = core.impl.Acceptor(core.impl.Slot(svc), core.impl.ConnectionSet())

    def accepts() -> Any:
        p = None
        for _ in range(N):
            p = acceptor()
        return p

    assert benchmark(accepts) is svc.proto


@pytest.mark.benchmark(group="Precommit+Update cycle")
def test_precommit_update_cycle(benchmark: Any, core_name: str, loop: asyncio.AbstractEventLoop) -> None:
    """One ``Precommit`` + ``Update`` on an inline executor whose site serves
    on a real listener: the per-worker cost of a reload of one service."""
    executor = ServiceExecutor(0, drain_timeout=1.0)
    loop.run_until_complete(executor.execute(
        PrepareAndCommit("echo", EchoFactory(b"v0"), TcpListenerFactory("127.0.0.1", 0))))
    factories = [EchoFactory(b"v1"), EchoFactory(b"v2")]
    state = {"i": 0}

    async def cycle() -> int:
        state["i"] += 1
        await executor.execute(Precommit("echo", factories[state["i"] % 2]))
        result = await executor.execute(Update("echo"))
        return int(result["generation"])

    try:
        generation = benchmark(lambda: loop.run_until_complete(cycle()))
        assert generation == state["i"] + 1
    finally:
        loop.run_until_complete(executor.shutdown(0.5))


def _services_toml(count: int, greeting: str, changed_every: int = 0) -> str:
    """A config with *count* echo services; every *changed_every*-th differs."""
    lines = ["[runtime]", "workers = 1"]
    for i in range(count):
        g = greeting + ("x" if changed_every and i % changed_every == 0 else "")
        lines += [f"[services.s{i}]", 'kind = "echo"', f'listen = "127.0.0.1:{20000 + i}"',
                  f'greeting = "{g}"']
    return "\n".join(lines) + "\n"


@pytest.mark.benchmark(group="diff of 1,000 services")
def test_diff_1000_services(benchmark: Any, core_name: str) -> None:
    """The reload's diff of two 1,000-service configs (1 in 10 changed)."""
    reload = pytest.importorskip("hotproxy.reload", reason="hotproxy.reload (the diff) is not built yet")
    config = pytest.importorskip("hotproxy.config", reason="hotproxy.config is not built yet")
    if not hasattr(reload, "diff"):
        pytest.skip("hotproxy.reload has no diff() function")
    old = config.parse_config(_services_toml(1000, "a"), None)
    new = config.parse_config(_services_toml(1000, "a", changed_every=10), None)
    d = benchmark(reload.diff, old.services, new.services)
    assert len(d.changed) == 100 and len(d.unchanged) == 900
