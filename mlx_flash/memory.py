"""The memory budget: what stays resident, what the neuron caches may hold, what is left.

    resident weights (embeddings, attention, norms; in the compute dtype)
  + the selection mode's resident data (gate rows, predictors)
  + one layer of records of each family read (prefill streams through it; so do spills)
  + the KV cache for `context` tokens (unless told, 2048, or what the budget leaves)
  = the minimum; what the budget leaves above it goes to the per-layer neuron caches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .bundle import EXPERTS, Bundle, RecordFamily
from .errors import BudgetError
from .eviction import DEFAULT_POLICY, POLICIES
from .neuron_cache import NeuronCache
from .sysmem import available_memory, format_bytes, parse_size

# Caches smaller than this share of a layer's records are not kept: measured on the default
# model at 75% of its bundle (page cache warm), caches of 0.7% of the records hit 0.4% of the
# neurons, and the FFN took 189 ms per token with them against 154 ms without (admission, and
# joining what they hold with what they spill).
MIN_CACHE_FRACTION = 1 / 16

# Where partial window caches pay (the paper's regime: a ReLU model's window of 5 tokens holds
# ~24% of a layer, 2.4% of it new per token), a layer's caches are made complete only while
# the layers left partial keep this share of a layer each: the window's union must fit first
# (the scale benchmark's trace: 23%), and a complete cache saves only what is new to it.
WINDOW_SHARE = 0.3


# Without --memory-budget the model may take this share of the memory available: the rest is
# left to the OS page cache (which serves the bundle's reads) and to other programs.
AUTO_SHARE = 0.75


# Tokens the KV cache is planned for unless told (--max-kv-size). A budget that cannot hold
# them leaves the KV cache what it can (as llama.cpp fits its context to the memory it is
# given), before any neuron cache, but no fewer than MIN_CONTEXT tokens (mlx-lm's KV cache
# step): below that the budget is refused, naming the --max-kv-size that would fit it.
DEFAULT_CONTEXT = 2048
MIN_CONTEXT = 256


@dataclass(frozen=True)
class KVQuantization:
    """mlx-lm's KV cache quantization (--kv-bits, --kv-group-size, --quantized-kv-start):
    from token `start` on, the cache holds keys and values as `bits`-bit integers with a
    scale and a bias (in the compute dtype) per `group_size` values."""

    bits: int
    group_size: int = 64
    start: int = 5000  # mlx_lm.generate's DEFAULT_QUANTIZED_KV_START


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def kv_bytes_per_token(config: dict[str, Any], itemsize: int,
                       quantization: KVQuantization | None = None) -> int:
    """Keys and values of one token over all layers (quantized: as mlx-lm's QuantizedKVCache
    holds them, packed values plus a scale and a bias per group)."""
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    dim = head_dim(config)
    if quantization is None:
        per_head = dim * itemsize
    else:
        per_head = dim * quantization.bits // 8 + 2 * (dim // quantization.group_size) * itemsize
    return 2 * int(config["num_hidden_layers"]) * int(heads) * per_head


def kv_cache_bytes(config: dict[str, Any], itemsize: int, context: int,
                   quantization: KVQuantization | None = None) -> int:
    """The KV cache for `context` tokens. Quantized from the first token (start 0): its
    quantized size. Quantized from a later token within the context: the float cache and
    the quantized copy mlx-lm makes of it both (they coexist while it converts)."""
    full = context * kv_bytes_per_token(config, itemsize)
    if quantization is None or quantization.start >= context:
        return full
    packed = context * kv_bytes_per_token(config, itemsize, quantization)
    return packed if quantization.start == 0 else full + packed


def fit_tokens(room: int, kv_bytes: Callable[[int], int], most: int = DEFAULT_CONTEXT
               ) -> int:
    """The most tokens, up to `most`, whose KV cache (`kv_bytes(tokens)`, growing with them)
    fits in `room` bytes."""
    low, high = 0, most
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if kv_bytes(mid) <= room else (low, mid - 1)
    return low


def choose_context(context: int | None, budget: int | None, fixed: int,
                   kv_bytes: Callable[[int], int]) -> tuple[int, str]:
    """(tokens the KV cache is planned for, who chose them: "" the caller or the default,
    "budget", "floor"): `context` when given; else DEFAULT_CONTEXT, or what a budget leaves
    above `fixed` when it holds fewer, but at least MIN_CONTEXT (a budget that leaves fewer
    is refused: `context_hint` names the --max-kv-size that fits)."""
    if context is not None:
        return context, ""
    if budget is None:
        return DEFAULT_CONTEXT, ""
    fitted = fit_tokens(budget - fixed, kv_bytes)
    if fitted < MIN_CONTEXT:
        return MIN_CONTEXT, "floor"
    return fitted, "budget" if fitted < DEFAULT_CONTEXT else ""


def context_hint(budget: int, fixed: int, kv_bytes: Callable[[int], int]) -> str:
    """For a budget below the minimum: the smaller KV cache that would fit it, if any."""
    n = fit_tokens(budget - fixed, kv_bytes, DEFAULT_CONTEXT)
    if n < 16:  # no useful context: the rest of the model does not fit
        return ""
    return f"; a KV cache of at most {n} tokens fits it (--max-kv-size {n})"


@dataclass
class MemoryPlan:
    budget: int | None
    resident: int
    selection: int
    staging: int
    kv: int
    context: int
    work: int  # rows gathered for compute, intermediates, buffers MLX keeps for reuse
    # each layer's rows (a list, layer by layer) for each cached (family, parts) the mode reads
    capacity: dict[tuple[str, tuple[str, ...]], list[int]] = field(default_factory=dict)
    cache_bytes: int = 0
    layers: int = 0
    complete_layers: int = 0  # layers whose every cache holds every neuron
    automatic: bool = False  # the budget was chosen from the memory available ("auto")
    whole: bool = False  # every cache complete: the model held whole, nothing read per token
    fitted: bool = False  # the budget chose `context`: fewer than DEFAULT_CONTEXT fit
    floor: bool = False  # `context` is MIN_CONTEXT: fewer would fit, but not unless told
    kv_bits: int | None = None  # the KV cache quantized (within `context`) to so many bits
    # an MoE model's plan: (slots per layer, experts per layer, experts a token routes to)
    experts: tuple[int, int, int] | None = None
    routed: int = 0  # bytes of the slots for the experts a token routes to (and slot maps)
    naive: bool = False  # the experts of one token, read anew every token (budget "off")
    prefetch: int = 0  # expert slots lent to the lookahead's prefetch area (reserve_prefetch)

    @property
    def minimum(self) -> int:
        return self.resident + self.selection + self.staging + self.kv + self.work

    @property
    def total(self) -> int:
        return self.minimum + self.cache_bytes

    def budget_text(self) -> str:
        """"budget 250.0 MB", "budget 250.0 MB auto" (chosen from the memory available) or
        "no budget"."""
        if self.budget is None:
            return "no budget"
        return f"budget {format_bytes(self.budget)}{' auto' if self.automatic else ''}"

    def kv_text(self) -> str:
        """"KV cache for 692 tokens" (and how: quantized, chosen by the budget)."""
        how = [f"{self.kv_bits}-bit"] if self.kv_bits else []
        if self.fitted:
            how.append("what the budget leaves")
        elif self.floor:
            how.append("the least without --max-kv-size")
        note = f" ({', '.join(how)})" if how else ""
        return f"KV cache for {self.context} tokens{note}"

    def parts_text(self) -> str:
        """The parts of the minimum, with their bytes."""
        if self.experts is not None:
            _, _, k = self.experts
            return (f"resident weights {format_bytes(self.resident)} + {self.kv_text()} "
                    f"{format_bytes(self.kv)} + working memory {format_bytes(self.work)} + "
                    f"the {k} experts a token routes to, in each of {self.layers} MoE layers "
                    f"{format_bytes(self.routed)}")
        return (f"resident weights {format_bytes(self.resident)} + selection data "
                f"{format_bytes(self.selection)} + one layer of records "
                f"{format_bytes(self.staging)} + {self.kv_text()} {format_bytes(self.kv)} + "
                f"working memory {format_bytes(self.work)}")

    def describe(self) -> str:
        if self.experts is not None:
            slots, count, _ = self.experts
            held = ("the experts of one token, read anew every token" if self.naive else
                    f"{slots} of {count} experts in each of {self.layers} MoE layers")
            if self.prefetch:
                held += f", {self.prefetch} of those slots a prefetch area for the lookahead"
            return (f"resident weights {format_bytes(self.resident)} + {self.kv_text()} "
                    f"{format_bytes(self.kv)} + working memory {format_bytes(self.work)} + "
                    f"expert slots {format_bytes(self.cache_bytes)} ({held})")
        return (f"{self.parts_text()} + neuron caches {format_bytes(self.cache_bytes)} "
                f"({self.complete_layers} of {self.layers} layers complete)")


def arrays_loaded_bytes(arrays: Iterable[mx.array], compute_itemsize: int) -> int:
    """Memory `arrays` take once loaded for compute: float tensors in the compute dtype, the
    rest (quantized weights) as stored. Unevaluated arrays are not read."""
    return sum(a.nbytes * compute_itemsize // a.itemsize
               if mx.issubdtype(a.dtype, mx.floating) else a.nbytes for a in arrays)


def loaded_bytes(path: Path, compute_itemsize: int) -> int:
    """`arrays_loaded_bytes` of the tensors of a safetensors file. Reads only the header."""
    return arrays_loaded_bytes(mx.load(str(path)).values(), compute_itemsize)


def resident_loaded_bytes(bundle: Bundle, compute_itemsize: int) -> int:
    """Memory the resident weights take once loaded: the bundle's own count where it has one
    (`loaded_resident_bytes`: a pipeline rank's view counts only its layers' weights; a model
    streamed from its own files, its resident tensors among the experts), else
    `loaded_bytes` of its resident file."""
    own = getattr(bundle, "loaded_resident_bytes", None)
    return own(compute_itemsize) if own else loaded_bytes(bundle.resident_path,
                                                          compute_itemsize)


def plan_memory(bundle: Bundle, compute_itemsize: int, selection_bytes: int,
                cache_keys: list[tuple[str, tuple[str, ...]]], budget: int | None,
                context: int | None, default_full: bool, caches: bool = True,
                windows: bool = True, kv_quantization: KVQuantization | None = None
                ) -> MemoryPlan:
    """Size each layer's neuron caches. Without a budget every layer's caches hold every
    neuron (`default_full`: complete caches, read once at load) or nothing. With one, what it
    leaves above the minimum goes where it saves the most reads per byte: complete caches for
    whole layers, in layer order (a complete cache saves all of its layer's reads and never
    joins what it holds with what it spills); then, where partial window caches pay
    (`windows`), the rest in equal shares to the other layers, and before that a layer is
    made complete only while those keep `WINDOW_SHARE` of a layer each (a window that holds a
    token's selection saves more per byte than a complete cache). Without `windows` (modes
    whose selections churn: a partial cache spills every token, and joining costs more
    compute than its hits save reads) the rest is left unused. `caches` False (a window of 0
    tokens): no cache at all, whatever the budget leaves. `context` None: DEFAULT_CONTEXT
    tokens of KV cache, or what the budget leaves when it holds fewer (`choose_context`); the
    KV cache comes before the neuron caches (they save reads; it holds the conversation)."""
    config = bundle.config
    n_layers = int(config["num_hidden_layers"])
    resident = resident_loaded_bytes(bundle, compute_itemsize)
    families = {family for family, _ in cache_keys} | {"neuron"}
    staging = sum(staging_rows(bundle.families[f]) * bundle.families[f].record_bytes
                  for f in families)
    # a token's rows gathered out of the caches (and, when a cache cannot hold a token's
    # neurons, joined with those read past it), what computing on them takes (weighted sums
    # convert rows to float32; a compute dtype other than the stored one copies them), buffers
    # MLX keeps for reuse (the loader caps them at a quarter of this) and the engine's
    # Python-side bookkeeping: four staging slices plus 16 MiB (measured: docs/BENCHMARKS.md)
    work = 4 * staging + 16 * 2**20

    def kv_bytes(tokens: int) -> int:
        return kv_cache_bytes(config, compute_itemsize, tokens, kv_quantization)

    fixed_bytes = resident + selection_bytes + staging + work
    context, chooser = choose_context(context, budget, fixed_bytes, kv_bytes)
    plan = MemoryPlan(budget, resident, selection_bytes, staging, kv_bytes(context), context,
                      work=work, layers=n_layers, fitted=chooser == "budget",
                      floor=chooser == "floor", kv_bits=quantized_bits(kv_quantization, context))
    # a cache's rows, and its index arrays: a fixed part per neuron, a part per row
    count = {key: bundle.families[key[0]].count for key in cache_keys}
    row_bytes = {key: bundle.families[key[0]].tensor_bytes(key[1]) + NeuronCache.index_bytes(0, 1)
                 for key in cache_keys}
    fixed = sum(NeuronCache.index_bytes(count[key], 0) for key in cache_keys)  # per layer
    rows_whole = sum(count[key] * row_bytes[key] for key in cache_keys)
    layer_whole = fixed + rows_whole  # one layer's caches, complete
    if budget is not None and budget < plan.minimum:
        raise BudgetError(f"memory budget {format_bytes(budget)} is below the minimum "
                          f"{format_bytes(plan.minimum)} for this model: {plan.parts_text()}"
                          + context_hint(budget, fixed_bytes, kv_bytes))
    room = 0 if budget is None else budget - plan.minimum
    if not caches or not cache_keys:
        complete, fraction = 0, 0.0
    elif budget is None:
        complete, fraction = (n_layers if default_full else 0), 0.0
    else:
        complete = min(n_layers, room // layer_whole)
        while windows and complete and (room - complete * layer_whole
                                        < WINDOW_SHARE * (n_layers - complete) * layer_whole):
            complete -= 1
        share = (room - complete * layer_whole) / max(1, n_layers - complete)
        fraction = min(1.0, max(0, share - fixed) / rows_whole) if windows else 0.0
    for key in cache_keys:
        rows = int(fraction * count[key])
        if rows < MIN_CACHE_FRACTION * count[key]:
            rows = 0
        plan.capacity[key] = [count[key]] * complete + [rows] * (n_layers - complete)
        plan.cache_bytes += sum(n * row_bytes[key] + NeuronCache.index_bytes(count[key], 0)
                                for n in plan.capacity[key] if n)
    plan.complete_layers = sum(all(plan.capacity[key][i] == count[key] for key in cache_keys)
                               for i in range(n_layers)) if cache_keys else 0
    plan.whole = bool(cache_keys) and plan.complete_layers == n_layers
    return plan


def quantized_bits(quantization: KVQuantization | None, context: int) -> int | None:
    """The bits of a KV cache quantized within `context` tokens (None: float there)."""
    return quantization.bits if quantization and quantization.start < context else None


def _expert_sizes(bundle: Bundle, itemsize: int, context: int, policy: str,
                  kv_quantization: KVQuantization | None = None
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
    # a model streamed from its own files (mlx_flash.expert_index): pieces stored in another
    # dtype are staged on admission
    resident = resident_loaded_bytes(bundle, itemsize)
    plan = MemoryPlan(None, resident, 0, 0,
                      kv_cache_bytes(bundle.config, itemsize, context, kv_quantization),
                      context, work=2 * k * float_row + 32 * 2**20
                      + getattr(bundle, "stage_bytes", 0), layers=layers,
                      kv_bits=quantized_bits(kv_quantization, context))
    # the caches' slot maps, and their policy's state
    return (plan, layers * (NeuronCache.index_bytes(fam.count, 0)
                            + POLICIES[policy].state_bytes(fam.count)),
            layers * (fam.tensor_bytes(fam.tensors) + NeuronCache.index_bytes(0, 1)))


def expert_budget(bundle: Bundle, itemsize: int, context: int, slots: int,
                  policy: str = DEFAULT_POLICY,
                  kv_quantization: KVQuantization | None = None) -> int:
    """The memory budget that gives each MoE layer `slots` expert slots."""
    plan, index, slot_bytes = _expert_sizes(bundle, itemsize, context, policy, kv_quantization)
    return plan.minimum + index + slots * slot_bytes


def expert_plan(bundle: Bundle, itemsize: int, budget: int | str | None, context: int | None,
                policy: str = DEFAULT_POLICY,
                kv_quantization: KVQuantization | None = None) -> MemoryPlan:
    """Size the per-layer expert matrices. A set budget: as many slots per layer as it
    leaves (at least the experts a token routes to: BudgetError naming the minimum); "auto":
    every expert when the model fits in AUTO_SHARE of the memory available, else that share;
    None: every expert; "off": the experts of one token, read anew every token (naive).
    `context` None: as `plan_memory` chooses it (the KV cache before expert slots past the
    experts a token routes to)."""
    fam = bundle.families[EXPERTS]
    k = int(bundle.config["num_experts_per_tok"])
    set_budget = None if budget in (None, "off", "auto") else parse_size(budget)

    def kv_bytes(tokens: int) -> int:
        return kv_cache_bytes(bundle.config, itemsize, tokens, kv_quantization)

    bare, index, slot_bytes = _expert_sizes(bundle, itemsize, 0, policy, kv_quantization)
    fixed = bare.minimum + index + k * slot_bytes  # all of the minimum but the KV cache
    context, chooser = choose_context(context, set_budget, fixed, kv_bytes)
    plan, index, slot_bytes = _expert_sizes(bundle, itemsize, context, policy, kv_quantization)
    plan.fitted, plan.floor = chooser == "budget", chooser == "floor"
    plan.naive, plan.routed = budget == "off", index + k * slot_bytes
    n = fam.count if budget is None else k
    plan.experts = (n, fam.count, k)  # the error below lists the part of the k routed to
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
                f"{format_bytes(plan.minimum + plan.routed)} for this model: "
                f"{plan.parts_text()}" + context_hint(plan.budget, fixed, kv_bytes))
    plan.experts = (int(n), fam.count, k)
    plan.capacity[(EXPERTS, fam.tensors)] = [int(n) if size else 0 for _, size in fam.segments]
    plan.cache_bytes = index + int(n) * slot_bytes
    plan.whole = n == fam.count
    plan.complete_layers = plan.layers if plan.whole else 0
    return plan


def reserve_prefetch(plan: MemoryPlan, rows: int) -> int:
    """Lend up to `rows` of an expert plan's slots to a prefetch area shared by all MoE
    layers, which the lookahead reads the next layer's guessed experts into (never into a
    cache: a wrong guess then costs bytes, not hits). One slot at a time from the layer
    holding the most (the lower layer on ties), none left with fewer than the experts a token
    routes to; the bytes planned stay the same (a prefetch row is a slot, its index entries
    aside). Returns the rows lent: 0 for a plan that holds every expert or reads every
    token's anew (nothing to guess, or no slot to spare)."""
    if plan.experts is None or plan.whole or plan.naive or rows <= 0:
        return 0
    _, _, k = plan.experts
    (key,) = plan.capacity
    slots = plan.capacity[key]
    moe = [i for i, n in enumerate(slots) if n]
    lent = 0
    while lent < rows:
        layer = max(moe, key=lambda i: (slots[i], -i))
        if slots[layer] <= k:
            break
        slots[layer] -= 1
        lent += 1
    plan.prefetch = lent
    return lent


STAGING_BYTES = 16 * 2**20  # a staging matrix holds a whole layer, or this much of one


def staging_rows(family: RecordFamily) -> int:
    return min(family.count, max(1, STAGING_BYTES // family.record_bytes))
