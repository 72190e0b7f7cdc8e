"""The master process: workers, the config, signals, the admin socket.

The master serves no traffic.  It starts the ``WorkerManager``, applies the
config through the same all-or-nothing path a reload uses, and then waits
for requests:

=========  ===================================================================
SIGHUP     reload the config file (a bad one is reported; the old keeps serving)
SIGTERM    graceful stop: stop accepting, drain within ``drain_timeout``, exit 0
SIGINT     the same (a second one stops at once)
SIGQUIT    fast stop: close every connection, exit 0
SIGUSR2    upgrade: start a new master from the code on disk and hand over (``upgrade``)
=========  ===================================================================

Signal handlers only schedule work on the loop (``loop.add_signal_handler``).
Signals that arrive before the loop runs are caught from the first moment
(``early_signals.catch``, called by the CLI before its heavy imports) and
replayed once it does: a SIGHUP during start-up is a reload after the first
config is applied, never the default action (which would kill the master).

Reloads run one at a time.  Requests that arrive while one runs -- a storm
of SIGHUPs, several ``hotproxy reload`` -- are merged into one reload of the
file as it is when that reload starts, and every waiting caller gets its
outcome.  The admin socket serves until the process exits: ``status`` and
``stop --fast`` work during a graceful stop's drain.

An upgrade (``hotproxy upgrade``, SIGUSR2; the protocol is in ``upgrade``)
runs one at a time, and not during a reload: a reload running when it is
asked for ends first, and reload requests that arrive during the upgrade are
refused with a line that says so.  A master started with ``--upgrade-fd``
(``link``) is the new side: it takes the old master's sockets and state,
and the admin socket, pidfile and systemd's ``MAINPID`` once the old master
has released them; it then answers for the old masters still draining
(``status``, ``stop``).

Exit codes: 0 after a stop, 1 if the instance could not start (admin socket,
pidfile, workers, or the initial config could not be applied).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import stat
import time
from typing import Any, AsyncGenerator, Callable, Sequence

from . import activation, early_signals, gcpolicy, logs, reuseport
from .admin import AdminError, AdminServer
from .config import Config, inspect_pidfile, listen_sockaddrs, load_config, pid_alive
from .errors import ConfigError, HotproxyError, describe
from .listeners import BoundListener, ListenerFactory, TcpListenerFactory, UnixListenerFactory
from .manager import WorkerManager
from .workers import STOP_GRACE
from .reload import Failure, ReloadReport, Reloader
from .sdnotify import Notifier
from .upgrade import (Hello, Link, NewMasterProcess, OldMaster, OldMasters, UpgradeError, UpgradeResult,
                      late_seeds_for, phases_from, read_state, seeds_for, send_everything, serve_new_master,
                      test_failure, test_pause, wait_ready, write_state)

log = logging.getLogger("hotproxy.master")

#: what the admin socket answers
ADMIN_COMMANDS = ("reload", "status", "stop", "upgrade")
#: a ``status`` asking for a summary gets one when more services than this run
#: (fewer: the whole table, which is small)
SUMMARY_OVER = 50


class PidfileError(HotproxyError):
    """The pidfile names a live process, or cannot be written."""


class MetricsError(HotproxyError):
    """The metrics endpoint's address cannot be had."""


class StatusError(HotproxyError):
    """A ``status`` request names a service that does not run."""



