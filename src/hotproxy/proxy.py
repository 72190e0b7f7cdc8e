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
* Active health checks (``health_check``) run once per instance, in the
  master (``health``); each worker reads an upstream's state from the
  instance's ``HealthTable`` (one byte of shared memory, no message).
  ``_Balancer.available`` is the one predicate "may this upstream be picked
  now": the shared state when the service has active checks, else this
  worker's passive ejection.  With active checks, ``max_fails`` failures
  mark the upstream down in the shared state (every worker follows), and
  only ``rise`` passing checks bring it back; ``fail_timeout`` is not used.
* Health and counters are per worker process; ``hotproxy status`` sums them.
  The exceptions are the open-connection counts that ``max_connections``
  limits, the service's and each upstream's own: they are the instance's,
  in counters every worker shares (``hotproxy.limits``); the core takes one
  count of the service's when it accepts a connection, one of an
  upstream's when it starts an attempt to it, and gives each back when the
  attempt fails or the connection ends.
* Balancing (``_Balancer``): the primaries get every connection while one is
  available (``_Balancer.available``: the one health predicate; and not at
  its own ``max_connections``), then the backups; the policy chooses among
  them by weight.  Smooth weighted round robin keeps each address's current
  weight in ``_Shared.wrr`` (so it goes on smoothly across reloads);
  ``hash`` looks the client address up in a Maglev table (``_balance``)
  built once per version, or taken from the previous one when its
  addresses and weights are the same.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Callable, Mapping, cast

from . import addresses, core, health, limits
from .addresses import Address, is_literal
from .errors import describe
from .health import HealthCheck, HealthTable
from .limits import CounterSlot, NextSlot
from .listeners import lookup
from .options import PROXY_OPTIONS, ROUTES_TABLE, UPSTREAM_OPTIONS, check_fields, show
from .service import MakeService, MaybeAwaitable, Seed, Service

log = logging.getLogger("hotproxy.proxy")
access_log = logging.getLogger("hotproxy.access")

