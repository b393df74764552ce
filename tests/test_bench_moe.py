"""The MoE benchmark's model (tools/moe_model.py) and pieces of its harness (tools/bench_moe.py):
the routing design meets its statistics, the GGUF holds the folder's weights exactly, greedy
decoding walks the design's cycle from the folder and from the GGUF alike, the routing recorder
and Belady's bound (the harness itself, tools/benchlib.py: test_benchlib.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_moe  # noqa: E402
import moe_model  # noqa: E402

from mlx_flash.eviction import belady_hit_rate  # noqa: E402

# a small qwen3_moe in the benchmark's layout: 4 groups of 64 (constant, walk x2, key)
TINY = dict(bench_moe.QWEN3_30B_A3B, num_hidden_layers=2, vocab_size=512, hidden_size=256,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
            num_experts_per_tok=4, moe_intermediate_size=64, intermediate_size=128)
PROMPT = [1, 100, 200, 300]


def test_design_meets_its_targets() -> None:
    """tune's beta and rho give the asked long-run share and Jaccard at the benchmark's shape,
    and they move the statistics the way they should (so the test could fail)."""
    design = moe_model.tune(2048, 128, 8, 32000, 0.51, 0.3, tokens=1000)
    stats = moe_model.routing_stats(moe_model.simulate(design, 2000, 3), 128)
    assert abs(stats["top25_share"] - 0.51) < 0.03 and abs(stats["jaccard"] - 0.3) < 0.04
    flat = moe_model.Design(2048, 128, 8, 32000, 0.0, design.rho)
    frozen = moe_model.Design(2048, 128, 8, 32000, design.beta, 0.0)
    assert moe_model.routing_stats(moe_model.simulate(flat, 2000, 3), 128)["top25_share"] \
        < stats["top25_share"] - 0.1
    assert moe_model.routing_stats(moe_model.simulate(frozen, 2000, 3), 128)["jaccard"] \
        < stats["jaccard"] - 0.1


def test_quantizers_round_trip() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3, 128)).astype(np.float32)
    q, s, b = moe_model.affine4(v)
    got = moe_model.dequantize(moe_model.pack(q, 4), s, b, 4)
    assert np.abs(got - v).max() <= moe_model.from_bf16(s).max() * 0.51 + 0.02
    q8, s8, b8 = moe_model.symmetric8(v)
    words = moe_model.pack(q8, 8)
    assert np.array_equal(moe_model.unpack(words, 8), q8)
    mine = moe_model.dequantize(words, s8, b8, 8)  # MLX's own dequantization agrees
    theirs = mx.dequantize(mx.array(words), mx.array(moe_model.from_bf16(s8)),
                           mx.array(moe_model.from_bf16(b8)), group_size=64, bits=8)
    assert np.array_equal(mine, np.array(theirs))
    assert np.abs(mine - v).max() < np.abs(v).max() / 127


def test_q4_1_holds_mlx_values_exactly() -> None:
    """MLX group-64 4-bit rows -> Q4_1 bytes that gguf-py dequantizes to the same floats; a
    scale float16 cannot hold is refused."""
    import gguf

    rng = np.random.default_rng(1)
    words = rng.integers(0, 2**32, (5, 16), dtype=np.uint32)  # 5 rows of 128
    scales = moe_model.bf16(rng.uniform(1e-3, 1e-1, (5, 2)).astype(np.float32))
    biases = moe_model.bf16(-7.5 * moe_model.from_bf16(scales))
    blocks = moe_model.q4_1_blocks(words, scales, biases)
    got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(got, moe_model.dequantize(words, scales, biases, 4))
    with pytest.raises(ValueError):
        moe_model.q4_1_blocks(words, moe_model.bf16(np.full((5, 2), 1e-9, np.float32)), biases)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("routed")
    design = moe_model.tune(256, 16, 4, 512, 0.5, 0.3, tokens=500)
    moe_model.write_folder(root / "folder", TINY, design)
    moe_model.write_gguf(root / "m.gguf", TINY, design)
    return {"root": root, "design": design}


def test_gguf_round_trips_the_folder(tiny: dict) -> None:
    """Every tensor of the GGUF dequantizes (gguf-py) to the folder's dequantized weights
    (MLX, float32), bit for bit; under llama.cpp's names and types."""
    import gguf
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny["root"] / "folder")
    params = dict(tree_flatten(model.parameters()))
    stored = {t.name: t for t in gguf.GGUFReader(str(tiny["root"] / "m.gguf")).tensors}
    weights = [n for n in params if n.endswith(".weight")]
    assert len(stored) == len(weights)
    for name in weights:
        base = name.removesuffix(".weight")
        t = stored[moe_model.gguf_name(base)]
        if f"{base}.scales" in params:
            bits = 8 if base.endswith("mlp.gate") else 4
            assert t.tensor_type.name == ("F32" if bits == 8 else "Q4_1"), name
            w = mx.dequantize(params[name], params[f"{base}.scales"].astype(mx.float32),
                              params[f"{base}.biases"].astype(mx.float32), 64, bits)
        else:
            w = params[name].astype(mx.float32)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        assert np.array_equal(np.array(w).reshape(-1), got), name


