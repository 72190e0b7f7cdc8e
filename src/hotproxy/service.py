"""Services, the factories that build them, and layers that stack them.

A **service** handles the connections of one site on one worker: for each
accepted connection the accept path calls ``service.new_connection(conns)``
and serves the asyncio protocol it returns.  The protocol must add itself to
*conns* when its connection starts, discard itself when it ends, and have an
``abort()`` method (used when a drain times out).  A connection keeps the
service that made it for its whole life; an old version is freed when its
last connection lets go of it.

A service whose ``accepts_raw`` is True (the proxy) may instead be given the
accepted socket itself: the core's listener calls
``service.new_raw_connection(conns)``, which returns a core ``Connection``
(or None: refused), and no asyncio transport is made at all.

A **factory** (``MakeService``) builds a service.  ``make_via_ref(old)`` builds
the next version from the one running now (or ``None``), carrying its state;
``make()`` builds from nothing.  Either may be a coroutine: while it awaits,
the worker keeps serving the old version.  Factories are plain picklable
values, because the manager sends them to worker processes.

**Layers** wrap a factory: each layer's ``make_via_ref`` hands the old *inner*
service to the inner factory, so state flows through the whole stack.

**State across an upgrade** of hotproxy itself (a new program, so no
object can be shared): a service's ``snapshot()`` is plain data (JSON-able
dicts of numbers and strings, tagged with its ``type`` and a version
``v``), and the new program's factory builds its first version from it
with ``make_via_snapshot(seed)``.  A ``Seed`` holds the snapshots of the
old workers whose counts the new worker continues (``carry``: counters
add up) and the one whose view it takes (``like``: health, positions).  A
snapshot a factory cannot read raises; the executor then drops it with a
warning and builds the service fresh -- never a failed upgrade.

A factory whose services limit their open connections (``LimitConnections``,
the proxy's ``max_connections``) counts them in a counter that every worker
of the instance shares (``hotproxy.limits``): the ``WorkerManager`` gives it
a slot through ``with_shared_counters``.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, TypeVar, Union

from . import core, limits
from .options import MAX_CONNECTIONS, check_fields

if TYPE_CHECKING:
    from ._core import SharedCounter
    from .limits import CounterSlot, NextSlot

T = TypeVar("T")
MaybeAwaitable = Union[T, Awaitable[T]]


async def maybe_await(value: MaybeAwaitable[T]) -> T:
    """Await *value* if it is awaitable, else return it."""
    if inspect.isawaitable(value):
        return await value
    return value


class Service(abc.ABC):
    """One version of a site's service on one worker.

    This class is the declared interface between a service and what serves
    it: the executor and the listeners use ``new_connection`` (the one
    method to write), ``accepts_raw`` and ``new_raw_connection`` (the core's
    accept), ``stats`` (status), ``version`` and ``owns`` (which version an
    open connection belongs to, for status), ``published`` (its generation)
    -- and nothing else.
    """

    @abc.abstractmethod
    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        """Return the protocol for one accepted connection.

        The protocol adds itself to *conns* (a ``ConnectionSet``) in
        ``connection_made`` and discards itself in ``connection_lost``.
        """

    #: True if ``new_raw_connection`` serves a socket the core accepted
    accepts_raw: bool = False

    def new_raw_connection(self, conns: Any) -> Any:
        """A core ``Connection`` for a socket the core accepted, or None to refuse.

        Only called when ``accepts_raw`` is True; it does what
        ``new_connection`` does, for the core's relay.
        """
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Counters for status and metrics (override to add some).

        Numbers add up over the workers (``hotproxy status`` sums them).  A
        count is reported once: the site itself reports its open
        connections (``active``), so a service does not.
        """
        return {}

    @property
    def version(self) -> Service:
        """What stands for this version while any of its connections is open:
        the service its connections hold (a layer's: its inner service's)."""
        return self

    def snapshot(self) -> dict[str, Any] | None:
        """This version's state as plain data for an upgrade of the program (None: nothing to carry).

        JSON-able: dicts, lists, strings and numbers only, with ``"type"``
        (what reads it: ``MakeService.make_via_snapshot``) and ``"v"``.
        """
        return None

    def carry_late(self, before: Seed, after: Seed) -> None:
        """Add what the old program's workers counted after the snapshot this
        version was built from: *before* is that seed, *after* the same old
        workers' snapshots taken when they stopped accepting (an upgrade's
        hand-over).  Raise ``ValueError`` if they cannot be read.  By default
        nothing is carried."""

    def published(self, generation: int) -> None:
        """Told when this version becomes the site's current service: the
        site's *generation* from now on (for its logs; by default ignored)."""

    def owns(self, conn: object) -> bool:
        """True if *conn*, an open connection of the site, is one of this version's.

        Asked by status, never on the accept path.  By default the
        convention of hotproxy's protocols: a ``service`` attribute that is
        this service.
        """
        return getattr(conn, "service", None) is self


