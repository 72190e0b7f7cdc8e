"""The master's descriptors: the admin socket's idle timeout and cap, the restart reserve.

Clients of the admin socket that connect and say nothing (a leaky script, a
stuck monitor) must not take the descriptors the master needs: to answer
``hotproxy status`` and ``hotproxy reload``, and to restart a worker that
died.  Real program (``ulimit -n 256``), real Unix connections, real
``kill -9``; nothing is timed: every wait is an event with a bound, and the
figures are printed (``pytest -s``) for the README.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable


from conftest import eventually, free_port, run
from helpers_program import Program, roundtrip, toml
from hotproxy.admin import AdminServer

Start = Callable[..., Program]


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def _connect_idle(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An admin connection that will never send anything (retried while the backlog is full)."""
    for _ in range(200):
        try:
            return await asyncio.open_unix_connection(path)
        except (BlockingIOError, ConnectionError, OSError):
            await asyncio.sleep(0.02)
    raise AssertionError(f"cannot connect to {path}")


async def _fate(reader: asyncio.StreamReader) -> str:
    """How the master ended an idle connection: the error it sent before hanging up."""
    data = await asyncio.wait_for(reader.read(), 60)
    if not data:
        return "closed without a word"
    reply = json.loads(data.splitlines()[0])
    assert reply["ok"] is False, reply
    error: str = reply["error"]
    return error.split(" (")[0].split(";")[0]


