# -- the proxy's data path ----------------------------------------------------
#
# One proxied connection is one ``Connection``: the asyncio protocol of the
# accepted client socket, and the owner of the upstream socket, which it
# drives itself -- a non-blocking connect() and raw send()/recv() on a file
# descriptor registered, edge-triggered, in the loop's ``_Engine`` (one epoll
# instance per event loop, itself watched by the loop).  The upstream side
# therefore costs no transport, no coroutine, no Task, no future and no
# timer handle; its bytes never become Python objects.
#
# Lifecycle:  accepted -> connecting (client bytes held, bounded) -> open
# (relaying both ways) -> closing -> finished.  It is finished, exactly
# once, when the client transport is gone *and* the upstream socket is
# closed or was never made; finishing releases every count it took.
#
# Flow control: bytes from the client are sent to the upstream at once;
# what the upstream cannot take stays in the client buffer (``c_pend_*``)
# and the client is paused until EPOLLOUT lets it drain.  Bytes from the
# upstream are read only while the client transport is below its high-water
# mark (``u_paused_by_c``); ``u_readable`` remembers that the socket may
# still hold data, since an edge-triggered socket reports it only once.
#
# Timeouts (connect and idle) are checked by one timer per engine, armed
# for the earliest deadline and at most every ``_TICK`` seconds.



cdef enum:
    UP_NONE = 0         # no connect attempt in progress (not started yet)
    UP_CONNECTING = 1   # an attempt is in progress (``attempt``)
    UP_OPEN = 2         # connected: relaying
    UP_CLOSED = 3       # the upstream socket is closed, or none could be made

cdef enum:
    END_NONE = 0
    END_EOF = 1             # both directions finished with an EOF
    END_CLIENT_ERROR = 2    # the client's socket failed (reset, ...)
    END_UPSTREAM_ERROR = 3  # the upstream's socket failed
    END_IDLE = 4            # no traffic for idle_timeout
    END_ABORTED = 5         # abort(): drain timeout or shutdown
    END_NO_UPSTREAM = 6     # every connect attempt failed
    END_CLOSED = 7          # closed otherwise

_END_NAMES = ("open", "eof", "client_error", "upstream_error", "idle", "aborted",
              "no_upstream", "closed")

# the engine's timer never fires more often than this (seconds)
cdef double _TICK = 0.05
# seconds a client that got no upstream has to send its EOF before it is closed
cdef double _LINGER = 2.0

cdef enum:
    # upstream reads in one go before a busy connection lets the others run
    _READS_PER_EVENT = 16

# move bulk transfers of raw connections with splice(2) (HOTPROXY_SPLICE=0: never)
cdef bint _SPLICE = _os.environ.get("HOTPROXY_SPLICE", "1") not in ("", "0")
cdef unsigned int _SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK


cdef int _open_pipe(int *r, int *w, Py_ssize_t size) noexcept nogil:
    cdef int fds[2]
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        return -1
    fcntl(fds[1], F_SETPIPE_SZ, <int>size)   # best effort: the default is 64 KiB
    r[0] = fds[0]
    w[0] = fds[1]
    return 0


cdef ssize_t _drain_pipe(int pr, int dst, Py_ssize_t n) noexcept nogil:
    # Move up to n bytes from the pipe to dst: bytes moved, 0 if dst is full,
    # or -errno.
    cdef ssize_t r
    while True:
        r = splice(pr, NULL, dst, NULL, n, _SPLICE_FLAGS)
        if r >= 0:
            return r
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            return 0
        return -errno


cdef object _sockaddr_to_py(sockaddr_storage *ss, socklen_t alen):
    # what socket.getpeername() returns for this address
    cdef char host[64]
    cdef sockaddr_in *a4
    cdef sockaddr_in6 *a6
    cdef sockaddr_un *au
    cdef Py_ssize_t n
    if ss.ss_family == AF_INET:
        a4 = <sockaddr_in*>ss
        inet_ntop(AF_INET, &a4.sin_addr, host, sizeof(host))
        return (host.decode("ascii"), ntohs(a4.sin_port))
    if ss.ss_family == AF_INET6:
        a6 = <sockaddr_in6*>ss
        inet_ntop(AF_INET6, &a6.sin6_addr, host, sizeof(host))
        return (host.decode("ascii"), ntohs(a6.sin6_port), ntohl(a6.sin6_flowinfo),
                a6.sin6_scope_id)
    if ss.ss_family == AF_UNIX:
        au = <sockaddr_un*>ss
        n = <Py_ssize_t>alen - 2   # minus sun_family
        if n <= 0:
            return ""
        if au.sun_path[0] == 0:
            return au.sun_path[:n]   # abstract: bytes
        return _os.fsdecode(au.sun_path[:strnlen(au.sun_path, n)])
    return None


cdef _set_keepalive(object transport):
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (_socket.AF_INET, _socket.AF_INET6):
        return
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


