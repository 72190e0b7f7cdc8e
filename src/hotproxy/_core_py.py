"""The pure-Python twin of ``_core.pyx``: same names, same behaviour.

Used when the extension is missing or ``HOTPROXY_NO_EXTENSIONS=1``; the
test-suite runs against both.  Keep the two files in step.
"""

from __future__ import annotations

import asyncio
import logging
import socket as _socket
import time
from typing import Any


class Slot:
    """The current service of one site (see ``_core.pyx``)."""

    __slots__ = ("_current",)

    def __init__(self, current: Any = None) -> None:
        self._current = current

    @property
    def current(self) -> Any:
        """The service that new connections get (None before the first commit)."""
        return self._current

    def swap(self, new: Any) -> Any:
        """Publish *new*; return the service it replaces."""
        old = self._current
        self._current = new
        return old

    def __repr__(self) -> str:
        return f"<Slot {self._current!r}>"


class ConnectionSet:
    """The open connections of a site (see ``_core.pyx``)."""

    __slots__ = ("_conns", "parent", "_waiters")

    def __init__(self, parent: ConnectionSet | None = None) -> None:
        self._conns: set[Any] = set()
        self.parent = parent
        self._waiters: list[asyncio.Future[None]] | None = None

    def add(self, conn: Any) -> None:
        """Track *conn* (and in the parent set, if any)."""
        self._conns.add(conn)
        if self.parent is not None:
            self.parent.add(conn)

    def discard(self, conn: Any) -> None:
        """Stop tracking *conn*; wake ``wait_empty`` waiters when none are left."""
        self._conns.discard(conn)
        if self.parent is not None:
            self.parent.discard(conn)
        if self._waiters is not None and not self._conns:
            waiters, self._waiters = self._waiters, None
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def wait_empty(self) -> asyncio.Future[None]:
        """A future that is done once no connection is left."""
        fut = asyncio.get_running_loop().create_future()
        if not self._conns:
            fut.set_result(None)
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(fut)
        return fut

    def abort_all(self) -> int:
        """Abort every connection still open; return how many there were."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        return len(conns)

    def snapshot(self) -> list[Any]:
        """A list of the connections open now."""
        return list(self._conns)

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, conn: object) -> bool:
        return conn in self._conns

    def __repr__(self) -> str:
        return f"<ConnectionSet open={len(self._conns)}>"


class Acceptor:
    """The protocol factory a site's listener serves with (see ``_core.pyx``)."""

    __slots__ = ("slot", "conns", "name", "errors", "_logged_at")

    def __init__(self, slot: Slot, conns: ConnectionSet, name: str = "") -> None:
        self.slot = slot
        self.conns = conns
        self.name = name
        self.errors = 0
        self._logged_at = -1e9

    def __call__(self) -> asyncio.BaseProtocol:
        # An exception escaping a protocol factory makes the loop close the
        # listening socket for good: count it, log it, drop that connection.
        try:
            return self.slot._current.new_connection(self.conns)  # type: ignore[no-any-return]
        except Exception as exc:
            self.errors += 1
            self._logged_at = _accept_failed(self.name, exc, self.errors, self._logged_at)
            return _Dropped()


_accept_log = logging.getLogger("hotproxy.accept")


def _accept_failed(name: str, exc: Exception, errors: int, logged_at: float) -> float:
    """Log a failed accept, at most every 10 s per site; return when it logged."""
    now = time.monotonic()
    if now - logged_at >= 10.0:
        _accept_log.error("site %r: new_connection failed (%d so far), connection dropped: %s: %s",
                          name, errors, type(exc).__name__, exc)
        return now
    return logged_at


class _Dropped(asyncio.Protocol):
    """The protocol of a connection whose service could not start it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


# -- the proxy's data path (see _core.pyx for the rules) ---------------------

UP_NONE, UP_CONNECTING, UP_OPEN, UP_CLOSED = 0, 1, 2, 3
(END_NONE, END_EOF, END_CLIENT_ERROR, END_UPSTREAM_ERROR, END_IDLE, END_ABORTED,
 END_NO_UPSTREAM, END_CLOSED) = range(8)
_END_NAMES = ("open", "eof", "client_error", "upstream_error", "idle", "aborted",
              "no_upstream", "closed")

_now = time.monotonic


def _set_keepalive(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (_socket.AF_INET, _socket.AF_INET6):
        return
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


class ProxyCounters:
    """A proxy's service counters, shared by every version of the service."""

    __slots__ = ("accepted", "active", "bytes_in", "bytes_out", "connect_failures", "refused",
                 "idle_closed", "no_upstream")

    def __init__(self) -> None:
        self.accepted = self.active = self.bytes_in = self.bytes_out = 0
        self.connect_failures = self.refused = self.idle_closed = self.no_upstream = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"<ProxyCounters {self.as_dict()!r}>"


