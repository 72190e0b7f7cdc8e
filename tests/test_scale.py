"""Many services (issue 18): a reload costs what it changes, status answers at once.

Real ``hotproxy run`` programs with a few hundred services (the benchmark,
``bench/scale.py``, measures 10,000), the real CLI, ``/proc`` for the
descriptor limits.  Nothing here asserts on timing: what a reload sent is
counted by the workers themselves (``commands`` in their status), and a
status "during" a reload is one whose reply says a reload is running.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from conftest import eventually, free_port, run
from helpers_program import EchoClient, Program, roundtrip, toml

Start = Callable[..., Program]

#: services per test instance: enough to show what scales, quick to start
N = 300


def echoes(ports: list[int], changed: dict[int, str] | None = None) -> dict[str, dict[str, Any]]:
    changed = changed or {}
    return {f"s{i:03d}": {"kind": "echo", "listen": f"127.0.0.1:{port}", "greeting": changed.get(i, "")}
            for i, port in enumerate(ports)}


def commands(status: dict[str, Any]) -> list[int]:
    """How many commands each worker has run so far."""
    return [w["commands"] for w in status["workers"]]


def test_a_one_service_reload_sends_work_only_for_that_service(start: Start) -> None:
    """300 services, 2 workers: reloading the file unchanged sends the workers
    no command at all; changing one service sends each worker exactly that
    service's two (Precommit, Update) -- counted by the workers.  The report
    line names the 299 unchanged ones in a bounded line."""
    ports = [free_port() for _ in range(N)]
    prog = start(toml(echoes(ports)))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready(120)
        before = commands(await prog.status())
        assert min(before) >= N, before   # each worker built (and served) every service
        code, out, err = await prog.cli("reload", "-c", str(cfg), timeout=120)
        assert code == 0, out + err
        assert out.startswith("reload ok: added=[] changed=[] removed=[] unchanged=[s000,"), out
        assert f"+{N - 20} more]" in out.splitlines()[0], out
        assert commands(await prog.status()) == before          # nothing sent

        cfg.write_text(toml(echoes(ports, {150: "v2\n"})))
        code, out, err = await prog.cli("reload", "-c", str(cfg), timeout=120)
        assert code == 0, out + err
        assert out.startswith("reload ok: added=[] changed=[s150] removed=[]"), out
        after = commands(await prog.status())
        print(f"commands per worker: {before} at start, {after} after a 1-service reload among {N}")
        assert [a - b for a, b in zip(after, before)] == [2, 2], (before, after)
        report = (await prog.status())["last_reload"]
        assert report["changed"] == ["s150"] and len(report["unchanged"]) == N - 1
        assert report["load_ms"] > 0
        assert {(await roundtrip(ports[150], 3))[:3] for _ in range(10)} == {b"v2\n"}

    run(main(), 240)


def test_a_one_service_reload_asks_only_that_service_for_its_health_checks(start: Start, tmp_path: Path) -> None:
    """300 services of a test kind that writes a line each time the master
    asks its factory for its active health checks: a reload changing one of
    them asks that one only (its staged and deployed factory, in prepare and
    commit) -- the master no longer walks every deployment's factory at each
    phase of a reload (which cost ~40 ms per phase at 10,000 services).
    Before, the 1-service reload asked 600 times (300 per phase)."""
    ports = [free_port() for _ in range(N)]
    asks = tmp_path / "asks"

    def text(changed: dict[int, str] | None = None) -> str:
        changed = changed or {}
        return toml({f"s{i:03d}": {"kind": "count_health_asks", "listen": f"127.0.0.1:{port}",
                                   "greeting": changed.get(i, ""), "asks_file": str(asks)}
                     for i, port in enumerate(ports)})

    prog = start(text(), test_kinds=True)
    cfg = prog.config
    assert cfg is not None

    def master_asks() -> int:
        lines = asks.read_text().split() if asks.exists() else []
        return lines.count(str(prog.pid))

    async def main() -> None:
        await prog.wait_ready(120)
        at_start = master_asks()
        before = commands(await prog.status())
        cfg.write_text(text({150: "v2\n"}))
        code, out, err = await prog.cli("reload", "-c", str(cfg), timeout=120)
        assert code == 0, out + err
        assert out.startswith("reload ok: added=[] changed=[s150] removed=[]"), out
        after = commands(await prog.status())
        assert [a - b for a, b in zip(after, before)] == [2, 2], (before, after)
        n = master_asks() - at_start
        print(f"health-check asks by the master: {at_start} at the start of {N} services, "
              f"{n} for a 1-service reload")
        assert 1 <= n <= 4, n   # stamp the Precommit; follow staged + deployed; follow deployed
        assert {(await roundtrip(ports[150], 3))[:3] for _ in range(10)} == {b"v2\n"}

    run(main(), 240)


def test_the_diff_of_a_file_loaded_against_the_running_config_looks_at_its_fresh_services_only() -> None:
    """``reload.diff_fresh`` (a config loaded against the running one: every
    service it did not check and build is the running object) gives what
    the full ``diff`` gives, on 3,000 random pairs of tables -- added,
    changed, moved, removed, unchanged (equal by value too), in order."""
    import random

    from hotproxy.reload import diff, diff_fresh

    class Svc:
        def __init__(self, value: int, listener: int) -> None:
            self.value, self.listener = value, listener

        def same_as(self, other: Any) -> bool:
            return self is other or (self.value == other.value and self.listener == other.listener)

    rng = random.Random(18)
    for _ in range(3000):
        old = {f"s{i}": Svc(rng.randint(0, 2), rng.randint(0, 1)) for i in rng.sample(range(12), rng.randint(0, 10))}
        new: dict[str, Any] = {}
        fresh = []
        for i in rng.sample(range(12), rng.randint(0, 10)):
            name = f"s{i}"
            if name in old and rng.random() < 0.5:
                new[name] = old[name]
            else:
                new[name] = Svc(rng.randint(0, 2), rng.randint(0, 1))
                fresh.append(name)
        assert vars(diff_fresh(old, new, fresh)) == vars(diff(old, new)), (old, new, fresh)  # type: ignore[arg-type]


def _echoes_and_proxies() -> tuple[list[int], dict[str, dict[str, Any]]]:
    """N services on free ports: even ones echoes, each odd one a proxy to the echo before it."""
    ports = [free_port() for _ in range(N)]
    services: dict[str, dict[str, Any]] = {}
    for i, port in enumerate(ports):
        services[f"s{i:03d}"] = ({"kind": "echo", "listen": f"127.0.0.1:{port}"} if i % 2 == 0 else
                                 {"kind": "proxy", "listen": f"127.0.0.1:{port}",
                                  "upstreams": [f"127.0.0.1:{ports[i - 1]}"]})
    return ports, services


def test_loading_a_file_runs_no_garbage_collection(tmp_path: Path) -> None:
    """The real ``hotproxy check`` CLI (its ``main`` in a fresh interpreter,
    with a ``gc.callbacks`` hook that counts the collections made while
    ``config`` loads a file) on 300 services: none.  A load allocates some
    40 objects per service, none of them garbage in a cycle; the full
    collections that allocation triggered walked the whole heap again and
    again (a master holding 10,000 services, the check of 10,000).  Before:
    12 collections during this load."""
    ports, services = _echoes_and_proxies()
    cfg = tmp_path / "many.toml"
    cfg.write_text(toml(services, admin=str(tmp_path / "admin.sock")))
    script = (
        "import gc, sys\n"
        "counts = {'load': 0, 'other': 0}\n"
        "def seen(phase, info):\n"
        "    if phase != 'start':\n"
        "        return\n"
        "    f, where = sys._getframe(0).f_back, 'other'\n"
        "    for _ in range(200):\n"
        "        if f is None:\n"
        "            break\n"
        "        if f.f_code.co_name == 'load_config' and f.f_code.co_filename.endswith('config.py'):\n"
        "            where = 'load'\n"
        "            break\n"
        "        f = f.f_back\n"
        "    counts[where] += 1\n"
        "gc.callbacks.append(seen)\n"
        "from hotproxy.cli import main\n"
        "code = main(['check', '-c', sys.argv[1]])\n"
        "print('collections', counts, file=sys.stderr)\n"
        "sys.exit(code)\n")

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(cfg),
                                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        text = err.decode()
        print(text.strip())
        assert proc.returncode == 0, out.decode() + text
        assert out.decode().startswith(f"{cfg}: ok: {N} services: s000 (echo on 127.0.0.1:"), out
        found = re.search(r"collections \{'load': (\d+), 'other': (\d+)\}", text)
        assert found is not None, text
        assert int(found.group(1)) == 0, text

    run(main(), 150)


def test_a_reload_checks_and_builds_only_the_services_it_changes(start: Start) -> None:
    """300 services: a reload's load takes every service whose table is the
    same as the running one's as it is -- not checked and built again
    (``reused`` in the report) -- except one whose upstream is a host name
    (``localhost``), which is looked up at every reload.  The checks across
    services still cover the reused ones: a new service on the address of an
    unchanged one is refused, one line, nothing applied."""
    ports = [free_port() for _ in range(N)]

    def services(changed: dict[int, str] | None = None) -> dict[str, dict[str, Any]]:
        out = echoes(ports[:-1], changed)
        out["named"] = {"kind": "proxy", "listen": f"127.0.0.1:{ports[-1]}", "upstreams": [f"localhost:{ports[0]}"]}
        return out

    prog = start(toml(services()))
    cfg = prog.config
    assert cfg is not None

    async def reload() -> dict[str, Any]:
        reply = await prog.admin("reload")
        return dict(reply["report"])

    async def main() -> None:
        await prog.wait_ready(120)
        report = await reload()
        print(f"unchanged file: reused {report['reused']} of {N}")
        assert report["ok"] and report["unchanged"] and len(report["unchanged"]) == N, report["error"]
        assert report["reused"] == N - 1          # all but the one with a host name
        cfg.write_text(toml(services({150: "v2\n"})))
        report = await reload()
        print(f"1 service changed: reused {report['reused']} of {N}")
        assert report["ok"] and report["changed"] == ["s150"], report["error"]
        assert report["reused"] == N - 2
        assert {(await roundtrip(ports[150], 3))[:3] for _ in range(5)} == {b"v2\n"}
        # a new service on s005's address: s005's table is unchanged (reused),
        # and the overlap is still found
        clash = services({150: "v2\n"})
        clash["zz"] = {"kind": "echo", "listen": f"127.0.0.1:{ports[5]}"}
        cfg.write_text(toml(clash))
        report = await reload()
        assert not report["ok"], report
        assert "services.zz.listen: address 127.0.0.1:" in report["error"], report["error"]
        assert "overlaps services.s005.listen" in report["error"] and "\n" not in report["error"]
        assert "zz" not in {s["name"] for s in (await prog.status())["services"]}
        assert await roundtrip(ports[5]) == b"hello"
        # equal in Python is not the same in TOML: backlog = 1024.0 (== 1024)
        # next to the running backlog = 1024 is checked, and refused
        base = toml(services({150: "v2\n"}))
        cfg.write_text(base.replace(f'listen = "127.0.0.1:{ports[9]}"',
                                    f'listen = "127.0.0.1:{ports[9]}"\nbacklog = 1024', 1))
        report = await reload()
        assert report["ok"] and report["changed"] == [] and report["reused"] == N - 2, report
        cfg.write_text(base.replace(f'listen = "127.0.0.1:{ports[9]}"',
                                    f'listen = "127.0.0.1:{ports[9]}"\nbacklog = 1024.0', 1))
        report = await reload()
        assert not report["ok"], report
        assert "services.s009.backlog: expected an integer" in report["error"], report["error"]

    run(main(), 240)


def test_old_versions_are_freed_with_the_heap_frozen(start: Start) -> None:
    """Each worker (and the master) freezes what serves out of the garbage
    collections after start-up and after each reload (``gcpolicy``: a full
    collection of 10,000 services' objects stalls a loop for hundreds of
    ms); an old version held by an open connection is still freed once that
    connection ends and the drain is over: the frozen garbage is swept
    then.  Shown for a proxy and an echo, with ``old_versions`` in status."""
    echo_port, proxy_port = free_port(), free_port()

    def text(v: str) -> str:
        return toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{echo_port}", "greeting": v},
                     "p": {"kind": "proxy", "listen": f"127.0.0.1:{proxy_port}",
                           "upstreams": [f"127.0.0.1:{echo_port}"],
                           "balance": "round_robin" if v == "v1\n" else "least_conn"}}, drain=1.0)

    prog = start(text("v1\n"))
    cfg = prog.config
    assert cfg is not None

    def old_versions(st: dict[str, Any]) -> dict[str, int]:
        return {s["name"]: s["old_versions"] for s in st["services"]}

    async def main() -> None:
        st = await prog.wait_ready(60)
        assert st["gc"]["freezes"] >= 1, st["gc"]
        assert all(w["gc"]["freezes"] >= 1 for w in st["workers"]), st["workers"]
        direct = await EchoClient.open(echo_port, 3)
        via = await EchoClient.open(proxy_port, 3)
        cfg.write_text(text("v2\n"))
        code, out, err = await prog.cli("reload", "-c", str(cfg), timeout=60)
        assert code == 0 and "changed=[e,p]" in out, out + err
        st = await prog.status()
        print(f"after the reload: old versions {old_versions(st)}, gc {[w['gc'] for w in st['workers']]}")
        # held by the two connections (e's two -- the direct one and the proxy's
        # upstream one -- may be on one worker or on both: 1 or 2 summed)
        assert old_versions(st)["p"] == 1 and old_versions(st)["e"] in (1, 2), old_versions(st)
        await direct.check()
        await via.check()
        await direct.close()
        await via.close()

        async def freed() -> dict[str, Any] | None:
            st = await prog.status()
            return st if old_versions(st) == {"e": 0, "p": 0} else None

        st = await eventually(freed, timeout=60)
        print(f"after the connections ended: old versions {old_versions(st)}, "
              f"gc {[w['gc'] for w in st['workers']]}")
        assert all(w["gc"]["freezes"] >= 2 for w in st["workers"]), st["workers"]   # start, reload
        assert (await roundtrip(echo_port, 3))[:3] == b"v2\n"

        async def swept() -> dict[str, Any] | None:
            st = await prog.status()
            return st if all(w["gc"]["sweeps"] >= 1 and not w["gc"]["sweep_due"] for w in st["workers"]) else None

        # the sweep for frozen garbage in cycles: drain_timeout + 1 s after the change
        st = await eventually(swept, timeout=60)
        print(f"after the sweep: gc {[w['gc'] for w in st['workers']]}")
        assert old_versions(st) == {"e": 0, "p": 0} and st["gc"]["sweeps"] >= 1, st["gc"]

    run(main(), 120)


def test_a_start_up_arms_no_garbage_sweep_a_change_does(start: Start) -> None:
    """300 services: once started, no worker has a garbage sweep due -- a
    new site's first commit replaces nothing, and a sweep (unfreeze, a full
    collection of every object, freeze: hundreds of ms of stall at 10,000
    services) would find nothing; a reload that replaces one service's
    version arms one on both workers (its old version is swept once
    drained).  Before, the start-up armed one on every worker."""
    ports = [free_port() for _ in range(N)]
    prog = start(toml(echoes(ports)))
    cfg = prog.config
    assert cfg is not None

    def due(st: dict[str, Any]) -> list[bool]:
        return [w["gc"]["sweep_due"] for w in st["workers"]]

    async def main() -> None:
        st = await prog.wait_ready(120)
        st = await prog.status()
        print(f"after the start-up: sweep due {due(st)}, sweeps {[w['gc']['sweeps'] for w in st['workers']]}")
        assert due(st) == [False, False], st["workers"]
        assert [w["gc"]["sweeps"] for w in st["workers"]] == [0, 0], st["workers"]
        cfg.write_text(toml(echoes(ports, {42: "v2\n"})))
        code, out, err = await prog.cli("reload", "-c", str(cfg), timeout=120)
        assert code == 0 and "changed=[s042]" in out, out + err
        st = await prog.status()
        print(f"after a 1-service reload: sweep due {due(st)}")
        assert due(st) == [True, True], st["workers"]

    run(main(), 240)


def test_status_answers_while_a_big_reload_is_held(start: Start) -> None:
    """300 services whose new versions each take 20 ms to build *without
    yielding* (about 6 s of blocking work per worker): while that reload
    runs, ``status`` gets an answer from every worker (a worker runs a batch
    in slices and answers between them), and the CLI shows the summary of
    the 300 services and that a reload is running.  Before, a worker ran the
    whole batch without a loop turn and did not answer status (its 1 s
    deadline) until it was done."""
    ports = [free_port() for _ in range(N)]

    def text(busy: float, greeting: str) -> str:
        return toml({f"s{i:03d}": {"kind": "fail_on_worker", "listen": f"127.0.0.1:{port}", "greeting": greeting,
                                   "busy": busy} for i, port in enumerate(ports)}, reload_timeout=120)

    prog = start(text(0.0, "v1\n"), test_kinds=True)
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready(120)
        cfg.write_text(text(0.02, "v2\n"))
        reload = asyncio.ensure_future(prog.cli("reload", "-c", str(cfg), timeout=300))
        seen: list[dict[str, Any]] = []

        async def during() -> bool:
            st = await prog.status()
            if st["reloading"]:
                seen.append(st)
            return bool(st["reloading"]) and len(seen) >= 3

        await eventually(during, timeout=120)
        assert not reload.done()
        for st in seen:
            assert [w["answering"] for w in st["workers"]] == [True, True], st["workers"]
        code, out, err = await prog.cli("status", "-c", str(cfg), timeout=60)
        assert code == 0, out + err
        assert out.startswith(f"{N} services ({N} fail_on_worker): "), out
        if not reload.done():
            assert "a reload is running" in out, out
        code, out, err = await asyncio.wait_for(reload, 300)
        assert code == 0, out + err
        assert out.startswith("reload ok: added=[] changed=[s000,"), out
        assert {(await roundtrip(ports[7], 3))[:3] for _ in range(10)} == {b"v2\n"}

    run(main(), 400)


def test_status_of_some_services_and_the_summary(start: Start) -> None:
    """``hotproxy status`` with more than 50 services prints a summary;
    ``status NAME...`` only those rows (``--json`` one document with only
    them); ``--all`` the whole table; an unknown name is one line, exit 1."""
    ports = [free_port() for _ in range(60)]
    prog = start(toml(echoes(ports)))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready(60)
        code, out, err = await prog.cli("status", "-c", str(cfg))
        assert code == 0, out + err
        assert out.startswith("60 services (60 echo): 0 active connections;"), out
        assert not re.search(r"^s\d{3} ", out, re.M) and "workers 2/2 alive" in out, out   # no table row
        assert "last reload #1 (start)" in out and "added=[s000," in out and "+40 more]" in out, out
        reply = await prog.admin("status", summary=True)
        assert reply["ok"] and reply["status"]["services"] == [], reply
        assert reply["status"]["summary"]["services"] == 60
        assert reply["status"]["last_reload"]["counts"]["added"] == 60, reply   # counts, not 60 names
        assert "added" not in reply["status"]["last_reload"]
        assert all(w["site_count"] == 60 and w["sites"] == [] for w in reply["status"]["workers"]), reply
        code, out, err = await prog.cli("status", "-c", str(cfg), "s007", "s042")
        assert code == 0, out + err
        rows = [line.split()[0] for line in out.splitlines()[1:] if line.startswith("s")]
        assert rows == ["s007", "s042"], out
        code, out, err = await prog.cli("status", "-c", str(cfg), "--json", "s042")
        assert code == 0, out + err
        doc = json.loads(out)
        assert [s["name"] for s in doc["services"]] == ["s042"]
        assert doc["services"][0]["listen"] == f"127.0.0.1:{ports[42]}"
        assert all(w["sites"] == ["s042"] for w in doc["workers"]), doc["workers"]
        code, out, err = await prog.cli("status", "-c", str(cfg), "--all")
        assert code == 0, out + err
        assert len([line for line in out.splitlines() if re.match(r"s\d{3} ", line)]) == 60, out
        code, out, err = await prog.cli("status", "-c", str(cfg), "s042", "nope")
        assert code == 1 and out == "", out + err
        assert err.count("\n") == 1 and "no service 'nope' in the running config" in err, err
        assert "Traceback" not in err

    run(main(), 120)


def test_the_descriptor_limit_is_raised_to_the_hard_limit(start: Start, tmp_path: Path) -> None:
    """Started with a soft RLIMIT_NOFILE of 256 under a hard one of 4096, the
    master and every worker run with 4096 (``/proc/PID/limits``; the workers
    inherit it, and would raise their own too), and the master's log says so."""
    a = free_port()
    prog = start(toml({"a": {"kind": "echo", "listen": f"127.0.0.1:{a}"}}), nofile=(256, 4096))

    def max_open_files(pid: int) -> tuple[str, str]:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
        raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")

    async def main() -> None:
        st = await prog.wait_ready(60)
        pids = [prog.pid] + [w["pid"] for w in st["workers"]]
        limits = {pid: max_open_files(pid) for pid in pids}
        print(f"Max open files (soft, hard) by pid: {limits}")
        assert set(limits.values()) == {("4096", "4096")}, limits

        async def logged() -> bool:
            return "master INFO hotproxy.master: RLIMIT_NOFILE raised from 256 to the hard limit 4096" in prog.log()

        await eventually(logged, timeout=30)

    run(main(), 90)


