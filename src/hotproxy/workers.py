"""The master's handles on its workers: one request and reply at a time, over each worker's channels.

``WorkerHandle`` is what the ``WorkerManager`` (and through it the reload
and the master) may use of a worker: its id and pid, whether it is alive
and ready, and the requests (a command, status, the log level, stop).  Two
kinds implement it:

* ``ProcessWorker``: a ``python -m hotproxy.worker`` process, with a private
  control channel (length-prefixed pickles, ``channel.py``) on which each
  request carries an id and the worker's reply names it, and an fd channel
  (``fdchannel.FdSender``) for the listening sockets the master owns.
* ``InlineWorker``: an executor in the caller's own loop (embedding, tests).

Rules of this module:

* Nothing waits for a worker without limit: ``start`` has the boot
  timeout, ``stop`` kills at the drain time plus ``STOP_GRACE``, and
  ``kill_silent`` fails every request still waiting (``WorkerTimeoutError``)
  when the manager gives up on a silent worker.
* A request given up on (a deadline) is forgotten: its late answer is dropped.
* Supervision (restarts, the deployment record) is the manager's; a handle
  only starts, talks to, stops and kills its process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from . import logs
from .channel import read_message, write_message
from .errors import WorkerError, WorkerTimeoutError, describe
from .executor import ServiceExecutor
from .fdchannel import FdSender

if TYPE_CHECKING:
    from .health import HealthTable
    from .limits import Segment

log = logging.getLogger("hotproxy.manager")

#: seconds a worker gets, beyond the drain time, to exit when told to stop
STOP_GRACE = 2.0


class WorkerHandle(Protocol):
    """What the manager, the reload and the master use of one worker."""

    id: int
    #: running, its control channel open
    alive: bool
    #: brought to the current deployment; only ready workers get commands
    ready: bool

    @property
    def pid(self) -> int | None: ...

    async def execute(self, command: Any) -> Any:
        """Run one deployment command; its result, or raise its error."""

    async def status(self, names: Sequence[str] | None = None, summary: bool = False) -> dict[str, Any]:
        """The worker's ``ServiceExecutor.status_sliced(names, summary)``."""

    async def set_logging(self, level: str, fmt: str) -> None:
        """Apply a new ``runtime.log_level`` and ``log_format``."""

    async def snapshot(self, final: bool = False) -> dict[str, Any]:
        """The worker's ``ServiceExecutor.snapshot(final)`` (plain data, for an upgrade)."""

    async def carry_late(self, late: dict[str, Any]) -> None:
        """``ServiceExecutor.carry_late``: the old workers' last counts."""

    async def seed(self, seeds: dict[str, Any]) -> None:
        """``ServiceExecutor.seed``: build these sites' first versions from their seeds."""

    async def stop(self, graceful: bool, timeout: float | None) -> None:
        """Stop (graceful: drain within *timeout*), bounded."""

    def kill(self) -> None:
        """Kill the process now, if it runs (without waiting for it)."""


class WorkerSettings(Protocol):
    """What a ``ProcessWorker`` reads of its manager, when it starts or stops."""

    drain_timeout: float
    cpu_affinity: bool
    #: ``"compiled"``, ``"python"`` or None (the master's own choice)
    core: str | None
    boot_timeout: float
    #: the instance's connection counters
    limits: Segment | None
    #: the instance's health states
    health: HealthTable | None


class InlineWorker:
    """An executor in the caller's own loop (it cannot be silent, nor killed)."""

    def __init__(self, worker_id: int, drain_timeout: float) -> None:
        self.id = worker_id
        self.executor = ServiceExecutor(worker_id, drain_timeout)
        self.alive = True
        self.ready = True

    @property
    def pid(self) -> int:
        return os.getpid()

    async def execute(self, command: Any) -> Any:
        return await self.executor.execute(command)

    async def status(self, names: Sequence[str] | None = None, summary: bool = False) -> dict[str, Any]:
        return await self.executor.status_sliced(names, summary)

    async def set_logging(self, level: str, fmt: str) -> None:
        pass   # the caller's own process: the reload sets its logging

    async def snapshot(self, final: bool = False) -> dict[str, Any]:
        return self.executor.snapshot(final)

    async def carry_late(self, late: dict[str, Any]) -> None:
        self.executor.carry_late(late)

    async def seed(self, seeds: dict[str, Any]) -> None:
        self.executor.seed(seeds)

    async def stop(self, graceful: bool, timeout: float | None) -> None:
        if graceful:
            await self.executor.shutdown(timeout)
        self.alive = False

    def kill(self) -> None:
        pass


