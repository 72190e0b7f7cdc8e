# cython: language_level=3
"""hotproxy's compiled core.

Rules of this file:

* Everything here is also in ``_core_py.py`` with the same names, arguments
  and behaviour; the test-suite runs against both (``HOTPROXY_NO_EXTENSIONS=1``
  picks the pure-Python twin).
* The accept path (``Acceptor.__call__``) takes one reference from the slot and
  calls the service: no lock, no allocation of its own, no await.
* A slot is published by one reference assignment (``Slot.swap``); a reader
  sees the old service or the new one, never anything in between.
* The proxy's data path (``Connection``, and the loop's ``_Engine`` for the
  upstream socket it owns) does no Python allocation per chunk while the
  peer keeps up: it reads into buffers it owns, sends to the upstream
  straight from them, and hands the client transport a view.  A transport
  keeps a reference to a view it could not send at once, so a buffer is
  reused only when the client's write buffer is empty after the write;
  otherwise a fresh one is taken for the next read.
* Counters are C integers, updated per chunk without touching Python objects.
"""

cimport cython
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.ref cimport Py_INCREF, Py_DECREF
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE
from libc.errno cimport errno, EAGAIN, EINTR, EINPROGRESS, ECONNREFUSED, EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from posix.unistd cimport close as _close


cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, long long *off_in, int fd_out, long long *off_out,
                   size_t n, unsigned int flags)
    int fcntl(int fd, int cmd, ...)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC


cdef extern from "<unistd.h>" nogil:
    int pipe2(int *fds, int flags)


cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)


cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    unsigned short ntohs(unsigned short v)
    unsigned int ntohl(unsigned int v)


cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        pass
    cdef struct sockaddr_in:
        unsigned short sin_port
        in_addr sin_addr
    cdef struct in6_addr:
        pass
    cdef struct sockaddr_in6:
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id


cdef extern from "<sys/un.h>" nogil:
    cdef struct sockaddr_un:
        char sun_path[108]


import asyncio
import fcntl as _fcntl
import logging
import mmap as _mmap
import os as _os
import socket as _socket
import time

cdef object _accept_log = logging.getLogger("hotproxy.accept")
cdef object _monotonic = time.monotonic

cdef object _get_running_loop = asyncio.get_running_loop


@cython.final
cdef class Slot:
    """The current service of one site.

    Read on every accepted connection, replaced by ``swap`` on ``Update``.
    """

    def __cinit__(self, object current=None):
        self._current = current

    @property
    def current(self):
        """The service that new connections get (None before the first commit)."""
        return self._current

    cpdef object swap(self, object new):
        """Publish *new*; return the service it replaces."""
        old = self._current
        self._current = new
        return old

    def __repr__(self):
        return f"<Slot {self._current!r}>"


# -- connection counts shared by the processes of an instance ---------------------
#
# A ``CounterTable`` lays counters out in memory that every process of an
# instance maps (``hotproxy.limits`` makes it: a memfd the master creates and
# each worker maps; or private memory).  Slot *s* has the instance's count
# (``total``) and, per worker, that worker's part of it (``share``):
#
#   bytes [0, 64)                           header (written by hotproxy.limits)
#   64 + s*64                               total of slot s (a cache line each)
#   64 + slots*64 + (w*slots + s)*8         share of worker w in slot s
#
# Rules: a total changes only by atomic read-modify-writes; a share only by
# its own worker (so plain stores), except ``reclaim`` once that worker is
# dead.  Admitting a connection raises the total first (a compare-and-swap:
# never past the limit), then the share; releasing lowers the share first,
# then the total.  So a total is never below the sum of the shares, and
# subtracting a dead worker's shares (``reclaim``) never frees a count that
# a live connection holds; a kill that lands between the two steps leaves
# at most one count behind (capacity lost, never the limit exceeded).  The
# pure-Python core cannot do atomic operations on shared memory: it takes a
# lock on the total's bytes (``fcntl.lockf``; the kernel drops it when a
# process dies) around each change, and ``reclaim`` here takes it too, so a
# compiled master can reclaim for pure-Python workers.

cdef extern from *:
    """
    static inline int hp_count_acquire(long long *total, long long *share, long long limit) {
        long long cur = __atomic_load_n(total, __ATOMIC_RELAXED);
        do {
            if (limit > 0 && cur >= limit)
                return 0;
        } while (!__atomic_compare_exchange_n(total, &cur, cur + 1, 1,
                                              __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
        __atomic_store_n(share, __atomic_load_n(share, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
        return 1;
    }
    static inline void hp_count_release(long long *total, long long *share) {
        __atomic_store_n(share, __atomic_load_n(share, __ATOMIC_RELAXED) - 1, __ATOMIC_RELAXED);
        __atomic_sub_fetch(total, 1, __ATOMIC_ACQ_REL);
    }
    static inline long long hp_count_load(long long *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void hp_count_sub(long long *p, long long n) {
        __atomic_sub_fetch(p, n, __ATOMIC_ACQ_REL);
    }
    static inline void hp_count_store(long long *p, long long n) {
        __atomic_store_n(p, n, __ATOMIC_RELEASE);
    }
    """
    int hp_count_acquire(long long *total, long long *share, long long limit) noexcept nogil
    void hp_count_release(long long *total, long long *share) noexcept nogil
    long long hp_count_load(long long *p) noexcept nogil
    void hp_count_sub(long long *p, long long n) noexcept nogil
    void hp_count_store(long long *p, long long n) noexcept nogil


cdef enum:
    _TABLE_HEADER = 64
    _TOTAL_STRIDE = 64


def table_size(int slots, int workers):
    """Bytes a ``CounterTable`` of *slots* slots and *workers* workers needs."""
    if slots < 1 or workers < 1:
        raise ValueError("need slots >= 1 and workers >= 1")
    return _TABLE_HEADER + slots * _TOTAL_STRIDE + <Py_ssize_t>workers * slots * 8


@cython.final
cdef class CounterTable:
    """Counters in memory that the processes of an instance share (see above).

    *buffer* is writable memory of ``table_size(slots, workers)`` bytes or
    more (an ``mmap``), 8-byte aligned.  *worker* is the share this process
    updates (-1: none, the master).  *lock* is a file object of the same
    memory, for the pure-Python core's locks (None: memory no other process
    maps).
    """

    def __cinit__(self, object buffer not None, int slots, int workers, int worker=-1,
                  object lock=None):
        if slots < 1 or workers < 1 or not -1 <= worker < workers:
            raise ValueError("need slots >= 1, workers >= 1 and -1 <= worker < workers")
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE)
        self.has_view = True
        if self.view.len < table_size(slots, workers):
            raise ValueError(f"the buffer has {self.view.len} bytes, the table needs "
                             f"{table_size(slots, workers)}")
        if (<uintptr_t>self.view.buf) % 8:
            raise ValueError("the buffer is not 8-byte aligned")
        self.base = <char *>self.view.buf
        self.slots = slots
        self.workers = workers
        self.worker = worker
        self.lock = lock

    def __dealloc__(self):
        if self.has_view:
            PyBuffer_Release(&self.view)

    cdef long long *_total(self, int slot) noexcept:
        return <long long *>(self.base + _TABLE_HEADER + <Py_ssize_t>slot * _TOTAL_STRIDE)

    cdef long long *_share(self, int worker, int slot) noexcept:
        return <long long *>(self.base + _TABLE_HEADER + <Py_ssize_t>self.slots * _TOTAL_STRIDE
                             + (<Py_ssize_t>worker * self.slots + slot) * 8)

    def counter(self, int slot):
        """The ``SharedCounter`` of *slot*, updated as this process's worker."""
        return SharedCounter(self, slot)

    def total(self, int slot):
        """The instance's count in *slot*."""
        self._check(slot, 0)
        return hp_count_load(self._total(slot))

    def share(self, int worker, int slot):
        """*worker*'s part of the count in *slot*."""
        self._check(slot, worker)
        return hp_count_load(self._share(worker, slot))

    def reclaim(self, int worker):
        """Subtract the shares of *worker* -- a dead process -- from the totals
        and zero them; return how many counts that freed.  Never call it for
        a worker that runs."""
        cdef int slot
        cdef long long n, freed = 0
        cdef long long *share
        self._check(0, worker)
        for slot in range(self.slots):
            share = self._share(worker, slot)
            if hp_count_load(share) == 0:
                continue
            off = _TABLE_HEADER + slot * _TOTAL_STRIDE
            if self.lock is not None:
                _fcntl.lockf(self.lock, _fcntl.LOCK_EX, 8, off)
            try:
                n = hp_count_load(share)
                hp_count_sub(self._total(slot), n)
                hp_count_store(share, 0)
                freed += n
            finally:
                if self.lock is not None:
                    _fcntl.lockf(self.lock, _fcntl.LOCK_UN, 8, off)
        return freed

    def _check(self, int slot, int worker):
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} is not in the table (0-{self.slots - 1})")
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} is not in the table (0-{self.workers - 1})")

    def __repr__(self):
        return f"<CounterTable slots={self.slots} workers={self.workers} worker={self.worker}>"


