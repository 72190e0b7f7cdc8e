"""Test-only services, importable by worker processes (they get our sys.path)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TaggedFactory(MakeService):
    """``fail``: raise while building; ``fail_on_worker``: raise only on that worker id;
    ``delay``: await that long while building (the old version keeps serving);
    ``fail_if_exists``: raise while that file exists (to break restarts)."""

    tag: bytes
    fail: bool = False
    fail_on_worker: int | None = None
    delay: float = 0.0
    fail_if_exists: str | None = None

    async def make_via_ref(self, old: Service | None) -> Service:
        if self.delay:
            await asyncio.sleep(self.delay)
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
