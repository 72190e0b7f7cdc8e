"""Active health checks (issue 17 item 2), over the real program: a master,
2 worker processes, upstream backends that are real listening sockets in
this test process.

Each backend tells a health check from traffic: a check either sends
``PING\\r\\n`` (the ``send``/``expect`` tests) or nothing and goes away
(connect-only checks); traffic sends bytes and gets them back prefixed with
the backend's name.  So a test counts, per backend, the checks it received
and the client connections any worker sent it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import eventually, free_port, run
from helpers_program import Program, Traffic, started_programs

Start = Callable[..., Program]
HOST = "127.0.0.1"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hph-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start(short_dir: Path) -> Iterator[Start]:
    with started_programs(short_dir, log_tail=8000) as start:
        yield start


class Backend:
    """An upstream: counts health checks and client connections; ``good`` says
    whether it answers ``PING`` right."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.good = True
        self.checks = 0
        self.check_times: list[float] = []
        self.traffic = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, HOST, self.port)
        _live.append(self)
        return self

    async def stop(self) -> None:
        """Gone: the port refuses connections."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await asyncio.wait_for(reader.read(64), 10)
            if data.startswith(b"PING\r\n") or not data:
                # a health check: with send = "PING\r\n", or a connect-only one (no bytes, then gone)
                self.checks += 1
                self.check_times.append(time.monotonic())
                if data:
                    writer.write(b"PONG\r\n" if self.good else b"WHAT\r\n")
                    await writer.drain()
            else:
                self.traffic += 1
                writer.write(self.name.encode() + b":" + data)
                await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()


#: backends listening now (``closing`` stops them)
_live: list[Backend] = []


async def closing(main: Any) -> None:
    """Run *main*, then stop every backend it left listening."""
    try:
        await main
    finally:
        for b in _live:
            await b.stop()
        _live.clear()


async def ask(port: int, payload: bytes = b"hi") -> bytes:
    """One client connection through the proxy: the reply (``NAME:hi``)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(100), 10)
    finally:
        writer.close()


def hc_text(hc: dict[str, Any]) -> str:
    """An inline TOML table (strings with JSON's escapes, which TOML's basic strings share)."""
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in hc.items()) + " }"


def config(px: int, upstreams: list[str], hc: dict[str, Any] | None, *, workers: int = 2,
           extra: str = "", **opts: Any) -> str:
    lines = ["[runtime]", f"workers = {workers}", "drain_timeout = 2.0", 'admin_socket = "admin.sock"',
             'log_level = "info"', extra,
             "[services.px]", 'kind = "proxy"', f'listen = "{HOST}:{px}"', f"upstreams = {json.dumps(upstreams)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
    if hc is not None:
        lines.append(f"health_check = {hc_text(hc)}")
    return "\n".join(lines) + "\n"


def health_of(status: dict[str, Any], addr: str, service: str = "px") -> dict[str, Any] | None:
    for s in status["services"]:
        if s["name"] == service:
            return (s.get("upstreams") or {}).get(addr, {}).get("health")  # type: ignore[no-any-return]
    return None


def totals(status: dict[str, Any], service: str = "px") -> dict[str, Any]:
    return next(s["totals"] for s in status["services"] if s["name"] == service)


async def state_is(prog: Program, addr: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
    async def check() -> Any:
        h = health_of(await prog.follow(), addr)
        return h if h is not None and h["state"] == state else None

    return await eventually(check, timeout=timeout, interval=0.05)  # type: ignore[no-any-return]


async def spread(px: int, n: int) -> dict[str, int]:
    """*n* connections through the proxy, 5 at a time: how many each backend answered."""
    seen: dict[str, int] = {}
    for i in range(0, n, 5):
        replies = await asyncio.gather(*(ask(px) for _ in range(min(5, n - i))))
        for r in replies:
            assert r.endswith(b":hi"), r
            name = r.split(b":")[0].decode()
            seen[name] = seen.get(name, 0) + 1
    return seen


def test_connect_check_takes_a_dead_upstream_out_of_every_worker_and_brings_it_back(
        start: Start, core_name: str) -> None:
    """Kill a backend: down after ``fall`` checks (status, CLI, metrics, log), and no worker
    tries it (the connect failures stay put over 40 connections); restart it: up after ``rise``."""
    px, metrics = free_port(), free_port()

    async def main() -> None:
        a, b = await Backend("A").start(), await Backend("B").start()
        hc = {"interval": 0.2, "timeout": 1.0, "rise": 2, "fall": 2}
        # max_fails = 0: no passive ejection, only the active checks decide
        prog = start(config(px, [a.address, b.address], hc, max_fails=0,
                            extra=f'metrics = "{HOST}:{metrics}"'))
        await prog.wait_ready()
        await state_is(prog, a.address, "up")
        assert set(await spread(px, 20)) == {"A", "B"}
        await a.stop()
        down = await state_is(prog, a.address, "down")
        assert down["failures"] >= 2 and "refused" in (down["last_result"] or ""), down
        status = await prog.follow()
        failures = totals(status)["connect_failures"]
        seen = await spread(px, 40)
        assert seen == {"B": 40}, seen
        status = await prog.follow()
        assert totals(status)["connect_failures"] == failures, (failures, totals(status))  # nobody tried A
        code, out, err = await prog.cli("status", "-c", str(prog.config))
        assert code == 0 and f"px -> {a.address}: down since " in out and "failed in a row" in out, out
        code, out, err = await prog.cli("status", "-c", str(prog.config), "--json")
        assert json.loads(out)["services"][0]["upstreams"][a.address]["health"]["state"] == "down"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{HOST}:{metrics}/metrics",
                                                                      timeout=10).read().decode())
        assert f'hotproxy_upstream_up{{service="px",upstream="{a.address}"}} 0' in text, text
        assert f'hotproxy_upstream_up{{service="px",upstream="{b.address}"}} 1' in text
        assert f'hotproxy_health_checks_total{{result="failed",service="px",upstream="{a.address}"}}' in text, text
        await Backend("A", a.port).start()
        up = await state_is(prog, a.address, "up")
        assert up["successes"] >= 2, up
        assert "A" in await spread(px, 20)
        log = prog.log()
        assert f"service px: upstream {a.address} is down after 2 failed health checks" in log, log
        assert f"service px: upstream {a.address} is up after 2 passing health checks" in log, log
        print(f"down: {down}\nup: {up}")

    run(closing(main()), 90)


