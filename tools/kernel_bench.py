"""What does gathering the selected neurons cost? Gathered vs whole-window FFN compute.

    python tools/kernel_bench.py [--repeats N] [--json OUT]

For one decode token and a window of C neurons of which a fraction is selected, it times
(median of `--repeats` runs after warm-up, each evaluated with mx.eval):

  gathered  `mlx_flash.kernels.reference.sparse_ffn`: mx.take of the k selected rows of gate,
            up and down, then matmuls on those k rows (SwiGLU; dot products in the rows'
            dtype, weighted sums in float32)
  window    the same FFN over all C rows, the selected results picked (h of the others zero):
            no gather, C/k times the arithmetic (`window_ffn` below)

The engine used to take the window from 80% of a cache's rows selected on; it no longer does,
because the window's weighted sum adds the rows in the order the cache holds them, so a
token's output would depend on the budget (mlx_flash.kernels.reference). This measures what
that exactness costs.

for d = 576, C = 1536 (the default SmolLM2 model's FFN) and d = 4096, C = 4096, in bfloat16,
float16 and float32, at 1% to 100% of C selected. It prints a Markdown table (ms and the ratio
gathered / window) and, per (d, C, dtype), the crossover: the selected fraction above which
the whole window is faster (linearly interpolated between the measured fractions). It runs on
whatever MLX's default device is (the CPU on a machine without Metal or CUDA); timings compare
only within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_flash.kernels import reference  # noqa: E402

SHAPES = [(576, 1536), (4096, 4096)]  # (d, C)
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
FRACTIONS = [0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 1.00]


def median_ms(fn: Callable[[], mx.array], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def window_ffn(x: mx.array, parts: dict[str, mx.array], slots: mx.array) -> mx.array:
    """The SwiGLU FFN over `slots` computed over every row: dot products with all of them,
    h scattered over the rows (zeros elsewhere), a weighted sum of all rows in float32."""
    h = mx.zeros((parts["down"].shape[0],), dtype=mx.float32)
    pre = reference.gather_matvec(x, parts["gate"], mx.arange(h.shape[0]))
    up = reference.gather_matvec(x, parts["up"], mx.arange(h.shape[0]))
    h[slots] = (reference.activate(pre, "silu", 0.0) * up)[slots]
    return h @ parts["down"].astype(mx.float32)


def ffn(path: str, x: mx.array, parts: dict[str, mx.array], slots: mx.array) -> mx.array:
    """The SwiGLU FFN over `slots`, "gathered" (the engine's) or "window"."""
    if path == "window":
        return window_ffn(x, parts, slots)
    return reference.sparse_ffn(x, parts, slots, "glu", "silu", 0.0)


def crossover(fractions: list[float], ratios: list[float]) -> float | None:
    """The selected fraction above which the window is faster (ratio gathered/window > 1),
    interpolated; None if gathering is faster up to the last fraction. The crossing searched
    is the last upward one, so noise at tiny fractions is not taken for it."""
    if ratios[-1] <= 1:
        return None
    i = len(ratios) - 1
    while i > 0 and ratios[i - 1] > 1:
        i -= 1
    if i == 0:
        return 0.0
    f0, f1, r0, r1 = fractions[i - 1], fractions[i], ratios[i - 1], ratios[i]
    return f0 + (1 - r0) / (r1 - r0) * (f1 - f0)


def run(repeats: int) -> tuple[list[dict], list[dict]]:
    rows, crossings = [], []
    rng = np.random.default_rng(0)
    for d, c in SHAPES:
        x = mx.array(rng.standard_normal(d).astype(np.float32))
        base = {p: mx.array(rng.standard_normal((c, d)).astype(np.float32) / np.sqrt(d))
                for p in ("gate", "up", "down")}
        order = rng.permutation(c).astype(np.int32)
        for name, dtype in DTYPES.items():
            parts = {p: v.astype(dtype) for p, v in base.items()}
            xd = x.astype(dtype)
            mx.eval(parts, xd)
            ratios = []
            for fraction in FRACTIONS:
                k = max(1, round(fraction * c))
                slots = mx.array(order[:k])
                mx.eval(slots)
                gathered, window = (median_ms(lambda path=path, xd=xd, parts=parts, slots=slots:
                                              ffn(path, xd, parts, slots), repeats)
                                    for path in ("gathered", "window"))
                ratios.append(gathered / window)
                rows.append({"d": d, "C": c, "dtype": name, "fraction": fraction, "k": k,
                             "gathered_ms": gathered, "window_ms": window,
                             "ratio": gathered / window})
            crossings.append({"d": d, "C": c, "dtype": name,
                              "crossover": crossover(FRACTIONS, ratios)})
    return rows, crossings


def describe(crossing: float | None) -> str:
    if crossing is None:
        return "none: gathered is faster up to 100%"
    if crossing == 0.0:
        return f"window faster from {FRACTIONS[0]:.0%} on"
    return f"{crossing:.0%}"


def markdown(rows: list[dict], crossings: list[dict]) -> str:
    lines = [f"device: {mx.default_device()}, MLX {mx.__version__}", "",
             "| d | C | dtype | selected | k | gathered ms | window ms | gathered/window |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['d']} | {r['C']} | {r['dtype']} | {r['fraction']:.0%} | {r['k']} | "
              f"{r['gathered_ms']:.3f} | {r['window_ms']:.3f} | {r['ratio']:.2f} |"
              for r in rows]
    lines += ["", "| d | C | dtype | crossover (window faster above) |", "|---:|---:|---|---|"]
    lines += [f"| {x['d']} | {x['C']} | {x['dtype']} | {describe(x['crossover'])} |"
              for x in crossings]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per point")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows, crossings = run(args.repeats)
    print(markdown(rows, crossings))
    if args.json:
        args.json.write_text(json.dumps({"device": str(mx.default_device()),
                                         "mlx": mx.__version__, "rows": rows,
                                         "crossovers": crossings}, indent=2))


if __name__ == "__main__":
    main()
