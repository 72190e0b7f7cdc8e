"""Open-connection counts for a whole instance: memory every worker maps.

``max_connections`` limits a service's open connections over all the
workers of an instance, not per worker.  The counts live in a
``CounterTable`` (the core's; see ``_core.pyx`` for the layout and the
atomic rules) in one ``Segment`` of shared memory.

Rules of this module:

* The ``WorkerManager`` creates the segment when it starts (a memfd, mapped
  shared) and passes it to every worker it starts -- restarted ones too, so
  they see the live counts.  Inline (one executor in the caller's process)
  the same code runs on a segment of its own.
* A counter **slot** belongs to one service name (and to the n-th limit in
  that service's stack of factories) for the life of the segment: the
  manager allocates it the first time a ``Precommit`` or
  ``PrepareAndCommit`` names the service, and stamps it into the factory
  (``MakeService.with_shared_counters``).  Every later version, on every
  worker, counts in the same slot, so the count carries over every update
  like the rest of a service's state; a removed service that comes back
  finds the connections it still drains.  Slots are never reused within a
  run: a segment has ``SLOTS``, and a service beyond them fails to build,
  with an error that says so (a restart starts afresh).
* Each worker counts its part of every total in its own region.  When a
  worker process is gone, the master subtracts its part (``reclaim``)
  before it starts the next one with that id, so a ``kill -9`` does not
  leak capacity.
* An upgrade of the program hands the segment to the new master
  (``adopt``): its workers count in regions no other generation uses
  (``GENERATIONS`` sets of regions per segment), in the same slots, so the
  connections the old processes still drain count against
  ``max_connections`` until they end.  A master maps worker id ->
  region (``regions``); a worker is told its region when it starts.
* A factory that was never stamped (used without a manager) counts in a
  private counter that it carries from version to version: per process.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from . import core
from .commands import PrepareAndCommit, Precommit

if TYPE_CHECKING:
    from ._core import CounterTable, SharedCounter

#: counter slots in a segment: services (with a limit) one run can name.
#: The memfd is sparse: only the pages of slots in use are ever touched
#: (a total is 64 bytes, a worker's share 8), so 10,000 services cost
#: about 1 MiB however large this is.
SLOTS = 65536

#: sets of worker regions a manager's segment has: the generations of
#: masters (one serving, the others draining after upgrades) that can count in it at once
GENERATIONS = 4

_MAGIC = b"HPCOUNT1"
_HEADER = struct.Struct("=8sqq")   # magic, slots, workers


@dataclass(frozen=True)
class CounterSlot:
    """Where a factory's services count their connections: *slot* of the
    segment *segment* (-1: the segment had no slot left)."""

    segment: int
    slot: int


#: a callable the manager gives ``with_shared_counters``: ``next_slot()`` is the
#: next slot of a service (its n-th limit), ``next_slot(key)`` the slot named
#: *key* (a str: a proxy's per-upstream limit, by address), the same for
#: every version that asks with the same key
NextSlot = Callable[..., CounterSlot]


class _Fd:
    """A file descriptor closed with its last reference: the tables' lock file
    (the pure-Python core locks byte ranges of the memory through it)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except Exception:   # already closed, or the interpreter is going away
            pass


