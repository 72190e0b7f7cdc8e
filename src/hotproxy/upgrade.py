"""Upgrading hotproxy itself: a new master, from the code now on disk, takes over.

``hotproxy upgrade`` (or ``SIGUSR2`` to the master) makes the running master
start a new one -- ``python -m <the module it was started as> run -c FILE
--upgrade-fd N`` -- and hand it, over a private socketpair, everything a
client or an operator reaches: the Unix listening sockets the master owns, the
TCP listening sockets of its workers (each old worker sends its own over
its fd channel), the bound admin socket, the instance's connection counters and health states, and a snapshot
of every service's state.  It is a reload of the master, all or nothing:

1. **Prepare** (the new master): read what the old one sent, load the file
   as it is now, start its workers and apply the config to them, seeded
   with the snapshot.  The old workers' TCP sockets follow the hello, one
   old worker's after the other, and are passed on to the new workers as
   they arrive (neither master ever holds them all: 10,000 services fit a
   master's descriptor limit).  New worker *i* serves each TCP address on
   old worker *i*'s very socket for it (matched by ``getsockname``: both
   generations accept on it during the overlap, and its queue goes on);
   new workers beyond the old count, and addresses the old master did not
   serve, bind their own with ``SO_REUSEPORT``; a handed-over socket no
   service takes is closed.  Unix listeners are the very sockets the old
   master passed.  Then it says ``ready``.
2. **Any failure before** ``ready`` -- the new code does not import, the
   file is bad, a worker does not come up or fails to build a service, the
   new master dies or is killed, or says nothing within
   ``runtime.upgrade_timeout`` -- and the old master kills it (its workers
   follow, draining what they accepted) and serves on exactly as before.
3. **Commit** (the old master, on ``ready``): stop accepting admin
   connections (the socket stays bound: connections queue for the new
   master), say ``released``, and stop gracefully -- its workers close
   their listeners (taking and serving what the kernel queued; a socket a
   new worker holds lives on there, so nothing on it is reset) and drain
   within ``drain_timeout``.  The new master then
   accepts on the admin socket, writes the pidfile, tells systemd
   ``MAINPID=`` and ``READY=1``.  The old master answers the new one's
   ``status`` and ``stop`` until it has drained and exits; the next upgrade
   passes its channel on, so any number of old masters may drain at once.

Rules of this module:

* The channel is a ``SOCK_SEQPACKET`` socketpair; each message is one JSON
  object of at most ``MAX_MESSAGE`` bytes, with at most one descriptor --
  but ``fds``, which carries up to ``SCM_MAX_FD`` (the workers' TCP
  sockets: 10,000 services on 4 workers are 159 messages, not 40,000).
  Plain data only, never pickles: the two ends run different versions of
  hotproxy.  ``PROTOCOL`` is the version of these messages; unknown keys are
  ignored, an unknown message type is answered with an error or skipped.
* The new master owns nothing of the old one's until ``released``: a
  failed upgrade leaves every file (socket paths, the admin socket, the
  pidfile) as the old master has it.
* Nothing waits without a bound: the old master waits ``upgrade_timeout``
  for ``ready``, the new one ``HELLO_TIMEOUT`` for what the old one sends.

Messages (old -> new, then new -> old, then both ways while the old drains)::

    {"type": "fd", "name": "admin" | "listener" | "counters" | "health" | "state" | "old-master", ...} + descriptor
    {"type": "hello", "protocol": 1, "pid": OLD, "admin_socket": PATH, "listen": [...], "tcp": true, ...}
        (larger than MAX_MESSAGE: {"type": "hello", "protocol": 1, "memfd": true} + a memfd holding it)
    {"type": "fds", "items": [{"name": "tcp", "worker": I, "key": ["tcp", HOST, PORT], "site": NAME}, ...]} + descriptors
    {"type": "tcp-end"}     (the "fds" and this only if the hello says "tcp": true)
    {"type": "ready", "pid": NEW, "admin": "inherited" | "own", "marks": {...}}   or   {"type": "failed", "error": LINE}
    {"type": "released"}
    {"type": "status"} -> {"type": "status", "pid": OLD, "connections": N, "since": T, "drain_timeout": S}
    {"type": "stop", "graceful": true}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Callable

log = logging.getLogger("hotproxy.upgrade")

#: the version of the messages below
PROTOCOL = 1

#: the largest message (a hello names every listen address; the state travels in a memfd)
MAX_MESSAGE = 256 * 1024

#: the most descriptors one message carries (the kernel's ``SCM_MAX_FD``)
SCM_MAX_FD = 253

#: seconds the new master waits for the old one's hello, and the old one for "released" to be read
HELLO_TIMEOUT = 30.0

#: how the old master tells its child it is an upgrade (``hotproxy run --upgrade-fd N``)
UPGRADE_FD_OPTION = "--upgrade-fd"

#: test-only: makes the *new* master fail at one point (``import``: before
#: anything; ``hang``: once its workers serve, it never says ready).  Read
#: only by a process started with ``--upgrade-fd``, so the old master that
#: has it in its environment is not affected.
TEST_FAILURE_ENV = "HOTPROXY_TEST_FAIL_UPGRADE"


class UpgradeError(Exception):
    """The upgrade cannot go on (one line: why)."""


#: test-only: seconds a new master waits, serving, before it says it is ready (a wide hand-over window)
TEST_PAUSE_ENV = "HOTPROXY_TEST_UPGRADE_PAUSE"


def test_pause() -> float:
    """The seconds ``HOTPROXY_TEST_UPGRADE_PAUSE`` asks a new master to wait before ``ready`` (0: none)."""
    try:
        return min(max(float(os.environ.get(TEST_PAUSE_ENV, "0")), 0.0), 60.0)
    except ValueError:
        return 0.0


def test_failure(point: str) -> bool:
    """True if the test-only ``HOTPROXY_TEST_FAIL_UPGRADE`` asks the new master to fail at *point*."""
    return os.environ.get(TEST_FAILURE_ENV) == point


# -- the channel ---------------------------------------------------------------------------


class Channel:
    """One end of the socketpair between two masters (see the module's docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._closed = False

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        """Our end, and the other end as a plain socket (to pass to a child)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(ours), theirs

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, msg: dict[str, Any], fd: int | None = None, fds: list[int] | None = None) -> None:
        """Send one message (and *fd*, or up to ``SCM_MAX_FD`` *fds*); ``OSError`` if the other end is gone."""
        data = json.dumps(msg, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE:
            raise UpgradeError(f"upgrade message of {len(data)} bytes is too large")
        send = list(fds or ()) + ([fd] if fd is not None else [])
        while True:
            try:
                socket.send_fds(self.sock, [data], send)
                return
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)

    async def recv(self) -> tuple[dict[str, Any], int | None] | None:
        """The next message and its descriptor, or None once the other end is gone."""
        got = await self.recv_many()
        if got is None:
            return None
        msg, fds = got
        for extra in fds[1:]:
            os.close(extra)
        return msg, fds[0] if fds else None

    async def recv_many(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and its descriptors (``fds`` has several), or None once the other end is gone."""
        from .fdchannel import recv_fds
        while True:
            try:
                # (close-on-exec: a new master's workers must not inherit what it was sent)
                data, fds = recv_fds(self.sock, MAX_MESSAGE, SCM_MAX_FD)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError:
                return None
            if not data:
                for fd in fds:
                    os.close(fd)
                return None
            try:
                msg = json.loads(data)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except ValueError:
                for fd in fds:
                    os.close(fd)
                log.warning("upgrade channel: a message that is not a JSON object; ignored")
                continue
            return msg, fds

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if writable else loop.add_reader)(fd, wake)
        try:
            await fut
        finally:
            (loop.remove_writer if writable else loop.remove_reader)(fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.sock.close()


def report_failure(fd: int, error: str) -> None:
    """Tell the old master, on the channel *fd*, that this new master failed (best effort).

    Used where the new code may be broken: it needs nothing but ``socket``
    and ``json``.
    """
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)
        try:
            sock.settimeout(5.0)
            sock.send(json.dumps({"type": "failed", "error": error[:4000]}).encode())
        finally:
            sock.detach()