#: the first read buffer of each direction; it doubles on full reads (bulk
#: transfers) up to MAX_BUFFER_SIZE, so idle and chatty connections stay small
BUFFER_SIZE = 16 * 1024
MAX_BUFFER_SIZE = 256 * 1024

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
_UP = {key: opt.default for key, opt in UPSTREAM_OPTIONS.items()}


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream with its balancing options (``options.UPSTREAM_OPTIONS``):
    the table form ``{ address = "...", weight = 3, backup = true,
    max_connections = 100 }``; a plain address string is one with every
    default.  ``ValueError`` ("key: expected ...") if a value does not fit."""

    address: str
    weight: int = _UP["weight"]
    backup: bool = _UP["backup"]
    max_connections: int = _UP["max_connections"]

    def __post_init__(self) -> None:
        if not isinstance(self.address, str):
            raise ValueError(f"address: expected an address string, got {show(self.address)}")
        parse_upstream(self.address)
        check_fields(self, UPSTREAM_OPTIONS, skip=("address",))

    @classmethod
    def of(cls, item: Any) -> UpstreamSpec:
        """*item* -- an address string, an ``UpstreamSpec`` or a mapping of
        ``UPSTREAM_OPTIONS`` keys -- as an ``UpstreamSpec``."""
        if isinstance(item, UpstreamSpec):
            return item
        if isinstance(item, str):
            return cls(item)
        if isinstance(item, Mapping):
            unknown = [k for k in item if k not in UPSTREAM_OPTIONS]
            if unknown:
                raise ValueError(f"{unknown[0]}: unknown key (expected one of: {', '.join(UPSTREAM_OPTIONS)})")
            if "address" not in item:
                raise ValueError("address: missing (expected host:port, [v6]:port or unix:/path)")
            return cls(**item)
        raise ValueError(f"expected an address string or a table, got {show(item)}")


@dataclass(frozen=True)
class ProxyFactory(MakeService):
    """Builds proxy services; a plain picklable value (the ``kind = "proxy"`` config).

    Every field but ``counter``, ``upstream_specs`` and ``upstream_counters``
    is the config key of the same name, declared
    once -- type, default, range, what it does -- in ``options.PROXY_OPTIONS``
    (``hotproxy check --keys`` lists them) and checked by the same rules as
    the config file.  ``upstreams`` are ``host:port``, ``[v6]:port`` or
    ``unix:/path`` strings, ``UpstreamSpec``s or mappings of their keys (the
    config's table form), each address listed once; the factory keeps the
    addresses in ``upstreams`` and every upstream's options in
    ``upstream_specs`` (same order).

    ``counter`` is where ``max_connections`` counts: the slot the
    ``WorkerManager`` gives it (``with_shared_counters``); None: this
    process only.  ``upstream_counters`` are the same for each upstream
    with a ``max_connections`` of its own: ``(address, slot)`` pairs.

    ``health`` is where the active checks' states are: ``(table key, one
    slot per upstream)`` in the instance's ``health.HealthTable``, set by the
    manager (``with_health``) when ``health_check`` is on; None: passive
    checks only.
    """

    upstreams: tuple[Any, ...]
    balance: str = _OPT["balance"]
    connect_timeout: float = _OPT["connect_timeout"]
    idle_timeout: float = _OPT["idle_timeout"]
    max_connections: int = _OPT["max_connections"]
    retries: int = _OPT["retries"]
    max_fails: int = _OPT["max_fails"]
    fail_timeout: float = _OPT["fail_timeout"]
    keepalive: bool = _OPT["keepalive"]
    access_log: bool = _OPT["access_log"]
    #: active health checks (a ``HealthCheck``, or a table of its keys); None: off
    health_check: HealthCheck | None = None
    send_proxy: str = _OPT["send_proxy"]
    accept_proxy: bool = _OPT["accept_proxy"]
    proxy_from: tuple[str, ...] = _OPT["proxy_from"]
    proxy_timeout: float = _OPT["proxy_timeout"]
    #: TLS SNI routing: ``(name, upstreams)`` pairs (or a mapping), each name
    #: an exact server name or ``*.suffix`` (``clienthello.route_name``), each
    #: group a list like ``upstreams``; kept as ``(name, (UpstreamSpec, ...))``.
    #: Empty: off.  With routes, ``upstreams`` is the default group (may be empty)
    sni_routes: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    sni_timeout: float = _OPT["sni_timeout"]
    counter: CounterSlot | None = None
    health: tuple[int, tuple[int, ...]] | None = None
    #: the service's name in the config ("" for a factory made in code): in
    #: every log line about it, and in the JSON ``service`` field
    service: str = ""
    #: each upstream's options, in the order of ``upstreams`` (filled in from
    #: ``upstreams``; given, it supplies the options of the plain addresses there)
    upstream_specs: tuple[UpstreamSpec, ...] = ()
    upstream_counters: tuple[tuple[str, CounterSlot], ...] = ()

    def __post_init__(self) -> None:
        ups = self.upstreams
        if isinstance(ups, str):   # type: ignore[unreachable]  # typed a tuple; code may still pass a str
            raise ValueError(f"upstreams: expected a list of addresses, got the string {ups!r}")
        try:
            ups = tuple(ups)
        except TypeError:
            raise ValueError(f"upstreams: expected a list of addresses, got {ups!r}") from None
        routes = self._routes()
        if not ups and not routes:
            raise ValueError("upstreams: expected at least one address")
        # a plain address takes the options ``upstream_specs`` has for it
        # (``replace()`` passes both fields back in)
        given = {s.address: s for s in self.upstream_specs if isinstance(s, UpstreamSpec)}
        seen: set[str] = set()
        specs: list[UpstreamSpec] = []
        for i, item in enumerate(ups):
            try:
                spec = given.get(item) if isinstance(item, str) else None
                spec = spec or UpstreamSpec.of(item)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"upstreams[{i}]: {exc}") from None
            if spec.address in seen:
                raise ValueError(f"upstreams[{i}]: {spec.address!r} is listed twice")
            seen.add(spec.address)
            specs.append(spec)
        if specs and all(s.backup for s in specs):
            raise ValueError("upstreams: every upstream is a backup; expected at least one that is not")
        # an address in several groups is one upstream: one max_connections
        limit_of = {s.address: s.max_connections for s in specs}
        for name, group in routes:
            for spec in group:
                other = limit_of.setdefault(spec.address, spec.max_connections)
                if other != spec.max_connections:
                    raise ValueError(f'sni_routes."{name}": {spec.address!r} has max_connections '
                                     f"{spec.max_connections} here and {other} in another group; expected one value")
        object.__setattr__(self, "sni_routes", routes)
        object.__setattr__(self, "upstreams", tuple(s.address for s in specs))
        object.__setattr__(self, "upstream_specs", tuple(specs))
        try:
            object.__setattr__(self, "health_check", HealthCheck.of(self.health_check))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"health_check: {exc}") from None
        check_fields(self, PROXY_OPTIONS, skip=("upstreams", "health_check", "sni_routes"))
        object.__setattr__(self, "proxy_from", tuple(self.proxy_from))

    def _routes(self) -> tuple[tuple[str, tuple[UpstreamSpec, ...]], ...]:
        """``sni_routes`` checked: names (``clienthello.route_name``) once each,
        every group a non-empty list of upstreams, each address once, not all backups."""
        from .clienthello import route_name

        routes: Any = self.sni_routes   # typed as kept; given, it may be any value
        if routes is None:
            return ()
        if isinstance(routes, Mapping):
            items = list(routes.items())
        elif isinstance(routes, tuple) and all(isinstance(i, tuple) and len(i) == 2 for i in routes):
            items = list(routes)   # (name, upstreams) pairs: the config loader's form, and ours
        else:
            raise ValueError(f"sni_routes: expected {ROUTES_TABLE}, got {show(routes)}")
        if not items:
            return ()
        out: list[tuple[str, tuple[UpstreamSpec, ...]]] = []
        seen: set[str] = set()
        for item in items:
            raw, group = item
            try:
                name = route_name(raw)
            except ValueError as exc:
                raise ValueError(f'sni_routes."{raw}": {exc}') from None
            if name in seen:
                raise ValueError(f'sni_routes."{raw}": listed twice (names compare without case)')
            seen.add(name)
            if isinstance(group, (str, Mapping)):
                group = (group,)
            try:
                group = tuple(group)
            except TypeError:
                raise ValueError(f'sni_routes."{raw}": expected a list of addresses, got {show(group)}') from None
            if not group:
                raise ValueError(f'sni_routes."{raw}": expected at least one address (names that match no route '
                                 "go to upstreams)")
            specs: list[UpstreamSpec] = []
            for i, up in enumerate(group):
                try:
                    spec = UpstreamSpec.of(up)
                except (ValueError, TypeError) as exc:
                    raise ValueError(f'sni_routes."{raw}"[{i}]: {exc}') from None
                if any(s.address == spec.address for s in specs):
                    raise ValueError(f'sni_routes."{raw}"[{i}]: {spec.address!r} is listed twice')
                specs.append(spec)
            if all(s.backup for s in specs):
                raise ValueError(f'sni_routes."{raw}": every upstream is a backup; expected at least one that is not')
            out.append((name, tuple(specs)))
        return tuple(out)

    def all_specs(self) -> tuple[UpstreamSpec, ...]:
        """Every upstream once, by address: ``upstreams``' then each route's new
        ones, in order (the first listing gives an address's options)."""
        seen = {s.address for s in self.upstream_specs}
        out = list(self.upstream_specs)
        for _name, group in self.sni_routes:
            for spec in group:
                if spec.address not in seen:
                    seen.add(spec.address)
                    out.append(spec)
        return tuple(out)

    def all_upstreams(self) -> tuple[str, ...]:
        """Every upstream address once (``all_specs``)."""
        return tuple(s.address for s in self.all_specs())

    def named(self, name: str) -> ProxyFactory:
        return replace(self, service=name)

    def with_shared_counters(self, next_slot: NextSlot) -> ProxyFactory:
        """This factory counting ``max_connections`` in the instance's slot
        *next_slot()*, and each upstream's own in the slot named after its
        address (the same in every version: the count carries over)."""
        counter = next_slot()
        ups = tuple((s.address, next_slot(f"upstream {s.address}")) for s in self.all_specs()
                    if s.max_connections > 0)
        return replace(self, counter=counter, upstream_counters=ups)

    def health_checks(self) -> list[tuple[str, Any]]:
        """Each upstream with the service's ``health_check`` (none when it is off)."""
        hc = self.health_check
        return [] if hc is None else [(addr, hc) for addr in self.all_upstreams()]

    def with_health(self, key: int, slot_of: Callable[[str], int]) -> ProxyFactory:
        """This factory reading its upstreams' health in table *key*, slot
        ``slot_of(address)`` each (the manager's ``HealthTable.stamp``); without
        ``health_check``: no slots."""
        if self.health_check is None:
            return self if self.health is None else replace(self, health=None)
        return replace(self, health=(key, tuple(slot_of(addr) for addr in self.all_upstreams())))

    def make_via_ref(self, old: Service | None) -> MaybeAwaitable[ProxyService]:
        """The next version: shares *old*'s counters, open-connection count,
        round-robin position and upstream states (if *old* is a proxy service
        on the same core).

        Upstream host names are looked up with the loop's resolver: then this
        returns a coroutine, and the worker serves on while it awaits.  With
        literal addresses and Unix paths only, it returns the service.
        """
        if isinstance(old, ProxyService) and isinstance(old.shared.counters, core.impl.ProxyCounters):
            return self._build(old.shared, old.all_states(), old.hash_tables())
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
                    "no_upstream", "proxy_header_errors", "sni_errors", "sni_no_route"):
            setattr(counters, key, sum(_number(s.get("counters", {}).get(key, 0), key) for s in seed.carry))
        for s in seed.carry:
            if "durations" in s:   # a snapshot of an older program has none
                counters.durations.add(s["durations"])
        for s in seed.carry:
            routed = s.get("routed") or {}   # a snapshot of an older program has none
            if not isinstance(routed, dict):
                raise ValueError(f"routed: expected a table, got {show(routed)}")
            for route, n in routed.items():
                shared.routed[str(route)] = shared.routed.get(str(route), 0) + _number(n, "routed")
        like = seed.like or {}
        shared.rr = _number(like.get("rr", 0), "rr")
        wrr = like.get("wrr") or {}
        if not isinstance(wrr, dict):
            raise ValueError(f"wrr: expected a table, got {show(wrr)}")
        for addr, current in wrr.items():
            if isinstance(current, bool) or not isinstance(current, int):
                raise ValueError(f"wrr: expected integers, got {show(current)}")
            if addr in self.all_upstreams():
                shared.wrr[addr] = current
        now = time.monotonic()
        states: dict[str, Any] = {}
        for addr in self.all_upstreams():
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

    def _build(self, shared: _Shared, states: dict[str, Any],
               tables: dict[Any, Any] | None = None) -> MaybeAwaitable[ProxyService]:
        names = [up for up in map(parse_upstream, self.all_upstreams())
                 if up.host is not None and not is_literal(up.host)]
        if not names:
            return ProxyService(self, shared, states, tables=tables)
        return self._build_after_lookup(shared, states, names, tables)

    async def _build_after_lookup(self, shared: _Shared, states: dict[str, Any],
                                  names: list[Upstream], tables: dict[Any, Any] | None) -> ProxyService:
        found = await asyncio.gather(*(lookup_upstream(up) for up in names))
        return ProxyService(self, shared, states, {up.text: info for up, info in zip(names, found)},
                            tables=tables)


