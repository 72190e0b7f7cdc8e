"""Active health checks, run once per instance; their state, shared by every worker.

A proxy service with ``health_check = { ... }`` has its upstreams checked in
the master process, never by the workers: the ``WorkerManager`` owns the
``Checker`` (asyncio, non-blocking, at most ``MAX_CONCURRENT_CHECKS`` at
once) and, after every batch of commands, has it check exactly what is
deployed and staged -- so an embedded manager checks too.  The outcome lives
in a ``HealthTable``: shared memory (a memfd) that the master creates and
every worker maps, one ``SLOT_SIZE``-byte slot per (service, upstream).  A
worker's pick reads one byte of it -- no message, no system call.

Rules of this module:

* A slot belongs to one (service name, upstream address) -- its key, stored
  in the slot as a digest -- from the first time a command names it until a
  reload leaves it out of every health-checked service.  Every version of
  the service, on every worker, reads the same slot: the state carries over
  every reload; a reload that changes ``interval``/``rise``/``fall`` keeps it;
  one that removes ``health_check`` frees the slots (the upstreams are back
  to passive checks only).
* An upgrade hands the memfd to the new master (``HealthTable.adopt``): it
  finds each slot again by its key's digest, with its state and counts, and
  checks on from there (the old master stops checking when it hands over).
* A new upstream (a slot allocated now) starts **up** and is checked at
  once: ``fall`` failed checks take it down (HAProxy's and nginx Plus's
  default; passive ejection still catches a dead one meanwhile).
* Passive and active combine through the state byte: a worker whose
  ``max_fails`` consecutive connects to an upstream fail writes DOWN
  (``mark_down``); every worker stops picking it at once, and only the
  checker brings it back, after ``rise`` successful checks.  The checker
  never takes an upstream down before ``fall`` failed checks, and a worker
  never brings one up.
* Only the master writes anything but the state byte; a worker writes only
  DOWN into it.  A byte store is atomic: at worst a check's UP and a
  worker's DOWN cross, and the next ``max_fails`` failures eject it again.

Slot layout (little-endian, ``SLOT_SIZE`` bytes)::

    0   16s  key digest (blake2b of "service\\0address"; all zero: free)
    16  B    state: 0 free, 1 up, 2 down
    17  B    the state the checker last saw (a DOWN it did not write is a passive ejection)
    20  I    consecutive successful checks
    24  I    consecutive failed checks
    32  d    last change of state (wall time)
    40  d    last check (wall time; 0: none yet)
    48  Q    checks that passed
    56  Q    checks that failed
    64  64s  the last check's result, UTF-8, NUL-padded
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from .addresses import parse as parse_address
from .commands import PrepareAndCommit, Precommit
from .errors import describe
from .options import HEALTH_CHECK_OPTIONS, PROXY_OPTIONS, check_fields, check_value
from .service import MakeService

log = logging.getLogger("hotproxy.health")

#: slots in a table: (service, upstream) pairs with active checks one run can have at once.
#: The memfd is sparse: only the pages of slots in use are touched.
SLOTS = 16384
SLOT_SIZE = 128
#: the first page holds the header
_HEADER = struct.Struct("=8sq")   # magic, slots
_MAGIC = b"HPHEALT1"
_BASE = mmap.PAGESIZE

FREE, UP, DOWN = 0, 1, 2
_STATE = 16
_SEEN = 17
_COUNTS = struct.Struct("=II")          # at 20
_TIMES = struct.Struct("=dd")           # at 32
_TOTALS = struct.Struct("=QQ")          # at 48
_RESULT = 64
_RESULT_SIZE = SLOT_SIZE - _RESULT

#: checks the master runs at the same time, over every service (the rest wait their turn)
MAX_CONCURRENT_CHECKS = 64


@dataclass(frozen=True)
class HealthCheck:
    """One service's ``health_check`` table (``options.HEALTH_CHECK_OPTIONS``).

    A TCP connect within ``timeout``; then ``send`` (if not empty) is written
    as its UTF-8 bytes, and the reply must *start with* ``expect`` (if not
    empty), read within the same ``timeout``.  ``rise`` passing checks in a
    row bring a down upstream up, ``fall`` failing ones take it down.
    """

    interval: float = HEALTH_CHECK_OPTIONS["interval"].default
    timeout: float = HEALTH_CHECK_OPTIONS["timeout"].default
    rise: int = HEALTH_CHECK_OPTIONS["rise"].default
    fall: int = HEALTH_CHECK_OPTIONS["fall"].default
    send: str = HEALTH_CHECK_OPTIONS["send"].default
    expect: str = HEALTH_CHECK_OPTIONS["expect"].default

    def __post_init__(self) -> None:
        check_fields(self, HEALTH_CHECK_OPTIONS)

    @classmethod
    def of(cls, value: Any) -> HealthCheck | None:
        """*value* (None, a ``HealthCheck`` or a table of its keys) as a ``HealthCheck``;
        ``ValueError`` naming the key if it is not one."""
        if value is None or isinstance(value, HealthCheck):
            return value
        # the config file's rule, in its words (``options.check_value``)
        return cls(**check_value(value, PROXY_OPTIONS["health_check"]))


def key_digest(service: str, address: str) -> bytes:
    """The 16 bytes that name slot (*service*, *address*) in the memory."""
    return hashlib.blake2b(f"{service}\0{address}".encode("utf-8", "surrogateescape"), digest_size=16).digest()


class _Fd:
    """The memfd, closed with its last reference."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except Exception:   # already closed, or the interpreter is going away
            pass


