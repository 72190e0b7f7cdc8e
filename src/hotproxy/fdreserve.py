"""A few file descriptors kept in reserve for the moment they are needed most.

When the master has run out of descriptors (clients of its admin socket,
or anything else that holds them), a worker that dies must still be
restarted: its two socketpairs, ``/dev/null`` and the exec pipe need about
eight.  The manager holds ``FdReserve(16)`` -- descriptors opened on
``/dev/null``, close-on-exec, never inherited -- closes them right before
it starts a worker and opens them again right after.  Starting a worker
takes its descriptors before its first ``await``, so nothing else in the
process can take the freed ones first.
"""

from __future__ import annotations

import os

#: descriptors held by default: twice what starting a worker takes
DEFAULT_SIZE = 16


class FdReserve:
    """*size* descriptors on ``/dev/null``: ``release()`` before a start, ``refill()`` after."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._fds: list[int] = []

    def __len__(self) -> int:
        return len(self._fds)

    def refill(self) -> int:
        """Open descriptors up to ``size`` (as many as the process may); return how many are held."""
        while len(self._fds) < self.size:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:   # none left now: the next refill tries again
                break
        return len(self._fds)

    def release(self) -> None:
        """Close every held descriptor, for whoever opens one next."""
        while self._fds:
            os.close(self._fds.pop())


__all__ = ["DEFAULT_SIZE", "FdReserve"]
