"""Upgrading hotproxy itself (issue 16): a new master takes over from the running one.

Every test runs the real program (``hotproxy run``), upgrades it with
``hotproxy upgrade`` or SIGUSR2 while ``tests/traffic.py`` processes check
every byte of long and short connections -- direct to echo services (TCP
and Unix) and through a proxy -- and checks that no connection was refused,
reset or corrupted, that the connections opened before an upgrade finish on
the old processes, that the master's pid changes each time, and that no
process is left behind.  Failing upgrades (the new code does not import, a
bad file, a new master killed with -9 mid-way or silent past
``upgrade_timeout``) leave the old master serving.  Figures are printed
(``pytest -s``) for the README.

The long run (20 upgrades in a row):

    pytest -m slow tests/test_upgrade.py -s
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import eventually, free_port, run
from helpers_program import Program, Traffic, alive, children, roundtrip, started_programs, toml

HOST = "127.0.0.1"
Start = Callable[..., Program]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (Unix socket paths are at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="hpu-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start(short_dir: Path) -> Iterator[Start]:
    """``start(config_text, **kw)`` in *short_dir*; every process it led to is killed at the end."""
    with started_programs(short_dir, log_tail=6000) as start:
        yield start


def services(e: int, px: int, unix: Path, **proxy: Any) -> dict[str, dict[str, Any]]:
    return {
        "e": {"kind": "echo", "listen": f"{HOST}:{e}"},
        "u": {"kind": "echo", "listen": f"unix:{unix}"},
        "px": {"kind": "proxy", "listen": f"{HOST}:{px}", "upstreams": [f"{HOST}:{e}"], **proxy},
    }


async def upgrade(prog: Program, how: str) -> tuple[dict[str, Any], float]:
    """Upgrade *prog* by *how* (``cli`` | ``sigusr2``); the new master's status, and the seconds it took."""
    assert prog.config is not None
    before = (await prog.follow())["pid"]
    t0 = time.monotonic()
    if how == "cli":
        code, out, err = await prog.cli("upgrade", "-c", str(prog.config), timeout=120)
        assert code == 0 and out.startswith(f"upgrade ok: pid {before} -> pid "), (code, out, err)
        assert "Traceback" not in err
    else:
        os.kill(before, signal.SIGUSR2)

    async def moved() -> Any:
        status = await prog.follow()
        return status if status["pid"] != before and status["ready"] else None

    status = await eventually(moved, timeout=120, interval=0.02)
    took = time.monotonic() - t0
    assert status["upgraded_from"] == before, status
    return status, took


def upgrade_steps(log: str, n: int) -> list[dict[str, float]]:
    """The *n* upgrades' ``upgrade steps (ms since the request): ...`` lines (each old
    master logs one): every step of ``upgrade.PHASES``, in order, none going back in time."""
    from hotproxy.upgrade import PHASES

    out = []
    for line in re.findall(r"upgrade steps \(ms since the request\): (.*)", log):
        steps = {name: float(ms) for name, ms in (part.rsplit(" ", 1) for part in line.split(", "))}
        assert tuple(steps) == PHASES, line
        values = list(steps.values())
        assert values == sorted(values) and values[0] >= 0, line
        out.append(steps)
    assert len(out) == n, (n, out)
    return out


async def upgrades_under_traffic(prog: Program, n: int, e: int, px: int, unix: Path,
                                 traffic: Callable[..., Traffic]) -> dict[str, Any]:
    """*n* upgrades of *prog* under verified traffic; every check of the module's docstring; the figures."""
    first = await prog.wait_ready()
    await prog.follow()
    masters = [first["pid"]]
    direct = traffic([f"{HOST}:{e}", f"unix:{unix}"], long=2, short=2, seed=11)
    through = traffic([f"{HOST}:{px}"], long=2, short=2, seed=12)
    # the long connections are open (on the first master's workers) before the first upgrade
    await eventually(lambda: sum(s["active"] for s in first["services"]) >= 0 and prog.status(), timeout=5)

    async def long_ones_open() -> bool:
        s = await prog.status()
        return sum(svc["active"] for svc in s["services"] if svc["name"] in ("e", "u", "px")) >= 4

    await eventually(long_ones_open, timeout=30)
    took: list[float] = []
    workers_seen: set[int] = set()
    for i in range(n):
        how = "sigusr2" if i % 4 == 3 else "cli"
        status, seconds = await upgrade(prog, how)
        took.append(seconds)
        assert status["pid"] not in masters, (status["pid"], masters)   # a new master each time
        masters.append(status["pid"])
        workers_seen.update(w["pid"] for w in status["workers"])
        assert status["pid"] not in workers_seen
        # what the old masters still drain: the first one holds the long connections
        olds = {m["pid"]: m for m in status["old_masters"]}
        assert masters[0] in olds and (olds[masters[0]].get("connections") or 0) >= 4, status["old_masters"]
        assert await roundtrip(e) == b"hello" and await roundtrip(px) == b"hello"
    status = await prog.follow()
    cli_status = await prog.cli("status", "-c", str(prog.config))
    figures: dict[str, Any] = {
        "upgrades": n, "seconds_per_upgrade": [round(t, 2) for t in took],
        "steps_ms": upgrade_steps(prog.log(), n),
        "old_masters_draining_at_the_end": [(m["pid"], m.get("connections")) for m in status["old_masters"]],
        "status_lines": [line for line in cli_status[1].splitlines() if "old master" in line],
        "direct": await direct.finish(), "through_proxy": await through.finish(),
    }
    assert any(line.startswith(f"old master pid {masters[0]} draining since ") and line.endswith(" left")
               for line in figures["status_lines"]), cli_status
    for key in ("direct", "through_proxy"):
        tot = figures[key]
        assert tot["long_failed"] == 0 and tot["short_failed"] == 0, (key, tot)
        # the long connections lived through every upgrade, on the first master's workers
        assert tot["long_ok"] == 2 and tot["short_ok"] > 0, (key, tot)

    # once they have finished, every old master has drained and exited
    async def drained() -> bool:
        return (await prog.follow())["old_masters"] == []

    await eventually(drained, timeout=60)
    await eventually(lambda: all(not alive(pid) for pid in masters[:-1]), timeout=30)
    assert prog.proc.poll() == 0, prog.proc.poll()   # the first master exited by itself, with 0
    current = (await prog.follow())
    old_workers = workers_seen - {w["pid"] for w in current["workers"]}
    await eventually(lambda: all(not alive(pid) for pid in old_workers), timeout=30)
    figures["masters"] = masters
    return figures


