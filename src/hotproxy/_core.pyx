# cython: language_level=3
"""hotproxy's compiled core.

Rules of this file:

* Everything here is also in ``_core_py.py`` with the same names, arguments
  and behaviour; the test-suite runs against both (``HOTPROXY_NO_EXTENSIONS=1``
  picks the pure-Python twin).
* The accept path (``Acceptor.__call__``) takes one reference from the slot and
  calls the service: no lock, no allocation of its own, no await.
* A slot is published by one reference assignment (``Slot.swap``); a reader
  sees the old service or the new one, never anything in between.
* The proxy's data path (``Connection`` + ``UpstreamSide``) does no Python
  allocation per chunk while the peer keeps up: it reads into a buffer it
  owns and hands the transport a view of it.  A transport keeps a reference
  to a view it could not send at once, so a buffer is reused only when the
  peer's write buffer is empty after the write; otherwise a fresh one is
  taken for the next read.
* Counters are C integers, updated per chunk without touching Python objects.
"""

cimport cython
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import asyncio
import logging
import socket as _socket
import time

cdef object _accept_log = logging.getLogger("hotproxy.accept")
cdef object _monotonic = time.monotonic

cdef object _get_running_loop = asyncio.get_running_loop


@cython.final
cdef class Slot:
    """The current service of one site.

    Read on every accepted connection, replaced by ``swap`` on ``Update``.
    """

    def __cinit__(self, object current=None):
        self._current = current

    @property
    def current(self):
        """The service that new connections get (None before the first commit)."""
        return self._current

    cpdef object swap(self, object new):
        """Publish *new*; return the service it replaces."""
        old = self._current
        self._current = new
        return old

    def __repr__(self):
        return f"<Slot {self._current!r}>"


