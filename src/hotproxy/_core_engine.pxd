# The engine: one epoll instance per event loop (_core_engine.pxi).

from hotproxy._core_machine cimport TimerWheel

cdef enum:
    _EVENTS = 64   # epoll events taken per epoll_wait()


cdef class Connection
cdef class Listener


cdef class _Engine:
    cdef int epfd
    cdef object loop
    cdef list graveyard             # objects whose fd was closed: an event may still name them
    cdef list ready                 # connections with bytes left to read
    cdef Connection head            # every connection of this loop (close())
    cdef Py_ssize_t nconns          # connections in that list
    cdef TimerWheel wheel           # the connections' deadlines
    cdef unsigned long long ticks   # timer runs
    cdef unsigned long long checked # connections the timer runs took out of the wheel
    cdef object timer
    cdef double timer_at
    cdef epoll_event evs[_EVENTS]

    cdef close(self)
    cdef int register(self, object obj, int fd, uint32_t events, int tag) except -1
    cdef forget(self, object obj)
    cdef defer(self, Connection conn)
    cdef link(self, Connection conn)
    cdef unlink(self, Connection conn)
    cdef arm(self, Connection conn, double at)
    cdef rearm(self, Connection conn)
    cdef want_tick(self, double when)
