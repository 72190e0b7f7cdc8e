# -- accepting in the core ------------------------------------------------------------

cdef enum:
    # connections accepted per readiness event before the others run
    _ACCEPTS_PER_EVENT = 64

# seconds a listener stops accepting when the process is out of descriptors
cdef double _ACCEPT_RETRY = 0.25


@cython.final
cdef class Listener:
    """Accepts on a listening socket in the core, for a site's ``Acceptor``.

    Each connection reads the slot once.  A service whose ``accepts_raw``
    is True gets the accepted socket itself: ``new_raw_connection(conns)``
    returns a ``Connection`` (or None: refused), which drives the socket
    with its upstream socket in the loop's engine, with no transport at
    all.  Any other service gets ``fallback(sock)``, which serves it
    through the loop (``loop.connect_accepted_socket``).

    ``start()`` watches the socket; ``stop()`` stops (the socket stays
    open, and ``take_queued()`` then serves what the kernel has queued).
    The socket belongs to the caller.
    """

    def __cinit__(self, Acceptor acceptor not None, object sock not None, object fallback=None):
        self.acceptor = acceptor
        self.sock = sock
        self.fd = sock.fileno()
        self.fallback = fallback

    @property
    def watching(self):
        """True while the socket is watched."""
        return self.watching

    def start(self):
        """Watch the socket (in the running loop's engine)."""
        cdef int err
        if self.watching:
            return
        engine = _get_engine()
        err = engine.register(self, self.fd, EPOLLIN, _TAG_LISTENER)
        if err:
            raise _oserror(err)
        self.engine = engine
        self.watching = True

    def stop(self):
        """Stop watching; the socket stays open."""
        if not self.watching:
            return
        self.watching = False
        epoll_ctl(self.engine.epfd, EPOLL_CTL_DEL, self.fd, NULL)
        self.engine.forget(self)

    def take_queued(self, int limit=4096):
        """Accept and serve what is queued now, at most *limit*; return how many."""
        return self._accept(limit)

    cdef _ready(self):
        if not self.watching:
            return
        try:
            self._accept(_ACCEPTS_PER_EVENT)
        except Exception as exc:
            _accept_log.error("site %r: accept failed: %s: %s", self.acceptor.name,
                              type(exc).__name__, exc)

    def _resume(self):
        # after running out of descriptors
        if not self.watching and self.engine is not None and self.engine.loop is not None:
            try:
                self.start()
            except OSError as exc:
                _accept_log.error("site %r: cannot watch the listener again: %s",
                                  self.acceptor.name, exc)

    cdef int _accept(self, int limit) except -1:
        cdef sockaddr_storage ss
        cdef socklen_t alen
        cdef int fd, err, n = 0
        while n < limit:
            alen = sizeof(ss)
            fd = accept4(self.fd, <sockaddr*>&ss, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if err == EINTR or err == ECONNABORTED:
                    continue
                if err == EAGAIN:
                    break
                if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                    # The connection stays queued; watching a socket that
                    # stays readable would spin, so look again a bit later.
                    if self.watching:
                        self.stop()
                        self.engine.loop.call_later(_ACCEPT_RETRY, self._resume)
                    self._paused(_oserror(err))
                    break
                raise _oserror(err)
            n += 1
            self._dispatch(fd, &ss, alen)
        return n

    cdef _dispatch(self, int fd, sockaddr_storage *ss, socklen_t alen):
        cdef Acceptor acc = self.acceptor
        cdef Connection conn
        svc = acc.slot._current
        if getattr(svc, "accepts_raw", False) is not True:
            self._serve_fallback(fd)
            return
        try:
            obj = svc.new_raw_connection(acc.conns)
            if obj is not None and type(obj) is not Connection:
                raise TypeError(f"new_raw_connection() returned {type(obj).__name__}, "
                                "not a Connection")
        except Exception as exc:
            _close(fd)
            self._failed(exc)
            return
        if obj is None:
            _close(fd)   # refused (a connection limit)
            return
        conn = <Connection>obj
        self.raw_accepted += 1
        try:
            conn._start_raw(self.engine, fd, ss, alen)   # conn owns fd now
        except Exception as exc:
            conn._crashed(exc)

    def _serve_fallback(self, int fd):
        try:
            sock = _socket.socket(fileno=fd)
        except Exception as exc:
            _close(fd)
            self._failed(exc)
            return
        if self.fallback is None:
            sock.close()
            self._failed(RuntimeError("the service has no raw_relay and the listener no fallback"))
            return
        self.fallback_accepted += 1
        try:
            self.fallback(sock)
        except Exception as exc:
            sock.close()
            self._failed(exc)

    def _paused(self, exc):
        # at most every 10 s per site, like _accept_failed
        acc = self.acceptor
        now = _monotonic()
        if now - acc._logged_at >= 10.0:
            acc._logged_at = now
            _accept_log.error("site %r: cannot accept: %s; connections wait in the queue, "
                              "accepting again in %.2fs", acc.name, exc.strerror, _ACCEPT_RETRY)

    def _failed(self, exc):
        acc = self.acceptor
        acc.errors += 1
        acc._logged_at = _accept_failed(acc.name, exc, acc.errors, acc._logged_at)

    def __repr__(self):
        return f"<Listener {self.acceptor.name!r} fd={self.fd} watching={self.watching}>"