@cython.final
cdef class ConnectionSet:
    """The open connections of a site (or of one layer's services).

    A connection object is anything with an ``abort()`` method; it adds
    itself when it starts and discards itself when it ends.  A set with a
    parent mirrors every add and discard into it, so a layer can count its
    own connections while the site still sees all of them.
    """

    def __cinit__(self, ConnectionSet parent=None):
        self._conns = set()
        self.parent = parent
        self._waiters = None

    cpdef add(self, object conn):
        """Track *conn* (and in the parent set, if any)."""
        self._conns.add(conn)
        if self.parent is not None:
            self.parent.add(conn)

    cpdef discard(self, object conn):
        """Stop tracking *conn*; wake ``wait_empty`` waiters when none are left."""
        self._conns.discard(conn)
        if self.parent is not None:
            self.parent.discard(conn)
        if self._waiters is not None and not self._conns:
            self._wake()

    cdef _wake(self):
        waiters = self._waiters
        self._waiters = None
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def wait_empty(self):
        """A future that is done once no connection is left."""
        fut = asyncio.get_running_loop().create_future()
        if not self._conns:
            fut.set_result(None)
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(fut)
        return fut

    def abort_all(self):
        """Abort every connection still open; return how many there were."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        return len(conns)

    def snapshot(self):
        """A list of the connections open now."""
        return list(self._conns)

    def __len__(self):
        return len(self._conns)

    def __contains__(self, conn):
        return conn in self._conns

    def __repr__(self):
        return f"<ConnectionSet open={len(self._conns)}>"


@cython.final
cdef class Acceptor:
    """The protocol factory a site's listener serves with.

    Each accepted connection reads the slot once and asks that service for
    a protocol; the connection keeps that service for its whole life.
    """

    def __cinit__(self, Slot slot, ConnectionSet conns, str name=""):
        self.slot = slot
        self.conns = conns
        self.name = name
        self.errors = 0
        self._logged_at = -1e9

    def __call__(self):
        # An exception escaping a protocol factory makes uvloop close the
        # listening socket for good: one buggy connection must not take the
        # site down, so it is counted, logged and that connection dropped.
        try:
            return self.slot._current.new_connection(self.conns)
        except Exception as exc:
            self.errors += 1
            self._logged_at = _accept_failed(self.name, exc, self.errors, self._logged_at)
            return _Dropped()


def _accept_failed(name, exc, errors, logged_at):
    """Log a failed accept, at most every 10 s per site; return when it logged."""
    now = _monotonic()
    if now - logged_at >= 10.0:
        _accept_log.error("site %r: new_connection failed (%d so far), connection dropped: %s: %s",
                          name, errors, type(exc).__name__, exc)
        return now
    return logged_at


class _Dropped(asyncio.Protocol):
    """The protocol of a connection whose service could not start it."""

    def connection_made(self, transport):
        transport.abort()


# -- the proxy's data path ----------------------------------------------------
#
# One proxied connection is a ``Connection`` (the protocol of the accepted
# client socket; it holds all the state) and an ``UpstreamSide`` (the
# protocol of the socket to the upstream; a trampoline into its Connection).
#
# Lifecycle:  accepted -> connecting (client bytes held, bounded) -> open
# (relaying both ways) -> closing -> finished.  It is finished, exactly
# once, when the client transport is gone *and* the upstream side is gone or
# was never made; finishing releases every count it took.
#
# Reading from a side is paused while any of these holds: the other side's
# write buffer is over its high-water mark, the held early bytes fill their
# buffer, the side sent EOF, or the connection is closing.

cdef enum:
    UP_NONE = 0         # no connect attempt in progress (not started yet)
    UP_CONNECTING = 1   # an attempt is in progress (``pending``)
    UP_OPEN = 2         # attached: relaying
    UP_CLOSED = 3       # the upstream transport is gone, or none could be made

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


cdef inline double _now() noexcept nogil:
    # CLOCK_MONOTONIC, like time.monotonic(): a vDSO call, no Python object.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


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
cdef class RelayConfig:
    """What every connection of one service version shares.

    ``connect(conn)`` starts connecting *conn* to an upstream and returns
    something with ``cancel()`` (a task); ``on_close(conn)``, if given, is
    called once when a connection is finished (the access log).
    """

    def __cinit__(self, ProxyCounters counters not None, double idle_timeout=0.0,
                  bint keepalive=False, object connect=None, object on_close=None,
                  bint want_peername=False, Py_ssize_t buffer_size=16384,
                  Py_ssize_t max_buffer_size=262144):
        if buffer_size < 1 or max_buffer_size < buffer_size:
            raise ValueError("need 1 <= buffer_size <= max_buffer_size")
        self.counters = counters
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.connect = connect
        self.on_close = on_close
        self.want_peername = want_peername
        self.buffer_size = buffer_size
        self.max_buffer_size = max_buffer_size


@cython.final
cdef class Connection:
    """One proxied connection: the protocol of the accepted client socket.

    Constructing one counts it as accepted and active.  *owner* (the service
    version that accepted it) is kept alive until the connection finishes.  The connector
    (``RelayConfig.connect``) drives the upstream side through
    ``upstream_protocol``, ``attempt_failed`` and ``connect_failed``.
    """

    def __cinit__(self, RelayConfig cfg not None, object conns, object owner=None):
        self.cfg = cfg
        self.counters = cfg.counters
        self.conns = conns
        self.owner = owner
        self.c_next = cfg.buffer_size
        self.u_next = cfg.buffer_size
        self.started = _now()
        self.last_active = self.started
        # counted here, not in connection_made: a burst of accepts calls
        # every factory before the first connection_made, and the
        # max_connections check must see them all
        self.counters.accepted += 1
        self.counters.active += 1

    # -- the client transport's callbacks --------------------------------------

    def connection_made(self, transport):
        self.client = transport
        self.c_write = transport.write
        self.client_open = True
        # uvloop starts reading right after this returns even if we paused
        # here, so early bytes are held in c_buf (bounded) instead.
        self.c_reading = True
        self.conns.add(self)
        cfg = self.cfg
        if cfg.want_peername:
            self.peername = transport.get_extra_info("peername")
        if cfg.keepalive:
            _set_keepalive(transport)
        if cfg.idle_timeout > 0:
            self.timer = _get_running_loop().call_later(cfg.idle_timeout, self._idle_fired)
        if cfg.connect is not None:
            self.connector = cfg.connect(self)

    def get_buffer(self, Py_ssize_t sizehint):
        if self.c_buf is None:
            self._new_c_buf(self.c_next)
        if self.early:
            return self.c_mv[self.early:]
        return self.c_buf

    def buffer_updated(self, Py_ssize_t nbytes):
        self.last_active = _now()
        if self.up_state == UP_OPEN:
            if not self.closing:
                self._to_upstream(nbytes)
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
                self.c2u += n
                self.counters.bytes_in += n
                self.u_write(data)
        elif self.up_state != UP_CLOSED:
            self._hold(data)

    def eof_received(self):
        self.c_eof = True
        self.c_reading = False   # the transport stops reading by itself
        if self.up_state == UP_OPEN and not self.closing:
            self.upstream_t.write_eof()   # sent once its buffer is flushed
            if self.u_eof:
                self._shut(END_EOF, False)
        return True   # keep the other direction open: a half-close

    def pause_writing(self):
        # the client reads slower than the upstream sends
        self.u_paused_by_c = True
        self._sync_upstream_reading()

    def resume_writing(self):
        self.u_paused_by_c = False
        self._sync_upstream_reading()

    def connection_lost(self, exc):
        self.client_open = False
        self.c_reading = False
        self._set_end(END_CLOSED if exc is None else END_CLIENT_ERROR)
        if self.up_state == UP_OPEN:
            self.closing = True
            if exc is None:
                self.upstream_t.close()
            else:
                self.upstream_t.abort()
        elif self.up_state == UP_CONNECTING:
            # the attempt ends by attempt_failed() (or attaches and is closed)
            self.closing = True
            if self.connector is not None:
                self.connector.cancel()
        else:
            if self.connector is not None and self.up_state == UP_NONE:
                self.connector.cancel()
            self.up_state = UP_CLOSED
            self._finish()

    def abort(self):
        """Close both sides at once (a drain timed out)."""
        self._shut(END_ABORTED, True)

    def _idle_fired(self):
        cdef double idle
        self.timer = None
        if self._finished or self.closing:
            return
        idle = _now() - self.last_active
        if idle >= self.cfg.idle_timeout:
            self.counters.idle_closed += 1
            self._shut(END_IDLE, True)
        else:
            # traffic since the timer was set: sleep for the rest
            self.timer = _get_running_loop().call_later(
                self.cfg.idle_timeout - idle, self._idle_fired)

    # -- the connector's interface ---------------------------------------------

    def upstream_protocol(self, UpstreamState state not None):
        """Start a connect attempt to *state*'s upstream: the protocol to connect
        with, or None if the client is gone (or an attempt is in progress)."""
        cdef UpstreamSide up
        if self.up_state != UP_NONE or not self.client_open or self.closing:
            return None
        up = UpstreamSide.__new__(UpstreamSide)
        up.conn = self
        up.state = state
        state.active += 1
        self.pending = up
        self.up_state = UP_CONNECTING
        return up

    def attempt_failed(self):
        """The attempt in progress failed: release it.

        Return False if it had connected after all (a timeout that lost the
        race with the connection): nothing is released then.
        """
        if self.up_state != UP_CONNECTING:
            return False
        self.pending.state.active -= 1
        self.pending.conn = None
        self.pending = None
        if self.client_open and not self.closing:
            self.up_state = UP_NONE
        else:
            self.up_state = UP_CLOSED
            self._finish()
        return True

    def connect_failed(self):
        """No upstream could be reached: close the client."""
        if self.up_state != UP_NONE:
            return
        self.up_state = UP_CLOSED
        self.counters.no_upstream += 1
        self._set_end(END_NO_UPSTREAM)
        if self.client_open:
            self.closing = True
            self.client.close()
        else:
            self._finish()

    # -- read-only views (status, access log, tests) ---------------------------

    @property
    def upstream(self):
        """The attached upstream's UpstreamState (None if none was reached)."""
        return self.ustate

    @property
    def client_transport(self):
        """The client's transport (None once finished)."""
        return self.client

    @property
    def upstream_transport(self):
        """The upstream's transport (None until attached, and once finished)."""
        return self.upstream_t

    @property
    def bytes_in(self):
        """Bytes relayed from the client to the upstream."""
        return self.c2u

    @property
    def bytes_out(self):
        """Bytes relayed from the upstream to the client."""
        return self.u2c

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
        return self._finished or (self.client is not None and not self.client_open)

    @property
    def finished(self):
        """True once both sides are gone and every count is released."""
        return self._finished

    @property
    def buffered(self):
        """Bytes this connection holds in memory: its read buffers and both
        transports' write buffers (for tests of back-pressure)."""
        cdef Py_ssize_t n = self.c_size + self.u_size
        if self.client is not None and self.client_open:
            n += self.client.get_write_buffer_size()
        if self.up_state == UP_OPEN:
            n += self.upstream_t.get_write_buffer_size()
        return n

    def __repr__(self):
        return (f"<Connection {self.peername!r} up={self.ustate.address if self.ustate else None} "
                f"in={self.c2u} out={self.u2c} {self.end}>")

    # -- internals -------------------------------------------------------------

    cdef _new_c_buf(self, Py_ssize_t size):
        self.c_buf = bytearray(size)
        self.c_mv = memoryview(self.c_buf)
        self.c_size = size

    cdef _new_u_buf(self, Py_ssize_t size):
        self.u_buf = bytearray(size)
        self.u_mv = memoryview(self.u_buf)
        self.u_size = size

    cdef _to_upstream(self, Py_ssize_t n):
        cdef Py_ssize_t size = self.c_size
        self.c2u += n
        self.counters.bytes_in += n
        self.u_write(self.c_buf if n == size else self.c_mv[:n])
        if n == size and size < self.cfg.max_buffer_size:
            # a full read: a bulk transfer, read bigger chunks
            self.c_next = min(size * 2, self.cfg.max_buffer_size)
            self.c_buf = None
            self.c_size = 0
        elif self.up_state == UP_OPEN and self.upstream_t.get_write_buffer_size():
            # the transport still holds a view of c_buf: take a fresh one
            self.c_buf = None
            self.c_size = 0

    cdef _to_client(self, Py_ssize_t n):
        cdef Py_ssize_t size = self.u_size
        self.u2c += n
        self.counters.bytes_out += n
        self.c_write(self.u_buf if n == size else self.u_mv[:n])
        if n == size and size < self.cfg.max_buffer_size:
            self.u_next = min(size * 2, self.cfg.max_buffer_size)
            self.u_buf = None
            self.u_size = 0
        elif self.client_open and self.client.get_write_buffer_size():
            self.u_buf = None
            self.u_size = 0

    cdef _hold(self, object data):
        # data_received() before attach: copy into c_buf, growing it if needed;
        # reading pauses once buffer_size bytes are held.
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
        cdef bint want = (self.client_open and not self.closing and not self.c_eof
                          and not self.c_paused_by_up and not self.c_early_full)
        if want != self.c_reading:
            self.c_reading = want
            if want:
                self.client.resume_reading()
            else:
                self.client.pause_reading()

    cdef _sync_upstream_reading(self):
        cdef bint want = (self.up_state == UP_OPEN and not self.closing and not self.u_eof
                          and not self.u_paused_by_c)
        if want != self.u_reading:
            self.u_reading = want
            if want:
                self.upstream_t.resume_reading()
            else:
                self.upstream_t.pause_reading()

    cdef _set_end(self, int code):
        if self.end_code == END_NONE:
            self.end_code = code

    cdef _shut(self, int code, bint hard):
        # Close both sides: gracefully (flush what is buffered) or at once.
        self._set_end(code)
        if self._finished:
            return
        self.closing = True
        if self.client_open:
            if hard:
                self.client.abort()
            else:
                self.client.close()
        if self.up_state == UP_OPEN:
            if hard:
                self.upstream_t.abort()
            else:
                self.upstream_t.close()
        elif self.up_state == UP_CONNECTING and self.connector is not None:
            self.connector.cancel()

    cdef _attach(self, UpstreamSide up, object transport):
        cdef Py_ssize_t n
        if up is not self.pending:
            transport.abort()   # a stale attempt (cannot happen on uvloop)
            return
        up.attached = True
        self.pending = None
        self.up_proto = up
        self.ustate = up.state
        self.upstream_t = transport
        self.u_write = transport.write
        self.up_state = UP_OPEN
        self.u_reading = True
        up.state.connections += 1
        if self.cfg.keepalive:
            _set_keepalive(transport)
        if not self.client_open or self.closing:
            self.closing = True
            transport.close()
            return
        if self.early:
            n = self.early
            self.early = 0
            self.c_early_full = False
            self._to_upstream(n)
        if self.c_eof:
            transport.write_eof()
        self._sync_client_reading()
        self._sync_upstream_reading()

    cdef _upstream_data(self, Py_ssize_t n):
        self.last_active = _now()
        if self.client_open and not self.closing:
            self._to_client(n)

    cdef _upstream_bytes(self, object data):
        cdef Py_ssize_t n = len(data)
        self.last_active = _now()
        if self.client_open and not self.closing:
            self.u2c += n
            self.counters.bytes_out += n
            self.c_write(data)

    cdef _upstream_eof(self):
        self.u_eof = True
        self.u_reading = False
        if self.client_open and not self.closing:
            self.client.write_eof()
            if self.c_eof:
                self._shut(END_EOF, False)

    cdef _upstream_lost(self, object exc):
        self.up_state = UP_CLOSED
        self.u_reading = False
        if exc is not None:
            self._set_end(END_UPSTREAM_ERROR)
        if self.client_open:
            self._shut(END_CLOSED, exc is not None)
        else:
            self._finish()

    cdef _finish(self):
        if self._finished:
            return
        self._finished = True
        self.closing = True
        self.ended = _now()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.connector = None
        self.counters.active -= 1
        if self.ustate is not None:
            self.ustate.active -= 1
            self.ustate.bytes_in += self.c2u
            self.ustate.bytes_out += self.u2c
        if self.up_proto is not None:
            self.up_proto.conn = None
            self.up_proto = None
        self.c_buf = self.u_buf = None
        self.c_mv = self.u_mv = None
        self.c_size = self.u_size = 0
        self.c_write = self.u_write = None
        self.client = self.upstream_t = None
        self.conns.discard(self)
        if self.cfg.on_close is not None:
            self.cfg.on_close(self)
        self.owner = None   # the last connection of an old version frees it


