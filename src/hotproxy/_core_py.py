"""The pure-Python twin of ``_core.pyx``: same names, same behaviour.

Used when the extension is missing or ``HOTPROXY_NO_EXTENSIONS=1``; the
test-suite runs against both (and ``tests/test_core_equivalence.py`` checks
that the two expose the same API and do the same).  The relay's logic is
not repeated here: ``Relay`` (a connection's states and decisions), the
direction state machine, the timer wheel and ``RelayConfig`` & co. are
``_core_machine.py``, which the compiled core builds and this module runs
as Python.  What is here is the other half, written twice because it is
system calls: socket methods, ``select.epoll``, ``os.splice`` and ``lockf``
here, C calls and atomics there.  Keep the two in step, function for
function.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import fcntl as _fcntl
import logging
import mmap as _mmap
import os as _os
import select as _select
import socket as _socket
import sys
import time
from importlib import util as _importlib_util
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core_machine import Direction, ProxyCounters, RelayConfig, Target, UpstreamState
    from ._core_machine import Acceptor, ConnectionSet, Slot
    from ._core_machine import Counter as _Counter
    from ._core_machine import EngineBase as _EngineBase
    from ._core_machine import Relay as _Relay


def _load_as_python(stem: str) -> ModuleType:
    """The package's ``STEM.py`` run as plain Python (once; as ``STEM_py``):
    the compiled core builds the same file (pure-Python mode) into an
    extension of that name, which a plain import would pick."""
    name = __name__.rpartition(".")[0] + f".{stem}_py"
    mod = sys.modules.get(name)
    if mod is None:
        path = _os.path.join(_os.path.dirname(__file__), f"{stem}.py")
        spec = _importlib_util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = _importlib_util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


#: The relay's logic, the state machine, the timer wheel, Slot & co., run as Python.
_machine = _load_as_python("_core_machine")

# A site's slot, connection sets and acceptor are _core_machine's (one
# source for both cores).
if not TYPE_CHECKING:
    Slot = _machine.Slot
    ConnectionSet = _machine.ConnectionSet
    Acceptor = _machine.Acceptor
    _Counter = _machine.Counter
_accept_failed = _machine.accept_failed
_accept_log = logging.getLogger("hotproxy.accept")


# -- connection counts shared by the processes of an instance (see _core.pyx) ------
#
# Python has no atomic operations on shared memory, so every change of a total
# (and the share that goes with it) is made under a lock on the total's 8
# bytes (``fcntl.lockf`` on the memory's file; the kernel drops it when a
# process dies): two system calls per change, slow but exact.  Memory no
# other process maps (``lock`` None) needs no lock.

_TABLE_HEADER = 64
_TOTAL_STRIDE = 64


def table_size(slots: int, workers: int) -> int:
    """Bytes a ``CounterTable`` of *slots* slots and *workers* workers needs."""
    if slots < 1 or workers < 1:
        raise ValueError("need slots >= 1 and workers >= 1")
    return _TABLE_HEADER + slots * _TOTAL_STRIDE + workers * slots * 8


class CounterTable:
    """Counters in memory that the processes of an instance share (see ``_core.pyx``)."""

    __slots__ = ("slots", "workers", "worker", "lock", "_words", "_buffer")

    def __init__(self, buffer: Any, slots: int, workers: int, worker: int = -1, lock: Any = None) -> None:
        if slots < 1 or workers < 1 or not -1 <= worker < workers:
            raise ValueError("need slots >= 1, workers >= 1 and -1 <= worker < workers")
        view = memoryview(buffer)
        if view.readonly:
            raise BufferError("Object is not writable.")
        if view.nbytes < table_size(slots, workers):
            raise ValueError(f"the buffer has {view.nbytes} bytes, the table needs "
                             f"{table_size(slots, workers)}")
        self._buffer = buffer
        self._words = view.cast("B").cast("q")
        self.slots = slots
        self.workers = workers
        self.worker = worker
        self.lock = lock

    def _total(self, slot: int) -> int:
        # the index of slot's total in _words
        return (_TABLE_HEADER + slot * _TOTAL_STRIDE) // 8

    def _share(self, worker: int, slot: int) -> int:
        return (_TABLE_HEADER + self.slots * _TOTAL_STRIDE) // 8 + worker * self.slots + slot

    def counter(self, slot: int) -> SharedCounter:
        """The ``SharedCounter`` of *slot*, updated as this process's worker."""
        return SharedCounter(self, slot)

    def total(self, slot: int) -> int:
        """The instance's count in *slot*."""
        self._check(slot, 0)
        return self._words[self._total(slot)]

    def share(self, worker: int, slot: int) -> int:
        """*worker*'s part of the count in *slot*."""
        self._check(slot, worker)
        return self._words[self._share(worker, slot)]

    def reclaim(self, worker: int) -> int:
        """Subtract the shares of *worker* -- a dead process -- from the totals
        and zero them; return how many counts that freed."""
        self._check(0, worker)
        words, lock, freed = self._words, self.lock, 0
        for slot in range(self.slots):
            si = self._share(worker, slot)
            if words[si] == 0:
                continue
            off = _TABLE_HEADER + slot * _TOTAL_STRIDE
            if lock is not None:
                _fcntl.lockf(lock, _fcntl.LOCK_EX, 8, off)
            try:
                n = words[si]
                words[off // 8] -= n
                words[si] = 0
                freed += n
            finally:
                if lock is not None:
                    _fcntl.lockf(lock, _fcntl.LOCK_UN, 8, off)
        return freed

    def _check(self, slot: int, worker: int) -> None:
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} is not in the table (0-{self.slots - 1})")
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} is not in the table (0-{self.workers - 1})")

    def __repr__(self) -> str:
        return f"<CounterTable slots={self.slots} workers={self.workers} worker={self.worker}>"


