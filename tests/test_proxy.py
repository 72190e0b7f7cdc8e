"""The proxy's data path over real loopback sockets, on both cores.

Bulk transfers checked by hash, half-close each way, back-pressure (a slow
reader keeps the proxy's memory bounded), early data before the upstream
exists, idle timeout, max_connections, Unix-socket and IPv6 ends, the access
log, and the relay on asyncio's own loop.  Helpers here (``Backend``,
``proxy_site``) are shared with ``test_proxy_deploy.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import pickle
import socket
import struct
import tempfile
from typing import Any, AsyncIterator, Callable

import pytest

from conftest import eventually, free_port, run
from hotproxy import core, listeners
from hotproxy import proxy as proxy_module
from hotproxy.commands import PrepareAndCommit, Remove
from hotproxy.executor import ServiceExecutor
from hotproxy.listeners import ListenerFactory, TcpListenerFactory, UnixListenerFactory
from hotproxy.proxy import ProxyFactory, ProxyService

MiB = 1 << 20


# -- helpers -----------------------------------------------------------------


class BackendProtocol(asyncio.Protocol):
    """One connection to a test upstream; ``mode`` says how it behaves.

    echo     echo every byte; close after the client's EOF (once flushed)
    tag      send the backend's name and a newline first, then echo
    stream   send ``backend.payload`` then EOF; hash what arrives; close
             when the client's EOF arrives
    reply    collect until EOF, then answer ``b"reply:" + data`` and close
    greet    send ``b"hello"`` then EOF at once (a half-close); collect
             until the client's EOF, then close
    hold     accept and read, never send (for counting open connections)
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: Any = None
        self.hasher = hashlib.sha256()
        self.received = 0
        self.data = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        b = self.backend
        b.accepted += 1
        b.open.add(self)
        if b.mode == "tag":
            transport.write(b.name.encode() + b"\n")
        elif b.mode == "stream":
            transport.write(b.payload)
            transport.write_eof()
        elif b.mode == "greet":
            transport.write(b"hello")
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        mode = self.backend.mode
        if mode in ("echo", "tag"):
            self.transport.write(data)
        elif mode == "stream":
            self.hasher.update(data)
            self.received += len(data)
        else:
            self.data += data

    def eof_received(self) -> bool:
        b = self.backend
        if b.mode == "stream":
            b.results.append((self.received, self.hasher.hexdigest()))
            self.transport.close()
            return True
        if b.mode == "reply":
            self.transport.write(b"reply:" + bytes(self.data))
            self.transport.close()
            return True
        if b.mode == "greet":
            b.results.append(bytes(self.data))
            self.transport.close()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.open.discard(self)


class Backend:
    """A test upstream on loopback (TCP or Unix): counts its connections."""

    def __init__(self, name: str = "b", mode: str = "echo", payload: bytes = b"") -> None:
        self.name = name
        self.mode = mode
        self.payload = payload
        self.accepted = 0
        self.open: set[BackendProtocol] = set()
        self.results: list[Any] = []
        self.server: asyncio.AbstractServer | None = None
        self.address = ""

    async def start(self, host: str = "127.0.0.1", port: int | None = None,
                    path: str | None = None) -> Backend:
        loop = asyncio.get_running_loop()
        if path is not None:
            self.server = await loop.create_unix_server(lambda: BackendProtocol(self), path)
            self.address = f"unix:{path}"
        else:
            port = port or free_port(host)
            self.server = await loop.create_server(lambda: BackendProtocol(self), host, port)
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for p in list(self.open):
                p.transport.abort()
            await self.server.wait_closed()
            self.server = None


