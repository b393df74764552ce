"""The expert engine: a Mixture-of-Experts model's routed experts read from flash on demand.

Each routed expert is one record (mlx_flash.arch.moe). Per layer the engine keeps a
preallocated expert matrix (slots = experts, `NeuronCache`'s delete-by-swap and append, never
reallocated), reads the experts a call needs that are not in it, and computes each (token,
expert) pair with `gather_mm` / `gather_qmm` on the experts where the slots hold them. A prompt
streams layer by layer: each expert it routes to is read once and multiplies all its tokens
(in groups of what the cache holds when they do not all fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .arch.moe import TENSORS
from .bundle import DTYPES, EXPERTS, Bundle
from .engine import Engine
from .eviction import DEFAULT_POLICY, POLICIES
from .memory import MemoryPlan
from .neuron_cache import NeuronCache


@dataclass
class LookaheadStats:
    """How well the next layer's router, run on this layer's input, guessed its experts."""

    guessed: int = 0  # experts read ahead (or found resident) for a layer
    needed: int = 0  # experts the layer then routed to
    found: int = 0  # of those, guessed
    unused: int = 0  # experts read ahead that the layer did not route to: wasted reads

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
        for layer, n in enumerate(plan.capacity[(EXPERTS, fam.tensors)]):
            if n:
                self.caches[layer] = NeuronCache(fam, fam.tensors, n,
                                                 POLICIES[policy](fam.count, n))
        self.shapes: dict[int, dict[str, tuple[int, int]]] = {}
        self._clock = dict.fromkeys(self.caches, 0)  # each cache's admissions: its clock
        # decoding, the next layer's likely experts (its router's top `lookahead` on this
        # layer's input) are read while this layer and the next one's attention compute
        self.lookahead = lookahead
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
        mx.eval(x, indices)  # the router has chosen: its experts can be read
        decoding = indices.size == indices.shape[-1]
        phase = self.stats.decode if decoding else self.stats.prefill
        self.await_ahead(layer, phase)
        with self.measure(phase):
            y = self._routed(layer, x, indices, activation)
        if layer == min(self.caches):
            phase.tokens += indices.size // indices.shape[-1]
        if self.lookahead and decoding and layer in self.next_layer:
            self._start_ahead(self.next_layer[layer], x)
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
                mx.eval(y)  # before the next group's reads overwrite rows it multiplies
                outputs.append(y)
        y = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)
        y = y[mx.array(np.argsort(order).astype(np.int32))]
        return y.reshape(*indices.shape, x.shape[-1]).astype(x.dtype)

    def _admit(self, layer: int, ids: np.ndarray, ahead: bool = False) -> np.ndarray:
        """Make experts `ids` (sorted, at most the cache's capacity) resident in `layer`'s
        cache, reading those that are not; returns those read. Rows whose bytes did not all
        arrive, or fail their checksum, are not left resident."""
        cache = self.caches[layer]
        if self.naive:
            cache.evict(cache.neuron_at[:cache.size].copy())
        self._clock[layer] += 1
        load, slots, spill = self.admit(cache, ids, self._clock[layer], ahead)
        assert len(spill) == 0, "a group of experts larger than the cache"
        self.read_admitted(cache, layer, load, slots)
        return load

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

    def _start_ahead(self, layer: int, x: mx.array) -> None:
        """Guess `layer`'s experts with its own router on the layer before's input `x` (the
        paper's predictor, for experts) and start reading those not resident."""
        router = self.routers.get(layer)
        cache = self.caches[layer]
        if router is None or cache.complete:
            return
        out = router(x)
        if isinstance(out, tuple):  # DeepSeek's gate returns (indices, scores)
            guess = np.array(out[0]).reshape(-1)
        else:
            logits = np.array(out.astype(mx.float32)).reshape(-1)
            guess = np.argsort(-logits, kind="stable")[:self.lookahead]
        guess = np.unique(guess)[:cache.capacity]

        def read() -> None:
            self.guessed[layer] = guess, self._admit(layer, guess, ahead=True)

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
