"""Routing study of an MoE model (the trained fixture): what an expert cache can expect.

    python tools/moe_routing.py                       # Markdown tables for docs/MOE.md
    python tools/moe_routing.py --json routing.json   # the statistics, for synthetic traces

Runs the model (mlx-lm, float32 on the CPU) over held-out text, token after token in chunks
with a sliding 256-token attention window (the fixture's training context), and records every
layer's router top-k per token by wrapping the MoE block's router. From those traces:

* popularity: each expert's share of the layer's routings, the share taken by the top 25% of
  experts, the routing entropy (1.0 = uniform);
* reuse: Jaccard overlap of consecutive tokens' expert sets (and of the same tokens shuffled:
  what popularity alone gives), the chance that an expert used now was used by the previous
  token, and the reuse-distance histogram;
* lookahead: layer L+1's router run on layer L's output (layer L+1's input before its
  attention, through layer L+1's post-attention norm): recall of the true top-k in the
  predicted top-k, top-(k+2), top-2k and top-3k;
* cache policies (mlx_flash.eviction) against Belady's MIN at capacities k .. 4k per
  layer. The LRFU decay, the Markov horizon and the context order are tuned here on routing
  of training text (the first 8 KiB of a slice of the training split) and reported on the
  held-out text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_flash.eviction import (  # noqa: E402
    POLICIES,
    belady_hit_rate,
    simulate,
    simulate_detail,
)

FIXTURE = ROOT / "tests" / "data" / "moe-tiny"
HELD_OUT = ROOT / "tests" / "data" / "wikitext-2-valid-tail.txt"
TRAINING_TEXT = ROOT / "tests" / "data" / "wikitext-2-valid-slice.txt"
CAPACITY_FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0)
# tuning grids of the two policies with a knob (on training text, capacities above k)
GRIDS = {"lrfu": ("decay", (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)),
         "markov": ("horizon", (1, 2, 4, 8)),
         "context": ("order", (1, 2, 3))}


def load_fixture(path: Path = FIXTURE) -> tuple[nn.Module, dict]:
    """The model in float32 (MLX's CPU gather_mm has no float16) and its config."""
    from mlx_lm.utils import load_model

    model, config = load_model(Path(path))
    model.set_dtype(mx.float32)
    model.eval()
    return model, config


class RouterTap(nn.Module):
    """Wraps an MoE block's router (`mlp.gate`): same output, and records each token's top-k
    exactly as the block computes it (softmax, then argpartition)."""

    def __init__(self, gate: nn.Module, k: int, log: list[np.ndarray]) -> None:
        super().__init__()
        self.inner = gate
        self.k = k
        self.log = log

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.inner(x)
        p = mx.softmax(logits, axis=-1, precise=True)
        top = mx.argpartition(p, kth=-self.k, axis=-1)[..., -self.k:]
        self.log.append(np.sort(np.array(top.reshape(-1, self.k)), axis=-1))
        return logits


def encode(text: str) -> np.ndarray:
    """The fixture's byte tokenizer: id = byte + 3."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + 3


def collect_traces(model: nn.Module, text: str, chunk: int = 64, window: int = 256
                   ) -> tuple[list[list[np.ndarray]], list[np.ndarray | None]]:
    """Per layer, per token, the sorted top-k expert ids; and per layer L >= 1 the experts in
    the order layer L's router ranks them from layer L-1's output (None for layer 0).

    The text is fed `chunk` tokens at a time with a rotating KV cache of `window` tokens, so
    every token sees up to `window` of context, as in decoding with a sliding window.
    """
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import RotatingKVCache

    inner = model.model
    layers = inner.layers
    logs: list[list[np.ndarray]] = [[] for _ in layers]
    gates = [layer.mlp.gate for layer in layers]
    for layer, log in zip(layers, logs, strict=True):
        layer.mlp.gate = RouterTap(layer.mlp.gate, layer.mlp.top_k, log)
    ranked: list[list[np.ndarray]] = [[] for _ in layers]
    try:
        tokens = encode(text)
        cache = [RotatingKVCache(max_size=window, keep=0) for _ in layers]
        for start in range(0, len(tokens), chunk):
            h = inner.embed_tokens(mx.array(tokens[None, start:start + chunk]))
            mask = create_attention_mask(h, cache[0])
            for i, (layer, c) in enumerate(zip(layers, cache, strict=True)):
                if i > 0:  # lookahead: this layer's router on its input, before attention
                    guess = gates[i](layer.post_attention_layernorm(h))
                    ranked[i].append(np.argsort(-np.array(guess[0]), axis=-1, kind="stable"))
                h = layer(h, mask, c)
            mx.eval(h)
    finally:
        for layer, gate in zip(layers, gates, strict=True):
            layer.mlp.gate = gate
    traces = [list(np.concatenate(log)) for log in logs]
    return traces, [None] + [np.concatenate(r) for r in ranked[1:]]


def popularity(trace: list[np.ndarray], count: int) -> dict:
    share = np.bincount(np.concatenate(trace), minlength=count) / sum(len(i) for i in trace)
    desc = np.sort(share)[::-1]
    nz = desc[desc > 0]
    entropy = float(-(nz * np.log2(nz)).sum())
    return {"share_sorted": [round(float(s), 5) for s in desc],
            "top25_share": float(desc[: max(1, count // 4)].sum()),
            "entropy_bits": entropy, "normalized_entropy": entropy / math.log2(count)}


def reuse(trace: list[np.ndarray], max_distance: int = 64) -> dict:
    """Consecutive-token overlap and the reuse distance of every routing."""
    jac, prev_hit = [], []
    for a, b in zip(trace[:-1], trace[1:], strict=True):
        inter = len(np.intersect1d(a, b))
        jac.append(inter / len(np.union1d(a, b)))
        prev_hit.append(inter / len(b))
    last: dict[int, int] = {}
    hist = np.zeros(max_distance + 2, dtype=np.int64)  # [1..max], > max, never before
    for t, ids in enumerate(trace):
        for e in ids.tolist():
            if e not in last:
                hist[-1] += 1
            else:
                d = t - last[e]
                hist[d - 1 if d <= max_distance else max_distance] += 1
            last[e] = t
    # the same tokens in a random order: what popularity alone gives, without any locality
    order = np.random.default_rng(0).permutation(len(trace))
    shuffled = [trace[i] for i in order]
    jac_shuffled = [len(np.intersect1d(a, b)) / len(np.union1d(a, b))
                    for a, b in zip(shuffled[:-1], shuffled[1:], strict=True)]
    return {"jaccard_consecutive": float(np.mean(jac)),
            "jaccard_shuffled": float(np.mean(jac_shuffled)),
            "used_by_previous_token": float(np.mean(prev_hit)),
            "reuse_distance_hist": hist[:max_distance].tolist(),
            "reuse_distance_over_max": int(hist[max_distance]),
            "first_use": int(hist[-1])}


def lookahead(trace: list[np.ndarray], ranked: np.ndarray, sizes: list[int]) -> dict:
    """Share of the true top-k inside the predicted top-m, for each m in sizes."""
    true = np.stack(trace)
    out = {}
    for m in sizes:
        guess = ranked[:, :m]
        out[str(m)] = float((true[:, :, None] == guess[:, None, :]).any(-1).mean())
    return out


def capacities(k: int, count: int) -> list[int]:
    return sorted({min(count, max(k, round(f * k))) for f in CAPACITY_FACTORS})


def policy_table(traces: list[list[np.ndarray]], caps: list[int], count: int,
                 kwargs: dict[str, dict]) -> dict:
    """Per capacity: each policy's and Belady's hit rate, per layer and averaged."""
    table = {}
    for cap in caps:
        row = {"belady": [belady_hit_rate(tr, cap) for tr in traces]}
        for name in POLICIES:
            row[name] = [simulate(tr, cap, name, count=count, **kwargs.get(name, {}))
                         for tr in traces]
        row["window_mean_resident"] = [
            simulate_detail(tr, cap, "window", count=count, **kwargs.get("window", {}))[
                "mean_resident"] for tr in traces]
        table[str(cap)] = {n: {"per_layer": v, "mean": float(np.mean(v))}
                           for n, v in row.items()}
    return table


def tune(traces: list[list[np.ndarray]], caps: list[int], count: int) -> dict:
    """Per tuned policy and knob value: mean (over layers and capacities) share of Belady."""
    opt = {c: [belady_hit_rate(tr, c) for tr in traces] for c in caps}
    scores: dict[str, dict[str, float]] = {}
    for name, (knob, values) in GRIDS.items():
        scores[name] = {}
        for v in values:
            ratios = [simulate(tr, c, name, count=count, **{knob: v}) / max(o, 1e-9)
                      for c in caps for tr, o in zip(traces, opt[c], strict=True)]
            scores[name][str(v)] = float(np.mean(ratios))
    return scores


def study(fixture: Path, text_path: Path, tune_path: Path, max_bytes: int,
          tune_bytes: int) -> dict:
    model, config = load_fixture(fixture)
    k, count = config["num_experts_per_tok"], config["num_experts"]
    text = text_path.read_text()[:max_bytes]
    t0 = time.time()
    traces, ranked = collect_traces(model, text)
    tune_traces, _ = collect_traces(model, tune_path.read_text()[:tune_bytes])
    caps = capacities(k, count)
    tuning = tune(tune_traces, [c for c in caps if c > k], count)
    chosen = {}
    for name, (knob, values) in GRIDS.items():
        best = max(tuning[name], key=tuning[name].get)
        chosen[name] = {knob: type(values[0])(float(best))}
    sizes = sorted({k, k + 2, 2 * k, 3 * k})
    return {
        "fixture": str(fixture.relative_to(ROOT)) if fixture.is_relative_to(ROOT) else str(fixture),
        "text": text_path.name, "bytes": len(text.encode("utf-8")), "tokens": len(traces[0]),
        "tune_text": tune_path.name, "tune_tokens": len(tune_traces[0]),
        "layers": len(traces), "experts": count, "top_k": k,
        "popularity": [popularity(tr, count) for tr in traces],
        "reuse": [reuse(tr) for tr in traces],
        "lookahead": {str(i): lookahead(traces[i], ranked[i], sizes)
                      for i in range(1, len(traces))},
        "tuning": tuning, "tuned": chosen, "capacities": caps,
        "hit_rates": policy_table(traces, caps, count, chosen),
        "seconds": time.time() - t0,
    }


def markdown(s: dict) -> str:
    k = s["top_k"]
    lines = [f"Measured on `{s['text']}` (held out): {s['bytes']} bytes = {s['tokens']} tokens; "
             f"{s['layers']} layers, {s['experts']} experts, top-{k}.", "",
             "| layer | top-25% experts' share | entropy (1 = uniform) | most / least popular "
             "| Jaccard t-1,t | same, tokens shuffled | used by token t-1 |",
             "|---|---|---|---|---|---|---|"]
    for i, (p, r) in enumerate(zip(s["popularity"], s["reuse"], strict=True)):
        lines.append(f"| {i} | {p['top25_share']:.1%} | {p['normalized_entropy']:.3f} | "
                     f"{p['share_sorted'][0]:.1%} / {p['share_sorted'][-1]:.1%} | "
                     f"{r['jaccard_consecutive']:.3f} | {r['jaccard_shuffled']:.3f} | "
                     f"{r['used_by_previous_token']:.1%} |")
    sizes = list(next(iter(s["lookahead"].values())))
    lines += ["", "Lookahead: layer L+1's router on layer L's output; share of the true "
              f"top-{k} inside the predicted top-m.", "",
              "| layer predicted | " + " | ".join(f"top-{m}" for m in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for layer, rec in s["lookahead"].items():
        lines.append(f"| {layer} | " + " | ".join(f"{rec[m]:.1%}" for m in sizes) + " |")
    names = ["belady", *POLICIES]
    lines += ["", f"Hit rate per layer slot budget (mean over the {s['layers']} layers; cold "
              "misses included), and each policy as a share of Belady's. Knobs "
              + ", ".join(f"{n}: {kv}" for n, kv in s["tuned"].items())
              + f" (tuned on `{s['tune_text']}`, {s['tune_tokens']} training tokens).", "",
              "| capacity | " + " | ".join(names) + " | window's mean occupancy |",
              "|---|" + "---|" * (len(names) + 1)]
    for cap, row in s["hit_rates"].items():
        opt = row["belady"]["mean"]
        cells = [f"{row['belady']['mean']:.1%}"] + [
            f"{row[n]['mean']:.1%} ({row[n]['mean'] / opt:.0%})" for n in POLICIES]
        c = int(cap)
        lines.append(f"| {c} ({c / k:g}k) | " + " | ".join(cells)
                     + f" | {row['window_mean_resident']['mean']:.2f} |")
    for name, (knob, _) in GRIDS.items():
        lines += ["", f"Tuning of {name}'s {knob} (mean share of Belady over layers and the "
                  "capacities above k, training text): "
                  + ", ".join(f"{v}: {r:.1%}" for v, r in s["tuning"][name].items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixture", type=Path, default=FIXTURE)
    p.add_argument("--text", type=Path, default=HELD_OUT, help="held-out text to route")
    p.add_argument("--tune-text", type=Path, default=TRAINING_TEXT,
                   help="training text whose routing tunes the LRFU decay")
    p.add_argument("--bytes", type=int, default=16384, help="bytes of held-out text to use")
    p.add_argument("--tune-bytes", type=int, default=8192, help="bytes of training text")
    p.add_argument("--json", type=Path, help="write the statistics here")
    args = p.parse_args()
    s = study(args.fixture.resolve(), args.text, args.tune_text, args.bytes,
              args.tune_bytes)
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    print(markdown(s))
    print(f"\n({s['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