class SharedCounter(_Counter):
    """One slot of a ``CounterTable``, updated as this process's worker (see ``_core.pyx``)."""

    __slots__ = ("table", "slot", "_words", "_t", "_s", "_lock", "_off")

    def __init__(self, table: CounterTable, slot: int) -> None:
        if not isinstance(table, CounterTable):
            raise TypeError("table must be a CounterTable")
        table._check(slot, 0)
        if table.worker < 0:
            raise ValueError("this process has no share in the table (worker -1)")
        self.table = table
        self.slot = slot
        self._words = table._words
        self._t = table._total(slot)
        self._s = table._share(table.worker, slot)
        self._lock = table.lock
        self._off = self._t * 8

    def acquire(self, limit: int) -> bool:
        """Count one more unless *limit* (> 0) are counted already; True if counted."""
        lock = self._lock
        if lock is not None:
            _fcntl.lockf(lock, _fcntl.LOCK_EX, 8, self._off)
        try:
            words = self._words
            n = words[self._t]
            if limit > 0 and n >= limit:
                return False
            words[self._t] = n + 1
            words[self._s] += 1
            return True
        finally:
            if lock is not None:
                _fcntl.lockf(lock, _fcntl.LOCK_UN, 8, self._off)

    def release(self) -> None:
        """Count one less (one that ``acquire`` counted)."""
        lock = self._lock
        if lock is not None:
            _fcntl.lockf(lock, _fcntl.LOCK_EX, 8, self._off)
        try:
            words = self._words
            words[self._s] -= 1
            words[self._t] -= 1
        finally:
            if lock is not None:
                _fcntl.lockf(lock, _fcntl.LOCK_UN, 8, self._off)

    @property
    def value(self) -> int:
        """Open connections counted, over every process."""
        return self._words[self._t]

    @property
    def mine(self) -> int:
        """This process's part of ``value``."""
        return self._words[self._s]

    def __repr__(self) -> str:
        return f"<SharedCounter slot={self.slot} value={self.value} mine={self.mine}>"

    # what ConnectionSet and the relay call (Counter's; C calls in the compiled core)
    _acquire = acquire
    _release = release


def private_counter() -> SharedCounter:
    """A ``SharedCounter`` in memory of its own that no other process maps."""
    return CounterTable(_mmap.mmap(-1, table_size(1, 1)), 1, 1, 0).counter(0)



# -- the proxy's data path (see _core_relay.pxi) ------------------------------