class Segment:
    """The shared memory of one instance's counters, as this process maps it.

    ``worker`` is whose shares this process updates (-1: the master, which
    only reclaims).  Use ``create`` (the manager) or ``attach`` (a worker).
    """

    def __init__(self, fd: int, slots: int, workers: int, worker: int) -> None:
        self._fd = _Fd(fd)
        self.slots = slots
        self.workers = workers
        self.worker = worker
        #: names this segment in ``CounterSlot``: the memfd's inode, the same in every process
        self.key = os.fstat(fd).st_ino
        self.mm = mmap.mmap(fd, core.impl.table_size(slots, workers))
        self._tables: dict[core.Core, CounterTable] = {}
        #: (service name, n-th limit of its stack) -> slot; the manager's side only
        self._names: dict[tuple[str, int | str], int] = {}
        #: worker id -> the region it counts in (the manager's side)
        self.regions: list[int] = list(range(workers))

    def region(self, worker_id: int) -> int:
        """The region worker *worker_id* counts in."""
        return self.regions[worker_id] if worker_id < len(self.regions) else worker_id

    @property
    def fd(self) -> int:
        """The memfd (the manager passes it to the workers it starts)."""
        return self._fd.fd

    @classmethod
    def create(cls, workers: int, worker: int = -1, slots: int = SLOTS, generations: int = 1) -> Segment:
        """A new zeroed segment for *workers* workers (times *generations*:
        room for masters after upgrades), registered in this process."""
        regions = workers * generations
        fd = os.memfd_create("hotproxy-counters", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, core.impl.table_size(slots, regions))
            os.pwrite(fd, _HEADER.pack(_MAGIC, slots, regions), 0)
            seg = cls(fd, slots, regions, worker)
        except BaseException:
            os.close(fd)
            raise
        seg.regions = list(range(workers))
        _attached[seg.key] = seg
        return seg

    @classmethod
    def adopt(cls, fd: int, workers: int, used: set[int], names: list[Any]) -> Segment:
        """The segment of the master this one upgrades (*fd*, ours now), for
        *workers* workers in regions not in *used* (the other generations'),
        with its service slots *names* (``slot_names``).  ``ValueError`` if
        it is not a segment or has no room."""
        try:
            magic, slots, regions = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        except (OSError, struct.error) as exc:
            raise ValueError(f"not a hotproxy counter segment: {exc}") from None
        if magic != _MAGIC or slots < 1 or regions < 1 or os.fstat(fd).st_size < core.impl.table_size(slots, regions):
            raise ValueError("not a hotproxy counter segment")
        free = [r for r in range(regions) if r not in used]
        if len(free) < workers:
            raise ValueError(f"no room for {workers} more workers ({regions} regions, {len(used)} in use by "
                             "masters still draining)")
        seg = cls(fd, slots, regions, -1)
        seg.regions = free[:workers]
        for name, index, slot in names:
            if isinstance(name, str) and isinstance(index, (int, str)) and isinstance(slot, int) and \
                    0 <= slot < slots:
                seg._names[(name, index)] = slot
        _attached[seg.key] = seg
        return seg

    def slot_names(self) -> list[list[Any]]:
        """``[[service name, n-th limit, slot], ...]``: what ``adopt`` needs to keep every count in its slot."""
        return [[name, index, slot] for (name, index), slot in self._names.items()]

    @classmethod
    def attach(cls, fd: int, worker: int) -> Segment:
        """Map the segment the master passed as *fd*, as worker *worker*, and
        register it; ``ValueError`` if *fd* is not one."""
        try:
            magic, slots, workers = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        except (OSError, struct.error) as exc:
            raise ValueError(f"fd {fd} is not a hotproxy counter segment: {exc}") from None
        if magic != _MAGIC or slots < 1 or workers < 1 or os.fstat(fd).st_size < \
                core.impl.table_size(slots, workers):
            raise ValueError(f"fd {fd} is not a hotproxy counter segment")
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} has no share in the counter segment (0-{workers - 1})")
        seg = cls(fd, slots, workers, worker)
        _attached[seg.key] = seg
        return seg

    def table(self, impl: core.Core | None = None) -> CounterTable:
        """The segment as a ``CounterTable`` of core *impl* (default: the one in use)."""
        impl = impl or core.impl
        table = self._tables.get(impl)
        if table is None:
            table = self._tables[impl] = impl.CounterTable(self.mm, self.slots, self.workers,
                                                           self.worker, self._fd)
        return table

    def counter(self, slot: int) -> SharedCounter:
        """The ``SharedCounter`` of *slot*, updated as this process's worker."""
        return self.table().counter(slot)

    def reclaim(self, worker: int) -> int:
        """Give back the counts of worker *worker*, whose process is gone (it
        must not run); return how many.  The compiled core does it when it is
        built, whichever core the workers use: it takes the pure-Python
        core's locks as well as doing atomic operations."""
        impl = core.module("compiled") if core.COMPILED_AVAILABLE else core.module("python")
        return self.table(impl).reclaim(worker)

    # -- the manager's side: slots by service name ------------------------------------

    def slot_for(self, name: str, index: int | str) -> CounterSlot:
        """The slot of the *index*-th limit of service *name*, or of its limit
        named *index* (a str), allocated the first time."""
        slot = self._names.get((name, index))
        if slot is None:
            taken = set(self._names.values())
            if len(taken) >= self.slots:
                return CounterSlot(self.key, -1)
            slot = len(self._names)
            while slot in taken:   # (slots adopted from before an upgrade are kept)
                slot = (slot + 1) % self.slots
            self._names[(name, index)] = slot
        return CounterSlot(self.key, slot)

    def stamp(self, command: Any) -> Any:
        """*command* with its factory's counter slots set (a ``Precommit`` or
        ``PrepareAndCommit``; any other command is returned as it is)."""
        from .service import MakeService   # here: service imports this module

        if not isinstance(command, (Precommit, PrepareAndCommit)) or not isinstance(command.factory, MakeService):
            return command
        index = itertools.count()
        name = command.name
        factory = command.factory.with_shared_counters(
            lambda key=None: self.slot_for(name, next(index) if key is None else str(key)))
        return command if factory == command.factory else replace(command, factory=factory)

    def close(self) -> None:
        """Unregister; the memory is unmapped once no counter uses it."""
        if _attached.get(self.key) is self:
            del _attached[self.key]
        self._tables.clear()

    def __repr__(self) -> str:
        return f"<Segment key={self.key} slots={self.slots} workers={self.workers} worker={self.worker}>"


#: the segments this process has mapped, by key
_attached: dict[int, Segment] = {}


def counter(where: CounterSlot | None) -> SharedCounter:
    """The core ``SharedCounter`` a service counts its connections in.

    *where* is the slot the manager stamped into its factory; None (a factory
    used without a manager): a new private counter.  ``ValueError`` if the
    slot cannot be had.
    """
    if where is None:
        return core.impl.private_counter()
    seg = _attached.get(where.segment)
    if seg is None:
        raise ValueError(f"connection counter segment {where.segment} is not mapped in this process")
    if where.slot < 0:
        raise ValueError(f"no connection counter left: one run counts at most {seg.slots} services "
                         "with a connection limit; restart hotproxy to start afresh")
    return seg.counter(where.slot)


__all__ = ["SLOTS", "CounterSlot", "NextSlot", "Segment", "counter"]
