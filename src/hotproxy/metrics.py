"""The Prometheus endpoint: ``GET /metrics`` served by the master.

``[runtime] metrics = "127.0.0.1:9100"`` (or ``[::1]:9100``, ``unix:/path``)
turns it on.  Each scrape asks every worker for its counters at once -- the
same request ``hotproxy status`` makes, answered by the worker between two
turns of its loop, never behind a reload -- and renders what came back with
``prometheus_client``'s exposition (the Prometheus text format, or
OpenMetrics when the scraper's ``Accept`` asks for it).  A worker that does
not answer within ``SCRAPE_TIMEOUT`` is reported by ``hotproxy_worker_up 0``
and left out of the sums: a scrape is partial, never slow.

Rules of this module:

* Nothing here runs on the data path.  The counters are the ones the core
  keeps for ``status``; no per-connection Python metric object exists.
* Series are per instance, summed over the workers; the per-worker view of
  an upstream's health carries a ``worker`` label in a metric of its own.
* ``METRICS`` is the reference: every family the endpoint can emit, its
  type, labels and meaning.  The README's table is checked against it by
  the tests, and so is every scrape.
* The HTTP side is deliberately small: one request per connection, GET or
  HEAD, ``/metrics`` (and ``/`` with a link to it), a bounded request head
  read with a deadline, ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("hotproxy.metrics")

#: seconds a scrape waits for each worker's counters
SCRAPE_TIMEOUT = 1.0
#: the longest request head accepted, and how long a client may take to send it
MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0


@dataclass(frozen=True)
class MetricDoc:
    """One metric family: its Prometheus type, labels and meaning."""

    type: str
    labels: tuple[str, ...]
    help: str


S, U, W = ("service",), ("service", "upstream"), ("worker",)

#: every family ``/metrics`` emits (names without the ``_total`` suffix of counters)
METRICS: dict[str, MetricDoc] = {
    # per service, summed over the workers
    "hotproxy_service_connections": MetricDoc("counter", S, "connections accepted"),
    "hotproxy_service_connections_active": MetricDoc("gauge", S, "connections open now, every version"),
    "hotproxy_service_connections_refused": MetricDoc("counter", S, "connections refused by max_connections"),
    "hotproxy_service_no_upstream": MetricDoc("counter", S, "connections closed because no upstream could be reached"),
    "hotproxy_service_idle_closed": MetricDoc("counter", S, "connections closed by idle_timeout"),
    "hotproxy_service_proxy_header_errors": MetricDoc("counter", S, "connections closed for their PROXY "
                                                      "header (accept_proxy): malformed, oversized, slow, "
                                                      "or from a peer not in proxy_from"),
    "hotproxy_service_sni_errors": MetricDoc("counter", S, "connections closed for their TLS ClientHello "
                                             "(sni_routes): not TLS, malformed, oversized or slow"),
    "hotproxy_service_sni_no_route": MetricDoc("counter", S, "connections closed because their server name "
                                               "matched no sni_routes entry and there is no default"),
    "hotproxy_sni_route_connections": MetricDoc("counter", S + ("route",), "connections each sni_routes entry "
                                                "took, by route: its name (\"a.example\", \"*.example\"), "
                                                "or \"*\" for the default group (upstreams)"),
    "hotproxy_service_received_bytes": MetricDoc("counter", S, "bytes read from clients"),
    "hotproxy_service_sent_bytes": MetricDoc("counter", S, "bytes written to clients"),
    "hotproxy_service_connect_failures": MetricDoc("counter", S, "failed connects to upstreams"),
    "hotproxy_service_generation": MetricDoc("gauge", S, "the serving version's generation (highest over the workers)"),
    "hotproxy_service_old_versions": MetricDoc("gauge", S, "old versions still draining, summed over the workers"),
    "hotproxy_connection_duration_seconds": MetricDoc("histogram", S,
                                                      "how long the service's connections lasted, accept to close"),
    # per upstream of a proxy service
    "hotproxy_upstream_up": MetricDoc("gauge", U, "1 if the upstream may be picked: with health_check, its "
                                      "shared state is up; without, no worker has it ejected"),
    "hotproxy_health_checks": MetricDoc("counter", U + ("result",), "active health checks of the upstream, by "
                                        "result (ok, failed), run by the master once per instance"),
    "hotproxy_upstream_ejected_workers": MetricDoc("gauge", U, "workers on which the upstream is ejected now"),
    "hotproxy_upstream_worker_up": MetricDoc("gauge", U + W, "1 if this worker sends connections to the upstream"),
    "hotproxy_upstream_connections": MetricDoc("counter", U, "connections made to the upstream"),
    "hotproxy_upstream_connections_active": MetricDoc("gauge", U, "connections to the upstream open now"),
    "hotproxy_upstream_connect_failures": MetricDoc("counter", U, "failed connects to the upstream"),
    "hotproxy_upstream_received_bytes": MetricDoc("counter", U, "bytes read from the upstream"),
    "hotproxy_upstream_sent_bytes": MetricDoc("counter", U, "bytes written to the upstream"),
    "hotproxy_upstream_weight": MetricDoc("gauge", U, "the upstream's weight"),
    "hotproxy_upstream_backup": MetricDoc("gauge", U, "1 if the upstream is a backup, else 0"),
    "hotproxy_upstream_max_connections": MetricDoc("gauge", U, "the upstream's own max_connections (0: no limit)"),
    "hotproxy_upstream_ejections": MetricDoc("counter", U, "times a worker ejected the upstream after connect failures"),
    "hotproxy_upstream_connect_seconds": MetricDoc("histogram", U, "how long successful connects to the upstream took"),
    # the instance
    "hotproxy_reloads": MetricDoc("counter", ("result",), "reloads by result (ok, failed), the initial apply included"),
    "hotproxy_last_reload_timestamp_seconds": MetricDoc("gauge", (), "when the last reload was asked for"),
    "hotproxy_last_reload_duration_seconds": MetricDoc("gauge", (), "how long the last reload took"),
    "hotproxy_last_reload_success": MetricDoc("gauge", (), "1 if the last reload was applied"),
    "hotproxy_config_generation": MetricDoc("gauge", (), "reloads applied since start (the initial apply is 1)"),
    "hotproxy_config_info": MetricDoc("gauge", ("source", "digest"),
                                      "1, labelled with the config file and a digest of what runs"),
    "hotproxy_workers": MetricDoc("gauge", (), "worker processes configured"),
    "hotproxy_workers_alive": MetricDoc("gauge", (), "worker processes running"),
    "hotproxy_worker_up": MetricDoc("gauge", W, "1 if the worker answered this scrape"),
    "hotproxy_worker_restarts": MetricDoc("counter", (), "workers restarted by the master"),
    "hotproxy_process_cpu_seconds": MetricDoc("counter", ("process", "worker"),
                                              "CPU time of each hotproxy process (user + system)"),
    "hotproxy_process_resident_memory_bytes": MetricDoc("gauge", ("process", "worker"), "resident memory"),
    "hotproxy_process_open_fds": MetricDoc("gauge", ("process", "worker"), "open file descriptors"),
    "hotproxy_process_start_time_seconds": MetricDoc("gauge", ("process", "worker"), "process start, Unix time"),
}

#: proxy counter -> metric (the echo kind's ``bytes`` and ``accepted`` map the same way)
_SERVICE_COUNTERS = {
    "accepted": "hotproxy_service_connections",
    "refused": "hotproxy_service_connections_refused",
    "no_upstream": "hotproxy_service_no_upstream",
    "idle_closed": "hotproxy_service_idle_closed",
    "proxy_header_errors": "hotproxy_service_proxy_header_errors",
    "sni_errors": "hotproxy_service_sni_errors",
    "sni_no_route": "hotproxy_service_sni_no_route",
    "bytes_in": "hotproxy_service_received_bytes",
    "bytes_out": "hotproxy_service_sent_bytes",
    "connect_failures": "hotproxy_service_connect_failures",
}


class Snapshot:
    """What one scrape renders: the master's status and its workers' raw answers."""

    def __init__(self, status: dict[str, Any], workers: list[dict[str, Any]], reloads: dict[str, int],
                 digest: str, configured: int) -> None:
        self.status = status
        self.workers = workers
        self.reloads = reloads
        self.digest = digest
        self.configured = configured


def collect(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of *snap* (``prometheus_client`` collector protocol)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    families: dict[str, Any] = {}
    kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
    for name, doc in METRICS.items():
        families[name] = kinds[doc.type](name, doc.help, labels=list(doc.labels))

    def add(name: str, labels: tuple[str, ...], value: float) -> None:
        families[name].add_metric(list(labels), value)

    def add_histogram(name: str, labels: tuple[str, ...], h: dict[str, Any] | None) -> None:
        # the core's counts per bucket (not cumulative, the last above every
        # bound) as Prometheus buckets: cumulative, ending with +Inf
        if not h:
            return
        buckets, total = [], 0
        for bound, n in zip(list(h["bounds"]) + [float("inf")], h["counts"]):
            total += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        families[name].add_metric(list(labels), buckets, h["sum"])

    status = snap.status
    for svc in status["services"]:
        name = svc["name"]
        totals = svc.get("totals") or {}
        for key, metric in _SERVICE_COUNTERS.items():
            value = totals.get(key)
            if key == "bytes_in" and value is None:
                value = totals.get("bytes")      # an echo service: what it read is what it sent
            if key == "bytes_out" and value is None:
                value = totals.get("bytes")
            if value is not None:
                add(metric, (name,), value)
        add("hotproxy_service_connections_active", (name,), svc.get("active", 0))
        if svc.get("generation") is not None:
            add("hotproxy_service_generation", (name,), svc["generation"])
        add("hotproxy_service_old_versions", (name,), svc.get("old_versions", 0))
        add_histogram("hotproxy_connection_duration_seconds", (name,), totals.get("durations"))
        for route in svc.get("sni_routes") or ():
            # the master's per-route sums (``_sni_routes``); "*": the default group
            label = route["name"] if route.get("name") is not None else "*"
            add("hotproxy_sni_route_connections", (name, label), route.get("connections", 0))
        for addr, up in (svc.get("upstreams") or {}).items():
            labels = (name, addr)
            checked = up.get("health")
            if checked is not None:
                add("hotproxy_upstream_up", labels, 1 if checked["state"] == "up" else 0)
                add("hotproxy_health_checks", labels + ("ok",), checked["checks_ok"])
                add("hotproxy_health_checks", labels + ("failed",), checked["checks_failed"])
            else:
                add("hotproxy_upstream_up", labels, 0 if up["ejected_workers"] else 1)
            add("hotproxy_upstream_ejected_workers", labels, len(up["ejected_workers"]))
            for wid in sorted(up["workers"], key=int):
                worker_up = (checked["state"] == "up") if checked is not None else int(wid) not in up["ejected_workers"]
                add("hotproxy_upstream_worker_up", labels + (str(wid),), 1 if worker_up else 0)
            add("hotproxy_upstream_connections", labels, up["connections"])
            add("hotproxy_upstream_connections_active", labels, up["active"])
            add("hotproxy_upstream_connect_failures", labels, up["failures"])
            add("hotproxy_upstream_received_bytes", labels, up["bytes_out"])
            add("hotproxy_upstream_sent_bytes", labels, up["bytes_in"])
            add("hotproxy_upstream_ejections", labels, up.get("ejections", 0))
            add_histogram("hotproxy_upstream_connect_seconds", labels, up.get("connect_times"))
            if "weight" in up:   # (not for a removed upstream that still drains)
                add("hotproxy_upstream_weight", labels, up["weight"])
                add("hotproxy_upstream_backup", labels, 1 if up.get("backup") else 0)
                add("hotproxy_upstream_max_connections", labels, up.get("max_connections", 0))

    for result in ("ok", "failed"):
        add("hotproxy_reloads", (result,), snap.reloads.get(result, 0))
    last = status.get("last_reload")
    if last:
        add("hotproxy_last_reload_timestamp_seconds", (), last.get("at") or 0.0)
        add("hotproxy_last_reload_duration_seconds", (), (last.get("duration_ms") or 0.0) / 1000.0)
        add("hotproxy_last_reload_success", (), 1 if last.get("ok") else 0)
    add("hotproxy_config_generation", (), snap.reloads.get("ok", 0))
    add("hotproxy_config_info", (str(status.get("config")), snap.digest), 1)
    add("hotproxy_workers", (), snap.configured)
    add("hotproxy_workers_alive", (), sum(1 for w in snap.workers if w.get("alive")))
    add("hotproxy_worker_restarts", (), status.get("restarts", 0))
    for w in snap.workers:
        add("hotproxy_worker_up", (str(w["worker"]),), 1 if w.get("answering") else 0)

    processes = [("master", "", status["pid"])]
    processes += [("worker", str(w["worker"]), w["pid"]) for w in snap.workers if w.get("alive") and w.get("pid")]
    for kind, wid, pid in processes:
        proc = _proc_stats(pid)
        if proc is None:
            continue
        cpu, rss, fds, started = proc
        add("hotproxy_process_cpu_seconds", (kind, wid), cpu)
        add("hotproxy_process_resident_memory_bytes", (kind, wid), rss)
        if fds is not None:
            add("hotproxy_process_open_fds", (kind, wid), fds)
        add("hotproxy_process_start_time_seconds", (kind, wid), started)
    yield from families.values()


def config_digest(config: Any) -> str:
    """A short digest of what a config runs (services and runtime), for ``hotproxy_config_info``."""
    if config is None:
        return ""
    doc = {"runtime": repr(config.runtime),
           "services": {name: [svc.kind, svc.listen, sorted((k, repr(v)) for k, v in svc.options.items())]
                        for name, svc in config.services.items()}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _boot_time() -> float:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


_BOOT = _boot_time()


def _proc_stats(pid: int) -> tuple[float, int, int | None, float] | None:
    """(cpu seconds, rss bytes, open fds, start time) of *pid* from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    rss = int(fields[21]) * _PAGE
    started = _BOOT + int(fields[19]) / _CLK_TCK
    try:
        fds: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return cpu, rss, fds, started