# What a service version shares with its connections, and the relay's logic,
# are _core_machine's too.
_machine.use_counters(private_counter)
_clienthello = _load_as_python("clienthello")
_machine.use_parser(_clienthello.server_name_in, _clienthello.MAX_BUFFERED)
if not TYPE_CHECKING:
    ProxyCounters = _machine.ProxyCounters
    UpstreamState = _machine.UpstreamState
    Target = _machine.Target
    RelayConfig = _machine.RelayConfig
    _Relay = _machine.Relay
    _EngineBase = _machine.EngineBase
    # the PROXY protocol's header parser and builder
    parse_proxy_header = _machine.parse_proxy_header
    proxy_header = _machine.proxy_header
    proxy_networks = _machine.proxy_networks
    PROXY_HEADER_MAX = _machine.PROXY_HEADER_MAX

_now = time.monotonic
_oserror = _machine._oserror


# -- the engine: one epoll instance per event loop ------------------------------

_READS_PER_EVENT = 16
_EVENTS = 64
_EPOLL_FLAGS = _select.EPOLLIN | _select.EPOLLOUT | _select.EPOLLRDHUP | _select.EPOLLET
_TAG_UPSTREAM, _TAG_CLIENT, _TAG_LISTENER = 0, 1, 2
_EPOLLIN, _EPOLLOUT, _EPOLLERR = _select.EPOLLIN, _select.EPOLLOUT, _select.EPOLLERR
_EPOLLHUP, _EPOLLRDHUP = _select.EPOLLHUP, _select.EPOLLRDHUP

# move bulk transfers of raw connections with splice(2) (HOTPROXY_SPLICE=0: never)
_SPLICE = _os.environ.get("HOTPROXY_SPLICE", "1") not in ("", "0")
_SPLICE_FLAGS = _os.SPLICE_F_MOVE | _os.SPLICE_F_NONBLOCK

_engines: dict[Any, _Engine] = {}
_last_engine: _Engine | None = None


def _get_engine() -> _Engine:
    global _last_engine
    loop = asyncio.get_running_loop()
    if _last_engine is not None and _last_engine.loop is loop:
        return _last_engine
    engine = _engines.get(loop)
    if engine is None:
        for old in [lp for lp in _engines if lp.is_closed()]:
            _engines.pop(old).close()
        engine = _Engine(loop)
        _engines[loop] = engine
    _last_engine = engine
    return engine


def engine_stats() -> dict[str, int]:
    """What the running loop's engine holds and did (see ``_core_engine.pxi``)."""
    e = _get_engine()
    return {"connections": len(e.conns), "armed": len(e.wheel), "ticks": e.ticks,
            "checked": e.checked}


class _Engine(_EngineBase):
    """The sockets the core drives itself on one event loop (see
    ``_core_engine.pxi``; the timer and ready list are EngineBase's)."""

    def __init__(self, loop: Any) -> None:
        super().__init__(loop)
        self.ep = _select.epoll()
        self.by_fd: dict[int, tuple[Any, int]] = {}
        self.conns: dict[Connection, None] = {}   # every connection (close())
        loop.add_reader(self.ep.fileno(), self._on_ready)

    def close(self) -> None:
        for conn in self.conns:
            if conn.sock is not None:
                conn.sock.close()
                conn.sock = None
                conn.ufd = -1
            if conn.csock is not None:
                conn.csock.close()
                conn.csock = None
                conn.cfd = -1
            conn._close_pipes()
        self.ep.close()
        self.by_fd.clear()
        self.conns.clear()
        self.ready.clear()
        self.timer = None
        self.wheel = _machine.TimerWheel(_machine.TICK)
        self.loop = None

    def register(self, obj: Any, fd: int, events: int, tag: int) -> int:
        try:
            self.ep.register(fd, events)
        except OSError as exc:
            return exc.errno or _errno.EINVAL
        self.by_fd[fd] = (obj, tag)
        return 0

    def forget(self, obj: Any, fd: int) -> None:
        entry = self.by_fd.get(fd)
        if entry is not None and entry[0] is obj:
            del self.by_fd[fd]
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def _on_ready(self) -> None:
        # one batch per call (see _core_engine.pxi)
        for fd, ev in self.ep.poll(0, _EVENTS):
            entry = self.by_fd.get(fd)
            if entry is None:
                continue
            obj, tag = entry
            if tag == _TAG_LISTENER:
                obj._ready()
                continue
            try:
                if tag == _TAG_CLIENT:
                    obj._client_event(ev)
                else:
                    obj._upstream_event(ev)
            except Exception as exc:
                obj._crashed(exc)

    def link(self, conn: Connection) -> None:
        self.conns[conn] = None

    def unlink(self, conn: Connection) -> None:
        self.conns.pop(conn, None)
        self.wheel.discard(conn)


