"""The config file, the diff, the reload on an inline manager, the admin socket, ``hotproxy check``.

In-process and fast; the real program is exercised in test_program.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from conftest import free_port, run
from helpers_program import FAIL_ON_WORKER, roundtrip
from hotproxy.admin import AdminClient, AdminError, AdminServer
from hotproxy.cli import format_report, format_status, main
from hotproxy.config import (KINDS, Config, ConfigError, NeedsLookup, admin_socket_for, default_admin_socket, load_config,
                             parse_config, register_kind)
from hotproxy.listeners import TcpListenerFactory, UnixListenerFactory
from hotproxy.manager import WorkerManager
from hotproxy.reload import Reloader, ReloadReport, diff

HERE = "/etc/hotproxy/test.toml"


def conf(text: str, path: str = HERE) -> Config:
    return parse_config(text, path)


def echo_toml(name: str, port: int, greeting: str = "", extra: str = "") -> str:
    return f'[services.{name}]\nkind = "echo"\nlisten = "127.0.0.1:{port}"\ngreeting = "{greeting}"\n{extra}\n'


# -- loading ----------------------------------------------------------------------------


def test_the_embedded_default_is_an_echo_and_a_proxy_on_low_loopback_ports() -> None:
    cfg = load_config(None)
    assert cfg.path is None and cfg.source == "<embedded default>"
    kinds = {s.kind for s in cfg.services.values()}
    assert kinds == {"echo", "proxy"}
    for svc in cfg.services.values():
        assert isinstance(svc.listener, TcpListenerFactory)
        assert svc.listener.host == "127.0.0.1" and svc.listener.port < 32768
    proxy = next(s for s in cfg.services.values() if s.kind == "proxy")
    echo = next(s for s in cfg.services.values() if s.kind == "echo")
    assert proxy.options["upstreams"] == (echo.listen,)


def test_the_design_example_parses_with_every_key() -> None:
    cfg = conf("""
[runtime]
workers = 2
cpu_affinity = true
drain_timeout = 30.0
admin_socket = "/tmp/hotproxy.sock"
pidfile = "run/hotproxy.pid"
log_level = "debug"

[services.echo]
kind = "echo"
listen = "127.0.0.1:7000"

[services.web]
kind = "proxy"
listen = "[::1]:8000"
upstreams = ["127.0.0.1:7000", "localhost:7000", "unix:/run/app.sock"]
balance = "least_conn"
connect_timeout = 2
idle_timeout = 300.0
max_connections = 10000
retries = 1
max_fails = 2
fail_timeout = 5.0
keepalive = true
access_log = true
backlog = 64