@cython.final
cdef class SharedCounter:
    """One slot of a ``CounterTable``: open connections of one service over
    every process of the instance, updated as this process's worker.

    ``acquire(limit)`` counts one more connection unless *limit* (0: none)
    are counted already; ``release()`` counts one less.  Each is one atomic
    operation on the total (and a plain store to this worker's share).
    """

    def __cinit__(self, CounterTable table not None, int slot):
        table._check(slot, 0)
        if table.worker < 0:
            raise ValueError("this process has no share in the table (worker -1)")
        self.table = table
        self.slot = slot
        self.total = table._total(slot)
        self.share = table._share(table.worker, slot)

    cdef bint _acquire(self, long long limit) noexcept:
        return hp_count_acquire(self.total, self.share, limit)

    cdef void _release(self) noexcept:
        hp_count_release(self.total, self.share)

    def acquire(self, long long limit):
        """Count one more unless *limit* (> 0) are counted already; True if counted."""
        return hp_count_acquire(self.total, self.share, limit) != 0

    def release(self):
        """Count one less (one that ``acquire`` counted)."""
        hp_count_release(self.total, self.share)

    @property
    def value(self):
        """Open connections counted, over every process."""
        return hp_count_load(self.total)

    @property
    def mine(self):
        """This process's part of ``value``."""
        return hp_count_load(self.share)

    def __repr__(self):
        return f"<SharedCounter slot={self.slot} value={self.value} mine={self.mine}>"


def private_counter():
    """A ``SharedCounter`` in memory of its own that no other process maps."""
    return CounterTable(_mmap.mmap(-1, table_size(1, 1)), 1, 1, 0).counter(0)



@cython.final
cdef class ConnectionSet:
    """The open connections of a site (or of one layer's services).

    A connection object is anything with an ``abort()`` method; it adds
    itself when it starts and discards itself when it ends.  A set with a
    parent mirrors every add and discard into it, so a layer can count its
    own connections while the site still sees all of them.

    A set with a *limit* (a ``SharedCounter``) holds counted connections:
    whoever adds one has acquired a count for it, and a connection leaving
    the set releases that count.
    """

    def __cinit__(self, ConnectionSet parent=None, SharedCounter limit=None):
        self._conns = set()
        self.parent = parent
        self.limit = limit
        self._waiters = None

    cpdef add(self, object conn):
        """Track *conn* (and in the parent set, if any)."""
        self._conns.add(conn)
        if self.parent is not None:
            self.parent.add(conn)

    cpdef discard(self, object conn):
        """Stop tracking *conn*; wake ``wait_empty`` waiters when none are left."""
        if self.limit is None:
            self._conns.discard(conn)
        elif conn in self._conns:
            self._conns.discard(conn)
            self.limit._release()
        if self.parent is not None:
            self.parent.discard(conn)
        if self._waiters is not None and not self._conns:
            self._wake()

    cdef _wake(self):
        waiters = self._waiters
        self._waiters = None
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def wait_empty(self):
        """A future that is done once no connection is left."""
        fut = asyncio.get_running_loop().create_future()
        if not self._conns:
            fut.set_result(None)
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(fut)
        return fut

    def abort_all(self):
        """Abort every connection still open; return how many there were."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        return len(conns)

    def snapshot(self):
        """A list of the connections open now."""
        return list(self._conns)

    def __len__(self):
        return len(self._conns)

    def __contains__(self, conn):
        return conn in self._conns

    def __repr__(self):
        return f"<ConnectionSet open={len(self._conns)}>"


@cython.final
cdef class Acceptor:
    """The protocol factory a site's listener serves with.

    Each accepted connection reads the slot once and asks that service for
    a protocol; the connection keeps that service for its whole life.
    """

    def __cinit__(self, Slot slot, ConnectionSet conns, str name=""):
        self.slot = slot
        self.conns = conns
        self.name = name
        self.errors = 0
        self._logged_at = -1e9

    def __call__(self):
        # An exception escaping a protocol factory makes uvloop close the
        # listening socket for good: one buggy connection must not take the
        # site down, so it is counted, logged and that connection dropped.
        try:
            return self.slot._current.new_connection(self.conns)
        except Exception as exc:
            self.errors += 1
            self._logged_at = _accept_failed(self.name, exc, self.errors, self._logged_at)
            return _Dropped()


def _accept_failed(name, exc, errors, logged_at):
    """Log a failed accept, at most every 10 s per site; return when it logged."""
    now = _monotonic()
    if now - logged_at >= 10.0:
        _accept_log.error("site %r: new_connection failed (%d so far), connection dropped: %s: %s",
                          name, errors, type(exc).__name__, exc)
        return now
    return logged_at


class _Dropped(asyncio.Protocol):
    """The protocol of a connection whose service could not start it."""

    def connection_made(self, transport):
        transport.abort()


# -- the proxy's data path ----------------------------------------------------
#
# One proxied connection is one ``Connection``: the asyncio protocol of the
# accepted client socket, and the owner of the upstream socket, which it
# drives itself -- a non-blocking connect() and raw send()/recv() on a file
# descriptor registered, edge-triggered, in the loop's ``_Engine`` (one epoll
# instance per event loop, itself watched by the loop).  The upstream side
# therefore costs no transport, no coroutine, no Task, no future and no
# timer handle; its bytes never become Python objects.
#
# Lifecycle:  accepted -> connecting (client bytes held, bounded) -> open
# (relaying both ways) -> closing -> finished.  It is finished, exactly
# once, when the client transport is gone *and* the upstream socket is
# closed or was never made; finishing releases every count it took.
#
# Flow control: bytes from the client are sent to the upstream at once;
# what the upstream cannot take stays in the client buffer (``c_pend_*``)
# and the client is paused until EPOLLOUT lets it drain.  Bytes from the
# upstream are read only while the client transport is below its high-water
# mark (``u_paused_by_c``); ``u_readable`` remembers that the socket may
# still hold data, since an edge-triggered socket reports it only once.
#
# Timeouts (connect and idle) are checked by one timer per engine, armed
# for the earliest deadline and at most every ``_TICK`` seconds.



cdef enum:
    UP_NONE = 0         # no connect attempt in progress (not started yet)
    UP_CONNECTING = 1   # an attempt is in progress (``attempt``)
    UP_OPEN = 2         # connected: relaying
    UP_CLOSED = 3       # the upstream socket is closed, or none could be made

cdef enum:
    END_NONE = 0
    END_EOF = 1             # both directions finished with an EOF
    END_CLIENT_ERROR = 2    # the client's socket failed (reset, ...)
    END_UPSTREAM_ERROR = 3  # the upstream's socket failed
    END_IDLE = 4            # no traffic for idle_timeout
    END_ABORTED = 5         # abort(): drain timeout or shutdown
    END_NO_UPSTREAM = 6     # every connect attempt failed
    END_CLOSED = 7          # closed otherwise

_END_NAMES = ("open", "eof", "client_error", "upstream_error", "idle", "aborted",
              "no_upstream", "closed")

# the engine's timer never fires more often than this (seconds)
cdef double _TICK = 0.05
# seconds a client that got no upstream has to send its EOF before it is closed
cdef double _LINGER = 2.0

cdef enum:
    # upstream reads in one go before a busy connection lets the others run
    _READS_PER_EVENT = 16

# move bulk transfers of raw connections with splice(2) (HOTPROXY_SPLICE=0: never)
cdef bint _SPLICE = _os.environ.get("HOTPROXY_SPLICE", "1") not in ("", "0")
cdef unsigned int _SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK


cdef int _open_pipe(int *r, int *w, Py_ssize_t size) noexcept nogil:
    cdef int fds[2]
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        return -1
    fcntl(fds[1], F_SETPIPE_SZ, <int>size)   # best effort: the default is 64 KiB
    r[0] = fds[0]
    w[0] = fds[1]
    return 0


cdef ssize_t _drain_pipe(int pr, int dst, Py_ssize_t n) noexcept nogil:
    # Move up to n bytes from the pipe to dst: bytes moved, 0 if dst is full,
    # or -errno.
    cdef ssize_t r
    while True:
        r = splice(pr, NULL, dst, NULL, n, _SPLICE_FLAGS)
        if r >= 0:
            return r
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            return 0
        return -errno

cdef object _log = logging.getLogger("hotproxy.proxy")


cdef inline double _now() noexcept nogil:
    # CLOCK_MONOTONIC, like time.monotonic(): a vDSO call, no Python object.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef object _oserror(int err):
    return OSError(err, _os.strerror(err))


cdef object _sockaddr_to_py(sockaddr_storage *ss, socklen_t alen):
    # what socket.getpeername() returns for this address
    cdef char host[64]
    cdef sockaddr_in *a4
    cdef sockaddr_in6 *a6
    cdef sockaddr_un *au
    cdef Py_ssize_t n
    if ss.ss_family == AF_INET:
        a4 = <sockaddr_in*>ss
        inet_ntop(AF_INET, &a4.sin_addr, host, sizeof(host))
        return (host.decode("ascii"), ntohs(a4.sin_port))
    if ss.ss_family == AF_INET6:
        a6 = <sockaddr_in6*>ss
        inet_ntop(AF_INET6, &a6.sin6_addr, host, sizeof(host))
        return (host.decode("ascii"), ntohs(a6.sin6_port), ntohl(a6.sin6_flowinfo),
                a6.sin6_scope_id)
    if ss.ss_family == AF_UNIX:
        au = <sockaddr_un*>ss
        n = <Py_ssize_t>alen - 2   # minus sun_family
        if n <= 0:
            return ""
        if au.sun_path[0] == 0:
            return au.sun_path[:n]   # abstract: bytes
        return _os.fsdecode(au.sun_path[:strnlen(au.sun_path, n)])
    return None


cdef _set_keepalive(object transport):
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (_socket.AF_INET, _socket.AF_INET6):
        return
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


@cython.final
cdef class ProxyCounters:
    """A proxy's service counters, shared by every version of the service."""

    def as_dict(self):
        """The counters as a plain dict."""
        return {
            "accepted": self.accepted, "active": self.active,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "connect_failures": self.connect_failures, "refused": self.refused,
            "idle_closed": self.idle_closed, "no_upstream": self.no_upstream,
        }

    def __repr__(self):
        return f"<ProxyCounters {self.as_dict()!r}>"


