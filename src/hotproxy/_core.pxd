# The compiled core's interface: what other Cython modules may cimport.
# Python code sees the same names through hotproxy.core (compiled or not).
# One .pxd per concern, included here (as uvloop's loop.pxd includes its
# handles); every C declaration is in _core_includes.pxd.

from hotproxy._core_includes cimport *

include "_core_counters.pxd"
include "_core_engine.pxd"
include "_core_relay.pxd"
include "_core_listener.pxd"