# -- system calls as the compiled core makes them: a count, or -errno ------------------

def _recv_into(sock: _socket.socket, buf: Any, n: int) -> int:
    try:
        return sock.recv_into(buf, n)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)


def _send(sock: _socket.socket, data: Any) -> int:
    try:
        return sock.send(data)
    except BlockingIOError:
        return -_errno.EAGAIN
    except OSError as exc:
        return -(exc.errno or _errno.EPIPE)


def _splice(src: int, dst: int, n: int) -> int:
    try:
        return _os.splice(src, dst, n, flags=_SPLICE_FLAGS)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)


def _drain_pipe(pr: int, dst: int, n: int) -> int:
    # move up to n bytes from the pipe to dst: bytes moved, 0 if dst is full, or -errno
    r = _splice(pr, dst, n)
    return 0 if r == -_errno.EAGAIN else r


def _open_pipe(size: int) -> tuple[int, int] | None:
    try:
        r, w = _os.pipe2(_os.O_NONBLOCK | _os.O_CLOEXEC)
    except OSError:
        return None
    try:
        _fcntl.fcntl(w, _fcntl.F_SETPIPE_SZ, size)   # best effort: the default is 64 KiB
    except OSError:
        pass
    return r, w


D_OPEN, EV_FULL = _machine.D_OPEN, _machine.EV_FULL
M_COPY, M_BULK, M_SPLICE = _machine.M_COPY, _machine.M_BULK, _machine.M_SPLICE
UP_CONNECTING, UP_OPEN, UP_CLOSED = _machine.UP_CONNECTING, _machine.UP_OPEN, _machine.UP_CLOSED
END_CLIENT_ERROR = _machine.END_CLIENT_ERROR


