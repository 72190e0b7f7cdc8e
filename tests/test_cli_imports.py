"""What the short-lived ``hotproxy`` commands import.

``hotproxy reload`` and ``hotproxy status`` send one JSON line; a script may
run them every fraction of a second next to a loaded proxy.  Their cost is
their start-up, so they must not import asyncio, uvloop, the compiled core,
the config loader or the reload machinery (``bench/cli.py`` measures the
CPU per call).  These tests run the real commands as fresh processes
against a real ``hotproxy run`` and look at ``sys.modules`` when they are
done; nothing here is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import free_port, run
from helpers_program import Program, toml
from hotproxy.paths import _plain_admin_socket, admin_socket_for, default_admin_socket

Start = Callable[..., Program]

#: what ``reload``, ``status`` and ``stop`` must never import
HEAVY = ("asyncio", "uvloop", "hotproxy._core", "hotproxy._core_py", "hotproxy.core", "hotproxy.config",
         "hotproxy.reload", "hotproxy.manager", "hotproxy.admin", "hotproxy.master", "dataclasses", "tomllib")

#: runs ``hotproxy ARGS`` in this process, then prints the exit code and every module imported
PROBE = """
import json, sys
from hotproxy.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print("\\nPROBE " + json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def probe(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, set[str], str]:
    """(exit code, modules imported, stderr) of ``hotproxy ARGS`` as a fresh process."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)
    last = proc.stdout.rstrip().rsplit("\n", 1)[-1]
    assert last.startswith("PROBE "), (proc.stdout, proc.stderr)
    result = json.loads(last[len("PROBE "):])
    return result["code"], set(result["modules"]), proc.stderr


def test_reload_status_and_stop_import_neither_asyncio_nor_the_core_nor_the_config_loader(start: Start) -> None:
    port = free_port()
    prog = start(toml({"a": {"kind": "echo", "listen": f"127.0.0.1:{port}"}}, workers=1))
    assert prog.config is not None
    cfg = str(prog.config)
    run(prog.wait_ready(), 60)
    for args in (["status", "-c", cfg], ["status", "-c", cfg, "--json"], ["reload", "-c", cfg],
                 ["reload", "-c", cfg, "--json"], ["status", "--socket", prog.socket_path()],
                 ["stop", "-c", cfg]):
        code, modules, err = probe(*args, cwd=prog.cwd)
        heavy = sorted(m for m in HEAVY if m in modules)
        print(f"hotproxy {' '.join(args)}: exit {code}, {len(modules)} modules")
        assert code == 0, (args, err)
        assert heavy == [], (args, heavy)
    assert run(prog.wait_exit(30), 40) == 0


def test_talking_to_nobody_and_version_import_nothing_heavy(tmp_path: Path) -> None:
    code, modules, err = probe("status", "--socket", str(tmp_path / "nobody.sock"))
    assert code == 1 and "no hotproxy is running here" in err
    assert [m for m in HEAVY if m in modules] == []
    # the socket path derived from the file's; with nobody there, `reload`
    # loads the file (an error path: it says what is wrong with the file, if anything)
    (tmp_path / "plain.toml").write_text(f'[services.a]\nkind = "echo"\nlisten = "127.0.0.1:{free_port()}"\n')
    code, modules, err = probe("reload", "-c", str(tmp_path / "plain.toml"))
    assert code == 1 and "no hotproxy is running here" in err and len(err.splitlines()) == 1, err
    code, modules, err = probe("--version")
    assert code == 0 and [m for m in HEAVY if m in modules] == []


def test_check_imports_the_config_loader_but_not_the_master(tmp_path: Path) -> None:
    """``check`` builds every service as a reload would, so it imports the
    services (asyncio with them) -- and nothing of the running program."""
    f = tmp_path / "c.toml"
    f.write_text(toml({"a": {"kind": "echo", "listen": f"127.0.0.1:{free_port()}"},
                       "p": {"kind": "proxy", "listen": f"127.0.0.1:{free_port()}", "upstreams": ["127.0.0.1:9"]}}))
    code, modules, err = probe("check", "-c", str(f))
    assert code == 0, err
    assert "hotproxy.config" in modules
    assert [m for m in ("uvloop", "hotproxy.manager", "hotproxy.master", "hotproxy.executor", "hotproxy.reload",
                        "hotproxy.admin", "hotproxy.channel", "importlib.resources") if m in modules] == []


def test_the_package_imports_its_public_names_on_first_use() -> None:
    code = ("import sys, hotproxy\n"
            "assert [m for m in sys.modules if m.startswith('hotproxy.')] == [], sys.modules\n"
            "assert hotproxy.__version__\n"
            "from hotproxy import WorkerManager\n"
            "assert 'hotproxy.manager' in sys.modules and 'hotproxy.proxy' not in sys.modules\n"
            "from hotproxy import *\n"
            "import hotproxy.manager, hotproxy.proxy, hotproxy.errors\n"
            "assert WorkerManager is hotproxy.manager.WorkerManager\n"
            "assert ProxyFactory is hotproxy.proxy.ProxyFactory and HotproxyError is hotproxy.errors.HotproxyError\n"
            "assert set(hotproxy.__all__) <= set(dir(hotproxy))\n"
            "assert set(hotproxy._EXPORTS) == set(hotproxy.__all__)\n"
            "try:\n    hotproxy.nothing_such\nexcept AttributeError:\n    pass\nelse:\n    raise AssertionError\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- finding the admin socket without the TOML parser ------------------------------------------


def _toml_value(text: str) -> object:
    runtime = tomllib.loads(text).get("runtime")
    return runtime.get("admin_socket") if isinstance(runtime, dict) else None


PLAIN = [
    ('[runtime]\nadmin_socket = "a.sock"\n', "a.sock"),
    ("[ runtime ]  # the runtime\r\nworkers = 2\r\nadmin_socket='/run/a.sock' # here\r\n", "/run/a.sock"),
    ('[runtime]\n# admin_socket = "old.sock"\n[services.x]\nkind = "echo"\n', None),
    ('[services.x]\nkind = "echo"\n', None),
    ('[runtime]\nadmin_socket = ""\n', ""),
]

UNSURE = [
    'runtime.admin_socket = "a"\n',                           # a dotted key
    'runtime = { admin_socket = "a" }\n',                     # an inline table
    '[runtime]\n"admin_socket" = "a"\n',                      # a quoted key
    '[runtime]\n"admin\\u005Fsocket" = "a"\n',                # spelt with an escape
    '[runtime]\nadmin_socket = "a\\\\b"\n',                   # an escape in the value
    '[runtime]\nx = """\n[services.y]\n"""\nadmin_socket = "a"\n',   # a multi-line string
    '[[runtime]]\nadmin_socket = "a"\n',                      # an array of tables
    '[runtime.x]\nadmin_socket = "a"\n',
    '[services.x]\nadmin_socket = "a"\n',
    '[runtime]\npidfile = "admin_socket.pid"\n',              # the word in another value
    '[runtime]\nx = [\n  ["a"],\n]\nadmin_socket = "a"\n',    # an array's line looks like a header
]


@pytest.mark.parametrize("text, expected", PLAIN)
def test_a_plainly_written_admin_socket_is_read_without_tomllib(text: str, expected: str | None) -> None:
    assert _plain_admin_socket(text) == (True, expected)
    assert _toml_value(text) == expected


@pytest.mark.parametrize("text", UNSURE)
def test_anything_else_is_left_to_tomllib(text: str, tmp_path: Path) -> None:
    assert _plain_admin_socket(text) == (False, None)
    f = tmp_path / "h.toml"
    f.write_text(text)
    value = _toml_value(text)
    expected = str(tmp_path / value) if isinstance(value, str) and value else default_admin_socket(str(f))
    assert admin_socket_for(str(f)) == expected


LINES = ["[runtime]", "[services.a]", "[ runtime . x ]", "[[runtime]]", "[\"runtime\"]", "workers = 2",
         'admin_socket = "a.sock"', "admin_socket='b.sock'  # c", 'admin_socket = "c\\\\d"', '"admin_socket" = "q"',
         "runtime.admin_socket = 'r'", "# admin_socket = 'old'", 'kind = "echo"', "x = [", '  ["a"],', "  [1],",
         "]", 'g = """', 'g = "admin_socket"', "", "   ", "\t[runtime]\t# t"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=8), st.sampled_from(["\n", "\r\n"]))
def test_the_plain_reading_never_disagrees_with_tomllib(lines: list[str], eol: str) -> None:
    text = eol.join(lines) + eol
    try:
        expected = _toml_value(text)
    except tomllib.TOMLDecodeError:
        return   # a broken file: admin_socket_for falls back to its best effort either way
    found, value = _plain_admin_socket(text)
    if found:
        assert value == expected, text
