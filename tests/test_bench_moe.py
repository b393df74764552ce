"""The MoE benchmark's pieces (tools/bench_moe.py): the trace, the routers that follow it and the
safetensors writer (its harness, tools/benchlib.py: test_benchlib.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_moe  # noqa: E402
from tiny_moe import build_mlx_lm, moe_config  # noqa: E402


def test_trace_statistics() -> None:
    trace, keep = bench_moe.make_trace(3, 128, 8, 300, 0.6, 0.3, seed=1)
    assert trace.shape == (3, 300, 8) and 0 < keep < 1
    assert all(len(set(t)) == 8 for layer in trace for t in layer)  # k distinct experts
    stats = bench_moe.trace_stats(trace, 128)
    assert abs(stats["jaccard"] - 0.3) < 0.05
    flat, _ = bench_moe.make_trace(3, 128, 8, 300, 0.0, 0.3, seed=1)
    assert stats["top25_share"] > bench_moe.trace_stats(flat, 128)["top25_share"] + 0.1
    again, _ = bench_moe.make_trace(3, 128, 8, 300, 0.6, 0.3, seed=1)
    assert np.array_equal(trace, again)  # seeded


def test_trace_router_picks_the_trace() -> None:
    """mlx-lm's qwen3_moe block routes each position to exactly the trace's experts, the
    counter advancing by the positions of each call (prompt, then one token at a time)."""
    config = moe_config("qwen3_moe", 300)
    model = build_mlx_lm(config)
    seen = []

    class Recorder(nn.Module):
        def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
            seen.append(np.sort(np.array(indices)[0], axis=-1))
            return mx.zeros((*indices.shape, x.shape[-1]), x.dtype)

    for layer in model.layers:
        layer.mlp.switch_mlp = Recorder()
    n, k = config["num_experts"], config["num_experts_per_tok"]
    trace, _ = bench_moe.make_trace(len(model.layers), n, k, 10, 0.6, 0.3, seed=0)
    assert bench_moe.install_trace(model, trace, n) == len(model.layers)
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache))
    mx.eval(model(mx.array([[4]]), cache=cache))
    layers = len(model.layers)
    for i in range(layers):
        assert np.array_equal(seen[i], np.sort(trace[i, :3], axis=-1))
        assert np.array_equal(seen[layers + i], np.sort(trace[i, 3:4], axis=-1))


def test_safetensors_writer(tmp_path: Path) -> None:
    tensors = {"a": ((2, 3), "uint32"), "b": ((4,), "bfloat16")}
    arrays = {"a": np.arange(6, dtype=np.uint32).reshape(2, 3),
              "b": bench_moe._bf16(np.array([1.0, -2.5, 0.125, 3.0], np.float32))}
    bench_moe._write_safetensors(tmp_path / "x.safetensors", tensors, arrays.__getitem__)
    got = mx.load(str(tmp_path / "x.safetensors"))
    assert np.array_equal(np.array(got["a"]), arrays["a"])
    assert got["b"].dtype == mx.bfloat16
    assert np.array_equal(np.array(got["b"].astype(mx.float32)), [1.0, -2.5, 0.125, 3.0])
