"""The instance-wide connection counters (``hotproxy.limits`` and the core's
``CounterTable``/``SharedCounter``), on both cores, with real processes
sharing the memory: exactness under contention, and a ``kill -9`` that
leaves no count behind once the master reclaims it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from hotproxy import EchoFactory, LimitConnections, Precommit, PrepareAndCommit, Update, WorkerManager, core, stack
from hotproxy.limits import CounterSlot, Segment, counter
from hotproxy.listeners import TcpListenerFactory
from hotproxy.proxy import ProxyFactory

from conftest import eventually, free_port, run
from hotproxy.executor import ServiceExecutor
from test_proxy import Backend, close, connect

HOST = "127.0.0.1"


def test_acquire_refuses_at_the_limit_and_release_frees(core_name: str) -> None:
    c = core.impl.private_counter()
    assert [c.acquire(3) for _ in range(4)] == [True, True, True, False]
    assert (c.value, c.mine) == (3, 3)
    c.release()
    assert c.acquire(3) and not c.acquire(3)
    assert c.acquire(0) and c.value == 4          # 0: no limit, but still counted
    for _ in range(4):
        c.release()
    assert (c.value, c.mine) == (0, 0)


def test_two_workers_share_totals_and_reclaim_gives_back_one_share(core_name: str) -> None:
    seg = Segment.create(2, worker=0, slots=8)
    try:
        other = Segment.attach(os.dup(seg.fd), 1)      # as a second worker would map it
        a, b = seg.counter(5), other.counter(5)
        assert [a.acquire(4) for _ in range(3)] == [True] * 3
        assert [b.acquire(4) for _ in range(2)] == [True, False]
        assert (a.value, b.value, a.mine, b.mine) == (4, 4, 3, 1)
        assert seg.counter(4).value == 0               # slots are apart
        assert seg.table().reclaim(1) == 1             # worker 1 is "dead": its one count back
        assert (a.value, b.mine, seg.table().share(1, 5)) == (3, 0, 0)
        assert a.acquire(4) and a.value == 4
        other.close()
    finally:
        seg.close()


def test_table_checks(core_name: str) -> None:
    impl = core.impl
    with pytest.raises(ValueError, match="needs"):
        impl.CounterTable(bytearray(64), 8, 2, 0)
    with pytest.raises(ValueError):
        impl.CounterTable(bytearray(impl.table_size(1, 1)), 1, 1, 1)        # no such worker
    master = impl.CounterTable(bytearray(impl.table_size(2, 2)), 2, 2, -1)
    with pytest.raises(ValueError, match="no share"):
        master.counter(0)
    with pytest.raises(IndexError):
        master.total(2)
    with pytest.raises(BufferError):
        impl.CounterTable(bytes(impl.table_size(1, 1)), 1, 1, 0)            # read-only


def test_connection_set_with_a_limit_releases_members_only(core_name: str) -> None:
    class Conn:
        def abort(self) -> None:
            pass

    c = core.impl.private_counter()
    site = core.impl.ConnectionSet()
    counted = core.impl.ConnectionSet(site, c)
    x, y = Conn(), Conn()
    assert c.acquire(0)
    counted.add(x)
    counted.discard(y)                       # never added: no count to give back
    assert c.value == 1 and len(site) == 1
    counted.discard(x)
    counted.discard(x)                       # twice: given back once
    assert c.value == 0 and len(site) == 0


def test_slots_are_stable_per_name_and_run_out_with_a_clear_error() -> None:
    seg = Segment.create(1, worker=0, slots=3)
    try:
        f = stack(EchoFactory(), LimitConnections(max_connections=2))
        lf = TcpListenerFactory(HOST, 1)
        a = seg.stamp(PrepareAndCommit("a", f, lf))
        assert a.factory.counter == CounterSlot(seg.key, 0)
        assert seg.stamp(Precommit("a", f)).factory == a.factory       # the same name: the same slot
        # a proxy under a limit: two limits, two slots, outermost first
        p = seg.stamp(Precommit("p", stack(ProxyFactory(("127.0.0.1:1",)), LimitConnections())))
        assert p.factory.counter.slot == 1 and p.factory.inner.counter.slot == 2
        full = seg.stamp(Precommit("c", f))
        assert full.factory.counter.slot == -1
        with pytest.raises(ValueError, match="no connection counter left: one run counts at most 3 services"):
            counter(full.factory.counter)
        assert seg.stamp(Precommit("e", EchoFactory())).factory == EchoFactory()   # no limit: as it was
    finally:
        seg.close()


def test_count_carries_over_update_and_is_shared_by_every_version(core_name: str) -> None:
    """Inline manager: the limit holds over an Update while the old version's
    connections stay open."""
    async def main() -> None:
        port = free_port()
        async with WorkerManager(inline=True) as m:
            def f(g: bytes) -> object:
                return stack(EchoFactory(g), LimitConnections(max_connections=2))
            (await m.dispatch(PrepareAndCommit("e", f(b"1"), TcpListenerFactory(HOST, port)))).raise_for_errors()
            held = [await _served(port) for _ in range(2)]
            assert all(held)
            (await m.dispatch(Precommit("e", f(b"2")))).raise_for_errors()
            (await m.dispatch(Update("e"))).raise_for_errors()
            assert await _served(port) is None                 # still 2 open: refused
            held[0][1].close()
            svc = m.workers[0].executor.sites["e"].service
            await eventually(lambda: svc.counter.value == 1)
            again = await _served(port)
            assert again is not None and again[2] == b"2"
            for r, w, _ in [held[1], again]:
                w.close()
            await eventually(lambda: svc.counter.value == 0)

    run(main())


async def _served(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes] | None:
    """Open a connection to an echo with a 1-byte greeting: (reader, writer,
    greeting) if it is served, None if it is refused (closed at once)."""
    r, w = await asyncio.open_connection(HOST, port)
    try:
        greeting = await asyncio.wait_for(r.readexactly(1), 10)
        w.write(b"ping")
        if await asyncio.wait_for(r.readexactly(4), 10) == b"ping":
            return r, w, greeting
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    w.close()
    return None


@pytest.mark.parametrize("accept", ["core", "loop"])
def test_a_limit_over_a_proxy_gets_its_count_back_when_the_proxy_refuses(
        core_name: str, accept: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A limit layer admits, the proxy below it refuses (its own limit): the
    layer's count goes back, through the core's accept and through asyncio's."""
    monkeypatch.setattr("hotproxy.listeners.CORE_ACCEPT", accept == "core")

    async def main() -> None:
        backend = await Backend(name="b", mode="echo").start()
        ex = ServiceExecutor(drain_timeout=5)
        port = free_port()
        f = stack(ProxyFactory((backend.address,), max_connections=1), LimitConnections(max_connections=5))
        try:
            await ex.execute(PrepareAndCommit("s", f, TcpListenerFactory(HOST, port)))
            assert ex.sites["s"].listener.mode == accept
            layer = ex.sites["s"].service
            r1, w1 = await connect(f"{HOST}:{port}")
            w1.write(b"one")
            assert await asyncio.wait_for(r1.readexactly(3), 5) == b"one"
            for _ in range(3):                        # refused by the proxy, each one
                r2, w2 = await connect(f"{HOST}:{port}")
                with contextlib.suppress(ConnectionError):
                    assert await asyncio.wait_for(r2.read(), 5) == b""
                await close(w2)
            await eventually(lambda: layer.counter.value == 1)
            assert layer.inner.counters.refused == 3 and layer.stats()["refused"] == 0
            await close(w1)
            await eventually(lambda: layer.counter.value == 0 and layer.inner.shared.limit.value == 0)
        finally:
            await ex.shutdown(2.0)
            await backend.stop()

    run(main())


