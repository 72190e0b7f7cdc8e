# Types for _core_machine.py (Cython's pure-Python mode: this file augments
# the .py when Cython compiles it into hotproxy._core_machine).  The
# compiled core cimports what is declared here.

cimport cython

cdef int D_HOLD, D_HOLD_EOF, D_OPEN, D_BLOCKED, D_EOF_PEND, D_SHUT, D_CLOSING, D_CLOSED
cdef int N_STATES, N_EVENTS
cdef int EV_READ, EV_FULL, EV_DRAINED, EV_EOF, EV_CONNECTED, EV_CLOSE, EV_ERROR
cdef int ACT_NONE, ACT_SHUT, ACT_CLOSE, ACT_ABORT
cdef int M_COPY, M_BULK, M_SPLICE

cdef unsigned char _TABLE[56]   # N_STATES * N_EVENTS

cpdef tuple transition(int state, int event)
cpdef bint eof_seen(int state) noexcept
cpdef bint may_read(int state) noexcept


@cython.final
cdef class Direction:
    cdef public int state
    cdef public int mode
    cdef public bint readable
    cdef public bint rdhup
    cdef public Py_ssize_t pend_off
    cdef public Py_ssize_t pend_end
    cdef public Py_ssize_t size
    cdef public Py_ssize_t next
    cdef public long long nbytes
    cdef public bytearray buf
    cdef public object mv
    cdef public int pipe_r
    cdef public int pipe_w

    @cython.locals(t=int)
    cpdef int step(self, int event) noexcept
    @cython.locals(state=int)
    cpdef bint eof(self) noexcept


@cython.final
cdef class TimerWheel:
    cdef readonly double resolution
    cdef dict _buckets
    cdef list _ticks
    cdef dict _where

    @cython.locals(tick="long long")
    cdef long long _tick_of(self, double at)
    @cython.locals(tick="long long", bucket=dict)
    cpdef double arm(self, object obj, double at) except? -1.0
    @cython.locals(bucket=dict)
    cpdef discard(self, object obj)
    @cython.locals(due=list, ticks=list, limit="long long", bucket=dict)
    cpdef list expire(self, double now)
    @cython.locals(ticks=list, bucket=dict)
    cpdef double next_at(self)
