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
    cdef readonly str name
    cdef readonly unsigned long long errors
    cdef double _logged_at


# -- the proxy's data path ----------------------------------------------------

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


cdef class RelayConfig:
    cdef readonly ProxyCounters counters
    cdef readonly double idle_timeout
    cdef readonly bint keepalive
    cdef readonly object connect
    cdef readonly object on_close
    cdef readonly bint want_peername
    cdef readonly Py_ssize_t buffer_size
    cdef readonly Py_ssize_t max_buffer_size


cdef class Connection:
    cdef readonly RelayConfig cfg
    cdef ProxyCounters counters
    cdef object conns
    cdef object owner               # the service version, alive while we are
    cdef object client              # the client's transport
    cdef object upstream_t          # the upstream's transport (once attached)
    cdef object c_write             # client.write
    cdef object u_write             # upstream.write
    cdef UpstreamSide pending       # the connect attempt in progress
    cdef UpstreamSide up_proto      # the attached upstream protocol
    cdef UpstreamState ustate       # the attached upstream's shared state
    cdef bytearray c_buf            # client -> upstream read buffer
    cdef bytearray u_buf            # upstream -> client read buffer
    cdef object c_mv
    cdef object u_mv
    cdef Py_ssize_t c_size
    cdef Py_ssize_t u_size
    cdef Py_ssize_t c_next
    cdef Py_ssize_t u_next
    cdef Py_ssize_t early           # client bytes held in c_buf before attach
    cdef long long c2u
    cdef long long u2c
    cdef double started
    cdef double ended
    cdef double last_active
    cdef object timer
    cdef object connector
    cdef readonly object peername
    cdef int up_state
    cdef int end_code
    cdef bint client_open
    cdef bint c_reading
    cdef bint u_reading
    cdef bint c_eof
    cdef bint u_eof
    cdef bint c_paused_by_up
    cdef bint u_paused_by_c
    cdef bint c_early_full
    cdef bint closing
    cdef bint _finished

    cdef _new_c_buf(self, Py_ssize_t size)
    cdef _new_u_buf(self, Py_ssize_t size)
    cdef _to_upstream(self, Py_ssize_t n)
    cdef _to_client(self, Py_ssize_t n)
    cdef _hold(self, object data)
    cdef _sync_client_reading(self)
    cdef _sync_upstream_reading(self)
    cdef _set_end(self, int code)
    cdef _shut(self, int code, bint hard)
    cdef _attach(self, UpstreamSide up, object transport)
    cdef _upstream_data(self, Py_ssize_t n)
    cdef _upstream_bytes(self, object data)
    cdef _upstream_eof(self)
    cdef _upstream_lost(self, object exc)
    cdef _finish(self)


cdef class UpstreamSide:
    cdef Connection conn
    cdef readonly UpstreamState state
    cdef bint attached