# -- the state snapshot ------------------------------------------------------------------------
#
# Every service's state, per old worker, as plain data in a memfd (no size
# limit on the channel):  {"format": "hotproxy-state", "version": 1,
# "workers": [{"worker": 0, "sites": {NAME: Service.snapshot()}}, ...]}.
# A snapshot this version cannot read is dropped with a warning: the
# services start afresh, the upgrade goes on.

STATE_FORMAT = "hotproxy-state"
STATE_VERSION = 1

#: the largest snapshot read (a few hundred bytes per service and worker)
MAX_STATE = 64 * 1024 * 1024


def write_state(workers: list[dict[str, Any]]) -> int | None:
    """A memfd holding the snapshot of *workers* (``WorkerManager.snapshot``); None if it cannot be made."""
    try:
        data = json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "workers": workers},
                          separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        log.warning("upgrade: the services' state is not plain data (%s): not carried over", exc)
        return None
    fd = os.memfd_create("hotproxy-state", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def read_state(fd: int) -> list[dict[str, Any]] | None:
    """The old workers' snapshots from the memfd *fd* (closed); None, with a warning, if unreadable."""
    try:
        size = os.fstat(fd).st_size
        if size > MAX_STATE:
            raise ValueError(f"{size} bytes is more than {MAX_STATE}")
        return parse_state(os.pread(fd, size, 0))
    except (OSError, ValueError) as exc:
        log.warning("upgrade: the state of the old master's services was dropped (%s); they start afresh", exc)
        return None
    finally:
        os.close(fd)


def parse_state(data: bytes) -> list[dict[str, Any]]:
    """The old workers' snapshots from *data*; ``ValueError`` naming what is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise ValueError("not a hotproxy state snapshot")
    if doc.get("version") != STATE_VERSION:
        raise ValueError(f"snapshot version {doc.get('version')!r}; this hotproxy reads version {STATE_VERSION}")
    workers = doc.get("workers")
    if not isinstance(workers, list) or not all(isinstance(w, dict) and isinstance(w.get("sites"), dict)
                                                for w in workers):
        raise ValueError("the snapshot's workers are not a list of {worker, sites}")
    return workers


def seeds_for(old: list[dict[str, Any]], count: int) -> dict[int, dict[str, Any]]:
    """Each new worker's seeds (``service.Seed`` by site name) from the old workers' snapshots.

    New worker *j* continues the counts of old workers *k* with ``k % count
    == j`` (each count carried exactly once, whatever the two worker counts)
    and takes the view (health, positions) of old worker ``j % len(old)``.
    """
    from .service import Seed   # here: the channel's side of this module needs no service

    out: dict[int, dict[str, Any]] = {}
    if not old:
        return out
    for j in range(count):
        carried = [w["sites"] for k, w in enumerate(old) if k % count == j]
        like = old[j % len(old)]["sites"]
        names = set(like).union(*carried)
        out[j] = {name: Seed(tuple(s[name] for s in carried if name in s), like.get(name)) for name in names}
    return out


def late_seeds_for(before: list[dict[str, Any]], after: list[dict[str, Any]],
                   count: int) -> dict[int, dict[str, tuple[Any, Any]]]:
    """Each new worker's (before, after) seeds by site name, for ``Service.carry_late``:
    the old workers' snapshots at the start of the upgrade and at the hand-over,
    matched by worker id, so that each old worker's late counts go to one new worker."""
    first = {w.get("worker"): w for w in before}
    last = [w for w in after if isinstance(w.get("sites"), dict)]
    pairs_before = [first.get(w.get("worker")) or {"worker": w.get("worker"), "sites": {}} for w in last]
    b, a = seeds_for(pairs_before, count), seeds_for(last, count)
    return {j: {name: (b[j].get(name) or type(seed)(), seed) for name, seed in a[j].items()} for j in a}


# -- the old master's side -------------------------------------------------------------------


@dataclass
class UpgradeResult:
    """The outcome of one upgrade, as ``hotproxy upgrade`` prints it."""

    ok: bool
    old_pid: int
    new_pid: int | None = None
    error: str | None = None
    trigger: str = ""
    at: float = 0.0
    duration_ms: float = 0.0
    #: how many requests this upgrade answered (concurrent ones are merged)
    requests: int = 1
    notes: list[str] = field(default_factory=list)
    #: where the time went: ms from the request to each step (``PHASES``), as far as it got
    phases: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """One line: ``upgrade ok: pid 10 -> pid 20 in 812.3 ms ...`` or ``upgrade failed: ...``."""
        from .report import upgrade_line

        return upgrade_line(vars(self))

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


#: the steps of an upgrade, in order, as ``UpgradeResult.phases`` names them (ms since the request):
#: the old master starts the new one (a reload running has ended); the new one runs its
#: ``main`` (the interpreter and the CLI are up); it has loaded the file and imported the
#: master; it read the hello; its workers said hello; the config is applied on them (they
#: serve); it said ready; the old master has released everything (its workers stopped accepting)
PHASES = ("spawn", "main", "loaded", "hello", "workers", "applied", "ready", "released")


def phases_from(started: float, marks: dict[str, Any]) -> dict[str, float]:
    """*marks* (``time.monotonic()`` values of ``PHASES``, from both masters: one clock
    for every process of the machine) as ms since *started*, in order, the unknown ones left out."""
    out: dict[str, float] = {}
    for name in PHASES:
        value = marks.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = round((float(value) - started) * 1000.0, 1)
    return out


def new_master_command(config_path: str | None, fd: int, extra: tuple[str, ...] = ()) -> list[str]:
    """How to start the new master: the module this one was started as
    (``hotproxy.cli`` for the console script), from the code now on disk;
    *extra*: ``run`` options this master was started with that the file
    does not hold (``--etcd URL``)."""
    main = sys.modules.get("__main__")
    spec = main.__spec__ if main is not None else None
    module = spec.name if spec is not None and spec.name else "hotproxy.cli"
    cmd = [sys.executable, "-m", module, "run"]
    if config_path is not None:
        cmd += ["-c", config_path]
    return cmd + list(extra) + [UPGRADE_FD_OPTION, str(fd)]


class NewMasterProcess:
    """The old master's view of the new master it started: the process and the channel."""

    def __init__(self, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        self.proc = proc
        self.channel = channel
        self.pid = proc.pid
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(proc.pid)

    @classmethod
    def start(cls, config_path: str | None, extra: tuple[str, ...] = ()) -> NewMasterProcess:
        """Start the new master; ``UpgradeError`` if it cannot be started."""
        channel, theirs = Channel.pair()
        try:
            proc = subprocess.Popen(new_master_command(config_path, theirs.fileno(), extra),
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            channel.close()
            raise UpgradeError(f"cannot start the new master: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        return cls(proc, channel)

    async def exited(self) -> int:
        """Wait until the process has exited; its return code."""
        loop = asyncio.get_running_loop()
        while self.proc.poll() is None:
            if self._pidfd is None:
                await asyncio.sleep(0.05)
                continue
            fut: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(self._pidfd, wake)
            try:
                await asyncio.wait_for(fut, 1.0)
            except asyncio.TimeoutError:
                pass
            finally:
                loop.remove_reader(self._pidfd)
        return self.proc.returncode

    def how_it_ended(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "is running"
        return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"

    async def kill(self) -> None:
        """Kill it (its workers follow: they drain what they accepted) and reap it, bounded."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.exited(), 10.0)
        self.close()

    def close(self) -> None:
        """Forget the process (it goes on); close the pidfd."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


async def send_everything(child: NewMasterProcess, fds: list[tuple[dict[str, Any], int]], hello: dict[str, Any],
                          tcp: Callable[[], AsyncGenerator[list[tuple[dict[str, Any], int]], None]] | None = None
                          ) -> None:
    """The descriptors, each with its message; the hello; then the workers' TCP
    sockets, as *tcp* yields them (a list per old worker: sent ``SCM_MAX_FD`` to
    a message, then closed by *tcp*, so this master holds one worker's at most)
    and ``tcp-end``.  They come after the hello so that the new master, its
    workers started, passes each on as it arrives (``Link.receive_tcp``) and
    holds none of them either."""
    for msg, fd in fds:
        await child.channel.send({"type": "fd", **msg}, fd)
    await _send_hello(child.channel, {"type": "hello", "protocol": PROTOCOL, **hello, "tcp": tcp is not None})
    if tcp is None:
        return
    # (closed however this ends, cancelled included: the descriptors it holds are closed at once)
    async with contextlib.aclosing(tcp()) as lists:
        async for items in lists:
            for start in range(0, len(items), SCM_MAX_FD):
                batch = items[start:start + SCM_MAX_FD]
                await child.channel.send({"type": "fds", "items": [{"name": "tcp", **msg} for msg, _ in batch]},
                                         fds=[fd for _, fd in batch])
    await child.channel.send({"type": "tcp-end"})


async def _send_hello(channel: Channel, msg: dict[str, Any]) -> None:
    """The hello; one too large for a message (10,000 services' addresses and counter slots) in a memfd."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) <= MAX_MESSAGE:
        await channel.send(msg)
        return
    fd = os.memfd_create("hotproxy-hello", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        await channel.send({"type": "hello", "protocol": PROTOCOL, "memfd": True}, fd)
    finally:
        os.close(fd)


async def wait_ready(child: NewMasterProcess, timeout: float) -> dict[str, Any]:
    """The new master's ``ready`` message; ``UpgradeError`` (one line) for any other end."""
    recv = asyncio.ensure_future(child.channel.recv())
    exited = asyncio.ensure_future(child.exited())
    try:
        done, _ = await asyncio.wait({recv, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if recv in done:
            got = recv.result()
            if got is not None:
                msg, fd = got
                if fd is not None:
                    os.close(fd)
                if msg.get("type") == "ready":
                    return msg
                if msg.get("type") == "failed":
                    raise UpgradeError(f"the new master (pid {child.pid}) failed: {msg.get('error')}")
                raise UpgradeError(f"the new master (pid {child.pid}) said {msg.get('type')!r}, not ready")
            # its end closed: it is exiting
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), 5.0)
        if child.proc.poll() is not None:
            raise UpgradeError(f"the new master (pid {child.pid}) {child.how_it_ended()} before it served")
        if recv in done:
            raise UpgradeError(f"the new master (pid {child.pid}) closed the upgrade channel before it served")
        raise UpgradeError(f"the new master (pid {child.pid}) did not serve within {timeout:g}s "
                           "(runtime.upgrade_timeout): killed")
    finally:
        for task in (recv, exited):
            task.cancel()
        await asyncio.gather(recv, exited, return_exceptions=True)


async def serve_new_master(channel: Channel, status: Callable[[], Any],
                           stop: Callable[[bool], None]) -> None:
    """The old master, draining: answer the new master's ``status`` and ``stop`` until it goes away."""
    while True:
        got = await channel.recv()
        if got is None:
            return
        msg, fd = got
        if fd is not None:
            os.close(fd)
        kind = msg.get("type")
        try:
            if kind == "status":
                await channel.send({"type": "status", **(await status())})
            elif kind == "stop":
                stop(bool(msg.get("graceful", True)))
                await channel.send({"type": "stopping"})
            else:
                await channel.send({"type": "error", "error": f"unknown message {kind!r}"})
        except OSError:
            return


# -- the new master's side -------------------------------------------------------------------


@dataclass
class Hello:
    """What the old master sent: its descriptors by name, and the hello's fields."""

    pid: int
    admin_socket: str | None
    #: the listen addresses of the old master's services (``ServiceConfig.listen``)
    listen: list[str]
    #: the old master's Unix listening sockets, by path
    unix: dict[str, socket.socket] = field(default_factory=dict)
    admin: socket.socket | None = None
    #: the listening sockets systemd passed to the first master (``activation``)
    activated: list[socket.socket] = field(default_factory=list)
    #: descriptors of other kinds, by name (the counters, the state)
    fds: dict[str, int] = field(default_factory=dict)
    #: channels to older masters still draining: (pid, channel)
    old_masters: list[tuple[int, Channel]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)

    def _counters(self) -> dict[str, Any]:
        counters = self.fields.get("counters")
        return counters if isinstance(counters, dict) else {}

    def regions_of(self, pid: int) -> list[int]:
        """The counter regions master *pid* counts in (``limits.Segment``)."""
        regions = (self._counters().get("regions") or {}).get(str(pid)) or []
        return [r for r in regions if isinstance(r, int)]

    def used_regions(self) -> set[int]:
        """Every counter region a master still running counts in."""
        out: set[int] = set()
        for regions in (self._counters().get("regions") or {}).values():
            out.update(r for r in regions or () if isinstance(r, int))
        return out

    def counter_slots(self) -> list[Any]:
        """The services' counter slots (``Segment.slot_names``)."""
        slots = self._counters().get("slots")
        return [s for s in slots if isinstance(s, list) and len(s) == 3] if isinstance(slots, list) else []

    def close(self) -> None:
        """Close every descriptor nobody took."""
        for sock in self.unix.values():
            sock.close()
        self.unix.clear()
        for sock in self.activated:
            sock.close()
        self.activated.clear()
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        for _, chan in self.old_masters:
            chan.close()
        self.old_masters.clear()


def _read_hello(fd: int) -> dict[str, Any]:
    """The hello the old master wrote in the memfd *fd* (closed); ``UpgradeError`` if unreadable."""
    try:
        size = os.fstat(fd).st_size
        if size > MAX_STATE:
            raise ValueError(f"{size} bytes is more than {MAX_STATE}")
        msg = json.loads(os.pread(fd, size, 0))
        if not isinstance(msg, dict) or msg.get("type") != "hello":
            raise ValueError("not a hello")
        return msg
    except (OSError, ValueError, RecursionError) as exc:
        raise UpgradeError(f"the old master's hello cannot be read: {exc}") from None
    finally:
        os.close(fd)


class Link:
    """The new master's end of the channel to the old master that started it."""

    def __init__(self, fd: int, marks: dict[str, float] | None = None) -> None:
        self.fd = fd
        self.channel = Channel(socket.socket(fileno=fd))
        self.hello: Hello | None = None
        self.failed_reported = False
        #: ``time.monotonic()`` at each of this master's ``PHASES``, sent with ``ready``
        self.marks: dict[str, float] = dict(marks or {})
        #: the state memfd the old master sent with ``released``: its workers' final snapshots
        self.last_state: int | None = None

    async def receive(self, timeout: float = HELLO_TIMEOUT) -> Hello:
        """Everything the old master sends before its hello, and the hello; ``UpgradeError`` if it does not come."""
        hello = Hello(pid=0, admin_socket=None, listen=[])
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg, fds = await self._next("its hello")
                    kind = msg.get("type")
                    for extra in fds[1:]:
                        os.close(extra)
                    fd = fds[0] if fds else None
                    if kind == "fd" and fd is not None:
                        self._take(hello, msg, fd)
                    elif kind == "hello":
                        if msg.get("memfd") is True and fd is not None:
                            msg = _read_hello(fd)   # (closes it)
                        elif fd is not None:
                            os.close(fd)
                        if msg.get("protocol") != PROTOCOL:
                            raise UpgradeError(f"the old master speaks upgrade protocol {msg.get('protocol')!r}, "
                                               f"this hotproxy {PROTOCOL}")
                        hello.pid = int(msg.get("pid") or 0)
                        hello.admin_socket = msg.get("admin_socket")
                        hello.listen = [str(a) for a in msg.get("listen") or ()]
                        hello.fields = msg
                        self.hello = hello
                        return hello
                    elif fd is not None:
                        os.close(fd)
        except TimeoutError:
            hello.close()
            raise UpgradeError(f"no hello from the old master within {timeout:g}s") from None
        except BaseException:
            hello.close()
            raise

    async def receive_tcp(self, take: Callable[[list[tuple[int, tuple[Any, ...], int]]], None],
                          timeout: float = HELLO_TIMEOUT) -> int:
        """The old workers' TCP sockets, which follow the hello: ``take([(old worker id,
        address key, fd), ...])`` for each message's as it arrives (the fds are
        *take*'s); how many came.  ``UpgradeError`` if they do not end within *timeout*."""
        assert self.hello is not None
        if self.hello.fields.get("tcp") is not True:
            return 0   # an old master that hands none over
        count = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg, fds = await self._next("its workers' sockets")
                    kind = msg.get("type")
                    if kind == "tcp-end":
                        for fd in fds:
                            os.close(fd)
                        return count
                    items = msg.get("items") if kind == "fds" else None
                    items = items if isinstance(items, list) else []
                    got: list[tuple[int, tuple[Any, ...], int]] = []
                    for i, fd in enumerate(fds):
                        item = items[i] if i < len(items) and isinstance(items[i], dict) else {}
                        key, worker = item.get("key"), item.get("worker")
                        if item.get("name") == "tcp" and isinstance(worker, int) and isinstance(key, list) \
                                and len(key) == 3:
                            got.append((worker, tuple(key), fd))
                        else:
                            os.close(fd)
                    count += len(got)
                    if got:
                        take(got)
        except TimeoutError:
            raise UpgradeError(f"the old master's workers' sockets did not come within {timeout:g}s") from None

    async def _next(self, before: str) -> tuple[dict[str, Any], list[int]]:
        """The old master's next message and its descriptors; ``UpgradeError``
        if it closed the channel before *before* came."""
        many = await self.channel.recv_many()
        if many is None:
            raise UpgradeError(f"the old master closed the upgrade channel before {before}")
        return many

    @staticmethod
    def _take(hello: Hello, msg: dict[str, Any], fd: int) -> None:
        name = str(msg.get("name"))
        if name == "admin":
            hello.admin = socket.socket(fileno=fd)
        elif name == "listener" and isinstance(msg.get("path"), str):
            hello.unix[msg["path"]] = socket.socket(fileno=fd)
        elif name == "activated":
            hello.activated.append(socket.socket(fileno=fd))
        elif name == "old-master":
            hello.old_masters.append((int(msg.get("pid") or 0), Channel(socket.socket(fileno=fd))))
        else:
            old = hello.fds.pop(name, None)
            if old is not None:
                os.close(old)
            hello.fds[name] = fd

    def mark(self, phase: str) -> None:
        """This master has reached *phase* (one of ``PHASES``) now."""
        self.marks[phase] = time.monotonic()

    async def ready(self, admin_inherited: bool) -> bool:
        """Say ``ready``; then wait for ``released``.  True once released; False if the
        old master is gone (it died: this master serves on, the files are ours)."""
        self.mark("ready")
        try:
            await self.channel.send({"type": "ready", "pid": os.getpid(),
                                     "admin": "inherited" if admin_inherited else "own", "marks": self.marks})
        except OSError:
            return False
        while True:
            got = await self.channel.recv()
            if got is None:
                return False
            msg, fd = got
            if msg.get("type") == "released" and msg.get("state") == "final" and fd is not None:
                self.last_state = fd
                return True
            if fd is not None:
                os.close(fd)
            if msg.get("type") == "released":
                return True

    def failed(self, error: str) -> None:
        """Tell the old master this upgrade failed (once; best effort)."""
        if self.failed_reported or self.channel.closed:
            return
        self.failed_reported = True
        with contextlib.suppress(OSError):
            self.channel.sock.setblocking(True)
            self.channel.sock.settimeout(5.0)
            self.channel.sock.send(json.dumps({"type": "failed", "error": error[:4000]}).encode())


class OldMaster:
    """A master that handed over and drains, as the newest master sees it (through its channel)."""

    def __init__(self, pid: int, channel: Channel, since: float | None = None,
                 regions: list[int] | None = None) -> None:
        self.pid = pid
        self.channel = channel
        #: the counter regions its workers count in (``limits.Segment``)
        self.regions = regions or []
        self.since = since if since is not None else time.time()
        self._lock = asyncio.Lock()
        self._replies: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self.gone = asyncio.Event()

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                got = await self.channel.recv()
                if got is None:
                    break
                msg, fd = got
                if fd is not None:
                    os.close(fd)
                self._replies.put_nowait(msg)
        finally:
            self.gone.set()
            self._replies.put_nowait(None)

    async def _ask(self, msg: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        async with self._lock:
            if self.gone.is_set():
                return None
            while not self._replies.empty():   # late answers to requests given up on
                if self._replies.get_nowait() is None:
                    return None
            try:
                await self.channel.send(msg)
                return await asyncio.wait_for(self._replies.get(), timeout)
            except (OSError, asyncio.TimeoutError):
                return None

    async def status(self, timeout: float = 2.0) -> dict[str, Any]:
        """``{"pid", "since", "answering"}``, and when it answered within *timeout*
        ``"connections"`` (left to drain), ``"drain_timeout"`` and ``"workers"``
        (one that is finishing its drain may not answer any more)."""
        reply = await self._ask({"type": "status"}, timeout)
        out: dict[str, Any] = {"pid": self.pid, "since": self.since, "answering": reply is not None}
        if reply is not None:
            out.update({k: reply.get(k) for k in ("connections", "drain_timeout", "workers")})
            out["since"] = reply.get("since", self.since)
        return out

    async def stop(self, graceful: bool) -> None:
        await self._ask({"type": "stop", "graceful": graceful}, 2.0)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.channel.close()


class OldMasters:
    """Every master still draining after handing over, newest first."""

    def __init__(self) -> None:
        self.masters: list[OldMaster] = []

    def add(self, master: OldMaster) -> None:
        master.start()
        self.masters.append(master)

    def alive(self) -> list[OldMaster]:
        self.masters = [m for m in self.masters if not m.gone.is_set()]
        return list(self.masters)

    async def status(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(m.status() for m in self.alive())))

    async def stop(self, graceful: bool) -> None:
        await asyncio.gather(*(m.stop(graceful) for m in self.alive()))

    async def wait_gone(self, timeout: float) -> bool:
        """Wait until every old master has exited (its channel closed); False at the deadline."""
        waiting = [m.gone.wait() for m in self.alive()]
        if not waiting:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*waiting), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def hand_over(self) -> list[tuple[dict[str, Any], int]]:
        """The channels to pass to the next new master (fd messages)."""
        return [({"name": "old-master", "pid": m.pid, "since": m.since}, m.channel.fileno()) for m in self.alive()]

    def close(self) -> None:
        for m in self.masters:
            m.close()
        self.masters.clear()


__all__ = ["Channel", "Hello", "Link", "NewMasterProcess", "OldMaster", "OldMasters", "PHASES", "PROTOCOL",
           "UPGRADE_FD_OPTION", "UpgradeError", "UpgradeResult", "new_master_command", "phases_from", "report_failure",
           "send_everything", "serve_new_master", "test_failure", "wait_ready"]
