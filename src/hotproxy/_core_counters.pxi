# -- connection counts shared by the processes of an instance ---------------------
#
# Included by _core.pyx; declared in _core_counters.pxd.  (Slot, ConnectionSet
# and Acceptor are _core_machine's: one source for both cores.)
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
cdef class SharedCounter(Counter):
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
