"""What every architecture shares: config checks, the FFN's math (`FFNSpec`) and how it
becomes neuron records, quantized weights as sources hold them, and the adapter protocol.

An architecture adapter answers four questions for the converter and the loader:
  * which source tensors make up layer i's FFN, and what FFN it is (`FFNSpec`);
  * under which model parameter name every other (resident) tensor is loaded;
  * how to build the MLX model (mlx-lm's class, or ours where mlx-lm has none);
  * where each layer's FFN module sits, so the loader can put a `FlashFFN` there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from ..bundle import (
    DTYPES,
    PART_DTYPES,
    Quantization,
    RecordPart,
    layout_parts,
    quantized_parts,
)
from ..errors import ConversionError, UnsupportedModel

# Sizes past any real model (the largest have d = 16384, n = 53248, 126 layers, 256k tokens,
# 128 heads): a config beyond them is damaged or hostile, and is refused before anything is
# sized by it (one claiming 10^9 layers had a conversion killed at 23 GB).
LIMITS = {"hidden_size": 1 << 17, "intermediate_size": 1 << 20, "ffn_dim": 1 << 20,
          "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 12,
          "num_key_value_heads": 1 << 12, "head_dim": 1 << 12, "vocab_size": 1 << 22,
          "max_position_embeddings": 1 << 30, "word_embed_proj_dim": 1 << 17}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")  # finite and > 0
FINITE_FLOATS = ("hidden_act_param",)


def check_config(config: Any, required: tuple[str, ...] = ()) -> None:
    """Refuse a model config that is not a JSON object of sane values: the sizes (REQUIRED,
    `required` and any other of LIMITS given) positive integers within LIMITS, the heads
    dividing the hidden size and the KV heads the heads, floats finite (epsilons and RoPE's
    base positive), the BOS and EOS ids tokens of the vocabulary. UnsupportedModel says why."""
    if not isinstance(config, dict):
        raise UnsupportedModel(f"the model config is a JSON {type(config).__name__}, not an "
                               "object")
    for key, high in LIMITS.items():
        value = config.get(key)
        if value is None and key not in REQUIRED + required:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise UnsupportedModel(f"config {key} must be an integer from 1 to {high}, not "
                                   f"{value!r:.40}")
    for key in POSITIVE_FLOATS + FINITE_FLOATS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or (key in POSITIVE_FLOATS and value <= 0):
            kind = "a positive number" if key in POSITIVE_FLOATS else "a finite number"
            raise UnsupportedModel(f"config {key} must be {kind}, not {value!r:.40}")
    heads = config["num_attention_heads"]
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise UnsupportedModel(f"config hidden_size {config['hidden_size']} is not a multiple "
                               f"of num_attention_heads {heads}")
    if heads % (config.get("num_key_value_heads") or heads):
        raise UnsupportedModel(f"config num_attention_heads {heads} is not a multiple of "
                               f"num_key_value_heads {config['num_key_value_heads']}")
    for key in ("bos_token_id", "eos_token_id"):
        ids = config.get(key)
        for i in ids if isinstance(ids, list) else [] if ids is None else [ids]:
            if isinstance(i, bool) or not isinstance(i, int) \
                    or not 0 <= i < config["vocab_size"]:
                raise UnsupportedModel(f"config {key} {i!r:.40} is not a token of the "
                                       f"{config['vocab_size']}-token vocabulary")
    scaling = config.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise UnsupportedModel("config rope_scaling must be a JSON object")
    for key, value in scaling.items():  # factors, lists of factors (longrope), names
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UnsupportedModel(f"config rope_scaling {key!r:.40} must be finite, not "
                                       f"{v!r}")


@dataclass(frozen=True)
class FFNSpec:
    """The FFN's math, which fixes the neuron record layout.

    kind "glu": y = down · (act(gate · x) ⊙ (up · x))          (Llama family)
    kind "mlp": y = down · act(up · x + up_bias) + down_bias    (OPT: up = fc1, down = fc2)
    Neuron i's record holds gate row i, up row i (and up_bias[i]), and down column i.
    activation: "silu" (SwiGLU), "relu" (ReluLLaMA, OPT), "fatrelu" (ProSparse: x if x >
    threshold else 0), "drelu" (TurboSparse: relu(gate) ⊙ relu(up)).
    """

    kind: str
    activation: str
    hidden_size: int
    intermediate_size: int
    down_bias: bool = False
    threshold: float = 0.0

    @property
    def tensors(self) -> list[str]:
        """The record's tensors: gate row, up row, down column (and the up bias)."""
        return ["gate", "up", "down"] if self.kind == "glu" else ["up", "down", "up_bias"]

    def record_layout(self, dtype: str, quantization: dict[str, Quantization] | None = None
                      ) -> tuple[tuple[RecordPart, ...], int]:
        """The parts of one neuron record and its size in bytes: each tensor `hidden_size`
        elements of `dtype`, or, if `quantization` names it, packed words, scales and biases."""
        d, quantization = self.hidden_size, quantization or {}
        parts: list[tuple[str, int, str]] = []
        for t in self.tensors:
            q = quantization.get(t)
            if t == "up_bias":
                parts.append((t, 1, dtype))
            elif q is None:
                parts.append((t, d, dtype))
            else:
                if d % q.group_size:
                    raise UnsupportedModel(f"hidden size {d} is not a multiple of the "
                                           f"quantization group size {q.group_size}")
                groups = d // q.group_size
                packed, scales, biases = quantized_parts(t)
                parts += [(packed, d * q.bits // 32, "uint32"), (scales, groups, dtype),
                          (biases, groups, dtype)]
        return layout_parts(parts)


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight matrix in MLX's affine quantization, rows = output features (as mlx-lm and
    GGUF's Q4_0/Q4_1/Q8_0 store it): `weight` packed uint32, `scales`, `biases` per group."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The float matrix's shape (`[E, out, in]` for experts stacked as mlx-lm does)."""
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 32 // self.bits)

    def dequantize(self) -> mx.array:
        # float32 scales: float16 ones would round the dequantized values (GGUF's are exact)
        return mx.dequantize(self.weight, self.scales.astype(mx.float32),
                             self.biases.astype(mx.float32), group_size=self.group_size,
                             bits=self.bits)


Weight = mx.array | QuantizedTensor


def record_tensors(spec: FFNSpec, w: dict[str, Weight], dtype: str,
                   quantization: dict[str, Quantization] | None = None) -> dict[str, mx.array]:
    """One layer's neuron-record parts (`[intermediate_size, length]` each) from its FFN
    weights in HF layout (gate/up `[n, d]`, down `[d, n]`, up_bias `[n]`; float, or quantized
    along d). A gate/up already quantized as asked is kept bit for bit; anything else is
    dequantized and (re)quantized along the row. The down projection is quantized along the
    FFN dimension in its source, across neurons, so a quantized down column is always
    requantized, along d (docs/FORMAT.md)."""
    quantization, out = quantization or {}, {}
    target = DTYPES[dtype]
    for t in spec.tensors:
        src, q = w[t], quantization.get(t)
        if q is not None and t != "down" and isinstance(src, QuantizedTensor) \
                and (src.bits, src.group_size) == (q.bits, q.group_size):
            out.update(zip(quantized_parts(t), (src.weight, src.scales.astype(target),
                                                 src.biases.astype(target)), strict=True))
            continue
        f = src.dequantize() if isinstance(src, QuantizedTensor) else src.astype(mx.float32)
        f = f.T if t == "down" else f.reshape(spec.intermediate_size, -1)
        if q is None:
            out[t] = f.astype(target)
        else:
            packed, scales, biases = mx.quantize(f, group_size=q.group_size, bits=q.bits)
            out.update(zip(quantized_parts(t), (packed, scales.astype(target),
                                                 biases.astype(target)), strict=True))
    return out


def pack_records(parts: tuple[RecordPart, ...], record_bytes: int,
                 arrays: dict[str, mx.array]) -> mx.array:
    """Records `[n, record_bytes]` (uint8): each row holds every part at its offset."""
    n = next(iter(arrays.values())).shape[0]
    columns, position = [], 0
    for p in sorted(parts, key=lambda p: p.offset):
        if p.offset > position:
            columns.append(mx.zeros((n, p.offset - position), dtype=mx.uint8))
        a = arrays[p.name]
        if tuple(a.shape) != (n, p.length) or a.dtype != PART_DTYPES[p.dtype]:
            raise ValueError(f"part {p.name}: {a.shape} {a.dtype}, expected {(n, p.length)} "
                             f"{p.dtype}")
        columns.append(a.view(mx.uint8).reshape(n, p.nbytes))
        position = p.offset + p.nbytes
    if record_bytes > position:
        columns.append(mx.zeros((n, record_bytes - position), dtype=mx.uint8))
    return mx.concatenate(columns, axis=1)


class Architecture(Protocol):
    name: str
    model_types: tuple[str, ...]
    required: tuple[str, ...]  # config sizes it needs besides REQUIRED

    def ffn_spec(self, config: dict[str, Any]) -> FFNSpec: ...

    def build(self, config: dict[str, Any]) -> nn.Module: ...

    def layers(self, model: nn.Module) -> list[nn.Module]: ...

    def layer_prefix(self, layer: int) -> str: ...

    def ffn_source_names(self, layer: int) -> dict[str, str]: ...

    def canonical_name(self, name: str) -> str: ...

    def resident_name(self, name: str, config: dict[str, Any]) -> str | None: ...


def check_finite(name: str, w: Weight) -> None:
    """Refuse a weight that is not floats (quantized: packed uint32 words, float scales and
    biases) or holds NaN or infinity: a damaged file would compute something else than its
    model (integers cast to float) or garbage. One reduction per tensor, nothing beside
    reading it."""
    if isinstance(w, QuantizedTensor):
        arrays, packed = (w.scales, w.biases), w.weight.dtype == mx.uint32
    else:
        arrays, packed = (w,), True
    if not packed or not all(mx.issubdtype(a.dtype, mx.floating) for a in arrays):
        stored = ", ".join(str(a.dtype).rsplit(".", 1)[-1] for a in (
            (w.weight, w.scales, w.biases) if isinstance(w, QuantizedTensor) else (w,)))
        raise ConversionError(f"{name} is stored as {stored}, not as a float weight (or "
                              "uint32 words with float scales): the file is damaged")
    if not all(mx.all(mx.isfinite(a)).item() for a in arrays):
        raise ConversionError(f"{name} holds NaN or infinite values: the file is damaged")


def resident_arrays(target: str, w: Weight, quantized: dict[str, Quantization]
                    ) -> dict[str, mx.array]:
    """The model parameters weight `target` is stored as: itself, or, quantized, its module's
    weight, scales and biases as mlx-lm names them (recording the module in `quantized`)."""
    if not isinstance(w, QuantizedTensor):
        return {target: w}
    module = target.removesuffix(".weight")
    quantized[module] = Quantization(w.bits, w.group_size)
    return {f"{module}.weight": w.weight, f"{module}.scales": w.scales,
            f"{module}.biases": w.biases}


def mlx_lm_quantization(modules: dict[str, Quantization]) -> dict[str, Any]:
    """mlx-lm's config entry for quantized modules: the most common bits and group size, and
    each module that differs under its own name."""
    from collections import Counter

    common = Counter(modules.values()).most_common(1)[0][0]
    entry: dict[str, Any] = {"group_size": common.group_size, "bits": common.bits}
    for module, q in sorted(modules.items()):
        if q != common:
            entry[module] = {"group_size": q.group_size, "bits": q.bits}
    return entry