class UpstreamState:
    """One upstream address's live state, shared by every service version."""

    __slots__ = ("address", "active", "fails", "ejected_until", "connections", "failures",
                 "bytes_in", "bytes_out")

    def __init__(self, address: str) -> None:
        if address is None:
            raise TypeError("address must be a str")
        self.address = address
        self.active = self.fails = self.connections = self.failures = 0
        self.bytes_in = self.bytes_out = 0
        self.ejected_until = 0.0

    def __repr__(self) -> str:
        return (f"<UpstreamState {self.address} active={self.active} fails={self.fails} "
                f"ejected_until={self.ejected_until:.3f}>")


class RelayConfig:
    """What every connection of one service version shares (see ``_core.pyx``)."""

    __slots__ = ("counters", "idle_timeout", "keepalive", "connect", "on_close", "want_peername",
                 "buffer_size", "max_buffer_size")

    def __init__(self, counters: ProxyCounters, idle_timeout: float = 0.0, keepalive: bool = False,
                 connect: Any = None, on_close: Any = None, want_peername: bool = False,
                 buffer_size: int = 16384, max_buffer_size: int = 262144) -> None:
        if not isinstance(counters, ProxyCounters):
            raise TypeError("counters must be a ProxyCounters")
        if buffer_size < 1 or max_buffer_size < buffer_size:
            raise ValueError("need 1 <= buffer_size <= max_buffer_size")
        self.counters = counters
        self.idle_timeout = float(idle_timeout)
        self.keepalive = bool(keepalive)
        self.connect = connect
        self.on_close = on_close
        self.want_peername = bool(want_peername)
        self.buffer_size = buffer_size
        self.max_buffer_size = max_buffer_size


