# cython: annotation_typing=False
"""Consistent hashing for ``balance = "hash"``: a weighted Maglev table.

Cython compiles this file, typed by ``_balance.pxd`` (pure-Python mode, like
``_core_machine.py``), into ``hotproxy._balance``; the pure-Python core runs
the same source as plain Python (``proxy`` loads it through
``balance_module()``), so the two cannot drift.  It imports nothing of the
project.

Rules of this module:

* A table depends only on the set of ``(name, weight)`` pairs, never on
  their order, the process or Python's ``hash()`` (randomised per
  process): every worker, and every version with the same upstreams and
  weights, builds the very same table.  Names are hashed with BLAKE2b,
  keys with FNV-1a and a 64-bit finaliser.
* Maglev (Eisenbud et al., NSDI 2016): each name has a permutation of the
  table's slots (``offset``, ``skip``; the size is prime, so every skip
  visits every slot); names take turns claiming their next free preferred
  slot until every slot is taken.  A name of weight *w* takes *w* turns per
  round, so it owns about *w* / (sum of weights) of the slots.  Adding or
  removing one of N names changes about 1/N of the slots.
* Only names of weight >= 1 take part; every slot ends up owned.
* Every table has ``TABLE_SIZE`` slots, stored as 16-bit indices (128 KiB).
* The table is built once per service version (and reused by the next
  version when the names and weights are the same); a lookup is one hash
  and one index.
"""

from __future__ import annotations

import hashlib as _hashlib
from array import array as _array

#: the size of every table: a prime (so every skip visits every slot), the
#: same whatever the number of upstreams -- a size that grew with them would
#: reshuffle every key when one is added -- and large enough that weights
#: up to 256 over hundreds of upstreams get their share
TABLE_SIZE = 65521

_MASK = 0xFFFFFFFFFFFFFFFF
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MIX1 = 0xFF51AFD7ED558CCD
_MIX2 = 0xC4CEB9FE1A85EC53


def key_hash(key: bytes) -> int:
    """A 64-bit hash of *key*, the same in every process: FNV-1a, then the
    MurmurHash3 finaliser (FNV alone spreads keys that differ in their last
    byte -- client addresses -- poorly over a prime modulus)."""
    h = _FNV_OFFSET
    for b in key:
        h = ((h ^ b) * _FNV_PRIME) & _MASK
    h ^= h >> 33
    h = (h * _MIX1) & _MASK
    h ^= h >> 33
    h = (h * _MIX2) & _MASK
    h ^= h >> 33
    return h


def _name_hashes(name: str) -> tuple[int, int]:
    digest = _hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def build(names: tuple[str, ...], weights: tuple[int, ...], size: int) -> list[int]:
    """The Maglev table of *size* slots (a prime) for *names* (distinct, in
    a fixed order) with *weights* (each >= 1): slot -> index into *names*."""
    n = len(names)
    if n == 0 or n != len(weights):
        raise ValueError("need one weight per name, and at least one name")
    for w in weights:
        if w < 1:
            raise ValueError("every weight must be >= 1")
    if size < 2:
        raise ValueError("the table needs at least 2 slots")
    offsets = _array("q", [0]) * n
    skips = _array("q", [0]) * n
    for i in range(n):
        h1, h2 = _name_hashes(names[i])
        offsets[i] = h1 % size
        skips[i] = h2 % (size - 1) + 1
    turns = _array("q", weights)
    nexts = _array("q", [0]) * n
    entries = _array("i", [-1]) * size
    # typed views of the arrays (C arrays once compiled; the arrays themselves in Python)
    ov = offsets
    sv = skips
    tv = turns
    nv = nexts
    ev = entries
    filled = 0
    while True:
        for i in range(n):
            offset = ov[i]
            skip = sv[i]
            for turn in range(tv[i]):
                # the next free slot of name i's permutation (it has one:
                # the table is not full, and the permutation visits every slot)
                c = (offset + nv[i] * skip) % size
                while ev[c] >= 0:
                    nv[i] += 1
                    c = (offset + nv[i] * skip) % size
                ev[c] = i
                nv[i] += 1
                filled += 1
                if filled == size:
                    return entries.tolist()


class HashTable:
    """A Maglev table over *members* (``(name, weight)`` pairs; weight 0:
    left out), built once.  ``names`` are the members that take part,
    sorted; ``entries[slot]`` is an index into ``names``.  An empty table
    (no member of weight >= 1) has no entries.  *size* (a prime; tests use
    small ones) defaults to ``TABLE_SIZE``."""

    def __init__(self, members: tuple[tuple[str, int], ...], size: int = TABLE_SIZE) -> None:
        taking = sorted((str(name), int(weight)) for name, weight in members if weight > 0)
        if len(taking) > 65535:
            raise ValueError("at most 65535 members")
        self.key = tuple(taking)
        self.names = tuple(name for name, _ in taking)
        weights = tuple(weight for _, weight in taking)
        self.size = size if taking else 0
        self.entries = _array("H", build(self.names, weights, size) if taking else ())

    def slot(self, key: bytes) -> int:
        """The slot of *key* (where its preference list starts); -1 for an empty table."""
        if self.size == 0:
            return -1
        return key_hash(key) % self.size

    def lookup(self, key: bytes) -> str | None:
        """The name that owns *key*'s slot (None for an empty table)."""
        if self.size == 0:
            return None
        return self.names[self.entries[key_hash(key) % self.size]]

    def __repr__(self) -> str:
        return f"<HashTable {len(self.names)} names, {self.size} slots>"