def _number(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}: expected a count, got {value!r}")
    return value


class _Shared:
    """What every version of one site's proxy on one worker shares by reference."""

    __slots__ = ("counters", "rr", "wrr", "limit", "private_limits", "full_logged", "routed")

    def __init__(self, limit: Any) -> None:
        self.counters = core.impl.ProxyCounters()
        self.rr = 0   # the round-robin position (breaks least_conn ties)
        #: smooth weighted round robin: each upstream's current weight, by
        #: address (so a reload, even one that changes weights, goes on smoothly)
        self.wrr: dict[str, int] = {}
        #: the instance's open connections of this service (a core SharedCounter)
        self.limit = limit
        #: per-upstream limits of a factory without counter slots (used
        #: without a manager): private counters, by address, kept across versions
        self.private_limits: dict[str, Any] = {}
        #: when "every upstream is at its max_connections" was last logged
        self.full_logged = 0.0
        #: sni_routes: the connections each route took, by route name ("" the
        #: default group); kept across versions like the counters
        self.routed: dict[str, int] = {}

    def upstream_limit(self, addr: str, where: CounterSlot | None) -> Any:
        """The counter of upstream *addr*'s own ``max_connections``."""
        if where is not None:
            return limits.counter(where)
        counter = self.private_limits.get(addr)
        if counter is None:
            counter = self.private_limits[addr] = core.impl.private_counter()
        return counter