def test_check_builds_each_distinct_echo_once_and_probes_without_the_python_socket_layer(tmp_path: Path) -> None:
    """The real ``hotproxy check`` CLI (its ``main`` in a fresh interpreter)
    on 300 services, half of them echoes of one greeting: the echo factory
    is built once and shared (equal options build equal, immutable
    factories), and each of the 300 bind probes uses the C socket type, not
    ``socket.socket``'s Python constructor and context manager -- the check
    of 10,000 services did both 5,000 and 10,000 times.  A port taken by a
    real listener is still found.  Before: 150 echo builds, 300 Python-level
    sockets."""
    ports, services = _echoes_and_proxies()
    services["s002"]["greeting"] = "other"   # a second distinct echo
    cfg = tmp_path / "many.toml"
    cfg.write_text(toml(services, admin=str(tmp_path / "admin.sock")))
    script = (
        "import socket, sys\n"
        "from hotproxy import echo\n"
        "counts = {'echo': 0, 'socket': 0}\n"
        "post, init = echo.EchoFactory.__post_init__, socket.socket.__init__\n"
        "def counted_post(self):\n"
        "    counts['echo'] += 1\n"
        "    post(self)\n"
        "def counted_init(self, *args, **kwargs):\n"
        "    counts['socket'] += 1\n"
        "    init(self, *args, **kwargs)\n"
        "echo.EchoFactory.__post_init__ = counted_post\n"
        "socket.socket.__init__ = counted_init\n"
        "from hotproxy.cli import main\n"
        "code = main(['check', '-c', sys.argv[1]])\n"
        "print('built', counts, file=sys.stderr)\n"
        "sys.exit(code)\n")

    async def check() -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(cfg),
                                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        print(err.decode().strip())
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = run(check(), 150)
    assert code == 0, out + err
    assert out.startswith(f"{cfg}: ok: {N} services: s000 (echo on 127.0.0.1:"), out
    found = re.search(r"built \{'echo': (\d+), 'socket': (\d+)\}", err)
    assert found is not None, err
    # two distinct echoes; the one Python-level socket is the admin client's
    # (is this file's hotproxy running?), none is a bind probe
    assert (int(found.group(1)), int(found.group(2))) == (2, 1), err
    # the probes still see a real listener on one of the ports
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[7]))
        taken.listen()
        code, out, err = run(check(), 150)
    assert code == 1 and len(err.strip().splitlines()) == 2, out + err   # the error line and the counts
    assert f"services.s007.listen: cannot listen on 127.0.0.1:{ports[7]}: address already in use" in err, err
