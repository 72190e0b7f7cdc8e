# Slot, shared counters, connection sets and the acceptor (_core_slot.pxi).

cdef class Slot:
    cdef object _current
    cpdef object swap(self, object new)


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


cdef class SharedCounter:
    cdef readonly CounterTable table
    cdef readonly int slot
    cdef long long *total           # the instance's count
    cdef long long *share           # this worker's part of it
    cdef bint _acquire(self, long long limit) noexcept
    cdef void _release(self) noexcept


cdef class ConnectionSet:
    cdef set _conns
    cdef public ConnectionSet parent
    cdef readonly SharedCounter limit
    cdef list _waiters
    cpdef add(self, object conn)
    cpdef discard(self, object conn)
    cdef _wake(self)


cdef class Acceptor:
    cdef readonly Slot slot
    cdef readonly ConnectionSet conns
    cdef readonly str name
    cdef readonly unsigned long long errors
    cdef double _logged_at
