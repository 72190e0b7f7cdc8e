# -- the proxy's data path: the system calls ------------------------------------
#
# One proxied connection is one ``Connection``: the asyncio protocol of the
# accepted client socket (or, accepted by the core, the owner of that
# socket), and the owner of the upstream socket, which it drives itself --
# a non-blocking connect() and raw send()/recv()/splice() on file
# descriptors registered, edge-triggered, in the loop's ``_Engine`` (one
# epoll instance per event loop, itself watched by the loop).  The upstream
# side therefore costs no transport, no coroutine, no Task, no future and
# no timer handle; its bytes never become Python objects.
#
# What the connection does and when -- its states, each direction's state
# machine, connecting, half-closes, timeouts, closing, counting -- is
# ``Relay`` in ``_core_machine.py``, one source for both cores.  This file
# is what it cannot do itself: the system calls, through the hooks a
# ``Relay`` leaves to its core (``_send``, ``_read``, ``_start_attempt``,
# ``_close_fd``, ...), and the engine's events.  Each way is a
# ``Direction`` (``c2u``: client to upstream, ``u2c``: upstream to client);
# the code below is one function per step for both (``_read``, ``_send``,
# ``_flush``, ``_splice``): read the source, write the destination; what
# the destination cannot take stays pending (in the buffer, or in the
# splice pipe) and the source is not read until EPOLLOUT lets it drain.
# ``readable`` remembers that a socket may still hold data, since an
# edge-triggered socket reports it only once.


cdef enum:
    # reads in one go before a busy connection lets the others run
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


cdef inline int _send_chunk(Connection c, Direction d, bint c2u, Py_ssize_t start, Py_ssize_t n,
                            bint from_read) except -1:
    # Connection._send(), inlined into Connection._read(): the per-chunk
    # path makes no function call but send(2).  c2u: d is c.c2u.
    cdef ssize_t r
    cdef Py_ssize_t size = d.size
    cdef char *p = PyByteArray_AS_STRING(d.buf)
    cdef int fd = c.ufd if c2u else c.cfd
    d.nbytes += n
    if c2u:
        c.counters.bytes_in += n
    else:
        c.counters.bytes_out += n
    if from_read and n == size:
        # a full read: a bulk transfer, read bigger chunks (and at the
        # largest, splice a raw connection's)
        if size < c.cfg.max_buffer_size:
            d.next = min(size * 2, c.cfg.max_buffer_size)
        elif c.raw and _SPLICE:
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
        c._failed(not c2u, errno)
        return 0
    if r == n:
        return 0
    d.pend_off = start + r
    d.pend_end = start + n
    d.step(EV_FULL)
    if c2u:
        c._sync_client_reading()
    return 0