def test_upgrades_under_verified_traffic(start: Start, short_dir: Path,
                                         traffic: Callable[..., Traffic]) -> None:
    """CI version: 5 upgrades (``hotproxy upgrade`` and SIGUSR2), 0 failed connections."""
    e, px, unix = free_port(), free_port(), short_dir / "u.sock"
    prog = start(toml(services(e, px, unix), drain=60.0))

    async def main() -> None:
        figures = await upgrades_under_traffic(prog, 5, e, px, unix, traffic)
        print("upgrade figures:", json.dumps(figures))
        await stop_and_check_nothing_left(prog)

    run(main(), 170)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_20_upgrades_in_a_row_under_verified_traffic(start: Start, short_dir: Path,
                                                     traffic: Callable[..., Traffic]) -> None:
    e, px, unix = free_port(), free_port(), short_dir / "u.sock"
    prog = start(toml(services(e, px, unix), drain=300.0))

    async def main() -> None:
        figures = await upgrades_under_traffic(prog, 20, e, px, unix, traffic)
        print("UPGRADE-20 figures:", json.dumps(figures))
        await stop_and_check_nothing_left(prog)

    run(main(), 850)


async def stop_and_check_nothing_left(prog: Program) -> None:
    """``hotproxy stop``: the master and its workers exit; nothing seen is left running."""
    assert prog.config is not None
    status = await prog.follow()
    code, out, err = await prog.cli("stop", "-c", str(prog.config))
    assert code == 0 and f"stopped hotproxy (pid {status['pid']})" in out, (code, out, err)
    await eventually(lambda: [pid for pid in prog.seen_pids if alive(pid)] == [], timeout=30)
    assert not os.path.exists(prog.socket_path())
    assert "Traceback" not in prog.log()


# -- failing upgrades: the old master serves on ----------------------------------------------------


async def failed_upgrade(prog: Program, expect: str) -> str:
    """``hotproxy upgrade`` that must fail: exit 1, one line naming *expect*; the line."""
    assert prog.config is not None
    before = (await prog.follow())["pid"]
    code, out, err = await prog.cli("upgrade", "-c", str(prog.config), timeout=120)
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1, (code, out, err)
    assert lines[0].startswith("upgrade failed: ") and expect in lines[0], lines[0]
    assert lines[0].endswith(")") and f"; pid {before} keeps serving (" in lines[0], lines[0]
    status = await prog.follow()
    assert status["pid"] == before and status["ready"] and status["upgrading"] is None, status
    assert status["last_upgrade"]["ok"] is False and expect in status["last_upgrade"]["error"], status
    return lines[0]


def test_an_upgrade_whose_new_code_does_not_import_leaves_the_old_master_serving(
        start: Start, short_dir: Path, traffic: Callable[..., Traffic]) -> None:
    e, px, unix = free_port(), free_port(), short_dir / "u.sock"
    prog = start(toml(services(e, px, unix), drain=30.0), env={"HOTPROXY_TEST_FAIL_UPGRADE": "import"})

    async def main() -> None:
        await prog.wait_ready()
        load = traffic([f"{HOST}:{e}", f"unix:{unix}", f"{HOST}:{px}"], long=3, short=3, seed=21)
        line = await failed_upgrade(prog, "HOTPROXY_TEST_FAIL_UPGRADE=import: the new code does not import")
        print("import failure:", line)
        assert "failed: cannot start: ImportError: " in line
        tot = await load.finish()
        assert tot["long_failed"] == 0 and tot["short_failed"] == 0 and tot["long_ok"] == 3, tot
        assert await roundtrip(e) == b"hello" and os.path.exists(unix)
        await stop_and_check_nothing_left(prog)

    run(main(), 120)


