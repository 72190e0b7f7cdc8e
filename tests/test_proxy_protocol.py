"""The PROXY protocol (v1 and v2), through real ``hotproxy run`` processes.

* ``send_proxy``: the upstream gets the header first, with the client's
  address (checked byte for byte), then the client's bytes.
* ``accept_proxy``: the received address is the one the access log, the
  ``hash`` balancing and ``send_proxy`` use; bad, truncated, oversized,
  slow headers and peers outside ``proxy_from`` are closed at once and
  counted (status and ``/metrics``), nothing reaches the upstream and the
  worker is unaffected -- also under a fuzz of garbage over real sockets.
* A reload that turns ``send_proxy`` on and off and changes ``proxy_from``
  under byte-checked traffic: 0 errors.
* Real peers: nginx ``stream`` (``proxy_protocol on`` to hotproxy, and a
  ``listen ... proxy_protocol`` server that logs ``$proxy_protocol_addr``)
  and HAProxy (``send-proxy-v2`` to hotproxy, ``accept-proxy`` from it).
  Without nginx or HAProxy these are skipped -- or fail, with
  ``HOTPROXY_REQUIRE_PEERS=1`` (``ci/test.sh`` installs them, ``ci/peers.sh``).

The header parser itself is fuzzed in ``test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import eventually, free_port, run
from helpers_program import Program, Traffic, check_error_line, toml
from test_metrics import scrape, value
from test_program import by_name

Start = Callable[..., Program]
HOST = "127.0.0.1"
#: a second loopback address: a client that connects from here is told apart
#: from the proxies in front of hotproxy (which connect from 127.0.0.1)
CLIENT_IP = "127.0.0.2"
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src: tuple[str, int], dst: tuple[str, int], tlvs: bytes = b"", cmd: int = 1) -> bytes:
    """A v2 header (TCP over IPv4, or IPv6 if *src* has a colon), with *tlvs* after the addresses."""
    fam = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
    addrs = (socket.inet_pton(fam, src[0]) + socket.inet_pton(fam, dst[0])
             + struct.pack("!HH", src[1], dst[1]))
    body = addrs + tlvs
    return V2_SIG + bytes((0x20 | cmd, 0x11 if fam == socket.AF_INET else 0x21)) + struct.pack("!H", len(body)) + body


class PPBackend:
    """An echo server that takes an optional PROXY header off the start of each
    connection and keeps it (``headers``: one entry per connection, b"" for none)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.headers: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None
        self.conns = 0

    async def start(self) -> PPBackend:
        self.server = await asyncio.start_server(self._serve, HOST, self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        try:
            first = await reader.read(65536)
            header = b""
            if first.startswith(b"PROXY "):
                while b"\r\n" not in first and len(first) < 200:
                    more = await reader.read(65536)
                    if not more:
                        break
                    first += more
                end = first.index(b"\r\n") + 2
                header, first = first[:end], first[end:]
            elif first.startswith(V2_SIG):
                while len(first) < 16 or len(first) < 16 + struct.unpack("!H", first[14:16])[0]:
                    more = await reader.read(65536)
                    if not more:
                        break
                    first += more
                end = 16 + struct.unpack("!H", first[14:16])[0]
                header, first = first[:end], first[end:]
            self.headers.append(header)
            data = first if first or not header else await reader.read(65536)
            while data:
                writer.write(data)
                await writer.drain()
                data = await reader.read(65536)
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def exchange(port: int, payload: bytes, *, prefix: bytes = b"", source: str | None = None,
                   timeout: float = 20.0) -> tuple[bytes, tuple[str, int]]:
    """Connect to *port* (from *source*), send *prefix* + *payload*, half-close, read to
    EOF; (what came back, our own address)."""
    kw: dict[str, Any] = {"local_addr": (source, 0)} if source else {}
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, **kw), timeout)
    me = writer.get_extra_info("sockname")
    try:
        writer.write(prefix + payload)
        await writer.drain()
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), timeout)
        return got, (me[0], me[1])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def closed_at_once(port: int, data: bytes, *, then_eof: bool = False, timeout: float = 20.0) -> bytes:
    """Send *data* (and, if asked, our EOF) and wait for hotproxy to close: what it sent back."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(data)
            await writer.drain()
            if then_eof:
                writer.write_eof()
        try:
            return await asyncio.wait_for(reader.read(), timeout)
        except (ConnectionError, OSError):
            return b""   # reset: closed at once, with our bytes unread
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def totals(status: dict[str, Any], name: str) -> dict[str, Any]:
    return by_name(status)[name]["totals"]  # type: ignore[no-any-return]


# -- send_proxy ------------------------------------------------------------------------


def test_send_proxy_writes_the_header_before_the_first_byte(start: Start, core_name: str) -> None:
    """On both cores: the exact v1 and v2 headers (the client's address and
    the one it connected to), then the client's bytes; the header is not
    counted as a client byte."""
    p1, p2, pu = free_port(), free_port(), free_port()

    async def main() -> None:
        backend = await PPBackend().start()
        try:
            prog = start(toml({
                "v1": {"kind": "proxy", "listen": f"{HOST}:{p1}", "upstreams": [f"{HOST}:{backend.port}"],
                       "send_proxy": "v1"},
                "v2": {"kind": "proxy", "listen": f"{HOST}:{p2}", "upstreams": [f"{HOST}:{backend.port}"],
                       "send_proxy": "v2"},
                "off": {"kind": "proxy", "listen": f"{HOST}:{pu}", "upstreams": [f"{HOST}:{backend.port}"]},
            }, workers=1))
            await prog.wait_ready()
            got, me = await exchange(p1, b"hello v1", source=CLIENT_IP)
            assert got == b"hello v1"
            assert backend.headers[-1] == f"PROXY TCP4 {CLIENT_IP} {HOST} {me[1]} {p1}\r\n".encode()
            got, me = await exchange(p2, b"hello v2", source=CLIENT_IP)
            assert got == b"hello v2"
            assert backend.headers[-1] == v2_header((CLIENT_IP, me[1]), (HOST, p2))
            got, me = await exchange(pu, b"no header")
            assert got == b"no header" and backend.headers[-1] == b""
            status = await prog.status()
            assert totals(status, "v1")["bytes_in"] == len(b"hello v1")
            assert totals(status, "v2")["bytes_in"] == len(b"hello v2")
        finally:
            await backend.stop()

    run(main())


# -- accept_proxy ----------------------------------------------------------------------


def test_accept_proxy_address_is_the_clients_for_logs_hash_and_send_proxy(start: Start,
                                                                           core_name: str) -> None:
    """On both cores: a v1 or v2 header's source is what send_proxy passes on,
    what the access log shows, and what ``hash`` balances on (every real
    client here is 127.0.0.1, yet the received addresses spread over the
    upstreams, each always to the same one); the bytes after the header in
    the same segment are relayed; LOCAL and UNKNOWN keep the real address."""
    pa, ph = free_port(), free_port()

    async def main() -> None:
        backend = await PPBackend().start()
        tagged = [await PPBackend().start() for _ in range(3)]
        try:
            prog = start(toml({
                "pa": {"kind": "proxy", "listen": f"{HOST}:{pa}", "upstreams": [f"{HOST}:{backend.port}"],
                       "accept_proxy": True, "send_proxy": "v1", "access_log": True},
                "ph": {"kind": "proxy", "listen": f"{HOST}:{ph}", "balance": "hash",
                       "upstreams": [f"{HOST}:{b.port}" for b in tagged], "accept_proxy": True},
            }, workers=2))
            await prog.wait_ready()
            # v2 with TLVs (skipped), the data in the same segment
            hdr = v2_header(("203.0.113.7", 4242), ("198.51.100.1", 443), tlvs=b"\x04\x00\x03abc\xee\x00\x00")
            got, _ = await exchange(pa, b"after v2", prefix=hdr)
            assert got == b"after v2"
            assert backend.headers[-1] == b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n"
            # v1, IPv6
            got, _ = await exchange(pa, b"after v1", prefix=b"PROXY TCP6 2001:db8::5 2001:db8::1 5000 80\r\n")
            assert got == b"after v1"
            assert backend.headers[-1] == b"PROXY TCP6 2001:db8::5 2001:db8::1 5000 80\r\n"
            # UNKNOWN (v1) and LOCAL (v2): the connection's own addresses
            got, me = await exchange(pa, b"unknown", prefix=b"PROXY UNKNOWN whatever\r\n")
            assert got == b"unknown"
            assert backend.headers[-1] == f"PROXY TCP4 {HOST} {HOST} {me[1]} {pa}\r\n".encode()
            got, me = await exchange(pa, b"local", prefix=V2_SIG + b"\x20\x00\x00\x00")
            assert got == b"local"
            assert backend.headers[-1] == f"PROXY TCP4 {HOST} {HOST} {me[1]} {pa}\r\n".encode()
            await eventually(lambda: "service pa: 203.0.113.7:4242 -> " in prog.log())
            assert "service pa: [2001:db8::5]:5000 -> " in prog.log()
            # hash on the received address
            where: dict[str, set[int]] = {}
            for i in range(24):
                ip = f"198.18.{i}.{i + 1}"
                for _ in range(2):
                    before = [b.conns for b in tagged]
                    got, _ = await exchange(ph, b"x", prefix=f"PROXY TCP4 {ip} 10.0.0.1 1234 80\r\n".encode())
                    assert got == b"x"
                    hit = [j for j, b in enumerate(tagged) if b.conns != before[j]]
                    where.setdefault(ip, set()).update(hit)
            assert all(len(v) == 1 for v in where.values()), where     # a client keeps its upstream
            used = set().union(*where.values())
            print(f"hash over received addresses: 24 clients on upstreams {sorted(used)}")
            assert len(used) >= 2, where
            assert all(b.headers and not any(b.headers) for b in tagged if b.headers)  # no header passed on
            status = await prog.status()
            assert totals(status, "pa")["proxy_header_errors"] == 0
            assert status["restarts"] == 0
        finally:
            for b in [backend, *tagged]:
                await b.stop()

    run(main())


#: headers that must be closed at once: (what, bytes, then send our EOF)
BAD_HEADERS: list[tuple[str, bytes, bool]] = [
    ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
    ("v1 without CRLF in 107 bytes", b"PROXY TCP4 " + b"1" * 200, False),
    ("v1 bad address", b"PROXY TCP4 1.2.3.400 1.2.3.4 1 2\r\nhello", False),
    ("v1 bad port", b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\nhello", False),
    ("v1 leading zero port", b"PROXY TCP4 1.2.3.4 1.2.3.4 080 2\r\nhello", False),
    ("v1 family mismatch", b"PROXY TCP4 ::1 ::1 1 2\r\nhello", False),
    ("v1 bare LF", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\nhello", False),
    ("v1 truncated, then EOF", b"PROXY TCP4 1.2.3.4 ", True),
    ("v2 bad version", V2_SIG + b"\x31\x11\x00\x0c" + bytes(12), False),
    ("v2 bad command", V2_SIG + b"\x22\x11\x00\x0c" + bytes(12), False),
    ("v2 oversized", V2_SIG + b"\x21\x11\xff\xff" + bytes(100), False),
    ("v2 datagram", V2_SIG + b"\x21\x12\x00\x0c" + bytes(12), False),
    ("v2 short addresses", V2_SIG + b"\x21\x21\x00\x0c" + bytes(12), False),
    ("v2 TLV overrun", v2_header(("1.2.3.4", 1), ("1.2.3.4", 2), tlvs=b"\x04\x00\x09abc"), False),
    ("v2 truncated, then EOF", V2_SIG + b"\x21\x11\x00\x0c\x01\x02", True),
    ("v2 bad signature", V2_SIG[:10] + b"X" + V2_SIG[11:] + b"\x21\x11\x00\x00", False),
]


def test_bad_slow_and_unlisted_headers_are_closed_and_counted(start: Start, core_name: str) -> None:
    """On both cores: every kind of bad header, a slow one (proxy_timeout) and
    a peer outside proxy_from: closed at once, nothing sent back, nothing
    reaches the upstream, each counted in proxy_header_errors (status and
    /metrics), the worker unaffected; good headers still work afterwards."""
    pa, pf, m = free_port(), free_port(), free_port()

    async def main() -> None:
        backend = await PPBackend().start()
        try:
            prog = start(toml({
                "pa": {"kind": "proxy", "listen": f"{HOST}:{pa}", "upstreams": [f"{HOST}:{backend.port}"],
                       "accept_proxy": True, "proxy_timeout": 0.5, "access_log": True},
                "pf": {"kind": "proxy", "listen": f"{HOST}:{pf}", "upstreams": [f"{HOST}:{backend.port}"],
                       "accept_proxy": True, "proxy_from": ["10.0.0.0/8", "::1/128"]},
            }, workers=1, metrics=f"{HOST}:{m}"))
            status = await prog.wait_ready()
            pids = sorted(prog.worker_pids)
            for what, data, eof in BAD_HEADERS:
                assert await closed_at_once(pa, data, then_eof=eof) == b"", what
            # slow: a valid start, then nothing -- closed after proxy_timeout
            assert await closed_at_once(pa, b"PROXY TCP4 1.2.3.4 ") == b""
            assert await closed_at_once(pa, V2_SIG[:5]) == b""
            # not in proxy_from: closed even with a valid header
            hdr = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
            assert await closed_at_once(pf, hdr + b"hello") == b""
            n_bad = len(BAD_HEADERS) + 2
            status = await prog.status()
            assert totals(status, "pa")["proxy_header_errors"] == n_bad
            assert totals(status, "pf")["proxy_header_errors"] == 1
            assert backend.conns == 0   # nothing was forwarded
            samples = await scrape(m)
            assert value(samples, "hotproxy_service_proxy_header_errors_total", service="pa") == n_bad
            assert value(samples, "hotproxy_service_proxy_header_errors_total", service="pf") == 1
            assert "PROXY header refused: no complete header within 0.5s" in prog.log()
            assert "PROXY header refused: v2: header of 65551 bytes is over 4096" in prog.log()
            # the worker is the same, and serves
            got, _ = await exchange(pa, b"still here", prefix=hdr)
            assert got == b"still here" and backend.headers == [b""]
            assert status["restarts"] == 0 and sorted(prog.worker_pids) == pids
            print(f"bad headers closed and counted: {n_bad} (+1 peer outside proxy_from), 0 forwarded")
        finally:
            await backend.stop()

    run(main())


def test_garbage_fuzz_over_real_sockets_leaves_the_worker_serving(start: Start) -> None:
    """Random garbage and mutated valid headers, over real sockets, each
    followed by our EOF: every connection ends (closed, or relayed when the
    mutation left a valid header), the worker never restarts, and a valid
    client is served throughout."""
    pa = free_port()
    rng = random.Random(17)
    seeds = [b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000\r\n", b"PROXY TCP6 ::1 ::2 1 2\r\n", b"PROXY UNKNOWN\r\n",
             v2_header(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=b"\x01\x00\x02h2"),
             v2_header(("::1", 1), ("::2", 2)), V2_SIG + b"\x20\x00\x00\x00"]

    def sample() -> bytes:
        kind = rng.random()
        if kind < 0.3:
            return rng.randbytes(rng.randint(1, 300))
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(data))
            if op < 0.4:
                data[i] = rng.randrange(256)
            elif op < 0.7:
                del data[i:i + rng.randint(1, 8)]
            else:
                data[i:i] = rng.randbytes(rng.randint(1, 8))
            if not data:
                data = bytearray(b"P")
        return bytes(data) + rng.choice([b"", b"payload"])

    async def main() -> None:
        backend = await PPBackend().start()
        try:
            prog = start(toml({"pa": {"kind": "proxy", "listen": f"{HOST}:{pa}",
                                      "upstreams": [f"{HOST}:{backend.port}"], "accept_proxy": True,
                                      "proxy_timeout": 0.3}}, workers=1))
            await prog.wait_ready()
            pids = sorted(prog.worker_pids)
            n = 300
            for i in range(0, n, 30):
                batch = [sample() for _ in range(30)]
                await asyncio.gather(*(closed_at_once(pa, d, then_eof=True) for d in batch))
                got, _ = await exchange(pa, b"alive", prefix=b"PROXY UNKNOWN\r\n")
                assert got == b"alive", i
            status = await prog.status()
            errors = totals(status, "pa")["proxy_header_errors"]
            print(f"fuzz over sockets: {n} connections, {errors} refused, {backend.conns - n // 30} relayed, "
                  f"restarts {status['restarts']}")
            assert status["restarts"] == 0 and sorted(prog.worker_pids) == pids
            assert errors > n // 2
            assert "Traceback" not in prog.log()
        finally:
            await backend.stop()

    run(main(), timeout=100)


def test_reload_toggles_send_proxy_and_changes_proxy_from_under_traffic(start: Start,
                                                                        traffic: Callable[..., Traffic]) -> None:
    """Byte-checked traffic through ``so`` (send_proxy off -> v1 -> v2 -> off ...,
    to a backend that takes an optional header off) and through ``sv``
    (send_proxy v1 <-> v2) into ``acc`` (accept_proxy, proxy_from changing
    between lists that all hold 127.0.0.1) to an echo: 0 errors, both long
    connections live through every reload, and each header kind was seen."""
    so, sv, acc, e = (free_port() for _ in range(4))
    modes = ["off", "v1", "v2"]
    nets = [["127.0.0.1/32"], ["127.0.0.0/8", "::1/128"], ["10.0.0.0/8", "127.0.0.1/32"]]

    async def main() -> None:
        backend = await PPBackend().start()
        try:
            def config(i: int) -> str:
                return toml({
                    "so": {"kind": "proxy", "listen": f"{HOST}:{so}", "upstreams": [f"{HOST}:{backend.port}"],
                           "send_proxy": modes[i % 3]},
                    "sv": {"kind": "proxy", "listen": f"{HOST}:{sv}", "upstreams": [f"{HOST}:{acc}"],
                           "send_proxy": ("v1", "v2")[i % 2]},
                    "acc": {"kind": "proxy", "listen": f"{HOST}:{acc}", "upstreams": [f"{HOST}:{e}"],
                            "accept_proxy": True, "proxy_from": nets[i % 3]},
                    "e": {"kind": "echo", "listen": f"{HOST}:{e}"},
                }, workers=2, drain=5.0)

            prog = start(config(0))
            await prog.wait_ready()
            load = traffic([f"{HOST}:{so}", f"{HOST}:{sv}"], long=2, short=4, seed=5)
            kinds_seen = set()
            reloads = 9
            for i in range(1, reloads + 1):
                seen = len(backend.headers)
                await eventually(lambda: len(backend.headers) >= seen + 5, timeout=30)
                assert prog.config is not None
                prog.config.write_text(config(i))
                reply = await prog.admin("reload")
                assert reply["report"]["ok"], reply
                kinds_seen |= {h[:6] for h in backend.headers[seen:]}
            seen = len(backend.headers)
            await eventually(lambda: len(backend.headers) >= seen + 5, timeout=30)
            kinds_seen |= {h[:6] for h in backend.headers[seen:]}
            tot = await load.finish()
            status = await prog.status()
            print(f"reloads {reloads} under traffic: {tot}, header kinds {sorted(kinds_seen)}")
            assert tot["long_failed"] == 0 and tot["short_failed"] == 0, tot
            assert tot["long_ok"] == 2 and tot["short_ok"] > 0 and tot["bytes_checked"] > 0, tot
            assert kinds_seen == {b"", b"PROXY ", V2_SIG[:6]}, kinds_seen
            assert totals(status, "acc")["proxy_header_errors"] == 0
            assert status["restarts"] == 0
        finally:
            await backend.stop()

    run(main(), timeout=100)


# -- config checks ------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("send_proxy", '"v3"', "send_proxy: expected one of off, v1, v2, got 'v3'"),
    ("send_proxy", '"V2"', "send_proxy: expected one of off, v1, v2 (lowercase), got 'V2'"),
    ("accept_proxy", '"yes"', "accept_proxy: expected true or false, got 'yes'"),
    ("proxy_timeout", "0", "proxy_timeout: expected a number > 0, got 0"),
    ("proxy_from", '"127.0.0.1/32"', 'proxy_from: expected a list of networks like "127.0.0.1/32", got'),
    ("proxy_from", "[]", "proxy_from: expected at least one network"),
    ("proxy_from", '["127.0.0.1/8"]', "proxy_from: [0]: expected a network like \"127.0.0.1/32\", "
                                      "got '127.0.0.1/8' (127.0.0.1/8 has host bits set)"),
    ("proxy_from", '["::1/128", "localhost"]', "proxy_from: [1]: expected a network"),
])
def test_check_rejects_each_bad_value_in_one_line(tmp_path: Path, key: str, value: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[services.p]\nkind = "proxy"\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'upstreams = ["127.0.0.1:9"]\n{key} = {value}\n')
    line = check_error_line(cfg)
    assert f"services.p.{message}" in line, line


# -- real peers: nginx stream and HAProxy -----------------------------------------------------

REQUIRE_PEERS = os.environ.get("HOTPROXY_REQUIRE_PEERS", "") not in ("", "0")
NGINX_STREAM = next((p for p in ("/usr/lib/nginx/modules/ngx_stream_module.so",
                                 "/usr/lib64/nginx/modules/ngx_stream_module.so") if os.path.exists(p)), None)


def need(tool: str | None, what: str) -> str:
    """The path of *tool*; a skip without it (a failure in CI: HOTPROXY_REQUIRE_PEERS=1)."""
    path = (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin:/sbin")) if tool else None
    if path is None:
        msg = f"{what} is not installed (ci/peers.sh installs it)"
        if REQUIRE_PEERS:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


class Peer:
    """An nginx or HAProxy process started for one test, stopped in its finalizer."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    async def wait_port(self, port: int) -> None:
        async def up() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text()
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection(HOST, port)
                w.close()
                return True
            return False

        await eventually(up, timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def peers() -> Any:
    started: list[Peer] = []

    def _start(cmd: list[str], log: Path) -> Peer:
        p = Peer(cmd, log)
        started.append(p)
        return p

    yield _start
    for p in started:
        p.stop()
        print(f"---- {p.log_path} ----\n{p.log_path.read_text()[-3000:]}")


def test_nginx_stream_sends_to_and_receives_from_hotproxy(start: Start, peers: Any, tmp_path: Path) -> None:
    """nginx ``proxy_protocol on`` -> hotproxy (accept_proxy, send_proxy v1) ->
    a backend: the backend gets the client's own address (127.0.0.2).  And
    hotproxy (send_proxy v1, then v2) -> an nginx ``listen ... proxy_protocol``
    server that logs ``$proxy_protocol_addr`` and returns it."""
    nginx = need("nginx", "nginx")
    if NGINX_STREAM is None:
        need(None, "nginx's stream module (libnginx-mod-stream)")
    n_out, n_in, h_acc, h_v1, h_v2 = (free_port() for _ in range(5))
    access = tmp_path / "nginx-access.log"
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
load_module {NGINX_STREAM};
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log info;
events {{ worker_connections 64; }}
stream {{
    log_format pp '$proxy_protocol_addr:$proxy_protocol_port via $remote_addr';
    server {{
        listen {HOST}:{n_out};
        proxy_pass {HOST}:{h_acc};
        proxy_protocol on;
        proxy_half_close on;
    }}
    server {{
        listen {HOST}:{n_in} proxy_protocol;
        access_log {access} pp;
        return "$proxy_protocol_addr $proxy_protocol_port\\n";
    }}
}}
""")

    async def main() -> None:
        backend = await PPBackend().start()
        try:
            prog = start(toml({
                "acc": {"kind": "proxy", "listen": f"{HOST}:{h_acc}", "upstreams": [f"{HOST}:{backend.port}"],
                        "accept_proxy": True, "send_proxy": "v1"},
                "v1": {"kind": "proxy", "listen": f"{HOST}:{h_v1}", "upstreams": [f"{HOST}:{n_in}"],
                       "send_proxy": "v1"},
                "v2": {"kind": "proxy", "listen": f"{HOST}:{h_v2}", "upstreams": [f"{HOST}:{n_in}"],
                       "send_proxy": "v2"},
            }, workers=1))
            peer = peers([nginx, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "nginx-error.log")],
                         tmp_path / "nginx.out")
            await prog.wait_ready()
            await peer.wait_port(n_out)
            got, me = await exchange(n_out, b"via nginx", source=CLIENT_IP)
            assert got == b"via nginx"
            # (the peer's readiness probe went through too: its header may come last)
            assert f"PROXY TCP4 {CLIENT_IP} {HOST} {me[1]} {n_out}\r\n".encode() in backend.headers, backend.headers
            seen = []
            for port in (h_v1, h_v2):
                got, me = await exchange(port, b"", source=CLIENT_IP)
                assert got == f"{CLIENT_IP} {me[1]}\n".encode(), got
                seen.append(me[1])
            await eventually(lambda: access.exists() and len(access.read_text().splitlines()) >= 2)
            lines = access.read_text().splitlines()
            assert lines == [f"{CLIENT_IP}:{p} via {HOST}" for p in seen], lines
            print(f"nginx: received {backend.headers!r}; logged {lines}")
        finally:
            await backend.stop()

    run(main())


def test_haproxy_send_proxy_v2_to_hotproxy_and_accept_proxy_from_it(start: Start, peers: Any,
                                                                    tmp_path: Path) -> None:
    """HAProxy ``send-proxy-v2`` -> hotproxy (accept_proxy, send_proxy v1) ->
    a backend; and hotproxy (send_proxy v2) -> HAProxy ``accept-proxy`` ->
    ``send-proxy`` -> a backend: both backends get the client's own address."""
    haproxy = need("haproxy", "HAProxy")
    x_out, x_in, h_acc, h_v2 = (free_port() for _ in range(4))

    async def main() -> None:
        backend = await PPBackend().start()
        behind = await PPBackend().start()
        try:
            conf = tmp_path / "haproxy.cfg"
            conf.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
listen to_hotproxy
    bind {HOST}:{x_out}
    server h {HOST}:{h_acc} send-proxy-v2
listen from_hotproxy
    bind {HOST}:{x_in} accept-proxy
    server b {HOST}:{behind.port} send-proxy
""")
            prog = start(toml({
                "acc": {"kind": "proxy", "listen": f"{HOST}:{h_acc}", "upstreams": [f"{HOST}:{backend.port}"],
                        "accept_proxy": True, "send_proxy": "v1"},
                "v2": {"kind": "proxy", "listen": f"{HOST}:{h_v2}", "upstreams": [f"{HOST}:{x_in}"],
                       "send_proxy": "v2"},
            }, workers=1))
            peer = peers([haproxy, "-db", "-f", str(conf)], tmp_path / "haproxy.out")
            await prog.wait_ready()
            await peer.wait_port(x_out)
            got, me = await exchange(x_out, b"via haproxy", source=CLIENT_IP)
            assert got == b"via haproxy"
            # (the peer's readiness probe went through too: its header may come last)
            assert f"PROXY TCP4 {CLIENT_IP} {HOST} {me[1]} {x_out}\r\n".encode() in backend.headers, backend.headers
            got, me = await exchange(h_v2, b"to haproxy", source=CLIENT_IP)
            assert got == b"to haproxy"
            # (the peer's readiness probe went through too: its header may come last)
            assert f"PROXY TCP4 {CLIENT_IP} {HOST} {me[1]} {h_v2}\r\n".encode() in behind.headers, behind.headers
            print(f"haproxy: received {backend.headers!r}; passed on {behind.headers!r}")
        finally:
            await backend.stop()
            await behind.stop()

    run(main())


# -- in-process, on both cores and both accept paths --------------------------------------


@pytest.fixture(params=["core-accept", "loop-accept"])
def accept_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The core accepts and owns the client socket, or an asyncio server
    accepts and the relay drives its transport."""
    from hotproxy import listeners

    monkeypatch.setattr(listeners, "CORE_ACCEPT", request.param == "core-accept")
    return str(request.param)


async def unix_exchange(path: str, payload: bytes, prefix: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(prefix + payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def test_header_in_pieces_unix_clients_and_timeouts(core_name: str, accept_mode: str, tmp_path: Path) -> None:
    """A header that arrives in pieces is read across reads; a Unix-socket
    client gives v1 UNKNOWN and a v2 LOCAL/UNSPEC header, and may send a header
    itself (a Unix socket's peers always may); a slow header is closed after
    proxy_timeout and counted -- on both cores, through both accept paths."""
    from hotproxy.listeners import UnixListenerFactory
    from hotproxy.proxy import ProxyFactory
    from test_proxy import proxy_site, site_address

    async def main() -> None:
        backend = await PPBackend().start()
        up = (f"{HOST}:{backend.port}",)
        try:
            async with proxy_site(ProxyFactory(up, accept_proxy=True, send_proxy="v2",
                                               proxy_timeout=0.3)) as ex:
                port = int(site_address(ex).rpartition(":")[2])
                reader, writer = await asyncio.open_connection(HOST, port)
                for piece in (b"PROX", b"Y TCP4 192.0.2.1 19", b"8.51.100.2 1111 2222\r", b"\nbody"):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.02)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 20) == b"body"
                writer.close()
                await writer.wait_closed()
                assert backend.headers[-1] == v2_header(("192.0.2.1", 1111), ("198.51.100.2", 2222))
                # slow: closed by proxy_timeout, counted, nothing forwarded
                conns = backend.conns
                assert await closed_at_once(port, b"PROXY TCP4 ") == b""
                service = ex.sites["p"].service
                assert service.counters.proxy_header_errors == 1 and backend.conns == conns
            for version, expected in (("v1", b"PROXY UNKNOWN\r\n"), ("v2", V2_SIG + b"\x20\x00\x00\x00")):
                path = str(tmp_path / f"{version}.sock")
                async with proxy_site(ProxyFactory(up, send_proxy=version), UnixListenerFactory(path)) as ex:
                    assert await unix_exchange(path, b"from unix") == b"from unix"
                    assert backend.headers[-1] == expected
            # a header and more bytes than the read buffer holds, in one write:
            # the bytes after the header fill the buffer (with send_proxy's
            # header in front, over it) and must all arrive, in order
            async with proxy_site(ProxyFactory(up, accept_proxy=True, send_proxy="v1")) as ex:
                port = int(site_address(ex).rpartition(":")[2])
                big = random.Random(3).randbytes(300_000)
                hdr = v2_header(("192.0.2.3", 5), ("192.0.2.1", 6))   # 28 bytes in, 36 out
                for cut in (16384 - 36, 16384 - 28, 16384 - 20, 16384, 70000):
                    got, _ = await exchange(port, big[:cut], prefix=hdr)
                    assert got == big[:cut], (cut, len(got))
                    assert backend.headers[-1] == b"PROXY TCP4 192.0.2.3 192.0.2.1 5 6\r\n"
            path = str(tmp_path / "acc.sock")
            async with proxy_site(ProxyFactory(up, accept_proxy=True, send_proxy="v1"),
                                  UnixListenerFactory(path)) as ex:
                got = await unix_exchange(path, b"told", prefix=b"PROXY TCP4 192.0.2.9 192.0.2.1 7 8\r\n")
                assert got == b"told"
                assert backend.headers[-1] == b"PROXY TCP4 192.0.2.9 192.0.2.1 7 8\r\n"
        finally:
            await backend.stop()

    run(main())
