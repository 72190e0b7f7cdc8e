# The counters shared by the processes of an instance (_core_counters.pxi).

from hotproxy._core_machine cimport Slot, Counter, ConnectionSet, Acceptor

# -- connection counts shared by the processes of an instance ------------------

cdef class CounterTable:
    cdef Py_buffer view
    cdef bint has_view
    cdef char *base
    cdef readonly int slots
    cdef readonly int workers
    cdef readonly int worker        # whose shares this process updates (-1: none)
    cdef readonly object lock       # a file of the memory, for the pure-Python core's locks
    cdef long long *_total(self, int slot) noexcept
    cdef long long *_share(self, int worker, int slot) noexcept


cdef class SharedCounter(Counter):
    cdef readonly CounterTable table
    cdef readonly int slot
    cdef long long *total           # the instance's count
    cdef long long *share           # this worker's part of it
    cdef bint _acquire(self, long long limit) noexcept
    cdef void _release(self) noexcept
