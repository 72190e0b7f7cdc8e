"""Random conversations through the relay: every byte, every EOF, every count.

Each seed draws a set of connections, each a random two-sided script: the
client and the upstream each send a random series of writes (1 byte to
hundreds of KiB, sometimes waiting for the other side to catch up), read
with random pauses (so the proxy meets back-pressure from both sides),
and end with a half-close in a random order; a site's relay buffers are
drawn too (1 KiB, so every read fills the buffer and the relay yields; the
default; or a small maximum so the compiled core splices early).

What must hold, whatever the timing: each side receives exactly what the
other sent, then the EOF; the proxy ends every connection as ``eof`` with
``bytes_in``/``bytes_out`` equal to what crossed it, and releases every
count and descriptor.  In the second test one side of each conversation
resets (RST) at a random step instead: the other side gets an intact
prefix, the connection ends as that side's error, nothing is left open.
Run on both cores and both accept modes (the core accepting and owning the
client socket, or an asyncio server and its transport).

``HOTPROXY_FUZZ_SEEDS=N`` runs N seeds instead of the default few (a soak
run); a failure names its seed, and the same seed draws the same scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest

from conftest import eventually, run
from hotproxy import listeners
from hotproxy import proxy as proxy_module
from hotproxy.proxy import ProxyFactory
from test_proxy import drained, proxy_site, service, site_address

KiB = 1 << 10

SEEDS = list(range(int(os.environ.get("HOTPROXY_FUZZ_SEEDS", "3"))))


@dataclass
class Side:
    """One end's part of a script."""

    writes: list[tuple[str, int]] = field(default_factory=list)   # ("send", n) | ("sleep", ms) | ("drain", 0)
    read_size: int = 65536        # bytes per read() call
    read_pauses: int = 0          # how many times the reader stops for a while
    eof_after_peer_eof: bool = False   # half-close only once the peer's EOF arrived
    reset_after: int | None = None     # reset (RST) after this many write steps, instead of the EOF


@dataclass
class Script:
    ident: int
    client: Side
    upstream: Side
    seed: int

    def payload(self, who: str) -> bytes:
        """What *who* sends over the whole conversation (drawn from the seed)."""
        side = self.client if who == "client" else self.upstream
        n = sum(k for op, k in side.writes if op == "send")
        return random.Random(f"{self.seed}/{self.ident}/{who}").randbytes(n)


def draw_side(rng: random.Random) -> Side:
    side = Side()
    shape = rng.choice(["empty", "tiny", "chatty", "bulk", "mixed"])
    count = {"empty": 0, "tiny": 1, "chatty": rng.randint(5, 60),
             "bulk": rng.randint(1, 4), "mixed": rng.randint(3, 20)}[shape]
    for _ in range(count):
        if shape == "bulk":
            n = rng.randint(64 * KiB, 1536 * KiB)
        elif shape == "chatty":
            n = rng.choice([1, 2, rng.randint(3, 200), rng.randint(200, 4 * KiB)])
        else:
            n = rng.choice([1, rng.randint(2, 2 * KiB), rng.randint(2 * KiB, 300 * KiB)])
        side.writes.append(("send", n))
        r = rng.random()
        if r < 0.15:
            side.writes.append(("sleep", rng.randint(1, 30)))
        elif r < 0.35:
            side.writes.append(("drain", 0))
    side.read_size = rng.choice([7, 97, 512, 4 * KiB, 64 * KiB, 1 << 20])
    side.read_pauses = rng.choice([0, 0, 1, 3])
    side.eof_after_peer_eof = rng.random() < 0.3
    return side


def draw_scripts(seed: int, count: int) -> list[Script]:
    rng = random.Random(seed)
    scripts = []
    for i in range(count):
        client, upstream = draw_side(rng), draw_side(rng)
        if client.eof_after_peer_eof and upstream.eof_after_peer_eof:
            # both waiting for the other's EOF would never end
            rng.choice([client, upstream]).eof_after_peer_eof = False
        scripts.append(Script(i, client, upstream, seed))
    return scripts


