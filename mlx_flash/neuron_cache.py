"""The preallocated neuron matrix that records are read into.

On flash a neuron's record holds all its parts contiguously (gate row, up row, down column),
so one read fetches the neuron. In memory we keep one matrix per part, `[capacity, length]`
each: a vectored read (`preadv`) scatters each record's parts straight into row `slot` of
every part matrix, and the FFN then multiplies contiguous matrices with no copy.
"""

from __future__ import annotations

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
        views: list[np.ndarray] = []  # per stretch of a record: rows receiving it
        position = 0
        for p in sorted(family.parts, key=lambda p: p.offset):
            if p.offset > position:  # padding inside the record lands in a scratch row
                views.append(np.zeros((1, (p.offset - position) * size), dtype=np.uint8))
            buf = mx.zeros((capacity, p.length * size), dtype=mx.uint8)
            self._buffers[p.name] = buf
            self.parts[p.name] = buf.view(DTYPES[family.dtype])
            mx.eval(buf, self.parts[p.name])
            views.append(np.array(buf, copy=False))  # writable view of the same memory
            position = p.offset + p.length
        if family.stride > position:
            views.append(np.zeros((1, (family.stride - position) * size), dtype=np.uint8))
        self._views = views
        # iovecs[slot]: the buffers one record is scattered into when it lands in row `slot`
        self._iovecs = [[memoryview(v[min(slot, len(v) - 1)]) for v in views]
                        for slot in range(capacity)]

    def iovecs(self, slots: np.ndarray | range) -> list[memoryview]:
        """The read targets for records landing in `slots`, in order."""
        rows = self._iovecs
        return [mv for s in slots for mv in rows[s]]

    @property
    def iovecs_per_record(self) -> int:
        return len(self._views)

    def buffer_address(self, part: str) -> int:
        """Address of a part matrix's memory (to check it is never reallocated)."""
        return np.array(self._buffers[part], copy=False).__array_interface__["data"][0]
