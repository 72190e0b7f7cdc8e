"""WorkerManager over real worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hotproxy import (CommandGroupError, CountConnections, EchoFactory, PrepareAndCommit, Precommit,
                      BuildServiceError, TcpListenerFactory, Update, WorkerManager, stack)

from conftest import echo_roundtrip, eventually, free_port, run
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
            assert all(s["generation"] == 2 for s in stats)
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
        await asyncio.sleep(0.3)
        assert not stopping.done()                   # waiting for our connection
        assert await ask(r, w, b"b") == b"v1:b"      # which is still served
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
