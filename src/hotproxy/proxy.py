"""The TCP proxy service: a layer-4 proxy whose state survives every update.

``ProxyFactory`` is the plain picklable value the config builds; each worker
turns it into a ``ProxyService`` with ``make_via_ref(old)``.  The bytes of a
connection are relayed by the core's ``Connection`` (compiled, or the
pure-Python twin), which also connects the upstream socket itself; this
module decides *where* it connects (``_Balancer``, the relay's connector).

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
  The one exception is the open-connection count that ``max_connections``
  limits: it is the instance's, in a counter every worker shares
  (``hotproxy.limits``); the core takes one count when it accepts a
  connection and gives it back when the connection ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import time
import zlib
from dataclasses import dataclass, replace
from typing import Any

from . import addresses, core, limits
from .addresses import Address, is_literal
from .errors import describe
from .limits import CounterSlot, NextSlot
from .listeners import lookup
from .options import PROXY_OPTIONS, check_fields
from .service import MakeService, MaybeAwaitable, Seed, Service

log = logging.getLogger("hotproxy.proxy")
access_log = logging.getLogger("hotproxy.access")

#: the first read buffer of each direction; it doubles on full reads (bulk
#: transfers) up to MAX_BUFFER_SIZE, so idle and chatty connections stay small
BUFFER_SIZE = 16 * 1024
MAX_BUFFER_SIZE = 256 * 1024

# how many rehashes ``hash`` tries before it falls back to the candidates in order
_HASH_PROBES = 20


#: one parsed upstream address (``text``; ``host`` and ``port``, or ``path``)
Upstream = Address


def parse_upstream(text: str) -> Upstream:
    """``host:port``, ``[v6]:port`` or ``unix:/path`` -> an ``Upstream``; ``ValueError`` if bad
    (``addresses.parse``, and a port to connect to: not 0)."""
    up = addresses.parse(text)
    if up.port == 0:
        raise ValueError(f"bad address {text!r}: port must be 1-65535")
    return up


#: the declared defaults (``options.PROXY_OPTIONS``), by key
_OPT = {key: opt.default for key, opt in PROXY_OPTIONS.items()}


@dataclass(frozen=True)
class ProxyFactory(MakeService):
    """Builds proxy services; a plain picklable value (the ``kind = "proxy"`` config).

    Every field but ``counter`` is the config key of the same name, declared
    once -- type, default, range, what it does -- in ``options.PROXY_OPTIONS``
    (``hotproxy check --keys`` lists them) and checked by the same rules as
    the config file.  ``upstreams`` are ``host:port``, ``[v6]:port`` or
    ``unix:/path``, each listed once.

    ``counter`` is where ``max_connections`` counts: the slot the
    ``WorkerManager`` gives it (``with_shared_counters``); None: this
    process only.
    """

    upstreams: tuple[str, ...]
    balance: str = _OPT["balance"]
    connect_timeout: float = _OPT["connect_timeout"]
    idle_timeout: float = _OPT["idle_timeout"]
    max_connections: int = _OPT["max_connections"]
    retries: int = _OPT["retries"]
    max_fails: int = _OPT["max_fails"]
    fail_timeout: float = _OPT["fail_timeout"]
    keepalive: bool = _OPT["keepalive"]
    access_log: bool = _OPT["access_log"]
    counter: CounterSlot | None = None
    #: the service's name in the config ("" for a factory made in code): in
    #: every log line about it, and in the JSON ``service`` field
    service: str = ""

    def __post_init__(self) -> None:
        ups = self.upstreams
        if isinstance(ups, str):   # type: ignore[unreachable]  # typed a tuple; code may still pass a str
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
        check_fields(self, PROXY_OPTIONS, skip=("upstreams",))

    def named(self, name: str) -> ProxyFactory:
        return replace(self, service=name)

    def with_shared_counters(self, next_slot: NextSlot) -> ProxyFactory:
        """This factory counting ``max_connections`` in the instance's slot *next_slot()*."""
        return replace(self, counter=next_slot())

    def make_via_ref(self, old: Service | None) -> MaybeAwaitable[ProxyService]:
        """The next version: shares *old*'s counters, open-connection count,
        round-robin position and upstream states (if *old* is a proxy service
        on the same core).

        Upstream host names are looked up with the loop's resolver: then this
        returns a coroutine, and the worker serves on while it awaits.  With
        literal addresses and Unix paths only, it returns the service.
        """
        if isinstance(old, ProxyService) and isinstance(old.shared.counters, core.impl.ProxyCounters):
            return self._build(old.shared, old.all_states())
        return self._build(_Shared(limits.counter(self.counter)), {})

    def make_via_snapshot(self, seed: Seed) -> MaybeAwaitable[ProxyService]:
        """The first version after an upgrade of the program: the counters and
        each upstream's counts continue (summed over ``seed.carry``), the
        round-robin position and passive health (an ejection's remaining
        time) are ``seed.like``'s.  ``ValueError`` if the snapshots cannot be read."""
        seed = seed.of_type("proxy")
        shared = _Shared(limits.counter(self.counter))
        counters = shared.counters
        for key in ("accepted", "bytes_in", "bytes_out", "connect_failures", "refused", "idle_closed",
                    "no_upstream"):
            setattr(counters, key, sum(_number(s.get("counters", {}).get(key, 0), key) for s in seed.carry))
        for s in seed.carry:
            if "durations" in s:   # a snapshot of an older program has none
                counters.durations.add(s["durations"])
        like = seed.like or {}
        shared.rr = _number(like.get("rr", 0), "rr")
        now = time.monotonic()
        states: dict[str, Any] = {}
        for addr in self.upstreams:
            st = core.impl.UpstreamState(addr)
            for key in ("connections", "failures", "bytes_in", "bytes_out", "ejections"):
                setattr(st, key, sum(_number(s.get("upstreams", {}).get(addr, {}).get(key, 0), key)
                                     for s in seed.carry))
            for s in seed.carry:
                times = s.get("upstreams", {}).get(addr, {}).get("connect_times")
                if times is not None:
                    st.connect_times.add(times)
            view = (like.get("upstreams") or {}).get(addr) or {}
            st.fails = _number(view.get("fails", 0), "fails")
            ejected_for = float(view.get("ejected_for", 0.0))
            if ejected_for > 0:
                st.ejected_until = now + min(ejected_for, self.fail_timeout)
            states[addr] = st
        return self._build(shared, states)

    def make(self) -> MaybeAwaitable[ProxyService]:
        """A fresh service: zero counters, every upstream healthy (the
        instance's open-connection count is the slot's, as it stands; a
        coroutine if host names must be looked up, as ``make_via_ref``)."""
        return self._build(_Shared(limits.counter(self.counter)), {})

    def _build(self, shared: _Shared, states: dict[str, Any]) -> MaybeAwaitable[ProxyService]:
        names = [up for up in map(parse_upstream, self.upstreams)
                 if up.host is not None and not is_literal(up.host)]
        if not names:
            return ProxyService(self, shared, states)
        return self._build_after_lookup(shared, states, names)

    async def _build_after_lookup(self, shared: _Shared, states: dict[str, Any],
                                  names: list[Upstream]) -> ProxyService:
        found = await asyncio.gather(*(lookup_upstream(up) for up in names))
        return ProxyService(self, shared, states, {up.text: info for up, info in zip(names, found)})


