"""The TCP proxy service: a layer-4 proxy whose state survives every update.

``ProxyFactory`` is the plain picklable value the config builds; each worker
turns it into a ``ProxyService`` with ``make_via_ref(old)``.  The bytes of a
connection are relayed by the core's ``Connection``/``UpstreamSide`` pair
(compiled, or the pure-Python twin); this module decides *where* they go.

Rules of this module:

* State that must survive an update lives in objects the next version
  shares with the running one, never copies: the service counters (one
  ``ProxyCounters``), the round-robin position, and one ``UpstreamState``
  per upstream address (live connections, consecutive failures, ejection).
  Old connections keep updating the same objects while they drain, so
  ``least_conn`` and ``max_connections`` stay exact across updates.
* Building the next version changes nothing in the running one: an
  aborted Precommit leaves no trace.
* An upstream that is removed gets no new connections; its state is kept
  (as *retired*) while connections to it remain, so re-adding it finds its
  live count.
* Passive health: ``max_fails`` consecutive connect failures eject an
  upstream for ``fail_timeout`` seconds; after that one connection tries it
  again (success restores it, failure ejects it again).  If every upstream
  is ejected, they are tried anyway -- never refuse all traffic.
* Health and counters are per worker process; ``hotproxy status`` sums them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import zlib
from dataclasses import dataclass
from typing import Any

from . import core
from .listeners import parse_host_port
from .service import MakeService, Service

log = logging.getLogger("hotproxy.proxy")
access_log = logging.getLogger("hotproxy.access")

#: the balancing policies ``balance`` accepts
BALANCE_POLICIES = ("round_robin", "random", "least_conn", "hash")

#: the first read buffer of each direction; it doubles on full reads (bulk
#: transfers) up to MAX_BUFFER_SIZE, so idle and chatty connections stay small
BUFFER_SIZE = 16 * 1024
MAX_BUFFER_SIZE = 256 * 1024

# how many rehashes ``hash`` tries before it falls back to the candidates in order
_HASH_PROBES = 20


@dataclass(frozen=True)
class Upstream:
    """One parsed upstream address: TCP (``host``/``port``) or Unix (``path``)."""

    address: str
    host: str | None = None
    port: int | None = None
    path: str | None = None


def parse_upstream(text: str) -> Upstream:
    """``host:port``, ``[v6]:port`` or ``unix:/path`` -> an ``Upstream``; ``ValueError`` if bad."""
    if not isinstance(text, str):
        raise ValueError(f"bad address {text!r}: expected a string")
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError(f"bad address {text!r}: expected unix:/path")
        return Upstream(text, path=path)
    host, port = parse_host_port(text)
    if port == 0:
        raise ValueError(f"bad address {text!r}: port must be 1-65535")
    return Upstream(text, host=host, port=port)


def _number(name: str, value: Any, *, minimum: float, strict: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name}: must be {'>' if strict else '>='} {minimum:g}, got {value!r}")


def _integer(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ProxyFactory(MakeService):
    """Builds proxy services; a plain picklable value (the ``kind = "proxy"`` config).

    ``upstreams``       addresses: ``host:port``, ``[v6]:port`` or ``unix:/path``
    ``balance``         ``round_robin`` | ``random`` | ``least_conn`` | ``hash`` (client IP)
    ``connect_timeout`` seconds per connect attempt
    ``idle_timeout``    close a connection with no traffic either way for this long (0: never)
    ``max_connections`` open connections per worker, over all versions; more are closed at once
    ``retries``         other upstreams tried when a connect is refused or times out
    ``max_fails``       consecutive connect failures that eject an upstream (0: never eject)
    ``fail_timeout``    seconds an ejected upstream gets no connections
    ``keepalive``       TCP keepalive on both sides
    ``access_log``      one line per closed connection on the ``hotproxy.access`` logger
    """

    upstreams: tuple[str, ...]
    balance: str = "round_robin"
    connect_timeout: float = 2.0
    idle_timeout: float = 300.0
    max_connections: int = 10000
    retries: int = 2
    max_fails: int = 3
    fail_timeout: float = 10.0
    keepalive: bool = False
    access_log: bool = False

    def __post_init__(self) -> None:
        ups = self.upstreams
        if isinstance(ups, str):
            raise ValueError(f"upstreams: expected a list of addresses, got the string {ups!r}")
        try:
            ups = tuple(ups)
        except TypeError:
            raise ValueError(f"upstreams: expected a list of addresses, got {ups!r}") from None
        if not ups:
            raise ValueError("upstreams: expected at least one address")
        seen: set[str] = set()
        for i, addr in enumerate(ups):
            try:
                parse_upstream(addr)
            except ValueError as exc:
                raise ValueError(f"upstreams[{i}]: {exc}") from None
            if addr in seen:
                raise ValueError(f"upstreams[{i}]: {addr!r} is listed twice")
            seen.add(addr)
        object.__setattr__(self, "upstreams", ups)
        if self.balance not in BALANCE_POLICIES:
            raise ValueError(f"balance: expected one of {', '.join(BALANCE_POLICIES)}, got {self.balance!r}")
        _number("connect_timeout", self.connect_timeout, minimum=0, strict=True)
        _number("idle_timeout", self.idle_timeout, minimum=0, strict=False)
        _integer("max_connections", self.max_connections, minimum=1)
        _integer("retries", self.retries, minimum=0)
        _integer("max_fails", self.max_fails, minimum=0)
        _number("fail_timeout", self.fail_timeout, minimum=0, strict=True)
        for name in ("keepalive", "access_log"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")

    def make_via_ref(self, old: Service | None) -> ProxyService:
        """The next version: shares *old*'s counters, round-robin position and
        upstream states (if *old* is a proxy service on the same core)."""
        if isinstance(old, ProxyService) and isinstance(old.shared.counters, core.impl.ProxyCounters):
            return ProxyService(self, old.shared, old.all_states())
        return ProxyService(self, _Shared(), {})

    def make(self) -> ProxyService:
        """A fresh service: zero counters, every upstream healthy."""
        return ProxyService(self, _Shared(), {})


class _Shared:
    """What every version of one site's proxy on one worker shares by reference."""

    __slots__ = ("counters", "rr")

    def __init__(self) -> None:
        self.counters = core.impl.ProxyCounters()
        self.rr = 0   # the round-robin position (also breaks least_conn ties)


