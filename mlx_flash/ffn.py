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

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .arch import FFNSpec
from .bundle import Bundle
from .engine import Engine
from .eviction import Window
from .flash_io import wait_all
from .memory import MemoryPlan, staging_rows
from .neuron_cache import NeuronCache
from .neuron_matrix import NeuronMatrix
from .selection import LayerReads, Mode, Rows

Observer = Callable[[int, mx.array, LayerReads], None]
CacheKey = tuple[int, str, tuple[str, ...]]  # (layer, record family, parts)


class FlashEngine(Engine):
    """Serves every FlashFFN of one model from the bundle's records, with a selection mode."""

    unit = "neurons"

    def __init__(self, bundle: Bundle, spec: FFNSpec, mode: Mode, compute_dtype: mx.Dtype,
                 plan: MemoryPlan, window: int = 5, threads: int = 1,
                 cold: bool = False, use_mmap: bool = False, lookahead: bool = False):
        super().__init__(bundle, plan, compute_dtype, threads, cold, use_mmap)
        self.spec, self.mode = spec, mode
        self.dense = Mode(spec, bundle.families)
        self.families = bundle.families
        # One staging matrix per record family, shared by all layers: records are read into
        # it, used, and released (their output evaluated) before the next read over them.
        # Prefill streams each layer through it (in slices when it is smaller than a layer),
        # and so do reads that a cache has no room for.
        self.matrices = {name: NeuronMatrix(fam, staging_rows(fam))
                         for name, fam in self.families.items()}
        self._slots = np.arange(max(fam.count for fam in self.families.values()))
        self.dense.rows_per_fetch = mode.rows_per_fetch = self.matrices["neuron"].capacity
        self.n_layers = len(self.families["neuron"].segments)
        # the first layer this engine serves, where a token is counted and the caches' clock
        # advances: 0, or a pipeline rank's first (`pipeline.RankView` empties the others)
        self.first_layer = next((i for i, (_, size) in enumerate(
            self.families["neuron"].segments) if size), 0)
        for (family, parts), per_layer in plan.capacity.items():
            fam = self.families[family]
            for layer, rows in enumerate(per_layer[:self.n_layers]):
                if rows > 0:
                    self.caches[(layer, family, parts)] = NeuronCache(
                        fam, parts, rows, Window(fam.count, rows, window))
        self.fill(self.caches, lambda key: key[0])
        self._pending: list = []  # staging reads started ahead in this layer (fetch(ahead=))
        # decoding, the next layer's likely records are read into its cache while its
        # attention computes (modes that can guess them: Mode.upcoming)
        self.lookahead = lookahead
        self.dense_prefill = True  # evaluate turns this off to score each token's selection
        self.observer: Observer | None = None  # sees every layer's input and reads (evaluate)
        self._decoding = False
        self._token = 0  # decode tokens so far (the caches' clock)

    @property
    def selection(self) -> str:
        return self.mode.name

    def __call__(self, layer: int, x: mx.array, down_bias: mx.array | None) -> mx.array:
        mx.eval(x)  # this layer's attention: what was read ahead for it reads meanwhile
        flat = x.reshape(-1, x.shape[-1])
        self._decoding = flat.shape[0] == 1
        phase = self.stats.decode if self._decoding else self.stats.prefill
        self.await_ahead(layer, phase)
        if layer == self.first_layer:
            phase.tokens += flat.shape[0]
            self._token += self._decoding
        mode = self.dense if not self._decoding and self.dense_prefill else self.mode
        with self.measure(phase):
            try:
                y, reads = mode(layer, flat, self.fetch)
            finally:  # a read ahead still running when the layer fails would land in later reads
                wait_all(self._pending)
                self._pending.clear()
            y = y.reshape(x.shape) if down_bias is None else y.reshape(x.shape) + down_bias
            mx.eval(y, *([reads.bytes] if isinstance(reads.bytes, mx.array) else []))
        reads.bytes = np.array(reads.bytes)
        phase.needed_bytes += int(reads.bytes.sum())
        if self.observer is not None:
            self.observer(layer, flat, reads)
        if self.lookahead and self._decoding and layer + 1 < self.n_layers:
            self._start_upcoming(layer + 1, flat)
        return y

    def fetch(self, layer: int, family: str, parts: Sequence[str], ids: np.ndarray,
              ahead: bool = False) -> Rows | Callable[[], Rows] | None:
        """Parts `parts` of records `ids` (sorted) of `family` for `layer`, as Rows.

        Decoding, they come from the layer's cache (reading only the records new to it);
        otherwise, and for what the cache has no room for, from the staging matrix. They are
        views valid until the next fetch of the same part: evaluate what depends on them
        first, or copy them. `ahead`: when they go to the staging matrix, start reading them
        in the background and return a function that waits for them; else return None."""
        cache = self.caches.get((layer, family, tuple(parts)))
        if cache is not None and cache.complete:  # holds every record, read at load
            if ahead:
                return None
            cache.stats.hits += len(ids) if self._decoding else 0
            return self._rows(cache, ids)
        if cache is not None and self._decoding:
            return None if ahead else self._from_window(cache, layer, family, parts, ids)
        # a prompt streams through the staging matrix, past partial caches
        return self._from_staging(layer, family, parts, ids, ahead)

    def _rows(self, cache: NeuronCache, ids: np.ndarray) -> Rows:
        fam = cache.matrix.family
        return Rows(ids, cache.matrix.parts, cache.slot_of[ids], self.compute_dtype,
                    fam.quantization)

    def _from_window(self, cache: NeuronCache, layer: int, family: str, parts: Sequence[str],
                     ids: np.ndarray) -> Rows:
        """The paper's decode step: admit (the window drops what no recent token used), read
        what is new into the rows admission gave it, compute where the rows lie."""
        load, slots, spill = self.admit(cache, ids, self._token)
        if len(spill) > self.matrices[family].capacity:
            cache.evict(load)  # admitted for this token, never to be read
            raise RuntimeError(f"a token needs {len(spill)} more {family} records than its "
                               "cache holds, more than the staging matrix takes: raise the "
                               "budget")
        self.read_admitted(cache, layer, load, slots)
        if len(spill) == 0:
            return self._rows(cache, ids)
        # no room for all: what is in the cache and what was read past it, joined in record
        # order (the order every product takes them in)
        cached = self._rows(cache, ids[cache.slot_of[ids] >= 0])
        past = self._read_staging(layer, family, parts, spill)
        fam = self.families[family]
        joined = {p: mx.concatenate([cached.raw(p), past.raw(p)]) for p in fam.expand(parts)}
        both = np.concatenate([cached.ids, spill])
        order = np.argsort(both, kind="stable")
        return Rows(both[order], joined, order, self.compute_dtype, fam.quantization)

    def _from_staging(self, layer: int, family: str, parts: Sequence[str], ids: np.ndarray,
                      ahead: bool) -> Rows | Callable[[], Rows] | None:
        """Records read into the staging matrix, past any cache (`ahead`: in the background,
        when a whole layer fits it)."""
        staging = self.matrices[family]
        if ahead and (staging.capacity < self.families[family].count or len(ids) == 0):
            return None
        if len(ids) > staging.capacity:
            raise RuntimeError(f"{len(ids)} {family} records do not fit the staging matrix "
                               f"({staging.capacity} rows)")
        self.uncached.spills += len(ids) if self._decoding else 0
        if not ahead:
            return self._read_staging(layer, family, parts, ids)
        future = self._ahead_pool.submit(self._read_staging, layer, family, parts, ids)
        self._pending.append(future)
        return future.result

    def _read_staging(self, layer: int, family: str, parts: Sequence[str], ids: np.ndarray
                      ) -> Rows:
        """Read records `ids` of `family` into its staging matrix, as Rows. When a whole
        layer fits, record i goes to row i and the records that merged reads pass over land in
        their own rows (fewer, larger read buffers); else rows 0, 1, ..."""
        fam, staging = self.families[family], self.matrices[family]
        whole = staging.capacity >= fam.count and len(ids) > 0
        slots = ids if whole else self._slots[:len(ids)]
        self.reader_for(family).read_records(fam, layer, ids, slots, staging, parts,
                                             into_free_rows=whole)
        self.checker.check(family, layer, ids, slots,
                           {n: staging.rows[n] for n in fam.expand(parts)})  # what was read
        return Rows(ids, staging.parts, slots, self.compute_dtype, fam.quantization)

    def _start_upcoming(self, layer: int, x: mx.array) -> None:
        """Guess `layer`'s records on this layer's input and start reading them into its
        cache's free rows (`NeuronCache.admit_guess`: what finds none is not read, and a
        wrong guess evicts nothing)."""
        family, parts = self.mode.cache_keys[0]
        cache = self.caches.get((layer, family, parts))
        if cache is None or cache.complete:
            return
        ids = self.mode.upcoming(layer, x)
        if ids is None or len(ids) == 0:
            return

        def read() -> None:
            load, slots = cache.admit_guess(ids)
            self.read_admitted(cache, layer, load, slots)

        self.start_ahead(layer, read)


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
