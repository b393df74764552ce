"""The sparse FFN in plain MLX ops, two ways: gathered or over the whole window.

It runs on every backend, is what the tests check against NumPy, and is the yardstick the
Metal and CUDA kernels are compared with. Dot products run in the rows' dtype (on MLX's CPU
backend a 16-bit matrix-vector product is 2.5x faster than converting the rows to float32
first), weighted sums in float32 (there converting is 2.5x faster); both return float32:

  gathered  `mx.take` the k selected rows, then multiply those (the rows are materialised)
  window    multiply all `in_use` rows the cache holds, then keep the selected results
            (no gather; in_use/k times the arithmetic)

`tools/kernel_bench.py` measured on the 2-core x86 Linux machine (MLX 0.32.4 CPU, another job
running): the window is faster from 76% (bfloat16), 81% (float32), 99% (float16) of the rows
selected for the default model's shape (d 576, 1536 rows) and from 56-62% for d 4096, 4096 rows
(docs/BENCHMARKS.md); the functions below take the window from WINDOW_CROSSOVER on, when told
how many rows are in use.
"""

from __future__ import annotations

import mlx.core as mx

WINDOW_CROSSOVER = 0.8
CHUNK_BYTES = 8 * 2**20


def activate(v: mx.array, activation: str, threshold: float) -> mx.array:
    """The activation applied to the gate (to up · x + up_bias for "mlp"); "drelu" is relu
    here, its second relu (on up) is applied by the caller."""
    if activation == "silu":
        return v * mx.sigmoid(v)
    if activation == "fatrelu":
        return mx.where(v > threshold, v, 0.0)
    return mx.maximum(v, 0.0)


def use_window(slots: mx.array, in_use: int | None) -> bool:
    return in_use is not None and slots.shape[0] >= WINDOW_CROSSOVER * in_use


def gather_matvec(x: mx.array, rows: mx.array, slots: mx.array,
                  in_use: int | None = None) -> mx.array:
    """`[k]`: row `slots[i]` of `rows` dotted with `x` (all `in_use` rows, then picked, when
    that is the faster way)."""
    # x · rows^T rather than rows · x: the same product, but MLX's CPU backend hands float32
    # to BLAS, whose matrix-vector product in that orientation is 4x slower here (576 x 1536)
    x = x.astype(rows.dtype)[None]
    if use_window(slots, in_use):
        return (x @ rows[:in_use].T)[0][slots].astype(mx.float32)
    return (x @ mx.take(rows, slots, axis=0).T)[0].astype(mx.float32)


def gather_accumulate(h: mx.array, rows: mx.array, slots: mx.array,
                      in_use: int | None = None) -> mx.array:
    """`[d]`: the rows at `slots` weighted by `h` and summed (h scattered over all `in_use`
    rows, zeros elsewhere, when that is the faster way)."""
    h = h.astype(mx.float32)
    # in chunks of rows: the float32 copies then take 8 MiB at a time, not a whole selection
    # or window (same speed, measured)
    step = max(1, CHUNK_BYTES // (4 * rows.shape[1]))
    if use_window(slots, in_use):
        spread = mx.zeros((in_use,), dtype=mx.float32)
        spread[slots] = h
        chunks = [(spread[i:i + step], rows[i:min(i + step, in_use)])
                  for i in range(0, in_use, step)]
    else:
        chunks = [(h[i:i + step], mx.take(rows, slots[i:i + step], axis=0))
                  for i in range(0, slots.shape[0], step)]
    y = None
    for weights, block in chunks:
        part = weights @ block.astype(mx.float32)
        y = part if y is None else y + part
    return y


def hidden(x: mx.array, parts: dict[str, mx.array], slots: mx.array, kind: str,
           activation: str, threshold: float, in_use: int | None = None) -> mx.array:
    """`[k]` float32: the hidden activations h of the selected neurons."""
    if kind == "mlp":
        bias = mx.take(parts["up_bias"].reshape(-1), slots).astype(mx.float32)
        pre = gather_matvec(x, parts["up"], slots, in_use) + bias
        return activate(pre, activation, threshold)
    gate = activate(gather_matvec(x, parts["gate"], slots, in_use), activation, threshold)
    up = gather_matvec(x, parts["up"], slots, in_use)
    return gate * (mx.maximum(up, 0.0) if activation == "drelu" else up)


def sparse_ffn(x: mx.array, parts: dict[str, mx.array], slots: mx.array, kind: str,
               activation: str, threshold: float, in_use: int | None = None) -> mx.array:
    """`[d]` float32: the FFN output over the selected neurons."""
    h = hidden(x, parts, slots, kind, activation, threshold, in_use)
    return gather_accumulate(h, parts["down"], slots, in_use)


# Quantized rows (MLX affine quantization along the row, `q` = (packed, scales, biases)):
# MLX's own quantized_matmul does the arithmetic, on the gathered rows or the whole window.


def _qmatmul(v: mx.array, q: tuple[mx.array, mx.array, mx.array], rows: slice | mx.array,
             bits: int, group_size: int, transpose: bool) -> mx.array:
    w, scales, biases = (a[rows] if isinstance(rows, slice) else mx.take(a, rows, axis=0)
                         for a in q)
    return mx.quantized_matmul(v[None], w, scales.astype(v.dtype), biases.astype(v.dtype),
                               transpose=transpose, group_size=group_size, bits=bits)[0]


def gather_qmatvec(x: mx.array, q: tuple[mx.array, mx.array, mx.array], slots: mx.array,
                   bits: int, group_size: int, in_use: int | None = None) -> mx.array:
    """`[k]` float32: quantized row `slots[i]` dotted with `x`."""
    if use_window(slots, in_use):
        return _qmatmul(x, q, slice(0, in_use), bits, group_size, True)[slots].astype(
            mx.float32)
    return _qmatmul(x, q, slots, bits, group_size, True).astype(mx.float32)


def gather_qaccumulate(h: mx.array, q: tuple[mx.array, mx.array, mx.array], slots: mx.array,
                       bits: int, group_size: int, in_use: int | None = None) -> mx.array:
    """`[d]` float32: the quantized rows at `slots` weighted by `h` and summed."""
    if use_window(slots, in_use):
        spread = mx.zeros((in_use,), dtype=h.dtype)
        spread[slots] = h
        return _qmatmul(spread, q, slice(0, in_use), bits, group_size, False).astype(mx.float32)
    return _qmatmul(h, q, slots, bits, group_size, False).astype(mx.float32)