class Blackhole:
    """A TCP address whose accept queue is full: connects to it hang (time out)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        # listen(0) queues one connection; fill it, so further SYNs are dropped
        self.filler = socket.create_connection(self.sock.getsockname())
        self.address = "%s:%d" % self.sock.getsockname()

    def close(self) -> None:
        self.filler.close()
        self.sock.close()


@contextlib.asynccontextmanager
async def proxy_site(factory: ProxyFactory, listen: ListenerFactory | None = None,
                     name: str = "p") -> AsyncIterator[ServiceExecutor]:
    """Serve *factory* on *listen* (a fresh 127.0.0.1 port) in an in-process executor."""
    ex = ServiceExecutor(drain_timeout=5.0)
    lf = listen or TcpListenerFactory("127.0.0.1", free_port())
    await ex.execute(PrepareAndCommit(name, factory, lf))
    listener = ex.sites[name].listener
    assert listener is not None and listener.mode == ("core" if listeners.CORE_ACCEPT else "loop")
    try:
        yield ex
    finally:
        await ex.shutdown(2.0)


def site_address(ex: ServiceExecutor, name: str = "p") -> str:
    listener = ex.sites[name].listener
    assert listener is not None
    return listener.address


async def connect_not_reading(ex: ServiceExecutor, name: str = "p") -> tuple[asyncio.StreamReader,
                                                                              asyncio.StreamWriter]:
    """A client of site *name* with a small receive buffer that reads nothing
    until the test does: the upstream-to-client direction backs up."""
    host, _, port = site_address(ex, name).rpartition(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await asyncio.open_connection(sock=sock)


def service(ex: ServiceExecutor, name: str = "p") -> ProxyService:
    svc = ex.sites[name].service
    assert isinstance(svc, ProxyService)
    return svc


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream connection to ``host:port``, ``[v6]:port`` or ``unix:/path``."""
    if address.startswith("unix:"):
        return await asyncio.open_unix_connection(address[5:])
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port))


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def request(address: str, payload: bytes) -> bytes:
    """Send *payload* and EOF; return everything received until EOF."""
    reader, writer = await connect(address)
    try:
        writer.write(payload)
        writer.write_eof()
        return await reader.read()
    finally:
        await close(writer)


async def drained(ex: ServiceExecutor, name: str = "p") -> None:
    """Wait until the site has no connection left."""
    await eventually(lambda: len(ex.sites[name].conns) == 0 and service(ex, name).counters.active == 0)


def proxy_sockets(conn: Any) -> list[socket.socket]:
    """Copies (dup) of a connection's client and upstream sockets, to inspect."""
    if conn.client_fileno >= 0:   # the core accepted it
        client_fd = conn.client_fileno
    else:
        client_fd = conn.client_transport.get_extra_info("socket").fileno()
    return [socket.socket(fileno=os.dup(client_fd)),
            socket.socket(fileno=os.dup(conn.upstream_fileno))]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



@pytest.fixture(autouse=True, params=["core-accept", "loop-accept"])
def accept_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every relay test twice: the core accepts and owns the client socket,
    or an asyncio server accepts and the relay drives its transport."""
    monkeypatch.setattr(listeners, "CORE_ACCEPT", request.param == "core-accept")
    return str(request.param)


# -- the factory ---------------------------------------------------------------


def test_factory_validates_and_pickles() -> None:
    f = ProxyFactory(["127.0.0.1:80", "[::1]:81", "unix:/tmp/x.sock"])  # type: ignore[arg-type]
    assert f.upstreams == ("127.0.0.1:80", "[::1]:81", "unix:/tmp/x.sock")
    assert pickle.loads(pickle.dumps(f)) == f
    bad: list[tuple[dict[str, Any], str]] = [
        ({"upstreams": ()}, "upstreams: expected at least one"),
        ({"upstreams": "127.0.0.1:80"}, "upstreams: expected a list"),
        ({"upstreams": ("127.0.0.1",)}, "upstreams[0]: bad address"),
        ({"upstreams": ("::1:80",)}, "upstreams[0]: bad address"),
        ({"upstreams": ("a:1", "unix:")}, "upstreams[1]: bad address"),
        ({"upstreams": ("a:0",)}, "port must be 1-65535"),
        ({"upstreams": ("a:1", "a:1")}, "listed twice"),
        ({"balance": "fastest"}, "balance: expected one of round_robin"),
        ({"connect_timeout": 0}, "connect_timeout: expected a number > 0, got 0"),
        ({"connect_timeout": "2"}, "connect_timeout: expected a number"),
        ({"idle_timeout": -1}, "idle_timeout: expected a number >= 0, got -1"),
        ({"idle_timeout": float("inf")}, "idle_timeout: expected a number"),
        ({"max_connections": 0}, "max_connections: expected an integer >= 1, got 0"),
        ({"max_connections": 1.5}, "max_connections: expected an integer >= 1, got 1.5"),
        ({"retries": -1}, "retries: expected an integer >= 0, got -1"),
        ({"max_fails": True}, "max_fails: expected an integer >= 0, got true"),
        ({"fail_timeout": 0}, "fail_timeout: expected a number > 0, got 0"),
        ({"keepalive": 1}, "keepalive: expected true or false"),
        ({"access_log": "yes"}, "access_log: expected true or false"),
    ]
    for kwargs, message in bad:
        kwargs.setdefault("upstreams", ("127.0.0.1:80",))
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ProxyFactory(**kwargs)


# -- bulk data and half-close ---------------------------------------------------


def test_bulk_both_ways_by_hash(core_name: str) -> None:
    """4 connections at once, 4 MiB each way each, every byte checked by hash."""
    size = 4 * MiB
    up_payload = os.urandom(size)

    async def client(address: str) -> tuple[str, str]:
        data = os.urandom(size)
        reader, writer = await connect(address)
        writer.write(data)
        writer.write_eof()
        got = await reader.read()
        await close(writer)
        return sha(data), sha(got)

    async def main() -> None:
        b = await Backend(mode="stream", payload=up_payload).start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            results = await asyncio.gather(*(client(site_address(ex)) for _ in range(4)))
            await drained(ex)
            sent_hashes = sorted(r[0] for r in results)
            assert sorted(h for n, h in b.results) == sent_hashes     # client -> upstream
            assert all(n == size for n, h in b.results)
            assert all(r[1] == sha(up_payload) for r in results)       # upstream -> client
            c = service(ex).counters
            assert (c.accepted, c.active, c.bytes_in, c.bytes_out) == (4, 0, 4 * size, 4 * size)
        await b.stop()

    run(main())


def test_echo_large_and_nodelay(core_name: str) -> None:
    """8 MiB echoed while it is being sent; both of the proxy's sockets use TCP_NODELAY."""
    async def main() -> None:
        b = await Backend(mode="echo").start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            reader, writer = await connect(site_address(ex))
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            (conn,) = ex.sites["p"].conns.snapshot()
            for sock in proxy_sockets(conn):
                with sock:
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            data = os.urandom(8 * MiB)
            writer.write(data)
            writer.write_eof()
            assert sha(await reader.read()) == sha(data)
            await close(writer)
            await drained(ex)
            assert conn.end == "eof" and conn.bytes_in == conn.bytes_out == 8 * MiB + 1
        await b.stop()

    run(main())


