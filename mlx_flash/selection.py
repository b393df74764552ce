"""Which FFN weights each token needs, and the sparse FFN computed with just those.

A selection mode gets one layer's FFN input `x` (`[T, d]`, T tokens) and `fetch`, which reads
the named parts of chosen records from flash. It decides per token which weights the token
needs, fetches the union over the tokens (for one decode token: exactly its own), and computes
the FFN over what it fetched, masking per token, so every token gets exactly its own sparse FFN
whatever T is. Modes:

  off        every neuron (dense; the paper's naive engine when every token reads it all)
  predictor  the paper: a low-rank predictor sigmoid(B·A·x) per layer says which neurons fire;
             their whole records are read. For ReLU FFNs (OPT, ReLU-Llama).
  gate       CATS (Lee et al. 2024): gate rows resident, keep neurons with |silu(gate·x)| above a
             threshold, read up row and down column of those.
  hybrid     ours: gate rows resident; neurons with |silu(gate·x)| above a threshold read their
             up row; of those, neurons whose |h| = |silu(gate·x)·(up·x)| is above a second
             threshold read their down column.
  teal       TEAL (Liu et al. 2024): input dims with |x_j| above a threshold read their column
             of gate and up (a second record family, one record per input dim); neurons with
             |h| above a threshold read their down column.
  oracle     evaluation only: the top-k neurons by |h| computed from all weights.

Each call also returns what each token needed to read (bytes), before any cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu

from . import kernels
from .arch import FFNSpec
from .bundle import Bundle, Quantization, RecordFamily, quantized_parts


@dataclass
class Rows:
    """Records a mode fetched, where they lie: neuron `ids[r]` is row `slots[r]` of
    `matrices[part]` (a cache, or the staging matrix). `ids` are sorted, and every product
    takes the rows in that order, wherever they lie: a token's output depends on the weights
    it selected, never on the slots a cache gave them. Batches multiply gathered rows
    (`rows[part]`); a single token goes through the kernels, which read the rows where they
    lie. A tensor in `quantization` lies in three matrices: packed (its own name), `.scales`
    and `.biases`."""

    ids: np.ndarray
    matrices: dict[str, mx.array]
    slots: np.ndarray
    dtype: mx.Dtype
    quantization: dict[str, Quantization] = field(default_factory=dict)

    def raw(self, part: str) -> mx.array:
        """`[len(ids), length]` rows of matrix `part` as stored."""
        m = self.matrices[part]
        k = len(self.ids)
        first = int(self.slots[0]) if k else 0
        if np.array_equal(self.slots, np.arange(first, first + k)):  # as take would, no copy
            return m[first:first + k]
        return mx.take(m, self.slot_array, axis=0)

    def __getitem__(self, part: str) -> mx.array:
        """`[len(ids), length]` rows of tensor `part`, in the compute dtype (dequantized)."""
        q = self.quantization.get(part)
        if q is None:
            return self.raw(part).astype(self.dtype)
        w, scales, biases = (self.raw(n) for n in quantized_parts(part))
        return mx.dequantize(w, scales.astype(self.dtype), biases.astype(self.dtype),
                             group_size=q.group_size, bits=q.bits)

    def matrices_of(self, part: str) -> tuple[mx.array, ...]:
        """The matrices tensor `part` lies in (packed, scales, biases when quantized)."""
        return tuple(self.matrices[n] for n in quantized_parts(part))

    def quantized_product(self, v: mx.array, part: str, transpose: bool) -> mx.array:
        """v (`[T, ...]`) times the fetched rows of quantized `part` (transposed or not), for
        a batch: dequantized first where that is faster (`dequantize_batches`)."""
        if dequantize_batches(v):
            w = self[part]
            return v @ (w.T if transpose else w)
        q = self.quantization[part]
        w, scales, biases = (self.raw(n) for n in quantized_parts(part))
        return mx.quantized_matmul(v, w, scales.astype(v.dtype), biases.astype(v.dtype),
                                   transpose=transpose, group_size=q.group_size, bits=q.bits)

    @property
    def slot_array(self) -> mx.array:
        return mx.array(self.slots.astype(np.int32))

    def subset(self, ids: np.ndarray) -> Rows:
        """These rows restricted to `ids`, sorted ids that are among this Rows' (sorted) ones."""
        return dataclasses.replace(self, ids=ids, slots=self.slots[np.searchsorted(self.ids, ids)])