# -- real processes ---------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import os, sys
    from hotproxy.limits import Segment
    fd, worker, slot, limit, tries, hold = map(int, sys.argv[1:7])
    c = Segment.attach(fd, worker).counter(slot)
    print("ready", flush=True)
    sys.stdin.readline()          # every process starts at once
    got = sum(c.acquire(limit) for _ in range(tries))
    print(got, flush=True)
    if hold:
        sys.stdin.read()          # hold the counts until killed
    for _ in range(got):
        c.release()
""")


def _child(seg: Segment, worker: int, slot: int, limit: int, tries: int, hold: bool) -> subprocess.Popen[str]:
    """A process that maps *seg* as *worker*, and on "go" tries *tries*
    acquires in *slot*; it prints how many succeeded, then holds them until
    its stdin closes (*hold*) and releases them."""
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(seg.fd), str(worker), str(slot), str(limit), str(tries),
         str(int(hold))],
        pass_fds=(seg.fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ))


def _go(*kids: subprocess.Popen[str]) -> list[int]:
    """Start *kids* at once; how many counts each one got."""
    for k in kids:
        assert k.stdout.readline() == "ready\n"  # type: ignore[union-attr]
    for k in kids:
        k.stdin.write("go\n")  # type: ignore[union-attr]
        k.stdin.flush()  # type: ignore[union-attr]
    return [int(k.stdout.readline()) for k in kids]  # type: ignore[union-attr]


def test_processes_racing_for_the_last_counts_get_exactly_the_limit(core_name: str) -> None:
    """Four processes at once try 20,000 acquires each against a limit of
    50,000: exactly 50,000 succeed in all (no count lost or doubled), and the
    shares add up to the total."""
    seg = Segment.create(4, slots=4)
    try:
        kids = [_child(seg, w, 2, 50_000, 20_000, True) for w in range(4)]
        try:
            got = _go(*kids)
            table = seg.table()
            print("acquired per process:", got)
            assert sum(got) == 50_000 == table.total(2)
            assert [table.share(w, 2) for w in range(4)] == got
            for k in kids:
                k.stdin.close()  # type: ignore[union-attr]
                assert k.wait(30) == 0
            assert table.total(2) == 0
        finally:
            for k in kids:
                k.kill()
                k.wait()
                k.stdout.close()  # type: ignore[union-attr]
    finally:
        seg.close()


def test_kill_9_leaves_counts_behind_until_reclaimed(core_name: str) -> None:
    seg = Segment.create(2, slots=4)
    try:
        keeper = _child(seg, 0, 1, 10, 4, True)
        victim = _child(seg, 1, 1, 10, 5, True)
        try:
            assert _go(keeper, victim) == [4, 5]
            table = seg.table()
            assert table.total(1) == 9
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
            assert table.total(1) == 9                 # its counts outlive it...
            assert seg.reclaim(1) == 5                 # ...until the master gives them back
            assert (table.total(1), table.share(1, 1), table.share(0, 1)) == (4, 0, 4)
            assert seg.reclaim(1) == 0
        finally:
            for k in (keeper, victim):
                k.kill()
                k.wait()
                k.stdout.close()  # type: ignore[union-attr]
                k.stdin.close()  # type: ignore[union-attr]
    finally:
        seg.close()