class MakeService(abc.ABC):
    """Builds services; a plain picklable value (usually a frozen dataclass)."""

    @abc.abstractmethod
    def make_via_ref(self, old: Service | None) -> MaybeAwaitable[Service]:
        """Build the next version from *old* (the running one, or None)."""

    def make(self) -> MaybeAwaitable[Service]:
        """Build a service from nothing (no state transfer)."""
        return self.make_via_ref(None)

    def with_shared_counters(self, next_slot: NextSlot) -> MakeService:
        """This factory with the counter slots its services count open
        connections in, for a limit over the whole instance: each limit takes
        ``next_slot()``, outermost first.  The default: no limit, ``self``."""
        return self

    def named(self, name: str) -> MakeService:
        """This factory for the service called *name* in the config (for its
        log lines).  The default: the name is not used, ``self``."""
        return self

    def health_checks(self) -> list[tuple[str, Any]]:
        """``(upstream address, health.HealthCheck)`` for each upstream the
        instance must check actively (the master runs them).  The default: none."""
        return []

    def with_health(self, key: int, slot_of: Callable[[str], int]) -> MakeService:
        """This factory reading its upstreams' health in the instance's health
        table *key*, at slot ``slot_of(address)`` each.  The default: no
        active checks, ``self``."""
        return self

    def make_via_snapshot(self, seed: Seed) -> MaybeAwaitable[Service]:
        """The first version in a new program (an upgrade), from the old
        program's snapshots (``Service.snapshot``); raise if they cannot be
        read (the service is then built with ``make()``).  The default: ``make()``."""
        return self.make()


@dataclass(frozen=True)
class Seed:
    """What one new worker builds a service from after an upgrade (plain data).

    ``carry``: the snapshots of the old workers whose counts this worker
    continues (their counters are added up: over the new workers every
    count is carried once); ``like``: the snapshot of the old worker whose
    view it takes (passive health, balancer position).
    """

    carry: tuple[dict[str, Any], ...] = ()
    like: dict[str, Any] | None = None

    def of_type(self, kind: str, version: int = 1) -> Seed:
        """The snapshots of *kind* and *version*; ``ValueError`` if there are some and none is."""
        def ok(snap: object) -> bool:
            return isinstance(snap, dict) and snap.get("type") == kind and snap.get("v") == version

        carry = tuple(s for s in self.carry if ok(s))
        like = self.like if ok(self.like) else None
        if (self.carry or self.like) and not carry and like is None:
            found = {(s.get("type"), s.get("v")) for s in (*self.carry, self.like) if isinstance(s, dict)}
            raise ValueError(f"expected a snapshot of type {kind!r} v{version}, got "
                             f"{', '.join(f'{t!r} v{v}' for t, v in sorted(found, key=str)) or 'none'}")
        return Seed(carry, like)

    def inner(self) -> Seed:
        """The snapshots of the service a layer wraps."""
        return Seed(tuple(s["inner"] for s in self.carry if isinstance(s.get("inner"), dict)),
                    self.like.get("inner") if self.like is not None and isinstance(self.like.get("inner"), dict)
                    else None)

    def total(self, key: str) -> int:
        """The sum of the integer *key* over ``carry`` (``ValueError`` if one is not an integer)."""
        return sum(_count(s.get(key, 0), key) for s in self.carry)


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}: expected a count, got {value!r}")
    return value


# -- layers ------------------------------------------------------------------


class LayerService(Service):
    """A service that wraps an inner service.

    It accepts raw connections when its inner service does and the class
    that defines its ``new_connection`` also defines ``new_raw_connection``
    (so a layer that does something per connection is never bypassed).
    """

    def __init__(self, inner: Service) -> None:
        self.inner = inner
        self.accepts_raw = inner.accepts_raw is True and _defines_raw(type(self))

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        return self.inner.new_connection(conns)

    def new_raw_connection(self, conns: Any) -> Any:
        return self.inner.new_raw_connection(conns)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    #: the snapshot type of this layer's own state (None: it has none)
    snapshot_type: ClassVar[str | None] = None

    def layer_state(self) -> dict[str, Any]:
        """This layer's own part of ``snapshot()``."""
        return {}

    def snapshot(self) -> dict[str, Any] | None:
        inner = self.inner.snapshot()
        if self.snapshot_type is None:
            return inner
        return {"type": self.snapshot_type, "v": 1, **self.layer_state(), "inner": inner}

    def carry_late(self, before: Seed, after: Seed) -> None:
        # (this layer's own state is not counted late: its inner service's is)
        kind = self.snapshot_type
        if kind is None:
            self.inner.carry_late(before, after)
        else:
            self.inner.carry_late(before.of_type(kind).inner(), after.of_type(kind).inner())

    @property
    def version(self) -> Service:
        # a layer only passes the accept through: its connections hold the inner service
        return self.inner.version

    def published(self, generation: int) -> None:
        self.inner.published(generation)

    def owns(self, conn: object) -> bool:
        return self.inner.owns(conn)