def _number(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}: expected a count, got {value!r}")
    return value


class _Shared:
    """What every version of one site's proxy on one worker shares by reference."""

    __slots__ = ("counters", "rr", "limit")

    def __init__(self, limit: Any) -> None:
        self.counters = core.impl.ProxyCounters()
        self.rr = 0   # the round-robin position (also breaks least_conn ties)
        #: the instance's open connections of this service (a core SharedCounter)
        self.limit = limit


async def lookup_upstream(up: Upstream) -> tuple[int, Any]:
    """``(family, sockaddr)`` of *up*'s host, looked up without blocking the loop;
    a name that does not resolve is an error of the config (``ValueError``)."""
    assert up.host is not None and up.port is not None
    try:
        infos = await lookup(up.host, up.port)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"{up.text}: cannot resolve {up.host!r}: {exc}") from None
    return infos[0][0], infos[0][4]


def resolve(up: Upstream, found: tuple[int, Any] | None = None) -> tuple[int, bytes, Any]:
    """Where to connect for *up*: ``(family, raw sockaddr, socket-module address)``.

    A host name is resolved when the service version is built (at each
    deploy or reload, like HAProxy and nginx at start-up), not per
    connection: *found* is its ``lookup_upstream()``.  Without it a name
    is looked up here, blocking (the factory never leaves it to this);
    a literal address needs no lookup.
    """
    if up.path is not None:
        path = os.fsencode(up.path)
        if len(path) >= _UNIX_PATH_MAX:
            raise ValueError(f"{up.text}: the path is longer than {_UNIX_PATH_MAX - 1} bytes")
        return socket.AF_UNIX, struct.pack("=H", socket.AF_UNIX) + path + b"\0", up.path
    assert up.host is not None and up.port is not None
    if found is None:
        flags = socket.AI_NUMERICHOST if is_literal(up.host) else 0
        try:
            infos = socket.getaddrinfo(up.host, up.port, type=socket.SOCK_STREAM, flags=flags)
        except (socket.gaierror, UnicodeError) as exc:
            raise ValueError(f"{up.text}: cannot resolve {up.host!r}: {exc}") from None
        found = infos[0][0], infos[0][4]
    family, addr = found
    host, port = str(addr[0]), int(addr[1])
    if family == socket.AF_INET:
        # struct sockaddr_in: family (host order), port, address, zero padding
        raw = (struct.pack("=H", family) + struct.pack("!H", port)
               + socket.inet_pton(family, host) + bytes(8))
    elif family == socket.AF_INET6:
        # struct sockaddr_in6: family, port, flow info, address, scope id
        flowinfo, scope_id = int(addr[2]), int(addr[3])  # type: ignore[misc]
        raw = (struct.pack("=H", family) + struct.pack("!HI", port, flowinfo)
               + socket.inet_pton(family, host.partition("%")[0]) + struct.pack("=I", scope_id))
    else:
        raise ValueError(f"{up.text}: unsupported address family {family!r}")
    return family, raw, addr


