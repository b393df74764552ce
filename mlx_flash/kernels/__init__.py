"""Sparse-FFN kernels: one decode token's FFN over the selected neurons only.

The engine keeps a layer's neurons in per-part matrices `[C, d]` (gate row, up row, down
column stored as a row; `up_bias` `[C, 1]` for OPT-style FFNs) and a selection gives the
`slots` (int32, distinct, any order) of the rows a token uses. These functions compute with
those rows where they lie instead of gathering them first, accumulating in float32.

Three implementations stand behind each function:

  reference  MLX ops (`mx.take` + matmul in float32); runs everywhere
  metal      `mx.fast.metal_kernel`, for Apple GPUs
  cuda       `mx.fast.cuda_kernel`, for MLX's CUDA backend

`backend()` picks one: MLX_FLASH_KERNEL=reference|metal|cuda if set (forcing one that is not
available raises RuntimeError), else metal where Metal is available, cuda where MLX runs on
CUDA with the GPU as its default device, else reference. It is read on every call.

`gather_qmatvec` / `gather_qaccumulate` do the same on rows stored with MLX's affine
quantization: the GPU kernels dequantize each element where they load it (2, 4 or 8 bits),
the reference (and every backend for 3, 5 or 6 bits) runs `mx.quantized_matmul`.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import cuda, gpu, metal, reference

BACKENDS = ("reference", "metal", "cuda")
ENV = "MLX_FLASH_KERNEL"
KINDS = ("glu", "mlp")
ACTIVATIONS = ("silu", "relu", "fatrelu", "drelu")
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
PARTS = {"glu": ("gate", "up", "down"), "mlp": ("up", "up_bias", "down")}
_IMPLEMENTATIONS = {"reference": reference, "metal": metal.KERNELS, "cuda": cuda.KERNELS}


def available(name: str) -> bool:
    """Whether backend `name` can run here. The GPU ones need MLX's Metal or CUDA backend;
    `mx.cuda` is absent from some MLX builds, hence the guard."""
    if name == "metal":
        return mx.metal.is_available()
    if name == "cuda":
        return hasattr(mx, "cuda") and mx.cuda.is_available()
    return name == "reference"


def backend() -> str:
    """The implementation the functions below use now (see the module docstring)."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in BACKENDS:
            raise RuntimeError(f"{ENV}={forced} is not one of {', '.join(BACKENDS)}")
        if not available(forced):
            what = "Metal" if forced == "metal" else "MLX's CUDA backend"
            raise RuntimeError(f"{ENV}={forced} but {what} is not available on this machine")
        return forced
    if available("metal"):
        return "metal"
    # MLX's CUDA kernels run on the default stream, so the GPU must be the default device.
    if available("cuda") and mx.default_device().type == mx.DeviceType.gpu:
        return "cuda"
    return "reference"


def _implementation(rows: mx.array):
    """The backend's implementation, once `rows` has a dtype the kernels take."""
    if rows.dtype not in DTYPES:
        raise ValueError(f"rows (or scales) must be float16, bfloat16 or float32, not "
                         f"{rows.dtype}")
    return _IMPLEMENTATIONS[backend()]


# k = 0 is answered before any implementation runs: a GPU kernel cannot be launched on an
# empty grid, and on MLX 0.32.4's CUDA backend the reference's empty result (take + matmul of
# no rows) segfaults when NumPy reads it (seen on an H200), where fresh zeros do not.


# Each implementation's arithmetic depends on the selected rows' values and their order in
# `slots`, never on where they lie: the engine passes them in neuron order, so a token's output
# does not depend on which cache slot or staging row holds a neuron.


def gather_matvec(x: mx.array, rows: mx.array, slots: mx.array) -> mx.array:
    """`[k]` float32: `out[i] = sum_j x[j] * rows[slots[i], j]` (x `[d]`, rows `[C, d]`)."""
    implementation = _implementation(rows)
    if slots.size == 0:
        return mx.zeros((0,), dtype=mx.float32)
    return implementation.gather_matvec(x, rows, slots)


def gather_accumulate(h: mx.array, rows: mx.array, slots: mx.array) -> mx.array:
    """`[d]` float32: `out[j] = sum_i h[i] * rows[slots[i], j]` (h `[k]`, rows `[C, d]`)."""
    implementation = _implementation(rows)
    if slots.size == 0:
        return mx.zeros((rows.shape[1],), dtype=mx.float32)
    return implementation.gather_accumulate(h, rows, slots)


# Quantized rows: the GPU passes dequantize each element where they load it (2, 4 or 8 bits);
# the reference, and every backend for 3, 5 or 6 bits, runs MLX's quantized_matmul on the
# selected rows.


def _quantized_implementation(q: tuple[mx.array, mx.array, mx.array], bits: int):
    implementation = _implementation(q[1])  # the scales' dtype is the kernels' T
    return implementation if bits in gpu.QUANTIZED_BITS else reference


def gather_qmatvec(x: mx.array, q: tuple[mx.array, mx.array, mx.array], slots: mx.array,
                   bits: int, group_size: int) -> mx.array:
    """`[k]` float32: like `gather_matvec`, the rows quantized: `q` = (packed uint32 `[C,
    d·bits/32]`, scales, biases `[C, d/group_size]`), x `[d]` in the compute dtype."""
    implementation = _quantized_implementation(q, bits)
    if slots.size == 0:
        return mx.zeros((0,), dtype=mx.float32)
    return implementation.gather_qmatvec(x, q, slots, bits, group_size)


def gather_qaccumulate(h: mx.array, q: tuple[mx.array, mx.array, mx.array], slots: mx.array,
                       bits: int, group_size: int) -> mx.array:
    """`[d]` float32: like `gather_accumulate`, the rows quantized (see `gather_qmatvec`)."""
    implementation = _quantized_implementation(q, bits)
    if slots.size == 0:
        return mx.zeros((q[0].shape[1] * 32 // bits,), dtype=mx.float32)
    return implementation.gather_qaccumulate(h, q, slots, bits, group_size)


def sparse_ffn(x: mx.array, parts: dict[str, mx.array], slots: mx.array, kind: str,
               activation: str, threshold: float = 0.0) -> mx.array:
    """`[d]` float32: the FFN of one token `x` `[d]` over the neurons at `slots`.

    kind "glu" (parts gate, up, down): h_i = act(gate_i·x) * up_i·x, with relu(up_i·x) for
    activation "drelu"; kind "mlp" (parts up, up_bias, down): h_i = act(up_i·x + up_bias_i).
    act: "silu" v·sigmoid(v), "relu" and "drelu" max(v, 0), "fatrelu" v if v > threshold
    else 0. Returns sum_i h_i * down_i, zeros when no slot is selected.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if activation not in ACTIVATIONS or (kind == "mlp" and activation == "drelu"):
        raise ValueError(f"activation {activation!r} is not supported for kind {kind!r}")
    missing = [p for p in PARTS[kind] if p not in parts]
    if missing:
        raise ValueError(f"kind {kind!r} needs parts {missing}")
    dtypes = {parts[p].dtype for p in PARTS[kind]}
    if len(dtypes) > 1:
        raise ValueError(f"the parts must share one dtype, not {sorted(map(str, dtypes))}")
    implementation = _implementation(parts["down"])
    if slots.size == 0:
        return mx.zeros((parts["down"].shape[1],), dtype=mx.float32)
    return implementation.sparse_ffn(x, parts, slots, kind, activation, threshold)


__all__ = ["BACKENDS", "available", "backend", "gather_accumulate", "gather_matvec",
           "gather_qaccumulate", "gather_qmatvec", "sparse_ffn"]
