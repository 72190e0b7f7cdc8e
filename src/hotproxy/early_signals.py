"""The master's signals, caught from the first instants of ``hotproxy run``.

The default action of SIGHUP, SIGTERM, SIGINT, SIGQUIT and SIGUSR2 ends the process.
``hotproxy run`` imports asyncio, uvloop and the compiled core before the
master's loop can handle them, and a SIGHUP sent in that window (a deploy
script that starts the proxy and reloads it at once) would kill it.  So the
CLI calls ``catch()`` before any of those imports; each signal is recorded
here, and ``Master.run`` replays them in order once its loop handles them.

This module imports nothing but ``signal``: it must be cheap to reach.
"""

from __future__ import annotations

import signal
from typing import Any

#: the signals the master handles
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR2)

_caught: list[int] = []


def catch() -> None:
    """Record the master's signals from now on instead of their default action."""
    for sig in SIGNALS:
        signal.signal(sig, _record)


def _record(signum: int, frame: Any) -> None:
    _caught.append(signum)


def take() -> list[int]:
    """The signals caught so far, in order of arrival; forgets them."""
    caught, _caught[:] = list(_caught), []
    return caught


__all__ = ["SIGNALS", "catch", "take"]
