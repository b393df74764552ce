"""Mixture-of-Experts models: each routed expert is one record on flash, read on demand.

The router already gives the sparsity the paper had to predict: a token uses k of E experts
per layer, exactly. So a layer's routed experts (mlx-lm's `SwitchGLU`) become one record
family, one record per expert holding its gate, up and down matrices (the paper's row-column
bundling at the expert level: one read fetches an expert), each record a whole number of
4 KiB pages. Routers, attention, embeddings, norms and shared experts stay resident.

The model is mlx-lm's own MoE model with each layer's `SwitchGLU` replaced by an
`ExpertSwitch`: mlx-lm's router picks the experts and weighs their outputs, so greedy output is
mlx-lm's on the same weights. Per layer the engine keeps a preallocated expert matrix (slots =
experts, `NeuronCache`'s delete-by-swap and append, never reallocated), reads the experts a
call needs that are not in it, and computes each (token, expert) pair with `gather_mm` /
`gather_qmm` on the experts where the slots hold them. A prompt streams layer by layer: each
expert it routes to is read once and multiplies all its tokens (in groups of what the cache
holds when they do not all fit).
"""

from __future__ import annotations

import dataclasses
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from .arch import QuantizedTensor, UnsupportedModel, Weight, check_config, pack_records
from .bundle import (
    ALIGNMENT,
    DTYPES,
    EXPERTS,
    ITEMSIZE,
    Bundle,
    BundleError,
    BundleWriter,
    Quantization,
    RecordChecker,
    RecordFamily,
    layout_parts,
    quantized_parts,
)
from .expert_policy import DEFAULT_POLICY, POLICIES
from .ffn import EngineStats, PhaseStats
from .flash_io import FlashReader, wait_all
from .memory import (
    AUTO_SHARE,
    BudgetError,
    MemoryPlan,
    available_memory,
    format_bytes,
    kv_bytes_per_token,
    loaded_bytes,
    parse_size,
)
from .neuron_cache import CacheStats, NeuronCache

TENSORS = ("gate", "up", "down")  # a record's matrices: mlx-lm's gate_proj, up_proj, down_proj
# model type -> the config key holding the number of routed experts
MOE_TYPES = {"qwen3_moe": "num_experts", "qwen2_moe": "num_experts",
             "mixtral": "num_local_experts", "olmoe": "num_experts",
             "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}
MAX_EXPERTS = 1 << 12  # the largest real models route among 512
MOE_SIZES = ("moe_intermediate_size", "shared_expert_intermediate_size", "n_shared_experts",
             "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
             "v_head_dim", "first_k_dense_replace", "n_group", "topk_group",
             "decoder_sparse_step", "moe_layer_freq")
# Hugging Face names one tensor per expert (`...experts.E.gate_proj.weight`); Mixtral calls
# the projections w1 (gate), w3 (up) and w2 (down)
HF_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def is_moe(config: Any) -> bool:
    return isinstance(config, dict) and config.get("model_type") in MOE_TYPES


def check_moe_config(config: dict[str, Any]) -> None:
    """UnsupportedModel unless `config` is an MoE model we run, with sane sizes."""
    model_type = config.get("model_type")
    if model_type not in MOE_TYPES:
        raise UnsupportedModel(f"unsupported MoE architecture {model_type!r:.40} (supported: "
                               f"{', '.join(sorted(MOE_TYPES))})")
    check_config(config)
    for key in (MOE_TYPES[model_type], "num_experts_per_tok"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) \
                or not 1 <= value <= MAX_EXPERTS:
            raise UnsupportedModel(f"config {key} must be an integer from 1 to {MAX_EXPERTS}, "
                                   f"not {value!r:.40}")
    for key in MOE_SIZES:  # mlx-lm sizes arrays by them when it builds the model
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= 1 << 20):
            raise UnsupportedModel(f"config {key} must be an integer from 0 to {1 << 20}, "
                                   f"not {value!r:.40}")
    if config["num_experts_per_tok"] > config[MOE_TYPES[model_type]]:
        raise UnsupportedModel("config num_experts_per_tok is larger than the number of "
                               "experts")


