"""hotproxy with many services: check, start-up, reloads, status, stalls, memory.

Run ``python bench/scale.py --quick`` (10 and 300 services, about a
minute) or ``python bench/scale.py --write-results bench/RESULTS.md`` for
the full run (10, 1,000 and 10,000 services and HAProxy; several minutes).
It is a script, not a test: nothing is asserted, everything is printed as
one markdown table, then the issue-18 goals, each marked met or missed.

Per size N, with the real ``hotproxy run -c FILE`` (2 workers):

* **The config.**  N services on 127.0.0.1, ports below 32768 (free ones,
  found with a bind probe, from 2000 up; the same ports serve every size and
  then HAProxy, one after the other).  Service 0 is ``probe``, an echo the
  reloads never touch; the others alternate echo and proxy, each proxy in
  front of the echo just before it (never its own address: the config
  checker refuses proxy loops).  ``reload_timeout = 300`` so that a slow
  reload is measured, not cut short; the log is at ``info`` (the default).
* **check**: wall time of ``hotproxy check -c FILE`` (the CLI, interpreter
  start included) before the instance starts: every address is bind-probed.
  hotproxy's modules are byte-compiled first, as an install does
  (``byte_compile``: with ``PYTHONDONTWRITEBYTECODE=1`` and no ``.pyc``,
  every process compiled them again, ~0.15 s of CPU each).
  **read + parse**: ``hotproxy.config.load_config(FILE)`` timed in this
  process (the part of a reload that reads the file; the master does the
  same at each reload), median of up to 7.
* **Start-up**: from just before ``Popen`` to the first ``status`` over the
  admin socket that says ``ready`` (polled every 20 ms).
* **Reloads**, each asked for over the admin socket (``{"cmd": "reload"}``,
  as ``hotproxy reload`` does) with the file rewritten (atomically) first;
  the figures are the report's own ``duration_ms`` (request received ->
  every worker committed), ``prepare_ms`` and ``commit_ms``; "beyond parse"
  is ``duration_ms`` minus the report's own ``load_ms`` (the master reading
  and checking the file, in the same reload; shown "in the master" beside
  the bench's parse time), or minus the bench's parse time when the report
  has no ``load_ms`` (older hotproxy).  In order: the unchanged
  file; 1 service changed in place (an echo's greeting, back and forth);
  1 service added, then that one removed; then K = min(1,000, N-1) services
  changed (greetings and proxies' ``balance``), twice (there and back).
  The 1-service and unchanged reloads are repeated 3 times when one takes
  under 3 s (the median is shown, ``x3``), else done once.
* **status latency**: ``{"cmd": "status", "summary": true}`` (what
  ``hotproxy status`` asks by default: counts, not an entry per service,
  above 50 services) from this process with
  ``hotproxy.adminclient.AdminConnection`` (a new connection per call, as
  the CLI makes; no CLI start-up measured): from connecting to the last
  byte of the reply line (the JSON is not decoded).  At rest: 10 calls,
  one after the other, with the probe (below) watching, then as long
  without them: a status call asks every worker for its figures.
  During a reload: back to back (10 ms apart) from a thread while the
  second K-changed reload runs; only that reload is polled, so the polling
  never inflates the other reloads' figures.
* **Worker stalls**: a probe process (its own interpreter, so this script's
  GIL is not in its timings) runs two threads against ``probe``: one makes
  short connections one at a time (connect, 32 bytes, echo, close; at most
  one every 2 ms; ``SO_REUSEPORT`` spreads them over both workers) and one
  keeps one long connection echoing 32 bytes every 1 ms (one worker).  It
  records the largest gap between two successful round trips.  Each
  reload's window runs from 0.2 s before the request to 0.2 s after its
  reply; right after it, the probe runs as long again without a reload
  (capped at 30 s): the baseline.  The stall above baseline is the
  difference of the two largest gaps.  The goal's worst case leaves out
  the reload during which status was polled (shown on its own row).
* **RSS** of the master and each worker (``/proc/PID/status`` ``VmRSS``)
  after the reloads; KiB per service is over the smallest size's figure.

**HAProxy** (``--no-haproxy`` skips it), at the largest size -- and also at
the largest size hotproxy served, when hotproxy failed at the largest --
on the same ports after hotproxy has stopped: N ``frontend``s ``bind 127.0.0.1:PORT``,
``mode tcp``, all with ``default_backend`` one backend: a small threaded
echo server run by this script.  HAProxy's defaults otherwise (one thread
per CPU), ``maxconn 1000``, master-worker mode ``-W`` with a stats socket
``expose-fd listeners`` (the seamless reload).  Measured: ``haproxy -c -f
FILE`` wall time; start-up (``Popen`` -> an echo answered through the last
frontend); and 3 reloads, each writing the file with one more frontend on
a new port and sending ``SIGUSR2`` to the master: the time from the signal
to an echo answered through that new frontend -- the new worker serving
(polled every 5 ms).  The same probe (short connections only: a long one
would keep each old worker alive) runs on the first frontend during each.

Rules: only 127.0.0.1, listener ports below 32768; the soft
``RLIMIT_NOFILE`` is raised to the hard limit (inherited by everything
started here) and a size that needs more descriptors than that is skipped
with the reason; every wait has a deadline and every loop a bound in time
and count; every process started here has its own process group and is
stopped in a ``finally`` (SIGTERM, then SIGKILL) -- also on Ctrl-C and
SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hotproxy.adminclient import AdminConnection, AdminError, AdminTimeout, encode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
#: listener ports are taken from here up (below the ephemeral range, 32768+;
#: other benchmarks' and tests' random ports are mostly 20000-32000)
PORT_FIRST, PORT_LAST = 2000, 32767
QUICK_SIZES = (10, 300)
FULL_SIZES = (10, 1000, 10000)
#: services changed by the big reload (at most N-1: the probe never changes)
MANY = 1000
WORKERS = 2
#: repeats of the small reloads, when one takes less than REPEAT_UNDER seconds
REPEATS = 3
REPEAT_UNDER = 3.0
#: the probe window around a reload, before the request and after the reply
WINDOW_PAD = 0.2
#: the longest baseline window
BASELINE_CAP = 30.0
#: every wait's deadline
START_TIMEOUT = 900.0
RELOAD_TIMEOUT = 900.0
STATUS_TIMEOUT = 300.0
CHECK_TIMEOUT = 900.0
STATUS_AT_REST = 10
#: descriptors a process needs beyond its listeners
FD_SLACK = 512
HAPROXY_MAXCONN = 1000
HAPROXY_RELOADS = 3
MARK_BEGIN, MARK_END = "<!-- scale:begin -->", "<!-- scale:end -->"
SECTION_TITLE = "## Many services (`bench/scale.py`, issue 18)"


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes ------------------------------------------------------------------


class Procs:
    """Every process started here; ``stop_all`` ends them (process groups)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 20.0) -> None:
        """*sig* to its process group, then SIGKILL after *wait* seconds."""
        for s, w in ((sig, wait), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, s)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(w)
                break
            except subprocess.TimeoutExpired:
                continue
        # what the group still holds (a worker that outlived its master)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, wait=5.0)


