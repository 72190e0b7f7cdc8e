"""A small, fast HTTP/1.1 backend for the load harness (used when nginx is absent).

It answers two paths and nothing else: ``/small`` (a 100-byte body) and
``/big`` (1 MiB); any other path gets the small body too, so a typo in a
driver shows up as wrong byte counts, not as errors.  Keep-alive is the
default; a request with ``Connection: close`` is answered and then the
server closes (the server closes first, as nginx does, so the client side
does not collect TIME_WAIT sockets).

Rules of this file: it is a benchmark fixture, not an HTTP server -- it
parses just enough (request line, the ``Connection`` header, end of
headers) and never reads a request body.  It listens on every port given
(the reload scenario alternates between one and two upstreams), and
``--processes N`` forks N copies sharing the ports with ``SO_REUSEPORT``.

Run: ``python bench/backend.py --port 18080 --port 18081 [--processes 1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

import uvloop

SMALL_BODY = b"x" * 99 + b"\n"          # ~100 bytes, like a small API answer
BIG_BODY = b"y" * (1 << 20)             # 1 MiB, for bulk throughput


def _response(body: bytes, close: bool) -> bytes:
    head = (b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n")
    head += b"Connection: close\r\n\r\n" if close else b"\r\n"
    return head + body


# Prebuilt answers: the hot path only picks one and writes it.
_ANSWERS = {
    (b"/big", False): _response(BIG_BODY, False),
    (b"/big", True): _response(BIG_BODY, True),
    (b"/small", False): _response(SMALL_BODY, False),
    (b"/small", True): _response(SMALL_BODY, True),
}


class HttpProtocol(asyncio.Protocol):
    """One client connection; handles pipelined requests in order."""

    __slots__ = ("transport", "buf")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        close = False
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            buf = buf[end + 4:]
            line_end = head.find(b"\r\n")
            request_line = head if line_end < 0 else head[:line_end]
            parts = request_line.split(b" ")
            path = parts[1] if len(parts) > 1 else b"/"
            lowered = head.lower()
            close = b"connection: close" in lowered or request_line.endswith(b"HTTP/1.0")
            out.append(_ANSWERS.get((path, close)) or _ANSWERS[(b"/small", close)])
            if close:
                buf = b""
                break
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            if close:
                self.transport.close()   # flushes first, then closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _listen_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def serve_until_signal(servers: list[asyncio.AbstractServer]) -> None:
    """Wait for SIGTERM or SIGINT, then close *servers* (also used by plainproxy.py)."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _set_once, stop)
    await stop
    for s in servers:
        s.close()


async def serve(host: str, ports: list[int]) -> None:
    """Serve on every port until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(HttpProtocol, sock=_listen_socket(host, p), backlog=4096)
               for p in ports]
    await serve_until_signal(servers)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, fork ``--processes`` copies, serve."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--processes", type=int, default=1)
    args = ap.parse_args(argv)
    children: list[int] = []
    for _ in range(max(1, args.processes) - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)
    try:
        uvloop.run(serve(args.host, args.port))
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