def build_model(config: dict[str, Any]) -> nn.Module:
    """mlx-lm's model for `config` (lazy parameters: nothing is allocated until evaluated)."""
    from mlx_lm.models.switch_layers import SwitchGLU
    from mlx_lm.utils import _get_classes

    check_moe_config(config)
    model_class, args_class = _get_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError, AttributeError, OverflowError, ZeroDivisionError
            ) as e:
        raise UnsupportedModel(f"mlx-lm cannot build this {config['model_type']} config: "
                               f"{type(e).__name__}: {e}") from None
    if not any(isinstance(m, SwitchGLU) for _, m in model.named_modules()):
        raise UnsupportedModel(f"this {config['model_type']} model has no routed experts")
    return model


@dataclass
class RoutedLayer:
    """Where a layer's routed experts sit in the model, and their shape."""

    layer: int
    path: str  # e.g. "model.layers.3.mlp.switch_mlp"
    parent: nn.Module
    name: str
    activation: nn.Module
    shapes: dict[str, tuple[int, int]]  # tensor -> (out, in)


def routed_layers(model: nn.Module) -> dict[int, RoutedLayer]:
    """Every layer's SwitchGLU, by layer number."""
    from mlx_lm.models.switch_layers import SwitchGLU

    modules = dict(model.named_modules())
    out = {}
    for path, m in modules.items():
        if not isinstance(m, SwitchGLU):
            continue
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
        if found is None:
            raise UnsupportedModel(f"routed experts outside a layer: {path}")
        parent, name = path.rsplit(".", 1)
        shapes = {t: tuple(getattr(m, f"{t}_proj").weight.shape[1:]) for t in TENSORS}
        out[int(found.group(1))] = RoutedLayer(int(found.group(1)), path, modules[parent], name,
                                               m.activation, shapes)
    return out


