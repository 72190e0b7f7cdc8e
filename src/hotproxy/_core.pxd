# The compiled core's interface: what other Cython modules may cimport.
# Python code sees the same names through hotproxy.core (compiled or not).

cdef class Slot:
    cdef object _current
    cpdef object swap(self, object new)


cdef class ConnectionSet:
    cdef set _conns
    cdef public ConnectionSet parent
    cdef list _waiters
    cpdef add(self, object conn)
    cpdef discard(self, object conn)
    cdef _wake(self)


cdef class Acceptor:
    cdef readonly Slot slot
    cdef readonly ConnectionSet conns
