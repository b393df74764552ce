"""Train the ReLU test fixture: a small byte-level OPT, from scratch, on WikiText-2 text.

    python tools/train_relu_opt.py --data ../shared/data/wikitext-2-valid.txt \
        --out tests/data/relu-opt --minutes 40 --seed 0

The paper's regime needs a ReLU model whose FFN is mostly zero (OPT: 97%). None small enough
ships with a licence and without a hub download, so this trains one: OPT architecture (learned
positions, pre-LayerNorm, ReLU FFN with biases), byte-level vocabulary, an L1 penalty on the
FFN activations ramped up during training as ProSparse does, so most neurons stay at exactly 0.
The last 10% of the text is held out; the report gives its perplexity and each layer's share
of zero activations there. The output folder is a Hugging Face OPT folder (config.json,
model.safetensors in float16, tokenizer), which `python -m mlx_flash.convert` turns into a
bundle. Runs on MLX's CPU backend.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_flash.arch.opt import POSITION_OFFSET, Model, ModelArgs

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer: the 3 specials, then one token per byte (id = byte + 3)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    symbols = bytes_to_unicode()
    tokens = SPECIALS + [symbols[b] for b in range(256)]
    backend, _ = convert_gguf_tokenizer("llama", {
        "tokenizer_type": "gpt2", "pre_tokenizer_type": "smollm", "tokens": tokens,
        "token_type": [3] * 3 + [1] * 256, "merges": []})
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[0],
                            eos_token=SPECIALS[0], unk_token=SPECIALS[0]).save_pretrained(folder)


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + 3


def forward(model: Model, inputs: mx.array) -> tuple[mx.array, list[mx.array]]:
    """Logits and each layer's FFN activations (training only: no cache, pre-norm OPT)."""
    dec = model.model.decoder
    h = dec.embed_tokens(inputs) + dec.embed_positions(
        mx.arange(inputs.shape[1]) + POSITION_OFFSET)
    acts = []
    for layer in dec.layers:
        h = h + layer.self_attn(layer.self_attn_layer_norm(h), "causal")
        a = nn.relu(layer.mlp.fc1(layer.final_layer_norm(h)))
        acts.append(a)
        h = h + layer.mlp.fc2(a)
    return dec.embed_tokens.as_linear(dec.final_layer_norm(h)), acts


def evaluate(model: Model, data: np.ndarray, ctx: int) -> tuple[float, list[float]]:
    """Perplexity per byte on `data`, and each layer's fraction of zero activations."""
    nll, n, zeros = 0.0, 0, None
    for start in range(0, len(data) - ctx - 1, ctx):
        x = mx.array(data[None, start:start + ctx])
        y = mx.array(data[None, start + 1:start + ctx + 1])
        logits, acts = forward(model, x)
        nll += nn.losses.cross_entropy(logits, y, reduction="sum").item()
        n += y.size
        z = [(a <= 0).mean().item() for a in acts]
        zeros = z if zeros is None else [a + b for a, b in zip(zeros, z, strict=True)]
    windows = max(1, (len(data) - ctx - 1 + ctx - 1) // ctx)
    return math.exp(nll / n), [z / windows for z in zeros]


def hf_name(name: str) -> str:
    """Our parameter names -> transformers' OPT names (the FFN has no `mlp.` level there)."""
    return name.replace(".mlp.fc", ".fc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="training text (UTF-8)")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--minutes", type=float, default=40.0, help="training time budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1", type=float, default=1.0,
                   help="final weight of the mean FFN activation penalty (summed over layers)")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} already exists")

    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = encode(Path(args.data).read_text())
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    config = {
        "model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": 259,
        "hidden_size": args.hidden, "ffn_dim": args.ffn, "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64, "max_position_embeddings": args.ctx,
        "word_embed_proj_dim": args.hidden, "do_layer_norm_before": True,
        "activation_function": "relu", "enable_bias": True,
        "layer_norm_elementwise_affine": True, "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": "float16",
    }
    model = Model(ModelArgs.from_dict(config))
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"{n_params / 1e6:.2f}M parameters; {len(train)} training bytes, {len(held)} held out")

    budget = 60 * args.minutes
    opt = optim.AdamW(learning_rate=args.lr, weight_decay=0.01)

    def loss_fn(model, x, y, l1):
        logits, acts = forward(model, x)
        ce = nn.losses.cross_entropy(logits, y, reduction="mean")
        return ce + l1 * sum(a.mean() for a in acts), ce

    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, l1, lr):
        opt.learning_rate = lr
        (loss, ce), grads = grad_fn(model, x, y, l1)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss, ce

    start, steps, tokens = time.time(), 0, 0
    while (elapsed := time.time() - start) < budget:
        frac = elapsed / budget
        # L1 off for the first 20%, then ramped to --l1 by 60%; learning rate cosine to 5%
        l1 = args.l1 * min(1.0, max(0.0, (frac - 0.2) / 0.4))
        lr = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = rng.integers(0, len(train) - args.ctx - 1, size=args.batch)
        x = mx.array(np.stack([train[i:i + args.ctx] for i in idx]))
        y = mx.array(np.stack([train[i + 1:i + args.ctx + 1] for i in idx]))
        loss, ce = step(x, y, mx.array(l1), mx.array(lr))
        mx.eval(state, loss, ce)
        steps += 1
        tokens += x.size
        if steps % 200 == 0:
            print(f"{elapsed / 60:5.1f} min  step {steps}  ce {ce.item():.3f}  "
                  f"l1 {l1:.2f}  {tokens / elapsed:.0f} tok/s", flush=True)

    ppl, zeros = evaluate(model, held, args.ctx)
    print(f"held-out perplexity per byte {ppl:.3f}; zero FFN activations per layer: "
          + ", ".join(f"{z:.1%}" for z in zeros))
    out.mkdir(parents=True)
    weights = {hf_name(k): v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    byte_tokenizer(out)
    (out / "TRAINING.json").write_text(json.dumps({
        "command": "python tools/train_relu_opt.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()),
        "steps": steps, "tokens": tokens, "minutes": (time.time() - start) / 60,
        "held_out_bytes": len(held), "held_out_ppl_per_byte": ppl,
        "zero_activation_fraction_per_layer": zeros}, indent=2))


if __name__ == "__main__":
    main()
