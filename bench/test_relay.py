"""Micro-benchmarks of the proxy's relay (``Connection`` and its engine) on both cores.

Run ``pytest bench/test_relay.py --benchmark-only --benchmark-group-by=group``
and compare the ``compiled`` and ``python`` rows of each group:

* ``relay-connections``: 1,000 short connections (connect, 64 bytes each
  way, close), 20 at a time, through an in-process proxy to an echo
  upstream: the per-connection cost (accept, upstream connect, teardown).
* ``relay-bulk``: 32 MiB through an in-process proxy on loopback (client,
  proxy and sink share one uvloop loop), so the syscalls and the client's
  and sink's own work are included: the end-to-end effect.
* ``relay-roundtrips``: 2,000 request/response round trips of 64 bytes
  through the proxy to an echo upstream: many small chunks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hotproxy.commands import PrepareAndCommit
from hotproxy.executor import ServiceExecutor
from hotproxy.listeners import TcpListenerFactory
from hotproxy.proxy import ProxyFactory

CONNECTIONS = 1000
CONCURRENCY = 20
BULK = 32 << 20
ROUNDTRIPS = 2000


# -- through real sockets ------------------------------------------------------------


class _Sink(asyncio.BufferedProtocol):
    """An upstream that reads and discards; reports when the client's EOF arrives."""

    def __init__(self, done: list[asyncio.Future[int]]) -> None:
        self.buf = bytearray(256 * 1024)
        self.n = 0
        self.done = done
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.n += nbytes

    def eof_received(self) -> bool:
        fut = self.done.pop()
        fut.set_result(self.n)
        return False


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _PingPong(asyncio.Protocol):
    """A client that sends 64 bytes, waits for them, ``ROUNDTRIPS`` times."""

    MSG = b"x" * 64

    def __init__(self) -> None:
        self.left = 0
        self.got = 0
        self.done: asyncio.Future[None] | None = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    async def run(self) -> None:
        self.done = asyncio.get_running_loop().create_future()
        self.left = ROUNDTRIPS
        self.got = 0
        self.transport.write(self.MSG)
        await self.done

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got < len(self.MSG):
            return
        self.got -= len(self.MSG)
        self.left -= 1
        if self.left:
            self.transport.write(self.MSG)
        elif self.done is not None:
            self.done.set_result(None)


async def _proxy(loop: asyncio.AbstractEventLoop, protocol: Any) -> tuple[ServiceExecutor, Any, int]:
    backend = await loop.create_server(protocol, "127.0.0.1", 0)
    up_port = backend.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    ex = ServiceExecutor()
    lf = TcpListenerFactory("127.0.0.1", 0)
    await ex.execute(PrepareAndCommit("p", ProxyFactory((f"127.0.0.1:{up_port}",)), lf))
    listener = ex.sites["p"].listener
    assert listener is not None and listener.mode == "core"   # the core accepts and relays
    port = listener.sock.getsockname()[1]
    return ex, backend, port


@pytest.mark.benchmark(group="relay-bulk")
def test_relay_bulk(benchmark: Any, core_name: str, loop: asyncio.AbstractEventLoop) -> None:
    done: list[asyncio.Future[int]] = []
    ex, backend, port = loop.run_until_complete(_proxy(loop, lambda: _Sink(done)))
    payload = b"\x5a" * BULK

    async def push() -> int:
        fut = loop.create_future()
        done.append(fut)
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        transport.write(payload)
        transport.write_eof()
        n = await fut
        transport.close()
        return n

    result = benchmark.pedantic(lambda: loop.run_until_complete(push()), rounds=5, iterations=1,
                                warmup_rounds=1)
    assert result == BULK
    loop.run_until_complete(ex.shutdown(2.0))
    backend.close()


@pytest.mark.benchmark(group="relay-roundtrips")
def test_relay_roundtrips(benchmark: Any, core_name: str, loop: asyncio.AbstractEventLoop) -> None:
    ex, backend, port = loop.run_until_complete(_proxy(loop, _Echo))
    transport, client = loop.run_until_complete(
        loop.create_connection(_PingPong, "127.0.0.1", port))

    benchmark.pedantic(lambda: loop.run_until_complete(client.run()), rounds=5, iterations=1,
                       warmup_rounds=1)
    transport.close()
    loop.run_until_complete(ex.shutdown(2.0))
    backend.close()


@pytest.mark.benchmark(group="relay-connections")
def test_relay_connections(benchmark: Any, core_name: str, loop: asyncio.AbstractEventLoop) -> None:
    ex, backend, port = loop.run_until_complete(_proxy(loop, _Echo))
    msg = b"y" * 64

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(msg)
        assert await reader.readexactly(len(msg)) == msg
        writer.close()
        await writer.wait_closed()

    async def many() -> None:
        for _ in range(CONNECTIONS // CONCURRENCY):
            await asyncio.gather(*(one() for _ in range(CONCURRENCY)))

    benchmark.pedantic(lambda: loop.run_until_complete(many()), rounds=5, iterations=1,
                       warmup_rounds=1)
    loop.run_until_complete(ex.shutdown(2.0))
    backend.close()
