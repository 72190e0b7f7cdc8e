# cython: annotation_typing=False
"""The relay's logic without its system calls, one source for both cores.

Cython compiles this file, typed by ``_core_machine.pxd`` (pure-Python
mode: the ``.pxd`` augments it), into ``hotproxy._core_machine``, which the
compiled core cimports; the pure-Python twin runs this very file as plain
Python (``_core_py`` loads the source even where the extension is built).
It makes no system call on a socket and imports nothing of the project, so
its parts can be tested without sockets (``tests/test_relay_state.py``).

What lives here:

* ``Direction``: one direction of a proxied connection (client to upstream,
  or upstream to client), read from its *source* socket and written to its
  *destination*.  The relay keeps two and drives them with the same state
  machine: ``Direction.step(event)`` moves it to its next state and returns
  what the relay must do to the destination (``ACT_*``).  The transitions
  are one table (``transition``), the only place that says what follows
  what.
* ``TimerWheel``: the connections' deadlines, in buckets of ``resolution``
  seconds, so a tick touches only the connections that are due;
  ``EngineBase``: an engine's timer over it and its ready list (each core's
  engine adds its epoll set).
* ``Slot``, ``ConnectionSet``, ``Acceptor``: a site's current service, its
  open connections, and the protocol factory it serves with (``Counter``:
  what each core's ``SharedCounter`` is).
* ``ProxyCounters``, ``UpstreamState``, ``Target``, ``RelayConfig``: what a
  service version shares with its connections.
* ``Relay``: one proxied connection -- connecting, holding, relaying each
  way, half-closes, timeouts, closing, counting -- less the system calls,
  which each core's ``Connection`` (a ``Relay``) adds through a few hooks.

Direction states (``D_*``)::

    HOLD       the destination is not connected yet: source bytes are held
    HOLD_EOF   the same, and the source's EOF has arrived
    OPEN       relaying; nothing is pending
    BLOCKED    the destination took less than it was given (bytes pending,
               or it asked to pause): the source is not read meanwhile
    EOF_PEND   the source's EOF arrived while bytes are pending: the
               destination gets its EOF once they are written
    SHUT       the source's EOF was passed on (shutdown(SHUT_WR)): done
    CLOSING    the connection closes: the destination is closed once the
               pending bytes are written
    CLOSED     closed, or failed

Events (``EV_*``): READ (source bytes went through), FULL (the destination
took less: bytes pending), DRAINED (every pending byte is written, or the
destination resumed), EOF (the source's EOF), CONNECTED (the destination
is connected), CLOSE (close after the pending bytes), ERROR (a socket
failed, or close at once).

Actions (``ACT_*``): NONE; SHUT (send the destination our EOF); CLOSE
(close the destination now); ABORT (close both sides at once).
"""

from __future__ import annotations

import asyncio as _asyncio
import logging
import os as _os
import socket as _socket
import time as _time
from array import array as _array
from heapq import heappop as _heappop, heappush as _heappush
from typing import Any

# -- direction states, events and actions ---------------------------------------------
# (plain module globals here; C variables in the compiled module, see the .pxd)

D_HOLD = 0
D_HOLD_EOF = 1
D_OPEN = 2
D_BLOCKED = 3
D_EOF_PEND = 4
D_SHUT = 5
D_CLOSING = 6
D_CLOSED = 7
N_STATES = 8

EV_READ = 0
EV_FULL = 1
EV_DRAINED = 2
EV_EOF = 3
EV_CONNECTED = 4
EV_CLOSE = 5
EV_ERROR = 6
N_EVENTS = 7

ACT_NONE = 0
ACT_SHUT = 1
ACT_CLOSE = 2
ACT_ABORT = 3

# copy through a buffer; a bulk transfer (splice through a pipe next); splicing
M_COPY = 0
M_BULK = 1
M_SPLICE = 2

STATE_NAMES = ("hold", "hold_eof", "open", "blocked", "eof_pend", "shut", "closing", "closed")
EVENT_NAMES = ("read", "full", "drained", "eof", "connected", "close", "error")
ACTION_NAMES = ("none", "shut", "close", "abort")

# What follows what: {state: {event: (next state, action)}}.  An event not
# listed for a state leaves it as it is and asks for nothing (it cannot
# happen there, or means nothing any more: anything after CLOSED).
_RULES: dict[int, dict[int, tuple[int, int]]] = {
    D_HOLD: {
        EV_READ: (D_HOLD, ACT_NONE), EV_FULL: (D_HOLD, ACT_NONE),
        EV_DRAINED: (D_HOLD, ACT_NONE), EV_EOF: (D_HOLD_EOF, ACT_NONE),
        EV_CONNECTED: (D_OPEN, ACT_NONE), EV_CLOSE: (D_CLOSED, ACT_NONE),
        EV_ERROR: (D_CLOSED, ACT_ABORT),
    },
    D_HOLD_EOF: {
        EV_CONNECTED: (D_EOF_PEND, ACT_NONE), EV_CLOSE: (D_CLOSED, ACT_NONE),
        EV_ERROR: (D_CLOSED, ACT_ABORT),
    },
    D_OPEN: {
        EV_READ: (D_OPEN, ACT_NONE), EV_FULL: (D_BLOCKED, ACT_NONE),
        EV_DRAINED: (D_OPEN, ACT_NONE), EV_EOF: (D_SHUT, ACT_SHUT),
        EV_CLOSE: (D_CLOSED, ACT_CLOSE), EV_ERROR: (D_CLOSED, ACT_ABORT),
    },
    D_BLOCKED: {
        EV_READ: (D_BLOCKED, ACT_NONE), EV_FULL: (D_BLOCKED, ACT_NONE),
        EV_DRAINED: (D_OPEN, ACT_NONE), EV_EOF: (D_EOF_PEND, ACT_NONE),
        EV_CLOSE: (D_CLOSING, ACT_NONE), EV_ERROR: (D_CLOSED, ACT_ABORT),
    },
    D_EOF_PEND: {
        EV_FULL: (D_EOF_PEND, ACT_NONE), EV_DRAINED: (D_SHUT, ACT_SHUT),
        EV_CLOSE: (D_CLOSING, ACT_NONE), EV_ERROR: (D_CLOSED, ACT_ABORT),
    },
    D_SHUT: {
        EV_CLOSE: (D_CLOSED, ACT_CLOSE), EV_ERROR: (D_CLOSED, ACT_ABORT),
    },
    D_CLOSING: {
        EV_FULL: (D_CLOSING, ACT_NONE), EV_DRAINED: (D_CLOSED, ACT_CLOSE),
        EV_ERROR: (D_CLOSED, ACT_ABORT),
    },
    D_CLOSED: {},
}


def _build_table() -> list[int]:
    # one int per (state, event): next state | action << 4
    table = []
    for state in range(N_STATES):
        for event in range(N_EVENTS):
            nxt, act = _RULES[state].get(event, (state, ACT_NONE))
            table.append(nxt | act << 4)
    return table


_TABLE = _build_table()


def transition(state: int, event: int) -> tuple[int, int]:
    """The state that *event* moves a direction in *state* to, and the action
    the relay must take: ``(next_state, action)``."""
    if not (0 <= state < N_STATES and 0 <= event < N_EVENTS):
        raise ValueError(f"no state {state} or event {event}")
    t = _TABLE[state * N_EVENTS + event]
    return t & 15, t >> 4


def eof_seen(state: int) -> bool:
    """True if the source's EOF has arrived (and the direction is not closing)."""
    return state == D_HOLD_EOF or state == D_EOF_PEND or state == D_SHUT


def may_read(state: int) -> bool:
    """True if the source may be read in *state* (the connection permitting)."""
    return state == D_OPEN or state == D_HOLD


class Direction:
    """One direction of a proxied connection (see the module's docstring).

    Besides its state it keeps what each core's relay needs to move bytes
    that way: the read buffer (``buf``, ``size``; ``next``: the size of the
    next one, doubled after each full read up to the maximum), the bytes
    not written yet (``buf[pend_off:pend_end]``, or that many in the pipe),
    whether the source may hold bytes (``readable``: edge-triggered readiness
    is reported once) and has sent its EOF (``rdhup``), how bytes move
    (``mode``: ``M_COPY``, ``M_BULK`` or ``M_SPLICE`` through the pipe
    ``pipe_r``/``pipe_w``) and how many went through (``nbytes``).
    """

    def __init__(self, state: int, size: int) -> None:
        self.state = state
        self.mode = M_COPY
        self.readable = False
        self.rdhup = False
        self.pend_off = 0
        self.pend_end = 0
        self.size = 0
        self.next = size
        self.nbytes = 0
        self.buf: bytearray | None = None
        self.mv: memoryview | None = None
        self.pipe_r = -1
        self.pipe_w = -1

    def step(self, event: int) -> int:
        """Move to the state that *event* leads to; return the action (``ACT_*``)."""
        t = _TABLE[self.state * N_EVENTS + event]
        self.state = t & 15
        return t >> 4

    def eof(self) -> bool:
        """True if the source's EOF has arrived (and the direction is not closing)."""
        state = self.state
        return state == D_HOLD_EOF or state == D_EOF_PEND or state == D_SHUT

    @property
    def state_name(self) -> str:
        """The state's name (``STATE_NAMES``)."""
        return STATE_NAMES[self.state]

    def __repr__(self) -> str:
        return (f"<Direction {STATE_NAMES[self.state]} pending={self.pend_end - self.pend_off} "
                f"bytes={self.nbytes}>")


