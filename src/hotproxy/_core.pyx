# cython: language_level=3
"""hotproxy's compiled core.

Rules of this file:

* Everything here is also in ``_core_py.py`` with the same names, arguments
  and behaviour; the test-suite runs against both (``HOTPROXY_NO_EXTENSIONS=1``
  picks the pure-Python twin), and ``tests/test_core_equivalence.py`` checks
  that the two expose the same API.  The relay's logic (``Relay``: a
  connection's states and decisions, each direction's state machine), the
  timer wheel and ``RelayConfig`` & co. are not written twice: they are
  ``_core_machine.py``, built as ``hotproxy._core_machine`` and cimported;
  what is here is what makes system calls.
* This file is the module's glue; the code is in one ``.pxi`` per concern
  (below), each declared in the ``.pxd`` of the same name, and every C
  declaration is in ``_core_includes.pxd``.
* The accept path (``Acceptor.__call__``) takes one reference from the slot and
  calls the service: no lock, no allocation of its own, no await.
* A slot is published by one reference assignment (``Slot.swap``); a reader
  sees the old service or the new one, never anything in between.
* The proxy's data path (``Connection``, and the loop's ``_Engine`` for the
  upstream socket it owns) does no Python allocation per chunk while the
  peer keeps up: it reads into buffers it owns, sends to the upstream
  straight from them, and hands the client transport a view.  A transport
  keeps a reference to a view it could not send at once, so a buffer is
  reused only when the client's write buffer is empty after the write;
  otherwise a fresh one is taken for the next read.
* Counters are C integers, updated per chunk without touching Python objects.
"""

cimport cython
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.ref cimport Py_INCREF, Py_DECREF
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE
from libc.errno cimport errno, EAGAIN, EINTR, EINPROGRESS, ECONNREFUSED, EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED
from posix.unistd cimport close as _close


import asyncio
import fcntl as _fcntl
import logging
import mmap as _mmap
import os as _os
import socket as _socket
import time

import hotproxy._core_machine as _machine
import hotproxy.clienthello as _clienthello

cdef object _accept_log = logging.getLogger("hotproxy.accept")
cdef object _accept_failed = _machine.accept_failed
cdef object _monotonic = time.monotonic

cdef object _get_running_loop = asyncio.get_running_loop

cdef object _log = logging.getLogger("hotproxy.proxy")


cdef inline double _now() noexcept nogil:
    # CLOCK_MONOTONIC, like time.monotonic(): a vDSO call, no Python object.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef object _oserror(int err):
    return OSError(err, _os.strerror(err))


# The parts, by concern (each declared in the .pxd of the same name, which
# _core.pxd includes): one extension, so calls between them stay direct C
# calls that the compiler can inline.
include "_core_counters.pxi"   # CounterTable, SharedCounter
include "_core_relay.pxi"      # Connection: the relay's system calls
include "_core_engine.pxi"     # _Engine: epoll, deferred reads, timers
include "_core_listener.pxi"   # Listener: accept4() in the core

# A site's slot, connection sets and acceptor, and what a service version
# shares with its connections, are _core_machine's (one source for both
# cores): this module's names for them.
_machine.use_counters(private_counter)
# the ClientHello parser of sni routing: clienthello.py, compiled as its own
# extension (setup.py); the pure-Python core runs the same source as Python
_machine.use_parser(_clienthello.server_name_in, _clienthello.MAX_BUFFERED)
globals().update(Slot=Slot, ConnectionSet=ConnectionSet, Acceptor=Acceptor,
                 ProxyCounters=ProxyCounters, UpstreamState=UpstreamState, Target=Target,
                 RelayConfig=RelayConfig, parse_proxy_header=_machine.parse_proxy_header, proxy_header=_machine.proxy_header,
                 proxy_networks=_machine.proxy_networks, PROXY_HEADER_MAX=_machine.PROXY_HEADER_MAX)
