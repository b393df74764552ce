"""The preallocated matrix that records are read into.

On flash a neuron's record holds all its parts contiguously (gate row, up row, down column),
so one read fetches the neuron. In memory we keep one matrix per part, `[capacity, length]`
each: a vectored read (`preadv`) scatters each record's parts straight into row `slot` of
every part matrix, and the FFN then multiplies contiguous matrices with no copy. The matrix is
allocated once and never reallocated or copied whole: a cache over it (mlx_flash.neuron_cache)
deletes by moving its last rows into the holes, and appends.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .bundle import PART_DTYPES, RecordFamily


class NeuronMatrix:
    """Rows `0..capacity-1` of the named record tensors (default all; a quantized tensor's
    scales and biases come with it), allocated once and filled in place."""

    def __init__(self, family: RecordFamily, capacity: int, parts: Sequence[str] | None = None):
        self.family = family
        self.capacity = capacity
        names = family.expand(family.tensors if parts is None else parts)
        self._buffers: dict[str, mx.array] = {}
        self.parts: dict[str, mx.array] = {}  # typed views of the buffers, what compute uses
        self.rows: dict[str, np.ndarray] = {}  # writable uint8 views of the same memory
        for name in names:
            p = family.part(name)
            buf = mx.zeros((capacity, p.nbytes), dtype=mx.uint8)
            self._buffers[name] = buf
            self.parts[name] = buf.view(PART_DTYPES[p.dtype])
            mx.eval(buf, self.parts[name])
            self.rows[name] = np.array(buf, copy=False)
        # bytes that are read but not kept (padding, parts not asked for) land here: sized
        # by the largest such piece of a layout asked for (a record's padding is under a
        # page; a whole record per matrix was 142 MB of the 48-layer MoE benchmark's memory)
        self.scratch = memoryview(bytearray(0))
        self._flat = {name: memoryview(rows).cast("B") for name, rows in self.rows.items()}
        self._pieces: dict[tuple[str, ...], list[tuple[int, str | None]]] = {}

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows.values())

    def span(self, parts: Sequence[str]) -> tuple[int, int]:
        """Byte range `[start, end)` of a record that covers tensors `parts` (all of them: the
        whole record, padding included, so adjacent records read as one)."""
        if set(parts) == set(self.family.tensors):
            return 0, self.family.record_bytes
        return self.family.part_span(self.family.expand(parts))

    def _layout(self, parts: tuple[str, ...]) -> list[tuple[int, str | None]]:
        """The pieces of a record's span for `parts`: (bytes, part receiving them or None)."""
        start, end = self.span(parts)
        wanted = set(self.family.expand(parts))
        pieces: list[tuple[int, str | None]] = []
        position = start
        for p in sorted(self.family.parts, key=lambda p: p.offset):
            a, b = p.offset, p.offset + p.nbytes
            if a < start or b > end:
                continue
            if a > position:
                pieces.append((a - position, None))
            pieces.append((b - a, p.name if p.name in wanted else None))
            position = b
        if end > position:
            pieces.append((end - position, None))
        missing = {name for _, name in pieces if name} - set(self.rows)
        if missing:
            raise ValueError(f"this matrix holds no part {sorted(missing)}")
        unkept = max((length for length, name in pieces if name is None), default=0)
        if unkept > len(self.scratch):
            self.scratch = memoryview(bytearray(unkept))
        return pieces

    def iovecs(self, first_slot: int, count: int, parts: Sequence[str]) -> list[memoryview]:
        """The read targets, in file order, for the span of `parts` of `count` records that lie
        one after another on disk and land in rows `first_slot`, `first_slot + 1`, ...: one
        buffer when the span is a single part (those rows are contiguous), else one per piece
        of each record."""
        key = tuple(parts)
        pieces = self._pieces.get(key)
        if pieces is None:
            pieces = self._pieces[key] = self._layout(key)
        flat, scratch = self._flat, self.scratch
        if len(pieces) == 1 and pieces[0][1] is not None:
            length, name = pieces[0]
            return [flat[name][first_slot * length:(first_slot + count) * length]]
        out = []
        for s in range(first_slot, first_slot + count):
            for length, name in pieces:
                out.append(flat[name][s * length:(s + 1) * length] if name else scratch[:length])
        return out

    def move_rows(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy rows `src` onto rows `dst` (disjoint), in every part, in place (a few rows at a
        time: NumPy stages what it gathers, and a large stage would count in memory)."""
        for rows in self.rows.values():
            for i in range(0, len(src), 64):
                rows[dst[i:i + 64]] = rows[src[i:i + 64]]

    def buffer_address(self, part: str) -> int:
        """Address of a part matrix's memory (to check it is never reallocated)."""
        return self.rows[part].__array_interface__["data"][0]
