"""The build and the package: what CI and a user installing hotproxy rely on.

* ``HOTPROXY_REQUIRE_EXTENSIONS=1`` makes a missing or broken compiled core
  an import error naming the reason (CI sets it: a lost extension fails the
  run instead of skipping the compiled-core tests).  Shown on real copies of
  the package in which the extension is absent, or is a file that is not
  one, imported by a fresh interpreter that sees nothing else.
* ``python -m hotproxy`` is the ``hotproxy`` command.
* The installed package (the wheel ``pip install .`` built) carries the
  extension, its sources and the LICENSE, and no generated C.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import pytest

import hotproxy
from hotproxy import core

from conftest import CORES, echo_roundtrip, free_port, run
from helpers_program import Program, toml

PACKAGE = Path(hotproxy.__file__).parent
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")

#: prints where hotproxy came from and which core it chose
PROBE = ("import hotproxy, hotproxy.core as c; "
         "print(hotproxy.__file__); print(c.COMPILED_AVAILABLE, c.name())")


def _copy(tmp_path: Path, extension: bytes | None) -> Path:
    """A directory holding a copy of the hotproxy package without its compiled
    core; with *extension*, a file holding those bytes in the extension's place."""
    root = tmp_path / "site"
    shutil.copytree(PACKAGE, root / "hotproxy",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    if extension is not None:
        (root / "hotproxy" / f"_core{EXT_SUFFIX}").write_bytes(extension)
    return root


def _probe(path: Path | None, **env: str) -> subprocess.CompletedProcess[str]:
    """Import hotproxy.core in a fresh interpreter; with *path*, from there only
    (``-S``: no site-packages, so no installed hotproxy either)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HOTPROXY_")}
    if path is None:
        cmd = [sys.executable, "-c", PROBE]
    else:
        base["PYTHONPATH"] = str(path)
        cmd = [sys.executable, "-S", "-c", PROBE]
    return subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_require_extensions_fails_without_the_compiled_core(tmp_path: Path) -> None:
    root = _copy(tmp_path, None)
    # without the switch: the pure-Python twin, silently (an install without a compiler)
    plain = _probe(root)
    assert plain.returncode == 0, plain.stderr
    where, chosen = plain.stdout.splitlines()
    assert where.startswith(str(root)) and chosen == "False python"
    # with it: an ImportError that says why
    required = _probe(root, HOTPROXY_REQUIRE_EXTENSIONS="1")
    last = required.stderr.strip().splitlines()[-1]
    print(last)
    assert required.returncode == 1
    assert last.startswith("ImportError: hotproxy._core cannot be imported and HOTPROXY_REQUIRE_EXTENSIONS=1")
    assert "cannot import name '_core'" in last
    # "0" is off, as for HOTPROXY_NO_EXTENSIONS
    assert _probe(root, HOTPROXY_REQUIRE_EXTENSIONS="0").stdout.splitlines()[1] == "False python"


def test_require_extensions_fails_on_a_broken_compiled_core(tmp_path: Path) -> None:
    """A file in the extension's place that does not load (a half-written
    build, a wrong architecture): the loader's own reason is in the error."""
    root = _copy(tmp_path, b"not an ELF file")
    assert _probe(root).stdout.splitlines()[1] == "False python"
    required = _probe(root, HOTPROXY_REQUIRE_EXTENSIONS="1")
    last = required.stderr.strip().splitlines()[-1]
    print(last)
    assert required.returncode == 1
    assert "HOTPROXY_REQUIRE_EXTENSIONS=1" in last and f"_core{EXT_SUFFIX}" in last


def test_require_extensions_accepts_a_working_compiled_core() -> None:
    if not core.COMPILED_AVAILABLE:
        pytest.skip(f"the compiled core cannot be imported here: {core.UNAVAILABLE_REASON}")
    ok = _probe(None, HOTPROXY_REQUIRE_EXTENSIONS="1")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[1] == "True compiled"
    # it only requires the extension to be there: the twin can still be chosen
    twin = _probe(None, HOTPROXY_REQUIRE_EXTENSIONS="1", HOTPROXY_NO_EXTENSIONS="1")
    assert twin.stdout.splitlines()[1] == "True python"


def test_this_run_never_drops_the_compiled_core() -> None:
    """Under HOTPROXY_REQUIRE_EXTENSIONS=1 (CI), the fixture runs every core
    test on both cores; without it, a missing core is a visible skip."""
    if os.environ.get("HOTPROXY_REQUIRE_EXTENSIONS", "") not in ("", "0"):
        assert core.COMPILED_AVAILABLE and CORES == ["compiled", "python"]
    else:
        assert len(CORES) == 2


# -- python -m hotproxy -------------------------------------------------------------


def _main(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hotproxy", *args], capture_output=True, text=True,
                          timeout=60, cwd=str(cwd), stdin=subprocess.DEVNULL)


def test_python_dash_m_hotproxy_is_the_command(tmp_path: Path) -> None:
    version = _main("--version", cwd=tmp_path)
    assert (version.returncode, version.stdout.strip()) == (0, f"hotproxy {hotproxy.__version__}")
    bad = tmp_path / "bad.toml"
    bad.write_text("[services.a]\nkind = \"echo\"\nlisten = \"127.0.0.1:not-a-port\"\n")
    checked = _main("check", "-c", str(bad), cwd=tmp_path)
    assert checked.returncode == 1 and checked.stdout == ""
    assert len(checked.stderr.splitlines()) == 1 and str(bad) in checked.stderr, checked.stderr
    assert "Traceback" not in checked.stderr


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    started: list[Program] = []
    yield started
    for prog in started:
        prog.kill()
        print(f"---- log ----\n{prog.log()}")


def test_python_dash_m_hotproxy_runs_and_stops_an_instance(tmp_path: Path, programs: list[Program]) -> None:
    port = free_port()
    cfg = tmp_path / "hotproxy.toml"
    cfg.write_text(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{port}"}}, workers=1))
    prog = Program(cfg, tmp_path / "run.log", module="hotproxy")
    programs.append(prog)

    async def main() -> None:
        await prog.wait_ready()
        assert await echo_roundtrip("127.0.0.1", port, b"via -m") == b"via -m"
        status = _main("status", "-c", str(cfg), "--json", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["ready"] is True
        stopped = _main("stop", "-c", str(cfg), cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert await prog.wait_exit(30) == 0

    run(main(), 90)


# -- the installed package ------------------------------------------------------------


def _installed_files() -> list[str]:
    dist = importlib.metadata.distribution("hotproxy")
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("an editable install: no wheel to look at (CI installs one)")
    return [str(f) for f in dist.files or []]


def test_the_installed_package_has_the_core_and_no_generated_c() -> None:
    files = _installed_files()
    package = [f for f in files if f.startswith("hotproxy/")]
    print("installed, besides the Python files:",
          sorted(f for f in package if not f.endswith((".py", ".pyc"))))
    assert f"hotproxy/_core{EXT_SUFFIX}" in package
    assert {"hotproxy/_core.pyx", "hotproxy/_core.pxd", "hotproxy/_core.pyi", "hotproxy/py.typed",
            "hotproxy/__main__.py"} <= set(package)
    assert [f for f in package if f.endswith((".c", ".html"))] == []
    assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files)
    meta = importlib.metadata.metadata("hotproxy")
    assert meta["License-Expression"] == "MIT" and meta.get_all("License-File") == ["LICENSE"]
