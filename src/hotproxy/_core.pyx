# cython: language_level=3
"""hotproxy's compiled core.

Rules of this file:

* Everything here is also in ``_core_py.py`` with the same names, arguments
  and behaviour; the test-suite runs against both (``HOTPROXY_NO_EXTENSIONS=1``
  picks the pure-Python twin).
* The accept path (``Acceptor.__call__``) takes one reference from the slot and
  calls the service: no lock, no allocation of its own, no await.
* A slot is published by one reference assignment (``Slot.swap``); a reader
  sees the old service or the new one, never anything in between.
"""

cimport cython

import asyncio


@cython.final
cdef class Slot:
    """The current service of one site.

    Read on every accepted connection, replaced by ``swap`` on ``Update``.
    """

    def __cinit__(self, object current=None):
        self._current = current

    @property
    def current(self):
        """The service that new connections get (None before the first commit)."""
        return self._current

    cpdef object swap(self, object new):
        """Publish *new*; return the service it replaces."""
        old = self._current
        self._current = new
        return old

    def __repr__(self):
        return f"<Slot {self._current!r}>"


@cython.final
cdef class ConnectionSet:
    """The open connections of a site (or of one layer's services).

    A connection object is anything with an ``abort()`` method; it adds
    itself when it starts and discards itself when it ends.  A set with a
    parent mirrors every add and discard into it, so a layer can count its
    own connections while the site still sees all of them.
    """

    def __cinit__(self, ConnectionSet parent=None):
        self._conns = set()
        self.parent = parent
        self._waiters = None

    cpdef add(self, object conn):
        """Track *conn* (and in the parent set, if any)."""
        self._conns.add(conn)
        if self.parent is not None:
            self.parent.add(conn)

    cpdef discard(self, object conn):
        """Stop tracking *conn*; wake ``wait_empty`` waiters when none are left."""
        self._conns.discard(conn)
        if self.parent is not None:
            self.parent.discard(conn)
        if self._waiters is not None and not self._conns:
            self._wake()

    cdef _wake(self):
        waiters = self._waiters
        self._waiters = None
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def wait_empty(self):
        """A future that is done once no connection is left."""
        fut = asyncio.get_running_loop().create_future()
        if not self._conns:
            fut.set_result(None)
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(fut)
        return fut

    def abort_all(self):
        """Abort every connection still open; return how many there were."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        return len(conns)

    def snapshot(self):
        """A list of the connections open now."""
        return list(self._conns)

    def __len__(self):
        return len(self._conns)

    def __contains__(self, conn):
        return conn in self._conns

    def __repr__(self):
        return f"<ConnectionSet open={len(self._conns)}>"


@cython.final
cdef class Acceptor:
    """The protocol factory a site's listener serves with.

    Each accepted connection reads the slot once and asks that service for
    a protocol; the connection keeps that service for its whole life.
    """

    def __cinit__(self, Slot slot, ConnectionSet conns):
        self.slot = slot
        self.conns = conns

    def __call__(self):
        return self.slot._current.new_connection(self.conns)
