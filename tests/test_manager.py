"""WorkerManager over real worker processes."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from hotproxy import (CommandGroupError, CountConnections, EchoFactory, PrepareAndCommit, Precommit,
                      BuildServiceError, TcpListenerFactory, Update, WorkerManager, stack)

from conftest import echo_roundtrip, eventually, free_port, run
from helpers_program import refuses
from services import TaggedFactory, ask

HOST = "127.0.0.1"


async def site_stats(m: WorkerManager, name: str) -> list[dict]:
    return [w["sites"][name] for w in await m.status() if w["alive"] and name in w.get("sites", {})]


def test_two_workers_serve_and_update(core_name: str) -> None:
    async def main() -> None:
        port = free_port()
        async with WorkerManager(2, core=core_name) as m:
            group = await m.dispatch(PrepareAndCommit(
                "t", stack(TaggedFactory(b"v1"), CountConnections()), TcpListenerFactory(HOST, port)))
            group.raise_for_errors()
            assert [r.worker for r in group] == [0, 1] and group.ok
            for i in range(40):
                r, w = await asyncio.open_connection(HOST, port)
                assert await ask(r, w, b"%d" % i) == b"v1:%d" % i
                w.close()
            # the kernel spread connections over both workers' sockets
            stats = await site_stats(m, "t")
            assert len(stats) == 2 and all(s["stats"]["accepted"] > 0 for s in stats)
            assert sum(s["stats"]["accepted"] for s in stats) == 40
            long_r, long_w = await asyncio.open_connection(HOST, port)
            assert await ask(long_r, long_w, b"L") == b"v1:L"
            (await m.dispatch(Precommit("t", stack(TaggedFactory(b"v2"), CountConnections())))).raise_for_errors()
            (await m.dispatch(Update("t"))).raise_for_errors()
            for i in range(10):
                r, w = await asyncio.open_connection(HOST, port)
                assert await ask(r, w, b"n") == b"v2:n"
                w.close()
            assert await ask(long_r, long_w, b"M") == b"v1:M"   # its version, never cut
            long_w.close()
            stats = await site_stats(m, "t")
            assert [s["generation"] for s in stats] == [2, 2]
            await eventually(lambda: _accepted(m, 51))

    run(main())


async def _accepted(m: WorkerManager, n: int) -> bool:
    return sum(s["stats"]["accepted"] for s in await site_stats(m, "t")) == n


def test_result_group_reports_the_failing_worker() -> None:
    async def main() -> None:
        port = free_port()
        async with WorkerManager(2) as m:
            (await m.dispatch(PrepareAndCommit("t", TaggedFactory(b"v1"), TcpListenerFactory(HOST, port)))
             ).raise_for_errors()
            group = await m.dispatch(Precommit("t", TaggedFactory(b"v2", fail_on_worker=1)))
            assert not group.ok
            assert [r.worker for r in group.failures] == [1]
            assert group[0].ok
            with pytest.raises(CommandGroupError) as info:
                group.raise_for_errors()
            (err,) = info.value.exceptions
            assert isinstance(err, BuildServiceError) and err.worker == 1 and err.site == "t"
            assert "worker 1" in str(err) and "refusing to build" in str(err)

    run(main())


def test_killed_worker_comes_back_with_current_deployment() -> None:
    async def main() -> None:
        port = free_port()
        exits: list[tuple[int, int]] = []
        async with WorkerManager(2) as m:
            m.on_worker_exit = lambda wid, code: exits.append((wid, code))
            (await m.dispatch(PrepareAndCommit("t", TaggedFactory(b"v1"), TcpListenerFactory(HOST, port)))
             ).raise_for_errors()
            victim = m.workers[0]
            old_pid = victim.pid
            os.kill(old_pid, signal.SIGKILL)
            await eventually(lambda: exits, timeout=10)
            assert exits[0][0] == 0 and exits[0][1] == -signal.SIGKILL
            # a two-stage deployment issued while worker 0 may be down is not lost
            (await m.dispatch(Precommit("t", TaggedFactory(b"v2")))).raise_for_errors()
            (await m.dispatch(Update("t"))).raise_for_errors()
            await eventually(lambda: victim.ready and victim.pid != old_pid, timeout=10)
            stats = await site_stats(m, "t")
            assert len(stats) == 2 and all(s["stats"]["tag"] == "v2" for s in stats)
            assert m.restarts == 1
            for _ in range(20):
                r, w = await asyncio.open_connection(HOST, port)
                assert await ask(r, w, b"x") == b"v2:x"
                w.close()

    run(main())


def test_inline_mode_runs_in_the_callers_loop() -> None:
    async def main() -> None:
        port = free_port()
        async with WorkerManager(inline=True) as m:
            (await m.dispatch(PrepareAndCommit("e", EchoFactory(), TcpListenerFactory(HOST, port)))
             ).raise_for_errors()
            assert await echo_roundtrip(HOST, port, b"inline") == b"inline"
            (status,) = await m.status()
            assert status["pid"] == os.getpid() and status["sites"]["e"]["generation"] == 1

    run(main())


def test_graceful_stop_drains_open_connections() -> None:
    async def main() -> None:
        port = free_port()
        m = WorkerManager(1, drain_timeout=10)
        await m.start()
        (await m.dispatch(PrepareAndCommit("t", TaggedFactory(b"v1"), TcpListenerFactory(HOST, port)))
         ).raise_for_errors()
        r, w = await asyncio.open_connection(HOST, port)
        assert await ask(r, w, b"a") == b"v1:a"
        stopping = asyncio.create_task(m.stop(graceful=True))
        await eventually(lambda: refuses(port))     # the worker is stopping: its listener is closed
        assert await ask(r, w, b"b") == b"v1:b"      # our connection is still served...
        assert not stopping.done()                   # ...and the stop waits for it
        w.close()
        await asyncio.wait_for(stopping, 10)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(HOST, port)

    run(main())


def test_workers_exit_when_the_master_dies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    script = tmp_path / "master.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        from hotproxy import WorkerManager, PrepareAndCommit, EchoFactory, TcpListenerFactory
        async def main():
            m = WorkerManager(2)
            await m.start()
            (await m.dispatch(PrepareAndCommit("e", EchoFactory(), TcpListenerFactory("127.0.0.1", {port})))
             ).raise_for_errors()
            print(" ".join(str(w.pid) for w in m.workers), flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == 2
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


class _FailedRestarts(logging.Handler):
    """Records the manager's "restart failed ...; retrying in Xs" lines: (when, X)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"restart failed: .*; retrying in ([0-9.]+)s$", record.getMessage())
        if found:
            self.seen.append((record.created, float(found.group(1))))