@cython.final
cdef class Connection(Relay):
    """One proxied connection: the protocol of the accepted client socket and
    the owner of its upstream socket (a ``Relay``, see ``_core_machine.py``,
    with the system calls)."""

    # -- the hooks of Relay ------------------------------------------------------

    cdef double _clock(self) noexcept:
        # the engine's batch time when one is running (one clock read per
        # batch, not per chunk), else the clock
        cdef _Engine e = self.engine
        if e is not None and e.now != 0.0:
            return e.now
        return _now()

    cdef _attach(self):
        self.engine = _get_engine()
        self.engine.link(self)

    cdef _detach(self):
        if self.engine is not None:
            self.engine.unlink(self)

    cdef _arm(self, double at):
        self.engine.arm(self, at)

    cdef _rearm(self):
        self.engine.rearm(self)

    cdef _defer(self):
        self.engine.defer(self)

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
        self._attempting(t, r == 0)
        return 0

    cdef _close_fd(self):
        cdef int fd = self.ufd
        if fd >= 0:
            self.ufd = -1
            _close(fd)   # also takes it out of the epoll set
            self.engine.forget(self)

    cdef object _sockname(self):
        # the client socket's local address (the PROXY protocol's destination)
        cdef sockaddr_storage ss
        cdef socklen_t alen = sizeof(ss)
        if not self.raw:
            return self.client.get_extra_info("sockname")
        if self.cfd < 0 or getsockname(self.cfd, <sockaddr*>&ss, &alen) < 0:
            return None
        return _sockaddr_to_py(&ss, alen)

    cdef bint _close_client(self) except -1:
        cdef int fd = self.cfd
        if fd < 0:
            return False
        self.cfd = -1
        _close(fd)   # also takes it out of the epoll set
        self.engine.forget(self)
        return True

    cdef _close_pipes(self):
        cdef Direction d
        for d in (self.c2u, self.u2c):
            if d.pipe_r >= 0:
                _close(d.pipe_r)
                _close(d.pipe_w)
                d.pipe_r = d.pipe_w = -1

    cdef _shutdown(self, bint client_side):
        cdef int fd = self.cfd if client_side else self.ufd
        if fd >= 0:
            shutdown(fd, SHUT_WR)

    # Read buffers are not zeroed (bytearray(n) would memset them): every
    # byte relayed from them was first written by recv() or the transport.

    cdef _new_buf(self, Direction d, Py_ssize_t size):
        d.buf = PyByteArray_FromStringAndSize(NULL, size)
        if not self.raw:
            d.mv = memoryview(d.buf)   # for get_buffer() and the transport's write()
        d.size = size

    # -- the client socket, when the core accepted it (raw) --------------------------

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
        engine.link(self)
        if cfg.keepalive and addr.ss_family != AF_UNIX:
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
        self._started_raw(_sockaddr_to_py(addr, alen) if cfg.want_peername else None)
        return 0

    # -- the engine's events -------------------------------------------------------

    cdef _upstream_event(self, uint32_t events):
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        cdef Direction d
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
        # the upstream socket is u2c's source and c2u's destination
        if events & EPOLLERR:
            getsockopt(self.ufd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err:
                self._failed(False, err)
                return
        d = self.c2u
        if events & EPOLLOUT and d.pend_end:
            self._flush(d)
        if self.ufd >= 0 and events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            d = self.u2c
            if events & (EPOLLRDHUP | EPOLLHUP):
                d.rdhup = True
            d.readable = True
            self._read(d)

    cdef _client_event(self, uint32_t events):
        # the client socket (raw) is c2u's source and u2c's destination
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        cdef Direction d
        if self.cfd < 0:
            return   # closed earlier in this batch
        if events & EPOLLERR:
            getsockopt(self.cfd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err:
                self._failed(True, err)
                return
        d = self.u2c
        if events & EPOLLOUT and d.pend_end:
            self._flush(d)
        if self.cfd >= 0 and events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            d = self.c2u
            if events & (EPOLLRDHUP | EPOLLHUP):
                d.rdhup = True
            d.readable = True
            self._read(d)

    # -- relaying: one code for both directions -----------------------------------

    cdef int _src(self, Direction d) noexcept:
        return self.cfd if d is self.c2u else self.ufd

    cdef int _dst(self, Direction d) noexcept:
        return self.ufd if d is self.c2u else self.cfd

    cdef _read(self, Direction d):
        # Read d's source (a raw socket) while it may hold bytes, and pass
        # them on.  The per-chunk path: no clock read (the engine's batch
        # time), and bytes go straight to _send() when the destination is a
        # socket that is open (what _client_bytes/_to_client would do).
        cdef ssize_t r
        cdef Py_ssize_t room, held
        cdef int fd, reads = 0
        cdef bint c2u = d is self.c2u
        cdef double now = self._clock()
        while d.readable:
            fd = self.cfd if c2u else self.ufd
            if fd < 0 or not self._may_read(d):
                return
            if d.mode != M_COPY and d.state == D_OPEN and d.pend_end == 0:
                if self._splice(d):
                    return
            if reads == _READS_PER_EVENT:
                self.engine.defer(self)   # let the other connections run
                return
            held = self.early if c2u else 0
            if d.buf is None or (d.size < d.next and not held and d.pend_end == 0):
                self._new_buf(d, d.next)
            room = d.size - held
            r = recv(fd, PyByteArray_AS_STRING(d.buf) + held, room, 0)
            if r > 0:
                reads += 1
                self.last_active = now
                if c2u:
                    if self.state == C_OPEN:
                        _send_chunk(self, d, True, 0, r, True)
                    else:
                        self._client_bytes(r)
                elif self.raw:
                    _send_chunk(self, d, False, 0, r, True)
                else:
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

    cdef bint _read_ended(self, Direction d, ssize_t r) except -1:
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
        _send_chunk(self, d, d is self.c2u, start, n, from_read)

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
        self.last_active = self._clock()
        if d.pend_off < d.pend_end:
            return
        d.pend_off = d.pend_end = 0
        self._drained(d)

    # Bulk: once a direction has filled a max_buffer_size read, its bytes
    # move socket -> pipe -> socket with splice(2) and never reach user
    # space.  What the pipe still holds is the pending count, so flow
    # control, half-close and closing work as with a buffer.

    cdef bint _splice(self, Direction d) except -1:
        # Move d's bytes through its pipe; False: no pipe could be made
        # (no descriptors to spare), copy instead.
        cdef ssize_t r
        cdef int src, reads = 0
        cdef Py_ssize_t chunk = self.cfg.max_buffer_size
        cdef double now = self._clock()
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
                self.last_active = now
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
