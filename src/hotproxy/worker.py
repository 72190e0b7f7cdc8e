"""A worker process: a uvloop loop, one ServiceExecutor, a control channel.

Started by ``WorkerManager`` as ``python -m hotproxy.worker --fd N --id I
--fd-channel M --counters-fd C --health-fd H``: N is the control channel, M
the socket on which the master sends the listening sockets it owns (the
worker's ``fdchannel.FdReceiver``), C the instance's connection counters (see
limits.Segment), H its active health states (health.HealthTable).
It runs the commands the master sends, one at a time in order, answers
status requests at once (between two commands of a batch too), and exits when told to, on ``SIGTERM`` (graceful:
stop accepting, drain, exit), on ``SIGQUIT`` (at once), or when the master
goes away (its end of the channel closes, or the parent-death signal).

Exit codes: 0 normal, ``EXIT_BOOT_FAILURE`` when it could not start -- the
master does not restart such a worker in a tight loop.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from . import gcpolicy, logs
from .channel import EXIT_BOOT_FAILURE, read_message, write_message
from .fdchannel import FdReceiver

log = logging.getLogger("hotproxy.worker")

#: a batch of commands runs in slices of about this many seconds, with an
#: event-loop turn between two slices: a reload of 10,000 services never
#: holds this worker's accepts (nor its status answers) for longer
SLICE = 0.005
#: a batch's outcomes so far are sent to the master at most this often (and
#: at the end): they are its progress, which its silence deadline watches
FLUSH = 0.02


class Batch:
    """The commands of one ``("batch", id, commands)`` message: run in order, one reply."""

    __slots__ = ("commands",)

    def __init__(self, commands: list[Any]) -> None:
        self.commands = commands


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM us if the master dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


class WorkerProcess:
    """The worker's main object: owns the executor and talks to the master."""

    def __init__(self, sock: socket.socket, worker_id: int, fds: FdReceiver | None = None) -> None:
        self.sock = sock
        self.worker_id = worker_id
        #: where the listening sockets the master owns arrive (None: no channel)
        self.fds = fds
        self.executor: Any = None
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.stop_requested: asyncio.Future[tuple[bool, float | None]] | None = None
        #: (soft before, hard) when the start raised the soft RLIMIT_NOFILE, for the log
        self.nofile: tuple[int, int] | None = None
        #: status answers being built (kept referenced until written)
        self._tasks: set[asyncio.Task[None]] = set()
        self.sweeper: gcpolicy.Sweeper | None = None
        #: True while a command (or a batch) runs
        self._running = False
        #: a command since the last settle may have left garbage for a sweep (``_may_leave_garbage``)
        self._left_garbage = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_requested = loop.create_future()
        reader, writer = await asyncio.open_connection(sock=self.sock)
        hello = await read_message(reader)
        # The master's import path first, so its factories unpickle here.
        for entry in reversed(hello.get("sys_path", [])):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        logs.configure(hello.get("log_level", "WARNING"), hello.get("log_format", "text"),
                       logs.worker_role(self.worker_id))
        if self.nofile is not None:
            log.info("RLIMIT_NOFILE raised from %d to the hard limit %d", *self.nofile)
        if hello.get("cpu") is not None:
            try:
                os.sched_setaffinity(0, {hello["cpu"]})
            except OSError as exc:
                log.warning("cannot pin to CPU %s: %s", hello["cpu"], exc)
        from .executor import ServiceExecutor  # after sys.path is set

        self.executor = ServiceExecutor(self.worker_id, hello.get("drain_timeout", 30.0))
        # the frozen garbage of a change is swept once its old versions have
        # drained, never while a command runs (``gcpolicy``)
        sweeper = self.sweeper = gcpolicy.Sweeper(max(1.0, self.executor.drain_timeout) + SWEEP_AFTER,
                                                  busy=lambda: self._running or not self.queue.empty())
        loop.add_signal_handler(signal.SIGTERM, self._request_stop, True, None)
        loop.add_signal_handler(signal.SIGQUIT, self._request_stop, False, None)

        if self.fds is not None:
            self.fds.start()   # descriptors are read as they arrive (``fdchannel``)
        write_message(writer, ("ready", os.getpid()))
        runner = loop.create_task(self._run_commands(writer))
        reading = loop.create_task(self._read(reader, writer))
        graceful, timeout = await self.stop_requested
        runner.cancel()
        sweeper.cancel()
        if graceful:
            # (still answering status: how many connections are left to drain)
            await self.executor.shutdown(timeout)
        reading.cancel()
        try:
            writer.close()
        except Exception:
            pass
        return 0

    def _answer(self, writer: asyncio.StreamWriter, req_id: int, coro: Any) -> None:
        """Reply to request *req_id* with what *coro* returns, when it has."""
        async def answer() -> None:
            try:
                reply: tuple[Any, ...] = ("res", req_id, True, await coro)
            except Exception as exc:
                reply = ("res", req_id, False, exc)
            try:
                write_message(writer, reply)
            except Exception:
                pass   # the channel is gone: the master's reader sees it
        task = asyncio.get_running_loop().create_task(answer())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _request_stop(self, graceful: bool, timeout: float | None) -> None:
        if self.stop_requested is not None and not self.stop_requested.done():
            self.stop_requested.set_result((graceful, timeout))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                msg = await read_message(reader)
                kind = msg[0]
                if kind == "cmd":
                    self.queue.put_nowait((msg[1], msg[2]))
                elif kind == "batch":
                    self.queue.put_nowait((msg[1], Batch(msg[2])))
                elif kind == "status":
                    # (built in slices, in its own task: this loop reads on meanwhile)
                    names = msg[2] if len(msg) > 2 else None
                    summary = bool(msg[3]) if len(msg) > 3 else False
                    self._answer(writer, msg[1], self._status(names, summary))
                elif kind == "listeners":
                    # an upgrade: this worker's TCP listening sockets, for the new master's workers
                    self._answer(writer, msg[1], self._send_listeners())
                elif kind == "release":
                    # an upgrade: the old workers' sockets passed on that no service took
                    if self.fds is not None:
                        for token in msg[2]:
                            self.fds.release(token)
                    write_message(writer, ("res", msg[1], True, None))
                elif kind == "snapshot":
                    final = len(msg) > 2 and msg[2] is True
                    write_message(writer, ("res", msg[1], True, self.executor.snapshot(final)))
                elif kind == "late":
                    self.executor.carry_late(msg[2])
                    write_message(writer, ("res", msg[1], True, None))
                elif kind == "seed":
                    self.executor.seed(msg[2])
                    write_message(writer, ("res", msg[1], True, None))
                elif kind == "logging":
                    # a reload changed runtime.log_level or log_format: it applies at once
                    logs.configure(msg[2], msg[3], logs.worker_role(self.worker_id))
                    write_message(writer, ("res", msg[1], True, None))
                elif kind == "stop":
                    write_message(writer, ("res", msg[1], True, None))
                    self._request_stop(msg[2], msg[3])
                else:
                    write_message(writer, ("res", msg[1], False, ValueError(f"unknown message {kind!r}")))
        except (asyncio.IncompleteReadError, ConnectionError):
            # the master is gone: stop serving gracefully
            self._request_stop(True, None)

    async def _send_listeners(self) -> list[dict[str, Any]]:
        """Send every serving site's TCP listening socket to the master over the fd
        channel (``fdchannel.send_listeners``), for an upgrade; what each one is, in order.

        Duplicates are sent, ``SCM_MAX_FD`` at a time (a listener may change its
        descriptor while a send waits; a worker near its ``RLIMIT_NOFILE`` needs
        room for one batch only): this worker keeps accepting on its own until
        the hand-over closes it (the socket lives on in the new worker).
        """
        from .fdchannel import SCM_MAX_FD, send_listeners

        if self.fds is None:
            return []
        listeners = [(name, site.listener) for name, site in self.executor.sites.items()
                     if site.listener is not None and site.listener.sock.family in (socket.AF_INET, socket.AF_INET6)]
        entries: list[dict[str, Any]] = []
        skipped = 0
        for start in range(0, len(listeners), SCM_MAX_FD):
            batch: list[dict[str, Any]] = []
            dups: list[int] = []
            try:
                for name, listener in listeners[start:start + SCM_MAX_FD]:
                    try:
                        host, port = listener.sock.getsockname()[:2]
                        dups.append(os.dup(listener.sock.fileno()))
                    except OSError:   # closed meanwhile, or no descriptor left: its new worker binds its own
                        skipped += 1
                        continue
                    batch.append({"site": name, "host": host, "port": port})
                await send_listeners(self.fds.sock, dups)
            finally:
                for fd in dups:
                    os.close(fd)
            entries += batch
        if skipped:
            log.warning("upgrade: %d listening sockets not handed over (closed, or no descriptor left to send them)",
                        skipped)
        return entries

    async def _status(self, names: Any, summary: bool) -> dict[str, Any]:
        """The executor's status, with this process's garbage collection (``gcpolicy``)."""
        status: dict[str, Any] = await self.executor.status_sliced(names, summary)
        status["gc"] = {**gcpolicy.stats(), "sweeps": self.sweeper.sweeps if self.sweeper is not None else 0,
                        "sweep_due": self.sweeper is not None and self.sweeper.armed}
        return status

    async def _run_commands(self, writer: asyncio.StreamWriter) -> None:
        from .errors import WorkerError

        while True:
            req_id, command = await self.queue.get()
            self._running = True
            try:
                if isinstance(command, Batch):
                    await self._run_batch(writer, req_id, command.commands)
                else:
                    ok, value = await self._run_one(command)
                    try:
                        write_message(writer, ("res", req_id, ok, value))
                    except Exception as exc:  # e.g. an unpicklable error
                        write_message(writer, ("res", req_id, False, WorkerError(self.worker_id, repr(exc))))
            finally:
                self._running = False
            self._settle()

    def _settle(self) -> None:
        """After a command or a batch: what serves now is long-lived, frozen
        out of the collections (``gcpolicy``); a change that left old versions
        or sites behind arms a sweep for when they have drained."""
        if not self.queue.empty():
            return   # the next one (a reload's commit after its prepare) settles
        gcpolicy.settle()
        if self.sweeper is not None and self._left_garbage:
            self.sweeper.changed()
        self._left_garbage = False

    def _may_leave_garbage(self, command: Any) -> bool:
        """Can *command* leave something behind for a sweep: a published
        version it replaces, a staged one it drops, a site it removes?

        A new site's first ``Commit`` replaces nothing: a start-up (10,000 of
        them) arms no sweep -- a full collection of every object, hundreds of
        ms of stall at that size, that would find nothing."""
        from .commands import site_of

        kind = type(command).__name__
        if kind in _NO_GARBAGE:
            return False
        name = site_of(command)
        site = self.executor.sites.get(name) if self.executor is not None and name is not None else None
        if site is None:
            return False   # no such site: nothing to leave behind (the command fails)
        if kind == "Abort":
            return site.staged is not None
        if kind in ("Commit", "Update", "PrepareAndCommit"):
            return site.service is not None
        return True   # Remove, or a command this does not know

    async def _run_one(self, command: Any) -> tuple[bool, Any]:
        """One command, alone or of a batch: (True, its result) or (False, its error)."""
        from .commands import site_of
        from .errors import HotproxyError, WorkerError, describe

        if not self._left_garbage and self._may_leave_garbage(command):
            self._left_garbage = True
        if self.fds is not None:
            command = self.fds.received(command)
        # reload phases at debug level: once per command, never on the data path
        debug = log.isEnabledFor(logging.DEBUG)
        t0 = time.perf_counter() if debug else 0.0
        outcome: tuple[bool, Any]
        try:
            outcome = True, await self.executor.execute(command)
        except HotproxyError as exc:
            outcome = False, exc
        except Exception as exc:  # a bug or a bad command: report, keep serving
            log.exception("command %r failed", command)
            outcome = False, WorkerError(self.worker_id, describe(exc, typed=True))
        finally:
            if self.fds is not None:
                self.fds.done(command)   # a descriptor no listener took is closed
        if debug:
            log.debug("reload phase %s of site %r: %s in %.1f ms", PHASES.get(type(command).__name__, "command"),
                      site_of(command) or "?", "ok" if outcome[0] else f"failed: {outcome[1]}",
                      (time.perf_counter() - t0) * 1000.0)
        return outcome

    async def _run_batch(self, writer: asyncio.StreamWriter, req_id: int, commands: list[Any]) -> None:
        """Run *commands* in order; send their outcomes as they come (``"part"``,
        at most every ``FLUSH`` seconds) and the last ones with the reply
        (``"res"``).  Between two slices of ``SLICE`` seconds the loop turns:
        accepts, relays and status requests go on while a big batch runs."""
        done: list[tuple[bool, Any]] = []
        last_flush = last_yield = time.monotonic()
        for i, command in enumerate(commands):
            done.append(await self._run_one(command))
            now = time.monotonic()
            if now - last_flush >= FLUSH and i + 1 < len(commands):
                self._send_outcomes(writer, "part", req_id, done)
                done, last_flush = [], now
            if now - last_yield >= SLICE:
                await asyncio.sleep(0)
                last_yield = time.monotonic()
        self._send_outcomes(writer, "res", req_id, done)

    def _send_outcomes(self, writer: asyncio.StreamWriter, kind: str, req_id: int,
                       outcomes: list[tuple[bool, Any]]) -> None:
        from .errors import WorkerError

        try:
            write_message(writer, (kind, req_id, True, outcomes))
        except Exception:  # e.g. an unpicklable result or error: that one only says so
            import pickle

            safe: list[tuple[bool, Any]] = []
            for ok, value in outcomes:
                try:
                    pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                    safe.append((ok, value))
                except Exception as exc:
                    safe.append((False, WorkerError(self.worker_id, repr(exc))))
            write_message(writer, (kind, req_id, True, safe))


