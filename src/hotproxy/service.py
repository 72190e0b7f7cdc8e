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
from typing import TYPE_CHECKING, Any, Awaitable, ClassVar, TypeVar, Union

from . import core, limits

if TYPE_CHECKING:
    from .limits import CounterSlot, NextSlot

T = TypeVar("T")
MaybeAwaitable = Union[T, Awaitable[T]]


async def maybe_await(value: MaybeAwaitable[T]) -> T:
    """Await *value* if it is awaitable, else return it."""
    if inspect.isawaitable(value):
        return await value  # type: ignore[no-any-return]
    return value  # type: ignore[return-value]


class Service(abc.ABC):
    """One version of a site's service on one worker."""

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
        """Counters for status and metrics (override to add some)."""
        return {}


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


# -- layers ------------------------------------------------------------------


class LayerService(Service):
    """A service that wraps an inner service.

    It accepts raw connections when its inner service does and the class
    that defines its ``new_connection`` also defines ``new_raw_connection``
    (so a layer that does something per connection is never bypassed).
    """

    def __init__(self, inner: Service) -> None:
        self.inner = inner
        self.accepts_raw = (getattr(inner, "accepts_raw", False) is True
                            and _defines_raw(type(self)))

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        return self.inner.new_connection(conns)

    def new_raw_connection(self, conns: Any) -> Any:
        return self.inner.new_raw_connection(conns)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


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

    def with_shared_counters(self, next_slot: NextSlot) -> MakeService:
        """The inner factory's counters set (a layer with a limit also sets its own)."""
        inner = self.inner
        if inner is None:
            return self   # building it fails anyway, and says why
        with_slots = getattr(inner, "with_shared_counters", None)
        new = with_slots(next_slot) if with_slots is not None else inner
        return self if new is inner else replace(self, inner=new)


def stack(factory: MakeService, *layers: Layer) -> MakeService:
    """Wrap *factory* in *layers*, innermost first: ``stack(f, a, b)`` is b(a(f))."""
    for layer in layers:
        factory = replace(layer, inner=factory)
    return factory


# -- two real layers ---------------------------------------------------------


class ConnectionStats:
    """Counters shared by every version of one site's service on a worker.

    The same object passes from each version to the next, so the counts
    survive every update.  ``conns`` holds the open connections of all
    versions; with a *limit* (a core ``SharedCounter``) each holds one
    count of it, given back when it leaves the set.
    """

    __slots__ = ("accepted", "refused", "conns")

    def __init__(self, limit: Any = None) -> None:
        self.accepted = 0
        self.refused = 0
        self.conns = core.impl.ConnectionSet(None, limit)

    @property
    def active(self) -> int:
        """Connections open now, on any version."""
        return len(self.conns)

    def joined(self, conns: Any) -> Any:
        """Our set, chained into the site's *conns* (done by the first connection)."""
        mine = self.conns
        if mine.parent is not conns:
            mine.parent = conns
        return mine


class _CountingService(LayerService):
    def __init__(self, inner: Service, state: ConnectionStats) -> None:
        super().__init__(inner)
        self.state = state

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        self.state.accepted += 1
        return self.inner.new_connection(self.state.joined(conns))

    def new_raw_connection(self, conns: Any) -> Any:
        self.state.accepted += 1
        return self.inner.new_raw_connection(self.state.joined(conns))

    def stats(self) -> dict[str, Any]:
        out = dict(self.inner.stats())
        out.update(accepted=self.state.accepted, active=self.state.active)
        return out


class _LimitService(LayerService):
    # A connection is admitted by taking one count of the instance's counter
    # (one atomic operation in the compiled core), at accept: the layer then
    # adds it to its set, and it gives the count back when it leaves the set
    # -- when it ends, or when something below refuses it.
    def __init__(self, inner: Service, state: ConnectionStats, limit: int) -> None:
        super().__init__(inner)
        self.state = state
        self.limit = limit
        self.counter = state.conns.limit

    def new_connection(self, conns: Any) -> asyncio.BaseProtocol:
        mine = self.state.joined(conns)
        if self.limit <= 0 or not self.counter.acquire(self.limit):
            self.state.refused += 1
            return _Refuse(mine)
        try:
            proto = self.inner.new_connection(mine)
        except BaseException:
            self.counter.release()
            raise
        mine.add(proto)
        return proto

    def new_raw_connection(self, conns: Any) -> Any:
        mine = self.state.joined(conns)
        if self.limit <= 0 or not self.counter.acquire(self.limit):
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
        return conn

    def stats(self) -> dict[str, Any]:
        out = dict(self.inner.stats())
        out.update(limit=self.limit, limited_active=self.state.active, refused=self.state.refused)
        return out


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
    """Counts accepted and open connections; the counts survive every update."""

    service_type: ClassVar[type[LayerService]] = _CountingService

    def wrap(self, inner: Service, old: Any) -> Service:
        state = old.state if old is not None else ConnectionStats()
        return _CountingService(inner, state)


@dataclass(frozen=True)
class LimitConnections(Layer):
    """At most ``max_connections`` open at once, counted over all versions
    and, under a ``WorkerManager``, over all its workers (``counter``: the
    slot the manager gives it; None: this process only).

    A connection over the limit is closed at once and counted as refused.
    The open count carries over updates, so a reload cannot double the limit
    while old connections drain.
    """

    max_connections: int = 1000
    counter: CounterSlot | None = None
    service_type: ClassVar[type[LayerService]] = _LimitService

    def __post_init__(self) -> None:
        if self.max_connections < 0:
            raise ValueError("max_connections must be >= 0")

    def with_shared_counters(self, next_slot: NextSlot) -> MakeService:
        mine = next_slot()
        inner = super().with_shared_counters(next_slot)
        return replace(inner, counter=mine)  # type: ignore[type-var]

    def wrap(self, inner: Service, old: Any) -> Service:
        state = old.state if old is not None else ConnectionStats(limits.counter(self.counter))
        return _LimitService(inner, state, self.max_connections)
