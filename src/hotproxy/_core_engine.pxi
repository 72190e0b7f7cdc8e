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
cdef class _Engine:
    """The sockets the core drives itself on one event loop: an epoll
    instance the loop watches as one reader, the connections' timer, and
    the connections that yielded with bytes still to read."""

    def __cinit__(self, object loop):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise _oserror(errno)
        self.loop = loop
        self.graveyard = []
        self.ready = []
        self.timer_at = 0.0
        self.wheel = TimerWheel(_TICK)
        loop.add_reader(self.epfd, self._on_ready)

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
        self.wheel = TimerWheel(_TICK)
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
        # control channel, timers) have had their turn.
        n = epoll_wait(self.epfd, evs, _EVENTS, 0)
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
        if self.graveyard:
            self.graveyard.clear()

    # -- connections with bytes left to read -----------------------------------

    cdef defer(self, Connection conn):
        if conn.deferred:
            return
        if not self.ready:
            self.loop.call_soon(self._run_ready)
        conn.deferred = True
        self.ready.append(conn)

    def _run_ready(self):
        cdef Connection conn
        ready = self.ready
        self.ready = []
        for conn in ready:
            conn.deferred = False
            try:
                conn._run_deferred()
            except Exception as exc:
                conn._crashed(exc)
        if self.graveyard:
            self.graveyard.clear()

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

    # -- timeouts ----------------------------------------------------------------
    #
    # Deadlines are in a timer wheel (buckets of _TICK seconds): a tick takes
    # out the connections that are due and costs nothing for the others.  A
    # connection due by its old deadline that has been active since (an
    # idle timeout moves with every chunk, without timer work) is armed
    # again for its new one.

    cdef arm(self, Connection conn, double at):
        # make sure the timer looks at conn by *at*
        self.want_tick(self.wheel.arm(conn, at))

    cdef rearm(self, Connection conn):
        # conn's deadline moved later (it connected): arm it for the new one
        # at once rather than look at it when the old one comes
        cdef double at = conn._deadline()
        self.wheel.discard(conn)
        if at > 0.0:
            self.arm(conn, at)

    cdef want_tick(self, double when):
        # make sure the timer fires by *when* (but not within _TICK of now)
        cdef double now
        if self.timer is not None and self.timer_at <= when:
            return
        now = _now()
        if when < now + _TICK:
            when = now + _TICK
            if self.timer is not None and self.timer_at <= when:
                return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_later(when - now, self._tick)

    def _tick(self):
        cdef Connection conn
        cdef double now = _now()
        cdef double at
        cdef list due
        self.timer = None
        due = self.wheel.expire(now)
        self.ticks += 1
        self.checked += len(due)
        for conn in due:
            try:
                conn._timed_out(now)
            except Exception as exc:
                conn._crashed(exc)
        # not due yet (active since), or given another try: armed again
        for conn in due:
            at = conn._deadline()
            if at > 0.0:
                self.wheel.arm(conn, at)
        at = self.wheel.next_at()
        if at > 0.0:
            self.want_tick(at)
        if self.graveyard:
            self.graveyard.clear()
