"""Reads of FFN records from the bundle's ffn.bin, straight into caller-owned rows.

Records that are adjacent on disk are read with one positional read (`os.preadv`), landing
directly in consecutive destination rows: no intermediate buffer, no copy. Counters tell how
many bytes, records and read calls were issued and how long they took.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .bundle import BundleError
from .neuron_cache import NeuronMatrix

IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


@dataclass
class ReadCounters:
    bytes: int = 0
    records: int = 0
    calls: int = 0
    seconds: float = 0.0


def coalesce(ids: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted record ids into runs of consecutive ids: [(first_index, run_length)]."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(ids)]))
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class FlashReader:
    """Positional reads of fixed-size records from one file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.counters = ReadCounters()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()

    def read_vectored(self, offset: int, iovecs: list[memoryview]) -> None:
        """Fill `iovecs` in order with the file's bytes from `offset` (several preadv calls
        when there are more buffers than one call takes, or the kernel returns short)."""
        pending = iovecs
        while pending:
            batch = pending[:IOV_MAX]
            want = sum(len(b) for b in batch)
            n = os.preadv(self.fd, batch, offset)
            self.counters.calls += 1
            self.counters.bytes += n
            if n == 0:
                raise BundleError(f"{self.path} ends at byte {offset}: the bundle is truncated")
            offset += n
            if n == want:
                pending = pending[IOV_MAX:]
                continue
            # short read: skip the filled buffers, trim the partly filled one
            for i, b in enumerate(batch):
                if n < len(b):
                    pending = [b[n:]] + pending[i + 1:]
                    break
                n -= len(b)

    def read_records(self, base: int, ids: np.ndarray, slots: np.ndarray,
                     matrix: NeuronMatrix) -> None:
        """Read records `ids` (sorted) of the segment at `base` into rows `slots` of `matrix`.

        Runs of consecutive ids are one read each, scattered into the part matrices.
        """
        t0 = time.perf_counter()
        record_bytes = matrix.family.record_bytes
        for start, length in coalesce(ids):
            self.read_vectored(base + int(ids[start]) * record_bytes,
                               matrix.iovecs(slots[start:start + length]))
        self.counters.records += len(ids)
        self.counters.seconds += time.perf_counter() - t0
