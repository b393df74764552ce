"""Run the Metal and CUDA kernel bodies on the CPU: a C++ emulation of GPU threads.

Neither a Mac nor an NVIDIA GPU is at hand where the tests run, so the kernel sources in
`mlx_flash/kernels/{metal,cuda}.py` would otherwise only be checked for their names. This
module compiles each body with g++ the way `mx.fast.metal_kernel` / `mx.fast.cuda_kernel` wrap
it (inputs as `const T*` with `<name>_shape`, template arguments as `using T = ...` /
`constexpr int`), with stand-ins for the GPU's built-ins:

  * every thread of a threadgroup (CUDA block) is an OS thread, and the threadgroups run one
    after another; Metal launches only the threads inside the grid (its last threadgroups may
    be partial), CUDA whole blocks;
  * `threadgroup` / `__shared__` variables are function statics (one threadgroup at a time);
  * `threadgroup_barrier` / `__syncthreads` wait for the threadgroup's threads;
  * `simd_sum` and `__shfl_xor_sync` exchange values between the 32 threads of a SIMD group
    through memory;
  * a reduction or barrier reached while a thread it waits for has exited makes the launch
    raise (on a GPU that is undefined), so a kernel whose threads diverge around one fails.

Not caught: reads past an input (they see neighbouring memory) and threadgroup arrays read
before they are written (they hold the previous threadgroup's values).

What this checks: the bodies' arithmetic, indexing, packing, reductions and guards, run
against the reference. What it cannot: the Metal or CUDA compilers, their type rules and
address spaces, memory coalescing, speed. It is an emulation: the kernels have run on a GPU
only where docs/notes say so.

`Emulator(backend).make` has the signature of `mx.fast.metal_kernel` / `mx.fast.cuda_kernel`,
so `TwoPass` launches the emulated kernels exactly as it launches the real ones.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

COMPILER = shutil.which("g++")

CTYPES = {mx.float32: "float", mx.float16: "_Float16", mx.bfloat16: "flash_emulate::bf16",
          mx.int32: "int32_t", mx.uint32: "uint32_t"}
NUMPY = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16,
         mx.int32: np.int32, mx.uint32: np.uint32}

# What a kernel's translation unit sees of the runtime: light, so each kernel compiles fast.
DECLARATIONS = r"""
#include <cmath>
#include <cstdint>
#include <cstring>

