"""Accepting in the core: which sites the core's ``Listener`` serves, the
switch when an ``Update`` changes the kind of service, the fallback for a
service it cannot relay itself, layers, refusals and queued connections --
over real sockets, on both cores.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest

from conftest import eventually, free_port, run
from hotproxy import core
from hotproxy.commands import PrepareAndCommit, Precommit, Remove, Update
from hotproxy.echo import EchoFactory
from hotproxy.executor import ServiceExecutor
from hotproxy.listeners import TcpListenerFactory, accepts_raw
from hotproxy.proxy import ProxyFactory
from hotproxy.service import CountConnections, LayerService, Layer, LimitConnections, stack
from test_proxy import Backend, close, connect

HOST = "127.0.0.1"


async def say(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def greeting(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 5)


def test_an_update_switches_how_the_listener_accepts_and_cuts_nothing(core_name: str) -> None:
    """echo -> proxy -> echo on one site: the listener moves between an asyncio
    server and the core's listener; connections opened before each switch go on
    with the version that accepted them, new ones get the new version."""

    async def main() -> None:
        backend = await Backend(name="b", mode="echo").start()
        ex = ServiceExecutor(drain_timeout=5)
        port = free_port()
        addr = f"{HOST}:{port}"
        echo = EchoFactory(b"E:")
        proxy = ProxyFactory((backend.address,))
        try:
            await ex.execute(PrepareAndCommit("s", echo, TcpListenerFactory(HOST, port)))
            site = ex.sites["s"]
            assert site.listener is not None and site.listener.mode == "loop"
            r1, w1 = await connect(addr)
            assert await greeting(r1, 2) == b"E:"

            await ex.execute(Precommit("s", proxy))
            await ex.execute(Update("s"))
            assert site.listener.mode == "core" and ex.status()["sites"]["s"]["accept"] == "core"
            assert await say(r1, w1, b"old echo") == b"old echo"   # not cut
            r2, w2 = await connect(addr)
            assert await say(r2, w2, b"via proxy") == b"via proxy"
            lst = site.listener.core_listener
            assert lst.raw_accepted == 1 and lst.fallback_accepted == 0

            await ex.execute(Precommit("s", echo))
            await ex.execute(Update("s"))
            assert site.listener.mode == "loop"
            assert await say(r2, w2, b"old proxy") == b"old proxy"  # not cut
            r3, w3 = await connect(addr)
            assert await greeting(r3, 2) == b"E:"
            assert await say(r3, w3, b"echo again") == b"echo again"
            for w in (w1, w2, w3):
                await close(w)
            await eventually(lambda: len(site.conns) == 0)
            assert site.acceptor.errors == 0
        finally:
            await ex.shutdown(2.0)
            await backend.stop()

    run(main())


def test_the_core_listener_falls_back_for_a_service_it_cannot_relay(core_name: str) -> None:
    """A service without ``accepts_raw`` in the slot of a core listener is served
    through ``fallback`` (what BoundListener uses between an Update and the switch);
    without a fallback the connection is closed, counted, and the listener goes on."""

    async def main() -> None:
        impl = core.impl
        loop = asyncio.get_running_loop()
        slot = impl.Slot(await _make(EchoFactory(b"hi:")))
        acceptor = impl.Acceptor(slot, impl.ConnectionSet(), "fb")
        sock = socket.socket()
        sock.bind((HOST, 0))
        sock.listen(16)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        tasks: list[asyncio.Task[Any]] = []

        def fallback(s: socket.socket) -> None:
            tasks.append(loop.create_task(loop.connect_accepted_socket(acceptor, s)))

        lst = impl.Listener(acceptor, sock, fallback)
        lst.start()
        try:
            r, w = await connect(f"{HOST}:{port}")
            assert await greeting(r, 3) == b"hi:"
            assert await say(r, w, b"x" * 1000) == b"x" * 1000
            await close(w)
            assert lst.fallback_accepted == 1 and lst.raw_accepted == 0
            lst.stop()
            lst2 = impl.Listener(acceptor, sock)     # no fallback
            lst2.start()
            r, w = await connect(f"{HOST}:{port}")
            assert await asyncio.wait_for(r.read(), 5) == b""   # closed at once
            await close(w)
            assert acceptor.errors == 1
            lst2.stop()
            lst.start()                               # the socket still listens
            r, w = await connect(f"{HOST}:{port}")
            assert await greeting(r, 3) == b"hi:"
            await close(w)
            await eventually(lambda: len(acceptor.conns) == 0)
        finally:
            lst.stop()
            await asyncio.gather(*tasks)
            sock.close()

    run(main())


async def _make(factory: Any) -> Any:
    svc = factory.make()
    return await svc if asyncio.iscoroutine(svc) else svc


class _Tagging(LayerService):
    """A user's layer that does something per connection but says nothing of raw ones."""

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        return self.inner.new_connection(conns)


