# The relay's system calls (_core_relay.pxi): a Connection is a Relay (the
# logic, one source for both cores: _core_machine.py) that adds them.

from hotproxy._core_machine cimport (
    Direction, Relay, RelayConfig, Target, UpstreamState, ProxyCounters,
    D_OPEN, EV_FULL, M_COPY, M_BULK, M_SPLICE,
    UP_CONNECTING, UP_OPEN, UP_CLOSED, END_CLIENT_ERROR, C_OPEN)


cdef class Connection(Relay):
    cdef _Engine engine
    cdef Connection t_prev          # the engine's list
    cdef Connection t_next
    cdef bint t_linked

    # the hooks of Relay
    cdef double _clock(self) noexcept
    cdef _attach(self)
    cdef _detach(self)
    cdef _arm(self, double at)
    cdef _rearm(self)
    cdef _defer(self)
    cdef int _start_attempt(self, Target t) except -1
    cdef _close_fd(self)
    cdef object _sockname(self)
    cdef bint _close_client(self) except -1
    cdef _close_pipes(self)
    cdef _shutdown(self, bint client_side)
    cdef _new_buf(self, Direction d, Py_ssize_t size)
    cdef _send(self, Direction d, Py_ssize_t start, Py_ssize_t n, bint from_read)
    cdef _read(self, Direction d)

    cdef int _start_raw(self, _Engine engine, int fd, sockaddr_storage *addr,
                        socklen_t alen) except -1
    cdef _upstream_event(self, uint32_t events)
    cdef _client_event(self, uint32_t events)
    cdef int _src(self, Direction d) noexcept
    cdef int _dst(self, Direction d) noexcept
    cdef bint _read_ended(self, Direction d, ssize_t r) except -1
    cdef _flush(self, Direction d)
    cdef bint _splice(self, Direction d) except -1
