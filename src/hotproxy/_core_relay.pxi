# -- the proxy's data path ----------------------------------------------------
#
# One proxied connection is one ``Connection``: the asyncio protocol of the
# accepted client socket (or, accepted by the core, the owner of that
# socket), and the owner of the upstream socket, which it drives itself --
# a non-blocking connect() and raw send()/recv() on a file descriptor
# registered, edge-triggered, in the loop's ``_Engine`` (one epoll instance
# per event loop, itself watched by the loop).  The upstream side therefore
# costs no transport, no coroutine, no Task, no future and no timer handle;
# its bytes never become Python objects.
#
# The connection as a whole (``state``, ``C_*``):  new -> connecting
# (client bytes held, bounded) -> open (relaying both ways) -> closing ->
# finished; or connecting -> lingering (no upstream: the client gets our
# EOF, and is closed once it sends its own) -> closing -> finished.  It is
# finished, exactly once, when the client side is gone *and* the upstream
# socket is closed or was never made; finishing releases every count it
# took.  The upstream socket has its own state (``up_state``, ``UP_*``).
#
# Each way has a ``Direction`` (``c2u``: client to upstream, ``u2c``:
# upstream to client) run by the state machine of ``_core_machine`` (one
# source for both cores): read the source, write the destination; what the
# destination cannot take stays pending (in the buffer, or in the splice
# pipe) and the source is not read until EPOLLOUT lets it drain; the
# source's EOF is passed on once nothing is pending.  ``readable`` remembers
# that a socket may still hold data, since an edge-triggered socket reports
# it only once.  The relay code below is one function per step for both
# directions (``_read``, ``_send``, ``_flush``, ``_splice``, ``_src_eof``).
#
# Timeouts (connect, lingering and idle) are in the engine's timer wheel:
# a connection is armed for its deadline; an idle one that was active
# since is armed again when that deadline comes, so relaying does no timer
# work.


cdef enum:
    C_NEW = 0           # not started (or refused)
    C_CONNECTING = 1    # the upstream is being connected; client bytes are held
    C_OPEN = 2          # relaying
    C_LINGERING = 3     # no upstream: waiting for the client's EOF
    C_CLOSING = 4       # each side closes once its pending bytes are written
    C_FINISHED = 5      # both sides closed, every count released