def hotproxy_argv() -> list[str]:
    """The ``hotproxy`` console script next to this Python, else via Python."""
    exe = shutil.which("hotproxy", path=os.path.dirname(sys.executable)) or shutil.which("hotproxy")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from hotproxy.cli import main; sys.exit(main(sys.argv[1:]))"]


def raise_nofile() -> tuple[int, int]:
    """Soft ``RLIMIT_NOFILE`` up to the hard limit; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def tail(path: Path, lines: int = 5) -> str:
    """Why a process failed, from its log: the first ERROR line (and how many there were), else the last lines."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    errors = [line for line in text if " ERROR " in line]
    if errors:
        first = errors[0].split(" ERROR ", 1)[1]
        return first[:400] + (f" (and {len(errors) - 1} more ERROR lines)" if len(errors) > 1 else "")
    return " | ".join(line[:300] for line in text[-lines:])


# -- ports and config files --------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """*count* loopback ports from PORT_FIRST up that a bind can take now."""
    out: list[int] = []
    for port in range(PORT_FIRST, PORT_LAST + 1):
        if len(out) == count:
            break
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        out.append(port)
    if len(out) < count:
        raise RuntimeError(f"only {len(out)} free ports below 32768, {count} needed")
    return out


@dataclass
class Layout:
    """The services of one size, and what runs of them now (variants, extras)."""

    n: int
    ports: list[int]
    admin_socket: str
    #: service index -> 0 (as in the base file) or 1 (changed)
    variant: dict[int, int] = field(default_factory=dict)
    #: added services: name -> port
    extra: dict[str, int] = field(default_factory=dict)

    def name(self, i: int) -> str:
        if i == 0:
            return "probe"
        return f"{'echo' if i % 2 else 'proxy'}{i:05d}"

    def kind(self, i: int) -> str:
        return "echo" if i == 0 or i % 2 else "proxy"

    def text(self) -> str:
        out = [f'[runtime]\nworkers = {WORKERS}\nadmin_socket = "{self.admin_socket}"\n'
               'reload_timeout = 300.0\ndrain_timeout = 5.0\nlog_level = "info"\n']
        for i in range(self.n):
            v = self.variant.get(i, 0)
            lines = [f"[services.{self.name(i)}]", f'kind = "{self.kind(i)}"',
                     f'listen = "{HOST}:{self.ports[i]}"']
            if self.kind(i) == "echo":
                if v:
                    lines.append(f'greeting = "v{v}"')
            else:
                lines.append(f'upstreams = ["{HOST}:{self.ports[i - 1]}"]')
                if v:
                    lines.append('balance = "least_conn"')
            out.append("\n".join(lines) + "\n")
        for name, port in self.extra.items():
            out.append(f'[services.{name}]\nkind = "echo"\nlisten = "{HOST}:{port}"\n')
        return "\n".join(out)

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.text())
        tmp.replace(path)   # a reload never reads half a file

    def one(self) -> int:
        """The service the 1-changed reloads toggle (an echo in the middle; not the probe)."""
        i = max(1, self.n // 2)
        return i if self.kind(i) == "echo" else i - 1

    def many(self) -> list[int]:
        """The services the K-changed reloads toggle: K = min(MANY, N-2), the probe and ``one`` excluded."""
        skip = {0, self.one()}
        return [i for i in range(self.n) if i not in skip][:MANY]


# -- the admin socket ----------------------------------------------------------------


class TimedConnection(AdminConnection):
    """``AdminConnection`` whose ``raw`` returns the reply line undecoded.

    A status of 10,000 services is megabytes of JSON; decoding it is this
    script's cost, not the master's, so the latency stops at the last byte.
    """

    def raw(self, cmd: str, timeout: float, **fields: Any) -> bytes:
        deadline = time.monotonic() + timeout
        if self._sock is None:
            self.connect(timeout)
        sock = self._sock
        assert sock is not None
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(encode({"cmd": cmd, **fields}))
            buf = bytearray()
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AdminTimeout(f"no answer to {cmd!r} within {timeout:g}s")
                sock.settimeout(left)
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise AdminError("the running hotproxy closed the admin connection without replying")
                buf += chunk
        except TimeoutError:
            raise AdminTimeout(f"no answer to {cmd!r} within {timeout:g}s") from None
        except OSError as exc:
            raise AdminError(f"admin socket {self.path}: {exc.strerror or exc}") from None
        return bytes(buf)


def timed_status(path: str, timeout: float = STATUS_TIMEOUT) -> tuple[float, int]:
    """(seconds from connecting to the reply's last byte, reply bytes) of one status call."""
    t0 = time.perf_counter()
    with TimedConnection(path) as conn:
        raw = conn.raw("status", timeout, summary=True)
    return time.perf_counter() - t0, len(raw)


def request(path: str, cmd: str, timeout: float, **fields: Any) -> dict[str, Any]:
    with AdminConnection(path) as conn:
        return conn.request(cmd, timeout, **fields)


class StatusPoller(threading.Thread):
    """Status calls back to back until ``finish`` (bounded in count and by each call's timeout)."""

    def __init__(self, path: str, pause: float = 0.01, max_calls: int = 100_000) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.pause = pause
        self.max_calls = max_calls
        self.samples: list[float] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set() and len(self.samples) + len(self.errors) < self.max_calls:
            try:
                self.samples.append(timed_status(self.path)[0])
            except AdminError as exc:
                self.errors.append(str(exc))
            self._stop_event.wait(self.pause)

    def finish(self) -> None:
        self._stop_event.set()
        self.join(STATUS_TIMEOUT + 10)


# -- the probe: an echo client in its own process -----------------------------------

PROBE_SRC = r'''
import json, socket, sys, threading, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
PAYLOAD = b"p" * 32
SHORT_PACE, LONG_PACE, LIFETIME = 0.002, 0.001, 4 * 3600.0
born = time.monotonic()
stop = threading.Event()

class Track:
    def __init__(self):
        self.lock = threading.Lock()
        self.last = time.monotonic()
        self.max_gap = 0.0
        self.ok = 0
        self.errors = 0
        self.error = None
    def success(self):
        now = time.monotonic()
        with self.lock:
            self.max_gap = max(self.max_gap, now - self.last)
            self.last = now
            self.ok += 1
    def failure(self, exc):
        with self.lock:
            self.errors += 1
            self.error = self.error or f"{type(exc).__name__}: {exc}"
    def mark(self):
        now = time.monotonic()
        with self.lock:
            out = {"max_gap": max(self.max_gap, now - self.last), "ok": self.ok, "errors": self.errors,
                   "error": self.error}
            self.last, self.max_gap, self.ok, self.errors, self.error = now, 0.0, 0, 0, None
        return out

def echo(sock):
    sock.sendall(PAYLOAD)
    got = b""
    while len(got) < len(PAYLOAD):
        chunk = sock.recv(len(PAYLOAD) - len(got))
        if not chunk:
            raise ConnectionError("closed before the echo")
        got += chunk

def alive():
    return not stop.is_set() and time.monotonic() - born < LIFETIME

def short(track):
    while alive():
        t = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                echo(s)
            track.success()
        except OSError as exc:
            track.failure(exc)
            stop.wait(0.01)
        stop.wait(max(0.0, SHORT_PACE - (time.monotonic() - t)))

def long(track):
    sock = None
    while alive():
        t = time.monotonic()
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=10)
            echo(sock)
            track.success()
        except OSError as exc:
            track.failure(exc)
            if sock is not None:
                sock.close()
            sock = None
            stop.wait(0.01)
        stop.wait(max(0.0, LONG_PACE - (time.monotonic() - t)))
    if sock is not None:
        sock.close()

tracks = {"short": Track()}
if mode == "both":
    tracks["long"] = Track()
threads = [threading.Thread(target=short if name == "short" else long, args=(t,), daemon=True)
           for name, t in tracks.items()]
for th in threads:
    th.start()
for line in sys.stdin:
    if line.strip() != "mark":
        break
    print(json.dumps({name: t.mark() for name, t in tracks.items()}), flush=True)
stop.set()
for th in threads:
    th.join(15)
'''


class Probe:
    """The probe process; ``mark()`` returns each thread's figures since the previous mark."""

    def __init__(self, procs: Procs, port: int, mode: str = "both") -> None:
        self.procs = procs
        self.proc = procs.start([sys.executable, "-c", PROBE_SRC, HOST, str(port), mode],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def mark(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"mark\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("the probe process did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the probe process exited")
        return json.loads(line)   # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()   # the probe ends its threads and exits
            except OSError:
                pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        self.procs.stop(self.proc, wait=5.0)


def worst_gap(marked: dict[str, dict[str, Any]]) -> tuple[float, int]:
    """(largest gap over the probe's threads, errors) of one window."""
    return (max(t["max_gap"] for t in marked.values()),
            sum(t["errors"] for t in marked.values()))


# -- one size ----------------------------------------------------------------------


@dataclass
class Reload:
    """The figures of one reload kind (median over its repeats, largest stall)."""

    label: str
    durations: list[float] = field(default_factory=list)
    prepares: list[float] = field(default_factory=list)
    commits: list[float] = field(default_factory=list)
    #: the report's ``load_ms`` (the master reading and checking the file), when it has one
    loads: list[float] = field(default_factory=list)
    stall: float = 0.0          # ms, the largest gap during the reloads
    baseline: float = 0.0       # ms, the largest gap without a reload, as long
    probe_errors: int = 0
    failed: str | None = None
    changed: int = 0

    @property
    def duration(self) -> float:
        return statistics.median(self.durations) if self.durations else float("nan")


@dataclass
class SizeResult:
    n: int
    skipped: str | None = None
    error: str | None = None
    check_s: float | None = None
    check_error: str | None = None
    parse_ms: float | None = None
    startup_s: float | None = None
    reloads: dict[str, Reload] = field(default_factory=dict)
    status_rest: list[float] = field(default_factory=list)
    #: the probe's largest gap (ms) while the status calls at rest ran, and without them as long
    status_stall: float | None = None
    status_stall_baseline: float | None = None
    status_bytes: int = 0
    status_during: list[float] = field(default_factory=list)
    status_errors: list[str] = field(default_factory=list)
    rss_master: int | None = None
    rss_workers: list[int] = field(default_factory=list)


def run_check(hp: list[str], config: Path) -> tuple[float, str | None]:
    t0 = time.perf_counter()
    proc = subprocess.run(hp + ["check", "-c", str(config)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=CHECK_TIMEOUT)
    wall = time.perf_counter() - t0
    return wall, (proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
                  if proc.returncode else None)


def time_parse(config: Path, budget: float = 20.0) -> float:
    """Median ms of ``load_config`` (up to 7 runs, fewer when they are slow: within *budget* s)."""
    from hotproxy.config import load_config

    times: list[float] = []
    t_end = time.monotonic() + budget
    for _ in range(7):
        t0 = time.perf_counter()
        load_config(str(config))
        times.append((time.perf_counter() - t0) * 1000.0)
        if time.monotonic() > t_end:
            break
    return statistics.median(times)


def wait_ready(path: str, master: subprocess.Popen[bytes], logfile: Path, timeout: float) -> dict[str, Any]:
    """Poll status every 20 ms until it says ready; the status then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if master.poll() is not None:
            raise RuntimeError(f"hotproxy run exited with {master.returncode}: {tail(logfile)}")
        try:
            reply = request(path, "status", max(1.0, deadline - time.monotonic()), summary=True)
        except AdminError:
            reply = {}
        status = reply.get("status") if reply.get("ok") else None
        if isinstance(status, dict) and status.get("ready"):
            return status
        time.sleep(0.02)
    raise RuntimeError(f"hotproxy run not ready within {timeout:g}s: {tail(logfile)}")


class SizeRun:
    """Everything measured on one instance of N services."""

    def __init__(self, n: int, ports: list[int], extra_ports: list[int], tmp: Path, procs: Procs,
                 hp: list[str]) -> None:
        self.dir = tmp / f"n{n}"
        self.dir.mkdir()
        self.config = self.dir / "hotproxy.toml"
        self.logfile = self.dir / "hotproxy.log"
        self.layout = Layout(n, ports, str(self.dir / "admin.sock"))
        self.extra_ports = list(extra_ports)
        self.procs = procs
        self.hp = hp
        self.res = SizeResult(n)
        self.master: subprocess.Popen[bytes] | None = None
        self.probe: Probe | None = None

    def run(self) -> SizeResult:
        n, res = self.layout.n, self.res
        self.layout.write(self.config)
        log(f"N={n}: hotproxy check")
        res.check_s, res.check_error = run_check(self.hp, self.config)
        log(f"N={n}: check {res.check_s:.2f} s; timing load_config")
        res.parse_ms = time_parse(self.config)
        log(f"N={n}: read + parse {res.parse_ms:.1f} ms; starting hotproxy run")
        out = open(self.logfile, "wb")
        try:
            t0 = time.perf_counter()
            self.master = self.procs.start(self.hp + ["run", "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT)
            status = wait_ready(self.layout.admin_socket, self.master, self.logfile, START_TIMEOUT)
            res.startup_s = time.perf_counter() - t0
            log(f"N={n}: serving after {res.startup_s:.2f} s")
            self.probe = Probe(self.procs, self.layout.ports[0])
            self.probe.mark()
            time.sleep(0.5)
            self.probe.mark()
            self.status_at_rest()
            self.reloads()
            status = request(self.layout.admin_socket, "status", STATUS_TIMEOUT, summary=True)["status"]
            res.rss_master = rss_kib(self.master.pid)
            res.rss_workers = [r for r in (rss_kib(w["pid"]) for w in status["workers"] if w.get("pid"))
                               if r is not None]
        finally:
            if self.probe is not None:
                self.probe.close()
            if self.master is not None:
                self.procs.stop(self.master)
            out.close()
        return res

    def status_at_rest(self) -> None:
        """STATUS_AT_REST calls one after the other, the probe watching (each asks every worker)."""
        assert self.probe is not None
        self.probe.mark()
        t0 = time.monotonic()
        t_end = t0 + 120.0
        for _ in range(STATUS_AT_REST):
            latency, size = timed_status(self.layout.admin_socket)
            self.res.status_rest.append(latency)
            self.res.status_bytes = size
            if time.monotonic() > t_end:
                break
        window = time.monotonic() - t0
        gap, _ = worst_gap(self.probe.mark())
        time.sleep(min(window, BASELINE_CAP))
        base, _ = worst_gap(self.probe.mark())
        self.res.status_stall, self.res.status_stall_baseline = gap * 1000.0, base * 1000.0
        log(f"N={self.layout.n}: status at rest {statistics.median(self.res.status_rest) * 1000:.1f} ms "
            f"(median of {len(self.res.status_rest)}, {self.res.status_bytes / 1024:.0f} KiB); probe gap "
            f"{gap * 1000:.1f} ms, without status calls {base * 1000:.1f} ms")

    def reload_once(self, rel: Reload, poll: bool = False) -> float:
        """Rewrite the file, reload, measure; the wall seconds of the reload request."""
        assert self.probe is not None
        self.layout.write(self.config)
        self.probe.mark()                       # the window starts
        time.sleep(WINDOW_PAD)
        poller = StatusPoller(self.layout.admin_socket) if poll else None
        t0 = time.monotonic()
        try:
            if poller is not None:
                poller.start()
            reply = request(self.layout.admin_socket, "reload", RELOAD_TIMEOUT)
        finally:
            wall = time.monotonic() - t0
            if poller is not None:
                poller.finish()
                self.res.status_during += poller.samples
                self.res.status_errors += poller.errors
        time.sleep(WINDOW_PAD)
        during = self.probe.mark()
        window = WINDOW_PAD * 2 + wall
        time.sleep(min(window, BASELINE_CAP))   # the same probe, as long, without a reload
        without = self.probe.mark()
        report = reply.get("report") or {}
        if not reply.get("ok"):
            rel.failed = str(report.get("error") or reply.get("error") or "failed")
            log(f"N={self.layout.n}: reload {rel.label} FAILED: {rel.failed}")
        else:
            rel.durations.append(float(report.get("duration_ms") or 0.0))
            rel.prepares.append(float(report.get("prepare_ms") or 0.0))
            rel.commits.append(float(report.get("commit_ms") or 0.0))
            if "load_ms" in report:
                rel.loads.append(float(report["load_ms"]))
        gap, errors = worst_gap(during)
        base, _ = worst_gap(without)
        rel.stall = max(rel.stall, gap * 1000.0)
        rel.baseline = max(rel.baseline, base * 1000.0)
        rel.probe_errors += errors
        nan = float("nan")
        log(f"N={self.layout.n}: reload {rel.label}: {report.get('duration_ms', nan):.1f} ms "
            f"(prepare {report.get('prepare_ms', nan):.1f}, commit {report.get('commit_ms', nan):.1f}); "
            f"probe gap {gap * 1000:.1f} ms, without reload {base * 1000:.1f} ms"
            + (f"; {errors} probe errors ({'; '.join(str(t['error']) for t in during.values() if t['error'])})"
               if errors else ""))
        return wall

    def repeat(self, rel: Reload, step: Callable[[int], None], poll: bool = False, times: int = REPEATS) -> None:
        """Run ``step(i)`` (which changes the layout) and a reload, up to *times* times."""
        for i in range(times):
            step(i)
            wall = self.reload_once(rel, poll)
            if rel.failed or wall > REPEAT_UNDER:
                break

    def reloads(self) -> None:
        lay, res = self.layout, self.res
        one = lay.one()
        many = lay.many()

        res.reloads["unchanged"] = rel = Reload("unchanged")
        self.repeat(rel, lambda i: None)

        res.reloads["1 changed"] = rel = Reload("1 changed", changed=1)

        def toggle_one(i: int) -> None:
            lay.variant[one] = 1 - lay.variant.get(one, 0)
        self.repeat(rel, toggle_one)

        added, removed = Reload("1 added", changed=1), Reload("1 removed", changed=1)
        res.reloads["1 added"], res.reloads["1 removed"] = added, removed
        for i in range(REPEATS):
            name = f"added{i}"
            lay.extra[name] = self.extra_ports[i]
            wall = self.reload_once(added)
            del lay.extra[name]
            wall = max(wall, self.reload_once(removed))
            if added.failed or removed.failed or wall > REPEAT_UNDER:
                break

        label = f"{len(many):,} changed"
        res.reloads["many"] = rel = Reload(label, changed=len(many))
        polled = Reload(label + " (status polled)", changed=len(many))
        res.reloads["many polled"] = polled

        def toggle_many(i: int) -> None:
            for j in many:
                lay.variant[j] = 1 - lay.variant.get(j, 0)
        toggle_many(0)
        self.reload_once(rel)
        toggle_many(1)
        self.reload_once(polled, poll=True)
        if res.status_during:
            log(f"N={lay.n}: status during the reload: median {statistics.median(res.status_during) * 1000:.1f} "
                f"ms, max {max(res.status_during) * 1000:.1f} ms ({len(res.status_during)} calls)")


# -- HAProxy ----------------------------------------------------------------------

ECHO_SRC = r'''
import socket, socketserver, sys
class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(60)
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024
server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
print("ready", flush=True)
server.serve_forever()
'''


@dataclass
class HAProxyResult:
    n: int
    error: str | None = None
    check_s: float | None = None
    startup_s: float | None = None
    reloads_ms: list[float] = field(default_factory=list)
    stall: float = 0.0
    baseline: float = 0.0
    probe_errors: int = 0
    rss: int | None = None
    processes: int = 0
    version: str = ""


def echo_once(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"hello")
            got = b""
            while len(got) < 5:
                chunk = s.recv(5 - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == b"hello"
    except OSError:
        return False


def wait_echo(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None,
              interval: float = 0.005) -> float:
    """Seconds until an echo through *port* comes back; RuntimeError after *timeout*."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if echo_once(port):
            return time.monotonic() - t0
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        time.sleep(interval)
    raise RuntimeError(f"no echo through port {port} within {timeout:g}s")


def haproxy_config(tmp: Path, ports: list[int], echo_port: int) -> str:
    out = [f"""global
    maxconn {HAPROXY_MAXCONN}
    stats socket {tmp}/haproxy.sock mode 600 level admin expose-fd listeners

defaults
    mode tcp
    maxconn {HAPROXY_MAXCONN}
    timeout connect 5s
    timeout client 60s
    timeout server 60s

backend echo
    server e1 {HOST}:{echo_port}
"""]
    for i, port in enumerate(ports):
        out.append(f"frontend f{i:05d}\n    bind {HOST}:{port}\n    default_backend echo\n")
    return "\n".join(out)


def run_haproxy(n: int, ports: list[int], extra_ports: list[int], echo_port: int, tmp: Path,
                procs: Procs) -> HAProxyResult:
    res = HAProxyResult(n)
    hdir = tmp / f"haproxy-{n}"
    hdir.mkdir()
    cfg = hdir / "haproxy.cfg"
    logfile = hdir / "haproxy.log"
    try:
        version = subprocess.run(["haproxy", "-v"], capture_output=True, timeout=30).stdout.decode()
        res.version = version.split("\n", 1)[0].replace("HAProxy version ", "").split(" ")[0]
    except (OSError, subprocess.SubprocessError) as exc:
        res.error = f"haproxy -v: {exc}"
        return res
    echo = procs.start([sys.executable, "-c", ECHO_SRC, str(echo_port)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    master: subprocess.Popen[bytes] | None = None
    probe: Probe | None = None
    out = open(logfile, "wb")
    try:
        assert echo.stdout is not None
        ready, _, _ = select.select([echo.stdout], [], [], 30.0)
        if not ready or not echo.stdout.readline():
            raise RuntimeError("the echo backend did not start")
        front = list(ports[:n])

        def write(frontends: list[int]) -> None:
            part = cfg.with_suffix(".tmp")
            part.write_text(haproxy_config(hdir, frontends, echo_port))
            part.replace(cfg)

        write(front)
        t0 = time.perf_counter()
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=CHECK_TIMEOUT)
        res.check_s = time.perf_counter() - t0
        if check.returncode:
            raise RuntimeError(f"haproxy -c: {check.stderr.decode(errors='replace').strip()[:300]}")
        log(f"HAProxy N={n}: haproxy -c {res.check_s:.2f} s; starting")
        t0 = time.perf_counter()
        master = procs.start(["haproxy", "-W", "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_echo(front[-1], START_TIMEOUT, master, interval=0.02)
        except RuntimeError as exc:
            raise RuntimeError(f"haproxy: {exc}: {tail(logfile)}") from None
        res.startup_s = time.perf_counter() - t0
        log(f"HAProxy N={n}: serving after {res.startup_s:.2f} s")
        probe = Probe(procs, front[0], mode="short")
        probe.mark()
        time.sleep(0.5)
        probe.mark()
        for k in range(HAPROXY_RELOADS):
            new_port = extra_ports[k]
            write(front + [new_port])
            probe.mark()
            time.sleep(WINDOW_PAD)
            t0 = time.monotonic()
            os.kill(master.pid, signal.SIGUSR2)
            try:
                served = wait_echo(new_port, RELOAD_TIMEOUT, master)
            except RuntimeError as exc:
                raise RuntimeError(f"haproxy reload: {exc}: {tail(logfile)}") from None
            res.reloads_ms.append(served * 1000.0)
            time.sleep(WINDOW_PAD)
            wall = time.monotonic() - t0
            gap, errors = worst_gap(probe.mark())
            time.sleep(min(wall + WINDOW_PAD, BASELINE_CAP))
            base, _ = worst_gap(probe.mark())
            res.stall, res.baseline = max(res.stall, gap * 1000.0), max(res.baseline, base * 1000.0)
            res.probe_errors += errors
            log(f"HAProxy N={n}: SIGUSR2 -> new frontend serving {served * 1000:.1f} ms; probe gap "
                f"{gap * 1000:.1f} ms, without reload {base * 1000:.1f} ms")
            # let the old worker finish before the next reload (bounded)
            t_end = time.monotonic() + 30.0
            while len(children_of(master.pid)) > 1 and time.monotonic() < t_end:
                time.sleep(0.05)
        kids = children_of(master.pid)
        res.processes = 1 + len(kids)
        rss = [rss_kib(p) for p in [master.pid] + kids]
        res.rss = sum(r for r in rss if r is not None)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        res.error = str(exc)
        log(f"HAProxy N={n}: {exc}")
    finally:
        if probe is not None:
            probe.close()
        if master is not None:
            procs.stop(master, signal.SIGTERM)
        procs.stop(echo, wait=5.0)
        out.close()
    return res


# -- the report ----------------------------------------------------------------------


def ms(x: float | None) -> str:
    if x is None or x != x:
        return "–"
    if x >= 10_000:
        return f"{x / 1000:.1f} s"
    if x >= 100:
        return f"{x:,.0f} ms"
    return f"{x:.1f} ms"


def secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f} s"


def beyond(res: SizeResult, rel: Reload) -> float:
    """The reload's duration minus its read + parse time: the report's own
    ``load_ms`` when it has one (median of duration - load_ms over the
    repeats: the same reload, the same process), else the bench's parse time
    (noisy: a difference of two timings in two processes)."""
    if rel.loads and len(rel.loads) == len(rel.durations):
        return statistics.median(d - lo for d, lo in zip(rel.durations, rel.loads))
    return rel.duration - (res.parse_ms or 0.0)


def reload_cell(res: SizeResult, key: str) -> str:
    rel = res.reloads.get(key)
    if rel is None:
        return "–"
    if rel.failed:
        return f"failed: {rel.failed[:120]}"
    reps = f" ×{len(rel.durations)}" if len(rel.durations) > 1 else ""
    return (f"**{ms(rel.duration)}**{reps} (prepare {ms(statistics.median(rel.prepares))}, commit "
            f"{ms(statistics.median(rel.commits))}) · parse {ms(res.parse_ms)}"
            + (f" (in the master: {ms(statistics.median(rel.loads))})" if rel.loads else "")
            + f" · beyond {ms(beyond(res, rel))}")


def stall_cell(res: SizeResult, keys: tuple[str, ...]) -> str:
    rels = [res.reloads[k] for k in keys if k in res.reloads]
    if not rels:
        return "–"
    stall = max(r.stall for r in rels)
    base = max(r.baseline for r in rels)
    errors = sum(r.probe_errors for r in rels)
    return f"{ms(stall)} / {ms(base)} (+{ms(stall - base)})" + (f", **{errors} probe errors**" if errors else "")


def status_cell(samples: list[float], errors: list[str] | None = None) -> str:
    if not samples:
        return "–" + (f" ({len(errors)} failed: {errors[0][:80]})" if errors else "")
    out = (f"{ms(statistics.median(samples) * 1000)} / {ms(max(samples) * 1000)} "
           f"({len(samples)} call{'s' if len(samples) != 1 else ''})")
    if errors:
        out += f", **{len(errors)} failed** ({errors[0][:80]})"
    return out


def per_service(results: list[SizeResult]) -> dict[int, tuple[float | None, float | None]]:
    """KiB per service over the smallest size: (master, one worker) per size."""
    ok = [r for r in results if r.rss_master is not None and r.rss_workers]
    out: dict[int, tuple[float | None, float | None]] = {}
    if len(ok) < 2:
        return out
    base = ok[0]
    bw = statistics.mean(base.rss_workers)
    for r in ok[1:]:
        dn = r.n - base.n
        out[r.n] = ((r.rss_master - base.rss_master) / dn,   # type: ignore[operator]
                    (statistics.mean(r.rss_workers) - bw) / dn)
    return out


def table(results: list[SizeResult], haps: list[HAProxyResult]) -> str:
    """One markdown table: a column per size, then one per HAProxy run."""
    head = ["| | " + " | ".join([f"{r.n:,} services" for r in results]
                                + [f"HAProxy {h.version}, {h.n:,} frontends" for h in haps]) + " |",
            "|---|" + "---|" * (len(results) + len(haps))]
    rows: list[str] = []

    def row(label: str, cells: Callable[[SizeResult], str],
            hcell: Callable[[HAProxyResult], str] = lambda h: "–", always: bool = False) -> None:
        out = []
        for r in results:
            if r.skipped:
                out.append(f"skipped: {r.skipped}" if always else "–")
            elif r.error and not always:
                out.append(f"**failed**: {r.error[:400]}" if label.startswith("start-up") else "–")
            else:
                out.append(cells(r))
        for h in haps:
            out.append(f"**failed**: {h.error[:300]}" if h.error and label.startswith("start-up")
                       else "–" if h.error else hcell(h))
        rows.append("| " + label + " | " + " | ".join(out) + " |")

    def hrel(h: HAProxyResult) -> str:
        if not h.reloads_ms:
            return "–"
        return (f"SIGUSR2 → new frontend serving: **{ms(statistics.median(h.reloads_ms))}** (median of "
                f"{len(h.reloads_ms)}; {ms(min(h.reloads_ms))}–{ms(max(h.reloads_ms))})")

    def hstall(h: HAProxyResult) -> str:
        if not h.reloads_ms:
            return "–"
        return (f"{ms(h.stall)} / {ms(h.baseline)} (+{ms(h.stall - h.baseline)})"
                + (f", **{h.probe_errors} probe errors**" if h.probe_errors else ""))

    row("`hotproxy check -c FILE` (CLI wall time) · `haproxy -c -f FILE`",
        lambda r: secs(r.check_s) + (f" (exit 1: {r.check_error[:100]})" if r.check_error else ""),
        lambda h: secs(h.check_s), always=True)
    row("read + parse the file (`load_config` in the bench)", lambda r: ms(r.parse_ms), always=True)
    row("start-up → `status` ready · HAProxy: start → serving", lambda r: secs(r.startup_s),
        lambda h: secs(h.startup_s))
    row("reload, unchanged file: `duration_ms` (prepare, commit) · parse · beyond parse · HAProxy: "
        "SIGUSR2 with 1 frontend added", lambda r: reload_cell(r, "unchanged"), hrel)
    same = "(the same: a HAProxy reload redoes everything)"
    row("reload, 1 service changed", lambda r: reload_cell(r, "1 changed"), lambda h: same)
    row("reload, 1 service added", lambda r: reload_cell(r, "1 added"), lambda h: same)
    row("reload, 1 service removed", lambda r: reload_cell(r, "1 removed"), lambda h: same)
    row("reload, min(1,000, N−2) services changed (first of two)",
        lambda r: (f"{r.reloads['many'].changed:,}: " if "many" in r.reloads else "") + reload_cell(r, "many"))
    row("largest probe gap during the reload / without (above), unchanged",
        lambda r: stall_cell(r, ("unchanged",)), hstall)
    row("… 1 changed", lambda r: stall_cell(r, ("1 changed",)), lambda h: same)
    row("… 1 added", lambda r: stall_cell(r, ("1 added",)), lambda h: same)
    row("… 1 removed", lambda r: stall_cell(r, ("1 removed",)), lambda h: same)
    row("… many changed", lambda r: stall_cell(r, ("many",)))
    row("… many changed, with `status` polled during it", lambda r: stall_cell(r, ("many polled",)))
    row("`status` (summary) at rest: median / max (reply size)",
        lambda r: status_cell(r.status_rest) + f", {r.status_bytes / 1024:,.0f} KiB")
    row("`status` during the second many-changed reload: median / max",
        lambda r: status_cell(r.status_during, r.status_errors))
    row("largest probe gap while the status calls at rest ran / without (above)",
        lambda r: (f"{ms(r.status_stall)} / {ms(r.status_stall_baseline)} "
                   f"(+{ms(r.status_stall - r.status_stall_baseline)})"
                   if r.status_stall is not None and r.status_stall_baseline is not None else "–"))
    row("RSS master · HAProxy: all its processes",
        lambda r: f"{r.rss_master / 1024:,.1f} MiB" if r.rss_master else "–",
        lambda h: f"{h.rss / 1024:,.1f} MiB ({h.processes} processes)" if h.rss else "–")
    row("RSS per worker",
        lambda r: " / ".join(f"{w / 1024:,.1f}" for w in r.rss_workers) + " MiB" if r.rss_workers else "–")
    kib = per_service(results)
    row("KiB per service over the smallest size (marginal): master / each worker",
        lambda r: (f"{kib[r.n][0]:.1f} / {kib[r.n][1]:.1f}" if r.n in kib else "(the base)"))
    row("RSS of all processes ÷ N",
        lambda r: f"{(r.rss_master + sum(r.rss_workers)) / r.n:,.1f} KiB" if r.rss_master else "–",
        lambda h: f"{h.rss / h.n:,.1f} KiB" if h.rss else "–")
    return "\n".join(head + rows)


def ratio(a: float, b: float) -> float:
    """a ÷ b, each taken as at least 0.1 ms (a difference of two timings may come out below 0)."""
    return max(a, 0.1) / max(b, 0.1)


def goals(results: list[SizeResult], haps: list[HAProxyResult]) -> str:
    """The issue-18 goals, each met or missed, from the smallest and largest sizes that ran."""
    ok = [r for r in results if not r.skipped and not r.error]
    lines = ["| goal | measured | status |", "|---|---|---|"]

    def add(goal: str, measured: str, met: bool | None) -> None:
        status = "n/a" if met is None else ("met" if met else "**missed**")
        lines.append(f"| {goal} | {measured} | {status} |")

    for r in results:
        if r.error or r.skipped:
            add(f"hotproxy serves {r.n:,} services (what every goal below needs; they are taken at the "
                "largest size that ran)", (r.error or r.skipped or "")[:400], False if r.error else None)

    if len(ok) >= 2:
        small, big = ok[0], ok[-1]
        worst = None
        parts = []
        for key in ("1 changed", "1 added", "1 removed"):
            a, b = big.reloads.get(key), small.reloads.get(key)
            if a is None or b is None or a.failed or b.failed:
                continue
            q = ratio(beyond(big, a), beyond(small, b))
            parts.append(f"{key}: {ms(beyond(big, a))} ÷ {ms(beyond(small, b))} = {q:.1f}×")
            worst = q if worst is None else max(worst, q)
        add(f"a 1-service reload among {big.n:,} ÷ among {small.n:,}, beyond parsing, ≤ 3×",
            "; ".join(parts) or "–", None if worst is None else worst <= 3.0)
        a, b = big.reloads.get("unchanged"), small.reloads.get("unchanged")
        if a and b and not a.failed and not b.failed:
            q = ratio(beyond(big, a), beyond(small, b))
            add(f"an unchanged reload among {big.n:,} ÷ among {small.n:,}, beyond parsing, ≤ 3×",
                f"{ms(beyond(big, a))} ÷ {ms(beyond(small, b))} = {q:.1f}× (with parsing: "
                f"{ms(a.duration)} ÷ {ms(b.duration)})", q <= 3.0)
        if big.status_during and big.status_rest:
            q = max(big.status_during) / statistics.median(big.status_rest)
            add(f"`status` during a reload ÷ at rest, {big.n:,} services, ≤ 3× (slowest call during ÷ "
                "median at rest)",
                f"{ms(max(big.status_during) * 1000)} ÷ {ms(statistics.median(big.status_rest) * 1000)} = {q:.1f}× "
                f"(median during: {statistics.median(big.status_during) / statistics.median(big.status_rest):.1f}×)",
                q <= 3.0 and not big.status_errors)
        worst_above, where = None, ""
        for r in ok:
            # (the reload with status polled is left out: status calls stall workers by themselves)
            for key, rel in r.reloads.items():
                if key == "many polled":
                    continue
                above = rel.stall - rel.baseline
                if worst_above is None or above > worst_above:
                    worst_above, where = above, f"{r.n:,} services, {rel.label}"
        if worst_above is not None:
            add("worker loop stall during a reload ≤ 20 ms above the probe's largest gap without reloads "
                "(worst over every size and reload; not the one with status polled)",
                f"+{ms(worst_above)} ({where})", worst_above <= 20.0)
    check = next((r for r in results if r.n == 10000 and r.check_s is not None), None)
    if check is not None and check.check_s is not None:
        add("`hotproxy check` of 10,000 services < 1 s",
            secs(check.check_s) + (f" (and it failed: {check.check_error[:100]})" if check.check_error else ""),
            check.check_s < 1.0 and not check.check_error)
    else:
        largest = ok[-1] if ok else None
        add("`hotproxy check` of 10,000 services < 1 s",
            f"not measured (largest size run: {largest.n:,}, {secs(largest.check_s)})" if largest else "not measured",
            None)
    for hap in haps:
        if hap.error:
            continue
        sized = next((r for r in results if r.n == hap.n and r.check_s), None)
        if sized is not None and sized.check_s and hap.check_s:
            add(f"for information: `hotproxy check` ÷ `haproxy -c`, {hap.n:,}",
                f"{secs(sized.check_s)} ÷ {secs(hap.check_s)} = {sized.check_s / hap.check_s:.1f}×", None)
        big = next((r for r in ok if r.n == hap.n), None)
        if big is not None and hap.reloads_ms:
            h = statistics.median(hap.reloads_ms)
            for key in ("1 added", "unchanged"):
                rel = big.reloads.get(key)
                if rel and not rel.failed:
                    add(f"for information: hotproxy reload ({key}) ÷ HAProxy SIGUSR2 → serving, {hap.n:,}",
                        f"{ms(rel.duration)} ÷ {ms(h)} = {rel.duration / h:.2f}×", None)
        if big is not None and big.startup_s and hap.startup_s:
            add(f"for information: hotproxy start-up ÷ HAProxy start-up, {hap.n:,}",
                f"{secs(big.startup_s)} ÷ {secs(hap.startup_s)} = {big.startup_s / hap.startup_s:.1f}×", None)
    return "\n".join(lines)


def git_rev() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, timeout=10).stdout.strip()
        return out.stdout.decode().strip() + (" (modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def write_results(path: Path, body: str) -> None:
    """Replace the text between the scale markers of *path*, keeping the rest (load.py's part)."""
    text = path.read_text() if path.exists() else "# hotproxy benchmark results\n"
    if MARK_BEGIN not in text or MARK_END not in text:
        text = text.rstrip() + f"\n\n{SECTION_TITLE}\n\n{MARK_BEGIN}\n{MARK_END}\n"
    pre, rest = text.split(MARK_BEGIN, 1)
    _, post = rest.split(MARK_END, 1)
    path.write_text(f"{pre}{MARK_BEGIN}\n{body}\n{MARK_END}{post}")


# -- main -------------------------------------------------------------------------------


def byte_compile() -> None:
    """Byte-compile hotproxy's modules (``__pycache__``), as installing it
    does (pip compiles a wheel's modules at install).

    A process started with ``PYTHONDONTWRITEBYTECODE=1`` (some shells and
    CI set it) and no ``.pyc`` to read compiles every module it imports,
    each time: ~0.15 s of CPU in every ``hotproxy check``, master and worker
    start, which the figures below are not about.
    """
    import compileall

    import hotproxy

    before = time.perf_counter()
    ok = compileall.compile_dir(os.path.dirname(hotproxy.__file__), quiet=1)
    log(f"byte-compiled hotproxy's modules ({'ok' if ok else 'some failed'}) in "
        f"{(time.perf_counter() - before) * 1000:.0f} ms; PYTHONDONTWRITEBYTECODE="
        f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s.replace("_", "").replace(",", "")) for s in text.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"--sizes: expected comma-separated numbers, got {text!r}") from None
    if not sizes or sizes[0] < 3 or sizes[-1] > 20000:
        raise SystemExit("--sizes: each size must be between 3 and 20000")
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", help="comma-separated numbers of services (default 10,1000,10000)")
    ap.add_argument("--quick", action="store_true", help="sizes 10,300 (about a minute)")
    ap.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy comparison")
    ap.add_argument("--write-results", metavar="PATH",
                    help=f"write the table into PATH between {MARK_BEGIN} and {MARK_END} (created if missing)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    args = ap.parse_args(argv)
    sizes = parse_sizes(args.sizes) if args.sizes else list(QUICK_SIZES if args.quick else FULL_SIZES)
    command = "python bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    soft, hard = raise_nofile()
    byte_compile()
    hp = hotproxy_argv()
    have_haproxy = shutil.which("haproxy") is not None and not args.no_haproxy
    load_before = os.getloadavg()
    started = time.time()
    procs = Procs()
    results: list[SizeResult] = []
    haps: list[HAProxyResult] = []
    notes: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="hotproxy-scale-") as tmpname:
            tmp = Path(tmpname)
            ports = free_ports(max(sizes) + 2 * REPEATS + HAPROXY_RELOADS + 1)
            extra = ports[max(sizes):]
            for n in sizes:
                need = n + FD_SLACK
                if hard != resource.RLIM_INFINITY and need > soft:
                    res = SizeResult(n, skipped=f"needs about {need:,} descriptors per process, "
                                                f"the hard RLIMIT_NOFILE is {hard:,}")
                    log(f"N={n}: skipped: {res.skipped}")
                    results.append(res)
                    continue
                run = SizeRun(n, ports[:n], extra, tmp, procs, hp)
                try:
                    run.run()
                except Exception as exc:   # (a bug here too: the other sizes' figures are still printed)
                    known = isinstance(exc, (RuntimeError, OSError, AdminError, subprocess.SubprocessError))
                    log(f"N={n}: FAILED: {exc if known else repr(exc)}")
                    run.res.error = " ".join((str(exc) if known else repr(exc)).split())
                results.append(run.res)
            if have_haproxy:
                # the largest size; and the largest hotproxy served, if that is another
                served = [r.n for r in results if not r.skipped and not r.error]
                for n in sorted({max(sizes)} | ({max(served)} if served else set())):
                    if hard != resource.RLIM_INFINITY and n + 2 * HAPROXY_MAXCONN + FD_SLACK > soft:
                        notes.append(f"HAProxy with {n:,} frontends skipped: it needs more descriptors than "
                                     f"the hard RLIMIT_NOFILE ({hard:,})")
                        continue
                    try:
                        haps.append(run_haproxy(n, ports, extra, ports[-1], tmp, procs))
                    except Exception as exc:
                        log(f"HAProxy N={n}: FAILED: {exc!r}")
                        haps.append(HAProxyResult(n, error=repr(exc)))
            elif not args.no_haproxy:
                notes.append("HAProxy not installed (apt-get install haproxy): no comparison")
    except KeyboardInterrupt:
        log("interrupted: stopping everything started")
        procs.stop_all()
        return 130
    finally:
        procs.stop_all()
    load_after = os.getloadavg()
    body = report(command, results, haps, notes, soft, load_before, load_after, started)
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": [r.__dict__ | {"reloads": {k: v.__dict__ for k, v in
                                                                                       r.reloads.items()}}
                                                           for r in results],
                                               "haproxy": [h.__dict__ for h in haps]}, indent=1))
    if args.write_results:
        write_results(Path(args.write_results), body)
        log(f"wrote {args.write_results}")
    # (goals missed are results, not errors; a size that could not run or a reload that failed are)
    broken = [r for r in results if r.error or any(rel.failed for rel in r.reloads.values())]
    return 1 if broken or any(h.error for h in haps) else 0


