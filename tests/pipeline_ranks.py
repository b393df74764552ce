"""One rank of a pipelined decode, run under mlx.launch by tests/test_pipeline.py (also as a
single process, for the reference): for each case (a bundle, a selection mode) and each
budget, load the bundle split over the group, decode greedily, and write what this rank
computed (logits, its layers, what it loaded and read) to OUT/rank<r>.json and .npz.

    python tests/pipeline_ranks.py CASES.json OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash
from mlx_flash.pipeline import LAYER_NAME

PROMPT = [5, 40, 77, 100, 9, 33, 61]
STEPS = 12
HUGE = 10**12


def greedy_logits(model, prompt: list[int], steps: int) -> np.ndarray:
    """`[steps, vocab]` float32: the logits of `steps` greedy decode tokens after `prompt`
    (tests/tiny_models.py's, but evaluating every forward it builds: a pipelined flash
    model's rank 0 waits on rank 1 inside its first layer, so a forward one rank builds and
    never evaluates leaves the others waiting)."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    out = [np.array(logits.astype(mx.float32))]
    while len(out) < steps:
        logits = model(mx.argmax(logits, axis=-1)[:, None], cache=cache)[:, -1]
        out.append(np.array(logits.astype(mx.float32)))
    return np.concatenate(out)


def loaded(model) -> dict[str, int]:
    """Bytes of the parameters this process holds: in layers (by layer) and in none."""
    out: dict[str, int] = {}
    for name, value in tree_flatten(model.parameters()):
        found = LAYER_NAME.search(name)
        key = found.group(1) if found else "shared"
        out[key] = out.get(key, 0) + value.nbytes
    return out


def budgets(path: str, mode: str, group) -> list:
    """No budget, "off" (naive: every token reads what it selects), this rank's minimum and
    budgets leaving its caches 1/8 and 1/2 of its layers (each rank its own: its plan counts
    only its layers)."""
    model, _ = mlx_flash.load(path, sparsity=mode, memory_budget=HUGE, pipeline_group=group)
    plan = model.flash.plan
    least = plan.minimum + plan.routed  # an MoE model's: with a token's experts
    room = plan.total - least
    return [None, "off", least] + [least + int(f * room) for f in (0.125, 0.5)]


def main(cases_path: str, out: str) -> None:
    group = mx.distributed.init()
    pipelined = group if group.size() > 1 else None
    results, arrays = [], {}
    for c, case in enumerate(json.loads(Path(cases_path).read_text())):
        for b, budget in enumerate(budgets(case["path"], case["mode"], pipelined)):
            model, _ = mlx_flash.load(case["path"], sparsity=case["mode"], threads=1,
                                      memory_budget=budget, pipeline_group=pipelined)
            arrays[f"{c}_{b}"] = greedy_logits(model, PROMPT, STEPS)
            engine = model.flash
            stage = engine.stage
            results.append({
                "case": c, "budget": budget, "layers": None if stage is None else
                [stage.start, stage.end], "loaded": loaded(model),
                "cached_layers": sorted({k if isinstance(k, int) else k[0]
                                         for k in engine.caches}),
                "decode_bytes": engine.stats.decode.bytes,
                "decode_tokens": engine.stats.decode.tokens,
                "resident": engine.plan.resident, "ffn_bytes": engine.bundle.ffn_bytes})
    rank = group.rank()
    np.savez(Path(out) / f"rank{rank}.npz", **arrays)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # leave together


if __name__ == "__main__":
    main(*sys.argv[1:])