async def play(side: Side, payload: bytes, reader: asyncio.StreamReader,
               writer: asyncio.StreamWriter, rng: random.Random) -> Any:
    """Run one end: send *payload* as *side* says, read until EOF; return
    (bytes received, their sha256).  With ``reset_after`` the end resets
    the connection instead and returns "reset"; an end whose peer reset
    returns ("error", bytes received, their sha256)."""
    peer_eof = asyncio.Event()
    h = hashlib.sha256()
    got = 0

    async def read_all() -> tuple[int, str]:
        nonlocal got
        pauses = side.read_pauses
        try:
            while True:
                data = await reader.read(side.read_size)
                if not data:
                    return got, h.hexdigest()
                h.update(data)
                got += len(data)
                if pauses and rng.random() < 0.05:
                    pauses -= 1
                    await asyncio.sleep(rng.uniform(0.005, 0.05))
        finally:
            peer_eof.set()

    async def write_all() -> bool:
        off = 0
        for step, (op, n) in enumerate(side.writes):
            if step == side.reset_after:
                return False
            if op == "send":
                writer.write(payload[off:off + n])
                off += n
            elif op == "sleep":
                await asyncio.sleep(n / 1000)
            else:
                await writer.drain()
        await writer.drain()
        if side.reset_after is not None:
            return False
        if side.eof_after_peer_eof:
            await peer_eof.wait()
            if reading.done() and reading.exception() is not None:
                raise reading.exception()   # type: ignore[misc]
        writer.write_eof()
        return True

    async def settle(task: asyncio.Future[Any]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task

    reading = asyncio.ensure_future(read_all())
    try:
        if not await write_all():
            await settle(reading)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return "reset"
        result = await reading
        await writer.drain()
        return result
    except (OSError, RuntimeError):
        # reset by the peer: ConnectionResetError, ENOTCONN from write_eof,
        # or uvloop's RuntimeError for a transport that closed meanwhile
        if not writer.transport.is_closing():
            raise
        await settle(reading)
        return ("error", got, h.hexdigest())


async def converse(scripts: list[Script], address: str) -> list[Any]:
    """Play every script's client side through *address* at once; return
    what each got, in order."""
    host, _, port = address.rpartition(":")

    async def one(script: Script) -> Any:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(struct.pack("!Q", script.ident))   # tells the upstream which script
            rng = random.Random(f"{script.seed}/{script.ident}/client-timing")
            return await play(script.client, script.payload("client"), reader, writer, rng)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return list(await asyncio.gather(*(one(s) for s in scripts)))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def draw_buffers(rng: random.Random, monkeypatch: pytest.MonkeyPatch) -> tuple[int | None, int | None]:
    """The site's relay buffers (buffer, max): 1 KiB, so every read fills
    and the compiled core splices from the first; 16/64 KiB; or the default."""
    buffers = rng.choice([(1 * KiB, 1 * KiB), (16 * KiB, 64 * KiB), (None, None)])
    if buffers[0] is not None:
        monkeypatch.setattr(proxy_module, "BUFFER_SIZE", buffers[0])
        monkeypatch.setattr(proxy_module, "MAX_BUFFER_SIZE", buffers[1])
    return buffers


async def start_upstream(scripts: list[Script], seed: int,
                         results: dict[int, Any]) -> tuple[asyncio.AbstractServer, int]:
    """An upstream that plays each script's upstream side (found by the
    8-byte id the client sends first) and records what it got in *results*;
    return the server and its port."""
    by_ident = {s.ident: s for s in scripts}

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            (ident,) = struct.unpack("!Q", await reader.readexactly(8))
            script = by_ident[ident]
            rng = random.Random(f"{seed}/{ident}/upstream-timing")
            results[ident] = await play(script.upstream, script.payload("upstream"), reader, writer, rng)
        except (OSError, asyncio.IncompleteReadError):
            pass   # reset before the id arrived: nothing to compare
        finally:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def expected(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("accept", ["core-accept", "loop-accept"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_conversations_keep_every_byte_and_eof(core_name: str, seed: int, accept: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(listeners, "CORE_ACCEPT", accept == "core-accept")
    buffers = draw_buffers(random.Random(seed), monkeypatch)
    scripts = draw_scripts(seed, 16)

    async def main() -> None:
        upstream_results: dict[int, Any] = {}
        server, port = await start_upstream(scripts, seed, upstream_results)
        try:
            async with proxy_site(ProxyFactory((f"127.0.0.1:{port}",), access_log=True)) as ex:
                before = fd_count()
                got = await converse(scripts, site_address(ex))
                await eventually(lambda: len(upstream_results) == len(scripts))
                await drained(ex)
                await eventually(lambda: fd_count() <= before)
                for script, client_got in zip(scripts, got):
                    where = f"seed {seed}, script {script.ident}, buffers {buffers}"
                    assert client_got == expected(script.payload("upstream")), where
                    assert upstream_results[script.ident] == expected(script.payload("client")), where
                c = service(ex).counters
                sent = sum(8 + len(s.payload("client")) for s in scripts)
                answered = sum(len(s.payload("upstream")) for s in scripts)
                assert (c.accepted, c.active) == (len(scripts), 0)
                assert (c.bytes_in, c.bytes_out) == (sent, answered), f"seed {seed}"
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.INFO, logger="hotproxy.access"):
        run(main(), timeout=100)
    # one access-log line per connection: what crossed it, and how it ended
    ends = sorted(re.search(r"in=(\d+) out=(\d+) .* end=(\w+)$", r.getMessage()).groups()
                  for r in caplog.records if r.name == "hotproxy.access")
    want = sorted((str(8 + len(s.payload("client"))), str(len(s.payload("upstream"))), "eof")
                  for s in scripts)
    assert ends == want, f"seed {seed}"


@pytest.mark.parametrize("accept", ["core-accept", "loop-accept"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_resets_release_everything(core_name: str, seed: int, accept: str,
                                          monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """The same conversations, but in each one side resets (RST) at a random
    step instead of its EOF: the other side gets a prefix of what was sent
    (then the reset or an EOF), the connection ends as the resetting side's
    error, and the proxy releases every count and descriptor (pipes too)."""
    monkeypatch.setattr(listeners, "CORE_ACCEPT", accept == "core-accept")
    rng = random.Random(1000 + seed)
    buffers = draw_buffers(rng, monkeypatch)
    scripts = draw_scripts(1000 + seed, 16)
    resetting = {}
    for s in scripts:
        who = rng.choice(["client", "upstream"])
        side = s.client if who == "client" else s.upstream
        side.reset_after = rng.randint(0, len(side.writes))
        side.eof_after_peer_eof = False
        resetting[s.ident] = who

    async def main() -> None:
        upstream_results: dict[int, Any] = {}
        server, port = await start_upstream(scripts, seed, upstream_results)
        try:
            async with proxy_site(ProxyFactory((f"127.0.0.1:{port}",), access_log=True)) as ex:
                before = fd_count()
                got = await converse(scripts, site_address(ex))
                await drained(ex)
                for script, client_got in zip(scripts, got):
                    where = f"seed {seed}, script {script.ident}, buffers {buffers}"
                    if resetting[script.ident] == "client":
                        assert client_got == "reset", where
                        peer, sent = upstream_results.get(script.ident), script.payload("client")
                    else:
                        assert upstream_results.get(script.ident) in ("reset", None), where
                        peer, sent = client_got, script.payload("upstream")
                    if peer is None:
                        continue   # reset before the upstream had read the id
                    # the other side received a prefix of what was sent, intact
                    n, digest = peer[1:] if peer[0] == "error" else peer
                    assert hashlib.sha256(sent[:n]).hexdigest() == digest, where
                c = service(ex).counters
                assert (c.accepted, c.active) == (len(scripts), 0)
                # every socket and pipe of the proxy's is closed again
                await eventually(lambda: fd_count() <= before)
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.INFO, logger="hotproxy.access"):
        run(main(), timeout=100)
    ends = [r.getMessage().rsplit("end=", 1)[1] for r in caplog.records if r.name == "hotproxy.access"]
    # each connection ends as the error of the side that reset it
    assert sorted(ends) == sorted(f"{who}_error" for who in resetting.values()), f"seed {seed}"