# fetch(layer, family, parts, ids) -> Rows; with ahead=True it may start reading and return at
# once a function that waits for the Rows (or return None: then fetch them when needed)
Fetch = Callable[..., Any]


def dequantize_batches(x: mx.array) -> bool:
    """Whether quantized rows are dequantized before multiplying a batch `x` (`[T, ...]`): on
    MLX's CPU backend a quantized product costs as much per token as a dense one, so from a
    few tokens on (prefill, calibration, evaluation) one dequantization and a matrix product
    win, 33x with OpenBLAS at 512 tokens (docs/BENCHMARKS.md). Metal's are fast: kept."""
    return x.shape[0] > 8 and not mx.metal.is_available()


def project(x: mx.array, rows: Rows, part: str) -> mx.array:
    """`[T, k]`: x · each fetched row of `part`."""
    q = rows.quantization.get(part)
    if q is not None:
        if x.shape[0] > 1:
            return rows.quantized_product(x, part, transpose=True)
        return kernels.gather_qmatvec(x[0], rows.matrices_of(part), rows.slot_array, q.bits,
                                      q.group_size)[None].astype(x.dtype)
    if x.shape[0] == 1:
        return kernels.gather_matvec(x[0], rows.matrices[part], rows.slot_array)[None].astype(
            x.dtype)
    return x @ rows[part].T


def combine(h: mx.array, rows: Rows, part: str) -> mx.array:
    """`[T, length]`: the fetched rows of `part` weighted by h (`[T, k]`) and summed."""
    q = rows.quantization.get(part)
    if q is not None:
        if h.shape[0] > 1:
            return rows.quantized_product(h, part, transpose=False)
        return kernels.gather_qaccumulate(h[0], rows.matrices_of(part), rows.slot_array,
                                          q.bits, q.group_size)[None].astype(h.dtype)
    if h.shape[0] == 1:
        return kernels.gather_accumulate(h[0], rows.matrices[part], rows.slot_array)[None].astype(
            h.dtype)
    return h @ rows[part]


@dataclass
class LayerReads:
    """What one layer needed per token: bytes to read, and the neurons used (for stats). Modes
    may give `bytes` as an MLX array: the engine evaluates it with the layer's output (one
    wait instead of two) and hands observers NumPy."""

    bytes: np.ndarray | mx.array  # [T]
    neurons: mx.array | None = None  # [T, n] bool, the neurons whose down column was used


def union(mask: mx.array) -> np.ndarray:
    """Sorted indices selected by any token of `mask` ([T, n] bool)."""
    return np.flatnonzero(np.array(mask.any(axis=0)))


def per_token(mask: mx.array) -> mx.array:
    """`[T]` int64: how many each token of `mask` ([T, n] bool) selects (lazy)."""
    return mask.astype(mx.int64).sum(axis=-1)


def gate_activation(spec: FFNSpec, g: mx.array) -> mx.array:
    """The activation applied to the gate (for "mlp" FFNs: to up · x + up_bias)."""
    if spec.activation == "silu":
        return nn.silu(g)
    if spec.activation == "fatrelu":
        return mx.where(g > spec.threshold, g, 0)
    return nn.relu(g)


def activate(spec: FFNSpec, gate: mx.array, up: mx.array) -> mx.array:
    """The GLU hidden state act(gate) * up (mlx-lm's own swiglu for SiLU; dReLU also applies
    relu to up)."""
    if spec.activation == "silu":
        return swiglu(gate, up)
    return gate_activation(spec, gate) * (nn.relu(up) if spec.activation == "drelu" else up)


