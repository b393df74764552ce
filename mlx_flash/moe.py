"""The expert engine: a Mixture-of-Experts model's routed experts read from flash on demand.

Each routed expert is one record (mlx_flash.arch.moe). Per layer the engine keeps a
preallocated expert matrix (slots = experts, `NeuronCache`'s delete-by-swap and append, never
reallocated), reads the experts a call needs that are not in it, and computes each (token,
expert) pair with `gather_mm` / `gather_qmm` on the experts where the slots hold them. A prompt
streams layer by layer: each expert it routes to is read once and multiplies all its tokens
(in groups of what the cache holds when they do not all fit).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .arch.moe import TENSORS
from .bundle import DTYPES, EXPERTS, Bundle
from .engine import Engine
from .eviction import DEFAULT_POLICY, POLICIES
from .memory import MemoryPlan, reserve_prefetch
from .neuron_cache import NeuronCache
from .neuron_matrix import NeuronMatrix


@dataclass
class LookaheadStats:
    """How well the next layer's router, run on this layer's input, guessed its experts."""

    guessed: int = 0  # experts guessed for a layer (read ahead, or found resident)
    needed: int = 0  # experts the layer then routed to
    found: int = 0  # of those, guessed
    unused: int = 0  # experts read ahead that the layer did not route to: wasted reads
    promoted: int = 0  # experts read ahead that the layer then admitted (not read again)

    @property
    def recall(self) -> float:
        return self.found / self.needed if self.needed else 0.0


class ExpertEngine(Engine):
    """Serves every ExpertSwitch of one model from the bundle's expert records."""

    selection = "experts"  # the router's own
    unit = "experts"

    def __init__(self, bundle: Bundle, plan: MemoryPlan, compute_dtype: mx.Dtype,
                 threads: int = 8, cold: bool = False, use_mmap: bool = False,
                 naive: bool = False, lookahead: int = 0, policy: str = DEFAULT_POLICY):
        super().__init__(bundle, plan, compute_dtype, threads, cold, use_mmap)
        self.family = fam = bundle.families[EXPERTS]
        self.naive = naive  # every token reads its experts anew: the naive engine
        # decoding, the next layer's likely experts (its router's top `lookahead` on this
        # layer's input) that its cache lacks are read into a prefetch area while this layer
        # and the next one's attention compute: a few of the plan's slots, lent by the caches
        rows = reserve_prefetch(plan, min(lookahead, plan.experts[2])) if lookahead else 0
        self.prefetch = NeuronMatrix(fam, rows, fam.tensors) if rows else None
        self._prefetched: tuple[int, np.ndarray] | None = None  # (layer, experts) in it
        self._arrived = threading.Event()  # the layer read ahead for has come: stop reading
        for layer, n in enumerate(plan.capacity[(EXPERTS, fam.tensors)]):
            if n:
                self.caches[layer] = NeuronCache(fam, fam.tensors, n,
                                                 POLICIES[policy](fam.count, n))
        self.shapes: dict[int, dict[str, tuple[int, int]]] = {}
        self._clock = dict.fromkeys(self.caches, 0)  # each cache's admissions: its clock
        # the k likeliest guesses at most: past them few are routed to (on the trained
        # fixture 52 of 350 more reads ahead were used at 8 slots; on the benchmark's model
        # none), and each read ahead that is not delays the layer's own reads
        self.lookahead = min(lookahead, plan.experts[2])
        self.routers: dict[int, Any] = {}  # layer -> its router (open_moe_model sets them)
        self.next_layer = dict(zip(sorted(self.caches), sorted(self.caches)[1:], strict=False))
        self.guessed: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # layer -> guess, read
        self.lookahead_stats = LookaheadStats()
        # floats stored in the compute dtype: gather_mm / gather_qmm take the cache's slots
        self._in_place = all(p.dtype == "uint32" or DTYPES[p.dtype] == compute_dtype
                             for p in fam.parts)
        if plan.whole:  # the model fits: every expert is read once, here
            self.fill(self.caches, lambda layer: layer)

    def __call__(self, layer: int, x: mx.array, indices: mx.array,
                 activation: nn.Module) -> mx.array:
        decoding = indices.size == indices.shape[-1]
        ahead = self.next_layer.get(layer) if self.lookahead and decoding else None
        scores = self._guess_scores(ahead, x) if ahead is not None else ()
        # the one synchronisation of the layer: its router has chosen (its experts can be
        # read), and the next layer's router has guessed (its experts can be read ahead)
        mx.eval(x, indices, *scores)
        phase = self.stats.decode if decoding else self.stats.prefill
        self._arrived.set()  # what is not read ahead by now, the layer reads itself
        self.await_ahead(layer, phase)
        with self.measure(phase):
            y = self._routed(layer, x, indices, activation)
        if layer == min(self.caches):
            phase.tokens += indices.size // indices.shape[-1]
        if scores:  # read while this layer's experts and the next one's attention compute
            self._start_ahead(ahead, self._ranked(scores))
        return y

    def _routed(self, layer: int, x: mx.array, indices: mx.array, activation: nn.Module
                ) -> mx.array:
        """SwitchGLU's output: each token through its k experts, read where missing."""
        cache, k = self.caches[layer], indices.shape[-1]
        pairs = np.array(indices).reshape(-1)
        order = np.argsort(pairs, kind="stable")  # pairs grouped by expert
        by_expert = pairs[order]
        xs = x.reshape(-1, 1, x.shape[-1]).astype(self.compute_dtype)
        ids = np.unique(pairs)
        self._score_guess(layer, ids)
        outputs = []
        for g in range(0, len(ids), cache.capacity):  # prefill: in groups the cache holds
            group = ids[g:g + cache.capacity]
            self._admit(layer, group)
            # k experts at a time: the plan's working memory holds the float copies of a
            # token's k (a prompt's group of `capacity` went past the budget)
            for s in range(0, len(group), k):
                lo = np.searchsorted(by_expert, group[s], side="left")
                hi = np.searchsorted(by_expert, group[min(s + k, len(group)) - 1], side="right")
                which = order[lo:hi]
                y = self._compute(cache, xs[mx.array(which // k)], pairs[which],
                                  self.shapes[layer], activation)
                if s + k < len(group) or g + cache.capacity < len(ids):
                    # before the next group's reads overwrite rows it multiplies, and the
                    # next k's float copies take the memory; the last (a decode token's
                    # only one) is evaluated with what follows it: no synchronisation here
                    mx.eval(y)
                outputs.append(y)
        self._prefetched = None  # spent: the next read ahead overwrites the area
        y = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)
        y = y[mx.array(np.argsort(order).astype(np.int32))]
        return y.reshape(*indices.shape, x.shape[-1]).astype(x.dtype)

    def _admit(self, layer: int, ids: np.ndarray) -> None:
        """Make experts `ids` (sorted, at most the cache's capacity) resident in `layer`'s
        cache: those read ahead into the prefetch area are copied from it, the other missing
        ones read. Rows whose bytes did not all arrive, or fail their checksum, are not left
        resident."""
        cache = self.caches[layer]
        if self.naive:
            cache.evict(cache.neuron_at[:cache.size].copy())
        self._clock[layer] += 1
        load, slots, spill = self.admit(cache, ids, self._clock[layer])
        assert len(spill) == 0, "a group of experts larger than the cache"
        load, slots = self._promote(layer, cache, load, slots)
        self.read_admitted(cache, layer, load, slots)

    def _promote(self, layer: int, cache: NeuronCache, load: np.ndarray, slots: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Copy the experts of `load` that were read ahead for `layer` from the prefetch area
        into their slots `slots` (an admission like any other: the policy chose the slots);
        returns the rest, to be read."""
        if self._prefetched is None or self._prefetched[0] != layer or len(load) == 0:
            return load, slots
        held = self._prefetched[1]  # row i holds expert held[i]
        found = np.isin(load, held)
        if found.any():
            t0 = time.perf_counter()
            by_id = np.argsort(held)
            rows = by_id[np.searchsorted(held, load[found], sorter=by_id)]
            for name, dst in cache.matrix.rows.items():
                dst[slots[found]] = self.prefetch.rows[name][rows]
            self.lookahead_stats.promoted += int(found.sum())
            self._mem_seconds += time.perf_counter() - t0
        return load[~found], slots[~found]

    def _weights(self, cache: NeuronCache, t: str, used: mx.array | None,
                 shape: tuple[int, int]) -> tuple[mx.array, ...]:
        """Tensor `t` (`[experts, out, in]`: packed, scales and biases when quantized) of the
        experts in slots `used`, floats in the compute dtype, or, `used` None, of every slot
        as the cache holds them."""
        out = []
        for p in self.family.expand([t]):
            a = cache.matrix.parts[p]
            if used is not None:
                a = mx.take(a, used, axis=0)
                if p != t or t not in self.family.quantization:
                    a = a.astype(self.compute_dtype)
            out.append(a.reshape(a.shape[0], shape[0], -1))
        return tuple(out)

    def _project(self, x: mx.array, w: tuple[mx.array, ...], t: str, idx: mx.array
                 ) -> mx.array:
        """mlx-lm's SwitchLinear / QuantizedSwitchLinear product, on these experts."""
        q = self.family.quantization.get(t)
        if q is None:
            return mx.gather_mm(x, w[0].swapaxes(-1, -2), rhs_indices=idx)
        return mx.gather_qmm(x, *w, rhs_indices=idx, transpose=True, group_size=q.group_size,
                             bits=q.bits)

    def _compute(self, cache: NeuronCache, x: mx.array, ids: np.ndarray,
                 shapes: dict[str, tuple[int, int]], activation: nn.Module) -> mx.array:
        """`[n, 1, d]`: pair i's input `x[i]` (`[n, 1, d]`) through expert `ids[i]`."""
        slots = cache.slot_of[ids]
        if self._in_place:  # the experts multiply where they lie
            used, idx = None, mx.array(slots.astype(np.int32))
        else:  # the experts used, converted to the compute dtype (only those: a copy)
            unique, inverse = np.unique(slots, return_inverse=True)
            used, idx = mx.array(unique.astype(np.int32)), mx.array(inverse.astype(np.int32))
        w = {t: self._weights(cache, t, used, shapes[t]) for t in TENSORS}
        up = self._project(x, w["up"], "up", idx)
        gate = self._project(x, w["gate"], "gate", idx)
        return self._project(activation(up, gate), w["down"], "down", idx)

    def _guess_scores(self, layer: int, x: mx.array) -> tuple[mx.array, ...]:
        """`layer`'s router on the layer before's input `x` (the paper's predictor, for
        experts), not evaluated: () when nothing is to be guessed."""
        router = self.routers.get(layer)
        if router is None or self.caches[layer].complete or self.prefetch is None:
            return ()
        out = router(x)
        return tuple(out) if isinstance(out, tuple) else (out,)

    def _ranked(self, scores: tuple[mx.array, ...]) -> np.ndarray:
        """The guessed experts, likeliest first."""
        if len(scores) > 1:  # DeepSeek's gate returns (indices, scores)
            guess = np.array(scores[0]).reshape(-1)
            return guess[np.argsort(-np.array(scores[1].astype(mx.float32)).reshape(-1),
                                    kind="stable")]
        logits = np.array(scores[0].astype(mx.float32)).reshape(-1)
        return np.argsort(-logits, kind="stable")[:self.lookahead]

    def _start_ahead(self, layer: int, guess: np.ndarray) -> None:
        """Start reading the guessed experts of `layer` that its cache lacks into the
        prefetch area, likeliest first, one at a time, as many as it holds, until the layer
        comes (`_arrived`): a wrong guess then delays the layer's own reads by one expert's
        read at most. The cache is left as it is: what the layer routes to is admitted as any
        miss, and copied from the area where it was read."""
        cache = self.caches[layer]
        ids = guess[cache.slot_of[guess] < 0][:self.prefetch.capacity]
        self.guessed[layer] = guess, ids[:0]
        if len(ids) == 0:
            return
        self._arrived.clear()
        reader = self.reader_for(EXPERTS)

        def read() -> None:
            self._prefetched = None  # its rows are overwritten now
            for row in range(len(ids)):
                if self._arrived.is_set():
                    break
                one, at = ids[row:row + 1], np.array([row])
                reader.read_records(self.family, layer, one, at, self.prefetch,
                                    self.family.tensors)
                self.checker.check(EXPERTS, layer, one, at, self.prefetch.rows)
                self.guessed[layer] = guess, ids[:row + 1]
                self._prefetched = layer, ids[:row + 1]

        self.start_ahead(layer, read)

    def _score_guess(self, layer: int, ids: np.ndarray) -> None:
        """Count how good the guess read ahead for `layer` was, now that it routed to `ids`."""
        guessed = self.guessed.pop(layer, None)
        if guessed is not None:
            guess, read = guessed
            self.lookahead_stats.guessed += len(guess)
            self.lookahead_stats.needed += len(ids)
            self.lookahead_stats.found += int(np.isin(ids, guess).sum())
            self.lookahead_stats.unused += int((~np.isin(read, ids)).sum())
