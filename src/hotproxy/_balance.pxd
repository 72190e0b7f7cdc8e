# Types for _balance.py (Cython's pure-Python mode: this file augments the
# .py when Cython compiles it into hotproxy._balance).

cimport cython

cdef tuple SIZES
cdef int SLOTS_PER_NAME
cdef unsigned long long _MASK, _FNV_OFFSET, _FNV_PRIME, _MIX1, _MIX2

cpdef int table_size(int names, long long total_weight)

@cython.locals(h="unsigned long long", b="unsigned char")
cpdef unsigned long long key_hash(bytes key)

@cython.locals(n=Py_ssize_t, i=Py_ssize_t, turn=int, c="long long", offset="long long",
               skip="long long", filled="long long", w="long long", entries=list, nexts=list,
               offsets=list, skips=list)
cpdef list build(tuple names, tuple weights, long long size)


@cython.final
cdef class HashTable:
    cdef readonly tuple key
    cdef readonly tuple names
    cdef readonly long long size
    cdef readonly list entries
    cpdef long long slot(self, bytes key)
