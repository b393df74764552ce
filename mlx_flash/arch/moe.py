"""Mixture-of-Experts models: config checks, mlx-lm's model with its routed experts replaced,
and the layout of an expert record.

The router already gives the sparsity the paper had to predict: a token uses k of E experts
per layer, exactly. So a layer's routed experts (mlx-lm's `SwitchGLU`) become one record
family, one record per expert holding its gate, up and down matrices (the paper's row-column
bundling at the expert level: one read fetches an expert), each record a whole number of
4 KiB pages. Routers, attention, embeddings, norms and shared experts stay resident.

The model is mlx-lm's own MoE model with each layer's `SwitchGLU` replaced by an
`ExpertSwitch`, which hands its input and the router's choice to an engine
(mlx_flash.moe.ExpertEngine): mlx-lm's router picks the experts and weighs their outputs, so
greedy output is mlx-lm's on the same weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..bundle import ALIGNMENT, Quantization, layout_parts, quantized_parts
from ..errors import UnsupportedModel
from .base import check_config

TENSORS = ("gate", "up", "down")  # a record's matrices: mlx-lm's gate_proj, up_proj, down_proj


# model type -> the config key holding the number of routed experts
MOE_TYPES = {"qwen3_moe": "num_experts", "qwen2_moe": "num_experts",
             "mixtral": "num_local_experts", "olmoe": "num_experts",
             "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}


MAX_EXPERTS = 1 << 12  # the largest real models route among 512


MOE_SIZES = ("moe_intermediate_size", "shared_expert_intermediate_size", "n_shared_experts",
             "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
             "v_head_dim", "first_k_dense_replace", "n_group", "topk_group",
             "decoder_sparse_step", "moe_layer_freq")


def is_moe(config: Any) -> bool:
    return isinstance(config, dict) and config.get("model_type") in MOE_TYPES


def check_moe_config(config: dict[str, Any]) -> None:
    """UnsupportedModel unless `config` is an MoE model we run, with sane sizes."""
    model_type = config.get("model_type")
    if model_type not in MOE_TYPES:
        raise UnsupportedModel(f"unsupported MoE architecture {model_type!r:.40} (supported: "
                               f"{', '.join(sorted(MOE_TYPES))})")
    check_config(config)
    for key in (MOE_TYPES[model_type], "num_experts_per_tok"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) \
                or not 1 <= value <= MAX_EXPERTS:
            raise UnsupportedModel(f"config {key} must be an integer from 1 to {MAX_EXPERTS}, "
                                   f"not {value!r:.40}")
    for key in MOE_SIZES:  # mlx-lm sizes arrays by them when it builds the model
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= 1 << 20):
            raise UnsupportedModel(f"config {key} must be an integer from 0 to {1 << 20}, "
                                   f"not {value!r:.40}")
    if config["num_experts_per_tok"] > config[MOE_TYPES[model_type]]:
        raise UnsupportedModel("config num_experts_per_tok is larger than the number of "
                               "experts")
    scale = config.get("routed_scaling_factor")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise UnsupportedModel(f"config routed_scaling_factor must be a positive number, not "
                               f"{scale!r:.40}")
    _check_groups(config)


def _check_groups(config: dict[str, Any]) -> None:
    """DeepSeek's routing by groups, as mlx-lm computes it: deepseek_v3 always (topk_method
    noaux_tc, sigmoid scores), deepseek_v2 with topk_method group_limited_greedy. The experts
    split into n_group equal groups (of two or more in v3, whose group score is its two best
    experts), of which topk_group (1 to n_group) are kept. Else mlx-lm fails on the first
    token, or routes among masked groups."""
    model_type = config["model_type"]
    if model_type == "deepseek_v3":
        method = config.get("topk_method", "noaux_tc")
        if method != "noaux_tc":
            raise UnsupportedModel(f"config topk_method {method!r:.40} is not deepseek_v3's "
                                   "(mlx-lm routes it by noaux_tc only)")
        scoring = config.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise UnsupportedModel(f"config scoring_func {scoring!r:.40} is not deepseek_v3's "
                                   "(mlx-lm scores its experts by sigmoid only)")
        n_group, topk_group = config.get("n_group", 1), config.get("topk_group", 1)
    elif model_type == "deepseek_v2" and config.get("topk_method") == "group_limited_greedy":
        n_group, topk_group = config.get("n_group"), config.get("topk_group")
    else:
        return
    experts = config[MOE_TYPES[model_type]]
    for key, value in (("n_group", n_group), ("topk_group", topk_group)):
        if not isinstance(value, int) or value < 1:  # (a bool or above 2^20: refused above)
            raise UnsupportedModel(f"config {key} must be a positive integer for "
                                   f"{model_type}'s routing by groups, not {value!r:.40}")
    if experts % n_group:
        raise UnsupportedModel(f"config n_group {n_group} does not divide the {experts} routed "
                               "experts into equal groups")
    if n_group == 1 and model_type == "deepseek_v3":
        return  # one group: no grouping (topk_group unused)
    if model_type == "deepseek_v3" and experts // n_group < 2:
        raise UnsupportedModel(f"config n_group {n_group} makes groups of one expert "
                               "(deepseek_v3 scores a group by its two best experts)")
    if topk_group > n_group:
        raise UnsupportedModel(f"config topk_group {topk_group} is larger than n_group "
                               f"{n_group}: it keeps more groups than there are")


def build_model(config: dict[str, Any]) -> nn.Module:
    """mlx-lm's model for `config` (lazy parameters: nothing is allocated until evaluated)."""
    from mlx_lm.models.switch_layers import SwitchGLU
    from mlx_lm.utils import _get_classes

    check_moe_config(config)
    model_class, args_class = _get_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError, AttributeError, OverflowError, ZeroDivisionError
            ) as e:
        raise UnsupportedModel(f"mlx-lm cannot build this {config['model_type']} config: "
                               f"{type(e).__name__}: {e}") from None
    if not any(isinstance(m, SwitchGLU) for _, m in model.named_modules()):
        raise UnsupportedModel(f"this {config['model_type']} model has no routed experts")
    return model


