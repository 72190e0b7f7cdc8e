"""What the ``reuseport`` migration program costs a connection (the kernel runs it per SYN).

Two ``SO_REUSEPORT`` listeners on one loopback port, as two workers have;
each run connects, accepts and closes N connections (the client closes
with a reset: no TIME_WAIT, no port exhaustion), with the program on the
group, without it, and without it again (the A/A control), alternated;
prints the per-connection medians and their ratios to "none" (the
baseline is measured in the same run).

    python bench/reuseport_cost.py [--runs 6] [-n 15000]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import time

from hotproxy import reuseport


def _group(port: int, program: bool) -> list[socket.socket]:
    socks = []
    for _ in range(2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen(512)
        if program and not reuseport.attach(s):
            sys.exit(f"no program: {reuseport.status()}")
        s.setblocking(False)
        socks.append(s)
    return socks


def one_run(port: int, program: bool, n: int) -> float:
    """Microseconds per connect + accept + close."""
    listeners = _group(port, program)
    linger = struct.pack("ii", 1, 0)
    try:
        start = time.perf_counter()
        for _ in range(n):
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            c.connect(("127.0.0.1", port))
            for lst in listeners:
                try:
                    conn, _ = lst.accept()
                except BlockingIOError:
                    continue
                conn.close()
                break
            else:
                sys.exit("a connection was not queued on either listener")
            c.close()
        return (time.perf_counter() - start) / n * 1e6
    finally:
        for lst in listeners:
            lst.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("-n", type=int, default=15000, help="connections per run")
    ap.add_argument("--port", type=int, default=23411)
    args = ap.parse_args()
    variants = {"program": True, "none": False, "none-again": False}
    got: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, program in variants.items():
            got[name].append(one_run(args.port, program, args.n))
    base = statistics.median(got["none"])
    for name, runs in got.items():
        spread = " ".join(f"{x:.1f}" for x in sorted(runs))
        print(f"{name:10} us per connection: median {statistics.median(runs):.1f} (runs {spread}); "
              f"÷ none {statistics.median(runs) / base:.3f}")
    print(f"(medians of {args.runs} alternated runs of {args.n} connections; none-again ÷ none is the A/A control)")

if __name__ == "__main__":
    main()
