# Types for _core_machine.py (Cython's pure-Python mode: this file augments
# the .py when Cython compiles it into hotproxy._core_machine).  The
# compiled core cimports what is declared here.

cimport cython

cdef int D_HOLD, D_HOLD_EOF, D_OPEN, D_BLOCKED, D_EOF_PEND, D_SHUT, D_CLOSING, D_CLOSED
cdef int N_STATES, N_EVENTS
cdef int EV_READ, EV_FULL, EV_DRAINED, EV_EOF, EV_CONNECTED, EV_CLOSE, EV_ERROR
cdef int ACT_NONE, ACT_SHUT, ACT_CLOSE, ACT_ABORT
cdef int M_COPY, M_BULK, M_SPLICE

cdef unsigned char _TABLE[56]   # N_STATES * N_EVENTS

cpdef tuple transition(int state, int event)
cpdef bint eof_seen(int state) noexcept
cpdef bint may_read(int state) noexcept


@cython.final
cdef class Direction:
    cdef public int state
    cdef public int mode
    cdef public bint readable
    cdef public bint rdhup
    cdef public Py_ssize_t pend_off
    cdef public Py_ssize_t pend_end
    cdef public Py_ssize_t size
    cdef public Py_ssize_t next
    cdef public long long nbytes
    cdef public bytearray buf
    cdef public object mv
    cdef public int pipe_r
    cdef public int pipe_w

    @cython.locals(t=int)
    cpdef int step(self, int event) noexcept
    @cython.locals(state=int)
    cpdef bint eof(self) noexcept


@cython.final
cdef class TimerWheel:
    cdef readonly double resolution
    cdef dict _buckets
    cdef list _ticks
    cdef dict _where

    @cython.locals(tick="long long")
    cdef long long _tick_of(self, double at)
    @cython.locals(tick="long long", bucket=dict)
    cpdef double arm(self, object obj, double at) except? -1.0
    @cython.locals(bucket=dict)
    cpdef discard(self, object obj)
    @cython.locals(due=list, ticks=list, limit="long long", bucket=dict)
    cpdef list expire(self, double now)
    @cython.locals(ticks=list, bucket=dict)
    cpdef double next_at(self)


# -- a site's slot, connection sets and acceptor -------------------------------------------

@cython.final
cdef class Slot:
    cdef object _current
    cpdef object swap(self, object new)


cdef class Counter:
    cdef bint _acquire(self, long long limit) noexcept
    cdef void _release(self) noexcept


@cython.final
cdef class ConnectionSet:
    cdef set _conns
    cdef public ConnectionSet parent
    cdef readonly Counter limit
    cdef list _waiters
    cpdef add(self, object conn)
    cpdef discard(self, object conn)
    cdef _wake(self)


@cython.final
cdef class Acceptor:
    cdef readonly Slot slot
    cdef readonly ConnectionSet conns
    cdef readonly str name
    cdef readonly unsigned long long errors
    cdef double _logged_at


# -- what a service version shares with its connections ---------------------------------

cdef int C_NEW, C_HEADER, C_CONNECTING, C_OPEN, C_LINGERING, C_CLOSING, C_FINISHED, C_SNIFF
cdef int UP_NONE, UP_CONNECTING, UP_OPEN, UP_CLOSED
cdef int END_NONE, END_EOF, END_CLIENT_ERROR, END_UPSTREAM_ERROR, END_IDLE, END_ABORTED
cdef int END_NO_UPSTREAM, END_CLOSED, END_BAD_HEADER, END_BAD_HELLO, END_NO_ROUTE
cdef double LINGER


@cython.final
cdef class Histogram:
    cdef readonly tuple bounds
    cdef readonly int n
    cdef double[::1] _b
    cdef long long[::1] _counts
    cdef readonly long long count
    cdef readonly double sum

    @cython.locals(i=int, n=int)
    cpdef observe(self, double value)


@cython.final
cdef class ProxyCounters:
    cdef public long long accepted
    cdef public long long active
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public long long connect_failures
    cdef public long long refused
    cdef public long long idle_closed
    cdef public long long no_upstream
    cdef public long long proxy_header_errors
    cdef public long long sni_errors
    cdef public long long sni_no_route
    cdef readonly Histogram durations


@cython.final
cdef class UpstreamState:
    cdef readonly str address
    cdef public long long active
    cdef public long long fails
    cdef public double ejected_until
    cdef public long long connections
    cdef public long long failures
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public long long ejections
    cdef readonly Histogram connect_times


@cython.final
cdef class Target:
    cdef readonly UpstreamState state
    cdef readonly object up
    cdef readonly int family
    cdef readonly bytes sockaddr
    cdef readonly object address
    cdef readonly Counter limit             # the upstream's instance count (None: none)
    cdef readonly long long max_connections


@cython.final
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
    cdef readonly Counter limit            # the core's SharedCounter
    cdef readonly object on_refuse
    cdef readonly int send_proxy            # PROXY protocol version to send (0: off)
    cdef readonly bint accept_proxy
    cdef readonly tuple proxy_from          # proxy_networks()
    cdef readonly double proxy_timeout
    cdef readonly object on_header_error
    cdef readonly bint proxy                # send_proxy, accept_proxy or sni
    cdef readonly bint sni                  # route by the TLS ClientHello's server name
    cdef readonly double sni_timeout
    cdef readonly object on_sni_error