@cython.final
cdef class UpstreamState:
    """One upstream address's live state, shared by every service version.

    ``active`` counts connections to it (attempts included), ``fails`` its
    consecutive connect failures, ``ejected_until`` the ``time.monotonic()``
    before which it gets no new connections.
    """

    def __cinit__(self, str address not None):
        self.address = address

    def __repr__(self):
        return (f"<UpstreamState {self.address} active={self.active} fails={self.fails} "
                f"ejected_until={self.ejected_until:.3f}>")


@cython.final
cdef class Target:
    """An upstream of one service version: its shared state and where to connect.

    *sockaddr* is the raw ``struct sockaddr`` for *family* (what this core
    passes to ``connect(2)``); *address* is the same address as the socket
    module writes it (what the pure-Python core uses); *up* is the caller's
    own description of the upstream.
    """

    def __cinit__(self, UpstreamState state not None, object up, int family,
                  bytes sockaddr not None, object address):
        if len(sockaddr) < 2:
            raise ValueError("sockaddr: too short")
        self.state = state
        self.up = up
        self.family = family
        self.sockaddr = sockaddr
        self.address = address

    def __repr__(self):
        return f"<Target {self.state.address}>"


@cython.final
cdef class RelayConfig:
    """What every connection of one service version shares.

    ``targets`` are the upstreams.  With one target it is the only
    candidate; with more, ``connector.pick(conn, tried)`` chooses (or
    returns None: give up).  ``connector.failed(target, exc)`` is told of
    every failed attempt and ``connector.succeeded(target)`` of a success
    after failures.  A connect gets ``attempts`` tries of
    ``connect_timeout`` seconds each.  ``on_close(conn)``, if given, is
    called once when a connection is finished (the access log).

    Every connection takes one count of ``limit`` (a ``SharedCounter``: the
    service's open connections over the whole instance; None: a private
    one) when it starts, and gives it back when it is finished.  It is
    refused -- closed at once, counted in ``refused``, ``on_refuse(peername)``
    told if given -- when ``max_connections`` (0: no limit) are counted
    already.
    """

    def __cinit__(self, ProxyCounters counters not None, double idle_timeout=0.0,
                  bint keepalive=False, object connector=None, object on_close=None,
                  bint want_peername=False, Py_ssize_t buffer_size=16384,
                  Py_ssize_t max_buffer_size=262144, tuple targets=(),
                  double connect_timeout=2.0, int attempts=1, long long max_connections=0,
                  object on_refuse=None, SharedCounter limit=None):
        if buffer_size < 1 or max_buffer_size < buffer_size:
            raise ValueError("need 1 <= buffer_size <= max_buffer_size")
        if attempts < 1 or not connect_timeout > 0:
            raise ValueError("need attempts >= 1 and connect_timeout > 0")
        for t in targets:
            if not isinstance(t, Target):
                raise TypeError(f"targets: expected Target, got {type(t).__name__}")
        if len(targets) > 1 and connector is None:
            raise ValueError("more than one target needs a connector to pick")
        if max_connections < 0:
            raise ValueError("need max_connections >= 0 (0: no limit)")
        self.counters = counters
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.connector = connector
        self.on_close = on_close
        self.want_peername = want_peername
        self.buffer_size = buffer_size
        self.max_buffer_size = max_buffer_size
        self.targets = targets
        self.single = targets[0] if len(targets) == 1 else None
        self.connect_timeout = connect_timeout
        self.attempts = attempts
        self.max_connections = max_connections
        self.limit = limit if limit is not None else private_counter()
        self.on_refuse = on_refuse


# -- the engine: one epoll instance per event loop --------------------------------

cdef dict _engines = {}
cdef _Engine _last_engine = None


cdef _Engine _get_engine():
    global _last_engine
    loop = _get_running_loop()
    if _last_engine is not None and _last_engine.loop is loop:
        return _last_engine
    engine = _engines.get(loop)
    if engine is None:
        for old in [l for l in _engines if l.is_closed()]:
            (<_Engine>_engines.pop(old)).close()
        engine = _Engine(loop)
        _engines[loop] = engine
    _last_engine = engine
    return engine


# What an epoll event names: the object's address, tagged in its low bits
# (objects are at least 8-byte aligned) with which of its sockets it is.
cdef enum:
    _TAG_UPSTREAM = 0   # a Connection's upstream socket
    _TAG_CLIENT = 1     # a Connection's client socket (raw)
    _TAG_LISTENER = 2   # a Listener's socket
    _TAG_MASK = 3