def hidden(spec: FFNSpec, x: mx.array, p: dict[str, mx.array] | Rows,
           matmul: Callable[[Any, Any], mx.array] = mx.matmul) -> mx.array:
    """Hidden activations of the neurons whose parts `p` holds (rows = neurons). `matmul`
    takes the products of x with a dict's tensors (calibration passes NumPy's)."""
    if isinstance(p, Rows):
        if spec.kind == "glu":
            return activate(spec, project(x, p, "gate"), project(x, p, "up"))
        return gate_activation(spec, project(x, p, "up") + p["up_bias"].reshape(-1))
    if spec.kind == "glu":
        return activate(spec, matmul(x, p["gate"].T), matmul(x, p["up"].T))
    return gate_activation(spec, matmul(x, p["up"].T) + p["up_bias"].reshape(-1))


class Mode:
    """Base of the selection modes: the FFN spec and the record families the mode reads."""

    name = "off"
    # Record families the mode reads besides "neuron", as calibration writes them: a tuple of
    # neuron parts (records of just those parts, one per neuron) or "columns" (one record per
    # input dimension: its column of gate and of up). Reading each stage's parts from a family
    # of its own keeps the reads contiguous.
    LAYOUTS: dict[str, tuple[str, ...] | str] = {}
    # Whether a token's selection moves from token to token so much that a cache smaller than
    # a layer spills every token (SwiGLU's gate-based selections: half the neurons, 22% new
    # each token): the memory plan then gives such modes complete caches or none.
    churns = False

    def __init__(self, spec: FFNSpec, families: dict[str, RecordFamily]):
        self.spec = spec
        self.rows_per_fetch: int | None = None  # dense: fetch the layer in slices this big
        missing = sorted(set(self.LAYOUTS) - set(families))
        if missing:
            raise ValueError(f"mode {self.name!r} needs record families {missing}: calibrate "
                             "the bundle for it again")
        self.families = families
        self.neuron = families["neuron"]
        self.all_parts = self.neuron.tensors

    def record_bytes(self, family: str) -> int:
        return self.families[family].record_bytes

    @property
    def cache_keys(self) -> list[tuple[str, tuple[str, ...]]]:
        """The (record family, parts) this mode fetches, each a cache of its own per layer."""
        return [("neuron", self.all_parts)]

    def upcoming(self, layer: int, x: mx.array) -> np.ndarray | None:
        """The records (of `cache_keys[0]`) that layer `layer` will likely fetch for the decode
        token whose input to the layer before is `x` (`[1, d]`), to read them while that
        layer's attention computes; None: no guess."""
        return None

    def dense_part(self, x: mx.array, rows: Rows) -> mx.array:
        """The FFN's share of the neurons in `rows`, all of them used."""
        if rows.quantization:  # multiplied quantized, as mlx-lm's quantized model does
            return combine(hidden(self.spec, x, rows), rows, "down")
        p = {name: rows[name] for name in self.all_parts}
        return hidden(self.spec, x, p) @ p["down"]

    def __call__(self, layer: int, x: mx.array, fetch: Fetch) -> tuple[mx.array, LayerReads]:
        n = self.spec.intermediate_size
        step = self.rows_per_fetch or n
        y = None
        for start in range(0, n, step):  # the FFN is a sum over neurons: slice by slice
            rows = fetch(layer, "neuron", self.all_parts, np.arange(start, min(n, start + step)))
            part = self.dense_part(x, rows)
            y = part if y is None else y + part
            if start + step < n:
                mx.eval(y)  # the next slice is read over this one
        return y, LayerReads(np.full(x.shape[0], n * self.neuron.record_bytes))


