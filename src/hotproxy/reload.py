"""The all-or-nothing reload: from the config that runs to the one in the file.

Rules of this module (docs/architecture.md, "The reload"):

* **Diff** the new config against what runs: added, changed (in place, or
  *moved* to another listener), removed, unchanged.  An unchanged service
  gets no command at all -- its generation, connections and state are not
  touched.
* **Prepare**: ``Precommit`` every added and changed service on every
  worker, carrying a listener factory when the listener is new or moved, so
  that the listener is *bound* now and ``Commit`` cannot fail on its
  address.  Before that the master probes each address no running service
  holds: ``SO_REUSEPORT`` would let our workers share a port with another
  program of the same user, so only a plain bind can tell it is taken.
* **Any failure anywhere** -- a bad file (whatever loading it raised), a
  file without services (unless the reload was asked for with
  ``allow_empty``: a signal can never empty an instance), a busy port, a factory failing on
  one worker, a worker dying -- and every service prepared so far is
  ``Abort``-ed on every worker.  The old config keeps serving exactly as
  before; the report says why, per worker.
* Else **commit**: ``Commit`` added and moved services (the new listener
  accepts before the old one closes, so a move refuses nobody), ``Update``
  the changed-in-place ones, ``Remove`` the removed ones (they drain in the
  background).
* Reloads are serialized by one lock: one arriving during another runs
  after it, against the config the first one left.
* Each phase sends all its commands to every worker at once, in one message
  per worker (the manager's ``dispatch_many``; a worker runs them one at a
  time, in order, in slices with a loop turn between), so a phase waits once
  for the slowest worker, not once per service.
* A reload costs what it changes: the load takes an unchanged service's
  ``ServiceConfig`` from the running config (``load_config(previous=...)``:
  one comparison of its raw table, no checks, no build), the diff then
  finds it by identity (``ServiceConfig.same_as``), and it gets no
  command; the running addresses the probe needs are an index kept with
  each change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import operator
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence, TypeVar

from .commands import Abort, Commit, Precommit, Remove, Update
from .config import Config, NeedsLookup, ServiceConfig, listen_sockaddrs, no_services_error, probe_bind
from .errors import ConfigError, HotproxyError, SiteNotFoundError, WorkerTimeoutError, describe
from .listeners import TcpListenerFactory, parse_address
from .report import failure_line, summary_line

if TYPE_CHECKING:
    from .manager import ResultGroup
    from .workers import WorkerHandle

log = logging.getLogger("hotproxy.reload")

_T = TypeVar("_T")

#: services (old and new) above which the diff runs in a thread
DIFF_IN_THREAD = 1000

#: runtime keys a reload cannot change (they need a restart); the others
#: (drain_timeout, log_level, log_format, reload_timeout, admin_idle_timeout) apply at once
RESTART_ONLY = ("workers", "cpu_affinity", "admin_socket", "pidfile", "tcp_migrate_req", "metrics",
                "config_source", "instance_id", "listen_host", "fleet_lease_ttl")
# (an upgrade -- ``hotproxy upgrade`` -- is a restart that refuses nobody: it applies them all)


#: fresh services (``Config.fresh``) up to which ``diff_fresh`` takes them out of a
#: copy of every name one by one (each a scan at C speed) rather than filter every name
FEW_FRESH = 2

#: the interpreter's thread switch interval while a reload works in a thread
#: (``sys.setswitchinterval``; Python's default is 5 ms)
THREAD_SWITCH_INTERVAL = 0.0005


async def _in_thread(func: Callable[..., _T], *args: Any) -> _T:
    """``asyncio.to_thread(func, *args)``, with the loop kept responsive.

    The thread (parsing 10,000 services) holds the GIL, and the loop gets
    it back only when the thread is made to drop it, every switch interval:
    each system call of the loop -- a status request makes a dozen -- waits
    that long.  A shorter interval while the thread runs is the loop's
    latency; reloads run one at a time, so the interval is restored once.
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, THREAD_SWITCH_INTERVAL))
    try:
        return await asyncio.to_thread(func, *args)
    finally:
        sys.setswitchinterval(before)