def clienthello_module() -> ModuleType:
    """``clienthello`` (the ClientHello parser and ``RouteTable``) of the core in use."""
    return core.companion("clienthello")


def balance_module() -> ModuleType:
    """``_balance`` (the consistent-hash table) of the core in use."""
    return core.companion("_balance")


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

# send_proxy -> the PROXY protocol version the core writes (0: none)
_SEND_PROXY = {"off": 0, "v1": 1, "v2": 2}


class ProxyService(Service):
    """One version of a proxy site on one worker."""

    def __init__(self, factory: ProxyFactory, shared: _Shared, old_states: dict[str, Any],
                 found: dict[str, tuple[int, Any]] | None = None, tables: dict[Any, Any] | None = None) -> None:
        # *found*: upstream address -> (family, sockaddr) of its host, looked
        # up by the factory without blocking (literal addresses need none);
        # *tables*: the previous version's hash tables (reused if unchanged)
        self.factory = factory
        self.shared = shared
        self.counters = shared.counters
        impl = core.impl
        self.targets: list[Any] = []
        slots = dict(factory.upstream_counters)
        # one target per address, whichever groups list it (sni_routes)
        for spec in factory.all_specs():
            addr = spec.address
            state = old_states.get(addr)
            if state is None or not isinstance(state, impl.UpstreamState):
                state = impl.UpstreamState(addr)
            up = parse_upstream(addr)
            family, raw, address = resolve(up, found.get(addr) if found else None)
            limit = shared.upstream_limit(addr, slots.get(addr)) if spec.max_connections > 0 else None
            self.targets.append(impl.Target(state, up, family, raw, address, limit, spec.max_connections))
        mine = set(factory.all_upstreams())
        #: removed upstreams that still have connections (old versions' drains)
        self.retired: dict[str, Any] = {a: s for a, s in old_states.items()
                                        if a not in mine and s.active > 0}
        self._Connection = impl.Connection
        # The relay's callbacks are the balancer's, not this service's: a
        # cycle through the service would keep old versions alive until a
        # GC pass.  Each connection holds its service (``owner``) instead,
        # so a version is freed when its last connection finishes.
        by_address = {t.up.text: t for t in self.targets}
        self.balancer = _Balancer(factory, shared, [by_address[a] for a in factory.upstreams], tables or {},
                                  factory.upstream_specs, self.targets)
        # log_level = "debug" is looked at once per version: when it is off,
        # the relay gets the balancer itself and nothing is added per connection
        debug = log.isEnabledFor(logging.DEBUG)
        connector: Any = _DebugConnector(self.balancer, 1 + factory.retries) if debug else self.balancer
        self.router: _SniRouter | None = None
        if factory.sni_routes:
            groups: list[tuple[str, Any, _Balancer]] = []
            for name, specs in factory.sni_routes:
                b = _Balancer(factory, shared, [by_address[s.address] for s in specs], tables or {}, specs,
                              self.targets)
                groups.append((name, _DebugConnector(b, 1 + factory.retries) if debug else b, b))
            # the counts of routes this version no longer has go (one added again starts at 0)
            for gone in set(shared.routed) - {name for name, _specs in factory.sni_routes} - {""}:
                del shared.routed[gone]
            self.router = _SniRouter(self.balancer, connector if factory.upstreams else None, groups,
                                     shared.routed)
            connector = self.router
        on_refuse = self.balancer.log_refused if factory.access_log else None
        self.relay = impl.RelayConfig(
            shared.counters,
            idle_timeout=float(factory.idle_timeout),
            keepalive=factory.keepalive,
            connector=connector,
            on_close=self.balancer.log_close if factory.access_log else None,
            want_peername=factory.access_log or factory.balance == "hash" or debug,
            buffer_size=BUFFER_SIZE,
            max_buffer_size=MAX_BUFFER_SIZE,
            targets=tuple(self.targets),
            connect_timeout=float(factory.connect_timeout),
            attempts=1 + factory.retries,
            max_connections=factory.max_connections,
            on_refuse=_debug_refusal(self.balancer, on_refuse) if debug else on_refuse,
            limit=shared.limit,
            send_proxy=_SEND_PROXY[factory.send_proxy],
            accept_proxy=factory.accept_proxy,
            proxy_from=impl.proxy_networks(factory.proxy_from),
            proxy_timeout=float(factory.proxy_timeout),
            on_header_error=self.balancer.log_header_error if factory.access_log else None,
            sni=bool(factory.sni_routes),
            sni_timeout=float(factory.sni_timeout),
            on_sni_error=self.balancer.log_sni_error if factory.access_log or debug else None,
        )

    # -- the accept path -------------------------------------------------------

    #: the core's listener may accept for this service (``new_raw_connection``)
    accepts_raw = True

    def new_raw_connection(self, conns: Any) -> Any:
        """A relay for a socket the core accepted; it refuses over ``max_connections`` itself."""
        return self._Connection(self.relay, conns, self)

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        """A relay for one accepted client; it refuses over ``max_connections`` itself."""
        # the core's Connection has a buffered protocol's callbacks without
        # subclassing asyncio's class (a cdef class cannot): duck-typed
        return cast(asyncio.BaseProtocol, self._Connection(self.relay, conns, self))

    # -- status and logs -------------------------------------------------------

    def published(self, generation: int) -> None:
        """This version serves the site as *generation* (its access lines say so)."""
        self.balancer.generation = generation
        if self.router is not None:
            for b in self.router.balancers:
                b.generation = generation

    def owns(self, conn: object) -> bool:
        """True for a relay of this version: the core's ``Connection`` keeps
        the version's ``RelayConfig`` as ``cfg`` (status only)."""
        return isinstance(conn, self._Connection) and conn.cfg is self.relay

    def hash_tables(self) -> dict[Any, Any]:
        """The Maglev tables of every group (``balance = "hash"``), for the next version to reuse."""
        if self.router is None:
            return self.balancer.tables
        tables: dict[Any, Any] = {}
        for b in self.router.balancers:
            tables.update(b.tables)
        return tables

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
                "rr": self.shared.rr, "wrr": dict(self.shared.wrr), "upstreams": ups,
                "routed": dict(self.shared.routed)}

    def carry_late(self, before: Seed, after: Seed) -> None:
        """Add the counts the old workers made between the two snapshots (``Service.carry_late``)."""
        before, after = before.of_type("proxy"), after.of_type("proxy")

        def late(get: Callable[[dict[str, Any]], int]) -> int:
            return max(0, sum(get(s) for s in after.carry) - sum(get(s) for s in before.carry))

        counters = self.counters
        for key in _CARRIED_COUNTERS:
            n = late(lambda s: _number(s.get("counters", {}).get(key, 0), key))
            setattr(counters, key, getattr(counters, key) + n)
        for addr, st in self.all_states().items():
            for key in ("connections", "failures", "bytes_in", "bytes_out"):
                n = late(lambda s: _number(s.get("upstreams", {}).get(addr, {}).get(key, 0), key))
                setattr(st, key, getattr(st, key) + n)
        routed = self.shared.routed
        for route in {str(r) for s in (*before.carry, *after.carry) for r in (s.get("routed") or {})}:
            n = late(lambda s: _number((s.get("routed") or {}).get(route, 0), "routed"))
            if n:
                routed[route] = routed.get(route, 0) + n

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
        specs = {s.address: s for s in self.factory.all_specs()}
        limited = {t.up.text: t.limit for t in self.targets if t.limit is not None}
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
            spec = specs.get(addr)
            if spec is not None:
                ups[addr].update(weight=spec.weight, backup=spec.backup, max_connections=spec.max_connections)
                if addr in limited:
                    # the instance's open connections to it (every worker, every version)
                    ups[addr]["instance_active"] = limited[addr].value
            if addr in self.retired:
                ups[addr]["removed"] = True
        out["upstreams"] = ups
        out["durations"] = self.counters.durations.as_dict()
        out["balance"] = self.factory.balance
        if self.factory.sni_routes:
            # each route's upstreams, by name ("*.example" included), in the config's order; the
            # default group (``upstreams``, may be empty: no default); the connections each took
            out["sni_routes"] = {name: [spec.address for spec in group] for name, group in self.factory.sni_routes}
            out["sni_default"] = list(self.factory.upstreams)
            out["sni_routed"] = dict(self.shared.routed)
        return out

    def __repr__(self) -> str:
        return f"<ProxyService {self.factory.balance} {list(self.factory.upstreams)}>"