# -- timers ------------------------------------------------------------------------------


class TimerWheel:
    """Deadlines of objects (connections), in buckets of *resolution* seconds.

    ``arm(obj, at)`` makes sure *obj* is looked at by time *at* (never later,
    up to one *resolution* earlier); arming an object that is due sooner
    already changes nothing.  ``expire(now)`` takes out and returns every
    object whose bucket is due.  The caller checks each one's real deadline
    and arms it again if it is not due yet, so an idle timeout needs no
    timer work while a connection is active: it records when it was, and is
    armed again once, when its old deadline comes.

    A bucket is keyed by its tick (``ceil(at / resolution)``); a heap holds
    the ticks that have a bucket.  ``arm`` and ``discard`` are a few dict
    operations; ``expire`` costs the buckets it empties, and nothing for
    objects that are not due.
    """

    def __init__(self, resolution: float) -> None:
        if not resolution > 0:
            raise ValueError("need resolution > 0")
        self.resolution = resolution
        self._buckets: dict[int, dict[object, None]] = {}   # tick -> {obj: None}
        self._ticks: list[int] = []     # heap of the ticks that have a bucket
        self._where: dict[object, int] = {}   # obj -> its tick

    def _tick_of(self, at: float) -> int:
        tick = int(at / self.resolution)
        if tick * self.resolution < at:
            tick += 1
        return tick

    def arm(self, obj: object, at: float) -> float:
        """Make sure *obj* is due by *at* (an earlier arming stands); return
        when it is due."""
        tick = self._tick_of(at)
        old = self._where.get(obj)
        if old is not None:
            if old <= tick:
                return old * self.resolution
            bucket = self._buckets.get(old)
            if bucket is not None:
                bucket.pop(obj, None)
        self._where[obj] = tick
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = {}
            self._buckets[tick] = bucket
            _heappush(self._ticks, tick)
        bucket[obj] = None
        return tick * self.resolution

    def discard(self, obj: object) -> None:
        """Forget *obj* (it has no deadline any more)."""
        tick = self._where.pop(obj, None)
        if tick is not None:
            bucket = self._buckets.get(tick)
            if bucket is not None:
                bucket.pop(obj, None)

    def expire(self, now: float) -> list[object]:
        """Take out and return the objects whose bucket is due at *now*."""
        due: list[object] = []
        ticks = self._ticks
        limit = int(now / self.resolution)
        while ticks and ticks[0] <= limit:
            tick = _heappop(ticks)
            bucket = self._buckets.pop(tick, None)
            if bucket:
                for obj in bucket:
                    del self._where[obj]
                    due.append(obj)
        return due

    def next_at(self) -> float:
        """When the earliest bucket is due (0.0: none is armed)."""
        ticks = self._ticks
        while ticks:
            bucket = self._buckets.get(ticks[0])
            if bucket:
                return ticks[0] * self.resolution
            # emptied by discard(): drop it
            self._buckets.pop(_heappop(ticks), None)
        return 0.0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, obj: object) -> bool:
        return obj in self._where

    def objects(self) -> list[object]:
        """Every armed object."""
        return list(self._where)


# -- a site's slot, connection sets and acceptor ------------------------------------------


class Slot:
    """The current service of one site.

    Read on every accepted connection, replaced by ``swap`` on ``Update``: a
    slot is published by one reference assignment, so a reader sees the old
    service or the new one, never anything in between.
    """

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


class Counter:
    """What counts connections: each core's ``SharedCounter`` is one (with
    atomic operations in the compiled core, locks in the pure-Python one)."""

    def _acquire(self, limit: int) -> bool:
        """Count one more unless *limit* (> 0) are counted already; True if counted."""
        raise NotImplementedError

    def _release(self) -> None:
        """Count one less."""
        raise NotImplementedError


class ConnectionSet:
    """The open connections of a site (or of one layer's services).

    A connection object is anything with an ``abort()`` method; it adds
    itself when it starts and discards itself when it ends.  A set with a
    parent mirrors every add and discard into it, so a layer can count its
    own connections while the site still sees all of them.

    A set with a *limit* (a ``SharedCounter``) holds counted connections:
    whoever adds one has acquired a count for it, and a connection leaving
    the set releases that count.
    """

    def __init__(self, parent: ConnectionSet | None = None, limit: Counter | None = None) -> None:
        if parent is not None and not isinstance(parent, ConnectionSet):
            raise TypeError("parent must be a ConnectionSet")
        if limit is not None and not isinstance(limit, Counter):
            raise TypeError("limit must be a SharedCounter")
        self._conns: set[Any] = set()
        self.parent = parent
        self.limit = limit
        self._waiters: list[Any] | None = None

    def add(self, conn: Any) -> None:
        """Track *conn* (and in the parent set, if any)."""
        self._conns.add(conn)
        if self.parent is not None:
            self.parent.add(conn)

    def discard(self, conn: Any) -> None:
        """Stop tracking *conn*; wake ``wait_empty`` waiters when none are left."""
        if self.limit is None:
            self._conns.discard(conn)
        elif conn in self._conns:
            self._conns.discard(conn)
            self.limit._release()
        if self.parent is not None:
            self.parent.discard(conn)
        if self._waiters is not None and not self._conns:
            self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        self._waiters = None
        for fut in waiters:  # type: ignore[union-attr]
            if not fut.done():
                fut.set_result(None)

    def wait_empty(self) -> Any:
        """A future that is done once no connection is left."""
        fut = _asyncio.get_running_loop().create_future()
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
    """The protocol factory a site's listener serves with.

    Each accepted connection reads the slot once and asks that service for
    a protocol (no lock, no allocation of its own, no await); the
    connection keeps that service for its whole life.
    """

    def __init__(self, slot: Slot, conns: ConnectionSet, name: str = "") -> None:
        if not isinstance(slot, Slot) or not isinstance(conns, ConnectionSet):
            raise TypeError("need a Slot and a ConnectionSet")
        self.slot = slot
        self.conns = conns
        self.name = name
        self.errors = 0
        self._logged_at = -1e9

    def __call__(self) -> Any:
        # An exception escaping a protocol factory makes uvloop close the
        # listening socket for good: one buggy connection must not take the
        # site down, so it is counted, logged and that connection dropped.
        try:
            return self.slot._current.new_connection(self.conns)
        except Exception as exc:
            self.errors += 1
            self._logged_at = accept_failed(self.name, exc, self.errors, self._logged_at)
            return _Dropped()


_accept_log = logging.getLogger("hotproxy.accept")


def accept_failed(name: str, exc: BaseException, errors: int, logged_at: float) -> float:
    """Log a failed accept, at most every 10 s per site; return when it logged."""
    now = _time.monotonic()
    if now - logged_at >= 10.0:
        _accept_log.error("site %r: new_connection failed (%d so far), connection dropped: %s: %s",
                          name, errors, type(exc).__name__, exc)
        return now
    return logged_at


class _Dropped(_asyncio.Protocol):
    """The protocol of a connection whose service could not start it."""

    def connection_made(self, transport: Any) -> None:
        transport.abort()


# -- what a service version shares with its connections ------------------------------

# The connection as a whole (Relay.state)
C_NEW = 0           # not started (or refused)
C_HEADER = 1        # accept_proxy: reading the client's PROXY header (held, not sent)
C_CONNECTING = 2    # the upstream is being connected; client bytes are held
C_OPEN = 3          # relaying
C_LINGERING = 4     # no upstream: waiting for the client's EOF
C_CLOSING = 5       # each side closes once its pending bytes are written
C_FINISHED = 6      # both sides closed, every count released
C_SNIFF = 7         # sni: reading the client's TLS ClientHello (held, not consumed)

# The upstream socket (Relay.up_state)
UP_NONE = 0         # no connect attempt in progress (not started yet)
UP_CONNECTING = 1   # an attempt is in progress (``attempt``)
UP_OPEN = 2         # connected: relaying
UP_CLOSED = 3       # the upstream socket is closed, or none could be made