class HealthTable:
    """The shared health state of one instance, as this process maps it.

    The master uses ``create`` (or ``adopt`` after an upgrade) and allocates
    slots (``slot_for``); a worker uses ``attach`` and only reads states
    (``is_up``) and writes DOWN (``mark_down``).
    """

    def __init__(self, fd: int, slots: int) -> None:
        self._fd = _Fd(fd)
        self.slots = slots
        #: names this table in factories: the memfd's inode, the same in every process
        self.key = os.fstat(fd).st_ino
        self.mm = mmap.mmap(fd, _BASE + slots * SLOT_SIZE)
        #: (service, address) -> slot; the master's side only
        self._names: dict[tuple[str, str], int] = {}
        #: key digest -> slot of the slots adopted from the master before an upgrade, not claimed yet
        self._digests: dict[bytes, int] = {}
        #: slots freed since they were first used, and the first never used (allocation is O(1))
        self._freed: list[int] = []
        self._next = 0

    @property
    def fd(self) -> int:
        return self._fd.fd

    @staticmethod
    def size(slots: int) -> int:
        return _BASE + slots * SLOT_SIZE

    @classmethod
    def create(cls, slots: int = SLOTS) -> HealthTable:
        """A new zeroed table, registered in this process."""
        fd = os.memfd_create("hotproxy-health", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, cls.size(slots))
            os.pwrite(fd, _HEADER.pack(_MAGIC, slots), 0)
            table = cls(fd, slots)
        except BaseException:
            os.close(fd)
            raise
        _attached[table.key] = table
        return table

    @classmethod
    def _open(cls, fd: int) -> HealthTable:
        try:
            magic, slots = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        except (OSError, struct.error) as exc:
            raise ValueError(f"fd {fd} is not a hotproxy health table: {exc}") from None
        if magic != _MAGIC or slots < 1 or os.fstat(fd).st_size < cls.size(slots):
            raise ValueError(f"fd {fd} is not a hotproxy health table")
        table = cls(fd, slots)
        _attached[table.key] = table
        return table

    @classmethod
    def attach(cls, fd: int) -> HealthTable:
        """Map the table the master passed as *fd* (a worker); ``ValueError`` if it is not one."""
        return cls._open(fd)

    @classmethod
    def adopt(cls, fd: int) -> HealthTable:
        """The table of the master this one upgrades: every slot in use is found
        again by its key (``find``); ``ValueError`` if *fd* is not a table."""
        table = cls._open(fd)
        used = [s for s in range(table.slots) if table.mm[table._off(s) + _STATE] != FREE]
        table._digests = {bytes(table.mm[table._off(s):table._off(s) + 16]): s for s in used}
        table._next = max(used) + 1 if used else 0
        in_use = set(used)
        table._freed = [s for s in range(table._next) if s not in in_use]
        return table

    def _off(self, slot: int) -> int:
        return _BASE + slot * SLOT_SIZE

    # -- the workers' side -------------------------------------------------------------

    def is_up(self, slot: int) -> bool:
        """False if (service, upstream) of *slot* is down now (one byte read)."""
        return self.mm[_BASE + slot * SLOT_SIZE + _STATE] != DOWN

    def mark_down(self, slot: int) -> bool:
        """A passive ejection: *slot* is down until the checker brings it up; True if it was up."""
        off = _BASE + slot * SLOT_SIZE + _STATE
        if self.mm[off] == UP:
            self.mm[off] = DOWN
            return True
        return False

    # -- the master's side -------------------------------------------------------------

    def slot_for(self, service: str, address: str) -> int:
        """The slot of (*service*, *address*), allocated (up) the first time; -1 if none is left."""
        slot = self._names.get((service, address))
        if slot is not None:
            return slot
        digest = key_digest(service, address)
        found = self._digests.pop(digest, None) if self._digests else None
        if found is not None:
            self._names[(service, address)] = found
            return found
        if self._freed:
            slot = self._freed.pop()
        elif self._next < self.slots:
            slot, self._next = self._next, self._next + 1
        else:
            return -1
        # the new-upstream rule: up, with no check yet
        off = self._off(slot)
        self.mm[off:off + SLOT_SIZE] = bytes(SLOT_SIZE)
        self.mm[off:off + 16] = digest
        self.mm[off + _SEEN] = UP
        struct.pack_into("=d", self.mm, off + 32, time.time())
        self.mm[off + _STATE] = UP
        self._names[(service, address)] = slot
        return slot

    def free(self, service: str, address: str) -> None:
        """Forget (*service*, *address*): its slot may be reused."""
        slot = self._names.pop((service, address), None)
        if slot is not None:
            off = self._off(slot)
            self.mm[off:off + SLOT_SIZE] = bytes(SLOT_SIZE)
            self._freed.append(slot)

    def names(self) -> list[tuple[str, str]]:
        return list(self._names)

    def forget_unclaimed(self) -> None:
        """Free the slots adopted from an older master that no service claimed."""
        for slot in self._digests.values():
            off = self._off(slot)
            self.mm[off:off + SLOT_SIZE] = bytes(SLOT_SIZE)
            self._freed.append(slot)
        self._digests = {}

    def slot_of(self, service: str, address: str) -> int | None:
        """The slot of (*service*, *address*), if it has one (no allocation)."""
        return self._names.get((service, address))

    def read(self, slot: int) -> dict[str, Any]:
        """Everything slot *slot* holds, as plain data (status)."""
        off = self._off(slot)
        mm = self.mm
        successes, failures = _COUNTS.unpack_from(mm, off + 20)
        changed, checked = _TIMES.unpack_from(mm, off + 32)
        ok, failed = _TOTALS.unpack_from(mm, off + 48)
        result = bytes(mm[off + _RESULT:off + SLOT_SIZE]).rstrip(b"\0").decode("utf-8", "replace")
        return {"state": "down" if mm[off + _STATE] == DOWN else "up", "successes": successes,
                "failures": failures, "changed_at": changed, "checked_at": checked or None,
                "checks_ok": ok, "checks_failed": failed, "last_result": result or None}

    def stamp(self, command: Any) -> Any:
        """*command* with its proxy factory's health slots set (a ``Precommit`` or
        ``PrepareAndCommit`` of a service with ``health_check``; others as they are)."""
        if not isinstance(command, (Precommit, PrepareAndCommit)):
            return command
        if not isinstance(command.factory, MakeService) or not command.factory.health_checks():
            return command
        name = command.name
        factory = command.factory.with_health(self.key, lambda addr: self.slot_for(name, addr))
        return command if factory == command.factory else replace(command, factory=factory)

    def close(self) -> None:
        if _attached.get(self.key) is self:
            del _attached[self.key]


