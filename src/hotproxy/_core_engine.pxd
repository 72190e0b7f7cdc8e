# The engine: one epoll instance per event loop (_core_engine.pxi).

from hotproxy._core_machine cimport TimerWheel, EngineBase, TICK

cdef enum:
    _EVENTS = 64   # epoll events taken per epoll_wait()


cdef class Connection
cdef class Listener


cdef class _Engine(EngineBase):
    cdef int epfd
    cdef list graveyard             # objects whose fd was closed: an event may still name them
    cdef Connection head            # every connection of this loop (close())
    cdef Py_ssize_t nconns          # connections in that list
    cdef double now                 # the time of the batch being run (0.0: none is)
    cdef epoll_event evs[_EVENTS]

    cdef close(self)
    cdef int register(self, object obj, int fd, uint32_t events, int tag) except -1
    cdef forget(self, object obj)
    cdef link(self, Connection conn)
    cdef unlink(self, Connection conn)
    cdef double _clock(self) noexcept
    cdef _after_batch(self)