# How a connection ended (Relay.end_code)
END_NONE = 0
END_EOF = 1             # both directions finished with an EOF
END_CLIENT_ERROR = 2    # the client's socket failed (reset, ...)
END_UPSTREAM_ERROR = 3  # the upstream's socket failed
END_IDLE = 4            # no traffic for idle_timeout
END_ABORTED = 5         # abort(): drain timeout or shutdown
END_NO_UPSTREAM = 6     # every connect attempt failed
END_CLOSED = 7          # closed otherwise
END_BAD_HEADER = 8      # accept_proxy: no valid PROXY header in time, or from a peer not in proxy_from
END_BAD_HELLO = 9       # sni: no valid TLS ClientHello in time
END_NO_ROUTE = 10       # sni: the server name matches no route and there is no default

CONN_NAMES = ("new", "header", "connecting", "open", "lingering", "closing", "finished", "sniff")
END_NAMES = ("open", "eof", "client_error", "upstream_error", "idle", "aborted",
             "no_upstream", "closed", "bad_header", "bad_hello", "no_route")

# seconds a client that got no upstream has to send its EOF before it is closed
LINGER = 2.0

_log = logging.getLogger("hotproxy.proxy")

# Set by the core that uses this module (use_counters): a function that
# makes a SharedCounter in private memory (RelayConfig's default limit).
_private_counter: Any = None


def use_counters(private_counter: Any) -> None:
    """Tell this module the core's ``private_counter``."""
    global _private_counter
    _private_counter = private_counter


# Set by the core that uses this module (use_parser): ``clienthello.server_name_in``
# -- the compiled extension for the compiled core, the same source run as
# Python for the pure-Python one -- and the most bytes it needs to decide.
_server_name: Any = None
SNI_BUFFER = 16 * 1024 + 8 * 5


def use_parser(server_name: Any, max_buffered: int) -> None:
    """Tell this module the ClientHello parser (``clienthello.server_name_in``) and its ``MAX_BUFFERED``."""
    global _server_name, SNI_BUFFER
    _server_name = server_name
    SNI_BUFFER = int(max_buffered)


def _oserror(err: int) -> OSError:
    return OSError(err, _os.strerror(err))