class Predictor(Mode):
    """The paper's low-rank predictor: neuron i fires if (B·A·x + b)_i > threshold."""

    name = "predictor"

    def __init__(self, spec, families, A: list[mx.array], B: list[mx.array],
                 b: list[mx.array], thresholds: Sequence[float]):
        super().__init__(spec, families)
        self.A, self.B, self.b, self.thresholds = A, B, b, list(thresholds)

    def logits(self, layer: int, x: mx.array) -> mx.array:
        return (x @ self.A[layer].T) @ self.B[layer].T + self.b[layer]

    def __call__(self, layer, x, fetch):
        return self.selected_ffn(layer, x, fetch, self.logits(layer, x) > self.thresholds[layer])

    def upcoming(self, layer, x):
        # the layer's predictor on the layer before's input: the residual stream changes
        # little from one layer to the next
        return union(self.logits(layer, x) > self.thresholds[layer])

    def selected_ffn(self, layer: int, x: mx.array, fetch: Fetch,
                     sel: mx.array) -> tuple[mx.array, LayerReads]:
        """The FFN over each token's selected neurons (`sel`: [T, n]), whole records read, in
        slices of `rows_per_fetch` neurons (what a staging matrix holds: without a cache
        larger selections would not fit). The slices depend on the selection and the bundle
        alone, so cached or not, a token's sums run in the same order."""
        ids = union(sel)
        step = self.rows_per_fetch or max(1, len(ids))
        y = None
        for start in range(0, max(1, len(ids)), step):
            rows = fetch(layer, "neuron", self.all_parts, ids[start:start + step])
            if x.shape[0] == 1 and not rows.quantization:  # the fused kernel: all are used
                s = self.spec
                part = kernels.sparse_ffn(x[0], rows.matrices, rows.slot_array, s.kind,
                                          s.activation, s.threshold)[None].astype(x.dtype)
            else:
                h = mx.where(sel[:, mx.array(rows.ids)], hidden(self.spec, x, rows), 0)
                part = combine(h, rows, "down")
            y = part if y is None else y + part
            if start + step < len(ids):
                mx.eval(y)  # the next slice may be read over this one
        return y, LayerReads(per_token(sel) * self.neuron.record_bytes, sel)


class Trace(Predictor):
    """Benchmarks only: the neurons each token uses come from a trace of active sets
    (`sets[layer][t]`: sorted ids for the t-th token through that layer, cycled), recorded or
    synthetic, instead of a predictor."""

    name = "trace"

    def __init__(self, spec, families, sets: list[list[np.ndarray]]):
        Mode.__init__(self, spec, families)
        self.sets = sets
        self.steps = [0] * len(sets)

    def upcoming(self, layer, x):
        sets = self.sets[layer]
        return sets[self.steps[layer] % len(sets)]  # what it will select, exactly

    def __call__(self, layer, x, fetch):
        n, rows = self.spec.intermediate_size, []
        for _ in range(x.shape[0]):
            sets = self.sets[layer]
            row = np.zeros(n, dtype=bool)
            row[sets[self.steps[layer] % len(sets)]] = True
            rows.append(row)
            self.steps[layer] += 1
        return self.selected_ffn(layer, x, fetch, mx.array(np.stack(rows)))


