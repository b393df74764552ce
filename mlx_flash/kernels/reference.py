"""The sparse FFN in plain MLX ops: `mx.take` the k selected rows, then multiply those.

It runs on every backend, is what the tests check against NumPy, and is the yardstick the
Metal and CUDA kernels are compared with. Dot products run in the rows' dtype (on MLX's CPU
backend a 16-bit matrix-vector product is 2.5x faster than converting the rows to float32
first), weighted sums in float32 (there converting is 2.5x faster); both return float32.

The rows are always gathered in the order of `slots`, never multiplied where they lie: a
weighted sum over a cache's whole window (the others weighted zero) adds the rows in the
order the cache happens to hold them, so its rounding, and in the end a token's output,
would depend on the budget and on what earlier tokens left in the cache. The window was
faster only when 76% or more of a cache's rows were selected (tools/kernel_bench.py).
"""

from __future__ import annotations

import mlx.core as mx

CHUNK_BYTES = 8 * 2**20


def activate(v: mx.array, activation: str, threshold: float) -> mx.array:
    """The activation applied to the gate (to up · x + up_bias for "mlp"); "drelu" is relu
    here, its second relu (on up) is applied by the caller."""
    if activation == "silu":
        return v * mx.sigmoid(v)
    if activation == "fatrelu":
        return mx.where(v > threshold, v, 0.0)
    return mx.maximum(v, 0.0)


def gather_matvec(x: mx.array, rows: mx.array, slots: mx.array) -> mx.array:
    """`[k]`: row `slots[i]` of `rows` dotted with `x`."""
    # x · rows^T rather than rows · x: the same product, but MLX's CPU backend hands float32
    # to BLAS, whose matrix-vector product in that orientation is 4x slower here (576 x 1536)
    x = x.astype(rows.dtype)[None]
    return (x @ mx.take(rows, slots, axis=0).T)[0].astype(mx.float32)


def gather_accumulate(h: mx.array, rows: mx.array, slots: mx.array) -> mx.array:
    """`[d]`: the rows at `slots` weighted by `h` and summed, in the order of `slots`."""
    h = h.astype(mx.float32)
    # in chunks of rows: the float32 copies then take 8 MiB at a time, not a whole selection
    # (same speed, measured)
    step = max(1, CHUNK_BYTES // (4 * rows.shape[1]))
    y = None
    for i in range(0, slots.shape[0], step):
        part = h[i:i + step] @ mx.take(rows, slots[i:i + step], axis=0).astype(mx.float32)
        y = part if y is None else y + part
    return y


def hidden(x: mx.array, parts: dict[str, mx.array], slots: mx.array, kind: str,
           activation: str, threshold: float) -> mx.array:
    """`[k]` float32: the hidden activations h of the selected neurons."""
    if kind == "mlp":
        bias = mx.take(parts["up_bias"].reshape(-1), slots).astype(mx.float32)
        pre = gather_matvec(x, parts["up"], slots) + bias
        return activate(pre, activation, threshold)
    gate = activate(gather_matvec(x, parts["gate"], slots), activation, threshold)
    up = gather_matvec(x, parts["up"], slots)
    return gate * (mx.maximum(up, 0.0) if activation == "drelu" else up)


def sparse_ffn(x: mx.array, parts: dict[str, mx.array], slots: mx.array, kind: str,
               activation: str, threshold: float) -> mx.array:
    """`[d]` float32: the FFN output over the selected neurons."""
    h = hidden(x, parts, slots, kind, activation, threshold)
    return gather_accumulate(h, parts["down"], slots)


# Quantized rows (MLX affine quantization along the row, `q` = (packed, scales, biases)):
# MLX's own quantized_matmul does the arithmetic, on the gathered rows.


def _qmatmul(v: mx.array, q: tuple[mx.array, mx.array, mx.array], rows: mx.array,
             bits: int, group_size: int, transpose: bool) -> mx.array:
    w, scales, biases = (mx.take(a, rows, axis=0) for a in q)
    return mx.quantized_matmul(v[None], w, scales.astype(v.dtype), biases.astype(v.dtype),
                               transpose=transpose, group_size=group_size, bits=bits)[0]


def gather_qmatvec(x: mx.array, q: tuple[mx.array, mx.array, mx.array], slots: mx.array,
                   bits: int, group_size: int) -> mx.array:
    """`[k]` float32: quantized row `slots[i]` dotted with `x`."""
    return _qmatmul(x, q, slots, bits, group_size, True).astype(mx.float32)


def gather_qaccumulate(h: mx.array, q: tuple[mx.array, mx.array, mx.array], slots: mx.array,
                       bits: int, group_size: int) -> mx.array:
    """`[d]` float32: the quantized rows at `slots` weighted by `h` and summed."""
    return _qmatmul(h, q, slots, bits, group_size, False).astype(mx.float32)