def test_failing_upgrades_bad_file_failing_worker_deadline_kill_9_leave_the_old_master_serving(
        start: Start, short_dir: Path, traffic: Callable[..., Traffic]) -> None:
    """One old master, four failed upgrades under traffic, then a reload: it serves on as before.

    The new master is made to stop short of saying it is ready (the test-only
    ``HOTPROXY_TEST_FAIL_UPGRADE=hang``) after its workers serve: once past
    ``upgrade_timeout``, once killed with -9 by the test.  A reload asked
    for during the upgrade is refused with a line that says why.

    Only the deadline case runs with a short ``upgrade_timeout`` (3 s): the
    others fail on their own (a bad file, a failing worker, kill -9) and get
    120 s, so that a new master slow to start on a loaded machine still
    fails for the reason the test checks, not at the deadline.
    """
    e, px, unix = free_port(), free_port(), short_dir / "u.sock"
    good = services(e, px, unix)
    text = lambda svcs, timeout: toml(svcs, drain=30.0, upgrade_timeout=timeout)  # noqa: E731
    prog = start(text(good, 120.0), env={"HOTPROXY_TEST_FAIL_UPGRADE": "hang"}, test_kinds=True)
    assert prog.config is not None

    async def main() -> None:
        assert prog.config is not None
        first = await prog.wait_ready()
        load = traffic([f"{HOST}:{e}", f"unix:{unix}", f"{HOST}:{px}"], long=3, short=3, seed=22)
        lines = []
        # 1. a file that does not load
        prog.config.write_text(text(good, 120.0) + "[services.broken\n")
        lines.append(await failed_upgrade(prog, f"{prog.config}: "))
        # 2. a service that fails to build on one worker (the new master runs the same module: the test kinds)
        failing = dict(good, f={"kind": "fail_on_worker", "listen": f"{HOST}:{free_port()}", "fail_worker": 1})
        prog.config.write_text(text(failing, 120.0))
        lines.append(await failed_upgrade(prog, "injected failure on worker 1"))
        # 3. a new master that never says it serves: killed at upgrade_timeout (whether its workers
        # were up by then depends on the machine's load; in 4 they are, and it is checked)
        prog.config.write_text(text(good, 3.0))
        code, out, err = await prog.cli("reload", "-c", str(prog.config))   # (the deadline the old master applies)
        assert code == 0, out + err
        lines.append(await failed_upgrade(prog, "did not serve within 3s (runtime.upgrade_timeout): killed"))
        hung = prog.log().count("never says it is ready")
        # 4. one killed with -9 mid-way, its workers serving; a reload meanwhile is refused
        prog.config.write_text(text(good, 120.0))
        code, out, err = await prog.cli("reload", "-c", str(prog.config))
        assert code == 0, out + err
        upgrading = asyncio.ensure_future(failed_upgrade(prog, "was killed by signal 9 before it served"))

        async def new_master() -> int | None:
            return ((await prog.status())["upgrading"] or {}).get("pid")

        pid = await eventually(new_master, timeout=30)
        await eventually(lambda: prog.log().count("never says it is ready") == hung + 1, timeout=60)
        prog.track(pid)
        new_workers = children(pid)
        assert len(new_workers) == 2, new_workers
        code, out, err = await prog.cli("reload", "-c", str(prog.config))
        assert code == 1 and err.strip() == (f"hotproxy: error: an upgrade is running (new master pid {pid}): "
                                             "reload refused; run it again once the upgrade has ended"), err
        os.kill(pid, signal.SIGKILL)
        lines.append(await asyncio.wait_for(upgrading, 60))
        print("failed upgrades:\n  " + "\n  ".join(lines))
        # its workers drained what they had accepted and exited
        await eventually(lambda: not any(alive(p) for p in [pid, *new_workers]), timeout=60)
        tot = await load.finish()
        print("traffic through 4 failed upgrades:", tot)
        assert tot["long_failed"] == 0 and tot["short_failed"] == 0 and tot["long_ok"] == 3, tot
        status = await prog.follow()
        assert status["pid"] == first["pid"] and status["restarts"] == 0
        assert [w["pid"] for w in status["workers"]] == [w["pid"] for w in first["workers"]]
        code, out, err = await prog.cli("reload", "-c", str(prog.config))
        assert code == 0, out + err
        assert await roundtrip(e) == b"hello" and await roundtrip(px) == b"hello"
        await stop_and_check_nothing_left(prog)

    run(main(), 170)


# -- state crosses the upgrade --------------------------------------------------------------------