# sizeof(sun_path) on Linux
_UNIX_PATH_MAX = 108


class ProxyService(Service):
    """One version of a proxy site on one worker."""

    def __init__(self, factory: ProxyFactory, shared: _Shared, old_states: dict[str, Any],
                 found: dict[str, tuple[int, Any]] | None = None) -> None:
        # *found*: upstream address -> (family, sockaddr) of its host, looked
        # up by the factory without blocking (literal addresses need none)
        self.factory = factory
        self.shared = shared
        self.counters = shared.counters
        impl = core.impl
        self.targets: list[Any] = []
        for addr in factory.upstreams:
            state = old_states.get(addr)
            if state is None or not isinstance(state, impl.UpstreamState):
                state = impl.UpstreamState(addr)
            up = parse_upstream(addr)
            family, raw, address = resolve(up, found.get(addr) if found else None)
            self.targets.append(impl.Target(state, up, family, raw, address))
        mine = set(factory.upstreams)
        #: removed upstreams that still have connections (old versions' drains)
        self.retired: dict[str, Any] = {a: s for a, s in old_states.items()
                                        if a not in mine and s.active > 0}
        self._Connection = impl.Connection
        # The relay's callbacks are the balancer's, not this service's: a
        # cycle through the service would keep old versions alive until a
        # GC pass.  Each connection holds its service (``owner``) instead,
        # so a version is freed when its last connection finishes.
        self.balancer = _Balancer(factory, shared, self.targets)
        self.relay = impl.RelayConfig(
            shared.counters,
            idle_timeout=float(factory.idle_timeout),
            keepalive=factory.keepalive,
            connector=self.balancer,
            on_close=self.balancer.log_close if factory.access_log else None,
            want_peername=factory.access_log or factory.balance == "hash",
            buffer_size=BUFFER_SIZE,
            max_buffer_size=MAX_BUFFER_SIZE,
            targets=tuple(self.targets),
            connect_timeout=float(factory.connect_timeout),
            attempts=1 + factory.retries,
            max_connections=factory.max_connections,
            on_refuse=self.balancer.log_refused if factory.access_log else None,
            limit=shared.limit,
        )

    # -- the accept path -------------------------------------------------------

    #: the core's listener may accept for this service (``new_raw_connection``)
    accepts_raw = True

    def new_raw_connection(self, conns: Any) -> Any:
        """A relay for a socket the core accepted; it refuses over ``max_connections`` itself."""
        return self._Connection(self.relay, conns, self)

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        """A relay for one accepted client; it refuses over ``max_connections`` itself."""
        return self._Connection(self.relay, conns, self)

    # -- status and logs -------------------------------------------------------

    def published(self, generation: int) -> None:
        """This version serves the site as *generation* (its access lines say so)."""
        self.balancer.generation = generation

    def owns(self, conn: object) -> bool:
        """True for a relay of this version: the core's ``Connection`` keeps
        the version's ``RelayConfig`` as ``cfg`` (status only)."""
        return isinstance(conn, self._Connection) and conn.cfg is self.relay

    def all_states(self) -> dict[str, Any]:
        """Every upstream state this version knows: its upstreams and retired ones."""
        states = dict(self.retired)
        states.update((t.up.text, t.state) for t in self.targets)
        return states

    def snapshot(self) -> dict[str, Any]:
        """Counters, the round-robin position and each upstream's counts and
        health (an ejection as the seconds it has left), as plain data."""
        counters = self.counters.as_dict()
        del counters["active"]   # open connections stay on the old processes
        now = time.monotonic()
        ups = {addr: {"connections": st.connections, "failures": st.failures, "bytes_in": st.bytes_in,
                      "bytes_out": st.bytes_out, "fails": st.fails, "ejections": st.ejections,
                      "connect_times": st.connect_times.as_dict(),
                      "ejected_for": round(max(0.0, st.ejected_until - now), 3)}
               for addr, st in self.all_states().items()}
        return {"type": "proxy", "v": 1, "counters": counters, "durations": self.counters.durations.as_dict(),
                "rr": self.shared.rr, "upstreams": ups}

    @property
    def upstream_states(self) -> dict[str, Any]:
        """This version's upstreams' states, by address."""
        return {t.up.text: t.state for t in self.targets}

    def stats(self) -> dict[str, Any]:
        """Counters (shared by every version) and per-upstream state, for ``hotproxy status``.

        ``accepted`` counts the connections served, ``refused`` the ones
        closed at once over ``max_connections``; the open ones are the
        site's count (``active`` in its status), not repeated here.
        """
        out: dict[str, Any] = self.counters.as_dict()
        del out["active"]
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
                "ejections": st.ejections,
                "connect_times": st.connect_times.as_dict(),
            }
            if addr in self.retired:
                ups[addr]["removed"] = True
        out["upstreams"] = ups
        out["durations"] = self.counters.durations.as_dict()
        out["balance"] = self.factory.balance
        return out

    def __repr__(self) -> str:
        return f"<ProxyService {self.factory.balance} {list(self.factory.upstreams)}>"