@dataclass
class RoutedLayer:
    """Where a layer's routed experts sit in the model, and their shape."""

    layer: int
    path: str  # e.g. "model.layers.3.mlp.switch_mlp"
    parent: nn.Module
    name: str
    activation: nn.Module
    shapes: dict[str, tuple[int, int]]  # tensor -> (out, in)


def routed_layers(model: nn.Module) -> dict[int, RoutedLayer]:
    """Every layer's SwitchGLU, by layer number."""
    from mlx_lm.models.switch_layers import SwitchGLU

    modules = dict(model.named_modules())
    out = {}
    for path, m in modules.items():
        if not isinstance(m, SwitchGLU):
            continue
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
        if found is None:
            raise UnsupportedModel(f"routed experts outside a layer: {path}")
        parent, name = path.rsplit(".", 1)
        shapes = {t: tuple(getattr(m, f"{t}_proj").weight.shape[1:]) for t in TENSORS}
        out[int(found.group(1))] = RoutedLayer(int(found.group(1)), path, modules[parent], name,
                                               m.activation, shapes)
    return out


def expert_layout(shapes: dict[str, tuple[int, int]], dtype: str,
                  quantization: dict[str, Quantization]) -> tuple[tuple, int]:
    """The parts of one expert record and its size (a multiple of 4 KiB): each matrix
    `out × in` of `dtype`, or quantized along `in` (packed words, scales, biases)."""
    parts: list[tuple[str, int, str]] = []
    for t in TENSORS:
        rows, cols = shapes[t]
        q = quantization.get(t)
        if q is None:
            parts.append((t, rows * cols, dtype))
            continue
        packed, scales, biases = quantized_parts(t)
        parts += [(packed, rows * cols * q.bits // 32, "uint32"),
                  (scales, rows * cols // q.group_size, dtype),
                  (biases, rows * cols // q.group_size, dtype)]
    return layout_parts(parts, align=ALIGNMENT)


# what serves an ExpertSwitch: (layer, x, the router's indices, activation) -> the experts'
# outputs, as SwitchGLU returns them (mlx_flash.moe.ExpertEngine)
ExpertServer = Callable[[int, mx.array, mx.array, nn.Module], mx.array]


class ExpertSwitch(nn.Module):
    """Drop-in for mlx-lm's SwitchGLU whose experts stay in the bundle until routed to."""

    def __init__(self, engine: ExpertServer | None, layer: int, activation: nn.Module):
        super().__init__()
        self.engine, self.layer, self.activation = engine, layer, activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self.engine(self.layer, x, indices, self.activation)


def flash_model(config: dict[str, Any], engine: ExpertServer | None
                ) -> tuple[nn.Module, dict[int, RoutedLayer]]:
    """mlx-lm's model with every layer's routed experts an ExpertSwitch."""
    model = build_model(config)
    routed = routed_layers(model)
    for r in routed.values():
        setattr(r.parent, r.name, ExpertSwitch(engine, r.layer, r.activation))
    return model, routed
