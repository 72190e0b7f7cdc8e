"""``log_level = "debug"`` (issue 15): what a debugging operator needs, and nothing at info.

The real program (one worker) runs a proxy whose first upstream is a port
nobody listens on, with ``max_connections = 1``; the test makes connections
through it (one refused), then reloads.  At debug the log has every connect
attempt (service, upstream, which try), the failed attempt, the refusal and
why, and each reload phase on the worker with its time; at info none of
these lines is there (and the proxy builds its versions without the debug
connector, so nothing is added per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import eventually, free_port, run
from helpers_program import Program, roundtrip, started_programs, toml

HOST = "127.0.0.1"


@pytest.fixture
def directory() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hpd-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def config(e: int, dead: int, px: int, lim: int, level: str, idle: float) -> str:
    text = toml({"e": {"kind": "echo", "listen": f"{HOST}:{e}"},
                 "px": {"kind": "proxy", "listen": f"{HOST}:{px}", "upstreams": [f"{HOST}:{dead}", f"{HOST}:{e}"],
                        "retries": 1, "max_fails": 0, "idle_timeout": idle},
                 "lim": {"kind": "proxy", "listen": f"{HOST}:{lim}", "upstreams": [f"{HOST}:{e}"],
                         "max_connections": 1}},
                workers=1, drain=5.0)
    return text.replace('log_level = "info"', f'log_level = "{level}"')


async def exercise(prog: Program, px: int, lim: int, e: int, dead: int, level: str, idle: float) -> None:
    """Connections through the proxy (every upstream tried, one refusal), then a reload."""
    await prog.wait_ready()
    for i in range(4):
        assert await roundtrip(px, payload=b"x%d" % i) == b"x%d" % i
    reader, writer = await asyncio.open_connection(HOST, lim)
    writer.write(b"hold")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"hold"
    # the one connection max_connections allows is open: this one is refused (closed at once)
    r2, w2 = await asyncio.open_connection(HOST, lim)
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(r2.read(), 10) == b""
    w2.close()
    writer.close()
    assert prog.config is not None
    prog.config.write_text(config(e, dead, px, lim, level, idle + 1))
    code, out, err = await prog.cli("reload", "-c", str(prog.config))
    assert code == 0, out + err
    await eventually(lambda: "reload phase commit" in prog.log() or level != "debug", timeout=30)


DEBUG_LINES = {
    "attempt": r"service px: 127\.0\.0\.1:\d+: connect attempt 1 of 2 to 127\.0\.0\.1:%(dead)d",
    "retry": r"service px: 127\.0\.0\.1:\d+: connect attempt 2 of 2 to 127\.0\.0\.1:%(e)d",
    "failed": r"service px: connect attempt to 127\.0\.0\.1:%(dead)d failed: ",
    "refused": r"service lim: 127\.0\.0\.1:\d+: refused: max_connections \(1\) reached",
    "prepare": r"worker\[0\] DEBUG hotproxy\.worker: reload phase prepare of site 'px': ok in [\d.]+ ms",
    "commit": r"worker\[0\] DEBUG hotproxy\.worker: reload phase commit of site 'px': ok in [\d.]+ ms",
}


@pytest.mark.parametrize("level", ["debug", "info"])
def test_debug_logs_attempts_refusals_and_reload_phases_and_info_does_not(directory: Path, level: str) -> None:
    e, dead = free_port(), free_port()
    px, lim = free_port(), free_port()
    with started_programs(directory, log_tail=8000) as start:
        prog = start(config(e, dead, px, lim, level, 30.0))
        run(exercise(prog, px, lim, e, dead, level, 30.0), 120)
        log = prog.log()
    found = {k: re.search(pattern % {"dead": dead, "e": e}, log) is not None for k, pattern in DEBUG_LINES.items()}
    if level == "debug":
        assert all(found.values()), (found, log)
        print("debug lines:", *(m.group(0) for m in (re.search(p % {"dead": dead, "e": e}, log)
                                                       for p in DEBUG_LINES.values()) if m), sep="\n  ")
    else:
        assert not any(found.values()), (found, log)
        assert " DEBUG " not in log, log
