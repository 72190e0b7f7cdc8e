"""systemd's notify protocol, read from a real ``NOTIFY_SOCKET`` datagram socket.

systemd is not PID 1 here, so the test plays its part: it binds the socket
systemd would, starts the real ``hotproxy run`` with ``NOTIFY_SOCKET`` (and
``WATCHDOG_USEC``) set, and reads the exact messages for start, reload,
failed reload and stop.  The unit file in contrib/ is checked with
``systemd-analyze verify`` where that tool exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import eventually, free_port, run
from helpers_program import Program, toml
from helpers_program import alive as helpers_alive

ROOT = Path(__file__).resolve().parent.parent


class FakeSystemd:
    """The receiving end of ``NOTIFY_SOCKET``: every datagram as a dict, in order."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self.watchdogs = 0

    async def next(self, timeout: float = 30.0) -> dict[str, str]:
        """The next message that is not a bare ``WATCHDOG=1`` ping."""
        loop = asyncio.get_running_loop()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout)
            msg = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            if msg == {"WATCHDOG": "1"}:
                self.watchdogs += 1
                continue
            self.messages.append(msg)
            return msg

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_messages_for_start_reload_failed_reload_and_stop(tmp_path: Path, abstract: bool) -> None:
    e = free_port()
    cfg = tmp_path / "hotproxy.toml"
    cfg.write_text(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{e}"}}))
    name = f"hotproxy-test-{os.getpid()}-{e}"
    systemd = FakeSystemd("\0" + name if abstract else str(tmp_path / "notify.sock"))
    env = {"NOTIFY_SOCKET": "@" + name if abstract else str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    prog = Program(cfg, tmp_path / "hotproxy.log", env=env)
    try:
        async def main() -> None:
            ready = await systemd.next()
            assert ready["READY"] == "1" and ready["MAINPID"] == str(prog.pid), ready
            assert ready["STATUS"] == "serving 1 services on 2 workers"
            await prog.wait_ready()

            cfg.write_text(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{e}", "greeting": "v2\n"}}))
            prog.signal(signal.SIGHUP)
            reloading = await systemd.next()
            assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0, reloading
            done = await systemd.next()
            assert done["READY"] == "1" and done["STATUS"].startswith("reload ok: added=[] changed=[e]"), done

            sock = prog.socket_path()
            cfg.write_text("[services.e\n")
            prog.signal(signal.SIGHUP)
            assert (await systemd.next())["RELOADING"] == "1"
            failed = await systemd.next()
            assert failed["READY"] == "1" and failed["STATUS"].startswith("reload failed: "), failed

            code, out, err = await prog.cli("stop", "--socket", sock)
            assert code == 0, out + err
            stopping = await systemd.next()
            assert stopping == {"STOPPING": "1", "STATUS": "stopping (graceful)"}, stopping
            assert await prog.wait_exit(30) == 0
            assert systemd.watchdogs >= 1   # pinged every 0.1 s while it ran

        run(main(), 90)
    finally:
        prog.kill()
        systemd.close()
        print(prog.log())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_file_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "contrib" / "systemd" / "hotproxy.service").read_text()
    hotproxy = shutil.which("hotproxy") or str(Path(sys.executable).with_name("hotproxy"))
    assert os.path.exists(hotproxy), hotproxy
    (tmp_path / "hotproxy.service").write_text(unit.replace("/usr/local/bin/hotproxy", hotproxy))
    # the socket-activation unit beside it
    shutil.copy(ROOT / "contrib" / "systemd" / "hotproxy.socket", tmp_path / "hotproxy.socket")
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "hotproxy.service"),
                           str(tmp_path / "hotproxy.socket")], capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "hotproxy." in line and "Documentation" not in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def test_notify_messages_for_an_upgrade_mainpid_then_ready_from_the_new_master(tmp_path: Path) -> None:
    """``hotproxy upgrade`` under systemd: the old master says ``RELOADING=1``
    (``STATUS=upgrading``); the new one, once it has taken over, ``MAINPID=``
    its pid with ``READY=1``; then the stop is the new master's."""
    e = free_port()
    cfg = tmp_path / "hotproxy.toml"
    cfg.write_text(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{e}"}}, drain=5.0))
    systemd = FakeSystemd(str(tmp_path / "notify.sock"))
    prog = Program(cfg, tmp_path / "hotproxy.log", env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        async def main() -> None:
            ready = await systemd.next()
            assert ready["READY"] == "1" and ready["MAINPID"] == str(prog.pid), ready
            await prog.wait_ready()
            code, out, err = await prog.cli("upgrade", "-c", str(cfg))
            assert code == 0, out + err
            new_pid = int(out.split(" -> pid ")[1].split()[0])
            prog.track(new_pid)
            upgrading = await systemd.next()
            assert upgrading["RELOADING"] == "1" and upgrading["STATUS"] == "upgrading", upgrading
            assert int(upgrading["MONOTONIC_USEC"]) > 0
            handed = await systemd.next()
            assert handed == {"READY": "1", "MAINPID": str(new_pid),
                              "STATUS": f"upgraded from pid {prog.pid}: serving 1 services on 2 workers"}, handed
            code, out, err = await prog.cli("stop", "-c", str(cfg))
            assert code == 0 and f"(pid {new_pid})" in out, out + err
            assert await systemd.next() == {"STOPPING": "1", "STATUS": "stopping (graceful)"}
            assert await prog.wait_exit(30) == 0
            assert systemd.messages == [ready, upgrading, handed, {"STOPPING": "1", "STATUS": "stopping (graceful)"}]

        run(main(), 90)
    finally:
        prog.kill()
        systemd.close()
        print(prog.log())


# -- socket activation (LISTEN_FDS) ----------------------------------------------------


async def _queued(connect: Any, payload: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connected (queued by the kernel: nobody accepts yet) that has sent *payload*."""
    reader, writer = await asyncio.wait_for(connect(), 10)
    writer.write(payload)
    await writer.drain()
    return reader, writer


async def _answered(client: tuple[asyncio.StreamReader, asyncio.StreamWriter], payload: bytes) -> None:
    reader, writer = client
    try:
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def test_socket_activation_serves_what_queued_before_start_across_reload_and_upgrade(tmp_path: Path) -> None:
    """Started as systemd starts a socket-activated service -- listening sockets
    at descriptors 3.. , ``LISTEN_FDS``/``LISTEN_PID`` (the wrapper
    ``sd_activate`` sets its own pid, then execs hotproxy) -- hotproxy serves
    the services whose address is a passed socket's on that socket: the
    connections queued on it before hotproxy started are answered (TCP echo,
    a proxy on TCP, a Unix echo), the socket stays across a reload that
    removes its service (connections queue, and are served once a reload
    brings it back) and across an upgrade, and its file is not removed at stop."""
    short = Path(tempfile.mkdtemp(prefix="hpa-"))
    e, px = free_port(), free_port()
    path = str(short / "u.sock")
    socks = []
    for family, addr in ((socket.AF_INET, ("127.0.0.1", e)), (socket.AF_INET, ("127.0.0.1", px)),
                         (socket.AF_UNIX, path)):
        # as systemd binds: a plain bind, no SO_REUSEPORT (a hotproxy that binds its own fails)
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind(addr)
        s.listen(64)
        socks.append(s)
    all_services = {"e": {"kind": "echo", "listen": f"127.0.0.1:{e}"},
                    "px": {"kind": "proxy", "listen": f"127.0.0.1:{px}", "upstreams": [f"127.0.0.1:{e}"]},
                    "u": {"kind": "echo", "listen": f"unix:{path}"}}
    cfg = short / "hotproxy.toml"
    cfg.write_text(toml(all_services, drain=5.0))
    prog: Program | None = None
    try:
        async def main() -> None:
            nonlocal prog
            tcp = lambda port: lambda: asyncio.open_connection("127.0.0.1", port)   # noqa: E731
            unix = lambda: asyncio.open_unix_connection(path)   # noqa: E731
            early = [(await _queued(tcp(e), b"early-e%d" % i), b"early-e%d" % i) for i in range(5)]
            early += [(await _queued(tcp(px), b"early-px%d" % i), b"early-px%d" % i) for i in range(5)]
            early += [(await _queued(unix, b"early-u%d" % i), b"early-u%d" % i) for i in range(5)]
            prog = Program(cfg, short / "hotproxy.log", module="sd_activate",
                           pass_fds=tuple(s.fileno() for s in socks),
                           env={"SD_ACTIVATE_FDS": ",".join(str(s.fileno()) for s in socks),
                                "SD_ACTIVATE_NAMES": "e:px:u"})
            await asyncio.gather(*(_answered(c, p) for c, p in early))
            await prog.wait_ready()
            log = prog.log()
            assert "socket activation: descriptor 3 (e) listens on 127.0.0.1:%d" % e in log, log
            assert "socket activation: descriptor 5 (u) listens on unix:%s" % path in log, log
            print(f"socket activation: {len(early)} connections queued before start, all answered")

            # a reload that removes e: its socket stays (connections queue); one that brings it back serves them
            cfg.write_text(toml({k: v for k, v in all_services.items() if k != "e"}, drain=5.0))
            code, out, err = await prog.cli("reload", "-c", str(cfg))
            assert code == 0, out + err
            waiting = await _queued(tcp(e), b"while-removed")
            cfg.write_text(toml(all_services, drain=5.0))
            code, out, err = await prog.cli("reload", "-c", str(cfg))
            assert code == 0, out + err
            await _answered(waiting, b"while-removed")

            # an upgrade: the new master serves on the same sockets
            before = (await prog.follow())["pid"]
            code, out, err = await prog.cli("upgrade", "-c", str(cfg), timeout=120)
            assert code == 0 and out.startswith(f"upgrade ok: pid {before} -> pid "), out + err
            status = await prog.follow()
            assert status["pid"] != before
            for i in range(5):
                for connect, p in ((tcp(e), b"after-e%d" % i), (tcp(px), b"after-px%d" % i), (unix, b"after-u%d" % i)):
                    await _answered(await _queued(connect, p), p)
            code, out, err = await prog.cli("stop", "-c", str(cfg))
            assert code == 0, out + err

            async def all_gone() -> bool:
                return not any(helpers_alive(pid) for pid in prog.seen_pids)   # type: ignore[union-attr]

            await eventually(all_gone, timeout=60)
            # the socket file is systemd's: still there, still ours (the test's) to accept on
            assert os.path.exists(path)
            late = await _queued(unix, b"late")
            conn, _ = socks[2].accept()
            assert conn.recv(4) == b"late"
            conn.close()
            late[1].close()

        run(main(), 180)
    finally:
        if prog is not None:
            prog.kill()
            print(prog.log())
        for s in socks:
            s.close()
        shutil.rmtree(short, ignore_errors=True)
