"""The FFN that mlx-lm's layers call: neuron records come from flash, not from memory.

Per call and layer the engine (1) finishes the pending graph, so the layer input is known and
no earlier computation still reads the record buffer, (2) reads the layer's records from the
bundle into that buffer, (3) computes the FFN on them, and (4) evaluates the result before the
next layer reuses the buffer. This engine reads every record of the layer (the paper's "naive"
baseline); selection of a few records per token plugs in at step (2).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu

from .arch import FFNSpec
from .bundle import Bundle, RecordFamily
from .flash_io import FlashReader
from .neuron_cache import NeuronMatrix

ACTIVATIONS = {"silu": nn.silu, "relu": nn.relu}


def ffn_forward(spec: FFNSpec, x: mx.array, parts: dict[str, mx.array],
                down_bias: mx.array | None = None) -> mx.array:
    """The FFN over the neurons whose parts are given (rows of `parts[...]` = neurons)."""
    if spec.kind == "glu":
        gate, up = x @ parts["gate"].T, x @ parts["up"].T
        # mlx-lm's own swiglu, so a bundle computes exactly what mlx-lm computes
        h = swiglu(gate, up) if spec.activation == "silu" else ACTIVATIONS[spec.activation](
            gate) * up
    else:
        h = ACTIVATIONS[spec.activation](x @ parts["up"].T + parts["up_bias"].reshape(-1))
    y = h @ parts["down"]
    return y if down_bias is None else y + down_bias


@dataclass
class PhaseStats:
    """What the FFN engine did in one phase (prefill or decode)."""

    tokens: int = 0
    bytes: int = 0
    io_seconds: float = 0.0
    ffn_seconds: float = 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


@dataclass
class EngineStats:
    prefill: PhaseStats = field(default_factory=PhaseStats)
    decode: PhaseStats = field(default_factory=PhaseStats)

    def reset(self) -> None:
        self.prefill, self.decode = PhaseStats(), PhaseStats()


class FlashEngine:
    """Serves every FlashFFN of one model from the bundle's neuron records."""

    def __init__(self, bundle: Bundle, spec: FFNSpec, compute_dtype: mx.Dtype):
        self.family: RecordFamily = bundle.families["neuron"]
        self.spec = spec
        self.compute_dtype = compute_dtype
        self.reader = FlashReader(bundle.ffn_path)
        self.stats = EngineStats()
        # One neuron matrix shared by all layers: a layer's records are read into it, used,
        # and released (its output evaluated) before the next layer reads over them.
        self.matrix = NeuronMatrix(self.family, self.family.count)
        self._all = np.arange(self.family.count)

    def _parts(self) -> dict[str, mx.array]:
        return {k: v.astype(self.compute_dtype) for k, v in self.matrix.parts.items()}

    def __call__(self, layer: int, x: mx.array, down_bias: mx.array | None) -> mx.array:
        mx.eval(x)
        t0 = time.perf_counter()
        self.reader.read_records(self.family.segments[layer][0], self._all, self._all,
                                 self.matrix)
        t1 = time.perf_counter()
        y = ffn_forward(self.spec, x, self._parts(), down_bias)
        mx.eval(y)
        t2 = time.perf_counter()
        phase = self.stats.decode if x.shape[1] == 1 else self.stats.prefill
        if layer == 0:
            phase.tokens += x.size // x.shape[-1]
        phase.bytes += len(self._all) * self.family.record_bytes
        phase.io_seconds += t1 - t0
        phase.ffn_seconds += t2 - t1
        return y


class FlashFFN(nn.Module):
    """Drop-in for an mlx-lm MLP whose weights stay in the bundle until a token needs them."""

    def __init__(self, engine: FlashEngine | None, layer: int, spec: FFNSpec):
        super().__init__()
        self.engine = engine
        self.layer = layer
        if spec.down_bias:
            self.bias = mx.zeros((spec.hidden_size,))

    def __call__(self, x: mx.array) -> mx.array:
        return self.engine(self.layer, x, self.get("bias"))