class Hybrid(Mode):
    """Gate rows resident. Stage 1: |silu(gate·x)| > t_gate selects the up rows to read.
    Stage 2: |h| > t_h selects the down columns to read. With t_h = None it is CATS (`gate`):
    up and down are read together for the stage-1 neurons."""

    name = "hybrid"
    LAYOUTS = {"up": ("up",), "down": ("down",)}
    churns = True

    def __init__(self, spec, families, gates: list[mx.array] | list[tuple[mx.array, ...]],
                 t_gate: Sequence[float], t_h: Sequence[float] | None,
                 gate_quantization: Quantization | None = None):
        super().__init__(spec, families)
        if spec.kind != "glu":
            raise ValueError(f"mode {self.name!r} needs a gated FFN")
        self.gates, self.t_gate, self.t_h = gates, list(t_gate), t_h and list(t_h)
        self.gate_q = gate_quantization  # gates[i] = (packed, scales, biases) when set

    def gate_products(self, layer: int, x: mx.array) -> mx.array:
        """`[T, n]`: x · every resident gate row."""
        if self.gate_q is None:
            return x @ self.gates[layer].T
        w, scales, biases = self.gates[layer]  # scales in float32 on MLX's CPU backend
        return mx.quantized_matmul(x.astype(scales.dtype), w, scales, biases,
                                   group_size=self.gate_q.group_size,
                                   bits=self.gate_q.bits).astype(x.dtype)

    @property
    def cache_keys(self):
        return [(name, parts) for name, parts in self.LAYOUTS.items()]

    def __call__(self, layer, x, fetch):
        g = self.gate_products(layer, x)
        a = gate_activation(self.spec, g)
        cand = mx.abs(a) > self.t_gate[layer]
        if self.t_h is None:  # CATS: up and down of the candidates, one read per neuron
            rows = fetch(layer, "updown", ("up", "down"), union(cand))
            idx = mx.array(rows.ids)
            h = mx.where(cand[:, idx], activate(self.spec, g[:, idx], project(x, rows, "up")), 0)
            return combine(h, rows, "down"), LayerReads(
                per_token(cand) * self.record_bytes("updown"), cand)
        wanted = union(cand)
        # down columns are needed for a subset of these: where they would be read past any
        # cache anyway, read them for all of them now, while the up rows are read and used
        early = fetch(layer, "down", ("down",), wanted, ahead=True)
        rows = fetch(layer, "up", ("up",), wanted)
        ids = rows.ids
        idx = mx.array(ids)
        h = mx.where(cand[:, idx], activate(self.spec, g[:, idx], project(x, rows, "up")), 0)
        keep = mx.abs(h) > self.t_h[layer]
        column = np.empty(cand.shape[1], dtype=np.int64)  # neuron id -> column of h
        column[ids] = np.arange(len(ids))
        needed = np.sort(ids[np.array(keep.any(axis=0))])  # columns of h: among `wanted`
        down = early().subset(needed) if early else fetch(layer, "down", ("down",), needed)
        kept = down.ids
        cols = mx.array(column[kept])
        y = combine(mx.where(keep[:, cols], h[:, cols], 0), down, "down")
        cost = (per_token(cand) * self.record_bytes("up")
                + per_token(keep) * self.record_bytes("down"))
        used = mx.zeros(cand.shape, dtype=mx.bool_)
        used[:, mx.array(kept)] = keep[:, cols]
        return y, LayerReads(cost, used)


class Gate(Hybrid):
    name = "gate"
    LAYOUTS = {"updown": ("up", "down")}

    def __init__(self, spec, families, gates, t_gate, gate_quantization=None):
        super().__init__(spec, families, gates, t_gate, None, gate_quantization)


class Teal(Mode):
    """Input dims with |x_j| > t_x read their column of gate and up; neurons with |h| > t_h
    read their down column."""

    name = "teal"
    LAYOUTS = {"column": "columns", "down": ("down",)}
    churns = True

    def __init__(self, spec, families, t_x: Sequence[float], t_h: Sequence[float]):
        super().__init__(spec, families)
        if spec.kind != "glu":
            raise ValueError("mode 'teal' needs a gated FFN")
        self.t_x, self.t_h = list(t_x), list(t_h)

    @property
    def cache_keys(self):
        return [("column", ("gate", "up")), ("down", ("down",))]

    def __call__(self, layer, x, fetch):
        keep_x = mx.abs(x) > self.t_x[layer]
        columns = fetch(layer, "column", ("gate", "up"), union(keep_x))
        d_idx = mx.array(columns.ids)
        xs = mx.where(keep_x[:, d_idx], x[:, d_idx], 0)
        h = activate(self.spec, combine(xs, columns, "gate"), combine(xs, columns, "up"))
        keep = mx.abs(h) > self.t_h[layer]
        rows = fetch(layer, "down", ("down",), union(keep))
        idx = mx.array(rows.ids)
        y = combine(mx.where(keep[:, idx], h[:, idx], 0), rows, "down")
        cost = (per_token(keep_x) * self.record_bytes("column")
                + per_token(keep) * self.record_bytes("down"))
        return y, LayerReads(cost, keep)


