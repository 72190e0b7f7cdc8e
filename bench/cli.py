"""CPU per call of the ``hotproxy`` commands an operator (or a script) runs often.

Run ``python bench/cli.py`` (``--calls N``, default 20).  It starts one
``hotproxy run`` on a loopback port (one echo service, 1 worker), then, N
rounds over, runs each of

* ``python -c pass``            -- the baseline: a bare interpreter start;
* ``hotproxy check -c FILE``    -- loads and checks the config, builds the services;
* ``hotproxy status -c FILE``   -- one request on the admin socket;
* ``hotproxy reload -c FILE``   -- one request; the master reloads (nothing changed)

and prints a markdown table: the median CPU-seconds (user + system) per
call, read from ``getrusage(RUSAGE_CHILDREN)`` around each call, and its
ratio to ``python -c pass`` measured in the same rounds (the goal for
``status`` and ``reload`` is at most 3x).  The master's own CPU is not
counted: it is this script's child, reaped only at the end.

The commands run as installed ones do: with bytecode caches
(``PYTHONDONTWRITEBYTECODE`` is dropped from their environment, and one
uncounted round writes the caches of an editable install first).

Rules: only 127.0.0.1, a port below 32768, every call bounded by a timeout,
the instance stopped in a ``finally`` (its process group: SIGTERM, then
SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"


def hotproxy_argv() -> list[str]:
    """The ``hotproxy`` console script next to this Python (what operators run), else via Python."""
    exe = shutil.which("hotproxy", path=os.path.dirname(sys.executable)) or shutil.which("hotproxy")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from hotproxy.cli import main; sys.exit(main(sys.argv[1:]))"]


def free_port() -> int:
    """A loopback port below the ephemeral range that nobody holds right now."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


#: the commands' environment: bytecode cached, as after ``pip install``
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def cpu_of(argv: list[str], timeout: float = 60.0) -> tuple[float, float]:
    """(CPU-seconds, wall seconds) of one run of *argv*, which must exit 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=timeout, env=ENV)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.decode().strip()}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def wait_ready(argv: list[str], config: Path, master: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if master.poll() is not None:
            raise RuntimeError(f"hotproxy run exited with {master.returncode}")
        probe = subprocess.run(argv + ["status", "-c", str(config), "--json"], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=30, env=ENV)
        if probe.returncode == 0 and b'"ready": true' in probe.stdout:
            return
        time.sleep(0.1)
    raise RuntimeError(f"hotproxy run not ready within {timeout:g}s")


def stop(master: subprocess.Popen[bytes]) -> None:
    """SIGTERM the instance's process group, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(master.pid, sig)
        except ProcessLookupError:
            break
        try:
            master.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="calls of each command (default 20)")
    args = ap.parse_args()
    calls = max(1, min(args.calls, 1000))
    hp = hotproxy_argv()
    with tempfile.TemporaryDirectory(prefix="hotproxy-bench-cli-") as tmpname:
        tmp = Path(tmpname)
        config = tmp / "hotproxy.toml"
        config.write_text("[runtime]\nworkers = 1\nadmin_socket = \"admin.sock\"\nlog_level = \"warning\"\n\n"
                          f"[services.echo]\nkind = \"echo\"\nlisten = \"{HOST}:{free_port()}\"\n")
        log = open(tmp / "log", "wb")
        master = subprocess.Popen(hp + ["run", "-c", str(config)], stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
        try:
            wait_ready(hp, config, master)
            commands = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "hotproxy check -c FILE": hp + ["check", "-c", str(config)],
                "hotproxy status -c FILE": hp + ["status", "-c", str(config)],
                "hotproxy reload -c FILE": hp + ["reload", "-c", str(config)],
            }
            cpu: dict[str, list[float]] = {name: [] for name in commands}
            wall: dict[str, list[float]] = {name: [] for name in commands}
            names = list(commands)
            for argv in commands.values():   # the uncounted round: bytecode caches written
                cpu_of(argv)
            for i in range(calls):
                # rotate the order each round: no command always runs first after a pause
                for name in names[i % len(names):] + names[:i % len(names)]:
                    c, w = cpu_of(commands[name])
                    cpu[name].append(c)
                    wall[name].append(w)
        finally:
            stop(master)
            log.close()
    base = statistics.median(cpu["python -c pass"])
    print(f"CPU per call, median of {calls} calls each (user + system, from getrusage); "
          f"`hotproxy` is {' '.join(hp) if len(hp) == 1 else 'python -c ...cli.main'}\n")
    print("| command | CPU ms / call | x `python -c pass` | wall ms (median) |")
    print("|---|---:|---:|---:|")
    for name in commands:
        c = statistics.median(cpu[name])
        print(f"| `{name}` | {c * 1000:.1f} | {c / base:.2f} | {statistics.median(wall[name]) * 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
