"""TLS SNI routing without termination, through real ``hotproxy run`` processes.

Real TLS end to end: a CA and one certificate per backend are made here
with the ``openssl`` CLI; the backends are Python ``ssl`` servers, each
with its own certificate; the clients (Python ``ssl`` and ``openssl
s_client -servername``) verify the backend's certificate for the name they
asked for against that CA -- so a handshake that completes proves the
ClientHello reached the right backend untouched and the session is the
client's and the backend's, not hotproxy's.

* Each name reaches its group: exact, then the longest ``*.suffix`` (at any
  depth), then the default (``upstreams``), case-insensitively; a hello
  without a name goes to the default.
* No route and no default, non-TLS bytes, a bad or oversized hello, a slow
  one (``sni_timeout``): closed at once, counted (``sni_no_route``,
  ``sni_errors``; status and /metrics), nothing reaches a backend, the
  worker is the same process; with ``accept_proxy`` the hello follows the
  PROXY header; with ``send_proxy`` the header goes before the hello.
* A reload that moves a name between backends under TLS traffic: 0 errors.
* A hypothesis fuzz of garbage and mutated ClientHellos over real sockets:
  the worker survives (same pid), the counters move, a good client is
  served throughout.
* ``hotproxy check`` rejects bad routes in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import eventually, free_port, run
from helpers_program import Program, check_error_line, toml
from helpers_tls import make_ca, make_cert
from test_clienthello import client_hello
from test_metrics import scrape, value
from test_program import by_name
from test_proxy_protocol import closed_at_once
from test_upgrade import upgrade

Start = Callable[..., Program]
HOST = "127.0.0.1"

#: backend tag -> the DNS names its certificate holds
CERTS = {
    "a": ["a.ex.test", "r.ex.test"],
    "w": ["*.ex.test", "*.c.ex.test"],
    "b": ["*.b.ex.test", "*.z.b.ex.test"],
    "d": ["other.test"],
    "r": ["r.ex.test"],
}


# -- certificates (openssl CLI) and TLS peers ------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and one certificate per backend of CERTS, signed by it (EC P-256, 2 days)."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca", "hotproxy test CA")
    for tag, names in CERTS.items():
        make_cert(d, "ca", tag, names[0], "subjectAltName=" + ",".join(f"DNS:{n}" for n in names))
    return d


class TlsBackend:
    """A TLS server with its own certificate: reads one line, answers
    ``TAG SNI LINE`` (the name the handshake asked for), closes.  ``conns``:
    the handshakes it completed; ``names``: the server names it saw."""

    def __init__(self, pki: Path, tag: str) -> None:
        self.tag = tag
        self.port = free_port()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pki / f"{tag}.pem"), str(pki / f"{tag}.key"))
        # the server name the handshake carried, kept on the connection's SSLObject
        self.ctx.sni_callback = lambda obj, name, ctx: setattr(obj, "test_sni", name) and None
        self.names: list[str | None] = []
        self.conns = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> TlsBackend:
        self.server = await asyncio.start_server(self._serve, HOST, self.port, ssl=self.ctx)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        name = getattr(writer.get_extra_info("ssl_object"), "test_sni", None)
        name = name.lower() if name else None
        self.names.append(name)
        try:
            line = await asyncio.wait_for(reader.readline(), 20)
            writer.write(f"{self.tag} {name or '-'} ".encode() + line)
            await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def client_ctx(pki: Path) -> ssl.SSLContext:
    """A client that verifies the backend's certificate (and name) against the test CA."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if hasattr(ssl, "VERIFY_X509_STRICT"):
        ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return ctx


