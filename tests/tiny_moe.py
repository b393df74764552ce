"""Tiny random-weight Mixture-of-Experts models, built with mlx-lm's own classes and written
as mlx-lm folders (float32, or 4-bit with float32 scales): the references the MoE tests
compare mlx_flash with, on the same weights. Routing of random weights is close to uniform;
the trained fixture (tests/data/moe-tiny) gives real routing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tiny_models import save_byte_tokenizer

COMMON = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "max_position_embeddings": 512, "tie_word_embeddings": False}

CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"intermediate_size": 96, "head_dim": 16, "num_experts": 8,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "moe_intermediate_size": 32, "norm_topk_prob": True},
    # a shared expert beside the routed ones
    "qwen2_moe": {"intermediate_size": 96, "num_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48},
    "mixtral": {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {"intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
              "norm_topk_prob": False},
    # MLA attention, a shared expert, the first layer dense
    "deepseek_v2": {"num_hidden_layers": 3, "num_key_value_heads": 4, "intermediate_size": 96,
                    "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 1,
                    "num_experts_per_tok": 2, "first_k_dense_replace": 1, "kv_lora_rank": 16,
                    "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                    "v_head_dim": 16, "topk_method": "greedy", "routed_scaling_factor": 1.0,
                    "rope_scaling": {"type": "yarn", "factor": 1.0,
                                     "original_max_position_embeddings": 512}},
    "deepseek_v3": {"num_hidden_layers": 3, "num_key_value_heads": 4, "intermediate_size": 96,
                    "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 1,
                    "num_experts_per_tok": 2, "first_k_dense_replace": 1, "kv_lora_rank": 16,
                    "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                    "v_head_dim": 16, "n_group": 2, "topk_group": 1,
                    "routed_scaling_factor": 2.5},
}


def moe_config(model_type: str, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    return {"model_type": model_type, "vocab_size": vocab_size, **COMMON,
            **CONFIGS[model_type], **overrides}


def build_mlx_lm(config: dict[str, Any]) -> nn.Module:
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def write_tiny_moe(folder: Path, model_type: str, bits: int | None = None, seed: int = 0,
                   dtype: mx.Dtype = mx.float32, **overrides: Any) -> dict[str, Any]:
    """An mlx-lm folder of a random `model_type` MoE: float (`dtype`), or quantized (`bits`,
    group 32) as mlx-lm's convert does; returns its config. Weights are drawn with a scale that
    gives every layer a say (mlx-lm's own initialisation leaves the router near uniform)."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    folder.mkdir(parents=True)
    vocab = save_byte_tokenizer(folder)
    config = moe_config(model_type, vocab, **overrides)
    model = build_mlx_lm(config)
    rng = np.random.default_rng(seed)

    def draw(a: mx.array) -> mx.array:
        if a.ndim == 1:  # norms
            return mx.array(1 + 0.1 * rng.standard_normal(a.shape).astype(np.float32))
        fan_in = a.shape[-1]
        return mx.array(rng.standard_normal(a.shape).astype(np.float32) / np.sqrt(fan_in))

    model.update(tree_map(draw, model.parameters()))
    model.set_dtype(dtype)
    if bits is not None:
        model, config = quantize_model(model, config, 32, bits)
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return config


def write_hf_experts(src: Path, dst: Path) -> None:
    """`src` (a float mlx-lm folder) with its experts unstacked into Hugging Face's names,
    one tensor per expert (`...experts.E.gate_proj.weight`; Mixtral's `w1`/`w3`/`w2`)."""
    import shutil

    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    mixtral = "block_sparse_moe" in " ".join(weights)
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if mixtral else {}
    out = {}
    for name, w in weights.items():
        if ".switch_mlp." not in name:
            out[name] = w
            continue
        prefix, proj = name.split(".switch_mlp.")
        proj = proj.split(".")[0]
        for e in range(w.shape[0]):
            out[f"{prefix}.experts.{e}.{names.get(proj, proj)}.weight"] = w[e]
    (dst / "model.safetensors").unlink()
    for index in dst.glob("*.index.json"):
        index.unlink()
    mx.save_safetensors(str(dst / "model.safetensors"), out, metadata={"format": "pt"})


def mlx_lm_model(folder: Path) -> nn.Module:
    """mlx-lm's own model of `folder`, computing in float32 (MLX's CPU gather_mm is
    float32-only)."""
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    if any(v.dtype in (mx.float16, mx.bfloat16) for _, v in tree_flatten(model.parameters())):
        model.set_dtype(mx.float32)
    return model
