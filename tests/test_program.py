"""End to end: the real ``hotproxy run -c FILE`` process, real signals, the real CLI.

Every test starts its own instance on loopback ports (2 workers), talks to
it only as an operator and a client would -- TCP connections, ``kill``,
``hotproxy reload|status|stop`` -- and kills whatever it started in a
fixture finalizer.  Nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import eventually, free_port, run
from helpers_program import EchoClient, Program, ShortLoop, refuses, roundtrip, toml

HAVE_PROXY = importlib.util.find_spec("hotproxy.proxy") is not None
needs_proxy = pytest.mark.skipif(not HAVE_PROXY, reason="hotproxy.proxy is not there yet")

Start = Callable[..., Program]


def echo(port: int, greeting: str = "", **kw: Any) -> dict[str, Any]:
    return {"kind": "echo", "listen": f"127.0.0.1:{port}", "greeting": greeting, **kw}


def by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in status["services"]}


# -- reload: add, change, remove, move; nothing cut, nothing refused ---------------------


def test_reload_adds_changes_removes_and_moves_without_cutting(start: Start, core_name: str) -> None:
    """On both cores (the workers inherit the core the fixture selects)."""
    keep, chg, gone, mv1, mv2, new, late = (free_port() for _ in range(7))
    v1 = {
        "keep": echo(keep, "k1\n"),
        "chg": echo(chg, "c1\n"),
        "gone": echo(gone, "g1\n"),
        "mover": echo(mv1, "m1\n"),
    }
    prog = start(toml(v1))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        status = await prog.wait_ready()
        assert {s["name"]: s["generation"] for s in status["services"]} == {n: 1 for n in v1}

        # long connections on every service that will change, move or go away
        longs = {name: await EchoClient.open(port, 3)
                 for name, port in (("keep", keep), ("chg", chg), ("gone", gone), ("mover", mv1))}
        assert [c.greeting for c in longs.values()] == [b"k1\n", b"c1\n", b"g1\n", b"m1\n"]
        for c in longs.values():
            await c.check()
        targets = {keep: {b"k1\n"}, chg: {b"c1\n", b"c2\n", b"c3\n"}}
        shorts = ShortLoop(targets).start()
        try:
            await exercise(longs, shorts)
        finally:
            shorts.cancel()
            for c in longs.values():
                await c.close()

    async def exercise(longs: dict[str, EchoClient], shorts: ShortLoop) -> None:
        await eventually(lambda: shorts.ok >= 10)

        # v2 through `hotproxy reload`: add new, change chg in place, remove gone, move mover
        v2 = dict(v1, chg=echo(chg, "c2\n"), mover=echo(mv2, "m2\n"), new=echo(new, "n2\n"))
        del v2["gone"]
        cfg.write_text(toml(v2))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0, out + err
        first = out.splitlines()[0]
        assert first.startswith("reload ok: added=[new] changed=[chg,mover] moved=[mover] removed=[gone] "
                                "unchanged=[keep]"), out
        assert "per-worker" not in out and "failure" not in out

        assert await roundtrip(chg, 3) == b"c2\nhello"
        assert await roundtrip(new, 3) == b"n2\nhello"
        assert await roundtrip(mv2, 3) == b"m2\nhello"
        await eventually(lambda: refuses(mv1))
        await eventually(lambda: refuses(gone))
        for c in longs.values():
            await c.check()   # all still open: changed, moved and removed services drain
        gens = by_name(await prog.status())
        assert set(gens["keep"]["generations"].values()) == {1}   # unchanged: not touched
        assert set(gens["chg"]["generations"].values()) == {2}
        assert set(gens["mover"]["generations"].values()) == {2}
        assert set(gens["new"]["generations"].values()) == {1}
        assert "gone" not in gens
        assert len(gens["keep"]["generations"]) == 2   # on both workers

        # v3 through SIGHUP: change chg again, add late, remove new
        v3 = dict(v2, chg=echo(chg, "c3\n"), late=echo(late, "l3\n"))
        del v3["new"]
        cfg.write_text(toml(v3))
        prog.signal(signal.SIGHUP)

        async def third_reload() -> bool:
            last = (await prog.status())["last_reload"]
            return last is not None and last["seq"] == 3

        await eventually(third_reload)
        status = await prog.status()
        last = status["last_reload"]
        assert last["ok"] and last["trigger"] == "SIGHUP", last
        assert (last["added"], last["changed"], last["removed"]) == (["late"], ["chg"], ["new"])
        assert last["unchanged"] == ["keep", "mover"]
        assert await roundtrip(chg, 3) == b"c3\nhello"
        assert await roundtrip(late, 3) == b"l3\nhello"
        await eventually(lambda: refuses(new))
        gens = by_name(status)
        assert set(gens["keep"]["generations"].values()) == {1}
        assert set(gens["chg"]["generations"].values()) == {3}

        # the status table, as an operator sees it
        code, out, err = await prog.cli("status", "-c", str(cfg))
        assert code == 0, err
        header, *rows = out.splitlines()
        assert header.split()[:6] == ["SERVICE", "KIND", "LISTEN", "GEN", "ACTIVE", "TOTALS"]
        keep_row = next(r for r in rows if r.startswith("keep "))
        assert f"127.0.0.1:{keep}" in keep_row and " 1 " in keep_row and "accepted=" in keep_row
        assert "last reload #3 (SIGHUP)" in out and "reload ok" in out

        await shorts.stop()
        assert shorts.failures == [], shorts.failures[:5]
        assert shorts.ok > 20
        for c in longs.values():
            await c.check()   # never cut, across three configs
            await c.close()
        prog.signal(signal.SIGTERM)
        assert await prog.wait_exit() == 0
        assert "reload ok: added=[late] changed=[chg]" in prog.log()
        assert "Traceback" not in prog.log()

    run(main(), 120)


# -- bad configs: rejected with one clear line; the old config serves on --------------------


def test_bad_configs_are_rejected_and_the_old_config_keeps_serving(start: Start, tmp_path: Path) -> None:
    a, b, busy_port, c = (free_port() for _ in range(4))
    good = {"a": echo(a, "a1\n"), "b": echo(b)}
    prog = start(toml(good))
    cfg = prog.config
    assert cfg is not None
    busy = socket.socket()
    busy.bind(("127.0.0.1", busy_port))   # a stranger holds this port (no SO_REUSEPORT)
    busy.listen()
    src = str(cfg)
    changed_a = dict(good, a=echo(a, "a2\n"))
    bad_cases = [
        ("syntax", toml(changed_a) + "[services.c\nkind = 'echo'\n", "TOML syntax error"),
        ("unknown key", toml(dict(changed_a, b=dict(echo(b), colour="red"))),
         "services.b.colour: unknown key"),
        ("bad address", toml(dict(changed_a, c=echo(c) | {"listen": "127.0.0.1:99999"})),
         "services.c.listen: bad listen address"),
        ("no port", toml(dict(changed_a, c=echo(c) | {"listen": "localhost"})),
         "services.c.listen: bad listen address"),
        ("unknown upstream host", toml(dict(changed_a, p={
            "kind": "proxy", "listen": f"127.0.0.1:{c}", "upstreams": [f"127.0.0.1:{a}", "nosuch.invalid:80"]})),
         "services.p.upstreams[1]: cannot resolve host 'nosuch.invalid'"),
        ("port in use", toml(dict(changed_a, c=echo(busy_port))),
         f"cannot listen on 127.0.0.1:{busy_port}: address already in use"),
        ("duplicate listen", toml(dict(changed_a, c=echo(a))),
         "services.c.listen: address 127.0.0.1:"),
    ]

    async def still_serving() -> None:
        assert await roundtrip(a, 3) == b"a1\nhello"
        assert await roundtrip(b) == b"hello"
        services = by_name(await prog.status())
        assert sorted(services) == ["a", "b"]
        assert all(set(s["generations"].values()) == {1} for s in services.values())
        status = await prog.status()
        for w in status["workers"]:
            assert sorted(w["sites"]) == ["a", "b"], w   # nothing staged or half-added anywhere

    async def main() -> None:
        await prog.wait_ready()
        long = await EchoClient.open(a, 3)
        for what, text, expected in bad_cases:
            cfg.write_text(text)
            code, out, err = await prog.cli("reload", "-c", src)
            assert code == 1, (what, out, err)
            first = err.splitlines()[0]
            assert first.startswith("reload failed: "), (what, err)
            assert expected in first, (what, err)
            if what != "port in use":
                assert src in first, (what, err)    # names the file
            assert "Traceback" not in out + err
            if what != "port in use":
                # `check` says the same, in one line; binding is the reload's business
                code, out, err = await prog.cli("check", "-c", src)
                assert code == 1 and out == "" and len(err.splitlines()) == 1, (what, out, err)
                assert expected in err
            await still_serving()
            await long.check()

        # SIGHUP with a bad file: logged, nothing changes, the master lives on
        cfg.write_text(toml(dict(changed_a, c=echo(busy_port))))
        prog.signal(signal.SIGHUP)

        async def failed_reload_logged() -> bool:
            last = (await prog.status())["last_reload"]
            return last["seq"] == len(bad_cases) + 2 and "reload failed: " in prog.log()

        await eventually(failed_reload_logged)
        assert prog.proc.poll() is None
        await still_serving()

        # and a good file applies
        busy.close()
        cfg.write_text(toml(changed_a))
        code, out, err = await prog.cli("reload", "-c", src)
        assert code == 0, out + err
        assert await roundtrip(a, 3) == b"a2\nhello"
        await long.check()
        await long.close()
        assert "Traceback" not in prog.log()

    try:
        run(main(), 150)
    finally:
        busy.close()


def test_a_failure_on_one_worker_rolls_back_all(start: Start, tmp_path: Path) -> None:
    a, f, g = (free_port() for _ in range(3))
    v1 = {"a": echo(a, "a1\n"), "f": {"kind": "fail_on_worker", "listen": f"127.0.0.1:{f}", "greeting": "f1\n"}}
    prog = start(toml(v1), test_kinds=True)
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        # prepare order: g (added), then a and f (changed): g and a are staged on
        # both workers before f fails on worker 1 only
        v2 = {"g": echo(g, "g2\n"), "a": echo(a, "a2\n"), "f": dict(v1["f"], greeting="f2\n", fail_worker=1)}
        cfg.write_text(toml(v2))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 1, out + err
        assert "injected failure on worker 1" in err and "worker 1" in err, err
        assert "failure: prepare (worker 1, service 'f')" in err, err
        assert "the old config keeps serving" in err
        assert "Traceback" not in err

        status = await prog.status()
        for w in status["workers"]:
            assert sorted(w["sites"]) == ["a", "f"], w   # g was bound, then dropped, on both
        for name in ("a", "f"):
            assert set(by_name(status)[name]["generations"].values()) == {1}
        assert await refuses(g)
        # many connections: both workers still serve version 1
        for _ in range(20):
            assert await roundtrip(a, 3) == b"a1\nhello"
            assert await roundtrip(f, 3) == b"f1\nhello"
        accepted = [w for w in status["workers"]]
        assert len(accepted) == 2

        # without the fault the same change applies everywhere
        v2["f"] = dict(v2["f"], fail_worker=-1)
        cfg.write_text(toml(v2))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0, out + err
        assert await roundtrip(a, 3) == b"a2\nhello"
        assert await roundtrip(g, 3) == b"g2\nhello"

    run(main(), 90)


def test_a_reload_asked_for_during_another_runs_after_it(start: Start) -> None:
    a, s = free_port(), free_port()
    slow = {"kind": "fail_on_worker", "listen": f"127.0.0.1:{s}", "greeting": "s1\n"}
    prog = start(toml({"a": echo(a, "a1\n"), "s": slow}), test_kinds=True)
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        # v2 prepares until the test lets it (the slow service builds until `release` exists)
        release = cfg.parent / "release"
        cfg.write_text(toml({"a": echo(a, "a2\n"),
                             "s": dict(slow, greeting="s2\n", wait_file=str(release))}))
        prog.signal(signal.SIGHUP)

        async def reloading() -> bool:
            return bool((await prog.status())["reloading"])

        async def queued() -> bool:
            return bool((await prog.status()).get("reload_queued", 0) >= 1)

        await eventually(reloading)
        assert await roundtrip(a, 3) == b"a1\nhello"   # the old version serves while v2 prepares
        asked = asyncio.ensure_future(prog.cli("reload", "-c", str(cfg)))
        try:
            await eventually(queued, timeout=30)          # the second reload waits...
            assert not asked.done()
        finally:
            release.touch()                               # ...until the first is done
        code, out, err = await asked
        assert code == 0, out + err
        # it waited for the SIGHUP reload, then found nothing left to do
        assert out.startswith("reload ok: added=[] changed=[] removed=[] unchanged=[a,s]"), out
        last = (await prog.status())["last_reload"]
        assert last["seq"] == 3 and last["trigger"] == "admin"
        assert "reload ok: added=[] changed=[a,s]" in prog.log()
        assert await roundtrip(a, 3) == b"a2\nhello"
        assert await roundtrip(s, 3) == b"s2\nhello"

    run(main(), 60)


# -- stopping ----------------------------------------------------------------------------


def test_sigterm_drains_open_connections_then_exits_0(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a)}, drain=30.0))

    async def main() -> None:
        await prog.wait_ready()
        workers = list(prog.worker_pids)
        assert len(workers) == 2 and prog.alive_workers() == workers
        long = await EchoClient.open(a)
        await long.check()
        prog.signal(signal.SIGTERM)
        await eventually(lambda: refuses(a))     # stops accepting at once...
        for _ in range(3):
            await long.check()                   # ...but the open connection goes on
        status = await prog.status()             # and the master, draining, still answers
        assert status["stopping"] == "graceful" and prog.proc.poll() is None, status
        await long.close()                       # the last connection ends: the drain is over
        assert await prog.wait_exit() == 0
        await eventually(lambda: not prog.alive_workers())   # the same workers, all gone
        log = prog.log()
        assert "stopping (graceful)" in log and "Traceback" not in log

    run(main(), 60)


def test_drain_timeout_bounds_a_graceful_stop(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a)}, drain=0.5))

    async def main() -> None:
        await prog.wait_ready()
        long = await EchoClient.open(a)
        await long.check()
        prog.signal(signal.SIGINT)
        assert await prog.wait_exit() == 0
        # the drain timed out: the connection was closed
        assert await asyncio.wait_for(long.reader.read(), 10) == b""
        await long.close()

    run(main(), 60)


def test_a_second_stop_signal_while_draining_stops_at_once(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a)}, drain=60.0))

    async def main() -> None:
        await prog.wait_ready()
        long = await EchoClient.open(a)
        await long.check()
        prog.signal(signal.SIGTERM)
        await eventually(lambda: refuses(a))
        await long.check()                       # draining...
        prog.signal(signal.SIGINT)               # ...until the operator insists
        assert await prog.wait_exit(30) == 0
        try:
            assert await asyncio.wait_for(long.reader.read(), 10) == b""
        except ConnectionResetError:
            pass                                 # killed workers may reset it: cut either way
        await long.close()
        assert "stopping at once" in prog.log()

    run(main(), 60)


def test_sigquit_stops_at_once(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a)}, drain=30.0))

    async def main() -> None:
        await prog.wait_ready()
        long = await EchoClient.open(a)
        await long.check()
        prog.signal(signal.SIGQUIT)
        assert await prog.wait_exit(20) == 0
        await eventually(lambda: not prog.alive_workers())
        await long.check_cut()
        await long.close()

    run(main(), 60)


def test_cli_stop_waits_until_stopped(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a)}, drain=5.0, pidfile="hotproxy.pid"))
    assert prog.config is not None
    pidfile = prog.config.parent / "hotproxy.pid"

    async def main() -> None:
        await prog.wait_ready()
        assert pidfile.read_text().strip() == str(prog.pid)
        code, out, err = await prog.cli("stop", "-c", str(prog.config))
        assert code == 0, err
        assert f"stopped hotproxy (pid {prog.pid})" in out
        assert await prog.wait_exit(10) == 0
        assert not pidfile.exists()
        assert not Path(prog.socket_path()).exists()
        # nobody is there any more: one line, exit 1
        code, out, err = await prog.cli("status", "-c", str(prog.config))
        assert code == 1 and err.startswith("hotproxy: error: no hotproxy is running") and len(err.splitlines()) == 1

    run(main(), 60)


# -- the admin socket ------------------------------------------------------------------------


def test_admin_socket_rejects_garbage_without_disturbing_service(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a)}))

    async def main() -> None:
        await prog.wait_ready()
        path = prog.socket_path()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        long = await EchoClient.open(a)
        reader, writer = await asyncio.open_unix_connection(path)
        for request, expected in [
            (b"not json\n", "malformed request: not JSON"),
            (b"[1, 2]\n", "malformed request"),
            (b'{"command": "status"}\n', "malformed request"),
            (b'{"cmd": "explode"}\n', "unknown command 'explode'"),
            (b'{"cmd": "stop", "graceful": "maybe"}\n', "graceful must be true or false"),
            (b"\xff\xfe\n", "malformed request"),
        ]:
            writer.write(request)
            reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
            assert reply["ok"] is False and expected in reply["error"], (request, reply)
        # the same connection still works for a good request
        writer.write(b'{"cmd": "status"}\n')
        reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
        assert reply["ok"] and reply["status"]["ready"]
        # an oversized line: an error, and that client is hung up on
        writer.write(b"x" * (70 * 1024) + b"\n")
        reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
        assert reply["ok"] is False and "longer than" in reply["error"]
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        # a client that connects and says nothing, then vanishes
        _, idle = await asyncio.open_unix_connection(path)
        idle.close()
        await long.check()
        assert await roundtrip(a) == b"hello"
        assert prog.proc.poll() is None
        assert (await prog.status())["ready"]
        await long.close()

    run(main(), 60)


def test_second_instance_on_the_same_admin_socket_refuses_to_start(start: Start, tmp_path: Path) -> None:
    a, b = free_port(), free_port()
    first = start(toml({"a": echo(a)}))

    async def main() -> None:
        await first.wait_ready()
        second = start(toml({"b": echo(b)}), name="second.toml")
        assert await second.wait_exit(30) == 1
        assert "another hotproxy is running on it" in second.log()
        assert "Traceback" not in second.log()
        assert await roundtrip(a) == b"hello"

    run(main(), 60)


def test_run_rejects_a_bad_file_and_a_busy_port_before_serving(start: Start, tmp_path: Path) -> None:
    a = free_port()
    busy = socket.socket()
    busy.bind(("127.0.0.1", a))
    busy.listen()

    async def main() -> None:
        bad = start("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:1'\nport = 3\n", name="bad.toml")
        assert await bad.wait_exit(30) == 1
        log = bad.log().strip()
        assert log.endswith("services.x.port: unknown key (expected one of: kind, listen, backlog, greeting, "
                            "max_connections)") and len(log.splitlines()) == 1, log
        taken = start(toml({"a": echo(a)}), name="taken.toml")
        assert await taken.wait_exit(30) == 1
        assert f"cannot listen on 127.0.0.1:{a}: address already in use" in taken.log()
        assert "Traceback" not in taken.log()

    try:
        run(main(), 60)
    finally:
        busy.close()


# -- the embedded default ------------------------------------------------------------------


@needs_proxy
def test_hotproxy_run_serves_the_embedded_default(start: Start, tmp_path: Path) -> None:
    for port in (7700, 7701):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip(f"port {port} of the default config is in use")
    prog = start(None, env={"XDG_RUNTIME_DIR": str(tmp_path)})

    async def main() -> None:
        await prog.wait_ready()
        assert await roundtrip(7701) == b"hello"     # the proxy, in front of the echo
        assert await roundtrip(7700) == b"hello"
        log = prog.log()
        assert "serving the embedded default config" in log and 'listen = "127.0.0.1:7701"' in log
        code, out, err = await prog.cli("status")
        assert code == 0 and "<embedded default>" in out, err
        code, out, err = await prog.cli("stop")
        assert code == 0, err
        assert await prog.wait_exit(20) == 0

    run(main(), 60)


# -- supervision -------------------------------------------------------------------------------


def test_a_killed_worker_comes_back_serving_the_current_config(start: Start) -> None:
    a, b = free_port(), free_port()
    prog = start(toml({"a": echo(a, "a1\n")}))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        status = await prog.wait_ready()
        cfg.write_text(toml({"a": echo(a, "a2\n")}))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0, out + err
        victim = status["workers"][1]["pid"]
        os.kill(victim, signal.SIGKILL)

        async def back() -> bool:
            s = await prog.status()
            return s["restarts"] == 1 and all(w["alive"] and w["sites"] == ["a"] for w in s["workers"])

        await eventually(back, timeout=30)
        status = await prog.status()
        assert victim not in [w["pid"] for w in status["workers"]]
        prog.worker_pids += [w["pid"] for w in status["workers"]]
        for _ in range(20):   # both workers, the restarted one included, serve version 2
            assert await roundtrip(a, 3) == b"a2\nhello"
        # and reloads go on as before
        cfg.write_text(toml({"a": echo(a, "a2\n"), "b": echo(b, "b3\n")}))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0 and "added=[b]" in out and "unchanged=[a]" in out, out + err
        assert await roundtrip(b, 3) == b"b3\nhello"

    run(main(), 90)


def test_workers_exit_when_the_master_dies(start: Start) -> None:
    a = free_port()
    prog = start(toml({"a": echo(a)}))

    async def main() -> None:
        await prog.wait_ready()
        assert len(prog.alive_workers()) == 2
        prog.proc.kill()
        prog.proc.wait()
        await eventually(lambda: not prog.alive_workers(), timeout=30)
        await eventually(lambda: refuses(a))

    run(main(), 60)


# -- the proxy through reloads -------------------------------------------------------------------


@needs_proxy
def test_a_proxy_is_changed_in_place_without_cutting_its_connections(start: Start, core_name: str) -> None:
    """On both cores: the workers inherit the core the ``core_name`` fixture selects."""
    e1, e2, px = (free_port() for _ in range(3))
    proxy = {"kind": "proxy", "listen": f"127.0.0.1:{px}", "upstreams": [f"127.0.0.1:{e1}"]}
    v1 = {"e1": echo(e1, "e1\n"), "e2": echo(e2, "e2\n"), "px": proxy}
    prog = start(toml(v1))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        long = await EchoClient.open(px, 3)
        assert long.greeting == b"e1\n"
        shorts = ShortLoop({px: {b"e1\n", b"e2\n"}}).start()
        try:
            await eventually(lambda: shorts.ok >= 10)
            # point the proxy at e2, with other options: changed in place
            v2 = dict(v1, px=dict(proxy, upstreams=[f"127.0.0.1:{e2}"], balance="least_conn", connect_timeout=1.5))
            cfg.write_text(toml(v2))
            code, out, err = await prog.cli("reload", "-c", str(cfg))
            assert code == 0, out + err
            assert out.startswith("reload ok: added=[] changed=[px] removed=[] unchanged=[e1,e2]"), out
            assert await roundtrip(px, 3) == b"e2\nhello"
            await long.check()          # still relayed to e1, never cut
            n = shorts.ok
            await eventually(lambda: shorts.ok >= n + 10)
            await shorts.stop()
            assert shorts.failures == [], shorts.failures[:5]
            services = by_name(await prog.status())
            assert set(services["px"]["generations"].values()) == {2}
            assert set(services["e1"]["generations"].values()) == {1}
            assert services["px"]["totals"]["accepted"] >= shorts.ok
            await long.check()
        finally:
            shorts.cancel()
            await long.close()
        assert "exited with" not in prog.log()    # no worker died on the way

    run(main(), 90)


# -- issue 13: every bad input one line; nothing half-works --------------------------------------


def proxy(port: int, upstreams: list[str], **kw: Any) -> dict[str, Any]:
    return {"kind": "proxy", "listen": f"127.0.0.1:{port}", "upstreams": upstreams, **kw}


async def _last_seq(prog: Program, seq: int) -> dict[str, Any] | None:
    last = (await prog.status())["last_reload"]
    return last if last is not None and last["seq"] == seq else None


def test_a_file_the_parser_cannot_read_is_one_line_everywhere(start: Start) -> None:
    """Arrays nested 600 deep and a 5,000-digit integer: ``check``, ``reload -c`` and ``status -c``
    print one line, the admin socket replies, SIGHUP logs one outcome line; the old config serves."""
    a = free_port()
    prog = start(toml({"a": echo(a, "a1\n")}))
    cfg = prog.config
    assert cfg is not None
    src = str(cfg)
    head = '[runtime]\nadmin_socket = "admin.sock"\n'
    cases = [(head + "x = " + "[" * 600 + "]" * 600 + "\n", "arrays or tables nested too deeply to read (more than a few hundred levels)"),
             (head + "workers = " + "9" * 5000 + "\n", "an integer too long to read (more than 4300 digits)")]

    async def main() -> None:
        await prog.wait_ready()
        long = await EchoClient.open(a, 3)
        seq = 1
        for text, expected in cases:
            cfg.write_text(text)
            code, out, err = await prog.cli("check", "-c", src)
            assert (code, out, err) == (1, "", f"hotproxy: error: {src}: {expected}\n"), (code, out, err)
            code, out, err = await prog.cli("reload", "-c", src)
            seq += 1
            assert code == 1 and out == "" and len(err.splitlines()) == 1, (out, err)
            assert err.startswith(f"reload failed: {src}: {expected}; the old config keeps serving"), err
            code, out, err = await prog.cli("status", "-c", src)
            assert code == 0 and f"last reload #{seq} (admin)" in out, (out, err)

            reader, writer = await asyncio.open_unix_connection(prog.socket_path())
            writer.write(b'{"cmd": "reload"}\n')
            reply = json.loads(await asyncio.wait_for(reader.readline(), 30))
            writer.close()
            await writer.wait_closed()
            seq += 1
            assert reply["ok"] is False and reply["report"]["error"] == f"{src}: {expected}", reply

            before = len(prog.log().splitlines())
            prog.signal(signal.SIGHUP)
            seq += 1
            last = await eventually(lambda: _last_seq(prog, seq))
            assert not last["ok"] and last["trigger"] == "SIGHUP" and last["error"] == f"{src}: {expected}"
            new = await eventually(lambda: prog.log().splitlines()[before:])
            assert len(new) == 1 and f"reload failed: {src}: {expected}; the old config keeps serving" in new[0], new
            print(f"SIGHUP with {expected!r}: {len(new)} log line")

            assert await roundtrip(a, 3) == b"a1\nhello"
            await long.check()
        log = prog.log()
        assert "Traceback" not in log and "Task exception" not in log and "RecursionError" not in log
        await long.close()

    run(main(), 90)


def test_a_pidfile_that_is_not_hotproxys_is_never_overwritten_or_deleted(start: Start, tmp_path: Path) -> None:
    a = free_port()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")

    async def main() -> None:
        # the config file itself: check and run refuse it, and the file is left as it was
        text = toml({"a": echo(a)}, pidfile="self.toml", admin="self.sock")
        itself = start(text, name="self.toml")
        assert await itself.wait_exit(30) == 1
        assert (tmp_path / "self.toml").read_text() == text
        assert f"runtime.pidfile: {tmp_path}/self.toml is the config file itself" in itself.log()
        code, out, err = await itself.cli("check", "-c", str(tmp_path / "self.toml"))
        assert code == 1 and len(err.splitlines()) == 1 and "is the config file itself" in err, err

        # a file with other content: check and run refuse it
        other = start(toml({"a": echo(a)}, pidfile="notes.txt", admin="notes.sock"), name="notes.toml")
        assert await other.wait_exit(30) == 1
        assert notes.read_text() == "my notes\n"
        assert f"pidfile {notes}: exists and does not hold a process id; refusing to overwrite it" in other.log()
        code, out, err = await other.cli("check", "-c", str(tmp_path / "notes.toml"))
        assert code == 1 and len(err.splitlines()) == 1 and "does not hold a process id" in err, err

        # a pidfile replaced while hotproxy runs (a supervisor writing its own) is not hotproxy's to delete
        prog = start(toml({"a": echo(a)}, pidfile="hp.pid", admin="hp.sock"), name="hp.toml")
        await prog.wait_ready()
        pidfile = tmp_path / "hp.pid"
        assert pidfile.read_text() == f"{prog.pid}\n"
        theirs = tmp_path / "theirs.pid"
        theirs.write_text(f"{prog.pid}\n")
        theirs.replace(pidfile)
        code, out, err = await prog.cli("stop", "-c", str(tmp_path / "hp.toml"))
        assert code == 0, err
        assert await prog.wait_exit(20) == 0
        assert pidfile.read_text() == f"{prog.pid}\n"
        assert "Traceback" not in itself.log() + other.log() + prog.log()

    run(main(), 90)


@needs_proxy
def test_a_proxy_loop_is_refused_by_check_and_reload_while_traffic_goes_on(start: Start) -> None:
    e, px, q = free_port(), free_port(), free_port()
    good = {"e": echo(e, "e1\n"), "px": proxy(px, [f"127.0.0.1:{e}"])}
    prog = start(toml(good))
    cfg = prog.config
    assert cfg is not None
    src = str(cfg)
    cases = [
        (dict(good, px=proxy(px, [f"127.0.0.1:{px}"])),
         f"services.px.upstreams[0]: '127.0.0.1:{px}' leads back to this proxy's own listen address "
         f"(127.0.0.1:{px}): a proxy loop (px -> px)"),
        (dict(good, px=proxy(px, [f"127.0.0.1:{e}", f"localhost:{px}"])),
         f"services.px.upstreams[1]: 'localhost:{px}' leads back to this proxy's own listen address"),
        (dict(good, px=proxy(px, [f"127.0.0.1:{q}"]), q=proxy(q, [f"127.0.0.1:{px}"])),
         f"services.px.upstreams[0]: '127.0.0.1:{q}' reaches services.q (127.0.0.1:{q}), whose upstreams lead "
         "back to this proxy: a proxy loop (px -> q -> px)"),
    ]

    async def still_serving() -> None:
        assert await roundtrip(px, 3) == b"e1\nhello"
        services = by_name(await prog.status())
        assert sorted(services) == ["e", "px"]
        assert all(set(s["generations"].values()) == {1} for s in services.values())

    async def main() -> None:
        await prog.wait_ready()
        long = await EchoClient.open(px, 3)
        for text, expected in ((toml(c), x) for c, x in cases):
            cfg.write_text(text)
            code, out, err = await prog.cli("check", "-c", src)
            assert code == 1 and out == "" and err.startswith(f"hotproxy: error: {src}: "), err
            assert len(err.splitlines()) == 1 and expected in err, err
            code, out, err = await prog.cli("reload", "-c", src)
            assert code == 1 and len(err.splitlines()) == 1 and err.startswith(f"reload failed: {src}: "), err
            assert expected in err, err
            await still_serving()
            await long.check()
        cfg.write_text(toml(cases[0][0]))      # the self-loop once more, by signal
        prog.signal(signal.SIGHUP)
        last = await eventually(lambda: _last_seq(prog, 1 + len(cases) + 1))
        assert not last["ok"] and "a proxy loop (px -> px)" in last["error"], last
        await still_serving()
        # a proxy in front of another proxy of this instance is no loop
        cfg.write_text(toml(dict(good, px=proxy(px, [f"127.0.0.1:{q}"]), q=proxy(q, [f"127.0.0.1:{e}"]))))
        code, out, err = await prog.cli("reload", "-c", src)
        assert code == 0 and out.startswith("reload ok: added=[q] changed=[px]"), out + err
        assert await roundtrip(px, 3) == b"e1\nhello"
        await long.check()
        await long.close()
        assert "Traceback" not in prog.log()

    run(main(), 90)


def test_an_empty_file_never_empties_hotproxy_unless_asked_for(start: Start, tmp_path: Path) -> None:
    """No admin_socket in the file: the CLI finds the instance of the emptied file by the socket
    derived from its path, and the instance refuses it (SIGHUP always)."""
    a = free_port()
    prog = start(f"[runtime]\nworkers = 2\n\n[services.a]\nkind = 'echo'\nlisten = '127.0.0.1:{a}'\n",
                 name="e.toml", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    cfg = prog.config
    assert cfg is not None
    src = str(cfg)

    async def main() -> None:
        await prog.wait_ready()
        long = await EchoClient.open(a)
        cfg.write_text("# emptied by mistake\n")
        prog.signal(signal.SIGHUP)
        last = await eventually(lambda: _last_seq(prog, 2))
        assert not last["ok"] and last["error"].startswith(f"{src}: no services") and \
            last["error"].endswith("hotproxy reload --allow-empty; a signal never empties hotproxy)"), last
        code, out, err = await prog.cli("reload", "-c", src)
        assert code == 1 and len(err.splitlines()) == 1, err
        assert err.startswith(f"reload failed: {src}: no services (expected at least one [services.NAME] table; "
                              "a config that serves nothing is only accepted on purpose: hotproxy reload "
                              "--allow-empty)"), err
        code, out, err = await prog.cli("check", "-c", src)
        assert code == 1 and "--allow-empty" in err and len(err.splitlines()) == 1, err
        assert await prog.admin("reload", allow_empty="yes") == \
            {"ok": False, "error": "malformed request: allow_empty must be true or false"}
        assert await roundtrip(a) == b"hello"
        await long.check()

        code, out, err = await prog.cli("reload", "--allow-empty", "-c", src)
        assert code == 0 and out.startswith("reload ok: added=[] changed=[] removed=[a] unchanged=[]"), out + err
        await eventually(lambda: refuses(a))
        await long.check()           # a removed service drains: its connections go on
        await long.close()
        assert (await prog.status())["services"] == [] and prog.proc.poll() is None

    run(main(), 60)


def test_check_probes_this_host_and_counts_the_running_instances_addresses_as_free(
        start: Start, tmp_path: Path) -> None:
    a, b, busy_port, c = (free_port() for _ in range(4))
    good = {"a": echo(a, "a1\n"), "b": echo(b)}
    prog = start(toml(good))
    cfg = prog.config
    assert cfg is not None
    src = str(cfg)
    busy = socket.socket()
    busy.bind(("127.0.0.1", busy_port))   # a stranger holds this port (no SO_REUSEPORT)
    busy.listen()

    def unix(path: str) -> dict[str, Any]:
        return {"kind": "echo", "listen": f"unix:{path}"}

    cases = [  # (file, what check and a reload say, whether a reload can be asked: the socket moves in the last)
        (toml(dict(good, c=echo(busy_port))),
         f"services.c.listen: cannot listen on 127.0.0.1:{busy_port}: address already in use", True),
        (toml(dict(good, c=echo(c) | {"listen": f"192.0.2.1:{c}"})),
         f"cannot listen on 192.0.2.1:{c}: not an address of this host", True),
        (toml(dict(good, c=echo(c) | {"listen": f"[2001:db8::1]:{c}"})),
         f"cannot listen on [2001:db8::1]:{c}: ", True),
        (toml(dict(good, c=unix("no/such/dir/c.sock"))),
         f"services.c.listen: cannot listen on unix:{tmp_path}/no/such/dir/c.sock: directory", True),
        (toml(dict(good, c=unix("hotproxy.toml"))),
         f"services.c.listen: unix:{src} is the config file itself", True),
        (toml(dict(good, c=unix("admin.sock"))),
         f"services.c.listen: unix:{tmp_path}/admin.sock is the admin socket", True),
        (toml(good, admin="no/such/dir/admin.sock"),
         f"runtime.admin_socket: {tmp_path}/no/such/dir/admin.sock: directory {tmp_path}/no/such/dir does not exist",
         False),
    ]

    async def main() -> None:
        await prog.wait_ready()
        code, out, err = await prog.cli("check", "-c", src)
        assert code == 0, err
        assert f"  note: 2 listen addresses held by the running hotproxy of this file (pid {prog.pid}) counted " \
               "as free: a reload keeps or moves them" in out.splitlines(), out
        for text, expected, reload in cases:
            cfg.write_text(text)
            code, out, err = await prog.cli("check", "-c", src)
            assert code == 1 and out == "" and len(err.splitlines()) == 1, (expected, out, err)
            assert err.startswith(f"hotproxy: error: {src}: ") and expected in err, (expected, err)
            if reload:
                code, out, err = await prog.cli("reload", "-c", src)
                assert code == 1 and err.startswith("reload failed: "), (expected, out, err)
            cfg.write_text(toml(good))     # (the test finds the admin socket in the file too)
            assert await roundtrip(a, 3) == b"a1\nhello"
            services = by_name(await prog.status())
            assert sorted(services) == ["a", "b"]
            assert all(set(s["generations"].values()) == {1} for s in services.values())
        assert "Traceback" not in prog.log()

    try:
        run(main(), 90)
    finally:
        busy.close()
