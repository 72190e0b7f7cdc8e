"""The control path never waits forever and never applies after "failed".

Real ``hotproxy run`` programs, real signals (SIGSTOP, SIGCONT, kill -9), the
real CLI.  A stopped worker is the hard case: it holds its sockets and its
control channel open and answers nothing.  Each test bounds its waits; none
asserts on timing.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any, Callable


from conftest import eventually, free_port, run
from helpers_program import EchoClient, Program, roundtrip, toml

Start = Callable[..., Program]


def echo(port: int, greeting: str = "", **kw: Any) -> dict[str, Any]:
    return {"kind": "echo", "listen": f"127.0.0.1:{port}", "greeting": greeting, **kw}


async def greetings(port: int, n: int, glen: int = 3) -> set[bytes]:
    """The greetings of *n* short connections (spread over the workers)."""
    return {(await roundtrip(port, glen))[:glen] for _ in range(n)}


async def worker_pids(prog: Program) -> list[int]:
    return [w["pid"] for w in (await prog.status())["workers"]]


# -- item 1: a deadline for every phase ----------------------------------------------------


def test_a_stopped_worker_fails_the_prepare_is_restarted_and_nothing_applies_later(start: Start) -> None:
    """3 workers: w0 stopped (SIGSTOP), w1 killed -9 during the reload.  The reload
    fails naming w0 and its pid; both come back on the *old* config without w0
    ever being continued; nothing of the failed reload is applied afterwards."""
    a = free_port()
    prog = start(toml({"a": echo(a, "v1\n")}, workers=3, reload_timeout=1.5))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        pids = await worker_pids(prog)
        os.kill(pids[0], signal.SIGSTOP)
        cfg.write_text(toml({"a": echo(a, "v2\n"), "b": echo(free_port(), "b2\n")}, workers=3,
                            reload_timeout=1.5))
        reload = asyncio.ensure_future(prog.cli("reload", "-c", str(cfg)))

        async def reloading() -> bool:
            return bool((await prog.status())["reloading"])

        await eventually(reloading)
        os.kill(pids[1], signal.SIGKILL)
        code, out, err = await asyncio.wait_for(reload, 60)
        assert code == 1, out + err
        assert "reload failed" in err and "worker 0" in err and f"pid {pids[0]}" in err, err
        assert "did not answer" in err and "the old config keeps serving" in err, err

        async def all_back() -> bool:
            st = await prog.status()
            new = [w["pid"] for w in st["workers"]]
            return (new[0] != pids[0] and new[1] != pids[1] and st["restarts"] >= 2
                    and all(w["alive"] and w["answering"] for w in st["workers"]))

        await eventually(all_back, timeout=30)
        # the stopped process was killed (never continued): nothing it held applies later
        assert not os.path.exists(f"/proc/{pids[0]}") or "Z" in Path(f"/proc/{pids[0]}/stat").read_text()
        status = await prog.status()
        assert [s["name"] for s in status["services"]] == ["a"]
        assert status["last_reload"]["ok"] is False
        assert await greetings(a, 30) == {b"v1\n"}
        # and the next reload works on every worker
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0, out + err
        assert await greetings(a, 30) == {b"v2\n"}

    run(main(), 120)


def test_a_worker_silent_during_commit_is_restarted_with_the_new_config(start: Start) -> None:
    """Worker 0 answers prepare, then stops itself at the Update: the reload is
    final on the others, reported ok with a note naming the worker; the killed
    worker comes back serving the new version."""
    a = free_port()
    stall = {"kind": "stall_on_update", "listen": f"127.0.0.1:{a}", "greeting": "v1\n"}
    prog = start(toml({"a": stall}, reload_timeout=1.5), test_kinds=True)
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        pids = await worker_pids(prog)
        cfg.write_text(toml({"a": dict(stall, greeting="v2\n", stall_worker=0)}, reload_timeout=1.5))
        code, out, err = await asyncio.wait_for(prog.cli("reload", "-c", str(cfg)), 60)
        assert code == 0, out + err
        assert out.startswith("reload ok: added=[] changed=[a]"), out
        assert f"worker 0: pid {pids[0]} did not answer" in out and "restarts with the new config" in out, out

        async def restarted() -> bool:
            st = await prog.status()
            return st["restarts"] == 1 and all(w["alive"] and w["answering"] for w in st["workers"])

        await eventually(restarted, timeout=30)
        assert (await worker_pids(prog))[1] == pids[1]
        assert await greetings(a, 30) == {b"v2\n"}

    run(main(), 90)


def test_status_and_stop_do_not_wait_behind_a_stopped_worker(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a, "v1\n")}, drain=1.0, reload_timeout=600))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        pids = await worker_pids(prog)
        os.kill(pids[0], signal.SIGSTOP)
        # a reload that will wait (reload_timeout 600) for the stopped worker
        cfg.write_text(toml({"a": echo(a, "v2\n")}, drain=1.0, reload_timeout=600))
        prog.signal(signal.SIGHUP)
        code, out, err = await prog.cli("status", "-c", str(cfg), timeout=30)
        assert code == 0, out + err
        assert "not answering: worker 0" in out and "a reload is running" in out, out
        # stop keeps drain_timeout: it kills what has not exited by then
        code, out, err = await prog.cli("stop", "-c", str(cfg), timeout=30)
        assert code == 0, out + err
        assert await prog.wait_exit(30) == 0
        assert not prog.alive_workers()

    run(main(), 90)


# -- item 2: requests that arrive during a reload are merged --------------------------------


def test_a_sighup_storm_and_concurrent_reloads_are_merged(start: Start, tmp_path: Path) -> None:
    a, s = free_port(), free_port()
    slow = {"kind": "fail_on_worker", "listen": f"127.0.0.1:{s}", "greeting": "s1\n"}
    prog = start(toml({"a": echo(a, "a1\n"), "s": slow}), test_kinds=True)
    cfg = prog.config
    assert cfg is not None

    async def reloading() -> bool:
        return bool((await prog.status())["reloading"])

    async def queued(n: int) -> bool:
        return bool((await prog.status()).get("reload_queued", 0) >= n)

    async def idle() -> bool:
        st = await prog.status()
        return not st["reloading"] and not st.get("reload_queued")

    async def main() -> None:
        status = await prog.wait_ready()
        before = status["reloads"]
        # the first reload is held open until the flag file exists
        flag = tmp_path / "go1"
        cfg.write_text(toml({"a": echo(a, "a2\n"), "s": dict(slow, wait_file=str(flag))}))
        prog.signal(signal.SIGHUP)
        await eventually(reloading)
        for _ in range(49):
            prog.signal(signal.SIGHUP)
        await eventually(lambda: queued(1))   # the kernel may deliver fewer than 49
        flag.touch()
        await eventually(idle, timeout=30)
        status = await prog.status()
        # one reload for the first signal, one for all that came during it
        assert status["reloads"] - before == 2, status
        assert status["last_reload"]["ok"] and status["last_reload"]["trigger"] == "SIGHUP"

        # five `hotproxy reload` during a held reload: one reload answers all five
        flag = tmp_path / "go2"
        cfg.write_text(toml({"a": echo(a, "a3\n"), "s": dict(slow, wait_file=str(flag))}))
        prog.signal(signal.SIGHUP)
        await eventually(reloading)
        cfg.write_text(toml({"a": echo(a, "a4\n"), "s": dict(slow, wait_file=str(flag))}))
        clis = asyncio.gather(*(prog.cli("reload", "--json", "-c", str(cfg)) for _ in range(5)))
        await eventually(lambda: queued(5), timeout=60)
        flag.touch()
        outs = await clis
        import json

        reports = [json.loads(out) for code, out, err in outs]
        assert all(code == 0 for code, _, _ in outs), outs
        assert len({r["seq"] for r in reports}) == 1, reports   # the same reload answered all
        assert reports[0]["requests"] == 5 and reports[0]["changed"] == ["a"], reports[0]
        assert await roundtrip(a, 3) == b"a4\nhello"

    run(main(), 120)


# -- item 3: signals from the first moment ----------------------------------------------------


def _catches(pid: int, sig: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except OSError:
        pass
    return False


def test_a_sighup_during_start_up_is_a_reload_once_started(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a, "v1\n")}))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await eventually(lambda: _catches(prog.pid, signal.SIGHUP) or prog.proc.poll() is not None,
                         timeout=30, interval=0.001)
        cfg.write_text(toml({"a": echo(a, "v2\n")}))
        prog.signal(signal.SIGHUP)
        await prog.wait_ready()

        async def v2() -> bool:
            return await greetings(a, 10) == {b"v2\n"}

        await eventually(v2, timeout=30)
        assert prog.proc.poll() is None

    run(main(), 90)


# -- item 5: the admin socket works until the process exits ------------------------------------


def test_status_and_fast_stop_work_during_a_graceful_stop(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a, "v1\n")}, drain=60.0))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        held = await EchoClient.open(a, 3)   # keeps the drain going
        try:
            prog.signal(signal.SIGTERM)

            async def stopping() -> bool:
                code, out, err = await prog.cli("status", "--json", "-c", str(cfg))
                assert code == 0, out + err   # the admin socket still answers
                import json

                return json.loads(out)["stopping"] == "graceful"

            await eventually(stopping)
            code, out, err = await prog.cli("reload", "-c", str(cfg))
            assert code == 1 and "stopping" in err, out + err
            code, out, err = await prog.cli("stop", "--fast", "-c", str(cfg), timeout=30)
            assert code == 0, out + err
            assert await prog.wait_exit(30) == 0
        finally:
            await held.close()

    run(main(), 90)


# -- item 6: log_level reaches the workers --------------------------------------------------------


def test_a_reloaded_log_level_reaches_the_workers(start: Start) -> None:
    a, p = free_port(), free_port()
    services = {"a": echo(a), "p": {"kind": "proxy", "listen": f"127.0.0.1:{p}",
                                    "upstreams": [f"127.0.0.1:{a}"], "access_log": True}}
    text = toml(services).replace('log_level = "info"', 'log_level = "warning"')
    prog = start(text)
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        assert await roundtrip(p, 0, b"quiet") == b"quiet"
        cfg.write_text(toml(services))   # log_level = "info"
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0, out + err

        async def access_line() -> bool:
            assert await roundtrip(p, 0, b"loud") == b"loud"
            return "hotproxy.access" in prog.log() and "in=4 out=4" in prog.log()

        await eventually(access_line)
        assert "in=5 out=5" not in prog.log()   # the warning-level connection logged nothing

    run(main(), 60)
