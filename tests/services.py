"""Test-only services, importable by worker processes (they get our sys.path)."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from hotproxy.service import MakeService, Service


class TaggedProtocol(asyncio.Protocol):
    """Answers every chunk with ``tag + b":" + chunk`` so a test sees which version serves it."""

    def __init__(self, service: TaggedService, conns: Any) -> None:
        self.service = service
        self.conns = conns
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.conns.add(self)
        self.service.counts[0] += 1

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.service.tag + b":" + data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.discard(self)

    def abort(self) -> None:
        self.transport.abort()


class TaggedService(Service):
    def __init__(self, tag: bytes, counts: list[int]) -> None:
        self.tag = tag
        self.counts = counts   # shared with every later version

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        return TaggedProtocol(self, conns)

    def stats(self) -> dict[str, Any]:
        return {"connections": self.counts[0], "tag": self.tag.decode()}


class Gate:
    """Holds a build until the test opens it (in the test's own process and loop):
    ``entered`` is set once a build waits at the gate."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def pass_through(self) -> None:
        self.entered.set()
        await asyncio.wait_for(self.opened.wait(), 60)   # bounded: a test that forgets fails

    def open(self) -> None:
        self.opened.set()


@dataclass(frozen=True)
class TaggedFactory(MakeService):
    """``fail``: raise while building; ``fail_on_worker``: raise only on that worker id;
    ``delay``: await that long while building (the old version keeps serving);
    ``gate``: wait at that ``Gate`` while building (in-process executors only);
    ``fail_if_exists``: raise while that file exists (to break restarts)."""

    tag: bytes
    fail: bool = False
    fail_on_worker: int | None = None
    delay: float = 0.0
    fail_if_exists: str | None = None
    gate: Gate | None = field(default=None, compare=False, repr=False)

    async def make_via_ref(self, old: Service | None) -> Service:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.pass_through()
        if self.fail_if_exists is not None and os.path.exists(self.fail_if_exists):
            raise RuntimeError(f"{self.fail_if_exists} exists")
        if self.fail or (self.fail_on_worker is not None
                         and os.environ.get("HOTPROXY_WORKER_ID") == str(self.fail_on_worker)):
            raise RuntimeError(f"refusing to build {self.tag!r}")
        counts = old.counts if isinstance(old, TaggedService) else [0]
        return TaggedService(self.tag, counts)


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: bytes) -> bytes:
    """Send *msg* and read one tagged answer (``tag:msg``)."""
    writer.write(msg)
    await writer.drain()
    head = await reader.readuntil(b":")
    return head + await reader.readexactly(len(msg))


# -- a slow system resolver, in a worker process -----------------------------------

#: the host name the slow resolver holds (.test never resolves for real: RFC 6761)
SLOW_HOST = "slow.hotproxy.test"


def install_slow_resolver(directory: str) -> None:
    """Make this process's system resolver slow for ``SLOW_HOST``, under the test's control.

    A lookup of ``SLOW_HOST:PORT`` creates ``DIRECTORY/started-PORT-WORKER``,
    then blocks its thread until ``DIRECTORY/release-PORT`` exists (at most
    60 s), and answers ``127.0.0.1:PORT``.  It replaces ``socket.getaddrinfo``
    (what a blocking lookup calls) and routes hotproxy's loop lookups
    (``hotproxy.listeners.resolver``) to it in a thread, as asyncio's own
    loop does: uvloop's resolver does not go through the socket module.
    """
    real = getattr(socket.getaddrinfo, "real", socket.getaddrinfo)
    worker = os.environ.get("HOTPROXY_WORKER_ID", "-")

    def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host != SLOW_HOST:
            return real(host, port, *args, **kw)
        open(os.path.join(directory, f"started-{port}-{worker}"), "w").close()
        for _ in range(3000):   # bounded: 60 s
            if os.path.exists(os.path.join(directory, f"release-{port}")):
                break
            time.sleep(0.02)
        return real("127.0.0.1", port, *args, **kw)

    getaddrinfo.real = real  # type: ignore[attr-defined]
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]

    async def in_a_thread(host: str, port: int, flags: int) -> Any:
        call = functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, flags=flags)
        return await asyncio.get_running_loop().run_in_executor(None, call)

    from hotproxy import listeners

    listeners.resolver = in_a_thread


@dataclass(frozen=True)
class SlowResolverFactory(MakeService):
    """A tagged service whose building installs ``install_slow_resolver(directory)``
    in the worker that builds it: deploy it to get the hook into every worker."""

    tag: bytes
    directory: str

    def make_via_ref(self, old: Service | None) -> Service:
        install_slow_resolver(self.directory)
        counts = old.counts if isinstance(old, TaggedService) else [0]
        return TaggedService(self.tag, counts)
