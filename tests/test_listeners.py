"""Listener factories: TCP v4/v6, Unix sockets (stale files, modes, shared by workers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from hotproxy import (BuildListenerError, CommandGroupError, EchoFactory, PrepareAndCommit, Remove,
                      ServiceExecutor, TcpListenerFactory, UnixListenerFactory, WorkerManager, parse_address)
from hotproxy.listeners import parse_host_port

from conftest import free_port, run
from helpers_program import Program, roundtrip, toml
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
            # A second site on the same path shares the master's socket, as two
            # sites on one TCP port share it through SO_REUSEPORT (the config
            # checker allows one service per address; the manager does not
            # refuse it, so that two services can swap paths in one reload).
            # The file stays while any site uses the path.
            (await m.dispatch(PrepareAndCommit("v", TaggedFactory(b"v"), UnixListenerFactory(path)))
             ).raise_for_errors()
            (await m.dispatch(Remove("u"))).raise_for_errors()
            r, w = await asyncio.open_unix_connection(path)
            assert await ask(r, w, b"y") == b"v:y"
            w.close()
            (await m.dispatch(Remove("v"))).raise_for_errors()
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


# -- Unix sockets through reloads of the real program -------------------------------------


async def unix_roundtrip(path: str, greeting_len: int, payload: bytes = b"hello") -> bytes:
    """Connect to the Unix socket *path*: greeting + echo of *payload*."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 10)
    try:
        got = await asyncio.wait_for(reader.readexactly(greeting_len), 10)
        writer.write(payload)
        await writer.drain()
        return got + await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def test_unix_socket_files_follow_the_committed_config(tmp_path: Path, core_name: str) -> None:
    """A socket file exists exactly as long as a committed service listens on
    it: listed after a TCP service, moved, backlog changed, swapped with
    another service's path, removed -- every path is connected to after every
    step (2 workers: the master binds each path once and shares it).  ``v``
    is a proxy to the TCP echo (the core accepts for it), ``u`` an echo (an
    asyncio server accepts): a swap hands each the other's socket."""
    tcp = free_port()
    cfg = tmp_path / "hotproxy.toml"
    p1, p2, p3 = (str(tmp_path / n) for n in ("u1.sock", "u2.sock", "v.sock"))
    tcp_svc = {"kind": "echo", "listen": f"127.0.0.1:{tcp}", "greeting": "t\n"}

    def unix(path: str, greeting: str, **kw: Any) -> dict[str, Any]:
        return {"kind": "echo", "listen": f"unix:{path}", "greeting": greeting, **kw}

    def proxy(path: str, **kw: Any) -> dict[str, Any]:
        return {"kind": "proxy", "listen": f"unix:{path}", "upstreams": [f"127.0.0.1:{tcp}"], **kw}

    async def answers(path: str, greeting: bytes) -> None:
        for i in range(6):   # both workers accept from the one socket: more than one connection
            assert await unix_roundtrip(path, len(greeting), b"%d" % i) == greeting + b"%d" % i

    async def reload(services: dict[str, dict[str, Any]], expect: str) -> None:
        cfg.write_text(toml(services))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0 and out.startswith(expect), out + err

    cfg.write_text(toml({"t": tcp_svc, "u": unix(p1, "u1\n")}))
    prog = Program(cfg, tmp_path / "hotproxy.log")

    async def main() -> None:
        await prog.wait_ready()
        # listed second, after a TCP service
        await answers(p1, b"u1\n")
        assert await roundtrip(tcp, 2) == b"t\nhello"

        # moved: the new path serves, the old file is gone
        await reload({"t": tcp_svc, "u": unix(p2, "u2\n")}, "reload ok: added=[] changed=[u] moved=[u]")
        await answers(p2, b"u2\n")
        assert not os.path.exists(p1)

        # only the backlog changes: the same socket (same file) listens on
        ino = os.stat(p2).st_ino
        await reload({"t": tcp_svc, "u": unix(p2, "u2\n", backlog=7)}, "reload ok: added=[] changed=[u] moved=[u]")
        await answers(p2, b"u2\n")
        assert os.stat(p2).st_ino == ino

        # a second Unix service, then the two swap paths
        await reload({"t": tcp_svc, "u": unix(p2, "u2\n", backlog=7), "v": proxy(p3)},
                     "reload ok: added=[v]")
        await answers(p2, b"u2\n")
        await answers(p3, b"t\n")
        await reload({"t": tcp_svc, "u": unix(p3, "u4\n"), "v": proxy(p2, retries=1)},
                     "reload ok: added=[] changed=[u,v] moved=[u,v]")
        await answers(p3, b"u4\n")
        await answers(p2, b"t\n")

        # removed: the files go with the services; TCP serves on
        await reload({"t": tcp_svc}, "reload ok: added=[] changed=[] removed=[u,v]")
        assert not os.path.exists(p2) and not os.path.exists(p3)
        assert await roundtrip(tcp, 2) == b"t\nhello"
        assert "Traceback" not in prog.log()

    try:
        run(main(), 120)
    finally:
        prog.kill()
        print(f"---- log ----\n{prog.log()}")


def test_an_inherited_listener_is_awaited_not_read_blocking() -> None:
    """A worker takes the listening socket the master sends without blocking
    its loop: ``make()`` before the descriptor arrives waits in the loop
    (other tasks run meanwhile) and takes it when it comes; a token released
    before its descriptor arrived has the descriptor closed on arrival."""
    from hotproxy.fdchannel import FdReceiver, FdSender, InheritedListenerFactory

    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender = FdSender(master_end)
    receiver = FdReceiver(worker_end)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    original = TcpListenerFactory("127.0.0.1", lsock.getsockname()[1])

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        making = asyncio.ensure_future(InheritedListenerFactory(original, 901, receiver).make())
        ran = 0
        for _ in range(5):       # the loop goes on running other tasks
            await asyncio.sleep(0)
            ran += 1
        assert ran == 5 and not making.done()
        sender.send(901, lsock.fileno())
        bound = await asyncio.wait_for(making, 10)
        assert bound.sock.getsockname() == lsock.getsockname()
        bound.close()
        receiver.release(901)
        before = open_fds()
        receiver.release(902)   # its command failed before the descriptor was read
        sender.send(902, lsock.fileno())
        sender.send(903, lsock.fileno())
        bound = await asyncio.wait_for(InheritedListenerFactory(original, 903, receiver).make(), 10)
        assert open_fds() == before + 1   # 903's socket; 902's descriptor was closed
        bound.close()
        receiver.release(903)

    try:
        run(main(), 30)
    finally:
        for s in (master_end, worker_end, lsock):
            s.close()