class Oracle(Mode):
    """Evaluation only: each token keeps its `keep` fraction of neurons with the largest |h|,
    computed with every weight (so it needs them all)."""

    name = "oracle"

    def __init__(self, spec, families, keep: float):
        super().__init__(spec, families)
        self.k = max(1, round(keep * spec.intermediate_size))

    def __call__(self, layer, x, fetch):
        n = self.spec.intermediate_size
        rows = fetch(layer, "neuron", self.all_parts, np.arange(n))  # any row order will do
        p = {name: rows[name] for name in self.all_parts}
        h = hidden(self.spec, x, p)
        kth = mx.sort(mx.abs(h), axis=-1)[:, n - self.k][:, None]
        top = mx.abs(h) >= kth
        return mx.where(top, h, 0) @ p["down"], LayerReads(
            np.full(x.shape[0], n * self.neuron.record_bytes), top)


MODE_CLASSES: dict[str, type[Mode]] = {"off": Mode, "predictor": Predictor, "gate": Gate,
                                       "hybrid": Hybrid, "teal": Teal}
MODES = tuple(MODE_CLASSES)


def load_mode(bundle: Bundle, spec: FFNSpec, name: str | None,
              dtype: mx.Dtype) -> Mode:
    """The selection mode `name` as calibrated in `bundle` ("off": dense; None: the bundle's
    default, else dense)."""
    sel = bundle.selection
    name = sel.get("default") or "off" if name is None else name
    if name == "off":
        return Mode(spec, bundle.families)
    modes: dict[str, Any] = sel.get("modes", {})
    if name not in modes:
        calibrated = ", ".join(sorted(modes)) or "none"
        raise ValueError(f"selection mode {name!r} is not calibrated in this bundle "
                         f"(calibrated: {calibrated}); run python -m mlx_flash.calibrate")
    m = modes[name]
    if m.get("file"):  # checked as the resident weights are: a flipped byte would select wrongly
        bundle.check_file(m["file"])
    arrays = mx.load(str(bundle.path / m["file"])) if m.get("file") else {}
    layers = m["layers"]
    n = len(layers)

    def stack(key: str) -> list[mx.array]:
        return [arrays[f"{i}.{key}"].astype(dtype) for i in range(n)]

    q = m.get("gate_quantization")
    gate_q = Quantization(int(q["bits"]), int(q["group_size"])) if q else None

    def gates() -> list:
        if gate_q is None:
            return stack("gate")
        # MLX's CPU backend multiplies quantized matrices 7-30x faster in float32 than in
        # 16-bit (docs/BENCHMARKS.md): there the scales, and so the products, are float32
        scale = dtype if mx.metal.is_available() else mx.float32
        gates = []
        for i in range(n):
            w, scales, biases = (arrays[f"{i}.{k}"] for k in quantized_parts("gate"))
            gates.append((w, scales.astype(scale), biases.astype(scale)))
        return gates

    def column(key: str) -> list[float]:
        return [float(layer[key]) for layer in layers]

    if name == "predictor":
        return Predictor(spec, bundle.families, stack("A"), stack("B"), stack("b"),
                         column("threshold"))
    if name == "gate":
        return Gate(spec, bundle.families, gates(), column("t_gate"), gate_q)
    if name == "hybrid":
        return Hybrid(spec, bundle.families, gates(), column("t_gate"), column("t_h"), gate_q)
    if name == "teal":
        return Teal(spec, bundle.families, column("t_x"), column("t_h"))
    raise ValueError(f"unknown selection mode {name!r}")