#: the service counters an upgrade carries (``ProxyFactory.make_via_snapshot``, ``carry_late``)
_CARRIED_COUNTERS = ("accepted", "bytes_in", "bytes_out", "connect_failures", "refused", "idle_closed", "no_upstream",
                     "sni_errors", "sni_no_route")


def _full(target: Any) -> bool:
    # at its own max_connections over the instance (the core's acquire is
    # the exact check; this read only steers the choice away from it)
    limit = target.limit
    return limit is not None and limit.value >= target.max_connections


class _Balancer:
    """Picks upstreams for one service version and keeps their health (the relay's connector).

    The primaries (upstreams that are not backups) get every connection
    while one of them is available (not ejected, not at its own
    ``max_connections``); then the backups do.  If neither has one
    available, the ejected ones are tried anyway (never refuse all traffic
    for health), primaries first; the ones at their ``max_connections``
    never are.  Among the candidates the policy chooses, by weight.
    """

    def __init__(self, factory: ProxyFactory, shared: _Shared, targets: list[Any],
                 old_tables: dict[Any, Any], specs: tuple[UpstreamSpec, ...] | None = None,
                 all_targets: list[Any] | None = None) -> None:
        # *targets*: this group's (``upstreams``, or one of ``sni_routes``),
        # with their *specs* (weight, backup); *all_targets*: the service's,
        # in ``factory.all_upstreams()`` order (the health slots' order)
        self.factory = factory
        self.shared = shared
        self.counters = shared.counters
        self.targets = targets
        if specs is None:
            specs = factory.upstream_specs
        self.primaries = [t for t, s in zip(targets, specs) if not s.backup]
        self.backups = [t for t, s in zip(targets, specs) if s.backup]
        self.weights: dict[Any, int] = {t: s.weight for t, s in zip(targets, specs)}
        self.by_address: dict[str, Any] = {t.up.text: t for t in targets}
        #: the hash tables of the primaries and of the backups, by their
        #: ``(address, weight)`` pairs: built once per version, and taken
        #: from the previous version (*old_tables*) when those are the same
        self.tables: dict[Any, Any] = {}
        if factory.balance == "hash":
            for group in (self.primaries, self.backups):
                if group:
                    key = tuple(sorted((t.up.text, self.weights[t]) for t in group))
                    table = old_tables.get(key)
                    if table is None:
                        table = balance_module().HashTable(key)
                    self.tables[key] = table
        self._group_table = [self._table_of(self.primaries), self._table_of(self.backups)]
        self.generation = 0   # the site's generation of this version (ProxyService.published)
        # the plain function, not a bound method: no reference cycle
        self._choose = getattr(_Balancer, "_choose_" + factory.balance)
        #: the shared health table and each target's slot in it, when the
        #: service has active checks (the manager set ``factory.health``)
        self.health: HealthTable | None = None
        self.slots: dict[Any, int] = {}
        if factory.health_check is not None and factory.health is not None:
            table = health.table(factory.health[0])
            if table is not None:
                self.health = table
                self.slots = {t: slot for t, slot in zip(all_targets if all_targets is not None else targets,
                                                         factory.health[1]) if slot >= 0}

    def available(self, target: Any, now: float) -> bool:
        """May *target* be picked now?  The one predicate of health: with active
        checks, its state in the instance's shared table (down: passive or
        active, until ``rise`` checks pass); without, this worker's passive
        ejection (until ``fail_timeout`` is over).  Its own
        ``max_connections`` is another matter (``_full``)."""
        slot = self.slots.get(target) if self.health is not None else None
        if slot is not None:
            return self.health.is_up(slot)   # type: ignore[union-attr]
        return bool(target.state.ejected_until <= now)

    def _table_of(self, group: list[Any]) -> Any:
        if not group or not self.tables:
            return None
        return self.tables[tuple(sorted((t.up.text, self.weights[t]) for t in group))]

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
        slot = self.slots.get(target) if self.health is not None else None
        if slot is not None and max_fails and st.fails >= max_fails:
            # active checks: down for every worker until the master's checks pass ``rise`` times
            assert self.health is not None
            if self.health.mark_down(slot):
                log.warning("%supstream %s marked down for every worker after %d connect failures (last: %s); "
                            "up again after %d passing health checks", self._who, st.address, st.fails,
                            describe(exc), self.factory.health_check.rise if self.factory.health_check else 0,
                            extra=self._fields(upstream=st.address, reason=describe(exc)))
            st.fails = 0
        elif max_fails and st.fails >= max_fails:
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
        full = False
        for g, group in enumerate((self.primaries, self.backups)):
            cands = []
            for t in group:
                if t in tried:
                    continue
                if _full(t):
                    full = True
                elif self.available(t, now):
                    cands.append(t)
            if cands:
                return cands[0] if len(cands) == 1 else self._choose(self, conn, cands, g)
        # every upstream left is down: try them anyway rather than refuse,
        # primaries first -- but none that is at its max_connections
        for g, group in enumerate((self.primaries, self.backups)):
            cands = [t for t in group if t not in tried and not _full(t)]
            if cands:
                return cands[0] if len(cands) == 1 else self._choose(self, conn, cands, g)
        if full and now - self.shared.full_logged >= 10.0:
            self.shared.full_logged = now
            log.warning("%severy upstream left is at its max_connections: connection closed (counted in "
                        "no_upstream; logged once per 10 s)", self._who, extra=self._fields())
        return None

    def _choose_round_robin(self, conn: Any, cands: list[Any], group: int) -> Any:
        # smooth weighted round robin (nginx): each candidate's current
        # weight grows by its weight; the largest wins and loses the total.
        # Weights 3:1 give a a b a, a a b a, ...: spread, never bunched.
        wrr = self.shared.wrr
        weights = self.weights
        total = 0
        best: Any = None
        best_cur = 0
        for t in cands:
            w = weights[t]
            addr = t.up.text
            cur = wrr.get(addr, 0) + w
            wrr[addr] = cur
            total += w
            if best is None or cur > best_cur:
                best, best_cur = t, cur
        wrr[best.up.text] = best_cur - total
        return best

    def _choose_random(self, conn: Any, cands: list[Any], group: int) -> Any:
        weights = self.weights
        return random.choices(cands, [weights[t] for t in cands])[0]

    def _choose_least_conn(self, conn: Any, cands: list[Any], group: int) -> Any:
        # the fewest live connections per unit of weight (active / weight,
        # compared as active * other weight); ties go round-robin, not to the first
        shared = self.shared
        weights = self.weights
        n = len(cands)
        start = shared.rr % n
        shared.rr += 1
        best = cands[start]
        best_active, best_w = best.state.active, weights[best]
        for i in range(1, n):
            t = cands[(start + i) % n]
            active, w = t.state.active, weights[t]
            if active * best_w < best_active * w:
                best, best_active, best_w = t, active, w
        return best

    def _choose_hash(self, conn: Any, cands: list[Any], group: int) -> Any:
        # Consistent: the group's Maglev table (the same in every worker,
        # built from addresses and weights only) gives the client address's
        # slot; an unavailable owner passes to the owner of the next slot
        # that is a candidate, so only its clients move.
        table = self._group_table[group]
        peer = conn.peername
        key = (peer[0] if isinstance(peer, tuple) and peer else str(peer or "")).encode()
        entries, names, size = table.entries, table.names, table.size
        by_address = self.by_address
        slot = table.slot(key)
        if len(cands) == len(self.primaries if group == 0 else self.backups):
            return by_address[names[entries[slot]]]   # every one is a candidate
        want = set(cands)
        for i in range(size):
            t = by_address[names[entries[(slot + i) % size]]]
            if t in want:
                return t
        return cands[0]   # (not reached: every candidate owns slots)

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
        if self.factory.sni_routes:
            # sni routing: the server name too ("-": none sent, or the hello was never read)
            sni = conn.server_name or "-"
            access_log.info("%s%s -> %s in=%d out=%d connect=%.3fs gen=%d sni=%s time=%.3fs end=%s", self._who,
                            client, upstream, conn.bytes_in, conn.bytes_out, connect, self.generation, sni,
                            duration, conn.end,
                            extra=self._fields(client=client, upstream=upstream, bytes_in=conn.bytes_in,
                                               bytes_out=conn.bytes_out, connect_time=round(connect, 6),
                                               duration=round(duration, 6), end=conn.end,
                                               generation=self.generation, server_name=conn.server_name))
            return
        access_log.info("%s%s -> %s in=%d out=%d connect=%.3fs gen=%d time=%.3fs end=%s", self._who, client,
                        upstream, conn.bytes_in, conn.bytes_out, connect, self.generation, duration, conn.end,
                        extra=self._fields(client=client, upstream=upstream, bytes_in=conn.bytes_in,
                                           bytes_out=conn.bytes_out, connect_time=round(connect, 6),
                                           duration=round(duration, 6), end=conn.end,
                                           generation=self.generation))

    def log_sni_error(self, peer: Any, reason: str) -> None:
        """A client closed for its TLS ClientHello (sni_routes): bad, slow, or no route for its name."""
        client = _peer(peer)
        log.info("%s%s: TLS ClientHello refused: %s", self._who, client, reason,
                 extra=self._fields(client=client, reason=reason))

    def log_header_error(self, peer: Any, reason: str) -> None:
        """A client closed for its PROXY header (accept_proxy): bad, slow, or not from proxy_from."""
        client = _peer(peer)
        log.info("%s%s: PROXY header refused: %s", self._who, client, reason,
                 extra=self._fields(client=client, reason=reason))

    def log_refused(self, peer: Any) -> None:
        """The access line of a connection refused by ``max_connections``."""
        client = _peer(peer)
        access_log.info("%s%s -> - in=0 out=0 connect=0.000s gen=%d time=0.000s end=refused", self._who, client,
                        self.generation,
                        extra=self._fields(client=client, upstream="-", bytes_in=0, bytes_out=0, connect_time=0.0,
                                           duration=0.0, end="refused", generation=self.generation))