@cython.final
cdef class ProxyCounters:
    """A proxy's service counters, shared by every version of the service."""

    def as_dict(self):
        """The counters as a plain dict."""
        return {
            "accepted": self.accepted, "active": self.active,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "connect_failures": self.connect_failures, "refused": self.refused,
            "idle_closed": self.idle_closed, "no_upstream": self.no_upstream,
        }

    def __repr__(self):
        return f"<ProxyCounters {self.as_dict()!r}>"


@cython.final
cdef class UpstreamState:
    """One upstream address's live state, shared by every service version.

    ``active`` counts connections to it (attempts included), ``fails`` its
    consecutive connect failures, ``ejected_until`` the ``time.monotonic()``
    before which it gets no new connections.
    """

    def __cinit__(self, str address not None):
        self.address = address

    def __repr__(self):
        return (f"<UpstreamState {self.address} active={self.active} fails={self.fails} "
                f"ejected_until={self.ejected_until:.3f}>")


@cython.final
cdef class Target:
    """An upstream of one service version: its shared state and where to connect.

    *sockaddr* is the raw ``struct sockaddr`` for *family* (what this core
    passes to ``connect(2)``); *address* is the same address as the socket
    module writes it (what the pure-Python core uses); *up* is the caller's
    own description of the upstream.
    """

    def __cinit__(self, UpstreamState state not None, object up, int family,
                  bytes sockaddr not None, object address):
        if len(sockaddr) < 2:
            raise ValueError("sockaddr: too short")
        self.state = state
        self.up = up
        self.family = family
        self.sockaddr = sockaddr
        self.address = address

    def __repr__(self):
        return f"<Target {self.state.address}>"


@cython.final
cdef class RelayConfig:
    """What every connection of one service version shares.

    ``targets`` are the upstreams.  With one target it is the only
    candidate; with more, ``connector.pick(conn, tried)`` chooses (or
    returns None: give up).  ``connector.failed(target, exc)`` is told of
    every failed attempt and ``connector.succeeded(target)`` of a success
    after failures.  A connect gets ``attempts`` tries of
    ``connect_timeout`` seconds each.  ``on_close(conn)``, if given, is
    called once when a connection is finished (the access log).

    Every connection takes one count of ``limit`` (a ``SharedCounter``: the
    service's open connections over the whole instance; None: a private
    one) when it starts, and gives it back when it is finished.  It is
    refused -- closed at once, counted in ``refused``, ``on_refuse(peername)``
    told if given -- when ``max_connections`` (0: no limit) are counted
    already.
    """

    def __cinit__(self, ProxyCounters counters not None, double idle_timeout=0.0,
                  bint keepalive=False, object connector=None, object on_close=None,
                  bint want_peername=False, Py_ssize_t buffer_size=16384,
                  Py_ssize_t max_buffer_size=262144, tuple targets=(),
                  double connect_timeout=2.0, int attempts=1, long long max_connections=0,
                  object on_refuse=None, SharedCounter limit=None):
        if buffer_size < 1 or max_buffer_size < buffer_size:
            raise ValueError("need 1 <= buffer_size <= max_buffer_size")
        if attempts < 1 or not connect_timeout > 0:
            raise ValueError("need attempts >= 1 and connect_timeout > 0")
        for t in targets:
            if not isinstance(t, Target):
                raise TypeError(f"targets: expected Target, got {type(t).__name__}")
        if len(targets) > 1 and connector is None:
            raise ValueError("more than one target needs a connector to pick")
        if max_connections < 0:
            raise ValueError("need max_connections >= 0 (0: no limit)")
        self.counters = counters
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.connector = connector
        self.on_close = on_close
        self.want_peername = want_peername
        self.buffer_size = buffer_size
        self.max_buffer_size = max_buffer_size
        self.targets = targets
        self.single = targets[0] if len(targets) == 1 else None
        self.connect_timeout = connect_timeout
        self.attempts = attempts
        self.max_connections = max_connections
        self.limit = limit if limit is not None else private_counter()
        self.on_refuse = on_refuse