async def tls_ask(port: int, ctx: ssl.SSLContext, name: str | None, payload: bytes = b"hello",
                  timeout: float = 20.0) -> bytes:
    """A TLS session through hotproxy asking for *name* (None: no SNI, no
    verification): send one line, read the answer to the end."""
    if name is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=name or None), timeout)
    try:
        writer.write(payload + b"\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            await writer.wait_closed()


async def s_client(port: int, pki: Path, name: str, payload: bytes = b"from s_client") -> str:
    """``openssl s_client -servername NAME`` through hotproxy, verifying the
    backend's certificate and host name: its whole output."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", name, "-CAfile", str(pki / "ca.pem"),
        "-verify_hostname", name, "-verify_return_error", "-ign_eof",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(payload + b"\n"), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def config(services: dict[str, dict[str, Any]], *, workers: int = 1, drain: float = 10.0, **runtime: Any) -> str:
    return toml(services, workers=workers, drain=drain, **runtime)


def totals(status: dict[str, Any], name: str) -> dict[str, Any]:
    return by_name(status)[name]["totals"]  # type: ignore[no-any-return]


def up(b: TlsBackend) -> str:
    return f"{HOST}:{b.port}"


# -- routing ---------------------------------------------------------------------------------------


def test_each_name_reaches_its_backend_end_to_end(start: Start, core_name: str, pki: Path) -> None:
    """On both cores: exact name, longest wildcard (any depth), default, no
    SNI, upper case; Python ssl and openssl s_client clients verify the
    backend's certificate for their name; the access log carries the name."""
    port = free_port()

    async def main() -> None:
        bk = {t: await TlsBackend(pki, t).start() for t in ("a", "w", "b", "d")}
        try:
            prog = start(config({"tls": {
                "kind": "proxy", "listen": f"{HOST}:{port}", "upstreams": [up(bk["d"])], "access_log": True,
                "sni_routes": {"a.ex.test": [up(bk["a"])], "*.ex.test": [up(bk["w"])],
                               "*.b.ex.test": [{"address": up(bk["b"]), "weight": 2}]},
            }}, workers=2))
            await prog.wait_ready()
            ctx = client_ctx(pki)
            cases = [("a.ex.test", "a"), ("A.Ex.Test", "a"), ("x.ex.test", "w"), ("y.c.ex.test", "w"),
                     ("z.b.ex.test", "b"), ("deep.z.b.ex.test", "b"), ("other.test", "d")]
            for name, tag in cases:
                got = await tls_ask(port, ctx, name, b"ping " + name.encode())
                assert got == f"{tag} {name.lower()} ping {name}\n".encode(), (name, got)
            # no server name at all: the default group (not verified: no name to check)
            assert await tls_ask(port, ctx, None, b"nameless") == b"d - nameless\n"
            # openssl s_client, verifying the backend's certificate for the name
            out = await s_client(port, pki, "a.ex.test")
            assert "Verify return code: 0 (ok)" in out and "a a.ex.test from s_client" in out, out
            out = await s_client(port, pki, "q.b.ex.test")
            assert "Verify return code: 0 (ok)" in out and "b q.b.ex.test from s_client" in out, out
            status = await prog.status()
            t = totals(status, "tls")
            assert t["sni_errors"] == 0 and t["sni_no_route"] == 0 and t["no_upstream"] == 0, t
            assert [bk[x].conns for x in "awbd"] == [3, 2, 3, 2]
            await eventually(lambda: "sni=deep.z.b.ex.test time=" in prog.log())
            assert "sni=- time=" in prog.log()
            print(f"sni routes: {len(cases) + 3} TLS sessions, each to its backend, verified end to end")
        finally:
            for b in bk.values():
                await b.stop()

    run(main(), timeout=90)


BAD_HELLOS: list[tuple[str, bytes, bool]] = [
    ("http", b"GET / HTTP/1.1\r\nHost: a.ex.test\r\n\r\n", False),
    ("ssh", b"SSH-2.0-OpenSSH_9.6\r\n", False),
    ("tls alert record", b"\x15\x03\x01\x00\x02\x02\x28", False),
    ("sslv2-style", b"\x80\x2e\x01\x00\x02\x00\x15", False),
    ("server hello", b"\x16\x03\x03\x00\x04\x02\x00\x00\x00", False),
    ("oversized hello", b"\x16\x03\x01\x40\x00\x01\x00\x50\x00" + bytes(100), False),
    ("record over 16 KiB", b"\x16\x03\x01\x40\x01\x01", False),
    ("truncated, then EOF", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", True),
]


def test_unroutable_bad_and_slow_hellos_are_closed_and_counted(start: Start, core_name: str, pki: Path) -> None:
    """On both cores, without a default group: a name with no route, non-TLS
    bytes, bad and oversized hellos, a slow one (sni_timeout): closed at
    once, counted in status and /metrics, nothing reaches the backend; the
    worker is the same and serves a good name afterwards."""
    port, m = free_port(), free_port()

    async def main() -> None:
        a = await TlsBackend(pki, "a").start()
        try:
            prog = start(config({"tls": {
                "kind": "proxy", "listen": f"{HOST}:{port}", "upstreams": [], "access_log": True,
                "sni_routes": {"a.ex.test": [up(a)]}, "sni_timeout": 0.5,
            }}, metrics=f"{HOST}:{m}"))
            await prog.wait_ready()
            pids = sorted(prog.worker_pids)
            ctx = client_ctx(pki)
            # no route, no default: the handshake fails (closed), nothing reaches the backend
            for name in ("b.ex.test", "a.ex.test.org", None):
                with pytest.raises((ssl.SSLError, ConnectionError, OSError, asyncio.IncompleteReadError)):
                    await tls_ask(port, ctx, name)
            assert await closed_at_once(port, client_hello("zzz.ex.test")) == b""
            for what, data, eof in BAD_HELLOS:
                assert await closed_at_once(port, data, then_eof=eof) == b"", what
            # slow: a valid start, then nothing -- closed after sni_timeout
            assert await closed_at_once(port, client_hello("a.ex.test")[:30]) == b""
            n_no_route, n_bad = 4, len(BAD_HELLOS) + 1
            status = await prog.status()
            t = totals(status, "tls")
            assert (t["sni_no_route"], t["sni_errors"]) == (n_no_route, n_bad), t
            assert a.conns == 0
            samples = await scrape(m)
            assert value(samples, "hotproxy_service_sni_no_route_total", service="tls") == n_no_route
            assert value(samples, "hotproxy_service_sni_errors_total", service="tls") == n_bad
            log = prog.log()
            assert "TLS ClientHello refused: no route for server name 'b.ex.test'" in log
            assert "TLS ClientHello refused: no complete ClientHello within 0.5s" in log
            assert "TLS ClientHello refused: not a TLS handshake (record type 71)" in log
            assert "Traceback" not in log
            # the same worker serves a good name
            assert await tls_ask(port, ctx, "a.ex.test", b"still") == b"a a.ex.test still\n"
            assert status["restarts"] == 0 and sorted(prog.worker_pids) == pids
            print(f"closed and counted: {n_no_route} without a route, {n_bad} bad or slow hellos, 0 forwarded")
        finally:
            await a.stop()

    run(main(), timeout=90)


def test_sni_after_accept_proxy_and_before_send_proxy(start: Start, core_name: str, pki: Path) -> None:
    """``accept_proxy``: the hello is read after the PROXY header (in the same
    segment, too); ``send_proxy``: our header goes first, the hello after it,
    untouched -- through a second hotproxy service that takes it off
    (accept_proxy) and routes by the same name: the session completes."""
    front, back = free_port(), free_port()

    async def main() -> None:
        a = await TlsBackend(pki, "a").start()
        w = await TlsBackend(pki, "w").start()
        try:
            prog = start(config({
                "front": {"kind": "proxy", "listen": f"{HOST}:{front}", "upstreams": [f"{HOST}:{back}"],
                          "sni_routes": {"*.ex.test": [f"{HOST}:{back}"]}, "send_proxy": "v2"},
                "back": {"kind": "proxy", "listen": f"{HOST}:{back}", "upstreams": [up(w)], "accept_proxy": True,
                         "sni_routes": {"a.ex.test": [up(a)]}, "access_log": True},
            }))
            await prog.wait_ready()
            ctx = client_ctx(pki)
            assert await tls_ask(front, ctx, "a.ex.test", b"x") == b"a a.ex.test x\n"
            assert await tls_ask(front, ctx, "k.ex.test", b"y") == b"w k.ex.test y\n"
            # the PROXY header and the hello in one segment, straight to back
            got = await closed_at_once(back, b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 443\r\n"
                                       + client_hello("zz.ex.test"), then_eof=True)
            assert got.startswith(b"\x16\x03"), got[:16]    # w's ServerHello: relayed untouched
            await eventually(lambda: "service back: 203.0.113.9:4000 -> " in prog.log())
            status = await prog.status()
            assert totals(status, "back")["sni_errors"] == 0 and totals(status, "front")["sni_errors"] == 0
        finally:
            await a.stop()
            await w.stop()

    run(main(), timeout=90)


def test_a_route_group_has_health_checks_weights_and_backups(start: Start, pki: Path) -> None:
    """A group is balanced like ``upstreams``: the active health checks cover
    an upstream that only a route lists (its state in status), and a group
    whose primary is down sends its name to the group's backup -- without a
    connect failure, since the checks marked it down first."""
    port = free_port()
    dead = f"{HOST}:{free_port()}"    # nothing listens there: refused

    async def main() -> None:
        a = await TlsBackend(pki, "a").start()
        d = await TlsBackend(pki, "d").start()
        try:
            prog = start(config({"tls": {
                "kind": "proxy", "listen": f"{HOST}:{port}", "upstreams": [up(d)], "max_fails": 0,
                "health_check": {"interval": 0.05, "timeout": 0.5, "rise": 1, "fall": 1},
                "sni_routes": {"a.ex.test": [dead, {"address": up(a), "backup": True}]},
            }}, workers=2))
            await prog.wait_ready()

            async def dead_is_down() -> bool:
                ups = by_name(await prog.status())["tls"].get("upstreams", {})
                return bool(ups.get(dead, {}).get("health", {}).get("state") == "down"
                            and ups.get(up(a), {}).get("health", {}).get("state") == "up")

            await eventually(dead_is_down, timeout=30)
            ctx = client_ctx(pki)
            for i in range(6):
                assert await tls_ask(port, ctx, "a.ex.test", b"b%d" % i) == b"a a.ex.test b%d\n" % i
            assert await tls_ask(port, ctx, "other.test", b"dflt") == b"d other.test dflt\n"
            status = await prog.status()
            t = totals(status, "tls")
            ups = by_name(status)["tls"]["upstreams"]
            print(f"route group: primary down by health checks, {a.conns} sessions to its backup, "
                  f"connect_failures {t['connect_failures']}")
            assert a.conns == 6 and t["connect_failures"] == 0, t
            assert ups[up(a)]["backup"] is True and ups[dead]["backup"] is False
        finally:
            await a.stop()
            await d.stop()

    run(main(), timeout=90)


def test_status_lists_each_route_with_its_upstreams_and_counts(start: Start, core_name: str, pki: Path) -> None:
    """On both cores, 2 workers: ``status --json`` (and the admin's status)
    lists every route in match order -- exact names, ``*.suffix``, the
    default group -- each with its upstreams' state (a dead backup ``down``
    by its health checks) and the connections it took, summed over the
    workers; a service without a default says so and counts what it
    refused.  The human table prints a line per route, ``status SERVICE``
    only that service's.  A reload that adds a route keeps the counts, and
    so does an upgrade of the program."""
    port, strict = free_port(), free_port()
    dead = f"{HOST}:{free_port()}"    # nothing listens there: refused

    async def main() -> None:
        bk = {t: await TlsBackend(pki, t).start() for t in ("a", "w", "d")}
        A, W, D = up(bk["a"]), up(bk["w"]), up(bk["d"])
        prog: Program | None = None
        try:
            def cfg(more: bool) -> str:
                routes: dict[str, Any] = {"a.ex.test": [A], "*.ex.test": [W, {"address": dead, "backup": True}]}
                if more:
                    routes["other.test"] = [D]
                return config({
                    "tls": {"kind": "proxy", "listen": f"{HOST}:{port}", "upstreams": [D], "max_fails": 0,
                            "health_check": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1},
                            "sni_routes": routes},
                    "strict": {"kind": "proxy", "listen": f"{HOST}:{strict}", "upstreams": [],
                               "sni_routes": {"a.ex.test": [A]}},
                }, workers=2)

            prog = start(cfg(False))
            await prog.wait_ready()
            ctx = client_ctx(pki)
            for name, n in (("a.ex.test", 3), ("x.ex.test", 2), ("y.c.ex.test", 1), ("other.test", 1)):
                for i in range(n):
                    await tls_ask(port, ctx, name, b"%d" % i)
            await tls_ask(port, ctx, None, b"nameless")
            await tls_ask(strict, ctx, "a.ex.test", b"strict")
            for _ in range(2):
                assert await closed_at_once(strict, client_hello("zzz.test")) == b""
            assert await closed_at_once(strict, b"GET / HTTP/1.0\r\n\r\n") == b""

            def u(state: str, conns: int, backup: bool = False) -> dict[str, Any]:
                return {"state": state, "active": 0, "connections": conns, "weight": 1, "backup": backup}

            want_tls = [
                {"name": "a.ex.test", "match": "exact", "upstreams": {A: u("up", 3)}, "connections": 3},
                {"name": "*.ex.test", "match": "suffix", "upstreams": {W: u("up", 3), dead: u("down", 0, True)},
                 "connections": 3},
                {"name": None, "match": "default", "upstreams": {D: u("up", 2)}, "connections": 2},
            ]
            want_strict = [
                {"name": "a.ex.test", "match": "exact", "upstreams": {A: u("up", 1)}, "connections": 1},
                {"name": None, "match": "default", "upstreams": {}, "connections": 0},
            ]

            async def routes_are(tls: list[dict[str, Any]], status: dict[str, Any] | None = None) -> bool:
                s = by_name(status or await prog.status())
                return s["tls"].get("sni_routes") == tls and s["strict"].get("sni_routes") == want_strict

            with contextlib.suppress(AssertionError):
                await eventually(lambda: routes_are(want_tls), timeout=30)
            got = by_name(await prog.status())
            assert got["tls"].get("sni_routes") == want_tls, got["tls"].get("sni_routes")
            assert got["strict"].get("sni_routes") == want_strict, got["strict"].get("sni_routes")
            assert (got["strict"]["totals"]["sni_no_route"], got["strict"]["totals"]["sni_errors"]) == (2, 1)
            assert prog.config is not None
            code, out, err = await prog.cli("status", "-c", str(prog.config), "--json")
            assert code == 0, err
            assert await routes_are(want_tls, json.loads(out)), out
            code, out, err = await prog.cli("status", "-c", str(prog.config))
            assert code == 0, err
            print(f"status, {core_name} core:\n" + out)
            for line in (f"  tls sni a.ex.test -> {A} up; connections=3",
                         f"  tls sni *.ex.test -> {W} up, {dead} down (backup); connections=3",
                         f"  tls sni default -> {D} up; connections=2",
                         "  tls sni refused: sni_no_route=0 sni_errors=0",
                         f"  strict sni a.ex.test -> {A} up; connections=1",
                         "  strict sni default -> none: closed",
                         "  strict sni refused: sni_no_route=2 sni_errors=1"):
                assert line in out.splitlines(), (line, out)
            code, out, err = await prog.cli("status", "-c", str(prog.config), "tls")
            assert code == 0 and f"  tls sni a.ex.test -> {A} up; connections=3" in out.splitlines(), out + err
            assert " strict " not in out and "strict sni" not in out, out
            # a reload adds a route for other.test: the counts carry over, the new route counts its own
            prog.config.write_text(cfg(True))
            reply = await prog.admin("reload")
            assert reply["report"]["ok"], reply
            await tls_ask(port, ctx, "other.test", b"routed")
            want_tls.insert(1, {"name": "other.test", "match": "exact", "upstreams": {D: u("up", 3)},
                                "connections": 1})
            want_tls[-1]["upstreams"] = {D: u("up", 3)}   # one upstream, whichever group it is in
            with contextlib.suppress(AssertionError):
                await eventually(lambda: routes_are(want_tls), timeout=30)
            got = by_name(await prog.status())
            assert got["tls"].get("sni_routes") == want_tls, got["tls"].get("sni_routes")
            # an upgrade of the program: the counts continue in the new master's workers
            await upgrade(prog, "cli")
            status = await prog.follow()
            assert await routes_are(want_tls, status), by_name(status)["tls"].get("sni_routes")
            print(f"routes after a reload and an upgrade: "
                  f"{[(r['name'], r['connections']) for r in by_name(status)['tls']['sni_routes']]}")
            # a route removed and added again starts at 0
            for more in (False, True):
                prog.config.write_text(cfg(more))
                reply = await prog.admin("reload")
                assert reply["report"]["ok"], reply
            want_tls[1]["connections"] = 0
            assert await routes_are(want_tls), by_name(await prog.status())["tls"].get("sni_routes")
        finally:
            # the health checks connect to the backends all the time: end them first, and
            # let the backends read the checks' last closes (a connection left half-accepted
            # when the loop closes is a leak)
            if prog is not None:
                prog.kill()
                await asyncio.sleep(0.2)
            for b in bk.values():
                await b.stop()

    run(main(), timeout=150)


# -- reload -------------------------------------------------------------------------------------------------


def test_reload_moves_a_name_under_tls_traffic_with_no_error(start: Start, pki: Path) -> None:
    """TLS clients ask for r.ex.test without pause while reloads move it
    between two backends (both hold a certificate for it), and add and
    remove a wildcard: every session completes and is verified, both
    backends serve it, no connection is closed for its hello."""
    port = free_port()

    async def main() -> None:
        a = await TlsBackend(pki, "a").start()
        r = await TlsBackend(pki, "r").start()
        w = await TlsBackend(pki, "w").start()
        try:
            def cfg(i: int) -> str:
                routes: dict[str, Any] = {"r.ex.test": [up((a, r)[i % 2])]}
                if i % 3 == 1:
                    routes["*.ex.test"] = [up(w)]
                return config({"tls": {"kind": "proxy", "listen": f"{HOST}:{port}", "upstreams": [up(w)],
                                       "sni_routes": routes}}, workers=2)

            prog = start(cfg(0))
            await prog.wait_ready()
            ctx = client_ctx(pki)
            stop = asyncio.Event()
            ok = [0]
            errors: list[str] = []

            async def client(k: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    payload = f"c{k}-{i}".encode()
                    try:
                        got = await tls_ask(port, ctx, "r.ex.test", payload)
                        if got not in (b"a r.ex.test " + payload + b"\n", b"r r.ex.test " + payload + b"\n"):
                            errors.append(f"bad answer {got!r}")
                        else:
                            ok[0] += 1
                    except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                        errors.append(repr(exc))

            tasks = [asyncio.create_task(client(k)) for k in range(4)]
            reloads = 8
            for i in range(1, reloads + 1):
                seen = ok[0]
                await eventually(lambda: ok[0] >= seen + 10, timeout=30)
                assert prog.config is not None
                prog.config.write_text(cfg(i))
                reply = await prog.admin("reload")
                assert reply["report"]["ok"], reply
            seen = ok[0]
            await eventually(lambda: ok[0] >= seen + 10, timeout=30)
            stop.set()
            await asyncio.gather(*tasks)
            status = await prog.status()
            t = totals(status, "tls")
            print(f"reloads {reloads} under TLS traffic: {ok[0]} sessions verified, {len(errors)} errors, "
                  f"a={a.conns} r={r.conns}")
            assert errors == [], errors[:5]
            assert a.conns > 0 and r.conns > 0 and w.conns == 0
            assert t["sni_errors"] == 0 and t["sni_no_route"] == 0 and status["restarts"] == 0
        finally:
            for b in (a, r, w):
                await b.stop()

    run(main(), timeout=120)


# -- fuzz ---------------------------------------------------------------------------------------------------


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for op, where, byte in ops:
        if not out:
            break
        i = where % len(out)
        if op == 0:
            out[i] = byte
        elif op == 1:
            del out[i:i + 1 + byte % 8]
        else:
            out[i:i] = bytes((byte,)) * (1 + byte % 4)
    return bytes(out)


_HELLOS = [client_hello(h) for h in ("a.ex.test", "x.ex.test", None)]


def test_fuzzed_hellos_over_a_real_socket_never_hurt_the_worker(start: Start, core_name: str, pki: Path) -> None:
    """On both cores, hypothesis draws garbage, cut and mutated real
    ClientHellos (and records split or declared oversized); each is sent over
    a real socket to a worker, then our EOF: every connection ends, the
    worker is the same process, ``sni_errors`` moves, and a real client is
    served after each batch."""
    port = free_port()
    sent = [0]

    async def serve() -> tuple[Program, TlsBackend, TlsBackend]:
        a = await TlsBackend(pki, "a").start()
        d = await TlsBackend(pki, "d").start()
        prog = start(config({"tls": {"kind": "proxy", "listen": f"{HOST}:{port}", "upstreams": [up(d)],
                                     "sni_routes": {"a.ex.test": [up(a)]}, "sni_timeout": 0.3}}))
        await prog.wait_ready()
        return prog, a, d

    loop = asyncio.new_event_loop()
    try:
        prog, a, d = loop.run_until_complete(serve())
        pids = sorted(prog.worker_pids)
        ctx = client_ctx(pki)

        inputs = st.one_of(
            st.binary(min_size=1, max_size=300),
            st.builds(_mutate, st.sampled_from(_HELLOS),
                      st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)),
                               min_size=1, max_size=4)),
            st.builds(lambda h, n: h[:n], st.sampled_from(_HELLOS), st.integers(1, 600)),
            st.builds(lambda t, n, body: struct.pack("!BHH", t, 0x0301, n) + body,
                      st.sampled_from([22, 21, 23]), st.integers(0, 0xFFFF), st.binary(max_size=64)),
        )

        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(st.lists(inputs, min_size=1, max_size=6))
        def check(batch: list[bytes]) -> None:
            async def one_batch() -> None:
                await asyncio.wait_for(asyncio.gather(*(closed_at_once(port, b, then_eof=True, timeout=10)
                                                        for b in batch)), 30)
                sent[0] += len(batch)
                assert await tls_ask(port, ctx, "a.ex.test", b"alive") == b"a a.ex.test alive\n"

            loop.run_until_complete(one_batch())

        check()
        status = loop.run_until_complete(prog.status())
        t = totals(status, "tls")
        print(f"fuzzed hellos over sockets: {sent[0]} connections, sni_errors {t['sni_errors']}, "
              f"restarts {status['restarts']}")
        assert status["restarts"] == 0 and sorted(prog.worker_pids) == pids
        assert t["sni_errors"] > sent[0] // 2
        assert "Traceback" not in prog.log()
        loop.run_until_complete(a.stop())
        loop.run_until_complete(d.stop())
    finally:
        loop.close()