class _Target:
    """An upstream of one service version: where to connect, and its shared state."""

    __slots__ = ("up", "state")

    def __init__(self, up: Upstream, state: Any) -> None:
        self.up = up
        self.state = state


class ProxyService(Service):
    """One version of a proxy site on one worker."""

    def __init__(self, factory: ProxyFactory, shared: _Shared, old_states: dict[str, Any]) -> None:
        self.factory = factory
        self.shared = shared
        self.counters = shared.counters
        impl = core.impl
        self.targets: list[_Target] = []
        for addr in factory.upstreams:
            state = old_states.get(addr)
            if state is None or not isinstance(state, impl.UpstreamState):
                state = impl.UpstreamState(addr)
            self.targets.append(_Target(parse_upstream(addr), state))
        mine = set(factory.upstreams)
        #: removed upstreams that still have connections (old versions' drains)
        self.retired: dict[str, Any] = {a: s for a, s in old_states.items()
                                        if a not in mine and s.active > 0}
        self._max = factory.max_connections
        self._Connection = impl.Connection
        self._log = factory.access_log
        # The relay's callbacks are the balancer's, not this service's: a
        # cycle through the service would keep old versions alive until a
        # GC pass.  Each connection holds its service (``owner``) instead,
        # so a version is freed when its last connection finishes.
        self.balancer = _Balancer(factory, shared, self.targets)
        self.relay = impl.RelayConfig(
            shared.counters,
            idle_timeout=float(factory.idle_timeout),
            keepalive=factory.keepalive,
            connect=self.balancer.start_connect,
            on_close=self.balancer.log_close if factory.access_log else None,
            want_peername=factory.access_log or factory.balance == "hash",
            buffer_size=BUFFER_SIZE,
            max_buffer_size=MAX_BUFFER_SIZE,
        )

    # -- the accept path -------------------------------------------------------

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        """A relay for one accepted client, or a refusal over ``max_connections``."""
        counters = self.counters
        if counters.active >= self._max:
            counters.refused += 1
            return _Refuse(self._log)  # type: ignore[return-value]
        return self._Connection(self.relay, conns, self)  # type: ignore[no-any-return]

    # -- status and logs -------------------------------------------------------

    def all_states(self) -> dict[str, Any]:
        """Every upstream state this version knows: its upstreams and retired ones."""
        states = dict(self.retired)
        states.update((t.up.address, t.state) for t in self.targets)
        return states

    @property
    def upstream_states(self) -> dict[str, Any]:
        """This version's upstreams' states, by address."""
        return {t.up.address: t.state for t in self.targets}

    def stats(self) -> dict[str, Any]:
        """Counters (shared by every version) and per-upstream state, for ``hotproxy status``."""
        out: dict[str, Any] = self.counters.as_dict()
        now = time.monotonic()
        ups: dict[str, Any] = {}
        for addr, st in self.all_states().items():
            ups[addr] = {
                "active": st.active,
                "connections": st.connections,
                "failures": st.failures,
                "fails": st.fails,
                "ejected_for": round(max(0.0, st.ejected_until - now), 3),
                "bytes_in": st.bytes_in,
                "bytes_out": st.bytes_out,
            }
            if addr in self.retired:
                ups[addr]["removed"] = True
        out["upstreams"] = ups
        out["balance"] = self.factory.balance
        return out

    def __repr__(self) -> str:
        return f"<ProxyService {self.factory.balance} {list(self.factory.upstreams)}>"


