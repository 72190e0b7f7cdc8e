"""hotproxy under load, side by side with HAProxy, nginx and plain uvloop.

Run ``python bench/load.py --quick`` for a ~1-minute smoke run, or
``python bench/load.py --write-results bench/RESULTS.md`` for the full run
that regenerates the results file.  ``--help`` lists the options.

What it does:

* starts a backend on 127.0.0.1 (nginx serving ``/small`` ~100 bytes and
  ``/big`` 1 MiB when installed, else ``bench/backend.py``) and an iperf3
  server when installed;
* starts every proxy at once, each on its own ports -- hotproxy (compiled
  core and pure-Python core, 1 and N workers), HAProxy ``mode tcp`` 1
  thread (default, and tuned with 64 KiB buffers and splice), nginx
  ``stream`` 1 worker, the plain uvloop proxy ``bench/plainproxy.py``, and
  "direct" (no proxy); and, with the nginx backend (whose port
  ``PP_BACKEND_PORT`` expects a PROXY protocol header), hotproxy with
  ``send_proxy = "v2"`` beside HAProxy ``send-proxy-v2`` (the ``-pp2``
  rows; their iperf3 port stays plain, and they are not reloaded); and,
  with the nginx backend, wrk and the ``openssl`` CLI, TLS routed by server
  name without terminating it (the ``-sni`` rows): hotproxy with
  ``sni_routes`` beside HAProxy ``mode tcp`` with ``tcp-request
  inspect-delay``, ``req.ssl_hello_type`` and ``use_backend ... if {
  req.ssl_sni -i NAME }``, both in front of the nginx backend's TLS port
  (``TLS_BACKEND_PORT``, a certificate made here with the ``openssl`` CLI),
  with their own A/A control (``haproxy-sni-again``) and no-proxy baseline
  (``direct-tls``); wrk sends ``SNI_NAME`` (the URL's host) and connects to
  127.0.0.1 (``SNI_LUA``: the name is never looked up); keep-alive (one
  handshake per connection), ``Connection: close`` (one per request) and 1
  MiB responses; not reloaded; and
  hotproxy with its Prometheus endpoint on, scraped every
  ``METRICS_INTERVAL`` s while it runs (``hotproxy-c-1w-metrics``: its
  ratio to ``hotproxy-c-1w`` per proxy CPU-s, master included, is issue
  15's "metrics on vs off", beside the A/A control);
* each round, runs each scenario through every proxy back to back (the
  order rotates every round), with wrk (else ``bench/loadgen.py``):
  keep-alive, ``Connection: close``, 1 MiB responses, iperf3 one stream;
  and reads the proxy's CPU-seconds from /proc (summed over its process
  tree: master and workers, including reaped children) and the machine's
  CPU use from /proc/stat -- including the CPU the hypervisor stole: a
  round (or a reload run) during which it stole more than ``--max-steal``
  is measured again, since its runs did not have the same machine;
* measures RSS per idle proxied connection (full run), and with
  ``--profile`` records perf profiles of hotproxy.

Then, for the proxies that reload, the ``Connection: close`` load runs
steady, while the proxy reloads every 0.5 s (and with ``--storm`` faster),
and steady again, with configs that really differ each time (one upstream
and round-robin, then two upstreams and least-connections).  Then the
"upgrade under load" row: the same load, steady, while the proxy replaces
its own program every 2 s (a bounded count), and steady again: ``hotproxy
upgrade``; HAProxy ``-W`` master-worker re-executing itself on ``SIGUSR2``
(its binary upgrade, the listeners passed through ``expose-fd
listeners``); nginx's binary upgrade (``USR2`` to the master, then
``WINCH`` and ``QUIT`` to the old one; nginx runs as a daemon for this row,
since it ignores ``USR2`` while its parent is the process that started
it).  Masters that a replaced one started are found by pidfile and
stopped too.  The full run ends with the micro-benchmarks (``pytest bench/``).

Rules of this file:

* Every figure is compared with baselines measured in the same round, and
  the table shows the median over rounds of those per-round ratios: the
  machine is shared and noisy, ratios taken seconds apart are not.
* Only 127.0.0.1 is ever a target; every listener port is below 32768 (the
  ephemeral range starts there); every load run is bounded in time (and the
  built-in generator and the reload loops also in count), with a
  subprocess timeout as a backstop.
* Every process started here gets its own process group and is stopped in
  a ``finally`` (SIGTERM, then SIGKILL), also on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
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
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# Fixed ports, all below the ephemeral range (32768+).
BACKEND_PORTS = (18080, 18081)        # two, so a reload can switch upstream lists
#: the nginx backend's port that expects a PROXY protocol header (the send_proxy rows)
PP_BACKEND_PORT = 18082
#: the nginx backend's TLS port (``listen ... ssl``, a certificate the run makes): the ``-sni`` rows' upstream
TLS_BACKEND_PORT = 18083
#: the server name the ``-sni`` rows' client sends and the only name their proxies route
SNI_NAME = "bench.sni.test"
#: appended to ``wrk_report.lua`` for the ``-sni`` rows: wrk connects to
#: 127.0.0.1 whatever the URL's host (which it sends as the server name and
#: in ``Host``), so the name is never looked up and nothing else is tried
SNI_LUA = """
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup("127.0.0.1", service)
end
"""
#: seconds between two scrapes of the ``-metrics`` row's Prometheus endpoint
METRICS_INTERVAL = 1.0
#: the A/A control's name: HAProxy exactly as the "haproxy" baseline
CONTROL = "haproxy-again"
#: the ``-sni`` rows' A/A control: HAProxy exactly as the "haproxy-sni" baseline
SNI_CONTROL = "haproxy-sni-again"
IPERF_PORT = 18090
PROXY_BASE_PORT = 18100               # proxy i listens on base+10*i (web) and +1 (iperf)


def log(msg: str) -> None:
    """Progress goes to stderr; the tables go to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes ------------------------------------------------------------------


class Proc:
    """A child process in its own process group, stopped for sure by ``stop()``."""

    live: list[Proc] = []

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                 logfile: Path | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.logfile = logfile
        out = open(logfile, "ab") if logfile is not None else subprocess.DEVNULL
        try:
            self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        finally:
            if logfile is not None:
                out.close()  # type: ignore[union-attr]
        Proc.live.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM the whole group, wait, then SIGKILL what is left."""
        if self in Proc.live:
            Proc.live.remove(self)
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # the group may hold workers that outlive the leader
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(2.0)
        except subprocess.TimeoutExpired:
            log(f"warning: {self.name} (pid {self.pid}) did not exit after SIGKILL")

    @classmethod
    def stop_all(cls) -> None:
        for p in list(reversed(cls.live)):
            p.stop(timeout=3.0)


def wait_port(port: int, timeout: float = 10.0, proc: Proc | None = None) -> None:
    """Wait until 127.0.0.1:*port* accepts a connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            tail = ""
            if proc.logfile is not None and proc.logfile.exists():
                tail = " | ".join(proc.logfile.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {tail}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing accepts on {HOST}:{port} after {timeout:.0f}s")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # as the servers do: a TIME_WAIT left by the last run is not "in use"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


# -- /proc accounting --------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """*root* and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """CPU-seconds used by *root*'s process tree: utime+stime of the live
    processes, plus cutime+cstime (children already reaped, e.g. old nginx
    or HAProxy workers after a reload)."""
    total = 0
    for pid in process_tree(root):
        f = _stat_fields(pid)
        if f is not None:
            # after the ')' split: index 11..14 are utime, stime, cutime, cstime
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def rss_bytes(root: int) -> int:
    """Resident memory of *root*'s process tree (VmRSS summed)."""
    total = 0
    for pid in process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def machine_cpu() -> tuple[float, float, float]:
    """(busy, total, stolen) jiffies over all CPUs, from /proc/stat.  Stolen
    time (the hypervisor running something else on our virtual CPUs) is
    not counted as busy."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    steal = parts[7] if len(parts) > 7 else 0
    return float(sum(parts) - idle - steal), float(sum(parts)), float(steal)


def pct_of_one_cpu(jiffies: float, total: float) -> float:
    """*jiffies* out of *total* (summed over all CPUs), as % of one CPU."""
    return 100.0 * NCPU * jiffies / total if total > 0 else 0.0


class Meter:
    """CPU use of a proxy tree and of the machine over one measured interval."""

    def __init__(self, root: int | None) -> None:
        self.root = root
        self.t0 = time.monotonic()
        self.cpu0 = cpu_seconds(root) if root else 0.0
        self.m0 = machine_cpu()

    def done(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy, total, _ = machine_cpu()
        out = {"wall": wall, "machine_cpu_pct": pct_of_one_cpu(busy - self.m0[0], total - self.m0[1])}
        if self.root:
            out["proxy_cpu_s"] = cpu_seconds(self.root) - self.cpu0
        return out


# -- load drivers ------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One load run, in wrk's terms (latencies in microseconds)."""

    requests: int
    duration_s: float
    bytes: int
    errors: dict[str, int]
    p50_us: float
    p99_us: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class Driver:
    """Runs HTTP load: wrk with ``bench/wrk_report.lua``, or ``bench/loadgen.py``."""

    def __init__(self, use_wrk: bool, threads: int) -> None:
        self.wrk = shutil.which("wrk") if use_wrk else None
        self.threads = threads
        #: wrk's script for TLS runs (``SNI_LUA`` after the reporter), written by ``tls_script``
        self.sni_script: Path | None = None

    def tls_script(self, tmp: Path) -> None:
        """Write the script of the TLS runs (``run(..., sni=NAME)``) into *tmp*."""
        self.sni_script = tmp / "wrk_sni.lua"
        self.sni_script.write_text((HERE / "wrk_report.lua").read_text() + SNI_LUA)

    @property
    def name(self) -> str:
        return "wrk" if self.wrk else "built-in loadgen (bench/loadgen.py, Python: figures compressed)"

    def run(self, port: int, path: str, connections: int, duration: float,
            close: bool = False, sni: str | None = None) -> LoadResult:
        """*sni*: HTTPS to 127.0.0.1:*port* sending that server name (wrk only)."""
        url = f"http://{HOST}:{port}{path}"
        script = HERE / "wrk_report.lua"
        if sni is not None:
            if not self.wrk or self.sni_script is None:
                raise RuntimeError("TLS runs need wrk")
            url, script = f"https://{sni}:{port}{path}", self.sni_script
        if self.wrk:
            # wrk takes whole seconds only
            argv = [self.wrk, f"-t{self.threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
                    "--timeout", "2s", "-s", str(script)]
            if close:
                argv += ["-H", "Connection: close"]
            argv.append(url)
        else:
            argv = [sys.executable, str(HERE / "loadgen.py"), "--url", url, "-c", str(connections),
                    "-d", str(duration)] + (["--close"] if close else [])
        # bounded: the driver stops itself after `duration`; the timeout is a backstop
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30,
                             start_new_session=True)
        for line in out.stdout.splitlines():
            if line.startswith("WRKJSON "):
                d = json.loads(line[8:])
                break
        else:
            raise RuntimeError(f"load driver gave no report (exit {out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-300:]}")
        dur = d.get("duration_us", 0) / 1e6
        errors = {k: int(d.get(k, 0)) for k in ("connect", "read", "write", "status", "timeout")}
        return LoadResult(d["requests"], dur, d["bytes"], errors, d["p50_us"], d["p99_us"])