class ProcessWorker:
    """The master's handle on one worker process (restarted: the same handle, a new process)."""

    def __init__(self, worker_id: int, settings: WorkerSettings) -> None:
        self.id = worker_id
        self.settings = settings
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future[Any]] = {}
        #: batches in progress: their outcomes as they arrive, or the error that ended them
        self.batches: dict[int, asyncio.Queue[tuple[str, Any]]] = {}
        self.next_id = 0
        self.alive = False
        self.ready = False
        self.started_at = 0.0
        self.restarts = 0
        #: the master's end of this process's fd channel
        self.fds: FdSender | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- the process ---------------------------------------------------------------

    async def start(self) -> None:
        """Start a process and wait for its hello; ``WorkerError`` if it does not come."""
        counters = self.settings.limits
        assert counters is not None
        health = self.settings.health
        assert health is not None
        if self.proc is not None and self.proc.returncode is not None:
            counters.reclaim(counters.region(self.id))   # the counts of the process before us
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd_parent, fd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.fds is not None:
            self.fds.close()
        self.fds = FdSender(fd_parent)
        env = dict(os.environ)
        env["HOTPROXY_WORKER_ID"] = str(self.id)   # for logs and test-only fault injection
        if self.settings.core == "python":
            env["HOTPROXY_NO_EXTENSIONS"] = "1"
        elif self.settings.core == "compiled":
            env.pop("HOTPROXY_NO_EXTENSIONS", None)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hotproxy.worker", "--fd", str(child.fileno()), "--id", str(self.id),
                "--fd-channel", str(fd_child.fileno()), "--counters-fd", str(counters.fd),
                "--counters-region", str(counters.region(self.id)), "--health-fd", str(health.fd),
                pass_fds=(child.fileno(), fd_child.fileno(), counters.fd, health.fd), env=env,
                stdin=asyncio.subprocess.DEVNULL)
        finally:
            child.close()
            fd_child.close()
        self.started_at = time.monotonic()
        reader, self.writer = await asyncio.open_connection(sock=parent)
        cpus = sorted(os.sched_getaffinity(0))
        write_message(self.writer, {
            "sys_path": list(sys.path),
            "drain_timeout": self.settings.drain_timeout,
            "log_level": logging.getLevelName(logging.getLogger("hotproxy").getEffectiveLevel()),
            "log_format": logs.current()[1],
            "cpu": cpus[self.id % len(cpus)] if self.settings.cpu_affinity else None,
        })
        try:
            msg = await asyncio.wait_for(read_message(reader), self.settings.boot_timeout)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as exc:
            self.writer.close()
            self.kill()
            raise WorkerError(self.id, f"did not start ({type(exc).__name__})") from None
        if msg[0] != "ready":
            self.kill()
            raise WorkerError(self.id, f"bad hello {msg!r}")
        self.alive = True
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader, self.writer))

    async def wait(self) -> int:
        """The exit code of the process, once it has exited."""
        assert self.proc is not None
        return await self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def kill_silent(self, seconds: float, what: str) -> None:
        """Kill a worker that has not answered *what* for *seconds*.

        Every request still waiting for it fails with ``WorkerTimeoutError``
        now; the supervisor sees the exit and restarts it from the record.
        """
        error = WorkerTimeoutError(self.id, f"pid {self.pid} did not answer {what} within {seconds:g}s: "
                                            "killed, restarting it")
        log.error("%s", error)
        self.alive = self.ready = False
        self.kill()
        self._fail_pending(error)

    # -- requests and replies ------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                kind, req_id, ok, payload = await read_message(reader)
                batch = self.batches.get(req_id)
                if batch is not None:
                    # a batch's outcomes so far ("part") or its last ones ("res")
                    batch.put_nowait(("outcomes", payload))
                    continue
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
            self._fail_pending(WorkerError(self.id, "exited"))

    def _fail_pending(self, error: BaseException) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()
        for batch in self.batches.values():
            batch.put_nowait(("error", error))
        self.batches.clear()

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

    def send_listener(self, token: int, fd: int) -> None:
        """Send the master's listening socket *fd*; a command names it by *token*."""
        if not self.alive or self.fds is None:
            raise WorkerError(self.id, "not running")
        self.fds.send(token, fd)

    def send_listeners(self, tokens: list[int], fds: list[int]) -> None:
        """``send_listener`` for many, in as few messages as the kernel allows (``FdSender.send_many``)."""
        if not self.alive or self.fds is None:
            raise WorkerError(self.id, "not running")
        self.fds.send_many(tokens, fds)

    async def listeners(self, timeout: float) -> list[tuple[dict[str, Any], int]]:
        """This worker's TCP listening sockets, for an upgrade's hand-over: ``({"site", "host",
        "port"}, fd)`` each (the fds are ours to close); ``WorkerError`` if they do not all
        come within *timeout* (none is kept then)."""
        if not self.alive or self.fds is None:
            raise WorkerError(self.id, "not running")
        fds = self.fds
        fds.discard()   # the leftovers of a hand-over given up on
        got: list[int] = []
        reply = asyncio.ensure_future(asyncio.wait_for(self._call("listeners"), timeout))
        count: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def counted(r: asyncio.Future[Any]) -> None:
            if count.done():
                return
            if r.cancelled() or r.exception() is not None:
                count.cancel()
            else:
                count.set_result(len(r.result()))

        reply.add_done_callback(counted)
        entries: list[dict[str, Any]] = []
        try:
            try:
                await fds.receive(got, count, timeout)
                entries = await reply
            except asyncio.TimeoutError:
                raise WorkerError(self.id, f"did not send its listening sockets within {timeout:g}s") from None
            except WorkerError:
                raise
            except Exception as exc:   # the worker's error (OSError: a send that failed)
                raise WorkerError(self.id, f"listening sockets: {describe(exc)}") from None
            if len(got) != len(entries):
                raise WorkerError(self.id, f"sent {len(got)} listening sockets for {len(entries)}")
        except BaseException:
            for fd in got:
                os.close(fd)
            raise
        finally:
            if not reply.done():
                reply.cancel()
            reply.add_done_callback(lambda r: r.cancelled() or r.exception())   # (retrieved)
        return list(zip(entries, got))

    async def release_listeners(self, tokens: list[int]) -> None:
        """Close the listening sockets sent with *tokens* that no command took (``FdReceiver.release``)."""
        await self._call("release", tokens)

    async def execute(self, command: Any) -> Any:
        return await self._call("cmd", command)

    async def execute_batch(self, commands: list[Any], timeout: float | None = None) -> list[Any]:
        """Run *commands* in order in one message; each one's result, or its error (in order).

        The worker sends the outcomes as they come (its progress): one that
        sends none for *timeout* seconds is killed (``kill_silent``), and the
        commands it had not answered fail with ``WorkerTimeoutError``; those
        it answered keep their outcome.
        """
        if not commands:
            return []
        if not self.alive or self.writer is None:
            return [WorkerError(self.id, "not running")] * len(commands)
        req_id = self.next_id = self.next_id + 1
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.batches[req_id] = queue
        outcomes: list[Any] = []
        try:
            try:
                write_message(self.writer, ("batch", req_id, list(commands)))
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                return [WorkerError(self.id, f"control channel: {exc}")] * len(commands)
            while len(outcomes) < len(commands):
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    assert timeout is not None
                    self.kill_silent(timeout, f"{len(commands) - len(outcomes)} of {len(commands)} commands")
                    continue   # kill_silent queued the error that ends the batch
                if kind == "error":
                    outcomes += [payload] * (len(commands) - len(outcomes))
                    break
                outcomes += [value for _, value in payload]
            return outcomes
        finally:
            self.batches.pop(req_id, None)

    async def status(self, names: Sequence[str] | None = None, summary: bool = False) -> dict[str, Any]:
        return await self._call("status", None if names is None else list(names), summary)  # type: ignore[no-any-return]

    async def set_logging(self, level: str, fmt: str) -> None:
        await self._call("logging", level, fmt)

    async def snapshot(self, final: bool = False) -> dict[str, Any]:
        return await self._call("snapshot", final)  # type: ignore[no-any-return]

    async def carry_late(self, late: dict[str, Any]) -> None:
        await self._call("late", late)

    async def seed(self, seeds: dict[str, Any]) -> None:
        await self._call("seed", seeds)

    async def stop(self, graceful: bool, timeout: float | None) -> None:
        """Ask the worker to stop; kill it if it has not exited by the deadline.

        The deadline is the drain time (graceful) plus ``STOP_GRACE``: a
        worker that cannot even read the request (stopped, wedged) is
        killed then, so a stop always keeps ``drain_timeout``.
        """
        if self.proc is None:
            return
        drain = (timeout if timeout is not None else self.settings.drain_timeout) if graceful else 0.0
        deadline = time.monotonic() + drain + STOP_GRACE
        if self.alive:
            try:
                await asyncio.wait_for(self._call("stop", graceful, timeout), STOP_GRACE)
            except (WorkerError, asyncio.TimeoutError):
                pass
        try:
            await asyncio.wait_for(self.proc.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.kill()
            await self.proc.wait()
        if self.writer is not None:
            self.writer.close()
        if self.fds is not None:
            self.fds.close()
            self.fds = None
        self.alive = False


__all__ = ["STOP_GRACE", "InlineWorker", "ProcessWorker", "WorkerHandle", "WorkerSettings"]