class Tagging(Layer):
    service_type = _Tagging

    def wrap(self, inner: Any, old: Any) -> Any:
        return _Tagging(inner)


def test_layers_accept_raw_only_when_they_say_how(core_name: str) -> None:
    async def main() -> None:
        proxy = ProxyFactory(("127.0.0.1:1",))
        assert accepts_raw(await _make(proxy))
        assert accepts_raw(await _make(stack(proxy, CountConnections(), LimitConnections(max_connections=5))))
        tagged = await _make(stack(proxy, Tagging()))
        assert not accepts_raw(tagged)                                 # never bypassed
        assert tagged.stats()["balance"] == "round_robin"              # a layer passes stats on
        assert not accepts_raw(await _make(stack(EchoFactory(), CountConnections())))

    run(main())


def test_limit_layer_refuses_raw_connections_and_counts_them(core_name: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        backend = await Backend(name="b", mode="echo").start()
        ex = ServiceExecutor(drain_timeout=5)
        port = free_port()
        factory = stack(ProxyFactory((backend.address,)), CountConnections(), LimitConnections(max_connections=1))
        try:
            await ex.execute(PrepareAndCommit("s", factory, TcpListenerFactory(HOST, port)))
            assert ex.sites["s"].listener.mode == "core"
            r1, w1 = await connect(f"{HOST}:{port}")
            assert await say(r1, w1, b"one") == b"one"
            r2, w2 = await connect(f"{HOST}:{port}")
            try:
                assert await asyncio.wait_for(r2.read(), 5) == b""
            except ConnectionResetError:
                pass
            await close(w2)
            stats = ex.status()["sites"]["s"]["stats"]
            # the limit (outermost) refused it before the counting layer saw it
            assert stats["refused"] == 1 and stats["accepted"] == 1, stats
            assert await say(r1, w1, b"still") == b"still"
            await close(w1)
            await eventually(lambda: len(ex.sites["s"].conns) == 0)
            r3, w3 = await connect(f"{HOST}:{port}")     # under the limit again
            assert await say(r3, w3, b"three") == b"three"
            await close(w3)
        finally:
            await ex.shutdown(2.0)
            await backend.stop()

    with caplog.at_level(logging.ERROR):
        run(main())


def test_closing_a_core_listener_serves_what_the_kernel_queued(core_name: str) -> None:
    """Remove on a proxy site the core accepts for: connections already queued
    are accepted and relayed, not reset."""

    async def main() -> None:
        backend = await Backend(name="b", mode="echo").start()
        ex = ServiceExecutor(drain_timeout=10)
        port = free_port()
        await ex.execute(PrepareAndCommit("s", ProxyFactory((backend.address,)),
                                          TcpListenerFactory(HOST, port)))
        assert ex.sites["s"].listener.mode == "core"
        # the loop does not run: the kernel queues these on the listener
        queued = [socket.create_connection((HOST, port)) for _ in range(5)]
        await ex.execute(Remove("s"))
        for s in queued:
            s.setblocking(False)

        async def talk(i: int, s: socket.socket) -> bytes:
            r, w = await asyncio.open_connection(sock=s)
            try:
                return await say(r, w, b"q%d" % i)
            finally:
                await close(w)

        answers = await asyncio.gather(*(talk(i, s) for i, s in enumerate(queued)))
        assert answers == [b"q%d" % i for i in range(5)]
        await asyncio.wait_for(ex.wait_drained(), 10)
        await backend.stop()
        with pytest.raises(OSError):
            socket.create_connection((HOST, port), timeout=2).close()

    run(main())


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "unix"])
def test_raw_peername_is_what_getpeername_says(core_name: str, family: str, tmp_path: Any) -> None:
    """The core decodes accept's address itself (for the access log and hash
    balancing): it must read like ``socket.getpeername()``."""
    from hotproxy.listeners import UnixListenerFactory

    async def main() -> None:
        backend = await Backend(name="b", mode="echo").start()
        ex = ServiceExecutor(drain_timeout=5)
        if family == "unix":
            lf: Any = UnixListenerFactory(str(tmp_path / "px.sock"))
        else:
            lf = TcpListenerFactory(HOST if family == "ipv4" else "::1", free_port())
        try:
            await ex.execute(PrepareAndCommit("s", ProxyFactory((backend.address,), balance="hash"), lf))
            assert ex.sites["s"].listener.mode == "core"
            r, w = await connect(lf.address)
            assert await say(r, w, b"hi") == b"hi"
            conn, = ex.sites["s"].conns.snapshot()
            mine = w.get_extra_info("socket").getsockname()
            assert conn.peername == mine, (conn.peername, mine)
            await close(w)
        finally:
            await ex.shutdown(2.0)
            await backend.stop()

    run(main())


