"""A fleet's apply time: from ``hotproxy fleet apply`` to every instance committed (issue 20).

Run ``python bench/fleet.py`` (1 and 3 instances, 10 and 1,000 services;
a few minutes) or ``python bench/fleet.py --write-results bench/RESULTS.md``
to put the table between the ``fleet:begin``/``fleet:end`` markers there.
It is a script, not a test: nothing is asserted, everything is printed.

What runs, as ``tests/test_fleet.py`` starts it:

* a real etcd server (Debian's ``etcd-server``; ``ci/etcd.sh`` installs it)
  on 127.0.0.1 ports of its own, its data in a temporary directory;
* N real ``hotproxy run -c FILE`` instances (2 workers each), each local
  file holding only ``[runtime]``: ``config_source``, ``instance_id``,
  ``listen_host`` = 127.0.0.2, .3, .4, an admin socket of its own;
* a fleet config of S echo services (``[services.sNNNN]``, one port each,
  free on every instance's address).

Per (N, S), in order: the first apply (S services added on every
instance), then R applies that change one service (an echo's greeting,
there and back), then R that change every service.  Each figure is the
wall time of the ``hotproxy fleet apply -c FILE --etcd URL`` command (its
interpreter start included): it proposes, waits until every live instance
has prepared (every check, every ``Precommit`` on its workers), writes the
commit, and returns once every instance says it committed -- "from fleet
apply to all committed".  The median of the R rounds is shown, with the
range.  Every apply must succeed; one that does not is shown as failed with
its line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
#: the services' ports are taken from here up (free on every instance's address)
PORT_FIRST = 21000
PORT_LAST = 32000
BEGIN, END = "<!-- fleet:begin -->", "<!-- fleet:end -->"


def log(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hotproxy_argv() -> list[str]:
    """The ``hotproxy`` console script next to this Python, else via Python."""
    exe = shutil.which("hotproxy", path=os.path.dirname(sys.executable)) or shutil.which("hotproxy")
    return [exe] if exe else [sys.executable, "-m", "hotproxy.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """*count* ports a plain bind can take now on every address of ``HOSTS``."""
    out: list[int] = []
    for port in range(PORT_FIRST, PORT_LAST):
        if len(out) == count:
            return out
        ok = True
        for host in HOSTS:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            out.append(port)
    raise RuntimeError(f"only {len(out)} free ports in {PORT_FIRST}-{PORT_LAST}, {count} needed")


class Processes:
    """Everything started here, each in its own process group; ``stop_all`` ends them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], logfile: Path) -> subprocess.Popen[bytes]:
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)   # a worker that outlived its master
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