def run_iperf(port: int, duration: float) -> float | None:
    """Gbit/s received, one stream through 127.0.0.1:*port*; None on failure."""
    try:
        out = subprocess.run(["iperf3", "-c", HOST, "-p", str(port), "-t", f"{duration:g}", "-J",
                              "--connect-timeout", "3000"],
                             capture_output=True, text=True, timeout=duration + 20,
                             start_new_session=True)
        d = json.loads(out.stdout)
        return float(d["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        log(f"iperf3 through port {port} failed: {type(exc).__name__}")
        return None


# -- backends --------------------------------------------------------------------------


class Backend:
    """The HTTP origin: nginx if installed (and wanted), else bench/backend.py."""

    def __init__(self, tmp: Path, use_nginx: bool, tls: bool = False) -> None:
        self.tmp = tmp / "backend"
        self.tmp.mkdir()
        self.kind = "nginx" if use_nginx else "built-in (bench/backend.py, uvloop)"
        self.proc: Proc | None = None
        self.use_nginx = use_nginx
        #: nginx also serves HTTPS on TLS_BACKEND_PORT (the ``-sni`` rows)
        self.tls = use_nginx and tls

    def make_certificate(self) -> tuple[Path, Path]:
        """A self-signed EC P-256 certificate for SNI_NAME (``openssl`` CLI): (cert, key)."""
        cert, key = self.tmp / "tls.pem", self.tmp / "tls.key"
        out = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                              "-nodes", "-days", "2", "-subj", f"/CN={SNI_NAME}",
                              "-addext", f"subjectAltName=DNS:{SNI_NAME}", "-keyout", str(key), "-out", str(cert)],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"openssl req failed: {(out.stderr or out.stdout).strip()[-200:]}")
        return cert, key

    def start(self) -> None:
        if self.use_nginx:
            www = self.tmp / "www"
            www.mkdir()
            (www / "small").write_bytes(b"x" * 99 + b"\n")
            (www / "big").write_bytes(b"y" * (1 << 20))
            # nginx workers run as "nobody": let them reach and read the files
            for path in (self.tmp.parent, self.tmp, www, www / "small", www / "big"):
                path.chmod(0o755)
            listens = "\n".join(f"        listen {HOST}:{p} backlog=4096 reuseport;" for p in BACKEND_PORTS)
            listens += f"\n        listen {HOST}:{PP_BACKEND_PORT} backlog=4096 reuseport proxy_protocol;"
            if self.tls:
                cert, key = self.make_certificate()
                listens += (f"\n        listen {HOST}:{TLS_BACKEND_PORT} backlog=4096 reuseport ssl;"
                            f"\n        ssl_certificate {cert};\n        ssl_certificate_key {key};")
            conf = f"""
worker_processes 1;
worker_rlimit_nofile {nofile_limit()};
pid {self.tmp}/nginx.pid;
error_log {self.tmp}/error.log warn;
events {{ worker_connections {max(1024, nofile_limit() - 100)}; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {self.tmp}/cbt;
    proxy_temp_path {self.tmp}/pt;
    fastcgi_temp_path {self.tmp}/ft;
    uwsgi_temp_path {self.tmp}/ut;
    scgi_temp_path {self.tmp}/st;
    default_type text/plain;
    server {{
{listens}
        root {www};
    }}
}}
"""
            (self.tmp / "nginx.conf").write_text(conf)
            self.proc = Proc("backend nginx", ["nginx", "-p", str(self.tmp), "-c", str(self.tmp / "nginx.conf"),
                                               "-g", "daemon off;"], logfile=self.tmp / "stdout.log")
        else:
            argv = [sys.executable, str(HERE / "backend.py")]
            for p in BACKEND_PORTS:
                argv += ["--port", str(p)]
            self.proc = Proc("backend", argv, logfile=self.tmp / "stdout.log")
        for p in BACKEND_PORTS:
            wait_port(p, proc=self.proc)
            for url, size in (("/small", 100), ("/big", 1 << 20)):
                check_http(p, url, size)
        if self.use_nginx:
            wait_port(PP_BACKEND_PORT, proc=self.proc)
        if self.tls:
            wait_port(TLS_BACKEND_PORT, proc=self.proc)
            check_http(TLS_BACKEND_PORT, "/small", 100, sni=SNI_NAME)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def check_http(port: int, path: str, size: int, sni: str | None = None) -> None:
    """Fail early unless GET *path* answers 200 with *size* bytes (a 403 from
    a misconfigured backend would otherwise show up as fast "requests");
    *sni*: over TLS sending that server name (the certificate is not checked)."""
    with socket.create_connection((HOST, port), timeout=5) as raw:
        s = raw
        if sni is not None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s = ctx.wrap_socket(raw, server_hostname=sni)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" " or len(body) != size:
        raise RuntimeError(f"backend {HOST}:{port}{path}: {status.decode(errors='replace')!r}, "
                           f"{len(body)} bytes (expected 200 and {size})")


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_nofile(want: int = 65536) -> None:
    """Raise the fd limit (inherited by every process started here), so
    10,000 idle proxied connections fit: up to the hard limit, and beyond it
    when we may (root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in ((max(want, hard), max(want, hard)), (hard, hard)):
        try:
            if limit[0] > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            return
        except (ValueError, OSError):
            continue


def background_cpu(seconds: float = 1.0) -> float:
    """Machine CPU use (% of one CPU) while this harness loads nothing: what
    the other users of the shared machine take."""
    b0, t0, _ = machine_cpu()
    time.sleep(seconds)
    b1, t1, _ = machine_cpu()
    return pct_of_one_cpu(b1 - b0, t1 - t0)


# -- proxies -------------------------------------------------------------------------------


def upstream_set(variant: int) -> tuple[list[int], str]:
    """The two configs a reload alternates between: (backend ports, balance).

    Variant 0 is what the steady runs use; variant 1 really differs (two
    upstreams, least-connections) so each reload rebuilds the service.
    """
    return ([BACKEND_PORTS[0]], "round_robin") if variant % 2 == 0 else (list(BACKEND_PORTS), "least_conn")


class Proxy:
    """One proxy under test.  Subclasses write a config and start a process."""

    name = "?"
    can_reload = False
    #: ``upgrade()`` replaces the proxy's own program under load (the upgrade row)
    can_upgrade = False
    #: the server name its clients send over TLS (the ``-sni`` rows); None: plain HTTP
    sni: str | None = None

    def __init__(self, index: int, tmp: Path) -> None:
        self.port = PROXY_BASE_PORT + 10 * index
        self.iperf_port = self.port + 1
        self.tmp = tmp / self.name
        self.tmp.mkdir(exist_ok=True)
        self.proc: Proc | None = None
        self.variant = 0
        self.reloads = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.variant = 0
        self.proc = self.launch()
        wait_port(self.port, timeout=30.0, proc=self.proc)
        wait_port(self.iperf_port, timeout=10.0, proc=self.proc)
        try:
            check_http(self.port, "/small", 100, sni=self.sni)   # a proxy that accepts but does not relay
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(f"{self.name} does not relay a request: {exc}") from None

    def launch(self) -> Proc:
        raise NotImplementedError

    def alive(self) -> bool:
        return self.proc is None or self.proc.alive()

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the proxy's log (for a failure's note)."""
        texts = []
        for name in ("log", "error.log"):
            f = self.tmp / name
            if f.exists():
                texts += f.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(texts[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def reload(self) -> None:
        """Switch to the other config variant and signal the proxy."""
        raise NotImplementedError

    def upgrade(self) -> tuple[bool, float, str]:
        """Replace the running program by the one on disk, same config:
        (done, milliseconds until the new one serves, what went wrong)."""
        raise NotImplementedError


def pid_running(pid: int) -> bool:
    """True if *pid* exists and is not a zombie (a reparented master is reaped by whoever is PID 1)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def pidfile_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll *pred* until true or *timeout* seconds; whether it came true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def stop_by_pid(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 8.0) -> None:
    """*sig* to *pid*, then SIGKILL to it and every process under it that is still there."""
    if pid is None or not pid_running(pid):
        return
    tree = process_tree(pid)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    wait_until(lambda: not pid_running(pid), timeout, 0.05)
    for p in [pid, *tree]:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Direct(Proxy):
    """No proxy: the load goes straight to the backend."""

    name = "direct"

    def __init__(self, index: int, tmp: Path) -> None:
        super().__init__(index, tmp)
        self.port, self.iperf_port = BACKEND_PORTS[0], IPERF_PORT

    def start(self) -> None:
        pass


class DirectTls(Direct):
    """No proxy, over TLS: the load goes straight to the backend's TLS port (the ``-sni`` rows' ceiling)."""

    name = "direct-tls"
    sni = SNI_NAME

    def __init__(self, index: int, tmp: Path) -> None:
        super().__init__(index, tmp)
        self.port = TLS_BACKEND_PORT


class PlainProxy(Proxy):
    """``bench/plainproxy.py``: a plain uvloop Protocol-pair proxy."""

    name = "plain-uvloop"

    def launch(self) -> Proc:
        return Proc(self.name, [sys.executable, str(HERE / "plainproxy.py"),
                                "--map", f"{HOST}:{self.port}={HOST}:{BACKEND_PORTS[0]}",
                                "--map", f"{HOST}:{self.iperf_port}={HOST}:{IPERF_PORT}"],
                    logfile=self.tmp / "log")


class HAProxy(Proxy):
    """HAProxy ``mode tcp``, 1 thread, master-worker (``-W``); reload = SIGUSR2."""

    can_reload = True

    def __init__(self, index: int, tmp: Path, tuned: bool, name: str | None = None,
                 send_proxy: bool = False, sni: bool = False) -> None:
        self.tuned = tuned
        #: send-proxy-v2 to the backend's PROXY protocol port (not reloaded)
        self.send_proxy = send_proxy
        #: route TLS by ``req.ssl_sni`` to the backend's TLS port (not reloaded)
        self.sni = SNI_NAME if sni else None
        self.can_reload = not send_proxy and not sni
        self.name = name or ("haproxy-pp2" if send_proxy else "haproxy-sni" if sni
                             else "haproxy-tuned" if tuned else "haproxy")
        super().__init__(index, tmp)

    def write_config(self) -> Path:
        ports, balance = upstream_set(self.variant)
        # Each connection takes two fds, and with splice a pipe takes two more:
        # cap maxconn (and the pipes) so HAProxy fits in the fd limit.
        maxpipes = 1024 if self.tuned else 0
        maxconn = max(1000, (nofile_limit() - 300 - 2 * maxpipes) // 2)
        tune = (f"    tune.bufsize 65536\n    maxpipes {maxpipes}\n" if self.tuned else "")
        splice = ("    option splice-request\n    option splice-response\n" if self.tuned else "")
        servers = "\n".join(f"    server s{p} {HOST}:{p}" for p in ports)
        if self.send_proxy:
            servers = f"    server pp {HOST}:{PP_BACKEND_PORT} send-proxy-v2"
        web = f"""listen web
    bind {HOST}:{self.port}
    balance {"roundrobin" if balance == "round_robin" else "leastconn"}
{servers}
"""
        if self.sni:
            # HAProxy's SNI routing: wait (up to 5 s) for a whole ClientHello, then
            # pick the backend by its server name; none matches: the connection is closed
            web = f"""frontend web
    bind {HOST}:{self.port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend tls if {{ req.ssl_sni -i {self.sni} }}

backend tls
    server tls {HOST}:{TLS_BACKEND_PORT}
"""
        conf = f"""global
    nbthread 1
    maxconn {maxconn}
    pidfile {self.tmp}/haproxy.pid
    # lets a reload hand the listening sockets to the new worker (no refused connections)
    stats socket {self.tmp}/admin.sock mode 600 level admin expose-fd listeners
{tune}
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{splice}
{web}
listen iperf
    bind {HOST}:{self.iperf_port}
    server iperf {HOST}:{IPERF_PORT}
"""
        path = self.tmp / "haproxy.cfg"
        tmp = path.with_suffix(".new")
        tmp.write_text(conf)
        tmp.replace(path)   # atomic: a reload never reads half a file
        return path

    def launch(self) -> Proc:
        cfg = self.write_config()
        return Proc(self.name, ["haproxy", "-W", "-db", "-f", str(cfg)], logfile=self.tmp / "log")

    def reload(self) -> None:
        self.variant += 1
        self.write_config()
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGUSR2)
        self.reloads += 1

    can_upgrade = True

    def _loaded(self) -> int:
        f = self.tmp / "log"
        return f.read_text(errors="replace").count("Loading success") if f.exists() else 0

    def upgrade(self) -> tuple[bool, float, str]:
        """``SIGUSR2`` to the ``-W`` master: it re-executes the haproxy binary on disk
        (same pid), which takes the listeners over the stats socket and forks a new
        worker; the old worker finishes its connections (``-sf``, done by the master)."""
        assert self.proc is not None
        before, t0 = self._loaded(), time.monotonic()
        os.kill(self.proc.pid, signal.SIGUSR2)
        ok = wait_until(lambda: self._loaded() > before, 10.0)
        return ok, (time.monotonic() - t0) * 1000.0, "" if ok else "no 'Loading success' within 10 s"


class NginxStream(Proxy):
    """nginx ``stream`` proxy, 1 worker; reload = SIGHUP (what ``nginx -s reload`` sends)."""

    name = "nginx-stream"
    can_reload = True

    def write_config(self) -> Path:
        ports, balance = upstream_set(self.variant)
        servers = " ".join(f"server {HOST}:{p};" for p in ports)
        lb = "least_conn; " if balance == "least_conn" else ""
        conf = f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_rlimit_nofile {nofile_limit()};
pid {self.tmp}/nginx.pid;
error_log {self.tmp}/error.log warn;
events {{ worker_connections {max(1024, nofile_limit() - 100)}; }}
stream {{
    upstream web {{ {lb}{servers} }}
    server {{ listen {HOST}:{self.port} backlog=4096; proxy_pass web; }}
    server {{ listen {HOST}:{self.iperf_port}; proxy_pass {HOST}:{IPERF_PORT}; }}
}}
"""
        path = self.tmp / "nginx.conf"
        tmp = path.with_suffix(".new")
        tmp.write_text(conf)
        tmp.replace(path)
        return path

    def launch(self) -> Proc:
        cfg = self.write_config()
        return Proc(self.name, [shutil.which("nginx") or "nginx", "-p", str(self.tmp), "-c", str(cfg),
                                "-g", "daemon off;"], logfile=self.tmp / "log")

    def reload(self) -> None:
        self.variant += 1
        self.write_config()
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)
        self.reloads += 1


class NginxUpgrade(NginxStream):
    """nginx as ``nginx-stream``, but a daemon (found by its pidfile), for its
    binary upgrade: ``USR2`` to the master starts a new master from the binary
    on disk (exec'd by absolute path) on the same sockets; ``WINCH`` then
    ``QUIT`` to the old master stop its workers gracefully and end it.  (A
    master whose parent is still the process that started it -- ``daemon
    off`` under this script, or the old master -- ignores ``USR2``: so one
    upgrade at a time, each waiting for the old master to be gone.)"""

    can_upgrade = True

    @property
    def pidfile(self) -> Path:
        return self.tmp / "nginx.pid"

    @property
    def pid(self) -> int | None:
        return pidfile_pid(self.pidfile)

    def alive(self) -> bool:
        pid = self.pid
        return pid is not None and pid_running(pid)

    def start(self) -> None:
        self.variant = 0
        cfg = self.write_config()
        for f in (self.pidfile, self.tmp / "nginx.pid.oldbin"):
            f.unlink(missing_ok=True)
        out = subprocess.run([shutil.which("nginx") or "nginx", "-p", str(self.tmp), "-c", str(cfg)],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"nginx (daemon) exited with {out.returncode}: {(out.stderr or out.stdout)[-200:]}")
        if not wait_until(lambda: self.pid is not None, 10.0):
            raise RuntimeError("nginx (daemon) wrote no pidfile")
        wait_port(self.port, timeout=30.0)
        check_http(self.port, "/small", 100)

    def upgrade(self) -> tuple[bool, float, str]:
        old = self.pid
        if old is None or not pid_running(old):
            return False, 0.0, "no nginx master"
        t0 = time.monotonic()
        os.kill(old, signal.SIGUSR2)

        def new_master() -> bool:
            new = self.pid
            return new is not None and new != old and pid_running(new)

        if not wait_until(new_master, 10.0):
            return False, (time.monotonic() - t0) * 1000.0, "no new master within 10 s (USR2 ignored?)"
        took = (time.monotonic() - t0) * 1000.0
        os.kill(old, signal.SIGWINCH)   # the old workers stop accepting and finish
        os.kill(old, signal.SIGQUIT)    # the old master ends once they have
        if not wait_until(lambda: not pid_running(old), 15.0):
            return False, took, f"old master {old} still running 15 s after QUIT"
        return True, took, ""

    def stop(self) -> None:
        for f in (self.tmp / "nginx.pid.oldbin", self.pidfile):
            stop_by_pid(pidfile_pid(f), signal.SIGQUIT)
        super().stop()


RELOAD_OK = re.compile(r"reload ok: .* in ([0-9.]+) ms")
RELOAD_FAILED = re.compile(r"reload failed: (.*)")


def hotproxy_argv() -> list[str]:
    """How to run the ``hotproxy`` program (the script if on PATH, else via Python)."""
    exe = shutil.which("hotproxy")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from hotproxy.cli import main; sys.exit(main(sys.argv[1:]))"]


class Hotproxy(Proxy):
    """``hotproxy run -c FILE``; reload = SIGHUP, latency from its ``reload ok`` log line."""

    can_reload = True

    def __init__(self, index: int, tmp: Path, core: str, workers: int, send_proxy: str = "",
                 metrics: bool = False, sni: bool = False) -> None:
        self.core = core
        self.workers = workers
        #: send_proxy = "v2" to the backend's PROXY protocol port (not reloaded)
        self.send_proxy = send_proxy
        #: sni_routes: SNI_NAME to the backend's TLS port, no default group (not reloaded)
        self.sni = SNI_NAME if sni else None
        #: the Prometheus endpoint on (``[runtime] metrics``), scraped every
        #: METRICS_INTERVAL seconds while the proxy runs (the ``-metrics`` row)
        self.metrics = metrics
        self.scrapes = 0
        self.scrape_errors = 0
        self._scraper: threading.Thread | None = None
        self._stop_scraping = threading.Event()
        self.can_reload = not send_proxy and not metrics and not sni
        self.can_upgrade = not send_proxy and not metrics and not sni
        self.name = (f"hotproxy-{'py' if core == 'python' else 'c'}-{workers}w" + ("-pp2" if send_proxy else "")
                     + ("-metrics" if metrics else "") + ("-sni" if sni else ""))
        super().__init__(index, tmp)
        self.logfile = self.tmp / "log"
        self.metrics_port = self.port + 2

    def write_config(self) -> Path:
        ports, balance = upstream_set(self.variant)
        ups = ", ".join(f'"{HOST}:{p}"' for p in ports)
        extra = ""
        if self.send_proxy:
            ups, extra = f'"{HOST}:{PP_BACKEND_PORT}"', f'send_proxy = "{self.send_proxy}"\n'
        if self.sni:
            # the same routing as haproxy-sni: one name, no default group (others are closed)
            ups, extra = "", f'sni_routes = {{ "{self.sni}" = ["{HOST}:{TLS_BACKEND_PORT}"] }}\n'
        maxconn = max(1000, nofile_limit())
        if self.metrics:
            extra_runtime = f'metrics = "{HOST}:{self.metrics_port}"\n'
        else:
            extra_runtime = ""
        conf = f"""# written by bench/load.py (variant {self.variant})
[runtime]
{extra_runtime}workers = {self.workers}
drain_timeout = 5.0
admin_socket = "{self.tmp}/admin.sock"
pidfile = "{self.tmp}/hotproxy.pid"
log_level = "info"

[services.web]
kind = "proxy"
listen = "{HOST}:{self.port}"
upstreams = [{ups}]
balance = "{balance}"
backlog = 4096
max_connections = {maxconn}
{extra}
[services.iperf]
kind = "proxy"
listen = "{HOST}:{self.iperf_port}"
upstreams = ["{HOST}:{IPERF_PORT}"]
"""
        path = self.tmp / "hotproxy.toml"
        tmp = path.with_suffix(".new")
        tmp.write_text(conf)
        tmp.replace(path)
        return path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.core == "python":
            env["HOTPROXY_NO_EXTENSIONS"] = "1"
        else:
            env.pop("HOTPROXY_NO_EXTENSIONS", None)
        return env

    def launch(self) -> Proc:
        cfg = self.write_config()
        proc = Proc(self.name, hotproxy_argv() + ["run", "-c", str(cfg)], env=self.env(),
                    logfile=self.logfile)
        if self.metrics:
            self._stop_scraping.clear()
            self._scraper = threading.Thread(target=self._scrape, name=f"scrape-{self.name}", daemon=True)
            self._scraper.start()
        return proc

    def _scrape(self) -> None:
        """GET /metrics every METRICS_INTERVAL s (what a Prometheus server does,
        more often than its default 15 s) until the proxy stops."""
        request = f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
        while not self._stop_scraping.wait(METRICS_INTERVAL):
            try:
                with socket.create_connection((HOST, self.metrics_port), timeout=5.0) as sock:
                    sock.sendall(request)
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
                if data.startswith(b"HTTP/1.1 200"):
                    self.scrapes += 1
                else:
                    self.scrape_errors += 1
            except OSError:
                self.scrape_errors += 1

    def reload(self) -> None:
        self.variant += 1
        self.write_config()
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)
        self.reloads += 1

    can_upgrade = True

    @property
    def master_pid(self) -> int | None:
        """The master serving now (the pidfile follows upgrades)."""
        return pidfile_pid(self.tmp / "hotproxy.pid")

    def alive(self) -> bool:
        pid = self.master_pid
        return super().alive() or (pid is not None and pid_running(pid))

    def upgrade(self) -> tuple[bool, float, str]:
        """``hotproxy upgrade -c FILE``: returns once the new master serves (or failed)."""
        t0 = time.monotonic()
        try:
            out = subprocess.run(hotproxy_argv() + ["upgrade", "-c", str(self.tmp / "hotproxy.toml")],
                                 capture_output=True, text=True, timeout=120, env=self.env())
        except subprocess.TimeoutExpired:
            return False, (time.monotonic() - t0) * 1000.0, "hotproxy upgrade: no answer in 120 s"
        took = (time.monotonic() - t0) * 1000.0
        lines = ((out.stdout or "") + (out.stderr or "")).strip().splitlines()
        return out.returncode == 0, took, "" if out.returncode == 0 else (lines[-1] if lines else "?")

    def stop(self) -> None:
        self._stop_scraping.set()
        if self._scraper is not None:
            self._scraper.join(10.0)
            self._scraper = None
        # the master now and the old ones still draining are in the first one's
        # process group (Proc.stop); the current one is stopped by pidfile first
        pid = self.master_pid
        if pid is not None and (self.proc is None or pid != self.proc.pid):
            stop_by_pid(pid)
        super().stop()

    def reload_log(self) -> tuple[list[float], list[str]]:
        """(latencies in ms of the ``reload ok`` lines, ``reload failed`` reasons) so far."""
        text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
        return ([float(m.group(1)) for m in RELOAD_OK.finditer(text)],
                [m.group(1) for m in RELOAD_FAILED.finditer(text)])


