"""A plain uvloop TCP proxy: the baseline "what a Python user would write".

Two ``asyncio.Protocol`` objects per connection -- the client side and the
upstream side -- that write each chunk to the other transport, with the
usual back-pressure (when one side's write buffer fills, the other side
stops reading); an EOF on either side closes both.  No tricks: this is the reference point that
tells how much hotproxy's compiled core buys over idiomatic asyncio code.

Rules of this file: it must stay ordinary.  Optimising it would make the
comparison meaningless; it only has to be correct and not wasteful.

Run: ``python bench/plainproxy.py --map 127.0.0.1:18100=127.0.0.1:18080 [--map ...]``
(one listener per ``--map``; several upstreams per listener are separated by
commas and picked round-robin).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import sys
from typing import Iterator

import uvloop

from backend import serve_until_signal   # bench/ is on sys.path: run as a script


class _Side(asyncio.Protocol):
    """One end of a proxied connection; ``peer`` is the other end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        #: bytes that came before the upstream was connected (uvloop may
        #: deliver data even though connection_made paused reading)
        self.early: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        # No half-close: close both sides once either one is done sending,
        # as most hand-written proxies do.  (The half-close version --
        # write_eof() on the peer, close later -- crashed uvloop 0.23 with
        # "double free or corruption" under Connection: close load.)
        return False

    # back-pressure: our write buffer is full -> the peer stops reading
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        peer, self.peer = self.peer, None
        self.transport = None
        if peer is not None and peer.transport is not None:
            peer.peer = None
            peer.transport.close()    # flushes what is buffered, then closes


class _Upstream(_Side):
    def __init__(self, client: _Client) -> None:
        super().__init__()
        self.peer = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


class _Client(_Side):
    def __init__(self, upstreams: Iterator[tuple[str, int]]) -> None:
        super().__init__()
        self.upstreams = upstreams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Do not read until the upstream is connected: nothing to send it to.
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        host, port = next(self.upstreams)
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: _Upstream(self), host, port)
        except OSError:
            if self.transport is not None:
                self.transport.abort()
            return
        if self.transport is None:          # the client left meanwhile
            up.transport.close()  # type: ignore[union-attr]
            return
        self.peer = up
        if self.early:
            up.transport.write(b"".join(self.early))  # type: ignore[union-attr]
            self.early.clear()
        self.transport.resume_reading()


def _parse(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


async def serve(maps: list[str]) -> None:
    """Serve every ``LISTEN=UP[,UP...]`` mapping until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    servers = []
    for m in maps:
        listen, _, ups = m.partition("=")
        upstreams = itertools.cycle([_parse(u) for u in ups.split(",")])
        host, port = _parse(listen)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        servers.append(await loop.create_server(
            lambda u=upstreams: _Client(u), sock=sock, backlog=4096))  # type: ignore[misc]
    await serve_until_signal(servers)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--map", action="append", required=True, metavar="LISTEN=UPSTREAM[,UPSTREAM]")
    args = ap.parse_args(argv)
    uvloop.run(serve(args.map))
    return 0


if __name__ == "__main__":
    sys.exit(main())
