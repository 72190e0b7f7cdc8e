"""Update storms through the library, with verified traffic running throughout.

A traffic process (tests/traffic.py) keeps long connections streaming and
short ones cycling through an echo site while the manager updates that
site over and over, and adds, moves and removes other sites beside it.
Nothing may fail and every byte must come back.  The short version runs in
CI; ``-m slow`` runs the long one (1,000 updates) and checks worker memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from hotproxy import (Abort, Commit, CountConnections, EchoFactory, PrepareAndCommit, Precommit, Remove,
                      TcpListenerFactory, Update, WorkerManager, stack)

from conftest import free_port, run
from services import TaggedFactory

HOST = "127.0.0.1"
TRAFFIC = os.path.join(os.path.dirname(__file__), "traffic.py")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def storm(updates: int, seconds: float, core: str | None = None) -> dict:
    port = free_port()
    side_ports = [free_port() for _ in range(3)]
    async with WorkerManager(2, drain_timeout=2.0, core=core) as m:
        def echo(i: int):  # type: ignore[no-untyped-def]
            return stack(EchoFactory(), CountConnections())

        (await m.dispatch(PrepareAndCommit("main", echo(0), TcpListenerFactory(HOST, port)))).raise_for_errors()
        traffic = await asyncio.create_subprocess_exec(
            sys.executable, TRAFFIC, "--target", f"{HOST}:{port}", "--long", "4", "--short", "3",
            "--duration", str(seconds), "--max-short", "50000", stdout=asyncio.subprocess.PIPE)
        await asyncio.sleep(0.3)
        rss_early: list[int] = []
        done = 0
        side: dict[str, int] = {}
        for i in range(updates):
            # the main site: a two-stage update (state carries over)
            (await m.dispatch(Precommit("main", echo(i)))).raise_for_errors()
            (await m.dispatch(Update("main"))).raise_for_errors()
            # beside it: add, move, fail-and-abort, remove other sites
            name = f"side{i % 3}"
            if name not in side:
                side[name] = side_ports[i % 3]
                (await m.dispatch(PrepareAndCommit(name, TaggedFactory(b"s"),
                                                   TcpListenerFactory(HOST, side[name])))).raise_for_errors()
            elif i % 4 == 1:
                # a bad version: fails on worker 1 only, so all are aborted
                group = await m.dispatch(Precommit(name, TaggedFactory(b"x", fail_on_worker=1)))
                assert not group.ok
                (await m.dispatch(Abort(name))).raise_for_errors()
            elif i % 4 == 2:
                # move it to a fresh port
                new_port = free_port()
                (await m.dispatch(Precommit(name, TaggedFactory(b"m"), TcpListenerFactory(HOST, new_port)))
                 ).raise_for_errors()
                (await m.dispatch(Commit(name))).raise_for_errors()
                side[name] = new_port
            else:
                (await m.dispatch(Remove(name))).raise_for_errors()
                del side[name]
            done += 1
            if done == 10:
                rss_early = [rss_kib(w.pid) for w in m.workers]
            if traffic.returncode is not None:
                break
        out, _ = await asyncio.wait_for(traffic.communicate(), seconds + 90)
        result = json.loads(out)
        status = await m.status()
        result["updates"] = done
        result["generation"] = [w["sites"]["main"]["generation"] for w in status]
        result["accepted"] = sum(w["sites"]["main"]["stats"]["accepted"] for w in status)
        result["rss_early_kib"] = rss_early
        result["rss_late_kib"] = [rss_kib(w.pid) for w in m.workers]
        result["old_versions"] = [w["sites"]["main"]["old_versions"] for w in status]
        return result


def check(result: dict, updates: int) -> None:
    assert result["updates"] == updates, result
    assert result["long_failed"] == 0 and result["short_failed"] == 0, result["errors"]
    assert result["long_ok"] == 4
    assert result["short_ok"] > 0 and result["bytes_checked"] > 0
    # generations: one per update, plus the first commit, on every worker
    assert result["generation"] == [updates + 1, updates + 1]
    # counters carried over every update: every short and long connection counted
    assert result["accepted"] == result["short_ok"] + result["long_ok"]


def test_update_storm_with_verified_traffic(core_name: str) -> None:
    result = run(storm(updates=60, seconds=6.0, core=core_name), timeout=120)
    check(result, 60)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_long_update_storm_memory_stays_flat() -> None:
    result = run(storm(updates=1000, seconds=120.0), timeout=400)
    print(json.dumps(result))
    check(result, 1000)
    for early, late in zip(result["rss_early_kib"], result["rss_late_kib"]):
        assert late < early * 1.25 + 4096, result
