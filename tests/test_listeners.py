"""Listener factories: TCP v4/v6, Unix sockets (stale files, modes, shared by workers)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import pytest

from hotproxy import (BuildListenerError, CommandGroupError, EchoFactory, PrepareAndCommit, Remove,
                      ServiceExecutor, TcpListenerFactory, UnixListenerFactory, WorkerManager, parse_address)
from hotproxy.listeners import parse_host_port

from conftest import free_port, run
from services import TaggedFactory, ask


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:80") == TcpListenerFactory("127.0.0.1", 80)
    assert parse_address("[::1]:8080") == TcpListenerFactory("::1", 8080)
    assert parse_address("unix:/tmp/x.sock") == UnixListenerFactory("/tmp/x.sock")
    assert parse_host_port("localhost:9") == ("localhost", 9)
    for bad, why in [("127.0.0.1", "host:port"), ("1.2.3.4:99999", "0-65535"), ("::1:80", "[v6addr]"),
                     ("[::1]80", "[v6addr]:port"), ("unix:", "unix:/path"), (":80", "host:port"),
                     ("h:x", "port must be")]:
        with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
            parse_address(bad)


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_listener() -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        port = free_port("::1")
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"six"), TcpListenerFactory("::1", port)))
        r, w = await asyncio.open_connection("::1", port)
        assert await ask(r, w, b"a") == b"six:a"
        w.close()
        assert ex.status()["sites"]["t"]["listen"] == f"[::1]:{port}"
        await ex.shutdown(1)

    run(main())


def test_unix_listener_mode_stale_file_and_cleanup(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s.sock")
    # a stale socket file, left by a process that died
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    assert os.path.exists(path)

    async def main() -> None:
        ex = ServiceExecutor()
        await ex.execute(PrepareAndCommit("u", TaggedFactory(b"u"), UnixListenerFactory(path, mode=0o600)))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        r, w = await asyncio.open_unix_connection(path)
        assert await ask(r, w, b"a") == b"u:a"
        w.close()
        # a live socket is never replaced
        ex2 = ServiceExecutor()
        with pytest.raises(BuildListenerError, match="in use"):
            await ex2.execute(PrepareAndCommit("u", TaggedFactory(b"x"), UnixListenerFactory(path)))
        await ex.execute(Remove("u"))
        assert not os.path.exists(path)

    run(main())


def test_unix_listener_refuses_to_replace_a_regular_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "not-a-socket"
    path.write_text("precious")

    async def main() -> None:
        with pytest.raises(BuildListenerError, match="not a socket"):
            await ServiceExecutor().execute(PrepareAndCommit("u", EchoFactory(), UnixListenerFactory(str(path))))

    run(main())
    assert path.read_text() == "precious"


def test_tcp_bind_error_names_the_address() -> None:
    async def main() -> None:
        with pytest.raises(BuildListenerError, match=r"203\.0\.113\.1:\d+"):
            await ServiceExecutor().execute(
                PrepareAndCommit("t", EchoFactory(), TcpListenerFactory("203.0.113.1", free_port())))

    run(main())


def test_unix_listener_shared_by_worker_processes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "shared.sock")

    async def main() -> None:
        async with WorkerManager(2) as m:
            (await m.dispatch(PrepareAndCommit("u", TaggedFactory(b"u"), UnixListenerFactory(path)))
             ).raise_for_errors()
            # Which worker accepts from a shared (not SO_REUSEPORT) socket is
            # the kernel's choice, and one worker may win 60 in a row on a busy
            # machine: connect in batches of 60 until both have served (bounded).
            made = 0
            for _ in range(10):
                for i in range(made, made + 60):
                    r, w = await asyncio.open_unix_connection(path)
                    assert await ask(r, w, b"%d" % i) == b"u:%d" % i
                    w.close()
                made += 60
                counts = [w["sites"]["u"]["stats"]["connections"] for w in await m.status()]
                if all(c > 0 for c in counts):
                    break
            assert sum(counts) == made and all(c > 0 for c in counts), counts
            # the master keeps the socket: a restarted worker gets it back
            old = m.workers[1].pid
            os.kill(old, 9)
            for _ in range(500):
                if m.workers[1].ready and m.workers[1].pid != old:
                    break
                await asyncio.sleep(0.02)
            assert m.workers[1].ready
            for i in range(10):
                r, w = await asyncio.open_unix_connection(path)
                assert await ask(r, w, b"x") == b"u:x"
                w.close()
            # a second site on the same path is an error on every worker, nothing applied
            group = await m.dispatch(PrepareAndCommit("v", EchoFactory(), UnixListenerFactory(path)))
            assert not group.ok
            (await m.dispatch(Remove("u"))).raise_for_errors()
            assert not os.path.exists(path)

    run(main())


def test_unix_listener_in_use_by_a_stranger(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "busy.sock")
    stranger = socket.socket(socket.AF_UNIX)
    stranger.bind(path)
    stranger.listen()

    async def main() -> None:
        async with WorkerManager(2) as m:
            group = await m.dispatch(PrepareAndCommit("u", EchoFactory(), UnixListenerFactory(path)))
            with pytest.raises(CommandGroupError) as info:
                group.raise_for_errors()
            assert sorted(e.worker for e in info.value.exceptions) == [0, 1]
            assert all("in use" in str(e) for e in info.value.exceptions)

    try:
        run(main())
    finally:
        stranger.close()