def hotproxy_status(tmp: Path) -> tuple[bool, str]:
    """Can ``hotproxy run`` serve a proxy here?  (ok, reason if not)."""
    try:
        import hotproxy  # noqa: F401
    except ImportError as exc:
        return False, f"hotproxy is not importable ({exc})"
    probe = tmp / "probe.toml"
    probe.write_text(f'[runtime]\nworkers = 1\n[services.web]\nkind = "proxy"\n'
                     f'listen = "{HOST}:{PROXY_BASE_PORT - 1}"\nupstreams = ["{HOST}:{BACKEND_PORTS[0]}"]\n')
    try:
        out = subprocess.run(hotproxy_argv() + ["check", "-c", str(probe)], capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False, "`hotproxy check` timed out"
    if out.returncode != 0:
        return False, f"`hotproxy check` failed: {(out.stderr or out.stdout).strip()[-200:]}"
    return True, ""


# -- scenarios ---------------------------------------------------------------------------


@dataclass
class Settings:
    """What one run measures, and for how long."""

    rounds: int = 5
    duration: float = 3.0
    reload_duration: float = 6.0
    connections: int = 50
    bulk_connections: int = 4
    wrk_threads: int = 1
    scenarios: tuple[str, ...] = ("keepalive", "close", "bulk", "iperf3")
    reload_intervals: tuple[float, ...] = (0.5,)
    reload_rounds: int = 3
    idle_connections: int = 10000
    warmup: float = 0.5
    #: a steady round (or a reload run) during which the hypervisor took
    #: more CPU than this (% of one CPU) is measured again
    max_steal: float = 10.0


STEADY_SCENARIOS = ("keepalive", "close", "bulk", "iperf3")


def measure_scenario(proxy: Proxy, driver: Driver, s: Settings, scenario: str) -> dict[str, float]:
    """One steady scenario once against a running proxy; a flat dict of figures."""
    out: dict[str, float] = {}
    if scenario == "iperf3":
        if proxy.sni is not None:
            return out   # its iperf3 port is a plain one, measured in the other rows
        g = run_iperf(proxy.iperf_port, s.duration)
        if g is not None:
            out["iperf_gbps"] = g
        return out
    path, conns, close, prefix = {
        "keepalive": ("/small", s.connections, False, "ka"),
        "close": ("/small", s.connections, True, "close"),
        "bulk": ("/big", s.bulk_connections, False, "bulk"),
    }[scenario]
    m = Meter(proxy.pid)
    r = driver.run(proxy.port, path, conns, s.duration, close=close, sni=proxy.sni)
    u = m.done()
    if r.requests == 0 or r.error_count > 0.01 * r.requests:
        # a run where nothing (or little) completed is a broken proxy, not a
        # slow one: report it as a failure rather than as a figure
        raise RuntimeError(f"{r.error_count} errors ({', '.join(f'{k} {v}' for k, v in r.errors.items() if v)}) "
                           f"in {r.requests} requests in the {scenario} run")
    out[f"{prefix}_errors"] = r.error_count
    out[f"{prefix}_machine_cpu"] = u["machine_cpu_pct"]
    cpu = u.get("proxy_cpu_s")
    if cpu is not None:
        out[f"{prefix}_proxy_cpu_pct"] = 100 * cpu / u["wall"]
    if scenario == "bulk":
        out["bulk_mibps"] = r.bytes / r.duration_s / (1 << 20) if r.duration_s else 0.0
        if cpu:
            out["bulk_mib_per_cpu_s"] = r.bytes / (1 << 20) / cpu
        return out
    out[f"{prefix}_rps"] = r.rps
    out[f"{prefix}_p50_ms"] = r.p50_us / 1e3
    out[f"{prefix}_p99_ms"] = r.p99_us / 1e3
    if cpu:
        out[f"{prefix}_per_cpu_s"] = r.requests / cpu
    return out


def measure_idle(proxy: Proxy, n: int) -> dict[str, float]:
    """RSS per idle proxied connection: open *n* connections, wait, compare RSS."""
    assert proxy.pid is not None
    time.sleep(0.5)
    before = rss_bytes(proxy.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((HOST, proxy.port))
            except BlockingIOError:
                pass
            socks.append(s)
            if len(socks) % 500 == 0:
                time.sleep(0.05)   # let the proxy accept and connect upstream
        time.sleep(2.0)
        # count only connections the proxy still holds (not reset under us)
        alive = 0
        for s in socks:
            try:
                if s.recv(1, socket.MSG_PEEK):
                    alive += 1          # data (unexpected, but the connection is there)
                # b"": the proxy closed it
            except BlockingIOError:
                alive += 1              # open and quiet: what we want
            except OSError:
                pass                    # refused or reset
        after = rss_bytes(proxy.pid)
    finally:
        for s in socks:
            s.close()
    return {"idle_conns": alive, "idle_rss_per_conn_kib": (after - before) / max(1, alive) / 1024,
            "idle_rss_before_mib": before / (1 << 20), "idle_rss_after_mib": after / (1 << 20)}


@dataclass
class ReloadOutcome:
    """One proxy, one reload interval, one round."""

    steady: LoadResult
    during: LoadResult
    reloads: int
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: CPU the hypervisor took during the run (% of one CPU)
    steal_pct: float = 0.0


def measure_reload(proxy: Proxy, driver: Driver, s: Settings, interval: float) -> ReloadOutcome:
    """Connection: close load, steady then with a reload every *interval* seconds."""
    _, t0, st0 = machine_cpu()
    if proxy.variant % 2:
        # start from the config the steady runs use
        proxy.reload()
        time.sleep(1.0)
    if s.warmup:
        driver.run(proxy.port, "/small", s.connections, s.warmup, close=True)
    steady_before = driver.run(proxy.port, "/small", s.connections, s.reload_duration, close=True)
    before = proxy.reload_log() if isinstance(proxy, Hotproxy) else ([], [])
    stop = threading.Event()
    sent = [0]
    # bounded in count as well as time
    limit = int(s.reload_duration / interval) + 2

    def reloader() -> None:
        next_at = time.monotonic() + interval / 2
        while not stop.is_set() and sent[0] < limit:
            delay = next_at - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            proxy.reload()
            sent[0] += 1
            next_at += interval

    t = threading.Thread(target=reloader, name="reloader", daemon=True)
    t.start()
    try:
        during = driver.run(proxy.port, "/small", s.connections, s.reload_duration, close=True)
    finally:
        stop.set()
        t.join(5.0)
    lat: list[float] = []
    fails: list[str] = []
    if isinstance(proxy, Hotproxy):
        time.sleep(0.5)   # the last reload's log line
        lat, fails = proxy.reload_log()
        lat, fails = lat[len(before[0]):], fails[len(before[1]):]
    # settle: old workers (HAProxy, nginx) finish before the next measurement
    time.sleep(1.0)
    # a steady run after as well as before, so a drift of the shared machine
    # over the run does not pass for the reloads' effect
    steady_after = driver.run(proxy.port, "/small", s.connections, s.reload_duration, close=True)
    _, t1, st1 = machine_cpu()
    return ReloadOutcome(combine(steady_before, steady_after), during, sent[0], lat, fails,
                         pct_of_one_cpu(st1 - st0, t1 - t0))


@dataclass
class UpgradeOutcome:
    """One proxy, one round of the upgrade row."""

    steady: LoadResult
    during: LoadResult
    upgrades: int
    ok: int
    took_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    steal_pct: float = 0.0


#: seconds between the starts of two upgrades (one starts as soon as the last has ended, if later)
UPGRADE_INTERVAL = 2.0


def measure_upgrade(proxy: Proxy, driver: Driver, s: Settings, interval: float = UPGRADE_INTERVAL) -> UpgradeOutcome:
    """Connection: close load, steady, then with an upgrade every *interval* seconds, then steady."""
    _, t0, st0 = machine_cpu()
    if s.warmup:
        driver.run(proxy.port, "/small", s.connections, s.warmup, close=True)
    steady_before = driver.run(proxy.port, "/small", s.connections, s.reload_duration, close=True)
    stop = threading.Event()
    results: list[tuple[bool, float, str]] = []
    # bounded in count as well as time
    limit = int(s.reload_duration / interval) + 1

    def upgrader() -> None:
        next_at = time.monotonic() + interval / 2
        while not stop.is_set() and len(results) < limit:
            delay = next_at - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            try:
                results.append(proxy.upgrade())
            except Exception as exc:  # noqa: BLE001 - reported in the row
                results.append((False, 0.0, f"{type(exc).__name__}: {exc}"))
            next_at += interval

    t = threading.Thread(target=upgrader, name="upgrader", daemon=True)
    t.start()
    try:
        during = driver.run(proxy.port, "/small", s.connections, s.reload_duration, close=True)
    finally:
        stop.set()
        t.join(150.0)   # an upgrade under way ends (each is bounded)
    time.sleep(1.0)     # settle: the old processes drain
    steady_after = driver.run(proxy.port, "/small", s.connections, s.reload_duration, close=True)
    _, t1, st1 = machine_cpu()
    return UpgradeOutcome(combine(steady_before, steady_after), during, len(results),
                          sum(1 for ok, _, _ in results if ok), [ms for ok, ms, _ in results if ok],
                          [why for ok, _, why in results if not ok], pct_of_one_cpu(st1 - st0, t1 - t0))


def upgrade_row(live: list[Proxy], driver: Driver, s: Settings, args: argparse.Namespace, res: Results,
                notes: list[str], tmp: Path) -> None:
    """The upgrade row for each proxy that upgrades (the same set as the reload rows)."""
    for rnd in range(s.reload_rounds):
        for proxy in rotate([p for p in live if p.can_upgrade and reload_wanted(p, args)], rnd):
            log(f"upgrade every {UPGRADE_INTERVAL:g}s, round {rnd + 1}/{s.reload_rounds}: {proxy.name}")
            try:
                if not proxy.alive():
                    raise RuntimeError("the proxy is not running")
                o = measure_upgrade(proxy, driver, s)
                res.upgrade.setdefault(proxy.name, []).append(o)
                log(f"  upgrades={o.upgrades} ok={o.ok} errors={o.during.errors} "
                    f"tput={o.during.rps / max(1.0, o.steady.rps):.3f} took={[round(x) for x in o.took_ms]} "
                    f"fails={o.failures[:2]}")
            except Exception as exc:  # noqa: BLE001
                fail(proxy, f"upgrade round {rnd + 1}", exc, notes)


def upgradable(live: list[Proxy], tmp: Path) -> list[Proxy]:
    """*live* with nginx-stream replaced by the same nginx as a daemon (its binary upgrade
    needs one); the replacement is started here and must be stopped by the caller."""
    out: list[Proxy] = []
    for p in live:
        if isinstance(p, NginxStream) and not isinstance(p, NginxUpgrade):
            p.stop()
            daemon = NginxUpgrade((p.port - PROXY_BASE_PORT) // 10, tmp)
            try:
                daemon.start()
            except Exception:
                daemon.stop()
                raise
            out.append(daemon)
        else:
            out.append(p)
    return out


def combine(a: LoadResult, b: LoadResult) -> LoadResult:
    """Two runs of the same load as one: summed counts, mean percentiles."""
    errors = {k: a.errors.get(k, 0) + b.errors.get(k, 0) for k in set(a.errors) | set(b.errors)}
    return LoadResult(a.requests + b.requests, a.duration_s + b.duration_s, a.bytes + b.bytes, errors,
                      (a.p50_us + b.p50_us) / 2, (a.p99_us + b.p99_us) / 2)


# -- statistics and tables -------------------------------------------------------------


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    if unit == "k":
        return f"{x / 1000:.1f}k"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


#: (key, column title, unit hint, higher is better)
COLUMNS = [
    ("ka_rps", "keep-alive req/s", "k", True),
    ("ka_p50_ms", "k-a p50 ms", "", False),
    ("ka_p99_ms", "k-a p99 ms", "", False),
    ("ka_per_cpu_s", "k-a req per proxy CPU-s", "k", True),
    ("close_rps", "close req/s", "k", True),
    ("close_p99_ms", "close p99 ms", "", False),
    ("close_per_cpu_s", "close conn per proxy CPU-s", "k", True),
    ("bulk_mibps", "1 MiB resp MiB/s", "", True),
    ("iperf_gbps", "iperf3 Gbit/s", "", True),
    ("errors", "errors (k-a+close+bulk)", "", False),
    ("ka_proxy_cpu_pct", "proxy CPU % (k-a)", "", True),
    ("ka_machine_cpu", "machine CPU % (k-a)", "", True),
]


#: the ``-sni`` rows' columns (their iperf3 port is a plain one)
SNI_COLUMNS = [c for c in COLUMNS if c[0] != "iperf_gbps"]


def is_sni_row(name: str) -> bool:
    """A row of the "SNI routing vs HAProxy" table (TLS through the proxy), not of the main one."""
    return name in ("direct-tls", SNI_CONTROL) or name.endswith("-sni")


class Results:
    """Per-round figures: rounds[i][proxy][metric]."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, dict[str, float]]] = []
        self.idle: dict[str, dict[str, float]] = {}
        self.reload: dict[tuple[str, float], list[ReloadOutcome]] = {}
        self.upgrade: dict[str, list[UpgradeOutcome]] = {}
        #: CPU use of the machine before each round, while idle here
        self.background: list[float] = []
        #: CPU the hypervisor took from this VM during each kept round (% of one CPU)
        self.steal: list[float] = []
        #: rounds measured again because the hypervisor took too much: (round, steal %)
        self.redone: list[tuple[int, float]] = []
        self.max_steal = 0.0
        #: the micro-benchmarks' table, when run
        self.micro: str | None = None
        #: (proxy, scenario, top lines of perf report) with --profile
        self.profiles: list[tuple[str, str, list[str]]] = []

    def values(self, proxy: str, key: str) -> list[float]:
        return [r[proxy][key] for r in self.rounds if proxy in r and key in r[proxy]]

    def value(self, proxy: str, key: str) -> float | None:
        return median(self.values(proxy, key))

    def ratios(self, proxy: str, key: str, base: str) -> list[float]:
        """proxy/base in each round (both measured in that round)."""
        return [r[proxy][key] / r[base][key] for r in self.rounds
                if proxy in r and base in r and key in r[proxy] and r[base].get(key)]

    def ratio(self, proxy: str, key: str, base: str) -> float | None:
        """Median over rounds of proxy/base, each taken in the same round."""
        return median(self.ratios(proxy, key, base))

    def spread(self, proxy: str, key: str) -> float | None:
        """(max - min) / median over rounds, in percent: how noisy a baseline was."""
        xs = self.values(proxy, key)
        if len(xs) < 2:
            return None
        m = statistics.median(xs)
        return 100 * (max(xs) - min(xs)) / m if m else None


def main_table(res: Results, proxies: list[str], haproxy: str | None, direct: str = "direct",
               columns: Sequence[tuple[str, str, str, bool]] | None = None) -> str:
    """The markdown table: each cell is `value · ×HAProxy · ×direct` (*haproxy*, *direct*: the baselines' names)."""
    cols = columns or COLUMNS
    head = "| proxy | " + " | ".join(c[1] for c in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    for p in proxies:
        cells = []
        for key, _, unit, _ in cols:
            # errors: the total over all rounds, not a median -- one matters
            v = sum(res.values(p, key)) if key == "errors" and res.values(p, key) else res.value(p, key)
            if v is None:
                cells.append("—")
                continue
            parts = [fmt_num(v, unit)]
            if key == "errors":
                cells.append(f"{v:.0f}")
                continue
            if key.endswith("_pct") or key.endswith("_cpu"):
                cells.append(parts[0])
                continue
            if haproxy and p != haproxy:
                parts.append(f"{fmt_ratio(res.ratio(p, key, haproxy))}H")
            if p != direct and direct in proxies and not key.endswith("per_cpu_s"):
                parts.append(f"{fmt_ratio(res.ratio(p, key, direct))}D")
            cells.append(" · ".join(parts))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reload_table(res: Results) -> str:
    lines = ["| proxy | reload every | reloads | errors during (steady) | req/s during ÷ steady | "
             "p99 during ÷ steady | reload latency p50 / max ms | failed reloads | stolen CPU % (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (p, interval), outs in res.reload.items():
        errs = sum(o.during.error_count for o in outs)
        errs_steady = sum(o.steady.error_count for o in outs)
        detail, tput, p99 = during_vs_steady(outs)
        lat = [x for o in outs for x in o.latencies_ms]
        lat_s = f"{statistics.median(lat):.1f} / {max(lat):.1f}" if lat else "—"
        fails = sum(len(o.failures) for o in outs)
        reloads = str(sum(o.reloads for o in outs))
        if p.startswith("hotproxy"):
            reloads += f" ({len(lat)} logged ok)"
        lines.append(f"| {p} | {interval:g} s | {reloads} | {errs}{detail} ({errs_steady}) | "
                     f"{fmt_ratio(tput)} | {fmt_ratio(p99)} | {lat_s} | "
                     f"{fails if isinstance(outs[0], ReloadOutcome) and p.startswith('hotproxy') else '—'} | "
                     f"{max(o.steal_pct for o in outs):.0f} |")
    return "\n".join(lines)


def during_vs_steady(outs: Sequence[Any]) -> tuple[str, float | None, float | None]:
    """Of runs that measured a proxy steady and during reloads (or upgrades):
    the kinds of errors during them (" (kind n, ...)" or ""), and the medians
    of req/s and of p99 during ÷ steady."""
    kinds: dict[str, int] = {}
    for o in outs:
        for k, v in o.during.errors.items():
            if v:
                kinds[k] = kinds.get(k, 0) + v
    detail = f" ({', '.join(f'{k} {v}' for k, v in kinds.items())})" if kinds else ""
    tput = median([o.during.rps / o.steady.rps for o in outs if o.steady.rps])
    p99 = median([o.during.p99_us / o.steady.p99_us for o in outs if o.steady.p99_us])
    return detail, tput, p99


def upgrade_table(res: Results) -> str:
    lines = ["| proxy | how | upgrades (done) | errors during (steady) | req/s during ÷ steady | "
             "p99 during ÷ steady | until the new one serves p50 / max ms | failed | stolen CPU % (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    how = {"hotproxy": "`hotproxy upgrade`", "haproxy": "`-W` master, `SIGUSR2` (re-exec, fds via stats socket)",
           "nginx": "`USR2`, `WINCH` + `QUIT` to the old master"}
    for p, outs in res.upgrade.items():
        detail, tput, p99 = during_vs_steady(outs)
        took = [x for o in outs for x in o.took_ms]
        took_s = f"{statistics.median(took):.0f} / {max(took):.0f}" if took else "—"
        fails = [f for o in outs for f in o.failures]
        lines.append(f"| {p} | {next((v for k, v in how.items() if p.startswith(k)), '?')} | "
                     f"{sum(o.upgrades for o in outs)} ({sum(o.ok for o in outs)}) | "
                     f"{sum(o.during.error_count for o in outs)}{detail} "
                     f"({sum(o.steady.error_count for o in outs)}) | {fmt_ratio(tput)} | {fmt_ratio(p99)} | "
                     f"{took_s} | {len(fails)}{': ' + fails[0] if fails else ''} | "
                     f"{max(o.steal_pct for o in outs):.0f} |")
    return "\n".join(lines)


def idle_table(res: Results) -> str:
    lines = ["| proxy | idle connections held | RSS before → after MiB | RSS per idle proxied connection KiB |",
             "|---|---|---|---|"]
    for p, d in res.idle.items():
        lines.append(f"| {p} | {d['idle_conns']:.0f} | {d['idle_rss_before_mib']:.1f} → "
                     f"{d['idle_rss_after_mib']:.1f} | {d['idle_rss_per_conn_kib']:.2f} |")
    return "\n".join(lines)


def targets(res: Results, names: list[str]) -> list[tuple[str, str, str]]:
    """Issue 6's targets: (target, measured, status)."""
    hp1 = "hotproxy-c-1w" if "hotproxy-c-1w" in names else None
    hpn = next((n for n in names if n.startswith("hotproxy-c-") and n != "hotproxy-c-1w"
                and not n.endswith(("-pp2", "-metrics", "-sni"))), None)
    hpy = "hotproxy-py-1w" if "hotproxy-py-1w" in names else None
    out: list[tuple[str, str, str]] = []

    def check(label: str, val: float | None, ok: Callable[[float], bool], fmt: str = "{:.2f}×",
              rounds: list[float] | None = None) -> None:
        """One target: the median decides; the range over the rounds shows
        how far the machine's noise moved it."""
        if val is None:
            out.append((label, "not measured", "—"))
            return
        shown = fmt.format(val)
        status = "met" if ok(val) else "**missed**"
        if rounds and len(rounds) > 1:
            shown += f" ({fmt.format(min(rounds))} – {fmt.format(max(rounds))})"
            if ok(min(rounds)) != ok(max(rounds)):
                status += ", within the rounds' range"
        out.append((label, shown, status))

    for hp in (hp1, hpn):
        if hp is None:
            continue
        for key, label, lim, base in (
                ("ka_rps", "keep-alive req/s ≥ 1.0× HAProxy (1 thread)", 1.0, "haproxy"),
                ("ka_per_cpu_s", "keep-alive req per proxy CPU-s ≥ 1.1× HAProxy", 1.1, "haproxy"),
                ("close_rps", "Connection: close req/s ≥ 1.0× HAProxy", 1.0, "haproxy"),
                ("close_per_cpu_s", "Connection: close conn per proxy CPU-s ≥ 1.0× HAProxy", 1.0, "haproxy"),
                ("iperf_gbps", "bulk iperf3 one stream ≥ 1.5× HAProxy tuned", 1.5, "haproxy-tuned"),
                ("bulk_mibps", "bulk 1 MiB responses ≥ 1.5× HAProxy tuned", 1.5, "haproxy-tuned")):
            # a missing baseline shows as "not measured" rather than vanishing
            check(f"{hp}: {label}", res.ratio(hp, key, base) if base in names else None, at_least(lim),
                  rounds=res.ratios(hp, key, base))
    for (p, interval), outs in res.reload.items():
        # the targets are for a reload every 0.5 s; the storm is for information
        if not p.startswith("hotproxy") or interval != 0.5:
            continue
        errs = sum(o.during.error_count for o in outs)
        check(f"{p}, reload every {interval:g} s: 0 errors", float(errs), lambda v: v == 0, "{:.0f}")
        tput = [o.during.rps / o.steady.rps for o in outs if o.steady.rps]
        check(f"{p}, reload every {interval:g} s: req/s ≥ 0.97× steady", median(tput), lambda v: v >= 0.97,
              rounds=tput)
        p99 = [o.during.p99_us / o.steady.p99_us for o in outs if o.steady.p99_us]
        check(f"{p}, reload every {interval:g} s: p99 ≤ 1.10× steady", median(p99), lambda v: v <= 1.10,
              rounds=p99)
        lat = [x for o in outs for x in o.latencies_ms]
        check(f"{p}, reload every {interval:g} s: reload latency p50 < 10 ms",
              statistics.median(lat) if lat else None, lambda v: v < 10, "{:.1f} ms",
              rounds=[statistics.median(o.latencies_ms) for o in outs if o.latencies_ms])
    if "hotproxy-c-1w-metrics" in names and hp1:
        # issue 15: the metrics endpoint, scraped, costs the proxy no more than the noise
        for key, label in (("ka_per_cpu_s", "keep-alive req per proxy CPU-s"),
                           ("close_per_cpu_s", "Connection: close conn per proxy CPU-s")):
            rs = res.ratios("hotproxy-c-1w-metrics", key, hp1)
            if rs:
                out.append((f"hotproxy-c-1w with metrics on and scraped every {METRICS_INTERVAL:g} s ÷ off, {label}",
                            f"{median(rs):.2f}× ({min(rs):.2f}× – {max(rs):.2f}×)",
                            "compare with the A/A control below"))
    if "haproxy-sni" in names:
        # SNI routing without termination, hotproxy ÷ HAProxy req.ssl_sni, beside that row's A/A control
        for p in [n for n in names if n.startswith("hotproxy") and n.endswith("-sni")] + [SNI_CONTROL]:
            for key, label in (("ka_rps", "keep-alive req/s"), ("ka_per_cpu_s", "keep-alive req per proxy CPU-s"),
                               ("close_rps", "Connection: close req/s (a TLS handshake each)"),
                               ("close_per_cpu_s", "Connection: close conn per proxy CPU-s")):
                rs = res.ratios(p, key, "haproxy-sni")
                if rs:
                    what = ("A/A control: HAProxy req.ssl_sni ÷ the same HAProxy" if p == SNI_CONTROL
                            else f"SNI routing: {p} ÷ HAProxy req.ssl_sni")
                    out.append((f"{what}, {label}", f"{median(rs):.2f}× ({min(rs):.2f}× – {max(rs):.2f}×)",
                                "noise only" if p == SNI_CONTROL else "compare with the SNI A/A control"))
    if CONTROL in names and "haproxy" in names:
        # The same HAProxy against itself: a ratio a proxy's target cannot be
        # told apart from, on this machine in this run.
        for key, label in (("ka_rps", "keep-alive req/s"), ("ka_per_cpu_s", "keep-alive req per proxy CPU-s"),
                           ("close_rps", "Connection: close req/s"),
                           ("close_per_cpu_s", "Connection: close conn per proxy CPU-s")):
            rs = res.ratios(CONTROL, key, "haproxy")
            if rs:
                out.append((f"A/A control: HAProxy ÷ the same HAProxy, {label}",
                            f"{median(rs):.2f}× ({min(rs):.2f}× – {max(rs):.2f}×)", "noise only"))
    if "haproxy-tuned" in names and "direct" in names:
        # What the bulk targets ask, against no proxy at all on the same box.
        for key, label in (("iperf_gbps", "iperf3 one stream"), ("bulk_mibps", "1 MiB responses")):
            ceiling = res.ratio("direct", key, "haproxy-tuned")
            if ceiling is not None:
                out.append((f"for information: bulk {label}, no proxy (direct) ÷ HAProxy tuned",
                            f"{ceiling:.2f}×", "the ceiling for any proxy here"))
    if hp1 and hpy:
        check("compiled core ≥ 1.3× pure-Python core on Connection: close req/s (1 worker)",
              res.ratio(hp1, "close_rps", hpy), lambda v: v >= 1.3, rounds=res.ratios(hp1, "close_rps", hpy))
        per_cpu = res.ratio(hp1, "close_per_cpu_s", hpy)
        if per_cpu is not None:
            out.append(("for information: compiled ÷ pure-Python core, Connection: close conn per "
                        "proxy CPU-s (1 worker)", f"{per_cpu:.2f}×", "not box-capped"))
    for p, d in res.idle.items():
        if p.startswith("hotproxy"):
            check(f"{p}: RSS per idle proxied connection ≤ 8 KiB ({d['idle_conns']:.0f} conns)",
                  d["idle_rss_per_conn_kib"], lambda v: v <= 8.0, "{:.2f} KiB")
    return out


def at_least(limit: float) -> Callable[[float], bool]:
    """A check that a ratio reaches *limit*."""
    return lambda v: v >= limit


#: wall-clock bound of one micro-benchmark file in the full run
MICRO_FILE_TIMEOUT = 120.0


def run_micro(tmp: Path, notes: list[str]) -> str | None:
    """Run the pytest-benchmark micro-benchmarks (each ``bench/test_*.py``
    on its own, each test bounded by pytest-timeout, so one that hangs costs
    only itself) and return a markdown table of medians, compiled core vs
    pure-Python core; None if pytest-benchmark is not installed."""
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        notes.append("pytest-benchmark not installed (pip install '.[test]'): no micro-benchmarks")
        return None
    rows: dict[str, dict[str, float]] = {}
    for test_file in sorted(HERE.glob("test_*.py")):
        out_json = tmp / f"micro-{test_file.stem}.json"
        # A hard wall-clock bound per file, killing the whole process group:
        # a benchmark stuck inside the event loop's epoll_wait is out of
        # pytest-timeout's reach.
        proc = subprocess.Popen([sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider",
                                 "--timeout=60", "--benchmark-max-time=0.2", f"--benchmark-json={out_json}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=MICRO_FILE_TIMEOUT)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            notes.append(f"micro-benchmarks in {test_file.name} did not finish within "
                         f"{MICRO_FILE_TIMEOUT:.0f} s and were stopped: no figures from it")
            continue
        try:
            data = json.loads(out_json.read_text())
        except (OSError, ValueError) as exc:
            notes.append(f"micro-benchmarks in {test_file.name} gave no results ({type(exc).__name__})")
            continue
        if proc.returncode != 0:
            last = stdout.strip().splitlines()[-1:] or ["?"]
            notes.append(f"micro-benchmarks in {test_file.name}: pytest exited {proc.returncode} ({last[0]})")
        for b in data.get("benchmarks", []):
            params = dict(b.get("params") or {})
            core_name = params.pop("core_name", "compiled")
            label = b.get("group") or b["name"].split("[")[0]
            if params:
                label += " [" + ", ".join(f"{k}={v}" for k, v in params.items()) + "]"
            rows.setdefault(label, {})[core_name] = b["stats"]["median"]
    if not rows:
        return None
    lines = ["| micro-benchmark | compiled core µs | pure-Python core µs | compiled speed-up |",
             "|---|---|---|---|"]
    for label, by_core in rows.items():
        c, py = by_core.get("compiled"), by_core.get("python")
        speed = f"{py / c:.2f}×" if c and py else "—"
        lines.append(f"| {label} | {fmt_num(c * 1e6) if c else '—'} | {fmt_num(py * 1e6) if py else '—'} | {speed} |")
    return "\n".join(lines)


def tool_versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            text = (out.stdout or out.stderr).strip().splitlines()
            return text[0] if text else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
    import platform
    v = {"python": platform.python_version(), "kernel": platform.release()}
    try:
        import uvloop
        v["uvloop"] = uvloop.__version__
    except ImportError:
        v["uvloop"] = "not installed"
    try:
        import hotproxy
        from hotproxy import core
        v["hotproxy"] = f"{hotproxy.__version__} (compiled core available: {core.COMPILED_AVAILABLE})"
    except ImportError:
        v["hotproxy"] = "not importable"
    try:
        v["hotproxy git"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    for tool, argv in (("wrk", ["wrk", "--version"]), ("haproxy", ["haproxy", "-v"]),
                       ("nginx", ["nginx", "-v"]), ("iperf3", ["iperf3", "--version"])):
        if not shutil.which(tool):
            v[tool] = "not installed"
            continue
        # "wrk debian/4.1.0-3+b2 [epoll] Copyright ..." -> "debian/4.1.0-3+b2"
        m = re.search(r"(?:version|wrk|iperf)[ /:]*v?(\S*\d\S*)", first(argv), re.I)
        v[tool] = m.group(1) if m else first(argv)
    return v


# -- the run ----------------------------------------------------------------------------


def rotate(xs: list[Any], k: int) -> list[Any]:
    k %= max(1, len(xs))
    return xs[k:] + xs[:k]


def make_hotproxy(index: int, *, tmp: Path, core: str, workers: int, send_proxy: str = "",
                  metrics: bool = False, sni: bool = False) -> Proxy:
    return Hotproxy(index, tmp, core, workers, send_proxy, metrics, sni)


def tls_backend_missing(args: argparse.Namespace) -> str:
    """Why the ``-sni`` rows cannot run here ("": they can): they need the nginx
    backend (its TLS port), wrk (HTTPS) and the ``openssl`` CLI (the certificate)."""
    if shutil.which("nginx") is None or args.no_nginx or args.builtin_backend:
        return "needs the nginx backend (its TLS port)"
    if shutil.which("wrk") is None or args.no_wrk:
        return "needs wrk (HTTPS with a server name)"
    if shutil.which("openssl") is None:
        return "needs the openssl CLI (the backend's certificate)"
    return ""


def build_proxies(args: argparse.Namespace, tmp: Path, notes: list[str]) -> list[Proxy]:
    """The proxies asked for that can run here; *notes* says why others are skipped."""
    wanted = [w.strip() for w in args.proxies.split(",")] if args.proxies else None
    have_haproxy = shutil.which("haproxy") is not None and not args.no_haproxy
    have_nginx = (shutil.which("nginx") is not None and not args.no_nginx
                  and Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists())
    hp_ok, hp_why = hotproxy_status(tmp)
    from_cores = []
    try:
        from hotproxy import core as hcore
        from_cores = ["compiled", "python"] if hcore.COMPILED_AVAILABLE else ["python"]
        if not hcore.COMPILED_AVAILABLE:
            notes.append("hotproxy's compiled core is not built: only the pure-Python core is measured")
    except ImportError:
        pass
    n = args.workers or NCPU
    candidates: list[tuple[str, Callable[[int], Proxy] | None, str]] = [
        ("direct", lambda i: Direct(i, tmp), ""),
        ("haproxy", (lambda i: HAProxy(i, tmp, False)) if have_haproxy else None,
         "HAProxy not installed (apt-get install haproxy)"),
        ("haproxy-tuned", (lambda i: HAProxy(i, tmp, True)) if have_haproxy else None,
         "HAProxy not installed (apt-get install haproxy)"),
        # the A/A control: the "haproxy" baseline once more, as a proxy under
        # test -- its ratio to "haproxy" is what the machine's noise alone makes
        (CONTROL, (lambda i: HAProxy(i, tmp, False, CONTROL)) if have_haproxy else None,
         "HAProxy not installed (apt-get install haproxy)"),
        ("nginx-stream", (lambda i: NginxStream(i, tmp)) if have_nginx else None,
         "nginx with the stream module not installed (apt-get install nginx libnginx-mod-stream)"),
        ("plain-uvloop", lambda i: PlainProxy(i, tmp), ""),
    ]
    for core_name in from_cores:
        tag = "c" if core_name == "compiled" else "py"
        counts = [1] if core_name == "python" else sorted({1, n})
        for w in counts:
            candidates.append((f"hotproxy-{tag}-{w}w",
                               functools.partial(make_hotproxy, tmp=tmp, core=core_name, workers=w)
                               if hp_ok else None,
                               f"hotproxy cannot run: {hp_why}"))
    # send_proxy = "v2" vs HAProxy send-proxy-v2: the nginx backend has a PROXY protocol port
    have_pp = have_nginx and not args.builtin_backend
    pp_why = "needs the nginx backend (its PROXY protocol port)"
    candidates.append(("haproxy-pp2", (lambda i: HAProxy(i, tmp, False, send_proxy=True))
                       if have_haproxy and have_pp else None,
                       pp_why if have_haproxy else "HAProxy not installed (apt-get install haproxy)"))
    if "compiled" in from_cores:
        candidates.append(("hotproxy-c-1w-pp2",
                           functools.partial(make_hotproxy, tmp=tmp, core="compiled", workers=1, send_proxy="v2")
                           if hp_ok and have_pp else None,
                           pp_why if hp_ok else f"hotproxy cannot run: {hp_why}"))
    # SNI routing vs HAProxy req.ssl_sni: the nginx backend's TLS port, wrk for HTTPS, openssl for its certificate
    sni_why = tls_backend_missing(args)
    candidates.append(("direct-tls", (lambda i: DirectTls(i, tmp)) if not sni_why else None, sni_why))
    candidates.append(("haproxy-sni", (lambda i: HAProxy(i, tmp, False, sni=True))
                       if have_haproxy and not sni_why else None,
                       sni_why or "HAProxy not installed (apt-get install haproxy)"))
    # the A/A control of the SNI rows: haproxy-sni once more
    candidates.append((SNI_CONTROL, (lambda i: HAProxy(i, tmp, False, SNI_CONTROL, sni=True))
                       if have_haproxy and not sni_why else None,
                       sni_why or "HAProxy not installed (apt-get install haproxy)"))
    if "compiled" in from_cores:
        candidates.append(("hotproxy-c-1w-sni",
                           functools.partial(make_hotproxy, tmp=tmp, core="compiled", workers=1, sni=True)
                           if hp_ok and not sni_why else None,
                           sni_why or f"hotproxy cannot run: {hp_why}"))
    if "compiled" in from_cores:
        # the Prometheus endpoint on and scraped, beside the same proxy without it
        candidates.append(("hotproxy-c-1w-metrics",
                           functools.partial(make_hotproxy, tmp=tmp, core="compiled", workers=1, metrics=True)
                           if hp_ok else None, f"hotproxy cannot run: {hp_why}"))
    proxies: list[Proxy] = []
    for i, (name, make, why) in enumerate(candidates):
        if wanted is not None and not any(name == w or name.startswith(w) for w in wanted):
            continue
        if make is None:
            notes.append(f"skipped {name}: {why}")
            continue
        proxies.append(make(i))
    for port in (*BACKEND_PORTS, PP_BACKEND_PORT, TLS_BACKEND_PORT, IPERF_PORT):
        # a stray server here would answer in the backend's place
        if not port_free(port):
            raise SystemExit(f"port {HOST}:{port} (for the backends) is in use: stop whatever holds it")
    for p in proxies:
        for port in {p.port, p.iperf_port}:
            if not isinstance(p, Direct) and not port_free(port):
                raise SystemExit(f"port {HOST}:{port} (for {p.name}) is in use: stop whatever holds it")
    return proxies


def bytecode_caches() -> list[str]:
    """Write hotproxy's bytecode caches, as ``pip install`` of a wheel does; the note to print.

    An editable install has none, and with ``PYTHONDONTWRITEBYTECODE=1`` (set
    on this machine) none is ever written: every hotproxy process -- each
    worker, each new master of the upgrade row -- would compile every module
    again (about half of an upgrade's time here, and most of its CPU).
    Compiled once here, every process reads them, whatever that variable says."""
    import compileall

    try:
        import hotproxy
    except ImportError:
        return []
    where = os.path.dirname(hotproxy.__file__)
    if not compileall.compile_dir(where, quiet=1):
        return [f"hotproxy's bytecode caches could not all be written in {where}: its processes compile "
                "what is missing at each start"]
    return []


def run(args: argparse.Namespace, s: Settings) -> str:
    """Run everything; return the markdown report."""
    notes: list[str] = bytecode_caches()
    versions = tool_versions()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hotproxy-bench-") as tmpname:
        tmp = Path(tmpname)
        use_wrk = shutil.which("wrk") is not None and not args.no_wrk
        if not use_wrk:
            notes.append("wrk not installed (apt-get install wrk): the built-in Python load generator "
                         "is used, so every proxy's figures are compressed toward the generator's limit")
        driver = Driver(use_wrk, s.wrk_threads)
        have_nginx = shutil.which("nginx") is not None and not args.no_nginx
        backend = Backend(tmp, use_nginx=have_nginx and not args.builtin_backend,
                          tls=not tls_backend_missing(args))
        if use_wrk:
            driver.tls_script(tmp)
        if not have_nginx:
            notes.append("nginx not installed: the backend is bench/backend.py (uvloop)")
        have_iperf = shutil.which("iperf3") is not None and not args.no_iperf and "iperf3" in s.scenarios
        if shutil.which("iperf3") is None and "iperf3" in s.scenarios:
            notes.append("iperf3 not installed (apt-get install iperf3): no iperf3 column")
        proxies = build_proxies(args, tmp, notes)
        for n in notes:
            log(n)
        res = Results()
        iperf: Proc | None = None
        try:
            backend.start()
            log(f"backend: {backend.kind} on ports {BACKEND_PORTS}; load: {driver.name}")
            if have_iperf:
                iperf = Proc("iperf3 server", ["iperf3", "-s", "-B", HOST, "-p", str(IPERF_PORT)],
                             logfile=tmp / "iperf3.log")
                wait_port(IPERF_PORT, proc=iperf)
            steady_scen = [x for x in STEADY_SCENARIOS if x in s.scenarios
                           and (x != "iperf3" or have_iperf)]
            # Every proxy runs at once (each on its own ports; an idle one
            # costs nothing), and each scenario goes through all of them back
            # to back: a ratio then pairs runs seconds apart, not minutes.
            live = start_all(proxies, driver, s, notes)
            rnd = 0
            redo_left = s.rounds    # extra rounds allowed, over the whole run
            res.max_steal = s.max_steal
            while steady_scen and rnd < s.rounds:
                figures: dict[str, dict[str, float]] = {p.name: {} for p in live}
                background = background_cpu()
                log(f"round {rnd + 1}/{s.rounds}: background CPU use {background:.0f}% of one CPU")
                _, t0, st0 = machine_cpu()
                for scen in steady_scen:
                    for proxy in rotate(live, rnd):
                        try:
                            if proxy.proc is not None and not proxy.alive():
                                raise RuntimeError("the proxy is not running")
                            f = measure_scenario(proxy, driver, s, scen)
                        except Exception as exc:  # noqa: BLE001 - one proxy failing must not stop the run
                            fail(proxy, f"round {rnd + 1} {scen}", exc, notes)
                            continue
                        figures[proxy.name].update(f)
                        log(f"  {scen:9} {proxy.name:15} " + ", ".join(f"{k}={v:.4g}" for k, v in f.items()))
                for f in figures.values():
                    f["errors"] = sum(f.get(k, 0) for k in ("ka_errors", "close_errors", "bulk_errors"))
                _, t1, st1 = machine_cpu()
                steal = pct_of_one_cpu(st1 - st0, t1 - t0)
                # A round during which the hypervisor ran others on our
                # CPUs pairs runs that had different machines: measure
                # it again (at most as many extra rounds as rounds).
                if steal > s.max_steal and redo_left > 0:
                    redo_left -= 1
                    res.redone.append((rnd + 1, steal))
                    log(f"round {rnd + 1}: {steal:.0f}% of one CPU stolen by the hypervisor "
                        f"(limit {s.max_steal:g}%): measuring it again")
                    continue
                log(f"round {rnd + 1}: {steal:.0f}% of one CPU stolen by the hypervisor")
                res.background.append(background)
                res.steal.append(steal)
                res.rounds.append(figures)
                rnd += 1
            if "idle" in args.extra and s.idle_connections:
                for proxy in live:
                    if (isinstance(proxy, Direct) or proxy.name in (CONTROL, SNI_CONTROL) or proxy.sni is not None
                            or not proxy.alive()):
                        continue
                    log(f"idle connections: {proxy.name}")
                    try:
                        res.idle[proxy.name] = measure_idle(proxy, idle_count(s.idle_connections))
                    except Exception as exc:  # noqa: BLE001
                        fail(proxy, "idle connections", exc, notes)
            if args.profile:
                res.profiles = profile_runs(live, driver, s, Path(args.profile), notes)
            if "reload" in s.scenarios:
                reloadable = [p for p in live if p.can_reload and reload_wanted(p, args)]
                for interval in s.reload_intervals:
                    for rnd in range(s.reload_rounds):
                        for proxy in rotate(reloadable, rnd):
                            log(f"reload every {interval:g}s, round {rnd + 1}/{s.reload_rounds}: {proxy.name}")
                            try:
                                if not proxy.alive():
                                    raise RuntimeError("the proxy is not running")
                                o = measure_reload(proxy, driver, s, interval)
                                if o.steal_pct > s.max_steal:
                                    # steady and during had different machines: once more
                                    log(f"  {o.steal_pct:.0f}% of one CPU stolen by the hypervisor: "
                                        "measuring it again")
                                    res.redone.append((-1, o.steal_pct))
                                    o = measure_reload(proxy, driver, s, interval)
                                res.reload.setdefault((proxy.name, interval), []).append(o)
                                log(f"  reloads={o.reloads} errors={o.during.errors} "
                                    f"tput={o.during.rps / max(1.0, o.steady.rps):.3f} "
                                    f"p99={o.during.p99_us / max(1.0, o.steady.p99_us):.2f} "
                                    f"lat={o.latencies_ms[:5]} fails={o.failures[:2]}")
                            except Exception as exc:  # noqa: BLE001
                                fail(proxy, f"reload {interval:g}s round {rnd + 1}", exc, notes)
            if "upgrade" in s.scenarios:
                # last: an upgraded proxy's processes are no longer the ones started above
                try:
                    live = upgradable(live, tmp)
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"upgrade row: nginx as a daemon could not start: {exc}")
                    live = [p for p in live if not isinstance(p, NginxStream)]
                started_here = [p for p in live if isinstance(p, NginxUpgrade)]
                try:
                    upgrade_row(live, driver, s, args, res, notes, tmp)
                finally:
                    for p in started_here:
                        p.stop()
        finally:
            for p in proxies:
                p.stop()
                if isinstance(p, Hotproxy) and p.metrics:
                    notes.append(f"{p.name}: /metrics scraped every {METRICS_INTERVAL:g} s while it ran: "
                                 f"{p.scrapes} answered, {p.scrape_errors} failed")
            if iperf is not None:
                iperf.stop()
            backend.stop()
            Proc.stop_all()
            if args.keep_logs:
                keep_logs(tmp, Path(args.keep_logs))
        load_after = os.getloadavg()
        if "micro" in args.extra:
            log("micro-benchmarks (pytest bench/)")
            res.micro = run_micro(tmp, notes)
    return report(args, s, res, [p.name for p in proxies], notes, versions, backend.kind,
                  driver.name, load_before, load_after)


def profile_runs(proxies: list[Proxy], driver: Driver, s: Settings, dest: Path,
                 notes: list[str]) -> list[tuple[str, str, list[str]]]:
    """Run keep-alive and Connection: close once more on each 1-worker
    hotproxy under ``perf record`` (its whole process tree); keep the data and
    a flat report in *dest*; return (proxy, scenario, top lines).  The
    profiled runs are not part of the table: perf perturbs them."""
    if shutil.which("perf") is None:
        notes.append("--profile: perf is not installed (apt-get install linux-perf): no profiles")
        return []
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for proxy in proxies:
        if not (isinstance(proxy, Hotproxy) and proxy.workers == 1) or not proxy.alive():
            continue
        for scen in ("keepalive", "close"):
            assert proxy.pid is not None
            pids = ",".join(str(p) for p in process_tree(proxy.pid))
            data = dest / f"{proxy.name}-{scen}.perf.data"
            log(f"profiling {proxy.name} {scen} (perf record -p {pids})")
            perf = Proc("perf record", ["perf", "record", "-F", "999", "-g", "-p", pids, "-o", str(data)],
                        logfile=dest / "perf.log")
            try:
                time.sleep(0.5)        # perf attached before the load starts
                measure_scenario(proxy, driver, s, scen)
            except Exception as exc:  # noqa: BLE001
                fail(proxy, f"profile {scen}", exc, notes)
            finally:
                try:
                    os.kill(perf.pid, signal.SIGINT)   # perf writes its data on SIGINT
                    perf.popen.wait(30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
                perf.stop()
            reports = {}
            for sort in ("dso", "dso,sym"):
                try:
                    reports[sort] = subprocess.run(
                        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
                         "--sort", sort, "--percent-limit", "0.5"],
                        capture_output=True, text=True, timeout=300).stdout
                except subprocess.TimeoutExpired:
                    reports[sort] = ""
            (dest / f"{proxy.name}-{scen}.txt").write_text(reports["dso"] + "\n" + reports["dso,sym"])

            def top(text: str, n: int) -> list[str]:
                return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")][:n]
            # by library first (kernel vs interpreter vs compiled core vs uvloop),
            # then the hottest symbols
            out.append((proxy.name, scen, top(reports["dso"], 8) + ["..."] + top(reports["dso,sym"], 10)))
    return out


def start_all(proxies: list[Proxy], driver: Driver, s: Settings, notes: list[str]) -> list[Proxy]:
    """Start every proxy and warm it up; return those that run."""
    live = []
    for proxy in proxies:
        log(f"starting {proxy.name}")
        try:
            proxy.start()
            if s.warmup:
                driver.run(proxy.port, "/small", s.connections, s.warmup, sni=proxy.sni)
        except Exception as exc:  # noqa: BLE001 - a proxy that cannot start is reported, not fatal
            fail(proxy, "start", exc, notes)
            proxy.stop()
            continue
        live.append(proxy)
    return live


def fail(proxy: Proxy, what: str, exc: BaseException, notes: list[str]) -> None:
    """Log and note a failure, quoting the proxy's log."""
    tail = proxy.log_tail()
    log(f"  {proxy.name} failed ({what}): {exc}; its log: {tail}")
    notes.append(f"{what}: {proxy.name} failed: {exc}" + (f" (its log: `{tail}`)" if tail else ""))


def keep_logs(tmp: Path, dest: Path) -> None:
    """Copy every config and log of the run to *dest* (sockets and the
    backend's files are left out)."""
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink() and f.suffix in (".log", ".cfg", ".conf", ".toml", "") \
                and "www" not in f.parts and f.stat().st_size < (16 << 20):
            target = dest / f.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    log(f"logs and configs kept in {dest}")


def idle_count(wanted: int) -> int:
    """Idle connections we can hold: each needs a client fd here, two in the
    proxy (client + upstream side) and one in the backend."""
    return max(100, min(wanted, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 300) // 2))


def reload_wanted(p: Proxy, args: argparse.Namespace) -> bool:
    """By default the reload scenario runs on the production set-up of each
    proxy: hotproxy compiled with N workers, HAProxy default, nginx."""
    if args.reload_proxies:
        return any(p.name == w or p.name.startswith(w) for w in args.reload_proxies.split(","))
    if isinstance(p, Hotproxy):
        return p.core == "compiled" and p.workers == (args.workers or NCPU)
    return p.name in ("haproxy", "nginx-stream")


def report(args: argparse.Namespace, s: Settings, res: Results, names: list[str], notes: list[str],
           versions: dict[str, str], backend: str, driver: str,
           load_before: tuple[float, float, float], load_after: tuple[float, float, float]) -> str:
    haproxy = "haproxy" if "haproxy" in names else None
    out = []
    out.append(f"Command: `{' '.join(['python', 'bench/load.py'] + sys.argv[1:])}`  ")
    out.append(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {NCPU} CPUs, "
               f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after  ")
    threads = f", {s.wrk_threads} wrk thread(s)" if driver == "wrk" else ""
    out.append(f"Backend: {backend}; load: {driver}, {s.connections} connections "
               f"({s.bulk_connections} for 1 MiB responses){threads}; "
               f"{len(res.rounds)} rounds of {s.duration:g} s per scenario, medians of per-round ratios.")
    out.append("")
    out.append("Tools: " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    out.append("")
    if res.rounds:
        out.append("### Steady load")
        out.append("")
        out.append("Each cell: median value · ratio to HAProxy (1 thread, default settings) `H` · "
                   "ratio to no proxy `D`.  For latency a lower ratio is better; for everything else "
                   "higher.  CPU % is of one CPU (200 = both cores).")
        out.append("")
        plain = [n for n in names if not is_sni_row(n)]
        if plain:
            out.append(main_table(res, plain, haproxy))
            out.append("")
        sni_rows = [n for n in names if is_sni_row(n)]
        if sni_rows:
            out.append("### SNI routing vs HAProxy (`req.ssl_sni`)")
            out.append("")
            out.append(f"HTTPS through the proxy to nginx's TLS port, routed by the server name wrk sends "
                       f"(`{SNI_NAME}`), TLS not terminated: hotproxy `sni_routes` (that name only, no default "
                       "group) vs HAProxy `mode tcp` with `tcp-request inspect-delay 5s`, `tcp-request content "
                       "accept if { req.ssl_hello_type 1 }` and `use_backend ... if { req.ssl_sni -i NAME }`.  "
                       "Keep-alive: one handshake per connection; close: one per request.  `H` here is "
                       f"`haproxy-sni`, `D` is `direct-tls` (wrk to nginx's TLS port); `{SNI_CONTROL}` is "
                       "this table's A/A control.")
            out.append("")
            out.append(main_table(res, sni_rows, "haproxy-sni" if "haproxy-sni" in sni_rows else None,
                                  direct="direct-tls", columns=SNI_COLUMNS))
            out.append("")
        noisy = [f"{p} keep-alive req/s {res.spread(p, 'ka_rps'):.0f}%" for p in ("direct", "haproxy")
                 if res.spread(p, "ka_rps") is not None]
        noisy += [f"{p} close req/s {res.spread(p, 'close_rps'):.0f}%" for p in ("direct", "haproxy")
                  if res.spread(p, "close_rps") is not None]
        if res.background:
            noisy.append("CPU taken by others on the machine, sampled 1 s before each round: "
                         + ", ".join(f"{b:.0f}%" for b in res.background) + " of one CPU")
        if res.steal:
            noisy.append("CPU stolen by the hypervisor during each round: "
                         + ", ".join(f"{b:.0f}%" for b in res.steal) + " of one CPU")
        redone = [(r, x) for r, x in res.redone if r > 0]
        if redone:
            noisy.append(f"rounds measured again because more than {res.max_steal:g}% of one CPU was "
                         "stolen: " + ", ".join(f"round {r} ({x:.0f}%)" for r, x in redone))
        if noisy:
            out.append("Noise: spread (max − min) ÷ median of the baselines over the rounds: "
                       + "; ".join(noisy) + ".")
            out.append("")
    if res.reload:
        out.append("### Reload under `Connection: close` load")
        out.append("")
        out.append(f"Each run: {s.reload_duration:g} s steady, {s.reload_duration:g} s with reloads, "
                   f"{s.reload_duration:g} s steady again (the two steady runs are averaged), "
                   f"{s.reload_rounds} rounds; configs alternate between one upstream with round-robin "
                   "and two upstreams with least-connections.  Errors are wrk's socket errors plus "
                   "non-2xx answers, summed over the rounds; latency is hotproxy's own `reload ok ... "
                   "in X ms` (signal → every worker committed).  A run during which the hypervisor "
                   f"stole more than {res.max_steal:g}% of one CPU is measured once more "
                   f"({sum(1 for r, _ in res.redone if r < 0)} in this report).")
        out.append("")
        out.append(reload_table(res))
        out.append("")
    if res.upgrade:
        out.append("### Upgrade under `Connection: close` load")
        out.append("")
        out.append(f"Each run: {s.reload_duration:g} s steady, {s.reload_duration:g} s while the proxy "
                   f"replaces its own program every {UPGRADE_INTERVAL:g} s (the next one starts when the "
                   f"last has ended, if later; at most {int(s.reload_duration / UPGRADE_INTERVAL) + 1}), "
                   f"{s.reload_duration:g} s steady again (averaged with the first), {s.reload_rounds} "
                   "rounds, the same config throughout.  Errors are wrk's socket errors (connect = "
                   "refused) plus non-2xx answers.  \"Until the new one serves\": `hotproxy upgrade`'s "
                   "wall time (it returns when every new worker serves); HAProxy: `SIGUSR2` → "
                   "`Loading success` in the master's log; nginx: `USR2` → the new master's pidfile.")
        out.append("")
        out.append(upgrade_table(res))
        out.append("")
    if res.idle:
        out.append("### Memory: idle proxied connections")
        out.append("")
        out.append(idle_table(res))
        out.append("")
    if res.micro:
        out.append("### Micro-benchmarks (pytest-benchmark, medians)")
        out.append("")
        out.append("Operations marked x1000 are timed 1,000 at a time.")
        out.append("")
        out.append(res.micro)
        out.append("")
    if res.profiles:
        out.append("### Where the time goes (perf, self time by library and symbol)")
        out.append("")
        out.append(f"One extra run of each scenario under `perf record -g` of the proxy's processes; "
                   f"full reports in `{args.profile}`.")
        out.append("")
        for name, scen, top in res.profiles:
            out.append(f"{name}, {scen}:")
            out.append("")
            out.append("```")
            out.extend(top)
            out.append("```")
            out.append("")
    tg = targets(res, names)
    if tg:
        out.append("### Issue 6 targets")
        out.append("")
        out.append("Measured: the median (over the rounds; for reload latency over every reload), then "
                   "in brackets the lowest and highest round.  \"Within the rounds' range\": some rounds "
                   "met the target and some did not, so on this shared machine the status can flip "
                   "from one run to the next.")
        out.append("")
        out.append("| target | measured | status |")
        out.append("|---|---|---|")
        out.extend(f"| {a} | {b} | {c} |" for a, b, c in tg)
        out.append("")
    if notes:
        out.append("### Notes")
        out.append("")
        out.extend(f"- {n}" for n in notes)
        out.append("")
    return "\n".join(out)


RESULTS_HEADER = """# hotproxy benchmark results

Generated by `bench/load.py --write-results bench/RESULTS.md` (everything
between the markers below is rewritten by each run; edit outside them).
"""
BEGIN, END = "<!-- BEGIN load.py -->", "<!-- END load.py -->"


def write_results(path: Path, body: str) -> None:
    """Replace the generated part of *path*, keeping any hand-written text around it."""
    text = path.read_text() if path.exists() else RESULTS_HEADER + f"\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    pre, rest = text.split(BEGIN, 1)
    _, post = rest.split(END, 1)
    path.write_text(f"{pre}{BEGIN}\n{body}\n{END}{post}")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    ap = argparse.ArgumentParser(description="hotproxy side by side with HAProxy, nginx and plain "
                                             "uvloop, on 127.0.0.1.")
    ap.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (1 round, short runs)")
    ap.add_argument("--rounds", type=int, help="rounds of the steady scenarios (default 5)")
    ap.add_argument("--duration", type=float, help="seconds per load run (default 3)")
    ap.add_argument("--max-steal", type=float,
                    help="measure a steady round (or a reload run) again when the hypervisor stole "
                         "more than this %% of one CPU during it (default 10; steady: at most as many "
                         "extra rounds as rounds; reload: once)")
    ap.add_argument("--reload-duration", type=float, help="seconds steady and during reloads (default 6)")
    ap.add_argument("--reload-rounds", type=int, help="rounds of the reload scenario (default 3)")
    ap.add_argument("-c", "--connections", type=int, default=50)
    ap.add_argument("--scenarios", default=None,
                    help="comma list of keepalive,close,bulk,iperf3,reload,upgrade (default: all)")
    ap.add_argument("--proxies", default=None,
                    help="comma list of names or prefixes: direct,haproxy,haproxy-tuned,"
                         "direct-tls,haproxy-sni,haproxy-sni-again,hotproxy-c-1w-sni (the SNI rows),"
                         "haproxy-again (the A/A control),nginx-stream,plain-uvloop,"
                         "hotproxy-c-1w,hotproxy-c-2w,hotproxy-py-1w (default: all)")
    ap.add_argument("--reload-proxies", default=None,
                    help="which proxies to reload and upgrade (default: hotproxy-c-Nw, haproxy, nginx-stream)")
    ap.add_argument("--workers", type=int, default=None, help="N for hotproxy with N workers (default: CPUs)")
    ap.add_argument("--storm", action="store_true", help="also reload every 0.05 s (a reload storm)")
    ap.add_argument("--storm-interval", type=float, default=0.05)
    ap.add_argument("--idle", type=int, default=None,
                    help="also measure RSS per idle proxied connection with this many (full run: 10000)")
    ap.add_argument("--no-wrk", action="store_true", help="use the built-in load generator")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--no-nginx", action="store_true", help="skip nginx (also as the backend)")
    ap.add_argument("--no-iperf", action="store_true")
    ap.add_argument("--builtin-backend", action="store_true", help="bench/backend.py even if nginx is installed")
    ap.add_argument("--write-results", metavar="PATH", help="also write the report into PATH (RESULTS.md)")
    ap.add_argument("--profile", metavar="DIR",
                    help="also profile hotproxy (1 worker) with perf under keep-alive and close load; "
                         "reports go to DIR and a summary into the report")
    ap.add_argument("--no-micro", action="store_true",
                    help="skip the micro-benchmarks the full run adds to the report")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the proxies' configs and logs to DIR at the end")
    args = ap.parse_args(argv)
    s = Settings(connections=args.connections)
    args.extra = set()
    if args.quick:
        s.rounds, s.duration, s.reload_duration, s.reload_rounds, s.warmup = 1, 1.0, 2.0, 1, 0.0
        s.idle_connections = 0
    else:
        s.idle_connections = 10000
        args.extra.update(("idle", "micro"))
    if args.no_micro:
        args.extra.discard("micro")
    if args.idle is not None:
        s.idle_connections = args.idle
        if args.idle:
            args.extra.add("idle")
        else:
            args.extra.discard("idle")
    if args.rounds is not None:
        s.rounds = args.rounds
    if args.duration is not None:
        s.duration = args.duration
    if args.max_steal is not None:
        s.max_steal = args.max_steal
    if args.reload_duration is not None:
        s.reload_duration = args.reload_duration
    if args.reload_rounds is not None:
        s.reload_rounds = args.reload_rounds
    all_scen = ("keepalive", "close", "bulk", "iperf3", "reload", "upgrade")
    s.scenarios = tuple(x.strip() for x in args.scenarios.split(",")) if args.scenarios else all_scen
    bad = [x for x in s.scenarios if x not in all_scen]
    if bad:
        ap.error(f"unknown scenario(s) {bad}: expected some of {','.join(all_scen)}")
    s.reload_intervals = (0.5, args.storm_interval) if args.storm else (0.5,)
    # hard bounds, whatever the options say
    s.duration = min(max(s.duration, 0.5), 120.0)
    s.reload_duration = min(max(s.reload_duration, 1.0), 120.0)
    return args, s


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, print the report, optionally write RESULTS.md."""
    args, s = parse_args(argv)
    raise_nofile()

    # SIGTERM (and SIGHUP from a closing terminal) unwind like Ctrl-C, so the
    # finally-blocks stop every process this run started.
    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        body = run(args, s)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        Proc.stop_all()
    print(body)
    if args.write_results:
        write_results(Path(args.write_results), body)
        log(f"wrote {args.write_results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