# -- the relay of one proxied connection (each core's Connection adds the system calls)

cdef class Relay:
    cdef readonly RelayConfig cfg
    cdef ProxyCounters counters
    cdef object conns
    cdef object owner               # the service version, alive while we are
    cdef object client              # the client's transport (None when raw)
    cdef object c_write             # client.write
    cdef int cfd                    # raw: the client socket (-1: none, or a transport)
    cdef int ufd                    # the upstream socket (-1: none)
    cdef bint raw                   # the client socket is ours, not a transport's
    cdef Target attempt             # the connect attempt in progress
    cdef list tried                 # targets that failed
    cdef int attempts
    cdef double deadline            # of the attempt in progress, or of lingering
    cdef double attempt_at          # when the attempt in progress started
    cdef readonly double connect_time   # how long the upstream took to connect
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
    cdef bint admitted              # holds one count of cfg.limit (released when finished)
    cdef bint deferred              # in the engine's ready list
    cdef Counter ulimit             # the upstream's limit we hold one count of (None: none)
    cdef object local               # PROXY protocol: the address the client connected to
    cdef Py_ssize_t hdr_out         # send_proxy: the header's bytes at the start of the held ones
    cdef readonly object server_name    # sni: the name the ClientHello asked for ("": none; None: not read)
    cdef public object route        # sni: the connector's route for server_name

    cdef bint _admit(self) except -1
    cdef _client_bytes(self, Py_ssize_t nbytes)
    cdef _client_lost(self, bint error)
    @cython.locals(cfg=RelayConfig, t=Target, err=int)
    cdef _next_attempt(self)
    @cython.locals(now=double)
    cdef _attempting(self, Target t, bint connected)
    @cython.locals(t=Target, st=UpstreamState, n=Py_ssize_t)
    cdef _connected(self)
    @cython.locals(t=Target)
    cdef Target _drop_attempt(self, int up)
    cdef _release_upstream(self)
    cdef _attempt_failed(self, object exc)
    cdef _count_failure(self, Target t, object exc)
    cdef _no_upstream(self)
    cdef double _deadline(self) noexcept
    @cython.locals(at=double)
    cdef _timed_out(self, double now)
    cdef _crashed(self, object exc)
    cdef bint _may_read(self, Direction d) noexcept
    @cython.locals(act=int)
    cdef _drained(self, Direction d)
    cdef _shut_dst(self, Direction d)
    @cython.locals(other=Direction, act=int)
    cdef _src_eof(self, Direction d)
    @cython.locals(size=Py_ssize_t)
    cdef _to_client(self, Py_ssize_t n)
    @cython.locals(n=Py_ssize_t, need=Py_ssize_t)
    cdef _hold(self, object data)
    @cython.locals(want=bint)
    cdef _sync_client_reading(self)
    cdef _run_deferred(self)
    cdef _upstream_error(self, int err)
    cdef _failed(self, bint client_side, int err)
    cdef _started_raw(self, object peer)
    @cython.locals(cfg=RelayConfig)
    cdef _begin(self)
    cdef _proxy_start(self)
    @cython.locals(n=Py_ssize_t, used=Py_ssize_t, rest=Py_ssize_t)
    cdef _header_bytes(self)
    @cython.locals(need=Py_ssize_t, hdr=bytes, held=bytes)
    cdef _proxy_out(self)
    cdef _header_failed(self, str reason)
    cdef _header_done(self)
    @cython.locals(n=Py_ssize_t, held=bytes)
    cdef _sni_start(self)
    cdef _sni_bytes(self)
    cdef _sni_failed(self, str reason, int code)
    cdef _c_write_eof(self)
    cdef _c_close(self, bint hard)
    cdef _c_gone(self, bint error)
    cdef _closing(self)
    cdef _set_end(self, int code)
    cdef _close_upstream(self, bint hard)
    cdef _upstream_closed(self)
    cdef _shut(self, int code, bint hard)
    @cython.locals(d=Direction)
    cdef _finish(self)

    # what each core's Connection provides
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


# -- an engine's timers and ready list ------------------------------------------------

cdef double TICK


cdef class EngineBase:
    cdef readonly object loop
    cdef list ready                 # connections with bytes left to read
    cdef TimerWheel wheel           # the connections' deadlines
    cdef object timer
    cdef double timer_at
    cdef unsigned long long ticks   # timer runs
    cdef unsigned long long checked # connections the timer runs took out of the wheel

    cdef defer(self, Relay conn)
    @cython.locals(ready=list, conn=Relay)
    cdef _ready_batch(self)
    cdef arm(self, Relay conn, double at)
    @cython.locals(at=double)
    cdef rearm(self, Relay conn)
    @cython.locals(now=double)
    cdef want_tick(self, double when)
    @cython.locals(now=double, at=double, due=list, conn=Relay)
    cdef _expire(self)
    cdef double _clock(self) noexcept
    cdef _after_batch(self)