# -- config checks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    ('sni_routes = { "a..ex.test" = ["127.0.0.1:9"] }', 'services.p.sni_routes."a..ex.test": expected a server name'),
    ('sni_routes = { "*" = ["127.0.0.1:9"] }', 'services.p.sni_routes."*": expected a server name'),
    ('sni_routes = { "a.*.ex.test" = ["127.0.0.1:9"] }', 'services.p.sni_routes."a.*.ex.test": expected a server'),
    ('sni_routes = { "a.ex.test" = ["127.0.0.1:0"] }', 'services.p.sni_routes."a.ex.test"[0]: expected a port'),
    ('sni_routes = { "a.ex.test" = ["nope"] }', 'services.p.sni_routes."a.ex.test"[0]: bad upstream address'),
    ('sni_routes = { "a.ex.test" = [] }', 'services.p.sni_routes."a.ex.test": expected a non-empty list'),
    ('sni_routes = { "a.ex.test" = ["127.0.0.1:9"], "A.ex.test" = ["127.0.0.1:9"] }',
     'services.p.sni_routes."A.ex.test": the same name as "a.ex.test"'),
    ('sni_routes = { "a.ex.test" = ["127.0.0.1:9", "127.0.0.1:9"] }',
     'services.p: invalid proxy service: sni_routes."a.ex.test"[1]: \'127.0.0.1:9\' is listed twice'),
    ("sni_routes = {}", "services.p.sni_routes: expected at least one route"),
    ('sni_routes = ["a.ex.test"]', "services.p.sni_routes: expected a table"),
    ('sni_routes = { "a.ex.test" = ["127.0.0.1:9"] }\nsni_timeout = 0', "services.p.sni_timeout: expected a number > 0"),
])
def test_check_rejects_bad_routes_in_one_line(tmp_path: Path, extra: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[services.p]\nkind = "proxy"\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'upstreams = ["127.0.0.1:8"]\n{extra}\n')
    line = check_error_line(cfg)
    assert message in line, line


