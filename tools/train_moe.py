"""Train the MoE test fixture: a small byte-level Qwen3-MoE, from scratch, on WikiText-2 text.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python tools/train_moe.py \
        --data ../shared/data/wikitext-2-valid.txt --out tests/data/moe-tiny --minutes 24 \
        --top-k 4 --batch 8 --lr 0.003 --seed 0

The expert cache needs real routing: which experts a token picks, how often the same experts
come back, how skewed their popularity is. Synthetic routing would only tell us what we put in,
and no MoE small enough for the tests ships without a hub download, so this trains one: mlx-lm's
`qwen3_moe` architecture (every layer sparse, top-k routing with renormalised top-k weights,
SwiGLU experts) at toy size, byte-level vocabulary (the ReLU fixture's tokenizer), with the
Switch-Transformer load-balancing loss E * sum_e f_e * P_e per layer so that routing spreads
over the experts instead of collapsing onto a few. The last 10% of the text is held out; the
report gives its perplexity per byte and each layer's expert load there. The output folder is
an mlx-lm model folder (config.json, model.safetensors in float16 with mlx-lm's stacked
`switch_mlp` names, tokenizer). Runs on MLX's CPU backend; MLX's CPU `gather_mm` is float32
only, so cast to float32 before running the saved model there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.qwen3_moe import Model, ModelArgs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_relu_opt import byte_tokenizer, encode  # noqa: E402  (the same byte tokenizer)


def make_config(args: argparse.Namespace) -> dict:
    """A Hugging Face / mlx-lm `qwen3_moe` config with every field ModelArgs needs."""
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 259, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
        "intermediate_size": 4 * args.hidden,  # dense-MLP width; unused: every layer is MoE
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads, "num_experts": args.experts,
        "num_experts_per_tok": args.top_k, "moe_intermediate_size": args.moe_ffn,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
        "torch_dtype": "float16",
    }


def forward(model: Model, inputs: mx.array) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """Logits, and per layer the router probabilities (B, L, E) and top-k choices (B, L, k).

    The same computation as `Model.__call__` without a cache; the router is run a second time
    on the MoE block's input (it is one small matmul) because the block keeps its
    probabilities to itself and the balancing loss needs them.
    """
    inner = model.model
    h = inner.embed_tokens(inputs)
    probs, picks = [], []
    for layer in inner.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), "causal")
        x = layer.post_attention_layernorm(h)
        p = mx.softmax(layer.mlp.gate(x), axis=-1, precise=True)
        k = layer.mlp.top_k
        probs.append(p)
        picks.append(mx.stop_gradient(mx.argpartition(p, kth=-k, axis=-1)[..., -k:]))
        h = h + layer.mlp(x)
    return inner.embed_tokens.as_linear(inner.norm(h)), probs, picks


def load_fraction(pick: mx.array, experts: int) -> mx.array:
    """f_e: the share of the layer's routings (token, slot pairs) that went to expert e."""
    one_hot = (pick.reshape(-1)[:, None] == mx.arange(experts)[None, :]).astype(mx.float32)
    return one_hot.mean(axis=0)


def balance_loss(probs: list[mx.array], picks: list[mx.array]) -> mx.array:
    """Switch Transformer's auxiliary loss, E * sum_e f_e * P_e, averaged over layers.

    f_e (routed share, no gradient) times P_e (mean router probability): minimal (= 1) when
    both are uniform, so the gradient through P_e pushes probability off overloaded experts.
    """
    total = mx.array(0.0)
    for p, pick in zip(probs, picks, strict=True):
        e = p.shape[-1]
        f = mx.stop_gradient(load_fraction(pick, e))
        total = total + e * (f * p.reshape(-1, e).mean(axis=0)).sum()
    return total / len(probs)