def test_state_crosses_the_upgrade_ejected_upstream_stays_ejected_counters_continue(
        start: Start, short_dir: Path) -> None:
    """A proxy with a dead upstream ejected on every worker (``fail_timeout = 300``);
    an upgrade that also changes ``workers`` from 2 to 3: the dead upstream is
    still ejected on every new worker (never tried again: its failures do not
    grow), and every counter continues from where it was, each counted once."""
    e, px, dead, unix = free_port(), free_port(), free_port(), short_dir / "u.sock"
    svcs = services(e, px, unix, max_fails=1, fail_timeout=300.0, retries=1)
    svcs["px"]["upstreams"] = [f"{HOST}:{dead}", f"{HOST}:{e}"]
    prog = start(toml(svcs, drain=5.0))
    assert prog.config is not None

    def upstream(status: dict[str, Any], addr: int) -> dict[str, Any]:
        px_status = next(s for s in status["services"] if s["name"] == "px")
        return px_status["upstreams"][f"{HOST}:{addr}"]  # type: ignore[no-any-return]

    def totals(status: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {s["name"]: s["totals"] for s in status["services"]}

    async def main() -> None:
        assert prog.config is not None
        await prog.wait_ready()

        async def ejected_everywhere() -> bool:
            assert await roundtrip(px) == b"hello"
            return upstream(await prog.status(), dead)["ejected_workers"] == [0, 1]

        await eventually(ejected_everywhere, timeout=60, interval=0.01)
        before = await prog.follow()
        prog.config.write_text(toml(svcs, drain=5.0, workers=3))
        after, _ = await upgrade(prog, "cli")
        assert len(after["workers"]) == 3
        print("before:", totals(before), upstream(before, dead))
        print("after: ", totals(after), upstream(after, dead))
        # counters continue (nothing connected during the upgrade: equal)
        for name in ("e", "px", "u"):
            for key, value in totals(before)[name].items():
                assert totals(after)[name][key] == value, (name, key, totals(before), totals(after))
        up = upstream(after, dead)
        assert up["ejected_workers"] == [0, 1, 2] and up["ejected_for"] > 200, up
        assert up["failures"] == upstream(before, dead)["failures"] and up["connections"] == 0
        assert upstream(after, e)["connections"] == upstream(before, e)["connections"]
        # the core's histograms and the ejections continue too (issue 15)
        durations = totals(before)["px"]["durations"]["count"]
        connects = upstream(before, e)["connect_times"]["count"]
        assert totals(after)["px"]["durations"]["count"] == durations > 0
        assert upstream(after, e)["connect_times"]["count"] == connects > 0
        assert upstream(after, dead)["ejections"] == upstream(before, dead)["ejections"] >= 2
        for _ in range(30):
            assert await roundtrip(px) == b"hello"
        status = await prog.follow()
        assert totals(status)["px"]["accepted"] == totals(before)["px"]["accepted"] + 30
        assert upstream(status, dead)["failures"] == upstream(before, dead)["failures"]   # never tried again
        assert upstream(status, e)["connections"] == upstream(before, e)["connections"] + 30
        assert upstream(status, e)["connect_times"]["count"] == connects + 30

        async def durations_counted() -> bool:
            # a duration is counted when its connection is finished
            return totals(await prog.status())["px"]["durations"]["count"] == durations + 30

        await eventually(durations_counted)
        await stop_and_check_nothing_left(prog)

    run(main(), 120)


def test_counts_the_old_workers_make_between_the_snapshot_and_the_hand_over_are_carried(
        start: Start, short_dir: Path) -> None:
    """The new master is held serving for 3 s before it says ready
    (``HOTPROXY_TEST_UPGRADE_PAUSE``, test-only), after the old master took
    the snapshot it was built from; the connections made meanwhile are
    accepted by old and new workers alike (TCP, ``SO_REUSEPORT``).  At the
    hand-over the old workers stop accepting and send their final counts:
    after the upgrade every counter is what the test did -- accepted
    connections, bytes, the upstream's connections, the echo bytes."""
    e, px, unix = free_port(), free_port(), short_dir / "u.sock"
    prog = start(toml(services(e, px, unix), drain=5.0), env={"HOTPROXY_TEST_UPGRADE_PAUSE": "3"})
    assert prog.config is not None

    def totals(status: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {s["name"]: s["totals"] for s in status["services"]}

    async def main() -> None:
        assert prog.config is not None
        await prog.wait_ready()
        for _ in range(10):
            assert await roundtrip(px) == b"hello"
        before = await prog.follow()
        upgrading = asyncio.ensure_future(upgrade(prog, "cli"))
        # the new master has its state and serves: the old one took the snapshot
        await eventually(lambda: "HOTPROXY_TEST_UPGRADE_PAUSE: serving" in prog.log() or upgrading.done(),
                         timeout=60)
        assert not upgrading.done()
        window = 30
        for _ in range(window):
            assert await roundtrip(px) == b"hello"
        after, _ = await upgrading
        status = await prog.follow()
        print("before:", totals(before)["px"], "after:", totals(status)["px"])
        px_before, px_after = totals(before)["px"], totals(status)["px"]
        assert px_after["accepted"] == px_before["accepted"] + window, (px_before, px_after)
        assert px_after["bytes_in"] == px_before["bytes_in"] + 5 * window, (px_before, px_after)
        assert px_after["bytes_out"] == px_before["bytes_out"] + 5 * window, (px_before, px_after)
        ups = next(s for s in status["services"] if s["name"] == "px")["upstreams"][f"{HOST}:{e}"]
        ups_before = next(s for s in before["services"] if s["name"] == "px")["upstreams"][f"{HOST}:{e}"]
        assert ups["connections"] == ups_before["connections"] + window, (ups_before, ups)
        assert totals(status)["e"]["bytes"] == totals(before)["e"]["bytes"] + 5 * window
        print(f"{window} connections made while the new master waited to take over: all counted after it")
        await stop_and_check_nothing_left(prog)

    run(main(), 120)


def test_the_metrics_endpoint_answers_every_scrape_across_upgrades(start: Start, short_dir: Path) -> None:
    """``runtime.metrics`` during upgrades: the old master hands its listening
    socket to the new one, which serves the scrapes that queued on it
    meanwhile -- scraping back to back through 3 upgrades, none is refused
    and every one is answered (200), the last ones by the newest master."""
    e, px, unix, mport = free_port(), free_port(), short_dir / "u.sock", free_port()
    prog = start(toml(services(e, px, unix), drain=5.0, metrics=f"{HOST}:{mport}"))

    async def get() -> str:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, mport), 10)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 30)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return data.split(b"\r\n", 1)[0].decode()

    async def main() -> None:
        await prog.wait_ready()
        outcomes: dict[str, int] = {}
        done = asyncio.Event()

        async def scraper() -> None:
            for _ in range(100_000):   # bounded: ends with the upgrades
                if done.is_set():
                    return
                try:
                    line = await get()
                    key = "200" if line.startswith("HTTP/1.1 200") else f"other: {line!r}"
                except ConnectionRefusedError:
                    key = "refused"
                except (OSError, asyncio.TimeoutError) as exc:
                    key = f"error: {type(exc).__name__}"
                outcomes[key] = outcomes.get(key, 0) + 1

        task = asyncio.ensure_future(scraper())
        pids = []
        for _ in range(3):
            status, _ = await upgrade(prog, "cli")
            pids.append(status["pid"])
        done.set()
        await task
        print(f"metrics across 3 upgrades: {outcomes}")
        assert outcomes.get("200", 0) > 10 and set(outcomes) == {"200"}, outcomes
        assert (await get()).startswith("HTTP/1.1 200")
        await stop_and_check_nothing_left(prog)

    run(main(), 240)


