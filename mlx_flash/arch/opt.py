"""OPT (Zhang et al. 2022), the paper's main model: ReLU FFN with biases, learned positions,
LayerNorm. mlx-lm has no OPT, so this is ours, written to match transformers' OPTForCausalLM
(checked against it in tests/test_opt.py) and mlx-lm's model conventions (KV cache, masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)

from ..errors import UnsupportedModel
from .base import FFNSpec

# transformers' OPT places learned positions at index position + 2 (a fairseq legacy).
POSITION_OFFSET = 2


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    ffn_dim: int
    num_attention_heads: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    _remove_final_layer_norm: bool = False

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, bias = args.hidden_size, args.enable_bias
        self.n_heads = args.num_attention_heads
        self.scale = (d // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.ffn_dim, bias=args.enable_bias)
        self.fc2 = nn.Linear(args.ffn_dim, args.hidden_size, bias=args.enable_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.relu(self.fc1(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, affine = args.hidden_size, args.layer_norm_elementwise_affine
        self.pre_norm = args.do_layer_norm_before
        self.self_attn = Attention(args)
        self.self_attn_layer_norm = nn.LayerNorm(d, affine=affine)
        self.mlp = MLP(args)
        self.final_layer_norm = nn.LayerNorm(d, affine=affine)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if self.pre_norm:
            h = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache)
            return h + self.mlp(self.final_layer_norm(h))
        h = self.self_attn_layer_norm(x + self.self_attn(x, mask, cache))
        return self.final_layer_norm(h + self.mlp(h))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, e = args.hidden_size, args.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(args.vocab_size, e)
        self.embed_positions = nn.Embedding(args.max_position_embeddings + POSITION_OFFSET, d)
        if e != d:
            self.project_in = nn.Linear(e, d, bias=False)
            self.project_out = nn.Linear(d, e, bias=False)
        if args.do_layer_norm_before and not args._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(d, affine=args.layer_norm_elementwise_affine)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        h = self.embed_tokens(inputs)
        if "project_in" in self:
            h = self.project_in(h)
        offset = cache[0].offset if cache is not None and cache[0] is not None else 0
        learned = self.embed_positions.weight.shape[0] - POSITION_OFFSET
        if offset + inputs.shape[1] > learned:
            # a position past the table would gather memory outside it (MLX does not check)
            raise ValueError(f"OPT learned positions for {learned} tokens; this sequence "
                             f"reaches {offset + inputs.shape[1]}")
        positions = mx.arange(offset, offset + inputs.shape[1]) + POSITION_OFFSET
        h = h + self.embed_positions(positions)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, mask, c)
        if "final_layer_norm" in self:
            h = self.final_layer_norm(h)
        if "project_out" in self:
            h = self.project_out(h)
        return h


class OPTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = Decoder(args)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OPTModel(args)

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        h = self.model.decoder(inputs, cache)
        return self.model.decoder.embed_tokens.as_linear(h)  # OPT ties lm_head to the embedding

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.decoder.layers


class OPTArchitecture:
    name = "opt"
    model_types = ("opt",)
    required = ("ffn_dim",)

    def ffn_spec(self, config: dict[str, Any]) -> FFNSpec:
        act = config.get("activation_function", "relu")
        if act != "relu":
            raise UnsupportedModel(f"OPT with activation_function={act!r} is not supported")
        if config.get("enable_bias", True) is False:
            raise UnsupportedModel("OPT without biases (enable_bias=false) is not supported")
        if config.get("tie_word_embeddings", True) is False:
            raise UnsupportedModel("OPT with an untied lm_head is not supported")
        return FFNSpec("mlp", "relu", int(config["hidden_size"]), int(config["ffn_dim"]),
                       down_bias=True)

    def build(self, config: dict[str, Any]) -> nn.Module:
        return Model(ModelArgs.from_dict(config))

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return model.layers

    def layer_prefix(self, layer: int) -> str:
        return f"model.decoder.layers.{layer}"

    def ffn_source_names(self, layer: int) -> dict[str, str]:
        p = self.layer_prefix(layer)
        return {"up": f"{p}.fc1.weight", "up_bias": f"{p}.fc1.bias",
                "down": f"{p}.fc2.weight", "down_bias": f"{p}.fc2.bias"}

    def canonical_name(self, name: str) -> str:
        # some checkpoints (facebook/opt-*) omit the "model." prefix
        return "model." + name if name.startswith("decoder.") else name

    def resident_name(self, name: str, config: dict[str, Any]) -> str | None:
        if name == "lm_head.weight":
            return None
        for fc in (".fc1.", ".fc2."):
            name = name.replace(fc, f".mlp{fc}")
        return name


ARCH = OPTArchitecture()