def test_small_buffers_yield_and_lose_nothing(core_name: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With 1 KiB buffers a busy upstream fills more reads than one event may
    take, so the relay yields to the loop and comes back (an edge-triggered
    socket reports the rest only once): 4 MiB each way arrive intact."""
    monkeypatch.setattr(proxy_module, "BUFFER_SIZE", 1024)
    monkeypatch.setattr(proxy_module, "MAX_BUFFER_SIZE", 1024)

    async def main() -> None:
        b = await Backend(mode="echo").start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            data = os.urandom(4 * MiB)
            assert sha(await request(site_address(ex), data)) == sha(data)
            assert service(ex).relay.max_buffer_size == 1024
            await drained(ex)
        await b.stop()

    run(main())


def test_half_close_from_client(core_name: str) -> None:
    """The client's EOF reaches the upstream, which still answers afterwards."""
    async def main() -> None:
        b = await Backend(mode="reply").start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            assert await request(site_address(ex), b"question") == b"reply:question"
            await drained(ex)
        await b.stop()

    run(main())


def test_half_close_from_upstream(core_name: str) -> None:
    """The upstream's EOF reaches the client, which can still send afterwards."""
    async def main() -> None:
        b = await Backend(mode="greet").start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            reader, writer = await connect(site_address(ex))
            assert await reader.read() == b"hello"          # EOF from the upstream
            writer.write(b"still talking")
            writer.write_eof()
            await eventually(lambda: b.results)
            assert b.results == [b"still talking"]
            await close(writer)
            await drained(ex)
        await b.stop()

    run(main())


# -- back-pressure ---------------------------------------------------------------


class PausedClient(asyncio.Protocol):
    """A client that reads nothing until told to, then hashes everything."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.hasher = hashlib.sha256()
        self.received = 0
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.hasher.update(data)
        self.received += len(data)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(None)
        return True


@pytest.mark.parametrize("direction", ["to_client", "to_upstream"])
def test_slow_reader_bounds_memory(core_name: str, direction: str) -> None:
    """A reader that stops reading pauses the other side: the proxy buffers
    a bounded amount (not the 64 MiB in flight) and every byte arrives."""
    size = 64 * MiB
    payload = os.urandom(size)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if direction == "to_client":
            b = await Backend(mode="stream", payload=payload).start()
        else:
            b = await Backend(mode="stream").start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            host, port = site_address(ex).split(":")
            client = PausedClient()
            await loop.create_connection(lambda: client, host, int(port))
            client.transport.pause_reading()   # uvloop resumes after connection_made
            await eventually(lambda: b.open)
            (up,) = b.open
            if direction == "to_upstream":
                up.transport.pause_reading()      # the upstream stops reading
                client.transport.write(payload)
                client.transport.write_eof()
                sender = client.transport
            else:
                sender = up.transport
            conns = ex.sites["p"].conns
            # Let the pipeline fill up, then sample what the proxy holds.
            await eventually(lambda: len(conns) == 1 and conns.snapshot()[0].upstream is not None)
            peak = 0
            for _ in range(40):
                await asyncio.sleep(0.02)
                peak = max(peak, sum(c.buffered for c in conns.snapshot()))
            assert peak < 4 * MiB, f"proxy buffered {peak} bytes"
            # The sender is held back: most of the payload is still on its side.
            assert sender.get_write_buffer_size() > 16 * MiB
            if direction == "to_upstream":
                up.transport.resume_reading()
                await eventually(lambda: b.results, timeout=30)
                assert b.results == [(size, sha(payload))]
                client.transport.resume_reading()
            else:
                client.transport.resume_reading()
                await asyncio.wait_for(client.done, 30)
                assert (client.received, client.hasher.hexdigest()) == (size, sha(payload))
                client.transport.write_eof()
            await drained(ex)
            client.transport.close()
        await b.stop()

    run(main(), timeout=90)


# -- early data ----------------------------------------------------------------


def test_early_data_is_held_until_the_upstream_connects(core_name: str) -> None:
    """The client sends 1 MiB and its EOF the instant it connects; the first
    upstream never answers (connect times out), the second is reached later;
    nothing is lost."""
    data = os.urandom(MiB)

    async def main() -> None:
        hole = Blackhole()
        b = await Backend(mode="echo").start()
        factory = ProxyFactory((hole.address, b.address), connect_timeout=0.3, retries=1)
        async with proxy_site(factory) as ex:
            reader, writer = await connect(site_address(ex))
            writer.write(data)
            writer.write_eof()
            conns = ex.sites["p"].conns
            # held while the upstream does not exist, bounded by the first buffer
            await eventually(lambda: any(c.held for c in conns.snapshot()))
            assert max(c.held for c in conns.snapshot()) <= 64 * 1024
            assert sha(await reader.read()) == sha(data)
            await close(writer)
            await drained(ex)
            c = service(ex).counters
            assert (c.connect_failures, c.bytes_in, c.bytes_out) == (1, MiB, MiB)
        await b.stop()
        hole.close()

    run(main())


def test_early_data_with_a_fast_upstream(core_name: str) -> None:
    """Many clients that write at once and close: every echo comes back whole."""
    async def main() -> None:
        b = await Backend(mode="echo").start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            payloads = [os.urandom(1000 + 5000 * i) for i in range(20)]
            got = await asyncio.gather(*(request(site_address(ex), p) for p in payloads))
            assert got == payloads
            await drained(ex)
        await b.stop()

    run(main())


# -- limits ----------------------------------------------------------------------


def test_idle_timeout(core_name: str) -> None:
    """A connection with no traffic is closed; one with traffic is not."""
    async def main() -> None:
        b = await Backend(mode="echo").start()
        async with proxy_site(ProxyFactory((b.address,), idle_timeout=1.0)) as ex:
            busy_r, busy_w = await connect(site_address(ex))
            idle_r, idle_w = await connect(site_address(ex))
            idle_w.write(b"once")
            assert await idle_r.readexactly(4) == b"once"
            # the busy one talks every 50 ms for well over the idle timeout
            for _ in range(30):
                busy_w.write(b"ping")
                assert await busy_r.readexactly(4) == b"ping"
                await asyncio.sleep(0.05)
            with contextlib.suppress(ConnectionError):
                assert await idle_r.read() == b""   # closed by the proxy
            assert service(ex).counters.idle_closed == 1
            busy_w.write(b"pong")
            assert await busy_r.readexactly(4) == b"pong"
            await close(busy_w)
            await close(idle_w)
            await drained(ex)
            await eventually(lambda: not b.open)
        await b.stop()

    run(main())


def test_max_connections(core_name: str) -> None:
    """Over the limit a connection is closed at once and counted; below it again, served."""
    async def main() -> None:
        b = await Backend(mode="echo").start()
        async with proxy_site(ProxyFactory((b.address,), max_connections=2)) as ex:
            held = []
            for _ in range(2):
                r, w = await connect(site_address(ex))
                w.write(b"hi")
                assert await r.readexactly(2) == b"hi"
                held.append((r, w))
            r3, w3 = await connect(site_address(ex))
            with contextlib.suppress(ConnectionError):
                assert await r3.read() == b""
            await close(w3)
            c = service(ex).counters
            assert (c.refused, c.accepted, c.active) == (1, 2, 2)
            await close(held[0][1])
            await eventually(lambda: service(ex).counters.active == 1)
            assert await request(site_address(ex), b"again") == b"again"
            await close(held[1][1])
            await drained(ex)
        await b.stop()

    run(main())


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (RST), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_upstream_reset_mid_stream(core_name: str) -> None:
    """An upstream that resets after some bytes: the client gets those bytes,
    then loses the connection; it ends as upstream_error, every count released."""
    async def main() -> None:
        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"partial answer")
            await writer.drain()
            await reader.readexactly(4)          # the client's bytes arrived
            _reset(writer)

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with proxy_site(ProxyFactory((f"127.0.0.1:{port}",))) as ex:
            reader, writer = await connect(site_address(ex))
            assert await reader.readexactly(14) == b"partial answer"
            (conn,) = ex.sites["p"].conns.snapshot()
            writer.write(b"more")
            try:
                rest = await reader.read()       # EOF or reset: nothing more arrives
                assert rest == b""
            except ConnectionError:
                pass
            await close(writer)
            await drained(ex)
            svc = service(ex)
            assert conn.end == "upstream_error" and conn.bytes_out == 14 and conn.bytes_in == 4
            assert svc.counters.active == 0 and svc.upstream_states[f"127.0.0.1:{port}"].active == 0
        server.close()
        await server.wait_closed()

    run(main())


def test_client_reset_mid_stream(core_name: str) -> None:
    """A client that resets while relaying: the upstream's connection is closed,
    it ends as client_error, every count released."""
    async def main() -> None:
        closed: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello")
            try:
                data = await reader.read()       # until the proxy closes its side
            except ConnectionError:
                data = b"<reset>"
            closed.set_result(data)
            writer.close()

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with proxy_site(ProxyFactory((f"127.0.0.1:{port}",))) as ex:
            reader, writer = await connect(site_address(ex))
            assert await reader.readexactly(5) == b"hello"
            writer.write(b"abc")
            await writer.drain()
            (conn,) = ex.sites["p"].conns.snapshot()
            await eventually(lambda: conn.bytes_in == 3)
            _reset(writer)
            assert await asyncio.wait_for(closed, 10) in (b"abc", b"<reset>")
            await drained(ex)
            assert conn.end == "client_error" and service(ex).counters.active == 0
        server.close()
        await server.wait_closed()

    run(main())


def test_abort_on_drain_timeout(core_name: str) -> None:
    """Remove with a drain timeout aborts connections that do not finish."""
    async def main() -> None:
        b = await Backend(mode="echo").start()
        ex = ServiceExecutor()
        lf = TcpListenerFactory("127.0.0.1", free_port())
        await ex.execute(PrepareAndCommit("p", ProxyFactory((b.address,)), lf))
        svc = service(ex)
        r, w = await connect(lf.address)
        w.write(b"x")
        await r.readexactly(1)
        (conn,) = ex.sites["p"].conns.snapshot()
        await ex.execute(Remove("p", drain_timeout=0.1))
        await ex.wait_drained()
        with contextlib.suppress(ConnectionError):
            await r.read()
        await close(w)
        await eventually(lambda: conn.finished)
        assert conn.end == "aborted" and svc.counters.active == 0
        await b.stop()

    run(main())


# -- Unix sockets and IPv6 ----------------------------------------------------------


def _ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_unix_socket_listener_and_upstream(core_name: str) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            b = await Backend(mode="echo").start(path=os.path.join(tmp, "up.sock"))
            lf = UnixListenerFactory(os.path.join(tmp, "proxy.sock"))
            async with proxy_site(ProxyFactory((b.address,), keepalive=True), lf) as ex:
                data = os.urandom(2 * MiB)
                assert await request(site_address(ex), data) == data
                assert await request(site_address(ex), b"x") == b"x"
                await drained(ex)
                assert service(ex).stats()["upstreams"][b.address]["connections"] == 2
            await b.stop()

    run(main())


@pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback (::1)")
def test_ipv6_listener_and_upstream(core_name: str) -> None:
    async def main() -> None:
        b = await Backend(mode="echo").start(host="::1")
        assert b.address.startswith("[::1]:")
        lf = TcpListenerFactory("::1", free_port("::1"))
        async with proxy_site(ProxyFactory((b.address,), keepalive=True), lf) as ex:
            reader, writer = await connect(site_address(ex))
            writer.write(b"six")
            assert await reader.readexactly(3) == b"six"
            (conn,) = ex.sites["p"].conns.snapshot()
            for sock in proxy_sockets(conn):
                with sock:
                    assert sock.family == socket.AF_INET6
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
            data = os.urandom(MiB)
            writer.write(data)
            writer.write_eof()
            assert await reader.read() == data
            await close(writer)
            await drained(ex)
        await b.stop()

    run(main())


def test_mixed_families(core_name: str) -> None:
    """A TCP listener in front of a Unix-socket upstream and the other way round."""
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            b_unix = await Backend(mode="echo").start(path=os.path.join(tmp, "u.sock"))
            b_tcp = await Backend(mode="echo").start()
            async with proxy_site(ProxyFactory((b_unix.address,)), name="a") as ex_a:
                assert await request(site_address(ex_a, "a"), b"tcp->unix") == b"tcp->unix"
            lf = UnixListenerFactory(os.path.join(tmp, "p.sock"))
            async with proxy_site(ProxyFactory((b_tcp.address,)), lf, name="b") as ex_b:
                assert await request(site_address(ex_b, "b"), b"unix->tcp") == b"unix->tcp"
            await b_unix.stop()
            await b_tcp.stop()

    run(main())


# -- access log -------------------------------------------------------------------------


def test_access_log(core_name: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        b = await Backend(mode="echo").start()
        async with proxy_site(ProxyFactory((b.address,), access_log=True, max_connections=1)) as ex:
            assert await request(site_address(ex), b"12345") == b"12345"
            await drained(ex)
        await b.stop()

    with caplog.at_level(logging.INFO, logger="hotproxy.access"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "hotproxy.access"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("127.0.0.1:") and "in=5 out=5" in lines[0] and lines[0].endswith("end=eof")


def test_access_log_off_by_default(core_name: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        b = await Backend(mode="echo").start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            assert await request(site_address(ex), b"x") == b"x"
            await drained(ex)
        await b.stop()

    with caplog.at_level(logging.INFO, logger="hotproxy.access"):
        run(main())
    assert not [r for r in caplog.records if r.name == "hotproxy.access"]


# -- asyncio's own loop (no get_buffer: data_received) ------------------------------------


def run_on_asyncio(coro_fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    errors: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        return await asyncio.wait_for(coro_fn(), timeout)

    with asyncio.Runner() as runner:
        result = runner.run(main())
    assert not errors, errors
    return result


def test_relay_on_asyncio_loop(core_name: str) -> None:
    """On asyncio's own loop the compiled relay gets data_received(): same results."""
    data = os.urandom(3 * MiB)

    async def main() -> None:
        hole = Blackhole()
        b = await Backend(mode="echo").start()
        factory = ProxyFactory((hole.address, b.address), connect_timeout=0.2, retries=1)
        async with proxy_site(factory) as ex:
            assert await request(site_address(ex), data) == data     # early data, then bulk
            assert await request(site_address(ex), b"x") == b"x"
            await drained(ex)
        await b.stop()
        hole.close()

    run_on_asyncio(main)


def test_relay_config_checks(core_name: str) -> None:
    impl = core.impl
    counters = impl.ProxyCounters()
    t = impl.Target(impl.UpstreamState("127.0.0.1:1"), None, socket.AF_INET,
                    bytes(16), ("127.0.0.1", 1))
    assert impl.RelayConfig(counters, targets=(t,)).targets == (t,)
    with pytest.raises(ValueError):
        impl.RelayConfig(counters, attempts=0)
    with pytest.raises(ValueError):
        impl.RelayConfig(counters, connect_timeout=0.0)
    with pytest.raises(TypeError):
        impl.RelayConfig(counters, targets=("127.0.0.1:1",))
    with pytest.raises(ValueError, match="connector"):
        impl.RelayConfig(counters, targets=(t, t))
    with pytest.raises(ValueError, match="sockaddr"):
        impl.Target(impl.UpstreamState("x"), None, socket.AF_INET, b"", None)


def test_core_selected(core_name: str) -> None:
    async def main() -> None:
        svc = ProxyFactory(("127.0.0.1:1",)).make()
        assert type(svc.counters) is core.impl.ProxyCounters
        assert type(svc.new_connection(core.impl.ConnectionSet())) is core.impl.Connection

    run(main())