class _SniRouter:
    """The relay's connector of a service with ``sni_routes``.

    ``route(name)`` is asked once per connection, when its ClientHello is
    read (the server name; "" when it sent none): the group of the exact
    name, else of the longest ``*.suffix`` that ends the name (at any
    depth: ``*.example`` matches ``a.b.example``, as nginx's ``server_name``
    does; HAProxy's ``req.ssl_sni -m end`` the same), else the default group
    (``upstreams``), else None: closed.  It is the compiled
    ``clienthello.RouteTable``'s own method (the same source run as Python
    on the pure-Python core), which counts each route's connections in
    ``routed``: no Python frame per connection.  The core then asks the
    chosen group's ``pick`` itself.  Failures and successes go to one
    balancer: health is by address, shared by every group.
    """

    __slots__ = ("main", "default", "balancers", "routed", "table", "route", "failed", "succeeded")

    def __init__(self, main: _Balancer, default: Any, groups: list[tuple[str, Any, _Balancer]],
                 routed: dict[str, int]) -> None:
        self.main = main          # the default group's balancer (logs, health)
        self.default = default    # its connector, or None: no default group
        #: the connections each route took, by name ("" the default): the service's (``_Shared.routed``)
        self.routed = routed
        exact: dict[str, Any] = {}
        wildcard: dict[str, Any] = {}    # "example" for "*.example"
        self.balancers = [main] + [b for _name, _c, b in groups]
        for name, connector, _b in groups:
            if name.startswith("*."):
                wildcard[name[2:]] = connector
            else:
                exact[name] = connector
        self.table = clienthello_module().RouteTable(exact, wildcard, default, routed)
        #: ``route(name) -> group | None``, the table's (compiled) method, called by the core as is
        self.route: Callable[[str], Any] = self.table.route
        # the balancers' own methods, called by the core as they are
        self.failed: Callable[[Any, BaseException], None] = (default or main).failed
        self.succeeded: Callable[[Any], None] = main.succeeded

    def pick(self, conn: Any, tried: Any) -> Any | None:
        # (the core asks ``conn.route`` itself; this is for any other caller)
        return conn.route.pick(conn, tried)