def start_etcd(procs: Processes, tmp: Path) -> str:
    """A started etcd; its ``etcd://`` URL (prefix ``bench``)."""
    binary = shutil.which("etcd")
    if binary is None:
        raise SystemExit("no etcd server installed (bash ci/etcd.sh)")
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    proc = procs.start([binary, "--name", "bench", "--data-dir", str(tmp / "etcd-data"),
                        "--listen-client-urls", client, "--advertise-client-urls", client,
                        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                        "--initial-cluster", f"bench={peer}"], tmp / "etcd.log")
    port = int(client.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"etcd exited with {proc.returncode}: see {tmp / 'etcd.log'}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return f"etcd://127.0.0.1:{port}/bench"
        if time.monotonic() > deadline:
            raise SystemExit("etcd not listening within 30 s")
        time.sleep(0.05)


def fleet_text(ports: list[int], greeting: str, change: str) -> str:
    """S echo services; *change* ``"one"``: only the first greets with *greeting*; ``"all"``: every one."""
    lines = []
    for i, port in enumerate(ports):
        lines += [f"[services.s{i:05d}]", 'kind = "echo"', f'listen = "127.0.0.1:{port}"']
        if change == "all" or i == 0:
            lines.append(f"greeting = {json.dumps(greeting)}")
    return "\n".join(lines) + "\n"


def cli(args: list[str], timeout: float = 600.0) -> tuple[int, str, float]:
    """``hotproxy ARGS``: (exit code, stdout + stderr, wall seconds)."""
    t0 = time.monotonic()
    out = subprocess.run(hotproxy_argv() + args, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    return out.returncode, (out.stdout or "") + (out.stderr or ""), time.monotonic() - t0


def fleet_status(url: str) -> dict[str, Any]:
    code, out, _ = cli(["fleet", "status", "--etcd", url, "--json"], 60)
    if code != 0:
        raise RuntimeError(f"fleet status failed: {out.strip()}")
    return json.loads(out)  # type: ignore[no-any-return]


def wait_members(url: str, ids: set[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if set(fleet_status(url)["instances"]) >= ids:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"instances {sorted(ids)} not all in the fleet within {timeout:g} s")
        time.sleep(0.2)


class Cell:
    """The applies of one kind at one (N, S): wall seconds, and the failures' lines."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.failed: list[str] = []

    def text(self) -> str:
        if self.failed and not self.times:
            return f"failed: {self.failed[0][:120]}"
        if not self.times:
            return "-"
        med = statistics.median(self.times) * 1000.0
        out = f"{med:,.0f} ms"
        if len(self.times) > 1:
            out += f" ({min(self.times) * 1000:,.0f}-{max(self.times) * 1000:,.0f}, ×{len(self.times)})"
        if self.failed:
            out += f"; {len(self.failed)} failed: {self.failed[0][:80]}"
        return out


def run_size(url: str, tmp: Path, n: int, sizes: list[int], rounds: int, deadline: float,
             procs: Processes) -> dict[int, dict[str, Cell]]:
    """N instances of a fresh fleet prefix; every size's applies; the instances stopped after."""
    prefix_url = f"{url}-{n}"   # a prefix of its own: the instances of the last run are gone
    started = []
    ids = set()
    for i in range(n):
        iid = f"i{i + 2}"
        ids.add(iid)
        local = tmp / f"{iid}-{n}.toml"
        local.write_text("[runtime]\nworkers = 2\nreload_timeout = 600.0\n"
                         f'admin_socket = "{tmp / f"{iid}-{n}.sock"}"\n'
                         f'config_source = "{prefix_url}"\ninstance_id = "{iid}"\nlisten_host = "{HOSTS[i]}"\n')
        started.append(procs.start(hotproxy_argv() + ["run", "-c", str(local)], tmp / f"{iid}-{n}.log"))
    out: dict[int, dict[str, Cell]] = {}
    try:
        wait_members(prefix_url, ids)
        for size in sizes:
            ports = free_ports(size)
            cells = out[size] = {"first": Cell(), "one": Cell(), "all": Cell()}
            path = tmp / f"fleet-{n}-{size}.toml"
            plan = [("first", "all", "g0")] + [("one", "one", f"o{r}") for r in range(rounds)] + \
                [("all", "all", f"a{r}") for r in range(rounds)]
            for kind, change, greeting in plan:
                path.write_text(fleet_text(ports, greeting, change))
                code, text, took = cli(["fleet", "apply", "-c", str(path), "--etcd", prefix_url,
                                        "--deadline", str(deadline)])
                # (fleet apply waits at most 30 s for the instances to commit: each must say it did)
                if code == 0 and len(re.findall(r": committed revision \d+", text)) == n:
                    cells[kind].times.append(took)
                elif code == 0:
                    cells[kind].failed.append("committed, but not every instance within fleet apply's 30 s")
                else:
                    cells[kind].failed.append(text.strip().splitlines()[-1] if text.strip() else f"exit {code}")
                log(f"{n} instance(s), {size} services, {kind}: {took * 1000:.0f} ms"
                    + ("" if code == 0 else f" FAILED: {text.strip()[:200]}"))
            # the next size starts from nothing on these ports: an empty fleet is not allowed,
            # so the next size's first apply replaces these services
    finally:
        for proc in started:
            procs.stop(proc)
    return out


def table(results: dict[int, dict[int, dict[str, Cell]]], sizes: list[int]) -> str:
    head = "| instances | " + " | ".join(f"{s:,} services: first apply · 1 changed · all changed"
                                         for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for n, by_size in results.items():
        cells = []
        for s in sizes:
            c = by_size.get(s)
            cells.append("-" if c is None else f"{c['first'].text()} · {c['one'].text()} · {c['all'].text()}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(path: Path, body: str) -> None:
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{BEGIN}\n{body}\n{END}{tail}"
    else:
        text = text.rstrip("\n") + f"\n\n## Fleet apply (`bench/fleet.py`, issue 20)\n\n{BEGIN}\n{body}\n{END}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", default="1,3", help="instance counts (at most 3), comma-separated")
    ap.add_argument("--services", default="10,1000", help="service counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="applies per kind of change (the median is shown)")
    ap.add_argument("--deadline", type=float, default=120.0, help="fleet apply --deadline (seconds)")
    ap.add_argument("--write-results", type=Path, default=None, help="put the table in this file (markers)")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.instances.split(",")]
    sizes = [int(x) for x in args.services.split(",")]
    if any(not 1 <= c <= len(HOSTS) for c in counts):
        ap.error(f"--instances: each between 1 and {len(HOSTS)}")
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="hpfleet-"))
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    results: dict[int, dict[int, dict[str, Cell]]] = {}
    try:
        url = start_etcd(procs, tmp)
        for n in counts:
            results[n] = run_size(url, tmp, n, sizes, args.rounds, args.deadline, procs)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    command = "python bench/fleet.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {(time.monotonic() - t0) / 60:.1f} min; "
        f"machine: {os.cpu_count()} CPUs, load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after  ",
        "",
        "Wall time of `hotproxy fleet apply` (interpreter start included) until every instance says it committed: "
        "the first apply adds every service; \"1 changed\" changes one echo's greeting, \"all changed\" every "
        "one's; median (range, rounds).  Each instance: 2 workers, its own `listen_host`; one etcd on loopback.",
        "",
        table(results, sizes),
    ])
    print(body)
    if args.write_results is not None:
        write_results(args.write_results, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