def _defines_raw(cls: type) -> bool:
    # the class that defines new_connection must define new_raw_connection too
    for klass in cls.__mro__:
        if "new_connection" in vars(klass):
            return "new_raw_connection" in vars(klass)
    return False


@dataclass(frozen=True)
class Layer(MakeService):
    """A factory that wraps ``inner``; subclasses set ``service_type`` and implement ``wrap``.

    ``make_via_ref(old)`` unwraps *old* (if it is exactly this layer's service
    type), builds the inner service from the old inner one, then wraps it.
    """

    inner: MakeService | None = None
    service_type: ClassVar[type[LayerService]] = LayerService

    def _inner(self) -> MakeService:
        if self.inner is None:
            raise TypeError(f"{type(self).__name__} has no inner factory (use stack())")
        return self.inner

    async def make_via_ref(self, old: Service | None) -> Service:
        old_layer = old if type(old) is self.service_type else None
        old_inner = old_layer.inner if old_layer is not None else None
        inner = await maybe_await(self._inner().make_via_ref(old_inner))
        return self.wrap(inner, old_layer)

    async def make(self) -> Service:
        inner = await maybe_await(self._inner().make())
        return self.wrap(inner, None)

    @abc.abstractmethod
    def wrap(self, inner: Service, old: Any) -> Service:
        """Wrap *inner*; *old* is this layer's previous service or None."""

    async def make_via_snapshot(self, seed: Seed) -> Service:
        kind = self.service_type.snapshot_type
        if kind is None:
            inner = await maybe_await(self._inner().make_via_snapshot(seed))
            return self.wrap(inner, None)
        mine = seed.of_type(kind)
        inner = await maybe_await(self._inner().make_via_snapshot(mine.inner()))
        return self.wrap_restored(inner, mine)

    def wrap_restored(self, inner: Service, seed: Seed) -> Service:
        """Wrap *inner* with this layer's state from *seed* (its own snapshots).  Default: fresh."""
        return self.wrap(inner, None)

    def with_shared_counters(self, next_slot: NextSlot) -> MakeService:
        """The inner factory's counters set (a layer with a limit also sets its own)."""
        inner = self.inner
        if inner is None:
            return self   # building it fails anyway, and says why
        new = inner.with_shared_counters(next_slot)
        return self if new is inner else replace(self, inner=new)

    def named(self, name: str) -> MakeService:
        """The inner factory named."""
        inner = self.inner
        if inner is None:
            return self
        new = inner.named(name)
        return self if new is inner else replace(self, inner=new)

    def health_checks(self) -> list[tuple[str, Any]]:
        """The inner factory's."""
        return self.inner.health_checks() if self.inner is not None else []

    def with_health(self, key: int, slot_of: Callable[[str], int]) -> MakeService:
        """The inner factory's health slots set."""
        inner = self.inner
        if inner is None:
            return self
        new = inner.with_health(key, slot_of)
        return self if new is inner else replace(self, inner=new)


def stack(factory: MakeService, *layers: Layer) -> MakeService:
    """Wrap *factory* in *layers*, innermost first: ``stack(f, a, b)`` is b(a(f))."""
    for layer in layers:
        factory = replace(layer, inner=factory)
    return factory


# -- two real layers ---------------------------------------------------------
#
# Each count is made once: the site counts the open connections of every
# version (``active`` in its status); ``CountConnections`` counts the
# connections it passes on, ``LimitConnections`` the ones it admits and the
# ones it refuses.  The state passes from each version to the next, so the
# counts survive every update.


class Accepted:
    """How many connections a ``CountConnections`` passed on, over every version."""

    __slots__ = ("accepted",)

    def __init__(self) -> None:
        self.accepted = 0


class ConnectionStats:
    """A ``LimitConnections``' state, shared by every version on a worker.

    ``conns`` holds the open connections it admitted, on any version; each
    holds one count of *limit* (a core ``SharedCounter``), given back when
    it leaves the set.
    """

    __slots__ = ("accepted", "refused", "conns")

    def __init__(self, limit: Any) -> None:
        self.accepted = 0
        self.refused = 0
        self.conns = core.impl.ConnectionSet(None, limit)

    def joined(self, conns: Any) -> Any:
        """Our set, chained into the site's *conns* (done by the first connection)."""
        mine = self.conns
        if mine.parent is not conns:
            mine.parent = conns
        return mine


