"""The sparse FFN as CUDA kernels (`mx.fast.cuda_kernel`), for MLX's CUDA backend.

The same passes as the Metal kernels (see `gpu.py`). The development machine has no CUDA,
where the tests run the bodies on the CPU under `tests/gpu_emulator.py` (g++ with stand-ins
for CUDA's built-ins) against the reference, and check the sources' names
(`mx.fast.cuda_kernel` refuses even to build a kernel without the CUDA backend). Run on an
NVIDIA H200 (MLX 0.32.4 with mlx-cuda-13), tests/test_kernels.py passed in full for the float
passes: every dtype, kind and activation against the reference, k from 0 to C, d up to 4096.
The quantized passes ("qrows", "qaccumulate") were written later and have not run on a GPU:
only emulated. Not tuned.

How MLX turns these bodies into kernels: every input becomes a `const <dtype>*` parameter,
`<name>_shape` is added for inputs whose shape the body uses, and the template arguments
become `using T = ...;` and `constexpr int KIND = ...;` at the top of the body. `grid` is
counted in threads and rounded up to whole blocks, so the bodies guard their indices.
"""

from __future__ import annotations

import mlx.core as mx

from .gpu import TwoPass, constants

HEADER = constants("constexpr") + """
__device__ inline float flash_warp_sum(float v) {
  for (int offset = FLASH_GROUP / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <int ACT>
__device__ inline float flash_activate(float v, float threshold) {
  if (ACT == FLASH_ACT_SILU) {
    return v / (1.0f + expf(-v));
  }
  if (ACT == FLASH_ACT_FATRELU) {
    return v > threshold ? v : 0.0f;
  }
  return fmaxf(v, 0.0f);
}
"""

# The start of both pass-1 bodies: lane and selected neuron; a SIMD group past the k
# neurons leaves whole, so no reduction is left half-done.
NEURON_START = """
  const int lane = threadIdx.x;
  const int row = blockIdx.y * blockDim.y + threadIdx.y;
  const int k = slots_shape[0];
  const int d = x_shape[0];
  if (row >= k) {
    return;
  }
"""

# The start of both pass-2 bodies: threadgroup memory for the slices' sums, the thread's
# column j and slice ty.
SLICES_START = """
  __shared__ float partial[SPLIT][FLASH_GROUP];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int j = blockIdx.x * FLASH_GROUP + tx;
  const int k = slots_shape[0];
"""

# Pass 1. Block (GROUP, ROWS_PER_GROUP): x is the lane, y the selected neuron, so the GROUP
# lanes of a neuron are one warp.
ROWS = NEURON_START + """
  const size_t base = static_cast<size_t>(slots[row]) * d;
  const T* a = first + base;
  const T* b = second + base;
  float dot_first = 0.0f;
  float dot_second = 0.0f;
  for (int j = lane; j < d; j += FLASH_GROUP) {
    dot_first += x[j] * static_cast<float>(a[j]);
    if (KIND == FLASH_KIND_GLU) {
      dot_second += x[j] * static_cast<float>(b[j]);
    }
  }
  dot_first = flash_warp_sum(dot_first);
  if (KIND == FLASH_KIND_GLU) {
    dot_second = flash_warp_sum(dot_second);
  }
  if (lane == 0) {
    float v = dot_first;
    if (KIND == FLASH_KIND_MLP) {
      v = flash_activate<ACT>(v + static_cast<float>(bias[slots[row]]), params[0]);
    } else if (KIND == FLASH_KIND_GLU) {
      const float u = ACT == FLASH_ACT_DRELU ? fmaxf(dot_second, 0.0f) : dot_second;
      v = flash_activate<ACT>(v, params[0]) * u;
    }
    h[row] = v;
  }
"""

# The end of both pass-2 bodies: the slices' sums added in a fixed order, column j written.
SLICES_TOTAL = """
  partial[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < d) {
    float total = 0.0f;
    for (int p = 0; p < SPLIT; ++p) {
      total += partial[p][tx];
    }
    y[j] = total;
  }
"""

# Pass 2. Block (GROUP, SPLIT): x is the output column, y the slice of neurons.
ACCUMULATE = SLICES_START + """
  const int d = rows_shape[1];
  float acc = 0.0f;
  if (j < d) {
    for (int i = ty; i < k; i += SPLIT) {
      acc += h[i] * static_cast<float>(rows[static_cast<size_t>(slots[i]) * d + j]);
    }
  }
""" + SLICES_TOTAL

# Pass 1 on quantized rows: a lane takes whole packed words (32 / BITS values, all in one
# group, as BITS divides 32 and GROUP_SIZE is a multiple of 32), so per word it needs one
# scale and bias: x·(s q + b) = s (x·q) + b (sum of x).
QROWS = NEURON_START + """
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int words = d / PER_WORD;
  const int groups = d / GROUP_SIZE;
  const size_t slot = static_cast<size_t>(slots[row]);
  float acc = 0.0f;
  for (int i = lane; i < words; i += FLASH_GROUP) {
    const uint32_t word = w[slot * words + i];
    float dot = 0.0f;
    float sum = 0.0f;
    for (int e = 0; e < PER_WORD; ++e) {
      const float xj = x[i * PER_WORD + e];
      dot += xj * static_cast<float>((word >> (e * BITS)) & MASK);
      sum += xj;
    }
    const size_t g = slot * groups + i * PER_WORD / GROUP_SIZE;
    acc += static_cast<float>(scales[g]) * dot + static_cast<float>(biases[g]) * sum;
  }
  acc = flash_warp_sum(acc);
  if (lane == 0) {
    h[row] = acc;
  }
"""

# Pass 2 on quantized rows: as ACCUMULATE, each element dequantized where it is loaded
# (neighbouring threads read the same word).
QACCUMULATE = SLICES_START + """
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int words = w_shape[1];
  const int d = words * PER_WORD;
  const int groups = d / GROUP_SIZE;
  float acc = 0.0f;
  if (j < d) {
    const int shift = (j % PER_WORD) * BITS;
    for (int i = ty; i < k; i += SPLIT) {
      const size_t slot = static_cast<size_t>(slots[i]);
      const size_t g = slot * groups + j / GROUP_SIZE;
      const float q = static_cast<float>((w[slot * words + j / PER_WORD] >> shift) & MASK);
      acc += h[i] * (static_cast<float>(scales[g]) * q + static_cast<float>(biases[g]));
    }
  }
""" + SLICES_TOTAL

BODIES = {"rows": ROWS, "accumulate": ACCUMULATE, "qrows": QROWS, "qaccumulate": QACCUMULATE}
# 32 slices: 1024-thread blocks, so a few hundred columns still fill many warps.
KERNELS = TwoPass("cuda", mx.fast.cuda_kernel, HEADER, BODIES, split=32)