def expert_layout(shapes: dict[str, tuple[int, int]], dtype: str,
                  quantization: dict[str, Quantization]) -> tuple[tuple, int]:
    """The parts of one expert record and its size (a multiple of 4 KiB): each matrix
    `out × in` of `dtype`, or quantized along `in` (packed words, scales, biases)."""
    parts: list[tuple[str, int, str]] = []
    for t in TENSORS:
        rows, cols = shapes[t]
        q = quantization.get(t)
        if q is None:
            parts.append((t, rows * cols, dtype))
            continue
        packed, scales, biases = quantized_parts(t)
        parts += [(packed, rows * cols * q.bits // 32, "uint32"),
                  (scales, rows * cols // q.group_size, dtype),
                  (biases, rows * cols // q.group_size, dtype)]
    return layout_parts(parts, align=ALIGNMENT)


class ExpertSwitch(nn.Module):
    """Drop-in for mlx-lm's SwitchGLU whose experts stay in the bundle until routed to."""

    def __init__(self, engine: ExpertEngine | None, layer: int, activation: nn.Module):
        super().__init__()
        self.engine, self.layer, self.activation = engine, layer, activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self.engine(self.layer, x, indices, self.activation)


def flash_model(config: dict[str, Any], engine: ExpertEngine | None
                ) -> tuple[nn.Module, dict[int, RoutedLayer]]:
    """mlx-lm's model with every layer's routed experts an ExpertSwitch."""
    model = build_model(config)
    routed = routed_layers(model)
    for r in routed.values():
        setattr(r.parent, r.name, ExpertSwitch(engine, r.layer, r.activation))
    return model, routed


# ----------------------------------------------------------------------------- conversion


def _expert_sources(names: set[str], r: RoutedLayer, count: int) -> dict[str, list[str]]:
    """The source tensors of layer `r`'s experts: per tensor, one stacked `[E, out, in]`
    (mlx-lm, GGUF) or one per expert (Hugging Face)."""
    from .convert import ConversionError

    out = {}
    owner = r.path.rsplit(".", 1)[0]
    for t in TENSORS:
        stacked = f"{r.path}.{t}_proj.weight"
        if stacked in names:
            out[t] = [stacked]
            continue
        for hf in (f"{t}_proj", next(k for k, v in HF_PROJ.items() if v == f"{t}_proj")):
            per = [f"{owner}.experts.{e}.{hf}.weight" for e in range(count)]
            if all(n in names for n in per):
                out[t] = per
                break
        else:
            raise ConversionError(f"the source lacks the {t} matrices of layer {r.layer}'s "
                                  f"experts ({stacked} or {owner}.experts.E.{t}_proj.weight)")
    return out


def _stack(source, names: list[str], shape: tuple[int, ...]) -> Weight:
    """The experts' matrices of one tensor, stacked `[E, out, in]` (as stored)."""
    from .convert import ConversionError

    ws = [source.get_weight(n) for n in names]
    if len(ws) == 1 and names[0].count(".experts.") == 0:
        w = ws[0]
    elif all(isinstance(w, QuantizedTensor) for w in ws):
        w = QuantizedTensor(*(mx.stack([getattr(w, a) for w in ws])
                              for a in ("weight", "scales", "biases")), ws[0].bits,
                            ws[0].group_size)
    else:
        w = mx.stack([w.dequantize() if isinstance(w, QuantizedTensor) else w for w in ws])
    if tuple(w.shape) != shape:
        raise ConversionError(f"{names[0]} has shape {tuple(w.shape)}, the model expects {shape}")
    return w


def convert_moe(source, out: str | Path, dtype: str | None = None,
                progress: bool = True) -> Bundle:
    """Convert an MoE `source` (opened by `sources.open_source`) into a bundle at `out`.

    Routed experts become records; quantized ones keep their quantization bit for bit (MLX's
    affine quantization of mlx-lm folders and of GGUF Q4_0/Q4_1/Q8_0: `gather_qmm` computes
    it where it lies); float ones are stored as `dtype`, by default the source's own (or
    its quantization scales', widened to float32 on MLX's CPU backend), so the bundle
    computes what mlx-lm computes on the source."""
    from .convert import ConversionError, check_finite, mlx_lm_quantization, resident_arrays
    from .loader import quantize_resident

    config = dict(source.config)
    model, routed = flash_model(config, None)
    if not routed:
        raise ConversionError("no routed experts")
    count = int(config[MOE_TYPES[config["model_type"]]])
    names = set(source.names())
    experts = {i: _expert_sources(names, r, count) for i, r in routed.items()}
    in_experts = {n for layer in experts.values() for ns in layer.values() for n in ns}
    first = min(routed)
    sample = {t: source.get_weight(experts[first][t][0]) for t in TENSORS}
    quantization = {t: Quantization(w.bits, w.group_size) for t, w in sample.items()
                    if isinstance(w, QuantizedTensor)}
    if dtype is None:
        # Quantized experts on MLX's CPU backend compute in float32 (gather_qmm: 8 ms in
        # float32, 132 in bfloat16 for 8 experts of 768 x 2048 here): scales stored in
        # float32 (exact: a 16-bit float widens losslessly) let the experts multiply where the
        # cache holds them. Else the source's own dtype.
        dtype = "float32" if quantization and not mx.metal.is_available() else \
            source.stored_dtype(experts[first]["gate"][0])
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    # resident tensors: as mlx-lm would load them (its sanitize maps the source's names)
    quantized: dict[str, Quantization] = {}
    resident: dict[str, mx.array] = {}
    for name in sorted(names - in_experts):
        w = source.get_weight(name)
        check_finite(name, w)
        resident.update(resident_arrays(name, w, quantized))
    # (the supported models' sanitize reads their config, never the modules replaced above)
    resident = model.sanitize(resident)
    if quantized:
        config["quantization"] = mlx_lm_quantization(
            {m: q for m, q in quantized.items()
             if f"{m}.scales" in resident})
    quantize_resident(model, config, resident)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    if resident.keys() != expected.keys():
        extra = sorted(resident.keys() - expected.keys())
        lacking = sorted(expected.keys() - resident.keys())
        raise ConversionError(f"{source.path.name} does not match mlx-lm's "
                              f"{config['model_type']} model: unexpected tensors {extra[:3]}, "
                              f"missing {lacking[:3]}")
    for k, shape in expected.items():
        if tuple(resident[k].shape) != tuple(shape):
            raise ConversionError(f"{k} has shape {tuple(resident[k].shape)}, the model "
                                  f"expects {tuple(shape)}")
    shapes = routed[first].shapes
    parts, record_bytes = expert_layout(shapes, dtype, quantization)
    target = DTYPES[dtype]
    with BundleWriter(out, architecture=config["model_type"], config=config, dtype=dtype,
                      source=source.describe()) as writer, \
            tqdm(total=len(routed), unit="layer", disable=not progress,
                 desc=f"converting {source.path.name}") as bar:
        for k, a in resident.items():
            writer.add_resident(k, a)
        writer.add_family(EXPERTS, count, parts, record_bytes, quantization, every_layer=False)
        for i, r in sorted(routed.items()):
            arrays = {}
            for t in TENSORS:
                w = _stack(source, experts[i][t], (count, *r.shapes[t]))
                check_finite(experts[i][t][0], w)
                q = quantization.get(t)
                if q is None:
                    f = w.dequantize() if isinstance(w, QuantizedTensor) else w
                    arrays[t] = f.astype(target).reshape(count, -1)
                elif not isinstance(w, QuantizedTensor) or (w.bits, w.group_size) != (
                        q.bits, q.group_size):
                    raise ConversionError(f"layer {i}'s {t} experts are not quantized as "
                                          "layer {first}'s")
                else:
                    for part, a in zip(quantized_parts(t), (w.weight, w.scales, w.biases),
                                       strict=True):
                        arrays[part] = (a if part == t else a.astype(target)).reshape(count, -1)
            writer.write_segment(EXPERTS, i, pack_records(parts, record_bytes, arrays))
            bar.update()
        source.save_tokenizer(writer.tokenizer_dir)
        return writer.commit()


# ----------------------------------------------------------------------------- the engine


@dataclass
class ExpertStats(PhaseStats):
    """What the expert engine did in one phase (prefill or decode): the dense engine's
    figures (`ffn_seconds`: the experts' compute), and the experts it read."""

    experts_read: int = 0


@dataclass
class LookaheadStats:
    """How well the next layer's router, run on this layer's input, guessed its experts."""

    guessed: int = 0  # experts read ahead (or found resident) for a layer
    needed: int = 0  # experts the layer then routed to
    found: int = 0  # of those, guessed
    read: int = 0  # experts read ahead (the guessed ones not resident)
    unused: int = 0  # of those, experts the layer did not route to: wasted reads

    @property
    def recall(self) -> float:
        return self.found / self.needed if self.needed else 0.0


@dataclass
class ExpertEngineStats(EngineStats):
    prefill: ExpertStats = field(default_factory=ExpertStats)
    decode: ExpertStats = field(default_factory=ExpertStats)


class Routed:
    """The selection of an MoE model: the router's own (reported as the mode's name)."""

    name = "experts"


def _expert_sizes(bundle: Bundle, itemsize: int, context: int, policy: str
                  ) -> tuple[MemoryPlan, int, int]:
    """The plan without expert slots, the bytes of the caches' slot maps, and of one slot
    in every MoE layer."""
    fam = bundle.families[EXPERTS]
    layers = sum(1 for _, n in fam.segments if n)
    k = int(bundle.config["num_experts_per_tok"])
    # compute takes a token's k experts (converted to the compute dtype) and intermediates;
    # 32 MiB for what lives outside MLX (the engine's index arrays, Python objects, reader
    # threads' stacks): the benchmark measured model RSS 6-10 MB past a budget its caches
    # filled with 16 MiB here (docs/BENCHMARKS.md)
    float_row = sum(p.length * itemsize if p.dtype != "uint32" else p.nbytes for p in fam.parts)
    plan = MemoryPlan(None, loaded_bytes(bundle.resident_path, itemsize), 0, 0,
                      context * kv_bytes_per_token(bundle.config, itemsize), context,
                      work=2 * k * float_row + 32 * 2**20)
    # the caches' slot maps, and their policy's state
    return (plan, layers * (NeuronCache.index_bytes(fam.count, 0)
                            + POLICIES[policy].state_bytes(fam.count)),
            layers * (fam.tensor_bytes(fam.tensors) + NeuronCache.index_bytes(0, 1)))


def expert_budget(bundle: Bundle, itemsize: int, context: int, slots: int,
                  policy: str = DEFAULT_POLICY) -> int:
    """The memory budget that gives each MoE layer `slots` expert slots."""
    plan, index, slot_bytes = _expert_sizes(bundle, itemsize, context, policy)
    return plan.minimum + index + slots * slot_bytes


def expert_plan(bundle: Bundle, itemsize: int, budget: int | str | None, context: int,
                policy: str = DEFAULT_POLICY) -> MemoryPlan:
    """Size the per-layer expert matrices. A set budget: as many slots per layer as it
    leaves (at least the experts a token routes to: BudgetError naming the minimum); "auto":
    every expert when the model fits in AUTO_SHARE of the memory available, else that share;
    None: every expert; "off": the experts of one token, read anew every token (naive)."""
    fam = bundle.families[EXPERTS]
    k = int(bundle.config["num_experts_per_tok"])
    plan, index, slot_bytes = _expert_sizes(bundle, itemsize, context, policy)
    n = fam.count if budget is None else k
    if budget == "auto":
        plan.automatic = True
        budget = max(plan.minimum + index + k * slot_bytes,
                     min(plan.minimum + index + fam.count * slot_bytes,
                         int(AUTO_SHARE * available_memory())))
    if budget not in (None, "off"):
        plan.budget = parse_size(budget)
        n = min(fam.count, max(0, plan.budget - plan.minimum - index) // slot_bytes)
        if n < k:
            raise BudgetError(
                f"memory budget {format_bytes(plan.budget)} is below the minimum "
                f"{format_bytes(plan.minimum + index + k * slot_bytes)} for this model: "
                f"{plan.describe().rsplit(' + neuron caches', 1)[0]} + the {k} experts a "
                f"token routes to, in each MoE layer")
    plan.capacity[(EXPERTS, fam.tensors)] = [int(n) if size else 0 for _, size in fam.segments]
    plan.cache_bytes = index + int(n) * slot_bytes
    plan.layers = sum(1 for _, size in fam.segments if size)
    plan.whole = n == fam.count
    plan.complete_layers = plan.layers if plan.whole else 0
    return plan


class ExpertCache(NeuronCache):
    """One MoE layer's expert slots (a NeuronMatrix: slots = experts, delete by swap,
    append), whose eviction policy (mlx_flash.expert_policy, chosen by measurement against
    Belady's: docs/MOE.md) picks which residents make room for a token's missing experts."""

    def __init__(self, family: RecordFamily, capacity: int, policy: str = DEFAULT_POLICY):
        super().__init__(family, family.tensors, capacity, window=1)
        self.policy = POLICIES[policy](family.count, capacity)

    def make_room(self, ids: np.ndarray, missing: int, t: int) -> None:
        short = missing - (self.capacity - self.size)
        if short > 0:
            self.evict(self.policy.victims(self.neuron_at[:self.size].copy(), short, t, ids))

    def admit(self, ids: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        load, slots, spill = super().admit(ids, t)
        self.policy.touch(ids[self.slot_of[ids] >= 0], t)
        self.evict(self.policy.expire(self.neuron_at[:self.size].copy(), t))
        return load, slots, spill


class ExpertEngine:
    """Serves every ExpertSwitch of one model from the bundle's expert records."""

    def __init__(self, bundle: Bundle, plan: MemoryPlan, compute_dtype: mx.Dtype,
                 threads: int = 8, cold: bool = False, use_mmap: bool = False,
                 naive: bool = False, lookahead: int = 0, policy: str = DEFAULT_POLICY):
        self.bundle, self.plan, self.compute_dtype = bundle, plan, compute_dtype
        self.family = fam = bundle.families[EXPERTS]
        self.mode = Routed()
        self.reader = FlashReader(bundle.path / fam.file, threads=threads, cold=cold,
                                  use_mmap=use_mmap)
        self.checker = RecordChecker(bundle)
        self.naive = naive  # every token reads its experts anew: the naive engine
        self.caches = {layer: ExpertCache(fam, n, policy)
                       for layer, n in enumerate(plan.capacity[(EXPERTS, fam.tensors)]) if n}
        self.shapes: dict[int, dict[str, tuple[int, int]]] = {}
        self.stats = ExpertEngineStats()
        self._clock = dict.fromkeys(self.caches, 0)  # each cache's admissions: its clock
        # decoding, the next layer's likely experts (its router's top `lookahead` on this
        # layer's input) are read while this layer and the next one's attention compute
        self.lookahead = lookahead
        self.routers: dict[int, Any] = {}  # layer -> its router (open_moe_model sets them)
        self.next_layer = {a: b for a, b in zip(sorted(self.caches), sorted(self.caches)[1:],
                                                  strict=False)}
        self.ahead: dict[int, np.ndarray] = {}  # layer -> the experts guessed for it
        self._read_ahead_ids: dict[int, np.ndarray] = {}  # layer -> those read for it
        self.lookahead_stats = LookaheadStats()
        self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="experts-ahead")
        self._pending: tuple[int, Future] | None = None
        self._mem_seconds = 0.0
        self.runtime_rss = 0
        # floats stored in the compute dtype: gather_mm / gather_qmm take the cache's slots
        self._in_place = all(p.dtype == "uint32" or DTYPES[p.dtype] == compute_dtype
                             for p in fam.parts)
        if plan.whole:  # the model fits: every expert is read once, here
            for layer, cache in self.caches.items():
                self._admit(layer, np.arange(fam.count))
                cache.stats = CacheStats()

    @property
    def read_calls(self) -> int:
        return self.reader.counters.calls

    def cache_stats(self) -> CacheStats:
        return CacheStats.total(cache.stats for cache in self.caches.values())

    def _admit(self, layer: int, ids: np.ndarray) -> None:
        """Make experts `ids` (sorted, at most the cache's capacity) resident in `layer`'s
        cache, reading those that are not. Rows whose bytes did not all arrive, or fail
        their checksum, are not left resident."""
        cache = self.caches[layer]
        if self.naive:
            cache.evict(cache.neuron_at[:cache.size].copy())
        self._clock[layer] += 1
        t0 = time.perf_counter()
        load, slots, spill = cache.admit(ids, self._clock[layer])
        assert len(spill) == 0, "a group of experts larger than the cache"
        self._mem_seconds += time.perf_counter() - t0
        cache.read_admitted(self.reader, self.checker, layer, load, slots)

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

    def _read_ahead(self, layer: int, ids: np.ndarray) -> tuple[int, float, float]:
        """Admit experts `ids` into `layer`'s cache and read them (in the background: nothing
        touches that cache until `__call__` for `layer` has waited for this). Returns the
        bytes and the reading seconds, and the seconds it took."""
        t0 = time.perf_counter()
        cache = self.caches[layer]
        counted = dataclasses.replace(cache.stats)  # the token's own admit counts hits
        read0, io0 = self.reader.counters.bytes, self.reader.counters.seconds
        loads = cache.stats.loads
        self._admit(layer, ids)
        cache.stats.hits = counted.hits
        self.ahead[layer] = ids
        self.lookahead_stats.read += cache.stats.loads - loads
        # the slots just filled, to tell later which of them the layer used
        self._read_ahead_ids[layer] = cache.neuron_at[cache.size - (cache.stats.loads - loads):
                                                      cache.size].copy()
        return (self.reader.counters.bytes - read0, self.reader.counters.seconds - io0,
                time.perf_counter() - t0)

    def _start_ahead(self, layer: int, x: mx.array) -> None:
        """Guess `layer`'s experts with its own router on the layer before's input `x` (the
        paper's predictor, for experts) and start reading those not resident."""
        router = self.routers.get(layer)
        cache = self.caches.get(layer)
        if router is None or cache is None or cache.complete:
            return
        out = router(x)
        if isinstance(out, tuple):  # DeepSeek's gate returns (indices, scores)
            guess = np.array(out[0]).reshape(-1)
        else:
            logits = np.array(out.astype(mx.float32)).reshape(-1)
            guess = np.argsort(-logits, kind="stable")[:self.lookahead]
        guess = np.unique(guess)[:cache.capacity]
        self._pending = (layer, self._ahead_pool.submit(self._read_ahead, layer, guess))

    def _await_ahead(self, layer: int, phase: ExpertStats) -> None:
        if self._pending is None or self._pending[0] != layer:
            return
        future = self._pending[1]
        self._pending = None
        t0 = time.perf_counter()
        wait_all([future])
        phase.io_seconds += time.perf_counter() - t0  # a read ahead not done yet: a stall
        if future.exception() is not None:  # what failed was not left resident: read anew
            if not isinstance(future.exception(), Exception):
                raise future.exception()
            return
        read, _, seconds = future.result()
        phase.bytes += read
        phase.ahead_seconds += seconds

    def __call__(self, layer: int, x: mx.array, indices: mx.array,
                 activation: nn.Module) -> mx.array:
        mx.eval(x, indices)  # the router has chosen: its experts can be read
        decoding = indices.size == indices.shape[-1]
        phase = self.stats.decode if decoding else self.stats.prefill
        self._await_ahead(layer, phase)
        t0 = time.perf_counter()
        self._mem_seconds = 0.0
        read0, io0 = self.reader.counters.bytes, self.reader.counters.seconds
        cache = self.caches[layer]
        shapes = self.shapes[layer]
        k = indices.shape[-1]
        pairs = np.array(indices).reshape(-1)
        order = np.argsort(pairs, kind="stable")  # pairs grouped by expert
        by_expert = pairs[order]
        xs = x.reshape(-1, 1, x.shape[-1]).astype(self.compute_dtype)
        ids = np.unique(pairs)
        loads0 = cache.stats.loads
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
                y = self._compute(cache, xs[mx.array(which // k)], pairs[which], shapes,
                                  activation)
                mx.eval(y)  # before the next group's reads overwrite rows it multiplies
                outputs.append(y)
        y = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)
        y = y[mx.array(np.argsort(order).astype(np.int32))]
        y = y.reshape(*indices.shape, x.shape[-1]).astype(x.dtype)
        guessed = self.ahead.pop(layer, None)
        if guessed is not None:  # how good the guess read ahead was
            self.lookahead_stats.guessed += len(guessed)
            self.lookahead_stats.needed += len(ids)
            self.lookahead_stats.found += int(np.isin(ids, guessed).sum())
            self.lookahead_stats.unused += int((~np.isin(self._read_ahead_ids.pop(layer),
                                                         ids)).sum())
        if layer == min(self.caches):
            phase.tokens += pairs.size // k
        read, io = self.reader.counters.bytes - read0, self.reader.counters.seconds - io0
        phase.bytes += read
        phase.experts_read += cache.stats.loads - loads0
        phase.io_seconds += io
        phase.mem_seconds += self._mem_seconds
        phase.ffn_seconds += time.perf_counter() - t0 - io - self._mem_seconds
        if self.lookahead and decoding:
            self._start_ahead(self.next_layer.get(layer, -1), x)
        return y


def open_moe_model(bundle: Bundle, compute_dtype: str | None, options) -> nn.Module:
    """mlx-lm's model for an MoE bundle, its routed experts served by an ExpertEngine."""
    from .loader import compute_dtype_for, finish_model, keep_within

    check_moe_config(bundle.config)
    fam = bundle.families[EXPERTS]
    if fam.count != bundle.config[MOE_TYPES[bundle.config["model_type"]]] \
            or set(fam.tensors) != set(TENSORS):
        raise BundleError(f"{bundle.path}: the expert records do not match the model's "
                          f"{bundle.config[MOE_TYPES[bundle.config['model_type']]]} experts")
    name = compute_dtype or compute_dtype_for(bundle)
    if not mx.metal.is_available() and not fam.quantization:
        name = "float32"  # MLX's CPU gather_mm multiplies float32 only
    dtype = DTYPES[name]
    budget = options.memory_budget
    plan = expert_plan(bundle, ITEMSIZE[name], budget, options.context, options.expert_policy)
    keep_within(plan)
    k = int(bundle.config["num_experts_per_tok"])
    engine = ExpertEngine(bundle, plan, dtype, options.threads, options.cold, options.use_mmap,
                          naive=budget == "off",
                          lookahead=k + (k + 1) // 2 if options.lookahead else 0,
                          policy=options.expert_policy)
    model, routed = flash_model(dict(bundle.config), engine)
    expected = expert_layout(next(iter(routed.values())).shapes, bundle.dtype,
                             fam.quantization)
    if tuple(p.name for p in fam.parts) != tuple(p.name for p in expected[0]) \
            or fam.record_bytes != expected[1] \
            or sorted(routed) != [i for i, (_, n) in enumerate(fam.segments) if n]:
        raise BundleError(f"{bundle.path}: the expert records do not match the model's "
                          "experts (layout or layers)")
    engine.shapes = {i: r.shapes for i, r in routed.items()}
    # the routers as the model holds them once loaded (maybe quantized)
    engine.routers = {i: (lambda x, block=r.parent: block.gate(x)) for i, r in routed.items()
                      if hasattr(r.parent, "gate")}
    return finish_model(model, bundle, engine, dtype, len(model.layers), options)
