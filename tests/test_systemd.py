"""systemd's notify protocol, read from a real ``NOTIFY_SOCKET`` datagram socket.

systemd is not PID 1 here, so the test plays its part: it binds the socket
systemd would, starts the real ``hotproxy run`` with ``NOTIFY_SOCKET`` (and
``WATCHDOG_USEC``) set, and reads the exact messages for start, reload,
failed reload and stop.  The unit file in contrib/ is checked with
``systemd-analyze verify`` where that tool exists.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, run
from helpers_program import Program, toml

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
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "hotproxy.service")],
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "hotproxy.service" in line and "Documentation" not in line]
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
