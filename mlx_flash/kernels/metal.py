"""The sparse FFN as Metal kernels (`mx.fast.metal_kernel`), for Apple GPUs.

NEVER RUN ON METAL: these sources were written against MLX's documented metal_kernel API
(0.32) and have never been compiled by Metal or run on an Apple GPU: the development machine
has no Metal. What has run: every body, on the CPU, under `tests/gpu_emulator.py` (g++ with
stand-ins for Metal's built-ins: threads, threadgroup memory and barriers, `simd_sum`),
against the reference, in the test suite; that checks their arithmetic, indexing, packing,
reductions and guards, not Metal's compiler or type rules. The tests also build the kernel
objects (which needs no GPU) and compare them with the reference when Metal is available:
run `pytest tests/test_kernels.py` on a Mac before relying on them. The algorithm and launch
geometry are in `gpu.py`; the same float passes in CUDA (`cuda.py`) have passed the tests on
an NVIDIA GPU.

How MLX turns these bodies into kernels: it writes the signature from the input arrays'
dtypes (inputs with fewer than 8 elements go in the `constant` address space, so the bodies
only index inputs, never take `device` pointers to them), adds `<name>_shape` for inputs
whose shape the body uses, adds the `[[thread_position_in_grid]]`-style attributes the body
names, and makes `T`, `KIND`, `ACT`, `SPLIT` template parameters of the kernel.
"""

from __future__ import annotations

import mlx.core as mx

from .gpu import TwoPass, constants

HEADER = constants("constant constexpr") + """
template <int ACT>
inline float flash_activate(float v, float threshold) {
  if (ACT == FLASH_ACT_SILU) {
    return v / (1.0f + metal::exp(-v));
  }
  if (ACT == FLASH_ACT_FATRELU) {
    return v > threshold ? v : 0.0f;
  }
  return metal::max(v, 0.0f);
}
"""

# The start of both pass-1 bodies: lane and selected neuron; a SIMD group past the k
# neurons leaves whole, so no reduction is left half-done.
NEURON_START = """
  const uint lane = thread_position_in_threadgroup.x;
  const uint row = thread_position_in_grid.y;
  const uint k = slots_shape[0];
  const uint d = x_shape[0];
  if (row >= k) {
    return;
  }
"""

# The start of both pass-2 bodies: threadgroup memory for the slices' sums, the thread's
# column j and slice ty.
SLICES_START = """
  threadgroup float partial[SPLIT][FLASH_GROUP];
  const uint tx = thread_position_in_threadgroup.x;
  const uint ty = thread_position_in_threadgroup.y;
  const uint j = thread_position_in_grid.x;
  const uint k = slots_shape[0];
"""

# Pass 1. Threadgroup (GROUP, ROWS_PER_GROUP): x is the lane, y the selected neuron, so the
# GROUP lanes of a neuron are one simdgroup (Apple GPUs' simdgroups are 32 wide).
ROWS = NEURON_START + """
  const size_t base = size_t(slots[row]) * d;
  float dot_first = 0.0f;
  float dot_second = 0.0f;
  for (uint j = lane; j < d; j += FLASH_GROUP) {
    const float xj = x[j];
    const T a = first[base + j];
    dot_first += xj * float(a);
    if (KIND == FLASH_KIND_GLU) {
      const T b = second[base + j];
      dot_second += xj * float(b);
    }
  }
  dot_first = metal::simd_sum(dot_first);
  if (KIND == FLASH_KIND_GLU) {
    dot_second = metal::simd_sum(dot_second);
  }
  if (lane == 0) {
    float v = dot_first;
    if (KIND == FLASH_KIND_MLP) {
      const T b = bias[slots[row]];
      v = flash_activate<ACT>(v + float(b), params[0]);
    } else if (KIND == FLASH_KIND_GLU) {
      const float u = ACT == FLASH_ACT_DRELU ? metal::max(dot_second, 0.0f) : dot_second;
      v = flash_activate<ACT>(v, params[0]) * u;
    }
    h[row] = v;
  }
"""

# The end of both pass-2 bodies: the slices' sums added in a fixed order, column j written.
SLICES_TOTAL = """
  partial[ty][tx] = acc;
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  if (ty == 0 && j < d) {
    float total = 0.0f;
    for (uint p = 0; p < SPLIT; ++p) {
      total += partial[p][tx];
    }
    y[j] = total;
  }
"""

# Pass 2. Threadgroup (GROUP, SPLIT): x is the output column, y the slice of neurons.
ACCUMULATE = SLICES_START + """
  const uint d = rows_shape[1];
  float acc = 0.0f;
  if (j < d) {
    for (uint i = ty; i < k; i += SPLIT) {
      const T r = rows[size_t(slots[i]) * d + j];
      acc += h[i] * float(r);
    }
  }
""" + SLICES_TOTAL

# Pass 1 on quantized rows (see cuda.py's QROWS): a lane takes whole packed words, all of
# whose values share a group's scale and bias.
QROWS = NEURON_START + """
  constexpr uint PER_WORD = 32 / BITS;
  constexpr uint MASK = (1u << BITS) - 1u;
  const uint words = d / PER_WORD;
  const uint groups = d / GROUP_SIZE;
  const size_t slot = size_t(slots[row]);
  float acc = 0.0f;
  for (uint i = lane; i < words; i += FLASH_GROUP) {
    const uint word = w[slot * words + i];
    float dot = 0.0f;
    float sum = 0.0f;
    for (uint e = 0; e < PER_WORD; ++e) {
      const float xj = x[i * PER_WORD + e];
      dot += xj * float((word >> (e * BITS)) & MASK);
      sum += xj;
    }
    const size_t g = slot * groups + i * PER_WORD / GROUP_SIZE;
    const T s = scales[g];
    const T b = biases[g];
    acc += float(s) * dot + float(b) * sum;
  }
  acc = metal::simd_sum(acc);
  if (lane == 0) {
    h[row] = acc;
  }
"""

# Pass 2 on quantized rows: as ACCUMULATE, each element dequantized where it is loaded.
QACCUMULATE = SLICES_START + """
  constexpr uint PER_WORD = 32 / BITS;
  constexpr uint MASK = (1u << BITS) - 1u;
  const uint words = w_shape[1];
  const uint d = words * PER_WORD;
  const uint groups = d / GROUP_SIZE;
  float acc = 0.0f;
  if (j < d) {
    const uint shift = (j % PER_WORD) * BITS;
    for (uint i = ty; i < k; i += SPLIT) {
      const size_t slot = size_t(slots[i]);
      const size_t g = slot * groups + j / GROUP_SIZE;
      const float q = float((w[slot * words + j / PER_WORD] >> shift) & MASK);
      const T s = scales[g];
      const T b = biases[g];
      acc += h[i] * (float(s) * q + float(b));
    }
  }
""" + SLICES_TOTAL

BODIES = {"rows": ROWS, "accumulate": ACCUMULATE, "qrows": QROWS, "qaccumulate": QACCUMULATE}
# 8 slices: 256-thread threadgroups, a common size on Apple GPUs (not tuned: no Mac here).
KERNELS = TwoPass("metal", mx.fast.metal_kernel, HEADER, BODIES, split=8)