def test_300_idle_admin_clients_cannot_stop_status_reload_or_a_restart(start: Start) -> None:
    """``ulimit -n 256`` on the master, 300 admin clients connected and silent:
    ``hotproxy status`` and ``hotproxy reload`` answer, a killed worker comes
    back, and the silent clients are all disconnected (the oldest at the cap,
    the rest after ``admin_idle_timeout``)."""
    port = free_port()
    prog = start(toml({"a": {"kind": "echo", "listen": f"127.0.0.1:{port}"}}, workers=2, admin_idle_timeout=5.0),
                 nofile=256)
    assert prog.config is not None
    cfg = str(prog.config)

    async def main() -> None:
        status = await prog.wait_ready()
        print(f"master fds when ready: {_fds(prog.pid)} of 256")
        idle = [await _connect_idle(prog.socket_path()) for _ in range(300)]
        try:
            code, out, err = await prog.cli("status", "-c", cfg)
            assert code == 0, err
            print(f"master fds with 300 idle admin clients: {_fds(prog.pid)} of 256")
            assert "a" in out and "workers 2/2 alive" in out, out
            code, out, err = await prog.cli("reload", "-c", cfg)
            assert code == 0 and out.startswith("reload ok"), (out, err)

            victim = status["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)

            async def restarted() -> bool:
                code, out, err = await prog.cli("status", "-c", cfg, "--json")
                if code != 0:
                    return False
                st = json.loads(out)
                return bool(st["restarts"] == 1 and all(w["alive"] for w in st["workers"]))

            await eventually(restarted, timeout=60, interval=0.2)
            assert await roundtrip(port) == b"hello"
            # every silent client is hung up on, each told why
            fates: dict[str, int] = {}
            for reader, _ in idle:
                fate = await _fate(reader)
                fates[fate] = fates.get(fate, 0) + 1
            print(f"what became of the 300 idle clients: {fates}")
            assert set(fates) <= {"closed: too many admin connections", "no complete request within 5s"}, fates
            assert fates.get("no complete request within 5s", 0) >= 1
        finally:
            for _, writer in idle:
                writer.close()
        log = prog.log()
        assert "restart failed" not in log and "Too many open files" not in log
        assert "admin socket at its cap of 64 connections" in log

    run(main(), 120)


def test_the_admin_server_times_out_the_idle_takes_over_the_idlest_and_refuses_past_a_busy_cap(
        tmp_path: Path) -> None:
    """The rules of ``AdminServer`` on a real socket, cap 3: a silent client and a
    slow one (half a line) are closed after the idle timeout, told why; a
    client waiting longer than that for its reply is not; at the cap a new
    client takes the place of the one idle the longest; with all 3 busy, a
    4th gets one clear error line and is closed."""
    path = str(tmp_path / "admin.sock")
    entered = asyncio.Queue()                 # type: asyncio.Queue[int]
    release = asyncio.Event()

    async def handler(request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if request["cmd"] == "hold":
            await entered.put(1)
            await release.wait()
        return {"ok": True, "cmd": request["cmd"]}, False

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cmd: str) -> dict[str, Any]:
        writer.write(json.dumps({"cmd": cmd}).encode() + b"\n")
        return json.loads(await asyncio.wait_for(reader.readline(), 30))  # type: ignore[no-any-return]

    async def said_and_closed(reader: asyncio.StreamReader) -> str:
        line = await asyncio.wait_for(reader.readline(), 30)
        assert await asyncio.wait_for(reader.read(), 30) == b""
        reply = json.loads(line)
        assert reply["ok"] is False
        return reply["error"]  # type: ignore[no-any-return]

    async def main() -> None:
        server = AdminServer(path, handler, ("hold", "status"), idle_timeout=0.5, max_connections=3)
        await server.start()
        opened = []
        try:
            # the idle timeout: a silent client, and one that never finishes its line
            silent = await asyncio.open_unix_connection(path)
            slow = await asyncio.open_unix_connection(path)
            slow[1].write(b'{"cmd": "sta')
            opened += [silent, slow]
            assert await said_and_closed(silent[0]) == "no complete request within 0.5s; closing"
            assert await said_and_closed(slow[0]) == "no complete request within 0.5s; closing"
            assert server.connections == 0

            # a reply that takes longer than the idle timeout is waited for
            server.idle_timeout = 30.0
            holders = [await asyncio.open_unix_connection(path) for _ in range(3)]
            opened += holders
            asks = [asyncio.ensure_future(ask(r, w, "hold")) for r, w in holders]
            for _ in holders:
                await asyncio.wait_for(entered.get(), 30)      # all 3 are in the handler now
            # at the cap, all busy: the 4th is refused, with the reason
            fourth = await asyncio.open_unix_connection(path)
            opened.append(fourth)
            assert await said_and_closed(fourth[0]) == "too many admin connections (3); try again"
            release.set()
            assert [(await a)["ok"] for a in asks] == [True, True, True]

            # answered, the 3 are idle again, the first the longest (the other two
            # asked once more): a new client takes its place
            assert (await ask(*holders[1], "status"))["ok"] and (await ask(*holders[2], "status"))["ok"]
            newcomer = await asyncio.open_unix_connection(path)
            opened.append(newcomer)
            assert (await ask(*newcomer, "status"))["ok"]
            assert (await said_and_closed(holders[0][0])).startswith("closed: too many admin connections (3)")
            assert (await ask(*holders[1], "status"))["ok"] and (await ask(*holders[2], "status"))["ok"]
            assert server.connections == 3
        finally:
            for _, writer in opened:
                writer.close()
            await server.close()

    run(main(), 60)


RESERVE_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, resource, signal, sys
    import uvloop
    from hotproxy import CountConnections, EchoFactory, PrepareAndCommit, TcpListenerFactory, WorkerManager, stack

    PORT = int(sys.argv[1])

    async def main():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        async with WorkerManager(1, boot_timeout=30.0) as m:
            (await m.dispatch(PrepareAndCommit("e", stack(EchoFactory(b""), CountConnections()),
                                               TcpListenerFactory("127.0.0.1", PORT)))).raise_for_errors()
            victim = m.workers[0].pid
            held = []
            while True:                     # take every descriptor left
                try:
                    held.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break
            os.kill(victim, signal.SIGKILL)
            for _ in range(600):            # bounded: 60 s
                if m.restarts or m.failed_restarts:
                    break
                await asyncio.sleep(0.1)
            for fd in held:
                os.close(fd)
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", PORT), 10)
            w.write(b"ping")
            echoed = await asyncio.wait_for(r.readexactly(4), 10)
            w.close()
            print(json.dumps({"held": len(held), "restarts": m.restarts, "failed": m.failed_restarts,
                              "new_pid": m.workers[0].pid != victim, "echo": echoed.decode()}))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
""")


def test_a_killed_worker_is_restarted_when_the_master_has_no_descriptor_left(tmp_path: Path) -> None:
    """The manager keeps a reserve of descriptors for a restart: with every other
    descriptor of the process taken, a worker killed with -9 still comes back."""
    proc = subprocess.run([sys.executable, "-c", RESERVE_SCRIPT, str(free_port())], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"restart with no descriptor left: {result}")
    assert result["held"] > 0 and result["new_pid"], result
    assert result == {**result, "restarts": 1, "failed": 0, "echo": "ping"}, (result, proc.stderr[-2000:])