_CONN_NAMES = ("new", "connecting", "open", "lingering", "closing", "finished")

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
        self.c2u = Direction(D_HOLD, cfg.buffer_size)
        self.u2c = Direction(D_OPEN, cfg.buffer_size)
        self.started = _now()
        self.last_active = self.started

    cdef bint _admit(self):
        # Count this connection in the instance's count, unless it is full:
        # one atomic compare-and-swap, so a burst of accepts in every worker
        # at once admits exactly max_connections.
        cdef RelayConfig cfg = self.cfg
        if not cfg.limit._acquire(cfg.max_connections):
            self.counters.refused += 1
            self.state = C_FINISHED
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
        self.state = C_CONNECTING
        # uvloop starts reading right after this returns even if we paused
        # here, so early bytes are held in the c2u buffer (bounded) instead.
        self.c_reading = True
        self.conns.add(self)
        if cfg.want_peername:
            self.peername = transport.get_extra_info("peername")
        if cfg.keepalive:
            _set_keepalive(transport)
        self.engine = _get_engine()
        self.engine.link(self)
        if cfg.idle_timeout > 0:
            self.engine.arm(self, self.started + cfg.idle_timeout)
        self._next_attempt()

    def get_buffer(self, Py_ssize_t sizehint):
        cdef Direction d = self.c2u
        if d.buf is None or (d.size < d.next and not self.early and d.pend_end == 0):
            self._new_buf(d, d.next)
        if self.early:
            return d.mv[self.early:]
        return d.buf

    def buffer_updated(self, Py_ssize_t nbytes):
        self._client_bytes(nbytes)

    cdef _client_bytes(self, Py_ssize_t nbytes):
        # nbytes more client bytes in the c2u buffer (at 0, or after the held ones)
        self.last_active = _now()
        if self.state == C_OPEN:
            self._send(self.c2u, 0, nbytes, True)
        elif self.state == C_CONNECTING:
            self.early += nbytes
            if self.early >= self.c2u.size:
                self.c_early_full = True
                self._sync_client_reading()
        # else (lingering, closing): dropped

    def data_received(self, data):
        # Loops that do not use get_buffer() (asyncio's own, for an object
        # that is not an asyncio.BufferedProtocol) deliver bytes here.
        cdef Py_ssize_t n = len(data)
        cdef Direction d = self.c2u
        self.last_active = _now()
        if self.state == C_OPEN:
            if d.buf is None or d.size < n:
                self._new_buf(d, max(n, self.cfg.buffer_size))
            d.buf[:n] = data
            self._send(d, 0, n, False)
        elif self.state == C_CONNECTING:
            self._hold(data)

    def eof_received(self):
        self._src_eof(self.c2u)
        return True   # keep the other direction open: a half-close

    def pause_writing(self):
        # the client reads slower than the upstream sends
        self.u2c.step(EV_FULL)

    def resume_writing(self):
        self._drained(self.u2c)

    def connection_lost(self, exc):
        self._client_lost(exc is not None)

    cdef _client_lost(self, bint error):
        # the client's side is closed (by us, by the peer, or it failed)
        self.client_open = False
        self.c_reading = False
        self.u2c.state = D_CLOSED   # its destination is gone
        self._set_end(END_CLIENT_ERROR if error else END_CLOSED)
        if self.up_state == UP_OPEN:
            self._closing()
            self._close_upstream(error)
        elif self.up_state == UP_CONNECTING:
            # the client left while we connected: no failure to count
            self._closing()
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
        return self.c2u.nbytes

    @property
    def bytes_out(self):
        """Bytes relayed from the upstream to the client."""
        return self.u2c.nbytes

    @property
    def spliced(self):
        """Which directions moved bulk with splice(2): "", "in" (client to
        upstream), "out" (upstream to client) or "both"."""
        return ("", "in", "out", "both")[(self.c2u.mode == M_SPLICE)
                                         + 2 * (self.u2c.mode == M_SPLICE)]

    @property
    def held(self):
        """Client bytes held while the upstream connects."""
        return self.early

    @property
    def duration(self):
        """Seconds from accept to finish (or until now)."""
        return (self.ended if self.state == C_FINISHED else _now()) - self.started

    @property
    def end(self):
        """How it ended: eof, client_error, upstream_error, idle, aborted,
        no_upstream, closed -- or "open"."""
        return _END_NAMES[self.end_code]

    @property
    def closed(self):
        """True once the client connection is gone."""
        return self.state == C_FINISHED or ((self.client is not None or self.raw)
                                            and not self.client_open)

    @property
    def finished(self):
        """True once both sides are gone and every count is released."""
        return self.state == C_FINISHED

    @property
    def buffered(self):
        """Bytes this connection holds in memory: its read buffers and the
        client transport's write buffer (for tests of back-pressure)."""
        cdef Py_ssize_t n = self.c2u.size + self.u2c.size
        if self.client is not None and self.client_open:
            n += self.client.get_write_buffer_size()
        return n

    @property
    def directions(self):
        """The state of each direction and of the whole:
        ``(connection, client to upstream, upstream to client)`` names."""
        return (_CONN_NAMES[self.state], _STATE_NAMES[self.c2u.state],
                _STATE_NAMES[self.u2c.state])

    def __repr__(self):
        return (f"<Connection {self.peername!r} up={self.ustate.address if self.ustate else None} "
                f"in={self.c2u.nbytes} out={self.u2c.nbytes} {self.end}>")

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
            self.engine.arm(self, self.deadline)
        return 0

    cdef _connected(self):
        cdef Target t = self.attempt
        cdef UpstreamState st = t.state
        cdef Direction d = self.c2u
        cdef Py_ssize_t n
        self.attempt = None
        self.deadline = 0.0
        self.ustate = st
        self.up_state = UP_OPEN
        self.state = C_OPEN
        st.connections += 1
        if (st.fails or st.ejected_until > 0) and self.cfg.connector is not None:
            self.cfg.connector.succeeded(t)
        self.engine.rearm(self)   # from the connect deadline to the idle one
        d.step(EV_CONNECTED)
        if self.early:
            n = self.early
            self.early = 0
            self.c_early_full = False
            self._send(d, 0, n, False)
        if self.up_state == UP_OPEN and d.pend_end == 0:
            self._drained(d)   # the held bytes (or none) are sent: a held EOF follows them
        else:
            self._sync_client_reading()

    cdef Target _drop_attempt(self, int up):
        # Close the attempt in progress and release its count (no failure is
        # counted here); the upstream side goes to *up*.
        cdef Target t = self.attempt
        self._close_fd()
        t.state.active -= 1
        self.attempt = None
        self.deadline = 0.0
        self.up_state = up
        return t

    cdef _attempt_failed(self, object exc):
        # The attempt in progress failed: release and count it, then try the
        # next target if the client is still there.
        self._count_failure(self._drop_attempt(UP_NONE), exc)
        if self.client_open and self.state == C_CONNECTING:
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
        if self.c2u.eof():
            self._closing()
            self._c_close(False)
            return
        self.state = C_LINGERING
        self.deadline = _now() + _LINGER
        self.engine.arm(self, self.deadline)
        self._c_write_eof()
        self._sync_client_reading()

    # -- the engine's calls ------------------------------------------------------

    cdef double _deadline(self):
        if self.up_state == UP_CONNECTING or self.state == C_LINGERING:
            return self.deadline
        if self.cfg.idle_timeout > 0 and self.state != C_FINISHED:
            # closing too: a client that never reads what is left for it
            return self.last_active + self.cfg.idle_timeout
        return 0.0

    cdef _timed_out(self, double now):
        # the engine's timer found this connection due: act if it really is
        # (an idle one may have been active since it was armed)
        cdef double at = self._deadline()
        if at == 0.0 or now < at:
            return
        if self.state == C_LINGERING:
            self.state = C_CLOSING
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
        if self.state != C_FINISHED:
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
        self._socket_event(self.u2c, self.c2u, events)

    cdef _client_event(self, uint32_t events):
        if self.cfd < 0:
            return   # closed earlier in this batch
        self._socket_event(self.c2u, self.u2c, events)

    # -- relaying: one code for both directions -----------------------------------
    #
    # Direction ``c2u`` reads the client and writes the upstream; ``u2c`` the
    # reverse.  Each moves its bytes the same way (below); where they
    # differ, it is the client side being a transport (not raw) -- then the
    # transport reads c2u's bytes and writes u2c's -- and c2u holding the
    # client's bytes while the upstream connects.

    cdef int _src(self, Direction d) noexcept:
        return self.cfd if d is self.c2u else self.ufd

    cdef int _dst(self, Direction d) noexcept:
        return self.ufd if d is self.c2u else self.cfd

    cdef _failed(self, bint client_side, int err):
        # a socket failed: the client's, or the upstream's
        if client_side:
            self._c_gone(True)
        else:
            self._upstream_error(err)

    cdef _socket_event(self, Direction src_of, Direction dst_of, uint32_t events):
        # epoll's events for a socket that is src_of's source and dst_of's
        # destination
        cdef int fd = self._src(src_of)
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if events & EPOLLERR:
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err:
                self._failed(src_of is self.c2u, err)
                return
        if events & EPOLLOUT and dst_of.pend_end:
            self._flush(dst_of)
        if self._src(src_of) >= 0 and events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            if events & (EPOLLRDHUP | EPOLLHUP):
                src_of.rdhup = True
            src_of.readable = True
            self._read(src_of)

    cdef bint _may_read(self, Direction d) noexcept:
        if d is self.c2u:
            return self.c_reading
        return d.state == D_OPEN and self.state == C_OPEN and self.client_open

    # Read buffers are not zeroed (bytearray(n) would memset them): every
    # byte relayed from them was first written by recv() or the transport.

    cdef _new_buf(self, Direction d, Py_ssize_t size):
        d.buf = PyByteArray_FromStringAndSize(NULL, size)
        if not self.raw:
            d.mv = memoryview(d.buf)   # for get_buffer() and the transport's write()
        d.size = size

    cdef _read(self, Direction d):
        # Read d's source (a raw socket) while it may hold bytes, and pass
        # them on.
        cdef ssize_t r
        cdef Py_ssize_t room, held
        cdef int fd, reads = 0
        while d.readable:
            fd = self._src(d)
            if fd < 0 or not self._may_read(d):
                return
            if d.mode != M_COPY and d.state == D_OPEN and d.pend_end == 0:
                if self._splice(d):
                    return
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)   # let the other connections run
                return
            held = self.early if d is self.c2u else 0
            if d.buf is None or (d.size < d.next and not held and d.pend_end == 0):
                self._new_buf(d, d.next)
            room = d.size - held
            r = recv(fd, PyByteArray_AS_STRING(d.buf) + held, room, 0)
            if r > 0:
                reads += 1
                if d is self.c2u:
                    self._client_bytes(r)
                else:
                    self.last_active = _now()
                    self._to_client(r)
                if r < room:
                    # A short read took all there was: more data raises a
                    # new edge, and if the source's FIN is already here
                    # (RDHUP), nothing follows it -- the EOF, without the
                    # recv() that would return 0.
                    d.readable = False
                    if d.rdhup and self._src(d) >= 0 and not d.eof():
                        self._src_eof(d)
                    return
            elif self._read_ended(d, r):
                return

    cdef bint _read_ended(self, Direction d, ssize_t r):
        # recv()/splice() from d's source returned r <= 0: the EOF, nothing
        # more for now, or an error.  False: interrupted, read again.
        if r == 0:
            d.readable = False
            if not d.eof():
                self._src_eof(d)
        elif errno == EAGAIN:
            d.readable = False
        elif errno == EINTR:
            return False
        else:
            self._failed(d is self.c2u, errno)
        return True

    cdef _send(self, Direction d, Py_ssize_t start, Py_ssize_t n, bint from_read):
        # Send d.buf[start:start+n] to d's destination (a raw socket); keep
        # what it cannot take (pending) and stop reading the source.
        cdef ssize_t r
        cdef Py_ssize_t size = d.size
        cdef char *p = PyByteArray_AS_STRING(d.buf)
        cdef int fd = self._dst(d)
        d.nbytes += n
        if d is self.c2u:
            self.counters.bytes_in += n
        else:
            self.counters.bytes_out += n
        if from_read and n == size:
            # a full read: a bulk transfer, read bigger chunks (and at the
            # largest, splice a raw connection's)
            if size < self.cfg.max_buffer_size:
                d.next = min(size * 2, self.cfg.max_buffer_size)
            elif self.raw and _SPLICE:
                d.mode = M_BULK
        while True:
            r = send(fd, p + start, n, MSG_NOSIGNAL)
            if r >= 0:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                r = 0
                break
            self._failed(d is self.u2c, errno)
            return
        if r == n:
            return
        d.pend_off = start + r
        d.pend_end = start + n
        d.step(EV_FULL)
        if d is self.c2u:
            self._sync_client_reading()

    cdef _flush(self, Direction d):
        # d's destination is writable: send what is pending
        cdef ssize_t r
        cdef char *p
        cdef int fd = self._dst(d)
        if d.pipe_r >= 0:
            r = _drain_pipe(d.pipe_r, fd, d.pend_end - d.pend_off)
            if r <= 0:
                if r < 0:
                    self._failed(d is self.u2c, -r)
                return
        else:
            p = PyByteArray_AS_STRING(d.buf)
            while True:
                r = send(fd, p + d.pend_off, d.pend_end - d.pend_off, MSG_NOSIGNAL)
                if r >= 0:
                    break
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    return
                self._failed(d is self.u2c, errno)
                return
        d.pend_off += r
        self.last_active = _now()
        if d.pend_off < d.pend_end:
            return
        d.pend_off = d.pend_end = 0
        self._drained(d)

    cdef _drained(self, Direction d):
        # Everything d had pending is written (or its transport resumed):
        # what the state machine says follows.
        cdef int act = d.step(EV_DRAINED)
        if act == ACT_CLOSE:
            if d is self.c2u:
                self._upstream_closed()
            else:
                self._c_gone(False)
            return
        if act == ACT_SHUT:
            self._shut_dst(d)
        if d is self.c2u:
            self._sync_client_reading()
        elif d.readable:
            self._read(d)

    cdef _shut_dst(self, Direction d):
        # send d's destination our EOF
        if d is self.c2u:
            if self.ufd >= 0:
                shutdown(self.ufd, SHUT_WR)
        elif not self.raw:
            self.client.write_eof()
        elif self.cfd >= 0:
            shutdown(self.cfd, SHUT_WR)

    cdef _src_eof(self, Direction d):
        # d's source sent its EOF
        cdef Direction other = self.u2c if d is self.c2u else self.c2u
        cdef int act
        if d is self.c2u:
            self.c_reading = False   # a transport stops reading by itself
            if self.state == C_LINGERING:
                d.step(EV_EOF)
                self.state = C_CLOSING
                self._c_close(False)
                return
        act = d.step(EV_EOF)
        if self.state != C_OPEN:
            return   # connecting: c2u holds the EOF; closing: nothing to pass on
        if other.eof():
            self._shut(END_EOF, False)   # both done: close, no shutdown() first
        elif act == ACT_SHUT:
            self._shut_dst(d)

    # Bulk: once a direction has filled a max_buffer_size read, its bytes
    # move socket -> pipe -> socket with splice(2) and never reach user
    # space.  What the pipe still holds is the pending count, so flow
    # control, half-close and closing work as with a buffer.

    cdef bint _splice(self, Direction d):
        # Move d's bytes through its pipe; False: no pipe could be made
        # (no descriptors to spare), copy instead.
        cdef ssize_t r
        cdef int src, reads = 0
        cdef Py_ssize_t chunk = self.cfg.max_buffer_size
        if d.pipe_r < 0:
            if _open_pipe(&d.pipe_r, &d.pipe_w, chunk) < 0:
                d.mode = M_COPY
                return False
            d.mode = M_SPLICE
            d.buf = None   # not needed any more
            d.size = 0
        while d.readable:
            src = self._src(d)
            if src < 0 or not self._may_read(d):
                return True
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)
                return True
            r = splice(src, NULL, d.pipe_w, NULL, chunk, _SPLICE_FLAGS)
            if r > 0:
                reads += 1
                self.last_active = _now()
                d.nbytes += r
                if d is self.c2u:
                    self.counters.bytes_in += r
                else:
                    self.counters.bytes_out += r
                d.pend_off = 0
                d.pend_end = r
                r = _drain_pipe(d.pipe_r, self._dst(d), r)
                if r < 0:
                    self._failed(d is self.u2c, -r)
                    return True
                d.pend_off = r
                if d.pend_off < d.pend_end:
                    d.step(EV_FULL)
                    if d is self.c2u:
                        self._sync_client_reading()
                    return True
                d.pend_off = d.pend_end = 0
            elif self._read_ended(d, r):
                return True
        return True

    cdef _close_pipes(self):
        cdef Direction d
        for d in (self.c2u, self.u2c):
            if d.pipe_r >= 0:
                _close(d.pipe_r)
                _close(d.pipe_w)
                d.pipe_r = d.pipe_w = -1

    cdef _to_client(self, Py_ssize_t n):
        # n bytes read from the upstream into u2c's buffer: to the client
        cdef Direction d = self.u2c
        cdef Py_ssize_t size = d.size
        if self.raw:
            # the buffer is ours until sent: what the client cannot take now
            # is kept (pending) and upstream reads stop until EPOLLOUT
            self._send(d, 0, n, True)
            return
        d.nbytes += n
        self.counters.bytes_out += n
        self.c_write(d.buf if n == size else d.mv[:n])
        if n == size and size < self.cfg.max_buffer_size:
            d.next = min(size * 2, self.cfg.max_buffer_size)
            d.buf = None
            d.size = 0
        elif self.client_open and self.client.get_write_buffer_size():
            # the transport still holds a view of the buffer: take a fresh one
            d.buf = None
            d.size = 0

    cdef _hold(self, object data):
        # data_received() before the upstream is connected: copy into c2u's
        # buffer, growing it if needed; reading pauses once buffer_size bytes
        # are held.
        cdef Direction d = self.c2u
        cdef Py_ssize_t n = len(data)
        cdef Py_ssize_t need = self.early + n
        if d.buf is None or need > d.size:
            old, old_n = d.buf, self.early
            self._new_buf(d, max(need, self.cfg.buffer_size))
            if old_n:
                d.buf[:old_n] = old[:old_n]
        d.buf[self.early:need] = data
        self.early = need
        if self.early >= self.cfg.buffer_size:
            self.c_early_full = True
            self._sync_client_reading()

    cdef _sync_client_reading(self):
        # read the client while c2u may read and the connection wants it
        cdef bint want = self.client_open and (self.state == C_LINGERING or (
            (self.state == C_OPEN or self.state == C_CONNECTING)
            and may_read(self.c2u.state) and not self.c_early_full))
        if want != self.c_reading:
            self.c_reading = want
            if self.raw:
                # an edge-triggered socket does not report bytes that were
                # already there: read them soon (not from inside this call)
                if want and self.c2u.readable:
                    self.engine.defer(self)
            elif want:
                self.client.resume_reading()
            else:
                self.client.pause_reading()

    cdef _run_deferred(self):
        if self.raw and self.c2u.readable:
            self._read(self.c2u)
        if self.u2c.readable:
            self._read(self.u2c)

    cdef _upstream_error(self, int err):
        # the upstream socket failed (reset, ...): close both sides at once
        self._set_end(END_UPSTREAM_ERROR)
        self._close_upstream(True)
        if self.client_open:
            self._shut(END_CLOSED, True)

    # -- the client socket, when the core accepted it (raw) -------------------------
    #
    # The same relay as with a transport; these stand in for the transport's
    # reads, writes and callbacks.  Closing the client socket runs
    # connection_lost's logic at once.

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
        self.state = C_CONNECTING
        self.c_reading = True
        self.conns.add(self)
        self.engine.link(self)
        if cfg.want_peername:
            self.peername = _sockaddr_to_py(addr, alen)
        if cfg.keepalive and addr.ss_family != AF_UNIX:
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
        if cfg.idle_timeout > 0:
            self.engine.arm(self, self.started + cfg.idle_timeout)
        self._next_attempt()
        return 0

    cdef _c_write_eof(self):
        # send the client our EOF (once what it has pending is sent)
        if self.u2c.step(EV_EOF) == ACT_SHUT:
            self._shut_dst(self.u2c)

    cdef _c_close(self, bint hard):
        # Close the client side: at once, or once what it has not taken yet
        # is sent.  A transport sends that itself and calls connection_lost
        # later; a raw socket is gone before this returns.
        if not self.raw:
            self.u2c.state = D_CLOSED
            if hard:
                self.client.abort()
            else:
                self.client.close()
            return
        if not hard and self.cfd >= 0:
            self.u2c.step(EV_CLOSE)
            if self.u2c.state == D_CLOSING:
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
        self.u2c.pend_off = self.u2c.pend_end = 0
        self.c2u.readable = False
        self._client_lost(error)

    # -- closing -------------------------------------------------------------------

    cdef _closing(self):
        if self.state < C_CLOSING:
            self.state = C_CLOSING

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
        if hard or self.ufd < 0:
            self.c2u.step(EV_ERROR)
        else:
            self.c2u.step(EV_CLOSE)
            if self.c2u.state == D_CLOSING:
                return
        self._upstream_closed()

    cdef _upstream_closed(self):
        self._close_fd()
        self.up_state = UP_CLOSED
        self.c2u.state = D_CLOSED
        self.u2c.readable = False
        if not self.client_open:
            self._finish()

    cdef _shut(self, int code, bint hard):
        # Close both sides: gracefully (flush what is buffered) or at once.
        self._set_end(code)
        if self.state == C_FINISHED:
            return
        self._closing()
        if self.client_open:
            self._c_close(hard)   # raw: may finish the connection right here
        if self.up_state == UP_OPEN:
            self._close_upstream(hard)
        elif self.up_state == UP_CONNECTING:
            self._drop_attempt(UP_CLOSED)
            if not self.client_open:
                self._finish()

    cdef _finish(self):
        cdef Direction d
        if self.state == C_FINISHED:
            return
        self.state = C_FINISHED
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
            self.ustate.bytes_in += self.c2u.nbytes
            self.ustate.bytes_out += self.u2c.nbytes
        self.attempt = None
        self.tried = None
        for d in (self.c2u, self.u2c):
            d.state = D_CLOSED
            d.buf = None
            d.mv = None
            d.size = 0
        self.c_write = None
        self.client = None
        self.conns.discard(self)
        if self.cfg.on_close is not None:
            self.cfg.on_close(self)
        self.owner = None   # the last connection of an old version frees it
