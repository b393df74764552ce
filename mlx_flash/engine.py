"""What the dense and the expert engines share, so that each keeps only its algorithm.

An engine serves the FFNs (or the routed experts) of one model from a bundle's records: it
holds one reader per record file and the records' checksums, the per-layer caches and their
statistics, the statistics of each phase (prefill, decode), and one read ahead in the
background at a time. Its subclasses (mlx_flash.ffn.FlashEngine, mlx_flash.moe.ExpertEngine)
write `__call__` as the paper's loop: select, read what is missing into the preallocated
matrix, compute where the rows lie; the clock stays out of it (`measure`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .bundle import Bundle
from .expert_index import SourceModel
from .flash_io import FlashReader, RecordChecker, wait_all
from .memory import MemoryPlan
from .neuron_cache import CacheStats, NeuronCache
from .piece_io import PieceReader


@dataclass
class PhaseStats:
    """What an engine did in one phase (prefill or decode)."""

    tokens: int = 0
    bytes: int = 0  # read from flash
    records_read: int = 0  # records (neurons, experts) read into a cache
    needed_bytes: int = 0  # what the tokens' selections needed, summed over tokens (dense)
    io_seconds: float = 0.0  # waiting for records to be read
    ahead_seconds: float = 0.0  # reading ahead in the background, while attention computes
    mem_seconds: float = 0.0  # cache bookkeeping: evictions (row moves), admissions
    ffn_seconds: float = 0.0  # the rest of the FFN: selection, compute, checking what was read
    check_seconds: float = 0.0  # of ffn_seconds: checking the records read (their CRC32s)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


@dataclass
class EngineStats:
    prefill: PhaseStats = field(default_factory=PhaseStats)
    decode: PhaseStats = field(default_factory=PhaseStats)

    def reset(self) -> None:
        self.prefill, self.decode = PhaseStats(), PhaseStats()


class Engine:
    """Readers, checksums, caches, statistics and reading ahead, for one model's bundle.

    `selection` names what chooses the records (a selection mode, or the router's experts);
    `unit` what a record is, for people ("neurons", "experts"). `runtime_rss` is set by
    `mlx_flash.load`: the process's memory before the model.
    """

    selection: str
    unit: str

    def __init__(self, bundle: Bundle, plan: MemoryPlan, compute_dtype: mx.Dtype,
                 threads: int, cold: bool, use_mmap: bool):
        self.bundle, self.plan, self.compute_dtype = bundle, plan, compute_dtype
        files = sorted({fam.file for fam in bundle.families.values()})
        if isinstance(bundle, SourceModel):  # experts read in place from the model's files
            self.readers = {f: PieceReader(bundle, threads, cold, use_mmap) for f in files}
        else:
            self.readers = {f: FlashReader(bundle.path / f, threads=threads, cold=cold,
                                           use_mmap=use_mmap) for f in files}
        self.checker = RecordChecker(bundle)  # every record read, against its CRC32
        self.caches: dict[Any, NeuronCache] = {}
        # decode tokens' records read past any cache: spills, so that the hit rate is over
        # every record a decode token needed
        self.uncached = CacheStats()
        self.stats = EngineStats()
        self.read_ahead = 0  # records read ahead
        self.runtime_rss = 0
        self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="flash-ahead")
        self._ahead: tuple[int, Future] | None = None  # (layer it reads for, its read)
        self._mem_seconds = 0.0

    @property
    def read_calls(self) -> int:
        return sum(r.counters.calls for r in self.readers.values())

    def cache_stats(self) -> CacheStats:
        return CacheStats.total([*(c.stats for c in self.caches.values()), self.uncached])

    def reader_for(self, family: str) -> FlashReader:
        return self.readers[self.bundle.families[family].file]

    def _read_totals(self) -> tuple[int, float, int, float]:
        """(bytes, seconds, records) the readers have read so far, and the seconds spent
        checking them."""
        counters = [r.counters for r in self.readers.values()]
        return (sum(c.bytes for c in counters), sum(c.seconds for c in counters),
                sum(c.records for c in counters), self.checker.seconds)

    def admit(self, cache: NeuronCache, ids: np.ndarray, t: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`cache.admit`, its time counted as cache management."""
        t0 = time.perf_counter()
        try:
            return cache.admit(ids, t)
        finally:
            self._mem_seconds += time.perf_counter() - t0

    def read_admitted(self, cache: NeuronCache, layer: int, load: np.ndarray,
                      slots: np.ndarray) -> None:
        """Read what `admit` placed, checked; on failure nothing of it stays resident."""
        cache.read_admitted(self.reader_for(cache.matrix.family.name), self.checker, layer,
                            load, slots)

    def fill(self, caches: dict[Any, NeuronCache], layer_of: Callable[[Any], int]) -> None:
        """Read every record into the complete caches among `caches` (the model fits: its
        records are read once, here); what tokens then find there counts as hits."""
        for key, cache in caches.items():
            if cache.complete:
                load, slots, _ = cache.admit(np.arange(len(cache.slot_of)), 0)
                self.read_admitted(cache, layer_of(key), load, slots)
                cache.stats = CacheStats()

    @contextmanager
    def measure(self, phase: PhaseStats) -> Iterator[None]:
        """Count into `phase` what the block reads (bytes, and the seconds spent reading),
        the cache management it does, and the rest of its time as FFN compute (checking the
        records read included, counted apart too)."""
        t0 = time.perf_counter()
        read0, io0, records0, check0 = self._read_totals()
        self._mem_seconds = 0.0
        yield
        read1, io1, records1, check1 = self._read_totals()
        phase.bytes += read1 - read0
        phase.records_read += records1 - records0
        phase.io_seconds += io1 - io0
        phase.check_seconds += check1 - check0
        phase.mem_seconds += self._mem_seconds
        phase.ffn_seconds += time.perf_counter() - t0 - (io1 - io0) - self._mem_seconds

    def start_ahead(self, layer: int, read: Callable[[], None]) -> None:
        """Run `read` (which reads records for `layer` into its cache) in the background
        until `await_ahead(layer)`: nothing may touch that cache before. The main thread
        reads nothing meanwhile (it computes attention), so what the readers count is its.
        A read ahead never awaited (a forward pass that failed between) is waited for first:
        the two may write the same rows."""
        if self._ahead is not None:
            wait_all([self._ahead[1]])
        def timed() -> tuple[int, int, float]:
            t0 = time.perf_counter()
            read0, _, records0, _ = self._read_totals()
            read()
            read1, _, records1, _ = self._read_totals()
            return records1 - records0, read1 - read0, time.perf_counter() - t0

        self._ahead = (layer, self._ahead_pool.submit(timed))

    def await_ahead(self, layer: int, phase: PhaseStats) -> bool:
        """Wait for what was read ahead for `layer`, if anything was, counting it in `phase`
        (the wait as I/O: a stall). A read ahead that failed left nothing in the cache: the
        layer reads what it needs itself. Whether anything had been read ahead."""
        if self._ahead is None or self._ahead[0] != layer:
            return False
        future = self._ahead[1]
        self._ahead = None
        t0 = time.perf_counter()
        wait_all([future])
        phase.io_seconds += time.perf_counter() - t0
        error = future.exception()
        if error is not None:
            if not isinstance(error, Exception):  # Ctrl-C and the like: not ours to swallow
                raise error
            return False
        records, read, seconds = future.result()
        self.read_ahead += records
        phase.bytes += read
        phase.ahead_seconds += seconds
        return True
