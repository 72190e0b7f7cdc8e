# -- the engine: one epoll instance per event loop --------------------------------

cdef dict _engines = {}
cdef _Engine _last_engine = None


cdef _Engine _get_engine():
    global _last_engine
    loop = _get_running_loop()
    if _last_engine is not None and _last_engine.loop is loop:
        return _last_engine
    engine = _engines.get(loop)
    if engine is None:
        for old in [l for l in _engines if l.is_closed()]:
            (<_Engine>_engines.pop(old)).close()
        engine = _Engine(loop)
        _engines[loop] = engine
    _last_engine = engine
    return engine


def engine_stats():
    """What the running loop's engine holds and did: ``connections`` (not
    finished), ``armed`` (with a deadline in the timer wheel), ``ticks``
    (timer runs) and ``checked`` (connections the timer runs looked at: only
    those that were due)."""
    cdef _Engine e = _get_engine()
    return {"connections": e.nconns, "armed": len(e.wheel), "ticks": e.ticks,
            "checked": e.checked}


# What an epoll event names: the object's address, tagged in its low bits
# (objects are at least 8-byte aligned) with which of its sockets it is.
cdef enum:
    _TAG_UPSTREAM = 0   # a Connection's upstream socket
    _TAG_CLIENT = 1     # a Connection's client socket (raw)
    _TAG_LISTENER = 2   # a Listener's socket
    _TAG_MASK = 3


@cython.final
cdef class _Engine(EngineBase):
    """The sockets the core drives itself on one event loop: an epoll
    instance the loop watches as one reader (the connections' timer and
    ready list are EngineBase's, one source for both cores)."""

    def __cinit__(self, object loop):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise _oserror(errno)
        self.graveyard = []
        loop.add_reader(self.epfd, self._on_ready)

    cdef double _clock(self) noexcept:
        return _now()

    cdef _after_batch(self):
        if self.graveyard:
            self.graveyard.clear()

    def __dealloc__(self):
        if self.epfd >= 0:
            _close(self.epfd)

    cdef close(self):
        # Only for an engine whose loop is closed, so nothing runs any more:
        # close the upstream sockets of connections the loop left behind.
        cdef Connection conn = self.head
        while conn is not None:
            if conn.ufd >= 0:
                _close(conn.ufd)
                conn.ufd = -1
                Py_DECREF(conn)
            if conn.cfd >= 0:
                _close(conn.cfd)
                conn.cfd = -1
                Py_DECREF(conn)
            conn._close_pipes()
            conn = conn.t_next
        if self.epfd >= 0:
            _close(self.epfd)
            self.epfd = -1
        self.head = None
        self.nconns = 0
        self.graveyard.clear()
        self.ready.clear()
        self.timer = None
        self.wheel = TimerWheel(TICK)
        self.loop = None

    cdef int register(self, object obj, int fd, uint32_t events, int tag) except -1:
        cdef epoll_event ev
        ev.events = events
        ev.data.u64 = <uint64_t><uintptr_t><void*>obj | <uint64_t>tag
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            return errno
        Py_INCREF(obj)   # the registration's reference: released by forget()
        return 0

    cdef forget(self, object obj):
        # obj's fd was closed or taken out of the epoll set.  An event for
        # it may still be in the batch being processed: the reference moves
        # to the graveyard, emptied after each batch.
        self.graveyard.append(obj)
        Py_DECREF(obj)

    def _on_ready(self):
        cdef int n, i, tag
        cdef uint64_t data
        cdef void *obj
        cdef epoll_event *evs = self.evs
        # One batch per call: if more is ready, the epoll instance stays
        # readable and the loop calls again after its other callbacks (the
        # control channel, timers) have had their turn.  The clock is read
        # once per batch (``now``), not once per chunk relayed.
        n = epoll_wait(self.epfd, evs, _EVENTS, 0)
        self.now = _now()
        try:
            for i in range(n):
                data = evs[i].data.u64
                tag = <int>(data & _TAG_MASK)
                obj = <void*><uintptr_t>(data & ~(<uint64_t>_TAG_MASK))
                if tag == _TAG_LISTENER:
                    (<Listener>obj)._ready()
                    continue
                try:
                    if tag == _TAG_CLIENT:
                        (<Connection>obj)._client_event(evs[i].events)
                    else:
                        (<Connection>obj)._upstream_event(evs[i].events)
                except Exception as exc:
                    (<Connection>obj)._crashed(exc)
        finally:
            self.now = 0.0
        if self.graveyard:
            self.graveyard.clear()

    def _run_ready(self):
        # the connections that yielded with bytes left to read (EngineBase),
        # with the clock read once for the batch
        self.now = _now()
        try:
            self._ready_batch()
        finally:
            self.now = 0.0

    # -- every connection of this loop (close()) ---------------------------------

    cdef link(self, Connection conn):
        conn.t_next = self.head
        if self.head is not None:
            self.head.t_prev = conn
        self.head = conn
        conn.t_linked = True
        self.nconns += 1

    cdef unlink(self, Connection conn):
        # the connection is finished: it has no deadline either
        if not conn.t_linked:
            return
        if conn.t_prev is not None:
            conn.t_prev.t_next = conn.t_next
        else:
            self.head = conn.t_next
        if conn.t_next is not None:
            conn.t_next.t_prev = conn.t_prev
        conn.t_prev = conn.t_next = None
        conn.t_linked = False
        self.nconns -= 1
        self.wheel.discard(conn)