# -- the HTTP endpoint -----------------------------------------------------------------


class MetricsServer:
    """Serves ``/metrics`` on *listener* (a ``ListenerFactory``) with snapshots from *snapshot*."""

    def __init__(self, listener: Any, snapshot: Callable[[], Awaitable[Snapshot]]) -> None:
        self.listener = listener
        self.snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None
        self._bound: Any = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and serve; raise ``OSError`` if the address cannot be had."""
        self._bound = await self.listener.make()
        self._bound.sock.listen(64)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Http(self), sock=self._bound.sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._bound is not None:
            self._bound.close()   # unlinks a Unix socket file that is still ours
            self._bound = None
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    def listening_socket(self) -> Any:
        """The listening socket (to hand to a new master on an upgrade), or None."""
        return self._bound.sock if self._bound is not None else None

    def hand_over(self) -> None:
        """Stop accepting, leaving the socket (and its file) to the new master
        that got it: it serves what queues meanwhile.  Scrapes accepted here
        are still answered; ``close()`` ends the rest."""
        if self._bound is not None:
            self._bound.own_file(None)
        if self._server is not None:
            self._server.close()   # (closes this process's copy of the socket)
            self._server = None

    async def render(self, accept: str) -> tuple[bytes, str]:
        """(body, content type) of one scrape."""
        from prometheus_client.exposition import choose_encoder

        snap = await self.snapshot()
        encoder, content_type = choose_encoder(accept)
        return encoder(_Registry(snap)), content_type


class _Registry:
    """The one-scrape registry ``prometheus_client``'s encoders read."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        return collect(self.snap)


