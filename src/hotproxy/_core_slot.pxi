# -- the slot, shared counters, connection sets, the acceptor ------------------
#
# Included by _core.pyx; declared in _core_slot.pxd.

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