class _Balancer:
    """Picks upstreams for one service version and keeps their health (the relay's connector)."""

    def __init__(self, factory: ProxyFactory, shared: _Shared, targets: list[Any]) -> None:
        self.factory = factory
        self.shared = shared
        self.counters = shared.counters
        self.targets = targets
        self.generation = 0   # the site's generation of this version (ProxyService.published)
        # the plain function, not a bound method: no reference cycle
        self._choose = getattr(_Balancer, "_choose_" + factory.balance)

    # -- the relay's connector interface -----------------------------------------
    #
    # The core connects (non-blocking connect(2), its own timeout, retries up
    # to ``1 + retries`` attempts); it asks ``pick`` for a target when there
    # is more than one, and reports ``failed`` attempts and a ``succeeded``
    # one after failures.

    def failed(self, target: Any, exc: BaseException) -> None:
        """An attempt to *target* was refused or timed out."""
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
                st.ejections += 1
                log.warning("%supstream %s ejected for %.1fs after %d connect failures (last: %s)", self._who,
                            st.address, self.factory.fail_timeout, st.fails, describe(exc),
                            extra=self._fields(upstream=st.address, reason=describe(exc)))
        else:
            log.info("%supstream %s: connect failed (%s)", self._who, st.address, describe(exc),
                     extra=self._fields(upstream=st.address, reason=describe(exc)))

    def succeeded(self, target: Any) -> None:
        """*target* connected after failures: it is healthy again."""
        st = target.state
        if st.ejected_until > 0:
            log.warning("%supstream %s is back after %d connect failures", self._who, st.address, st.fails,
                        extra=self._fields(upstream=st.address))
        st.fails = 0
        st.ejected_until = 0.0

    # -- balancing -------------------------------------------------------------

    def pick(self, conn: Any, tried: Any) -> Any | None:
        """The next target for *conn*, not one of *tried*; None: give up."""
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
        return self._choose(self, conn, cands)

    def _choose_round_robin(self, conn: Any, cands: list[Any]) -> Any:
        shared = self.shared
        target = cands[shared.rr % len(cands)]
        shared.rr += 1
        return target

    def _choose_random(self, conn: Any, cands: list[Any]) -> Any:
        return random.choice(cands)

    def _choose_least_conn(self, conn: Any, cands: list[Any]) -> Any:
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

    def _choose_hash(self, conn: Any, cands: list[Any]) -> Any:
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

    @property
    def _who(self) -> str:
        """``service NAME: `` before a line about this service (nothing for an unnamed one)."""
        return f"service {self.factory.service}: " if self.factory.service else ""

    def _fields(self, **fields: Any) -> dict[str, Any]:
        """The ``extra=`` of a line about this service (the JSON log format's keys)."""
        return {"service": self.factory.service or None, **fields}

    def log_close(self, conn: Any) -> None:
        """The access line of a finished connection."""
        up = conn.upstream
        client, upstream, duration = _peer(conn.peername), up.address if up is not None else "-", conn.duration
        connect = conn.connect_time if up is not None else 0.0
        access_log.info("%s%s -> %s in=%d out=%d connect=%.3fs gen=%d time=%.3fs end=%s", self._who, client,
                        upstream, conn.bytes_in, conn.bytes_out, connect, self.generation, duration, conn.end,
                        extra=self._fields(client=client, upstream=upstream, bytes_in=conn.bytes_in,
                                           bytes_out=conn.bytes_out, connect_time=round(connect, 6),
                                           duration=round(duration, 6), end=conn.end,
                                           generation=self.generation))

    def log_refused(self, peer: Any) -> None:
        """The access line of a connection refused by ``max_connections``."""
        client = _peer(peer)
        access_log.info("%s%s -> - in=0 out=0 connect=0.000s gen=%d time=0.000s end=refused", self._who, client,
                        self.generation,
                        extra=self._fields(client=client, upstream="-", bytes_in=0, bytes_out=0, connect_time=0.0,
                                           duration=0.0, end="refused", generation=self.generation))


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return addresses.format_host_port(str(peer[0]), peer[1])
    return addresses.unix_address(str(peer)) if peer else "unix"

