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
slots as commands go out, and gives back a dead worker's counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

from .channel import EXIT_BOOT_FAILURE, read_message, write_message
from .commands import Abort, Commit, PrepareAndCommit, Precommit, Remove, Update
from .errors import (BuildListenerError, CommandGroupError, DeployError, HotproxyError, WorkerError,
                     WorkerTimeoutError, describe)
from .executor import ServiceExecutor
from .fdreserve import FdReserve
from .limits import Segment
from .listeners import (BoundListener, InheritedListenerFactory, ListenerFactory, UnixListenerFactory,
                        send_listener_fd)
from .service import MakeService

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

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
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
            site = getattr(self.command, "name", "?")
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


class _InlineWorker:
    """An executor in the caller's own loop."""

    def __init__(self, worker_id: int, drain_timeout: float) -> None:
        self.id = worker_id
        self.executor = ServiceExecutor(worker_id, drain_timeout)
        self.pid = os.getpid()
        self.alive = True
        self.ready = True

    async def start(self) -> None:
        pass

    async def execute(self, command: Any) -> Any:
        return await self.executor.execute(command)

    async def status(self) -> dict[str, Any]:
        return self.executor.status()

    async def stop(self, graceful: bool, timeout: float | None) -> None:
        if graceful:
            await self.executor.shutdown(timeout)
        self.alive = False