@cython.final
cdef class _Engine:
    """The sockets the core drives itself on one event loop: an epoll
    instance the loop watches as one reader, the connections' timer, and
    the connections that yielded with bytes still to read."""

    def __cinit__(self, object loop):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise _oserror(errno)
        self.loop = loop
        self.graveyard = []
        self.ready = []
        self.timer_at = 0.0
        loop.add_reader(self.epfd, self._on_ready)

    def __dealloc__(self):
        if self.epfd >= 0:
            _close(self.epfd)

    cdef close(self):
        # Only for an engine whose loop is closed, so nothing runs any more:
        # close the upstream sockets of connections the loop left behind.
        cdef Connection conn = self.head
        while conn is not None:
            if conn.ufd >= 0:
                _close(conn.ufd)
                conn.ufd = -1
                Py_DECREF(conn)
            if conn.cfd >= 0:
                _close(conn.cfd)
                conn.cfd = -1
                Py_DECREF(conn)
            conn._close_pipes()
            conn = conn.t_next
        if self.epfd >= 0:
            _close(self.epfd)
            self.epfd = -1
        self.head = None
        self.graveyard.clear()
        self.ready.clear()
        self.timer = None
        self.loop = None

    cdef int register(self, object obj, int fd, uint32_t events, int tag) except -1:
        cdef epoll_event ev
        ev.events = events
        ev.data.u64 = <uint64_t><uintptr_t><void*>obj | <uint64_t>tag
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            return errno
        Py_INCREF(obj)   # the registration's reference: released by forget()
        return 0

    cdef forget(self, object obj):
        # obj's fd was closed or taken out of the epoll set.  An event for
        # it may still be in the batch being processed: the reference moves
        # to the graveyard, emptied after each batch.
        self.graveyard.append(obj)
        Py_DECREF(obj)

    def _on_ready(self):
        cdef int n, i, tag
        cdef uint64_t data
        cdef void *obj
        cdef epoll_event *evs = self.evs
        # One batch per call: if more is ready, the epoll instance stays
        # readable and the loop calls again after its other callbacks (the
        # control channel, timers) have had their turn.
        n = epoll_wait(self.epfd, evs, _EVENTS, 0)
        for i in range(n):
            data = evs[i].data.u64
            tag = <int>(data & _TAG_MASK)
            obj = <void*><uintptr_t>(data & ~(<uint64_t>_TAG_MASK))
            if tag == _TAG_LISTENER:
                (<Listener>obj)._ready()
                continue
            try:
                if tag == _TAG_CLIENT:
                    (<Connection>obj)._client_event(evs[i].events)
                else:
                    (<Connection>obj)._upstream_event(evs[i].events)
            except Exception as exc:
                (<Connection>obj)._crashed(exc)
        if self.graveyard:
            self.graveyard.clear()

    # -- connections with bytes left to read -----------------------------------

    cdef defer(self, Connection conn):
        if conn.deferred:
            return
        if not self.ready:
            self.loop.call_soon(self._run_ready)
        conn.deferred = True
        self.ready.append(conn)

    def _run_ready(self):
        cdef Connection conn
        ready = self.ready
        self.ready = []
        for conn in ready:
            conn.deferred = False
            try:
                conn._run_deferred()
            except Exception as exc:
                conn._crashed(exc)
        if self.graveyard:
            self.graveyard.clear()

    # -- timeouts ----------------------------------------------------------------

    cdef link(self, Connection conn):
        conn.t_next = self.head
        if self.head is not None:
            self.head.t_prev = conn
        self.head = conn
        conn.t_linked = True

    cdef unlink(self, Connection conn):
        if not conn.t_linked:
            return
        if conn.t_prev is not None:
            conn.t_prev.t_next = conn.t_next
        else:
            self.head = conn.t_next
        if conn.t_next is not None:
            conn.t_next.t_prev = conn.t_prev
        conn.t_prev = conn.t_next = None
        conn.t_linked = False

    cdef want_tick(self, double when):
        # make sure the timer fires by *when* (but not within _TICK of now)
        cdef double now
        if self.timer is not None and self.timer_at <= when:
            return
        now = _now()
        if when < now + _TICK:
            when = now + _TICK
            if self.timer is not None and self.timer_at <= when:
                return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_later(when - now, self._tick)

    def _tick(self):
        cdef Connection conn
        cdef double now = _now()
        cdef double next_at = 0.0
        cdef double at
        cdef list due = None
        self.timer = None
        conn = self.head
        while conn is not None:
            at = conn._deadline()
            if at > 0.0:
                if at <= now:
                    if due is None:
                        due = []
                    due.append(conn)
                elif next_at == 0.0 or at < next_at:
                    next_at = at
            conn = conn.t_next
        if due is not None:
            for conn in due:
                try:
                    conn._timed_out(now)
                except Exception as exc:
                    conn._crashed(exc)
            # a connection given another try has a new deadline
            for conn in due:
                at = conn._deadline()
                if at > 0.0 and (next_at == 0.0 or at < next_at):
                    next_at = at
        if next_at > 0.0:
            self.want_tick(next_at)
        if self.graveyard:
            self.graveyard.clear()


