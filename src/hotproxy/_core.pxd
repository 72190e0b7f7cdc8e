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

from libc.stdint cimport uint32_t, uint64_t

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        pass
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t addrlen)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    enum:
        AF_UNIX
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        SHUT_WR
        SOL_SOCKET
        SO_ERROR
        SO_KEEPALIVE


cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY



cdef enum:
    _EVENTS = 64   # epoll events taken per epoll_wait()



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


cdef class Connection


cdef class _Engine:
    cdef int epfd
    cdef object loop
    cdef list graveyard             # closed connections an event may still name
    cdef list ready                 # connections with bytes left to read
    cdef Connection head            # every connection of this loop (timeouts)
    cdef object timer
    cdef double timer_at
    cdef epoll_event evs[_EVENTS]

    cdef close(self)
    cdef int register(self, Connection conn, int fd) except -1
    cdef forget(self, Connection conn)
    cdef defer(self, Connection conn)
    cdef link(self, Connection conn)
    cdef unlink(self, Connection conn)
    cdef want_tick(self, double when)


cdef class Connection:
    cdef readonly RelayConfig cfg
    cdef ProxyCounters counters
    cdef object conns
    cdef object owner               # the service version, alive while we are
    cdef _Engine engine
    cdef Connection t_prev          # the engine's list
    cdef Connection t_next
    cdef bint t_linked
    cdef object client              # the client's transport
    cdef object c_write             # client.write
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
    cdef bint u_rdhup               # the upstream sent its EOF: read to the end
    cdef bint u_shut                # our EOF was sent to the upstream
    cdef bint u_close_pending       # close the upstream once c_pend_* is sent
    cdef bint c_paused_by_up
    cdef bint u_paused_by_c
    cdef bint c_early_full
    cdef bint closing
    cdef bint lingering             # no upstream: waiting for the client's EOF
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
    cdef _upstream_event(self, uint32_t events)
    cdef _new_c_buf(self, Py_ssize_t size)
    cdef _new_u_buf(self, Py_ssize_t size)
    cdef _to_upstream(self, Py_ssize_t start, Py_ssize_t n, bint from_read)
    cdef _flush_upstream(self)
    cdef _shutdown_upstream(self)
    cdef _read_upstream(self)
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