def test_a_snapshot_this_version_cannot_read_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from hotproxy.echo import EchoFactory
    from hotproxy.executor import ServiceExecutor
    from hotproxy.service import Seed
    from hotproxy.upgrade import STATE_FORMAT, parse_state, read_state, seeds_for, write_state

    for data, why in ((b"{nope", "not JSON"), (b"[]", "not a hotproxy state snapshot"),
                      (json.dumps({"format": STATE_FORMAT, "version": 99, "workers": []}).encode(),
                       "snapshot version 99; this hotproxy reads version 1")):
        with pytest.raises(ValueError, match=why):
            parse_state(data)
    fd = os.memfd_create("t")
    os.write(fd, b"garbage")
    assert read_state(fd) is None
    assert "the state of the old master's services was dropped (not JSON" in caplog.text
    fd = write_state([{"worker": 0, "sites": {"e": {"type": "echo", "v": 1, "bytes": 7}}}])
    assert fd is not None and read_state(fd) == [{"worker": 0, "sites": {"e": {"type": "echo", "v": 1, "bytes": 7}}}]
    # three old workers into two new ones: every count once; the view of old worker j % 3
    old = [{"worker": k, "sites": {"e": {"type": "echo", "v": 1, "bytes": 10 ** k}}} for k in range(3)]
    seeds = seeds_for(old, 2)
    assert [s["e"].total("bytes") for s in seeds.values()] == [101, 10]
    assert seeds[1]["e"].like == old[1]["sites"]["e"]

    async def main() -> None:
        from hotproxy.commands import Precommit

        ex = ServiceExecutor()
        # a snapshot of another version (or kind): the service is built afresh, with a warning
        ex.seed({"a": Seed(({"type": "echo", "v": 2, "bytes": 5},)), "b": Seed(({"type": "echo", "v": 1, "bytes": 5},))})
        await ex.execute(Precommit("a", EchoFactory()))
        await ex.execute(Precommit("b", EchoFactory()))
        assert ex.sites["a"].staged.stats() == {"bytes": 0}   # type: ignore[union-attr]
        assert ex.sites["b"].staged.stats() == {"bytes": 5}   # type: ignore[union-attr]

    run(main(), 10)
    assert "site 'a': the state from before the upgrade was dropped (ValueError: expected a snapshot of " \
           "type 'echo' v1, got 'echo' v2); built afresh" in caplog.text


def test_connections_draining_on_the_old_master_still_count_against_max_connections(
        start: Start, short_dir: Path) -> None:
    """``max_connections = 3`` on an echo: 3 connections held across an upgrade
    still count (the counters' memfd is handed over, each generation counts
    in its own regions): a 4th, on the new master, is refused; once one old
    connection ends, a new one is served."""
    from helpers_program import EchoClient

    e, px, unix = free_port(), free_port(), short_dir / "u.sock"
    svcs = services(e, px, unix)
    svcs["e"]["max_connections"] = 3
    prog = start(toml(svcs, drain=30.0))

    async def main() -> None:
        await prog.wait_ready()
        held = [await EchoClient.open(e) for _ in range(3)]
        try:
            for c in held:
                await c.check()
            first, _ = await upgrade(prog, "cli")
            refused_before = next(s for s in first["services"] if s["name"] == "e")["totals"]["refused"]
            extra = await EchoClient.open(e)
            await extra.check_cut()     # over the limit: the old master's 3 still count
            await extra.close()
            status = await prog.follow()
            e_status = next(s for s in status["services"] if s["name"] == "e")
            assert e_status["totals"]["refused"] == refused_before + 1, e_status
            assert status["old_masters"][0]["connections"] >= 3, status["old_masters"]
            for c in held:
                await c.check()         # never cut: they drain on the old master
            await held.pop().close()

            async def served() -> bool:
                try:
                    return await roundtrip(e) == b"hello"
                except (ConnectionError, asyncio.IncompleteReadError):
                    return False

            await eventually(served, timeout=30)
        finally:
            for c in held:
                await c.close()
        await stop_and_check_nothing_left(prog)

    run(main(), 120)


# -- the pidfile, status and stop follow the new master -------------------------------------------