class _ProcessWorker:
    """The master's handle on one worker process."""

    def __init__(self, worker_id: int, manager: WorkerManager) -> None:
        self.id = worker_id
        self.manager = manager
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.alive = False
        #: brought to the current deployment; only ready workers get commands
        self.ready = False
        self.started_at = 0.0
        self.restarts = 0
        self.fd_channel: socket.socket | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        counters = self.manager.limits
        assert counters is not None
        if self.proc is not None and self.proc.returncode is not None:
            counters.reclaim(self.id)   # the counts of the process before us
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd_parent, fd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd_parent.settimeout(5.0)
        if self.fd_channel is not None:
            self.fd_channel.close()
        self.fd_channel = fd_parent
        env = dict(os.environ)
        env["HOTPROXY_WORKER_ID"] = str(self.id)   # for logs and test-only fault injection
        if self.manager.core == "python":
            env["HOTPROXY_NO_EXTENSIONS"] = "1"
        elif self.manager.core == "compiled":
            env.pop("HOTPROXY_NO_EXTENSIONS", None)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hotproxy.worker", "--fd", str(child.fileno()), "--id", str(self.id),
                "--fd-channel", str(fd_child.fileno()), "--counters-fd", str(counters.fd),
                pass_fds=(child.fileno(), fd_child.fileno(), counters.fd), env=env,
                stdin=asyncio.subprocess.DEVNULL)
        finally:
            child.close()
            fd_child.close()
        self.started_at = time.monotonic()
        reader, self.writer = await asyncio.open_connection(sock=parent)
        cpus = sorted(os.sched_getaffinity(0))
        write_message(self.writer, {
            "sys_path": list(sys.path),
            "drain_timeout": self.manager.drain_timeout,
            "log_level": logging.getLevelName(logging.getLogger("hotproxy").getEffectiveLevel()),
            "cpu": cpus[self.id % len(cpus)] if self.manager.cpu_affinity else None,
        })
        try:
            msg = await asyncio.wait_for(read_message(reader), self.manager.boot_timeout)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as exc:
            self.writer.close()
            self._kill()
            raise WorkerError(self.id, f"did not start ({type(exc).__name__})") from None
        if msg[0] != "ready":
            self._kill()
            raise WorkerError(self.id, f"bad hello {msg!r}")
        self.alive = True
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader, self.writer))

    def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                kind, req_id, ok, payload = await read_message(reader)
                fut = self.pending.pop(req_id, None)
                if fut is None or fut.done():
                    continue
                if ok:
                    fut.set_result(payload)
                else:
                    fut.set_exception(payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:  # pragma: no cover - a protocol bug
            log.exception("worker %d: bad message on the control channel", self.id)
        finally:
            writer.close()   # this incarnation's end of the channel
            if self.writer is writer:
                self.alive = False
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(WorkerError(self.id, "exited"))
            self.pending.clear()

    async def _call(self, *message: Any) -> Any:
        if not self.alive or self.writer is None:
            raise WorkerError(self.id, "not running")
        req_id = self.next_id = self.next_id + 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[req_id] = fut
        try:
            write_message(self.writer, (message[0], req_id, *message[1:]))
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self.pending.pop(req_id, None)
            raise WorkerError(self.id, f"control channel: {exc}") from None
        try:
            return await fut
        finally:
            # given up on (a deadline): forget it, the late answer is dropped
            self.pending.pop(req_id, None)

    def kill_silent(self, seconds: float, what: str) -> None:
        """Kill a worker that has not answered *what* for *seconds*.

        Every request still waiting for it fails with ``WorkerTimeoutError``
        now; the supervisor sees the exit and restarts it from the record.
        """
        error = WorkerTimeoutError(self.id, f"pid {self.pid} did not answer {what} within {seconds:g}s: "
                                            "killed, restarting it")
        log.error("%s", error)
        self.alive = self.ready = False
        self._kill()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()

    async def execute(self, command: Any) -> Any:
        lf = getattr(command, "listener_factory", None)
        if isinstance(lf, UnixListenerFactory) and self.manager._master_owned(lf):
            try:
                command = self._with_inherited(command, lf)
            except DeployError as exc:
                raise exc.on_worker(self.id)
        return await self._call("cmd", command)

    def _with_inherited(self, command: Any, lf: UnixListenerFactory) -> Any:
        """Send the master's socket for *lf*; return *command* naming it by token."""
        bound = self.manager._shared_listener(command.name, lf)
        token = self.manager._next_token()
        if not self.alive or self.fd_channel is None:
            raise WorkerError(self.id, "not running")
        try:
            send_listener_fd(self.fd_channel, token, bound.sock.fileno())
        except OSError as exc:
            raise WorkerError(self.id, f"cannot send listener {lf.address}: {exc}") from None
        return replace(command, listener_factory=InheritedListenerFactory(lf, token))

    async def status(self) -> dict[str, Any]:
        return await self._call("status")  # type: ignore[no-any-return]

    async def set_log_level(self, level: str) -> None:
        await self._call("log_level", level)

    async def stop(self, graceful: bool, timeout: float | None) -> None:
        """Ask the worker to stop; kill it if it has not exited by the deadline.

        The deadline is the drain time (graceful) plus ``STOP_GRACE``: a
        worker that cannot even read the request (stopped, wedged) is
        killed then, so a stop always keeps ``drain_timeout``.
        """
        if self.proc is None:
            return
        drain = (timeout if timeout is not None else self.manager.drain_timeout) if graceful else 0.0
        deadline = time.monotonic() + drain + STOP_GRACE
        if self.alive:
            try:
                await asyncio.wait_for(self._call("stop", graceful, timeout), STOP_GRACE)
            except (WorkerError, asyncio.TimeoutError):
                pass
        try:
            await asyncio.wait_for(self.proc.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self._kill()
            await self.proc.wait()
        if self.writer is not None:
            self.writer.close()
        if self.fd_channel is not None:
            self.fd_channel.close()
            self.fd_channel = None
        self.alive = False


#: seconds a worker gets, beyond the drain time, to exit when told to stop
STOP_GRACE = 2.0

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
        self.workers: list[Any] = []
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
        #: listening sockets the master owns (Unix sockets), by path
        self._shared: dict[str, BoundListener] = {}
        self._token = 0
        #: the instance's connection counters (made by ``start``)
        self.limits: Segment | None = None

    async def __aenter__(self) -> WorkerManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every worker; raise ``WorkerError`` if one cannot start."""
        self.limits = Segment.create(self.count, worker=0 if self.inline else -1)
        if self.inline:
            self.workers = [_InlineWorker(0, self.drain_timeout)]
            return
        self.workers = [_ProcessWorker(i, self) for i in range(self.count)]
        try:
            await asyncio.gather(*(w.start() for w in self.workers))
            for w in self.workers:
                w.ready = True
        except BaseException:
            await asyncio.gather(*(w.stop(False, 0) for w in self.workers), return_exceptions=True)
            self.limits.close()
            raise
        loop = asyncio.get_running_loop()
        self._supervisors = [loop.create_task(self._supervise(w)) for w in self.workers]

    # -- commands -------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called."""
        return self._stopping

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
        were dispatched one by one; but all are sent at once, so the whole
        batch costs one wait for the slowest worker instead of one per
        command (a reload that changes many services).

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
        async with self._lock:
            live = [w for w in self.workers if w.alive and w.ready]
            try:
                per_worker = await asyncio.gather(*(_in_order(w, commands, timeout) for w in live))
                return [self._gathered(cmd, live, [outs[i] for outs in per_worker])
                        for i, cmd in enumerate(commands)]
            finally:
                # Once per batch, after every command is recorded: a socket
                # bound for a later command of the batch is not released
                # because an earlier one was recorded first.
                self._release_shared()

    def _gathered(self, command: Any, live: list[Any], outcomes: Sequence[Any]) -> ResultGroup:
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
                                w.id, type(command).__name__, getattr(command, "name", ""))
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

    # -- listeners the master owns ---------------------------------------------

    def _master_owned(self, lf: ListenerFactory) -> bool:
        # Unix paths cannot be bound once per worker; TCP uses SO_REUSEPORT.
        return not self.inline and isinstance(lf, UnixListenerFactory)

    def _shared_listener(self, site: str, lf: UnixListenerFactory) -> BoundListener:
        """The master's socket at *lf*'s path: the one already bound, or a new one.

        Keyed by path alone: a backlog change, a move onto a path another
        site leaves in the same reload (a swap), or a restarted worker all
        get the socket already listening there -- binding the path again
        would fail, and unlinking it would lose the file.  The worker sets
        the backlog when it listens (Linux lets ``listen()`` change it).
        One service per address is the config checker's rule, as it is
        for TCP ports, where ``SO_REUSEPORT`` overlaps the same way.
        """
        bound = self._shared.get(lf.path)
        if bound is None:
            try:
                bound = self._shared[lf.path] = lf.bind()
            except OSError as exc:
                raise BuildListenerError(site, f"{lf.address}: {exc.strerror or exc}") from None
        return bound

    def _next_token(self) -> int:
        self._token += 1
        return self._token

    def _release_shared(self) -> None:
        """Close (and unlink, if still ours) the master's sockets nothing uses.

        A path is in use while a deployment or a staged command names it.
        Called once per dispatch, after every command of it is recorded, so
        no command is in flight: a socket bound for a command that failed
        everywhere (not recorded) is released here too.
        """
        used = {d.listener_factory for d in self.deployments.values()}
        used |= {s.listener_factory for s in self._staged.values() if s.listener_factory is not None}
        paths = {lf.path for lf in used if isinstance(lf, UnixListenerFactory)}
        for path in [p for p in self._shared if p not in paths]:
            self._shared.pop(path).close()

    async def status(self, timeout: float = STATUS_TIMEOUT) -> list[dict[str, Any]]:
        """Each worker's status (sites, generations, connections), or its error.

        Every worker is asked at once; one that has not answered within
        *timeout* is reported as not answering (``"answering": False``), never
        waited for.
        """
        return list(await asyncio.gather(*(self._worker_status(w, timeout) for w in self.workers)))

    @staticmethod
    async def _worker_status(w: Any, timeout: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"worker": w.id, "pid": w.pid, "alive": w.alive, "ready": w.ready,
                                 "answering": False}
        if w.alive:
            try:
                entry.update(await asyncio.wait_for(w.status(), timeout))
                entry["answering"] = True
            except asyncio.TimeoutError:
                entry["error"] = f"not answering (no status within {timeout:g}s)"
            except HotproxyError as exc:
                entry["error"] = describe(exc)
        return entry

    async def set_log_level(self, level: str) -> None:
        """Tell every live worker its new log level (best effort, bounded)."""
        async def one(w: Any) -> None:
            if not w.alive or not hasattr(w, "set_log_level"):
                return
            try:
                await asyncio.wait_for(w.set_log_level(level), STATUS_TIMEOUT)
            except (HotproxyError, asyncio.TimeoutError):
                pass   # a restarted worker gets the level in its hello
        await asyncio.gather(*(one(w) for w in self.workers))

    # -- supervision ----------------------------------------------------------

    async def _supervise(self, w: _ProcessWorker) -> None:
        delay = 0.0
        self._fd_reserve.refill()
        while not self._stopping:
            assert w.proc is not None
            code = await w.proc.wait()
            w.alive = w.ready = False
            if self._stopping:
                return
            assert self.limits is not None
            self.limits.reclaim(w.id)   # its connections are gone with it
            lived = time.monotonic() - w.started_at
            log.warning("worker %d (pid %s) exited with %s after %.1fs", w.id, w.pid, code, lived)
            if self.on_worker_exit is not None:
                self.on_worker_exit(w.id, code)
            # back off a worker that keeps dying young: no restart storm
            delay = 0.0 if lived > 10.0 else min(max(delay * 2, 0.05), 10.0)
            if code == EXIT_BOOT_FAILURE:
                delay = max(delay, 1.0)
            while not self._stopping:
                await asyncio.sleep(delay)
                if self._stopping:
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
                        if self._stopping:
                            return
                        await self._replay(w)
                        w.ready = True
                except (HotproxyError, OSError) as exc:
                    w._kill()
                    if w.proc is not None:
                        await w.proc.wait()
                    w.alive = w.ready = False
                    self.failed_restarts += 1
                    delay = min(max(delay * 2, 0.05), 10.0)
                    log.error("worker %d: restart failed: %s; retrying in %.2fs", w.id, exc, delay)
                    continue
                w.restarts += 1
                self.restarts += 1
                log.info("worker %d restarted (pid %s) with %d sites", w.id, w.pid, len(self.deployments))
                break

    async def _replay(self, w: _ProcessWorker) -> None:
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
        for out in await _in_order(w, commands, self.command_timeout):
            if isinstance(out, BaseException):
                raise out

    # -- stopping -------------------------------------------------------------

    async def stop(self, graceful: bool = True, timeout: float | None = None) -> None:
        """Stop every worker: graceful drains (bounded by *timeout*), else at once."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        await asyncio.gather(*(w.stop(graceful, timeout) for w in self.workers), return_exceptions=True)
        self._fd_reserve.release()
        for bound in self._shared.values():
            bound.close()
        self._shared.clear()
        if self.limits is not None:
            self.limits.close()


async def _in_order(worker: Any, commands: Sequence[Any], timeout: float | None) -> list[Any]:
    """Each command's outcome on *worker* (a value or an exception), in order.

    Every command is written to the worker before the first reply is
    awaited: the tasks start in creation order (the loop runs callbacks
    first in, first out) and each writes its request before it awaits.
    With a *timeout*, a worker that answers none of the commands still
    pending for that long is killed (``kill_silent``), which fails them.
    """
    tasks = [asyncio.ensure_future(worker.execute(c)) for c in commands]
    # (an inline worker runs in our own loop: it cannot be silent, nor killed)
    if timeout is not None and isinstance(worker, _ProcessWorker):
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                worker.kill_silent(timeout, f"{len(pending)} of {len(commands)} commands")
                break
    return await asyncio.gather(*tasks, return_exceptions=True)
