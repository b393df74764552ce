"""A per-layer cache of records (FFN neurons, or MoE experts) in a preallocated matrix, with
a pluggable eviction policy (mlx_flash.eviction).

The paper's sliding window (the dense engine's caches) and the expert policies are policies
of the one cache: each token `admit`s what it needs, the policy names what to drop and what
makes room, evicting moves the last occupied rows into the freed slots, and loading appends
rows after the last occupied one. The matrix is allocated once and never reallocated or
copied whole; records land in their rows by a vectored read (mlx_flash.flash_io).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .bundle import RecordFamily
from .eviction import Policy
from .flash_io import FlashReader, RecordChecker
from .neuron_matrix import NeuronMatrix


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
    """Records of one family (their tensors `parts`) for one layer, held in a NeuronMatrix of
    `capacity` rows; `policy` chooses which to drop and which make room.

    `admit(ids, t)` for each token t: what the policy expires is evicted (unless the cache is
    `complete`: it holds every record, and keeps them), then, when the missing ones do not
    fit, the policy's victims; the missing ones are appended, and what still does not fit is
    left out ("spilled") for the caller to read elsewhere.
    """

    def __init__(self, family: RecordFamily, parts: Sequence[str], capacity: int,
                 policy: Policy):
        self.matrix = NeuronMatrix(family, capacity, parts)
        self.parts = tuple(parts)
        self.capacity = capacity
        self.policy = policy
        self.slot_of = np.full(family.count, -1, dtype=np.int64)  # record id -> slot
        self.neuron_at = np.full(capacity, -1, dtype=np.int64)  # slot -> record id
        self.size = 0  # slots 0..size-1 are occupied
        self.stats = CacheStats()
        # records read ahead on a guess (`admit_guess`), not yet needed by a token
        self.guessed = np.zeros(family.count, dtype=bool)

    @staticmethod
    def index_bytes(count: int, capacity: int) -> int:
        """Memory of the index arrays above (int64): slot_of per record, neuron_at per slot
        (the policy's state comes on top: `Policy.state_bytes`). With many layers it counts
        (82 layers of 16384 neurons: 11 MB)."""
        return 8 * (count + capacity)

    @property
    def complete(self) -> bool:
        """Room for every record: nothing needs evicting, ever."""
        return self.capacity >= len(self.slot_of)

    def resident(self) -> dict[int, int]:
        """{record id: slot} of what is held (for checks)."""
        return {int(n): s for s, n in enumerate(self.neuron_at[:self.size])}

    def admit(self, ids: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Account token number `t` (counting up; one token may admit several times) needing
        `ids` (sorted). Returns (load_ids, load_slots, spill_ids): the records to read into
        which rows, and those left out. Afterwards every id not spilled is resident.

        Records read on a guess (`admit_guess`) are no part of it: those `ids` holds become
        the token's own (loads, not hits), the others are the first to make room, uncounted,
        so that the policy's residents, evictions and hits are those of a cache never
        guessed into."""
        used = ids[self.guessed[ids]]
        self.guessed[used] = False
        present = self.slot_of[ids] >= 0
        missing = ids[~present]
        if not self.complete:  # what the token needs stays, however old
            stale = self.policy.expire(self.kept(), t)
            self.evict(stale[~np.isin(stale, ids)])
        short = len(missing) - (self.capacity - self.size)
        if short > 0:
            guesses = self.neuron_at[:self.size][self.guessed[self.neuron_at[:self.size]]]
            self.evict(guesses[:short], counted=False)
            short -= min(short, len(guesses))
        if short > 0:
            self.evict(self.policy.victims(self.kept(), short, t, ids))
        load = missing[:self.capacity - self.size]
        spill = missing[len(load):]
        slots = np.arange(self.size, self.size + len(load))
        self.slot_of[load] = slots
        self.neuron_at[slots] = load
        self.size += len(load)
        self.policy.touch(ids[self.slot_of[ids] >= 0], t)
        self.stats.loads += len(load) + len(used)  # a guess used was read for this token
        self.stats.hits += int(present.sum()) - len(used)
        self.stats.spills += len(spill)
        return load, slots, spill

    def kept(self) -> np.ndarray:
        """The policy's residents: those held, less records read on a guess."""
        held = self.neuron_at[:self.size]
        return held[~self.guessed[held]]

    def admit_guess(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Place records `ids` (sorted) that a guess says the next token needs into free rows
        only, never evicting and never telling the policy; they stay there, outside it,
        until a token needs them or `admit` needs their rows. Returns (load_ids,
        load_slots) to read."""
        load = ids[self.slot_of[ids] < 0][:self.capacity - self.size]
        slots = np.arange(self.size, self.size + len(load))
        self.slot_of[load] = slots
        self.neuron_at[slots] = load
        self.size += len(load)
        self.guessed[load] = True
        return load, slots

    def evict(self, ids: np.ndarray, counted: bool = True) -> None:
        """Remove resident `ids`: rows after the new end move into the freed slots."""
        if len(ids) == 0:
            return
        self.guessed[ids] = False
        holes = self.slot_of[ids]
        new_size = self.size - len(holes)
        tail = np.arange(new_size, self.size)
        movers = tail[~np.isin(tail, holes)]  # occupied rows past the new end
        targets = np.sort(holes[holes < new_size])  # freed rows before it
        self.slot_of[ids] = -1
        if len(movers):
            self.matrix.move_rows(movers, targets)
            moved = self.neuron_at[movers]
            self.neuron_at[targets] = moved
            self.slot_of[moved] = targets
        self.neuron_at[new_size:self.size] = -1
        self.size = new_size
        self.stats.evictions += len(ids) if counted else 0

    def read_admitted(self, reader: FlashReader, checker: RecordChecker, layer: int,
                      load: np.ndarray, slots: np.ndarray) -> None:
        """Read the records `admit` has just placed (`load`, into rows `slots`) of `layer`
        with `reader`, checking them with `checker`. Rows whose bytes did not all arrive, or
        fail their checksum, are not left resident."""
        fam = self.matrix.family
        try:
            reader.read_records(fam, layer, load, slots, self.matrix, self.parts)
            checker.check(fam.name, layer, load, slots, self.matrix.rows)
        except BaseException:
            self.evict(load)
            raise
