"""The FFN that mlx-lm's layers call: neuron records come from flash, not from memory.

Per call and layer the engine (1) finishes the pending graph, so the layer input is known and
no earlier computation still reads the neuron matrices, (2) lets the selection mode decide
which records (and which of their parts) the tokens need and reads those into the matrices,
(3) computes the FFN over them, and (4) evaluates the result before the next layer reads over
the matrices. With selection "off" every record is read: the paper's naive engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .arch import FFNSpec
from .bundle import Bundle
from .flash_io import FlashReader
from .neuron_cache import NeuronMatrix
from .selection import LayerReads, Mode


@dataclass
class PhaseStats:
    """What the FFN engine did in one phase (prefill or decode)."""

    tokens: int = 0
    bytes: int = 0  # read from flash
    needed_bytes: int = 0  # what the tokens' selections needed, summed over tokens
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


Observer = Callable[[int, mx.array, LayerReads], None]


class FlashEngine:
    """Serves every FlashFFN of one model from the bundle's records, with a selection mode."""

    def __init__(self, bundle: Bundle, spec: FFNSpec, mode: Mode, compute_dtype: mx.Dtype):
        self.bundle = bundle
        self.spec = spec
        self.mode = mode
        self.compute_dtype = compute_dtype
        self.families = bundle.families
        self.readers = {f: FlashReader(bundle.path / f)
                        for f in sorted({fam.file for fam in self.families.values()})}
        self.reader = self.readers[self.families["neuron"].file]
        # One matrix per record family, shared by all layers: a layer's records are read into
        # it, used, and released (its output evaluated) before the next layer reads over them.
        self.matrices = {name: NeuronMatrix(fam, fam.count) for name, fam in self.families.items()}
        self._slots = np.arange(max(fam.count for fam in self.families.values()))
        self.stats = EngineStats()
        self.observer: Observer | None = None  # sees every layer's input and reads (evaluate)

    @property
    def read_calls(self) -> int:
        return sum(r.counters.calls for r in self.readers.values())

    def _read(self) -> tuple[int, float]:
        return (sum(r.counters.bytes for r in self.readers.values()),
                sum(r.counters.seconds for r in self.readers.values()))

    def fetch(self, layer: int, family: str, parts: Sequence[str],
              ids: np.ndarray) -> dict[str, mx.array]:
        """Parts `parts` of records `ids` (sorted) of `family` for `layer`, as `[len(ids), ...]`
        matrices in the compute dtype. They are views of the family's neuron matrix, valid
        until the next fetch of the same part overwrites it: evaluate what depends on them
        first, or copy them."""
        fam, matrix = self.families[family], self.matrices[family]
        self.readers[fam.file].read_records(fam, layer, ids, self._slots[:len(ids)], matrix, parts)
        return {p: matrix.parts[p][:len(ids)].astype(self.compute_dtype) for p in parts}

    def __call__(self, layer: int, x: mx.array, down_bias: mx.array | None) -> mx.array:
        mx.eval(x)
        t0 = time.perf_counter()
        read0, io0 = self._read()
        flat = x.reshape(-1, x.shape[-1])
        y, reads = self.mode(layer, flat, self.fetch)
        y = y.reshape(x.shape)
        if down_bias is not None:
            y = y + down_bias
        mx.eval(y)
        read1, io1 = self._read()
        phase = self.stats.decode if x.shape[1] == 1 else self.stats.prefill
        if layer == 0:
            phase.tokens += flat.shape[0]
        phase.bytes += read1 - read0
        phase.needed_bytes += int(reads.bytes.sum())
        phase.io_seconds += io1 - io0
        phase.ffn_seconds += time.perf_counter() - t0 - (io1 - io0)
        if self.observer is not None:
            self.observer(layer, flat, reads)
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