namespace flash_emulate {

struct bf16 {  // bfloat16: the top half of a float32
  uint16_t bits;
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct dim3_ {
  unsigned x = 0, y = 0, z = 0;
};

extern thread_local dim3_ tid, bid, bdim, gpos;  // in threadgroup, group, group size, in grid
extern thread_local unsigned linear;               // the thread's index in its threadgroup
float exchange(float v, unsigned lane_from, bool sum_all);
void barrier();
int launch(const unsigned* grid, const unsigned* tg, bool whole_groups, void (*body)(void*),
           void* context);

}  // namespace flash_emulate
"""

# The threads, barriers and SIMD exchanges: compiled once per Emulator workdir.
RUNTIME = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <memory>
#include <thread>
#include <vector>

namespace flash_emulate {

constexpr unsigned SIMD = 32;

struct Group {  // one threadgroup's shared state
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> simd;
  std::vector<std::atomic<int>> live;  // live lanes per SIMD group
  std::vector<unsigned> members;       // lanes launched per SIMD group
  std::atomic<int> alive{0};           // threads of the threadgroup not yet exited
  int launched = 0;
  float lanes[1024 * 4];
  explicit Group(size_t n_simd) : simd(n_simd), live(n_simd), members(n_simd, 0) {}
};

thread_local dim3_ tid, bid, bdim, gpos;
thread_local unsigned linear = 0;
thread_local Group* group = nullptr;
std::atomic<bool> diverged{false};  // a SIMD reduction or barrier ran with threads exited

float exchange(float v, unsigned lane_from, bool sum_all) {
  const unsigned s = linear / SIMD;
  group->lanes[linear] = v;
  group->simd[s]->arrive_and_wait();
  // checked after the barrier: a lane that exited instead of arriving has been counted out
  if (group->live[s].load() != int(SIMD) || group->members[s] != SIMD) {
    diverged = true;  // the run goes on (garbage in, no deadlock) and reports it
  }
  float r = 0.0f;
  if (sum_all) {
    for (unsigned l = 0; l < SIMD; ++l) r += group->lanes[s * SIMD + l];
  } else {
    r = group->lanes[s * SIMD + lane_from];
  }
  group->simd[s]->arrive_and_wait();
  return r;
}

void barrier() {
  group->all->arrive_and_wait();
  // a thread that exited instead of arriving was counted out: on a GPU that is undefined
  if (group->alive.load() != group->launched) diverged = true;
  group->all->arrive_and_wait();  // none leaves before all have checked
}

int launch(const unsigned* grid, const unsigned* tg, bool whole_groups, void (*body)(void*),
           void* context) {
  diverged = false;
  unsigned n[3];
  for (int i = 0; i < 3; ++i) n[i] = (grid[i] + tg[i] - 1) / tg[i];
  const unsigned size = tg[0] * tg[1] * tg[2];
  for (unsigned bz = 0; bz < n[2]; ++bz)
    for (unsigned by = 0; by < n[1]; ++by)
      for (unsigned bx = 0; bx < n[0]; ++bx) {
        std::vector<dim3_> threads;
        for (unsigned l = 0; l < size; ++l) {
          dim3_ t{l % tg[0], (l / tg[0]) % tg[1], l / (tg[0] * tg[1])};
          dim3_ g{bx * tg[0] + t.x, by * tg[1] + t.y, bz * tg[2] + t.z};
          if (whole_groups || (g.x < grid[0] && g.y < grid[1] && g.z < grid[2]))
            threads.push_back(t);
        }
        Group shared((size + SIMD - 1) / SIMD);
        shared.all = std::make_unique<std::barrier<>>(threads.size());
        shared.launched = int(threads.size());
        shared.alive = int(threads.size());
        for (auto& t : threads) shared.members[(t.x + tg[0] * (t.y + tg[1] * t.z)) / SIMD]++;
        for (size_t s = 0; s < shared.simd.size(); ++s) {
          shared.simd[s] = std::make_unique<std::barrier<>>(std::max(1u, shared.members[s]));
          shared.live[s] = int(shared.members[s]);
        }
        std::vector<std::thread> running;
        for (auto t : threads) {
          running.emplace_back([&, t] {
            tid = t;
            bid = {bx, by, bz};
            bdim = {tg[0], tg[1], tg[2]};
            gpos = {bx * tg[0] + t.x, by * tg[1] + t.y, bz * tg[2] + t.z};
            group = &shared;
            linear = t.x + tg[0] * (t.y + tg[1] * t.z);
            body(context);
            // an exited thread no longer holds up barriers, as on a GPU
            shared.live[linear / SIMD]--;
            shared.alive--;
            shared.simd[linear / SIMD]->arrive_and_drop();
            shared.all->arrive_and_drop();
          });
        }
        for (auto& r : running) r.join();
      }
  return diverged ? 1 : 0;
}

}  // namespace flash_emulate
"""


STAND_INS = {
    "metal": r"""
typedef unsigned int uint;
#define constant
#define threadgroup static
#define thread_position_in_grid flash_emulate::gpos
#define thread_position_in_threadgroup flash_emulate::tid
namespace metal {
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { flash_emulate::barrier(); }
inline float simd_sum(float v) { return flash_emulate::exchange(v, 0, true); }
inline float exp(float v) { return std::exp(v); }
inline float max(float a, float b) { return std::fmax(a, b); }
}  // namespace metal
""",
    "cuda": r"""
#define __device__
#define __shared__ static
#define threadIdx flash_emulate::tid
#define blockIdx flash_emulate::bid
#define blockDim flash_emulate::bdim
inline void __syncthreads() { flash_emulate::barrier(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  return flash_emulate::exchange(v, (flash_emulate::linear % 32) ^ unsigned(offset), false);
}
""",
}


def _template_line(name: str, value: Any) -> str:
    if isinstance(value, mx.Dtype):
        return f"using {name} = {CTYPES[value]};"
    return f"constexpr int {name} = {int(value)};"


class Emulator:
    """Kernels of `backend` ("metal" or "cuda") compiled for this CPU, cached in `workdir`."""

