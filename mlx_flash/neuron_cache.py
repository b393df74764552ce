"""The preallocated neuron matrix records are read into, and the sliding-window cache on it.

On flash a neuron's record holds all its parts contiguously (gate row, up row, down column),
so one read fetches the neuron. In memory we keep one matrix per part, `[capacity, length]`
each: a vectored read (`preadv`) scatters each record's parts straight into row `slot` of
every part matrix, and the FFN then multiplies contiguous matrices with no copy.

`NeuronCache` keeps, per layer, the neurons used by the last `window` tokens in such a matrix
(the paper's sliding window). Evicting moves the last occupied rows into the freed slots;
loading appends rows after the last occupied one. The matrix is allocated once and never
reallocated or copied whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .bundle import PART_DTYPES, RecordChecker, RecordFamily


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


@dataclass
class CacheStats:
    hits: int = 0  # neurons a token needed that were resident
    loads: int = 0  # neurons read into the cache
    spills: int = 0  # neurons read past the cache (no room)
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        needed = self.hits + self.loads + self.spills
        return self.hits / needed if needed else 0.0

    @classmethod
    def total(cls, stats: Iterable[CacheStats]) -> CacheStats:
        """The sums of several caches' counts."""
        out = cls()
        for s in stats:
            for f in dataclasses.fields(cls):
                setattr(out, f.name, getattr(out, f.name) + getattr(s, f.name))
        return out


class NeuronCache:
    """The neurons (of one record family and parts, for one layer) that the last `window`
    tokens used, held in a NeuronMatrix of `capacity` rows.

    `admit(ids)` for each token: neurons unused for `window` tokens are evicted (unless the
    cache is `complete`: it holds every neuron, and keeps them), the missing ones appended;
    when they do not fit, the least recently used are evicted sooner (the window shrinks for
    this layer), and what still does not fit is left out ("spilled") for the caller to read
    elsewhere.
    """

    def __init__(self, family: RecordFamily, parts: Sequence[str], capacity: int, window: int):
        if window < 1:  # a window of 0 tokens would evict what the token being admitted needs
            raise ValueError(f"a neuron cache keeps the last window >= 1 tokens, not {window}")
        self.matrix = NeuronMatrix(family, capacity, parts)
        self.parts = tuple(parts)
        self.capacity, self.window = capacity, window
        self.slot_of = np.full(family.count, -1, dtype=np.int64)  # neuron id -> slot
        self.neuron_at = np.full(capacity, -1, dtype=np.int64)  # slot -> neuron id
        self.last_used = np.full(family.count, np.iinfo(np.int64).min // 2, dtype=np.int64)
        self.size = 0  # slots 0..size-1 are occupied
        self.stats = CacheStats()

    def read_admitted(self, reader: Any, checker: RecordChecker, layer: int, load: np.ndarray,
                      slots: np.ndarray) -> None:
        """Read the records `admit` has just placed (`load`, into rows `slots`) of `layer`
        with `reader` (a FlashReader), checking them with `checker`. Rows whose bytes did not
        all arrive, or fail their checksum, are not left resident."""
        fam = self.matrix.family
        try:
            reader.read_records(fam, layer, load, slots, self.matrix, self.parts)
            checker.check(fam.name, layer, load, slots, self.matrix.rows)
        except BaseException:
            self.evict(load)
            raise

    @staticmethod
    def index_bytes(count: int, capacity: int) -> int:
        """Memory of the index arrays above (int64): slot_of and last_used per neuron,
        neuron_at per slot. With many layers it counts (82 layers of 16384 neurons: 22 MB)."""
        return 8 * (2 * count + capacity)

    def evict(self, neurons: np.ndarray) -> None:
        """Remove resident `neurons`: rows after the new end move into the freed slots."""
        if len(neurons) == 0:
            return
        holes = self.slot_of[neurons]
        new_size = self.size - len(holes)
        tail = np.arange(new_size, self.size)
        movers = tail[~np.isin(tail, holes)]  # occupied rows past the new end
        targets = np.sort(holes[holes < new_size])  # freed rows before it
        self.slot_of[neurons] = -1
        if len(movers):
            self.matrix.move_rows(movers, targets)
            moved = self.neuron_at[movers]
            self.neuron_at[targets] = moved
            self.slot_of[moved] = targets
        self.neuron_at[new_size:self.size] = -1
        self.size = new_size
        self.stats.evictions += len(neurons)

    def admit(self, ids: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Account token number `t` (counting up; one token may admit several times) needing
        `ids` (sorted). Returns (load_ids, load_slots, spill_ids): the records to read into
        which rows, and those left out. Afterwards every id not spilled is resident."""
        present = self.slot_of[ids] >= 0
        self.stats.hits += int(present.sum())
        missing = ids[~present]
        self.make_room(ids, len(missing), t)
        room = self.capacity - self.size
        load, spill = missing[:room], missing[room:]
        slots = np.arange(self.size, self.size + len(load))
        self.slot_of[load] = slots
        self.neuron_at[slots] = load
        self.size += len(load)
        self.stats.loads += len(load)
        self.stats.spills += len(spill)
        return load, slots, spill

    def make_room(self, ids: np.ndarray, missing: int, t: int) -> None:
        """Before token `t`'s `missing` records of `ids` are appended: evict those unused for
        `window` tokens, and, when they still do not fit, the least recently used that this
        token does not need (the window shrinks for this layer)."""
        self.last_used[ids] = t
        if not self.complete:
            resident = self.neuron_at[:self.size]
            self.evict(resident[self.last_used[resident] <= t - self.window])
        short = missing - (self.capacity - self.size)
        if short > 0:
            resident = self.neuron_at[:self.size]
            older = resident[self.last_used[resident] < t]
            self.evict(older[np.argsort(self.last_used[older], kind="stable")[:short]])

    @property
    def complete(self) -> bool:
        """Room for every neuron: nothing needs evicting, ever."""
        return self.capacity >= len(self.slot_of)

    def resident(self) -> dict[int, int]:
        """{neuron id: slot} of what is held (for checks)."""
        return {int(n): s for s, n in enumerate(self.neuron_at[:self.size])}