@cython.final
cdef class Connection:
    """One proxied connection: the protocol of the accepted client socket and
    the owner of its upstream socket.

    It is counted (accepted, active, one count of ``cfg.limit``) when it
    starts -- ``connection_made``, or the core's accept -- unless the limit
    is reached: then it is refused and closed at once.  *owner* (the service
    version that accepted it) is kept alive until the connection finishes.
    The upstream is connected as soon as the client is, trying the config's
    targets.
    """

    def __cinit__(self, RelayConfig cfg not None, object conns, object owner=None):
        self.cfg = cfg
        self.counters = cfg.counters
        self.conns = conns
        self.owner = owner
        self.ufd = -1
        self.cfd = -1
        self.cp_r = self.cp_w = self.up_r = self.up_w = -1
        self.c_next = cfg.buffer_size
        self.u_next = cfg.buffer_size
        self.started = _now()
        self.last_active = self.started

    cdef bint _admit(self):
        # Count this connection in the instance's count, unless it is full:
        # one atomic compare-and-swap, so a burst of accepts in every worker
        # at once admits exactly max_connections.
        cdef RelayConfig cfg = self.cfg
        if not cfg.limit._acquire(cfg.max_connections):
            self.counters.refused += 1
            self._finished = self.closing = True
            self.owner = None
            # a layer above may have counted it in its own set already
            self.conns.discard(self)
            return False
        self.admitted = True
        self.counters.accepted += 1
        self.counters.active += 1
        return True

    # -- the client transport's callbacks --------------------------------------

    def connection_made(self, transport):
        cdef RelayConfig cfg = self.cfg
        if not self._admit():
            if cfg.on_refuse is not None:
                cfg.on_refuse(transport.get_extra_info("peername"))
            transport.abort()
            return
        self.client = transport
        self.c_write = transport.write
        self.client_open = True
        # uvloop starts reading right after this returns even if we paused
        # here, so early bytes are held in c_buf (bounded) instead.
        self.c_reading = True
        self.conns.add(self)
        if cfg.want_peername:
            self.peername = transport.get_extra_info("peername")
        if cfg.keepalive:
            _set_keepalive(transport)
        self.engine = _get_engine()
        self.engine.link(self)
        if cfg.idle_timeout > 0:
            self.engine.want_tick(self.started + cfg.idle_timeout)
        self._next_attempt()

    def get_buffer(self, Py_ssize_t sizehint):
        if self.c_buf is None or (self.c_size < self.c_next and not self.early
                                  and self.c_pend_end == 0):
            self._new_c_buf(self.c_next)
        if self.early:
            return self.c_mv[self.early:]
        return self.c_buf

    def buffer_updated(self, Py_ssize_t nbytes):
        self._client_bytes(nbytes)

    cdef _client_bytes(self, Py_ssize_t nbytes):
        # nbytes more client bytes in c_buf (at 0, or after the early ones)
        self.last_active = _now()
        if self.up_state == UP_OPEN:
            if not self.closing:
                self._to_upstream(0, nbytes, True)
        elif self.up_state != UP_CLOSED:
            self.early += nbytes
            if self.early >= self.c_size:
                self.c_early_full = True
                self._sync_client_reading()

    def data_received(self, data):
        # Loops that do not use get_buffer() (asyncio's own, for an object
        # that is not an asyncio.BufferedProtocol) deliver bytes here.
        cdef Py_ssize_t n = len(data)
        self.last_active = _now()
        if self.up_state == UP_OPEN:
            if not self.closing:
                if self.c_buf is None or self.c_size < n:
                    self._new_c_buf(max(n, self.cfg.buffer_size))
                self.c_buf[:n] = data
                self._to_upstream(0, n, False)
        elif self.up_state != UP_CLOSED:
            self._hold(data)

    def eof_received(self):
        self._client_eof()
        return True   # keep the other direction open: a half-close

    cdef _client_eof(self):
        self.c_eof = True
        self.c_reading = False   # a transport stops reading by itself
        if self.lingering:
            self.lingering = False
            self._c_close(False)
            return
        if self.up_state == UP_OPEN and not self.closing:
            if self.u_eof:
                self._shut(END_EOF, False)   # both done: close, no shutdown() first
            elif self.c_pend_end == 0:
                self._shutdown_upstream()

    def pause_writing(self):
        # the client reads slower than the upstream sends
        self.u_paused_by_c = True

    def resume_writing(self):
        self.u_paused_by_c = False
        if self.u_readable:
            self._read_upstream()

    def connection_lost(self, exc):
        self._client_lost(exc is not None)

    cdef _client_lost(self, bint error):
        # the client's side is closed (by us, by the peer, or it failed)
        self.client_open = False
        self.c_reading = False
        self._set_end(END_CLIENT_ERROR if error else END_CLOSED)
        if self.up_state == UP_OPEN:
            self.closing = True
            self._close_upstream(error)
        elif self.up_state == UP_CONNECTING:
            # the client left while we connected: no failure to count
            self.closing = True
            self._drop_attempt(UP_CLOSED)
            self._finish()
        else:
            self.up_state = UP_CLOSED
            self._finish()

    def abort(self):
        """Close both sides at once (a drain timed out)."""
        self._shut(END_ABORTED, True)

    # -- read-only views (status, access log, tests) ---------------------------

    @property
    def upstream(self):
        """The connected upstream's UpstreamState (None if none was reached)."""
        return self.ustate

    @property
    def client_transport(self):
        """The client's transport (None once finished)."""
        return self.client

    @property
    def client_fileno(self):
        """The client socket's file descriptor when the core accepted it
        (-1 for a connection served through a transport, or once closed)."""
        return self.cfd

    @property
    def upstream_fileno(self):
        """The upstream socket's file descriptor (-1 when there is none)."""
        return self.ufd

    @property
    def bytes_in(self):
        """Bytes relayed from the client to the upstream."""
        return self.c2u

    @property
    def bytes_out(self):
        """Bytes relayed from the upstream to the client."""
        return self.u2c

    @property
    def spliced(self):
        """Which directions moved bulk with splice(2): "", "in" (client to
        upstream), "out" (upstream to client) or "both"."""
        return ("", "in", "out", "both")[self.c_spliced + 2 * self.u_spliced]

    @property
    def held(self):
        """Client bytes held while the upstream connects."""
        return self.early

    @property
    def duration(self):
        """Seconds from accept to finish (or until now)."""
        return (self.ended if self._finished else _now()) - self.started

    @property
    def end(self):
        """How it ended: eof, client_error, upstream_error, idle, aborted,
        no_upstream, closed -- or "open"."""
        return _END_NAMES[self.end_code]

    @property
    def closed(self):
        """True once the client connection is gone."""
        return self._finished or ((self.client is not None or self.raw) and not self.client_open)

    @property
    def finished(self):
        """True once both sides are gone and every count is released."""
        return self._finished

    @property
    def buffered(self):
        """Bytes this connection holds in memory: its read buffers and the
        client transport's write buffer (for tests of back-pressure)."""
        cdef Py_ssize_t n = self.c_size + self.u_size
        if self.client is not None and self.client_open:
            n += self.client.get_write_buffer_size()
        return n

    def __repr__(self):
        return (f"<Connection {self.peername!r} up={self.ustate.address if self.ustate else None} "
                f"in={self.c2u} out={self.u2c} {self.end}>")

    # -- connecting --------------------------------------------------------------

    cdef _next_attempt(self):
        # Try targets until one connects or is in progress, or give up.
        cdef RelayConfig cfg = self.cfg
        cdef Target t
        cdef int err
        while True:
            if self.attempts >= cfg.attempts:
                self._no_upstream()
                return
            if cfg.single is not None:
                t = cfg.single if self.tried is None else None
            elif cfg.connector is not None:
                t = cfg.connector.pick(self, self.tried if self.tried is not None else ())
            else:
                t = None   # no upstream at all
            if t is None:
                self._no_upstream()
                return
            self.attempts += 1
            err = self._start_attempt(t)
            if err == 0:
                return
            # failed at once (refused by a Unix socket, out of descriptors, ...)
            self._count_failure(t, _oserror(err))

    cdef int _start_attempt(self, Target t) except -1:
        cdef int fd, r, err, one = 1
        cdef const char *sa = t.sockaddr
        fd = socket(t.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            return errno
        if t.family != AF_UNIX:
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            if self.cfg.keepalive:
                setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
        r = connect(fd, <const sockaddr*>sa, <socklen_t>len(t.sockaddr))
        if r < 0 and errno != EINPROGRESS:
            err = errno
            _close(fd)
            return err
        err = self.engine.register(self, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                    _TAG_UPSTREAM)
        if err:
            _close(fd)
            return err
        self.ufd = fd
        self.attempt = t
        t.state.active += 1
        self.up_state = UP_CONNECTING
        if r == 0:
            self._connected()
        else:
            self.deadline = _now() + self.cfg.connect_timeout
            self.engine.want_tick(self.deadline)
        return 0

    cdef _connected(self):
        cdef Target t = self.attempt
        cdef UpstreamState st = t.state
        self.attempt = None
        self.deadline = 0.0
        self.ustate = st
        self.up_state = UP_OPEN
        st.connections += 1
        if (st.fails or st.ejected_until > 0) and self.cfg.connector is not None:
            self.cfg.connector.succeeded(t)
        if self.early:
            n = self.early
            self.early = 0
            self.c_early_full = False
            self._to_upstream(0, n, False)
        if self.c_eof and self.c_pend_end == 0 and self.up_state == UP_OPEN:
            self._shutdown_upstream()
        self._sync_client_reading()

    cdef Target _drop_attempt(self, int state):
        # Close the attempt in progress and release its count (no failure is
        # counted here); the upstream side goes to *state*.
        cdef Target t = self.attempt
        self._close_fd()
        t.state.active -= 1
        self.attempt = None
        self.deadline = 0.0
        self.up_state = state
        return t

    cdef _attempt_failed(self, object exc):
        # The attempt in progress failed: release and count it, then try the
        # next target if the client is still there.
        self._count_failure(self._drop_attempt(UP_NONE), exc)
        if self.client_open and not self.closing:
            self._next_attempt()
        else:
            self.up_state = UP_CLOSED
            self._finish()

    cdef _count_failure(self, Target t, object exc):
        if self.tried is None:
            self.tried = []
        self.tried.append(t)
        if self.cfg.connector is not None:
            self.cfg.connector.failed(t, exc)
        else:
            self.counters.connect_failures += 1

    cdef _no_upstream(self):
        # No upstream could be reached: send the client our EOF and close
        # once it has sent its own (or after _LINGER seconds), reading and
        # dropping what it still sends -- closing a socket with unread bytes
        # would reset the connection instead of ending it.
        self.up_state = UP_CLOSED
        self.counters.no_upstream += 1
        self._set_end(END_NO_UPSTREAM)
        self.early = 0
        self.c_early_full = False
        if not self.client_open:
            self._finish()
            return
        self.closing = True
        if self.c_eof:
            self._c_close(False)
            return
        self.lingering = True
        self.deadline = _now() + _LINGER
        self.engine.want_tick(self.deadline)
        self._c_write_eof()
        self._sync_client_reading()

    # -- the engine's calls ------------------------------------------------------

    cdef double _deadline(self):
        if self.up_state == UP_CONNECTING or self.lingering:
            return self.deadline
        if self.cfg.idle_timeout > 0 and not self._finished:
            # closing too: a client that never reads what is left for it
            return self.last_active + self.cfg.idle_timeout
        return 0.0

    cdef _timed_out(self, double now):
        cdef double at = self._deadline()
        if at == 0.0 or now < at:
            return
        if self.lingering:
            self.lingering = False
            if self.client_open:
                self._c_close(False)
        elif self.up_state == UP_CONNECTING:
            self._attempt_failed(TimeoutError())
        else:
            self.counters.idle_closed += 1
            self._shut(END_IDLE, True)

    cdef _crashed(self, object exc):
        # a bug in the relay or a callback: this connection only
        _log.error("proxy connection failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        self._set_end(END_ABORTED)
        if not self._finished:
            self._shut(END_ABORTED, True)

    cdef _upstream_event(self, uint32_t events):
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if self.ufd < 0:
            return   # closed earlier in this batch
        if self.up_state == UP_CONNECTING:
            if events & (EPOLLERR | EPOLLHUP):
                # a failed connect reports ERR (and HUP): SO_ERROR says why
                getsockopt(self.ufd, SOL_SOCKET, SO_ERROR, &err, &elen)
                self._attempt_failed(_oserror(err if err else ECONNREFUSED))
                return
            if not events & EPOLLOUT:
                return
            self._connected()   # writable, no error: connected
        if self.up_state != UP_OPEN:
            return
        if events & EPOLLERR:
            getsockopt(self.ufd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err:
                self._upstream_error(err)
                return
        if events & EPOLLOUT and self.c_pend_end:
            self._flush_upstream()
        if self.ufd >= 0 and events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            if events & (EPOLLRDHUP | EPOLLHUP):
                self.u_rdhup = True
            self.u_readable = True
            self._read_upstream()

    # -- relaying ------------------------------------------------------------------

    # Read buffers are not zeroed (bytearray(n) would memset them): every
    # byte relayed from them was first written by recv() or the transport.

    cdef _new_c_buf(self, Py_ssize_t size):
        self.c_buf = PyByteArray_FromStringAndSize(NULL, size)
        if not self.raw:
            self.c_mv = memoryview(self.c_buf)   # for get_buffer()
        self.c_size = size

    cdef _new_u_buf(self, Py_ssize_t size):
        self.u_buf = PyByteArray_FromStringAndSize(NULL, size)
        if not self.raw:
            self.u_mv = memoryview(self.u_buf)   # for the transport's write()
        self.u_size = size

    cdef _to_upstream(self, Py_ssize_t start, Py_ssize_t n, bint from_read):
        # send c_buf[start:start+n]; keep what the upstream cannot take
        cdef ssize_t r
        cdef Py_ssize_t size = self.c_size
        cdef char *p = PyByteArray_AS_STRING(self.c_buf)
        self.c2u += n
        self.counters.bytes_in += n
        if from_read and n == size:
            # a full read: a bulk transfer, read bigger chunks (and at the
            # largest, splice a raw connection's)
            if size < self.cfg.max_buffer_size:
                self.c_next = min(size * 2, self.cfg.max_buffer_size)
            elif self.raw and _SPLICE:
                self.c_splice = True
        while True:
            r = send(self.ufd, p + start, n, MSG_NOSIGNAL)
            if r >= 0:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                r = 0
                break
            self._upstream_error(errno)
            return
        if r == n:
            return
        self.c_pend_off = start + r
        self.c_pend_end = start + n
        self.c_paused_by_up = True
        self._sync_client_reading()

    cdef _flush_upstream(self):
        cdef ssize_t r
        cdef char *p
        if self.cp_r >= 0:
            r = _drain_pipe(self.cp_r, self.ufd, self.c_pend_end - self.c_pend_off)
            if r <= 0:
                if r < 0:
                    self._upstream_error(-r)
                return
            self.c_pend_off += r
            self.last_active = _now()
            if self.c_pend_off < self.c_pend_end:
                return
            self._flushed_upstream()
            return
        p = PyByteArray_AS_STRING(self.c_buf)
        while True:
            r = send(self.ufd, p + self.c_pend_off, self.c_pend_end - self.c_pend_off, MSG_NOSIGNAL)
            if r >= 0:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return
            self._upstream_error(errno)
            return
        self.c_pend_off += r
        self.last_active = _now()
        if self.c_pend_off < self.c_pend_end:
            return
        self._flushed_upstream()

    cdef _flushed_upstream(self):
        # everything the client sent has reached the upstream
        self.c_pend_off = self.c_pend_end = 0
        if self.u_close_pending:
            self._close_upstream(False)
            return
        if self.c_eof:
            self._shutdown_upstream()
        self.c_paused_by_up = False
        self._sync_client_reading()

    cdef _shutdown_upstream(self):
        if not self.u_shut and self.ufd >= 0:
            self.u_shut = True
            shutdown(self.ufd, SHUT_WR)

    cdef _read_upstream(self):
        cdef ssize_t r
        cdef int reads = 0
        while self.u_readable and self.ufd >= 0:
            if self.u_paused_by_c or self.closing or not self.client_open:
                return
            if self.u_splice and not self.u_pend_end:
                self._splice_u2c()
                return
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)   # let the other connections run
                return
            if self.u_buf is None or self.u_size < self.u_next:
                self._new_u_buf(self.u_next)
            r = recv(self.ufd, PyByteArray_AS_STRING(self.u_buf), self.u_size, 0)
            if r > 0:
                reads += 1
                self.last_active = _now()
                if r < self.u_size:
                    # A short read took all there was: more data raises a
                    # new edge, and if the upstream's FIN is already here
                    # (RDHUP), nothing follows it -- the EOF, without the
                    # recv() that would return 0.
                    self.u_readable = False
                    self._to_client(r)
                    if self.u_rdhup and self.ufd >= 0 and not self.u_eof:
                        self._upstream_eof()
                    return
                self._to_client(r)
            elif self._upstream_read_ended(r):
                return

    cdef bint _upstream_read_ended(self, ssize_t r):
        # recv()/splice() from the upstream returned r <= 0: the EOF, nothing
        # more for now, or an error.  False: interrupted, read again.
        if r == 0:
            self.u_readable = False
            self._upstream_eof()
        elif errno == EAGAIN:
            self.u_readable = False
        elif errno == EINTR:
            return False
        else:
            self._upstream_error(errno)
        return True

    cdef _to_client(self, Py_ssize_t n):
        cdef Py_ssize_t size = self.u_size
        cdef ssize_t r
        self.u2c += n
        self.counters.bytes_out += n
        if self.raw:
            # u_buf is ours until sent: what the client cannot take now is
            # kept (u_pend_*) and upstream reads stop until EPOLLOUT.
            if n == size:
                if size < self.cfg.max_buffer_size:
                    self.u_next = min(size * 2, self.cfg.max_buffer_size)
                elif _SPLICE:
                    self.u_splice = True
            while True:
                r = send(self.cfd, PyByteArray_AS_STRING(self.u_buf), n, MSG_NOSIGNAL)
                if r >= 0:
                    break
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    r = 0
                    break
                self._c_gone(True)
                return
            if r < n:
                self.u_pend_off = r
                self.u_pend_end = n
                self.u_paused_by_c = True
            return
        self.c_write(self.u_buf if n == size else self.u_mv[:n])
        if n == size and size < self.cfg.max_buffer_size:
            self.u_next = min(size * 2, self.cfg.max_buffer_size)
            self.u_buf = None
            self.u_size = 0
        elif self.client_open and self.client.get_write_buffer_size():
            # the transport still holds a view of u_buf: take a fresh one
            self.u_buf = None
            self.u_size = 0

    cdef _hold(self, object data):
        # data_received() before the upstream is connected: copy into c_buf,
        # growing it if needed; reading pauses once buffer_size bytes are held.
        cdef Py_ssize_t n = len(data)
        cdef Py_ssize_t need = self.early + n
        if self.c_buf is None or need > self.c_size:
            old, old_n = self.c_buf, self.early
            self._new_c_buf(max(need, self.cfg.buffer_size))
            if old_n:
                self.c_buf[:old_n] = old[:old_n]
        self.c_buf[self.early:need] = data
        self.early = need
        if self.early >= self.cfg.buffer_size:
            self.c_early_full = True
            self._sync_client_reading()

    cdef _sync_client_reading(self):
        cdef bint want = (self.client_open and not self.c_eof and (self.lingering or (
            not self.closing and not self.c_paused_by_up and not self.c_early_full)))
        if want != self.c_reading:
            self.c_reading = want
            if self.raw:
                # an edge-triggered socket does not report bytes that were
                # already there: read them soon (not from inside this call)
                if want and self.c_readable:
                    self.engine.defer(self)
            elif want:
                self.client.resume_reading()
            else:
                self.client.pause_reading()

    cdef _upstream_eof(self):
        self.u_eof = True
        if self.client_open and not self.closing:
            self._c_write_eof()
            if self.c_eof:
                self._shut(END_EOF, False)

    cdef _upstream_error(self, int err):
        # the upstream socket failed (reset, ...): close both sides at once
        self._set_end(END_UPSTREAM_ERROR)
        self._close_upstream(True)
        if self.client_open:
            self._shut(END_CLOSED, True)

    # -- the client socket, when the core accepted it (raw) -------------------------
    #
    # The same relay as with a transport; these stand in for the transport's
    # reads, writes and callbacks.  Writes to the client go straight from
    # u_buf; closing the client socket runs connection_lost's logic at once.

    cdef int _start_raw(self, _Engine engine, int fd, sockaddr_storage *addr,
                        socklen_t alen) except -1:
        # Serve the accepted socket *fd*, which this connection now owns, in
        # *engine* (the listener's: asking asyncio for the running loop
        # costs a getpid() per call).
        cdef RelayConfig cfg = self.cfg
        cdef int one = 1, err
        self.raw = True
        if not self._admit():
            peer = _sockaddr_to_py(addr, alen) if cfg.on_refuse is not None else None
            _close(fd)
            if cfg.on_refuse is not None:
                cfg.on_refuse(peer)
            return 0
        self.engine = engine
        err = engine.register(self, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, _TAG_CLIENT)
        if err:
            _close(fd)
            self._set_end(END_CLIENT_ERROR)
            self.up_state = UP_CLOSED
            self._finish()
            return 0
        self.cfd = fd
        self.client_open = True
        self.c_reading = True
        self.conns.add(self)
        self.engine.link(self)
        if cfg.want_peername:
            self.peername = _sockaddr_to_py(addr, alen)
        if cfg.keepalive and addr.ss_family != AF_UNIX:
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
        if cfg.idle_timeout > 0:
            self.engine.want_tick(self.started + cfg.idle_timeout)
        self._next_attempt()
        return 0

    cdef _client_event(self, uint32_t events):
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if self.cfd < 0:
            return   # closed earlier in this batch
        if events & EPOLLERR:
            getsockopt(self.cfd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err:
                self._c_gone(True)
                return
        if events & EPOLLOUT and self.u_pend_end:
            self._flush_client()
        if self.cfd >= 0 and events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            if events & (EPOLLRDHUP | EPOLLHUP):
                self.c_rdhup = True
            self.c_readable = True
            self._read_client()

    cdef _read_client(self):
        cdef ssize_t r
        cdef Py_ssize_t room
        cdef int reads = 0
        while self.c_readable and self.cfd >= 0 and self.c_reading:
            if self.c_splice and self.up_state == UP_OPEN and not self.early and not self.c_pend_end:
                self._splice_c2u()
                return
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)   # let the other connections run
                return
            if self.c_buf is None or (self.c_size < self.c_next and not self.early
                                      and self.c_pend_end == 0):
                self._new_c_buf(self.c_next)
            room = self.c_size - self.early
            r = recv(self.cfd, PyByteArray_AS_STRING(self.c_buf) + self.early, room, 0)
            if r > 0:
                reads += 1
                self._client_bytes(r)
                if r < room:
                    # all there was (see _read_upstream)
                    self.c_readable = False
                    if self.c_rdhup and self.cfd >= 0 and not self.c_eof:
                        self._client_eof()
                    return
            elif self._client_read_ended(r):
                return

    cdef bint _client_read_ended(self, ssize_t r):
        # the same for the client socket
        if r == 0:
            self.c_readable = False
            if not self.c_eof:
                self._client_eof()
        elif errno == EAGAIN:
            self.c_readable = False
        elif errno == EINTR:
            return False
        else:
            self._c_gone(True)
        return True

    cdef _flush_client(self):
        cdef ssize_t r
        cdef char *p
        if self.up_r >= 0:
            r = _drain_pipe(self.up_r, self.cfd, self.u_pend_end - self.u_pend_off)
            if r <= 0:
                if r < 0:
                    self._c_gone(True)
                return
        else:
            p = PyByteArray_AS_STRING(self.u_buf)
            while True:
                r = send(self.cfd, p + self.u_pend_off, self.u_pend_end - self.u_pend_off,
                         MSG_NOSIGNAL)
                if r >= 0:
                    break
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    return
                self._c_gone(True)
                return
        self.u_pend_off += r
        self.last_active = _now()
        if self.u_pend_off < self.u_pend_end:
            return
        self.u_pend_off = self.u_pend_end = 0
        if self.c_close_pending:
            self._c_gone(False)
            return
        if self.c_eof_pending:
            self.c_eof_pending = False
            shutdown(self.cfd, SHUT_WR)
        self.u_paused_by_c = False
        if self.u_readable:
            self._read_upstream()

    # Bulk: once a direction has filled a max_buffer_size read, its bytes
    # move socket -> pipe -> socket with splice(2) and never reach user
    # space.  What the pipe still holds is the pending count (c_pend_* or
    # u_pend_*), so flow control, half-close and closing work as with a
    # buffer.

    cdef _splice_c2u(self):
        cdef ssize_t r
        cdef int reads = 0
        cdef Py_ssize_t chunk = self.cfg.max_buffer_size
        if self.cp_r < 0:
            if _open_pipe(&self.cp_r, &self.cp_w, chunk) < 0:
                self.c_splice = False   # no descriptors to spare: keep copying
                return
            self.c_spliced = True
            self.c_buf = None           # not needed any more
            self.c_size = 0
        while self.c_readable and self.cfd >= 0 and self.c_reading:
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)
                return
            r = splice(self.cfd, NULL, self.cp_w, NULL, chunk, _SPLICE_FLAGS)
            if r > 0:
                reads += 1
                self.last_active = _now()
                self.c2u += r
                self.counters.bytes_in += r
                self.c_pend_off = 0
                self.c_pend_end = r
                r = _drain_pipe(self.cp_r, self.ufd, r)
                if r < 0:
                    self._upstream_error(-r)
                    return
                self.c_pend_off = r
                if self.c_pend_off < self.c_pend_end:
                    self.c_paused_by_up = True
                    self._sync_client_reading()
                    return
                self.c_pend_off = self.c_pend_end = 0
            elif self._client_read_ended(r):
                return

    cdef _splice_u2c(self):
        cdef ssize_t r
        cdef int reads = 0
        cdef Py_ssize_t chunk = self.cfg.max_buffer_size
        if self.up_r < 0:
            if _open_pipe(&self.up_r, &self.up_w, chunk) < 0:
                self.u_splice = False
                return
            self.u_spliced = True
            self.u_buf = None
            self.u_size = 0
        while self.u_readable and self.ufd >= 0:
            if self.u_paused_by_c or self.closing or not self.client_open:
                return
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)
                return
            r = splice(self.ufd, NULL, self.up_w, NULL, chunk, _SPLICE_FLAGS)
            if r > 0:
                reads += 1
                self.last_active = _now()
                self.u2c += r
                self.counters.bytes_out += r
                self.u_pend_off = 0
                self.u_pend_end = r
                r = _drain_pipe(self.up_r, self.cfd, r)
                if r < 0:
                    self._c_gone(True)
                    return
                self.u_pend_off = r
                if self.u_pend_off < self.u_pend_end:
                    self.u_paused_by_c = True
                    return
                self.u_pend_off = self.u_pend_end = 0
            elif self._upstream_read_ended(r):
                return

    cdef _close_pipes(self):
        if self.cp_r >= 0:
            _close(self.cp_r)
            _close(self.cp_w)
            self.cp_r = self.cp_w = -1
        if self.up_r >= 0:
            _close(self.up_r)
            _close(self.up_w)
            self.up_r = self.up_w = -1

    cdef _run_deferred(self):
        if self.raw and self.c_readable:
            self._read_client()
        if self.u_readable:
            self._read_upstream()

    cdef _c_write_eof(self):
        if not self.raw:
            self.client.write_eof()
        elif self.u_pend_end:
            self.c_eof_pending = True
        elif self.cfd >= 0:
            shutdown(self.cfd, SHUT_WR)

    cdef _c_close(self, bint hard):
        # Close the client side: at once, or once what it has not taken yet
        # is sent.  A transport calls connection_lost later; a raw socket
        # is gone before this returns.
        if not self.raw:
            if hard:
                self.client.abort()
            else:
                self.client.close()
            return
        if not hard and self.u_pend_end and self.cfd >= 0:
            self.c_close_pending = True
            self._sync_client_reading()
            return
        self._c_gone(False)

    cdef _c_gone(self, bint error):
        cdef int fd = self.cfd
        if fd < 0:
            return
        self.cfd = -1
        _close(fd)   # also takes it out of the epoll set
        self.engine.forget(self)
        self.u_pend_off = self.u_pend_end = 0
        self.c_readable = False
        self._client_lost(error)

    # -- closing -------------------------------------------------------------------

    cdef _set_end(self, int code):
        if self.end_code == END_NONE:
            self.end_code = code

    cdef _close_fd(self):
        cdef int fd = self.ufd
        if fd >= 0:
            self.ufd = -1
            _close(fd)   # also takes it out of the epoll set
            self.engine.forget(self)

    cdef _close_upstream(self, bint hard):
        # Close the open upstream side: at once, or once the bytes it has
        # not taken yet are sent.
        if self.up_state != UP_OPEN:
            return
        if not hard and self.c_pend_end and self.ufd >= 0:
            self.u_close_pending = True
            return
        self._close_fd()
        self.up_state = UP_CLOSED
        self.u_readable = False
        if not self.client_open:
            self._finish()

    cdef _shut(self, int code, bint hard):
        # Close both sides: gracefully (flush what is buffered) or at once.
        self._set_end(code)
        if self._finished:
            return
        self.closing = True
        if self.client_open:
            self._c_close(hard)   # raw: may finish the connection right here
        if self.up_state == UP_OPEN:
            self._close_upstream(hard)
        elif self.up_state == UP_CONNECTING:
            self._drop_attempt(UP_CLOSED)
            if not self.client_open:
                self._finish()

    cdef _finish(self):
        if self._finished:
            return
        self._finished = True
        self.closing = True
        self.ended = _now()
        self._close_fd()
        if self.cfd >= 0:
            _close(self.cfd)
            self.cfd = -1
            self.client_open = False
            self.engine.forget(self)
        self._close_pipes()
        if self.engine is not None:
            self.engine.unlink(self)
        if self.admitted:
            self.admitted = False
            self.counters.active -= 1
            self.cfg.limit._release()
        if self.ustate is not None:
            self.ustate.active -= 1
            self.ustate.bytes_in += self.c2u
            self.ustate.bytes_out += self.u2c
        self.attempt = None
        self.tried = None
        self.c_buf = self.u_buf = None
        self.c_mv = self.u_mv = None
        self.c_size = self.u_size = 0
        self.c_write = None
        self.client = None
        self.conns.discard(self)
        if self.cfg.on_close is not None:
            self.cfg.on_close(self)
        self.owner = None   # the last connection of an old version frees it