class _CountingService(LayerService):
    snapshot_type = "count"

    def layer_state(self) -> dict[str, Any]:
        return {"accepted": self.state.accepted}

    def __init__(self, inner: Service, state: Accepted) -> None:
        super().__init__(inner)
        self.state = state

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        self.state.accepted += 1
        return self.inner.new_connection(conns)

    def new_raw_connection(self, conns: Any) -> Any:
        self.state.accepted += 1
        return self.inner.new_raw_connection(conns)

    def stats(self) -> dict[str, Any]:
        return {**self.inner.stats(), "accepted": self.state.accepted}


class _LimitService(LayerService):
    # A connection is admitted by taking one count of the instance's counter
    # (one atomic operation in the compiled core), at accept: the layer then
    # adds it to its set, and it gives the count back when it leaves the set
    # -- when it ends, or when something below refuses it.
    snapshot_type = "limit"

    def layer_state(self) -> dict[str, Any]:
        # (the open count is the instance's, in the shared counters)
        return {"accepted": self.state.accepted, "refused": self.state.refused}

    def __init__(self, inner: Service, state: ConnectionStats, limit: int) -> None:
        super().__init__(inner)
        self.state = state
        self.limit = limit
        counter = state.conns.limit
        if counter is None:   # (ConnectionStats always makes its set with one)
            raise ValueError("a connection limit needs a counter")
        self.counter: SharedCounter = counter

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        mine = self.state.joined(conns)
        if not self.counter.acquire(self.limit):
            self.state.refused += 1
            return _Refuse(mine)
        try:
            proto = self.inner.new_connection(mine)
        except BaseException:
            self.counter.release()
            raise
        mine.add(proto)
        self.state.accepted += 1
        return proto

    def new_raw_connection(self, conns: Any) -> Any:
        mine = self.state.joined(conns)
        if not self.counter.acquire(self.limit):
            self.state.refused += 1
            return None
        try:
            conn = self.inner.new_raw_connection(mine)
        except BaseException:
            self.counter.release()
            raise
        if conn is None:           # refused below: it is in no set
            self.counter.release()
            return None
        mine.add(conn)
        self.state.accepted += 1
        return conn

    def stats(self) -> dict[str, Any]:
        return {**self.inner.stats(), "accepted": self.state.accepted, "refused": self.state.refused}


class _Refuse(asyncio.Protocol):
    """Closes a connection at once (over a connection limit).

    It leaves *conns* too: a layer above that admitted the connection added
    it to its own set (a parent of *conns*), and gets its count back.
    """

    __slots__ = ("conns",)

    def __init__(self, conns: Any) -> None:
        self.conns = conns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]
        self.conns.discard(self)


@dataclass(frozen=True)
class CountConnections(Layer):
    """Counts the connections it passes on (``accepted``); the count survives
    every update.  (Open connections are the site's count: ``active``.)"""

    service_type: ClassVar[type[LayerService]] = _CountingService

    def wrap(self, inner: Service, old: Any) -> Service:
        state = old.state if old is not None else Accepted()
        return _CountingService(inner, state)

    def wrap_restored(self, inner: Service, seed: Seed) -> Service:
        state = Accepted()
        state.accepted = seed.total("accepted")
        return _CountingService(inner, state)


@dataclass(frozen=True)
class LimitConnections(Layer):
    """At most ``max_connections`` open at once, counted over all versions
    and, under a ``WorkerManager``, over all its workers (``counter``: the
    slot the manager gives it; None: this process only).

    A connection over the limit is closed at once and counted as
    ``refused``; one it admits is counted as ``accepted``.  The open count
    carries over updates, so a reload cannot double the limit while old
    connections drain.  ``max_connections`` is the config key of that name
    (``options.MAX_CONNECTIONS``: its default and range).
    """

    max_connections: int = MAX_CONNECTIONS.default
    counter: CounterSlot | None = None
    service_type: ClassVar[type[LayerService]] = _LimitService

    def __post_init__(self) -> None:
        check_fields(self, {"max_connections": MAX_CONNECTIONS})

    def with_shared_counters(self, next_slot: NextSlot) -> MakeService:
        mine = next_slot()
        inner = super().with_shared_counters(next_slot)
        return replace(inner, counter=mine)  # type: ignore[type-var]

    def wrap(self, inner: Service, old: Any) -> Service:
        state = old.state if old is not None else ConnectionStats(limits.counter(self.counter))
        return _LimitService(inner, state, self.max_connections)

    def wrap_restored(self, inner: Service, seed: Seed) -> Service:
        accepted, refused = seed.total("accepted"), seed.total("refused")
        state = ConnectionStats(limits.counter(self.counter))
        state.accepted, state.refused = accepted, refused
        return _LimitService(inner, state, self.max_connections)
