"""Tiny random models written in the formats users bring: HF folders, GGUF files, OPT.

Each writer returns the float weights it wrote, in Hugging Face layout, so tests can compare
what the converter made of them against the originals.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from fixtures import (  # noqa: E402, F401 (add_byte_tokenizer: for tiny_moe_gguf)
    CHAT_TEMPLATE,
    SPECIAL,
    add_byte_tokenizer,
    byte_vocab,
    save_byte_tokenizer,
)

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def random_llama_weights(config: dict, seed: int = 0, attention_bias: bool = False
                         ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, n, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(v, d, scale=1.0),
               "model.norm.weight": 1 + 0.1 * w(d, scale=1.0)}
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = w(v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights.update({
            f"{p}.input_layernorm.weight": 1 + 0.1 * w(d, scale=1.0),
            f"{p}.post_attention_layernorm.weight": 1 + 0.1 * w(d, scale=1.0),
            f"{p}.self_attn.q_proj.weight": w(q, d),
            f"{p}.self_attn.k_proj.weight": w(kv, d),
            f"{p}.self_attn.v_proj.weight": w(kv, d),
            f"{p}.self_attn.o_proj.weight": w(d, q),
            f"{p}.mlp.gate_proj.weight": w(n, d),
            f"{p}.mlp.up_proj.weight": w(n, d),
            f"{p}.mlp.down_proj.weight": w(d, n),
        })
        if attention_bias:  # qwen2
            weights.update({f"{p}.self_attn.{x}_proj.bias": w(dim, scale=0.1)
                            for x, dim in (("q", q), ("k", kv), ("v", kv))})
    return weights


def write_hf_llama(folder: Path, config: dict | None = None, seed: int = 0
                   ) -> tuple[dict, dict[str, np.ndarray]]:
    """A Hugging Face-style llama folder (config.json, model.safetensors, tokenizer)."""
    folder.mkdir(parents=True)
    config = dict(config or TINY_LLAMA)
    config["vocab_size"] = save_byte_tokenizer(folder)
    weights = random_llama_weights(config, seed)
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k: mx.array(v) for k, v in weights.items()})
    (folder / "config.json").write_text(json.dumps(config))
    return config, weights


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows for its interleaved RoPE (convert_hf_to_gguf.py)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_llama_gguf(path: Path, qtype: str, config: dict | None = None, seed: int = 0,
                     arch: str = "llama") -> tuple[dict, dict[str, np.ndarray]]:
    """A llama.cpp-style GGUF of a tiny random llama: matrices in `qtype`, norms in F32,
    Q/K rows permuted as llama.cpp does, tokenizer and chat template in the metadata."""
    import gguf

    config = dict(config or TINY_LLAMA)
    tokens, merges = byte_vocab()
    config["vocab_size"] = len(tokens)
    weights = random_llama_weights(config, seed, attention_bias=arch == "qwen2")
    q = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, w in weights.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_GGUF_NAMES[rest]}"
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = permute_qk(w, config["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = permute_qk(w, config["num_key_value_heads"])
        if w.ndim == 2 and q not in (gguf.GGMLQuantizationType.F32,):
            data = gguf.quants.quantize(w, q)
            writer.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=q)
        else:
            writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return config, weights


def write_hf_opt(folder: Path, *, pre_norm: bool = True, project: bool = False,
                 seed: int = 0):
    """A tiny random OPT saved by transformers; returns the torch model (the reference)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    folder.mkdir(parents=True)
    vocab = save_byte_tokenizer(folder)
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128,
                       word_embed_proj_dim=32 if project else 64,
                       do_layer_norm_before=pre_norm, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():  # random biases and norms too, so every term is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def write_hf_relu_llama(folder: Path, activation: str, threshold: float = 0.05,
                        seed: int = 0):
    """A tiny random Llama with a ReLU-family FFN saved by transformers; returns the torch
    model (the reference) with its FFN computing `activation` ("relu": ReluLLaMA, "fatrelu":
    ProSparse's x·[x > threshold], "drelu": TurboSparse's relu(gate)·relu(up))."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    vocab = save_byte_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, hidden_act="relu", rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(folder), safe_serialization=True)
    saved = json.loads((folder / "config.json").read_text())
    saved["hidden_act"] = activation
    if activation == "fatrelu":
        saved["hidden_act_param"] = threshold
    (folder / "config.json").write_text(json.dumps(saved))
    def ffn(m, x):
        g, u = m.gate_proj(x), m.up_proj(x)
        if activation == "fatrelu":
            return m.down_proj(g * (g > threshold) * u)
        return m.down_proj(torch.relu(g) * torch.relu(u))

    if activation != "relu":  # transformers' own modules, with the FFN formula patched in
        for layer in model.model.layers:
            layer.mlp.forward = (lambda m: lambda x: ffn(m, x))(layer.mlp)
    return model


def greedy_logits(model, prompt: list[int], steps: int) -> np.ndarray:
    """`[steps, vocab]` float32: the logits of `steps` greedy decode tokens after `prompt`."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        out.append(np.array(logits.astype(mx.float32)))
        logits = model(mx.argmax(logits, axis=-1)[:, None], cache=cache)[:, -1]
    return np.concatenate(out)