def report(command: str, results: list[SizeResult], haps: list[HAProxyResult], notes: list[str], nofile: int,
           load_before: tuple[float, ...], load_after: tuple[float, ...], started: float) -> str:
    import hotproxy
    from hotproxy import core

    out = [f"Command: `{command.strip()}`  ",
           f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
           f"{(time.time() - started) / 60:.1f} min; machine: {os.cpu_count()} CPUs, load average "
           f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; RLIMIT_NOFILE {nofile:,}  ",
           f"hotproxy {hotproxy.__version__} git {git_rev()} (compiled core: {core.COMPILED_AVAILABLE}), "
           f"{WORKERS} workers, python {sys.version.split()[0]}",
           "",
           "Reload cells: the report's `duration_ms` (request received → every worker committed; "
           "median when ×3) with its prepare and commit phases, the time to read and parse the file "
           "(`load_config` in the bench; in the master: the report's `load_ms`, the same reload), and "
           "the difference (beyond: `duration_ms` − `load_ms`).  Probe gaps: the largest gap between two "
           "echo round trips on `probe` (a service no reload touches; short connections over both "
           "workers, and one long connection) during the reload, then without one for as long; "
           "(+…) is the difference.  `status`: connect → last byte of the reply, over the admin "
           "socket from the bench, asking for the summary (`hotproxy status`'s default).  How each figure is taken: the docstring of `bench/scale.py`.",
           "",
           table(results, haps),
           "",
           "### Issue 18 goals",
           "",
           goals(results, haps)]
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