class _DebugConnector:
    """The balancer as the relay's connector, with a debug line for every
    connect attempt: which upstream, which try (a version built while
    ``log_level = "debug"``).  With one upstream the core makes its single
    attempt without asking ``pick``: only its failure is logged here."""

    __slots__ = ("balancer", "attempts")

    def __init__(self, balancer: _Balancer, attempts: int) -> None:
        self.balancer = balancer
        self.attempts = attempts

    def pick(self, conn: Any, tried: Any) -> Any | None:
        b = self.balancer
        target = b.pick(conn, tried)
        client = _peer(conn.peername)
        if target is None:
            log.debug("%s%s: no upstream left to try after %d attempt%s", b._who, client, len(tried),
                      "" if len(tried) == 1 else "s", extra=b._fields(client=client))
        else:
            log.debug("%s%s: connect attempt %d of %d to %s", b._who, client, len(tried) + 1, self.attempts,
                      target.state.address, extra=b._fields(client=client, upstream=target.state.address,
                                                             attempt=len(tried) + 1))
        return target

    def failed(self, target: Any, exc: BaseException) -> None:
        b = self.balancer
        log.debug("%sconnect attempt to %s failed: %s", b._who, target.state.address, describe(exc),
                  extra=b._fields(upstream=target.state.address, reason=describe(exc)))
        b.failed(target, exc)

    def succeeded(self, target: Any) -> None:
        self.balancer.succeeded(target)


def _debug_refusal(balancer: _Balancer, then: Any) -> Any:
    """``on_refuse`` for a version built at debug level: why, then the access line (*then*) if any."""
    limit = balancer.factory.max_connections

    def refused(peer: Any) -> None:
        client = _peer(peer)
        log.debug("%s%s: refused: max_connections (%d) reached", balancer._who, client, limit,
                  extra=balancer._fields(client=client, reason="max_connections"))
        if then is not None:
            then(peer)

    return refused


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return addresses.format_host_port(str(peer[0]), peer[1])
    return addresses.unix_address(str(peer)) if peer else "unix"

