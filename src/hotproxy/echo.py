"""The echo service: the smallest real service, for demos and tests.

Every byte a client sends comes back.  An EOF from the client is echoed as
an EOF (half-close), after which the connection ends.  Its factory is
stateful in one small way -- a greeting with a version tag, optional -- so
tests can tell which version served a connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from .options import ECHO_OPTIONS, show
from .service import MakeService, Seed, Service


class EchoProtocol(asyncio.Protocol):
    """One echo connection."""

    __slots__ = ("service", "conns", "transport")

    def __init__(self, service: EchoService, conns: Any) -> None:
        self.service = service
        self.conns = conns
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conns.add(self)
        if self.service.greeting:
            transport.write(self.service.greeting)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.service.counts[0] += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    # Back-pressure: a client that sends but does not read would otherwise
    # make the transport buffer every echoed byte, without bound.  Stop
    # reading while the echo cannot be written; go on when it drains.
    def pause_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        # The client is done sending: close once every echoed byte is
        # flushed (the client may still be reading them -- a half-close).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.discard(self)
        self.transport = None

    def abort(self) -> None:
        """Close at once (a drain timed out)."""
        if self.transport is not None:
            self.transport.abort()


class EchoService(Service):
    """Echoes; counts the bytes it echoed (the count is shared with every
    version before and after it, so it survives updates)."""

    def __init__(self, greeting: bytes = b"", counts: list[int] | None = None) -> None:
        self.greeting = greeting
        self.counts = counts if counts is not None else [0]

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        return EchoProtocol(self, conns)

    def stats(self) -> dict[str, Any]:
        return {"bytes": self.counts[0]}

    def snapshot(self) -> dict[str, Any]:
        return {"type": "echo", "v": 1, "bytes": self.counts[0]}

    def carry_late(self, before: Seed, after: Seed) -> None:
        self.counts[0] += max(0, after.of_type("echo").total("bytes") - before.of_type("echo").total("bytes"))


@dataclass(frozen=True)
class EchoFactory(MakeService):
    """Builds echo services.  ``greeting`` is sent first on every connection
    (declared in ``options.ECHO_OPTIONS``: the config's text, as bytes here)."""

    greeting: bytes = ECHO_OPTIONS["greeting"].default.encode()

    def __post_init__(self) -> None:
        if not isinstance(self.greeting, bytes):
            raise ValueError(f"greeting: expected bytes, got {show(self.greeting)}")

    def make_via_ref(self, old: Service | None) -> EchoService:
        counts = old.counts if isinstance(old, EchoService) else None
        return EchoService(self.greeting, counts)

    def make_via_snapshot(self, seed: Seed) -> EchoService:
        """The byte count carried over an upgrade (the old workers' summed)."""
        return EchoService(self.greeting, [seed.of_type("echo").total("bytes")])