def _set_keepalive(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (_socket.AF_INET, _socket.AF_INET6):
        return
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


# Histogram bounds (seconds): an upstream's connect time, a service's
# connection duration (what /metrics exposes as le="..." buckets)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    3600.0)


class Histogram:
    """Observations in fixed buckets: C integers, updated once per connection.

    ``counts[i]`` is how many observations were <= ``bounds[i]`` and above
    the bound before (not cumulative); the last count is those above every
    bound.  ``count`` and ``sum`` are the number and the sum of all.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if not isinstance(bounds, tuple) or not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError("bounds: a non-empty tuple of increasing numbers")
        self.bounds = bounds
        self.n = len(bounds)
        self._b = _array("d", bounds)
        self._counts = _array("q", bytes(8 * (self.n + 1)))
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of *value*."""
        i = 0
        n = self.n
        while i < n and value > self._b[i]:
            i += 1
        self._counts[i] += 1
        self.count += 1
        self.sum += value

    @property
    def counts(self) -> list[int]:
        """The count of each bucket (not cumulative), the one above every bound last."""
        return [self._counts[i] for i in range(self.n + 1)]

    def as_dict(self) -> dict[str, Any]:
        """``bounds``, ``counts``, ``count`` and ``sum`` as plain data (a snapshot)."""
        return {"bounds": list(self.bounds), "counts": self.counts, "count": self.count,
                "sum": self.sum}

    def add(self, data: dict[str, Any]) -> None:
        """Add a snapshot's counts (``as_dict()`` of a histogram with the same
        bounds); ``ValueError`` if it is not one."""
        try:
            bounds = [float(b) for b in data["bounds"]]
            counts = [int(c) for c in data["counts"]]
            count, total = int(data["count"]), float(data["sum"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("histogram: expected bounds, counts, count and sum") from None
        if bounds != list(self.bounds) or len(counts) != self.n + 1 or min(counts + [count]) < 0:
            raise ValueError("histogram: other bounds, or negative counts")
        for i in range(self.n + 1):
            self._counts[i] += counts[i]
        self.count += count
        self.sum += total

    def __repr__(self) -> str:
        return f"<Histogram count={self.count} sum={self.sum:.6f}>"


class ProxyCounters:
    """A proxy's service counters, shared by every version of the service
    (``durations``: how long its connections lasted, a ``Histogram``)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connect_failures = 0
        self.refused = 0
        self.idle_closed = 0
        self.no_upstream = 0
        self.proxy_header_errors = 0
        self.sni_errors = 0
        self.sni_no_route = 0
        self.durations = Histogram(DURATION_BUCKETS)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {
            "accepted": self.accepted, "active": self.active,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "connect_failures": self.connect_failures, "refused": self.refused,
            "idle_closed": self.idle_closed, "no_upstream": self.no_upstream,
            "proxy_header_errors": self.proxy_header_errors,
            "sni_errors": self.sni_errors, "sni_no_route": self.sni_no_route,
        }

    def __repr__(self) -> str:
        return f"<ProxyCounters {self.as_dict()!r}>"


class UpstreamState:
    """One upstream address's live state, shared by every service version.

    ``active`` counts connections to it (attempts included), ``fails`` its
    consecutive connect failures, ``ejected_until`` the ``time.monotonic()``
    before which it gets no new connections, ``ejections`` how many times it
    was ejected, ``connect_times`` how long its successful connects took (a
    ``Histogram``).
    """

    def __init__(self, address: str) -> None:
        if not isinstance(address, str):
            raise TypeError("address must be a str")
        self.address = address
        self.active = 0
        self.fails = 0
        self.ejected_until = 0.0
        self.connections = 0
        self.failures = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.ejections = 0
        self.connect_times = Histogram(CONNECT_BUCKETS)

    def __repr__(self) -> str:
        return (f"<UpstreamState {self.address} active={self.active} fails={self.fails} "
                f"ejected_until={self.ejected_until:.3f}>")


class Target:
    """An upstream of one service version: its shared state and where to connect.

    *sockaddr* is the raw ``struct sockaddr`` for *family* (what the compiled
    core passes to ``connect(2)``); *address* is the same address as the
    socket module writes it (what the pure-Python core uses); *up* is the
    caller's own description of the upstream.

    *limit* (a ``SharedCounter``; None: none) counts the connections to this
    upstream over the whole instance: a connection takes one count when it
    starts an attempt to it and gives it back when that attempt fails or the
    connection ends; with *max_connections* (> 0) counted already the
    target is skipped (the connector is asked for another).
    """

    def __init__(self, state: UpstreamState, up: Any, family: int, sockaddr: bytes,
                 address: Any, limit: Any = None, max_connections: int = 0) -> None:
        if not isinstance(state, UpstreamState):
            raise TypeError("state must be an UpstreamState")
        if not isinstance(sockaddr, bytes) or len(sockaddr) < 2:
            raise ValueError("sockaddr: too short")
        if limit is not None and not isinstance(limit, Counter):
            raise TypeError("limit must be a SharedCounter")
        if max_connections < 0:
            raise ValueError("need max_connections >= 0 (0: no limit)")
        self.state = state
        self.up = up
        self.family = family
        self.sockaddr = sockaddr
        self.address = address
        self.limit = limit
        self.max_connections = int(max_connections)

    def __repr__(self) -> str:
        return f"<Target {self.state.address}>"


class RelayConfig:
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

    The PROXY protocol: ``send_proxy`` (1 or 2; 0: off) writes a header of
    that version to the upstream before any client byte, with the client's
    address (or the received one).  ``accept_proxy``: a connection first
    reads the client's header (``parse_proxy_header``) within
    ``proxy_timeout`` seconds, from a peer in ``proxy_from``
    (``proxy_networks``) only; the address it carries becomes ``peername``.
    A bad, slow or refused header closes the connection at once, counted in
    ``proxy_header_errors``, ``on_header_error(peername, reason)`` told if
    given.  With both off, a connection pays one test when it starts.

    TLS SNI routing (``sni``): after the PROXY header, if any, a connection
    reads the client's TLS ClientHello (``clienthello.server_name_in``, in
    place in the read buffer) within ``sni_timeout`` seconds, without
    consuming it: the bytes are relayed untouched once connected.  The name
    becomes ``server_name`` and ``connector.route(name)`` says where it goes:
    a group, stored as ``conn.route``, whose ``pick(conn, tried)`` the
    attempts ask instead of the connector's; or None: no route, the connection is closed,
    counted in ``sni_no_route``.  A bad, slow or oversized hello closes it,
    counted in ``sni_errors``; ``on_sni_error(peername, reason)`` is told of
    both if given.
    """

    def __init__(self, counters: ProxyCounters, idle_timeout: float = 0.0,
                 keepalive: bool = False, connector: Any = None, on_close: Any = None,
                 want_peername: bool = False, buffer_size: int = 16384,
                 max_buffer_size: int = 262144, targets: tuple[Target, ...] = (),
                 connect_timeout: float = 2.0, attempts: int = 1, max_connections: int = 0,
                 on_refuse: Any = None, limit: Any = None, send_proxy: int = 0,
                 accept_proxy: bool = False, proxy_from: tuple[tuple[int, int, int], ...] = (),
                 proxy_timeout: float = 5.0, on_header_error: Any = None, sni: bool = False,
                 sni_timeout: float = 5.0, on_sni_error: Any = None) -> None:
        if not isinstance(counters, ProxyCounters):
            raise TypeError("counters must be a ProxyCounters")
        if buffer_size < 1 or max_buffer_size < buffer_size:
            raise ValueError("need 1 <= buffer_size <= max_buffer_size")
        if attempts < 1 or not connect_timeout > 0:
            raise ValueError("need attempts >= 1 and connect_timeout > 0")
        if not isinstance(targets, tuple):
            raise TypeError("targets must be a tuple")
        for t in targets:
            if not isinstance(t, Target):
                raise TypeError(f"targets: expected Target, got {type(t).__name__}")
        if len(targets) > 1 and connector is None:
            raise ValueError("more than one target needs a connector to pick")
        if max_connections < 0:
            raise ValueError("need max_connections >= 0 (0: no limit)")
        if limit is not None and not isinstance(limit, Counter):
            raise TypeError("limit must be a SharedCounter")
        if send_proxy not in (0, 1, 2):
            raise ValueError("send_proxy: expected 0 (off), 1 or 2")
        if accept_proxy and not (proxy_timeout > 0 and buffer_size > PROXY_HEADER_MAX):
            raise ValueError(f"accept_proxy needs proxy_timeout > 0 and buffer_size > {PROXY_HEADER_MAX}")
        if not isinstance(proxy_from, tuple):
            raise TypeError("proxy_from must be a tuple (proxy_networks())")
        if sni and not (sni_timeout > 0 and connector is not None):
            raise ValueError("sni needs sni_timeout > 0 and a connector to route")
        self.counters = counters
        self.idle_timeout = float(idle_timeout)
        self.keepalive = bool(keepalive)
        self.connector = connector
        self.on_close = on_close
        self.want_peername = bool(want_peername)
        self.buffer_size = buffer_size
        self.max_buffer_size = max_buffer_size
        self.targets = targets
        self.single = targets[0] if len(targets) == 1 else None
        self.connect_timeout = float(connect_timeout)
        self.attempts = int(attempts)
        self.max_connections = int(max_connections)
        self.limit = limit if limit is not None else _private_counter()
        self.on_refuse = on_refuse
        self.send_proxy = int(send_proxy)
        self.accept_proxy = bool(accept_proxy)
        self.proxy_from = proxy_from
        self.proxy_timeout = float(proxy_timeout)
        self.on_header_error = on_header_error
        self.sni = bool(sni)
        self.sni_timeout = float(sni_timeout)
        self.on_sni_error = on_sni_error
        if self.sni:
            self.single = None   # every connection is routed by its name
        # a connection with any starts with _proxy_start(), which needs the peer
        self.proxy = self.send_proxy != 0 or self.accept_proxy or self.sni
        if self.proxy:
            self.want_peername = True


# -- the relay of one proxied connection ------------------------------------------


class Relay:
    """One proxied connection, without its system calls.

    Each core's ``Connection`` is a ``Relay`` that adds them: the hooks at
    the end of this class (reading, sending, splicing, closing sockets, its
    engine's timer and ready list).  Everything that decides -- the
    connection's state (``state``, ``C_*``) and its upstream socket's
    (``up_state``, ``UP_*``), connecting and trying targets, holding the
    client's bytes meanwhile, each direction's state machine
    (``c2u``: client to upstream, ``u2c``: upstream to client), the client
    transport's callbacks, half-closes, timeouts, closing, counting -- is
    here, once.

    It is counted (accepted, active, one count of ``cfg.limit``) when it
    starts -- ``connection_made``, or the core's accept -- unless the limit
    is reached: then it is refused and closed at once.  *owner* (the service
    version that accepted it) is kept alive until the connection finishes.
    The upstream is connected as soon as the client is, trying the config's
    targets.  It is finished, exactly once, when the client side is gone
    *and* the upstream socket is closed or was never made; finishing
    releases every count it took.
    """

    def __init__(self, cfg: RelayConfig, conns: Any, owner: Any = None) -> None:
        if not isinstance(cfg, RelayConfig):
            raise TypeError("cfg must be a RelayConfig")
        self.cfg = cfg
        self.counters = cfg.counters
        self.conns = conns
        self.owner = owner
        self.client: Any = None           # the client's transport (None when raw)
        self.c_write: Any = None          # client.write
        self.cfd = -1                     # raw: the client socket (-1: none, or a transport)
        self.ufd = -1                     # the upstream socket (-1: none)
        self.raw = False                  # the client socket is ours, not a transport's
        self.attempt: Target | None = None    # the connect attempt in progress
        self.tried: list[Target] | None = None
        self.attempts = 0
        self.deadline = 0.0               # of the attempt in progress, or of lingering
        self.attempt_at = 0.0             # when the attempt in progress started
        self.connect_time = 0.0           # how long the upstream took to connect
        self.ustate: UpstreamState | None = None
        self.c2u = Direction(D_HOLD, cfg.buffer_size)
        self.u2c = Direction(D_OPEN, cfg.buffer_size)
        self.early = 0                    # client bytes held in c2u's buffer before connecting
        self.started = self._clock()
        self.last_active = self.started
        self.ended = 0.0
        self.peername: Any = None
        self.state = C_NEW
        self.up_state = UP_NONE
        self.end_code = END_NONE
        self.client_open = False          # the client side is open
        self.c_reading = False            # the client is being read (its transport resumed)
        self.c_early_full = False         # connecting, and the held bytes fill the buffer
        self.admitted = False             # holds one count of cfg.limit
        self.deferred = False             # in the engine's ready list
        self.ulimit: Counter | None = None    # the upstream's limit we hold one count of
        self.local: Any = None            # PROXY protocol: the address the client connected to
        self.hdr_out = 0                  # send_proxy: the header's bytes at the start of the held ones
        self.server_name: str | None = None   # sni: the name the ClientHello asked for ("": none)
        self.route: Any = None            # sni: the connector's route for server_name

    def _admit(self) -> bool:
        # Count this connection in the instance's count, unless it is full
        # (the compiled core: one atomic compare-and-swap, so a burst of
        # accepts in every worker at once admits exactly max_connections).
        if not self.cfg.limit._acquire(self.cfg.max_connections):
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

    def connection_made(self, transport: Any) -> None:
        if not self._admit():
            if self.cfg.on_refuse is not None:
                self.cfg.on_refuse(transport.get_extra_info("peername"))
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
        if self.cfg.want_peername:
            self.peername = transport.get_extra_info("peername")
        if self.cfg.keepalive:
            _set_keepalive(transport)
        self._attach()
        self._begin()

    def get_buffer(self, sizehint: int) -> Any:
        if self.c2u.buf is None or (self.c2u.size < self.c2u.next and not self.early
                                    and self.c2u.pend_end == 0):
            self._new_buf(self.c2u, self.c2u.next)
        if self.early:
            return self.c2u.mv[self.early:]  # type: ignore[index]
        return self.c2u.buf

    def buffer_updated(self, nbytes: int) -> None:
        self._client_bytes(nbytes)

    def _client_bytes(self, nbytes: int) -> None:
        # nbytes more client bytes in the c2u buffer (at 0, or after the held ones)
        self.last_active = self._clock()
        if self.state == C_OPEN:
            self._send(self.c2u, 0, nbytes, True)
        elif self.state == C_CONNECTING:
            self.early += nbytes
            if self.early >= self.c2u.size:
                self.c_early_full = True
                self._sync_client_reading()
        elif self.state == C_HEADER:
            self.early += nbytes
            self._header_bytes()
        elif self.state == C_SNIFF:
            self.early += nbytes
            self._sni_bytes()
        # else (lingering, closing): dropped

    def data_received(self, data: bytes) -> None:
        # Loops that do not use get_buffer() (asyncio's own, for an object
        # that is not an asyncio.BufferedProtocol) deliver bytes here.
        n = len(data)
        self.last_active = self._clock()
        if self.state == C_OPEN:
            if self.c2u.buf is None or self.c2u.size < n:
                self._new_buf(self.c2u, max(n, self.cfg.buffer_size))
            self.c2u.buf[:n] = data  # type: ignore[index]
            self._send(self.c2u, 0, n, False)
        elif self.state == C_CONNECTING:
            self._hold(data)
        elif self.state == C_HEADER:
            self._hold(data)
            self._header_bytes()
        elif self.state == C_SNIFF:
            self._hold(data)
            self._sni_bytes()

    def eof_received(self) -> bool:
        self._src_eof(self.c2u)
        return True   # keep the other direction open: a half-close

    def pause_writing(self) -> None:
        # the client reads slower than the upstream sends
        self.u2c.step(EV_FULL)

    def resume_writing(self) -> None:
        self._drained(self.u2c)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._client_lost(exc is not None)

    def _client_lost(self, error: bool) -> None:
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

    def abort(self) -> None:
        """Close both sides at once (a drain timed out)."""
        self._shut(END_ABORTED, True)

    # -- read-only views (status, access log, tests) ---------------------------

    @property
    def upstream(self) -> UpstreamState | None:
        """The connected upstream's UpstreamState (None if none was reached)."""
        return self.ustate

    @property
    def client_transport(self) -> Any:
        """The client's transport (None once finished)."""
        return self.client

    @property
    def client_fileno(self) -> int:
        """The client socket's file descriptor when the core accepted it
        (-1 for a connection served through a transport, or once closed)."""
        return self.cfd

    @property
    def upstream_fileno(self) -> int:
        """The upstream socket's file descriptor (-1 when there is none)."""
        return self.ufd

    @property
    def bytes_in(self) -> int:
        """Bytes relayed from the client to the upstream."""
        return self.c2u.nbytes

    @property
    def bytes_out(self) -> int:
        """Bytes relayed from the upstream to the client."""
        return self.u2c.nbytes

    @property
    def spliced(self) -> str:
        """Which directions moved bulk with splice(2): "", "in" (client to
        upstream), "out" (upstream to client) or "both"."""
        return ("", "in", "out", "both")[(self.c2u.mode == M_SPLICE)
                                         + 2 * (self.u2c.mode == M_SPLICE)]

    @property
    def held(self) -> int:
        """Client bytes held while the upstream connects."""
        return self.early

    @property
    def duration(self) -> float:
        """Seconds from accept to finish (or until now)."""
        return (self.ended if self.state == C_FINISHED else self._clock()) - self.started

    @property
    def end(self) -> str:
        """How it ended: eof, client_error, upstream_error, idle, aborted,
        no_upstream, closed -- or "open"."""
        return END_NAMES[self.end_code]

    @property
    def closed(self) -> bool:
        """True once the client connection is gone."""
        return self.state == C_FINISHED or ((self.client is not None or self.raw)
                                            and not self.client_open)

    @property
    def finished(self) -> bool:
        """True once both sides are gone and every count is released."""
        return self.state == C_FINISHED

    @property
    def buffered(self) -> int:
        """Bytes this connection holds in memory: its read buffers and the
        client transport's write buffer (for tests of back-pressure)."""
        n = self.c2u.size + self.u2c.size
        if self.client is not None and self.client_open:
            n += self.client.get_write_buffer_size()
        return n

    @property
    def directions(self) -> tuple[str, str, str]:
        """The state of the whole and of each direction:
        ``(connection, client to upstream, upstream to client)`` names."""
        return (CONN_NAMES[self.state], STATE_NAMES[self.c2u.state],
                STATE_NAMES[self.u2c.state])

    def __repr__(self) -> str:
        return (f"<Connection {self.peername!r} up={self.ustate.address if self.ustate else None} "
                f"in={self.c2u.nbytes} out={self.u2c.nbytes} {self.end}>")

    # -- connecting --------------------------------------------------------------

    def _next_attempt(self) -> None:
        # Try targets until one connects or is in progress, or give up.
        cfg = self.cfg
        while True:
            if self.attempts >= cfg.attempts:
                self._no_upstream()
                return
            if cfg.single is not None:
                t = cfg.single if self.tried is None else None
            elif self.route is not None:
                # sni: the group the server name chose picks (no connector frame between)
                t = self.route.pick(self, self.tried if self.tried is not None else ())
            elif cfg.connector is not None:
                t = cfg.connector.pick(self, self.tried if self.tried is not None else ())
            else:
                t = None   # no upstream at all
            if t is None:
                self._no_upstream()
                return
            if t.limit is not None:
                if not t.limit._acquire(t.max_connections):
                    # at its own max_connections over the instance (another
                    # worker took the last count): skipped, not a failure
                    if self.tried is None:
                        self.tried = []
                    self.tried.append(t)
                    continue
                self.ulimit = t.limit
            self.attempts += 1
            err = self._start_attempt(t)
            if err == 0:
                return
            # failed at once (refused by a Unix socket, out of descriptors, ...)
            self._release_upstream()
            self._count_failure(t, _oserror(err))

    def _release_upstream(self) -> None:
        # Give back the count of the upstream's limit (if we hold one).
        if self.ulimit is not None:
            self.ulimit._release()
            self.ulimit = None

    def _attempting(self, t: Target, connected: bool) -> None:
        # _start_attempt() has a socket connecting (or connected) to t
        now = self._clock()
        self.attempt = t
        self.attempt_at = now
        t.state.active += 1
        self.up_state = UP_CONNECTING
        if connected:
            self._connected()
        else:
            self.deadline = now + self.cfg.connect_timeout
            self._arm(self.deadline)

    def _connected(self) -> None:
        t = self.attempt
        st = t.state  # type: ignore[union-attr]
        self.attempt = None
        self.deadline = 0.0
        self.ustate = st
        self.up_state = UP_OPEN
        self.state = C_OPEN
        st.connections += 1
        self.connect_time = self._clock() - self.attempt_at
        st.connect_times.observe(self.connect_time)
        if (st.fails or st.ejected_until > 0) and self.cfg.connector is not None:
            self.cfg.connector.succeeded(t)
        self._rearm()   # from the connect deadline to the idle one
        self.c2u.step(EV_CONNECTED)
        if self.early:
            n = self.early
            self.early = 0
            self.c_early_full = False
            if self.hdr_out:
                # the PROXY header is sent first, but is no client byte
                self.c2u.nbytes -= self.hdr_out
                self.counters.bytes_in -= self.hdr_out
                self.hdr_out = 0
            self._send(self.c2u, 0, n, False)
        if self.up_state == UP_OPEN and self.c2u.pend_end == 0:
            self._drained(self.c2u)   # the held bytes (or none) are sent: a held EOF follows
        else:
            self._sync_client_reading()

    def _drop_attempt(self, up: int) -> Target:
        # Close the attempt in progress and release its count (no failure is
        # counted here); the upstream side goes to *up*.
        t = self.attempt
        self._close_fd()
        self._release_upstream()
        t.state.active -= 1  # type: ignore[union-attr]
        self.attempt = None
        self.deadline = 0.0
        self.up_state = up
        return t  # type: ignore[return-value]

    def _attempt_failed(self, exc: BaseException) -> None:
        # The attempt in progress failed: release and count it, then try the
        # next target if the client is still there.
        self._count_failure(self._drop_attempt(UP_NONE), exc)
        if self.client_open and self.state == C_CONNECTING:
            self._next_attempt()
        else:
            self.up_state = UP_CLOSED
            self._finish()

    def _count_failure(self, t: Target, exc: BaseException) -> None:
        if self.tried is None:
            self.tried = []
        self.tried.append(t)
        if self.cfg.connector is not None:
            self.cfg.connector.failed(t, exc)
        else:
            self.counters.connect_failures += 1

    def _no_upstream(self) -> None:
        # No upstream could be reached: send the client our EOF and close
        # once it has sent its own (or after LINGER seconds), reading and
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
        self.deadline = self._clock() + LINGER
        self._arm(self.deadline)
        self._c_write_eof()
        self._sync_client_reading()

    # -- the PROXY protocol (cfg.proxy): between the accept and the first attempt ------

    def _proxy_start(self) -> None:
        # A started connection of a service with send_proxy, accept_proxy or
        # sni (peername is set): read the client's header first, then its
        # ClientHello (sni), then queue our header.
        cfg = self.cfg
        if cfg.send_proxy or cfg.accept_proxy:
            self.local = self._sockname()
        if not cfg.accept_proxy:
            self._header_done()
            return
        if not peer_allowed(cfg.proxy_from, self.peername):
            self._header_failed("the peer is not in proxy_from")
            return
        self.state = C_HEADER
        self.deadline = self.started + cfg.proxy_timeout
        self._arm(self.deadline)

    def _header_bytes(self) -> None:
        # More client bytes are held while the header is read: parse what is
        # there (PROXY_HEADER_MAX bytes at most); once it is complete, the
        # bytes after it stay held and the upstream is connected.
        n = self.early
        if n > PROXY_HEADER_MAX:
            n = PROXY_HEADER_MAX
        try:
            got = parse_proxy_header(self.c2u.buf[:n])  # type: ignore[index]
        except ProxyHeaderError as exc:
            self._header_failed(str(exc))
            return
        if got is None:
            return   # parse_proxy_header decides by PROXY_HEADER_MAX bytes
        used, src, dst = got
        if src is not None:
            self.peername = src
            self.local = dst
        rest = self.early - used
        if rest:
            self.c2u.buf[:rest] = self.c2u.buf[used:self.early]  # type: ignore[index]
        self.early = rest
        self.state = C_CONNECTING
        self.deadline = 0.0
        self._rearm()   # from the header's deadline to the idle one
        self._header_done()

    def _header_done(self) -> None:
        # The PROXY header, if any, is read: read the ClientHello (sni), or
        # queue our header and connect.
        if self.cfg.sni:
            self._sni_start()
            return
        self._proxy_out()
        if self.c2u.buf is not None and self.early >= self.c2u.size:
            # one read filled the buffer: hold, as _client_bytes does
            self.c_early_full = True
            self._sync_client_reading()
        self._next_attempt()

    def _proxy_out(self) -> None:
        # send_proxy: queue the header before the held client bytes
        if not self.cfg.send_proxy:
            return
        hdr = proxy_header(self.cfg.send_proxy, self.peername, self.local)
        held = bytes(self.c2u.buf[:self.early]) if self.early else b""  # type: ignore[index]
        need = len(hdr) + len(held)
        if self.c2u.buf is None or self.c2u.size < need:
            self._new_buf(self.c2u, max(need, self.cfg.buffer_size))
        self.c2u.buf[:need] = hdr + held  # type: ignore[index]
        self.early = need
        self.hdr_out = len(hdr)

    # -- TLS SNI routing (cfg.sni): after the PROXY header, before the first attempt --

    def _sni_start(self) -> None:
        # Read the ClientHello: room for the most the parser may need (so a
        # read always has room while it is undecided), the held bytes kept.
        n = self.early
        if self.c2u.buf is None or self.c2u.size < SNI_BUFFER:
            held = bytes(self.c2u.buf[:n]) if n else b""  # type: ignore[index]
            self._new_buf(self.c2u, max(SNI_BUFFER, self.cfg.buffer_size))
            if n:
                self.c2u.buf[:n] = held  # type: ignore[index]
        self.c_early_full = False
        self.state = C_SNIFF
        self.deadline = self._clock() + self.cfg.sni_timeout
        self._arm(self.deadline)
        if n:
            self._sni_bytes()   # bytes that came with (or after) the PROXY header

    def _sni_bytes(self) -> None:
        # More client bytes are held: parse them (the parser decides within
        # SNI_BUFFER bytes), in place; once the name is known, route and
        # connect with every byte still held, to be relayed untouched.
        try:
            name = _server_name(self.c2u.buf, self.early)
        except ValueError as exc:    # clienthello.ClientHelloError
            self.counters.sni_errors += 1
            self._sni_failed(str(exc), END_BAD_HELLO)
            return
        if name is None:
            return
        self.server_name = name
        route = self.cfg.connector.route(name)
        if route is None:
            self.counters.sni_no_route += 1
            self._sni_failed(f"no route for server name {name or '(none)'!r}", END_NO_ROUTE)
            return
        self.route = route
        self.state = C_CONNECTING
        self.deadline = 0.0
        self._rearm()   # from the hello's deadline to the idle one
        self._proxy_out()
        if self.early >= self.c2u.size or self.early >= self.cfg.buffer_size:
            # hold what is there until connected, as _client_bytes does
            self.c_early_full = True
            self._sync_client_reading()
        self._next_attempt()

    def _sni_failed(self, reason: str, code: int) -> None:
        # sni: a bad, slow or unroutable ClientHello: close at once, nothing sent
        self.early = 0
        if self.cfg.on_sni_error is not None:
            self.cfg.on_sni_error(self.peername, reason)
        self._shut(code, True)

    def _header_failed(self, reason: str) -> None:
        # accept_proxy: no valid header (or not from proxy_from): close at once
        self.counters.proxy_header_errors += 1
        self.early = 0
        if self.cfg.on_header_error is not None:
            self.cfg.on_header_error(self.peername, reason)
        self._shut(END_BAD_HEADER, True)

    # -- the engine's calls ------------------------------------------------------

    def _deadline(self) -> float:
        if (self.up_state == UP_CONNECTING or self.state == C_LINGERING or self.state == C_HEADER
                or self.state == C_SNIFF):
            return self.deadline
        if self.cfg.idle_timeout > 0 and self.state != C_FINISHED:
            # closing too: a client that never reads what is left for it
            return self.last_active + self.cfg.idle_timeout
        return 0.0

    def _timed_out(self, now: float) -> None:
        # the engine's timer found this connection due: act if it really is
        # (an idle one may have been active since it was armed)
        at = self._deadline()
        if at == 0.0 or now < at:
            return
        if self.state == C_HEADER:
            self._header_failed(f"no complete header within {self.cfg.proxy_timeout:g}s")
        elif self.state == C_SNIFF:
            self.counters.sni_errors += 1
            self._sni_failed(f"no complete ClientHello within {self.cfg.sni_timeout:g}s", END_BAD_HELLO)
        elif self.state == C_LINGERING:
            self.state = C_CLOSING
            if self.client_open:
                self._c_close(False)
        elif self.up_state == UP_CONNECTING:
            self._attempt_failed(TimeoutError())
        else:
            self.counters.idle_closed += 1
            self._shut(END_IDLE, True)

    def _crashed(self, exc: BaseException) -> None:
        # a bug in the relay or a callback: this connection only
        _log.error("proxy connection failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        self._set_end(END_ABORTED)
        if self.state != C_FINISHED:
            self._shut(END_ABORTED, True)

    # -- relaying: what follows each step, for both directions ---------------------

    def _may_read(self, d: Direction) -> bool:
        # may d's source be read now?
        if d is self.c2u:
            return self.c_reading
        return d.state == D_OPEN and self.state == C_OPEN and self.client_open

    def _drained(self, d: Direction) -> None:
        # Everything d had pending is written (or its transport resumed):
        # what the state machine says follows.
        act = d.step(EV_DRAINED)
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

    def _shut_dst(self, d: Direction) -> None:
        # send d's destination our EOF
        if d is self.c2u:
            self._shutdown(False)
        elif not self.raw:
            self.client.write_eof()
        else:
            self._shutdown(True)

    def _src_eof(self, d: Direction) -> None:
        # d's source sent its EOF
        other = self.u2c if d is self.c2u else self.c2u
        if d is self.c2u:
            self.c_reading = False   # a transport stops reading by itself
            if self.state == C_HEADER:
                d.step(EV_EOF)
                self._header_failed("the client closed before the header ended")
                return
            if self.state == C_SNIFF:
                d.step(EV_EOF)
                self.counters.sni_errors += 1
                self._sni_failed("the client closed before its ClientHello ended", END_BAD_HELLO)
                return
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

    def _to_client(self, n: int) -> None:
        # n bytes read from the upstream into u2c's buffer: to the client
        if self.raw:
            # the buffer is ours until sent: what the client cannot take now
            # is kept (pending) and upstream reads stop until it can
            self._send(self.u2c, 0, n, True)
            return
        self.u2c.nbytes += n
        self.counters.bytes_out += n
        size = self.u2c.size
        self.c_write(self.u2c.buf if n == size else self.u2c.mv[:n])  # type: ignore[index]
        if n == size and size < self.cfg.max_buffer_size:
            self.u2c.next = min(size * 2, self.cfg.max_buffer_size)
            self.u2c.buf = None
            self.u2c.mv = None
            self.u2c.size = 0
        elif self.client_open and self.client.get_write_buffer_size():
            # the transport still holds a view of the buffer: take a fresh one
            self.u2c.buf = None
            self.u2c.mv = None
            self.u2c.size = 0

    def _hold(self, data: bytes) -> None:
        # data_received() before the upstream is connected: copy into c2u's
        # buffer, growing it if needed; reading pauses once buffer_size bytes
        # are held.
        n = len(data)
        need = self.early + n
        if self.c2u.buf is None or need > self.c2u.size:
            old, old_n = self.c2u.buf, self.early
            self._new_buf(self.c2u, max(need, self.cfg.buffer_size))
            if old_n:
                self.c2u.buf[:old_n] = old[:old_n]  # type: ignore[index]
        self.c2u.buf[self.early:need] = data  # type: ignore[index]
        self.early = need
        if self.early >= self.cfg.buffer_size and self.state != C_SNIFF:
            self.c_early_full = True
            self._sync_client_reading()

    def _sync_client_reading(self) -> None:
        # read the client while c2u may read and the connection wants it
        want = self.client_open and (self.state == C_LINGERING or (
            (self.state == C_OPEN or self.state == C_CONNECTING or self.state == C_SNIFF)
            and (self.c2u.state == D_OPEN or self.c2u.state == D_HOLD)
            and not self.c_early_full))
        if want != self.c_reading:
            self.c_reading = want
            if self.raw:
                # an edge-triggered socket does not report bytes that were
                # already there: read them soon (not from inside this call)
                if want and self.c2u.readable:
                    self._defer()
            elif want:
                self.client.resume_reading()
            else:
                self.client.pause_reading()

    def _run_deferred(self) -> None:
        if self.raw and self.c2u.readable:
            self._read(self.c2u)
        if self.u2c.readable:
            self._read(self.u2c)

    def _upstream_error(self, err: int) -> None:
        # the upstream socket failed (reset, ...): close both sides at once
        self._set_end(END_UPSTREAM_ERROR)
        self._close_upstream(True)
        if self.client_open:
            self._shut(END_CLOSED, True)

    def _failed(self, client_side: bool, err: int) -> None:
        # a socket failed: the client's, or the upstream's
        if client_side:
            self._c_gone(True)
        else:
            self._upstream_error(err)

    # -- the client side -------------------------------------------------------------

    def _started_raw(self, peer: Any) -> None:
        # the core accepted the client socket and registered it (cfd)
        self.client_open = True
        self.state = C_CONNECTING
        self.c_reading = True
        self.conns.add(self)
        if self.cfg.want_peername:
            self.peername = peer
        self._begin()

    def _begin(self) -> None:
        # A started client, through a transport or raw: its idle deadline,
        # then the PROXY header / ClientHello to read first, or the upstream
        if self.cfg.idle_timeout > 0:
            self._arm(self.started + self.cfg.idle_timeout)
        if self.cfg.proxy:
            self._proxy_start()
        else:
            self._next_attempt()

    def _c_write_eof(self) -> None:
        # send the client our EOF (once what it has pending is sent)
        if self.u2c.step(EV_EOF) == ACT_SHUT:
            self._shut_dst(self.u2c)

    def _c_close(self, hard: bool) -> None:
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

    def _c_gone(self, error: bool) -> None:
        # the raw client socket is closed now (by us, or it failed)
        if not self._close_client():
            return
        self.u2c.pend_off = 0
        self.u2c.pend_end = 0
        self.c2u.readable = False
        self._client_lost(error)

    # -- closing -------------------------------------------------------------------

    def _closing(self) -> None:
        if self.state < C_CLOSING:
            self.state = C_CLOSING

    def _set_end(self, code: int) -> None:
        if self.end_code == END_NONE:
            self.end_code = code

    def _close_upstream(self, hard: bool) -> None:
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

    def _upstream_closed(self) -> None:
        self._close_fd()
        self.up_state = UP_CLOSED
        self.c2u.state = D_CLOSED
        self.u2c.readable = False
        if not self.client_open:
            self._finish()

    def _shut(self, code: int, hard: bool) -> None:
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

    def _finish(self) -> None:
        if self.state == C_FINISHED:
            return
        self.state = C_FINISHED
        self.ended = self._clock()
        self._close_fd()
        if self._close_client():
            self.client_open = False
        self._close_pipes()
        self._detach()
        if self.admitted:
            self.admitted = False
            self.counters.active -= 1
            self.counters.durations.observe(self.ended - self.started)
            self.cfg.limit._release()
        self._release_upstream()
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

    # -- what each core's Connection provides ------------------------------------------

    def _clock(self) -> float:
        """time.monotonic()"""
        raise NotImplementedError

    def _attach(self) -> None:
        """Join the running loop's engine (a connection served through a transport)."""
        raise NotImplementedError

    def _detach(self) -> None:
        """Leave the engine (finished)."""
        raise NotImplementedError

    def _arm(self, at: float) -> None:
        """Have the engine's timer look at this connection by *at*."""
        raise NotImplementedError

    def _rearm(self) -> None:
        """The deadline moved later: arm for the new one."""
        raise NotImplementedError

    def _defer(self) -> None:
        """Have the engine call _run_deferred() soon."""
        raise NotImplementedError

    def _start_attempt(self, t: Target) -> int:
        """Start connecting to *t* (then _attempting()); an errno if it failed at once."""
        raise NotImplementedError

    def _close_fd(self) -> None:
        """Close the upstream socket, if any."""
        raise NotImplementedError

    def _sockname(self) -> Any:
        """The client socket's local address (socket-module form; None if unknown)."""
        raise NotImplementedError

    def _close_client(self) -> bool:
        """Close the raw client socket; False if there was none."""
        raise NotImplementedError

    def _close_pipes(self) -> None:
        """Close the splice pipes, if any."""
        raise NotImplementedError

    def _shutdown(self, client_side: bool) -> None:
        """shutdown(SHUT_WR) the client's raw socket or the upstream's."""
        raise NotImplementedError

    def _new_buf(self, d: Direction, size: int) -> None:
        """Give *d* a read buffer of *size* bytes."""
        raise NotImplementedError

    def _send(self, d: Direction, start: int, n: int, from_read: bool) -> None:
        """Send d.buf[start:start+n] to d's destination; what it cannot take is pending."""
        raise NotImplementedError

    def _read(self, d: Direction) -> None:
        """Read d's source (a raw socket) while it may hold bytes, and pass them on."""
        raise NotImplementedError


# -- an engine's timers and ready list -------------------------------------------------

# the engine's timer never fires more often than this (seconds)
TICK = 0.05


class EngineBase:
    """What each core's engine (one per event loop) does besides its epoll
    set: the connections' timer and the connections that yielded with bytes
    still to read.

    Deadlines are in a timer wheel (buckets of ``TICK`` seconds): a timer run
    takes out the connections that are due and costs nothing for the others.
    A connection due by its old deadline that has been active since (an idle
    timeout moves with every chunk, without timer work) is armed again for
    its new one.
    """

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.ready: list[Relay] = []    # connections with bytes left to read
        self.wheel = TimerWheel(TICK)   # the connections' deadlines
        self.timer: Any = None
        self.timer_at = 0.0
        self.ticks = 0                  # timer runs
        self.checked = 0                # connections the timer runs took out of the wheel

    # -- connections with bytes left to read -----------------------------------

    def defer(self, conn: Relay) -> None:
        """Have *conn*'s _run_deferred() called soon (after the loop's other callbacks)."""
        if conn.deferred:
            return
        if not self.ready:
            self.loop.call_soon(self._run_ready)
        conn.deferred = True
        self.ready.append(conn)

    def _run_ready(self) -> None:
        self._ready_batch()

    def _ready_batch(self) -> None:
        ready = self.ready
        self.ready = []
        for conn in ready:
            conn.deferred = False
            try:
                conn._run_deferred()
            except Exception as exc:
                conn._crashed(exc)
        self._after_batch()

    # -- timeouts ----------------------------------------------------------------

    def arm(self, conn: Relay, at: float) -> None:
        """Make sure the timer looks at *conn* by *at*."""
        self.want_tick(self.wheel.arm(conn, at))

    def rearm(self, conn: Relay) -> None:
        """*conn*'s deadline moved later (it connected): arm it for the new one
        at once rather than look at it when the old one comes."""
        at = conn._deadline()
        self.wheel.discard(conn)
        if at > 0.0:
            self.arm(conn, at)

    def want_tick(self, when: float) -> None:
        """Make sure the timer fires by *when* (but not within TICK of now)."""
        if self.timer is not None and self.timer_at <= when:
            return
        now = self._clock()
        if when < now + TICK:
            when = now + TICK
            if self.timer is not None and self.timer_at <= when:
                return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_later(when - now, self._tick)

    def _tick(self) -> None:
        self._expire()

    def _expire(self) -> None:
        now = self._clock()
        self.timer = None
        due: list[Any] = self.wheel.expire(now)
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
        self._after_batch()

    # -- what each core's engine may change ---------------------------------------

    def _clock(self) -> float:
        """time.monotonic()"""
        return _time.monotonic()

    def _after_batch(self) -> None:
        """Called after each batch of callbacks into connections."""


# -- the PROXY protocol (v1 and v2): the header a connection may start with ------------
#
# Rules of this part (the spec is HAProxy's doc/proxy-protocol.txt):
#
# * ``parse_proxy_header(data)`` reads a header at the start of *data* (the
#   first bytes a client sent, at most PROXY_HEADER_MAX of them) and returns
#   None (more bytes are needed), or ``(length, source, destination)``: the
#   header's length and the addresses it carries, as the socket module writes
#   them (``(host, port)``), or None for both when the header says to use the
#   connection's own (v1 ``UNKNOWN``, v2 ``LOCAL``, v2 ``UNSPEC``/``UNIX``).
#   Anything else raises ``ProxyHeaderError``: a byte that cannot start
#   either signature, a v1 line without CRLF within 107 bytes, a v2 header
#   longer than PROXY_HEADER_MAX, a bad field, a TLV that overruns the header.
# * It never looks past the header it decided on, nor past PROXY_HEADER_MAX:
#   with PROXY_HEADER_MAX bytes it always returns a header or raises (a
#   caller that holds that many bytes never waits for more).
# * ``proxy_header(version, source, destination)`` builds the header a
#   connection sends its upstream; addresses that are not both IP (a Unix
#   socket's) give v1 ``UNKNOWN`` and v2 ``LOCAL`` with family ``UNSPEC``.

#: the longest header accepted (v1's is 107 bytes at most; v2's 16 + its length)
PROXY_HEADER_MAX = 4096
#: v1's longest line, CRLF included
PROXY_V1_MAX = 107

PROXY_V1_SIG = b"PROXY "
PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"

_DIGITS = frozenset(b"0123456789")


class ProxyHeaderError(ValueError):
    """A PROXY protocol header that is not one (malformed, oversized)."""


def _v1_port(field: bytes) -> int:
    if not 1 <= len(field) <= 5 or not set(field) <= _DIGITS or (len(field) > 1 and field[0] == 48):
        raise ProxyHeaderError("v1: bad port")
    port = int(field)
    if port > 65535:
        raise ProxyHeaderError("v1: bad port")
    return port


def _v1_address(family: int, field: bytes) -> str:
    try:
        text = field.decode("ascii")
        _socket.inet_pton(family, text)
    except (UnicodeError, OSError, ValueError):
        raise ProxyHeaderError("v1: bad address") from None
    return text


def _parse_v1(data: bytes) -> Any:
    end = data.find(b"\r\n", 0, PROXY_V1_MAX)
    if end < 0:
        if len(data) >= PROXY_V1_MAX:
            raise ProxyHeaderError("v1: no CRLF within 107 bytes")
        if b"\r" in data[:-1] or b"\n" in data:
            raise ProxyHeaderError("v1: bad line end")
        return None
    line = data[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("v1: bad line end")
    parts = line.split(b" ")
    proto = parts[1] if len(parts) > 1 else b""
    if proto == b"UNKNOWN":
        return end + 2, None, None   # the rest of the line is ignored (spec)
    if proto == b"TCP4":
        family = _socket.AF_INET
    elif proto == b"TCP6":
        family = _socket.AF_INET6
    else:
        raise ProxyHeaderError("v1: bad protocol")
    if len(parts) != 6:
        raise ProxyHeaderError("v1: expected 6 fields")
    src = (_v1_address(family, parts[2]), _v1_port(parts[4]))
    dst = (_v1_address(family, parts[3]), _v1_port(parts[5]))
    return end + 2, src, dst


def _parse_v2(data: bytes) -> Any:
    if len(data) < 16:
        return None
    ver_cmd, fam, length = data[12], data[13], (data[14] << 8) | data[15]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("v2: bad version")
    cmd = ver_cmd & 15
    if cmd > 1:
        raise ProxyHeaderError("v2: bad command")
    total = 16 + length
    if total > PROXY_HEADER_MAX:
        raise ProxyHeaderError(f"v2: header of {total} bytes is over {PROXY_HEADER_MAX}")
    if len(data) < total:
        return None
    af, proto = fam >> 4, fam & 15
    if af > 3 or proto > 2:
        raise ProxyHeaderError("v2: bad address family")
    if cmd == 0:
        # LOCAL: a connection of the proxy's own (a health check); whatever
        # follows is ignored and the connection's own addresses stand
        return total, None, None
    body = data[16:total]
    src: Any = None
    dst: Any = None
    if af == 1:
        alen = 12
    elif af == 2:
        alen = 36
    elif af == 3:
        alen = 216
    else:
        alen = 0
    if af != 0 and proto == 0:
        raise ProxyHeaderError("v2: bad transport protocol")
    if proto == 2:
        raise ProxyHeaderError("v2: datagram connection on a stream")
    if len(body) < alen:
        raise ProxyHeaderError("v2: addresses longer than the header")
    if af == 1:
        src = (_socket.inet_ntop(_socket.AF_INET, body[0:4]), (body[8] << 8) | body[9])
        dst = (_socket.inet_ntop(_socket.AF_INET, body[4:8]), (body[10] << 8) | body[11])
    elif af == 2:
        src = (_socket.inet_ntop(_socket.AF_INET6, body[0:16]), (body[32] << 8) | body[33])
        dst = (_socket.inet_ntop(_socket.AF_INET6, body[16:32]), (body[34] << 8) | body[35])
    # TLVs (type, 16-bit length, value) fill the rest exactly; skipped
    i = alen
    while i < len(body):
        if i + 3 > len(body):
            raise ProxyHeaderError("v2: truncated TLV")
        i += 3 + ((body[i + 1] << 8) | body[i + 2])
        if i > len(body):
            raise ProxyHeaderError("v2: TLV longer than the header")
    return total, src, dst


def parse_proxy_header(data: bytes | bytearray) -> Any:
    """The PROXY header at the start of *data*: None (incomplete), or
    ``(length, source, destination)`` (None, None: use the connection's own
    addresses); ``ProxyHeaderError`` if it is not one.  Looks at
    PROXY_HEADER_MAX bytes at most."""
    data = bytes(data[:PROXY_HEADER_MAX])
    n = len(data)
    if n == 0:
        return None
    if data[0] == 13:   # "\r": v2
        if data[:12] != PROXY_V2_SIG[:n]:
            raise ProxyHeaderError("not a PROXY protocol header")
        return _parse_v2(data)
    if data[:6] != PROXY_V1_SIG[:n]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if n < 6:
        return None
    return _parse_v1(data)


def _ip_family(addr: Any) -> int:
    # AF_INET / AF_INET6 for a socket-module IP address, 0 for anything else
    if isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], str):
        return _socket.AF_INET6 if ":" in addr[0] else _socket.AF_INET
    return 0


def _v6(host: str, family: int) -> str:
    # an IPv4 address as IPv4-mapped IPv6 (a header carries one family)
    return host if family == _socket.AF_INET6 else "::ffff:" + host


def proxy_header(version: int, src: Any, dst: Any) -> bytes:
    """The PROXY header (*version* 1 or 2) for a connection from *src* to *dst*
    (socket-module addresses; not both IP: v1 UNKNOWN, v2 LOCAL/UNSPEC)."""
    fs, fd = _ip_family(src), _ip_family(dst)
    if not fs or not fd:
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return PROXY_V2_SIG + b"\x20\x00\x00\x00"
    shost, dhost = src[0].partition("%")[0], dst[0].partition("%")[0]
    if fs != fd:
        shost, dhost, fs = _v6(shost, fs), _v6(dhost, fd), _socket.AF_INET6
    sport, dport = int(src[1]), int(dst[1])
    if version == 1:
        proto = "TCP4" if fs == _socket.AF_INET else "TCP6"
        return f"PROXY {proto} {shost} {dhost} {sport} {dport}\r\n".encode("ascii")
    if fs == _socket.AF_INET:
        head = b"\x21\x11\x00\x0c"
    else:
        head = b"\x21\x21\x00\x24"
    return (PROXY_V2_SIG + head + _socket.inet_pton(fs, shost) + _socket.inet_pton(fs, dhost)
            + bytes((sport >> 8, sport & 255, dport >> 8, dport & 255)))


def proxy_networks(cidrs: Any) -> tuple[tuple[int, int, int], ...]:
    """*cidrs* (``"127.0.0.1/32"``, ``"::1/128"``, ...) as ``(family, network, mask)``
    integers for ``peer_allowed``; ``ValueError`` names the bad one."""
    out = []
    for text in cidrs:
        addr, sep, bits_text = str(text).partition("/")
        family = _socket.AF_INET6 if ":" in addr else _socket.AF_INET
        width = 32 if family == _socket.AF_INET else 128
        try:
            raw = int.from_bytes(_socket.inet_pton(family, addr), "big")
        except OSError:
            raise ValueError(f"{text!r}: not an IP address or network") from None
        if not sep:
            bits = width
        elif bits_text.isdigit() and bits_text.isascii() and int(bits_text) <= width:
            bits = int(bits_text)
        else:
            raise ValueError(f"{text!r}: the prefix length must be 0-{width}")
        mask = ((1 << bits) - 1) << (width - bits)
        if raw & ~mask:
            raise ValueError(f"{text!r}: host bits set (the network is {_net_text(family, raw & mask, bits)})")
        out.append((family, raw, mask))
    return tuple(out)


def _net_text(family: int, raw: int, bits: int) -> str:
    size = 4 if family == _socket.AF_INET else 16
    return f"{_socket.inet_ntop(family, raw.to_bytes(size, 'big'))}/{bits}"


def peer_allowed(networks: tuple[tuple[int, int, int], ...], peer: Any) -> bool:
    """May *peer* (a socket-module address) send a PROXY header?  A Unix
    socket's peer always may (the socket file's permissions decide who
    connects); an IP peer if it is in one of *networks* (``proxy_networks``;
    an IPv4-mapped IPv6 peer counts as its IPv4 address)."""
    family = _ip_family(peer)
    if not family:
        return True
    host = peer[0].partition("%")[0]
    raw = int.from_bytes(_socket.inet_pton(family, host), "big")
    if family == _socket.AF_INET6 and raw >> 32 == 0xFFFF:
        family, raw = _socket.AF_INET, raw & 0xFFFFFFFF
    for net_family, net, mask in networks:
        if net_family == family and raw & mask == net:
            return True
    return False
