"""Measure a selection mode: perplexity and what each token reads, on the same tokens.

    python -m mlx_flash.evaluate BUNDLE --data TEXT [--tokens N] [--ctx C] [--mode M]
                                 [--json OUT]

Uses the LAST N tokens of TEXT (calibration uses the first ones), in windows of C tokens, and
reports perplexity three ways — dense (every neuron), oracle (each token keeps the neurons with
the largest |h|, as many as the mode uses on average, computed from all weights), and the
mode — with the fraction of the FFN's bytes each token reads (before any cache), per layer too;
for predictor modes also recall and precision of the truly active neurons.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .argtypes import DTYPE_CHOICES, Parser, int_in, interruptible
from .bundle import EXPERTS, Bundle
from .calibrate import fit_context, layer_weights, text_tokens, true_active, windows
from .errors import BundleError
from .ffn import FlashEngine
from .hub import is_hub_id
from .loader import blas_hint, bundle_tokenizer, open_model
from .paths import resolve_bundle
from .selection import MODES, LayerReads, Mode, Oracle, load_mode

# A perplexity over fewer tokens is mostly noise (and over none, a division by zero)
MIN_TOKENS = 256


def perplexity(model: nn.Module, tokens: list[int], ctx: int, desc: str,
               progress: bool) -> float:
    """exp(mean next-token loss) over `tokens`, in independent windows of `ctx` + 1 tokens."""
    nll, count = 0.0, 0
    for w in tqdm(windows(tokens, ctx + 1), desc=desc, unit="window", disable=not progress):
        if len(w) < 2:
            continue
        logits = model(mx.array([w[:-1]])).astype(mx.float32)
        nll += nn.losses.cross_entropy(logits, mx.array([w[1:]]), reduction="sum").item()
        count += len(w) - 1
    return math.exp(nll / count)


class ReadStats:
    """Per layer: bytes needed per token, neurons used, and (predictor) recall / precision."""

    def __init__(self, engine: FlashEngine, truth: bool):
        n_layers = len(engine.families["neuron"].segments)
        self.engine, self.truth = engine, truth
        self.bytes = np.zeros(n_layers)
        self.neurons = np.zeros(n_layers)
        self.hits = np.zeros(n_layers)
        self.active = np.zeros(n_layers)
        self.chosen = np.zeros(n_layers)
        self.tokens = np.zeros(n_layers)
        self._weights: dict[int, dict[str, mx.array]] = {}

    def __call__(self, layer: int, x: mx.array, reads: LayerReads) -> None:
        self.tokens[layer] += x.shape[0]
        self.bytes[layer] += reads.bytes.sum()
        if reads.neurons is None:
            self.neurons[layer] += x.shape[0] * self.engine.spec.intermediate_size
            return
        used = reads.neurons
        self.neurons[layer] += used.sum().item()
        if self.truth:
            if layer not in self._weights:  # read once: the mode's own reads are done
                self._weights[layer] = layer_weights(self.engine, layer)[0]
            active = true_active(self.engine.spec, x.astype(mx.float32), self._weights[layer],
                                 label_keep=0.5)
            self.hits[layer] += (used & active).sum().item()
            self.active[layer] += active.sum().item()
            self.chosen[layer] += used.sum().item()


def run_mode(model: nn.Module, mode: Mode, tokens: list[int], ctx: int, truth: bool,
             progress: bool) -> tuple[float, ReadStats]:
    engine: FlashEngine = model.flash
    stats = ReadStats(engine, truth)
    engine.mode, engine.observer = mode, stats
    engine.dense_prefill = False  # score each token's own selection
    try:
        ppl = perplexity(model, tokens, ctx, f"perplexity ({mode.name})", progress)
    finally:
        engine.observer = None
    return ppl, stats


def evaluate(path: str | Path, data: str | Path, tokens: int = 4096, ctx: int = 512,
             mode: str | None = None, compute_dtype: str | None = "float32",
             progress: bool = True) -> dict[str, Any]:
    bundle = Bundle.open(path)
    if EXPERTS in bundle.families:
        return evaluate_moe(bundle, data, tokens, ctx, compute_dtype, progress)
    model = open_model(bundle, compute_dtype, sparsity="off")
    engine: FlashEngine = model.flash
    spec, n_layers = engine.spec, len(engine.families["neuron"].segments)
    name = mode or bundle.selection.get("default") or "off"
    sparse = load_mode(bundle, spec, name, engine.compute_dtype)
    tokenizer = bundle_tokenizer(bundle)
    ids = text_tokens(tokenizer, data)[-(tokens + 1):]
    if len(ids) - 1 < MIN_TOKENS:
        raise ValueError(f"evaluation needs at least {MIN_TOKENS} tokens of text to score; "
                         f"{max(len(ids) - 1, 0)} given ({Path(data).name})")
    ctx = fit_context(bundle.config, ctx)

    ppl_dense, _ = run_mode(model, Mode(spec, bundle.families), ids, ctx, False, progress)
    ppl_sparse, st = run_mode(model, sparse, ids, ctx, name == "predictor", progress)
    keep = float(st.neurons.sum() / (st.tokens.sum() * spec.intermediate_size))
    ppl_oracle, _ = run_mode(model, Oracle(spec, bundle.families, keep), ids, ctx, False,
                             progress)

    layer_bytes = bundle.ffn_bytes / n_layers
    has_truth = name == "predictor"
    layers = []
    for i in range(n_layers):
        layers.append({
            "layer": i,
            "ffn_bytes_fraction": st.bytes[i] / st.tokens[i] / layer_bytes,
            "ffn_bytes_per_token": st.bytes[i] / st.tokens[i],
            "neurons_fraction": st.neurons[i] / st.tokens[i] / spec.intermediate_size,
            "recall": st.hits[i] / max(st.active[i], 1) if has_truth else None,
            "precision": st.hits[i] / max(st.chosen[i], 1) if has_truth else None,
            "active_fraction": (st.active[i] / st.tokens[i] / spec.intermediate_size
                                if has_truth else None),
        })
    per_token = float(st.bytes.sum() / st.tokens[0])
    info = bundle.selection["modes"].get(name, {})
    return {
        "bundle": str(bundle.path),
        "data": Path(data).name,
        "tokens": len(ids) - 1,
        "ctx": ctx,
        "mode": name,
        "compute_dtype": str(engine.compute_dtype).rsplit(".", 1)[-1],
        "target": info.get("target"),
        "calibration_tokens": info.get("calibration", {}).get("tokens"),
        "ppl_dense": ppl_dense,
        "ppl_oracle": ppl_oracle,
        "ppl_sparse": ppl_sparse,
        "oracle_keep": keep,
        "recall_mean": (float(np.mean([la["recall"] for la in layers]))
                        if has_truth else None),
        "precision_mean": (float(np.mean([la["precision"] for la in layers]))
                           if has_truth else None),
        "ffn_bytes_fraction": per_token / bundle.ffn_bytes,
        "ffn_bytes_per_token": per_token,
        "neurons_fraction": keep,
        "resident_selection_bytes": (bundle.file_bytes(info["file"]) if info.get("file")
                                     else 0),
        "layers": layers,
    }


def evaluate_moe(bundle: Bundle, data: str | Path, tokens: int, ctx: int,
                 compute_dtype: str | None, progress: bool) -> dict[str, Any]:
    """An MoE model's perplexity with the experts its router picks (the only selection: no
    lossy option exists to compare), and what a token reads of them before any cache."""
    model = open_model(bundle, compute_dtype)
    ids = text_tokens(bundle_tokenizer(bundle), data)[-(tokens + 1):]
    if len(ids) - 1 < MIN_TOKENS:
        raise ValueError(f"evaluation needs at least {MIN_TOKENS} tokens of text to score; "
                         f"{max(len(ids) - 1, 0)} given ({Path(data).name})")
    ctx = fit_context(bundle.config, ctx)
    fam = bundle.families[EXPERTS]
    routed = int(bundle.config["num_experts_per_tok"])
    per_token = routed * fam.record_bytes * sum(1 for _, n in fam.segments if n)
    return {"bundle": str(bundle.path), "data": Path(data).name, "tokens": len(ids) - 1,
            "ctx": ctx, "mode": "experts", "experts_per_token": routed, "experts": fam.count,
            "compute_dtype": str(model.flash.compute_dtype).rsplit(".", 1)[-1],
            "ppl_sparse": perplexity(model, ids, ctx, "perplexity (experts)", progress),
            "ffn_bytes_per_token": per_token, "ffn_bytes_fraction": per_token / bundle.ffn_bytes}


def summary(r: dict[str, Any]) -> str:
    if r["mode"] == "experts":
        return (f"{r['tokens']} tokens of {r['data']}, ctx {r['ctx']}: perplexity "
                f"{r['ppl_sparse']:.3f} with the experts the router picks "
                f"({r['experts_per_token']} of {r['experts']} per layer: "
                f"{r['ffn_bytes_per_token'] / 1e6:.2f} MB = "
                f"{100 * r['ffn_bytes_fraction']:.1f}% of the experts' bytes per token, before "
                "any cache)")
    lines = [
        f"mode {r['mode']} (target {r['target']}), {r['tokens']} tokens of {r['data']}, "
        f"ctx {r['ctx']}",
        f"perplexity: dense {r['ppl_dense']:.3f} | oracle {r['ppl_oracle']:.3f} "
        f"({100 * (r['ppl_oracle'] / r['ppl_dense'] - 1):+.2f}%) | {r['mode']} "
        f"{r['ppl_sparse']:.3f} ({100 * (r['ppl_sparse'] / r['ppl_dense'] - 1):+.2f}%)",
        f"FFN bytes read per token: {r['ffn_bytes_per_token'] / 1e6:.2f} MB = "
        f"{100 * r['ffn_bytes_fraction']:.1f}% of the FFN (neurons used: "
        f"{100 * r['neurons_fraction']:.1f}%); resident selection data "
        f"{r['resident_selection_bytes'] / 1e6:.1f} MB",
    ]
    if r["recall_mean"] is not None:
        lines.append(f"predictor: recall {r['recall_mean']:.3f}, precision "
                     f"{r['precision_mean']:.3f} (means over layers)")
    return "\n".join(lines)


@interruptible
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m mlx_flash evaluate", description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="a flash bundle, or a hub id (org/name): the bundle its "
                   "model converts to in the cache (converted now if it is not yet)")
    p.add_argument("--data", required=True, help="evaluation text (its last --tokens tokens)")
    p.add_argument("--tokens", type=int_in(MIN_TOKENS), default=4096,
                   help=f"tokens to score (default 4096; at least {MIN_TOKENS})")
    p.add_argument("--ctx", type=int_in(1), default=512, help="window length (default 512)")
    p.add_argument("--mode", default=None, choices=MODES,
                   help="selection mode to measure (default: the bundle's default)")
    p.add_argument("--compute-dtype", choices=DTYPE_CHOICES, default="float32",
                   help="dtype to compute in (default float32: MLX's CPU backend multiplies "
                   "16-bit matrices ~10x slower; the selection is the same in any dtype)")
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if (hint := blas_hint()) and not args.quiet:
        print(hint, file=sys.stderr)
    try:
        path = resolve_bundle(args.bundle) if is_hub_id(args.bundle) else args.bundle
        r = evaluate(path, args.data, args.tokens, args.ctx, args.mode,
                     args.compute_dtype, progress=not args.quiet)
    except (BundleError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