class Connection(_Relay):
    """One proxied connection: the protocol of the accepted client socket and
    the owner of its upstream socket (a ``Relay``, see ``_core_machine.py``,
    with the system calls; see ``_core_relay.pxi``)."""

    def __init__(self, cfg: RelayConfig, conns: Any, owner: Any = None) -> None:
        self.engine: _Engine | None = None
        self.sock: _socket.socket | None = None     # the upstream socket
        self.csock: _socket.socket | None = None    # raw: the client socket
        super().__init__(cfg, conns, owner)

    # -- the hooks of Relay ------------------------------------------------------

    def _clock(self) -> float:
        return _now()

    def _attach(self) -> None:
        self.engine = _get_engine()
        self.engine.link(self)

    def _detach(self) -> None:
        if self.engine is not None:
            self.engine.unlink(self)

    def _arm(self, at: float) -> None:
        self.engine.arm(self, at)  # type: ignore[union-attr]

    def _rearm(self) -> None:
        self.engine.rearm(self)  # type: ignore[union-attr]

    def _defer(self) -> None:
        self.engine.defer(self)  # type: ignore[union-attr]

    def _start_attempt(self, t: Target) -> int:
        try:
            sock = _socket.socket(t.family, _socket.SOCK_STREAM)
        except OSError as exc:
            return exc.errno or _errno.EMFILE
        sock.setblocking(False)
        if t.family != _socket.AF_UNIX:
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            if self.cfg.keepalive:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
        r = sock.connect_ex(t.address)
        if r and r != _errno.EINPROGRESS:
            sock.close()
            return r
        fd = sock.fileno()
        err = self.engine.register(self, fd, _EPOLL_FLAGS, _TAG_UPSTREAM)  # type: ignore[union-attr]
        if err:
            sock.close()
            return err
        self.sock = sock
        self.ufd = fd
        self._attempting(t, r == 0)
        return 0

    def _close_fd(self) -> None:
        sock = self.sock
        if sock is not None:
            self.engine.forget(self, self.ufd)  # type: ignore[union-attr]
            self.sock = None
            self.ufd = -1
            sock.close()

    def _sockname(self) -> Any:
        if not self.raw:
            return self.client.get_extra_info("sockname")
        try:
            return self.csock.getsockname() if self.csock is not None else None
        except OSError:
            return None

    def _close_client(self) -> bool:
        sock = self.csock
        if sock is None:
            return False
        self.engine.forget(self, self.cfd)  # type: ignore[union-attr]
        self.csock = None
        self.cfd = -1
        sock.close()
        return True

    def _close_pipes(self) -> None:
        for d in (self.c2u, self.u2c):
            if d.pipe_r >= 0:
                _os.close(d.pipe_r)
                _os.close(d.pipe_w)
                d.pipe_r = d.pipe_w = -1

    def _shutdown(self, client_side: bool) -> None:
        sock = self.csock if client_side else self.sock
        if sock is not None:
            try:
                sock.shutdown(_socket.SHUT_WR)
            except OSError:
                pass

    def _new_buf(self, d: Direction, size: int) -> None:
        d.buf = bytearray(size)
        d.mv = memoryview(d.buf)
        d.size = size

    # -- the client socket, when the core accepted it (raw) --------------------------

    def _start_raw(self, engine: _Engine, sock: _socket.socket, peer: Any) -> None:
        cfg = self.cfg
        self.raw = True
        if not self._admit():
            sock.close()
            if cfg.on_refuse is not None:
                cfg.on_refuse(peer)
            return
        self.engine = engine
        fd = sock.fileno()
        if engine.register(self, fd, _EPOLL_FLAGS, _TAG_CLIENT):
            sock.close()
            self._set_end(END_CLIENT_ERROR)
            self.up_state = UP_CLOSED
            self._finish()
            return
        self.csock = sock
        self.cfd = fd
        engine.link(self)
        if cfg.keepalive and sock.family != _socket.AF_UNIX:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
        self._started_raw(peer)

    # -- the engine's events -------------------------------------------------------

    def _upstream_event(self, events: int) -> None:
        sock = self.sock
        if sock is None:
            return
        if self.up_state == UP_CONNECTING:
            if events & (_EPOLLERR | _EPOLLHUP):
                err = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
                self._attempt_failed(_oserror(err or _errno.ECONNREFUSED))
                return
            if not events & _EPOLLOUT:
                return
            self._connected()
        if self.up_state != UP_OPEN:
            return
        self._socket_event(self.u2c, self.c2u, events)

    def _client_event(self, events: int) -> None:
        if self.csock is None:
            return
        self._socket_event(self.c2u, self.u2c, events)

    def _socket_event(self, src_of: Direction, dst_of: Direction, events: int) -> None:
        sock = self._src(src_of)
        assert sock is not None
        if events & _EPOLLERR:
            err = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
            if err:
                self._failed(src_of is self.c2u, err)
                return
        if events & _EPOLLOUT and dst_of.pend_end:
            self._flush(dst_of)
        if self._src(src_of) is not None and events & (_EPOLLIN | _EPOLLRDHUP | _EPOLLHUP):
            if events & (_EPOLLRDHUP | _EPOLLHUP):
                src_of.rdhup = True
            src_of.readable = True
            self._read(src_of)

    # -- relaying: one code for both directions (see _core_relay.pxi) ---------------

    def _src(self, d: Direction) -> _socket.socket | None:
        return self.csock if d is self.c2u else self.sock

    def _dst(self, d: Direction) -> _socket.socket | None:
        return self.sock if d is self.c2u else self.csock

    def _read(self, d: Direction) -> None:
        reads = 0
        while d.readable:
            sock = self._src(d)
            if sock is None or not self._may_read(d):
                return
            if d.mode != M_COPY and d.state == D_OPEN and d.pend_end == 0:
                if self._splice(d):
                    return
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)  # type: ignore[union-attr]
                return
            held = self.early if d is self.c2u else 0
            if d.buf is None or (d.size < d.next and not held and d.pend_end == 0):
                self._new_buf(d, d.next)
            room = d.size - held
            r = _recv_into(sock, d.mv[held:], room)  # type: ignore[index]
            if r > 0:
                reads += 1
                if d is self.c2u:
                    self._client_bytes(r)
                else:
                    self.last_active = _now()
                    self._to_client(r)
                if r < room:
                    d.readable = False
                    if d.rdhup and self._src(d) is not None and not d.eof():
                        self._src_eof(d)
                    return
            elif self._read_ended(d, r):
                return

    def _read_ended(self, d: Direction, r: int) -> bool:
        # r <= 0 from d's source: the EOF, nothing more for now (-EAGAIN), or an error
        if r == 0:
            d.readable = False
            if not d.eof():
                self._src_eof(d)
        elif r == -_errno.EAGAIN:
            d.readable = False
        else:
            self._failed(d is self.c2u, -r)
        return True

    def _send(self, d: Direction, start: int, n: int, from_read: bool) -> None:
        size = d.size
        sock = self._dst(d)
        assert sock is not None
        d.nbytes += n
        if d is self.c2u:
            self.counters.bytes_in += n
        else:
            self.counters.bytes_out += n
        if from_read and n == size:
            if size < self.cfg.max_buffer_size:
                d.next = min(size * 2, self.cfg.max_buffer_size)
            elif self.raw and _SPLICE:
                d.mode = M_BULK
        r = _send(sock, d.mv[start:start + n])  # type: ignore[index]
        if r == -_errno.EAGAIN:
            r = 0
        elif r < 0:
            self._failed(d is self.u2c, -r)
            return
        if r == n:
            return
        d.pend_off = start + r
        d.pend_end = start + n
        d.step(EV_FULL)
        if d is self.c2u:
            self._sync_client_reading()

    def _flush(self, d: Direction) -> None:
        sock = self._dst(d)
        assert sock is not None
        if d.pipe_r >= 0:
            r = _drain_pipe(d.pipe_r, sock.fileno(), d.pend_end - d.pend_off)
            if r <= 0:
                if r < 0:
                    self._failed(d is self.u2c, -r)
                return
        else:
            r = _send(sock, d.mv[d.pend_off:d.pend_end])  # type: ignore[index]
            if r == -_errno.EAGAIN:
                return
            if r < 0:
                self._failed(d is self.u2c, -r)
                return
        d.pend_off += r
        self.last_active = _now()
        if d.pend_off < d.pend_end:
            return
        d.pend_off = d.pend_end = 0
        self._drained(d)

    def _splice(self, d: Direction) -> bool:
        chunk = self.cfg.max_buffer_size
        if d.pipe_r < 0:
            pipe = _open_pipe(chunk)
            if pipe is None:
                d.mode = M_COPY
                return False
            d.pipe_r, d.pipe_w = pipe
            d.mode = M_SPLICE
            d.buf = d.mv = None
            d.size = 0
        reads = 0
        while d.readable:
            src = self._src(d)
            if src is None or not self._may_read(d):
                return True
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)  # type: ignore[union-attr]
                return True
            r = _splice(src.fileno(), d.pipe_w, chunk)
            if r > 0:
                reads += 1
                self.last_active = _now()
                d.nbytes += r
                if d is self.c2u:
                    self.counters.bytes_in += r
                else:
                    self.counters.bytes_out += r
                d.pend_off = 0
                d.pend_end = r
                dst = self._dst(d)
                assert dst is not None
                r = _drain_pipe(d.pipe_r, dst.fileno(), r)
                if r < 0:
                    self._failed(d is self.u2c, -r)
                    return True
                d.pend_off = r
                if d.pend_off < d.pend_end:
                    d.step(EV_FULL)
                    if d is self.c2u:
                        self._sync_client_reading()
                    return True
                d.pend_off = d.pend_end = 0
            elif self._read_ended(d, r):
                return True
        return True