def test_send_expect_check_fails_on_a_backend_that_answers_wrong(start: Start) -> None:
    """``send``/``expect``: a backend that accepts but answers wrong is down, and gets no client
    connection from any worker (nor from one restarted after ``kill -9``); answering right again
    brings it up after ``rise``."""
    px = free_port()

    async def main() -> None:
        a, b = await Backend("A").start(), await Backend("B").start()
        a.good = False
        hc = {"interval": 0.2, "timeout": 1.0, "rise": 2, "fall": 2, "send": "PING\r\n", "expect": "PONG"}
        prog = start(config(px, [a.address, b.address], hc))
        await prog.wait_ready()
        down = await state_is(prog, a.address, "down")
        assert "unexpected reply b'W" in (down["last_result"] or ""), down
        assert (await state_is(prog, b.address, "up"))["last_result"] == "ok"
        before = a.traffic
        assert await spread(px, 40) == {"B": 40}
        assert a.traffic == before == 0, a.traffic
        # a worker killed and restarted maps the same shared state: it does not send A anything either
        status = await prog.follow()
        victim = status["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)

        async def restarted() -> bool:
            s = await prog.follow()
            return s["restarts"] >= 1 and all(w["alive"] and w["pid"] != victim for w in s["workers"])

        await eventually(restarted, timeout=30)
        assert await spread(px, 40) == {"B": 40}
        assert a.traffic == 0, a.traffic
        a.good = True
        await state_is(prog, a.address, "up")
        assert "A" in await spread(px, 20)

    run(closing(main()), 90)


def test_passive_ejection_marks_the_shared_state_down_until_checks_pass(start: Start, core_name: str) -> None:
    """``max_fails`` in one worker takes the upstream out of every worker (the shared state),
    although its active checks would need 1000 failures; ``rise`` checks bring it back."""
    px = free_port()

    async def main() -> None:
        a, b = Backend("A"), await Backend("B").start()   # A is not listening
        hc = {"interval": 0.2, "timeout": 1.0, "rise": 2, "fall": 1000}
        prog = start(config(px, [a.address, b.address], hc, max_fails=1))
        await prog.wait_ready()
        assert (await prog.follow())["services"][0]["upstreams"][a.address]["health"]["state"] == "up"
        await spread(px, 4)   # some worker tries A: it fails once, and marks it down for all
        down = await state_is(prog, a.address, "down")
        failures = totals(await prog.follow())["connect_failures"]
        assert await spread(px, 40) == {"B": 40}
        assert totals(await prog.follow())["connect_failures"] == failures
        await a.start()
        up = await state_is(prog, a.address, "up")
        assert "A" in await spread(px, 20)
        log = prog.log()
        assert f"service px: upstream {a.address} marked down for every worker after 1 connect failures" in log
        assert f"service px: upstream {a.address} is down (ejected by a worker's passive check)" in log
        print(f"down: {down}\nup: {up}")

    run(closing(main()), 90)


def test_state_is_kept_across_reloads_and_upgrades(start: Start) -> None:
    """Down stays down (same change time) through a reload that changes interval/rise and through
    ``hotproxy upgrade``; a reload that removes health_check returns to passive checks only."""
    px = free_port()

    async def main() -> None:
        a, b = await Backend("A").start(), await Backend("B").start()
        a.good = False
        hc = {"interval": 0.2, "timeout": 1.0, "rise": 2, "fall": 2, "send": "PING\r\n", "expect": "PONG"}
        prog = start(config(px, [a.address, b.address], hc))
        assert prog.config is not None
        await prog.wait_ready()
        down = await state_is(prog, a.address, "down")
        # a reload that retunes the checks: the state is kept, not reset to up
        prog.config.write_text(config(px, [a.address, b.address], dict(hc, interval=0.3, rise=3)))
        code, out, err = await prog.cli("reload", "-c", str(prog.config))
        assert code == 0, (out, err)
        after = health_of(await prog.follow(), a.address)
        assert after is not None and after["state"] == "down" and after["changed_at"] == down["changed_at"], \
            (down, after)
        assert after["rise"] == 3 and after["interval"] == 0.3, after
        assert await spread(px, 20) == {"B": 20} and a.traffic == 0
        # an upgrade: the new master goes on from the same state
        old_pid = (await prog.follow())["pid"]
        code, out, err = await prog.cli("upgrade", "-c", str(prog.config), timeout=120)
        assert code == 0 and out.startswith(f"upgrade ok: pid {old_pid} -> pid "), (code, out, err)
        status = await prog.follow()
        assert status["pid"] != old_pid
        upgraded = health_of(status, a.address)
        assert upgraded is not None and upgraded["state"] == "down", upgraded
        assert upgraded["changed_at"] == down["changed_at"], (down, upgraded)
        assert upgraded["checks_failed"] >= after["checks_failed"], (after, upgraded)
        assert await spread(px, 20) == {"B": 20} and a.traffic == 0

        async def checked_by_the_new_master() -> bool:
            h = health_of(await prog.follow(), a.address)
            return h is not None and h["checks_failed"] > upgraded["checks_failed"]

        await eventually(checked_by_the_new_master, timeout=20)
        # no health_check: passive only, A (which serves traffic) gets connections again
        prog.config.write_text(config(px, [a.address, b.address], None))
        code, out, err = await prog.cli("reload", "-c", str(prog.config))
        assert code == 0, (out, err)
        assert health_of(await prog.follow(), a.address) is None
        assert "A" in await spread(px, 20)
        print(f"down: {down}\nafter reload: {after}\nafter upgrade: {upgraded}")

    run(closing(main()), 150)


def test_a_new_upstream_starts_up_and_is_checked_at_once(start: Start) -> None:
    """The documented rule: an upstream a reload adds is up, takes traffic at once, and is
    checked at once (not an interval later: here the interval is a minute)."""
    px = free_port()

    async def main() -> None:
        a, c = await Backend("A").start(), await Backend("C").start()
        d = Backend("D")   # not listening
        hc = {"interval": 60.0, "timeout": 1.0, "rise": 2, "fall": 1}
        prog = start(config(px, [a.address], hc))
        assert prog.config is not None
        await prog.wait_ready()
        await eventually(lambda: a.checks >= 1, timeout=20)
        prog.config.write_text(config(px, [a.address, c.address, d.address], hc))
        code, out, err = await prog.cli("reload", "-c", str(prog.config))
        assert code == 0, (out, err)
        new = health_of(await prog.follow(), c.address)
        assert new is not None and new["state"] == "up", new
        await eventually(lambda: c.checks >= 1, timeout=20)   # the first check right away
        await state_is(prog, d.address, "down")               # fall = 1: the first check took it down
        assert a.checks == 1, a.checks                        # the others keep their interval
        assert "C" in await spread(px, 20)

    run(closing(main()), 90)


def test_checks_run_once_per_instance_not_per_worker(start: Start) -> None:
    """With 2 workers the backend receives the checks of one checker: spaced by the interval
    (2 checkers would make pairs), and as many as the master counted."""
    px = free_port()

    async def main() -> None:
        a = await Backend("A").start()
        interval = 0.3
        prog = start(config(px, [a.address], {"interval": interval, "timeout": 1.0}, workers=2))
        await prog.wait_ready()
        await eventually(lambda: a.checks >= 8, timeout=30)
        h = health_of(await prog.follow(), a.address)
        assert h is not None
        gaps = [round(t2 - t1, 3) for t1, t2 in zip(a.check_times, a.check_times[1:])]
        print(f"{a.checks} checks seen, {h['checks_ok']} counted by the master, gaps {gaps}")
        assert min(gaps) > interval / 2, gaps
        assert a.checks <= h["checks_ok"] + 1 and h["checks_failed"] == 0, (a.checks, h)

    run(closing(main()), 60)


def test_reload_changing_health_check_under_verified_traffic(start: Start, traffic: Callable[..., Traffic]) -> None:
    """Turn checks on, retune them, add send/expect, turn them off: byte-checked traffic sees 0 errors."""
    e1, e2, px = free_port(), free_port(), free_port()
    echoes = f'''
[services.e1]
kind = "echo"
listen = "{HOST}:{e1}"
[services.e2]
kind = "echo"
listen = "{HOST}:{e2}"
'''
    ups = [f"{HOST}:{e1}", f"{HOST}:{e2}"]

    def text(hc: dict[str, Any] | None) -> str:
        return config(px, ups, hc) + echoes

    async def main() -> None:
        prog = start(text(None))
        assert prog.config is not None
        await prog.wait_ready()
        load = traffic([f"{HOST}:{px}"], long=2, short=2, seed=17)
        steps = [{"interval": 0.1, "timeout": 0.5}, {"interval": 0.2, "rise": 3, "fall": 5},
                 {"interval": 0.1, "send": "PING", "expect": "PING"}, None, {"interval": 0.1}]
        for hc in steps * 2:
            prog.config.write_text(text(hc))
            code, out, err = await prog.cli("reload", "-c", str(prog.config))
            assert code == 0, (out, err)
            await asyncio.sleep(0.3)   # (traffic runs meanwhile; nothing is timed)
            if hc is not None:
                for addr in ups:
                    assert health_of(await prog.follow(), addr) is not None
        tot = await load.finish()
        print(tot)
        assert tot["long_failed"] == 0 and tot["short_failed"] == 0 and tot["long_ok"] == 2 and tot["short_ok"] > 0
        assert "Traceback" not in prog.log()

    run(closing(main()), 120)


def test_health_table_slots_allocation_reuse_and_adoption() -> None:
    """The table itself: a new slot is up; a freed one is reused zeroed; a table adopted from
    its memfd (an upgrade) finds each slot by its key, with its state, and frees the unclaimed."""
    from hotproxy.health import HealthTable

    t = HealthTable.create(slots=4)
    try:
        s1, s2 = t.slot_for("px", "127.0.0.1:1"), t.slot_for("px", "127.0.0.1:2")
        assert (s1, s2) == (0, 1) and t.slot_for("px", "127.0.0.1:1") == s1
        assert t.is_up(s1) and t.read(s1)["state"] == "up"
        assert t.mark_down(s1) and not t.mark_down(s1) and not t.is_up(s1)
        t.free("px", "127.0.0.1:2")
        assert t.slot_for("other", "127.0.0.1:9") == s2 and t.is_up(s2)   # reused, fresh
        assert [t.slot_for("px", f"127.0.0.1:{p}") for p in (3, 4, 5)] == [2, 3, -1]   # full
        adopted = HealthTable.adopt(os.dup(t.fd))
        try:
            assert adopted.slot_for("px", "127.0.0.1:1") == s1 and not adopted.is_up(s1)   # still down
            adopted.forget_unclaimed()   # the others: freed, and reusable
            assert adopted.read(s2)["state"] == "up" and adopted.slot_for("new", "127.0.0.1:7") in (s2, 2, 3)
        finally:
            adopted.close()
    finally:
        t.close()


BAD = [
    ("interval = 0", "services.px.health_check.interval: expected a number >= 0.01, got 0"),
    ("timeout = 0", "services.px.health_check.timeout: expected a number > 0, got 0"),
    ("rise = 0", "services.px.health_check.rise: expected an integer >= 1, got 0"),
    ('fall = "3"', "services.px.health_check.fall: expected an integer >= 1, got '3'"),
    ("send = 1", "services.px.health_check.send: expected a string, got 1"),
    ("expct = \"x\"", "services.px.health_check.expct: unknown key (expected one of: interval, timeout, rise, "
                      "fall, send, expect)"),
]


def test_bad_health_check_values_are_rejected_by_check_in_one_line(short_dir: Path) -> None:
    import subprocess
    import sys

    cases = [(f"{{ {v} }}", want) for v, want in BAD]
    cases += [("3", "services.px.health_check: expected an inline table { key = value, ... }, got 3"),
              ("[1]", "services.px.health_check: expected an inline table { key = value, ... }, got an array")]
    for value, want in cases:
        cfg = short_dir / "bad.toml"
        cfg.write_text(config(free_port(), ["127.0.0.1:1"], None) + f"health_check = {value}\n")
        proc = subprocess.run([sys.executable, "-m", "hotproxy.cli", "check", "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60, env=dict(os.environ))
        assert proc.returncode == 1 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1, (value, proc)
        assert want in proc.stderr and "Traceback" not in proc.stderr, (value, proc.stderr)