#: the tables this process has mapped, by key
_attached: dict[int, HealthTable] = {}


def table(key: int) -> HealthTable | None:
    """The table *key* mapped in this process (None: not mapped)."""
    return _attached.get(key)


# -- the master's checker ------------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """One health-checked upstream of one service: what the checker runs."""

    service: str
    address: str
    check: HealthCheck


async def check_once(address: str, hc: HealthCheck) -> tuple[bool, str]:
    """One check of *address*: ``(passed, what happened)`` (one line)."""
    up = parse_address(address)
    writer = None
    try:
        async with asyncio.timeout(hc.timeout):
            if up.path is not None:
                reader, writer = await asyncio.open_unix_connection(up.path)
            else:
                assert up.host is not None and up.port is not None
                reader, writer = await asyncio.open_connection(up.host, up.port)
            if hc.send:
                writer.write(hc.send.encode())
                await writer.drain()
            if hc.expect:
                want = hc.expect.encode()
                got = b""
                while len(got) < len(want):
                    chunk = await reader.read(len(want) - len(got))
                    if not chunk:
                        return False, f"closed after {len(got)} bytes, expected {_short(want)}"
                    got += chunk
                    if not want.startswith(got):
                        return False, f"unexpected reply {_short(got)}, expected {_short(want)}"
        return True, "ok"
    except TimeoutError:
        return False, f"timed out after {hc.timeout:g}s"
    except OSError as exc:
        return False, describe(exc)
    finally:
        if writer is not None:
            writer.transport.abort()


def _short(data: bytes) -> str:
    text = repr(data)
    return text if len(text) <= 40 else text[:37] + "..."