@dataclass
class Diff:
    """How a new config differs from the running one (lists of service names)."""

    added: list[str] = field(default_factory=list)
    #: the changed services, moved ones included
    changed: list[str] = field(default_factory=list)
    #: the changed services whose listener changed (address or backlog)
    moved: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def diff(old: Mapping[str, ServiceConfig], new: Mapping[str, ServiceConfig]) -> Diff:
    """Compare two service tables by value (factories and listeners are frozen dataclasses).

    A service the load took from the running config as it was
    (``load_config(previous=...)``) is the same object in both: those are
    found by one identity scan at C speed (``_identical``), and only the
    others are looked at one by one -- a reload that changes one service
    among 10,000 compares one.
    """
    d = Diff()
    same = _identical(old, new)
    by_value = _classify(old, new, itertools.compress(new, map(operator.not_, same)), d)
    if by_value:
        d.unchanged = [name for name, s in zip(new, same) if s or name in by_value]
    else:
        d.unchanged = list(itertools.compress(new, same))
    if len(old) > len(new) - len(d.added):
        d.removed = list(itertools.filterfalse(new.__contains__, old))
    return d


def _classify(old: Mapping[str, ServiceConfig], new: Mapping[str, ServiceConfig],
              names: Iterable[str], d: Diff) -> set[str]:
    """Sort each of *names* (services of *new* that are not *old*'s own
    objects) into *d*'s added, changed and moved; return those equal by value."""
    by_value: set[str] = set()
    for name in names:
        before = old.get(name)
        svc = new[name]
        if before is None:
            d.added.append(name)
        elif before.same_as(svc):
            by_value.add(name)
        else:
            d.changed.append(name)
            if before.listener != svc.listener:
                d.moved.append(name)
    return by_value


def diff_fresh(old: Mapping[str, ServiceConfig], new: Mapping[str, ServiceConfig], fresh: Sequence[str]) -> Diff:
    """``diff(old, new)`` for a *new* loaded against *old* (``Config.base``):
    every service not in *fresh* is *old*'s own object, unchanged.  Costs
    what *fresh* holds, and two scans of the names at C speed."""
    d = Diff()
    by_value = _classify(old, new, fresh, d)
    skip = set(fresh) - by_value if fresh else ()
    if len(skip) <= FEW_FRESH:
        # a copy of the names (C speed), then each of the few fresh ones
        # taken out by a scan at C speed: no Python-level call per name, as
        # a filter over 10,000 names makes (~0.4 ms for 1 changed)
        d.unchanged = list(new)
        for name in skip:
            d.unchanged.remove(name)
    else:
        d.unchanged = list(itertools.filterfalse(skip.__contains__, new))
    if len(old) > len(new) - len(d.added):
        d.removed = list(itertools.filterfalse(new.__contains__, old))
    return d


def _identical(old: Mapping[str, ServiceConfig], new: Mapping[str, ServiceConfig]) -> list[bool]:
    """For each service of *new*, in order: is it the very object *old* has under its name?"""
    return list(map(operator.is_, map(old.get, new), new.values()))


def _to_compare(old: Mapping[str, ServiceConfig], new: Mapping[str, ServiceConfig]) -> int:
    """How many services ``diff`` would look at one by one: those of *new*
    that are not the same object in *old*, and the removed ones."""
    same = _identical(old, new)
    return len(same) - sum(same) + max(0, len(old) - len(new))


@dataclass
class Failure:
    """One thing that went wrong in a reload: where, in which phase, and why."""

    phase: str                 # "config", "prepare", "commit"
    error: str                 # one line
    service: str | None = None
    worker: int | None = None
    #: the worker stayed silent past ``reload_timeout`` and was killed
    timeout: bool = False

    def __str__(self) -> str:
        return failure_line(vars(self))


