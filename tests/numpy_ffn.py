"""NumPy models of the engine's FFN: each selection mode computed in float64 from the original
weights and what the bundle stores (thresholds, predictors, resident gate rows), the records'
quantization undone where a test asks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_flash.bundle import Bundle, Quantization

MODES = ("predictor", "gate", "hybrid", "teal")


def silu(v):
    return v / (1 + np.exp(-v))


def brute_force(mode: str, bundle: Bundle, weights, layer: int, x: np.ndarray) -> np.ndarray:
    """The mode's FFN for each token, in NumPy, from the original weights and the thresholds
    and predictor stored in the bundle ("off": every neuron)."""
    p = f"model.layers.{layer}.mlp"
    G, U, D = (weights[f"{p}.{k}_proj.weight"].astype(np.float64) for k in ("gate", "up", "down"))
    info = bundle.selection["modes"].get(mode, {"layers": [{}] * (layer + 1)})
    t = info["layers"][layer]
    arrays = mx.load(str(bundle.path / info["file"])) if info.get("file") else {}
    q = info.get("gate_quantization")
    if q:  # the resident gate rows, as the mode keeps them
        G = np.array(mx.dequantize(*(arrays.pop(f"{layer}.gate{k}").astype(
            mx.float32 if k else mx.uint32) for k in ("", ".scales", ".biases")),
            group_size=q["group_size"], bits=q["bits"]), dtype=np.float64)
    stored = {k: np.array(v.astype(mx.float32), dtype=np.float64) for k, v in arrays.items()
              if k.startswith(f"{layer}.")}
    x = x.astype(np.float64)
    out = []
    for v in x:
        g, u = G @ v, U @ v
        if mode == "off":
            h = silu(g) * u
        elif mode == "predictor":
            logits = stored[f"{layer}.B"] @ (stored[f"{layer}.A"] @ v) + stored[f"{layer}.b"]
            keep = logits > t["threshold"]
            h = np.where(keep, silu(g) * u, 0)
        elif mode == "gate":
            h = np.where(np.abs(silu(g)) > t["t_gate"], silu(g) * u, 0)
        elif mode == "hybrid":
            h = np.where(np.abs(silu(g)) > t["t_gate"], silu(g) * u, 0)
            h = np.where(np.abs(h) > t["t_h"], h, 0)
        else:  # teal
            vs = np.where(np.abs(v) > t["t_x"], v, 0)
            h = silu(G @ vs) * (U @ vs)
            h = np.where(np.abs(h) > t["t_h"], h, 0)
        out.append(D @ h)
    return np.stack(out)


def dequantized(weights: dict[str, np.ndarray], q: Quantization) -> dict[str, np.ndarray]:
    """The tiny llama's FFN weights as 4-bit quantized records hold them, in float64: gate and
    up rows quantized as they are, down quantized along d (by its columns)."""
    def round_trip(w: np.ndarray) -> np.ndarray:
        packed = mx.quantize(mx.array(w), group_size=q.group_size, bits=q.bits)
        return np.array(mx.dequantize(*packed, group_size=q.group_size, bits=q.bits))

    out = dict(weights)
    for name, w in weights.items():
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            out[name] = round_trip(w)
        elif name.endswith("down_proj.weight"):
            out[name] = round_trip(w.T).T
    return out