@cython.final
cdef class UpstreamSide:
    """The protocol of one connect attempt's socket; relays into its Connection.

    Every method takes a local reference to its Connection first: finishing
    drops ``self.conn``, and the Connection must outlive the call.
    """

    def connection_made(self, transport):
        cdef Connection conn = self.conn
        if conn is None:
            transport.abort()
            return
        conn._attach(self, transport)

    def get_buffer(self, Py_ssize_t sizehint):
        cdef Connection conn = self.conn
        if conn is None:
            return bytearray(sizehint if sizehint > 0 else 4096)   # finished: discard
        if conn.u_buf is None:
            conn._new_u_buf(conn.u_next)
        return conn.u_buf

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef Connection conn = self.conn
        if conn is not None:
            conn._upstream_data(nbytes)

    def data_received(self, data):
        cdef Connection conn = self.conn
        if conn is not None:
            conn._upstream_bytes(data)

    def eof_received(self):
        cdef Connection conn = self.conn
        if conn is not None:
            conn._upstream_eof()
        return True

    def pause_writing(self):
        # the upstream reads slower than the client sends
        cdef Connection conn = self.conn
        if conn is not None:
            conn.c_paused_by_up = True
            conn._sync_client_reading()

    def resume_writing(self):
        cdef Connection conn = self.conn
        if conn is not None:
            conn.c_paused_by_up = False
            conn._sync_client_reading()

    def connection_lost(self, exc):
        cdef Connection conn = self.conn
        if self.attached and conn is not None:
            conn._upstream_lost(exc)
