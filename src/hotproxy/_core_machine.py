# cython: annotation_typing=False
"""The I/O-free parts of the core, one source for both cores.

Cython compiles this file, typed by ``_core_machine.pxd`` (pure-Python
mode: the ``.pxd`` augments it), into ``hotproxy._core_machine``, which the
compiled core cimports; the pure-Python twin runs this very file as plain
Python (``_core_py`` loads the source even where the extension is built).
It does no I/O and imports nothing of the project, so it can be tested
without sockets (``tests/test_relay_state.py``).

Two things live here:

* ``Direction``: one direction of a proxied connection (client to upstream,
  or upstream to client), read from its *source* socket and written to its
  *destination*.  The relay of each core keeps two and drives them with the
  same state machine: ``Direction.step(event)`` moves it to its next state
  and returns what the relay must do to the destination (``ACT_*``).  The
  transitions are one table (``transition``), the only place that says
  what follows what.
* ``TimerWheel``: the connections' deadlines, in buckets of ``resolution``
  seconds, so a tick touches only the connections that are due.

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

from heapq import heappop as _heappop, heappush as _heappush

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