def test_pidfile_status_and_stop_follow_the_new_master(start: Start, short_dir: Path) -> None:
    """The pidfile names the new master (not refused as "already running"),
    ``status`` shows the old masters while they drain (pid, connections
    left), and ``stop`` stops the new master and every draining one."""
    from helpers_program import EchoClient

    e, px, unix = free_port(), free_port(), short_dir / "u.sock"
    pidfile = short_dir / "hp.pid"
    prog = start(toml(services(e, px, unix), drain=60.0, pidfile=str(pidfile)))
    assert prog.config is not None

    async def main() -> None:
        assert prog.config is not None
        first = await prog.wait_ready()
        assert pidfile.read_text() == f"{first['pid']}\n"
        held = await EchoClient.open(e)
        await held.check()
        try:
            second, _ = await upgrade(prog, "cli")
            await eventually(lambda: pidfile.read_text() == f"{second['pid']}\n", timeout=10)
            third, _ = await upgrade(prog, "sigusr2")
            await eventually(lambda: pidfile.read_text() == f"{third['pid']}\n", timeout=10)
            code, out, err = await prog.cli("status", "-c", str(prog.config))
            print(out)
            assert code == 0, err
            assert f"old master pid {first['pid']} draining since " in out and ": 1 connection left" in out, out
            assert f"upgraded from pid {second['pid']}" in out, out
            await held.check()      # on the first master's worker, through two upgrades
            code, out, err = await prog.cli("stop", "--fast", "-c", str(prog.config))
            assert code == 0 and f"stopped hotproxy (pid {third['pid']})" in out, out + err
            await held.check_cut()  # the first master stopped too
        finally:
            await held.close()
        await eventually(lambda: [pid for pid in prog.seen_pids if alive(pid)] == [], timeout=30)
        assert prog.proc.poll() == 0
        assert not pidfile.exists() and not os.path.exists(prog.socket_path())
        assert not unix.exists()

    run(main(), 120)


# -- the workers' TCP listening sockets cross the upgrade ------------------------------------------


