"""A fleet reloads as one, through a real etcd (issue 20).

Each test starts a real etcd server (Debian's ``etcd-server``; ``ci/etcd.sh``
installs it) on 127.0.0.1 ports of its own with its data in a temp dir, and
three real ``hotproxy run`` instances whose local file holds only
``[runtime]`` (``config_source``, ``instance_id``, ``listen_host`` =
127.0.0.2, .3, .4, an admin socket each).  The shared services come from
``hotproxy fleet apply``; ``tests/traffic.py`` checks every byte of the
traffic to each instance meanwhile.  Without etcd (or the etcd client
library) the tests skip, unless ``HOTPROXY_REQUIRE_PEERS=1`` (CI) makes
that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import echo_roundtrip, eventually, free_port, run
from helpers_program import Program, Traffic, toml

REQUIRE = os.environ.get("HOTPROXY_REQUIRE_PEERS") == "1"
HOSTS = {"i2": "127.0.0.2", "i3": "127.0.0.3", "i4": "127.0.0.4"}

Start = Callable[..., Program]


def _need(ok: bool, what: str) -> None:
    if ok:
        return
    if REQUIRE:
        pytest.fail(f"{what} (HOTPROXY_REQUIRE_PEERS=1; ci/etcd.sh installs etcd, the test extra the client)")
    pytest.skip(what)


class Etcd:
    """A real etcd server on 127.0.0.1 ports of its own; ``stop`` and ``start`` keep its data."""

    def __init__(self, directory: Path) -> None:
        self.binary = shutil.which("etcd") or "etcd"
        self.data = directory / "etcd-data"
        self.log_path = directory / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        #: a TLS etcd (tests/test_fleet_tls.py): its client URLs are https, these options added
        self.tls_args: list[str] = []

    def url(self, prefix: str = "hp") -> str:
        return f"{'etcds' if self.tls_args else 'etcd'}://127.0.0.1:{self.client_port}/{prefix}"

    def start(self) -> None:
        scheme = "https" if self.tls_args else "http"
        client, peer = f"{scheme}://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--name", "hp-test", "--data-dir", str(self.data),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"hp-test={peer}", *self.tls_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until etcd answers on its client port (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"etcd exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.client_port), 1):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"etcd not listening within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def started_etcd(tmp_path: Path, tls_args: list[str] | None = None) -> Iterator[Etcd]:
    """A started etcd (with *tls_args* on its command line), stopped at the end;
    skipped (failed under HOTPROXY_REQUIRE_PEERS=1) without etcd or its client library."""
    _need(shutil.which("etcd") is not None, "no etcd server installed (bash ci/etcd.sh)")
    try:
        import aetcd  # noqa: F401
    except ImportError:
        _need(False, "the etcd client library is not installed (pip install 'hotproxy[etcd]')")
    server = Etcd(tmp_path)
    if tls_args:
        server.tls_args = tls_args
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    """A started etcd; stopped (and its data dropped with tmp_path) at the end."""
    yield from started_etcd(tmp_path)


# -- helpers ---------------------------------------------------------------------------


class Fleet:
    """Three instances of one fleet, and the ``fleet`` commands."""

    def __init__(self, start: Start, etcd: Etcd, tmp: Path, *, ttl: int = 10, cli_args: tuple[str, ...] = (),
                 **runtime: Any) -> None:
        self.etcd = etcd
        self.url = etcd.url()
        self.tmp = tmp
        #: what the ``fleet`` commands are given beside ``--etcd`` (TLS: ``--etcd-ca ...``)
        self.cli_args = cli_args
        self.stable = free_port()
        self.ver = free_port()
        self.progs: dict[str, Program] = {}
        for iid, host in HOSTS.items():
            text = toml({}, workers=2, admin=f"{iid}.sock", config_source=self.url, instance_id=iid,
                        listen_host=host, fleet_lease_ttl=ttl, **runtime)
            self.progs[iid] = start(text, name=f"{iid}.toml")
        self.any = next(iter(self.progs.values()))
        self._n = 0

    def text(self, version: str, extra: dict[str, int] | None = None) -> str:
        """The fleet config: ``stable`` (the traffic's echo), ``ver`` (greets with *version*), *extra* echoes."""
        services = {"stable": {"kind": "echo", "listen": f"127.0.0.1:{self.stable}"},
                    "ver": {"kind": "echo", "listen": f"127.0.0.1:{self.ver}", "greeting": f"{version}\n"}}
        for name, port in (extra or {}).items():
            services[name] = {"kind": "echo", "listen": f"127.0.0.1:{port}"}
        lines = []
        for name, opts in services.items():
            lines.append(f"[services.{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
        return "\n".join(lines) + "\n"

    async def start(self) -> None:
        for prog in self.progs.values():
            await prog.wait_ready()

        async def joined() -> bool:
            st = await self.status()
            return set(st["instances"]) == set(HOSTS)

        await eventually(joined, timeout=60, interval=0.2)

    def apply_cmd(self, text: str, *args: str) -> list[str]:
        self._n += 1
        path = self.tmp / f"fleet-{self._n}.toml"
        path.write_text(text)
        return ["fleet", "apply", "-c", str(path), "--etcd", self.url, *self.cli_args, *args]

    async def apply(self, text: str, *args: str) -> tuple[int, str, str]:
        return await self.any.cli(*self.apply_cmd(text, *args), timeout=120)

    async def status(self) -> dict[str, Any]:
        code, out, err = await self.any.cli("fleet", "status", "--etcd", self.url, *self.cli_args, "--json")
        assert code == 0, out + err
        return json.loads(out)  # type: ignore[no-any-return]

    async def greetings(self) -> dict[str, bytes]:
        """What ``ver`` greets with on each instance (its own listen_host)."""
        out = {}
        for iid, host in HOSTS.items():
            got = await echo_roundtrip(host, self.ver, b"x", greeting=3)
            out[iid] = got[:3].strip()
        return out

    def traffic(self, traffic: Callable[..., Traffic]) -> Traffic:
        return traffic([f"{host}:{self.stable}" for host in HOSTS.values()], long=len(HOSTS), short=len(HOSTS), seed=7)


def committed_revision(out: str) -> int:
    m = re.search(r"committed as revision (\d+)", out)
    assert m, out
    return int(m.group(1))


def check_traffic(tot: dict[str, Any], what: str) -> None:
    print(f"{what}: traffic {tot['short_ok']} short connections, {tot['long_ok']} long, "
          f"{tot['bytes_checked']} bytes checked, {tot['short_failed'] + tot['long_failed']} errors")
    assert tot["short_failed"] == 0 and tot["long_failed"] == 0, tot.get("errors")
    assert tot["short_ok"] > 0 and tot["long_ok"] == len(HOSTS), tot


# -- the tests -----------------------------------------------------------------------------


def test_a_good_config_is_served_by_every_instance_at_the_revision_fleet_status_shows(
        start: Start, etcd: Etcd, tmp_path: Path, traffic: Callable[..., Traffic]) -> None:
    async def main() -> None:
        fleet = Fleet(start, etcd, tmp_path)
        await fleet.start()
        code, out, err = await fleet.apply(fleet.text("v1"))
        assert code == 0, out + err
        for iid in HOSTS:
            assert f"{iid}: committed revision" in out, out
        load = fleet.traffic(traffic)
        assert await fleet.greetings() == {iid: b"v1" for iid in HOSTS}
        t0 = time.monotonic()
        code, out, err = await fleet.apply(fleet.text("v2"))
        took = time.monotonic() - t0
        assert code == 0, out + err
        rev = committed_revision(out)
        print(f"fleet apply to 3 instances, all committed: {took * 1000:.0f} ms (revision {rev})")
        st = await fleet.status()
        assert st["revision"] == rev, st
        assert {iid: rec["applied"] for iid, rec in st["instances"].items()} == {iid: rev for iid in HOSTS}, st
        assert await fleet.greetings() == {iid: b"v2" for iid in HOSTS}
        check_traffic(await load.finish(), "good config")
        # (its connections die with it: after the checked traffic)
        # a worker killed beside the master's etcd (gRPC) connection is restarted with the fleet's config
        prog = fleet.progs["i2"]
        victim = (await prog.status())["workers"][0]["pid"]
        prog.track(victim)
        os.kill(victim, signal.SIGKILL)

        async def restarted() -> bool:
            st = await prog.status()
            return bool(st["restarts"] >= 1 and all(w["alive"] and w["pid"] != victim for w in st["workers"]))

        await eventually(restarted, timeout=60, interval=0.1)
        assert await fleet.greetings() == {iid: b"v2" for iid in HOSTS}
        assert "fork" not in prog.log(), prog.log()

    run(main(), timeout=240)


def test_a_config_that_fails_on_one_instance_is_applied_by_none_and_the_report_names_it(
        start: Start, etcd: Etcd, tmp_path: Path, traffic: Callable[..., Traffic]) -> None:
    async def main() -> None:
        fleet = Fleet(start, etcd, tmp_path)
        await fleet.start()
        code, out, err = await fleet.apply(fleet.text("v1"))
        assert code == 0, out + err
        rev = committed_revision(out)
        load = fleet.traffic(traffic)
        new = free_port()
        # another program holds the new port on i3's address only
        with socket.socket() as held:
            held.bind((HOSTS["i3"], new))
            held.listen()
            code, out, err = await fleet.apply(fleet.text("v2", {"new": new}))
        print(f"apply refused: {err.strip()}")
        assert code == 1, out + err
        assert "instance i3 failed" in err and "address already in use" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        st = await fleet.status()
        assert st["revision"] == rev and st["decision"]["outcome"] == "abort", st
        assert {iid: rec["applied"] for iid, rec in st["instances"].items()} == {iid: rev for iid in HOSTS}, st
        for iid, host in HOSTS.items():
            assert await refuses_on(host, new), iid
            names = [s["name"] for s in (await fleet.progs[iid].status())["services"]]
            assert names == ["stable", "ver"], (iid, names)
        assert await fleet.greetings() == {iid: b"v1" for iid in HOSTS}
        # an instance joining now applies the committed config, never the aborted proposal
        late = start(toml({}, workers=1, admin="i5.sock", config_source=fleet.url, instance_id="i5",
                          listen_host="127.0.0.5"), name="i5.toml")
        await late.wait_ready()

        async def joined() -> bool:
            rec = (await fleet.status())["instances"].get("i5") or {}
            return rec.get("applied") == rev

        await eventually(joined, timeout=60, interval=0.2)
        assert (await echo_roundtrip("127.0.0.5", fleet.ver, b"x", greeting=3))[:3] == b"v1\n"
        assert await refuses_on("127.0.0.5", new)
        check_traffic(await load.finish(), "one instance fails")

    run(main(), timeout=240)


async def refuses_on(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return True
    writer.close()
    return False


def test_two_concurrent_applies_exactly_one_wins_the_other_is_told_why(
        start: Start, etcd: Etcd, tmp_path: Path) -> None:
    async def main() -> None:
        fleet = Fleet(start, etcd, tmp_path, ttl=60)   # the stopped i4 stays a member
        await fleet.start()
        code, out, err = await fleet.apply(fleet.text("v1"))
        assert code == 0, out + err
        slow = fleet.progs["i4"]
        # i4's master answers nothing while stopped: the first proposal waits for its vote
        slow.signal(signal.SIGSTOP)
        try:
            a = asyncio.ensure_future(fleet.any.cli(*fleet.apply_cmd(fleet.text("va"), "--deadline", "60"),
                                                    timeout=120))
            b = asyncio.ensure_future(fleet.any.cli(*fleet.apply_cmd(fleet.text("vb"), "--deadline", "60"),
                                                    timeout=120))
            done, _ = await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED, timeout=100)
            assert len(done) >= 1
            loser = done.pop()
            code, out, err = loser.result()
            print(f"the other apply: {err.strip()}")
            assert code == 1 and "another fleet apply" in err, out + err
        finally:
            slow.signal(signal.SIGCONT)
        winner = b if loser is a else a
        code, out, err = await winner
        assert code == 0, out + err
        version = b"va" if winner is a else b"vb"
        assert await fleet.greetings() == {iid: version for iid in HOSTS}

    run(main(), timeout=240)


def test_two_proposers_that_both_read_before_either_writes_exactly_one_proposal_wins(
        start: Start, etcd: Etcd, tmp_path: Path) -> None:
    """The compare-and-swap branch: both ``fleet apply`` read the proposal key
    (no proposal pending) before either writes -- the test-only barrier
    ``HOTPROXY_TEST_FLEET_BARRIER`` holds each one between its read and its
    write until both have read.  Exactly one proposal is written and
    committed; the other proposer is told, in one line, which proposal won."""
    async def main() -> None:
        fleet = Fleet(start, etcd, tmp_path)
        await fleet.start()
        code, out, err = await fleet.apply(fleet.text("v1"))
        assert code == 0, out + err
        rev = committed_revision(out)
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        env = {**fleet.any.env, "HOTPROXY_TEST_FLEET_BARRIER": f"{barrier}:2"}

        async def propose(version: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hotproxy.cli", *fleet.apply_cmd(fleet.text(version)),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        (ca, oa, ea), (cb, ob, eb) = await asyncio.gather(propose("va"), propose("vb"))
        assert len(os.listdir(barrier)) == 2   # both read before either wrote
        assert sorted([ca, cb]) == [0, 1], (oa + ea, ob + eb)
        won, (code, out, err) = ("va", (cb, ob, eb)) if ca == 0 else ("vb", (ca, oa, ea))
        print(f"the proposer that lost the compare-and-swap: {err.strip()}")
        assert re.fullmatch(r"hotproxy: error: another fleet apply proposed first \(proposal \d+ by \S+\): "
                            r"nothing applied; retry after it\n", err), err
        assert out == "", out
        assert await fleet.greetings() == {iid: won.encode() for iid in HOSTS}
        st = await fleet.status()
        assert st["revision"] > rev and st["decision"]["outcome"] == "commit", st
        assert {iid: r["applied"] for iid, r in st["instances"].items()} == {iid: st["revision"] for iid in HOSTS}

    run(main(), timeout=240)


def test_an_instance_stopped_during_prepare_aborts_after_the_deadline_and_never_serves_that_config(
        start: Start, etcd: Etcd, tmp_path: Path, traffic: Callable[..., Traffic]) -> None:
    async def main() -> None:
        fleet = Fleet(start, etcd, tmp_path, ttl=30)
        await fleet.start()
        code, out, err = await fleet.apply(fleet.text("v1"))
        assert code == 0, out + err
        rev = committed_revision(out)
        load = fleet.traffic(traffic)
        slow = fleet.progs["i4"]
        slow.signal(signal.SIGSTOP)
        try:
            code, out, err = await fleet.apply(fleet.text("v2"), "--deadline", "2")
        finally:
            slow.signal(signal.SIGCONT)
        print(f"apply with i4 stopped: {err.strip()}")
        assert code == 1 and "instance i4 no answer within 2 s" in err, out + err
        aborted = int(re.search(r"proposal (\d+) aborted", err).group(1))  # type: ignore[union-attr]
        assert await fleet.greetings() == {iid: b"v1" for iid in HOSTS}
        # a later change reaches i4 too: it went through the aborted proposal without preparing it
        code, out, err = await fleet.apply(fleet.text("v3"))
        assert code == 0, out + err
        assert committed_revision(out) > rev
        assert await fleet.greetings() == {iid: b"v3" for iid in HOSTS}
        assert f"prepared {aborted}" not in slow.log(), slow.log()
        check_traffic(await load.finish(), "instance stopped during prepare")

    run(main(), timeout=240)


def test_a_proposer_killed_before_deciding_the_instances_drop_what_they_prepared_and_a_later_apply_wins(
        start: Start, etcd: Etcd, tmp_path: Path) -> None:
    async def main() -> None:
        # (a lease long enough that the stopped i4 stays a member while the
        # proposer runs: the instances drop the undecided proposal 3 + 15 s on)
        fleet = Fleet(start, etcd, tmp_path, ttl=15)
        await fleet.start()
        code, out, err = await fleet.apply(fleet.text("v1"))
        assert code == 0, out + err
        slow = fleet.progs["i4"]
        slow.signal(signal.SIGSTOP)   # the proposal waits for i4's vote ...
        try:
            proposer = subprocess.Popen([sys.executable, "-m", "hotproxy.cli",
                                         *fleet.apply_cmd(fleet.text("v2"), "--deadline", "3")],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=fleet.any.env)
            try:
                async def prepared() -> bool:
                    st = await fleet.status()
                    return all(str(st["instances"][i].get("outcome", "")).startswith("prepared")
                               for i in ("i2", "i3"))

                await eventually(prepared, timeout=60, interval=0.1)
            finally:
                proposer.kill()   # ... and its proposer dies before deciding
                proposer.wait(10)
        finally:
            slow.signal(signal.SIGCONT)

        async def dropped() -> bool:
            st = await fleet.status()
            return all(str(st["instances"][i].get("outcome", "")).startswith("aborted") for i in ("i2", "i3"))

        await eventually(dropped, timeout=60, interval=0.2)
        assert await fleet.greetings() == {iid: b"v1" for iid in HOSTS}
        # the undecided proposal is aborted by the next apply once its deadline has passed
        code, out, err = await fleet.apply(fleet.text("v3"))
        assert code == 0, out + err
        assert await fleet.greetings() == {iid: b"v3" for iid in HOSTS}

    run(main(), timeout=240)


def test_etcd_stopped_and_restarted_every_instance_serves_throughout_and_takes_a_later_change(
        start: Start, etcd: Etcd, tmp_path: Path, traffic: Callable[..., Traffic]) -> None:
    async def main() -> None:
        fleet = Fleet(start, etcd, tmp_path)
        await fleet.start()
        code, out, err = await fleet.apply(fleet.text("v1"))
        assert code == 0, out + err
        load = fleet.traffic(traffic)
        etcd.stop()
        for prog in fleet.progs.values():
            await eventually(lambda: "serving revision" in prog.log(), timeout=30)
        assert await fleet.greetings() == {iid: b"v1" for iid in HOSTS}
        code, out, err = await fleet.apply(fleet.text("v2"))
        assert code == 1 and "etcd unreachable" in err and err.count("\n") == 1, out + err
        etcd.start()
        etcd.wait_ready()
        # the instances reconnect with back-off (at most 5 s apart): the deadline covers it
        code, out, err = await fleet.apply(fleet.text("v2"), "--deadline", "30")
        assert code == 0, out + err
        assert await fleet.greetings() == {iid: b"v2" for iid in HOSTS}
        check_traffic(await load.finish(), "etcd restarted")

    run(main(), timeout=240)


def test_an_instance_in_a_fleet_refuses_a_local_reload_in_one_line(start: Start, etcd: Etcd, tmp_path: Path) -> None:
    async def main() -> None:
        text = toml({}, workers=1, admin="solo.sock", config_source=etcd.url(), instance_id="solo")
        prog = start(text, name="solo.toml")
        await prog.wait_ready()
        code, out, err = await prog.cli("reload", "-c", str(prog.config))
        assert code == 1, out + err
        assert "this instance is in a fleet" in out + err and "hotproxy fleet apply" in out + err, out + err
        code, out, err = await prog.cli("status", "-c", str(prog.config))
        assert code == 0 and f"fleet {etcd.url()} as solo" in out, out + err
        # (an upgrade of a fleet instance used to be refused here: it is done now, see the next test)

    run(main(), timeout=120)


def test_an_upgraded_fleet_instance_serves_the_committed_config_throughout_and_follows_the_fleet(
        start: Start, etcd: Etcd, tmp_path: Path, traffic: Callable[..., Traffic]) -> None:
    """``hotproxy upgrade`` of fleet instances (one with ``config_source`` in its file, one
    started with ``run --etcd``): each new master starts from the revision the old one runs
    (handed over with the hello: the local file has no services), so the services serve
    throughout (byte-checked traffic, 0 errors); it takes the instance's place in the fleet
    (same id, its pid in ``fleet status``) and applies the next ``fleet apply``."""
    async def main() -> None:
        url = etcd.url()
        stable, ver = free_port(), free_port()

        def text(version: str) -> str:
            return (f'[services.stable]\nkind = "echo"\nlisten = "127.0.0.1:{stable}"\n'
                    f'[services.ver]\nkind = "echo"\nlisten = "127.0.0.1:{ver}"\ngreeting = "{version}\\n"\n')

        hosts = {"i2": HOSTS["i2"], "i3": HOSTS["i3"]}
        progs = {
            "i2": start(toml({}, workers=2, admin="i2.sock", config_source=url, instance_id="i2",
                             listen_host=hosts["i2"]), name="i2.toml"),
            "i3": start(toml({}, workers=2, admin="i3.sock", instance_id="i3", listen_host=hosts["i3"]),
                        name="i3.toml", args=["-c", str(tmp_path / "i3.toml"), "--etcd", url]),
        }
        for prog in progs.values():
            await prog.wait_ready()
        any_prog = progs["i2"]

        async def fleet_status() -> dict[str, Any]:
            code, out, err = await any_prog.cli("fleet", "status", "--etcd", url, "--json")
            assert code == 0, out + err
            return json.loads(out)  # type: ignore[no-any-return]

        async def joined() -> bool:
            return set((await fleet_status())["instances"]) == set(hosts)

        await eventually(joined, timeout=60, interval=0.2)

        async def apply(version: str) -> int:
            path = tmp_path / f"fleet-{version}.toml"
            path.write_text(text(version))
            code, out, err = await any_prog.cli("fleet", "apply", "-c", str(path), "--etcd", url, timeout=120)
            assert code == 0, out + err
            return committed_revision(out)

        async def greetings() -> dict[str, bytes]:
            return {iid: (await echo_roundtrip(host, ver, b"x", greeting=3))[:3].strip()
                    for iid, host in hosts.items()}

        rev = await apply("v1")
        load = traffic([f"{host}:{stable}" for host in hosts.values()], long=2, short=2, seed=9)
        for iid, prog in progs.items():
            before = await prog.follow()
            code, out, err = await prog.cli("upgrade", "-c", str(prog.config), timeout=120)
            print(f"{iid}: {(out + err).strip()}")
            assert code == 0 and out.startswith(f"upgrade ok: pid {before['pid']} -> pid "), out + err
            after = await prog.follow()
            assert after["pid"] != before["pid"] and after["upgraded_from"] == before["pid"], after
            # the fleet's services, at the revision the old master ran, from the first moment
            assert [s["name"] for s in after["services"]] == ["stable", "ver"], after["services"]
            assert after["fleet"]["applied"] == rev and after["fleet"]["id"] == iid, after["fleet"]
            assert f"applied revision {rev} (upgraded)" in after["fleet"]["outcome"], after["fleet"]
            assert after["last_reload"]["trigger"] == "upgrade" and after["reloads"] == 1, after["last_reload"]

            async def rejoined() -> bool:
                rec = (await fleet_status())["instances"].get(iid) or {}
                return rec.get("pid") == after["pid"] and rec.get("applied") == rev

            await eventually(rejoined, timeout=60, interval=0.2)
        assert await greetings() == {"i2": b"v1", "i3": b"v1"}
        # the new masters follow the fleet: the next apply is prepared and committed by both
        rev2 = await apply("v2")
        assert rev2 > rev
        assert await greetings() == {"i2": b"v2", "i3": b"v2"}
        st = await fleet_status()
        assert {iid: rec["applied"] for iid, rec in st["instances"].items()} == {"i2": rev2, "i3": rev2}, st
        tot = await load.finish()
        print(f"upgrades of 2 fleet instances: traffic {tot['short_ok']} short connections, {tot['long_ok']} long, "
              f"{tot['bytes_checked']} bytes checked, {tot['short_failed'] + tot['long_failed']} errors")
        assert tot["short_failed"] == 0 and tot["long_failed"] == 0, tot
        assert tot["short_ok"] > 0 and tot["long_ok"] == 2, tot

    run(main(), timeout=240)


def test_an_upgrade_into_a_fleet_that_would_start_empty_is_refused_and_the_old_master_serves_on(
        start: Start, etcd: Etcd, tmp_path: Path) -> None:
    """A master serving services of its own file, upgraded with a file that now says
    ``config_source`` (and so holds no services): the new master would serve nothing
    until etcd answers, so the upgrade fails in one line and the old master serves on."""
    async def main() -> None:
        port = free_port()
        prog = start(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{port}"}}, workers=1, admin="own.sock"),
                     name="own.toml")
        first = await prog.wait_ready()
        assert prog.config is not None
        prog.config.write_text(toml({}, workers=1, admin="own.sock", config_source=etcd.url(), instance_id="own"))
        code, out, err = await prog.cli("upgrade", "-c", str(prog.config), timeout=120)
        print(f"upgrade into a fleet: {err.strip()}")
        assert code == 1 and out == "" and err.count("\n") == 1, out + err
        assert "an upgrade never empties hotproxy" in err and f"pid {first['pid']} keeps serving" in err, err
        status = await prog.follow()
        assert status["pid"] == first["pid"] and [s["name"] for s in status["services"]] == ["e"], status
        assert await echo_roundtrip("127.0.0.1", port, b"x") == b"x"

    run(main(), timeout=120)


def test_bad_fleet_input_is_one_line_and_nothing_is_proposed(start: Start, etcd: Etcd, tmp_path: Path) -> None:
    async def main() -> None:
        prog = start(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{free_port()}"}}, workers=1))
        bad = tmp_path / "bad.toml"
        for text, expect in (("[runtime]\nworkers = 2\n", "runtime: not allowed in a fleet config"),
                             ("[services.x]\nkind = \"nope\"\nlisten = \"127.0.0.1:1\"\n", "services.x.kind"),
                             ("[services\n", "TOML syntax error")):
            bad.write_text(text)
            code, out, err = await prog.cli("fleet", "apply", "-c", str(bad), "--etcd", etcd.url())
            assert code == 1 and expect in err and err.count("\n") == 1 and "Traceback" not in err, err
        code, out, err = await prog.cli("fleet", "status", "--etcd", "etcd://127.0.0.1:1", "--json")
        assert code == 1 and "no PREFIX" in err, err
        code, out, err = await prog.cli("fleet", "status", "--etcd", etcd.url(), "--json")
        assert code == 0 and json.loads(out)["proposal"] == 0, out + err
        # without the etcd client library: one line saying what to install (the rest of hotproxy works)
        hide = tmp_path / "no-aetcd" / "aetcd"
        hide.mkdir(parents=True)
        (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
        env = {**prog.env, "PYTHONPATH": f"{hide.parent}{os.pathsep}{prog.env.get('PYTHONPATH', '')}"}
        for args in (["fleet", "status", "--etcd", etcd.url()], ["run", "--etcd", etcd.url()]):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hotproxy.cli", *args, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            _, err_b = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 1 and err_b.decode() == (
                "hotproxy: error: the etcd client library is not installed: pip install 'hotproxy[etcd]'\n"), err_b
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hotproxy.cli", "status", "-c", str(prog.config), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out_b, err_b = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0 and b"SERVICE" in out_b, out_b + err_b
        # a local file with services and a config_source: refused at start, one line
        both = tmp_path / "both.toml"
        both.write_text(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{free_port()}"}}, workers=1,
                             admin="both.sock", config_source=etcd.url()))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hotproxy.cli", "run", "-c", str(both),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=prog.env)
        _, err_b = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1 and b"not allowed with runtime.config_source" in err_b, err_b

    run(main(), timeout=120)

