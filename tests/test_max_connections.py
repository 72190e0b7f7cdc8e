"""``max_connections`` is one limit for the whole instance, not per worker.

The real ``hotproxy run`` program with 2 workers and ``max_connections = 5``
on an echo service and on a proxy, on both cores: of 10 connections held
open at once exactly 5 are served; closing some makes room for as many;
the count carries over an ``Update``; and the connections a ``kill -9``
takes down with a worker give their counts back once the master has seen
it die -- none are leaked.  Nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from conftest import eventually, free_port, run
from helpers_program import HOST, Program, toml

LIMIT = 5

Start = Callable[[str], Program]


@dataclass
class Ports:
    service: int
    up1: int
    up2: int


def config(kind: str, ports: Ports, version: int) -> str:
    """Two upstream echoes (greeting ``A``, ``B``) and the limited service ``s``:
    an echo that greets with ``A`` (version 1) or ``B`` (version 2), or a
    proxy to the ``A`` echo (version 1) or the ``B`` one (version 2)."""
    services: dict[str, dict[str, Any]] = {
        "up1": {"kind": "echo", "listen": f"{HOST}:{ports.up1}", "greeting": "A"},
        "up2": {"kind": "echo", "listen": f"{HOST}:{ports.up2}", "greeting": "B"},
    }
    if kind == "echo":
        services["s"] = {"kind": "echo", "listen": f"{HOST}:{ports.service}",
                         "greeting": "AB"[version - 1], "max_connections": LIMIT}
    else:
        services["s"] = {"kind": "proxy", "listen": f"{HOST}:{ports.service}",
                         "upstreams": [f"{HOST}:{(ports.up1, ports.up2)[version - 1]}"],
                         "max_connections": LIMIT}
    return toml(services)


class Held:
    """A connection that was served: its greeting, and an open socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: bytes) -> None:
        self.reader, self.writer, self.greeting = reader, writer, greeting

    async def works(self) -> bool:
        """One more round trip (False: the connection is gone)."""
        try:
            self.writer.write(b"again")
            await self.writer.drain()
            return await asyncio.wait_for(self.reader.readexactly(5), 10) == b"again"
        except (asyncio.IncompleteReadError, ConnectionError):
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def connect(port: int) -> Held | None:
    """A connection with one round trip held open, or None if it was refused
    (closed at once)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    try:
        greeting = await asyncio.wait_for(reader.readexactly(1), 10)
        writer.write(b"ping")
        await writer.drain()
        if await asyncio.wait_for(reader.readexactly(4), 10) == b"ping":
            return Held(reader, writer, greeting)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
    return None


async def open_many(port: int, n: int, held: list[Held]) -> int:
    """Open *n* connections one after the other; keep the served ones in
    *held*; return how many were served."""
    served = 0
    for _ in range(n):
        conn = await connect(port)
        if conn is not None:
            held.append(conn)
            served += 1
    return served


def established(pid: int, port: int) -> int:
    """Established TCP connections to local *port* whose socket process *pid* holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


@pytest.mark.parametrize("kind", ["echo", "proxy"])
def test_max_connections_is_one_limit_for_the_whole_instance(start: Start, core_name: str, kind: str) -> None:
    ports = Ports(free_port(), free_port(), free_port())
    prog = start(config(kind, ports, 1))
    assert prog.config is not None
    cfg = prog.config

    async def service() -> dict[str, Any]:
        return next(s for s in (await prog.status())["services"] if s["name"] == "s")

    async def active(n: int) -> bool:
        return (await service())["active"] == n

    async def main() -> None:
        status = await prog.wait_ready()
        assert len(status["workers"]) == 2
        held: list[Held] = []
        try:
            await scenario(held)
        finally:
            for conn in held:
                await conn.close()

    async def scenario(held: list[Held]) -> None:
        # 10 at once: 5 served (over both workers), 5 refused
        served = await open_many(ports.service, 10, held)
        s = await service()
        print(f"{kind}/{core_name}: 10 connections, {served} served, refused={s['totals'].get('refused')}")
        assert served == LIMIT and s["active"] == LIMIT
        assert s["totals"]["refused"] == 10 - LIMIT
        assert {c.greeting for c in held} == {b"A"}

        # closing 2 makes room for exactly 2
        for conn in held[:2]:
            await conn.close()
        del held[:2]
        await eventually(lambda: active(LIMIT - 2))
        assert await open_many(ports.service, 3, held) == 2

        # an Update (new greeting / upstream): the 5 old-version connections still count
        cfg.write_text(config(kind, ports, 2))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0 and "changed=[s]" in out, out + err
        assert await open_many(ports.service, 1, held) == 0
        for conn in held:
            assert await conn.works()                  # never cut
            await conn.close()
        held.clear()
        await eventually(lambda: active(0))
        assert await open_many(ports.service, LIMIT + 1, held) == LIMIT
        assert {c.greeting for c in held} == {b"B"}

        # kill -9 the worker holding the most of them
        workers = (await prog.status())["workers"]
        prog.worker_pids += [w["pid"] for w in workers]
        on = {w["pid"]: established(w["pid"], ports.service) for w in workers}
        assert sum(on.values()) == LIMIT, on
        victim = max(on, key=lambda pid: on[pid])
        os.kill(victim, signal.SIGKILL)

        async def back() -> bool:
            st = await prog.status()
            return st["restarts"] == 1 and all(w["alive"] and "s" in w["sites"] for w in st["workers"])

        await eventually(back, timeout=30)
        prog.worker_pids += [w["pid"] for w in (await prog.status())["workers"]]
        alive = []
        for conn in held:
            if await conn.works():
                alive.append(conn)
            else:
                await conn.close()
        held[:] = alive
        print(f"{kind}/{core_name}: killed worker pid {victim} with {on[victim]} of the {LIMIT}; "
              f"{len(alive)} still open")
        assert len(alive) <= LIMIT - on[victim]
        await eventually(lambda: active(len(alive)))
        # the dead worker's counts are back: exactly the room the limit leaves
        served = await open_many(ports.service, 10, held)
        print(f"{kind}/{core_name}: after the restart, {served} of 10 new connections served")
        assert served == LIMIT - len(alive)

    run(main(), 120)
