"""The master process: workers, the config, signals, the admin socket.

The master serves no traffic.  It starts the ``WorkerManager``, applies the
config through the same all-or-nothing path a reload uses, and then waits
for requests:

=========  ===================================================================
SIGHUP     reload the config file (a bad one is reported; the old keeps serving)
SIGTERM    graceful stop: stop accepting, drain within ``drain_timeout``, exit 0
SIGINT     the same (a second one stops at once)
SIGQUIT    fast stop: close every connection, exit 0
=========  ===================================================================

Signal handlers only schedule work on the loop (``loop.add_signal_handler``);
reloads run one at a time (see ``reload.Reloader``).  Exit codes: 0 after a
stop, 1 if the instance could not start (admin socket, pidfile, workers, or
the initial config could not be applied).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

from .admin import AdminError, AdminServer
from .config import Config, load_config
from .errors import HotproxyError
from .manager import WorkerManager
from .reload import ReloadReport, Reloader

log = logging.getLogger("hotproxy.master")

#: what the admin socket answers
ADMIN_COMMANDS = ("reload", "status", "stop")


class PidfileError(HotproxyError):
    """The pidfile names a live process, or cannot be written."""


class Master:
    """One hotproxy instance.  ``await Master(config).run()`` returns the exit code."""

    def __init__(self, config: Config, *, manager_options: dict[str, Any] | None = None) -> None:
        self.config = config
        #: None for the embedded default: a reload re-reads it (and changes nothing)
        self.path = config.path
        self.manager: WorkerManager | None = None
        self.reloader: Reloader | None = None
        self.admin: AdminServer | None = None
        self.started = time.time()
        self.ready = False
        #: service name -> (wall time, reload seq) of the reload that last changed it
        self.changed_at: dict[str, tuple[float, int]] = {}
        self._manager_options = manager_options or {}
        self._stop: asyncio.Future[bool] | None = None
        self._stopping: str | None = None   # None, "graceful", "fast"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pidfile: str | None = None

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> int:
        """Start, serve until a stop request, stop; return the exit code."""
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        rt = self.config.runtime
        try:
            self._write_pidfile(rt.pidfile)
            self.admin = AdminServer(rt.admin_socket, self._admin_request, ADMIN_COMMANDS,
                                     idle_timeout=rt.admin_idle_timeout)
            await self.admin.start()
        except (AdminError, PidfileError) as exc:
            log.error("cannot start: %s", exc)
            self._remove_pidfile()
            return 1
        self._install_signals(loop)
        if rt.tcp_migrate_req:
            set_tcp_migrate_req()
        try:
            self.manager = WorkerManager(rt.workers, drain_timeout=rt.drain_timeout,
                                         cpu_affinity=rt.cpu_affinity, **self._manager_options)
            try:
                await self.manager.start()
            except (HotproxyError, OSError) as exc:
                log.error("cannot start workers: %s", exc)
                return 1
            self.reloader = Reloader(self.manager)
            report = await self.reloader.reload(self.config, trigger="start")
            self._note_changes(report)
            if not report.ok:
                log.error("cannot start: the config could not be applied")
                await self.manager.stop(graceful=False)
                return 1
            self.ready = True
            self._log_serving()
            graceful = await self._stop
            await self._shutdown(graceful)
            return 0
        except BaseException:
            # a bug, or cancelled from outside: never leave workers behind
            if self.manager is not None:
                await self.manager.stop(graceful=False)
            raise
        finally:
            self._remove_signals(loop)
            if self.admin is not None:
                await self.admin.close()
                self.admin.notify_stopped()
            self._remove_pidfile()

    def _log_serving(self) -> None:
        assert self.reloader is not None and self.reloader.current is not None and self.manager is not None
        cur = self.reloader.current
        for svc in cur.services.values():
            log.info("serving %s (%s) on %s", svc.name, svc.kind, svc.listen)
        log.info("ready: pid %d, %d workers, config %s, admin socket %s",
                 os.getpid(), self.manager.count, cur.source, cur.runtime.admin_socket)

    async def _shutdown(self, graceful: bool) -> None:
        assert self.manager is not None and self.reloader is not None
        # Start no new reload; let a running one finish (bounded), so the
        # workers are not stopped in the middle of a prepare.
        self.reloader.close()
        if self._tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 30.0)
        if self.admin is not None:
            await self.admin.close()   # stop clients are still told "stopped" at the end
        drain = self.reloader.current.runtime.drain_timeout if self.reloader.current else None
        log.info("stopping (%s)%s", "graceful" if graceful else "fast",
                 f": draining up to {drain:g}s" if graceful and drain is not None else "")
        t0 = time.monotonic()
        await self.manager.stop(graceful=graceful, timeout=drain)
        log.info("stopped in %.1f s", time.monotonic() - t0)

    def request_stop(self, graceful: bool) -> None:
        """Stop (graceful: drain first).  A second request while draining stops at once."""
        if self._stop is None:
            return
        if not self._stop.done():
            self._stopping = "graceful" if graceful else "fast"
            self._stop.set_result(graceful)
        elif self._stopping == "graceful" and not graceful:
            self._stopping = "fast"
            log.warning("stopping at once: killing the workers")
            self._kill_workers()

    def _kill_workers(self) -> None:
        if self.manager is None:
            return
        for w in self.manager.workers:
            proc = getattr(w, "proc", None)
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    # -- signals ----------------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        loop.add_signal_handler(signal.SIGQUIT, self.request_stop, False)

    @staticmethod
    def _remove_signals(loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    def _on_sighup(self) -> None:
        started = time.monotonic()
        if self._stopping or not self.ready:
            log.warning("SIGHUP ignored: %s", "stopping" if self._stopping else "still starting")
            return
        self._spawn(self.reload("SIGHUP", started))

    def _on_stop_signal(self, name: str) -> None:
        # the first one drains; a second one (an impatient operator) stops at once
        self.request_stop(self._stopping is None)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- reload and status --------------------------------------------------------

    async def reload(self, trigger: str, started: float | None = None) -> ReloadReport:
        """Re-read the config file and apply it, all or nothing."""
        assert self.reloader is not None
        # a file of address literals loads in the loop; host names in a thread
        report = await self.reloader.reload(
            lambda: load_config(self.path), trigger=trigger, started=started,
            quick_load=lambda: load_config(self.path, lookups=False))
        self._note_changes(report)
        return report

    def _note_changes(self, report: ReloadReport) -> None:
        if not report.ok:
            return
        if self.admin is not None and self.reloader is not None and self.reloader.current is not None:
            self.admin.idle_timeout = self.reloader.current.runtime.admin_idle_timeout
        for name in report.added + report.changed:
            self.changed_at[name] = (report.at, report.seq)
        for name in report.removed:
            self.changed_at.pop(name, None)

    async def status(self) -> dict[str, Any]:
        """Everything ``hotproxy status`` shows, JSON-able."""
        assert self.manager is not None and self.reloader is not None
        workers = await self.manager.status()
        cur = self.reloader.current
        services = []
        for name, svc in (cur.services.items() if cur is not None else ()):
            services.append(self._service_status(name, svc.kind, svc.listen, workers))
        last = self.reloader.last
        return {
            "pid": os.getpid(),
            "config": cur.source if cur is not None else self.config.source,
            "started": self.started,
            "ready": self.ready,
            "stopping": self._stopping,
            "reloading": self.reloader.busy,
            "reloads": self.reloader.seq,
            "last_reload": last.to_dict() if last is not None else None,
            "restarts": self.manager.restarts,
            "workers": [{**{k: w.get(k) for k in ("worker", "pid", "alive", "draining", "error")},
                         "sites": sorted(w.get("sites") or ())} for w in workers],
            "services": services,
        }

    def _service_status(self, name: str, kind: str, listen: str, workers: list[dict[str, Any]]) -> dict[str, Any]:
        generations: dict[str, int] = {}
        totals: dict[str, float] = {}
        active = old = 0
        #: generation -> open connections, summed over the workers
        versions: dict[str, int] = {}
        for w in workers:
            site = (w.get("sites") or {}).get(name)
            if site is None:
                continue
            generations[str(w["worker"])] = site["generation"]
            active += site.get("active", 0)
            old += site.get("old_versions", 0)
            for gen, n in (site.get("versions") or {}).items():
                versions[str(gen)] = versions.get(str(gen), 0) + n
            for key, value in (site.get("stats") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("limit",):
                    totals[key] = totals.get(key, 0) + value
        totals.pop("active", None)          # the site's own count is the one shown
        totals.pop("limited_active", None)
        changed = self.changed_at.get(name)
        return {
            "name": name, "kind": kind, "listen": listen,
            "generation": max(generations.values()) if generations else None,
            "generations": generations,
            "active": active, "old_versions": old,
            "versions": dict(sorted(versions.items(), key=lambda kv: int(kv[0]))), "totals": totals,
            "changed_at": changed[0] if changed else None,
            "changed_by_reload": changed[1] if changed else None,
        }

    async def _admin_request(self, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        cmd = request["cmd"]
        if cmd == "status":
            if self.manager is None or self.reloader is None:
                return {"ok": False, "error": "starting"}, False
            return {"ok": True, "status": await self.status()}, False
        if cmd == "reload":
            started = time.monotonic()
            if self._stopping:
                return {"ok": False, "error": "stopping: no reload"}, False
            if not self.ready:
                return {"ok": False, "error": "still starting: try again"}, False
            # shielded: a client hanging up, or the admin server closing, must
            # not cancel a reload half-way (between prepare and abort/commit)
            report = await asyncio.shield(self._spawn(self.reload("admin", started)))
            return {"ok": report.ok, "report": report.to_dict()}, False
        if cmd == "stop":
            graceful = request.get("graceful", True)
            if not isinstance(graceful, bool):
                return {"ok": False, "error": "malformed request: graceful must be true or false"}, False
            self.request_stop(graceful)
            return {"ok": True, "stopping": True, "pid": os.getpid()}, True
        return {"ok": False, "error": f"unknown command {cmd!r}"}, False   # pragma: no cover

    # -- pidfile ----------------------------------------------------------------

    def _write_pidfile(self, path: str | None) -> None:
        if path is None:
            return
        try:
            with open(path) as f:
                other = int(f.read().strip() or "0")
        except (OSError, ValueError):
            other = 0
        if other and other != os.getpid() and _pid_alive(other):
            raise PidfileError(f"pidfile {path}: hotproxy already running as pid {other}")
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PidfileError(f"pidfile {path}: {exc.strerror or exc}") from None
        self._pidfile = path

    def _remove_pidfile(self) -> None:
        if self._pidfile is None:
            return
        try:
            with open(self._pidfile) as f:
                if f.read().strip() == str(os.getpid()):
                    os.unlink(self._pidfile)
        except OSError:
            pass
        self._pidfile = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: with SO_REUSEPORT each worker has its own accept queue; when a worker dies
#: the kernel resets the connections waiting in it, unless this is 1 (Linux
#: >= 5.14), when it moves them to another listener on the same port
TCP_MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def set_tcp_migrate_req(path: str = TCP_MIGRATE_REQ) -> bool:
    """Set ``net.ipv4.tcp_migrate_req=1`` if we may; log what happened.

    It is a sysctl of the whole network namespace, hence opt-in
    (``runtime.tcp_migrate_req``) and never turned back off by us.
    """
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                log.info("net.ipv4.tcp_migrate_req is already 1")
                return True
        with open(path, "w") as f:
            f.write("1")
    except OSError as exc:
        log.warning("runtime.tcp_migrate_req: cannot set net.ipv4.tcp_migrate_req=1 (%s): a killed "
                    "worker's queued connections will be reset", exc.strerror or exc)
        return False
    log.info("set net.ipv4.tcp_migrate_req=1: a killed worker's queued connections move to another worker")
    return True


def setup_logging(level: str) -> None:
    """The master's log format (workers use the same level, tagged with their id)."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s master %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hotproxy").setLevel(level.upper())


__all__ = ["ADMIN_COMMANDS", "Master", "PidfileError", "setup_logging"]
