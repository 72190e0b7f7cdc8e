# Types for _balance.py (Cython's pure-Python mode: this file augments the
# .py when Cython compiles it into hotproxy._balance).

cimport cython

cdef unsigned long long _MASK, _FNV_OFFSET, _FNV_PRIME, _MIX1, _MIX2

@cython.locals(h="unsigned long long", b="unsigned char")
cpdef unsigned long long key_hash(bytes key)

@cython.locals(n=Py_ssize_t, i=Py_ssize_t, turn="long long", c="long long", offset="long long",
               skip="long long", filled="long long", w="long long", ov="long long[::1]",
               sv="long long[::1]", tv="long long[::1]", nv="long long[::1]", ev="int[::1]")
cpdef list build(tuple names, tuple weights, long long size)


@cython.final
cdef class HashTable:
    cdef readonly tuple key
    cdef readonly tuple names
    cdef readonly long long size
    cdef readonly object entries    # array('H')
    cpdef long long slot(self, bytes key)
