# The relay: a proxied connection and what its service version shares
# (_core_relay.pxi).

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
    cdef double deadline            # of the attempt in progress
    cdef UpstreamState ustate       # the connected upstream's shared state
    cdef bytearray c_buf            # client -> upstream read buffer
    cdef bytearray u_buf            # upstream -> client read buffer
    cdef object c_mv
    cdef object u_mv
    cdef Py_ssize_t c_size
    cdef Py_ssize_t u_size
    cdef Py_ssize_t c_next
    cdef Py_ssize_t u_next
    cdef Py_ssize_t early           # client bytes held in c_buf before connecting
    cdef Py_ssize_t c_pend_off      # c_buf[c_pend_off:c_pend_end]: not sent yet
    cdef Py_ssize_t c_pend_end
    cdef Py_ssize_t u_pend_off      # raw: u_buf[u_pend_off:u_pend_end] not sent to the client
    cdef Py_ssize_t u_pend_end
    cdef long long c2u
    cdef long long u2c
    cdef double started
    cdef double ended
    cdef double last_active
    cdef readonly object peername
    cdef int up_state
    cdef int end_code
    cdef bint client_open
    cdef bint c_reading
    cdef bint c_eof
    cdef bint u_eof
    cdef bint u_readable            # the upstream socket may hold bytes
    cdef bint c_readable            # raw: the client socket may hold bytes
    cdef bint c_rdhup               # raw: the client sent its EOF: read to the end
    cdef bint c_eof_pending         # raw: send our EOF to the client once u_pend_* is sent
    cdef bint c_close_pending       # raw: close the client once u_pend_* is sent
    cdef bint deferred              # in the engine's ready list
    cdef bint c_splice              # raw: client -> upstream is bulk: move it through a pipe
    cdef bint u_splice              # raw: upstream -> client is bulk
    cdef int cp_r                   # the client -> upstream pipe (-1: none)
    cdef int cp_w
    cdef int up_r                   # the upstream -> client pipe (-1: none)
    cdef int up_w
    cdef bint c_spliced             # the client -> upstream pipe was used
    cdef bint u_spliced
    cdef bint u_rdhup               # the upstream sent its EOF: read to the end
    cdef bint u_shut                # our EOF was sent to the upstream
    cdef bint u_close_pending       # close the upstream once c_pend_* is sent
    cdef bint c_paused_by_up
    cdef bint u_paused_by_c
    cdef bint c_early_full
    cdef bint closing
    cdef bint lingering             # no upstream: waiting for the client's EOF
    cdef bint admitted              # holds one count of cfg.limit (released when finished)
    cdef bint _finished

    cdef _next_attempt(self)
    cdef int _start_attempt(self, Target t) except -1
    cdef _connected(self)
    cdef Target _drop_attempt(self, int state)
    cdef _attempt_failed(self, object exc)
    cdef _count_failure(self, Target t, object exc)
    cdef _no_upstream(self)
    cdef double _deadline(self)
    cdef _timed_out(self, double now)
    cdef _crashed(self, object exc)
    cdef bint _admit(self)
    cdef _upstream_event(self, uint32_t events)
    cdef int _start_raw(self, _Engine engine, int fd, sockaddr_storage *addr,
                        socklen_t alen) except -1
    cdef _client_event(self, uint32_t events)
    cdef _client_bytes(self, Py_ssize_t nbytes)
    cdef _client_eof(self)
    cdef _client_lost(self, bint error)
    cdef _read_client(self)
    cdef _flush_client(self)
    cdef _run_deferred(self)
    cdef _c_write_eof(self)
    cdef _c_close(self, bint hard)
    cdef _c_gone(self, bint error)
    cdef _splice_c2u(self)
    cdef _splice_u2c(self)
    cdef _close_pipes(self)
    cdef _new_c_buf(self, Py_ssize_t size)
    cdef _new_u_buf(self, Py_ssize_t size)
    cdef _to_upstream(self, Py_ssize_t start, Py_ssize_t n, bint from_read)
    cdef _flush_upstream(self)
    cdef _flushed_upstream(self)
    cdef _shutdown_upstream(self)
    cdef _read_upstream(self)
    cdef bint _upstream_read_ended(self, ssize_t r)
    cdef bint _client_read_ended(self, ssize_t r)
    cdef _to_client(self, Py_ssize_t n)
    cdef _hold(self, object data)
    cdef _sync_client_reading(self)
    cdef _upstream_eof(self)
    cdef _upstream_error(self, int err)
    cdef _set_end(self, int code)
    cdef _close_fd(self)
    cdef _close_upstream(self, bint hard)
    cdef _shut(self, int code, bint hard)
    cdef _finish(self)