def test_greedy_walks_the_cycle_from_folder_and_gguf(tiny: dict, monkeypatch) -> None:
    """mlx-lm on the folder, and our engine on the folder and on the GGUF (experts streamed
    from it, naive and within a budget), decode the same greedy tokens: the design's cycle."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    import mlx_flash

    monkeypatch.setenv("MLX_FLASH_HOME", str(tiny["root"] / "home"))
    design = tiny["design"]
    walk = [design.successor(PROMPT[-1])]
    while len(walk) < 12:
        walk.append(design.successor(walk[-1]))

    def greedy(model) -> list[int]:
        return [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=12)]

    assert greedy(load_model(tiny["root"] / "folder")[0]) == walk
    for source, budget in (("folder", "off"), ("m.gguf", "off"), ("m.gguf", "auto")):
        model, _ = mlx_flash.load(tiny["root"] / source, memory_budget=budget)
        assert greedy(model) == walk, (source, budget)


def test_recorded_routing_is_the_routers_top_k(tiny: dict) -> None:
    """The recorder keeps what each layer's router picked: the top-k of its logits on the
    layer's input, per position (the prompt's, then each decoded token's)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny["root"] / "folder")
    model.set_dtype(mx.float32)  # as the benchmark runs mlx-lm: no ties among the logits
    recorders = bench_moe.record_routing(model)
    inputs = []
    for layer in model.layers:  # the MoE block's input, to recompute its router's choice
        block = layer.mlp

        class Spy:
            def __init__(self, inner):
                self.inner = inner

            def __call__(self, x):
                inputs.append(x)
                return self.inner(x)

        block.gate = Spy(block.gate)
    for _ in generate_step(mx.array(PROMPT), model, max_tokens=4):
        pass
    trace, start = bench_moe.recorded_routing(recorders)
    # mlx-lm computes a step ahead of what it yields: positions past the prompt + 3
    assert trace.shape[0] == 2 and trace.shape[2] == 4 and trace.shape[1] >= len(PROMPT) + 3
    assert start == len(PROMPT) - 1
    layers = len(model.layers)
    x = [mx.concatenate([inputs[i] for i in range(j, len(inputs), layers)], axis=1)
         for j in range(layers)]
    for j, layer in enumerate(model.layers):
        logits = np.array(layer.mlp.gate.inner(x[j]))[0]
        want = np.sort(np.argsort(-logits, axis=-1)[:, :4], axis=-1)
        assert np.array_equal(np.sort(trace[j], axis=-1), want)


def test_belady_after_a_prompt() -> None:
    """With nothing before `start` it is eviction's Belady; a prompt that holds the decoded
    tokens' experts makes every decode routing a hit."""
    rng = np.random.default_rng(2)
    trace = np.stack([rng.choice(32, 4, replace=False) for _ in range(60)])
    for slots in (4, 8, 16):
        assert bench_moe.belady_after(trace, 0, slots) == pytest.approx(
            belady_hit_rate(list(trace), slots))
    warm = np.concatenate([trace[:2], trace[:2]])
    assert bench_moe.belady_after(warm, 2, 8) == 1.0
    assert bench_moe.belady_after(warm, 2, 4) < 1.0


def test_safetensors_writer(tmp_path: Path) -> None:
    tensors = {"a": ((2, 3), "uint32"), "b": ((4,), "bfloat16")}
    arrays = {"a": np.arange(6, dtype=np.uint32).reshape(2, 3),
              "b": moe_model.bf16(np.array([1.0, -2.5, 0.125, 3.0], np.float32))}
    moe_model.write_safetensors(tmp_path / "x.safetensors", tensors, arrays.__getitem__)
    got = mx.load(str(tmp_path / "x.safetensors"))
    assert np.array_equal(np.array(got["a"]), arrays["a"])
    assert got["b"].dtype == mx.bfloat16
    assert np.array_equal(np.array(got["b"].astype(mx.float32)), [1.0, -2.5, 0.125, 3.0])