def test_check_empty_default_only_with_routes(tmp_path: Path) -> None:
    """``upstreams = []`` is "no default" beside sni_routes, and an error without them."""
    cfg = tmp_path / "c.toml"
    base = f'[services.p]\nkind = "proxy"\nlisten = "127.0.0.1:{free_port()}"\nupstreams = []\n'
    cfg.write_text(base)
    proc = subprocess.run([sys.executable, "-m", "hotproxy.cli", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "services.p.upstreams: expected a non-empty list" in proc.stderr, proc.stderr
    cfg.write_text(base + 'sni_routes = { "*.ex.test" = ["127.0.0.1:9"] }\n')
    proc = subprocess.run([sys.executable, "-m", "hotproxy.cli", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_check_rejects_a_route_that_leads_back_to_its_own_listener(tmp_path: Path) -> None:
    """A route's upstreams are checked for loops like ``upstreams``: one line naming the route."""
    port = free_port()
    cfg = tmp_path / "loop.toml"
    cfg.write_text(f'[services.p]\nkind = "proxy"\nlisten = "127.0.0.1:{port}"\nupstreams = ["127.0.0.1:8"]\n'
                   f'sni_routes = {{ "a.ex.test" = ["127.0.0.1:9", "127.0.0.1:{port}"] }}\n')
    proc = subprocess.run([sys.executable, "-m", "hotproxy.cli", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert 'services.p.sni_routes."a.ex.test"[1]: ' in lines[0] and "leads back to this proxy" in lines[0], lines[0]