    def __init__(self, backend: str, workdir: Path):
        if COMPILER is None:
            raise RuntimeError("the GPU emulator needs g++")
        self.backend, self.workdir = backend, workdir
        self.libraries: dict[str, ctypes.CDLL] = {}

    def make(self, name: str, input_names: list[str], output_names: list[str], source: str,
             header: str = "", **_: Any):
        """A kernel object, like `mx.fast.metal_kernel(...)`'s."""

        def kernel(inputs: list[mx.array], template: list[tuple[str, Any]], grid: tuple,
                   threadgroup: tuple, output_shapes: list[tuple], output_dtypes: list,
                   **__: Any) -> list[mx.array]:
            code = self.program(input_names, output_names, source, header, inputs, template,
                                output_dtypes)
            arrays = [np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16
                                                    else a)) for a in inputs]
            outputs = [np.full(s, np.nan, dtype=NUMPY[d]) for s, d in
                       zip(output_shapes, output_dtypes, strict=True)]
            shapes = [np.array(a.shape or (1,), dtype=np.int32) for a in inputs]
            pointers = (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays))
            shape_ptrs = (ctypes.c_void_p * len(shapes))(*(s.ctypes.data for s in shapes))
            out_ptrs = (ctypes.c_void_p * len(outputs))(*(o.ctypes.data for o in outputs))
            dims = (ctypes.c_uint * 6)(*grid, *threadgroup)
            if self.library(code).run(pointers, shape_ptrs, out_ptrs, dims):
                raise RuntimeError(f"{name}: a SIMD reduction or barrier ran with threads exited")
            return [mx.array(o) for o in outputs]

        return kernel

    def program(self, input_names: list[str], output_names: list[str], source: str,
                header: str, inputs: list[mx.array], template: list[tuple[str, Any]],
                output_dtypes: list) -> str:
        """The C++ translation unit of one instantiation."""
        lines = [DECLARATIONS, STAND_INS[self.backend], header,
                 'extern "C" int run(void** in, void** shapes, void** out, unsigned* dims) {']
        for i, (n, a) in enumerate(zip(input_names, inputs, strict=True)):
            t = CTYPES[a.dtype]
            lines += [f"  const {t}* {n} = static_cast<const {t}*>(in[{i}]);",
                      f"  const int* {n}_shape = static_cast<const int*>(shapes[{i}]);"]
        for i, (n, d) in enumerate(zip(output_names, output_dtypes, strict=True)):
            lines.append(f"  {CTYPES[d]}* {n} = static_cast<{CTYPES[d]}*>(out[{i}]);")
        lines.append("  auto body = [=]() {")
        lines += ["    " + _template_line(n, v) for n, v in template]
        whole_groups = "true" if self.backend == "cuda" else "false"
        lines += [source, "  };",
                  f"  return flash_emulate::launch(dims, dims + 3, {whole_groups}, "
                  "[](void* f) { (*static_cast<decltype(body)*>(f))(); }, &body);", "}"]
        return "\n".join(lines)

    def compile(self, code: str, so: Path, *link: str) -> None:
        src = so.with_suffix(".cpp")
        src.write_text(code)
        r = subprocess.run([COMPILER, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                            "-Wall", "-Wno-unused-variable", "-o", str(so), str(src), *link],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"g++ failed on {src}:\n{r.stderr[-4000:]}")

    def library(self, code: str) -> ctypes.CDLL:
        runtime = self.workdir / "libflash_emulate.so"
        if not runtime.exists():
            self.compile(DECLARATIONS + RUNTIME, runtime)
        key = hashlib.sha256(code.encode()).hexdigest()[:16]
        if key not in self.libraries:
            so = self.workdir / f"{self.backend}-{key}.so"
            if not so.exists():
                self.compile(code, so, str(runtime), f"-Wl,-rpath,{self.workdir}")
            self.libraries[key] = ctypes.CDLL(str(so))
        return self.libraries[key]
