"""A compact set of 64-bit row hashes, for exact-duplicate detection while streaming.

Catching a duplicate anywhere in a file needs one key per row seen. A Python `set` of ints
costs ~100 bytes a row; this open-addressing table in one flat `array('Q')` costs 16 (load
factor ≤ 1/2), so a 10^6-row file needs ~16 MiB. Keys come from SHA-256, so the low bits are
already uniform and linear probing needs no further mixing.
"""

from __future__ import annotations

from array import array


class SeenHashes:
    __slots__ = ("_table", "_mask", "_count")

    def __init__(self, expected: int = 1024):
        capacity = 1 << max(10, (2 * expected - 1).bit_length())
        self._table = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: int) -> bool:
        """Insert a 64-bit key; True if it was new, False if it had been seen before."""
        key = key or 1  # 0 marks an empty slot
        table, mask = self._table, self._mask
        i = key & mask
        while True:
            slot = table[i]
            if slot == 0:
                table[i] = key
                self._count += 1
                if self._count * 2 > mask:
                    self._grow()
                return True
            if slot == key:
                return False
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self._table
        capacity = 2 * (self._mask + 1)
        self._table = table = array("Q", bytes(8 * capacity))
        self._mask = mask = capacity - 1
        for key in old:
            if key:
                i = key & mask
                while table[i]:
                    i = (i + 1) & mask
                table[i] = key
