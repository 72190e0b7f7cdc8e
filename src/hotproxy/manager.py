"""The WorkerManager: worker processes, command broadcast, supervision.

The manager starts N workers (``python -m hotproxy.worker``), each with a
private control channel, and sends every command to all of them at once.
``dispatch`` returns a ``ResultGroup`` -- one result per worker -- whose
``raise_for_errors()`` raises every failure together.

It keeps a record of what is deployed (the factories and listeners of the
last successful commands), so that a worker that dies is restarted and
brought back to the current deployment -- every site staged and bound
first, then all committed -- before it answers any new command.  Commands
and restarts are serialized by one lock, so a command issued while a
worker is down is not lost: the restarted worker gets it from the record.

Nothing waits for a worker without limit.  A dispatch may give a
*silence deadline*: a worker that finishes none of the batch's commands for
that long (stopped, wedged, swapping) is killed, its unanswered commands
fail with ``WorkerTimeoutError``, and the supervisor restarts it from the
record like any worker that died.  ``status`` asks every worker at once and
reports one that does not answer promptly instead of waiting for it; ``stop``
kills whatever has not exited when its drain time is up.

``inline=True`` runs one executor in the caller's own loop, for embedding
and tests.

The manager also owns the instance's connection counters (``limits.Segment``:
shared memory every worker maps): it gives each service's limits their
slots as commands go out, and gives back a dead worker's counts.  Likewise
the instance's health table (``health.HealthTable``): each health-checked
upstream's slot is stamped into its factory as commands go out.

Split by what each part owns: the per-worker handles and their request and
reply are ``workers.py`` (``WorkerHandle``); the Unix sockets the master
binds once and sends to every worker are ``sharedsockets.py``; this module
keeps what needs the manager's lock and record together -- the dispatch,
the record, and the supervision that replays the record to a restarted
worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from .channel import EXIT_BOOT_FAILURE
from .commands import Abort, Commit, PrepareAndCommit, Precommit, Remove, Update, site_of
from .errors import CommandGroupError, DeployError, HotproxyError, WorkerError, WorkerTimeoutError, describe
from .fdreserve import FdReserve
from .health import Checked, Checker, HealthTable, wanted_checks
from .limits import GENERATIONS, Segment
from .listeners import ListenerFactory
from .service import MakeService
from .sharedsockets import SharedSockets
from .workers import InlineWorker, ProcessWorker, WorkerHandle

log = logging.getLogger("hotproxy.manager")


@dataclass
class WorkerResult:
    """The outcome of one command on one worker."""

    worker: int
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ResultGroup(Sequence[WorkerResult]):
    """One result per worker for one command."""

    def __init__(self, command: Any, results: list[WorkerResult]) -> None:
        self.command = command
        self.results = results

    def __getitem__(self, i: Any) -> Any:
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[WorkerResult]:
        return iter(self.results)

    @property
    def ok(self) -> bool:
        """True if the command succeeded on every worker."""
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list[WorkerResult]:
        return [r for r in self.results if not r.ok]

    def raise_for_errors(self) -> ResultGroup:
        """Raise every worker's failure together (a ``CommandGroupError``); else return self."""
        errors = [r.error for r in self.results if r.error is not None]
        if errors:
            name = type(self.command).__name__
            site = site_of(self.command) or "?"
            raise CommandGroupError(
                f"{name} {site!r} failed on {len(errors)} of {len(self.results)} workers",
                errors)  # type: ignore[arg-type]
        return self

    def __repr__(self) -> str:
        return f"<ResultGroup {type(self.command).__name__} ok={self.ok} {self.results!r}>"


@dataclass
class Deployment:
    """What a site serves: the record a restarted worker is rebuilt from."""

    factory: MakeService
    listener_factory: ListenerFactory


@dataclass
class _Staged:
    factory: MakeService | None
    listener_factory: ListenerFactory | None


#: seconds ``status`` waits for a worker's answer before reporting it as not answering
STATUS_TIMEOUT = 1.0


