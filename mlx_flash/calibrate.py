"""Calibrate a bundle's selection mode on text: thresholds, predictors, extra record layouts.

    python -m mlx_flash.calibrate BUNDLE --data TEXT [--mode M] [--tokens N] [--target T]
                                  [--rank R] [--epochs E]

Runs the model densely over the first N tokens of TEXT, collects each layer's FFN input (the
attention block's output after its norm) and computes the true FFN activations from all the
weights, then fits what the mode needs and writes it into the bundle (the manifest is replaced
atomically, so an interrupted run leaves the bundle as it was). The calibrated mode becomes the
bundle's default. Modes and --target:

  predictor  (ReLU FFNs) low-rank predictor per layer, threshold for a target recall
             (default 0.99) on held-out calibration tokens
  gate       target = fraction of neurons kept by |silu(gate·x)| (default 0.8); keeps the gate
             rows and writes records of up row + down column
  hybrid     target = "G,H": fractions kept for the up read (by |silu(gate·x)|) and for the
             down read (by |h|) (default "0.8,0.5"); keeps the gate rows and writes up rows
             and down columns as records of their own
  teal       target = "X,H": fractions of input dims and of neurons kept (default "0.8,0.6");
             writes records by input dim (its gate and up column) and down-column records
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from tqdm import tqdm

from .arch import FFNSpec, get_architecture, pack_records
from .argtypes import Parser, int_in, interruptible
from .bundle import (
    DTYPES,
    EXPERTS,
    PART_DTYPES,
    Bundle,
    Quantization,
    RecordFamily,
    layout_parts,
    quantized_parts,
)
from .bundle_writer import BundleUpdate, SegmentFile
from .errors import BundleError
from .ffn import FlashEngine
from .hub import is_hub_id
from .loader import bundle_tokenizer, open_model
from .paths import resolve_bundle
from .selection import MODE_CLASSES, MODES, LayerReads, Mode, Rows, gate_activation, hidden
from .sysmem import format_bytes

DEFAULT_TARGETS = {"predictor": "0.99", "gate": "0.8", "hybrid": "0.8,0.5", "teal": "0.8,0.6"}
GATE_GROUP = 64  # group size of gate rows quantized for gate / hybrid
DEFAULT_TOKENS = {"predictor": 16384, "gate": 4096, "hybrid": 4096, "teal": 4096}
# Fewer tokens give thresholds (quantiles per layer) and predictors fitted to noise: 4 tokens
# calibrated without a word and replaced the bundle's default mode (issue 12)
MIN_TOKENS = 256


def default_mode(spec: FFNSpec) -> str:
    """By measurement (README): the paper's predictor where the FFN is ReLU-like (its zeros
    are exact), hybrid for SiLU."""
    return "hybrid" if spec.activation == "silu" else "predictor"


def default_rank(spec: FFNSpec) -> int:
    """Predictor rank: d/8, within [32, 128] (the paper used 128 for OPT-6.7B's d = 4096; on
    the ReLU fixture, d = 256, rank 32 kept recall at 0.98 — docs/SPARSITY.md)."""
    return min(128, max(32, spec.hidden_size // 8))


def text_tokens(tokenizer, path: str | Path) -> list[int]:
    return tokenizer.encode(Path(path).read_text(), add_special_tokens=False)


def fit_context(config: dict[str, Any], ctx: int) -> int:
    """`ctx`, or less when the model has positions for fewer tokens (OPT's learned table)."""
    return min(ctx, int(config.get("max_position_embeddings") or ctx))


def windows(tokens: Sequence[int], ctx: int) -> list[list[int]]:
    return [list(tokens[i:i + ctx]) for i in range(0, len(tokens), ctx) if len(tokens[i:i + ctx])]


def numpy_matmul(a: Any, b: Any) -> mx.array:
    """a @ b (float32) by NumPy's BLAS. MLX's CPU backend on Linux links a reference BLAS:
    NumPy's multiplies float32 about 30x faster there (measured: 246 vs 8 GFLOP/s at 512 x 576
    x 1536 on 2 cores), which turns calibrating the default model from minutes into seconds."""
    return mx.array(np.asarray(a, dtype=np.float32) @ np.asarray(b, dtype=np.float32))


def calibration_matmul() -> Callable[[Any, Any], mx.array]:
    """The product calibration takes its large float32 products with: NumPy's on the CPU,
    MLX's where it runs on a GPU."""
    return numpy_matmul if mx.default_device() == mx.cpu else mx.matmul


class NumpyDense(Mode):
    """The dense FFN (every neuron), its products taken by NumPy."""

    def dense_part(self, x: mx.array, rows: Rows) -> mx.array:
        p = {name: rows[name] for name in self.all_parts}  # float32, dequantized
        return numpy_matmul(hidden(self.spec, x, p, numpy_matmul), p["down"])


class NumpyLinear(nn.Module):
    """A (possibly quantized) Linear layer whose product NumPy takes, in float32."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        w = linear.weight
        if isinstance(linear, nn.QuantizedLinear):
            w = mx.dequantize(w, linear.scales, linear.biases, linear.group_size, linear.bits)
        self.w_t = np.ascontiguousarray(np.asarray(w.astype(mx.float32)).T)
        self.b = np.asarray(linear.bias.astype(mx.float32)) if "bias" in linear else None

    def __call__(self, x: mx.array) -> mx.array:
        y = np.asarray(x.astype(mx.float32)) @ self.w_t
        return mx.array(y if self.b is None else y + self.b).astype(x.dtype)


class _Collected(Exception):
    """The last layer's FFN input is in: the rest of the forward pass is not needed."""


def collect_inputs(model: nn.Module, tokens: Sequence[int], ctx: int,
                   progress: bool) -> list[np.ndarray]:
    """Each layer's FFN input on `tokens` (run densely in windows of `ctx`), `[N, d]` float32.
    On the CPU the layers' products are NumPy's (`calibration_matmul`); the LM head is skipped."""
    engine: FlashEngine = model.flash
    n_layers = len(engine.families["neuron"].segments)
    inputs: list[list[np.ndarray]] = [[] for _ in range(n_layers)]

    def observe(layer: int, x: mx.array, reads: LayerReads) -> None:
        inputs[layer].append(np.array(x.astype(mx.float32)))
        if layer == n_layers - 1:
            raise _Collected

    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    dense = engine.dense
    if calibration_matmul() is numpy_matmul:
        engine.dense = NumpyDense(engine.spec, engine.families)
        engine.dense.rows_per_fetch = dense.rows_per_fetch
        for layer in get_architecture(engine.bundle.config).layers(model):
            modules = dict(layer.named_modules())
            for path, module in modules.items():
                if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                    parent, _, name = path.rpartition(".")
                    swapped.append((modules[parent] if parent else layer, name, module))
        for parent, name, module in swapped:
            setattr(parent, name, NumpyLinear(module))
    engine.observer = observe
    try:
        for w in tqdm(windows(tokens, ctx), desc="collecting FFN inputs", unit="window",
                      disable=not progress):
            with contextlib.suppress(_Collected):
                mx.eval(model(mx.array([w])))
    finally:
        engine.observer = None
        engine.dense = dense
        for parent, name, module in swapped:
            setattr(parent, name, module)
    return [np.concatenate(x) for x in inputs]


def layer_weights(engine: FlashEngine, layer: int
                  ) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """All of a layer's FFN weights, read from its neuron records, in neuron order and in
    arrays of their own (what `fetch` returns lives in matrices the next fetch overwrites):
    each tensor in float32 (dequantized), and each record part as stored."""
    fam = engine.families["neuron"]
    rows = engine.fetch(layer, "neuron", fam.tensors, np.arange(fam.count))
    order = mx.array(np.argsort(rows.ids))
    w = {k: mx.take(rows[k].astype(mx.float32), order, axis=0) for k in fam.tensors}
    raw = {p.name: mx.take(rows.raw(p.name), order, axis=0) for p in fam.parts}
    mx.eval(w, raw)
    return w, raw


def true_active(spec: FFNSpec, x: mx.array, w: dict[str, mx.array],
                label_keep: float) -> mx.array:
    """Which neurons are truly active: for ReLU-like FFNs those whose h is not exactly 0;
    for SiLU the `label_keep` fraction of largest |h| per token."""
    h = mx.abs(hidden(spec, x, w, calibration_matmul()))
    if spec.activation != "silu":
        return h > 0
    k = max(1, round(label_keep * h.shape[-1]))
    return h >= mx.sort(h, axis=-1)[:, -k][:, None]


def quantile_threshold(values: mx.array, keep: float) -> float:
    """The threshold above which a `keep` fraction of `values` lies."""
    v = np.array(values.astype(mx.float32)).ravel()
    return float(np.quantile(v, 1.0 - keep)) if keep < 1 else -1.0


def train_predictor(x: np.ndarray, y: np.ndarray, rank: int, epochs: int, seed: int
                    ) -> tuple[mx.array, mx.array, mx.array]:
    """A low-rank predictor logits = B·(A·x) + b of which neurons are active, trained with
    binary cross-entropy where positives weigh as much as negatives in total (balanced)."""
    d, n = x.shape[1], y.shape[1]
    mx.random.seed(seed)

    class LowRank(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Linear(d, rank, bias=False)
            self.B = nn.Linear(rank, n, bias=True)

        def __call__(self, v):
            return self.B(self.A(v))

    net = LowRank()
    pos = max(float(y.mean()), 1e-6)
    pos_weight = mx.array((1 - pos) / pos)

    def loss_fn(net, xb, yb):
        logits = net(xb)
        # balanced binary cross-entropy (softplus form; numerically stable)
        loss = pos_weight * yb * nn.softplus(-logits) + (1 - yb) * nn.softplus(logits)
        return loss.mean()

    opt = optim.Adam(learning_rate=1e-3)
    step = nn.value_and_grad(net, loss_fn)
    rng = np.random.default_rng(seed)
    batch = 512
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            _, grads = step(net, mx.array(x[idx]), mx.array(y[idx].astype(np.float32)))
            opt.update(net, grads)
            mx.eval(net.parameters(), opt.state)
    return net.A.weight, net.B.weight, net.B.bias


DEFAULT_MODEL_TEXT = Path(__file__).parent / "data" / "wikitext-2-valid-head.txt"
# The default model's hybrid targets, by measurement: 135M parameters are fragile; with 0.8,0.5
# (or 0.9 of the up rows) greedy chat answers departed from the dense model's on the first
# token ("What is the capital of France?" -> "L'Etoile, ..."), while 0.95,0.9 answered three
# chat questions as dense does (tests/test_cli.py checks one).
DEFAULT_MODEL_TARGET = "0.95,0.9"


def default_bundle(dtype: str | None = None, progress: bool = True) -> Path:
    """The embedded default model's bundle (converted to `dtype` on first use, as
    `paths.resolve_bundle` converts), calibrated for its default mode on first use."""
    path = resolve_bundle(None, dtype, progress)
    if not Bundle.open(path).selection.get("default"):
        calibrate_default(path, progress)
    return path


def calibrate_default(path: str | Path, progress: bool = True) -> Bundle:
    """Calibrate the embedded default model's bundle for its default mode, on the WikiText-2
    text shipped with the package (mlx_flash/data): what its first use does, so that the
    default model runs the sparse engine from the start (under a minute on a 2-core CPU)."""
    if progress:
        print("mlx_flash: calibrating the default model once (its sparse FFN selection, on "
              f"{DEFAULT_MODEL_TEXT.name})", file=sys.stderr)
    # 2048 tokens: its thresholds are quantiles of 2048 x 1536 values per layer, and first
    # use takes half the time of the 4096 a calibration takes unless told
    return calibrate(path, DEFAULT_MODEL_TEXT, tokens=2048, target=DEFAULT_MODEL_TARGET,
                     progress=progress)


def _parse_target(mode: str, target: str | None) -> list[float]:
    values = [float(v) for v in (target or DEFAULT_TARGETS[mode]).split(",")]
    want = 2 if mode in ("hybrid", "teal") else 1
    if len(values) != want or not all(0 < v <= 1 for v in values):
        raise ValueError(f"--target for {mode} needs {want} fraction(s) in (0, 1]")
    return values


def calibrate(path: str | Path, data: str | Path, mode: str | None = None,
              tokens: int | None = None, target: str | None = None, rank: int | None = None,
              epochs: int = 8, ctx: int = 512, seed: int = 0, progress: bool = True,
              gate_bits: int = 8) -> Bundle:
    """Calibrate `mode` (default: by architecture) on `data` and write it into the bundle.
    `gate_bits`: how `gate` and `hybrid` keep the gate rows of float records (16: as stored)."""
    bundle = Bundle.open(path)
    if EXPERTS in bundle.families:
        raise ValueError(f"{bundle.path} is a Mixture-of-Experts model: its router already "
                         "selects the experts each token reads, so there is nothing to "
                         "calibrate (run it as it is; --memory-budget sizes its expert slots)")
    model = open_model(bundle, "float32", sparsity="off")
    engine: FlashEngine = model.flash
    spec = engine.spec
    mode = mode or default_mode(spec)
    if mode not in MODES or mode == "off":
        raise ValueError(f"unknown selection mode {mode!r}")
    if mode != "predictor" and spec.kind != "glu":
        raise ValueError(f"mode {mode!r} needs a gated (SwiGLU) FFN; use predictor")
    goals = _parse_target(mode, target)
    derived = {name: layout_family(name, layout, engine.families["neuron"], spec)
               for name, layout in MODE_CLASSES[mode].LAYOUTS.items()}
    rank = rank or default_rank(spec)
    tokenizer = bundle_tokenizer(bundle)
    ids = text_tokens(tokenizer, data)[: tokens or DEFAULT_TOKENS[mode]]
    if len(ids) < MIN_TOKENS:  # before anything is written: the bundle stays as it was
        raise ValueError(f"calibration needs at least {MIN_TOKENS} tokens of text; "
                         f"{len(ids)} given ({Path(data).name})")
    started = time.time()
    ctx = fit_context(bundle.config, ctx)
    X = collect_inputs(model, ids, ctx, progress)
    n_layers = len(X)
    layers: list[dict[str, Any]] = []
    arrays: dict[str, mx.array] = {}
    layouts = MODE_CLASSES[mode].LAYOUTS
    neuron = engine.families["neuron"]
    gate_q = neuron.quantization.get("gate") or (
        Quantization(gate_bits, GATE_GROUP) if gate_bits < 16 else None)
    records: dict[str, list[mx.array]] = {name: [] for name in layouts}
    matmul = calibration_matmul()
    for layer in tqdm(range(n_layers), desc=f"fitting {mode}", unit="layer",
                      disable=not progress):
        w, raw = layer_weights(engine, layer)
        x = mx.array(X[layer])
        if mode == "predictor":
            entry, A, B, b = _fit_predictor(spec, x, w, goals[0], rank, epochs, seed + layer)
            arrays.update({f"{layer}.A": A, f"{layer}.B": B, f"{layer}.b": b})
        elif mode in ("gate", "hybrid"):
            gate, stored = resident_gate(engine.families["neuron"], w, raw, gate_q)
            arrays.update({f"{layer}.{k}": v for k, v in stored.items()})
            # thresholds on the gate the mode uses
            act = gate_activation(spec, matmul(x, gate.T))
            entry = {"t_gate": quantile_threshold(mx.abs(act), goals[0])}
            if mode == "hybrid":
                h = hidden(spec, x, {**w, "gate": gate}, matmul)
                entry["t_h"] = quantile_threshold(mx.abs(h), goals[1])
        else:  # teal
            h = hidden(spec, x, w, matmul)
            entry = {"t_x": quantile_threshold(mx.abs(x), goals[0]),
                     "t_h": quantile_threshold(mx.abs(h), goals[1])}
        layers.append(entry)
        for name, layout in layouts.items():
            fam = derived[name]
            arrays_of = {"gate": w["gate"].T, "up": w["up"].T} if layout == "columns" else raw
            records[name].append(pack_records(fam.parts, fam.record_bytes, {
                p.name: arrays_of[p.name].astype(PART_DTYPES[p.dtype]) for p in fam.parts}))
    try:
        with BundleUpdate(bundle) as update:
            m = update.manifest
            info: dict[str, Any] = {"target": goals, "layers": layers, "calibration": {
                "data": Path(data).name, "tokens": len(ids), "ctx": ctx,
                "seconds": round(time.time() - started)}}
            if mode in ("gate", "hybrid") and gate_q is not None:
                info["gate_quantization"] = {"bits": gate_q.bits, "group_size": gate_q.group_size}
            if arrays:
                staging, info["file"] = update.new_file(f"selection-{mode}", ".safetensors")
                save_safetensors(staging, {
                    k: v.astype(DTYPES[bundle.dtype]) if mx.issubdtype(v.dtype, mx.floating) else v
                    for k, v in arrays.items()})
            if records:
                staging, name = update.new_file(f"ffn-{mode}", ".bin")
                out = SegmentFile(staging)
                for family in layouts:
                    segments = tuple(out.write(r) for r in records[family])
                    m["ffn"]["families"][family] = dataclasses.replace(
                        derived[family], file=name, segments=segments,
                        checksums=out.checksums).to_json()
                out.close()
            selection = m.setdefault("selection", {"default": None, "modes": {}})
            selection["modes"][mode] = info
            selection["default"] = mode
            return update.commit()
    except OSError as e:  # a full disk, most likely: the manifest was never replaced
        free = shutil.disk_usage(bundle.path).free
        reason = str(e.strerror or e).rstrip(".")
        raise OSError(f"cannot write the calibration into {bundle.path}: {reason} "
                      f"({format_bytes(free)} free on its disk); the bundle is as it was"
                      ) from None


def save_safetensors(path: Path, arrays: dict[str, mx.array]) -> None:
    """mx.save_safetensors, its failure an OSError: MLX raises RuntimeError ("[write] Unable
    to write 977 bytes to file.") on a full disk."""
    try:
        mx.save_safetensors(str(path), arrays)
    except RuntimeError as e:
        raise OSError(str(e)) from None


def resident_gate(neuron: RecordFamily, w: dict[str, mx.array], raw: dict[str, mx.array],
                  q: Quantization | None) -> tuple[mx.array, dict[str, mx.array]]:
    """The gate rows `gate` and `hybrid` keep in memory: (the values the mode computes with,
    float32; the tensors to store). Quantized records lend their own gate rows, bit for bit;
    float ones are quantized to `q` (default 8 bits: half the memory of 16-bit rows, and the
    selection moves by less than calibration noise, docs/SPARSITY.md), or kept with q None."""
    if q is None:
        return w["gate"], {"gate": w["gate"]}
    names = quantized_parts("gate")
    if "gate" in neuron.quantization:
        return w["gate"], {k: raw[k] for k in names}
    packed = mx.quantize(w["gate"], group_size=q.group_size, bits=q.bits)
    gate = mx.dequantize(*packed, group_size=q.group_size, bits=q.bits)
    return gate, dict(zip(names, packed, strict=True))


def layout_family(name: str, layout: tuple[str, ...] | str, neuron: RecordFamily,
                  spec: FFNSpec) -> RecordFamily:
    """The record family (segments still empty) a selection mode reads besides the neuron
    records: per neuron the tensors named, stored as in the neuron records (quantized ones
    too), or, for "columns", per input dimension its column of gate and of up."""
    if layout == "columns":
        if neuron.quantization:
            raise ValueError("mode 'teal' reads gate and up by input column, which records "
                             "quantized along the row cannot give: convert with --dtype")
        n = spec.intermediate_size
        parts, size = layout_parts([("gate", n, neuron.dtype), ("up", n, neuron.dtype)])
        return RecordFamily(name, "", spec.hidden_size, size, neuron.dtype, parts, ())
    wanted = neuron.expand(layout)
    parts, size = layout_parts([(p.name, p.length, p.dtype) for p in neuron.parts
                                if p.name in wanted])
    return RecordFamily(name, "", neuron.count, size, neuron.dtype, parts, (), {
        t: q for t, q in neuron.quantization.items() if t in layout})


def _fit_predictor(spec: FFNSpec, x: mx.array, w: dict[str, mx.array], recall: float,
                   rank: int, epochs: int, seed: int):
    """Train a layer's predictor on 90% of the tokens; on the other 10% pick the threshold
    that reaches `recall`, and measure precision and the fraction of neurons selected."""
    active = np.array(true_active(spec, x, w, label_keep=0.5))
    xs = np.array(x)
    split = int(0.9 * len(xs))
    A, B, b = train_predictor(xs[:split], active[:split], rank, epochs, seed)
    logits = np.array((mx.array(xs[split:]) @ A.T) @ B.T + b)
    truth = active[split:]
    positives = logits[truth]
    threshold = float(np.quantile(positives, 1 - recall)) if positives.size else float("inf")
    chosen = logits > threshold
    hits = (chosen & truth).sum()
    entry = {
        "threshold": threshold,
        "rank": rank,
        "active": float(truth.mean()),
        "selected": float(chosen.mean()),
        "recall": float(hits / max(truth.sum(), 1)),
        "precision": float(hits / max(chosen.sum(), 1)),
    }
    return entry, A, B, b


@interruptible
def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="python -m mlx_flash calibrate",
        description="Calibrate which FFN weights each token needs (selection mode) on text, "
        "and store it in the bundle.", epilog=__doc__.split("Modes and --target:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="the flash bundle to calibrate (modified in place), or a "
                   "hub id (org/name): the bundle its model converts to in the cache")
    p.add_argument("--data", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--mode", choices=[m for m in MODES if m != "off"], default=None,
                   help="selection mode (default: predictor for ReLU FFNs, hybrid for SiLU)")
    p.add_argument("--tokens", type=int_in(MIN_TOKENS), default=None,
                   help="calibration tokens, from the start of the text (default: 16384 for "
                   f"predictor, 4096 otherwise; at least {MIN_TOKENS})")
    p.add_argument("--target", default=None, help="operating point (see below)")
    p.add_argument("--rank", type=int_in(1), default=None,
                   help="predictor rank (default: hidden size / 8, within 32..128)")
    p.add_argument("--epochs", type=int_in(1), default=8, help="predictor training epochs")
    p.add_argument("--ctx", type=int_in(2), default=512,
                   help="tokens per forward window (default 512; at most the model's positions)")
    p.add_argument("--gate-bits", type=int, default=8, choices=[4, 8, 16],
                   help="gate and hybrid keep the gate rows in memory quantized to this many "
                   "bits (default 8; 16: as the records store them). Quantized bundles keep "
                   "their own")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        # a hub id names the bundle its model converts to (converted now if it is not yet)
        path = resolve_bundle(args.bundle) if is_hub_id(args.bundle) else args.bundle
        bundle = calibrate(path, args.data, args.mode, args.tokens, args.target,
                           args.rank, args.epochs, args.ctx, progress=not args.quiet,
                           gate_bits=args.gate_bits)
    except (BundleError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sel = bundle.selection
    info = sel["modes"][sel["default"]]
    print(f"calibrated {sel['default']} on {info['calibration']['tokens']} tokens in "
          f"{info['calibration']['seconds']} s; it is now the bundle's default mode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