class Checker:
    """The master's health checks: one task per checked (service, upstream).

    ``configure`` (the ``WorkerManager``, after every batch of commands)
    starts, retunes and stops them; the state of each is in the
    ``HealthTable``, so retuning keeps it.  *paused*: no check runs until
    ``resume`` (a new master during an upgrade: the old one checks until it
    hands over).
    """

    def __init__(self, table: HealthTable, paused: bool = False) -> None:
        self.table = table
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._checks: dict[tuple[str, str], HealthCheck] = {}
        self._gate = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)
        self.paused = paused
        #: called (service, address, passed) after each check: the metrics' totals, tests
        self.on_check: Callable[[str, str, bool], None] | None = None

    def configure(self, wanted: Iterable[Checked]) -> None:
        """Check exactly *wanted* from now on: new ones at once, changed ones with
        their new settings from their next check, others no more (their slots freed)."""
        new = {(c.service, c.address): c.check for c in wanted}
        for key in list(self._tasks):
            if key not in new:
                self._tasks.pop(key).cancel()
        for key in self.table.names():
            if key not in new:
                self.table.free(*key)
        self._checks = new
        if self.paused:
            return
        for key in new:
            if key not in self._tasks:
                if self.table.slot_for(*key) < 0:
                    log.error("service %s: upstream %s: no health slot left (%d in use): not checked", key[0],
                              key[1], self.table.slots)
                    continue
                self._tasks[key] = asyncio.get_running_loop().create_task(self._run(key))

    def resume(self) -> None:
        """Start checking (a new master after an upgrade, once it serves)."""
        self.paused = False
        self.table.forget_unclaimed()
        self.configure(Checked(s, a, c) for (s, a), c in self._checks.items())

    def stop(self) -> None:
        """No more checks (the state stays in the table: a new master checks on)."""
        self.paused = True
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    def status(self, service: str, address: str) -> dict[str, Any] | None:
        """The health of *address* in *service* (None: not checked)."""
        hc = self._checks.get((service, address))
        slot = self.table.slot_of(service, address)
        if hc is None or slot is None:
            return None
        return {**self.table.read(slot), "rise": hc.rise, "fall": hc.fall, "interval": hc.interval}

    async def _run(self, key: tuple[str, str]) -> None:
        service, address = key
        while True:
            hc = self._checks.get(key)
            if hc is None:
                return
            async with self._gate:
                try:
                    passed, result = await check_once(address, hc)
                except Exception as exc:   # a bug must not end this upstream's checks silently
                    log.exception("service %s: upstream %s: the health check failed", service, address)
                    passed, result = False, describe(exc)
            self._record(key, hc, passed, result)
            if self.on_check is not None:
                self.on_check(service, address, passed)
            await asyncio.sleep(hc.interval)

    def _record(self, key: tuple[str, str], hc: HealthCheck, passed: bool, result: str) -> None:
        slot = self.table.slot_of(*key)
        if slot is None:
            return
        service, address = key
        mm = self.table.mm
        off = self.table._off(slot)
        now = time.time()
        state = mm[off + _STATE]
        successes, failures = _COUNTS.unpack_from(mm, off + 20)
        changed, _ = _TIMES.unpack_from(mm, off + 32)
        ok, failed = _TOTALS.unpack_from(mm, off + 48)
        if state == DOWN and mm[off + _SEEN] == UP:
            # a worker's max_fails ejected it: down until rise checks pass
            log.warning("service %s: upstream %s is down (ejected by a worker's passive check); up after %d "
                        "passing health checks", service, address, hc.rise,
                        extra={"service": service, "upstream": address, "reason": "passive"})
            successes, changed = 0, now
            mm[off + _SEEN] = DOWN
        if passed:
            successes, failures, ok = successes + 1, 0, ok + 1
            if state == DOWN and successes >= hc.rise:
                state, changed = UP, now
                log.warning("service %s: upstream %s is up after %d passing health checks", service, address,
                            successes, extra={"service": service, "upstream": address})
        else:
            successes, failures, failed = 0, failures + 1, failed + 1
            if state == UP and failures >= hc.fall:
                state, changed = DOWN, now
                log.warning("service %s: upstream %s is down after %d failed health checks (last: %s)",
                            service, address, failures, result,
                            extra={"service": service, "upstream": address, "reason": result})
        _COUNTS.pack_into(mm, off + 20, min(successes, 2**32 - 1), min(failures, 2**32 - 1))
        _TIMES.pack_into(mm, off + 32, changed, now)
        _TOTALS.pack_into(mm, off + 48, ok, failed)
        text = result.encode()[:_RESULT_SIZE]
        mm[off + _RESULT:off + SLOT_SIZE] = text + bytes(_RESULT_SIZE - len(text))
        if mm[off + _STATE] != state:
            mm[off + _STATE] = state
        mm[off + _SEEN] = state


def wanted_checks(factories: Iterable[tuple[str, Any]]) -> list[Checked]:
    """What to check for *factories* (``(service name, MakeService)``): their
    ``health_checks()``."""
    return [Checked(name, addr, hc) for name, factory in factories for addr, hc in factory.health_checks()]


__all__ = ["Checked", "Checker", "HealthCheck", "HealthTable", "MAX_CONCURRENT_CHECKS", "check_once", "table",
           "wanted_checks"]
