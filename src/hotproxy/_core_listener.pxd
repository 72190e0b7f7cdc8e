# Accepting in the core (_core_listener.pxi).

cdef class Listener:
    cdef readonly Acceptor acceptor
    cdef readonly object sock
    cdef int fd
    cdef _Engine engine
    cdef bint watching
    cdef object fallback
    cdef readonly unsigned long long raw_accepted
    cdef readonly unsigned long long fallback_accepted

    cdef _ready(self)
    cdef int _accept(self, int limit) except -1
    cdef _dispatch(self, int fd, sockaddr_storage *addr, socklen_t alen)