def listening_sockets(port: int) -> dict[int, tuple[int, int]]:
    """The TCP sockets listening on *port*: inode -> (accept queue now, backlog), as ``ss`` shows them."""
    out = subprocess.run(["ss", "-ltneH", f"sport = :{port}"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    found: dict[int, tuple[int, int]] = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        inode = re.search(r"\bino:(\d+)", line)
        assert inode is not None and fields[0] == "LISTEN", line
        found[int(inode.group(1))] = (int(fields[1]), int(fields[2]))
    return found


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process *pid* holds (``/proc/PID/fd`` -> ``socket:[N]``)."""
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    return out


def listeners_by_worker(status: dict[str, Any], port: int) -> dict[int, set[int]]:
    """Worker id -> the inodes of the sockets listening on *port* that its process holds."""
    listening = set(listening_sockets(port))
    return {w["worker"]: socket_inodes(w["pid"]) & listening for w in status["workers"] if w["pid"]}


def test_each_new_worker_serves_on_the_very_listening_socket_of_the_old_worker_of_its_id(
        start: Start, short_dir: Path, traffic: Callable[..., Traffic]) -> None:
    """New worker i holds old worker i's listening socket for each TCP address
    (the same inode): with more workers (the extra one binds its own, in the
    same ``SO_REUSEPORT`` group), a changed backlog (listen() again on it: the
    socket shows the new one), an address written differently (``localhost``
    for 127.0.0.1: matched by ``getsockname``), a new address (bound as
    before); then with fewer workers (the sockets no worker takes close with
    their old worker: one socket left).  0 failed connections throughout."""
    e, px, unix, e2 = free_port(), free_port(), short_dir / "u.sock", free_port()
    prog = start(toml(services(e, px, unix), workers=2, drain=30.0))
    assert prog.config is not None

    async def main() -> None:
        assert prog.config is not None
        first = await prog.wait_ready()
        await prog.follow()
        load = traffic([f"{HOST}:{e}", f"{HOST}:{px}", f"unix:{unix}"], long=2, short=2, seed=31)
        old = {port: listeners_by_worker(first, port) for port in (e, px)}
        for port in (e, px):
            assert sorted(old[port]) == [0, 1] and all(len(s) == 1 for s in old[port].values()), old
            assert old[port][0] != old[port][1], old   # one socket per worker (SO_REUSEPORT)
        # three workers, e's backlog changed, px written with a host name, a new address
        more = services(e, px, unix)
        more["e"]["backlog"] = 321
        more["px"]["listen"] = f"localhost:{px}"
        more["e2"] = {"kind": "echo", "listen": f"{HOST}:{e2}"}
        prog.config.write_text(toml(more, workers=3, drain=30.0))
        second, _ = await upgrade(prog, "cli")
        new = {port: listeners_by_worker(second, port) for port in (e, px, e2)}
        print("listening sockets by worker: before", old, "after", new)
        for port in (e, px):
            assert new[port][0] == old[port][0] and new[port][1] == old[port][1], (port, old, new)
            assert len(new[port][2]) == 1 and not new[port][2] & (old[port][0] | old[port][1]), (port, old, new)
        assert len(set().union(*new[e2].values())) == 3   # a new address: each worker binds its own
        assert {backlog for _, backlog in listening_sockets(e).values()} == {321}, listening_sockets(e)
        assert await roundtrip(e) == b"hello" and await roundtrip(px) == b"hello" and await roundtrip(e2) == b"hello"
        # one worker: it takes old worker 0's socket; the others close with their old workers
        prog.config.write_text(toml(services(e, px, unix), workers=1, drain=30.0))
        third, _ = await upgrade(prog, "sigusr2")
        last = listeners_by_worker(third, e)
        assert last == {0: new[e][0]}, (last, new[e])
        await eventually(lambda: set(listening_sockets(e)) == new[e][0], timeout=30)
        assert await roundtrip(e) == b"hello"
        tot = await load.finish()
        print("traffic across the three generations:", tot)
        assert tot["long_failed"] == 0 and tot["short_failed"] == 0 and tot["long_ok"] == 2, tot
        await stop_and_check_nothing_left(prog)

    run(main(), 170)


def test_connections_queued_on_a_stopped_workers_socket_are_served_after_the_upgrade(
        start: Start, short_dir: Path) -> None:
    """The old worker is SIGSTOPped (and so, a moment, is the new one) while 24
    clients connect: their connections wait in the accept queue of the listening
    socket(s).  The old worker never accepts again -- the hand-over kills it
    after ``drain_timeout`` -- yet every client gets its bytes: the socket they
    wait on is the new worker's too.  (Before the hand-over of the workers'
    sockets, the kernel spread them over the old worker's socket and the new
    one's, and the ones on the old socket were reset when it was killed.)"""
    e, px, unix = free_port(), free_port(), short_dir / "u.sock"
    prog = start(toml(services(e, px, unix), workers=1, drain=2.0),
                 env={"HOTPROXY_TEST_UPGRADE_PAUSE": "15"})
    clients = 24

    async def main() -> None:
        first = await prog.wait_ready()
        await prog.follow()
        old_worker = first["workers"][0]["pid"]
        os.kill(first["pid"], signal.SIGUSR2)

        async def new_worker() -> int | None:
            status = await prog.status()
            child = (status.get("upgrading") or {}).get("pid")
            if child is None:
                return None
            prog.track(child)
            listening = set(listening_sockets(e))
            for pid in children(child):
                prog.track(pid)
                if socket_inodes(pid) & listening:
                    return pid
            return None

        worker = await eventually(new_worker, timeout=60, interval=0.05)
        os.kill(old_worker, signal.SIGSTOP)
        os.kill(worker, signal.SIGSTOP)
        conns = []
        try:
            for i in range(clients):
                reader, writer = await asyncio.open_connection(HOST, e)
                writer.write(b"queued-%02d" % i)
                await writer.drain()
                conns.append((reader, writer))

            def queued() -> dict[int, tuple[int, int]] | None:
                sockets = listening_sockets(e)
                return sockets if sum(q for q, _ in sockets.values()) == clients else None

            sockets = await eventually(queued, timeout=30)
            print("accept queues while both workers are stopped:", sockets)
        finally:
            os.kill(worker, signal.SIGCONT)
        got = []
        try:
            for i, (reader, writer) in enumerate(conns):
                try:
                    got.append(await asyncio.wait_for(reader.readexactly(9), 60))
                except (OSError, asyncio.IncompleteReadError) as exc:
                    got.append(repr(exc).encode())
        finally:
            for _, writer in conns:
                writer.close()
        served = sum(1 for i, data in enumerate(got) if data == b"queued-%02d" % i)
        print(f"queued clients served after the upgrade: {served} of {clients}")
        assert got == [b"queued-%02d" % i for i in range(clients)], got
        assert len(sockets) == 1, sockets   # they waited on one socket: the old worker's, the new worker's
        status = await eventually(lambda: _moved(prog, first["pid"]), timeout=60)
        assert status["upgraded_from"] == first["pid"]
        await eventually(lambda: not alive(old_worker), timeout=30)   # killed at the drain's end
        assert await roundtrip(e) == b"hello"
        await stop_and_check_nothing_left(prog)

    run(main(), 150)


async def _moved(prog: Program, before: int) -> dict[str, Any] | None:
    status = await prog.follow()
    return status if status["pid"] != before and status["ready"] else None


def test_hundreds_of_services_hand_over_every_socket_in_batches(start: Start, short_dir: Path) -> None:
    """300 TCP services on 2 workers: each old worker sends its 300 sockets in
    batches of at most 253 (``SCM_MAX_FD``), the old master sends the 600 in
    batches too, and each new worker holds exactly the listening sockets its
    old worker of the same id held."""
    ports = [free_port() for _ in range(300)]
    svcs = {f"s{i}": {"kind": "echo", "listen": f"{HOST}:{port}"} for i, port in enumerate(ports)}
    prog = start(toml(svcs, workers=2, drain=30.0))
    wanted = set(ports)

    def held(status: dict[str, Any]) -> dict[int, set[int]]:
        out = subprocess.run(["ss", "-ltneH"], capture_output=True, text=True, timeout=30)
        listening = set()
        for line in out.stdout.splitlines():
            found = re.search(r"\s127\.0\.0\.1:(\d+)\s.*\bino:(\d+)", line)
            if found and int(found.group(1)) in wanted:
                listening.add(int(found.group(2)))
        return {w["worker"]: socket_inodes(w["pid"]) & listening for w in status["workers"]}

    async def main() -> None:
        first = await prog.wait_ready(timeout=120)
        await prog.follow()
        before = held(first)
        assert [len(before[0]), len(before[1])] == [300, 300] and not before[0] & before[1], before
        second, took = await upgrade(prog, "cli")
        after = held(second)
        print(f"300 services x 2 workers: every socket handed over in {took:.2f}s;",
              re.findall(r"the workers serve on \d+ of the old workers' \d+ TCP listening sockets", prog.log()))
        assert after == before
        assert await roundtrip(ports[0]) == b"hello" and await roundtrip(ports[-1]) == b"hello"
        await stop_and_check_nothing_left(prog)

    run(main(), 240)


def test_600_sockets_are_handed_over_under_ulimit_n_620(start: Start, short_dir: Path) -> None:
    """``ulimit -n 620``, 300 TCP services on 2 workers: the old workers' 600
    sockets could not all be held by a master at once and leave it room to
    start its workers.  None does: the old master holds one worker's at a
    time, the new one passes each on to its worker as it arrives.  Every
    socket is handed over and every service answers.  (Holding all 600, the
    new master failed: ``cannot start workers: Too many open files``.)"""
    ports = [free_port() for _ in range(300)]
    svcs = {f"s{i}": {"kind": "echo", "listen": f"{HOST}:{port}"} for i, port in enumerate(ports)}
    prog = start(toml(svcs, workers=2, drain=30.0), nofile=620)

    async def main() -> None:
        first = await prog.wait_ready(timeout=120)
        await prog.follow()
        old = {w["worker"]: socket_inodes(w["pid"]) for w in first["workers"]}
        second, _ = await upgrade(prog, "cli")
        kept = re.findall(r"the workers serve on (\d+) of the old workers' (\d+) TCP listening sockets", prog.log())
        print("ulimit -n 620, 300 services x 2 workers:", kept)
        assert kept == [("600", "600")], kept
        for w in second["workers"]:
            assert len(socket_inodes(w["pid"]) & old[w["worker"]]) == 300, w
        for port in ports:
            assert await roundtrip(port) == b"hello", port
        await stop_and_check_nothing_left(prog)

    run(main(), 240)


def test_a_hello_and_sockets_of_10000_services_cross_the_channel() -> None:
    """The old master's hello for 10,000 services (their addresses and counter
    slots: more than one message holds) travels in a memfd, and then 600 of
    its workers' TCP sockets in messages of at most 253, over a real
    socketpair; the new master's end reads every field and every socket.  (Before: ``upgrade
    message of N bytes is too large`` -- no upgrade of 10,000 services.)"""
    import socket

    from hotproxy.upgrade import Channel, Link, send_everything

    listen = [f"127.0.0.1:{20000 + i}" for i in range(10000)]
    hello = {"pid": 4242, "admin_socket": "/x/admin.sock", "listen": listen,
             "counters": {"slots": [[f"s{i}", "max_connections", i] for i in range(10000)], "regions": {"4242": [0]}}}
    socks = [socket.socket() for _ in range(600)]

    class Child:
        channel: Channel

    async def main() -> None:
        child = Child()
        child.channel, theirs = Channel.pair()
        link = Link(theirs.detach())

        async def tcp() -> Any:
            for w in range(2):
                yield [({"worker": w, "site": f"s{i}", "key": ["tcp", "127.0.0.1", 20000 + i]}, socks[w * 300 + i].fileno())
                       for i in range(300)]

        sending = asyncio.ensure_future(send_everything(child, [], hello, tcp))   # type: ignore[arg-type]
        got = await link.receive(timeout=30)
        assert got.pid == 4242 and got.listen == listen and len(got.counter_slots()) == 10000
        taken: list[tuple[int, Any, int]] = []
        assert await link.receive_tcp(taken.extend, timeout=30) == 600
        await sending
        assert sorted((w, key[2]) for w, key, _ in taken) == sorted((w, 20000 + i) for w in range(2) for i in range(300))
        inodes = {os.fstat(s.fileno()).st_ino for s in socks}
        assert {os.fstat(fd).st_ino for _, _, fd in taken} == inodes   # the very sockets
        for _, _, fd in taken:
            os.close(fd)
        got.close()
        link.channel.close()
        child.channel.close()

    try:
        run(main(), 60)
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_upgrade_of_10000_services_hands_their_sockets_over(start: Start) -> None:
    """10,000 TCP echo services (on 127.0.0.3) on 2 workers, upgraded twice under
    a hard limit of 20,000 descriptors: each upgrade succeeds, every old socket
    is served on by its new worker, and services answer at both ends of the range."""
    import socket

    # (127.0.0.3, above the ports other tests take (conftest.free_port): 10,000 of them must stay free)
    host, ports = "127.0.0.3", []
    for port in range(40000, 52000):
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind((host, port))
            ports.append(port)
        if len(ports) == 10000:
            break
    assert len(ports) == 10000
    svcs = {f"s{i}": {"kind": "echo", "listen": f"{host}:{port}"} for i, port in enumerate(ports)}
    prog = start(toml(svcs, workers=2, drain=10.0, upgrade_timeout=300.0, reload_timeout=300.0))

    async def answers(port: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"hello")
            return await asyncio.wait_for(reader.readexactly(5), 30)
        finally:
            writer.close()

    async def main() -> None:
        await prog.wait_ready(timeout=300)
        await prog.follow()
        for _ in range(2):
            _, took = await upgrade(prog, "cli")
            print(f"10,000 services x 2 workers: upgraded in {took:.1f}s")
            assert [await answers(p) for p in (ports[0], ports[4999], ports[-1])] == [b"hello"] * 3
        log = prog.log()
        kept = re.findall(r"the workers serve on (\d+) of the old workers' (\d+) TCP listening", log)
        print("sockets served on by the new workers:", kept)
        assert kept == [("20000", "20000")] * 2, kept
        await stop_and_check_nothing_left(prog)

    run(main(), 580)