class _Http(asyncio.Protocol):
    """One HTTP/1.x request per connection."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        if self.task is None and self.transport is not None:
            self._reply(408, "text/plain", b"request timeout\n")

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            end = self.buf.find(b"\n\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._reply(431, "text/plain", b"request head too large\n")
            return
        if self.timer is not None:
            self.timer.cancel()
        head = self.buf[:end].decode("latin-1")
        self.task = asyncio.get_running_loop().create_task(self._handle(head))
        self.server._clients.add(self.task)
        self.task.add_done_callback(self.server._clients.discard)

    async def _handle(self, head: str) -> None:
        lines = head.replace("\r\n", "\n").split("\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._reply(400, "text/plain", b"bad request\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        headers = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            self._reply(405, "text/plain", b"method not allowed\n", extra="Allow: GET, HEAD\r\n")
            return
        if target == "/":
            self._reply(200, "text/html", b'<html><body><a href="/metrics">/metrics</a></body></html>\n',
                        head_only=method == "HEAD")
            return
        if target != "/metrics":
            self._reply(404, "text/plain", b"not found: try /metrics\n")
            return
        try:
            body, content_type = await self.server.render(headers.get("accept", ""))
        except Exception:   # a bug must not take the endpoint down: say so, keep serving
            log.exception("metrics scrape failed")
            self._reply(500, "text/plain", b"scrape failed (see the hotproxy log)\n")
            return
        self._reply(200, content_type, body, head_only=method == "HEAD")

    def _reply(self, code: int, content_type: str, body: bytes, *, head_only: bool = False,
               extra: str = "") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  408: "Request Timeout", 431: "Request Header Fields Too Large",
                  500: "Internal Server Error"}[code]
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
        self.transport.write(head.encode("latin-1") + (b"" if head_only else body))
        self.transport.close()
        self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None
        if self.task is not None and not self.task.done():
            self.task.cancel()


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A text exposition as {sample name: {sorted labels: value}} (for tests and tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out

__all__ = ["METRICS", "MetricDoc", "MetricsServer", "SCRAPE_TIMEOUT", "Snapshot", "collect", "config_digest",
           "parse"]