class _Balancer:
    """Picks and connects upstreams for one service version (the relay's ``connect``)."""

    def __init__(self, factory: ProxyFactory, shared: _Shared, targets: list[_Target]) -> None:
        self.factory = factory
        self.shared = shared
        self.counters = shared.counters
        self.targets = targets
        self._timeout = factory.connect_timeout
        self._attempts = 1 + factory.retries
        # the plain function, not a bound method: no reference cycle
        self._choose = getattr(_Balancer, "_choose_" + factory.balance)

    # -- connecting ------------------------------------------------------------

    def start_connect(self, conn: Any) -> asyncio.Task[None]:
        # One task per connection, and nothing else asyncio-level: the
        # connect timeout is one timer handle per attempt that cancels the
        # task (``_Attempt``), not an ``asyncio.timeout()`` context (a
        # Timeout object, two coroutine calls and a current_task() lookup
        # per attempt -- 7 % of a worker's time under Connection: close).
        loop = asyncio.get_running_loop()
        attempt = _Attempt()
        task = loop.create_task(self._connect(conn, loop, attempt))
        attempt.task = task
        return task

    async def _connect(self, conn: Any, loop: asyncio.AbstractEventLoop, attempt: _Attempt) -> None:
        tried: list[_Target] = []
        for _ in range(self._attempts):
            target = self._pick(conn, tried)
            if target is None:
                break
            proto = conn.upstream_protocol(target.state)
            if proto is None:
                return   # the client is gone
            up = target.up
            timer = loop.call_later(self._timeout, attempt.time_out)
            try:
                if up.path is not None:
                    await loop.create_unix_connection(lambda: proto, up.path)
                else:
                    await loop.create_connection(lambda: proto, up.host, up.port)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                if not attempt.timed_out:
                    timer.cancel()
                    conn.attempt_failed()   # the client went away while we connected
                    raise
                # our own timer cancelled the task: a connect timeout
                attempt.timed_out = False
                attempt.task.uncancel()  # type: ignore[union-attr]
                if not conn.attempt_failed():
                    return   # it had connected after all: the relay runs
                self._failed(target, TimeoutError())
                tried.append(target)
                continue
            except OSError as exc:   # refused, unreachable
                timer.cancel()
                if not conn.attempt_failed():
                    return   # it had connected after all: the relay runs
                self._failed(target, exc)
                tried.append(target)
                continue
            timer.cancel()
            self._succeeded(target)
            return
        conn.connect_failed()

    def _failed(self, target: _Target, exc: BaseException) -> None:
        st = target.state
        self.counters.connect_failures += 1
        st.failures += 1
        st.fails += 1
        max_fails = self.factory.max_fails
        if max_fails and st.fails >= max_fails:
            now = time.monotonic()
            was_ejected = st.ejected_until > 0
            st.ejected_until = now + self.factory.fail_timeout
            if not was_ejected:
                log.warning("upstream %s ejected for %.1fs after %d connect failures (last: %s)",
                            st.address, self.factory.fail_timeout, st.fails, _reason(exc))
        else:
            log.info("upstream %s: connect failed (%s)", st.address, _reason(exc))

    def _succeeded(self, target: _Target) -> None:
        st = target.state
        if st.ejected_until > 0:
            log.warning("upstream %s is back after %d connect failures", st.address, st.fails)
        st.fails = 0
        st.ejected_until = 0.0

    # -- balancing -------------------------------------------------------------

    def _pick(self, conn: Any, tried: list[_Target]) -> _Target | None:
        targets = self.targets
        if len(targets) == 1:
            # one upstream: it is tried, ejected or not (never refuse all
            # traffic), once -- without the candidate lists below
            return None if tried else targets[0]
        now = time.monotonic()
        cands = [t for t in self.targets if t.state.ejected_until <= now and t not in tried]
        if not cands:
            # every upstream left is ejected: try them anyway rather than refuse
            cands = [t for t in self.targets if t not in tried]
            if not cands:
                return None
        if len(cands) == 1:
            return cands[0]
        return self._choose(self, conn, cands)  # type: ignore[no-any-return]

    def _choose_round_robin(self, conn: Any, cands: list[_Target]) -> _Target:
        shared = self.shared
        target = cands[shared.rr % len(cands)]
        shared.rr += 1
        return target

    def _choose_random(self, conn: Any, cands: list[_Target]) -> _Target:
        return random.choice(cands)

    def _choose_least_conn(self, conn: Any, cands: list[_Target]) -> _Target:
        # the fewest live connections; ties go round-robin, not to the first
        shared = self.shared
        n = len(cands)
        start = shared.rr % n
        shared.rr += 1
        best = cands[start]
        for i in range(1, n):
            t = cands[(start + i) % n]
            if t.state.active < best.state.active:
                best = t
        return best

    def _choose_hash(self, conn: Any, cands: list[_Target]) -> _Target:
        # A stable hash of the client IP (crc32: the same in every worker
        # process, unlike hash()) over the full upstream list, so a client
        # keeps its upstream while that one is healthy; rehash past an
        # unavailable one.
        peer = conn.peername
        key = (peer[0] if isinstance(peer, tuple) and peer else str(peer or "")).encode()
        targets = self.targets
        h = zlib.crc32(key)
        for probe in range(_HASH_PROBES):
            t = targets[h % len(targets)]
            if t in cands:
                return t
            h = zlib.crc32(b"%d" % probe, h)
        return cands[zlib.crc32(key) % len(cands)]

    def log_close(self, conn: Any) -> None:
        up = conn.upstream
        access_log.info("%s -> %s in=%d out=%d time=%.3fs end=%s", _peer(conn.peername),
                        up.address if up is not None else "-", conn.bytes_in, conn.bytes_out,
                        conn.duration, conn.end)


class _Attempt:
    """One connection's connect task and whether its own timer cancelled it."""

    __slots__ = ("task", "timed_out")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.timed_out = False

    def time_out(self) -> None:
        """The attempt in progress took longer than ``connect_timeout``."""
        task = self.task
        if task is not None and not task.done():
            self.timed_out = True
            task.cancel()


class _Refuse(asyncio.Protocol):
    """Closes a connection at once (over ``max_connections``)."""

    __slots__ = ("log",)

    def __init__(self, log_it: bool) -> None:
        self.log = log_it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.log:
            access_log.info("%s -> - in=0 out=0 time=0.000s end=refused",
                            _peer(transport.get_extra_info("peername")))
        transport.abort()  # type: ignore[attr-defined]


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return f"unix:{peer}" if peer else "unix"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

