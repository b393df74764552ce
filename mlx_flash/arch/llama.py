"""Llama-family models with a gated FFN (llama, mistral, qwen2, SmolLM): mlx-lm's own classes."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from ..errors import UnsupportedModel
from .base import FFNSpec

# silu: SwiGLU; relu: ReluLLaMA; fatrelu: ProSparse (threshold in "hidden_act_param");
# drelu: TurboSparse's relu on gate and on up (set "hidden_act": "drelu" in its config.json)
ACTIVATIONS = ("silu", "relu", "fatrelu", "drelu")


class LlamaFamily:
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    required = ("intermediate_size",)

    def ffn_spec(self, config: dict[str, Any]) -> FFNSpec:
        act = config.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise UnsupportedModel(f"{config['model_type']} with hidden_act={act!r} is not "
                                   f"supported (supported: {', '.join(ACTIVATIONS)})")
        if config.get("mlp_bias"):
            raise UnsupportedModel("FFN biases (mlp_bias=true) are not supported")
        if config.get("rope_scaling") and config["rope_scaling"].get("type") == "dynamic":
            raise UnsupportedModel("dynamic RoPE scaling is not supported")
        return FFNSpec("glu", act, int(config["hidden_size"]), int(config["intermediate_size"]),
                       threshold=float(config.get("hidden_act_param", 0.0)) if act == "fatrelu"
                       else 0.0)

    def build(self, config: dict[str, Any]) -> nn.Module:
        from mlx_lm.utils import _get_classes

        model_class, args_class = _get_classes(config)
        return model_class(args_class.from_dict(config))

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return model.layers

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def ffn_source_names(self, layer: int) -> dict[str, str]:
        p = f"{self.layer_prefix(layer)}.mlp"
        return {"gate": f"{p}.gate_proj.weight", "up": f"{p}.up_proj.weight",
                "down": f"{p}.down_proj.weight"}

    def canonical_name(self, name: str) -> str:
        return name

    def resident_name(self, name: str, config: dict[str, Any]) -> str | None:
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and config.get("tie_word_embeddings", True):
            return None
        return name


ARCH = LlamaFamily()
