"""A verifying traffic generator for echo services (directly or through a proxy).

Run as a process beside the server under test:

    python tests/traffic.py --target 127.0.0.1:7000 --long 4 --short 8 --duration 10

*Long* connections stay open for the whole run, streaming random chunks and
checking that every byte comes back in order; at the end each half-closes
and checks it gets every byte and then EOF.  *Short* connections connect,
send a random payload, half-close, read to EOF and compare, in a loop.
Every failure is counted and the first few are described.  The run is
bounded in time (``--duration``) and in count (``--max-short``), and prints
one JSON object on stdout.  Only loopback targets are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import signal
import sys
import time
from typing import Any


class Deadline:
    """When the run ends; ``end_now()`` moves it (a stop signal)."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def end_now(self) -> None:
        self.at = time.monotonic()


class Totals:
    def __init__(self) -> None:
        self.long_ok = 0
        self.long_failed = 0
        self.short_ok = 0
        self.short_failed = 0
        self.bytes_checked = 0
        self.errors: list[str] = []

    def fail(self, kind: str, exc: BaseException | str) -> None:
        setattr(self, f"{kind}_failed", getattr(self, f"{kind}_failed") + 1)
        if len(self.errors) < 20:
            self.errors.append(f"{kind}: {exc if isinstance(exc, str) else type(exc).__name__ + ': ' + str(exc)}")

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"traffic.py: {host} is not a loopback address; refusing")


async def _open(target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if target.startswith("unix:"):
        return await asyncio.open_unix_connection(target[5:])
    host, _, port = target.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port))


async def long_connection(target: str, deadline: Deadline, totals: Totals, rng: random.Random,
                          pause: float) -> None:
    try:
        reader, writer = await asyncio.wait_for(_open(target), 10)
    except (OSError, asyncio.TimeoutError) as exc:
        totals.fail("long", exc)
        return
    try:
        while not deadline.passed():
            chunk = rng.randbytes(rng.randint(1, 16384))
            writer.write(chunk)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(chunk)), 15)
            if got != chunk:
                totals.fail("long", "echoed bytes differ")
                return
            totals.bytes_checked += len(chunk)
            await asyncio.sleep(pause)
        # the end: half-close, the rest comes back, then EOF
        tail = rng.randbytes(4096)
        writer.write(tail)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(-1), 15)
        if got != tail:
            totals.fail("long", f"tail: got {len(got)} of {len(tail)} bytes")
            return
        totals.bytes_checked += len(tail)
        totals.long_ok += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
        totals.fail("long", exc)
    finally:
        writer.close()


async def short_loop(target: str, deadline: Deadline, totals: Totals, rng: random.Random,
                     budget: list[int]) -> None:
    while not deadline.passed() and budget[0] > 0:
        budget[0] -= 1
        payload = rng.randbytes(rng.randint(1, 4096))
        try:
            reader, writer = await asyncio.wait_for(_open(target), 10)
        except (OSError, asyncio.TimeoutError) as exc:
            totals.fail("short", exc)
            await asyncio.sleep(0.01)
            continue
        try:
            writer.write(payload)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(-1), 10)
            if got != payload:
                totals.fail("short", f"got {len(got)} of {len(payload)} bytes")
            else:
                totals.short_ok += 1
                totals.bytes_checked += len(payload)
        except (OSError, asyncio.TimeoutError) as exc:
            totals.fail("short", exc)
        finally:
            writer.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    totals = Totals()
    rng = random.Random(args.seed)
    start = time.monotonic()
    deadline = Deadline(args.duration)
    loop = asyncio.get_running_loop()
    # SIGUSR1 or SIGTERM: finish now (the long connections close cleanly)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        loop.add_signal_handler(sig, deadline.end_now)
    budget = [args.max_short]
    tasks = []
    for i in range(args.long):
        target = args.target[i % len(args.target)]
        tasks.append(long_connection(target, deadline, totals, random.Random(rng.random()), args.pause))
    for i in range(args.short):
        target = args.target[i % len(args.target)]
        tasks.append(short_loop(target, deadline, totals, random.Random(rng.random()), budget))
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(str(os.getpid()))
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), args.duration + 60)
    except asyncio.TimeoutError:
        totals.fail("long", "the run did not finish in time")
    out = totals.as_dict()
    out["seconds"] = round(time.monotonic() - start, 3)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", action="append", required=True, help="host:port or unix:/path (repeatable)")
    p.add_argument("--long", type=int, default=2, help="long connections")
    p.add_argument("--short", type=int, default=4, help="concurrent short-connection loops")
    p.add_argument("--duration", type=float, default=5.0, help="seconds (bounded)")
    p.add_argument("--max-short", type=int, default=200000, help="at most this many short connections")
    p.add_argument("--pause", type=float, default=0.005, help="pause between long-connection chunks")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ready-file", help="write our pid here once running")
    args = p.parse_args(argv)
    args.duration = min(args.duration, 3600.0)
    for t in args.target:
        if not t.startswith("unix:"):
            _check_loopback(t.rpartition(":")[0].strip("[]"))
    return args


if __name__ == "__main__":
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        print(json.dumps(runner.run(main(parse()))), flush=True)
    sys.exit(0)