@pytest.fixture
def failed_restarts() -> Iterator[_FailedRestarts]:
    handler = _FailedRestarts()
    logger = logging.getLogger("hotproxy.manager")
    logger.addHandler(handler)
    level = logger.level
    if logger.getEffectiveLevel() > logging.ERROR:
        logger.setLevel(logging.ERROR)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_worker_that_cannot_come_back_is_backed_off_not_looped(
        tmp_path: Path, failed_restarts: _FailedRestarts) -> None:
    """Each failed restart announces a wait twice the one before (exponential
    back-off, not a restart loop), and the next attempt comes no sooner than
    announced.  That last check is a lower bound on a wait, which a slow
    machine only lengthens: no timing is assumed."""
    flag = tmp_path / "broken"

    async def main() -> None:
        port = free_port()
        async with WorkerManager(2) as m:
            (await m.dispatch(PrepareAndCommit(
                "t", TaggedFactory(b"v1", fail_if_exists=str(flag)), TcpListenerFactory(HOST, port)))
             ).raise_for_errors()
            flag.write_text("")
            os.kill(m.workers[0].pid, signal.SIGKILL)
            await eventually(lambda: len(failed_restarts.seen) >= 4, timeout=60)
            seen = failed_restarts.seen
            assert m.failed_restarts == len(seen)
            delays = [d for _, d in seen]
            print(f"failed restarts, each retried after: {delays}")
            assert delays[0] in (0.05, 0.1), delays       # after 0 (or 0.05) s for a worker that died young
            assert all(b == pytest.approx(2 * a) for a, b in zip(delays, delays[1:])), delays
            assert all(t1 - t0 >= d for (t0, d), (t1, _) in zip(seen, seen[1:])), seen
            assert not m.workers[0].ready
            # the other worker kept serving all along
            for _ in range(10):
                r, w = await asyncio.open_connection(HOST, port)
                assert await ask(r, w, b"x") == b"v1:x"
                w.close()
            # commands still work with a worker down: they go to the live one
            (await m.dispatch(Precommit("t", TaggedFactory(b"v2", fail_if_exists=str(flag))))).ok
            flag.unlink()
            await eventually(lambda: m.workers[0].ready, timeout=20)
            assert m.restarts == 1

    run(main(), timeout=120)


def test_kill_a_worker_under_load_loses_no_connection_on_the_others() -> None:
    async def main() -> None:
        port = free_port()
        async with WorkerManager(2) as m:
            (await m.dispatch(PrepareAndCommit("t", TaggedFactory(b"v1"), TcpListenerFactory(HOST, port)))
             ).raise_for_errors()
            # long connections, some on each worker
            longs = [await asyncio.open_connection(HOST, port) for _ in range(20)]
            for r, w in longs:
                assert await ask(r, w, b"a") == b"v1:a"
            by_worker = {w["worker"]: w["sites"]["t"]["active"] for w in await m.status()}
            assert by_worker[0] > 0 and by_worker[1] > 0
            victim = m.workers[0]
            old_pid = victim.pid
            os.kill(old_pid, signal.SIGKILL)
            # the survivors (worker 1's connections) keep talking
            alive = cut = 0
            for r, w in longs:
                try:
                    assert await asyncio.wait_for(ask(r, w, b"b"), 5) == b"v1:b"
                    alive += 1
                except (ConnectionError, asyncio.IncompleteReadError):
                    cut += 1
                w.close()
            assert alive == by_worker[1] and cut == by_worker[0]
            await eventually(lambda: victim.ready and victim.pid != old_pid, timeout=10)

    run(main())


