"""Architectures: how each model family's FFN maps onto neuron records, and its MLX model.

An architecture adapter answers four questions for the converter and the loader:
  * which source tensors make up layer i's FFN, and what FFN it is (`FFNSpec`);
  * under which model parameter name every other (resident) tensor is loaded;
  * how to build the MLX model (mlx-lm's class, or ours where mlx-lm has none);
  * where each layer's FFN module sits, so the loader can put a `FlashFFN` there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from ..bundle import RecordPart


class UnsupportedModel(Exception):
    """The model's architecture or configuration is not one we can run."""


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

    def record_layout(self) -> tuple[list[RecordPart], int]:
        """The parts of one neuron record and its stride, in elements."""
        d = self.hidden_size
        names = ["gate", "up", "down"] if self.kind == "glu" else ["up", "down"]
        parts = [RecordPart(n, i * d, d) for i, n in enumerate(names)]
        if self.kind == "mlp":
            parts.append(RecordPart("up_bias", len(names) * d, 1))
        used = parts[-1].offset + parts[-1].length
        stride = -(-used // 8) * 8  # whole 16-byte units in float16, so rows stay aligned
        return parts, stride


def make_records(spec: FFNSpec, w: dict[str, mx.array]) -> mx.array:
    """Bundle one layer's FFN weights into neuron records `[intermediate_size, stride]`.

    `w` holds HF-layout tensors: gate/up `[n, d]`, down `[d, n]`, up_bias `[n]`.
    """
    parts, stride = spec.record_layout()
    n = spec.intermediate_size
    columns = []
    for p in parts:
        t = w[p.name]
        t = t.T if p.name == "down" else t
        columns.append(t.reshape(n, p.length).astype(mx.float32))
    used = parts[-1].offset + parts[-1].length
    if stride > used:
        columns.append(mx.zeros((n, stride - used), dtype=mx.float32))
    return mx.concatenate(columns, axis=1)


class Architecture(Protocol):
    name: str
    model_types: tuple[str, ...]

    def ffn_spec(self, config: dict[str, Any]) -> FFNSpec: ...

    def build(self, config: dict[str, Any]) -> nn.Module: ...

    def layers(self, model: nn.Module) -> list[nn.Module]: ...

    def layer_prefix(self, layer: int) -> str: ...

    def ffn_source_names(self, layer: int) -> dict[str, str]: ...

    def canonical_name(self, name: str) -> str: ...

    def resident_name(self, name: str, config: dict[str, Any]) -> str | None: ...


def get_architecture(config: dict[str, Any]) -> Architecture:
    """The adapter for `config["model_type"]`, after checking the config is one we support."""
    from . import llama, opt

    model_type = config.get("model_type")
    for arch in (llama.ARCH, opt.ARCH):
        if model_type in arch.model_types:
            arch.ffn_spec(config)  # raises UnsupportedModel on configs we cannot run
            return arch
    supported = sorted(t for a in (llama.ARCH, opt.ARCH) for t in a.model_types)
    raise UnsupportedModel(
        f"unsupported architecture {model_type!r} (supported: {', '.join(supported)})")