@cython.final
cdef class Connection:
    """One proxied connection: the protocol of the accepted client socket and
    the owner of its upstream socket.

    It is counted (accepted, active, one count of ``cfg.limit``) when it
    starts -- ``connection_made``, or the core's accept -- unless the limit
    is reached: then it is refused and closed at once.  *owner* (the service
    version that accepted it) is kept alive until the connection finishes.
    The upstream is connected as soon as the client is, trying the config's
    targets.
    """

    def __cinit__(self, RelayConfig cfg not None, object conns, object owner=None):
        self.cfg = cfg
        self.counters = cfg.counters
        self.conns = conns
        self.owner = owner
        self.ufd = -1
        self.cfd = -1
        self.cp_r = self.cp_w = self.up_r = self.up_w = -1
        self.c_next = cfg.buffer_size
        self.u_next = cfg.buffer_size
        self.started = _now()
        self.last_active = self.started

    cdef bint _admit(self):
        # Count this connection in the instance's count, unless it is full:
        # one atomic compare-and-swap, so a burst of accepts in every worker
        # at once admits exactly max_connections.
        cdef RelayConfig cfg = self.cfg
        if not cfg.limit._acquire(cfg.max_connections):
            self.counters.refused += 1
            self._finished = self.closing = True
            self.owner = None
            # a layer above may have counted it in its own set already
            self.conns.discard(self)
            return False
        self.admitted = True
        self.counters.accepted += 1
        self.counters.active += 1
        return True

    # -- the client transport's callbacks --------------------------------------

    def connection_made(self, transport):
        cdef RelayConfig cfg = self.cfg
        if not self._admit():
            if cfg.on_refuse is not None:
                cfg.on_refuse(transport.get_extra_info("peername"))
            transport.abort()
            return
        self.client = transport
        self.c_write = transport.write
        self.client_open = True
        # uvloop starts reading right after this returns even if we paused
        # here, so early bytes are held in c_buf (bounded) instead.
        self.c_reading = True
        self.conns.add(self)
        if cfg.want_peername:
            self.peername = transport.get_extra_info("peername")
        if cfg.keepalive:
            _set_keepalive(transport)
        self.engine = _get_engine()
        self.engine.link(self)
        if cfg.idle_timeout > 0:
            self.engine.want_tick(self.started + cfg.idle_timeout)
        self._next_attempt()

    def get_buffer(self, Py_ssize_t sizehint):
        if self.c_buf is None or (self.c_size < self.c_next and not self.early
                                  and self.c_pend_end == 0):
            self._new_c_buf(self.c_next)
        if self.early:
            return self.c_mv[self.early:]
        return self.c_buf

    def buffer_updated(self, Py_ssize_t nbytes):
        self._client_bytes(nbytes)

    cdef _client_bytes(self, Py_ssize_t nbytes):
        # nbytes more client bytes in c_buf (at 0, or after the early ones)
        self.last_active = _now()
        if self.up_state == UP_OPEN:
            if not self.closing:
                self._to_upstream(0, nbytes, True)
        elif self.up_state != UP_CLOSED:
            self.early += nbytes
            if self.early >= self.c_size:
                self.c_early_full = True
                self._sync_client_reading()

    def data_received(self, data):
        # Loops that do not use get_buffer() (asyncio's own, for an object
        # that is not an asyncio.BufferedProtocol) deliver bytes here.
        cdef Py_ssize_t n = len(data)
        self.last_active = _now()
        if self.up_state == UP_OPEN:
            if not self.closing:
                if self.c_buf is None or self.c_size < n:
                    self._new_c_buf(max(n, self.cfg.buffer_size))
                self.c_buf[:n] = data
                self._to_upstream(0, n, False)
        elif self.up_state != UP_CLOSED:
            self._hold(data)

    def eof_received(self):
        self._client_eof()
        return True   # keep the other direction open: a half-close

    cdef _client_eof(self):
        self.c_eof = True
        self.c_reading = False   # a transport stops reading by itself
        if self.lingering:
            self.lingering = False
            self._c_close(False)
            return
        if self.up_state == UP_OPEN and not self.closing:
            if self.u_eof:
                self._shut(END_EOF, False)   # both done: close, no shutdown() first
            elif self.c_pend_end == 0:
                self._shutdown_upstream()

    def pause_writing(self):
        # the client reads slower than the upstream sends
        self.u_paused_by_c = True

    def resume_writing(self):
        self.u_paused_by_c = False
        if self.u_readable:
            self._read_upstream()

    def connection_lost(self, exc):
        self._client_lost(exc is not None)

    cdef _client_lost(self, bint error):
        # the client's side is closed (by us, by the peer, or it failed)
        self.client_open = False
        self.c_reading = False
        self._set_end(END_CLIENT_ERROR if error else END_CLOSED)
        if self.up_state == UP_OPEN:
            self.closing = True
            self._close_upstream(error)
        elif self.up_state == UP_CONNECTING:
            # the client left while we connected: no failure to count
            self.closing = True
            self._drop_attempt(UP_CLOSED)
            self._finish()
        else:
            self.up_state = UP_CLOSED
            self._finish()

    def abort(self):
        """Close both sides at once (a drain timed out)."""
        self._shut(END_ABORTED, True)

    # -- read-only views (status, access log, tests) ---------------------------

    @property
    def upstream(self):
        """The connected upstream's UpstreamState (None if none was reached)."""
        return self.ustate

    @property
    def client_transport(self):
        """The client's transport (None once finished)."""
        return self.client

    @property
    def client_fileno(self):
        """The client socket's file descriptor when the core accepted it
        (-1 for a connection served through a transport, or once closed)."""
        return self.cfd

    @property
    def upstream_fileno(self):
        """The upstream socket's file descriptor (-1 when there is none)."""
        return self.ufd

    @property
    def bytes_in(self):
        """Bytes relayed from the client to the upstream."""
        return self.c2u

    @property
    def bytes_out(self):
        """Bytes relayed from the upstream to the client."""
        return self.u2c

    @property
    def spliced(self):
        """Which directions moved bulk with splice(2): "", "in" (client to
        upstream), "out" (upstream to client) or "both"."""
        return ("", "in", "out", "both")[self.c_spliced + 2 * self.u_spliced]

    @property
    def held(self):
        """Client bytes held while the upstream connects."""
        return self.early

    @property
    def duration(self):
        """Seconds from accept to finish (or until now)."""
        return (self.ended if self._finished else _now()) - self.started

    @property
    def end(self):
        """How it ended: eof, client_error, upstream_error, idle, aborted,
        no_upstream, closed -- or "open"."""
        return _END_NAMES[self.end_code]

    @property
    def closed(self):
        """True once the client connection is gone."""
        return self._finished or ((self.client is not None or self.raw) and not self.client_open)

    @property
    def finished(self):
        """True once both sides are gone and every count is released."""
        return self._finished

    @property
    def buffered(self):
        """Bytes this connection holds in memory: its read buffers and the
        client transport's write buffer (for tests of back-pressure)."""
        cdef Py_ssize_t n = self.c_size + self.u_size
        if self.client is not None and self.client_open:
            n += self.client.get_write_buffer_size()
        return n

    def __repr__(self):
        return (f"<Connection {self.peername!r} up={self.ustate.address if self.ustate else None} "
                f"in={self.c2u} out={self.u2c} {self.end}>")

    # -- connecting --------------------------------------------------------------

    cdef _next_attempt(self):
        # Try targets until one connects or is in progress, or give up.
        cdef RelayConfig cfg = self.cfg
        cdef Target t
        cdef int err
        while True:
            if self.attempts >= cfg.attempts:
                self._no_upstream()
                return
            if cfg.single is not None:
                t = cfg.single if self.tried is None else None
            elif cfg.connector is not None:
                t = cfg.connector.pick(self, self.tried if self.tried is not None else ())
            else:
                t = None   # no upstream at all
            if t is None:
                self._no_upstream()
                return
            self.attempts += 1
            err = self._start_attempt(t)
            if err == 0:
                return
            # failed at once (refused by a Unix socket, out of descriptors, ...)
            self._count_failure(t, _oserror(err))

    cdef int _start_attempt(self, Target t) except -1:
        cdef int fd, r, err, one = 1
        cdef const char *sa = t.sockaddr
        fd = socket(t.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            return errno
        if t.family != AF_UNIX:
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            if self.cfg.keepalive:
                setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
        r = connect(fd, <const sockaddr*>sa, <socklen_t>len(t.sockaddr))
        if r < 0 and errno != EINPROGRESS:
            err = errno
            _close(fd)
            return err
        err = self.engine.register(self, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                    _TAG_UPSTREAM)
        if err:
            _close(fd)
            return err
        self.ufd = fd
        self.attempt = t
        t.state.active += 1
        self.up_state = UP_CONNECTING
        if r == 0:
            self._connected()
        else:
            self.deadline = _now() + self.cfg.connect_timeout
            self.engine.want_tick(self.deadline)
        return 0

    cdef _connected(self):
        cdef Target t = self.attempt
        cdef UpstreamState st = t.state
        self.attempt = None
        self.deadline = 0.0
        self.ustate = st
        self.up_state = UP_OPEN
        st.connections += 1
        if (st.fails or st.ejected_until > 0) and self.cfg.connector is not None:
            self.cfg.connector.succeeded(t)
        if self.early:
            n = self.early
            self.early = 0
            self.c_early_full = False
            self._to_upstream(0, n, False)
        if self.c_eof and self.c_pend_end == 0 and self.up_state == UP_OPEN:
            self._shutdown_upstream()
        self._sync_client_reading()

    cdef Target _drop_attempt(self, int state):
        # Close the attempt in progress and release its count (no failure is
        # counted here); the upstream side goes to *state*.
        cdef Target t = self.attempt
        self._close_fd()
        t.state.active -= 1
        self.attempt = None
        self.deadline = 0.0
        self.up_state = state
        return t

    cdef _attempt_failed(self, object exc):
        # The attempt in progress failed: release and count it, then try the
        # next target if the client is still there.
        self._count_failure(self._drop_attempt(UP_NONE), exc)
        if self.client_open and not self.closing:
            self._next_attempt()
        else:
            self.up_state = UP_CLOSED
            self._finish()

    cdef _count_failure(self, Target t, object exc):
        if self.tried is None:
            self.tried = []
        self.tried.append(t)
        if self.cfg.connector is not None:
            self.cfg.connector.failed(t, exc)
        else:
            self.counters.connect_failures += 1

    cdef _no_upstream(self):
        # No upstream could be reached: send the client our EOF and close
        # once it has sent its own (or after _LINGER seconds), reading and
        # dropping what it still sends -- closing a socket with unread bytes
        # would reset the connection instead of ending it.
        self.up_state = UP_CLOSED
        self.counters.no_upstream += 1
        self._set_end(END_NO_UPSTREAM)
        self.early = 0
        self.c_early_full = False
        if not self.client_open:
            self._finish()
            return
        self.closing = True
        if self.c_eof:
            self._c_close(False)
            return
        self.lingering = True
        self.deadline = _now() + _LINGER
        self.engine.want_tick(self.deadline)
        self._c_write_eof()
        self._sync_client_reading()

    # -- the engine's calls ------------------------------------------------------

    cdef double _deadline(self):
        if self.up_state == UP_CONNECTING or self.lingering:
            return self.deadline
        if self.cfg.idle_timeout > 0 and not self._finished:
            # closing too: a client that never reads what is left for it
            return self.last_active + self.cfg.idle_timeout
        return 0.0

    cdef _timed_out(self, double now):
        cdef double at = self._deadline()
        if at == 0.0 or now < at:
            return
        if self.lingering:
            self.lingering = False
            if self.client_open:
                self._c_close(False)
        elif self.up_state == UP_CONNECTING:
            self._attempt_failed(TimeoutError())
        else:
            self.counters.idle_closed += 1
            self._shut(END_IDLE, True)

    cdef _crashed(self, object exc):
        # a bug in the relay or a callback: this connection only
        _log.error("proxy connection failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        self._set_end(END_ABORTED)
        if not self._finished:
            self._shut(END_ABORTED, True)

    cdef _upstream_event(self, uint32_t events):
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if self.ufd < 0:
            return   # closed earlier in this batch
        if self.up_state == UP_CONNECTING:
            if events & (EPOLLERR | EPOLLHUP):
                # a failed connect reports ERR (and HUP): SO_ERROR says why
                getsockopt(self.ufd, SOL_SOCKET, SO_ERROR, &err, &elen)
                self._attempt_failed(_oserror(err if err else ECONNREFUSED))
                return
            if not events & EPOLLOUT:
                return
            self._connected()   # writable, no error: connected
        if self.up_state != UP_OPEN:
            return
        if events & EPOLLERR:
            getsockopt(self.ufd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err:
                self._upstream_error(err)
                return
        if events & EPOLLOUT and self.c_pend_end:
            self._flush_upstream()
        if self.ufd >= 0 and events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            if events & (EPOLLRDHUP | EPOLLHUP):
                self.u_rdhup = True
            self.u_readable = True
            self._read_upstream()

    # -- relaying ------------------------------------------------------------------

    # Read buffers are not zeroed (bytearray(n) would memset them): every
    # byte relayed from them was first written by recv() or the transport.

    cdef _new_c_buf(self, Py_ssize_t size):
        self.c_buf = PyByteArray_FromStringAndSize(NULL, size)
        if not self.raw:
            self.c_mv = memoryview(self.c_buf)   # for get_buffer()
        self.c_size = size

    cdef _new_u_buf(self, Py_ssize_t size):
        self.u_buf = PyByteArray_FromStringAndSize(NULL, size)
        if not self.raw:
            self.u_mv = memoryview(self.u_buf)   # for the transport's write()
        self.u_size = size

    cdef _to_upstream(self, Py_ssize_t start, Py_ssize_t n, bint from_read):
        # send c_buf[start:start+n]; keep what the upstream cannot take
        cdef ssize_t r
        cdef Py_ssize_t size = self.c_size
        cdef char *p = PyByteArray_AS_STRING(self.c_buf)
        self.c2u += n
        self.counters.bytes_in += n
        if from_read and n == size:
            # a full read: a bulk transfer, read bigger chunks (and at the
            # largest, splice a raw connection's)
            if size < self.cfg.max_buffer_size:
                self.c_next = min(size * 2, self.cfg.max_buffer_size)
            elif self.raw and _SPLICE:
                self.c_splice = True
        while True:
            r = send(self.ufd, p + start, n, MSG_NOSIGNAL)
            if r >= 0:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                r = 0
                break
            self._upstream_error(errno)
            return
        if r == n:
            return
        self.c_pend_off = start + r
        self.c_pend_end = start + n
        self.c_paused_by_up = True
        self._sync_client_reading()

    cdef _flush_upstream(self):
        cdef ssize_t r
        cdef char *p
        if self.cp_r >= 0:
            r = _drain_pipe(self.cp_r, self.ufd, self.c_pend_end - self.c_pend_off)
            if r <= 0:
                if r < 0:
                    self._upstream_error(-r)
                return
            self.c_pend_off += r
            self.last_active = _now()
            if self.c_pend_off < self.c_pend_end:
                return
            self._flushed_upstream()
            return
        p = PyByteArray_AS_STRING(self.c_buf)
        while True:
            r = send(self.ufd, p + self.c_pend_off, self.c_pend_end - self.c_pend_off, MSG_NOSIGNAL)
            if r >= 0:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return
            self._upstream_error(errno)
            return
        self.c_pend_off += r
        self.last_active = _now()
        if self.c_pend_off < self.c_pend_end:
            return
        self._flushed_upstream()

    cdef _flushed_upstream(self):
        # everything the client sent has reached the upstream
        self.c_pend_off = self.c_pend_end = 0
        if self.u_close_pending:
            self._close_upstream(False)
            return
        if self.c_eof:
            self._shutdown_upstream()
        self.c_paused_by_up = False
        self._sync_client_reading()

    cdef _shutdown_upstream(self):
        if not self.u_shut and self.ufd >= 0:
            self.u_shut = True
            shutdown(self.ufd, SHUT_WR)

    cdef _read_upstream(self):
        cdef ssize_t r
        cdef int reads = 0
        while self.u_readable and self.ufd >= 0:
            if self.u_paused_by_c or self.closing or not self.client_open:
                return
            if self.u_splice and not self.u_pend_end:
                self._splice_u2c()
                return
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)   # let the other connections run
                return
            if self.u_buf is None or self.u_size < self.u_next:
                self._new_u_buf(self.u_next)
            r = recv(self.ufd, PyByteArray_AS_STRING(self.u_buf), self.u_size, 0)
            if r > 0:
                reads += 1
                self.last_active = _now()
                if r < self.u_size:
                    # A short read took all there was: more data raises a
                    # new edge, and if the upstream's FIN is already here
                    # (RDHUP), nothing follows it -- the EOF, without the
                    # recv() that would return 0.
                    self.u_readable = False
                    self._to_client(r)
                    if self.u_rdhup and self.ufd >= 0 and not self.u_eof:
                        self._upstream_eof()
                    return
                self._to_client(r)
            elif self._upstream_read_ended(r):
                return

    cdef bint _upstream_read_ended(self, ssize_t r):
        # recv()/splice() from the upstream returned r <= 0: the EOF, nothing
        # more for now, or an error.  False: interrupted, read again.
        if r == 0:
            self.u_readable = False
            self._upstream_eof()
        elif errno == EAGAIN:
            self.u_readable = False
        elif errno == EINTR:
            return False
        else:
            self._upstream_error(errno)
        return True

    cdef _to_client(self, Py_ssize_t n):
        cdef Py_ssize_t size = self.u_size
        cdef ssize_t r
        self.u2c += n
        self.counters.bytes_out += n
        if self.raw:
            # u_buf is ours until sent: what the client cannot take now is
            # kept (u_pend_*) and upstream reads stop until EPOLLOUT.
            if n == size:
                if size < self.cfg.max_buffer_size:
                    self.u_next = min(size * 2, self.cfg.max_buffer_size)
                elif _SPLICE:
                    self.u_splice = True
            while True:
                r = send(self.cfd, PyByteArray_AS_STRING(self.u_buf), n, MSG_NOSIGNAL)
                if r >= 0:
                    break
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    r = 0
                    break
                self._c_gone(True)
                return
            if r < n:
                self.u_pend_off = r
                self.u_pend_end = n
                self.u_paused_by_c = True
            return
        self.c_write(self.u_buf if n == size else self.u_mv[:n])
        if n == size and size < self.cfg.max_buffer_size:
            self.u_next = min(size * 2, self.cfg.max_buffer_size)
            self.u_buf = None
            self.u_size = 0
        elif self.client_open and self.client.get_write_buffer_size():
            # the transport still holds a view of u_buf: take a fresh one
            self.u_buf = None
            self.u_size = 0

    cdef _hold(self, object data):
        # data_received() before the upstream is connected: copy into c_buf,
        # growing it if needed; reading pauses once buffer_size bytes are held.
        cdef Py_ssize_t n = len(data)
        cdef Py_ssize_t need = self.early + n
        if self.c_buf is None or need > self.c_size:
            old, old_n = self.c_buf, self.early
            self._new_c_buf(max(need, self.cfg.buffer_size))
            if old_n:
                self.c_buf[:old_n] = old[:old_n]
        self.c_buf[self.early:need] = data
        self.early = need
        if self.early >= self.cfg.buffer_size:
            self.c_early_full = True
            self._sync_client_reading()

    cdef _sync_client_reading(self):
        cdef bint want = (self.client_open and not self.c_eof and (self.lingering or (
            not self.closing and not self.c_paused_by_up and not self.c_early_full)))
        if want != self.c_reading:
            self.c_reading = want
            if self.raw:
                # an edge-triggered socket does not report bytes that were
                # already there: read them soon (not from inside this call)
                if want and self.c_readable:
                    self.engine.defer(self)
            elif want:
                self.client.resume_reading()
            else:
                self.client.pause_reading()

    cdef _upstream_eof(self):
        self.u_eof = True
        if self.client_open and not self.closing:
            self._c_write_eof()
            if self.c_eof:
                self._shut(END_EOF, False)

    cdef _upstream_error(self, int err):
        # the upstream socket failed (reset, ...): close both sides at once
        self._set_end(END_UPSTREAM_ERROR)
        self._close_upstream(True)
        if self.client_open:
            self._shut(END_CLOSED, True)

    # -- the client socket, when the core accepted it (raw) -------------------------
    #
    # The same relay as with a transport; these stand in for the transport's
    # reads, writes and callbacks.  Writes to the client go straight from
    # u_buf; closing the client socket runs connection_lost's logic at once.

    cdef int _start_raw(self, _Engine engine, int fd, sockaddr_storage *addr,
                        socklen_t alen) except -1:
        # Serve the accepted socket *fd*, which this connection now owns, in
        # *engine* (the listener's: asking asyncio for the running loop
        # costs a getpid() per call).
        cdef RelayConfig cfg = self.cfg
        cdef int one = 1, err
        self.raw = True
        if not self._admit():
            peer = _sockaddr_to_py(addr, alen) if cfg.on_refuse is not None else None
            _close(fd)
            if cfg.on_refuse is not None:
                cfg.on_refuse(peer)
            return 0
        self.engine = engine
        err = engine.register(self, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, _TAG_CLIENT)
        if err:
            _close(fd)
            self._set_end(END_CLIENT_ERROR)
            self.up_state = UP_CLOSED
            self._finish()
            return 0
        self.cfd = fd
        self.client_open = True
        self.c_reading = True
        self.conns.add(self)
        self.engine.link(self)
        if cfg.want_peername:
            self.peername = _sockaddr_to_py(addr, alen)
        if cfg.keepalive and addr.ss_family != AF_UNIX:
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
        if cfg.idle_timeout > 0:
            self.engine.want_tick(self.started + cfg.idle_timeout)
        self._next_attempt()
        return 0

    cdef _client_event(self, uint32_t events):
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if self.cfd < 0:
            return   # closed earlier in this batch
        if events & EPOLLERR:
            getsockopt(self.cfd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err:
                self._c_gone(True)
                return
        if events & EPOLLOUT and self.u_pend_end:
            self._flush_client()
        if self.cfd >= 0 and events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            if events & (EPOLLRDHUP | EPOLLHUP):
                self.c_rdhup = True
            self.c_readable = True
            self._read_client()

    cdef _read_client(self):
        cdef ssize_t r
        cdef Py_ssize_t room
        cdef int reads = 0
        while self.c_readable and self.cfd >= 0 and self.c_reading:
            if self.c_splice and self.up_state == UP_OPEN and not self.early and not self.c_pend_end:
                self._splice_c2u()
                return
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)   # let the other connections run
                return
            if self.c_buf is None or (self.c_size < self.c_next and not self.early
                                      and self.c_pend_end == 0):
                self._new_c_buf(self.c_next)
            room = self.c_size - self.early
            r = recv(self.cfd, PyByteArray_AS_STRING(self.c_buf) + self.early, room, 0)
            if r > 0:
                reads += 1
                self._client_bytes(r)
                if r < room:
                    # all there was (see _read_upstream)
                    self.c_readable = False
                    if self.c_rdhup and self.cfd >= 0 and not self.c_eof:
                        self._client_eof()
                    return
            elif self._client_read_ended(r):
                return

    cdef bint _client_read_ended(self, ssize_t r):
        # the same for the client socket
        if r == 0:
            self.c_readable = False
            if not self.c_eof:
                self._client_eof()
        elif errno == EAGAIN:
            self.c_readable = False
        elif errno == EINTR:
            return False
        else:
            self._c_gone(True)
        return True

    cdef _flush_client(self):
        cdef ssize_t r
        cdef char *p
        if self.up_r >= 0:
            r = _drain_pipe(self.up_r, self.cfd, self.u_pend_end - self.u_pend_off)
            if r <= 0:
                if r < 0:
                    self._c_gone(True)
                return
        else:
            p = PyByteArray_AS_STRING(self.u_buf)
            while True:
                r = send(self.cfd, p + self.u_pend_off, self.u_pend_end - self.u_pend_off,
                         MSG_NOSIGNAL)
                if r >= 0:
                    break
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    return
                self._c_gone(True)
                return
        self.u_pend_off += r
        self.last_active = _now()
        if self.u_pend_off < self.u_pend_end:
            return
        self.u_pend_off = self.u_pend_end = 0
        if self.c_close_pending:
            self._c_gone(False)
            return
        if self.c_eof_pending:
            self.c_eof_pending = False
            shutdown(self.cfd, SHUT_WR)
        self.u_paused_by_c = False
        if self.u_readable:
            self._read_upstream()

    # Bulk: once a direction has filled a max_buffer_size read, its bytes
    # move socket -> pipe -> socket with splice(2) and never reach user
    # space.  What the pipe still holds is the pending count (c_pend_* or
    # u_pend_*), so flow control, half-close and closing work as with a
    # buffer.

    cdef _splice_c2u(self):
        cdef ssize_t r
        cdef int reads = 0
        cdef Py_ssize_t chunk = self.cfg.max_buffer_size
        if self.cp_r < 0:
            if _open_pipe(&self.cp_r, &self.cp_w, chunk) < 0:
                self.c_splice = False   # no descriptors to spare: keep copying
                return
            self.c_spliced = True
            self.c_buf = None           # not needed any more
            self.c_size = 0
        while self.c_readable and self.cfd >= 0 and self.c_reading:
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)
                return
            r = splice(self.cfd, NULL, self.cp_w, NULL, chunk, _SPLICE_FLAGS)
            if r > 0:
                reads += 1
                self.last_active = _now()
                self.c2u += r
                self.counters.bytes_in += r
                self.c_pend_off = 0
                self.c_pend_end = r
                r = _drain_pipe(self.cp_r, self.ufd, r)
                if r < 0:
                    self._upstream_error(-r)
                    return
                self.c_pend_off = r
                if self.c_pend_off < self.c_pend_end:
                    self.c_paused_by_up = True
                    self._sync_client_reading()
                    return
                self.c_pend_off = self.c_pend_end = 0
            elif self._client_read_ended(r):
                return

    cdef _splice_u2c(self):
        cdef ssize_t r
        cdef int reads = 0
        cdef Py_ssize_t chunk = self.cfg.max_buffer_size
        if self.up_r < 0:
            if _open_pipe(&self.up_r, &self.up_w, chunk) < 0:
                self.u_splice = False
                return
            self.u_spliced = True
            self.u_buf = None
            self.u_size = 0
        while self.u_readable and self.ufd >= 0:
            if self.u_paused_by_c or self.closing or not self.client_open:
                return
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)
                return
            r = splice(self.ufd, NULL, self.up_w, NULL, chunk, _SPLICE_FLAGS)
            if r > 0:
                reads += 1
                self.last_active = _now()
                self.u2c += r
                self.counters.bytes_out += r
                self.u_pend_off = 0
                self.u_pend_end = r
                r = _drain_pipe(self.up_r, self.cfd, r)
                if r < 0:
                    self._c_gone(True)
                    return
                self.u_pend_off = r
                if self.u_pend_off < self.u_pend_end:
                    self.u_paused_by_c = True
                    return
                self.u_pend_off = self.u_pend_end = 0
            elif self._upstream_read_ended(r):
                return

    cdef _close_pipes(self):
        if self.cp_r >= 0:
            _close(self.cp_r)
            _close(self.cp_w)
            self.cp_r = self.cp_w = -1
        if self.up_r >= 0:
            _close(self.up_r)
            _close(self.up_w)
            self.up_r = self.up_w = -1

    cdef _run_deferred(self):
        if self.raw and self.c_readable:
            self._read_client()
        if self.u_readable:
            self._read_upstream()

    cdef _c_write_eof(self):
        if not self.raw:
            self.client.write_eof()
        elif self.u_pend_end:
            self.c_eof_pending = True
        elif self.cfd >= 0:
            shutdown(self.cfd, SHUT_WR)

    cdef _c_close(self, bint hard):
        # Close the client side: at once, or once what it has not taken yet
        # is sent.  A transport calls connection_lost later; a raw socket
        # is gone before this returns.
        if not self.raw:
            if hard:
                self.client.abort()
            else:
                self.client.close()
            return
        if not hard and self.u_pend_end and self.cfd >= 0:
            self.c_close_pending = True
            self._sync_client_reading()
            return
        self._c_gone(False)

    cdef _c_gone(self, bint error):
        cdef int fd = self.cfd
        if fd < 0:
            return
        self.cfd = -1
        _close(fd)   # also takes it out of the epoll set
        self.engine.forget(self)
        self.u_pend_off = self.u_pend_end = 0
        self.c_readable = False
        self._client_lost(error)

    # -- closing -------------------------------------------------------------------

    cdef _set_end(self, int code):
        if self.end_code == END_NONE:
            self.end_code = code

    cdef _close_fd(self):
        cdef int fd = self.ufd
        if fd >= 0:
            self.ufd = -1
            _close(fd)   # also takes it out of the epoll set
            self.engine.forget(self)

    cdef _close_upstream(self, bint hard):
        # Close the open upstream side: at once, or once the bytes it has
        # not taken yet are sent.
        if self.up_state != UP_OPEN:
            return
        if not hard and self.c_pend_end and self.ufd >= 0:
            self.u_close_pending = True
            return
        self._close_fd()
        self.up_state = UP_CLOSED
        self.u_readable = False
        if not self.client_open:
            self._finish()

    cdef _shut(self, int code, bint hard):
        # Close both sides: gracefully (flush what is buffered) or at once.
        self._set_end(code)
        if self._finished:
            return
        self.closing = True
        if self.client_open:
            self._c_close(hard)   # raw: may finish the connection right here
        if self.up_state == UP_OPEN:
            self._close_upstream(hard)
        elif self.up_state == UP_CONNECTING:
            self._drop_attempt(UP_CLOSED)
            if not self.client_open:
                self._finish()

    cdef _finish(self):
        if self._finished:
            return
        self._finished = True
        self.closing = True
        self.ended = _now()
        self._close_fd()
        if self.cfd >= 0:
            _close(self.cfd)
            self.cfd = -1
            self.client_open = False
            self.engine.forget(self)
        self._close_pipes()
        if self.engine is not None:
            self.engine.unlink(self)
        if self.admitted:
            self.admitted = False
            self.counters.active -= 1
            self.cfg.limit._release()
        if self.ustate is not None:
            self.ustate.active -= 1
            self.ustate.bytes_in += self.c2u
            self.ustate.bytes_out += self.u2c
        self.attempt = None
        self.tried = None
        self.c_buf = self.u_buf = None
        self.c_mv = self.u_mv = None
        self.c_size = self.u_size = 0
        self.c_write = None
        self.client = None
        self.conns.discard(self)
        if self.cfg.on_close is not None:
            self.cfg.on_close(self)
        self.owner = None   # the last connection of an old version frees it



