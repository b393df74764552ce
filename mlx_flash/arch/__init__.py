"""Architectures: how each model family's FFN maps onto neuron records, and its MLX model.

An architecture adapter answers four questions for the converter and the loader:
  * which source tensors make up layer i's FFN, and what FFN it is (`FFNSpec`);
  * under which model parameter name every other (resident) tensor is loaded;
  * how to build the MLX model (mlx-lm's class, or ours where mlx-lm has none);
  * where each layer's FFN module sits, so the loader can put a `FlashFFN` there.
Mixture-of-Experts models (`arch.moe`) are mlx-lm's own, their routed experts replaced.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModel
from . import llama, moe, opt
from .base import (
    Architecture,
    FFNSpec,
    QuantizedTensor,
    Weight,
    check_config,
    check_finite,
    mlx_lm_quantization,
    pack_records,
    record_tensors,
    resident_arrays,
)

__all__ = ["Architecture", "FFNSpec", "QuantizedTensor", "Weight", "check_config",
           "check_finite", "get_architecture", "mlx_lm_quantization", "pack_records",
           "record_tensors", "resident_arrays"]

DENSE = (llama.ARCH, opt.ARCH)


def get_architecture(config: dict[str, Any]) -> Architecture:
    """The adapter for `config["model_type"]`, after checking the config is one we support
    (`check_config`, then the adapter's own checks)."""
    if not isinstance(config, dict):
        check_config(config)
    model_type = config.get("model_type")
    for arch in DENSE:
        if isinstance(model_type, str) and model_type in arch.model_types:
            check_config(config, arch.required)
            arch.ffn_spec(config)  # raises UnsupportedModel on configs we cannot run
            return arch
    supported = sorted(t for a in DENSE for t in a.model_types)
    raise UnsupportedModel(
        f"unsupported architecture {model_type!r} (supported: {', '.join(supported)}; "
        f"Mixture-of-Experts: {', '.join(sorted(moe.MOE_TYPES))})")

