"""Tiny random mixture-of-experts models as llama.cpp's converter writes them to GGUF.

`write_moe_gguf` lays a tiny Qwen3-MoE ("qwen3moe") or Mixtral out as convert_hf_to_gguf.py
does: experts stacked per projection (`blk.N.ffn_{gate,up,down}_exps.weight`, numpy
`[E, out, in]`), the router `blk.N.ffn_gate_inp.weight` and every 1-D tensor in F32, the other
matrices in the asked type, and Mixtral's Q/K rows permuted for llama.cpp's interleaved RoPE
(Mixtral is a "llama" with `llama.expert_count` in llama.cpp; Qwen3-MoE's rows are not
permuted). It returns what a reader must make of the file, under mlx-lm's sanitized parameter
names in Hugging Face layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tiny_models import CHAT_TEMPLATE, add_byte_tokenizer, byte_vocab, permute_qk

# the model kinds, their GGUF architecture, mlx-lm model_type and MoE module
MOE_ARCHS = {"qwen3moe": ("qwen3moe", "qwen3_moe", "mlp"),
             "mixtral": ("llama", "mixtral", "block_sparse_moe")}
TINY_MOE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "experts": 8, "experts_per_tok": 2, "expert_ffn": 32,
            "intermediate_size": 96, "head_dim": None, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "max_position_embeddings": 256, "tie_word_embeddings": False}


def moe_config(arch: str, **sizes: Any) -> dict:
    """mlx-lm's config of the tiny MoE of kind `arch` ("qwen3moe" or "mixtral"), `sizes`
    (keys of TINY_MOE) overriding the defaults. Qwen3-MoE's head size defaults to twice
    hidden_size / heads (as Qwen3's own is not hidden_size / heads); Mixtral's is that ratio."""
    s = {**TINY_MOE, **sizes}
    if s.keys() != TINY_MOE.keys():
        raise TypeError(f"unknown sizes {sorted(s.keys() - TINY_MOE.keys())}")
    _, model_type, _ = MOE_ARCHS[arch]
    ratio = s["hidden_size"] // s["num_attention_heads"]
    config = {
        "model_type": model_type,
        "hidden_size": s["hidden_size"],
        "num_hidden_layers": s["num_hidden_layers"],
        "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_key_value_heads"],
        "head_dim": s["head_dim"] or (2 * ratio if arch == "qwen3moe" else ratio),
        "rms_norm_eps": s["rms_norm_eps"],
        "rope_theta": s["rope_theta"],
        "max_position_embeddings": s["max_position_embeddings"],
        "vocab_size": len(byte_vocab()[0]),
        "hidden_act": "silu",
        "tie_word_embeddings": s["tie_word_embeddings"],
        "num_experts_per_tok": s["experts_per_tok"],
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if arch == "qwen3moe":
        config.update({"intermediate_size": s["intermediate_size"],
                       "num_experts": s["experts"], "moe_intermediate_size": s["expert_ffn"],
                       "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []})
    else:
        config.update({"intermediate_size": s["expert_ffn"], "num_local_experts": s["experts"],
                       "rope_traditional": False})
    return config


def random_moe_weights(arch: str, config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under mlx-lm's sanitized names (experts stacked `[E, out, in]`)."""
    rng = np.random.default_rng(seed)
    d, v, hd = config["hidden_size"], config["vocab_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    qwen = arch == "qwen3moe"
    e = config["num_experts" if qwen else "num_local_experts"]
    f = config["moe_intermediate_size" if qwen else "intermediate_size"]
    moe = MOE_ARCHS[arch][2]

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    def norm(n):
        return 1 + 0.1 * w(n, scale=1.0)

    weights = {"model.embed_tokens.weight": w(v, d, scale=1.0), "model.norm.weight": norm(d)}
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = w(v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights.update({
            f"{p}.input_layernorm.weight": norm(d),
            f"{p}.post_attention_layernorm.weight": norm(d),
            f"{p}.self_attn.q_proj.weight": w(q, d),
            f"{p}.self_attn.k_proj.weight": w(kv, d),
            f"{p}.self_attn.v_proj.weight": w(kv, d),
            f"{p}.self_attn.o_proj.weight": w(d, q),
            f"{p}.{moe}.gate.weight": w(e, d, scale=1.0),  # a router that picks decisively
            f"{p}.{moe}.switch_mlp.gate_proj.weight": w(e, f, d),
            f"{p}.{moe}.switch_mlp.up_proj.weight": w(e, f, d),
            f"{p}.{moe}.switch_mlp.down_proj.weight": w(e, d, f),
        })
        if qwen:
            weights.update({f"{p}.self_attn.q_norm.weight": norm(hd),
                            f"{p}.self_attn.k_norm.weight": norm(hd)})
    return weights


def gguf_name(name: str) -> str:
    """The llama.cpp name of mlx-lm parameter `name` (either model kind)."""
    globals_ = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in globals_:
        return globals_[name]
    _, _, layer, rest = name.split(".", 3)
    rest = rest.replace("block_sparse_moe.", "mlp.")
    block = {
        "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
        "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
        "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
        "mlp.gate.weight": "ffn_gate_inp", "mlp.switch_mlp.gate_proj.weight": "ffn_gate_exps",
        "mlp.switch_mlp.up_proj.weight": "ffn_up_exps",
        "mlp.switch_mlp.down_proj.weight": "ffn_down_exps",
    }[rest]
    return f"blk.{layer}.{block}.weight"


def write_moe_gguf(path: Path, arch: str, qtype: str, seed: int = 0,
                   metadata: dict[str, Any] | None = None, **sizes: Any) -> dict:
    """Write a tiny random MoE of kind `arch` ("qwen3moe" or "mixtral") to the GGUF `path`,
    matrices in `qtype` (a GGMLQuantizationType name: F32, F16, Q8_0, Q4_0, Q4_1, ...; a type
    gguf-py cannot quantize, e.g. Q4_K, gets random blocks), as llama.cpp lays it out.
    `metadata` replaces (or, value None, drops) GGUF key-values — "{arch}" in a key is the GGUF
    architecture — for damaged files; `sizes` override TINY_MOE's.

    Returns {"config": mlx-lm's config, "weights": the float32 weights (mlx-lm names, HF
    layout), "dequantized": what gguf-py dequantizes the written tensors to, in the same layout
    (the weights for F32), "gguf_arch": the GGUF architecture, "qtypes": mlx-lm name -> the
    GGML type written}."""
    import gguf

    config = moe_config(arch, **sizes)
    weights = random_moe_weights(arch, config, seed)
    tokens, merges = byte_vocab()
    garch, _, _ = MOE_ARCHS[arch]
    qwen = arch == "qwen3moe"
    q = gguf.GGMLQuantizationType[qtype]
    f32 = gguf.GGMLQuantizationType.F32
    hd = config["head_dim"]

    kv: dict[str, tuple[Any, Any]] = {  # key -> (value, GGUFValueType)
        "{arch}.context_length": (config["max_position_embeddings"], "uint32"),
        "{arch}.embedding_length": (config["hidden_size"], "uint32"),
        "{arch}.feed_forward_length": (config["intermediate_size"], "uint32"),
        "{arch}.block_count": (config["num_hidden_layers"], "uint32"),
        "{arch}.attention.head_count": (config["num_attention_heads"], "uint32"),
        "{arch}.attention.head_count_kv": (config["num_key_value_heads"], "uint32"),
        "{arch}.rope.freq_base": (config["rope_theta"], "float32"),
        "{arch}.attention.layer_norm_rms_epsilon": (config["rms_norm_eps"], "float32"),
        "{arch}.expert_count": (config["num_experts" if qwen else "num_local_experts"],
                                "uint32"),
        "{arch}.expert_used_count": (config["num_experts_per_tok"], "uint32"),
    }
    file_type = gguf.LlamaFileType.__members__.get("ALL_F32" if qtype == "F32"
                                                   else f"MOSTLY_{qtype}")
    if file_type is not None:
        kv["general.file_type"] = (int(file_type), "uint32")
    if qwen:  # Qwen2MoeModel / Qwen3MoeModel.set_gguf_parameters (head_dim in the config)
        kv.update({"{arch}.expert_feed_forward_length": (config["moe_intermediate_size"],
                                                         "uint32"),
                   "{arch}.attention.key_length": (hd, "uint32"),
                   "{arch}.attention.value_length": (hd, "uint32")})
    else:  # LlamaModel.set_gguf_parameters
        kv.update({"{arch}.vocab_size": (config["vocab_size"], "uint32"),
                   "{arch}.rope.dimension_count": (hd, "uint32")})
    for key, value in (metadata or {}).items():
        if value is None:
            kv.pop(key, None)
        else:
            kind = "bool" if isinstance(value, bool) else "float32" if isinstance(value, float) \
                else "uint64" if isinstance(value, int) and value >= 1 << 32 \
                else "int32" if isinstance(value, int) and value < 0 \
                else "uint32" if isinstance(value, int) else "string"
            kv[key] = (value, kind)

    writer = gguf.GGUFWriter(str(path), garch)
    for key, (value, kind) in kv.items():
        getattr(writer, f"add_{kind}")(key.format(arch=garch), value)
    add_byte_tokenizer(writer, tokens, merges, "qwen2" if qwen else "smollm",
                       config["bos_token_id"], config["eos_token_id"])
    writer.add_chat_template(CHAT_TEMPLATE)

    dequantized, qtypes = {}, {}
    noise = np.random.default_rng(seed + 1)
    for name, w in weights.items():
        # convert_hf_to_gguf.py keeps 1-D tensors and the router (FFN_GATE_INP) in F32, and
        # llama-quantize leaves ffn_gate_inp alone
        t = f32 if w.ndim == 1 or name.endswith(".gate.weight") else q
        qtypes[name] = t.name
        try:
            data = gguf.quants.quantize(w, t)
        except NotImplementedError:  # a type gguf-py only reads: random blocks of it
            shape = gguf.quants.quant_shape_to_byte_shape(w.shape, t)
            data = noise.integers(0, 256, shape, dtype=np.uint8)
        dequantized[name] = np.asarray(gguf.quants.dequantize(data, t), np.float32
                                       ).reshape(w.shape)
        if not qwen and name.endswith(("q_proj.weight", "k_proj.weight")):  # LlamaModel
            # rows are (de)quantized one by one: permuting them commutes with that
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            data = permute_qk(data, heads)
        if t in (f32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(gguf_name(name), data)
        else:
            writer.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"config": config, "weights": weights, "dequantized": dequantized,
            "gguf_arch": garch, "qtypes": qtypes}