# -- accepting in the core ------------------------------------------------------------

cdef enum:
    # connections accepted per readiness event before the others run
    _ACCEPTS_PER_EVENT = 64

# seconds a listener stops accepting when the process is out of descriptors
cdef double _ACCEPT_RETRY = 0.25


@cython.final
cdef class Listener:
    """Accepts on a listening socket in the core, for a site's ``Acceptor``.

    Each connection reads the slot once.  A service whose ``accepts_raw``
    is True gets the accepted socket itself: ``new_raw_connection(conns)``
    returns a ``Connection`` (or None: refused), which drives the socket
    with its upstream socket in the loop's engine, with no transport at
    all.  Any other service gets ``fallback(sock)``, which serves it
    through the loop (``loop.connect_accepted_socket``).

    ``start()`` watches the socket; ``stop()`` stops (the socket stays
    open, and ``take_queued()`` then serves what the kernel has queued).
    The socket belongs to the caller.
    """

    def __cinit__(self, Acceptor acceptor not None, object sock not None, object fallback=None):
        self.acceptor = acceptor
        self.sock = sock
        self.fd = sock.fileno()
        self.fallback = fallback

    @property
    def watching(self):
        """True while the socket is watched."""
        return self.watching

    def start(self):
        """Watch the socket (in the running loop's engine)."""
        cdef int err
        if self.watching:
            return
        engine = _get_engine()
        err = engine.register(self, self.fd, EPOLLIN, _TAG_LISTENER)
        if err:
            raise _oserror(err)
        self.engine = engine
        self.watching = True

    def stop(self):
        """Stop watching; the socket stays open."""
        if not self.watching:
            return
        self.watching = False
        epoll_ctl(self.engine.epfd, EPOLL_CTL_DEL, self.fd, NULL)
        self.engine.forget(self)

    def take_queued(self, int limit=4096):
        """Accept and serve what is queued now, at most *limit*; return how many."""
        return self._accept(limit)

    cdef _ready(self):
        if not self.watching:
            return
        try:
            self._accept(_ACCEPTS_PER_EVENT)
        except Exception as exc:
            _accept_log.error("site %r: accept failed: %s: %s", self.acceptor.name,
                              type(exc).__name__, exc)

    def _resume(self):
        # after running out of descriptors
        if not self.watching and self.engine is not None and self.engine.loop is not None:
            try:
                self.start()
            except OSError as exc:
                _accept_log.error("site %r: cannot watch the listener again: %s",
                                  self.acceptor.name, exc)

    cdef int _accept(self, int limit) except -1:
        cdef sockaddr_storage ss
        cdef socklen_t alen
        cdef int fd, err, n = 0
        while n < limit:
            alen = sizeof(ss)
            fd = accept4(self.fd, <sockaddr*>&ss, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if err == EINTR or err == ECONNABORTED:
                    continue
                if err == EAGAIN:
                    break
                if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                    # The connection stays queued; watching a socket that
                    # stays readable would spin, so look again a bit later.
                    if self.watching:
                        self.stop()
                        self.engine.loop.call_later(_ACCEPT_RETRY, self._resume)
                    self._paused(_oserror(err))
                    break
                raise _oserror(err)
            n += 1
            self._dispatch(fd, &ss, alen)
        return n

    cdef _dispatch(self, int fd, sockaddr_storage *ss, socklen_t alen):
        cdef Acceptor acc = self.acceptor
        cdef Connection conn
        svc = acc.slot._current
        if getattr(svc, "accepts_raw", False) is not True:
            self._serve_fallback(fd)
            return
        try:
            obj = svc.new_raw_connection(acc.conns)
            if obj is not None and type(obj) is not Connection:
                raise TypeError(f"new_raw_connection() returned {type(obj).__name__}, "
                                "not a Connection")
        except Exception as exc:
            _close(fd)
            self._failed(exc)
            return
        if obj is None:
            _close(fd)   # refused (a connection limit)
            return
        conn = <Connection>obj
        self.raw_accepted += 1
        try:
            conn._start_raw(self.engine, fd, ss, alen)   # conn owns fd now
        except Exception as exc:
            conn._crashed(exc)

    def _serve_fallback(self, int fd):
        try:
            sock = _socket.socket(fileno=fd)
        except Exception as exc:
            _close(fd)
            self._failed(exc)
            return
        if self.fallback is None:
            sock.close()
            self._failed(RuntimeError("the service has no raw_relay and the listener no fallback"))
            return
        self.fallback_accepted += 1
        try:
            self.fallback(sock)
        except Exception as exc:
            sock.close()
            self._failed(exc)

    def _paused(self, exc):
        # at most every 10 s per site, like _accept_failed
        acc = self.acceptor
        now = _monotonic()
        if now - acc._logged_at >= 10.0:
            acc._logged_at = now
            _accept_log.error("site %r: cannot accept: %s; connections wait in the queue, "
                              "accepting again in %.2fs", acc.name, exc.strerror, _ACCEPT_RETRY)

    def _failed(self, exc):
        acc = self.acceptor
        acc.errors += 1
        acc._logged_at = _accept_failed(acc.name, exc, acc.errors, acc._logged_at)

    def __repr__(self):
        return f"<Listener {self.acceptor.name!r} fd={self.fd} watching={self.watching}>"
