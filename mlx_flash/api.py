"""The public Python API: `mlx_flash.load`, a model by name, ready for mlx-lm's generate."""

from __future__ import annotations

import os
import sys
from typing import Any

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .calibrate import default_bundle
from .disk_probe import tune_reads
from .eviction import DEFAULT_POLICY
from .loader import EngineOptions, bundle_tokenizer, open_model
from .memory import KVQuantization
from .paths import resolve_model
from .pipeline import synchronize
from .sysmem import rss_bytes


def load(
    path: str | os.PathLike | None = None,
    *,
    compute_dtype: str | None = None,
    verify: bool = False,
    tokenizer_config: dict[str, Any] | None = None,
    dtype: str | None = None,
    sparsity: str | None = None,
    memory_budget: int | str | None = "auto",
    window: int = 5,
    context: int | None = 2048,
    threads: int = 8,
    cold: bool | None = None,
    rotating_kv: bool = False,
    lookahead: bool = False,
    expert_policy: str = DEFAULT_POLICY,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
    pipeline_group: Any = None,
    pipeline_split: list[int] | None = None,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a flash bundle as `(model, tokenizer)` for mlx-lm's generate / stream_generate.

    `path` is a bundle, or a GGUF file / model folder that is converted (to `dtype`) into the
    cache on first use (default: as `convert` does, a quantized source's quantization kept, a
    float source in `default_dtype()`); None means the embedded default model, calibrated on
    first use. A Mixture-of-Experts model folder (mlx-lm's, float or quantized, or Hugging
    Face's), MoE GGUF file, or a Hub id naming one, given no `dtype` is not converted: its
    experts are read from its own files, only an index of where they lie (and a GGUF's
    tokenizer) is written (docs/MOE.md).
    `compute_dtype` (default: the bundle's dtype) is what the resident weights and the
    records are computed in. `verify` checks every file's sha256 before use (a folder read in
    place: its weight files'). `sparsity` picks the selection mode: one calibrated in the
    bundle (`python -m mlx_flash.calibrate`), "off", or None for the bundle's default.
    `memory_budget` (bytes, or "150MB") bounds resident weights, selection data, KV cache for
    `context` tokens (such a model's `make_cache` allocates it at once; past `context` it
    rotates with `rotating_kv`, as mlx-lm's max_kv_size does, with or without a budget; else
    it grows past the budget) and the per-layer neuron caches, which keep the neurons of the
    last `window` tokens (BudgetError when it cannot be met). "auto" (the default): the model
    whole when it fits in 75% of the memory available, else that share (`budget_plan`);
    "off": no caches, every token reads what it selects (the naive engine). `context` None:
    2048 tokens, or as many as the budget leaves when it holds fewer (at least 256, before
    any neuron cache; the model's `flash.plan.context` says how many). `kv_bits`,
    `kv_group_size`, `quantized_kv_start`: the KV cache quantization you will ask mlx-lm's
    generate for (same names and defaults), for the plan to count: from token 0 the model's
    `make_cache` gives quantized caches itself; from a later token within `context` the plan
    counts the float cache and mlx-lm's quantized copy of it. `threads` read in
    parallel; `cold` bypasses the OS page cache (None: on macOS, where the page cache and
    the budget share one unified memory, not elsewhere), and then the disk is measured once
    (`mlx_flash.disk_probe`: printed on the first run on a disk) and reads merge across gaps
    it reads faster than it starts a read; `lookahead` reads the next layer's likely
    records while its attention computes (modes that can guess them: predictor; MoE models:
    the next layer's router). `expert_policy` (MoE models) picks the resident expert that
    makes room for a missing one: a name of `eviction.POLICIES`. The model's
    `flash` attribute is its FlashEngine, whose `stats` count flash reads and whose
    `runtime_rss` is the process's resident memory just before the model was loaded (the
    tokenizer already was). `pipeline_group` (an `mx.distributed` group, e.g.
    `mx.distributed.init()` under mlx.launch): split the model by layers over its ranks as
    mlx-lm's `pipeline()` does (even, or `pipeline_split` layers per rank, rank 0 first);
    this rank loads, reads and budgets only its layers (`model.flash.stage` says which;
    docs/PIPELINE.md). Every rank must then run the same generation.
    """
    if cold is None:
        cold = sys.platform == "darwin"
    bundle = resolve_model(default_bundle(dtype) if path is None else path, dtype=dtype,
                           verify=verify)
    tokenizer = bundle_tokenizer(bundle, tokenizer_config)
    runtime = rss_bytes()
    kv_quantization = None if kv_bits is None else KVQuantization(kv_bits, kv_group_size,
                                                                  quantized_kv_start)
    model = open_model(bundle, compute_dtype, sparsity, EngineOptions(
        memory_budget, window, context, threads, cold, rotating_kv=rotating_kv,
        lookahead=lookahead, expert_policy=expert_policy, kv_quantization=kv_quantization,
        pipeline_group=pipeline_group, pipeline_split=pipeline_split))
    model.flash.runtime_rss = runtime
    if cold and not model.flash.plan.whole:  # reads reach the disk: fit them to it
        line, measured = tune_reads(model.flash, threads)
        if measured:
            print(line, file=sys.stderr)
    if pipeline_group is not None:
        synchronize(pipeline_group)
    return model, tokenizer