@dataclass
class ReloadReport:
    """The outcome of one reload, as the CLI and the log show it."""

    ok: bool
    source: str = ""
    seq: int = 0
    trigger: str = ""
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    #: the one-line reason a reload failed (None when ok)
    error: str | None = None
    failures: list[Failure] = field(default_factory=list)
    #: runtime changes that need a restart, and other things worth saying
    notes: list[str] = field(default_factory=list)
    #: wall-clock time the reload was asked for
    at: float = 0.0
    #: from the request (signal, admin command) until everything committed
    duration_ms: float = 0.0
    prepare_ms: float = 0.0
    commit_ms: float = 0.0
    #: reading and checking the file (in a thread for a big file); the rest
    #: of ``duration_ms`` is what the changes cost
    load_ms: float = 0.0
    #: services the load took from the running config as they were (same
    #: table, no name lookup), without checking and building them again
    reused: int = 0
    #: True when a failure came after some worker committed (should not happen)
    partial: bool = False
    #: how many reload requests this reload answered (requests that came
    #: while another reload ran are merged into the next one)
    requests: int = 1

    def summary(self) -> str:
        """One log line: ``reload ok: added=[..] changed=[..] ... in 3.2 ms``."""
        return summary_line(vars(self))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the admin socket sends this).

        Shallow (the name lists are the report's own, not copies): a status
        reply carries the last report, whose ``unchanged`` may name 10,000
        services, and ``dataclasses.asdict`` would deep-copy it each time.
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["failures"] = [dict(vars(f)) for f in self.failures]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReloadReport:
        """Inverse of ``to_dict``; unknown keys are ignored (newer masters)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["failures"] = [Failure(**{k: v for k, v in f.items() if k in ("phase", "error", "service", "worker",
                                                                         "timeout")})
                          for f in data.get("failures", [])]
        return cls(**kw)


@dataclass
class Staged:
    """What ``Reloader.prepare`` staged on every worker, for ``commit`` or ``abort``."""

    config: Config
    diff: Diff
    #: the services that ran when it was prepared
    running: Mapping[str, ServiceConfig]
    old_logging: tuple[str, str] | None
    #: the services with a ``Precommit`` on every worker
    prepared: list[str]
    report: ReloadReport
    #: ``time.monotonic()`` when ``prepare`` was asked for
    started: float = 0.0


class Workers(Protocol):
    """What a reload uses of the ``WorkerManager``."""

    @property
    def stopping(self) -> bool: ...

    def live_workers(self) -> list[WorkerHandle]:
        """The workers that take commands now."""

    def down_workers(self) -> list[int]:
        """The ids of the workers that do not (they get the deployment when they are back)."""

    async def dispatch_many(self, commands: Sequence[Any], *, timeout: float | None = None) -> list[ResultGroup]:
        """Run *commands* in order on every live worker; one result group each."""

    async def set_logging(self, level: str, fmt: str) -> None:
        """Tell every live worker its new log level."""


class Reloader:
    """Applies configs to a ``WorkerManager``, all or nothing, one at a time.

    ``current`` is the config that runs (None before the first apply).
    """

    def __init__(self, manager: Workers) -> None:
        self.manager = manager
        self.current: Config | None = None
        self.last: ReloadReport | None = None
        self.seq = 0
        #: reloads by outcome ("ok", "failed"), the first apply included (for metrics)
        self.results = {"ok": 0, "failed": 0}
        self._closed = False
        self._lock = asyncio.Lock()
        #: listen addresses another master of this instance holds (the one an
        #: upgrade takes over from): ours to share, not probed as a stranger's
        self.held: list[str] = []
        #: the index of ``_running_addresses`` (None: build it from ``current``)
        self._ours: dict[tuple[Any, ...], int] | None = None

    def close(self) -> None:
        """Refuse reloads from now on (the instance is stopping); one running finishes."""
        self._closed = True

    @property
    def busy(self) -> bool:
        """True while a reload runs."""
        return self._lock.locked()

    async def reload(self, load: Callable[[], Config] | Config, *, trigger: str = "",
                     started: float | None = None,
                     quick_load: Callable[[], Config] | None = None,
                     allow_empty: bool = False) -> ReloadReport:
        """Load (in a thread: it resolves host names) and apply a config.

        *quick_load*, if given, is tried first in the loop: it loads a
        config that needs no name lookup, or raises ``NeedsLookup`` (then
        *load* runs in a thread).  A config without services is refused
        unless *allow_empty* (it would stop serving everything).

        *started* is the ``time.monotonic()`` of the request, so the reported
        duration includes any wait behind another reload.  Never raises for
        a bad config or a failed deployment: the report says what happened.
        """
        started = time.monotonic() if started is None else started
        at = time.time() - (time.monotonic() - started)
        async with self._lock:
            self.seq += 1
            report = ReloadReport(ok=False, seq=self.seq, trigger=trigger, at=at)
            if self._closed:
                report.error = "stopping: reload not applied"
                report.failures.append(Failure("config", report.error))
                report.duration_ms = (time.monotonic() - started) * 1000.0
                return report
            try:
                t_load = time.monotonic()
                try:
                    config = await self._load(load, quick_load)
                finally:
                    report.load_ms = (time.monotonic() - t_load) * 1000.0
                report.reused = config.reused
                if not config.services and not allow_empty:
                    hint = "hotproxy reload --allow-empty" + \
                        ("; a signal never empties hotproxy" if trigger == "SIGHUP" else "")
                    raise no_services_error(config.source, hint)
            except Exception as exc:
                # whatever loading raised (the loader turns its own failures
                # into ConfigError): one line in the report, never a task
                # exception nobody retrieves
                error = str(exc) if isinstance(exc, ConfigError) else \
                    f"cannot load the config: {describe(exc, typed=True)}"
                report.error = error
                report.failures.append(Failure("config", error))
            else:
                report.source = config.source
                await self._apply(config, report)
            report.duration_ms = (time.monotonic() - started) * 1000.0
            self._finish(report)
        return report

    @staticmethod
    async def _load(load: Callable[[], Config] | Config,
                    quick_load: Callable[[], Config] | None) -> Config:
        if isinstance(load, Config):
            return load
        if quick_load is not None:
            try:
                return quick_load()
            except NeedsLookup:
                pass
        return await _in_thread(load)

    # -- prepare and commit as separate steps (a fleet: ``fleet.py``) -----------

    async def prepare(self, config: Config, *, trigger: str = "") -> tuple[ReloadReport, Staged | None]:
        """The first half of ``reload`` for an already loaded *config*: every
        check and every ``Precommit``, nothing committed.

        On success the reload lock stays held (local reloads wait) until
        ``commit`` or ``abort`` is called with the returned ``Staged``, which
        the caller must do; on failure everything prepared is aborted, the
        lock is released and ``Staged`` is None.  Never raises for a config
        that cannot be applied: the report says why.
        """
        started = time.monotonic()
        await self._lock.acquire()
        self.seq += 1
        report = ReloadReport(ok=False, seq=self.seq, trigger=trigger, at=time.time(), source=config.source)
        staged: Staged | None = None
        try:
            if self._closed:
                report.error = "stopping: reload not applied"
                report.failures.append(Failure("config", report.error))
            else:
                staged = await self._prepare(config, report)
        finally:
            if staged is None:
                self._lock.release()
        if staged is None:
            report.duration_ms = (time.monotonic() - started) * 1000.0
            self._finish(report)
        else:
            staged.started = started
        return report, staged

    async def commit(self, staged: Staged) -> ReloadReport:
        """Commit what ``prepare`` staged (nothing should fail: listeners are bound)."""
        try:
            await self._commit(staged, staged.report)
        finally:
            self._lock.release()
        staged.report.duration_ms = (time.monotonic() - staged.started) * 1000.0
        self._finish(staged.report)
        return staged.report

    async def abort(self, staged: Staged, reason: str) -> ReloadReport:
        """Drop what ``prepare`` staged, on every worker; the running config stays."""
        try:
            await self._abort(staged.prepared)
        finally:
            self._lock.release()
        report = staged.report
        report.error = reason
        report.failures.append(Failure("prepare", reason))
        report.duration_ms = (time.monotonic() - staged.started) * 1000.0
        self._finish(report)
        return report

    def _finish(self, report: ReloadReport) -> None:
        self.last = report
        self.results["ok" if report.ok else "failed"] += 1
        (log.info if report.ok else log.error)("%s", report.summary())
        for failure in report.failures[1:]:
            log.error("reload failure: %s", failure)
        for note in report.notes:
            log.warning("reload: %s", note)

    # -- the phases -------------------------------------------------------------

    async def _apply(self, config: Config, report: ReloadReport) -> None:
        staged = await self._prepare(config, report)
        if staged is not None:
            await self._commit(staged, report)

    async def _prepare(self, config: Config, report: ReloadReport) -> Staged | None:
        """Diff, probe and ``Precommit``; None after a failure (all aborted)."""
        running = self.current.services if self.current is not None else {}
        old_logging = ((self.current.runtime.log_level, self.current.runtime.log_format)
                       if self.current is not None else None)
        if self.current is not None and config.base is self.current.token:
            # loaded against what runs: only the services the load checked
            # and built can differ (a reload changing one among 10,000 looks at one)
            d = diff_fresh(running, config.services, config.fresh)
        elif _to_compare(running, config.services) > DIFF_IN_THREAD:
            # a comparison per service, thousands of them: off the loop, which
            # keeps answering status and signals meanwhile (a service the load
            # took from the running config is found by identity, at no cost)
            d = await _in_thread(diff, running, config.services)
        else:
            d = diff(running, config.services)
        report.added, report.changed, report.moved = d.added, d.changed, d.moved
        report.removed, report.unchanged = d.removed, d.unchanged
        config = self._runtime(config, report)
        down = self.manager.down_workers()
        for worker_id in down:
            # the manager brings it to the recorded deployment when it is back
            report.notes.append(f"worker {worker_id} is down: it gets this config when it restarts")
        if (d.added or d.changed) and down and not self.manager.live_workers():
            # Nobody could build the new services, so nothing would check them:
            # refuse rather than record a config no worker has proved.
            report.error = "no worker is running to build the new services on; the old config stays; retry"
            report.failures.append(Failure("prepare", report.error))
            return None

        timeout = config.runtime.reload_timeout
        t0 = time.monotonic()
        # (in a thread: a probe may resolve host names; nothing new, nothing to probe)
        failures = await _in_thread(self._probe, config, d) if d.added or d.moved else []
        prepared: list[str] = []
        if not failures:
            # every Precommit sent at once (each worker runs them in order)
            cmds = []
            for name in d.added + d.changed:
                svc = config.services[name]
                new_listener = name in d.added or name in d.moved
                cmds.append(Precommit(name, svc.factory, svc.listener if new_listener else None))
            prepared = [cmd.name for cmd in cmds]
            failures = [f for fs in await self._dispatch_all(cmds, "prepare", timeout) for f in fs]
        report.prepare_ms = (time.monotonic() - t0) * 1000.0
        if not failures and self._stopping():
            failures = [Failure("prepare", "interrupted: hotproxy is stopping")]
        if failures:
            report.failures.extend(failures)
            report.error = str(failures[0])
            await self._abort(prepared)
            return None
        # (``running`` is the running config's own table, never changed in
        # place: no copy of 10,000 entries)
        return Staged(config, d, running, old_logging, prepared, report)

    async def _commit(self, staged: Staged, report: ReloadReport) -> None:
        """``Commit``/``Update``/``Remove``: nothing should fail here."""
        config, d, running, old_logging = staged.config, staged.diff, staged.running, staged.old_logging
        timeout = config.runtime.reload_timeout
        t1 = time.monotonic()
        #: the services whose commit failed somewhere (they keep their old entry)
        kept: set[str] = set()
        commits: list[tuple[str, Commit | Update | Remove]] = [(name, Commit(name)) for name in d.added + d.moved]
        commits += [(name, Update(name)) for name in d.changed if name not in d.moved]
        drain = config.runtime.drain_timeout
        commits += [(name, Remove(name, drain)) for name in d.removed]
        outcomes = await self._dispatch_all([step for _, step in commits], "commit", timeout)
        if self._stopping():
            report.failures.append(Failure("commit", "interrupted: hotproxy is stopping"))
        for (name, step), failed in zip(commits, outcomes):
            # A worker killed for its silence is restarted from the record,
            # which has this commit: the new config, like the others.
            for f in failed:
                if f.timeout:
                    report.notes.append(f"{f}; it restarts with the new config")
            failed = [f for f in failed if not f.timeout]
            if failed:
                # Workers that committed serve the new version; keep the old
                # entry so the next reload tries this service again.
                report.failures.extend(failed)
                kept.add(name)
        report.commit_ms = (time.monotonic() - t1) * 1000.0
        if kept:
            # (rare: a commit that failed) the old entries of those services,
            # the new ones of the others, in the file's order for status tables
            services = dict(running)
            for name, step in commits:
                if name in kept:
                    continue
                if isinstance(step, Remove):
                    services.pop(name, None)
                else:
                    services[name] = config.services[name]
            ordered = {n: services[n] for n in config.services if n in services}
            ordered.update((n, s) for n, s in services.items() if n not in ordered)
            self.current = dataclasses.replace(config, services=ordered, token=object())
            self._ours = None   # rebuilt from ``current`` when next needed
        else:
            # everything committed: the file's table is what runs, as it is
            # (no copy of 10,000 entries for a reload that changed one)
            self._note_listeners(running, config.services, d)
            self.current = config
        if report.failures:
            report.partial = True
            report.error = str(report.failures[0])
        else:
            report.ok = True
            new_logging = (config.runtime.log_level, config.runtime.log_format)
            if old_logging is not None and old_logging != new_logging:
                await self._set_logging(*new_logging)

    def _runtime(self, config: Config, report: ReloadReport) -> Config:
        """Keep the runtime keys a reload cannot change, and say so."""
        if self.current is None:
            return config
        old, new = self.current.runtime, config.runtime
        keep = {}
        for key in RESTART_ONLY:
            if getattr(old, key) != getattr(new, key):
                report.notes.append(f"runtime.{key} changed ({getattr(old, key)!r} -> {getattr(new, key)!r}): "
                                    "restart hotproxy to apply it")
                keep[key] = getattr(old, key)
        return dataclasses.replace(config, runtime=dataclasses.replace(new, **keep)) if keep else config

    def _probe(self, config: Config, d: Diff) -> list[Failure]:
        """Bind-probe every new TCP address no running service holds
        (``config.probe_bind`` says why only a plain bind can tell)."""
        ours = set(self._running_addresses())
        for address in self.held:
            try:
                held = parse_address(address)
            except ValueError:
                continue
            if isinstance(held, TcpListenerFactory):
                ours.update(listen_sockaddrs(held))
        failures = []
        for name in d.added + d.moved:
            lf = config.services[name].listener
            if not isinstance(lf, TcpListenerFactory):
                continue
            addrs = listen_sockaddrs(lf)
            if addrs & ours:
                continue
            error = probe_bind(lf)
            if error is not None:
                failures.append(Failure("prepare", f"cannot listen on {lf.address}: {error}", service=name))
        return failures

    async def _dispatch_all(self, cmds: list[Any], phase: str, timeout: float) -> list[list[Failure]]:
        """Send *cmds* to every worker at once; the failures of each, in order.

        A worker silent for *timeout* is killed by the manager; its failures
        are marked ``timeout``.
        """
        try:
            groups = await self.manager.dispatch_many(cmds, timeout=timeout)
        except HotproxyError as exc:
            return [[Failure(phase, str(exc), service=cmd.name)] for cmd in cmds]
        out = []
        seen: set[int] = set()
        for cmd, group in zip(cmds, groups):
            failures = []
            for r in group.failures:
                timed_out = isinstance(r.error, WorkerTimeoutError)
                if timed_out and r.worker in seen:
                    continue   # one line per silent worker, not one per command
                if timed_out:
                    seen.add(r.worker)
                failures.append(Failure(phase, describe(r.error), service=None if timed_out else cmd.name,
                                        worker=None if timed_out else r.worker, timeout=timed_out))
            out.append(failures)
        return out

    def _running_addresses(self) -> dict[tuple[Any, ...], int]:
        """The TCP addresses the running services listen on -> how many hold each.

        Built once from ``current`` (in the probe's thread), then kept up to
        date with each reload's changes only (``_note_listeners``): a reload
        that adds one service among 10,000 does not resolve 10,000 addresses.
        """
        ours = self._ours
        if ours is None:
            ours = {}
            for svc in (self.current.services.values() if self.current is not None else ()):
                if isinstance(svc.listener, TcpListenerFactory):
                    for addr in listen_sockaddrs(svc.listener):
                        ours[addr] = ours.get(addr, 0) + 1
            self._ours = ours
        return ours

    def _note_listeners(self, old: Mapping[str, ServiceConfig], new: Mapping[str, ServiceConfig], d: Diff) -> None:
        """Update the index of running addresses with what *d* changed (only that)."""
        ours = self._ours
        if ours is None:
            return   # not built yet: it will be, from the new ``current``
        for name in d.removed + d.moved:
            lf = old[name].listener
            if isinstance(lf, TcpListenerFactory):
                for addr in listen_sockaddrs(lf):
                    left = ours.get(addr, 0) - 1
                    if left > 0:
                        ours[addr] = left
                    else:
                        ours.pop(addr, None)
        for name in d.added + d.moved:
            lf = new[name].listener
            if isinstance(lf, TcpListenerFactory):
                for addr in listen_sockaddrs(lf):
                    ours[addr] = ours.get(addr, 0) + 1

    def _stopping(self) -> bool:
        return self.manager.stopping

    async def _set_logging(self, level: str, fmt: str) -> None:
        """``runtime.log_level`` and ``log_format`` apply at once: here and on every worker."""
        from . import logs

        logs.configure(level, fmt, "master")
        await self.manager.set_logging(level, fmt)

    async def _abort(self, names: list[str]) -> None:
        """Drop everything this reload staged, on every worker."""
        try:
            groups = await self.manager.dispatch_many([Abort(name) for name in names])
        except HotproxyError as exc:
            log.error("abort %s: %s", ", ".join(map(repr, names)), exc)
            return
        for name, group in zip(names, groups):
            for r in group.failures:
                # a worker where the Precommit of a new site failed has no such site
                if not isinstance(r.error, SiteNotFoundError):
                    log.error("abort %r on worker %d: %s", name, r.worker, describe(r.error))


__all__ = ["Diff", "Failure", "ReloadReport", "Reloader", "Staged", "diff"]
