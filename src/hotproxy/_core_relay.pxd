# The relay: a proxied connection and what its service version shares
# (_core_relay.pxi).

from hotproxy._core_machine cimport (
    Direction, D_HOLD, D_OPEN, D_BLOCKED, D_CLOSING, D_CLOSED, EV_FULL,
    EV_DRAINED, EV_EOF, EV_CONNECTED, EV_CLOSE, EV_ERROR, ACT_SHUT, ACT_CLOSE, M_COPY, M_BULK,
    M_SPLICE, may_read)

cdef class ProxyCounters:
    cdef public long long accepted
    cdef public long long active
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public long long connect_failures
    cdef public long long refused
    cdef public long long idle_closed
    cdef public long long no_upstream


cdef class UpstreamState:
    cdef readonly str address
    cdef public long long active
    cdef public long long fails
    cdef public double ejected_until
    cdef public long long connections
    cdef public long long failures
    cdef public long long bytes_in
    cdef public long long bytes_out


cdef class Target:
    cdef readonly UpstreamState state
    cdef readonly object up
    cdef readonly int family
    cdef readonly bytes sockaddr
    cdef readonly object address


cdef class RelayConfig:
    cdef readonly ProxyCounters counters
    cdef readonly double idle_timeout
    cdef readonly bint keepalive
    cdef readonly object connector
    cdef readonly object on_close
    cdef readonly bint want_peername
    cdef readonly Py_ssize_t buffer_size
    cdef readonly Py_ssize_t max_buffer_size
    cdef readonly tuple targets
    cdef Target single
    cdef readonly double connect_timeout
    cdef readonly int attempts
    cdef readonly long long max_connections
    cdef readonly SharedCounter limit
    cdef readonly object on_refuse


cdef class Connection:
    cdef readonly RelayConfig cfg
    cdef ProxyCounters counters
    cdef object conns
    cdef object owner               # the service version, alive while we are
    cdef _Engine engine
    cdef Connection t_prev          # the engine's list
    cdef Connection t_next
    cdef bint t_linked
    cdef object client              # the client's transport (None when raw)
    cdef object c_write             # client.write
    cdef int cfd                    # raw: the client socket (-1: none, or a transport)
    cdef bint raw                   # the client socket is ours, not a transport's
    cdef int ufd                    # the upstream socket (-1: none)
    cdef Target attempt             # the connect attempt in progress
    cdef list tried                 # targets that failed
    cdef int attempts
    cdef double deadline            # of the attempt in progress, or of lingering
    cdef UpstreamState ustate       # the connected upstream's shared state
    cdef Direction c2u              # client -> upstream
    cdef Direction u2c              # upstream -> client
    cdef Py_ssize_t early           # client bytes held in c2u's buffer before connecting
    cdef double started
    cdef double ended
    cdef double last_active
    cdef readonly object peername
    cdef int state                  # C_*: the connection as a whole
    cdef int up_state               # UP_*: the upstream socket
    cdef int end_code
    cdef bint client_open           # the client side is open
    cdef bint c_reading             # the client is being read (its transport resumed)
    cdef bint c_early_full          # connecting, and the held bytes fill the buffer
    cdef bint deferred              # in the engine's ready list
    cdef bint admitted              # holds one count of cfg.limit (released when finished)

    cdef bint _admit(self)
    cdef _client_bytes(self, Py_ssize_t nbytes)
    cdef _client_lost(self, bint error)
    cdef _next_attempt(self)
    cdef int _start_attempt(self, Target t) except -1
    cdef _connected(self)
    cdef Target _drop_attempt(self, int up)
    cdef _attempt_failed(self, object exc)
    cdef _count_failure(self, Target t, object exc)
    cdef _no_upstream(self)
    cdef double _deadline(self)
    cdef _timed_out(self, double now)
    cdef _crashed(self, object exc)
    cdef _upstream_event(self, uint32_t events)
    cdef _client_event(self, uint32_t events)
    cdef int _src(self, Direction d) noexcept
    cdef int _dst(self, Direction d) noexcept
    cdef _failed(self, bint client_side, int err)
    cdef _socket_event(self, Direction src_of, Direction dst_of, uint32_t events)
    cdef bint _may_read(self, Direction d) noexcept
    cdef _new_buf(self, Direction d, Py_ssize_t size)
    cdef _read(self, Direction d)
    cdef bint _read_ended(self, Direction d, ssize_t r)
    cdef _send(self, Direction d, Py_ssize_t start, Py_ssize_t n, bint from_read)
    cdef _flush(self, Direction d)
    cdef _drained(self, Direction d)
    cdef _shut_dst(self, Direction d)
    cdef _src_eof(self, Direction d)
    cdef bint _splice(self, Direction d)
    cdef _close_pipes(self)
    cdef _to_client(self, Py_ssize_t n)
    cdef _hold(self, object data)
    cdef _sync_client_reading(self)
    cdef _run_deferred(self)
    cdef _upstream_error(self, int err)
    cdef int _start_raw(self, _Engine engine, int fd, sockaddr_storage *addr,
                        socklen_t alen) except -1
    cdef _c_write_eof(self)
    cdef _c_close(self, bint hard)
    cdef _c_gone(self, bint error)
    cdef _closing(self)
    cdef _set_end(self, int code)
    cdef _close_fd(self)
    cdef _close_upstream(self, bint hard)
    cdef _upstream_closed(self)
    cdef _shut(self, int code, bint hard)
    cdef _finish(self)
