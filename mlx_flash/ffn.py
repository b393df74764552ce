"""The FFN that mlx-lm's layers call: neuron records come from flash, not from memory.

Per call and layer the engine (1) finishes the pending graph, so the layer input is known and
no earlier computation still reads the neuron matrices; (2) lets the selection mode decide
which records (and which of their parts) the tokens need, and gets them: a decode token from
its layer's sliding-window cache, reading only what is new to the window; a prompt (prefill)
streams the whole layer through one staging matrix and is computed densely; (3) computes the
FFN over them, and (4) evaluates the result before the next layer reads over the staging
matrix. With selection "off" and no budget every record is read every token: the paper's naive
engine; with "off" and a budget, what fits stays cached and the rest is read: its hybrid.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .arch import FFNSpec
from .bundle import Bundle, RecordChecker, RecordFamily
from .flash_io import FlashReader, wait_all
from .memory import MemoryPlan
from .neuron_cache import CacheStats, NeuronCache, NeuronMatrix
from .selection import LayerReads, Mode, Rows


@dataclass
class PhaseStats:
    """What the FFN engine did in one phase (prefill or decode)."""

    tokens: int = 0
    bytes: int = 0  # read from flash
    needed_bytes: int = 0  # what the tokens' selections needed, summed over tokens
    io_seconds: float = 0.0  # waiting for records to be read
    ahead_seconds: float = 0.0  # reading ahead in the background, while attention computes
    mem_seconds: float = 0.0  # cache bookkeeping: evictions (row moves), admissions
    ffn_seconds: float = 0.0  # the rest of the FFN: selection and compute

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


@dataclass
class EngineStats:
    prefill: PhaseStats = field(default_factory=PhaseStats)
    decode: PhaseStats = field(default_factory=PhaseStats)

    def reset(self) -> None:
        self.prefill, self.decode = type(self.prefill)(), type(self.decode)()


Observer = Callable[[int, mx.array, LayerReads], None]
STAGING_BYTES = 16 * 2**20  # a staging matrix holds a whole layer, or this much of one


def staging_rows(family: RecordFamily) -> int:
    return min(family.count, max(1, STAGING_BYTES // family.record_bytes))


class FlashEngine:
    """Serves every FlashFFN of one model from the bundle's records, with a selection mode."""

    def __init__(self, bundle: Bundle, spec: FFNSpec, mode: Mode, compute_dtype: mx.Dtype,
                 plan: MemoryPlan | None = None, window: int = 5, threads: int = 1,
                 cold: bool = False, use_mmap: bool = False, lookahead: bool = False):
        self.bundle = bundle
        self.spec = spec
        self.mode = mode
        self.dense = Mode(spec, bundle.families)
        self.compute_dtype = compute_dtype
        self.families = bundle.families
        self.plan = plan
        self.window = window
        self.readers = {f: FlashReader(bundle.path / f, threads=threads, cold=cold,
                                       use_mmap=use_mmap)
                        for f in sorted({fam.file for fam in self.families.values()})}
        self.reader = self.readers[self.families["neuron"].file]
        self.checker = RecordChecker(bundle)  # each record's CRC32, the first time it is read
        # One staging matrix per record family, shared by all layers: records are read into
        # it, used, and released (their output evaluated) before the next read over them.
        # Prefill streams each layer through it (in slices when it is smaller than a layer),
        # and so do reads that a cache has no room for.
        self.matrices = {name: NeuronMatrix(fam, staging_rows(fam))
                         for name, fam in self.families.items()}
        self._slots = np.arange(max(fam.count for fam in self.families.values()))
        self.dense.rows_per_fetch = self.matrices["neuron"].capacity
        mode.rows_per_fetch = self.matrices["neuron"].capacity
        n_layers = len(self.families["neuron"].segments)
        self.caches: dict[tuple[int, str, tuple[str, ...]], NeuronCache] = {}
        for (family, parts), per_layer in (plan.capacity.items() if plan else ()):
            for layer, rows in enumerate(per_layer[:n_layers]):
                if rows > 0:
                    self.caches[(layer, family, parts)] = NeuronCache(
                        self.families[family], parts, rows, window)
        for (layer, family, _), cache in self.caches.items():
            if cache.complete:  # the model fits: its records are read once, here
                load, slots, _ = cache.admit(np.arange(self.families[family].count), 0)
                self._read_admitted(cache, layer, family, load, slots)
                cache.stats = CacheStats()  # the hit rate counts what tokens needed
        # decode tokens' records read in layers without a cache: past any cache, they count
        # as spills (so the hit rate is over every record a decode token needed)
        self.uncached = CacheStats()
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="flash-ahead")  # fetch(ahead=)
        self._pending: list[Future] = []  # reads ahead started in this layer
        # decoding, the next layer's likely records are read into its cache while its
        # attention computes (modes that can guess them: Mode.upcoming)
        self.lookahead = lookahead
        self._lookahead: tuple[int, Future] | None = None
        self.read_ahead = 0  # records read ahead
        self.stats = EngineStats()
        self.dense_prefill = True  # evaluate turns this off to score each token's selection
        self.observer: Observer | None = None  # sees every layer's input and reads (evaluate)
        self._decoding = False
        self._token = 0  # decode tokens so far (the caches' clock)
        self._mem_seconds = 0.0
        self.runtime_rss = 0  # set by mlx_flash.load: process memory before the model
        self._last_read = self._read()  # the counters when the last layer ended

    @property
    def read_calls(self) -> int:
        return sum(r.counters.calls for r in self.readers.values())

    def cache_stats(self) -> CacheStats:
        return CacheStats.total([*(cache.stats for cache in self.caches.values()),
                                 self.uncached])

    def _read(self) -> tuple[int, float]:
        return (sum(r.counters.bytes for r in self.readers.values()),
                sum(r.counters.seconds for r in self.readers.values()))

    def fetch(self, layer: int, family: str, parts: Sequence[str], ids: np.ndarray,
              ahead: bool = False) -> Rows | Callable[[], Rows] | None:
        """Parts `parts` of records `ids` (sorted) of `family` for `layer`, as Rows.

        Decoding, they come from the layer's cache (reading only the records new to it);
        otherwise, and for what the cache has no room for, from the staging matrix. They are
        views valid until the next fetch of the same part: evaluate what depends on them
        first, or copy them. `ahead`: when they go to the staging matrix, start reading them
        in the background and return a function that waits for them; else return None."""
        fam, staging = self.families[family], self.matrices[family]
        cache = self.caches.get((layer, family, tuple(parts)))
        if cache is not None and cache.complete:  # holds every neuron, read at load
            if ahead:
                return None
            if self._decoding:
                cache.stats.hits += len(ids)
            return Rows(ids, cache.matrix.parts, cache.slot_of[ids], self.compute_dtype,
                        fam.quantization)
        if not self._decoding:
            cache = None  # a prompt streams through the staging matrix, past partial caches
        if ahead:
            if cache is not None or staging.capacity < fam.count or len(ids) == 0:
                return None
            self.uncached.spills += len(ids) if self._decoding else 0
            future = self._ahead.submit(self._read_staging, layer, family, parts, ids)
            self._pending.append(future)
            return future.result
        if cache is None:
            if len(ids) > staging.capacity:
                raise RuntimeError(f"{len(ids)} {family} records do not fit the staging matrix "
                                   f"({staging.capacity} rows)")
            self.uncached.spills += len(ids) if self._decoding else 0
            return self._read_staging(layer, family, parts, ids)
        t0 = time.perf_counter()
        load, slots, spill = cache.admit(ids, self._token)
        self._mem_seconds += time.perf_counter() - t0
        if len(spill) > staging.capacity:
            cache.evict(load)  # admitted for this token, never to be read
            raise RuntimeError(f"a token needs {len(spill)} more {family} records than its "
                               "cache holds, more than the staging matrix takes: raise the "
                               "budget")
        self._read_admitted(cache, layer, family, load, slots)
        cached = ids[cache.slot_of[ids] >= 0]
        rows = Rows(cached, cache.matrix.parts, cache.slot_of[cached], self.compute_dtype,
                    fam.quantization)
        if len(spill) == 0:
            return rows
        # no room for all: what is in the cache and what was read past it, joined in neuron
        # order (the order every product takes them in)
        past = self._read_staging(layer, family, parts, spill)
        joined = {p: mx.concatenate([rows.raw(p), past.raw(p)]) for p in fam.expand(parts)}
        both = np.concatenate([cached, spill])
        order = np.argsort(both, kind="stable")
        return Rows(both[order], joined, order, self.compute_dtype, fam.quantization)

    def _read_staging(self, layer: int, family: str, parts: Sequence[str], ids: np.ndarray
                      ) -> Rows:
        """Read records `ids` of `family` into its staging matrix, as Rows. When a whole
        layer fits, record i goes to row i and the records that merged reads pass over land in
        their own rows (fewer, larger read buffers); else rows 0, 1, ..."""
        fam, staging = self.families[family], self.matrices[family]
        reader = self.readers[fam.file]
        if staging.capacity < fam.count or len(ids) == 0:
            slots = self._slots[:len(ids)]
            reader.read_records(fam, layer, ids, slots, staging, parts)
        else:
            slots = ids
            reader.read_records(fam, layer, ids, slots, staging, parts, into_free_rows=True)
        self.checker.check(family, layer, ids, slots,
                           {n: staging.rows[n] for n in fam.expand(parts)})  # what was read
        return Rows(ids, staging.parts, slots, self.compute_dtype, fam.quantization)

    def _read_admitted(self, cache: NeuronCache, layer: int, family: str, load: np.ndarray,
                       slots: np.ndarray) -> None:
        cache.read_admitted(self.readers[self.families[family].file], self.checker, layer, load,
                            slots)

    def _read_upcoming(self, layer: int, ids: np.ndarray) -> None:
        """Admit records `ids` into `layer`'s cache and read them (in the background: nothing
        touches that cache until `__call__` for `layer` has waited for this)."""
        family, parts = self.mode.cache_keys[0]
        cache = self.caches[(layer, family, parts)]
        counted = dataclasses.replace(cache.stats)  # the token's own admit counts its hits
        load, slots, _ = cache.admit(ids, self._token)  # what finds no room is not read
        cache.stats.hits, cache.stats.spills = counted.hits, counted.spills
        self._read_admitted(cache, layer, family, load, slots)
        self.read_ahead += len(load)

    def _start_upcoming(self, layer: int, x: mx.array) -> None:
        key = (layer, *self.mode.cache_keys[0])
        cache = self.caches.get(key)
        if cache is None or cache.complete:
            return
        ids = self.mode.upcoming(layer, x)
        if ids is not None and len(ids):
            self._lookahead = (layer, self._ahead.submit(self._read_upcoming, layer, ids))

    def _await_upcoming(self, layer: int) -> bool:
        """Wait for what was read ahead for `layer`, if anything was (a failed read ahead left
        nothing in the cache: the layer reads what it needs itself)."""
        if self._lookahead is None or self._lookahead[0] != layer:
            return False
        future = self._lookahead[1]
        self._lookahead = None
        wait_all([future])
        error = future.exception()
        if error is not None and not isinstance(error, Exception):
            raise error
        return True

    def __call__(self, layer: int, x: mx.array, down_bias: mx.array | None) -> mx.array:
        mx.eval(x)  # this layer's attention: what was read ahead for it reads meanwhile
        stall = time.perf_counter()
        waited = self._await_upcoming(layer)
        t0 = time.perf_counter()
        stall = t0 - stall
        read0, io0 = self._read()
        # read since the layer before ended: ahead, in the background
        ahead_bytes, ahead_seconds = (read0 - self._last_read[0], io0 - self._last_read[1]) \
            if waited else (0, 0.0)
        self._mem_seconds = 0.0
        flat = x.reshape(-1, x.shape[-1])
        self._decoding = flat.shape[0] == 1
        if self._decoding and layer == 0:
            self._token += 1
        mode = self.dense if not self._decoding and self.dense_prefill else self.mode
        try:
            y, reads = mode(layer, flat, self.fetch)
        finally:  # a read ahead still running when the layer fails would land in later reads
            wait_all(self._pending)
            self._pending.clear()
        y = y.reshape(x.shape)
        if down_bias is not None:
            y = y + down_bias
        lazy = [reads.bytes] if isinstance(reads.bytes, mx.array) else []
        mx.eval(y, *lazy)
        reads.bytes = np.array(reads.bytes)
        read1, io1 = self._read()
        phase = self.stats.decode if self._decoding else self.stats.prefill
        if layer == 0:
            phase.tokens += flat.shape[0]
        phase.bytes += read1 - read0 + ahead_bytes
        phase.needed_bytes += int(reads.bytes.sum())
        phase.io_seconds += io1 - io0 + stall
        phase.ahead_seconds += ahead_seconds
        phase.mem_seconds += self._mem_seconds
        phase.ffn_seconds += time.perf_counter() - t0 - (io1 - io0) - self._mem_seconds
        if self.observer is not None:
            self.observer(layer, flat, reads)
        if self.lookahead and self._decoding and layer + 1 < len(self.families["neuron"].segments):
            self._start_upcoming(layer + 1, flat)
        self._last_read = read1, io1
        return y


class FlashFFN(nn.Module):
    """Drop-in for an mlx-lm MLP whose weights stay in the bundle until a token needs them."""

    def __init__(self, engine: FlashEngine | None, layer: int, spec: FFNSpec):
        super().__init__()
        self.engine = engine
        self.layer = layer
        if spec.down_bias:
            self.bias = mx.zeros((spec.hidden_size,))

    def __call__(self, x: mx.array) -> mx.array:
        return self.engine(self.layer, x, self.get("bias"))