# -- accepting in the core (see _core.pyx) ---------------------------------------------

_ACCEPTS_PER_EVENT = 64
_ACCEPT_RETRY = 0.25
_OUT_OF_RESOURCES = (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM)


class Listener:
    """Accepts on a listening socket in the core, for a site's ``Acceptor`` (see ``_core.pyx``)."""

    __slots__ = ("acceptor", "sock", "fd", "engine", "watching", "fallback", "raw_accepted",
                 "fallback_accepted")

    def __init__(self, acceptor: Acceptor, sock: _socket.socket, fallback: Any = None) -> None:
        if not isinstance(acceptor, Acceptor):
            raise TypeError("acceptor must be an Acceptor")
        self.acceptor = acceptor
        self.sock = sock
        self.fd = sock.fileno()
        self.fallback = fallback
        self.engine: _Engine | None = None
        self.watching = False
        self.raw_accepted = 0
        self.fallback_accepted = 0

    def start(self) -> None:
        if self.watching:
            return
        engine = _get_engine()
        err = engine.register(self, self.fd, _select.EPOLLIN, _TAG_LISTENER)
        if err:
            raise _oserror(err)
        self.engine = engine
        self.watching = True

    def stop(self) -> None:
        if not self.watching:
            return
        self.watching = False
        self.engine.forget(self, self.fd)  # type: ignore[union-attr]

    def take_queued(self, limit: int = 4096) -> int:
        return self._accept(limit)

    def _ready(self) -> None:
        if not self.watching:
            return
        try:
            self._accept(_ACCEPTS_PER_EVENT)
        except Exception as exc:
            _accept_log.error("site %r: accept failed: %s: %s", self.acceptor.name,
                              type(exc).__name__, exc)

    def _resume(self) -> None:
        if not self.watching and self.engine is not None and self.engine.loop is not None:
            try:
                self.start()
            except OSError as exc:
                _accept_log.error("site %r: cannot watch the listener again: %s",
                                  self.acceptor.name, exc)

    def _accept(self, limit: int) -> int:
        n = 0
        while n < limit:
            try:
                fd, addr = self.sock._accept()  # type: ignore[attr-defined]
            except (InterruptedError, ConnectionAbortedError):
                continue
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                if self.watching:
                    self.stop()
                    self.engine.loop.call_later(_ACCEPT_RETRY, self._resume)  # type: ignore[union-attr]
                self._paused(exc)
                break
            n += 1
            self._dispatch(fd, addr)
        return n

    def _dispatch(self, fd: int, addr: Any) -> None:
        acc = self.acceptor
        svc = acc.slot._current
        sock = _socket.socket(self.sock.family, _socket.SOCK_STREAM, 0, fd)
        sock.setblocking(False)
        if getattr(svc, "accepts_raw", False) is not True:
            self._serve_fallback(sock)
            return
        try:
            conn = svc.new_raw_connection(acc.conns)
            if conn is not None and type(conn) is not Connection:
                raise TypeError(f"new_raw_connection() returned {type(conn).__name__}, "
                                "not a Connection")
        except Exception as exc:
            sock.close()
            self._failed(exc)
            return
        if conn is None:
            sock.close()
            return
        self.raw_accepted += 1
        try:
            conn._start_raw(self.engine, sock, addr)  # type: ignore[arg-type]
        except Exception as exc:
            conn._crashed(exc)

    def _serve_fallback(self, sock: _socket.socket) -> None:
        if self.fallback is None:
            sock.close()
            self._failed(RuntimeError("the service does not accept raw connections "
                                      "and the listener has no fallback"))
            return
        self.fallback_accepted += 1
        try:
            self.fallback(sock)
        except Exception as exc:
            sock.close()
            self._failed(exc)

    def _paused(self, exc: OSError) -> None:
        acc = self.acceptor
        now = time.monotonic()
        if now - acc._logged_at >= 10.0:
            acc._logged_at = now
            _accept_log.error("site %r: cannot accept: %s; connections wait in the queue, "
                              "accepting again in %.2fs", acc.name, exc.strerror, _ACCEPT_RETRY)

    def _failed(self, exc: Exception) -> None:
        acc = self.acceptor
        acc.errors += 1
        acc._logged_at = _accept_failed(acc.name, exc, acc.errors, acc._logged_at)

    def __repr__(self) -> str:
        return f"<Listener {self.acceptor.name!r} fd={self.fd} watching={self.watching}>"