def evaluate(model: Model, data: np.ndarray, ctx: int, experts: int
             ) -> tuple[float, list[list[float]]]:
    """Perplexity per byte on `data` (non-overlapping ctx windows) and each layer's load."""
    nll, n, loads = 0.0, 0, None
    for start in range(0, len(data) - ctx - 1, ctx):
        x = mx.array(data[None, start:start + ctx])
        y = mx.array(data[None, start + 1:start + ctx + 1])
        logits, _, picks = forward(model, x)
        nll += nn.losses.cross_entropy(logits, y, reduction="sum").item()
        n += y.size
        counts = [np.bincount(np.array(p).reshape(-1), minlength=experts) for p in picks]
        loads = counts if loads is None else [a + b for a, b in zip(loads, counts, strict=True)]
    return math.exp(nll / n), [(c / c.sum()).tolist() for c in loads]


def load_summary(loads: list[list[float]]) -> str:
    return "; ".join(f"L{i} max {max(f):.1%} min {min(f):.1%}" for i, f in enumerate(loads))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="training text (UTF-8)")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--minutes", type=float, default=18.0, help="training time budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-ffn", type=int, default=128, help="each expert's intermediate size")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--aux", type=float, default=0.01, help="weight of the balancing loss")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} already exists")

    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = encode(Path(args.data).read_text())
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    config = make_config(args)
    model = Model(ModelArgs.from_dict(config))
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"{n_params / 1e6:.2f}M parameters; {len(train)} training bytes, {len(held)} held out")

    budget = 60 * args.minutes
    opt = optim.AdamW(learning_rate=args.lr, weight_decay=0.01)

    def loss_fn(model, x, y):
        logits, probs, picks = forward(model, x)
        ce = nn.losses.cross_entropy(logits, y, reduction="mean")
        aux = balance_loss(probs, picks)
        loads = mx.stack([load_fraction(pk, args.experts) for pk in picks])
        return ce + args.aux * aux, (ce, aux, loads)

    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, lr):
        opt.learning_rate = lr
        (loss, (ce, aux, loads)), grads = grad_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss, ce, aux, loads

    history = []  # (minutes, step, ce, aux, max per-layer load share over the last 50 steps)
    start, steps, tokens, window = time.time(), 0, 0, []
    while (elapsed := time.time() - start) < budget:
        frac = elapsed / budget
        # learning rate: 3% linear warm-up, then cosine down to 5%
        warm = min(1.0, frac / 0.03)
        lr = args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = rng.integers(0, len(train) - args.ctx - 1, size=args.batch)
        x = mx.array(np.stack([train[i:i + args.ctx] for i in idx]))
        y = mx.array(np.stack([train[i + 1:i + args.ctx + 1] for i in idx]))
        loss, ce, aux, loads = step(x, y, mx.array(lr))
        mx.eval(state, loss, ce, aux, loads)
        steps += 1
        tokens += x.size
        window.append(np.array(loads))
        if steps % 50 == 0:
            mean_load = np.mean(window, axis=0)
            window = []
            history.append([round(elapsed / 60, 2), steps, round(ce.item(), 4),
                            round(aux.item(), 4), [round(float(m), 4) for m in
                                                   mean_load.max(axis=1)]])
            print(f"{elapsed / 60:5.1f} min  step {steps}  ce {ce.item():.3f}  "
                  f"aux {aux.item():.3f}  max load/layer "
                  + " ".join(f"{m:.1%}" for m in mean_load.max(axis=1))
                  + f"  {tokens / elapsed:.0f} tok/s", flush=True)

    minutes = (time.time() - start) / 60
    ppl, loads = evaluate(model, held, args.ctx, args.experts)
    print(f"held-out perplexity per byte {ppl:.3f}; expert load: {load_summary(loads)}")
    out.mkdir(parents=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    byte_tokenizer(out)
    (out / "TRAINING.json").write_text(json.dumps({
        "command": "OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python tools/train_moe.py "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "parameters": n_params, "steps": steps, "tokens": tokens, "minutes": minutes,
        "train_bytes": len(train), "held_out_bytes": len(held),
        "held_out_ppl_per_byte": ppl, "held_out_bits_per_byte": math.log2(ppl),
        "held_out_expert_load_per_layer": loads,
        "history_columns": ["minutes", "step", "train_ce", "balance_loss",
                            "max_expert_load_share_per_layer_last_50_steps"],
        "history": history}, indent=2))


if __name__ == "__main__":
    main()
