"""The preallocated neuron matrix that records are read into.

On flash a neuron's record holds all its parts contiguously (gate row, up row, down column),
so one read fetches the neuron. In memory we keep one matrix per part, `[capacity, length]`
each: a vectored read (`preadv`) scatters each record's parts straight into row `slot` of
every part matrix, and the FFN then multiplies contiguous matrices with no copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .bundle import DTYPES, ITEMSIZE, RecordFamily


class NeuronMatrix:
    """Rows `0..capacity-1` of every record part, allocated once and filled in place."""

    def __init__(self, family: RecordFamily, capacity: int):
        self.family = family
        self.capacity = capacity
        size = ITEMSIZE[family.dtype]
        self._buffers: dict[str, mx.array] = {}
        self.parts: dict[str, mx.array] = {}  # typed views of the buffers, what compute uses
        self._rows: dict[str, np.ndarray] = {}  # writable uint8 views of the same memory
        for p in family.parts:
            buf = mx.zeros((capacity, p.length * size), dtype=mx.uint8)
            self._buffers[p.name] = buf
            self.parts[p.name] = buf.view(DTYPES[family.dtype])
            mx.eval(buf, self.parts[p.name])
            self._rows[p.name] = np.array(buf, copy=False)
        # bytes that are read but not kept (padding, parts not asked for) land here
        self.scratch = memoryview(bytearray(family.record_bytes))
        self._tables: dict[tuple[str, ...], list[list[memoryview]]] = {}

    def span(self, parts: Sequence[str]) -> tuple[int, int]:
        """Byte range `[start, end)` of a record that covers `parts` (all parts: the whole
        record, padding included, so adjacent records read as one)."""
        if set(parts) == {p.name for p in self.family.parts}:
            return 0, self.family.record_bytes
        start, end = self.family.part_span(parts)
        size = ITEMSIZE[self.family.dtype]
        return start * size, end * size

    def _table(self, parts: tuple[str, ...]) -> list[list[memoryview]]:
        """Per slot, the buffers that receive a record's bytes `span(parts)` landing there."""
        size = ITEMSIZE[self.family.dtype]
        start, end = self.span(parts)
        pieces = []  # (byte offset in record, byte length, part name or None for scratch)
        position = start
        for p in sorted(self.family.parts, key=lambda p: p.offset):
            a, b = p.offset * size, (p.offset + p.length) * size
            if a < start or b > end:
                continue
            if a > position:
                pieces.append((position, a - position, None))
            pieces.append((a, b - a, p.name if p.name in parts else None))
            position = b
        if end > position:
            pieces.append((position, end - position, None))
        return [[memoryview(self._rows[name][slot]) if name else self.scratch[:length]
                 for _, length, name in pieces] for slot in range(self.capacity)]

    def iovecs(self, slots: Sequence[int], parts: Sequence[str]) -> list[memoryview]:
        """The read targets, in file order, for the span of `parts` of records landing in
        `slots` (one record after another, no gaps)."""
        key = tuple(parts)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self._table(key)
        return [mv for s in slots for mv in table[s]]

    def buffer_address(self, part: str) -> int:
        """Address of a part matrix's memory (to check it is never reallocated)."""
        return self._rows[part].__array_interface__["data"][0]