class Master:
    """One hotproxy instance.  ``await Master(config).run()`` returns the exit code."""

    def __init__(self, config: Config, *, manager_options: dict[str, Any] | None = None,
                 link: Link | None = None, etcd: str | None = None) -> None:
        self.config = config
        #: ``hotproxy run --etcd URL``: the new master of an upgrade is given it too
        self.etcd_option = etcd
        #: this master is an upgrade: the channel to the master it takes over from
        self.link = link
        #: None for the embedded default: a reload re-reads it (and changes nothing)
        self.path = config.path
        self.manager: WorkerManager | None = None
        self.reloader: Reloader | None = None
        self.admin: AdminServer | None = None
        #: sweeps the frozen garbage of a reload once it has drained (``gcpolicy``; armed at start)
        self.sweeper: gcpolicy.Sweeper | None = None
        #: (config, ``metrics.config_digest`` of it): computed once per config, not per scrape
        self._digest: tuple[Config | None, str] | None = None
        self.metrics: Any = None
        #: systemd's notify socket (does nothing when not run by systemd)
        self.notify = Notifier()
        self._watchdog: asyncio.Task[None] | None = None
        self.started = time.time()
        self.ready = False
        #: service name -> (wall time, reload seq) of the reload that last changed it
        self.changed_at: dict[str, tuple[float, int]] = {}
        self._manager_options = manager_options or {}
        self._stop: asyncio.Future[bool] | None = None
        self._stopping: str | None = None   # None, "graceful", "fast"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pidfile: str | None = None
        #: the reload running now, and the one that requests arriving
        #: meanwhile are merged into (it starts when the running one ends)
        self._reload_running: asyncio.Task[ReloadReport] | None = None
        self._reload_next: asyncio.Task[ReloadReport] | None = None
        self._next_requests = 0
        #: a request merged into the next reload asked for ``allow_empty``
        self._next_allow_empty = False
        #: a SIGHUP arrived before the first config was applied
        self._hup_while_starting = False
        #: (st_dev, st_ino) of the pidfile this master created: only that file is removed
        self._pidfile_ident: tuple[int, int] | None = None
        #: the upgrade running now, the requests it answers, and the last one's outcome
        self._upgrade: asyncio.Task[UpgradeResult] | None = None
        self._upgrade_requests = 0
        #: {"pid", "since"} of the new master while an upgrade runs
        self.upgrading: dict[str, Any] | None = None
        self.last_upgrade: UpgradeResult | None = None
        #: the pid of the new master this one handed over to, and when
        self.handed_over_to: int | None = None
        self._handed_over_at = 0.0
        #: this master's task answering the new one while it drains
        self._serving_new: asyncio.Task[None] | None = None
        #: the pid of the master this one took over from (an upgrade)
        self.upgraded_from: int | None = None
        #: masters that handed over and still drain (the newest master answers for them)
        self.old_masters = OldMasters()
        #: the addresses of the listening sockets systemd passed (``activation``)
        self._activated: list[str] = []
        #: the old master's state this one's services were built from (an upgrade), until the hand-over
        self._seeded_from: list[dict[str, Any]] | None = None
        #: ``runtime.config_source``: this instance follows its fleet's config in etcd (``fleet.py``)
        self.fleet: Any = None
        self._fleet_task: asyncio.Task[None] | None = None
        #: (revision, TOML) of the fleet config the old master ran (an upgrade of a fleet instance)
        self._fleet_handed: tuple[int, str] | None = None

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> int:
        """Start, serve until a stop request, stop; return the exit code."""
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        self._install_signals(loop)
        rt = self.config.runtime
        raise_nofile(len(self.config.services))
        migration = reuseport.status()
        if migration is not None:
            log.warning("%s", migration)
        hello: Hello | None = None
        #: how many TCP listening sockets the old workers handed over (an upgrade), and were passed on to a worker
        tcp_handed = tcp_taken = 0
        #: the config the workers start with: the file's, or (a fleet instance's upgrade) the fleet's
        first = self.config
        try:
            if self.link is not None:
                hello = await self.link.receive()
                self.link.mark("hello")
                if rt.config_source is not None:
                    first = self._fleet_config_from(hello)
                self._follow_watchdog(hello.pid)
                # written once the old master has released it (it names the old one until then)
                self._check_pidfile(rt.pidfile, hello.pid)
            else:
                self._write_pidfile(rt.pidfile)
            self.admin = AdminServer(rt.admin_socket, self._admin_request, ADMIN_COMMANDS,
                                     idle_timeout=rt.admin_idle_timeout)
            if not self._inherits_admin(hello):
                await self.admin.start()
            if rt.metrics is not None and hello is None:
                await self._start_metrics(rt.metrics)
        except (AdminError, PidfileError, MetricsError, UpgradeError, ConfigError) as exc:
            log.error("cannot start: %s", exc)
            self._upgrade_failed(str(exc))
            if self.admin is not None:
                await self.admin.close()
            if hello is not None:
                hello.close()
            self._remove_pidfile()
            return 1
        if rt.tcp_migrate_req:
            set_tcp_migrate_req()
        try:
            self.manager = WorkerManager(rt.workers, drain_timeout=rt.drain_timeout,
                                         cpu_affinity=rt.cpu_affinity, command_timeout=rt.reload_timeout,
                                         **self._manager_options)
            activated = activation.listen_fds() if hello is None else hello.activated
            for sock in activated:
                address = self.manager.activate(sock)
                if address is not None:
                    self._activated.append(address)
            activated.clear()
            if hello is not None:
                for path, sock in hello.unix.items():
                    self.manager.adopt_unix(path, sock)
                hello.unix.clear()
                if "counters" in hello.fds:
                    # one max_connections count for both generations while the old one drains
                    self.manager.adopt_counters(hello.fds.pop("counters"), hello.used_regions(),
                                                hello.counter_slots())
                if "health" in hello.fds:
                    # the health states go on where the old master left them
                    self.manager.adopt_health(hello.fds.pop("health"))
                # checks start once this master serves (the old one checks until it hands over)
                self.manager.health_checks_paused = True
            try:
                await self.manager.start()
                if self.link is not None:
                    self.link.mark("workers")
            except (HotproxyError, OSError) as exc:
                log.error("cannot start workers: %s", exc)
                self._upgrade_failed(f"cannot start workers: {describe(exc)}")
                return 1
            if self.link is not None and hello is not None:
                # new worker i serves on old worker i's TCP sockets (their queues go on): each is
                # passed on to it as it arrives, this master keeps none
                def take(sockets: list[tuple[int, tuple[Any, ...], int]]) -> None:
                    nonlocal tcp_taken
                    assert self.manager is not None
                    tcp_taken += self.manager.adopt_tcp(sockets)

                t0 = time.monotonic()
                try:
                    tcp_handed = await self.link.receive_tcp(take)
                    log.info("upgrade: %d of the old workers' TCP listening sockets passed on to the workers in %.0f ms",
                             tcp_taken, (time.monotonic() - t0) * 1000.0)
                except UpgradeError as exc:
                    log.error("cannot start: %s", exc)
                    self._upgrade_failed(str(exc))
                    await self.manager.stop(graceful=False)
                    return 1
            self.reloader = Reloader(self.manager)
            # the addresses of the sockets systemd passed are ours, not a stranger's
            self.reloader.held = list(self._activated)
            if hello is not None:
                # the old master's addresses are ours to share (SO_REUSEPORT), not a stranger's
                self.reloader.held += hello.listen
                # its services' state: the first version of each is built from it
                old_state = read_state(hello.fds.pop("state")) if "state" in hello.fds else None
                if old_state:
                    await self.manager.seed(seeds_for(old_state, self.manager.count))
                    self._seeded_from = old_state
            # (a config without services was refused or allowed by the caller)
            report = await self.reloader.reload(first, trigger="start" if hello is None else "upgrade",
                                                allow_empty=True)
            self._note_changes(report)
            if self.link is not None and report.ok:
                self.link.mark("applied")
            if hello is not None:
                # a socket no service took is closed; its old worker holds it until it stops accepting
                unused = await self.manager.release_handed()
                log.info("upgrade: the workers serve on %d of the old workers' %d TCP listening sockets",
                         tcp_taken - unused, tcp_handed)
            if not report.ok:
                log.error("cannot start: the config could not be applied")
                self._upgrade_failed(f"the config could not be applied: {report.error}")
                await self.manager.stop(graceful=False)
                return 1
            if hello is not None and not await self._take_over(hello):
                await self._shutdown(await self._stop)
                return 0
            if hello is not None and self.manager.checker is not None:
                self.manager.checker.resume()
            self.ready = True
            # the config that serves is long-lived: out of the collections (``gcpolicy``)
            self.sweeper = gcpolicy.Sweeper(max(1.0, rt.drain_timeout) + 1.0, busy=lambda: self._reload_busy())
            gcpolicy.settle()
            self._log_serving()
            serving = f"serving {len(report.added)} services on {self.manager.count} workers"
            self.notify.ready(serving if hello is None else f"upgraded from pid {hello.pid}: {serving}")
            if self.notify.watchdog_interval is not None:
                self._watchdog = loop.create_task(self._ping_watchdog(self.notify.watchdog_interval))
            if rt.config_source is not None:
                self._start_fleet(rt.config_source)
            if self._hup_while_starting and not self._stopping:
                log.info("SIGHUP during start-up: reloading now")
                self._spawn(self.request_reload("SIGHUP"))
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
            if self.sweeper is not None:
                self.sweeper.cancel()
            if hello is not None:
                hello.close()
            if self._serving_new is not None:
                self._serving_new.cancel()
            self.old_masters.close()
            if self._watchdog is not None:
                self._watchdog.cancel()
            self.notify.close()
            if self.metrics is not None:
                await self.metrics.close()
            if self.admin is not None:
                await self.admin.close()
                self.admin.notify_stopped()
            self._remove_pidfile()

    def _local_runtime(self) -> dict[str, Any]:
        """The local file's ``[runtime]`` table as written (a fleet instance's own part)."""
        import tomllib

        local: dict[str, Any] = {}
        if self.path is not None:
            with open(self.path, "rb") as f:
                local = tomllib.load(f).get("runtime", {})
        source = self.config.runtime.config_source
        return {**local, "config_source": source} if source is not None else local   # (or ``run --etcd``)

    def _start_fleet(self, source: str) -> None:
        """Follow the fleet's committed config in etcd (the source was checked at start)."""
        from .fleet import FleetAgent, parse_source

        assert self.reloader is not None
        handed, self._fleet_handed = self._fleet_handed, None
        # an upgrade: the revision the old master ran is running here too (not applied again)
        applied, text = handed if handed is not None else (0, None)
        self.fleet = FleetAgent(parse_source(source), self.config, self._local_runtime(), self.reloader,
                                self._note_changes, applied=applied, applied_text=text,
                                outcome=f"applied revision {applied} (upgraded)" if handed else "joining")
        self._fleet_task = self._spawn(self.fleet.run())

    def _fleet_config_from(self, hello: Hello) -> Config:
        """The config a fleet instance's new master starts with: the fleet config the
        old master applied (handed over with the hello: its revision and TOML), with
        this master's local ``[runtime]``.  If the old master had none of this fleet
        (none applied yet, another source, not in a fleet): the local file's, with no
        services -- the instance joins as a new one does -- but only if the old master
        served nothing either.  ``ConfigError`` (one line) for that refusal, and naming
        the revision if this version cannot run the fleet's config."""
        from .fleet import fleet_config, parse_source, revision_name

        fd = hello.fds.pop("fleet", None)
        info = hello.fields.get("fleet")
        text = None
        if fd is not None:
            try:
                text = os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")
            except OSError as exc:
                log.warning("upgrade: the old master's fleet config cannot be read (%s)", exc)
            finally:
                os.close(fd)
        assert self.config.runtime.config_source is not None
        ours = parse_source(self.config.runtime.config_source).url   # (checked by the CLI)
        source, rev = (info.get("source"), info.get("revision")) if isinstance(info, dict) else (None, None)
        if text is None or source != ours or not isinstance(rev, int):
            if hello.listen:
                # starting empty would stop every service the old master serves until etcd answers
                raise ConfigError(f"{self.config.source}: runtime.config_source {ours}: the old master (pid "
                                  f"{hello.pid}) serves {len(hello.listen)} services and no config of that "
                                  "fleet: an upgrade never empties hotproxy (restart it to join the fleet)")
            return self.config   # it served nothing either: this one joins as a new instance would
        config = fleet_config(self.config, self._local_runtime(), text, revision_name(source, rev))
        self._fleet_handed = (rev, text)
        return config

    async def _ping_watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` every *interval* seconds while the master's loop turns."""
        while True:
            self.notify.watchdog()
            await asyncio.sleep(interval)

    async def _start_metrics(self, address: str, handed: Any = None) -> None:
        """Serve ``/metrics`` on *address* (``runtime.metrics``); ``MetricsError`` if it cannot.

        *handed*: the listening socket of the master this one upgrades, if it
        served the same address: served as it is (the scrapes that queued
        on it during the hand-over are answered, none is refused)."""
        from .listeners import ListenerFactory, TcpListenerFactory, parse_address
        from .metrics import MetricsServer

        listener: ListenerFactory = parse_address(address)
        if handed is not None and _same_address(handed, listener):
            listener = HandedListener(handed, listener)
        else:
            if handed is not None:
                handed.close()
            if isinstance(listener, TcpListenerFactory):
                # a plain bind: the port is ours alone, not shared with SO_REUSEPORT
                listener = dataclasses.replace(listener, reuse_port=False)
        self.metrics = MetricsServer(listener, self._metrics_snapshot)
        try:
            await self.metrics.start()
        except (OSError, ValueError) as exc:
            self.metrics = None
            raise MetricsError(f"runtime.metrics {address}: {describe(exc)}") from None
        log.info("metrics on http://%s/metrics", address)

    def _log_serving(self) -> None:
        assert self.reloader is not None and self.reloader.current is not None and self.manager is not None
        cur = self.reloader.current
        for svc in cur.services.values():
            log.info("serving %s (%s) on %s", svc.name, svc.kind, svc.listen)
        log.info("ready: pid %d, %d workers, config %s, admin socket %s",
                 os.getpid(), self.manager.count, cur.source, cur.runtime.admin_socket)

    async def _shutdown(self, graceful: bool) -> None:
        """Stop within ``drain_timeout``, whatever a reload is doing.

        No new reload starts.  One in progress is not waited for: the
        workers stop under it (a stopped worker is killed at the deadline),
        its commands fail, and it reports "interrupted".  The admin socket
        keeps answering (``status``, ``stop --fast``) until ``run`` returns.
        """
        assert self.manager is not None and self.reloader is not None
        if self._fleet_task is not None:
            # it aborts what it prepared and leaves the fleet (its lease ends with it)
            self._fleet_task.cancel()
            await asyncio.wait([self._fleet_task], timeout=5.0)
        self.reloader.close()
        if self.manager.checker is not None:
            self.manager.checker.stop()
        self.notify.stopping("stopping (graceful)" if graceful else "stopping (fast)")
        drain = self.reloader.current.runtime.drain_timeout if self.reloader.current else None
        if self.handed_over_to is not None:
            log.info("handed over to pid %d: stopped accepting%s", self.handed_over_to,
                     f", draining up to {drain:g}s" if graceful and drain is not None else "")
        else:
            log.info("stopping (%s)%s", "graceful" if graceful else "fast",
                     f": draining up to {drain:g}s" if graceful and drain is not None else "")
        t0 = time.monotonic()
        olds = self.old_masters.alive()
        if olds:
            # the old masters still draining stop with us (each bounded by its drain_timeout)
            log.info("stopping %d old master%s still draining: pid %s", len(olds), "" if len(olds) == 1 else "s",
                     ", ".join(str(m.pid) for m in olds))
            await self.old_masters.stop(graceful)
        # after a hand-over the socket files are the new master's
        await self.manager.stop(graceful=graceful, timeout=drain, keep_files=self.handed_over_to is not None)
        if olds and not await self.old_masters.wait_gone((drain or 0.0) + STOP_GRACE + 1.0):
            log.warning("old masters still running: pid %s", ", ".join(str(m.pid) for m in self.old_masters.alive()))
        if self._tasks:   # reloads whose workers just went away: they end now
            await asyncio.wait(list(self._tasks), timeout=5.0)
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
            if self.manager is not None:
                self.manager.kill_all()
            if self.old_masters.alive():
                self._spawn(self.old_masters.stop(False))


    # -- signals ----------------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        handlers: dict[int, Callable[[], None]] = {
            signal.SIGHUP: self._on_sighup,
            signal.SIGTERM: functools.partial(self._on_stop_signal, "SIGTERM"),
            signal.SIGINT: functools.partial(self._on_stop_signal, "SIGINT"),
            signal.SIGQUIT: functools.partial(self.request_stop, False),
            signal.SIGUSR2: self._on_sigusr2,
        }
        for sig, callback in handlers.items():
            loop.add_signal_handler(sig, callback)
        # what arrived before (early_signals.catch), in order
        for early in early_signals.take():
            loop.call_soon(handlers[early])

    @staticmethod
    def _remove_signals(loop: asyncio.AbstractEventLoop) -> None:
        for sig in early_signals.SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    def _on_sighup(self) -> None:
        if self._stopping:
            log.warning("SIGHUP ignored: stopping")
            return
        if self._upgrade_running():
            log.warning("SIGHUP ignored: an upgrade is running (new master pid %s); send it again once it has "
                        "ended", (self.upgrading or {}).get("pid", "?"))
            return
        if not self.ready:
            # the first config is not applied yet: reload once it is
            self._hup_while_starting = True
            return
        self._spawn(self.request_reload("SIGHUP"))

    def _on_sigusr2(self) -> None:
        if self._stopping or not self.ready:
            log.warning("SIGUSR2 ignored: %s", "stopping" if self._stopping else "starting")
            return
        self._spawn(self.request_upgrade("SIGUSR2"))

    def _on_stop_signal(self, name: str) -> None:
        # the first one drains; a second one (an impatient operator) stops at once
        self.request_stop(self._stopping is None)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- reload and status --------------------------------------------------------

    async def request_reload(self, trigger: str, *, allow_empty: bool = False) -> ReloadReport:
        """Reload the file, merged with other requests; the outcome that covers this one.

        With no reload running, one starts now.  Otherwise this request joins
        the reload queued behind the running one (creating it if needed):
        that reload reads the file when it starts, so it covers every
        request made before then, and each caller gets its report.  A file
        without services is applied only if a request it covers asked for
        that (*allow_empty*, ``hotproxy reload --allow-empty``); a signal never does.
        """
        started = time.monotonic()
        if self._reload_next is not None:
            self._next_requests += 1
            self._next_allow_empty = self._next_allow_empty or allow_empty
            return await asyncio.shield(self._reload_next)
        running = self._reload_running
        if running is None or running.done():
            task = self._reload_running = self._spawn(self._reload_after(None, trigger, started, allow_empty))
        else:
            self._next_requests = 1
            self._next_allow_empty = allow_empty
            task = self._reload_next = self._spawn(self._reload_after(running, trigger, started, allow_empty))
        # shielded: a client hanging up, or the admin server closing, must
        # not cancel a reload half-way (between prepare and abort/commit)
        return await asyncio.shield(task)

    async def _reload_after(self, previous: asyncio.Task[ReloadReport] | None, trigger: str,
                            started: float, allow_empty: bool) -> ReloadReport:
        requests = 1
        if previous is not None:
            await asyncio.wait([previous])
            # from here on, new requests queue behind this reload
            self._reload_running, self._reload_next = self._reload_next, None
            requests = self._next_requests
            allow_empty = self._next_allow_empty
        report = await self.reload(trigger, started, allow_empty=allow_empty)
        report.requests = requests
        return report

    async def reload(self, trigger: str, started: float | None = None, *, allow_empty: bool = False) -> ReloadReport:
        """Re-read the config file and apply it, all or nothing (not merged: see
        ``request_reload``); one without services only if *allow_empty*."""
        assert self.reloader is not None
        if self.fleet is not None:
            error = (f"{self.config.source}: this instance is in a fleet ({self.fleet.source.url}): its services "
                     "change only through hotproxy fleet apply; a local reload is refused")
            log.error("reload refused: %s", error)
            return ReloadReport(ok=False, trigger=trigger, error=error, failures=[Failure("config", error)])
        notify = not self._stopping   # (after STOPPING=1 systemd hears nothing else)
        if notify:
            self.notify.reloading()
        # A small file of address literals loads in the loop (no thread hop);
        # host names, or a big file, in a thread, so that the loop keeps
        # answering status and signals while thousands of services are parsed.
        # The running config is handed to the load: a service whose table
        # has not changed is taken from it, not checked and built again.
        reloader = self.reloader
        quick = None if _big(self.path) else (
            lambda: load_config(self.path, lookups=False, previous=reloader.current))
        report = await reloader.reload(
            lambda: load_config(self.path, previous=reloader.current), trigger=trigger, started=started,
            quick_load=quick, allow_empty=allow_empty)
        self._note_changes(report)
        if notify and not self._stopping:
            self.notify.send("READY=1", f"STATUS={report.summary()}")
        if self.reloader.current is not None and self.manager is not None:
            # runtime.reload_timeout applies at once, to worker restarts too
            self.manager.command_timeout = self.reloader.current.runtime.reload_timeout
        return report

    def _reload_busy(self) -> bool:
        return self.reloader is not None and self.reloader.busy

    def _note_changes(self, report: ReloadReport) -> None:
        if not report.ok:
            return
        if self.sweeper is not None and not self._reload_busy():
            # what runs now is long-lived; what the reload replaced is swept later
            gcpolicy.settle()
            if report.added or report.changed or report.removed:
                self.sweeper.changed()
        if self.admin is not None and self.reloader is not None and self.reloader.current is not None:
            self.admin.idle_timeout = self.reloader.current.runtime.admin_idle_timeout
        for name in report.added + report.changed:
            self.changed_at[name] = (report.at, report.seq)
        for name in report.removed:
            self.changed_at.pop(name, None)

    async def status(self, services: Sequence[str] | None = None, summary: bool = False) -> dict[str, Any]:
        """Everything ``hotproxy status`` shows, JSON-able.

        *services*: only those services (``StatusError`` naming one that
        does not run).  *summary*: counts instead of one entry per service,
        when more than ``SUMMARY_OVER`` run (``"services"`` is then empty and
        ``"summary"`` says how many there are): a reply of a few hundred
        bytes, not megabytes, and no worker builds 10,000 entries.
        """
        assert self.manager is not None and self.reloader is not None
        cur = self.reloader.current
        running = cur.services if cur is not None else {}
        if services is not None:
            missing = [name for name in services if name not in running]
            if missing:
                raise StatusError(f"no service {', '.join(map(repr, missing))} in the running config "
                                  f"({len(running)} services; `hotproxy status --all` lists them)")
            services = list(dict.fromkeys(services))
        summary = summary and services is None and len(running) > SUMMARY_OVER
        # "ready" as the workers' answers show it: read before asking them (the start-up
        # ending while they answer must not be reported over the state from before it)
        ready = self.ready
        workers, olds = await asyncio.gather(self.manager.status(names=services, summary=summary),
                                             self.old_masters.status())
        if services is None and not summary:
            # every service (``--all``, ``--json``): in slices, the loop answers meanwhile
            return {**await self._status_sliced(workers), "ready": ready, "old_masters": olds}
        return {**self._status_from(workers, services, summary), "ready": ready, "old_masters": olds}

    async def _metrics_snapshot(self) -> Any:
        """One scrape's data (see ``metrics``): every worker asked at once, none waited for."""
        from .metrics import SCRAPE_TIMEOUT, Snapshot, config_digest

        assert self.manager is not None and self.reloader is not None
        workers = await self.manager.status(SCRAPE_TIMEOUT)
        cur = self.reloader.current
        if self._digest is None or self._digest[0] is not cur:
            # once per config, not per scrape (10,000 services: a JSON document of megabytes)
            self._digest = (cur, config_digest(cur))
        return Snapshot(await self._status_sliced(workers), workers, dict(self.reloader.results),
                        self._digest[1], self.manager.count)

    async def _status_sliced(self, workers: list[dict[str, Any]]) -> dict[str, Any]:
        """``_status_from(workers)`` built in slices of ``STATUS_SLICE`` seconds with
        a loop turn between two: 10,000 services' entries never hold the loop."""
        assert self.reloader is not None
        cur = self.reloader.current
        running = cur.services if cur is not None else {}
        names = list(running)
        services: list[dict[str, Any]] = []
        start = time.monotonic()
        for name in names:
            svc = running.get(name)
            if svc is not None:
                services.append(self._service_status(name, svc.kind, svc.listen, workers))
            if time.monotonic() - start >= STATUS_SLICE:
                await asyncio.sleep(0)
                start = time.monotonic()
                if self.reloader.current is not cur:
                    break   # a reload committed meanwhile: the rest from the new config
        else:
            return {**self._status_from(workers, [], False), "services": services}
        return self._status_from(workers)

    def _status_from(self, workers: list[dict[str, Any]], names: Sequence[str] | None = None,
                     summary: bool = False) -> dict[str, Any]:
        assert self.manager is not None and self.reloader is not None
        cur = self.reloader.current
        running = cur.services if cur is not None else {}
        services = []
        if not summary:
            for name in (running if names is None else names):
                svc = running[name]
                services.append(self._service_status(name, svc.kind, svc.listen, workers))
        last = self.reloader.last
        extra: dict[str, Any] = {}
        if summary:
            kinds: dict[str, int] = {}
            for svc in running.values():
                kinds[svc.kind] = kinds.get(svc.kind, 0) + 1
            extra["summary"] = {"services": len(running), "kinds": kinds,
                                "active": sum(w.get("active") or 0 for w in workers),
                                "staged": sum(w.get("staged") or 0 for w in workers)}
        return {**extra,
            "pid": os.getpid(),
            "config": cur.source if cur is not None else self.config.source,
            "started": self.started,
            "ready": self.ready,
            "stopping": self._stopping,
            "reloading": self.reloader.busy,
            "fleet": self.fleet.status() if self.fleet is not None else None,
            #: requests waiting in the reload queued behind the running one
            "reload_queued": self._next_requests if self._reload_next is not None else 0,
            "reloads": self.reloader.seq,
            "last_reload": (None if last is None else _brief_report(last) if summary else last.to_dict()),
            "restarts": self.manager.restarts,
            #: {"pid", "since"} of the new master while an upgrade runs
            "upgrading": self.upgrading,
            "last_upgrade": self.last_upgrade.to_dict() if self.last_upgrade is not None else None,
            "handed_over_to": self.handed_over_to,
            "upgraded_from": self.upgraded_from,
            #: this process's garbage collection (``gcpolicy``); each worker's is in its entry
            "gc": {**gcpolicy.stats(), "sweeps": self.sweeper.sweeps if self.sweeper is not None else 0},
            "workers": [{**{k: w.get(k) for k in ("worker", "pid", "alive", "answering", "draining", "error",
                                                  "commands", "gc")},
                         **({"site_count": w.get("site_count")} if summary else {}),
                         "sites": sorted(w.get("sites") or ())} for w in workers],
            "services": services,
        }

    def _service_status(self, name: str, kind: str, listen: str, workers: list[dict[str, Any]]) -> dict[str, Any]:
        generations: dict[str, int] = {}
        totals: dict[str, float] = {}
        totals_hist: dict[str, Any] = {}   # histograms summed (their buckets add)
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
            durations = (site.get("stats") or {}).get("durations")
            if durations is not None:
                totals_hist["durations"] = _add_histogram(totals_hist.get("durations"), durations)
            # every count is reported once (the site's open connections are
            # ``active`` above; a service's stats hold its other counters)
            for key, value in (site.get("stats") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
        changed = self.changed_at.get(name)
        upstreams = _upstreams(name, workers)
        checker = self.manager.checker if self.manager is not None else None
        if checker is not None:
            for addr, up in upstreams.items():
                checked = checker.status(name, addr)
                if checked is not None:
                    up["health"] = checked
        routes = _sni_routes(name, workers, upstreams)
        return {
            **({"upstreams": upstreams} if upstreams else {}),
            **({"sni_routes": routes} if routes is not None else {}),
            "name": name, "kind": kind, "listen": listen,
            "generation": max(generations.values()) if generations else None,
            "generations": generations,
            "active": active, "old_versions": old,
            "versions": dict(sorted(versions.items(), key=lambda kv: int(kv[0]))),
            "totals": {**totals, **totals_hist},
            "changed_at": changed[0] if changed else None,
            "changed_by_reload": changed[1] if changed else None,
        }

    async def _admin_request(self, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        cmd = request["cmd"]
        if cmd == "status":
            if self.manager is None or self.reloader is None:
                return {"ok": False, "error": "starting"}, False
            names = request.get("services")
            if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                return {"ok": False, "error": "malformed request: services must be a list of names"}, False
            summary = request.get("summary", False)
            if not isinstance(summary, bool):
                return {"ok": False, "error": "malformed request: summary must be true or false"}, False
            try:
                return {"ok": True, "status": await self.status(names, summary)}, False
            except StatusError as exc:
                return {"ok": False, "error": str(exc)}, False
        if cmd == "reload":
            if self.handed_over_to is not None:
                return {"ok": False, "error": f"this master (pid {os.getpid()}) handed over to pid "
                                              f"{self.handed_over_to} and drains: no reload"}, False
            if self._stopping:
                return {"ok": False, "error": "stopping: no reload"}, False
            if self._upgrade_running():
                return {"ok": False, "error": f"an upgrade is running (new master pid "
                                              f"{(self.upgrading or {}).get('pid', '?')}): reload refused; "
                                              "run it again once the upgrade has ended"}, False
            if not self.ready:
                return {"ok": False, "error": "starting: the first config is not applied yet; try again"}, False
            allow_empty = request.get("allow_empty", False)
            if not isinstance(allow_empty, bool):
                return {"ok": False, "error": "malformed request: allow_empty must be true or false"}, False
            report = await self.request_reload("admin", allow_empty=allow_empty)
            return {"ok": report.ok, "report": report.to_dict()}, False
        if cmd == "upgrade":
            if not self.ready and not self._stopping and self.handed_over_to is None:
                return {"ok": False, "error": "starting: the first config is not applied yet; try again"}, False
            result = await self.request_upgrade("admin")
            return {"ok": result.ok, "upgrade": result.to_dict()}, False
        if cmd == "stop":
            graceful = request.get("graceful", True)
            if not isinstance(graceful, bool):
                return {"ok": False, "error": "malformed request: graceful must be true or false"}, False
            self.request_stop(graceful)
            return {"ok": True, "stopping": True, "pid": os.getpid()}, True
        return {"ok": False, "error": f"unknown command {cmd!r}"}, False   # pragma: no cover

    # -- upgrade: the old master's side ---------------------------------------------

    def _upgrade_running(self) -> bool:
        return self._upgrade is not None and not self._upgrade.done()

    async def request_upgrade(self, trigger: str) -> UpgradeResult:
        """Start a new master from the code on disk and hand over to it (``upgrade``).

        Requests that arrive while one runs get its outcome.  Refused while
        starting or stopping, and by a master that has handed over already.
        """
        if self._upgrade_running():
            assert self._upgrade is not None
            self._upgrade_requests += 1
            return await asyncio.shield(self._upgrade)
        refusal = None
        if self.handed_over_to is not None:
            refusal = (f"this master (pid {os.getpid()}) handed over to pid {self.handed_over_to} and drains: "
                       "upgrade that one")
        elif self._stopping:
            refusal = "stopping: no upgrade"
        elif not self.ready:
            refusal = "starting: the first config is not applied yet; try again"
        if refusal is not None:
            result = UpgradeResult(False, os.getpid(), error=refusal, trigger=trigger, at=time.time())
            log.error("%s", result.line())
            return result
        self._upgrade_requests = 1
        task = self._upgrade = self._spawn(self._upgrade_now(trigger))
        return await asyncio.shield(task)

    async def _upgrade_now(self, trigger: str) -> UpgradeResult:
        assert self.manager is not None and self.reloader is not None and self.reloader.current is not None
        started, at = time.monotonic(), time.time()
        result = UpgradeResult(False, os.getpid(), trigger=trigger, at=at)
        # a reload running (or queued) ends first; none starts until the upgrade has ended
        for task in (self._reload_running, self._reload_next):
            if task is not None and not task.done():
                await asyncio.wait([task])
        self.notify.reloading("upgrading")
        child: NewMasterProcess | None = None
        #: time.monotonic() at each step (upgrade.PHASES), the new master's from its ready
        marks: dict[str, Any] = {}
        try:
            if self._stopping:
                raise UpgradeError("stopping: no upgrade")
            marks["spawn"] = time.monotonic()
            child = NewMasterProcess.start(self.path, self._run_options())
            self.upgrading = {"pid": child.pid, "since": at}
            log.info("upgrade (%s): started the new master, pid %d", trigger, child.pid)
            fds = self._hand_over_fds()
            state = write_state(await self.manager.snapshot())
            if state is not None:
                fds.append(({"name": "state"}, state))
            hello = self._hello()
            # (taken with the hello, no await between: the TOML and its revision go together)
            fleet = self._fleet_text()
            if fleet is not None:
                fds.append(({"name": "fleet"}, fleet[0]))
                hello["fleet"] = fleet[1]
            timeout = self.reloader.current.runtime.upgrade_timeout
            try:
                await asyncio.wait_for(send_everything(child, fds, hello, self._workers_tcp_sockets), timeout)
            except OSError as exc:
                # gone already: wait_ready tells how (its failure message is queued)
                log.debug("upgrade: cannot send to the new master: %s", exc)
            except asyncio.TimeoutError:
                raise UpgradeError(f"the new master (pid {child.pid}) did not take what this one hands over "
                                   f"within {timeout:g}s (runtime.upgrade_timeout): killed") from None
            finally:
                if state is not None:
                    os.close(state)
                if fleet is not None:
                    os.close(fleet[0])
            msg = await wait_ready(child, self.reloader.current.runtime.upgrade_timeout)
            if isinstance(msg.get("marks"), dict):
                marks.update(msg["marks"])
            if self._stopping:
                raise UpgradeError("stopping: the upgrade is abandoned")
        except UpgradeError as exc:
            result.error = str(exc)
            if child is not None:
                await child.kill()
        else:
            assert child is not None
            await self._hand_over(child, msg)
            marks["released"] = time.monotonic()
            result.ok, result.new_pid = True, child.pid
        finally:
            self.upgrading = None
        result.duration_ms = (time.monotonic() - started) * 1000.0
        result.phases = phases_from(started, marks)
        log.info("upgrade steps (ms since the request): %s",
                 ", ".join(f"{name} {ms:.0f}" for name, ms in result.phases.items()) or "none")
        result.requests = self._upgrade_requests
        if self._stopping and self.handed_over_to is None and result.ok is False and result.error is None:
            result.error = "stopping"
        self.last_upgrade = result
        (log.info if result.ok else log.error)("%s", result.line())
        if not result.ok and not self._stopping:
            self.notify.send("READY=1", f"STATUS={result.line()}")
        return result

    async def _workers_tcp_sockets(self) -> AsyncGenerator[list[tuple[dict[str, Any], int]], None]:
        """Each old worker's TCP listening sockets in turn (``WorkerManager.tcp_listeners``),
        for the new worker of its id; each list's descriptors (copies) are closed once
        sent, before the next worker's are asked for: this master holds one worker's at most."""
        assert self.manager is not None
        for worker in [w.id for w in self.manager.live_workers()]:
            items = [({"worker": wid, **entry}, fd) for wid, entry, fd in await self.manager.tcp_listeners(worker=worker)]
            try:
                yield items
            finally:
                for _, fd in items:
                    os.close(fd)

    def _run_options(self) -> tuple[str, ...]:
        """The ``run`` options the new master of an upgrade needs beyond the file (``--etcd``,
        and the TLS files to etcd, which ``run --etcd-ca ...`` may have given)."""
        rt = self.config.runtime
        tls = (("--etcd-ca", rt.etcd_ca), ("--etcd-cert", rt.etcd_cert), ("--etcd-key", rt.etcd_key))
        return (("--etcd", self.etcd_option) if self.etcd_option is not None else ()) + \
            tuple(x for opt, path in tls if path is not None for x in (opt, path))

    def _fleet_text(self) -> tuple[int, dict[str, Any]] | None:
        """The fleet revision this instance runs, for the new master to start from: a memfd
        holding its TOML (any size), and the hello's ``fleet`` field (None: not in a fleet, or none yet)."""
        if self.fleet is None or self.fleet.applied_text is None:
            return None
        fd = os.memfd_create("hotproxy-fleet", os.MFD_CLOEXEC)
        view = memoryview(self.fleet.applied_text.encode())
        while view:
            view = view[os.write(fd, view):]
        return fd, {"source": self.fleet.source.url, "revision": self.fleet.applied}

    def _hand_over_fds(self) -> list[tuple[dict[str, Any], int]]:
        """What the new master gets: the admin socket, the Unix listeners, the old masters' channels."""
        assert self.manager is not None
        fds: list[tuple[dict[str, Any], int]] = []
        sock = self.admin.listening_socket() if self.admin is not None else None
        if sock is not None:
            fds.append(({"name": "admin"}, sock.fileno()))
        fds += [({"name": "listener", "path": path}, fd) for path, fd in self.manager.unix_sockets().items()]
        fds += [({"name": "activated"}, fd) for fd in self.manager.activated_sockets()]
        fds += self.old_masters.hand_over()
        if self.manager.limits is not None:
            fds.append(({"name": "counters"}, self.manager.limits.fd))
        metrics = self.metrics.listening_socket() if self.metrics is not None else None
        if metrics is not None:
            fds.append(({"name": "metrics"}, metrics.fileno()))
        if self.manager.health is not None:
            fds.append(({"name": "health"}, self.manager.health.fd))
        return fds

    def _hello(self) -> dict[str, Any]:
        from . import __version__

        assert self.reloader is not None and self.reloader.current is not None
        assert self.manager is not None
        cur = self.reloader.current
        limits = self.manager.limits
        # the counter regions each generation still counts in: this one's, and the draining ones'
        regions = {str(m.pid): m.regions for m in self.old_masters.alive()}
        if limits is not None:
            regions[str(os.getpid())] = [limits.region(w.id) for w in self.manager.workers]
        out: dict[str, Any] = {"pid": os.getpid(), "version": __version__,
               "admin_socket": self.admin.path if self.admin is not None else None,
               "listen": [svc.listen for svc in cur.services.values()],
               "counters": {"slots": limits.slot_names() if limits is not None else [], "regions": regions}}
        return out

    async def _hand_over(self, child: NewMasterProcess, ready: dict[str, Any]) -> None:
        """The new master serves: stop accepting, release what it takes over, drain."""
        inherited = ready.get("admin") == "inherited"
        if self.admin is not None:
            # admin connections queue on the socket for the new master from now on
            self.admin.hand_over(unlink=not inherited)
        self.handed_over_to, self._handed_over_at = child.pid, time.time()
        if self._fleet_task is not None:
            # the new master follows the fleet from now on, under the same instance id: this
            # one leaves first (its lease revoked, what it prepared aborted), then it joins
            self._fleet_task.cancel()
            await asyncio.wait([self._fleet_task], timeout=5.0)
        if self.manager is not None and self.manager.checker is not None:
            self.manager.checker.stop()   # the new master checks on, from the same states
        # systemd hears the new master from now on (MAINPID)
        self.notify.close()
        self.notify = Notifier({})
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.metrics is not None:
            # its socket stays open in the new master, which serves what queues on it meanwhile;
            # the scrapes accepted here are answered (the server closes when this master exits)
            self.metrics.hand_over()
        # the last counts: the old workers stop accepting (the new ones serve), then say what they counted
        last = write_state(await self.manager.snapshot(final=True)) if self.manager is not None else None
        try:
            await child.channel.send({"type": "released", "state": "final" if last is not None else None}, last)
        except OSError as exc:
            log.error("the new master (pid %d) is gone right after saying ready (%s)", child.pid, exc)
        finally:
            if last is not None:
                os.close(last)
        # the old masters still draining are the new master's to answer for now
        self.old_masters.close()
        child.close()   # the process lives on: only its pidfd is closed here
        self._serving_new = asyncio.get_running_loop().create_task(
            serve_new_master(child.channel, self._drain_status, self.request_stop))
        self.request_stop(True)

    async def _drain_status(self) -> dict[str, Any]:
        """What the new master shows of this one while it drains."""
        # (answered well within the 2 s the new master waits: a worker exiting is not waited for)
        workers = await self.manager.status(0.5, summary=True) if self.manager is not None else []
        left = 0
        for w in workers:
            left += (w.get("draining_connections") or 0) + (w.get("active") or 0)
            left += sum(site.get("active", 0) for site in (w.get("sites") or {}).values())
        drain = self.reloader.current.runtime.drain_timeout if self.reloader and self.reloader.current else None
        return {"pid": os.getpid(), "connections": left, "since": self._handed_over_at, "drain_timeout": drain,
                "workers": sum(1 for w in workers if w.get("alive"))}

    # -- upgrade: the new master's side ------------------------------------------------

    def _upgrade_failed(self, error: str) -> None:
        """Tell the old master this upgrade failed (a new master that cannot serve)."""
        if self.link is not None:
            self.link.failed(error)

    def _inherits_admin(self, hello: Hello | None) -> bool:
        return hello is not None and hello.admin is not None and hello.admin_socket == self.config.runtime.admin_socket

    def _follow_watchdog(self, old_pid: int) -> None:
        """systemd's watchdog was the old master's: it is ours (and our successors') now."""
        if os.environ.get("WATCHDOG_PID") == str(old_pid):
            os.environ["WATCHDOG_PID"] = str(os.getpid())
            self.notify = Notifier()

    async def _take_over(self, hello: Hello) -> bool:
        """Every worker serves: say ready, wait for the old master to release, take
        the admin socket, the pidfile and systemd's MAINPID.  False if told to stop first."""
        assert self.link is not None and self.admin is not None and self.manager is not None
        assert self._stop is not None
        if test_failure("hang"):
            log.warning("HOTPROXY_TEST_FAIL_UPGRADE=hang: this new master never says it is ready")
            await self._stop
            return False
        inherited = self._inherits_admin(hello)
        if test_pause():
            log.warning("HOTPROXY_TEST_UPGRADE_PAUSE: serving %gs before saying ready", test_pause())
            await asyncio.sleep(test_pause())
        released = await self.link.ready(inherited)
        if not released:
            log.warning("the old master (pid %d) went away before releasing: taking over", hello.pid)
        await self._carry_late()
        if inherited:
            assert hello.admin is not None
            sock, hello.admin = hello.admin, None
            await self.admin.start_inherited(sock)
        self.manager.own_adopted()
        rt = self.config.runtime
        try:
            self._write_pidfile(rt.pidfile, replacing=hello.pid)
        except PidfileError as exc:
            log.error("upgrade: %s", exc)
        handed = hello.fds.pop("metrics", None)
        metrics_sock = socket.socket(fileno=handed) if handed is not None else None
        if rt.metrics is not None:
            try:
                await self._start_metrics(rt.metrics, metrics_sock)
            except MetricsError as exc:
                log.error("upgrade: %s", exc)
        elif metrics_sock is not None:
            metrics_sock.close()
        self.upgraded_from = hello.pid
        if released:
            self.old_masters.add(OldMaster(hello.pid, self.link.channel, regions=hello.regions_of(hello.pid)))
        for pid, channel in hello.old_masters:
            self.old_masters.add(OldMaster(pid, channel, regions=hello.regions_of(pid)))
        hello.old_masters.clear()
        log.info("upgrade: took over from pid %d (%d old master%s draining)", hello.pid,
                 len(self.old_masters.alive()), "" if len(self.old_masters.alive()) == 1 else "s")
        return True

    async def _carry_late(self) -> None:
        """Add what the old workers counted between the snapshot and the hand-over."""
        assert self.link is not None and self.manager is not None
        fd, self.link.last_state = self.link.last_state, None
        first, self._seeded_from = self._seeded_from, None
        if fd is None:
            return
        last = read_state(fd)   # (closes it; None, with a warning, if unreadable)
        if first is not None and last is not None:
            await self.manager.carry_late(late_seeds_for(first, last, self.manager.count))

    # -- pidfile ----------------------------------------------------------------

    def _check_pidfile(self, path: str | None, replacing: int | None) -> None:
        """``_write_pidfile``'s checks, writing nothing (the old master's pid is expected there)."""
        if path is None:
            return
        problem, other = inspect_pidfile(path)
        if problem is not None:
            raise PidfileError(f"pidfile {path}: {problem}")
        if other and other not in (os.getpid(), replacing) and pid_alive(other):
            raise PidfileError(f"pidfile {path}: hotproxy already running as pid {other}")

    def _write_pidfile(self, path: str | None, replacing: int | None = None) -> None:
        """Write our pid to *path*: only over nothing, over a pidfile of a
        process that is gone, or over the pid of the master we upgrade
        (*replacing*) (``config.inspect_pidfile`` says what else is refused)."""
        if path is None:
            return
        self._check_pidfile(path, replacing)
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(tmp).st_mode):
                os.unlink(tmp)   # left by a master of the same pid that died writing it
        try:
            # O_EXCL | O_NOFOLLOW: never write through whatever sits at the temporary name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PidfileError(f"pidfile {path}: {exc.strerror or exc}") from None
        self._pidfile = path
        self._pidfile_ident = (st.st_dev, st.st_ino)

    def _remove_pidfile(self) -> None:
        """Remove the pidfile only if it is still the file this master created, holding our pid."""
        path, ident = self._pidfile, self._pidfile_ident
        self._pidfile = self._pidfile_ident = None
        if path is None or ident is None:
            return
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) != ident:
                return
            with open(path, "rb") as f:
                if f.read(64).strip() == str(os.getpid()).encode():
                    os.unlink(path)
        except OSError:
            pass


class HandedListener(ListenerFactory):
    """*sock*, a listening socket a new master got from the old one, as the
    listener of *original* (the same address): ``make()`` serves it as it is."""

    backlog = 64

    def __init__(self, sock: socket.socket, original: ListenerFactory) -> None:
        self.sock = sock
        self.original = original

    @property
    def address(self) -> str:
        return self.original.address

    def bind(self) -> BoundListener:
        sock = self.sock
        sock.setblocking(False)
        # a Unix socket's file is ours now: removed when it closes (if still ours)
        on_close = self.original.unlinker_now() if isinstance(self.original, UnixListenerFactory) else None
        return BoundListener(sock, self.original, on_close=on_close)


def _same_address(sock: socket.socket, listener: ListenerFactory) -> bool:
    """True if *sock* listens where *listener* would (``activation``'s keys)."""
    key = activation.key_of(sock)
    if isinstance(listener, UnixListenerFactory):
        return key == ("unix", listener.path)
    if isinstance(listener, TcpListenerFactory):
        addrs = listen_sockaddrs(listener)
        return bool(addrs) and key == activation.key_of_sockaddr(next(iter(addrs)))
    return False


#: ``_status_sliced`` turns the loop at least this often (seconds)
STATUS_SLICE = 0.005

#: a config file larger than this is parsed off the master's loop (about 300 services)
QUICK_LOAD_BYTES = 32 * 1024


def _big(path: str | None) -> bool:
    try:
        return path is not None and os.stat(path).st_size > QUICK_LOAD_BYTES
    except OSError:
        return False   # the load reports it


#: the lists of service names in a reload report
_REPORT_NAMES = ("added", "changed", "moved", "removed", "unchanged")


def _brief_report(report: ReloadReport) -> dict[str, Any]:
    """A report as a summary status carries it: how many services each list
    has (``"counts"``) and its line, not the names (10,000 of them)."""
    out = report.to_dict()
    out["counts"] = {key: len(out.pop(key)) for key in _REPORT_NAMES}
    out["line"] = report.summary()
    return out


def _upstreams(name: str, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Service *name*'s upstreams over the workers: sums, where each is ejected, and each worker's view."""
    out: dict[str, Any] = {}
    for w in workers:
        site = (w.get("sites") or {}).get(name)
        for addr, st in ((site or {}).get("stats") or {}).get("upstreams", {}).items():
            up = out.setdefault(addr, {"active": 0, "connections": 0, "failures": 0, "bytes_in": 0,
                                       "bytes_out": 0, "ejections": 0, "ejected_workers": [], "ejected_for": 0.0,
                                       "removed": False, "workers": {}})
            for key in ("active", "connections", "failures", "bytes_in", "bytes_out", "ejections"):
                up[key] += st.get(key, 0)
            if st.get("connect_times") is not None:
                up["connect_times"] = _add_histogram(up.get("connect_times"), st["connect_times"])
            if st.get("ejected_for", 0) > 0:
                up["ejected_workers"].append(w["worker"])
                up["ejected_for"] = max(up["ejected_for"], st["ejected_for"])
            up["removed"] = up["removed"] or bool(st.get("removed"))
            # the options (the same on every worker) and the instance's count of a limited one
            for key in ("weight", "backup", "max_connections"):
                if key in st:
                    up[key] = st[key]
            if "instance_active" in st:
                up["instance_active"] = max(up.get("instance_active", 0), st["instance_active"])
            up["workers"][str(w["worker"])] = {k: st.get(k) for k in ("active", "connections", "failures",
                                                                       "fails", "ejected_for")}
    return out


def _sni_routes(name: str, workers: list[dict[str, Any]], upstreams: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Service *name*'s ``sni_routes`` over the workers (None: it has none), in
    the order a name is matched: each exact name, each ``*.suffix``, then the
    default group (``"match": "default"``, ``"name": None``; no upstreams: none,
    an unmatched name is closed).  Each with its upstreams' state (see
    ``_upstream_state``; *upstreams* is ``_upstreams``' answer, health merged)
    and ``connections``, the ones it took, summed over the workers.  The
    routes are the newest generation's (a reload may be half-way)."""
    newest: dict[str, Any] | None = None
    generation = -1
    routed: dict[str, int] = {}
    for w in workers:
        site = (w.get("sites") or {}).get(name) or {}
        stats = site.get("stats") or {}
        if not isinstance(stats.get("sni_routes"), dict):
            continue
        if site.get("generation", 0) > generation:
            newest, generation = stats, site.get("generation", 0)
        for route, n in (stats.get("sni_routed") or {}).items():
            routed[route] = routed.get(route, 0) + n
    if newest is None:
        return None
    groups: list[tuple[str | None, str, list[str]]] = []
    names = newest["sni_routes"]
    groups += [(r, "exact", addrs) for r, addrs in names.items() if not r.startswith("*.")]
    groups += [(r, "suffix", addrs) for r, addrs in names.items() if r.startswith("*.")]
    groups.append((None, "default", list(newest.get("sni_default") or ())))
    out = []
    for route, match, addrs in groups:
        ups = {}
        for addr in addrs:
            up = upstreams.get(addr) or {}
            ups[addr] = {"state": _upstream_state(up), "active": up.get("active", 0),
                         "connections": up.get("connections", 0), "weight": up.get("weight", 1),
                         "backup": bool(up.get("backup"))}
        out.append({"name": route, "match": match, "upstreams": ups,
                    "connections": routed.get(route if route is not None else "", 0)})
    return out


def _upstream_state(up: dict[str, Any]) -> str:
    """An upstream's state in one word: its health check's ``up``/``down``
    (the instance's), else ``ejected`` while a worker has it ejected, else ``up``."""
    checked = up.get("health")
    if checked is not None:
        return str(checked.get("state", "up"))
    return "ejected" if up.get("ejected_workers") else "up"


def _add_histogram(total: dict[str, Any] | None, h: dict[str, Any]) -> dict[str, Any]:
    """*h* (``bounds``, ``counts``, ``count``, ``sum``) added to *total* (None: the first)."""
    if total is None:
        return {"bounds": list(h["bounds"]), "counts": list(h["counts"]), "count": h["count"], "sum": h["sum"]}
    if total["bounds"] != h["bounds"]:
        return total   # cannot happen within one program: every worker runs the same core
    return {"bounds": total["bounds"], "counts": [a + b for a, b in zip(total["counts"], h["counts"])],
            "count": total["count"] + h["count"], "sum": total["sum"] + h["sum"]}


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


#: descriptors a process needs beyond one per listener (connections, channels, files)
NOFILE_SLACK = 256


def raise_nofile(services: int) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (inherited by the
    workers, which do the same); log it, and warn when even that is too low
    for *services* listeners.  Returns the (soft, hard) limits now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("RLIMIT_NOFILE raised from %d to the hard limit %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("RLIMIT_NOFILE: cannot raise %d to the hard limit %d (%s)", soft, hard, exc)
    else:
        log.info("RLIMIT_NOFILE is %d (the hard limit)", soft)
    if soft != resource.RLIM_INFINITY and services + NOFILE_SLACK > soft:
        log.warning("RLIMIT_NOFILE %d is too low for %d services: each worker needs a descriptor per listener "
                    "plus one or two per connection; raise the hard limit (ulimit -Hn, LimitNOFILE= in systemd)",
                    soft, services)
    return soft, hard


def setup_logging(level: str, fmt: str = "text") -> None:
    """The master's logging (workers use the same level and format, tagged with their id)."""
    logs.configure(level, fmt, "master")


__all__ = ["ADMIN_COMMANDS", "Master", "PidfileError", "setup_logging"]
