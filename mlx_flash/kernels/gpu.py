"""The launch side that the Metal and CUDA kernels share: one algorithm in two passes.

Pass 1 ("rows"): one 32-thread SIMD group (a Metal simdgroup, a CUDA warp) per selected
neuron. Its lanes stride over the hidden dimension d, so each load instruction of the group
reads 32 consecutive elements of the neuron's gate/up row; the products with x are summed in
float32 and reduced across the group (simd_sum / warp shuffles). Lane 0 applies the
activation and writes h_i to a `[k]` float32 buffer. Rows per threadgroup: `ROWS_PER_GROUP`.

Pass 2 ("accumulate"): a threadgroup owns `GROUP` consecutive output columns j and splits
the k selected neurons into `split` interleaved slices, one per thread row. A thread sums
h_i * down[slot_i, j] over its slice (for a fixed i the group's loads are consecutive in j),
and the slices are added in threadgroup memory in a fixed order.

Why not one fused kernel: every output column needs every h_i, so fusing means either
recomputing h per block of columns (k·d work per block) or adding into y with float atomics
(k·d atomics in an order that changes run to run). The `[k]` buffer is 4k bytes and the
second launch costs microseconds; both passes are deterministic.

Neither pass materialises the gathered rows. Both need k >= 1 (no empty grids): the public
functions answer k = 0 themselves. Inputs must be row contiguous, which the engine's
neuron matrices are; MLX copies any that are not (`ensure_row_contiguous`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

GROUP = 32  # SIMD width: Apple GPUs' simdgroups and NVIDIA's warps are 32 threads
ROWS_PER_GROUP = 8  # pass 1: neurons (SIMD groups) per threadgroup
KIND_CODES = {"dot": 0, "glu": 1, "mlp": 2}  # "dot": gather_matvec
ACTIVATION_CODES = {"silu": 0, "relu": 1, "fatrelu": 2, "drelu": 3}

# Built kernels, keyed by (backend, pass): a kernel object is built once per process; MLX
# compiles each template instantiation (dtype, kind, activation) once on first use.
_KERNELS: dict[tuple[str, str], Any] = {}


def constants(qualifier: str) -> str:
    """The codes above as source-level constants, so the sources and Python share them.
    `qualifier` is what a program-scope constant needs: "constant constexpr" in Metal,
    "constexpr" in CUDA."""
    named = {"FLASH_GROUP": GROUP}
    named.update({f"FLASH_KIND_{k.upper()}": v for k, v in KIND_CODES.items()})
    named.update({f"FLASH_ACT_{a.upper()}": v for a, v in ACTIVATION_CODES.items()})
    return "".join(f"{qualifier} int {name} = {value};\n" for name, value in named.items())


# Each pass's inputs and outputs, in the order the kernels take them. "qrows" and
# "qaccumulate" are the passes on quantized rows (MLX's affine quantization along the row:
# `w` packed uint32, `scales` and `biases` one per group): they dequantize each element where
# they load it, so the gathered rows are never materialised in float either.
SIGNATURES = {"rows": (["x", "slots", "first", "second", "bias", "params"], ["h"]),
              "accumulate": (["h", "slots", "rows"], ["y"]),
              "qrows": (["x", "slots", "w", "scales", "biases"], ["h"]),
              "qaccumulate": (["h", "slots", "w", "scales", "biases"], ["y"])}
# Bits the quantized passes take: those whose values never straddle two uint32 words
# (MLX packs 3, 5 and 6 bits across words; those rows go through the reference).
QUANTIZED_BITS = (2, 4, 8)


def quantized_template(q: tuple[mx.array, mx.array, mx.array], bits: int,
                       group_size: int) -> list[tuple[str, Any]]:
    """The quantized passes' template: T is the scales' (and biases') dtype."""
    return [("T", q[1].dtype), ("BITS", bits), ("GROUP_SIZE", group_size)]


class TwoPass:
    """Both passes for one backend. `make` is `mx.fast.metal_kernel` or
    `mx.fast.cuda_kernel`; `split` is pass 2's number of slices (its threadgroup has
    `GROUP * split` threads)."""

    def __init__(self, name: str, make: Callable[..., Any], header: str,
                 bodies: dict[str, str], split: int):
        self.name, self.make, self.header, self.bodies, self.split = (name, make, header,
                                                                       bodies, split)

    def kernel(self, which: str) -> Any:
        """The kernel object of pass `which` (a key of SIGNATURES), built on first use.
        Building needs no GPU; calling it does."""
        key = (self.name, which)
        if key not in _KERNELS:
            inputs, outputs = SIGNATURES[which]
            _KERNELS[key] = self.make(name=f"mlx_flash_{self.name}_{which}", input_names=inputs,
                                      output_names=outputs, source=self.bodies[which],
                                      header=self.header)
        return _KERNELS[key]

    def per_row(self, which: str, inputs: list[mx.array], template: list, k: int) -> mx.array:
        """`[k]` float32 from a pass-1 kernel: one SIMD group per selected neuron."""
        return self.kernel(which)(inputs=inputs, template=template, grid=(GROUP, k, 1),
                                  threadgroup=(GROUP, ROWS_PER_GROUP, 1),
                                  output_shapes=[(k,)], output_dtypes=[mx.float32])[0]

    def per_column(self, which: str, inputs: list[mx.array], template: list,
                   d: int) -> mx.array:
        """`[d]` float32 from a pass-2 kernel: GROUP columns per threadgroup."""
        columns = -(-d // GROUP) * GROUP
        return self.kernel(which)(inputs=inputs, template=template + [("SPLIT", self.split)],
                                  grid=(columns, self.split, 1),
                                  threadgroup=(GROUP, self.split, 1),
                                  output_shapes=[(d,)], output_dtypes=[mx.float32])[0]

    def hidden(self, x: mx.array, first: mx.array, second: mx.array, bias: mx.array,
               slots: mx.array, kind: str, activation: str, threshold: float) -> mx.array:
        """Pass 1: `[k]` float32. "dot": first·x; "glu": act(first·x) * second·x (relu'd
        for drelu); "mlp": act(first·x + bias). Inputs a kind does not read are passed as
        `first` (no copy: the kernel never touches them)."""
        inputs = [x.astype(mx.float32), slots, first, second, bias,
                  mx.array([threshold], dtype=mx.float32)]
        template = [("T", first.dtype), ("KIND", KIND_CODES[kind]),
                    ("ACT", ACTIVATION_CODES[activation])]
        return self.per_row("rows", inputs, template, slots.shape[0])

    def gather_matvec(self, x: mx.array, rows: mx.array, slots: mx.array) -> mx.array:
        return self.hidden(x, rows, rows, rows, slots, "dot", "relu", 0.0)

    def gather_accumulate(self, h: mx.array, rows: mx.array, slots: mx.array) -> mx.array:
        """Pass 2: `[d]` float32."""
        return self.per_column("accumulate", [h.astype(mx.float32), slots, rows],
                               [("T", rows.dtype)], rows.shape[1])

    def gather_qmatvec(self, x: mx.array, q: tuple[mx.array, mx.array, mx.array],
                       slots: mx.array, bits: int, group_size: int) -> mx.array:
        """Pass 1 on quantized rows (`bits` in QUANTIZED_BITS): `[k]` float32."""
        return self.per_row("qrows", [x.astype(mx.float32), slots, *q],
                            quantized_template(q, bits, group_size), slots.shape[0])

    def gather_qaccumulate(self, h: mx.array, q: tuple[mx.array, mx.array, mx.array],
                           slots: mx.array, bits: int, group_size: int) -> mx.array:
        """Pass 2 on quantized rows: `[d]` float32."""
        return self.per_column("qaccumulate", [h.astype(mx.float32), slots, *q],
                               quantized_template(q, bits, group_size), q[0].shape[1] * 32 // bits)

    def sparse_ffn(self, x: mx.array, parts: dict[str, mx.array], slots: mx.array, kind: str,
                   activation: str, threshold: float) -> mx.array:
        if kind == "mlp":
            up = parts["up"]
            h = self.hidden(x, up, up, parts["up_bias"], slots, kind, activation, threshold)
        else:
            gate = parts["gate"]
            h = self.hidden(x, gate, parts["up"], gate, slots, kind, activation, threshold)
        return self.gather_accumulate(h, parts["down"], slots)