def _raise_nofile() -> tuple[int, int] | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (a listener per
    service, 10,000 of them, need descriptors); (soft before, hard) if raised."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == hard or (hard != resource.RLIM_INFINITY and soft > hard):
            return None
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return soft, hard
    except (ValueError, OSError):
        return None   # the master's log says what the limit is


#: the commands that leave nothing behind to collect (a Precommit stages the new version)
_NO_GARBAGE = frozenset({"Precommit"})
#: seconds after the drain timeout that a change's frozen garbage is swept
SWEEP_AFTER = 1.0

#: what each command is, as the debug log names it (the reload's phases on this worker)
PHASES = {"Precommit": "prepare", "Commit": "commit", "Abort": "abort", "Update": "update",
          "Remove": "remove", "PrepareAndCommit": "prepare+commit"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotproxy-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--fd-channel", type=int, default=None)
    parser.add_argument("--counters-fd", type=int, default=None)
    # the region of the counters this worker counts in (default: its id)
    parser.add_argument("--counters-region", type=int, default=None)
    # the instance's health states (health.HealthTable)
    parser.add_argument("--health-fd", type=int, default=None)
    args = parser.parse_args(argv)
    # The master decides what SIGHUP and SIGINT mean (a terminal's hang-up or
    # ^C reaches the whole process group): ignored from the first moment.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent()
    nofile = _raise_nofile()
    if os.getppid() == 1:
        return EXIT_BOOT_FAILURE  # the master died before we started
    try:
        import uvloop

        sock = socket.socket(fileno=args.fd)
        fds = FdReceiver(socket.socket(fileno=args.fd_channel)) if args.fd_channel is not None else None
        if args.counters_fd is not None:
            from .limits import Segment

            Segment.attach(args.counters_fd, args.id if args.counters_region is None else args.counters_region)
        if args.health_fd is not None:
            from .health import HealthTable

            HealthTable.attach(args.health_fd)
        worker = WorkerProcess(sock, args.id, fds)
        worker.nofile = nofile
    except Exception as exc:
        print(f"hotproxy worker {args.id}: cannot start: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILURE
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(worker.run())


if __name__ == "__main__":
    sys.exit(main())