class Connection:
    """One proxied connection: the protocol of the accepted client socket."""

    __slots__ = ("cfg", "counters", "conns", "owner", "client", "upstream_t", "c_write", "u_write", "pending",
                 "up_proto", "ustate", "c_buf", "u_buf", "c_mv", "u_mv", "c_size", "u_size",
                 "c_next", "u_next", "early", "c2u", "u2c", "started", "ended", "last_active",
                 "timer", "connector", "peername", "up_state", "end_code", "client_open",
                 "c_reading", "u_reading", "c_eof", "u_eof", "c_paused_by_up", "u_paused_by_c",
                 "c_early_full", "closing", "_finished", "__weakref__")

    def __init__(self, cfg: RelayConfig, conns: Any, owner: Any = None) -> None:
        if not isinstance(cfg, RelayConfig):
            raise TypeError("cfg must be a RelayConfig")
        self.cfg = cfg
        self.counters = cfg.counters
        self.conns = conns
        self.owner = owner   # the service version, alive while we are
        self.client: Any = None
        self.upstream_t: Any = None
        self.c_write: Any = None
        self.u_write: Any = None
        self.pending: UpstreamSide | None = None
        self.up_proto: UpstreamSide | None = None
        self.ustate: UpstreamState | None = None
        self.c_buf: bytearray | None = None
        self.u_buf: bytearray | None = None
        self.c_mv: memoryview | None = None
        self.u_mv: memoryview | None = None
        self.c_size = self.u_size = 0
        self.c_next = self.u_next = cfg.buffer_size
        self.early = 0
        self.c2u = self.u2c = 0
        self.started = self.last_active = _now()
        self.ended = 0.0
        self.timer: Any = None
        self.connector: Any = None
        self.peername: Any = None
        self.up_state = UP_NONE
        self.end_code = END_NONE
        self.client_open = self.c_reading = self.u_reading = False
        self.c_eof = self.u_eof = False
        self.c_paused_by_up = self.u_paused_by_c = self.c_early_full = False
        self.closing = self._finished = False
        # counted here, not in connection_made (see _core.pyx)
        self.counters.accepted += 1
        self.counters.active += 1

    # -- the client transport's callbacks --------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.client = transport
        self.c_write = transport.write
        self.client_open = True
        self.c_reading = True
        self.conns.add(self)
        cfg = self.cfg
        if cfg.want_peername:
            self.peername = transport.get_extra_info("peername")
        if cfg.keepalive:
            _set_keepalive(transport)
        if cfg.idle_timeout > 0:
            self.timer = asyncio.get_running_loop().call_later(cfg.idle_timeout, self._idle_fired)
        if cfg.connect is not None:
            self.connector = cfg.connect(self)

    def get_buffer(self, sizehint: int) -> Any:
        if self.c_buf is None:
            self._new_c_buf(self.c_next)
        if self.early:
            return self.c_mv[self.early:]  # type: ignore[index]
        return self.c_buf

    def buffer_updated(self, nbytes: int) -> None:
        self.last_active = _now()
        if self.up_state == UP_OPEN:
            if not self.closing:
                self._to_upstream(nbytes)
        elif self.up_state != UP_CLOSED:
            self.early += nbytes
            if self.early >= self.c_size:
                self.c_early_full = True
                self._sync_client_reading()

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.last_active = _now()
        if self.up_state == UP_OPEN:
            if not self.closing:
                self.c2u += n
                self.counters.bytes_in += n
                self.u_write(data)
        elif self.up_state != UP_CLOSED:
            self._hold(data)

    def eof_received(self) -> bool:
        self.c_eof = True
        self.c_reading = False
        if self.up_state == UP_OPEN and not self.closing:
            self.upstream_t.write_eof()
            if self.u_eof:
                self._shut(END_EOF, False)
        return True

    def pause_writing(self) -> None:
        self.u_paused_by_c = True
        self._sync_upstream_reading()

    def resume_writing(self) -> None:
        self.u_paused_by_c = False
        self._sync_upstream_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
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
            self.closing = True
            if self.connector is not None:
                self.connector.cancel()
        else:
            if self.connector is not None and self.up_state == UP_NONE:
                self.connector.cancel()
            self.up_state = UP_CLOSED
            self._finish()

    def abort(self) -> None:
        """Close both sides at once (a drain timed out)."""
        self._shut(END_ABORTED, True)

    def _idle_fired(self) -> None:
        self.timer = None
        if self._finished or self.closing:
            return
        idle = _now() - self.last_active
        if idle >= self.cfg.idle_timeout:
            self.counters.idle_closed += 1
            self._shut(END_IDLE, True)
        else:
            self.timer = asyncio.get_running_loop().call_later(
                self.cfg.idle_timeout - idle, self._idle_fired)

    # -- the connector's interface ---------------------------------------------

    def upstream_protocol(self, state: UpstreamState) -> UpstreamSide | None:
        """Start a connect attempt to *state*'s upstream (see ``_core.pyx``)."""
        if not isinstance(state, UpstreamState):
            raise TypeError("state must be an UpstreamState")
        if self.up_state != UP_NONE or not self.client_open or self.closing:
            return None
        up = UpstreamSide(self, state)
        state.active += 1
        self.pending = up
        self.up_state = UP_CONNECTING
        return up

    def attempt_failed(self) -> bool:
        """The attempt in progress failed: release it (see ``_core.pyx``)."""
        if self.up_state != UP_CONNECTING:
            return False
        pending = self.pending
        assert pending is not None
        pending.state.active -= 1
        pending.conn = None
        self.pending = None
        if self.client_open and not self.closing:
            self.up_state = UP_NONE
        else:
            self.up_state = UP_CLOSED
            self._finish()
        return True

    def connect_failed(self) -> None:
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

    # -- read-only views -------------------------------------------------------

    @property
    def upstream(self) -> UpstreamState | None:
        """The attached upstream's UpstreamState (None if none was reached)."""
        return self.ustate

    @property
    def client_transport(self) -> Any:
        """The client's transport (None once finished)."""
        return self.client

    @property
    def upstream_transport(self) -> Any:
        """The upstream's transport (None until attached, and once finished)."""
        return self.upstream_t

    @property
    def bytes_in(self) -> int:
        """Bytes relayed from the client to the upstream."""
        return self.c2u

    @property
    def bytes_out(self) -> int:
        """Bytes relayed from the upstream to the client."""
        return self.u2c

    @property
    def held(self) -> int:
        """Client bytes held while the upstream connects."""
        return self.early

    @property
    def duration(self) -> float:
        """Seconds from accept to finish (or until now)."""
        return (self.ended if self._finished else _now()) - self.started

    @property
    def end(self) -> str:
        """How it ended (see ``_core.pyx``), or "open"."""
        return _END_NAMES[self.end_code]

    @property
    def closed(self) -> bool:
        """True once the client connection is gone."""
        return self._finished or (self.client is not None and not self.client_open)

    @property
    def finished(self) -> bool:
        """True once both sides are gone and every count is released."""
        return self._finished

    @property
    def buffered(self) -> int:
        """Bytes this connection holds in memory (read buffers + write buffers)."""
        n = self.c_size + self.u_size
        if self.client is not None and self.client_open:
            n += self.client.get_write_buffer_size()
        if self.up_state == UP_OPEN:
            n += self.upstream_t.get_write_buffer_size()
        return n

    def __repr__(self) -> str:
        up = self.ustate.address if self.ustate else None
        return f"<Connection {self.peername!r} up={up} in={self.c2u} out={self.u2c} {self.end}>"

    # -- internals -------------------------------------------------------------

    def _new_c_buf(self, size: int) -> None:
        self.c_buf = bytearray(size)
        self.c_mv = memoryview(self.c_buf)
        self.c_size = size

    def _new_u_buf(self, size: int) -> None:
        self.u_buf = bytearray(size)
        self.u_mv = memoryview(self.u_buf)
        self.u_size = size

    def _to_upstream(self, n: int) -> None:
        size = self.c_size
        self.c2u += n
        self.counters.bytes_in += n
        self.u_write(self.c_buf if n == size else self.c_mv[:n])  # type: ignore[index]
        if n == size and size < self.cfg.max_buffer_size:
            self.c_next = min(size * 2, self.cfg.max_buffer_size)
            self.c_buf = self.c_mv = None
            self.c_size = 0
        elif self.up_state == UP_OPEN and self.upstream_t.get_write_buffer_size():
            self.c_buf = self.c_mv = None
            self.c_size = 0

    def _to_client(self, n: int) -> None:
        size = self.u_size
        self.u2c += n
        self.counters.bytes_out += n
        self.c_write(self.u_buf if n == size else self.u_mv[:n])  # type: ignore[index]
        if n == size and size < self.cfg.max_buffer_size:
            self.u_next = min(size * 2, self.cfg.max_buffer_size)
            self.u_buf = self.u_mv = None
            self.u_size = 0
        elif self.client_open and self.client.get_write_buffer_size():
            self.u_buf = self.u_mv = None
            self.u_size = 0

    def _hold(self, data: bytes) -> None:
        n = len(data)
        need = self.early + n
        if self.c_buf is None or need > self.c_size:
            old, old_n = self.c_buf, self.early
            self._new_c_buf(max(need, self.cfg.buffer_size))
            if old_n:
                self.c_buf[:old_n] = old[:old_n]  # type: ignore[index]
        self.c_buf[self.early:need] = data  # type: ignore[index]
        self.early = need
        if self.early >= self.cfg.buffer_size:
            self.c_early_full = True
            self._sync_client_reading()

    def _sync_client_reading(self) -> None:
        want = (self.client_open and not self.closing and not self.c_eof
                and not self.c_paused_by_up and not self.c_early_full)
        if want != self.c_reading:
            self.c_reading = want
            if want:
                self.client.resume_reading()
            else:
                self.client.pause_reading()

    def _sync_upstream_reading(self) -> None:
        want = (self.up_state == UP_OPEN and not self.closing and not self.u_eof
                and not self.u_paused_by_c)
        if want != self.u_reading:
            self.u_reading = want
            if want:
                self.upstream_t.resume_reading()
            else:
                self.upstream_t.pause_reading()

    def _set_end(self, code: int) -> None:
        if self.end_code == END_NONE:
            self.end_code = code

    def _shut(self, code: int, hard: bool) -> None:
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

    def _attach(self, up: UpstreamSide, transport: Any) -> None:
        if up is not self.pending:
            transport.abort()
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

    def _upstream_data(self, n: int) -> None:
        self.last_active = _now()
        if self.client_open and not self.closing:
            self._to_client(n)

    def _upstream_bytes(self, data: bytes) -> None:
        n = len(data)
        self.last_active = _now()
        if self.client_open and not self.closing:
            self.u2c += n
            self.counters.bytes_out += n
            self.c_write(data)

    def _upstream_eof(self) -> None:
        self.u_eof = True
        self.u_reading = False
        if self.client_open and not self.closing:
            self.client.write_eof()
            if self.c_eof:
                self._shut(END_EOF, False)

    def _upstream_lost(self, exc: BaseException | None) -> None:
        self.up_state = UP_CLOSED
        self.u_reading = False
        if exc is not None:
            self._set_end(END_UPSTREAM_ERROR)
        if self.client_open:
            self._shut(END_CLOSED, exc is not None)
        else:
            self._finish()

    def _finish(self) -> None:
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
        self.owner = None


class UpstreamSide:
    """The protocol of one connect attempt's socket; relays into its Connection."""

    __slots__ = ("conn", "state", "attached")

    def __init__(self, conn: Connection, state: UpstreamState) -> None:
        self.conn: Connection | None = conn
        self.state = state
        self.attached = False

    def connection_made(self, transport: Any) -> None:
        if self.conn is None:
            transport.abort()
            return
        self.conn._attach(self, transport)

    def get_buffer(self, sizehint: int) -> Any:
        conn = self.conn
        if conn is None:
            return bytearray(sizehint if sizehint > 0 else 4096)   # finished: discard
        if conn.u_buf is None:
            conn._new_u_buf(conn.u_next)
        return conn.u_buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.conn is not None:
            self.conn._upstream_data(nbytes)

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn._upstream_bytes(data)

    def eof_received(self) -> bool:
        if self.conn is not None:
            self.conn._upstream_eof()
        return True

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.c_paused_by_up = True
            self.conn._sync_client_reading()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.c_paused_by_up = False
            self.conn._sync_client_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.attached and self.conn is not None:
            self.conn._upstream_lost(exc)
