"""A built-in HTTP load generator, used when wrk is not installed.

It keeps ``--connections`` clients busy for ``--duration`` seconds (and at
most ``--max-requests`` requests), each sending one GET at a time, either
over keep-alive connections or with ``Connection: close`` (a new connection
per request).  It prints the same one-line JSON report as
``bench/wrk_report.lua`` (prefix ``WRKJSON``), so the harness reads both the
same way.

Rules of this file: it is much slower than wrk (it is Python, one process),
so with it the proxies' figures are compressed toward each other; the
harness says so in its output.  Errors are counted the way wrk counts them:
``connect`` (refused/failed connects), ``read`` (reset or EOF before a whole
response), ``write``, ``timeout`` (no answer within 2 s) and ``status``
(a non-2xx/3xx status line).

Run: ``python bench/loadgen.py --url http://127.0.0.1:18100/small -c 50 -d 5 [--close]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

import uvloop

TIMEOUT = 2.0


class _Stats:
    def __init__(self, max_requests: int) -> None:
        self.requests = 0
        self.bytes = 0
        self.latencies: list[float] = []
        self.errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
        self.max_requests = max_requests


class _Client(asyncio.Protocol):
    """One connection; sends a request, parses the answer, repeats."""

    def __init__(self, gen: _Gen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1            # bytes of the whole response, once headers are in
        self.sent_at = 0.0
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self) -> None:
        self.buf.clear()
        self.need = -1
        self.sent_at = time.perf_counter()
        self.done = asyncio.get_running_loop().create_future()
        self.timer = asyncio.get_running_loop().call_later(TIMEOUT, self._timeout)
        self.transport.write(self.gen.request)  # type: ignore[union-attr]

    def _timeout(self) -> None:
        if not self.done.done():
            self.gen.stats.errors["timeout"] += 1
            self.done.set_result(False)
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, ok: bool) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.done.done():
            self.done.set_result(ok)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            status = head[9:12]
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                j = head.find(b"\r\n", i)
                length = int(head[i + 15:j if j > 0 else len(head)])
            self.need = end + 4 + length
            if not status.startswith((b"2", b"3")):
                self.gen.stats.errors["status"] += 1
        if len(self.buf) >= self.need:
            st = self.gen.stats
            st.requests += 1
            st.bytes += len(self.buf)
            st.latencies.append(time.perf_counter() - self.sent_at)
            self._finish(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.done.done():
            self.gen.stats.errors["read"] += 1
            self._finish(False)


class _Gen:
    def __init__(self, url: str, close: bool, deadline: float, stats: _Stats) -> None:
        u = urlsplit(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        path = u.path or "/"
        conn = b"Connection: close\r\n" if close else b""
        self.request = (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + self.host.encode() +
                        b"\r\n" + conn + b"\r\n")
        self.close = close
        self.deadline = deadline
        self.stats = stats

    def more(self) -> bool:
        return time.monotonic() < self.deadline and self.stats.requests < self.stats.max_requests

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        proto: _Client | None = None
        while self.more():
            if proto is None or proto.transport is None:
                try:
                    _, proto = await loop.create_connection(lambda: _Client(self), self.host, self.port)
                except OSError:
                    self.stats.errors["connect"] += 1
                    await asyncio.sleep(0.01)
                    proto = None
                    continue
            proto.send()
            ok = await proto.done
            if self.close or not ok:
                if proto.transport is not None:
                    proto.transport.close()
                proto = None
        if proto is not None and proto.transport is not None:
            proto.transport.close()


async def run(url: str, connections: int, duration: float, close: bool, max_requests: int) -> dict:
    """Run the load; return the report dict (the ``WRKJSON`` fields)."""
    stats = _Stats(max_requests)
    start = time.monotonic()
    gen = _Gen(url, close, start + duration, stats)
    await asyncio.gather(*(gen.worker() for _ in range(connections)))
    elapsed = time.monotonic() - start
    lat = sorted(stats.latencies) or [0.0]

    def pct(p: float) -> int:
        return int(lat[min(len(lat) - 1, int(len(lat) * p / 100))] * 1e6)

    return {"requests": stats.requests, "duration_us": int(elapsed * 1e6), "bytes": stats.bytes,
            **stats.errors, "p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99),
            "max_us": int(lat[-1] * 1e6), "mean_us": sum(lat) / len(lat) * 1e6}


def main(argv: list[str] | None = None) -> int:
    """Entry point: run and print ``WRKJSON {...}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("-c", "--connections", type=int, default=50)
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("--close", action="store_true", help="send Connection: close (a connection per request)")
    ap.add_argument("--max-requests", type=int, default=5_000_000)
    args = ap.parse_args(argv)
    report = uvloop.run(run(args.url, args.connections, args.duration, args.close, args.max_requests))
    print("WRKJSON " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