[services.local]
kind = "echo"
listen = "unix:sockets/echo.sock"
""")
    rt = cfg.runtime
    assert (rt.workers, rt.cpu_affinity, rt.drain_timeout, rt.log_level) == (2, True, 30.0, "debug")
    assert rt.admin_socket == "/tmp/hotproxy.sock"
    assert rt.pidfile == "/etc/hotproxy/run/hotproxy.pid"   # relative to the file
    web = cfg.services["web"]
    assert web.listen == "[::1]:8000" and web.listener == TcpListenerFactory("::1", 8000, backlog=64)
    assert web.options["balance"] == "least_conn" and web.options["connect_timeout"] == 2.0
    assert cfg.services["local"].listener == UnixListenerFactory("/etc/hotproxy/sockets/echo.sock")
    inner = web.factory   # the proxy itself: it counts its connections, no layer over it
    assert inner.upstreams == ("127.0.0.1:7000", "localhost:7000", "unix:/run/app.sock")
    assert (inner.balance, inner.keepalive, inner.access_log, inner.retries) == ("least_conn", True, True, 1)
    # value semantics: the same text gives equal services (the reload's diff relies on it)
    assert conf(echo_toml("a", 7000, "x")).services["a"].same_as(conf(echo_toml("a", 7000, "x")).services["a"])


def test_defaults() -> None:
    cfg = conf(echo_toml("a", 7000))
    assert cfg.runtime.workers == (os.cpu_count() or 1)
    assert cfg.runtime.drain_timeout == 30.0 and cfg.runtime.pidfile is None
    assert cfg.runtime.admin_socket == default_admin_socket(HERE)
    assert conf("").services == {}


BAD = [
    ("[runtime\nworkers = 2", "TOML syntax error: "),
    ("workers = 2", "workers: unknown section (expected [runtime] or [services.NAME])"),
    ("[runtime]\nworker = 2", "runtime.worker: unknown key (expected one of: workers, cpu_affinity,"),
    ("[runtime]\nworkers = 0", "runtime.workers: expected an integer >= 1, got 0"),
    ("[runtime]\nworkers = '2'", "runtime.workers: expected an integer >= 1, got '2'"),
    ("[runtime]\ncpu_affinity = 1", "runtime.cpu_affinity: expected true or false, got 1"),
    ("[runtime]\ndrain_timeout = -1", "runtime.drain_timeout: expected a number >= 0, got -1"),
    ("[runtime]\nlog_level = 'loud'", "runtime.log_level: expected one of debug, info, warning, error, got 'loud'"),
    ("[runtime]\nadmin_socket = '/" + "x" * 120 + "'", "runtime.admin_socket: expected a path shorter than"),
    ("services = 3", "services: expected a table [services], got an integer"),
    ("[services]\nx = 3", "services.x: expected a table [services.x], got an integer"),
    ('[services."a b"]\nkind = "echo"', "services.a b: a service name is"),
    ("[services.x]\nlisten = '127.0.0.1:1'", "services.x.kind: missing (expected one of echo, proxy"),
    ("[services.x]\nkind = 'ftp'\nlisten = '127.0.0.1:1'", "services.x.kind: expected one of echo, proxy"),
    ("[services.x]\nkind = 'echo'", "services.x.listen: missing"),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:1'\ncolour = 'red'",
     "services.x.colour: unknown key (expected one of: kind, listen, backlog, greeting, max_connections)"),
    ("[services.x]\nkind = 'echo'\nlisten = 7000", "services.x.listen: expected a string, got 7000"),
    ("[services.x]\nkind = 'echo'\nlisten = '7000'", "services.x.listen: bad listen address: '7000': expected 'host:port'"),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:70000'", "services.x.listen: bad listen address: '127.0.0.1:70000': port must be"),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:0'", "services.x.listen: expected a port 1-65535"),
    ("[services.x]\nkind = 'echo'\nlisten = '::1:80'", "write IPv6 addresses as '[v6addr]:port'"),
    ("[services.x]\nkind = 'echo'\nlisten = 'nosuch.invalid:80'", "services.x.listen: cannot resolve host 'nosuch.invalid'"),
    ("[services.x]\nkind = 'echo'\nlisten = 'unix:'", "services.x.listen: expected unix:/path"),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:1'\nmax_connections = 0",
     "services.x.max_connections: expected an integer >= 1, got 0"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'", "services.x.upstreams: missing (expected a list of addresses"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = []",
     "services.x.upstreams: expected a non-empty list of addresses, got an array"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2', 'nosuch.invalid:80']",
     "services.x.upstreams[1]: cannot resolve host 'nosuch.invalid': "),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1']",
     "services.x.upstreams[0]: bad upstream address: '127.0.0.1': expected 'host:port'"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = [3]",
     "services.x.upstreams[0]: expected an address string or a table, got 3"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2']\nbalance = 'rr'",
     "services.x.balance: expected one of round_robin, random, least_conn, hash, got 'rr'"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2']\nconnect_timeout = 0",
     "services.x.connect_timeout: expected a number > 0, got 0"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2']\nkeepalive = 'yes'",
     "services.x.keepalive: expected true or false, got 'yes'"),
    (echo_toml("a", 7000) + echo_toml("b", 7000), "services.b.listen: address 127.0.0.1:7000 overlaps services.a.listen"),
    (echo_toml("a", 7000) + "[services.b]\nkind = 'echo'\nlisten = '0.0.0.0:7000'",
     "services.b.listen: address 0.0.0.0:7000 overlaps services.a.listen (127.0.0.1:7000)"),
    (echo_toml("a", 7000) + "[services.b]\nkind = 'echo'\nlisten = 'localhost:7000'",
     "services.b.listen: address localhost:7000 overlaps services.a.listen"),
    ("[services.a]\nkind = 'echo'\nlisten = 'unix:/run/x.sock'\n[services.b]\nkind = 'echo'\nlisten = 'unix:/run/../run/x.sock'",
     "services.b.listen: address unix:/run/x.sock overlaps services.a.listen"),
    # more types and ranges (issue 7's corpus)
    ("[runtime]\nworkers = 1.5", "runtime.workers: expected an integer >= 1, got 1.5"),
    ("[runtime]\nworkers = true", "runtime.workers: expected an integer >= 1, got true"),
    ("[runtime]\ndrain_timeout = 'soon'", "runtime.drain_timeout: expected a number >= 0, got 'soon'"),
    ("[runtime]\npidfile = 3", "runtime.pidfile: expected a string, got 3"),
    ("[runtime]\nworkers = 100000000", "runtime.workers: expected an integer <= 1024, got 100000000"),
    ("[runtime]\ndrain_timeout = inf", "runtime.drain_timeout: expected a number <= 31536000, got inf"),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:1'\nbacklog = -5",
     "services.x.backlog: expected an integer >= 1, got -5"),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:1'\ngreeting = 5", "services.x.greeting: expected a string"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2']\nconnect_timeout = 1e300",
     "services.x.connect_timeout: expected a number <= 31536000, got 1e+300"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2']\nidle_timeout = -1",
     "services.x.idle_timeout: expected a number >= 0, got -1"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2']\nretries = -1",
     "services.x.retries: expected an integer >= 0, got -1"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2', '127.0.0.1:2']",
     "services.x: invalid proxy service: upstreams[1]: '127.0.0.1:2' is listed twice"),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:1'\n[services.x]\nkind = 'echo'", "TOML syntax error: "),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:1'\nbacklog = 99999999999999999999999",
     "services.x.backlog: expected an integer <= 65535, got 99999999999999999999999"),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:1'\nmax_connections = 1e9",
     "services.x.max_connections: expected an integer >= 1"),
    # issue 13: what the parser cannot read is one line too (item 10)
    ("x = " + "[" * 600 + "]" * 600, "arrays or tables nested too deeply to read"),
    ("[runtime]\nworkers = " + "9" * 5000, "an integer too long to read (more than 4300 digits)"),
    # names and numbers are ASCII and matched whole; enumerations are exact lowercase (item 14)
    ('[services."abc\\n"]\nkind = "echo"\nlisten = "127.0.0.1:1"', "services.abc\\n: a service name is"),
    ("[services.x]\nkind = 'echo'\nlisten = '127.0.0.1:\uff12\uff10\uff10\uff12\uff10'",
     "services.x.listen: bad listen address: '127.0.0.1:\uff12\uff10\uff10\uff12\uff10': port must be a number"),
    ("[services.x]\nkind = 'echo'\nlisten = '\uff11\uff12\uff17.0.0.1:1'", "services.x.listen: bad listen address: "),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:\uff12']",
     "services.x.upstreams[0]: bad upstream address: '127.0.0.1:\uff12': port must be a number"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2']\nbalance = 'ROUND_ROBIN'",
     "services.x.balance: expected one of round_robin, random, least_conn, hash (lowercase), got 'ROUND_ROBIN'"),
    ("[services.x]\nkind = 'Echo'\nlisten = '127.0.0.1:1'", "services.x.kind: expected one of echo, proxy (lowercase), "
                                                          "got 'Echo'"),
    ("[runtime]\nlog_level = 'DEBUG'", "runtime.log_level: expected one of debug, info, warning, error (lowercase)"),
    # a proxy whose upstreams lead back to its own listen address (item 12)
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:1']",
     "services.x.upstreams[0]: '127.0.0.1:1' leads back to this proxy's own listen address (127.0.0.1:1): "
     "a proxy loop (x -> x)"),
    ("[services.x]\nkind = 'proxy'\nlisten = '0.0.0.0:1'\nupstreams = ['127.0.0.1:1']",
     "services.x.upstreams[0]: '127.0.0.1:1' leads back to this proxy's own listen address (0.0.0.0:1)"),
    ("[services.x]\nkind = 'proxy'\nlisten = '[::]:1'\nupstreams = ['[::1]:1']",
     "services.x.upstreams[0]: '[::1]:1' leads back to this proxy's own listen address ([::]:1)"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['localhost:1']",
     "services.x.upstreams[0]: 'localhost:1' leads back"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['0.0.0.0:1']",
     "services.x.upstreams[0]: '0.0.0.0:1' leads back"),
    ("[services.x]\nkind = 'proxy'\nlisten = 'unix:x.sock'\nupstreams = ['unix:./x.sock']",
     "services.x.upstreams[0]: 'unix:/"),
    ("[services.x]\nkind = 'proxy'\nlisten = '127.0.0.1:1'\nupstreams = ['127.0.0.1:2']\n"
     "[services.y]\nkind = 'proxy'\nlisten = '127.0.0.1:2'\nupstreams = ['127.0.0.1:3', '127.0.0.1:1']",
     "services.x.upstreams[0]: '127.0.0.1:2' reaches services.y (127.0.0.1:2), whose upstreams lead back to this "
     "proxy: a proxy loop (x -> y -> x)"),
]


@pytest.mark.parametrize("text, expected", BAD, ids=[e.split(":")[0][:40] for _, e in BAD])
def test_each_bad_config_is_one_line_naming_file_key_and_expectation(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        conf(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{HERE}: "), msg
    assert expected in msg, msg


def test_different_addresses_and_families_do_not_conflict() -> None:
    cfg = conf(echo_toml("a", 7000) + echo_toml("b", 7001)
               + "[services.c]\nkind = 'echo'\nlisten = '[::1]:7000'\n"
               + "[services.d]\nkind = 'echo'\nlisten = '127.0.0.2:7000'\n")
    assert list(cfg.services) == ["a", "b", "c", "d"]


def test_files_that_are_not_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory, a FIFO, a device, a huge file, an unreadable file: one line each, no hang."""
    huge = tmp_path / "huge.toml"
    huge.write_text("[runtime]\n" + "# padding\n" * 500_000)     # ~5 MB of comments
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)                                            # nobody writes: reading would hang
    cases = [
        (tmp_path, "cannot read: it is a directory"),
        (fifo, "cannot read: not a regular file"),
        (Path("/dev/zero"), "cannot read: not a regular file"),
        (huge, "too large: more than 4 MiB"),
    ]
    for path, expected in cases:
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert expected in str(info.value) and "\n" not in str(info.value), (path, info.value)
        assert main(["check", "-c", str(path)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and expected in err, (path, err)
        assert admin_socket_for(str(path)).endswith(".sock")    # and the CLI still finds a socket path
    # a file without read permission: root reads it anyway, so only a non-root run can tell
    locked = tmp_path / "locked.toml"
    locked.write_text(echo_toml("a", 7000))
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        assert load_config(str(locked)).services   # root: chmod 000 does not stop a read
    else:  # pragma: no cover - not root
        with pytest.raises(ConfigError, match="cannot read: Permission denied"):
            load_config(str(locked))


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.toml: cannot read: No such file"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe[runtime]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(bad))


def test_the_admin_socket_is_found_even_in_a_broken_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    f = tmp_path / "p.toml"
    f.write_text(echo_toml("a", 7000))
    derived = admin_socket_for(str(f))
    assert derived == default_admin_socket(str(f)) and derived.startswith(str(tmp_path) + "/hotproxy-")
    assert derived != default_admin_socket(str(tmp_path / "other.toml"))
    f.write_text("[runtime]\nadmin_socket = 'ctl/admin.sock'\n" + echo_toml("a", 7000))
    assert admin_socket_for(str(f)) == str(tmp_path / "ctl" / "admin.sock")
    f.write_text("[runtime]\nadmin_socket = 'ctl/admin.sock'\n[services.a\n")   # broken below
    assert admin_socket_for(str(f)) == str(tmp_path / "ctl" / "admin.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_admin_socket(None).endswith(".sock") and f"hotproxy-{os.getuid()}" in default_admin_socket(None)


# -- the diff ------------------------------------------------------------------------------


def test_diff_sorts_services_into_added_changed_moved_removed_unchanged() -> None:
    old = conf(echo_toml("keep", 7000) + echo_toml("chg", 7001, "1") + echo_toml("mv", 7002) + echo_toml("gone", 7003))
    new = conf(echo_toml("keep", 7000) + echo_toml("chg", 7001, "2") + echo_toml("mv", 7012) + echo_toml("add", 7004)
               + "")
    d = diff(old.services, new.services)
    assert (d.added, d.changed, d.moved, d.removed, d.unchanged) == (["add"], ["chg", "mv"], ["mv"], ["gone"], ["keep"])
    backlog = conf(echo_toml("keep", 7000, extra="backlog = 10"))
    assert diff(old.services, backlog.services).moved == ["keep"]


# -- the reload, on an inline manager (one executor in this loop) ----------------------------


def test_reload_applies_all_or_nothing_and_leaves_unchanged_services_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    register_kind(FAIL_ON_WORKER)
    monkeypatch.setenv("HOTPROXY_WORKER_ID", "0")
    a, b, c, busy_port = (free_port() for _ in range(4))
    busy = socket.socket()
    busy.bind(("127.0.0.1", busy_port))
    busy.listen()

    async def main() -> None:
        m = WorkerManager(inline=True, drain_timeout=1.0)
        await m.start()
        try:
            r = Reloader(m)
            v1 = conf(echo_toml("a", a, "a1") + echo_toml("b", b, "b1"))
            rep = await r.reload(v1, trigger="test")
            assert rep.ok and rep.added == ["a", "b"], rep
            executor = m.workers[0].executor
            site_b = executor.sites["b"]

            # a factory failing after another service was staged: nothing changes
            bad = conf(echo_toml("a", a, "a2") + echo_toml("b", b, "b1")
                       + f"[services.f]\nkind = 'fail_on_worker'\nlisten = '127.0.0.1:{c}'\nfail_worker = 0\n")
            rep = await r.reload(bad)
            assert not rep.ok and rep.added == ["f"] and rep.changed == ["a"]
            assert "injected failure on worker 0" in rep.error and rep.failures[0].worker == 0
            assert sorted(executor.sites) == ["a", "b"]
            assert all(s.staged is None and s.staged_listener is None for s in executor.sites.values())
            assert executor.sites["a"].generation == 1
            assert await roundtrip(a, 2) == b"a1hello"
            assert r.current == v1

            # a busy port: refused before any worker is asked
            rep = await r.reload(conf(echo_toml("a", a, "a2") + echo_toml("b", b, "b1") + echo_toml("c", busy_port)))
            assert not rep.ok and f"cannot listen on 127.0.0.1:{busy_port}: address already in use" in rep.error
            assert executor.sites["a"].generation == 1

            # a bad file: the loader's error, nothing touched
            def broken() -> Config:
                raise ConfigError("x.toml: services.a.kind: expected one of echo, proxy, got 'ftp'")

            rep = await r.reload(broken)
            assert not rep.ok and rep.error.startswith("x.toml: services.a.kind") and rep.failures[0].phase == "config"
            assert "the old config keeps serving" in rep.summary()

            # two reloads at once run one after the other
            v2 = conf(echo_toml("a", a, "a2") + echo_toml("b", b, "b1") + echo_toml("c", c, "c2"))
            v3 = conf(echo_toml("a", a, "a3") + echo_toml("b", b, "b1"))
            r2, r3 = await asyncio.gather(r.reload(v2), r.reload(v3))
            assert r2.ok and r3.ok and r3.seq == r2.seq + 1
            assert (r2.added, r2.changed) == (["c"], ["a"])
            assert (r3.removed, r3.changed, r3.unchanged) == (["c"], ["a"], ["b"])
            assert executor.sites["b"] is site_b and site_b.generation == 1   # never touched
            assert executor.sites["a"].generation == 3
            assert await roundtrip(a, 2) == b"a3hello"
            assert r.last is r3 and r3.summary().startswith("reload ok: added=[] changed=[a] removed=[c] unchanged=[b] in ")

            # runtime keys that need a restart are reported, and kept
            v4 = conf("[runtime]\nworkers = 7\ndrain_timeout = 2\n" + echo_toml("a", a, "a3") + echo_toml("b", b, "b1"))
            rep = await r.reload(v4)
            assert rep.ok and rep.unchanged == ["a", "b"]
            assert any("runtime.workers changed" in n for n in rep.notes)
            assert r.current is not None and r.current.runtime.drain_timeout == 2.0
            assert r.current.runtime.workers == v1.runtime.workers
        finally:
            await m.stop()

    try:
        run(main(), 60)
    finally:
        busy.close()
        KINDS.pop("fail_on_worker", None)


def test_reports_round_trip_through_json_and_format_for_people() -> None:
    rep = ReloadReport(ok=False, seq=3, trigger="admin", added=["x"], error="prepare (worker 1, service 'x'): boom")
    from hotproxy.reload import Failure

    rep.failures = [Failure("prepare", "boom", "x", 1), Failure("prepare", "bang", "x", 0)]
    back = ReloadReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back == rep
    text = format_report(back)
    assert text.splitlines()[0] == "reload failed: prepare (worker 1, service 'x'): boom (+1 more); " \
                                   "the old config keeps serving (0.0 ms)"
    assert "  failure: prepare (worker 0, service 'x'): bang" in text
    assert "added (not applied):     x" in text
    status = {"pid": 1, "config": "/x.toml", "started": 0, "restarts": 0, "stopping": None,
              "workers": [{"worker": 0, "pid": 5, "alive": True, "draining": 0}],
              "services": [{"name": "a", "kind": "echo", "listen": "127.0.0.1:1", "generations": {"0": 2},
                            "active": 3, "old_versions": 1, "totals": {"accepted": 7}, "changed_at": None,
                            "changed_by_reload": None}],
              "last_reload": rep.to_dict()}
    table = format_status(status)
    assert table.splitlines()[1].split()[:6] == ["a", "echo", "127.0.0.1:1", "2", "3", "accepted=7"]
    assert "last reload #3 (admin)" in table


# -- hotproxy check ----------------------------------------------------------------------------


def test_check_exits_0_on_a_good_file_and_1_with_one_line_on_a_bad_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "p.toml"
    port = free_port()      # check bind-probes the address: it must be free
    f.write_text(echo_toml("a", port))
    assert main(["check", "-c", str(f)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{f}: ok: 1 service: a (echo on 127.0.0.1:{port})") and err == ""
    f.write_text(echo_toml("a", 7000, extra="colour = 1"))
    assert main(["check", "-c", str(f)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"hotproxy: error: {f}: services.a.colour: unknown key (expected one of: kind, " \
                                "listen, backlog, greeting, max_connections)\n"
    assert main(["check", "-c", str(tmp_path / "nope.toml")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["run", "--print-default"]) == 0
    assert "[services." in capsys.readouterr().out


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("run", "check", "reload", "status", "stop"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        assert info.value.code == 0
        assert f"usage: hotproxy {cmd}" in capsys.readouterr().out


def test_talking_to_nobody_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "none.sock"
    for cmd in ("reload", "status", "stop"):
        assert main([cmd, "--socket", str(sock)]) == 1
        err = capsys.readouterr().err
        assert err == f"hotproxy: error: no hotproxy is running here (no admin socket {sock})\n"


# -- the admin socket ----------------------------------------------------------------------------


def test_admin_socket_is_private_and_refuses_symlinks_strangers_and_live_sockets(tmp_path: Path) -> None:
    async def handler(request: dict) -> tuple[dict, bool]:
        return {"ok": True, "echo": request["cmd"]}, False

    async def main_() -> None:
        path = str(tmp_path / "a.sock")
        server = AdminServer(path, handler, ("status",))
        await server.start()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        client = AdminClient(path)
        await client.connect()
        assert await client.request("status") == {"ok": True, "echo": "status"}
        assert (await client.request("reload"))["error"].startswith("unknown command 'reload'")
        await client.close()
        with pytest.raises(AdminError, match="another hotproxy is running on it"):
            await AdminServer(path, handler, ("status",)).start()
        await server.close()
        assert not os.path.exists(path)

        # a stale socket file (its owner died) is replaced
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        server = AdminServer(path, handler, ("status",))
        await server.start()
        await server.close()

        link = tmp_path / "link.sock"
        link.symlink_to(tmp_path / "elsewhere.sock")
        with pytest.raises(AdminError, match="is a symlink; refusing"):
            await AdminServer(str(link), handler, ()).start()
        plain = tmp_path / "plain"
        plain.write_text("")
        with pytest.raises(AdminError, match="exists and is not a socket"):
            await AdminServer(str(plain), handler, ()).start()
        with pytest.raises(AdminError, match="does not exist"):
            await AdminServer(str(tmp_path / "no" / "dir.sock"), handler, ()).start()

    run(main_(), 30)


def test_reload_is_refused_while_no_worker_can_build_it() -> None:
    a = free_port()

    async def main() -> None:
        m = WorkerManager(inline=True, drain_timeout=1.0)
        await m.start()
        try:
            r = Reloader(m)
            v1 = conf(echo_toml("a", a, "a1"))
            assert (await r.reload(v1, trigger="test")).ok
            m.workers[0].alive = False          # as if every worker were down
            rep = await r.reload(conf(echo_toml("a", a, "a2")))
            assert not rep.ok and "no worker is running" in rep.error
            assert r.current == v1 and m.workers[0].executor.sites["a"].generation == 1
            m.workers[0].alive = True
            assert (await r.reload(conf(echo_toml("a", a, "a2")))).ok
        finally:
            await m.stop()

    run(main())


def test_a_config_of_address_literals_loads_without_a_lookup_thread(tmp_path: Path) -> None:
    """The master loads a file of address literals in its loop (no thread, no DNS);
    a host name makes ``lookups=False`` step aside, and the reload then loads it
    in a thread as before."""
    px, up = free_port(), free_port()
    literal = tmp_path / "literal.toml"
    literal.write_text(f"[services.p]\nkind = 'proxy'\nlisten = '127.0.0.1:{px}'\n"
                       f"upstreams = ['127.0.0.1:{up}', '[::1]:{up}']\n")
    named = tmp_path / "named.toml"
    named.write_text(f"[services.p]\nkind = 'proxy'\nlisten = 'localhost:{px}'\n"
                     f"upstreams = ['localhost:{up}']\n")
    assert load_config(str(literal), lookups=False).services["p"].listener.port == px
    with pytest.raises(NeedsLookup):
        load_config(str(named), lookups=False)
    assert load_config(str(named)).services["p"].listener.host == "localhost"

    async def main() -> None:
        m = WorkerManager(inline=True, drain_timeout=1.0)
        await m.start()
        try:
            r = Reloader(m)
            calls: list[str] = []

            def quick(path: Path) -> Config:
                calls.append("quick")
                return load_config(str(path), lookups=False)

            def slow(path: Path) -> Config:
                calls.append("thread")
                return load_config(str(path))

            rep = await r.reload(lambda: slow(literal), quick_load=lambda: quick(literal))
            assert rep.ok and calls == ["quick"], (rep, calls)
            rep = await r.reload(lambda: slow(named), quick_load=lambda: quick(named))
            assert rep.ok and rep.changed == ["p"] and calls == ["quick", "quick", "thread"], (rep, calls)
        finally:
            await m.stop()

    run(main())


# -- issue 13: loops, clobbered paths, this host, empty files, any failure one line -----------------


def test_a_proxy_in_front_of_another_service_of_the_file_is_no_loop() -> None:
    """The embedded default (proxy -> echo), a chain of proxies ending at an echo, and a
    wildcard listener next to a proxy to an address of another host: all valid."""
    assert len(load_config(None).services) == 2
    chain = conf("[services.a]\nkind = 'proxy'\nlisten = '127.0.0.1:7001'\nupstreams = ['127.0.0.1:7002']\n"
                 "[services.b]\nkind = 'proxy'\nlisten = 'unix:b.sock'\nupstreams = ['localhost:7003']\n"
                 "[services.c]\nkind = 'proxy'\nlisten = '127.0.0.1:7002'\nupstreams = ['unix:b.sock']\n"
                 + echo_toml("e", 7003))
    assert list(chain.services) == ["a", "b", "c", "e"]
    away = conf("[services.a]\nkind = 'proxy'\nlisten = '0.0.0.0:7001'\nupstreams = ['192.0.2.1:7001']\n")
    assert list(away.services) == ["a"]


def test_files_hotproxy_creates_never_clobber_the_config_or_each_other() -> None:
    cases = [
        ("[runtime]\npidfile = 'test.toml'\n" + echo_toml("a", 7000),
         "runtime.pidfile: /etc/hotproxy/test.toml is the config file itself; expected a file of its own"),
        ("[runtime]\npidfile = 'ctl.sock'\nadmin_socket = 'ctl.sock'\n" + echo_toml("a", 7000),
         "runtime.pidfile: /etc/hotproxy/ctl.sock is the admin socket (runtime.admin_socket)"),
        ("[services.a]\nkind = 'echo'\nlisten = 'unix:test.toml'\n",
         "services.a.listen: unix:/etc/hotproxy/test.toml is the config file itself"),
        ("[runtime]\nadmin_socket = 'ctl.sock'\n[services.a]\nkind = 'echo'\nlisten = 'unix:ctl.sock'\n",
         "services.a.listen: unix:/etc/hotproxy/ctl.sock is the admin socket"),
        ("[runtime]\nadmin_socket = '/run/ctl.sock'\n" + echo_toml("a", 7000)
         + "[services.p]\nkind = 'proxy'\nlisten = '127.0.0.1:7001'\nupstreams = ['unix:/run/ctl.sock']\n",
         "services.p.upstreams[0]: unix:/run/ctl.sock is the admin socket: its clients could stop this hotproxy"),
    ]
    for text, expected in cases:
        with pytest.raises(ConfigError) as info:
            conf(text)
        assert str(info.value) == f"{HERE}: {expected}" or str(info.value).startswith(f"{HERE}: {expected}"), \
            (text, str(info.value))


def test_an_unforeseen_failure_of_the_loader_is_still_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import hotproxy.config as config_module

    def explode(self: object, text: str) -> None:
        raise TypeError("surprise\nsecond line")

    monkeypatch.setattr(config_module._Checker, "check", explode)
    with pytest.raises(ConfigError) as info:
        conf("")
    assert str(info.value) == f"{HERE}: cannot load: TypeError: surprise\\nsecond line"


def test_the_admin_socket_is_found_in_a_file_the_parser_cannot_read(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[runtime]\nadmin_socket = 'ctl.sock'\nx = " + "[" * 600 + "]" * 600 + "\n")
    assert admin_socket_for(str(f)) == str(tmp_path / "ctl.sock")
    f.write_text("[runtime]\nworkers = " + "9" * 5000 + "\n")
    assert admin_socket_for(str(f)) == default_admin_socket(str(f))


def test_pidfile_inspection_refuses_what_is_not_a_pidfile(tmp_path: Path) -> None:
    from hotproxy.config import inspect_pidfile

    assert inspect_pidfile(str(tmp_path / "new.pid")) == (None, None)
    problem, _ = inspect_pidfile(str(tmp_path / "no" / "dir.pid"))
    assert problem == f"directory {tmp_path / 'no'} does not exist"
    pid = tmp_path / "ok.pid"
    pid.write_text("1234\n")
    assert inspect_pidfile(str(pid)) == (None, 1234)
    for name, content in (("text", "[runtime]\nworkers = 2\n"), ("empty", ""), ("zero", "0\n"),
                          ("wide", "\uff11\uff12\n"), ("long", "1" * 80)):
        f = tmp_path / name
        f.write_text(content)
        problem, held = inspect_pidfile(str(f))
        assert problem is not None and "does not hold a process id; refusing to overwrite it" in problem, name
        assert held is None
    (tmp_path / "link").symlink_to(pid)
    assert inspect_pidfile(str(tmp_path / "link"))[0] == "exists and is not a regular file; refusing to replace it"
    assert inspect_pidfile(str(tmp_path))[0] == "exists and is not a regular file; refusing to replace it"


def test_check_probes_this_host_and_says_what_it_could_not_check(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """What a start or reload would refuse on this host, found by ``check`` with no instance running:
    one line each, naming the file and the key."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    port, busy_port = free_port(), free_port()
    busy = socket.socket()
    busy.bind(("127.0.0.1", busy_port))     # a stranger, without SO_REUSEPORT
    busy.listen()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a pid\n")
    plain = tmp_path / "plain"
    plain.write_text("")
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen()
    f = tmp_path / "p.toml"
    cases = [
        (echo_toml("a", busy_port), f"services.a.listen: cannot listen on 127.0.0.1:{busy_port}: address already in use"),
        ("[services.a]\nkind = 'echo'\nlisten = '192.0.2.1:7000'\n",
         "services.a.listen: cannot listen on 192.0.2.1:7000: "),
        ("[services.a]\nkind = 'echo'\nlisten = '[2001:db8::1]:7000'\n",
         "services.a.listen: cannot listen on [2001:db8::1]:7000: "),
        ("[services.a]\nkind = 'echo'\nlisten = 'unix:no/such/dir/a.sock'\n",
         f"services.a.listen: cannot listen on unix:{tmp_path}/no/such/dir/a.sock: directory {tmp_path}/no/such/dir "
         "does not exist"),
        ("[services.a]\nkind = 'echo'\nlisten = 'unix:plain'\n",
         f"services.a.listen: cannot listen on unix:{plain}: the path exists and is not a socket"),
        ("[services.a]\nkind = 'echo'\nlisten = 'unix:live.sock'\n",
         f"services.a.listen: cannot listen on unix:{tmp_path}/live.sock: in use by a live listener"),
        ("[runtime]\nadmin_socket = '/run/hotproxy-no-such-dir/admin.sock'\n" + echo_toml("a", port),
         "runtime.admin_socket: /run/hotproxy-no-such-dir/admin.sock: directory /run/hotproxy-no-such-dir does not exist"),
        ("[runtime]\npidfile = 'notes.txt'\n" + echo_toml("a", port),
         f"runtime.pidfile: {text_file}: exists and does not hold a process id; refusing to overwrite it"),
        ("[runtime]\npidfile = 'no/dir/hp.pid'\n" + echo_toml("a", port),
         f"runtime.pidfile: {tmp_path}/no/dir/hp.pid: directory {tmp_path}/no/dir does not exist"),
        (echo_toml("a", busy_port) + "[services.b]\nkind = 'echo'\nlisten = '192.0.2.1:7000'\n",
         f"services.a.listen: cannot listen on 127.0.0.1:{busy_port}: address already in use (+1 more)"),
    ]
    try:
        for text, expected in cases:
            f.write_text(text)
            assert main(["check", "-c", str(f)]) == 1, text
            out, err = capsys.readouterr()
            assert out == "" and len(err.splitlines()) == 1, (text, err)
            assert err.startswith(f"hotproxy: error: {f}: {expected}"), (text, err)
        f.write_text(echo_toml("a", port) + "[services.b]\nkind = 'echo'\nlisten = 'unix:b.sock'\n")
        assert main(["check", "-c", str(f)]) == 0
        out, err = capsys.readouterr()
        assert err == "" and out.splitlines() == [
            f"{f}: ok: 2 services: a (echo on 127.0.0.1:{port}), b (echo on unix:{tmp_path}/b.sock)",
            f"  note: no hotproxy answers on {default_admin_socket(str(f))}: every listen address was probed",
            "  note: not checked: building the services in worker processes (only a reload does that)"]
        assert not (tmp_path / "b.sock").exists()     # only looked
    finally:
        busy.close()
        live.close()


def test_an_empty_file_is_refused_unless_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "empty.toml"
    f.write_text("# nothing here yet\n")
    assert main(["check", "-c", str(f)]) == 1
    err = capsys.readouterr().err
    assert err == (f"hotproxy: error: {f}: no services (expected at least one [services.NAME] table; a config that "
                   "serves nothing is only accepted on purpose: hotproxy check|run|reload --allow-empty)\n")
    assert main(["run", "-c", str(f)]) == 1     # refused before anything starts
    assert "only accepted on purpose: hotproxy run --allow-empty)" in capsys.readouterr().err
    assert main(["check", "--allow-empty", "-c", str(f)]) == 0
    assert capsys.readouterr().out.startswith(f"{f}: ok: 0 services\n")


def test_the_reloader_turns_any_load_failure_into_one_line_and_refuses_to_empty(tmp_path: Path) -> None:
    a = free_port()

    async def main_() -> None:
        m = WorkerManager(inline=True, drain_timeout=1.0)
        await m.start()
        try:
            r = Reloader(m)
            v1 = conf(echo_toml("a", a, "a1"))
            assert (await r.reload(v1, trigger="start")).ok

            def deep() -> Config:
                raise RecursionError("maximum recursion depth exceeded")

            rep = await r.reload(deep, trigger="SIGHUP")
            assert not rep.ok and rep.error == "cannot load the config: RecursionError: maximum recursion depth exceeded"
            rep = await r.reload(conf(""), trigger="SIGHUP")
            assert not rep.ok and rep.error.startswith(f"{HERE}: no services") and \
                "hotproxy reload --allow-empty; a signal never empties hotproxy" in rep.error, rep.error
            assert "\n" not in format_report(rep)       # the summary says it all: one line
            rep = await r.reload(conf(""), trigger="admin")
            assert not rep.ok and r.current == v1 and m.workers[0].executor.sites["a"].generation == 1
            assert await roundtrip(a, 2) == b"a1hello"
            rep = await r.reload(conf(""), trigger="admin", allow_empty=True)
            assert rep.ok and rep.removed == ["a"] and r.current is not None and not r.current.services
        finally:
            await m.stop()

    run(main_())


def test_nobody_running_names_where_the_socket_came_from_and_a_broken_file_reports_its_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    f = tmp_path / "p.toml"
    f.write_text(echo_toml("a", free_port()))
    derived = default_admin_socket(str(f))
    for cmd in ("reload", "status", "stop"):
        assert main([cmd, "-c", str(f)]) == 1
        err = capsys.readouterr().err
        assert err == (f"hotproxy: error: no hotproxy is running here (no admin socket {derived}); that socket is "
                       f"derived from the path of {f}: give -c with the file hotproxy was started with, "
                       "or --socket PATH\n"), err
    f.write_text("[runtime]\nadmin_socket = 'ctl.sock'\n" + echo_toml("a", free_port()))
    assert main(["status", "-c", str(f)]) == 1
    assert f"(no admin socket {tmp_path}/ctl.sock); that socket is runtime.admin_socket in {f}: " \
           in capsys.readouterr().err
    # broken files that no longer say where the socket is: the file's error, one line
    for text, expected in (("runtime = [1]\n", f"{f}: runtime: expected a table [runtime], got an array"),
                           ("[runtime]\nadmin_socket = ''\n", f"{f}: runtime.admin_socket: expected a path, got an "
                                                               "empty string"),
                           ("", f"{f}: no services"),
                           ("x = " + "[" * 600 + "]" * 600, f"{f}: arrays or tables nested too deeply")):
        f.write_text(text)
        assert main(["reload", "-c", str(f)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"hotproxy: error: {expected}") and len(err.splitlines()) == 1, err
        assert f"(and no hotproxy answers on {derived}, derived from the path of {f})" in err, err
        assert main(["status", "-c", str(f)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("hotproxy: error: no hotproxy is running here") and len(err.splitlines()) == 1, err
