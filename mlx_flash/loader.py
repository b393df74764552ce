"""`mlx_flash.load`: an mlx-lm model whose FFNs read their weights from a flash bundle."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .arch import Architecture, FFNSpec, get_architecture
from .arch.moe import MOE_TYPES, TENSORS, check_moe_config, expert_layout, flash_model
from .bundle import DTYPES, EXPERTS, ITEMSIZE, Bundle
from .errors import BundleError, UnsupportedModel
from .eviction import DEFAULT_POLICY, POLICIES
from .ffn import FlashEngine, FlashFFN
from .flash_io import FlashReader
from .memory import (
    AUTO_SHARE,
    KVQuantization,
    MemoryPlan,
    expert_plan,
    head_dim,
    loaded_bytes,
    plan_memory,
)
from .moe import ExpertEngine
from .neuron_matrix import NeuronMatrix
from .pipeline import RankView, Stage, attach_engine, place_capacities, split_model
from .selection import Mode, load_mode
from .sysmem import available_memory, parse_size, return_freed_memory


def default_dtype() -> str:
    """The dtype for bundles converted without one, chosen by measurement: Metal computes
    float16 natively; MLX's CPU backend runs bfloat16 about twice as fast as float16
    (docs/BENCHMARKS.md)."""
    return "float16" if mx.metal.is_available() else "bfloat16"


def compute_dtype_for(bundle: Bundle) -> str:
    """The dtype a bundle computes in unless told: its own, except quantized bundles on MLX's
    CPU backend, whose quantized products are 7x (bfloat16) to 30x (float16) slower than in
    float32 there (docs/BENCHMARKS.md); quantized weights stay packed either way."""
    quantized = bundle.config.get("quantization") or any(
        f.quantization for f in bundle.families.values())
    return "float32" if quantized and not mx.metal.is_available() else bundle.dtype


def blas_hint() -> str | None:
    """On Linux, MLX's CPU backend links a slow reference BLAS; preloading OpenBLAS makes its
    float32 matrix products 10-20x faster (docs/BENCHMARKS.md). The hint, when it applies."""
    import glob
    import sys

    if sys.platform != "linux" or mx.metal.is_available():
        return None
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return None
    found = sorted(glob.glob("/usr/lib/*/libopenblas.so.0"))
    how = f"LD_PRELOAD={found[0]}" if found else \
        "apt install libopenblas0-pthread, then LD_PRELOAD=/usr/lib/<arch>/libopenblas.so.0"
    return f"hint: for float32 matrix products 10-20x faster on MLX's CPU backend, run with {how}"


def build_flash_model(arch: Architecture, config: dict[str, Any], spec: FFNSpec,
                      engine: FlashEngine | None) -> nn.Module:
    """The architecture's model with every layer's MLP replaced by a FlashFFN.

    Parameters are lazy and never evaluated before the resident weights replace them, so this
    allocates nothing for the FFNs (nor, yet, for the rest).
    """
    model = arch.build(config)
    for i, layer in enumerate(arch.layers(model)):
        layer.mlp = FlashFFN(engine, i, spec)
    return model


def quantize_resident(model: nn.Module, config: dict[str, Any],
                      weights: dict[str, mx.array]) -> None:
    """Make the modules whose weights are stored quantized quantized modules, as mlx-lm does
    for a config with a "quantization" entry (per-module bits and group size included)."""
    q = config.get("quantization")
    if not q:
        return

    def predicate(path: str, module: nn.Module) -> bool | dict[str, int]:
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        return q.get(path, True)

    nn.quantize(model, group_size=q["group_size"], bits=q["bits"], class_predicate=predicate)


def kv_caches(n_layers: int, context: int, rotating: bool,
              quantization: KVQuantization | None = None
              ) -> list[KVCache | RotatingKVCache | QuantizedKVCache]:
    """KV caches that allocate `context` tokens at once (mlx-lm's own grow in 256-token steps
    by concatenation). Budgeted models make these: the plan counts KV memory for `context`
    tokens, and mlx-lm's steps put an 82-layer OPT-shaped model 344 MB over a 64-token plan
    (measured). Past `context` they rotate (`rotating`: mlx-lm's max_kv_size, keeping the
    first 4 tokens, as mlx-lm does) or grow by another `context` tokens, over the plan.
    Quantized from the first token (`quantization.start` 0): mlx-lm's QuantizedKVCache, so
    that the float cache the plan does not count is never made (mlx-lm would make one for
    the first prefill step, then quantize it); from a later token, mlx-lm's generate converts
    the float cache itself (`maybe_quantize_kv_cache`)."""
    if quantization is not None and quantization.start == 0 and not rotating:
        caches = [QuantizedKVCache(quantization.group_size, quantization.bits)
                  for _ in range(n_layers)]
    else:
        caches = [RotatingKVCache(max_size=context, keep=4) if rotating else KVCache()
                  for _ in range(n_layers)]
    for cache in caches:
        cache.step = context
    return caches


# More read threads than this only add contention: tools/flash_profile.py flattens beyond 8,
# and 100000 threads made a run crawl for minutes (issue 13).
MAX_THREADS = 64


@dataclass
class EngineOptions:
    """How the flash engine runs (see `load` and `budget_plan`)."""

    memory_budget: int | str | None = None  # bytes, "250MB", "auto", "off"; None: no budget
    window: int = 5
    # tokens of KV cache the plan holds; None: 2048, or what a budget leaves (at least 256)
    context: int | None = 2048
    threads: int = 8  # parallel reads: flash_profile flattens beyond 8 (docs/BENCHMARKS.md)
    cold: bool = False
    use_mmap: bool = False  # read records out of a memory map (the benchmark's "mmap" engine)
    rotating_kv: bool = False  # past `context` tokens the KV cache rotates (max_kv_size)
    # read the next layer's likely records while its attention computes: off unless asked.
    # Wrong guesses cost reads, never hits: on the ReLU fixture (caches of 60%, window 5, 40
    # tokens) 5.3 vs 2.0 MB read, hit rate equal; the quick MoE model gains unthrottled, not
    # at 20 MB/s (docs/BENCHMARKS.md, "Overlap: on and off, in both regimes")
    lookahead: bool = False
    # MoE models: which resident expert makes room for a missing one (mlx_flash.eviction)
    expert_policy: str = DEFAULT_POLICY
    # mlx-lm's KV cache quantization (kv_bits): the plan counts the quantized cache
    kv_quantization: KVQuantization | None = None
    # an mx.distributed group to pipeline the model over (mlx_flash.pipeline): this rank
    # loads, reads and budgets only its layers; `pipeline_split`: layers per rank, rank 0
    # first (None: even, as mlx-lm's pipeline())
    pipeline_group: Any = None
    pipeline_split: list[int] | str | None = None  # or "budget": by each rank's budget

    def check(self) -> None:
        """ValueError for settings out of range (the command lines check them too)."""
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be 1 to {MAX_THREADS}, not {self.threads}")
        if self.window < 0 or (self.context is not None and self.context < 1):
            raise ValueError(f"window must be >= 0 and context >= 1, not {self.window} and "
                             f"{self.context}")
        if self.expert_policy not in POLICIES:
            raise ValueError(f"expert policy must be one of {', '.join(POLICIES)}, not "
                             f"{self.expert_policy!r}")
        q = self.kv_quantization
        if q is not None:
            if self.rotating_kv:
                raise ValueError("mlx-lm cannot quantize a rotating KV cache: kv_bits "
                                 "(--kv-bits) and rotating_kv (--max-kv-size) exclude each "
                                 "other")
            if q.bits not in (2, 3, 4, 5, 6, 8) or q.group_size not in (32, 64, 128) \
                    or q.start < 0:
                raise ValueError(f"KV cache quantization: bits must be 2 to 6 or 8, the group "
                                 f"size 32, 64 or 128 and the start >= 0, not {q.bits}, "
                                 f"{q.group_size} and {q.start}")

    def check_model(self, config: dict[str, Any]) -> None:
        """ValueError for settings the model cannot take."""
        q = self.kv_quantization
        if q is not None and head_dim(config) % q.group_size:
            raise ValueError(f"--kv-group-size {q.group_size} does not divide this model's "
                             f"head size {head_dim(config)}: mlx-lm cannot quantize its KV "
                             "cache in such groups")


def budget_plan(bundle: Bundle, itemsize: int, selection: int, mode: Mode,
                options: EngineOptions) -> MemoryPlan:
    """The memory plan for `options.memory_budget`: a size; "off" (no budget, no caches: every
    token reads what it selects); None (no budget: sparse modes hold every neuron, "off"
    none); or "auto": the model whole when it fits in AUTO_SHARE of the memory available —
    every cache complete, read once at load, nothing read per token — else that share of it
    (at least the model's minimum)."""
    def plan(budget: int | None, full: bool = mode.name != "off") -> MemoryPlan:
        return plan_memory(bundle, itemsize, selection, mode.cache_keys, budget,
                           options.context, default_full=full, caches=options.window > 0
                           and options.memory_budget != "off", windows=not mode.churns,
                           kv_quantization=options.kv_quantization)

    if options.memory_budget in (None, "off"):
        return plan(None)
    if options.memory_budget != "auto":
        return plan(parse_size(options.memory_budget))
    whole = plan(None, full=True)
    share = int(AUTO_SHARE * available_memory())
    automatic = plan(max(whole.minimum, min(whole.total, share)))
    automatic.automatic = True
    return automatic


def open_model(bundle: Bundle, compute_dtype: str | None = None,
               sparsity: str | None = None, options: EngineOptions | None = None) -> nn.Module:
    """Build the flash model for an opened bundle and load its resident weights.

    `sparsity`: a selection mode calibrated in the bundle, "off" (every neuron), or None for
    the bundle's default mode (dense when none is calibrated)."""
    options = options or EngineOptions()
    options.check()
    try:  # the bundle layer knows the format, not the models: their configs are checked here
        check_moe_config(bundle.config) if EXPERTS in bundle.families \
            else get_architecture(bundle.config)
    except UnsupportedModel as e:
        raise BundleError(f"{bundle.path}: {e}") from None
    options.check_model(bundle.config)
    if EXPERTS in bundle.families:  # an MoE model: the router selects, experts are records
        if sparsity not in (None, "off"):
            raise BundleError(f"{bundle.path}: an MoE model's experts are the ones its router "
                              f"picks: no selection mode {sparsity!r}")
        return open_moe_model(bundle, compute_dtype, options)
    arch = get_architecture(bundle.config)
    spec = arch.ffn_spec(bundle.config)
    fam = bundle.families.get("neuron")
    expected, _ = spec.record_layout(fam.dtype, fam.quantization) if fam else ((), 0)

    def shapes(parts):
        return [(p.name, p.length, p.dtype) for p in parts]

    if fam is None or shapes(fam.parts) != shapes(expected) \
            or fam.count != spec.intermediate_size:
        raise BundleError(f"{bundle.path}: neuron records do not match the {arch.name} FFN layout")
    dtype = DTYPES[compute_dtype or compute_dtype_for(bundle)]
    try:
        mode = load_mode(bundle, spec, sparsity, dtype)
    except (KeyError, ValueError) as e:
        raise BundleError(f"{bundle.path}: {e}") from None
    info = bundle.selection["modes"].get(mode.name, {})
    itemsize = ITEMSIZE[str(dtype).rsplit(".", 1)[-1]]
    selection = loaded_bytes(bundle.path / info["file"], itemsize) if info.get("file") else 0
    model = build_flash_model(arch, bundle.config, spec, None)
    stage = pipeline_stage(model, options)
    view = bundle if stage is None else RankView(bundle, stage)
    plan = budget_plan(view, itemsize, selection, mode, options)
    if sparsity is None and mode.name != "off" and plan.whole and options.memory_budget:
        # The budget holds the model whole: a selection would save no reads, only cost
        # compute (hybrid: 1.77x mlx-lm's decode time in the budget sweep, docs/BENCHMARKS.md)
        # and accuracy. The bundle's default mode is then the dense FFN, when the budget
        # holds its records whole too; a mode named is kept.
        dense = Mode(spec, bundle.families)
        dense_plan = budget_plan(view, itemsize, 0, dense, options)
        if dense_plan.whole:
            mode, plan = dense, dense_plan
    if stage is not None:
        place_capacities(plan, stage)
    keep_within(plan)
    engine = FlashEngine(view, spec, mode, dtype, plan, options.window, options.threads,
                         options.cold, options.use_mmap, options.lookahead)
    attach_engine(model, engine)
    return finish_model(model, view, engine, dtype, len(arch.layers(model)), options)


def pipeline_stage(model: nn.Module, options: EngineOptions) -> Stage | None:
    """Split `model` over `options.pipeline_group` (None: not pipelined)."""
    if options.pipeline_group is None:
        return None
    budget = options.memory_budget
    mine = available_memory() if budget in (None, "auto", "off") else parse_size(budget)
    try:
        return split_model(model, options.pipeline_group, options.pipeline_split, mine)
    except ValueError as e:  # mlx-lm's: a split that does not fit the layers or the ranks
        raise UnsupportedModel(f"--pipeline-split: {e}") from None


def keep_within(plan: MemoryPlan) -> None:
    """Under a budget, the freed buffers MLX keeps for reuse (they count in the process's
    memory) stay within the plan's working memory, and the C allocator returns what it frees."""
    if plan.budget is not None:
        mx.set_cache_limit(plan.work // 4)
        return_freed_memory()


def finish_model(model: nn.Module, bundle: Bundle, engine: Any, dtype: mx.Dtype,
                 n_layers: int, options: EngineOptions) -> nn.Module:
    """Load a flash model's resident weights (in `dtype`), give it its KV caches and its
    engine (`model.flash`)."""
    # A budget the user set holds its KV cache from the start (an automatic one leaves room:
    # mlx-lm's caches grow as the context does, and a short answer takes little memory).
    # make_prompt_cache asks the model first (a model's make_cache overrides
    # make_prompt_cache's max_kv_size: `rotating_kv` is it).
    plan = engine.plan
    if plan.budget is not None and not plan.automatic or options.rotating_kv:
        model.make_cache = partial(kv_caches, n_layers, plan.context, options.rotating_kv,
                                   options.kv_quantization)
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in bundle.load_resident().items()}
    quantize_resident(model, bundle.config, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BundleError(f"{bundle.path}: resident weights do not fit the model: {e}") from None
    model.eval()
    mx.eval(model.parameters())
    model.flash = engine
    engine.stage = getattr(bundle, "stage", None)  # a pipeline's rank: its layers
    return model


def bundle_tokenizer(bundle: Bundle, tokenizer_config: dict[str, Any] | None = None
                     ) -> TokenizerWrapper:
    """The bundle's tokenizer, as mlx-lm loads it. Told nothing, transformers asks on the
    terminal whether to run a tokenizer's own code (auto_map): never ask; unless the caller
    trusts it, refuse such a tokenizer in one line."""
    from mlx_lm.utils import load_tokenizer

    config = {"trust_remote_code": False, **(tokenizer_config or {})}
    try:
        return load_tokenizer(Path(bundle.tokenizer_path), config,
                              eos_token_ids=bundle.config.get("eos_token_id"))
    except ValueError:
        settings = Path(bundle.tokenizer_path) / "tokenizer_config.json"
        if config["trust_remote_code"] or not (settings.is_file()
                                               and "auto_map" in settings.read_text()):
            raise
        raise BundleError(f"{bundle.tokenizer_path}: the tokenizer needs its own Python code "
                          "(auto_map in tokenizer_config.json), which mlx_flash does not run"
                          ) from None


def load_dense(path: str | os.PathLike, compute_dtype: str | None = None) -> nn.Module:
    """The bundle's model with every weight in memory, its FFN read back from the records:
    the dense baseline for architectures mlx-lm lacks (OPT). No flash, no selection."""
    bundle = Bundle.open(path)
    config = bundle.config
    arch = get_architecture(config)
    spec = arch.ffn_spec(config)
    if (arch.name, spec.activation) not in (("llama", "silu"), ("opt", "relu")):
        raise BundleError(f"no dense {arch.name} model computes {spec.activation}")
    dtype = DTYPES[compute_dtype or bundle.dtype]
    weights = dict(bundle.load_resident())
    fam = bundle.families["neuron"]
    if fam.quantization or config.get("quantization"):
        raise BundleError(f"{bundle.path} is quantized: the dense baseline reads float records")
    matrix = NeuronMatrix(fam, fam.count)
    reader = FlashReader(bundle.ffn_path)
    every = np.arange(fam.count)
    for layer in range(int(config["num_hidden_layers"])):
        reader.read_records(fam, layer, every, every, matrix)
        for role, name in arch.ffn_source_names(layer).items():
            if role == "down_bias":
                value = weights.pop(f"{arch.layer_prefix(layer)}.mlp.bias")
            else:
                part = matrix.parts[role]
                value = part.T if role == "down" else part.reshape(-1) if role == "up_bias" \
                    else part
                value = value * 1  # an array of its own: the next layer is read over `part`
                mx.eval(value)
            weights[arch.resident_name(name, config)] = value
    reader.close()
    model = arch.build(config)
    model.load_weights([(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
                        for k, v in weights.items()])
    model.eval()
    mx.eval(model.parameters())
    return model


def open_moe_model(bundle: Bundle, compute_dtype: str | None, options) -> nn.Module:
    """mlx-lm's model for an MoE bundle, its routed experts served by an ExpertEngine."""
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
    model, routed = flash_model(dict(bundle.config), None)
    stage = pipeline_stage(model, options)
    if stage is not None:
        bundle = RankView(bundle, stage)
        fam = bundle.families[EXPERTS]
        routed = {i: r for i, r in routed.items() if stage.start <= i < stage.end}
    plan = expert_plan(bundle, ITEMSIZE[name], budget, options.context, options.expert_policy,
                       options.kv_quantization)
    keep_within(plan)
    k = int(bundle.config["num_experts_per_tok"])
    engine = ExpertEngine(bundle, plan, dtype, options.threads, options.cold, options.use_mmap,
                          naive=budget == "off",
                          lookahead=k if options.lookahead else 0,
                          policy=options.expert_policy)
    attach_engine(model, engine)
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
