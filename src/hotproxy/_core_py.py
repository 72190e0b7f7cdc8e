"""The pure-Python twin of ``_core.pyx``: same names, same behaviour.

Used when the extension is missing or ``HOTPROXY_NO_EXTENSIONS=1``; the
test-suite runs against both.  Keep the two files in step.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Slot:
    """The current service of one site (see ``_core.pyx``)."""

    __slots__ = ("_current",)

    def __init__(self, current: Any = None) -> None:
        self._current = current

    @property
    def current(self) -> Any:
        """The service that new connections get (None before the first commit)."""
        return self._current

    def swap(self, new: Any) -> Any:
        """Publish *new*; return the service it replaces."""
        old = self._current
        self._current = new
        return old

    def __repr__(self) -> str:
        return f"<Slot {self._current!r}>"


class ConnectionSet:
    """The open connections of a site (see ``_core.pyx``)."""

    __slots__ = ("_conns", "parent", "_waiters")

    def __init__(self, parent: ConnectionSet | None = None) -> None:
        self._conns: set[Any] = set()
        self.parent = parent
        self._waiters: list[asyncio.Future[None]] | None = None

    def add(self, conn: Any) -> None:
        """Track *conn* (and in the parent set, if any)."""
        self._conns.add(conn)
        if self.parent is not None:
            self.parent.add(conn)

    def discard(self, conn: Any) -> None:
        """Stop tracking *conn*; wake ``wait_empty`` waiters when none are left."""
        self._conns.discard(conn)
        if self.parent is not None:
            self.parent.discard(conn)
        if self._waiters is not None and not self._conns:
            waiters, self._waiters = self._waiters, None
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def wait_empty(self) -> asyncio.Future[None]:
        """A future that is done once no connection is left."""
        fut = asyncio.get_running_loop().create_future()
        if not self._conns:
            fut.set_result(None)
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(fut)
        return fut

    def abort_all(self) -> int:
        """Abort every connection still open; return how many there were."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        return len(conns)

    def snapshot(self) -> list[Any]:
        """A list of the connections open now."""
        return list(self._conns)

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, conn: object) -> bool:
        return conn in self._conns

    def __repr__(self) -> str:
        return f"<ConnectionSet open={len(self._conns)}>"


class Acceptor:
    """The protocol factory a site's listener serves with (see ``_core.pyx``)."""

    __slots__ = ("slot", "conns")

    def __init__(self, slot: Slot, conns: ConnectionSet) -> None:
        self.slot = slot
        self.conns = conns

    def __call__(self) -> asyncio.BaseProtocol:
        return self.slot._current.new_connection(self.conns)  # type: ignore[no-any-return]