class WorkerManager:
    """Runs the six commands on every worker; supervises the workers.

    Use as ``async with WorkerManager(2) as m: (await m.dispatch(cmd)).raise_for_errors()``.
    """

    def __init__(self, workers: int | None = None, *, drain_timeout: float = 30.0,
                 cpu_affinity: bool = False, inline: bool = False, core: str | None = None,
                 boot_timeout: float = 10.0, command_timeout: float | None = None) -> None:
        self.inline = inline
        self.count = 1 if inline else (workers or os.cpu_count() or 1)
        self.drain_timeout = drain_timeout
        self.cpu_affinity = cpu_affinity
        self.core = core
        self.boot_timeout = boot_timeout
        #: the silence deadline of a dispatch that gives none, and of the
        #: replay that brings a restarted worker back (None: wait forever)
        self.command_timeout = command_timeout
        #: one handle per worker, by id (``WorkerHandle``: what the rest may use of them)
        self.workers: list[WorkerHandle] = []
        self.deployments: dict[str, Deployment] = {}
        self._staged: dict[str, _Staged] = {}
        self._lock = asyncio.Lock()
        self._stopping = False
        self._supervisors: list[asyncio.Task[None]] = []
        #: descriptors a restart can count on when the process has none left
        self._fd_reserve = FdReserve()
        #: called (worker_id, exitcode) when a worker dies; for logs and tests
        self.on_worker_exit: Any = None
        #: successful restarts, and attempts that failed (backed off), for status
        self.restarts = 0
        self.failed_restarts = 0
        #: listening sockets the master owns (Unix sockets)
        self._shared = SharedSockets()
        #: the instance's connection counters (made by ``start``)
        self.limits: Segment | None = None
        #: (fd, regions in use, slot names) of counters to adopt at ``start`` (an upgrade)
        self._adopt_counters: tuple[int, set[int], list[Any]] | None = None
        #: the instance's active health states (made by ``start``; the master's ``Checker`` fills them)
        self.health: HealthTable | None = None
        #: the health table's fd to adopt at ``start`` (an upgrade)
        self._adopt_health: int | None = None
        #: the active health checks of what is deployed (made by ``start``)
        self.checker: Checker | None = None
        #: ``start`` makes the checker paused (a new master during an upgrade; ``checker.resume()``)
        self.health_checks_paused = False
        #: the active checks each service's deployed and staged factories want
        #: (only services that want some), kept up to date per command
        #: (``_follow_health``): a dispatch costs what it names, not a walk
        #: over every deployment
        self._wanted: dict[str, list[Checked]] = {}

    async def __aenter__(self) -> WorkerManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every worker; raise ``WorkerError`` if one cannot start."""
        if self._adopt_counters is not None:
            fd, used, names = self._adopt_counters
            self._adopt_counters = None
            try:
                self.limits = Segment.adopt(fd, self.count, used, names)
            except ValueError as exc:
                os.close(fd)
                log.warning("the connection counters of the master before the upgrade cannot be shared (%s): "
                            "max_connections does not count the connections it still drains", exc)
        if self._adopt_health is not None:
            fd, self._adopt_health = self._adopt_health, None
            try:
                self.health = HealthTable.adopt(fd)
            except ValueError as exc:
                os.close(fd)
                log.warning("the health states of the master before the upgrade cannot be read (%s): "
                            "every checked upstream starts up", exc)
        if self.health is None:
            self.health = HealthTable.create()
        self.checker = Checker(self.health, paused=self.health_checks_paused)
        if self.limits is None:
            self.limits = Segment.create(self.count, worker=0 if self.inline else -1,
                                         generations=1 if self.inline else GENERATIONS)
        if self.inline:
            self.workers = [InlineWorker(0, self.drain_timeout)]
            return
        procs = [ProcessWorker(i, self) for i in range(self.count)]
        self.workers = list(procs)
        try:
            await asyncio.gather(*(w.start() for w in procs))
            for w in procs:
                w.ready = True
        except BaseException:
            await asyncio.gather(*(w.stop(False, 0) for w in procs), return_exceptions=True)
            self.limits.close()
            self.health.close()
            raise
        loop = asyncio.get_running_loop()
        self._supervisors = [loop.create_task(self._supervise(w)) for w in procs]

    # -- commands -------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called."""
        return self._stopping

    def _stop_asked(self) -> bool:
        return self._stopping

    def live_workers(self) -> list[WorkerHandle]:
        """The workers that take commands now: alive and brought to the deployment."""
        return [w for w in self.workers if w.alive and w.ready]

    def down_workers(self) -> list[int]:
        """The ids of the others: they get the deployment when they are back."""
        return [w.id for w in self.workers if not (w.alive and w.ready)]

    def kill_all(self) -> None:
        """Kill every worker process now (a second stop request: no more draining).

        Does not wait: the stop in progress reaps them.
        """
        for w in self.workers:
            w.kill()

    async def dispatch(self, command: Any, *, timeout: float | None = None) -> ResultGroup:
        """Run *command* on every live worker concurrently; one result each.

        A worker that is down is left out; it gets the outcome from the
        deployment record when it is restarted.  *timeout* (default:
        ``command_timeout``): see ``dispatch_many``.
        """
        return (await self.dispatch_many([command], timeout=timeout))[0]

    async def dispatch_many(self, commands: Sequence[Any], *,
                            timeout: float | None = None) -> list[ResultGroup]:
        """Run *commands*, in order, on every live worker; one result group each.

        Each worker runs them one at a time in this order, exactly as if they
        were dispatched one by one; but all are sent at once, in one message
        per worker process, so the whole batch costs one pickle, one write
        and one wait for the slowest worker instead of one per command (a
        reload that changes many services).

        *timeout* (default: ``command_timeout``) bounds how long a worker
        may stay silent: one that finishes none of its remaining commands
        for that long is killed (and restarted from the record); those
        commands fail on it with ``WorkerTimeoutError``.  A batch that keeps
        making progress is never cut short.
        """
        if not commands:
            return []
        if timeout is None:
            timeout = self.command_timeout
        if self.limits is not None:
            commands = [self.limits.stamp(cmd) for cmd in commands]
        if self.health is not None:
            commands = [self.health.stamp(cmd) for cmd in commands]
        async with self._lock:
            live = self.live_workers()
            try:
                per_worker = await asyncio.gather(*(self._in_order(w, commands, timeout) for w in live))
                return [self._gathered(cmd, live, [outs[i] for outs in per_worker])
                        for i, cmd in enumerate(commands)]
            finally:
                # Once per batch, after every command is recorded: a socket
                # bound for a later command of the batch is not released
                # because an earlier one was recorded first.
                self._release_shared()
                self._follow_health({n for n in map(site_of, commands) if n is not None})

    def _follow_health(self, names: Iterable[str]) -> None:
        """Check what is deployed and staged, nothing else (a slot stamped for a
        command that failed everywhere is freed).

        Only *names* (the services a dispatch's commands named: nothing else
        changed) are asked again; the checker is then given every wanted
        check, which costs what is health-checked, not what is deployed.  A
        reload that changes one service among 10,000 does not ask 10,000
        factories for their checks (that walk cost ~40 ms per phase).
        """
        if self.checker is None:
            return
        for name in names:
            factories = []
            dep = self.deployments.get(name)
            if dep is not None:
                factories.append((name, dep.factory))
            staged = self._staged.get(name)
            if staged is not None and staged.factory is not None:
                factories.append((name, staged.factory))
            wanted = wanted_checks(factories)
            if wanted:
                self._wanted[name] = wanted
            else:
                self._wanted.pop(name, None)
        self.checker.configure([c for checks in self._wanted.values() for c in checks])

    def _gathered(self, command: Any, live: list[WorkerHandle], outcomes: Sequence[Any]) -> ResultGroup:
        results = []
        for w, out in zip(live, outcomes):
            if isinstance(out, BaseException):
                if not isinstance(out, Exception):
                    raise out
                if type(out) is WorkerError and not w.alive:
                    # It died under the command (kill -9 just before a reload):
                    # that is not the command failing.  Leave it out like a
                    # worker that was already down; its restart replays the
                    # deployment record, which this command updates below.
                    log.warning("worker %d died during %s %r: it gets the result when it restarts",
                                w.id, type(command).__name__, site_of(command) or "")
                    continue
                results.append(WorkerResult(w.id, error=out))
            else:
                results.append(WorkerResult(w.id, value=out))
        group = ResultGroup(command, results)
        # Record it if it applied somewhere, or if no worker was there to
        # fail it: the ones that died or were killed for their silence
        # replay the record when they come back.
        if any(r.ok for r in results) or all(isinstance(r.error, WorkerTimeoutError) for r in results):
            self._record(command)
        return group

    def _record(self, cmd: Any) -> None:
        name = cmd.name
        if isinstance(cmd, Precommit):
            self._staged[name] = _Staged(cmd.factory, cmd.listener_factory)
        elif isinstance(cmd, Update):
            staged = self._staged.pop(name, None)
            if staged is not None and staged.factory is not None and name in self.deployments:
                self.deployments[name].factory = staged.factory
                if staged.listener_factory is not None:
                    self._staged[name] = _Staged(None, staged.listener_factory)
        elif isinstance(cmd, Commit):
            staged = self._staged.pop(name, None)
            old = self.deployments.get(name)
            factory = staged.factory if staged and staged.factory else (old.factory if old else None)
            lf = cmd.listener_factory or (staged.listener_factory if staged else None) or \
                (old.listener_factory if old else None)
            if factory is not None and lf is not None:
                self.deployments[name] = Deployment(factory, lf)
        elif isinstance(cmd, PrepareAndCommit):
            self._staged.pop(name, None)
            self.deployments[name] = Deployment(cmd.factory, cmd.listener_factory)
        elif isinstance(cmd, Abort):
            self._staged.pop(name, None)
        elif isinstance(cmd, Remove):
            self._staged.pop(name, None)
            self.deployments.pop(name, None)

    async def _in_order(self, worker: WorkerHandle, commands: Sequence[Any],
                        timeout: float | None) -> list[Any]:
        """Each command's outcome on *worker* (a value or an exception), in order.

        A worker process gets them all in one message (``_batch``); with a
        *timeout*, one that answers none of the commands still pending for
        that long is killed (``kill_silent``), which fails them.  An inline
        worker runs in our own loop (it cannot be silent, nor killed): every
        command is started before the first is awaited, in creation order.
        """
        if isinstance(worker, ProcessWorker):
            return await self._batch(worker, commands, timeout)
        tasks = [asyncio.ensure_future(self._execute(worker, c)) for c in commands]
        return await asyncio.gather(*tasks, return_exceptions=True)

    async def _batch(self, worker: ProcessWorker, commands: Sequence[Any], timeout: float | None) -> list[Any]:
        """*commands* on a worker process in one message (``ProcessWorker.execute_batch``):
        one pickle and one write per worker per phase, however many services
        change.  A command naming a Unix listener the master cannot send
        fails alone (the others run), as if sent one by one."""
        outcomes: list[Any] = [None] * len(commands)
        send: list[Any] = []
        where: list[int] = []
        for i, command in enumerate(commands):
            try:
                send.append(self._shared.for_worker(command, worker))
                where.append(i)
            except DeployError as exc:
                outcomes[i] = exc.on_worker(worker.id)
            except WorkerError as exc:
                outcomes[i] = exc
        for i, out in zip(where, await worker.execute_batch(send, timeout)):
            outcomes[i] = out
        return outcomes

    async def _execute(self, worker: WorkerHandle, command: Any) -> Any:
        """*command* on *worker*; a Unix listener it names is the master's socket.

        (Unix paths cannot be bound once per worker; TCP uses ``SO_REUSEPORT``.)
        """
        if isinstance(worker, ProcessWorker):
            try:
                command = self._shared.for_worker(command, worker)
            except DeployError as exc:
                raise exc.on_worker(worker.id)
        return await worker.execute(command)

    def _release_shared(self) -> None:
        """Close the master's sockets nothing uses (``SharedSockets.release_unused``).

        A path is in use while a deployment or a staged command names it.
        Called once per dispatch, after every command of it is recorded, so
        no command is in flight: a socket bound for a command that failed
        everywhere (not recorded) is released here too.
        """
        if not self._shared.sockets():
            return   # no Unix listener: nothing to release (and no walk over 10,000 deployments)
        used = [d.listener_factory for d in self.deployments.values()]
        used += [s.listener_factory for s in self._staged.values() if s.listener_factory is not None]
        self._shared.release_unused(used)

    async def status(self, timeout: float = STATUS_TIMEOUT, *, names: Sequence[str] | None = None,
                     summary: bool = False) -> list[dict[str, Any]]:
        """Each worker's status (sites, generations, connections), or its error.

        Every worker is asked at once; one that has not answered within
        *timeout* is reported as not answering (``"answering": False``), never
        waited for.  *names*: only those sites; *summary*: counts, no site
        (``ServiceExecutor.status_sliced``).
        """
        return list(await asyncio.gather(*(self._worker_status(w, timeout, names, summary) for w in self.workers)))

    @staticmethod
    async def _worker_status(w: WorkerHandle, timeout: float, names: Sequence[str] | None = None,
                             summary: bool = False) -> dict[str, Any]:
        entry: dict[str, Any] = {"worker": w.id, "pid": w.pid, "alive": w.alive, "ready": w.ready,
                                 "answering": False}
        if w.alive:
            try:
                entry.update(await asyncio.wait_for(w.status(names, summary), timeout))
                entry["answering"] = True
            except asyncio.TimeoutError:
                entry["error"] = f"not answering (no status within {timeout:g}s)"
            except HotproxyError as exc:
                entry["error"] = describe(exc)
        return entry

    async def set_logging(self, level: str, fmt: str) -> None:
        """Tell every live worker its new log level and format (best effort, bounded)."""
        async def one(w: WorkerHandle) -> None:
            if not w.alive:
                return
            try:
                await asyncio.wait_for(w.set_logging(level, fmt), STATUS_TIMEOUT)
            except (HotproxyError, asyncio.TimeoutError):
                pass   # a restarted worker gets the level in its hello
        await asyncio.gather(*(one(w) for w in self.workers))

    # -- supervision ----------------------------------------------------------

    async def _supervise(self, w: ProcessWorker) -> None:
        delay = 0.0
        self._fd_reserve.refill()
        # (a method, not self._stopping: stop() sets it while this awaits, which
        # a type checker narrowing the attribute cannot know)
        while not self._stop_asked():
            code = await w.wait()
            w.alive = w.ready = False
            self._shared.forget_handed(w.id)   # an upgrade's sockets passed on to it are gone with it
            if self._stop_asked():
                return
            assert self.limits is not None
            self.limits.reclaim(self.limits.region(w.id))   # its connections are gone with it
            lived = time.monotonic() - w.started_at
            log.warning("worker %d (pid %s) exited with %s after %.1fs", w.id, w.pid, code, lived)
            if self.on_worker_exit is not None:
                self.on_worker_exit(w.id, code)
            # back off a worker that keeps dying young: no restart storm
            delay = 0.0 if lived > 10.0 else min(max(delay * 2, 0.05), 10.0)
            if code == EXIT_BOOT_FAILURE:
                delay = max(delay, 1.0)
            while not self._stop_asked():
                await asyncio.sleep(delay)
                if self._stop_asked():
                    return
                try:
                    # Boot outside the lock: a reload in progress does not
                    # delay the new process, only the replay that follows.
                    self._fd_reserve.release()   # w.start() takes them before its first await
                    try:
                        await w.start()
                    finally:
                        self._fd_reserve.refill()
                    async with self._lock:
                        if self._stop_asked():
                            return
                        await self._replay(w)
                        w.ready = True
                except (HotproxyError, OSError) as exc:
                    w.kill()
                    if w.proc is not None:
                        await w.wait()
                    w.alive = w.ready = False
                    self.failed_restarts += 1
                    delay = min(max(delay * 2, 0.05), 10.0)
                    log.error("worker %d: restart failed: %s; retrying in %.2fs", w.id, exc, delay)
                    continue
                w.restarts += 1
                self.restarts += 1
                log.info("worker %d restarted (pid %s) with %d sites", w.id, w.pid, len(self.deployments))
                break

    async def _replay(self, w: ProcessWorker) -> None:
        """Bring a fresh worker to the recorded deployment: bind all, then serve all.

        Bounded like a dispatch: a replay during which the worker stays
        silent for ``command_timeout`` kills it (the restart is retried).
        """
        commands: list[Any] = [Precommit(name, dep.factory, dep.listener_factory)
                               for name, dep in self.deployments.items()]
        commands += [Commit(name) for name in self.deployments]
        # a prepare phase in progress: stage what the other workers have staged
        commands += [Precommit(name, staged.factory, staged.listener_factory)
                     for name, staged in self._staged.items() if staged.factory is not None]
        for out in await self._in_order(w, commands, self.command_timeout):
            if isinstance(out, BaseException):
                raise out

    # -- stopping -------------------------------------------------------------

    # -- state a master upgrade hands over ----------------------------------------

    async def snapshot(self, timeout: float = STATUS_TIMEOUT, *, final: bool = False) -> list[dict[str, Any]]:
        """Each live worker's services' state (``ServiceExecutor.snapshot``):
        ``{"worker": id, "sites": {...}}``; a worker that does not answer
        within *timeout* is left out (its state is not carried).  *final*:
        the workers stop accepting first (an upgrade's hand-over)."""
        async def one(w: WorkerHandle) -> dict[str, Any] | None:
            try:
                return {"worker": w.id, "sites": await asyncio.wait_for(w.snapshot(final), timeout)}
            except (HotproxyError, asyncio.TimeoutError) as exc:
                log.warning("worker %d: its state is not carried over (%s)", w.id, describe(exc))
                return None
        got = await asyncio.gather(*(one(w) for w in self.live_workers()))
        return [g for g in got if g is not None]

    async def seed(self, seeds: dict[int, dict[str, Any]]) -> None:
        """Give worker *id* its seeds (``ServiceExecutor.seed``), before the first apply."""
        for w in self.live_workers():
            if seeds.get(w.id):
                await w.seed(seeds[w.id])

    async def carry_late(self, late: dict[int, dict[str, Any]]) -> None:
        """Give worker *id* the old workers' last counts (``ServiceExecutor.carry_late``)."""
        for w in self.live_workers():
            if late.get(w.id):
                try:
                    await w.carry_late(late[w.id])
                except HotproxyError as exc:
                    log.warning("worker %d: the last counts from before the upgrade were not carried (%s)",
                                w.id, describe(exc))

    # -- sockets a master upgrade hands over ------------------------------------

    def adopt_unix(self, path: str, sock: Any) -> None:
        """Serve Unix path *path* on *sock*, the socket the master this one
        upgrades passed (``SharedSockets.adopt``); call before ``start``."""
        self._shared.adopt(path, sock)

    async def tcp_listeners(self, timeout: float = 5.0, *, worker: int | None = None) -> list[tuple[int, Any, int]]:
        """Every live worker's TCP listening sockets, for an upgrade's hand-over:
        ``(worker id, {"site", "key"}, fd)`` each, *key* as ``activation.key_of`` names
        the socket (the fds are the caller's to close).  Sockets systemd passed are
        left out (handed over whole); a worker that cannot send its own within
        *timeout* is left out with a warning (the new worker in its place binds
        its own, as a worker that restarts does).  *worker*: that worker's only."""
        from .activation import key_of_sockaddr

        async def one(w: WorkerHandle) -> list[tuple[int, Any, int]]:
            if not isinstance(w, ProcessWorker):
                return []
            try:
                got = await w.listeners(timeout)
            except WorkerError as exc:
                log.warning("upgrade: worker %d's listening sockets are not handed over (%s): the new worker %d "
                            "binds its own", w.id, describe(exc), w.id)
                return []
            out = []
            for entry, fd in got:
                key = key_of_sockaddr((entry.get("host"), entry.get("port")))
                if self._shared.is_activated(key):
                    os.close(fd)
                else:
                    out.append((w.id, {"site": entry.get("site"), "key": list(key)}, fd))
            return out

        per_worker = await asyncio.gather(*(one(w) for w in self.live_workers() if worker in (None, w.id)))
        return [item for items in per_worker for item in items]

    def adopt_tcp(self, sockets: list[tuple[int, tuple[Any, ...], int]]) -> int:
        """Pass each of *sockets* -- (old worker id, address key, fd): an old worker's
        TCP listening socket -- on to the new worker of that id, which serves that
        address on it (``SharedSockets.adopt_tcp``); call after ``start``, before the
        first dispatch.  Every fd is closed here; how many a worker took (one of an
        id no worker has is not: that address, there, is bound anew)."""
        by_worker: dict[int, list[tuple[tuple[Any, ...], int]]] = {}
        for worker, key, fd in sockets:
            by_worker.setdefault(worker, []).append((key, fd))
        taken = 0
        try:
            for worker, items in by_worker.items():
                w = next((w for w in self.workers if w.id == worker and w.alive), None)
                if not isinstance(w, ProcessWorker):
                    continue
                try:
                    self._shared.adopt_tcp(w, items)
                    taken += len(items)
                except WorkerError as exc:
                    log.warning("upgrade: %s: it binds its own", describe(exc))
        finally:
            for _, _, fd in sockets:
                os.close(fd)
        return taken

    async def release_handed(self) -> int:
        """Make the workers close the handed-over TCP sockets no service took
        (``SharedSockets.release_handed``); how many."""
        unclaimed = self._shared.release_handed()
        for w in self.workers:
            tokens = unclaimed.get(w.id)
            if tokens and isinstance(w, ProcessWorker) and w.alive:
                try:
                    await asyncio.wait_for(w.release_listeners(tokens), STATUS_TIMEOUT)
                except (HotproxyError, asyncio.TimeoutError) as exc:
                    log.warning("worker %d: the handed-over sockets no service took stay open (%s)", w.id,
                                describe(exc) if isinstance(exc, HotproxyError) else "no answer")
        return sum(len(t) for t in unclaimed.values())

    def activate(self, sock: Any) -> str | None:
        """Serve the sites on *sock*'s address on *sock*, a listening socket systemd
        passed (``SharedSockets.activate``); its address, or None if it is not usable."""
        return self._shared.activate(sock)

    def activated_sockets(self) -> list[int]:
        """The descriptors of the sockets systemd passed (kept for the manager's life)."""
        return self._shared.activated()

    def adopt_counters(self, fd: int, used: set[int], names: list[Any]) -> None:
        """Count in the segment *fd* of the master this one upgrades (``Segment.adopt``);
        call before ``start``.  The fd is the manager's from now on."""
        self._adopt_counters = (fd, used, names)

    def adopt_health(self, fd: int) -> None:
        """Keep the health states in table *fd* of the master this one upgrades
        (``HealthTable.adopt``); call before ``start``.  The fd is the manager's from now on."""
        self._adopt_health = fd

    def own_adopted(self) -> None:
        """The upgrade is done: the adopted Unix paths are this manager's."""
        self._shared.own_adopted()
        self._release_shared()

    def unix_sockets(self) -> dict[str, int]:
        """The descriptor of every Unix listening socket the master owns, by path."""
        return self._shared.sockets()

    async def stop(self, graceful: bool = True, timeout: float | None = None, *,
                   keep_files: bool = False) -> None:
        """Stop every worker: graceful drains (bounded by *timeout*), else at once.

        *keep_files*: leave the Unix socket files in place (a new master serves them).
        """
        self._stopping = True
        if self.checker is not None:
            self.checker.stop()
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        await asyncio.gather(*(w.stop(graceful, timeout) for w in self.workers), return_exceptions=True)
        if self.limits is not None and not self.inline:
            # every worker has exited: what a killed one still counted is given back
            # (the segment may live on in a new master's processes after an upgrade)
            for w in self.workers:
                self.limits.reclaim(self.limits.region(w.id))
        self._fd_reserve.release()
        self._shared.close(keep_files=keep_files)
        if self.limits is not None:
            self.limits.close()
        if self.health is not None:
            self.health.close()