def test_cpu_affinity_pins_each_worker() -> None:
    ncpu = len(os.sched_getaffinity(0))
    if ncpu < 2:
        pytest.skip("needs 2 CPUs")

    async def main() -> None:
        async with WorkerManager(2, cpu_affinity=True) as m:
            pinned = [os.sched_getaffinity(w.pid) for w in m.workers]
            assert pinned == [{0}, {1}]

    run(main())


def test_dispatch_many_runs_a_batch_in_order_on_every_worker() -> None:
    """All commands are sent at once; each worker runs them in order, and each
    gets its own result group -- as if dispatched one by one."""
    from hotproxy import Abort, NothingStagedError

    async def main() -> None:
        p1, p2 = free_port(), free_port()
        async with WorkerManager(2) as m:
            groups = await m.dispatch_many([
                PrepareAndCommit("a", TaggedFactory(b"a1"), TcpListenerFactory(HOST, p1)),
                PrepareAndCommit("b", TaggedFactory(b"b1"), TcpListenerFactory(HOST, p2)),
                Precommit("a", TaggedFactory(b"a2")),
                Update("a"),                               # only works after the Precommit
                Precommit("b", TaggedFactory(b"b2", fail_on_worker=1)),
                Update("b"),                               # nothing staged on worker 1
            ])
            assert [g.command.name for g in groups] == ["a", "b", "a", "a", "b", "b"]
            assert all(g.ok for g in groups[:4])
            assert [r.worker for r in groups[4].failures] == [1]
            assert [r.worker for r in groups[5].failures] == [1]
            assert isinstance(groups[5].failures[0].error, NothingStagedError)
            for _ in range(8):
                r, w = await asyncio.open_connection(HOST, p1)
                assert await ask(r, w, b"x") == b"a2:x"
                w.close()
            stats = {s["generation"] for s in await site_stats(m, "b")}
            assert stats == {1, 2}                     # worker 0 updated, worker 1 did not
            assert await m.dispatch_many([]) == []
            (await m.dispatch(Abort("b"))).raise_for_errors()

    run(main())


def test_a_slow_name_lookup_never_stalls_the_worker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Building a version whose upstream, or listener, is a host name: while
    the lookup is held in each worker's resolver, clients of another service
    on the same workers are served; the Precommit is still pending then, and
    completes with the address the lookup gave once it is let go."""
    from hotproxy import Commit, ProxyFactory

    from services import SLOW_HOST, SlowResolverFactory

    other, proxy_port, listen2 = free_port(), free_port(), free_port()

    def started(port: int) -> bool:
        return all((tmp_path / f"started-{port}-{i}").exists() for i in (0, 1))

    def release(port: int) -> None:
        (tmp_path / f"release-{port}").touch()

    async def served_while_pending(task: asyncio.Future, port: int) -> None:
        await eventually(lambda: started(port), timeout=30)   # both workers are in the lookup
        for i in range(10):
            r, w = await asyncio.wait_for(asyncio.open_connection(HOST, other), 10)
            assert await asyncio.wait_for(ask(r, w, b"%d" % i), 10) == b"other:%d" % i
            w.close()
        assert not task.done()                                # the lookup still holds it
        release(port)
        (await asyncio.wait_for(task, 30)).raise_for_errors()

    async def main() -> None:
        async with WorkerManager(2) as m:
            try:
                (await m.dispatch(PrepareAndCommit("other", SlowResolverFactory(b"other", str(tmp_path)),
                                                   TcpListenerFactory(HOST, other)))).raise_for_errors()
                # a proxy whose upstream is a host name
                task = asyncio.ensure_future(m.dispatch(Precommit(
                    "p", ProxyFactory((f"{SLOW_HOST}:{other}",)), TcpListenerFactory(HOST, proxy_port))))
                await served_while_pending(task, other)
                (await m.dispatch(Commit("p"))).raise_for_errors()
                r, w = await asyncio.open_connection(HOST, proxy_port)
                assert await asyncio.wait_for(ask(r, w, b"via"), 10) == b"other:via"   # where the lookup said
                w.close()
                # a listener whose host is a name
                task = asyncio.ensure_future(m.dispatch(Precommit(
                    "e", TaggedFactory(b"e"), TcpListenerFactory(SLOW_HOST, listen2))))
                await served_while_pending(task, listen2)
                (await m.dispatch(Commit("e"))).raise_for_errors()
                r, w = await asyncio.open_connection(HOST, listen2)
                assert await asyncio.wait_for(ask(r, w, b"x"), 10) == b"e:x"
                w.close()
            finally:
                for port in (other, listen2):
                    release(port)   # never leave a worker waiting

    run(main(), 120)
