"""Garbage collection in a process that holds thousands of services.

A worker serving 10,000 services tracks some 300,000 container objects that
live as long as the config does; CPython's full collection traverses every
one of them (a few hundred milliseconds on a busy machine), and a reload or
a burst of status requests allocates enough to trigger one: the event loop
stops for that long.  ``gc.freeze()`` moves every tracked object to a
permanent generation that collections skip, so they only walk what was
allocated since.

Rules of this module:

* **Freeze at settled points only** (``settle``): after the start-up and
  after each reload's batch of commands has run -- what exists then is the
  config that serves, the long-lived part.  A young collection runs first,
  so short-lived garbage is not frozen with it.
* **Frozen garbage is swept, later, once** (``Sweeper``): an object frozen
  that becomes garbage *in a reference cycle* (an old version of a service
  when its last connection ends, a removed site after its drain) is not
  collected while frozen.  So each settle that followed a change arms one
  sweep, ``delay`` seconds later (the drain timeout: the old versions have
  drained by then): unfreeze, one full collection, freeze again.  A new
  change before it fires moves it later (one sweep for a series of
  reloads), never during a reload.  Garbage without cycles is freed by its
  reference count at once, frozen or not -- hotproxy's versions are (a
  connection holds its version, nothing points back), so a sweep usually
  finds next to nothing, and it costs what the full collection it replaces
  did (~400 ms at 10,000 services on a busy machine).  So the delay
  backs off: a sweep that finds less than ``SWEEP_FRUITLESS`` of the
  frozen objects makes the next one wait ``BACKOFF`` times longer (up to
  ``MAX_DELAY``); one that finds more brings it back to the drain timeout.
* Between sweeps the collections are young ones, whatever the size of the
  config.
* It imports nothing of hotproxy; the worker and the master call it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any, Callable

log = logging.getLogger("hotproxy.gc")


#: settles so far in this process (``stats``)
_settled = 0


def settle() -> None:
    """Collect the young generations, then freeze every tracked object."""
    global _settled
    gc.collect(1)
    gc.freeze()
    _settled += 1


def sweep() -> tuple[int, float]:
    """Unfreeze, collect everything, freeze again: (objects collected, ms)."""
    t0 = time.perf_counter()
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    return found, (time.perf_counter() - t0) * 1000.0


def stats() -> dict[str, Any]:
    """What status shows of it: how many times this process froze its heap,
    and per generation the counts since the last collection (``gc.get_count``).

    Not ``gc.get_freeze_count()``: it walks every frozen object (6 ms for
    400,000), and status is asked for often."""
    return {"freezes": _settled, "counts": list(gc.get_count())}


#: a sweep due while *busy* says a reload runs waits this long, again and again
BUSY_RETRY = 1.0
#: a sweep that collects less than this share of the frozen objects found nothing worth its cost
SWEEP_FRUITLESS = 0.001
#: ... and the next one waits this many times longer, up to MAX_DELAY seconds
BACKOFF = 4.0
MAX_DELAY = 3600.0


class Sweeper:
    """Arms one ``sweep`` *delay* seconds after the last ``changed()``; while
    *busy()* (a reload runs) it waits ``BUSY_RETRY`` seconds more each time."""

    def __init__(self, delay: float, busy: Callable[[], bool] | None = None) -> None:
        #: the delay after a change (the drain timeout and a margin) ...
        self.base = delay
        #: ... and the current one (``BACKOFF`` after fruitless sweeps)
        self.delay = delay
        self.busy = busy
        self._handle: asyncio.TimerHandle | None = None
        #: sweeps run so far (for status and tests)
        self.sweeps = 0

    def changed(self) -> None:
        """A change was settled: (re)arm the sweep.  Call from the event loop."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle = asyncio.get_running_loop().call_later(self.delay, self._run)

    def cancel(self) -> None:
        """Disarm (the process stops)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def armed(self) -> bool:
        """True while a sweep is due."""
        return self._handle is not None

    def _run(self) -> None:
        self._handle = None
        if self.busy is not None and self.busy():
            self._handle = asyncio.get_running_loop().call_later(BUSY_RETRY, self._run)
            return
        # (``gc.get_freeze_count()`` walks every frozen object: once, before the
        # sweep; the log line reuses it -- its argument was a second walk of
        # 400,000 objects, ~200 ms more of stall at 10,000 services, even
        # with debug logging off)
        frozen = gc.get_freeze_count()
        found, ms = sweep()
        self.sweeps += 1
        fruitless = found < frozen * SWEEP_FRUITLESS
        self.delay = min(self.delay * BACKOFF, MAX_DELAY) if fruitless else self.base
        log.debug("gc sweep: %d objects collected in %.1f ms, %d were frozen; next sweep %.0f s after a change",
                  found, ms, frozen, self.delay)


__all__ = ["Sweeper", "settle", "stats", "sweep"]
