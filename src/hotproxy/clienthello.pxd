# Types for clienthello.py (Cython's pure-Python mode: this file augments the
# .py when Cython compiles it into hotproxy.clienthello).  The message is
# read in place in a bytearray (a connection's read buffer), positions are
# C integers, and the helpers are C calls:
# parsing a ClientHello makes no Python call and no copy; RouteTable's
# lookup of a name is C calls on dicts.

cimport cython

cdef int _HANDSHAKE, _CLIENT_HELLO, _MAX_RECORD, _EXT_SERVER_NAME, _HOST_NAME

@cython.locals(length=Py_ssize_t, need=Py_ssize_t)
cpdef object server_name_in(bytearray data, Py_ssize_t n)

cdef Py_ssize_t _take(Py_ssize_t pos, Py_ssize_t n, Py_ssize_t end, str what) except -1

@cython.locals(version=int, sid=Py_ssize_t, suites=Py_ssize_t, methods=Py_ssize_t, n=Py_ssize_t,
               exts_end=Py_ssize_t, etype=int, ext=Py_ssize_t, low="unsigned long long",
               one="unsigned long long", bit="unsigned long long", seen=set, name=str)
cdef str _parse_hello(bytearray data, Py_ssize_t pos, Py_ssize_t end)

@cython.locals(n=Py_ssize_t, names_end=Py_ssize_t, kind=int, start=Py_ssize_t, host=str)
cdef str _parse_server_name(bytearray data, Py_ssize_t pos, Py_ssize_t end)

@cython.locals(name=bytes)
cdef str _host(bytes raw)

@cython.locals(n=Py_ssize_t, prev=int, i=Py_ssize_t, c=int)
cdef str _host_at(bytearray data, Py_ssize_t start, Py_ssize_t end)


@cython.final
cdef class RouteTable:
    cdef readonly dict exact
    cdef readonly dict wildcard
    cdef readonly object default
    cdef readonly dict routed
    @cython.locals(routed=dict, group=object, i=Py_ssize_t, suffix=str, key=str)
    cpdef object route(self, str name)