def _open_fds() -> int:
    import os
    return len(os.listdir("/proc/self/fd"))


def test_bulk_moves_through_pipes_both_ways_and_leaves_no_descriptor(core_name: str) -> None:
    """Past a full max-size read, the compiled core splices each direction
    (socket -> pipe -> socket): every byte arrives, in order, while the
    client is slow to read, and the pipes close with the connection."""
    import hashlib
    import os

    async def main() -> None:
        backend = await Backend(name="b", mode="echo").start()
        ex = ServiceExecutor(drain_timeout=5)
        port = free_port()
        try:
            await ex.execute(PrepareAndCommit("s", ProxyFactory((backend.address,)),
                                              TcpListenerFactory(HOST, port)))
            before = _open_fds()
            data = os.urandom(24 * 1024 * 1024)
            r, w = await connect(f"{HOST}:{port}")

            async def send() -> None:
                w.write(data)
                await w.drain()
                w.write_eof()

            sender = asyncio.create_task(send())
            await eventually(lambda: len(ex.sites["s"].conns) == 1)
            (conn,) = ex.sites["s"].conns.snapshot()
            got = hashlib.sha256()
            n = 0
            while True:
                chunk = await asyncio.wait_for(r.read(1 << 20), 10)
                if not chunk:
                    break
                got.update(chunk)
                n += len(chunk)
                if n < 4 << 20:
                    await asyncio.sleep(0.01)   # slow at first: back-pressure through the pipes
            await sender
            assert n == len(data) and got.hexdigest() == hashlib.sha256(data).hexdigest()
            await close(w)
            await eventually(lambda: len(ex.sites["s"].conns) == 0)
            svc = ex.sites["s"].service
            assert svc.counters.bytes_in == svc.counters.bytes_out == len(data)
            assert conn.end == "eof" and conn.bytes_in == conn.bytes_out == len(data)
            # both cores splice (the pure-Python one with os.splice)
            assert conn.spliced == "both"
            await eventually(lambda: _open_fds() == before)   # the pipes are closed too
        finally:
            await ex.shutdown(2.0)
            await backend.stop()

    run(main())
